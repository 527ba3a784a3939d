//! Quantized weight matrices (GGUF block formats) and their matrix products.
//!
//! This is the engine's hot path: every linear layer is a [`QMatrix::matmul`]. The module owns
//! the block formats ([`QType`], byte-exact with ggml), reference quantizers, activation
//! quantization, the per-ISA dot-product kernels (portable, AVX2, AVX-512) and the parallel
//! driver that splits products over the [`crate::ThreadPool`].

mod act;
mod blocks;
#[cfg(target_arch = "x86_64")]
mod dot_avx2;
#[cfg(target_arch = "x86_64")]
mod dot_avx2_k;
#[cfg(target_arch = "x86_64")]
mod dot_avx512;
#[cfg(target_arch = "x86_64")]
mod dot_rows;
mod dot_scalar;
#[cfg(target_arch = "x86_64")]
mod float_avx2;
#[cfg(target_arch = "x86_64")]
mod float_avx512;
mod matmul;
mod matmul_float;
mod matrix;
mod quantize;

#[cfg(test)]
mod bench;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_float;

pub use crate::isa::Isa;
pub use matmul::QScratch;
pub use matrix::QMatrix;
pub use tessera_format::{QK_K, QType};
