//! The SwiGLU feed-forward block.

use crate::ThreadPool;
use crate::config::ModelConfig;
use crate::error::Result;
use crate::profile::{self, Op};
use crate::quant::{QMatrix, QScratch};
use crate::weights::{TensorKey, WeightStore};

/// `down(silu(gate(x)) * up(x))`.
#[derive(Debug)]
pub struct Mlp {
    gate: QMatrix,
    up: QMatrix,
    down: QMatrix,
}

impl Mlp {
    /// Loads layer `layer`'s three projections.
    ///
    /// # Errors
    /// When a tensor is missing or misshapen.
    pub fn load(store: &dyn WeightStore, cfg: &ModelConfig, layer: usize) -> Result<Self> {
        let (h, i) = (cfg.hidden, cfg.intermediate);
        Ok(Self {
            gate: store.matrix(TensorKey::FfnGate(layer), i, h)?,
            up: store.matrix(TensorKey::FfnUp(layer), i, h)?,
            down: store.matrix(TensorKey::FfnDown(layer), h, i)?,
        })
    }

    /// Bytes of weights held.
    pub fn nbytes(&self) -> usize {
        self.gate.nbytes() + self.up.nbytes() + self.down.nbytes()
    }

    /// `out` (n, hidden) = MLP of `x` (n, hidden); `gate` and `up` are (n, intermediate) scratch.
    ///
    /// # Errors
    /// When buffer sizes disagree with `n` (a caller bug).
    pub fn forward(
        &self,
        x: &[f32],
        n: usize,
        out: &mut [f32],
        gate: &mut [f32],
        up: &mut [f32],
        q8: &mut QScratch,
        pool: &ThreadPool,
    ) -> Result<()> {
        let timer = profile::scope(Op::GateUp);
        self.gate.matmul(x, n, gate, q8, pool)?;
        self.up.matmul(x, n, up, q8, pool)?;
        drop(timer);
        let timer = profile::scope(Op::Swiglu);
        swiglu_in_place(gate, up);
        drop(timer);
        let _timer = profile::scope(Op::Down);
        self.down.matmul(gate, n, out, q8, pool)
    }
}

/// `g = silu(g) * u`, elementwise, with llama.cpp's rounding: the exponential is ggml's
/// vectorised approximation (see [`crate::ggml_math`]), so greedy output can match llama.cpp's.
///
/// # Panics
/// When the lengths differ.
pub fn swiglu_in_place(g: &mut [f32], u: &[f32]) {
    crate::ggml_math::swiglu_in_place(g, u);
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
