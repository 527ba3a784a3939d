//! RMSNorm over rows of the residual stream.

use crate::error::Result;
use crate::weights::{TensorKey, WeightStore, WeightStoreExt};

/// Root-mean-square normalisation with a learned per-channel scale.
#[derive(Clone, Debug)]
pub struct RmsNorm {
    weight: Vec<f32>,
    eps: f32,
}

impl RmsNorm {
    /// Loads the scale vector of `key`, `dim` wide.
    ///
    /// # Errors
    /// When the tensor is missing or not `dim` wide.
    pub fn load(store: &dyn WeightStore, key: TensorKey, dim: usize, eps: f32) -> Result<Self> {
        Ok(Self {
            weight: store.vector(key, dim)?,
            eps,
        })
    }

    /// A norm from explicit values (tests, random models).
    pub fn new(weight: Vec<f32>, eps: f32) -> Self {
        Self { weight, eps }
    }

    /// Width of the rows this norm applies to.
    pub fn dim(&self) -> usize {
        self.weight.len()
    }

    /// `out[r] = x[r] / rms(x[r]) * weight` for every row.
    ///
    /// # Panics
    /// When `x` and `out` differ in length or are not whole rows.
    pub fn forward(&self, x: &[f32], out: &mut [f32]) {
        let dim = self.weight.len();
        assert!(
            x.len() == out.len() && x.len().is_multiple_of(dim),
            "rms norm: ragged rows"
        );
        for (xr, or) in x.chunks_exact(dim).zip(out.chunks_exact_mut(dim)) {
            // llama.cpp's order: each square rounded in f32, the squares summed in f64, the
            // mean rounded to f32 and the scale taken in f32 (bit-identical norms keep greedy
            // output on llama.cpp's side of near-ties).
            let ss: f64 = xr.iter().map(|&v| f64::from(v * v)).sum();
            let mean = (ss / dim as f64) as f32;
            let scale = 1.0 / (mean + self.eps).sqrt();
            for ((o, &v), &w) in or.iter_mut().zip(xr).zip(&self.weight) {
                *o = v * scale * w;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ensures that the norm matches an f64 reference on a few rows.
    #[test]
    fn matches_f64_reference() {
        let dim = 7;
        let w: Vec<f32> = (0..dim).map(|i| 0.5 + i as f32 * 0.1).collect();
        let x: Vec<f32> = (0..3 * dim)
            .map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.3)
            .collect();
        let norm = RmsNorm::new(w.clone(), 1e-5);
        let mut out = vec![0.0; x.len()];
        norm.forward(&x, &mut out);
        for (r, row) in x.chunks(dim).enumerate() {
            let ms: f64 = row.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>() / dim as f64;
            for i in 0..dim {
                let want = f64::from(row[i]) / (ms + 1e-5).sqrt() * f64::from(w[i]);
                assert!((f64::from(out[r * dim + i]) - want).abs() < 1e-5);
            }
        }
    }
}
