#!/usr/bin/env bash
# Builds the tessera image with no image registry: the locally made base image
# (scripts/make-base-image.sh) plus the binary built here (deploy/Dockerfile.local).
# Users with internet can instead run: docker build -f deploy/Dockerfile -t tessera:0.1.0 .
#
# Usage: scripts/build-image.sh [TAG]     (default tessera:0.1.0)
# Env:   TESSERA_BIN  a built binary to use (default: cargo build --release, then its output)
set -euo pipefail
cd "$(dirname "$0")/.."
tag=${1:-tessera:0.1.0}
base=tessera-base:bookworm-1
scripts/make-base-image.sh "$base"
bin=${TESSERA_BIN:-}
if [ -z "$bin" ]; then
  cargo build --release --locked -p tessera-cli
  bin="${CARGO_TARGET_DIR:-target}/release/tessera"
fi
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
cp "$bin" "$ctx/tessera"
docker build -q -f deploy/Dockerfile.local --build-arg "BASE=$base" -t "$tag" "$ctx" >/dev/null
echo "$tag built from $bin"
