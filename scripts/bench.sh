#!/usr/bin/env bash
# Decode and prefill speed of tessera and llama.cpp on the same GGUF and threads, one run.
# Installs llama-cpp-python (it compiles llama.cpp: a few minutes on two cores) into a venv
# the first time; pass extra `tessera bench` arguments through, e.g. --threads 2.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${GOLDEN_VENV:-tests/golden/.venv}
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import llama_cpp" 2>/dev/null; then
  python3 -m venv "$VENV"
  CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) "$VENV/bin/pip" install -q "llama-cpp-python==0.3.36" numpy
fi
exec cargo run --release -q -p tessera-cli -- bench --llama-python "$VENV/bin/python" "$@"
