#!/usr/bin/env bash
# Long-context ring checks that take minutes, in a release build (figures for the ring
# attention issue's notes; CI runs the short versions): SmolLM2 on an 8000-token prompt through
# in-process rings of 2 and 4 against the single-process engine.
# Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo run -q --locked -p tessera-cli -- model pull smollm2-135m-instruct
cargo test --release --locked -p tessera-model --test ring_long "$@" -- --ignored --nocapture
