//! What a model costs to hold, per part: the bytes of every layer (and of its attention and MLP
//! tensors apart), the embedding and the head, the KV cache per token and layer, and the shape
//! and block alignment a tensor-parallel split must respect. The planner sizes shards with it.

use serde::{Deserialize, Serialize};
use tessera_format::ModelConfig;
use tessera_format::{FormatError, QType, Result};
use tessera_format::{TensorKey, WeightStore};

/// The largest block any supported format has (the K-quants' 256 elements); every format's
/// block size divides it, so a split aligned to it is aligned for all.
const WIDEST_BLOCK: u32 = 256;

/// The resident cost of each part of a model, and the shape a tensor-parallel split needs.
///
/// The fields after `kv_bytes_per_token_layer` came with tensor parallelism; they default to
/// 0 / empty (a footprint that does not know them plans pipeline stages only).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
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
    /// Query heads.
    #[serde(default)]
    pub n_heads: u32,
    /// Key/value heads (GQA: each serves `n_heads / n_kv_heads` query heads); 0 = unknown.
    #[serde(default)]
    pub n_kv_heads: u32,
    /// Width of one head.
    #[serde(default)]
    pub head_dim: u32,
    /// Width of the residual stream (what a reduction or a hop carries per token).
    #[serde(default)]
    pub hidden: u32,
    /// Width of the MLP's inner layer (the columns a tensor-parallel rank takes a range of).
    #[serde(default)]
    pub intermediate: u32,
    /// Rows of the embedding and the output head.
    #[serde(default)]
    pub vocab: u32,
    /// Per layer, the bytes of Q, K, V, the attention output and the QKV biases: the part a
    /// rank holds in proportion to its KV heads (each with its query heads).
    #[serde(default)]
    pub attn_bytes: Vec<u64>,
    /// Per layer, the bytes of the gate, up and down projections: the part a rank holds in
    /// proportion to its MLP columns. The rest of a layer (its two norms) every rank holds.
    #[serde(default)]
    pub ffn_bytes: Vec<u64>,
    /// The column multiple a split of the attention output projection must fall on (its
    /// widest block size over the layers; Q4_1: 32, K-quants: 256). 0 = unknown.
    #[serde(default)]
    pub attn_out_block: u32,
    /// The column multiple a split of the MLP down projection must fall on. 0 = unknown.
    #[serde(default)]
    pub ffn_down_block: u32,
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

    /// Whether the footprint knows what a tensor-parallel split needs: head counts, widths and
    /// the per-layer attention / MLP bytes.
    pub fn splittable(&self) -> bool {
        self.n_kv_heads > 0
            && self.n_heads.is_multiple_of(self.n_kv_heads)
            && self.head_dim > 0
            && self.hidden > 0
            && self.intermediate > 0
            && self.vocab > 0
            && self.attn_bytes.len() == self.n_layers()
            && self.ffn_bytes.len() == self.n_layers()
    }

    /// Bytes of the final norm inside [`ModelFootprint::head_bytes`] (every last-stage rank
    /// holds it whole; the output matrix is split by vocabulary rows).
    pub fn head_norm_bytes(&self) -> u64 {
        // Held as f32 whatever its stored type (see `from_store`).
        4 * u64::from(self.hidden)
    }

    /// The output head's share of a batched decode step's arithmetic, in the layers' bytes:
    /// its parameters times the layers' bytes per parameter, plus its norm. Pipeline stages
    /// are balanced with it ([`crate::planner`]): past one sequence a step's matrix products
    /// cost what their multiply-adds say, not what their bytes say, and a head stored wider
    /// than the layers (SmolLM2: a Q8_0 head, Q4_1 layers) weighs less than its bytes — here,
    /// one thread, 4 and 8 sequences: 8.6 and 9.0 layers' time against 8.0 by parameters and
    /// 13.8 by bytes (`cargo test --release -p tessera-kernels --lib quant::bench -- --ignored`).
    /// The head's bytes when the shape is unknown.
    pub fn head_work_bytes(&self) -> u64 {
        if !self.splittable() {
            return self.head_bytes;
        }
        let (h, q, kv, f) = (
            u128::from(self.hidden),
            u128::from(self.n_heads * self.head_dim),
            u128::from(self.n_kv_heads * self.head_dim),
            u128::from(self.intermediate),
        );
        // Q and the attention output, K and V, gate, up and down.
        let layer_params = 2 * h * q + 2 * h * kv + 3 * h * f;
        let params = layer_params * self.n_layers() as u128;
        let bytes: u128 = self.layer_bytes.iter().map(|&b| u128::from(b)).sum();
        if params == 0 || bytes == 0 {
            return self.head_bytes;
        }
        let head_params = u128::from(self.vocab) * h;
        let work = u64::try_from(head_params * bytes / params).unwrap_or(u64::MAX);
        work.saturating_add(self.head_norm_bytes())
    }

    /// Reads the footprint of a model from its weight store (tensor sizes and block formats as
    /// loaded).
    ///
    /// # Errors
    /// [`FormatError::Tensor`] when a tensor the architecture needs is absent or the store cannot
    /// tell its size.
    pub fn from_store(store: &dyn WeightStore, cfg: &ModelConfig) -> Result<Self> {
        use TensorKey as K;
        let need = |key: TensorKey| {
            store.stored_bytes(key).ok_or_else(|| FormatError::Tensor {
                name: format!("{key:?}"),
                reason: "missing, or its size is unknown to the planner".into(),
            })
        };
        let optional = |key: TensorKey| store.stored_bytes(key).unwrap_or(0);
        // A store that cannot tell a tensor's format gets the widest block: aligned for any.
        let block = |key: TensorKey| {
            store
                .stored_qtype(key)
                .map_or(WIDEST_BLOCK, |q| q.block_size() as u32)
        };
        if cfg.arch.is_encoder() {
            return Self::encoder_from_store(store, cfg);
        }
        let mut layer_bytes = Vec::with_capacity(cfg.n_layers);
        let mut attn_bytes = Vec::with_capacity(cfg.n_layers);
        let mut ffn_bytes = Vec::with_capacity(cfg.n_layers);
        let (mut attn_out_block, mut ffn_down_block) = (1, 1);
        for l in 0..cfg.n_layers {
            let mut attn = 0;
            for key in [K::AttnQ(l), K::AttnK(l), K::AttnV(l), K::AttnOutput(l)] {
                attn += need(key)?;
            }
            for key in [K::AttnQBias(l), K::AttnKBias(l), K::AttnVBias(l)] {
                attn += optional(key);
            }
            let mut ffn = 0;
            for key in [K::FfnGate(l), K::FfnUp(l), K::FfnDown(l)] {
                ffn += need(key)?;
            }
            let norms = need(K::AttnNorm(l))? + need(K::FfnNorm(l))?;
            layer_bytes.push(attn + ffn + norms);
            attn_bytes.push(attn);
            ffn_bytes.push(ffn);
            // Block sizes (1, 32, 256) divide one another, so the widest is their lcm.
            attn_out_block = attn_out_block.max(block(K::AttnOutput(l)));
            ffn_down_block = ffn_down_block.max(block(K::FfnDown(l)));
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
            n_heads: cfg.n_heads as u32,
            n_kv_heads: cfg.n_kv_heads as u32,
            head_dim: cfg.head_dim as u32,
            hidden: cfg.hidden as u32,
            intermediate: cfg.intermediate as u32,
            vocab: cfg.vocab_size as u32,
            attn_bytes,
            ffn_bytes,
            attn_out_block,
            ffn_down_block,
        })
    }

    /// [`ModelFootprint::from_store`] for an encoder: every layer's tensors (biases and
    /// LayerNorm shifts included), the embeddings (word, position, type, their norm) on the
    /// first stage, nothing for the pooling, no KV cache. Encoders are planned as pipeline
    /// stages only (the tensor-parallel fields stay 0, which plans no split).
    fn encoder_from_store(store: &dyn WeightStore, cfg: &ModelConfig) -> Result<Self> {
        use TensorKey as K;
        let need = |key: TensorKey| {
            store.stored_bytes(key).ok_or_else(|| FormatError::Tensor {
                name: format!("{key:?}"),
                reason: "missing, or its size is unknown to the planner".into(),
            })
        };
        let sum = |keys: &[TensorKey]| keys.iter().map(|&k| need(k)).sum::<Result<u64>>();
        let layer_bytes = (0..cfg.n_layers)
            .map(|l| {
                sum(&[
                    K::AttnQ(l),
                    K::AttnK(l),
                    K::AttnV(l),
                    K::AttnQBias(l),
                    K::AttnKBias(l),
                    K::AttnVBias(l),
                    K::AttnOutput(l),
                    K::AttnOutputBias(l),
                    K::AttnNorm(l),
                    K::AttnNormBias(l),
                    K::FfnUp(l),
                    K::FfnUpBias(l),
                    K::FfnDown(l),
                    K::FfnDownBias(l),
                    K::FfnNorm(l),
                    K::FfnNormBias(l),
                ])
            })
            .collect::<Result<Vec<u64>>>()?;
        Ok(Self {
            layer_bytes,
            embed_bytes: sum(&[
                K::TokenEmbd,
                K::PosEmbd,
                K::TypeEmbd,
                K::EmbdNorm,
                K::EmbdNormBias,
            ])?,
            head_bytes: 0,
            tied: false,
            kv_bytes_per_token_layer: 0,
            hidden: cfg.hidden as u32,
            ..Self::default()
        })
    }

    /// The footprint a model of shape `cfg` would have with its layer matrices stored as
    /// `matrices` and its embedding (and untied output head) as `embed`, norms and biases as
    /// f32 — what [`ModelFootprint::from_store`] reads from such a file, without one (the
    /// simulator plans models no test machine holds).
    ///
    /// # Errors
    /// [`FormatError::Tensor`] when a matrix's row length is not a whole number of its
    /// format's blocks.
    pub fn from_shape(
        cfg: &ModelConfig,
        matrices: QType,
        embed: QType,
        tied: bool,
    ) -> Result<Self> {
        let bytes = |name: &str, q: QType, rows: usize, cols: usize| {
            if cols.is_multiple_of(q.block_size()) {
                Ok((rows * q.row_bytes(cols)) as u64)
            } else {
                Err(FormatError::Tensor {
                    name: name.to_owned(),
                    reason: format!("{cols} columns are not a whole number of {q} blocks"),
                })
            }
        };
        let (h, i, qd, kvd) = (cfg.hidden, cfg.intermediate, cfg.q_dim(), cfg.kv_dim());
        let m = matrices;
        let bias = if cfg.qkv_bias {
            4 * (qd + 2 * kvd) as u64
        } else {
            0
        };
        let attn = bytes("attn_q", m, qd, h)?
            + 2 * bytes("attn_k/v", m, kvd, h)?
            + bytes("attn_output", m, h, qd)?
            + bias;
        let ffn = 2 * bytes("ffn_gate/up", m, i, h)? + bytes("ffn_down", m, h, i)?;
        let norms = 2 * 4 * h as u64;
        let embed_bytes = bytes("token_embd", embed, cfg.vocab_size, h)?;
        let block = m.block_size() as u32;
        Ok(Self {
            layer_bytes: vec![attn + ffn + norms; cfg.n_layers],
            embed_bytes,
            head_bytes: embed_bytes + 4 * h as u64,
            tied,
            kv_bytes_per_token_layer: 2 * kvd as u64 * 4,
            n_heads: cfg.n_heads as u32,
            n_kv_heads: cfg.n_kv_heads as u32,
            head_dim: cfg.head_dim as u32,
            hidden: h as u32,
            intermediate: i as u32,
            vocab: cfg.vocab_size as u32,
            attn_bytes: vec![attn; cfg.n_layers],
            ffn_bytes: vec![ffn; cfg.n_layers],
            attn_out_block: block,
            ffn_down_block: block,
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
        assert_eq!(f.attn_bytes, vec![4 * (q * h + 2 * kv * h + h * q); 3]);
        assert_eq!(f.ffn_bytes, vec![4 * 3 * i * h; 3]);
        assert_eq!((f.n_heads, f.n_kv_heads, f.head_dim), (4, 2, 16));
        assert_eq!((f.hidden, f.intermediate, f.vocab), (64, 128, 100));
        assert_eq!((f.attn_out_block, f.ffn_down_block), (1, 1));
        assert!(f.splittable());
    }

    /// Ensures that the footprint computed from a shape equals the one read from a store of
    /// that shape and format, blocks included (Q4_1: 32), tied or not.
    #[test]
    fn from_shape_matches_the_store() {
        let cfg = tiny();
        for (q, tied) in [
            (QType::F32, false),
            (QType::Q4_1, true),
            (QType::Q8_0, false),
        ] {
            let w = MemoryWeights::random(&cfg, q, tied, 2).expect("random model");
            let read = ModelFootprint::from_store(&w, &cfg).expect("footprint");
            let shaped = ModelFootprint::from_shape(&cfg, q, q, tied).expect("shape");
            assert_eq!(read, shaped, "{q} tied={tied}");
        }
        let f = ModelFootprint::from_shape(&cfg, QType::Q4_1, QType::Q8_0, true).expect("shape");
        assert_eq!((f.attn_out_block, f.ffn_down_block), (32, 32));
        let e = ModelFootprint::from_shape(&cfg, QType::Q4K, QType::Q8_0, true)
            .expect_err("64 columns are not a 256-wide block");
        assert!(e.to_string().contains("q4_K"), "{e}");
    }

    /// Ensures that SmolLM2's GGUF reads as its shape says: Q4_1 layers (32-column blocks) and
    /// a Q8_0 tied embedding — the ~96.6 MB per token the cost model's default rate is
    /// calibrated on.
    #[test]
    fn smollm2_reads_as_its_shape() {
        let Some(path) = tessera_testkit::smollm2_gguf() else {
            return;
        };
        let w = tessera_format::GgufWeights::open(&path).expect("open the GGUF");
        let cfg = w.config().expect("config");
        let f = ModelFootprint::from_store(&w, &cfg).expect("footprint");
        let shaped = ModelFootprint::from_shape(&cfg, QType::Q4_1, QType::Q8_0, true);
        assert_eq!(f, shaped.expect("shape"));
        assert_eq!((f.attn_out_block, f.ffn_down_block), (32, 32));
    }

    /// Ensures that a footprint serialized before tensor parallelism still reads, as one that
    /// cannot be split.
    #[test]
    fn old_serialized_footprint_reads() {
        let old = r#"{"layer_bytes":[10,10],"embed_bytes":5,"head_bytes":6,"tied":false,
            "kv_bytes_per_token_layer":2}"#;
        let f: ModelFootprint = serde_json::from_str(old).expect("old footprint");
        assert_eq!(f.layer_bytes, vec![10, 10]);
        assert_eq!(f.n_kv_heads, 0);
        assert!(!f.splittable());
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
