//! CUDA C of the elementwise pieces of a Llama forward pass: RMSNorm, RoPE (both pair layouts),
//! SwiGLU, embedding gather and residual add, each for f16 and bf16 storage with f32 math.
//!
//! Contracts (row-major, `T` the storage dtype):
//! - `rmsnorm_*(x (rows, dim), w (dim), out (rows, dim), rows, dim, eps)`:
//!   `out = x / sqrt(mean(x²) + eps) · w`; one block per row.
//! - `rope_*(x (seq, n_heads, head_dim), pos (seq) i32, seq, n_heads, head_dim, theta, neox)`:
//!   in place; pair `p < head_dim / 2` rotates by `pos · theta^(-2p / head_dim)`. `neox = 0` pairs
//!   elements `(2p, 2p + 1)` (GGUF/llama.cpp "normal"), `neox = 1` pairs `(p, p + head_dim/2)`.
//!   Positions are global (ring and chunked prefill pass them explicitly).
//! - `swiglu_*(gate, up, out, n)`: `out = gate · sigmoid(gate) · up`.
//! - `embed_*(ids (n) u32, table (vocab, dim), out (n, dim), n, dim)`: ids are validated on the
//!   host before launch.
//! - `add_*(x, y, n)`: `x += y` in place.
//! - `rmsnorm_f32in_*(x (rows, dim) f32, w (dim) f32, out (rows, dim), rows, dim, eps)`: RMSNorm
//!   of the f32 residual stream into the storage dtype; one block per row.
//! - `add_f32_*(x f32, y, n)`: `x += y` in place, the residual stream in f32.
//! - `bias_*(x (rows, dim), b (dim), n, dim)`: `x[i] += b[i % dim]` (QKV biases), `n` elements.

/// Entry points of this module.
pub const ENTRIES: &[&str] = &[
    "rmsnorm_f16",
    "rmsnorm_bf16",
    "rope_f16",
    "rope_bf16",
    "swiglu_f16",
    "swiglu_bf16",
    "embed_f16",
    "embed_bf16",
    "add_f16",
    "add_bf16",
    "rmsnorm_f32in_f16",
    "rmsnorm_f32in_bf16",
    "add_f32_f16",
    "add_f32_bf16",
    "bias_f16",
    "bias_bf16",
];

/// The module body (`cu/elementwise.cu`); needs the prelude before it.
pub const SOURCE: &str = include_str!("cu/elementwise.cu");
