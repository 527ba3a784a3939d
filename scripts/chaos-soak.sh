#!/usr/bin/env bash
# The long chaos soak (the suite runs a bounded 64 s version): three replicated coordinators
# and three workers on loopback, 16 concurrent `tessera generate` clients, and a fault —
# kill -9 or SIGSTOP of a random worker or coordinator, brought back 4 s later — every
# FAULT_EVERY seconds. Prints requests completed, wrong and lost, latency p50/p99/max, and
# every process's resident memory after each fault and at the end.
# Usage: scripts/chaos-soak.sh [SECONDS (600)] [FAULT_EVERY (20)] [SEED (16)]
set -euo pipefail
cd "$(dirname "$0")/.."
export TESSERA_SOAK_SECS=${1:-600} TESSERA_SOAK_FAULT_EVERY_SECS=${2:-20} TESSERA_SOAK_SEED=${3:-16}
cargo run -q --locked -p tessera-cli -- model pull smollm2-135m-instruct >/dev/null
RUST_LOG=${RUST_LOG:-error} cargo test --locked -p tessera-cli --test chaos_soak -- --nocapture 2>&1 \
  | grep -E "^(chaos|test result|thread|  left|  right)|panicked|FAILED"
