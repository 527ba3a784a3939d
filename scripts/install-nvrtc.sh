#!/usr/bin/env bash
# Installs NVRTC from the PyPI wheel `nvidia-cuda-nvrtc-cu12` into a private target directory and
# prints the directory that holds libnvrtc.so* (put it on LD_LIBRARY_PATH).
#
# Why a wheel: compiling CUDA C to PTX needs only NVRTC, not a driver or a GPU, and the wheel is
# the smallest official way to get it without a CUDA toolkit. The target directory is reused when
# the library is already there, so calling this twice costs nothing.
#
# Usage: scripts/install-nvrtc.sh [TARGET_DIR]
#   TARGET_DIR defaults to $TESSERA_NVRTC_DIR, else target/nvrtc (relative to the repo root).
# Output: exactly one line on stdout, the library directory; progress goes to stderr.
# Env: PYTHON (default python3), NVRTC_WHEEL_SPEC (default nvidia-cuda-nvrtc-cu12).
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
target="${1:-${TESSERA_NVRTC_DIR:-$repo_root/target/nvrtc}}"
python="${PYTHON:-python3}"
spec="${NVRTC_WHEEL_SPEC:-nvidia-cuda-nvrtc-cu12}"

find_lib_dir() {
    local lib
    lib="$(find "$target" -name 'libnvrtc.so*' ! -name '*builtins*' -print -quit 2>/dev/null || true)"
    [[ -n "$lib" ]] && dirname "$lib"
}

if ! dir="$(find_lib_dir)"; then
    mkdir -p "$target"
    echo "install-nvrtc: installing $spec into $target" >&2
    "$python" -m pip install --quiet --disable-pip-version-check --no-deps \
        --target "$target" "$spec" >&2
    dir="$(find_lib_dir)" || {
        echo "install-nvrtc: $spec installed but no libnvrtc.so* found under $target" >&2
        exit 1
    }
fi
echo "$dir"
