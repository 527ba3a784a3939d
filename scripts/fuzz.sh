#!/usr/bin/env bash
# Runs tessera's fuzz targets (fuzz/, bodies in crates/fuzz) under libFuzzer with cargo-fuzz
# on the nightly toolchain, each for a fixed time, and prints one line of figures per target.
#
#   scripts/fuzz.sh [--seconds N] [--sanitizer address|none] [--dev] [TARGET...]
#
# Defaults: every target, 60 s each, AddressSanitizer, release builds (with debug assertions
# and overflow checks). CI runs a short pass (`--seconds 10 --sanitizer none --dev`: the dev
# profile of fuzz/Cargo.toml builds in a third of the time); long campaigns are this script
# with a larger --seconds.
# Each target starts from its committed seeds (fuzz/corpus/<target>, read only) and grows a
# working corpus in $TESSERA_FUZZ_WORK (default: a directory under /tmp kept across runs, so
# a later campaign continues where one stopped). An input that crashes a target is saved to
# $TESSERA_FUZZ_WORK/artifacts/<target>/ and the script exits non-zero after the last target;
# a fixed crash input belongs in fuzz/regressions/<target>/, which the test suite replays.
#
# Needs: the nightly toolchain, cargo-fuzz (`cargo install cargo-fuzz`), and SmolLM2 in the
# model cache (`tessera model pull smollm2-135m-instruct`; the tokenizer, request and stage
# targets run it).
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=60
sanitizer=address
profile=--release
targets=()
while [ $# -gt 0 ]; do
  case "$1" in
    --seconds) seconds=$2; shift 2 ;;
    --sanitizer) sanitizer=$2; shift 2 ;;
    --dev) profile=--dev; shift ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    -*) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
    *) targets+=("$1"); shift ;;
  esac
done
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <(ls fuzz/fuzz_targets | sed 's/\.rs$//')
fi

if ! cargo +nightly --version >/dev/null 2>&1; then
  echo "the nightly toolchain is missing: rustup toolchain install nightly --profile minimal" >&2
  exit 1
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  echo "cargo-fuzz is missing: cargo install cargo-fuzz --locked" >&2
  exit 1
fi

work=${TESSERA_FUZZ_WORK:-/tmp/tessera-fuzz}
mkdir -p "$work"
# Instrumented builds live apart from the stable ones (different toolchain and flags).
target_dir=${TESSERA_FUZZ_TARGET:-${CARGO_TARGET_DIR:-target}-fuzz}
build=(--fuzz-dir fuzz "$profile" --sanitizer "$sanitizer" --codegen-units 16 --target-dir "$target_dir")

echo "fuzz: building ${#targets[@]} targets (sanitizer $sanitizer, ${profile#--})" >&2
cargo +nightly fuzz build "${build[@]}"

failed=0
for t in "${targets[@]}"; do
  mkdir -p "$work/corpus/$t" "$work/artifacts/$t"
  log="$work/$t.log"
  # -rss_limit_mb: an input that makes a target allocate past this is a finding (OOM), as is
  # one that runs past -timeout seconds (a hang).
  # A dictionary (fuzz/dicts/<target>.dict) gives the mutator the words the format keys on.
  dict=()
  if [ -f "fuzz/dicts/$t.dict" ]; then dict=(-dict="fuzz/dicts/$t.dict"); fi
  set +e
  cargo +nightly fuzz run "${build[@]}" "$t" "$work/corpus/$t" "fuzz/corpus/$t" -- "${dict[@]}" \
    -max_total_time="$seconds" -rss_limit_mb=4096 -timeout=20 -print_final_stats=1 \
    -artifact_prefix="$work/artifacts/$t/" >"$log" 2>&1
  rc=$?
  set -e
  stat() { sed -n "s/^stat::$1: *//p" "$log" | tail -1; }
  execs=$(stat number_of_executed_units)
  speed=$(stat average_exec_per_sec)
  units=$(ls "$work/corpus/$t" | wc -l)
  crashes=$(ls "$work/artifacts/$t" | wc -l)
  echo "fuzz: $t ${seconds}s, ${execs:-0} execs (${speed:-0}/s), corpus $units, crash inputs $crashes, exit $rc"
  if [ "$rc" -ne 0 ]; then
    failed=1
    grep -m 20 -E "panicked|ERROR: libFuzzer|SUMMARY|Test unit written" "$log" >&2 || tail -n 30 "$log" >&2
  fi
done
exit "$failed"
