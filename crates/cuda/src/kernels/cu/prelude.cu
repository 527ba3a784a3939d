// Prelude of every tessera kernel module: the u16/u32 typedefs, NEG_INF and FULL_MASK, the
// F16/BF16 storage-conversion policies (raw 16-bit words, f32 math, no cuda_fp16.h/cuda_bf16.h
// so NVRTC needs no header search path) and warp/block reductions.
//
// Compiled at run time by NVRTC (never nvcc): crates/cuda/src/kernels/mod.rs embeds it with
// include_str! and puts it first in every module. It needs nothing before it.

typedef unsigned short u16;
typedef unsigned int u32;
#define NEG_INF (__int_as_float(0xff800000))
#define FULL_MASK 0xffffffffu

// IEEE half: hardware conversions, round to nearest even.
struct F16 {
    static __device__ __forceinline__ float ld(u16 x) {
        float f;
        asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x));
        return f;
    }
    static __device__ __forceinline__ u16 st(float f) {
        u16 x;
        asm("cvt.rn.f16.f32 %0, %1;" : "=h"(x) : "f"(f));
        return x;
    }
};

// bfloat16 is the top half of an f32; rounding is done by hand (nearest even, NaN kept quiet)
// so the same code runs on every architecture NVRTC targets.
struct BF16 {
    static __device__ __forceinline__ float ld(u16 x) {
        return __uint_as_float(((u32)x) << 16);
    }
    static __device__ __forceinline__ u16 st(float f) {
        u32 u = __float_as_uint(f);
        if ((u & 0x7fffffffu) > 0x7f800000u) return (u16)((u >> 16) | 0x40u);
        u += 0x7fffu + ((u >> 16) & 1u);
        return (u16)(u >> 16);
    }
};

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o));
    return v;
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

// Sum over a whole block of blockDim.x threads (a multiple of 32, at most 1024); every thread
// gets the result. `scratch` holds 32 floats of shared memory.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    const int n_warps = blockDim.x >> 5;
    v = lane < n_warps ? scratch[lane] : 0.0f;
    return warp_sum(v);
}
