#!/usr/bin/env bash
# The GPU check: runs the staged tessera-cuda binaries (see gpu-stage.sh) on a machine with an
# NVIDIA driver, CUDA libraries and PyTorch — no Rust, no network — in under 5 minutes, and
# prints:
#   ERR   every kernel's worst error against the f64 reference over the shape matrix (tests
#         fail when a tolerance of DESIGN.md is exceeded), decode at 32k and 128k keys included;
#   BENCH causal prefill and paged decode at head dim 64/128 × 4k/16k tokens, bf16 and f16,
#         each beside torch SDPA on the same inputs: time ratio (target ≥ 0.8) and the error of
#         both against an f64 reference;
#   NCCL  all-reduce and send/recv on the devices present (world size 1 on one GPU);
#   STAGE the GPU stage step against the CPU engine (random models, SmolLM2 greedy through
#         the first near-tie) and SmolLM2's prefill/decode tok/s on the device.
# Everything after the steps also goes to the figures file (FIGURES, default ./figures.txt).
#
# Usage: ./gpu-check.sh            (from the staged folder; bin/ and lib/ sit next to it)
# Env:   TESSERA_GPU_BIN (default ./bin), PYTHON (default python3), FIGURES (default
#        ./figures.txt), BUDGET_S (default 285: the whole check's time limit),
#        TESSERA_MODEL_GGUF (default: the staged model/ folder's SmolLM2).
# Without a device every device step fails, saying what is missing.
# Exit status: 0 when every step passed, 1 otherwise (each failing step is named at the end).
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bin="${TESSERA_GPU_BIN:-$here/bin}"
python="${PYTHON:-python3}"
log="$(mktemp -d)"
figures="${FIGURES:-$here/figures.txt}"
export TESSERA_MODEL_GGUF="${TESSERA_MODEL_GGUF:-$here/model/SmolLM2-135M-Instruct.Q4_1.gguf}"
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

step ptx 45 "$bin/ptx" --nocapture --test-threads=1
step smoke 15 "$bin/smoke" --nocapture
step unit 15 "$bin/unit" --test-threads=2
# The device tests are #[ignore]d (skipped on machines without a GPU): run them, and only
# them (the rest ran in the test suite).
step kernels 80 "$bin/gpu" --ignored --nocapture --test-threads=1
step stage 60 "$bin/stage" --ignored --nocapture --test-threads=1
TESSERA_BENCH_DUMP="$log/dump" step bench 40 "$bin/gpu_bench" --ignored --nocapture --test-threads=1
step nccl 15 "$bin/nccl" --ignored --nocapture --test-threads=1

# Everything below also goes to the figures file.
exec > >(tee "$figures")
echo "tessera GPU figures — $(date -u +%FT%TZ) — $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)"
echo
echo "=== errors against the f64 reference (kernels) and the CPU engine (stage) ==="
grep -h '^ERR ' "$log"/kernels.out "$log"/stage.out 2>/dev/null | sed 's/^ERR /  /' || true

echo
echo "=== SmolLM2 on the GPU stage ==="
grep -h '^BENCH kernel=smollm2' "$log"/stage.out 2>/dev/null | sed 's/^BENCH /  /' || echo "  (no result)"

echo
echo "=== NCCL ==="
grep -h '^BENCH kernel=nccl' "$log"/nccl.out 2>/dev/null | sed 's/^BENCH /  /' || echo "  (no result)"

echo
echo "=== ours vs torch SDPA (same inputs; error and time) ==="
grep -h '^BENCH kernel=\(prefill\|decode\)' "$log"/bench.out > "$log/ours.txt" 2>/dev/null || true
sdpa_limit=$((budget_s - (SECONDS - start)))
((sdpa_limit > 60)) && sdpa_limit=60
((sdpa_limit < 1)) && sdpa_limit=1
if ! timeout "$sdpa_limit" "$python" - "$log/ours.txt" "$log/dump" <<'PY'
import os, sys

ours_file, dump = sys.argv[1], sys.argv[2]
rows = []
for line in open(ours_file):
    rows.append(dict(f.split("=", 1) for f in line.split()[1:] if "=" in f))
try:
    import numpy as np
    import torch
    import torch.nn.functional as F
except Exception as e:  # noqa: BLE001 - report and fail
    print(f"  torch/numpy unavailable ({e})")
    sys.exit(1)
if not torch.cuda.is_available():
    print("  torch sees no CUDA device")
    sys.exit(1)
dev = torch.device("cuda")
dtypes = {"f16": torch.float16, "bf16": torch.bfloat16}
print(f"  torch {torch.__version__}, {torch.cuda.get_device_name()}")

def load(name, shape, dt):
    words = np.fromfile(os.path.join(dump, name + ".bin"), dtype=np.uint16)
    return torch.from_numpy(words.astype(np.int16)).view(dt).reshape(shape).to(dev)

def bench(fn, warmup, iters):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(iters):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / iters  # ms

def reference(q, k, v, causal, rows):
    # f64 attention of the last `rows` query rows (bottom-right causal), (H, rows, D).
    q, k, v = (t.double() for t in (q, k, v))
    s_q, s_k = q.shape[1], k.shape[1]
    qs = q[:, s_q - rows:]
    if k.shape[0] != q.shape[0]:
        rep = q.shape[0] // k.shape[0]
        k, v = k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)
    scores = qs @ k.transpose(1, 2) / q.shape[-1] ** 0.5
    if causal:
        i = torch.arange(s_q - rows, s_q, device=dev)[:, None] + (s_k - s_q)
        scores = scores.masked_fill(torch.arange(s_k, device=dev)[None, :] > i, float("-inf"))
    return torch.softmax(scores, -1) @ v

fail = False
for r in rows:
    dt, d, name = dtypes[r["dtype"]], int(r["head_dim"]), r["dump"]
    h = int(r["heads"])
    if r["kernel"] in ("prefill", "prefill_simt"):
        s = int(r["seq"])
        q, k, v, out = (load(f"{name}_{x}", (s, h, d), dt).transpose(0, 1) for x in "q k v out".split())
        fn = lambda: F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True)
        sdpa = fn()[0]
        ms = bench(fn, 2, 5)
        rows_ref = 256
        ref = reference(q, k, v, True, rows_ref)
        err_ours = (out[:, -rows_ref:].double() - ref).abs().max().item()
        err_sdpa = (sdpa[:, -rows_ref:].double() - ref).abs().max().item()
        diff = (out.float() - sdpa.float()).abs().max().item()
        ours_ms = float(r["ms"])
        ratio = ms / ours_ms
        ok = r["kernel"] == "prefill_simt" or ratio >= 0.8
        fail |= not ok
        print(f"  {r['kernel']:>12} {r['dtype']:>4} d={d:3} s={s:5}: ours {ours_ms:8.3f} ms | sdpa {ms:8.3f} ms | "
              f"speed {ratio:.2f}x{'' if r['kernel'] == 'prefill_simt' else ' (target >= 0.8)'} | "
              f"err vs f64: ours {err_ours:.2e} sdpa {err_sdpa:.2e} | max|ours-sdpa| {diff:.2e}")
    else:
        L, hkv = int(r["context"]), int(r["kv_heads"])
        q = load(f"{name}_q", (1, h, d), dt).transpose(0, 1)
        k, v = (load(f"{name}_{x}", (L, hkv, d), dt).transpose(0, 1) for x in "kv")
        out = load(f"{name}_out", (1, h, d), dt).transpose(0, 1)
        kr, vr = (t.repeat_interleave(h // hkv, 0) for t in (k, v))
        fn = lambda: F.scaled_dot_product_attention(q[None], kr[None], vr[None])
        sdpa = fn()[0]
        ms = bench(fn, 5, 50)
        ref = reference(q, k, v, False, 1)
        err_ours = (out.double() - ref).abs().max().item()
        err_sdpa = (sdpa.double() - ref).abs().max().item()
        ours_us = float(r["us"])
        ratio = ms * 1e3 / ours_us
        fail |= ratio < 0.8
        print(f"  {'decode':>12} {r['dtype']:>4} d={d:3} L={L:5}: ours {ours_us:8.1f} us (paged, {r['splits']} splits) | "
              f"sdpa {ms * 1e3:8.1f} us (contiguous) | speed {ratio:.2f}x (target >= 0.8) | "
              f"err vs f64: ours {err_ours:.2e} sdpa {err_sdpa:.2e}")
sys.exit(1 if fail else 0)
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
echo "ALL PASSED"
