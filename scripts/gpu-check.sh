#!/usr/bin/env bash
# The GPU check: runs the staged tessera-cuda binaries (see gpu-stage.sh) on a machine with an
# NVIDIA driver, CUDA libraries and PyTorch — no Rust, no network — in under 5 minutes, and
# prints:
#   ERR   every kernel's worst error against the f64 reference over the shape matrix (tests
#         fail when a tolerance of DESIGN.md is exceeded), decode at 32k and 128k keys included;
#   BENCH prefill TFLOP/s (batch 4, 16 heads, 4096 tokens, head dim 128, causal and not) and
#         decode latency at 32k, each beside torch SDPA on the same shapes, as a ratio;
#   NCCL  all-reduce and send/recv on the devices present (world size 1 on one GPU).
#
# Usage: ./gpu-check.sh            (from the staged folder; bin/ and lib/ sit next to it)
# Env:   TESSERA_GPU_BIN (default ./bin), TESSERA_REQUIRE_GPU (default 1: a missing device fails;
#        0 for a dry run on a machine without a GPU), PYTHON (default python3),
#        BUDGET_S (default 285: the whole check's time limit).
# Exit status: 0 when every step passed, 1 otherwise (each failing step is named at the end).
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bin="${TESSERA_GPU_BIN:-$here/bin}"
python="${PYTHON:-python3}"
log="$(mktemp -d)"
export TESSERA_REQUIRE_GPU="${TESSERA_REQUIRE_GPU:-1}"
export TESSERA_REQUIRE_NVRTC=1
start=$SECONDS
failed=()

# Library search: the staged NVRTC, then the CUDA libraries PyTorch ships as wheels. cudarc
# looks for libnccl.so (not the SONAME libnccl.so.2), so link it under that name.
shim="$log/lib"
mkdir -p "$shim"
lib_path="$here/lib:$shim"
site_libs="$("$python" - 2>/dev/null <<'PY'
import glob, os, site
dirs = []
for base in site.getsitepackages() + [site.getusersitepackages()]:
    dirs += glob.glob(os.path.join(base, "nvidia", "*", "lib"))
print(":".join(sorted(set(dirs))))
PY
)"
[[ -n "$site_libs" ]] && lib_path="$lib_path:$site_libs"
export LD_LIBRARY_PATH="$lib_path${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
nccl_so="$(IFS=:; for d in $LD_LIBRARY_PATH /usr/lib/x86_64-linux-gnu /usr/local/cuda/lib64; do
    ls "$d"/libnccl.so* 2>/dev/null; done | head -n 1)"
[[ -n "$nccl_so" ]] && ln -sf "$nccl_so" "$shim/libnccl.so"

# Every step gets its own limit, cut so that the whole check ends within BUDGET_S seconds.
budget_s="${BUDGET_S:-285}"
step() { # step NAME LIMIT_S CMD...: runs CMD with a time limit, logs its output to $log/NAME.
    local name="$1" limit="$2"
    shift 2
    local left=$((budget_s - (SECONDS - start)))
    ((left < limit)) && limit=$left
    echo "=== $name (limit ${limit}s) ==="
    if ((limit <= 0)); then
        echo "    SKIPPED: the ${budget_s}s budget is spent"
        failed+=("$name")
        return
    fi
    if timeout "$limit" "$@" >"$log/$name.out" 2>&1; then
        echo "    ok ($((SECONDS - start))s elapsed)"
    else
        echo "    FAILED (status $?):"
        # The first panics say why; the tail says how far it got.
        { grep -A3 "panicked" "$log/$name.out" | head -n 24; tail -n 4 "$log/$name.out"; } |
            sed 's/^/    | /'
        failed+=("$name")
    fi
}

echo "tessera GPU check — $(date -u +%FT%TZ)"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null ||
    echo "nvidia-smi unavailable"
echo "NCCL: ${nccl_so:-not found}"

step ptx 60 "$bin/ptx" --nocapture --test-threads=1
step smoke 20 "$bin/smoke" --nocapture
step unit 20 "$bin/unit" --test-threads=2
step kernels 120 "$bin/gpu" --nocapture --test-threads=1
step bench 45 "$bin/gpu_bench" --ignored --nocapture --test-threads=1
step nccl 30 "$bin/nccl" --nocapture --test-threads=1

echo
echo "=== errors against the f64 reference ==="
grep -h '^ERR ' "$log"/kernels.out 2>/dev/null | sed 's/^ERR /  /' || true
grep -h 'skipping' "$log"/*.out 2>/dev/null | sed 's/^/  /' || true

echo
echo "=== NCCL ==="
grep -h '^BENCH kernel=nccl' "$log"/nccl.out 2>/dev/null | sed 's/^BENCH /  /' || echo "  (no result)"

echo
echo "=== ours vs torch SDPA ==="
grep -h '^BENCH kernel=\(prefill\|decode\)' "$log"/bench.out > "$log/ours.txt" 2>/dev/null || true
sdpa_limit=$((budget_s - (SECONDS - start)))
((sdpa_limit > 60)) && sdpa_limit=60
((sdpa_limit < 1)) && sdpa_limit=1
if ! timeout "$sdpa_limit" "$python" - "$log/ours.txt" <<'PY'
import sys

def parse(path):
    rows = []
    for line in open(path):
        kv = dict(f.split("=", 1) for f in line.split()[1:] if "=" in f)
        rows.append(kv)
    return rows

ours = parse(sys.argv[1])
try:
    import torch
    import torch.nn.functional as F
except Exception as e:  # noqa: BLE001 - report and stop
    print(f"  torch unavailable ({e}); our figures only:")
    for r in ours:
        print("  ", r)
    sys.exit(0)
if not torch.cuda.is_available():
    print("  torch sees no CUDA device; our figures only:")
    for r in ours:
        print("  ", r)
    sys.exit(0)

dev = torch.device("cuda")
dtypes = {"f16": torch.float16, "bf16": torch.bfloat16}

def bench(fn, warmup, iters):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters  # ms

print(f"  torch {torch.__version__}, {torch.cuda.get_device_name()}")
B, H, S, D = 4, 16, 4096, 128
for r in [r for r in ours if r.get("kernel") == "prefill"]:
    dt, causal = dtypes[r["dtype"]], r["causal"] == "1"
    q, k, v = (torch.randn(B, H, S, D, device=dev, dtype=dt) for _ in range(3))
    ms = bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal), 3, 10)
    pairs = S * (S + 1) / 2 if causal else S * S
    tflops = 4 * pairs * B * H * D / (ms * 1e-3) / 1e12
    ours_t = float(r["tflops"])
    print(f"  prefill {r['dtype']:>4} causal={int(causal)}: ours {ours_t:7.1f} TFLOP/s ({float(r['ms']):.2f} ms)"
          f" | sdpa {tflops:7.1f} TFLOP/s ({ms:.2f} ms) | ratio {ours_t / tflops:.2f}x (target >= 0.8)")
Hq, Hkv, L = 32, 8, 32 * 1024
for r in [r for r in ours if r.get("kernel") == "decode"]:
    dt = dtypes[r["dtype"]]
    q = torch.randn(1, Hq, 1, D, device=dev, dtype=dt)
    k, v = (torch.randn(1, Hkv, L, D, device=dev, dtype=dt) for _ in range(2))
    try:
        fn = lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        fn()
    except TypeError:  # torch < 2.5: expand the KV heads outside the timed call
        k2, v2 = (t.repeat_interleave(Hq // Hkv, dim=1) for t in (k, v))
        fn = lambda: F.scaled_dot_product_attention(q, k2, v2)
    ms = bench(fn, 5, 50)
    ours_us = float(r["us"])
    print(f"  decode  {r['dtype']:>4} ctx={L}: ours {ours_us:8.1f} us (paged, {r['splits']} splits)"
          f" | sdpa {ms * 1e3:8.1f} us (contiguous) | speed ratio {ms * 1e3 / ours_us:.2f}x")
PY
then
    failed+=("sdpa")
fi

echo
echo "total $((SECONDS - start))s; logs in $log"
if [[ ${#failed[@]} -gt 0 ]]; then
    echo "FAILED: ${failed[*]}"
    exit 1
fi
[[ "$TESSERA_REQUIRE_GPU" == 1 ]] || echo "(dry run: TESSERA_REQUIRE_GPU=$TESSERA_REQUIRE_GPU, GPU tests may have skipped)"
echo "ALL PASSED"
