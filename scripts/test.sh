#!/usr/bin/env bash
# The test command (README "Tests"): pulls the real models (SmolLM2, and the sentence-embedding
# model all-MiniLM-L6-v2), prepares the Python client's environment (grpcio-tools and
# grpcio-reflection for examples/python; the official openai and prometheus clients for the HTTP
# API and metrics tests) and NVRTC (the PTX compile test), then runs every test in the
# workspace. Tests that need a GPU are ignored (reported skipped);
# scripts/gpu-check.sh runs them on a machine with one.
# Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo run -q --locked -p tessera-cli -- model pull smollm2-135m-instruct
cargo run -q --locked -p tessera-cli -- model pull all-minilm-l6-v2

home=${TESSERA_HOME:-$HOME/.cache/tessera}
venv=${TESSERA_GRPC_VENV:-$home/venv-grpc}
if ! "$venv/bin/python" -c "import grpc_tools, grpc, grpc_reflection, openai, prometheus_client" >/dev/null 2>&1; then
  echo "preparing $venv (examples/python/requirements.txt)" >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check -r examples/python/requirements.txt
fi
export TESSERA_PYTHON="$venv/bin/python"

# NVRTC from its PyPI wheel, for the test that compiles every CUDA kernel to PTX (no GPU
# needed; without the library that test fails rather than skip).
nvrtc_dir=$(scripts/install-nvrtc.sh "${TESSERA_NVRTC_DIR:-$home/nvrtc}")
export LD_LIBRARY_PATH="$nvrtc_dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

cargo test --workspace --locked "$@"
