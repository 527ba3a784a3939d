#!/usr/bin/env bash
# A context no single worker can hold (issue 14): a random-weight Llama-shaped model and a
# ~64k-token prompt over a ring of four worker processes with too little memory each for the
# whole KV cache, against one worker with enough (crates/cli/tests/ring_64k.rs). Release
# build; about ten minutes on two cores. Prints the per-rank KV in use and the comparison.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo run -q --locked -p tessera-cli -- model pull smollm2-135m-instruct
exec cargo test --release --locked -p tessera-cli --test ring_64k -- --ignored --nocapture "$@"
