//! The SwiGLU feed-forward block.

use std::ops::Range;

use crate::error::Result;
use crate::tensor_slice::{cut_cols, cut_rows};
use crate::weights::{TensorKey, WeightStore, WeightStoreExt};
use tessera_format::ModelConfig;
use tessera_kernels::ThreadPool;
use tessera_kernels::profile::{self, Op};
use tessera_kernels::quant::{QMatrix, QScratch};

/// Scratch rows the MLP writes; sized by the caller for the batch and the columns held.
pub struct MlpScratch<'a> {
    /// Gate projection, then SwiGLU's output, (n, ffn columns held).
    pub gate: &'a mut [f32],
    /// Up projection, (n, ffn columns held).
    pub up: &'a mut [f32],
    /// Activation quantization buffers.
    pub q8: &'a mut QScratch,
}

/// `down(silu(gate(x)) * up(x))`, over the intermediate columns this rank holds.
#[derive(Debug)]
pub struct Mlp {
    gate: QMatrix,
    up: QMatrix,
    down: QMatrix,
}

impl Mlp {
    /// Loads layer `layer`'s three projections, cut to intermediate columns `ffn`: rows of
    /// gate and up, columns of down (whose output is then this rank's partial sum).
    ///
    /// # Errors
    /// When a tensor is missing or misshapen, or down's cut splits one of its blocks
    /// ([`crate::ModelError::InvalidArgument`] naming `tensor.ffn`).
    pub fn load(
        store: &dyn WeightStore,
        cfg: &ModelConfig,
        layer: usize,
        ffn: &Range<usize>,
    ) -> Result<Self> {
        let (h, i) = (cfg.hidden, cfg.intermediate);
        let down = cut_cols(
            store.matrix(TensorKey::FfnDown(layer), h, i)?,
            ffn,
            "tensor.ffn",
            || format!("layer {layer}'s MLP down projection"),
        )?;
        Ok(Self {
            gate: cut_rows(store.matrix(TensorKey::FfnGate(layer), i, h)?, ffn)?,
            up: cut_rows(store.matrix(TensorKey::FfnUp(layer), i, h)?, ffn)?,
            down,
        })
    }

    /// Bytes of weights held.
    pub fn nbytes(&self) -> usize {
        self.gate.nbytes() + self.up.nbytes() + self.down.nbytes()
    }

    /// `out` (n, hidden) = MLP of `x` (n, hidden).
    ///
    /// # Errors
    /// When buffer sizes disagree with `n` (a caller bug).
    pub fn forward(
        &self,
        x: &[f32],
        n: usize,
        out: &mut [f32],
        s: MlpScratch<'_>,
        pool: &ThreadPool,
    ) -> Result<()> {
        let MlpScratch { gate, up, q8 } = s;
        let timer = profile::scope(Op::GateUp);
        self.gate.matmul(x, n, gate, q8, pool)?;
        self.up.matmul(x, n, up, q8, pool)?;
        drop(timer);
        let timer = profile::scope(Op::Swiglu);
        swiglu_in_place(gate, up);
        drop(timer);
        let _timer = profile::scope(Op::Down);
        Ok(self.down.matmul(gate, n, out, q8, pool)?)
    }
}

/// `g = silu(g) * u`, elementwise, with llama.cpp's rounding: the exponential is ggml's
/// vectorised approximation (see [`tessera_kernels::ggml_math`]), so greedy output can match llama.cpp's.
///
/// # Panics
/// When the lengths differ.
pub fn swiglu_in_place(g: &mut [f32], u: &[f32]) {
    tessera_kernels::ggml_math::swiglu_in_place(g, u);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ensures that SwiGLU matches silu(g)·u in f64 across the range where exp over/underflows.
    #[test]
    fn swiglu_matches_reference() {
        let mut g = vec![-100.0f32, -3.0, -0.5, 0.0, 0.5, 3.0, 100.0];
        let u = vec![2.0f32; g.len()];
        let want: Vec<f64> = g
            .iter()
            .map(|&x| f64::from(x) / (1.0 + (-f64::from(x)).exp()) * 2.0)
            .collect();
        swiglu_in_place(&mut g, &u);
        for (a, b) in g.iter().zip(&want) {
            assert!(
                (f64::from(*a) - b).abs() <= 1e-5 * b.abs().max(1.0),
                "{a} vs {b}"
            );
        }
    }
}
