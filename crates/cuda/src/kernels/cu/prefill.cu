// Prefill attention over contiguous K/V (module tessera_prefill): attn_prefill_{f16,bf16}_d{64,
// 128,256}, FlashAttention-2 style, batched, GQA in place, bottom-right causal masking.
//
// Not a standalone translation unit: a fragment compiled at run time by NVRTC after prelude.cu
// and attn_core.cu (it uses RowDesc, attend and WARPS/MAX_BM from there); see
// crates/cuda/src/kernels/mod.rs for how modules are assembled.

template <typename T, int DC, int RPW>
__device__ __forceinline__ void prefill(
    const u16* __restrict__ q, const u16* __restrict__ k, const u16* __restrict__ v,
    u16* __restrict__ out, float* __restrict__ lse,
    int seq_q, int seq_k, int n_heads, int n_kv_heads, int hd, int causal, float scale_log2) {
    extern __shared__ __align__(16) unsigned char smem[];
    __shared__ RowDesc rows[MAX_BM];
    __shared__ int block_lim;
    const int BM = WARPS * RPW;
    const int m0 = blockIdx.x * BM;
    const int h = blockIdx.y;
    const long long b = blockIdx.z;
    const int kvh = h / (n_heads / n_kv_heads);
    if (threadIdx.x == 0) block_lim = 0;
    __syncthreads();
    if (threadIdx.x < BM) {
        const int i = m0 + threadIdx.x;
        RowDesc r;
        if (i < seq_q) {
            const long long row = (b * seq_q + i) * n_heads + h;
            r.q_off = row * hd;
            r.o_off = row * hd;
            r.lse_off = row;
            // Bottom-right alignment: row i sees key j iff j <= i + seq_k - seq_q.
            r.lim = causal ? max(0, min(seq_k, i + seq_k - seq_q + 1)) : seq_k;
        } else {
            r.q_off = -1; r.o_off = 0; r.lse_off = 0; r.lim = 0;
        }
        rows[threadIdx.x] = r;
        atomicMax(&block_lim, r.lim);
    }
    __syncthreads();
    const long long tok_stride = (long long)n_kv_heads * hd;
    const long long kv_base = b * seq_k * tok_stride;
    attend<T, DC, RPW, false>(rows, block_lim, q, k + kv_base, v + kv_base, 0,
        1, tok_stride, (long long)kvh * hd, 0, seq_k, hd, scale_log2,
        out, 0, lse, smem);
}

#define PREFILL_ENTRY(NAME, T, DC, RPW)                                                   \
extern "C" __global__ void __launch_bounds__(WARPS * 32) NAME(                          \
    const u16* q, const u16* k, const u16* v, u16* out, float* lse,                       \
    int seq_q, int seq_k, int n_heads, int n_kv_heads, int hd, int causal, float scale_log2) { \
    prefill<T, DC, RPW>(q, k, v, out, lse, seq_q, seq_k, n_heads, n_kv_heads, hd, causal,  \
        scale_log2);                                                                      \
}

PREFILL_ENTRY(attn_prefill_f16_d64, F16, 2, 8)
PREFILL_ENTRY(attn_prefill_f16_d128, F16, 4, 8)
PREFILL_ENTRY(attn_prefill_f16_d256, F16, 8, 2)
PREFILL_ENTRY(attn_prefill_bf16_d64, BF16, 2, 8)
PREFILL_ENTRY(attn_prefill_bf16_d128, BF16, 4, 8)
PREFILL_ENTRY(attn_prefill_bf16_d256, BF16, 8, 2)
