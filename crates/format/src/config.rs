//! Model hyper-parameters, read from GGUF metadata or a Hugging Face `config.json`.
//!
//! One [`ModelConfig`] describes every Llama-family model we run (Llama, SmolLM, Qwen2, …):
//! the differences that matter to the arithmetic — RoPE layout, QKV bias, tied output head —
//! are explicit fields rather than branches on an architecture name scattered through the code.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file;
use serde::{Deserialize, Serialize};

use crate::encoder::{EncoderSpec, bert_config};
use crate::error::{FormatError, Result};

/// Which model family a file declares; it decides tensor names and RoPE layout defaults.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Arch {
    /// Llama and its descendants (SmolLM, Mistral without sliding window, …).
    Llama,
    /// Qwen2: Llama with biases on the Q, K and V projections.
    Qwen2,
    /// BERT-family encoders (BERT, MiniLM, sentence-transformers models): learned absolute
    /// positions, post-LayerNorm, GELU, bidirectional attention, pooled outputs
    /// ([`crate::encoder`]).
    Bert(EncoderSpec),
}

impl Arch {
    /// Whether the model is an encoder: it embeds inputs and never generates.
    pub fn is_encoder(self) -> bool {
        matches!(self, Self::Bert(_))
    }

    /// The family's name as configs spell it (`llama`, `qwen2`, `bert`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Qwen2 => "qwen2",
            Self::Bert(_) => "bert",
        }
    }
}

/// How RoPE pairs up the dimensions of a head.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RopeLayout {
    /// Dimension pairs `(2i, 2i+1)`: llama.cpp's Llama GGUFs, whose converter permutes the Q and
    /// K weights into this order.
    Interleaved,
    /// Dimension pairs `(i, i + d/2)`: Hugging Face checkpoints, and GGUFs of architectures
    /// llama.cpp marks NEOX (Qwen2).
    Half,
}

/// Everything the forward pass needs to know about a model's shape.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// The model family.
    pub arch: Arch,
    /// Number of transformer blocks.
    pub n_layers: usize,
    /// Width of the residual stream.
    pub hidden: usize,
    /// Width of the MLP's inner layer.
    pub intermediate: usize,
    /// Number of query heads.
    pub n_heads: usize,
    /// Number of key/value heads (GQA when fewer than `n_heads`).
    pub n_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Number of tokens in the vocabulary (rows of the embedding).
    pub vocab_size: usize,
    /// The longest sequence the model was trained for (for encoders, the longest input it
    /// encodes: longer ones are truncated).
    pub context_len: usize,
    /// RoPE base frequency θ.
    pub rope_theta: f32,
    /// How RoPE pairs dimensions.
    pub rope_layout: RopeLayout,
    /// The norms' ε (RMSNorm; LayerNorm for encoders).
    pub rms_eps: f32,
    /// Whether Q, K and V projections carry a bias.
    pub qkv_bias: bool,
}

impl ModelConfig {
    /// Reads the configuration from a GGUF file's metadata.
    ///
    /// # Errors
    /// [`FormatError::InvalidModel`] naming the missing or unsupported key.
    pub fn from_gguf(content: &gguf_file::Content, path: &Path) -> Result<Self> {
        let md = &content.metadata;
        let invalid = |reason: String| FormatError::InvalidModel {
            path: path.to_owned(),
            reason,
        };
        let arch_name = md
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .ok_or_else(|| invalid("missing `general.architecture`".into()))?
            .clone();
        let arch = match arch_name.as_str() {
            "llama" => Arch::Llama,
            "qwen2" => Arch::Qwen2,
            other => {
                return Err(invalid(format!(
                    "architecture `{other}` is not supported (supported: llama, qwen2)"
                )));
            }
        };
        let get_u = |key: &str| -> Result<usize> {
            let full = format!("{arch_name}.{key}");
            md.get(&full)
                .and_then(gguf_usize)
                .ok_or_else(|| invalid(format!("missing or non-integer `{full}`")))
        };
        let get_f = |key: &str| -> Option<f32> {
            md.get(&format!("{arch_name}.{key}"))
                .and_then(|v| v.to_f32().ok())
        };
        if md.contains_key(&format!("{arch_name}.rope.scaling.type"))
            || content.tensor_infos.contains_key("rope_freqs.weight")
        {
            return Err(invalid(
                "RoPE frequency scaling is not supported yet".into(),
            ));
        }
        // A Mistral-style GGUF carries its window here; running it with full attention would
        // give wrong answers past the window, with no error.
        let window_key = format!("{arch_name}.attention.sliding_window");
        if let Some(w) = md.get(&window_key).and_then(gguf_usize).filter(|&w| w > 0) {
            return Err(invalid(format!(
                "`{window_key}` = {w}: sliding-window attention is not supported yet"
            )));
        }
        let hidden = get_u("embedding_length")?;
        let n_heads = get_u("attention.head_count")?;
        let n_kv_heads = get_u("attention.head_count_kv").unwrap_or(n_heads);
        let head_dim = match get_u("attention.key_length") {
            Ok(d) => d,
            Err(_) if n_heads > 0 && hidden % n_heads == 0 => hidden / n_heads,
            Err(e) => return Err(e),
        };
        let vocab_size = match get_u("vocab_size") {
            Ok(v) => v,
            Err(_) => md
                .get("tokenizer.ggml.tokens")
                .and_then(|v| v.to_vec().ok())
                .map(Vec::len)
                .ok_or_else(|| invalid("no vocabulary size and no tokenizer".into()))?,
        };
        let cfg = Self {
            arch,
            n_layers: get_u("block_count")?,
            hidden,
            intermediate: get_u("feed_forward_length")?,
            n_heads,
            n_kv_heads,
            head_dim,
            vocab_size,
            context_len: get_u("context_length")?,
            rope_theta: get_f("rope.freq_base").unwrap_or(10_000.0),
            rope_layout: match arch {
                Arch::Qwen2 => RopeLayout::Half,
                // GGUF encoders are refused above; Llama is the rest.
                Arch::Llama | Arch::Bert(_) => RopeLayout::Interleaved,
            },
            rms_eps: get_f("attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
            qkv_bias: content.tensor_infos.contains_key("blk.0.attn_q.bias"),
        };
        cfg.check().map_err(invalid)?;
        Ok(cfg)
    }

    /// Reads a Hugging Face `config.json`.
    ///
    /// # Errors
    /// [`FormatError::Io`] when unreadable, [`FormatError::InvalidModel`] when a field is missing
    /// or the architecture is not one we run.
    pub fn from_hf_json(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| FormatError::Io {
            path: path.to_owned(),
            source,
        })?;
        let invalid = |reason: String| FormatError::InvalidModel {
            path: path.to_owned(),
            reason,
        };
        let raw: HashMap<String, serde_json::Value> =
            serde_json::from_str(&text).map_err(|e| invalid(format!("not JSON: {e}")))?;
        let model_type = raw
            .get("model_type")
            .and_then(|v| v.as_str())
            .unwrap_or("llama");
        let arch = match model_type {
            "llama" | "mistral" => Arch::Llama,
            "qwen2" => Arch::Qwen2,
            "bert" => return bert_config(path, &raw),
            other => {
                return Err(invalid(format!(
                    "model_type `{other}` is not supported (supported: llama, mistral, qwen2, \
                     bert)"
                )));
            }
        };
        if raw.get("rope_scaling").is_some_and(|v| !v.is_null()) {
            return Err(invalid("`rope_scaling` is not supported yet".into()));
        }
        if let Some(feature) = unsupported_hf_feature(model_type, &raw) {
            return Err(invalid(feature));
        }
        let get_u = |key: &str| -> Result<usize> {
            raw.get(key)
                .and_then(serde_json::Value::as_u64)
                .map(|v| v as usize)
                .ok_or_else(|| invalid(format!("missing or non-integer `{key}`")))
        };
        let get_f = |key: &str| {
            raw.get(key)
                .and_then(serde_json::Value::as_f64)
                .map(|v| v as f32)
        };
        let hidden = get_u("hidden_size")?;
        let n_heads = get_u("num_attention_heads")?;
        let head_dim = match get_u("head_dim") {
            Ok(d) => d,
            Err(_) if n_heads > 0 && hidden % n_heads == 0 => hidden / n_heads,
            Err(e) => return Err(e),
        };
        let cfg = Self {
            arch,
            n_layers: get_u("num_hidden_layers")?,
            hidden,
            intermediate: get_u("intermediate_size")?,
            n_heads,
            n_kv_heads: get_u("num_key_value_heads").unwrap_or(n_heads),
            head_dim,
            vocab_size: get_u("vocab_size")?,
            context_len: get_u("max_position_embeddings")?,
            rope_theta: get_f("rope_theta").unwrap_or(10_000.0),
            rope_layout: RopeLayout::Half,
            rms_eps: get_f("rms_norm_eps").unwrap_or(1e-6),
            qkv_bias: arch == Arch::Qwen2 || raw.get("attention_bias") == Some(&true.into()),
        };
        cfg.check().map_err(invalid)?;
        Ok(cfg)
    }

    /// Query heads per KV head.
    pub fn gqa_ratio(&self) -> usize {
        self.n_heads / self.n_kv_heads
    }

    /// Width of the Q projection's output.
    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }

    /// Width of the K (and V) projection's output.
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    /// Checks the relations the forward pass relies on.
    ///
    /// # Errors
    /// A sentence saying which relation fails.
    pub fn check(&self) -> std::result::Result<(), String> {
        let nonzero = [
            ("layers", self.n_layers),
            ("hidden size", self.hidden),
            ("intermediate size", self.intermediate),
            ("heads", self.n_heads),
            ("kv heads", self.n_kv_heads),
            ("head dim", self.head_dim),
            ("vocab size", self.vocab_size),
            ("context length", self.context_len),
        ];
        if let Some((name, _)) = nonzero.iter().find(|(_, v)| *v == 0) {
            return Err(format!("{name} is 0"));
        }
        if !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return Err(format!(
                "{} query heads do not divide into {} kv heads",
                self.n_heads, self.n_kv_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) || self.head_dim > 256 {
            return Err(format!(
                "head dim {} must be even and at most 256",
                self.head_dim
            ));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return Err(format!("rope θ {} must be positive", self.rope_theta));
        }
        Ok(())
    }
}

/// The first feature a Hugging Face `config.json` declares that the engine does not implement,
/// as the reason to refuse it: the engine never runs a model approximately.
///
/// - `sliding_window` (Mistral; Qwen2 with `use_sliding_window`), or sliding layers in
///   `layer_types`: attention limited to a window, which full attention silently ignores. A
///   window at least `max_position_embeddings` long is full attention and accepted.
/// - `hidden_act` other than SiLU (the MLP is SwiGLU), `mlp_bias`.
fn unsupported_hf_feature(
    model_type: &str,
    raw: &HashMap<String, serde_json::Value>,
) -> Option<String> {
    let positions = raw
        .get("max_position_embeddings")
        .and_then(serde_json::Value::as_u64);
    // Qwen2 declares a window it does not use unless `use_sliding_window` (default false).
    let window_used = match raw
        .get("use_sliding_window")
        .and_then(serde_json::Value::as_bool)
    {
        Some(used) => used,
        None => model_type != "qwen2",
    };
    if let Some(w) = raw
        .get("sliding_window")
        .and_then(serde_json::Value::as_u64)
        && window_used
        && positions.is_none_or(|p| w < p)
    {
        return Some(format!(
            "`sliding_window` = {w}: sliding-window attention is not supported yet"
        ));
    }
    if let Some(types) = raw.get("layer_types").and_then(serde_json::Value::as_array)
        && types
            .iter()
            .any(|t| t.as_str().is_some_and(|t| t != "full_attention"))
    {
        return Some(
            "`layer_types` interleaves layers other than full attention (sliding windows): \
             not supported yet"
                .into(),
        );
    }
    if let Some(act) = raw.get("hidden_act").and_then(serde_json::Value::as_str)
        && act != "silu"
    {
        return Some(format!(
            "`hidden_act` = {act:?}: only \"silu\" (SwiGLU MLPs) is supported"
        ));
    }
    if raw.get("mlp_bias") == Some(&true.into()) {
        return Some("`mlp_bias` = true: MLP biases are not supported yet".into());
    }
    None
}

/// GGUF stores counts in whichever integer width the writer chose.
fn gguf_usize(v: &gguf_file::Value) -> Option<usize> {
    use gguf_file::Value as V;
    match v {
        V::U8(x) => Some(*x as usize),
        V::U16(x) => Some(*x as usize),
        V::U32(x) => Some(*x as usize),
        V::U64(x) => usize::try_from(*x).ok(),
        V::I8(x) => usize::try_from(*x).ok(),
        V::I16(x) => usize::try_from(*x).ok(),
        V::I32(x) => usize::try_from(*x).ok(),
        V::I64(x) => usize::try_from(*x).ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn smollm_like() -> ModelConfig {
        ModelConfig {
            arch: Arch::Llama,
            n_layers: 30,
            hidden: 576,
            intermediate: 1536,
            n_heads: 9,
            n_kv_heads: 3,
            head_dim: 64,
            vocab_size: 49152,
            context_len: 8192,
            rope_theta: 100_000.0,
            rope_layout: RopeLayout::Interleaved,
            rms_eps: 1e-5,
            qkv_bias: false,
        }
    }

    /// Ensures that a consistent configuration passes and its derived widths are right.
    #[test]
    fn derived_widths() {
        let c = smollm_like();
        assert!(c.check().is_ok());
        assert_eq!((c.gqa_ratio(), c.q_dim(), c.kv_dim()), (3, 576, 192));
    }

    /// Ensures that heads that do not divide into kv heads are rejected with a reason.
    #[test]
    fn rejects_uneven_gqa() {
        let c = ModelConfig {
            n_kv_heads: 4,
            ..smollm_like()
        };
        assert!(c.check().is_err_and(|e| e.contains("kv heads")));
    }

    /// Ensures that a Hugging Face config.json is read with the half-rotation RoPE layout.
    #[test]
    fn reads_hf_config() {
        let dir = std::env::temp_dir().join(format!("tessera-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("config.json");
        std::fs::write(
            &path,
            r#"{"model_type":"qwen2","hidden_size":64,"num_attention_heads":4,
               "num_key_value_heads":2,"num_hidden_layers":2,"intermediate_size":128,
               "vocab_size":100,"max_position_embeddings":256,"rope_theta":1000000.0,
               "rms_norm_eps":1e-6,"rope_scaling":null}"#,
        )
        .expect("write");
        let c = ModelConfig::from_hf_json(&path).expect("config");
        assert_eq!(c.arch, Arch::Qwen2);
        assert_eq!(c.rope_layout, RopeLayout::Half);
        assert!(c.qkv_bias);
        assert_eq!((c.head_dim, c.kv_dim()), (16, 32));
        std::fs::remove_dir_all(&dir).ok();
    }

    /// Ensures that a GGUF declaring a sliding window is refused naming the key, and the same
    /// metadata without it is read.
    #[test]
    fn gguf_sliding_window_is_named() {
        use gguf_file::Value as V;
        let dir = std::env::temp_dir().join(format!("tessera-cfg-gguf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("m.gguf");
        let mut meta: Vec<(&str, V)> = vec![
            ("general.architecture", V::String("llama".into())),
            ("llama.block_count", V::U32(2)),
            ("llama.context_length", V::U32(256)),
            ("llama.embedding_length", V::U32(64)),
            ("llama.feed_forward_length", V::U32(128)),
            ("llama.attention.head_count", V::U32(4)),
            ("llama.vocab_size", V::U32(100)),
        ];
        let read = |meta: &[(&str, V)]| {
            let refs: Vec<(&str, &V)> = meta.iter().map(|(k, v)| (*k, v)).collect();
            let mut f = std::fs::File::create(&path).expect("create");
            gguf_file::write(&mut f, &refs, &[]).expect("write");
            let mut f = std::fs::File::open(&path).expect("open");
            let content = gguf_file::Content::read(&mut f).expect("read");
            ModelConfig::from_gguf(&content, &path)
        };
        read(&meta).expect("no window: read");
        meta.push(("llama.attention.sliding_window", V::U32(32)));
        match read(&meta) {
            Err(FormatError::InvalidModel { reason, .. }) => {
                assert!(
                    reason.contains("`llama.attention.sliding_window` = 32"),
                    "{reason}"
                );
            }
            other => panic!("accepted or wrong error: {other:?}"),
        }
        std::fs::remove_dir_all(&dir).ok();
    }

    /// Ensures that a config declaring a feature the engine does not implement is refused
    /// naming it — a Mistral window, Qwen2's window when used, sliding layer types, another
    /// activation, MLP biases — while windows that change nothing (Qwen2's unused one, a
    /// window as long as the context, `null`) are accepted.
    #[test]
    fn unsupported_features_are_named() {
        let dir = std::env::temp_dir().join(format!("tessera-cfg-unsup-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("config.json");
        let base = r#""hidden_size":64,"num_attention_heads":4,"num_key_value_heads":2,
            "num_hidden_layers":2,"intermediate_size":128,"vocab_size":100,
            "max_position_embeddings":256"#;
        let read = |extra: &str| {
            std::fs::write(&path, format!("{{{base}{extra}}}")).expect("write");
            ModelConfig::from_hf_json(&path)
        };
        let refused = [
            (
                r#","model_type":"mistral","sliding_window":32"#,
                "`sliding_window` = 32",
            ),
            (
                r#","model_type":"qwen2","sliding_window":32,"use_sliding_window":true"#,
                "`sliding_window` = 32",
            ),
            (
                r#","layer_types":["sliding_attention","full_attention"]"#,
                "`layer_types`",
            ),
            (r#","hidden_act":"gelu""#, "`hidden_act` = \"gelu\""),
            (r#","mlp_bias":true"#, "`mlp_bias`"),
        ];
        for (extra, named) in refused {
            match read(extra) {
                Err(FormatError::InvalidModel { reason, .. }) => {
                    assert!(reason.contains(named), "{extra}: {reason}");
                }
                other => panic!("{extra}: accepted or wrong error: {other:?}"),
            }
        }
        for accepted in [
            r#","model_type":"qwen2","sliding_window":32,"use_sliding_window":false"#,
            r#","model_type":"qwen2","sliding_window":32"#,
            r#","model_type":"mistral","sliding_window":256"#,
            r#","model_type":"mistral","sliding_window":null"#,
            r#","hidden_act":"silu","mlp_bias":false"#,
            r#","layer_types":["full_attention","full_attention"]"#,
        ] {
            read(accepted).unwrap_or_else(|e| panic!("{accepted}: {e}"));
        }
        std::fs::remove_dir_all(&dir).ok();
    }
}
