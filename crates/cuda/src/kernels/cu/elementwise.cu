// Elementwise pieces of a Llama forward pass (module tessera_elementwise): RMSNorm, RoPE,
// SwiGLU, embedding gather and residual add, each for f16 and bf16 storage with f32 math.
//
// Not a standalone translation unit: a fragment compiled at run time by NVRTC after prelude.cu
// (it uses u16/u32, F16/BF16 and block_sum from there); see crates/cuda/src/kernels/mod.rs for
// how modules are assembled.

#define GRID_STRIDE(i, n) \
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < (n); \
         i += (long long)gridDim.x * blockDim.x)

template <typename T>
__device__ __forceinline__ void rmsnorm(const u16* __restrict__ x, const u16* __restrict__ w,
    u16* __restrict__ out, int dim, float eps) {
    __shared__ float scratch[32];
    const long long base = (long long)blockIdx.x * dim;
    float ss = 0.0f;
    for (int d = threadIdx.x; d < dim; d += blockDim.x) {
        const float v = T::ld(x[base + d]);
        ss = fmaf(v, v, ss);
    }
    ss = block_sum(ss, scratch);
    const float inv = rsqrtf(ss / (float)dim + eps);
    for (int d = threadIdx.x; d < dim; d += blockDim.x)
        out[base + d] = T::st(T::ld(x[base + d]) * inv * T::ld(w[d]));
}

template <typename T>
__device__ __forceinline__ void rope(u16* __restrict__ x, const int* __restrict__ pos,
    int seq, int n_heads, int hd, float theta, int neox) {
    const int half = hd / 2;
    const long long n = (long long)seq * n_heads * half;
    GRID_STRIDE(i, n) {
        const int p = (int)(i % half);
        const long long vec = i / half;          // (token, head)
        const int tok = (int)(vec / n_heads);
        // Angles in f32 lose digits at long positions; compute them in f64 and reduce there.
        const double freq = pow((double)theta, -2.0 * (double)p / (double)hd);
        double sd, cd;
        sincos((double)pos[tok] * freq, &sd, &cd);
        const float s = (float)sd, c = (float)cd;
        u16* row = x + vec * hd;
        const int i0 = neox ? p : 2 * p;
        const int i1 = neox ? p + half : 2 * p + 1;
        const float a = T::ld(row[i0]), b = T::ld(row[i1]);
        row[i0] = T::st(a * c - b * s);
        row[i1] = T::st(a * s + b * c);
    }
}

template <typename T>
__device__ __forceinline__ void swiglu(const u16* __restrict__ gate, const u16* __restrict__ up,
    u16* __restrict__ out, long long n) {
    GRID_STRIDE(i, n) {
        const float g = T::ld(gate[i]);
        out[i] = T::st(g / (1.0f + expf(-g)) * T::ld(up[i]));
    }
}

__device__ __forceinline__ void embed(const u32* __restrict__ ids, const u16* __restrict__ table,
    u16* __restrict__ out, int n, int dim) {
    GRID_STRIDE(i, (long long)n * dim) {
        const long long t = i / dim;
        out[i] = table[(long long)ids[t] * dim + (i - t * dim)];
    }
}

template <typename T>
__device__ __forceinline__ void add(u16* __restrict__ x, const u16* __restrict__ y, long long n) {
    GRID_STRIDE(i, n) x[i] = T::st(T::ld(x[i]) + T::ld(y[i]));
}

#define TYPED(NAME_F16, NAME_BF16, PARAMS, CALL_F16, CALL_BF16) \
extern "C" __global__ void NAME_F16 PARAMS { CALL_F16; }         \
extern "C" __global__ void NAME_BF16 PARAMS { CALL_BF16; }

TYPED(rmsnorm_f16, rmsnorm_bf16,
    (const u16* x, const u16* w, u16* out, int rows, int dim, float eps),
    rmsnorm<F16>(x, w, out, dim, eps), rmsnorm<BF16>(x, w, out, dim, eps))
TYPED(rope_f16, rope_bf16,
    (u16* x, const int* pos, int seq, int n_heads, int hd, float theta, int neox),
    rope<F16>(x, pos, seq, n_heads, hd, theta, neox),
    rope<BF16>(x, pos, seq, n_heads, hd, theta, neox))
TYPED(swiglu_f16, swiglu_bf16, (const u16* gate, const u16* up, u16* out, long long n),
    swiglu<F16>(gate, up, out, n), swiglu<BF16>(gate, up, out, n))
// A gather copies 16-bit words, so both dtypes share the body.
TYPED(embed_f16, embed_bf16, (const u32* ids, const u16* table, u16* out, int n, int dim),
    embed(ids, table, out, n, dim), embed(ids, table, out, n, dim))
TYPED(add_f16, add_bf16, (u16* x, const u16* y, long long n),
    add<F16>(x, y, n), add<BF16>(x, y, n))

// The residual stream of a model stage stays in f32 (as the CPU engine keeps it); these read or
// update it while the projections' inputs and outputs are 16-bit.

// RMSNorm of f32 rows with f32 weights, written in the storage dtype (the next matmul's input).
template <typename T>
__device__ __forceinline__ void rmsnorm_f32in(const float* __restrict__ x,
    const float* __restrict__ w, u16* __restrict__ out, int dim, float eps) {
    __shared__ float scratch[32];
    const long long base = (long long)blockIdx.x * dim;
    float ss = 0.0f;
    for (int d = threadIdx.x; d < dim; d += blockDim.x) ss = fmaf(x[base + d], x[base + d], ss);
    ss = block_sum(ss, scratch);
    const float inv = rsqrtf(ss / (float)dim + eps);
    for (int d = threadIdx.x; d < dim; d += blockDim.x)
        out[base + d] = T::st(x[base + d] * inv * w[d]);
}

template <typename T>
__device__ __forceinline__ void add_f32(float* __restrict__ x, const u16* __restrict__ y,
    long long n) {
    GRID_STRIDE(i, n) x[i] += T::ld(y[i]);
}

// x (rows, dim) += b (dim) per row, in the storage dtype (QKV biases).
template <typename T>
__device__ __forceinline__ void bias(u16* __restrict__ x, const u16* __restrict__ b,
    long long n, int dim) {
    GRID_STRIDE(i, n) x[i] = T::st(T::ld(x[i]) + T::ld(b[i % dim]));
}

TYPED(rmsnorm_f32in_f16, rmsnorm_f32in_bf16,
    (const float* x, const float* w, u16* out, int rows, int dim, float eps),
    rmsnorm_f32in<F16>(x, w, out, dim, eps), rmsnorm_f32in<BF16>(x, w, out, dim, eps))
TYPED(add_f32_f16, add_f32_bf16, (float* x, const u16* y, long long n),
    add_f32<F16>(x, y, n), add_f32<BF16>(x, y, n))
TYPED(bias_f16, bias_bf16, (u16* x, const u16* b, long long n, int dim),
    bias<F16>(x, b, n, dim), bias<BF16>(x, b, n, dim))
