// FlashAttention-2 style attention core shared by prefill.cu and decode.cu: K/V tiles of TILE
// keys streamed through shared memory (optionally through a paged block table), online softmax,
// no score matrix. WARPS, TILE, MAX_BM and the shared-memory layout are mirrored on the host in
// crates/cuda/src/plan.rs (attn_smem_bytes); change both together.
//
// Not a standalone translation unit: a fragment compiled at run time by NVRTC after prelude.cu
// (it uses u16/u32, NEG_INF, FULL_MASK and warp_max/warp_sum from there, and the caller's
// F16/BF16 as its storage type); see crates/cuda/src/kernels/mod.rs for how modules are
// assembled.

#define WARPS 4
#define TILE 32
#define MAX_BM 32

// Per-row description written by the kernel prologue before `attend` runs.
struct RowDesc {
    long long q_off;   // element offset of the query row, -1 for a padding row
    long long o_off;   // element offset of the output row
    long long lse_off; // offset of the row's log-sum-exp
    int lim;           // keys [0, lim) are visible to the row
};

// Even padded head dim: Q and V rows in shared memory use it as their stride.
__device__ __forceinline__ int padded_dim(int hd) { return (hd + 1) & ~1; }

// K row stride in u16: an odd number of 32-bit words, so 32 lanes reading one row each hit 32
// different banks.
__device__ __forceinline__ int k_stride(int hd) {
    int words = padded_dim(hd) >> 1;
    if ((words & 1) == 0) words += 1;
    return words << 1;
}

// Loads keys [t0, t0 + TILE) of one KV head into shared memory (zero beyond `t_end` and beyond
// `hd`), through the block table when there is one.
__device__ __forceinline__ void load_kv_tile(
    u16* __restrict__ sk, u16* __restrict__ sv,
    const u16* __restrict__ k, const u16* __restrict__ v, const u32* __restrict__ table,
    long long block_size, long long tok_stride, long long head_off,
    int t0, int t_end, int hd) {
    const int hp = padded_dim(hd);
    const int kst = k_stride(hd);
    if ((hd & 7) == 0) {
        // Head dims divisible by 8 (64, 80, 128, ...): 16-byte global loads; K rows have an
        // odd-word stride, so they are stored as four 32-bit words, V rows as one vector.
        const int vecs = hd >> 3;
        for (int idx = threadIdx.x; idx < TILE * vecs; idx += blockDim.x) {
            const int j = idx / vecs;
            const int d = (idx - j * vecs) * 8;
            const int t = t0 + j;
            uint4 kw = make_uint4(0u, 0u, 0u, 0u), vw = make_uint4(0u, 0u, 0u, 0u);
            if (t < t_end) {
                long long row;
                if (table != 0) {
                    const long long b = (long long)table[t / block_size];
                    row = (b * block_size + (t % block_size)) * tok_stride;
                } else {
                    row = (long long)t * tok_stride;
                }
                kw = *reinterpret_cast<const uint4*>(k + row + head_off + d);
                vw = *reinterpret_cast<const uint4*>(v + row + head_off + d);
            }
            u32* kd = reinterpret_cast<u32*>(sk + j * kst + d);
            kd[0] = kw.x; kd[1] = kw.y; kd[2] = kw.z; kd[3] = kw.w;
            *reinterpret_cast<uint4*>(sv + j * hp + d) = vw;
        }
        return;
    }
    const int pairs = hp >> 1;
    for (int idx = threadIdx.x; idx < TILE * pairs; idx += blockDim.x) {
        const int j = idx / pairs;
        const int d = (idx - j * pairs) * 2;
        const int t = t0 + j;
        u16 k0 = 0, k1 = 0, v0 = 0, v1 = 0;
        if (t < t_end) {
            long long row;
            if (table != 0) {
                const long long b = (long long)table[t / block_size];
                row = (b * block_size + (t % block_size)) * tok_stride;
            } else {
                row = (long long)t * tok_stride;
            }
            const long long off = row + head_off + d;
            if (((hd & 1) == 0) && ((off & 1) == 0)) {
                const u32 kw = *reinterpret_cast<const u32*>(k + off);
                const u32 vw = *reinterpret_cast<const u32*>(v + off);
                k0 = (u16)(kw & 0xffffu); k1 = (u16)(kw >> 16);
                v0 = (u16)(vw & 0xffffu); v1 = (u16)(vw >> 16);
            } else {
                k0 = k[off]; v0 = v[off];
                if (d + 1 < hd) { k1 = k[off + 1]; v1 = v[off + 1]; }
            }
        }
        sk[j * kst + d] = k0; sk[j * kst + d + 1] = k1;
        sv[j * hp + d] = v0; sv[j * hp + d + 1] = v1;
    }
}

// Attention of the block's rows (described by `rows`, BM = WARPS * RPW of them) over keys
// [k_begin, k_end) of one KV head. PARTIAL = false writes the normalised output in T to `out`
// and the natural-log LSE to `lse`; PARTIAL = true writes the same in f32 to `out_f32` (used by
// split-KV decode, whose partials are merged afterwards). A row with no visible key in the
// range gets output 0 and LSE -inf. `smem` is the dynamic shared memory, sized by the host.
template <typename T, int DC, int RPW, bool PARTIAL>
__device__ __forceinline__ void attend(
    const RowDesc* __restrict__ rows, int max_lim,
    const u16* __restrict__ q,
    const u16* __restrict__ k, const u16* __restrict__ v, const u32* __restrict__ table,
    long long block_size, long long tok_stride, long long head_off,
    int k_begin, int k_end, int hd, float scale_log2,
    u16* __restrict__ out, float* __restrict__ out_f32, float* __restrict__ lse,
    unsigned char* smem) {
    const int BM = WARPS * RPW;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int hp = padded_dim(hd);
    const int kst = k_stride(hd);
    float* sq = reinterpret_cast<float*>(smem);                 // (BM, hp) f32
    u16* sk = reinterpret_cast<u16*>(sq + BM * hp);              // (TILE, kst)
    u16* sv = sk + TILE * kst;                                   // (TILE, hp)

    // Queries stay resident for the whole key loop.
    for (int idx = threadIdx.x; idx < BM * hp; idx += blockDim.x) {
        const int r = idx / hp, d = idx - r * hp;
        const long long qo = rows[r].q_off;
        sq[idx] = (qo >= 0 && d < hd) ? T::ld(q[qo + d]) : 0.0f;
    }

    float o[RPW][DC];
    float m[RPW], l[RPW];
    int lim[RPW];
#pragma unroll
    for (int r = 0; r < RPW; ++r) {
        m[r] = NEG_INF;
        l[r] = 0.0f;
        lim[r] = rows[warp * RPW + r].lim;
#pragma unroll
        for (int c = 0; c < DC; ++c) o[r][c] = 0.0f;
    }

    const int end = min(k_end, max_lim);
    for (int t0 = k_begin; t0 < end; t0 += TILE) {
        __syncthreads();  // previous tile fully consumed (and queries stored, first time)
        load_kv_tile(sk, sv, k, v, table, block_size, tok_stride, head_off, t0, end, hd);
        __syncthreads();

        // Scores: lane j owns key t0 + j for all RPW rows of its warp.
        float s[RPW];
#pragma unroll
        for (int r = 0; r < RPW; ++r) s[r] = 0.0f;
        const u32* krow = reinterpret_cast<const u32*>(sk + lane * kst);
        const float2* qrows = reinterpret_cast<const float2*>(sq + warp * RPW * hp);
        for (int p = 0; p < (hp >> 1); ++p) {
            const u32 kw = krow[p];
            const float k0 = T::ld((u16)(kw & 0xffffu));
            const float k1 = T::ld((u16)(kw >> 16));
#pragma unroll
            for (int r = 0; r < RPW; ++r) {
                const float2 qq = qrows[r * (hp >> 1) + p];
                s[r] = fmaf(qq.x, k0, fmaf(qq.y, k1, s[r]));
            }
        }
        const int t = t0 + lane;
        float pr[RPW];
#pragma unroll
        for (int r = 0; r < RPW; ++r) {
            const float sc = (t < end && t < lim[r]) ? s[r] * scale_log2 : NEG_INF;
            const float mn = fmaxf(m[r], warp_max(sc));
            float alpha = 1.0f, pv = 0.0f;
            if (mn != NEG_INF) {
                alpha = exp2f(m[r] - mn);  // m = -inf gives 0: nothing accumulated yet
                pv = exp2f(sc - mn);
            }
            l[r] = l[r] * alpha + pv;
#pragma unroll
            for (int c = 0; c < DC; ++c) o[r][c] *= alpha;
            m[r] = mn;
            pr[r] = pv;
        }

        // Values: lane owns dims lane + 32c; probabilities come from the key's lane.
        const int jn = min(TILE, end - t0);
        for (int j = 0; j < jn; ++j) {
            float vv[DC];
#pragma unroll
            for (int c = 0; c < DC; ++c) {
                const int d = lane + 32 * c;
                vv[c] = d < hp ? T::ld(sv[j * hp + d]) : 0.0f;
            }
#pragma unroll
            for (int r = 0; r < RPW; ++r) {
                const float pj = __shfl_sync(FULL_MASK, pr[r], j);
#pragma unroll
                for (int c = 0; c < DC; ++c) o[r][c] = fmaf(pj, vv[c], o[r][c]);
            }
        }
    }

#pragma unroll
    for (int r = 0; r < RPW; ++r) {
        const RowDesc row = rows[warp * RPW + r];
        const float total = warp_sum(l[r]);
        if (row.q_off < 0) continue;
        const bool empty = (m[r] == NEG_INF) || !(total > 0.0f);
        const float inv = empty ? 0.0f : 1.0f / total;
#pragma unroll
        for (int c = 0; c < DC; ++c) {
            const int d = lane + 32 * c;
            if (d < hd) {
                const float val = o[r][c] * inv;
                if (PARTIAL) out_f32[row.o_off + d] = val;
                else out[row.o_off + d] = T::st(val);
            }
        }
        if (lane == 0) {
            // m is in the log2 domain (scores were pre-multiplied by log2 e).
            lse[row.lse_off] = empty ? NEG_INF : (m[r] + log2f(total)) * 0.69314718055994531f;
        }
    }
}
