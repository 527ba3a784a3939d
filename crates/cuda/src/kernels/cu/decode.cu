// Split-KV decode attention over a paged KV cache (module tessera_decode): attn_decode_{f16,
// bf16}_d{64,128,256} write per-split f32 partials and LSEs, attn_combine_{f16,bf16} merge them.
//
// Not a standalone translation unit: a fragment compiled at run time by NVRTC after prelude.cu
// and attn_core.cu (it uses RowDesc, attend and WARPS/MAX_BM from there); see
// crates/cuda/src/kernels/mod.rs for how modules are assembled.

template <typename T, int DC, int RPW>
__device__ __forceinline__ void decode(
    const u16* __restrict__ q, const u16* __restrict__ k, const u16* __restrict__ v,
    const u32* __restrict__ table, int block_size, int len,
    float* __restrict__ part_o, float* __restrict__ part_lse,
    int seq_q, int n_heads, int n_kv_heads, int hd, int causal, float scale_log2,
    int keys_per_split) {
    extern __shared__ __align__(16) unsigned char smem[];
    __shared__ RowDesc rows[MAX_BM];
    __shared__ int block_lim;
    const int BM = WARPS * RPW;
    const int split = blockIdx.x;
    const int kvh = blockIdx.y;
    const int group = n_heads / n_kv_heads;
    const int k_begin = split * keys_per_split;
    const int k_end = min(len, k_begin + keys_per_split);
    if (threadIdx.x == 0) block_lim = 0;
    __syncthreads();
    if (threadIdx.x < BM) {
        const int rg = blockIdx.z * BM + threadIdx.x;
        RowDesc r;
        if (rg < seq_q * group) {
            const int i = rg / group;
            const int h = kvh * group + (rg - i * group);
            const long long row = (long long)i * n_heads + h;
            r.q_off = row * hd;
            r.o_off = ((long long)split * seq_q * n_heads + row) * hd;
            r.lse_off = (long long)split * seq_q * n_heads + row;
            r.lim = causal ? max(0, min(len, i + len - seq_q + 1)) : len;
        } else {
            r.q_off = -1; r.o_off = 0; r.lse_off = 0; r.lim = 0;
        }
        rows[threadIdx.x] = r;
        atomicMax(&block_lim, r.lim);
    }
    __syncthreads();
    attend<T, DC, RPW, true>(rows, block_lim, q, k, v, table,
        block_size, (long long)n_kv_heads * hd, (long long)kvh * hd, k_begin, k_end, hd,
        scale_log2, 0, part_o, part_lse, smem);
}

#define DECODE_ENTRY(NAME, T, DC, RPW)                                                    \
extern "C" __global__ void __launch_bounds__(WARPS * 32) NAME(                          \
    const u16* q, const u16* k, const u16* v, const u32* table, int block_size, int len,  \
    float* part_o, float* part_lse, int seq_q, int n_heads, int n_kv_heads, int hd,       \
    int causal, float scale_log2, int keys_per_split) {                                   \
    decode<T, DC, RPW>(q, k, v, table, block_size, len, part_o, part_lse, seq_q, n_heads,  \
        n_kv_heads, hd, causal, scale_log2, keys_per_split);                              \
}

DECODE_ENTRY(attn_decode_f16_d64, F16, 2, 2)
DECODE_ENTRY(attn_decode_f16_d128, F16, 4, 2)
DECODE_ENTRY(attn_decode_f16_d256, F16, 8, 2)
DECODE_ENTRY(attn_decode_bf16_d64, BF16, 2, 2)
DECODE_ENTRY(attn_decode_bf16_d128, BF16, 4, 2)
DECODE_ENTRY(attn_decode_bf16_d256, BF16, 8, 2)

// One warp per output row (row = query * n_heads + head); block of 4 warps.
template <typename T>
__device__ __forceinline__ void combine(
    const float* __restrict__ part_o, const float* __restrict__ part_lse,
    u16* __restrict__ out, float* __restrict__ lse, int rows, int n_splits, int hd) {
    const int lane = threadIdx.x & 31;
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= rows) return;
    float mx = NEG_INF;
    for (int s = 0; s < n_splits; ++s) mx = fmaxf(mx, part_lse[(long long)s * rows + row]);
    if (mx == NEG_INF) {
        // Every split was empty: (0, -inf), never NaN.
        for (int d = lane; d < hd; d += 32) out[(long long)row * hd + d] = T::st(0.0f);
        if (lane == 0) lse[row] = NEG_INF;
        return;
    }
    float total = 0.0f;
    for (int s = 0; s < n_splits; ++s) total += expf(part_lse[(long long)s * rows + row] - mx);
    const float inv = 1.0f / total;
    for (int d = lane; d < hd; d += 32) {
        float acc = 0.0f;
        for (int s = 0; s < n_splits; ++s) {
            const float w = expf(part_lse[(long long)s * rows + row] - mx);
            acc = fmaf(w, part_o[((long long)s * rows + row) * hd + d], acc);
        }
        out[(long long)row * hd + d] = T::st(acc * inv);
    }
    if (lane == 0) lse[row] = mx + logf(total);
}

extern "C" __global__ void attn_combine_f16(const float* part_o, const float* part_lse,
    u16* out, float* lse, int rows, int n_splits, int hd) {
    combine<F16>(part_o, part_lse, out, lse, rows, n_splits, hd);
}
extern "C" __global__ void attn_combine_bf16(const float* part_o, const float* part_lse,
    u16* out, float* lse, int rows, int n_splits, int hd) {
    combine<BF16>(part_o, part_lse, out, lse, rows, n_splits, hd);
}
