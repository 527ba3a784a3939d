// Tensor-core prefill attention for head dims 64 and 128 on sm_80+ (module tessera_prefill_tc):
// attn_prefill_tc_{f16,bf16}_d{64,128}, FlashAttention-2 on mma.sync.m16n8k16 with ldmatrix.
//
// Not a standalone translation unit: a fragment compiled at run time by NVRTC after prelude.cu
// (it uses u16/u32, NEG_INF and FULL_MASK from there; it does not use attn_core.cu); see
// crates/cuda/src/kernels/mod.rs for how modules are assembled.

#define TC_BM 64
#define TC_BN 64

struct MmaF16 {
    static __device__ __forceinline__ void mma(float* c, const u32* a, const u32* b) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
            "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    }
    // Two f32 to a packed pair, `lo` in the low half (the lower column index).
    static __device__ __forceinline__ u32 pack(float lo, float hi) {
        u32 r;
        asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
        return r;
    }
};

struct MmaBF16 {
    static __device__ __forceinline__ void mma(float* c, const u32* a, const u32* b) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
            "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    }
    static __device__ __forceinline__ u32 pack(float lo, float hi) {
        u32 r;
        asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
        return r;
    }
};

template <typename M, int HD>
__device__ __forceinline__ void prefill_tc(
    const u16* __restrict__ q, const u16* __restrict__ k, const u16* __restrict__ v,
    u16* __restrict__ out, float* __restrict__ lse,
    int seq_q, int seq_k, int n_heads, int n_kv_heads, int causal, float scale_log2) {
    extern __shared__ __align__(16) unsigned char smem[];
    const int KS = HD + 8;  // u16 row stride of the K/V tiles: 16-byte rows, no bank conflicts
    u16* sk = reinterpret_cast<u16*>(smem);
    u16* sv = sk + TC_BN * KS;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, tq = lane & 3;
    const int h = blockIdx.y;
    const long long b = blockIdx.z;
    const int kvh = h / (n_heads / n_kv_heads);
    const int m0 = blockIdx.x * TC_BM;
    const int r0 = m0 + warp * 16 + g, r1 = r0 + 8;  // this thread's two rows
    const long long q_stride = (long long)n_heads * HD;
    const u16* qb = q + b * seq_q * q_stride + (long long)h * HD;

    // Q fragments (A operand, row-major 16 x 16 per k-step), resident for the whole loop.
    u32 qf[HD / 16][4];
#pragma unroll
    for (int ks = 0; ks < HD / 16; ++ks) {
        const int c = ks * 16 + 2 * tq;
        qf[ks][0] = r0 < seq_q ? *reinterpret_cast<const u32*>(qb + r0 * q_stride + c) : 0u;
        qf[ks][1] = r1 < seq_q ? *reinterpret_cast<const u32*>(qb + r1 * q_stride + c) : 0u;
        qf[ks][2] = r0 < seq_q ? *reinterpret_cast<const u32*>(qb + r0 * q_stride + c + 8) : 0u;
        qf[ks][3] = r1 < seq_q ? *reinterpret_cast<const u32*>(qb + r1 * q_stride + c + 8) : 0u;
    }

    // Bottom-right causal: row i sees keys j <= i + seq_k - seq_q.
    const int shift = seq_k - seq_q;
    const int lim0 = r0 < seq_q ? (causal ? max(0, min(seq_k, r0 + shift + 1)) : seq_k) : 0;
    const int lim1 = r1 < seq_q ? (causal ? max(0, min(seq_k, r1 + shift + 1)) : seq_k) : 0;
    const int last_row = min(m0 + TC_BM, seq_q) - 1;
    const int block_end = causal ? max(0, min(seq_k, last_row + shift + 1)) : seq_k;

    float o[HD / 8][4];
#pragma unroll
    for (int dt = 0; dt < HD / 8; ++dt) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.0f;
    float mx0 = NEG_INF, mx1 = NEG_INF, l0 = 0.0f, l1 = 0.0f;

    const long long tok_stride = (long long)n_kv_heads * HD;
    const u16* kb = k + b * seq_k * tok_stride + (long long)kvh * HD;
    const u16* vb = v + b * seq_k * tok_stride + (long long)kvh * HD;

    for (int t0 = 0; t0 < block_end; t0 += TC_BN) {
        __syncthreads();  // the previous tile is fully consumed
        const int VPR = HD / 8;  // 16-byte vectors per row
        for (int idx = threadIdx.x; idx < TC_BN * VPR; idx += blockDim.x) {
            const int j = idx / VPR, c = (idx - j * VPR) * 8;
            const int t = t0 + j;
            uint4 kk = make_uint4(0u, 0u, 0u, 0u), vv = make_uint4(0u, 0u, 0u, 0u);
            if (t < block_end) {
                kk = *reinterpret_cast<const uint4*>(kb + t * tok_stride + c);
                vv = *reinterpret_cast<const uint4*>(vb + t * tok_stride + c);
            }
            *reinterpret_cast<uint4*>(sk + j * KS + c) = kk;
            *reinterpret_cast<uint4*>(sv + j * KS + c) = vv;
        }
        __syncthreads();

        // S = Q K^T for this warp's 16 rows and the tile's 64 keys.
        float s[TC_BN / 8][4];
#pragma unroll
        for (int nt = 0; nt < TC_BN / 8; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
#pragma unroll
        for (int ks = 0; ks < HD / 16; ++ks) {
#pragma unroll
            for (int nt = 0; nt < TC_BN / 8; ++nt) {
                const u16* kr = sk + (nt * 8 + g) * KS + ks * 16 + 2 * tq;
                u32 bb[2];
                bb[0] = *reinterpret_cast<const u32*>(kr);
                bb[1] = *reinterpret_cast<const u32*>(kr + 8);
                M::mma(s[nt], qf[ks], bb);
            }
        }

        // Mask, scale (log2 domain), and the online softmax of rows r0 (c0,c1) and r1 (c2,c3).
        float tm0 = NEG_INF, tm1 = NEG_INF;
#pragma unroll
        for (int nt = 0; nt < TC_BN / 8; ++nt) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int key = t0 + nt * 8 + 2 * tq + e;
                s[nt][e] = key < lim0 ? s[nt][e] * scale_log2 : NEG_INF;
                s[nt][2 + e] = key < lim1 ? s[nt][2 + e] * scale_log2 : NEG_INF;
                tm0 = fmaxf(tm0, s[nt][e]);
                tm1 = fmaxf(tm1, s[nt][2 + e]);
            }
        }
        tm0 = fmaxf(tm0, __shfl_xor_sync(FULL_MASK, tm0, 1));
        tm0 = fmaxf(tm0, __shfl_xor_sync(FULL_MASK, tm0, 2));
        tm1 = fmaxf(tm1, __shfl_xor_sync(FULL_MASK, tm1, 1));
        tm1 = fmaxf(tm1, __shfl_xor_sync(FULL_MASK, tm1, 2));
        const float mn0 = fmaxf(mx0, tm0), mn1 = fmaxf(mx1, tm1);
        const float a0 = mn0 == NEG_INF ? 1.0f : exp2f(mx0 - mn0);
        const float a1 = mn1 == NEG_INF ? 1.0f : exp2f(mx1 - mn1);
        float ls0 = 0.0f, ls1 = 0.0f;
#pragma unroll
        for (int nt = 0; nt < TC_BN / 8; ++nt) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                s[nt][e] = mn0 == NEG_INF ? 0.0f : exp2f(s[nt][e] - mn0);
                s[nt][2 + e] = mn1 == NEG_INF ? 0.0f : exp2f(s[nt][2 + e] - mn1);
                ls0 += s[nt][e];
                ls1 += s[nt][2 + e];
            }
        }
        l0 = l0 * a0 + ls0;
        l1 = l1 * a1 + ls1;
        mx0 = mn0;
        mx1 = mn1;
#pragma unroll
        for (int dt = 0; dt < HD / 8; ++dt) {
            o[dt][0] *= a0; o[dt][1] *= a0;
            o[dt][2] *= a1; o[dt][3] *= a1;
        }

        // O += P V: P's C fragments of n-tiles 2j, 2j+1 are the A fragment of key step j.
#pragma unroll
        for (int j = 0; j < TC_BN / 16; ++j) {
            u32 pa[4];
            pa[0] = M::pack(s[2 * j][0], s[2 * j][1]);
            pa[1] = M::pack(s[2 * j][2], s[2 * j][3]);
            pa[2] = M::pack(s[2 * j + 1][0], s[2 * j + 1][1]);
            pa[3] = M::pack(s[2 * j + 1][2], s[2 * j + 1][3]);
            const u16* vrow = sv + (16 * j + (lane & 15)) * KS;
#pragma unroll
            for (int dt = 0; dt < HD / 8; ++dt) {
                u32 bb[2];
                const u32 addr = (u32)__cvta_generic_to_shared(vrow + dt * 8);
                asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];"
                             : "=r"(bb[0]), "=r"(bb[1]) : "r"(addr));
                M::mma(o[dt], pa, bb);
            }
        }
    }

    l0 += __shfl_xor_sync(FULL_MASK, l0, 1);
    l0 += __shfl_xor_sync(FULL_MASK, l0, 2);
    l1 += __shfl_xor_sync(FULL_MASK, l1, 1);
    l1 += __shfl_xor_sync(FULL_MASK, l1, 2);
    const bool e0 = mx0 == NEG_INF || !(l0 > 0.0f), e1 = mx1 == NEG_INF || !(l1 > 0.0f);
    const float inv0 = e0 ? 0.0f : 1.0f / l0, inv1 = e1 ? 0.0f : 1.0f / l1;
    u16* ob = out + b * seq_q * q_stride + (long long)h * HD;
    if (r0 < seq_q) {
#pragma unroll
        for (int dt = 0; dt < HD / 8; ++dt)
            *reinterpret_cast<u32*>(ob + r0 * q_stride + dt * 8 + 2 * tq) =
                M::pack(o[dt][0] * inv0, o[dt][1] * inv0);
        if (tq == 0)
            lse[(b * seq_q + r0) * n_heads + h] =
                e0 ? NEG_INF : (mx0 + log2f(l0)) * 0.69314718055994531f;
    }
    if (r1 < seq_q) {
#pragma unroll
        for (int dt = 0; dt < HD / 8; ++dt)
            *reinterpret_cast<u32*>(ob + r1 * q_stride + dt * 8 + 2 * tq) =
                M::pack(o[dt][2] * inv1, o[dt][3] * inv1);
        if (tq == 0)
            lse[(b * seq_q + r1) * n_heads + h] =
                e1 ? NEG_INF : (mx1 + log2f(l1)) * 0.69314718055994531f;
    }
}

#define PREFILL_TC_ENTRY(NAME, M, HD)                                                     \
extern "C" __global__ void __launch_bounds__(128) NAME(                                  \
    const u16* q, const u16* k, const u16* v, u16* out, float* lse,                       \
    int seq_q, int seq_k, int n_heads, int n_kv_heads, int causal, float scale_log2) {    \
    prefill_tc<M, HD>(q, k, v, out, lse, seq_q, seq_k, n_heads, n_kv_heads, causal,        \
        scale_log2);                                                                      \
}

PREFILL_TC_ENTRY(attn_prefill_tc_f16_d64, MmaF16, 64)
PREFILL_TC_ENTRY(attn_prefill_tc_f16_d128, MmaF16, 128)
PREFILL_TC_ENTRY(attn_prefill_tc_bf16_d64, MmaBF16, 64)
PREFILL_TC_ENTRY(attn_prefill_tc_bf16_d128, MmaBF16, 128)
