//! What a model costs to hold, per part: the bytes of every layer, the embedding and the head,
//! and the KV cache per token and layer. The planner sizes shards with it.

use serde::{Deserialize, Serialize};
use tessera_format::ModelConfig;
use tessera_format::{FormatError, Result};
use tessera_format::{TensorKey, WeightStore};

/// The resident cost of each part of a model.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelFootprint {
    /// Bytes of each transformer block's tensors, by global layer index.
    pub layer_bytes: Vec<u64>,
    /// Bytes of the token embedding (held by the first stage).
    pub embed_bytes: u64,
    /// Bytes of the final norm and output head (held by the last stage); with tied embeddings
    /// the head is the embedding matrix, counted here again.
    pub head_bytes: u64,
    /// Whether the head is the embedding (shared, not copied, when one stage holds both).
    pub tied: bool,
    /// KV cache bytes per token per layer.
    pub kv_bytes_per_token_layer: u64,
}

impl ModelFootprint {
    /// Number of layers.
    pub fn n_layers(&self) -> usize {
        self.layer_bytes.len()
    }

    /// Bytes of all the weights, shared tensors counted once.
    pub fn weight_bytes(&self) -> u64 {
        let shared = if self.tied { self.embed_bytes } else { 0 };
        self.layer_bytes.iter().sum::<u64>() + self.embed_bytes + self.head_bytes - shared
    }

    /// Reads the footprint of a model from its weight store (tensor sizes as loaded).
    ///
    /// # Errors
    /// [`FormatError::Tensor`] when a tensor the architecture needs is absent or the store cannot
    /// tell its size.
    pub fn from_store(store: &dyn WeightStore, cfg: &ModelConfig) -> Result<Self> {
        let need = |key: TensorKey| {
            store.stored_bytes(key).ok_or_else(|| FormatError::Tensor {
                name: format!("{key:?}"),
                reason: "missing, or its size is unknown to the planner".into(),
            })
        };
        let optional = |key: TensorKey| store.stored_bytes(key).unwrap_or(0);
        let mut layer_bytes = Vec::with_capacity(cfg.n_layers);
        for l in 0..cfg.n_layers {
            use TensorKey as K;
            let mut b = 0;
            for key in [
                K::AttnNorm(l),
                K::AttnQ(l),
                K::AttnK(l),
                K::AttnV(l),
                K::AttnOutput(l),
                K::FfnNorm(l),
                K::FfnGate(l),
                K::FfnUp(l),
                K::FfnDown(l),
            ] {
                b += need(key)?;
            }
            for key in [K::AttnQBias(l), K::AttnKBias(l), K::AttnVBias(l)] {
                b += optional(key);
            }
            layer_bytes.push(b);
        }
        let embed_bytes = need(TensorKey::TokenEmbd)?;
        let tied = !store.contains(TensorKey::Output);
        let output = if tied {
            embed_bytes
        } else {
            need(TensorKey::Output)?
        };
        // The final norm is held as f32 whatever its stored type.
        let head_bytes = output + 4 * cfg.hidden as u64;
        Ok(Self {
            layer_bytes,
            embed_bytes,
            head_bytes,
            tied,
            // K and V, f32, for every KV head.
            kv_bytes_per_token_layer: 2 * cfg.kv_dim() as u64 * 4,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_format::QType;
    use tessera_format::{Arch, RopeLayout};
    use tessera_testkit::MemoryWeights;

    fn tiny() -> ModelConfig {
        ModelConfig {
            arch: Arch::Llama,
            n_layers: 3,
            hidden: 64,
            intermediate: 128,
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 16,
            vocab_size: 100,
            context_len: 256,
            rope_theta: 10_000.0,
            rope_layout: RopeLayout::Interleaved,
            rms_eps: 1e-5,
            qkv_bias: false,
        }
    }

    /// Ensures that the footprint of an f32 model counts every tensor's bytes exactly.
    #[test]
    fn counts_f32_model_exactly() {
        let cfg = tiny();
        let w = MemoryWeights::random(&cfg, QType::F32, false, 1).expect("random model");
        let f = ModelFootprint::from_store(&w, &cfg).expect("footprint");
        let (h, i, q, kv) = (64u64, 128u64, 64u64, 32u64);
        let layer = 4 * (2 * h + q * h + 2 * kv * h + h * q + 3 * i * h);
        assert_eq!(f.layer_bytes, vec![layer; 3]);
        assert_eq!(f.embed_bytes, 4 * 100 * h);
        assert_eq!(f.head_bytes, 4 * 100 * h + 4 * h);
        assert!(!f.tied);
        assert_eq!(f.kv_bytes_per_token_layer, 2 * kv * 4);
        assert_eq!(f.weight_bytes(), 3 * layer + 2 * 4 * 100 * h + 4 * h);
    }

    /// Ensures that a tied head is counted once when one stage holds everything.
    #[test]
    fn tied_head_is_shared() {
        let cfg = tiny();
        let w = MemoryWeights::random(&cfg, QType::F32, true, 1).expect("random model");
        let f = ModelFootprint::from_store(&w, &cfg).expect("footprint");
        assert!(f.tied);
        assert_eq!(
            f.weight_bytes(),
            3 * f.layer_bytes[0] + f.embed_bytes + 4 * 64
        );
    }
}
