// Ring-attention (O, LSE) merge into an f32 accumulator and the final f32 -> f16/bf16 cast
// (module tessera_merge): attn_merge_{f16,bf16}, cast_f32_to_{f16,bf16}.
//
// Not a standalone translation unit: a fragment compiled at run time by NVRTC after prelude.cu
// (it uses u16, NEG_INF and F16/BF16 from there); see crates/cuda/src/kernels/mod.rs for how
// modules are assembled.

template <typename T>
__device__ __forceinline__ void merge(float* __restrict__ acc_o, float* __restrict__ acc_lse,
    const u16* __restrict__ part_o, const float* __restrict__ part_lse, int rows, int hd) {
    const int lane = threadIdx.x & 31;
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= rows) return;
    const float la = acc_lse[row];
    const float lb = part_lse[row];
    if (lb == NEG_INF) return;  // empty part: nothing to add (also empty + empty)
    float* a = acc_o + (long long)row * hd;
    const u16* p = part_o + (long long)row * hd;
    if (la == NEG_INF) {
        for (int d = lane; d < hd; d += 32) a[d] = T::ld(p[d]);
    } else {
        const float hi = fmaxf(la, lb), lo = fminf(la, lb);
        const float l = hi + log1pf(expf(lo - hi));
        const float wa = expf(la - l), wb = expf(lb - l);
        for (int d = lane; d < hd; d += 32) a[d] = wa * a[d] + wb * T::ld(p[d]);
        __syncwarp();
        if (lane == 0) acc_lse[row] = l;
        return;
    }
    __syncwarp();
    if (lane == 0) acc_lse[row] = lb;
}

extern "C" __global__ void attn_merge_f16(float* acc_o, float* acc_lse, const u16* part_o,
    const float* part_lse, int rows, int hd) {
    merge<F16>(acc_o, acc_lse, part_o, part_lse, rows, hd);
}
extern "C" __global__ void attn_merge_bf16(float* acc_o, float* acc_lse, const u16* part_o,
    const float* part_lse, int rows, int hd) {
    merge<BF16>(acc_o, acc_lse, part_o, part_lse, rows, hd);
}

extern "C" __global__ void cast_f32_to_f16(const float* x, u16* y, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) y[i] = F16::st(x[i]);
}
extern "C" __global__ void cast_f32_to_bf16(const float* x, u16* y, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) y[i] = BF16::st(x[i]);
}
