//! Locating the real model for tests and benchmarks.
//!
//! Tests that run SmolLM2 must run in CI (where `.ci/run` pulls the model first) and may be
//! skipped on a developer machine that has not pulled it yet, with a message saying how.

use std::path::PathBuf;

/// The file name of the default model inside the model cache.
pub const SMOLLM2_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// The default model's name in the model cache.
pub const SMOLLM2_NAME: &str = "smollm2-135m-instruct";

/// The SmolLM2 GGUF: `$TESSERA_MODEL_GGUF`, else the model cache
/// (`$TESSERA_HOME/models/smollm2-135m-instruct/…`, `TESSERA_HOME` defaulting to
/// `~/.cache/tessera`). `None` when neither exists.
///
/// # Panics
/// When the model is missing and `CI` is set: CI must never skip the real-model tests.
pub fn smollm2_gguf() -> Option<PathBuf> {
    let candidate = std::env::var_os("TESSERA_MODEL_GGUF")
        .map(PathBuf::from)
        .or_else(|| {
            let home = std::env::var_os("TESSERA_HOME")
                .map(PathBuf::from)
                .or_else(|| {
                    std::env::var_os("HOME")
                        .map(|h| PathBuf::from(h).join(".cache").join("tessera"))
                })?;
            Some(home.join("models").join(SMOLLM2_NAME).join(SMOLLM2_FILE))
        });
    match candidate {
        Some(p) if p.is_file() => Some(p),
        other => {
            let in_ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false");
            assert!(
                !in_ci,
                "the real model is missing in CI ({other:?}); .ci/run must pull it first"
            );
            eprintln!(
                "skipping: real model not found ({other:?}); run `tessera model pull {SMOLLM2_NAME}` \
                 or set TESSERA_MODEL_GGUF"
            );
            None
        }
    }
}

/// A deterministic source of pseudo-random f32 values, so random test models are the same on
/// every machine and in every process (the cluster tests load the same model in each worker).
#[derive(Clone, Debug)]
pub struct TestRng(u64);

impl TestRng {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed ^ 0x9E37_79B9_7F4A_7C15)
    }

    /// The next 64 random bits (splitmix64).
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    pub fn uniform(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f32 {
        let u1 = ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
        let u2 = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }

    /// `n` values of `scale · N(0, 1)`.
    pub fn normals(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.normal() * scale).collect()
    }
}

/// Weights held in memory: random test models, and tensors handed over by other processes.
#[derive(Default)]
pub struct MemoryWeights {
    tensors: std::collections::HashMap<crate::weights::TensorKey, crate::quant::QMatrix>,
}

impl MemoryWeights {
    /// Every tensor held, with its role.
    pub fn iter(
        &self,
    ) -> impl Iterator<Item = (crate::weights::TensorKey, &crate::quant::QMatrix)> {
        self.tensors.iter().map(|(k, m)| (*k, m))
    }

    /// Adds or replaces a tensor.
    pub fn insert(&mut self, key: crate::weights::TensorKey, m: crate::quant::QMatrix) {
        self.tensors.insert(key, m);
    }

    /// A random Llama-family model of shape `cfg`, its matrices stored as `qtype`; the same
    /// `seed` gives the same model everywhere.
    ///
    /// # Errors
    /// When `qtype`'s block size does not divide the model's widths.
    pub fn random(
        cfg: &crate::config::ModelConfig,
        qtype: crate::quant::QType,
        tied: bool,
        seed: u64,
    ) -> crate::Result<Self> {
        use crate::quant::{QMatrix, QType};
        use crate::weights::TensorKey as K;
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

impl crate::weights::WeightStore for MemoryWeights {
    fn contains(&self, key: crate::weights::TensorKey) -> bool {
        self.tensors.contains_key(&key)
    }

    fn matrix(
        &self,
        key: crate::weights::TensorKey,
        rows: usize,
        cols: usize,
    ) -> crate::Result<crate::quant::QMatrix> {
        let m = self
            .tensors
            .get(&key)
            .ok_or_else(|| crate::ModelError::Tensor {
                name: format!("{key:?}"),
                reason: "not in memory".into(),
            })?;
        if (m.rows(), m.cols()) != (rows, cols) {
            return Err(crate::ModelError::Tensor {
                name: format!("{key:?}"),
                reason: format!(
                    "shape ({}, {}), wanted ({rows}, {cols})",
                    m.rows(),
                    m.cols()
                ),
            });
        }
        Ok(m.clone())
    }

    fn stored_bytes(&self, key: crate::weights::TensorKey) -> Option<u64> {
        self.tensors.get(&key).map(|m| m.nbytes() as u64)
    }
}
