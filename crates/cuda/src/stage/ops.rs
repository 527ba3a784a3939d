//! The device operations a GPU stage step is made of — the seam between the step's host-side
//! logic ([`super::GpuStage`]: weight layout, KV paging, batching, which kernel runs where) and
//! whatever executes the operations.
//!
//! Two implementations: [`super::CudaOps`] (feature `cuda`) launches cuBLAS and our kernels on
//! a device; [`super::HostOps`] computes each operation's contract on the CPU, in f32 with the
//! device's roundings, so the step's logic runs and is checked against the CPU engine on any
//! machine. Each operation's contract is the kernel's (see `crate::kernels`); an
//! implementation may order f32 sums differently, nothing else.
//!
//! Buffers: [`StageOps::Half`] holds 16-bit floats of [`StageOps::dtype`] (weights,
//! activations, the KV pools), [`StageOps::Float`] holds f32 (the residual stream, norm
//! weights, logits), [`StageOps::Positions`] a step's row positions. Layouts are row-major; `(m, k)` means m rows of k values.

use crate::dtype::DType;
use crate::error::{Result, check_len};
use crate::plan::{DecodeParams, PrefillParams, RopeLayout};

/// The operations of a Llama-family stage step on one device.
pub trait StageOps {
    /// A buffer of 16-bit floats of [`StageOps::dtype`].
    type Half;
    /// A buffer of f32.
    type Float;
    /// A step's row positions (i32), uploaded once and read by every layer's RoPE.
    type Positions;

    /// The storage dtype of weights, activations and KV.
    fn dtype(&self) -> DType;

    /// Elements in a 16-bit buffer.
    fn half_len(&self, b: &Self::Half) -> usize;

    /// A 16-bit buffer holding `xs` rounded to [`StageOps::dtype`].
    ///
    /// # Errors
    /// Out of device memory, or a driver failure.
    fn upload_half(&self, xs: &[f32]) -> Result<Self::Half>;

    /// A 16-bit buffer of `n` zeros.
    ///
    /// # Errors
    /// As [`StageOps::upload_half`].
    fn zeros_half(&self, n: usize) -> Result<Self::Half>;

    /// An f32 buffer holding `xs`.
    ///
    /// # Errors
    /// As [`StageOps::upload_half`].
    fn upload_float(&self, xs: &[f32]) -> Result<Self::Float>;

    /// An f32 buffer of `n` zeros.
    ///
    /// # Errors
    /// As [`StageOps::upload_half`].
    fn zeros_float(&self, n: usize) -> Result<Self::Float>;

    /// Copies the whole of `b` into `out` (resized to fit); waits for the device.
    ///
    /// # Errors
    /// A driver failure (including one of an earlier, asynchronous operation).
    fn download_float(&self, b: &Self::Float, out: &mut Vec<f32>) -> Result<()>;

    /// `dst[dst_at..dst_at + n] = src[src_at..src_at + n]`.
    ///
    /// # Errors
    /// [`crate::CudaError::InvalidArgument`] for a range past either buffer.
    fn copy_half(
        &self,
        src: &Self::Half,
        src_at: usize,
        dst: &mut Self::Half,
        dst_at: usize,
        n: usize,
    ) -> Result<()>;

    /// As [`StageOps::copy_half`] for f32 buffers.
    ///
    /// # Errors
    /// As [`StageOps::copy_half`].
    fn copy_float(
        &self,
        src: &Self::Float,
        src_at: usize,
        dst: &mut Self::Float,
        dst_at: usize,
        n: usize,
    ) -> Result<()>;

    /// `out (m, n) = x (m, k) · w (n, k)ᵀ`, f32 accumulation, rounded to the dtype: a linear
    /// layer whose weight rows are output features.
    ///
    /// # Errors
    /// [`crate::CudaError::InvalidArgument`] when a buffer's length is not its shape's.
    fn matmul(
        &self,
        x: &Self::Half,
        w: &Self::Half,
        out: &mut Self::Half,
        dims: MatmulDims,
    ) -> Result<()>;

    /// As [`StageOps::matmul`] with f32 output (the output head: logits keep f32 precision).
    ///
    /// # Errors
    /// As [`StageOps::matmul`].
    fn matmul_float(
        &self,
        x: &Self::Half,
        w: &Self::Half,
        out: &mut Self::Float,
        dims: MatmulDims,
    ) -> Result<()>;

    /// `out = x / sqrt(mean(x²) + eps) · w` per row of `w.len()` values, from the f32
    /// residual stream into the dtype.
    ///
    /// # Errors
    /// [`crate::CudaError::InvalidArgument`] for mismatched lengths.
    fn rmsnorm(
        &self,
        x: &Self::Float,
        w: &Self::Float,
        out: &mut Self::Half,
        eps: f32,
    ) -> Result<()>;

    /// `x[r, :] += b` for every row of `x`.
    ///
    /// # Errors
    /// [`crate::CudaError::InvalidArgument`] when `b` does not divide `x`.
    fn bias(&self, x: &mut Self::Half, b: &Self::Half) -> Result<()>;

    /// The positions of a step's rows, for [`StageOps::rope`].
    ///
    /// # Errors
    /// As [`StageOps::upload_half`].
    fn upload_positions(&self, positions: &[i32]) -> Result<Self::Positions>;

    /// Rotary embedding in place of `x (rows, n_heads, head_dim)`, row `t` at global
    /// position `positions[t]` (one per row).
    ///
    /// # Errors
    /// [`crate::CudaError::InvalidArgument`] for a shape that does not match.
    fn rope(
        &self,
        x: &mut Self::Half,
        positions: &Self::Positions,
        n_heads: usize,
        head_dim: usize,
        rope: Rope,
    ) -> Result<()>;

    /// `out = gate · sigmoid(gate) · up`.
    ///
    /// # Errors
    /// [`crate::CudaError::InvalidArgument`] for mismatched lengths.
    fn swiglu(&self, gate: &Self::Half, up: &Self::Half, out: &mut Self::Half) -> Result<()>;

    /// `x += y`: a sub-layer's output added to the f32 residual stream.
    ///
    /// # Errors
    /// [`crate::CudaError::InvalidArgument`] for mismatched lengths.
    fn add(&self, x: &mut Self::Float, y: &Self::Half) -> Result<()>;

    /// Prefill attention of one sequence (`p.batch == 1`): `q (seq_q, n_heads, head_dim)`
    /// over contiguous `k`, `v (seq_k, n_kv_heads, head_dim)` into `out`.
    ///
    /// # Errors
    /// As the launcher ([`crate::plan::PrefillParams::geometry`] and buffer lengths).
    fn prefill(
        &self,
        p: &PrefillParams,
        q: &Self::Half,
        k: &Self::Half,
        v: &Self::Half,
        out: &mut Self::Half,
    ) -> Result<()>;

    /// Paged attention of one sequence: `q (p.seq_q, n_heads, head_dim)` over the first
    /// `p.len` tokens held in the pools `(num_blocks, block_size, n_kv_heads, head_dim)`
    /// through `table`, into `out`.
    ///
    /// # Errors
    /// As the launcher (parameters, lengths, a table that does not cover `p.len`).
    fn paged(
        &self,
        p: &DecodeParams,
        q: &Self::Half,
        pools: (&Self::Half, &Self::Half),
        table: &[u32],
        out: &mut Self::Half,
    ) -> Result<()>;
}

/// The shape of a matmul: `x (m, k) · w (n, k)ᵀ = out (m, n)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MatmulDims {
    /// Rows of `x` and `out`.
    pub m: usize,
    /// Rows of `w`: output features.
    pub n: usize,
    /// Input features.
    pub k: usize,
}

impl MatmulDims {
    /// `Ok` when buffers of `x`, `w` and `out` elements have this shape.
    ///
    /// # Errors
    /// [`crate::CudaError::InvalidArgument`] naming the buffer that does not.
    pub fn check(&self, x: usize, w: usize, out: usize) -> Result<()> {
        check_len("x", x, self.m * self.k)?;
        check_len("w", w, self.n * self.k)?;
        check_len("out", out, self.m * self.n)
    }
}

/// A model's rotary embedding.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rope {
    /// Base frequency.
    pub theta: f32,
    /// Pair layout.
    pub layout: RopeLayout,
}
