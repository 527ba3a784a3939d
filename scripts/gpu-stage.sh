#!/usr/bin/env bash
# Builds tessera-cuda's test and benchmark binaries here (x86-64 Linux) and stages them, with
# gpu-check.sh, the NVRTC libraries and SmolLM2 (when available), into one folder to copy to a
# GPU machine that has a driver, CUDA libraries (cuBLAS, NCCL) and PyTorch but no Rust and no
# network.
#
# Usage: scripts/gpu-stage.sh [OUT_DIR]      (default: target/gpu-check)
# Env:   PROFILE      cargo profile of the binaries (default release; `dev` reuses test builds)
#        TESSERA_NVRTC_DIR  where install-nvrtc.sh puts the wheel (default target/nvrtc)
# Then:  copy OUT_DIR to the GPU machine and run OUT_DIR/gpu-check.sh there.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-$repo_root/target/gpu-check}"
profile="${PROFILE:-release}"
cd "$repo_root"

echo "gpu-stage: building tessera-cuda tests (profile $profile, feature cuda)" >&2
# One JSON message per artifact; keep the executables of the crate's test targets.
mapfile -t exes < <(
    cargo test -p tessera-cuda --features cuda --profile "$profile" --no-run \
        --message-format=json 2>/dev/null |
        python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    exe = m.get("executable")
    t = m.get("target", {})
    if m.get("reason") == "compiler-artifact" and exe and m.get("package_id", "").find("tessera-cuda") >= 0:
        name = t.get("name", "")
        if "lib" in t.get("kind", []):
            name = "unit"
        print(name + "\t" + exe)
'
)
if [[ ${#exes[@]} -eq 0 ]]; then
    echo "gpu-stage: no test binaries were built (run the cargo command above to see why)" >&2
    exit 1
fi

rm -rf "$out"
mkdir -p "$out/bin" "$out/lib"
for entry in "${exes[@]}"; do
    name="${entry%%$'\t'*}"
    exe="${entry#*$'\t'}"
    cp "$exe" "$out/bin/$name"
    echo "gpu-stage: bin/$name" >&2
done
cp "$repo_root/scripts/gpu-check.sh" "$out/"

# NVRTC from the wheel, so the GPU machine needs nothing beyond its driver for compiling.
if nvrtc_dir="$("$repo_root/scripts/install-nvrtc.sh" 2>/dev/null)"; then
    cp -P "$nvrtc_dir"/libnvrtc.so* "$nvrtc_dir"/libnvrtc-builtins.so* "$out/lib/"
    echo "gpu-stage: lib/ <- $nvrtc_dir" >&2
else
    echo "gpu-stage: NVRTC not staged (install-nvrtc.sh failed); the GPU machine must have it" >&2
fi
# SmolLM2 for the stage test (the GPU machine has no network to pull it).
home="${TESSERA_HOME:-$HOME/.cache/tessera}"
model="${TESSERA_MODEL_GGUF:-$home/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf}"
if [[ -f "$model" ]]; then
    mkdir -p "$out/model"
    cp "$model" "$out/model/SmolLM2-135M-Instruct.Q4_1.gguf"
    echo "gpu-stage: model/ <- $model" >&2
else
    echo "gpu-stage: SmolLM2 not staged ($model missing: tessera model pull smollm2-135m-instruct)" >&2
fi
du -sh "$out" >&2
echo "$out"
