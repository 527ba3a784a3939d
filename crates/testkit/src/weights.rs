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

impl MemoryWeights {
    /// Every tensor a Llama-family model of shape `cfg` reads from `store`, dequantized and
    /// held as f32: the published model with nothing quantizing a product's input (f32
    /// weights multiply f32 activations) — the precise side of comparisons with paths that
    /// round differently than llama.cpp's (tensor-parallel sums, the GPU stage's f16).
    ///
    /// # Errors
    /// When a tensor the model needs is missing or unreadable.
    pub fn widened(store: &dyn WeightStore, cfg: &ModelConfig) -> tessera_format::Result<Self> {
        use TensorKey as K;
        let (h, i, qd, kvd, v) = (
            cfg.hidden,
            cfg.intermediate,
            cfg.q_dim(),
            cfg.kv_dim(),
            cfg.vocab_size,
        );
        let mut keys = vec![(K::TokenEmbd, v, h), (K::OutputNorm, 1, h)];
        if store.contains(K::Output) {
            keys.push((K::Output, v, h));
        }
        for l in 0..cfg.n_layers {
            keys.extend([
                (K::AttnNorm(l), 1, h),
                (K::FfnNorm(l), 1, h),
                (K::AttnQ(l), qd, h),
                (K::AttnK(l), kvd, h),
                (K::AttnV(l), kvd, h),
                (K::AttnOutput(l), h, qd),
                (K::FfnGate(l), i, h),
                (K::FfnUp(l), i, h),
                (K::FfnDown(l), h, i),
            ]);
            if cfg.qkv_bias {
                keys.extend([
                    (K::AttnQBias(l), 1, qd),
                    (K::AttnKBias(l), 1, kvd),
                    (K::AttnVBias(l), 1, kvd),
                ]);
            }
        }
        let mut w = Self::default();
        for (key, rows, cols) in keys {
            let bad = |e: KernelError| FormatError::Tensor {
                name: format!("{key:?}"),
                reason: e.to_string(),
            };
            let t = store.tensor(key, rows, cols)?;
            let m = QMatrix::from_bytes(t.qtype, t.rows, t.cols, t.bytes).map_err(bad)?;
            let f = QMatrix::quantize(QType::F32, rows, cols, &m.dequantize()).map_err(bad)?;
            w.insert(key, f);
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
