//! Weights held in memory: random Llama-family test models of any shape, stored in any
//! supported block format.

use tessera_format::{FormatError, ModelConfig, QType, RawTensor, TensorKey, WeightStore};
use tessera_kernels::KernelError;
use tessera_kernels::quant::QMatrix;

use crate::rng::TestRng;

/// Weights held in memory: random test models, and tensors handed over by other processes.
#[derive(Default)]
pub struct MemoryWeights {
    tensors: std::collections::HashMap<TensorKey, QMatrix>,
}

impl MemoryWeights {
    /// Every tensor held, with its role.
    pub fn iter(&self) -> impl Iterator<Item = (TensorKey, &QMatrix)> {
        self.tensors.iter().map(|(k, m)| (*k, m))
    }

    /// Adds or replaces a tensor.
    pub fn insert(&mut self, key: TensorKey, m: QMatrix) {
        self.tensors.insert(key, m);
    }

    /// A random Llama-family model of shape `cfg`, its matrices stored as `qtype`; the same
    /// `seed` gives the same model everywhere.
    ///
    /// # Errors
    /// When `qtype`'s block size does not divide the model's widths.
    pub fn random(
        cfg: &ModelConfig,
        qtype: QType,
        tied: bool,
        seed: u64,
    ) -> Result<Self, KernelError> {
        use TensorKey as K;
        let mut rng = TestRng::new(seed);
        let mut w = Self::default();
        // Scales keep activations O(1) through many layers, as trained models do.
        let mat = |w: &mut Self, rng: &mut TestRng, key, rows: usize, cols: usize| {
            let data = rng.normals(rows * cols, 1.0 / (cols as f32).sqrt());
            QMatrix::quantize(qtype, rows, cols, &data).map(|m| w.insert(key, m))
        };
        let vec = |w: &mut Self, rng: &mut TestRng, key, len: usize, base: f32| {
            let data: Vec<f32> = (0..len).map(|_| base + 0.1 * rng.uniform()).collect();
            QMatrix::quantize(QType::F32, 1, len, &data).map(|m| w.insert(key, m))
        };
        let (h, i, qd, kvd) = (cfg.hidden, cfg.intermediate, cfg.q_dim(), cfg.kv_dim());
        let embed = rng.normals(cfg.vocab_size * h, 1.0);
        w.insert(
            K::TokenEmbd,
            QMatrix::quantize(qtype, cfg.vocab_size, h, &embed)?,
        );
        if !tied {
            mat(&mut w, &mut rng, K::Output, cfg.vocab_size, h)?;
        }
        vec(&mut w, &mut rng, K::OutputNorm, h, 1.0)?;
        for l in 0..cfg.n_layers {
            vec(&mut w, &mut rng, K::AttnNorm(l), h, 1.0)?;
            vec(&mut w, &mut rng, K::FfnNorm(l), h, 1.0)?;
            mat(&mut w, &mut rng, K::AttnQ(l), qd, h)?;
            mat(&mut w, &mut rng, K::AttnK(l), kvd, h)?;
            mat(&mut w, &mut rng, K::AttnV(l), kvd, h)?;
            mat(&mut w, &mut rng, K::AttnOutput(l), h, qd)?;
            mat(&mut w, &mut rng, K::FfnGate(l), i, h)?;
            mat(&mut w, &mut rng, K::FfnUp(l), i, h)?;
            mat(&mut w, &mut rng, K::FfnDown(l), h, i)?;
            if cfg.qkv_bias {
                vec(&mut w, &mut rng, K::AttnQBias(l), qd, 0.0)?;
                vec(&mut w, &mut rng, K::AttnKBias(l), kvd, 0.0)?;
                vec(&mut w, &mut rng, K::AttnVBias(l), kvd, 0.0)?;
            }
        }
        Ok(w)
    }
}

impl WeightStore for MemoryWeights {
    fn contains(&self, key: TensorKey) -> bool {
        self.tensors.contains_key(&key)
    }

    fn tensor(
        &self,
        key: TensorKey,
        rows: usize,
        cols: usize,
    ) -> tessera_format::Result<RawTensor> {
        let m = self.tensors.get(&key).ok_or_else(|| FormatError::Tensor {
            name: format!("{key:?}"),
            reason: "not in memory".into(),
        })?;
        if (m.rows(), m.cols()) != (rows, cols) {
            return Err(FormatError::Tensor {
                name: format!("{key:?}"),
                reason: format!(
                    "shape ({}, {}), wanted ({rows}, {cols})",
                    m.rows(),
                    m.cols()
                ),
            });
        }
        RawTensor::new(
            &format!("{key:?}"),
            m.qtype(),
            rows,
            cols,
            m.as_bytes().to_vec(),
        )
    }

    fn stored_bytes(&self, key: TensorKey) -> Option<u64> {
        self.tensors.get(&key).map(|m| m.nbytes() as u64)
    }

    fn stored_qtype(&self, key: TensorKey) -> Option<QType> {
        self.tensors.get(&key).map(QMatrix::qtype)
    }
}
