//! Encoder-only models (BERT and its descendants: MiniLM, sentence-transformers checkpoints):
//! what sets them apart from the decoders [`ModelConfig`] otherwise describes, read from a
//! Hugging Face directory.
//!
//! An encoder is a [`ModelConfig`] whose [`Arch`] is [`Arch::Bert`], carrying an
//! [`EncoderSpec`]: the shared fields keep their meaning (layers, hidden, heads, intermediate,
//! vocabulary; `n_kv_heads = n_heads`; `qkv_bias`; `rms_eps` is the LayerNorm ε), and
//! `context_len` is the longest input the model encodes — longer inputs are truncated to it,
//! as sentence-transformers does (`max_seq_length`). So the planner and the footprint, which
//! only count layers and bytes, plan an encoder like any model.
//!
//! The directory's sentence-transformers files decide the pooling: `modules.json` lists the
//! modules (Transformer → Pooling → optional Normalize), the Pooling module's `config.json`
//! the mode, `sentence_bert_config.json` the input limit. A plain `transformers` BERT
//! directory (no `modules.json`) pools by mean without normalizing, which is what
//! sentence-transformers does when it wraps such a model.
//!
//! Features the engine does not implement are refused by name (never run approximately):
//! relative position embeddings, an activation other than exact GELU, decoder or
//! cross-attention flags, pooling modes other than mean and CLS.

use std::collections::HashMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use crate::config::{Arch, ModelConfig, RopeLayout};
use crate::error::{FormatError, Result};

/// How an encoder turns its last hidden states into one vector per input.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Pooling {
    /// The mean over the input's tokens ([CLS] and [SEP] included, as sentence-transformers).
    Mean,
    /// The first token's ([CLS]) hidden state.
    Cls,
}

/// The encoder-only part of a model's shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EncoderSpec {
    /// Rows of the token-type (segment) embedding.
    pub type_vocab: usize,
    /// Rows of the learned absolute position embedding (positions the model can take).
    pub max_positions: usize,
    /// The pooling.
    pub pooling: Pooling,
    /// Whether the pooled vector is scaled to unit L2 norm.
    pub normalize: bool,
}

/// Reads a file of the model directory as JSON, `None` when it does not exist.
fn read_json(path: &Path) -> Result<Option<Json>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(FormatError::Io {
                path: path.to_owned(),
                source,
            });
        }
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| FormatError::InvalidModel {
            path: path.to_owned(),
            reason: format!("not JSON: {e}"),
        })
}

/// The pooling and normalization the sentence-transformers files in `dir` declare.
fn sentence_modules(dir: &Path) -> Result<(Pooling, bool)> {
    let modules_path = dir.join("modules.json");
    let Some(modules) = read_json(&modules_path)? else {
        return Ok((Pooling::Mean, false));
    };
    let invalid = |path: &Path, reason: String| FormatError::InvalidModel {
        path: path.to_owned(),
        reason,
    };
    let list = modules
        .as_array()
        .ok_or_else(|| invalid(&modules_path, "not a list of modules".into()))?;
    let (mut pooling, mut normalize) = (Pooling::Mean, false);
    for module in list {
        let kind = module.get("type").and_then(Json::as_str).unwrap_or("");
        let kind = kind.rsplit('.').next().unwrap_or(kind);
        match kind {
            "Transformer" => {}
            "Normalize" => normalize = true,
            "Pooling" => {
                let sub = module.get("path").and_then(Json::as_str).unwrap_or("");
                if sub.contains("..") || sub.starts_with('/') {
                    return Err(invalid(&modules_path, format!("module path {sub:?}")));
                }
                let path = dir.join(sub).join("config.json");
                let cfg = read_json(&path)?.ok_or_else(|| {
                    invalid(&path, "the Pooling module's config is missing".into())
                })?;
                pooling = pooling_mode(&cfg).map_err(|reason| invalid(&path, reason))?;
            }
            other => {
                return Err(invalid(
                    &modules_path,
                    format!(
                        "module `{other}` is not supported (supported: Transformer, Pooling, \
                         Normalize)"
                    ),
                ));
            }
        }
    }
    Ok((pooling, normalize))
}

/// The one pooling mode a Pooling module's config turns on.
fn pooling_mode(cfg: &Json) -> std::result::Result<Pooling, String> {
    let on = |key: &str| cfg.get(key).and_then(Json::as_bool).unwrap_or(false);
    let modes = [
        ("pooling_mode_mean_tokens", Some(Pooling::Mean)),
        ("pooling_mode_cls_token", Some(Pooling::Cls)),
        ("pooling_mode_max_tokens", None),
        ("pooling_mode_mean_sqrt_len_tokens", None),
        ("pooling_mode_weightedmean_tokens", None),
        ("pooling_mode_lasttoken", None),
    ];
    let chosen: Vec<_> = modes.iter().filter(|(key, _)| on(key)).collect();
    match chosen.as_slice() {
        [(_, Some(p))] => Ok(*p),
        [(key, None)] => Err(format!(
            "`{key}` is not supported (pooling by mean or by the CLS token is)"
        )),
        [] => Err("no pooling mode is on".into()),
        _ => Err("several pooling modes at once (concatenated) are not supported".into()),
    }
}

/// The configuration of a BERT-family encoder whose `config.json` (parsed: `raw`) is at
/// `path`.
///
/// # Errors
/// [`FormatError::InvalidModel`] naming a missing field or a feature the engine does not run.
pub(crate) fn bert_config(path: &Path, raw: &HashMap<String, Json>) -> Result<ModelConfig> {
    let invalid = |reason: String| FormatError::InvalidModel {
        path: path.to_owned(),
        reason,
    };
    let get_u = |key: &str| -> Result<usize> {
        raw.get(key)
            .and_then(Json::as_u64)
            .map(|v| v as usize)
            .ok_or_else(|| invalid(format!("missing or non-integer `{key}`")))
    };
    let get_str = |key: &str| raw.get(key).and_then(Json::as_str);
    if let Some(kind) = get_str("position_embedding_type")
        && kind != "absolute"
    {
        return Err(invalid(format!(
            "`position_embedding_type` = {kind:?}: only \"absolute\" is supported"
        )));
    }
    // transformers' "gelu" is the exact, erf-based GELU; the tanh approximations differ.
    if let Some(act) = get_str("hidden_act")
        && act != "gelu"
    {
        return Err(invalid(format!(
            "`hidden_act` = {act:?}: only \"gelu\" (exact) is supported for encoders"
        )));
    }
    for flag in ["is_decoder", "add_cross_attention"] {
        if raw.get(flag) == Some(&true.into()) {
            return Err(invalid(format!(
                "`{flag}` = true: BERT as a decoder is not supported"
            )));
        }
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    let (pooling, normalize) = sentence_modules(dir)?;
    let max_positions = get_u("max_position_embeddings")?;
    let limit = read_json(&dir.join("sentence_bert_config.json"))?
        .and_then(|c| c.get("max_seq_length").and_then(Json::as_u64))
        .map_or(max_positions, |v| (v as usize).min(max_positions));
    let hidden = get_u("hidden_size")?;
    let n_heads = get_u("num_attention_heads")?;
    if n_heads == 0 || !hidden.is_multiple_of(n_heads) {
        return Err(invalid(format!(
            "`hidden_size` {hidden} is not a multiple of `num_attention_heads` {n_heads}"
        )));
    }
    let eps = raw
        .get("layer_norm_eps")
        .and_then(Json::as_f64)
        .unwrap_or(1e-12) as f32;
    let cfg = ModelConfig {
        arch: Arch::Bert(EncoderSpec {
            type_vocab: get_u("type_vocab_size").unwrap_or(2).max(1),
            max_positions,
            pooling,
            normalize,
        }),
        n_layers: get_u("num_hidden_layers")?,
        hidden,
        intermediate: get_u("intermediate_size")?,
        n_heads,
        n_kv_heads: n_heads,
        head_dim: hidden / n_heads,
        vocab_size: get_u("vocab_size")?,
        context_len: limit,
        // No rotary positions; the value only satisfies `check`.
        rope_theta: 10_000.0,
        rope_layout: RopeLayout::Half,
        rms_eps: eps,
        qkv_bias: true,
    };
    cfg.check().map_err(invalid)?;
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A BERT directory with `config` as config.json and the given extra files.
    fn dir_with(config: &Json, files: &[(&str, &str)]) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "tessera-bert-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(dir.join("config.json"), config.to_string()).expect("config");
        for (name, text) in files {
            let path = dir.join(name);
            std::fs::create_dir_all(path.parent().expect("parent")).expect("subdir");
            std::fs::write(path, text).expect("file");
        }
        dir
    }

    fn rand_suffix() -> u64 {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        N.fetch_add(1, Ordering::SeqCst)
    }

    fn minilm() -> Json {
        serde_json::json!({
            "model_type": "bert", "hidden_act": "gelu", "hidden_size": 384,
            "intermediate_size": 1536, "layer_norm_eps": 1e-12, "max_position_embeddings": 512,
            "num_attention_heads": 12, "num_hidden_layers": 6, "position_embedding_type": "absolute",
            "type_vocab_size": 2, "vocab_size": 30522
        })
    }

    /// Extra files of a test directory: (relative path, contents).
    type Files = &'static [(&'static str, &'static str)];

    const MODULES: &str = r#"[{"idx":0,"name":"0","path":"","type":"sentence_transformers.models.Transformer"},
        {"idx":1,"name":"1","path":"1_Pooling","type":"sentence_transformers.models.Pooling"},
        {"idx":2,"name":"2","path":"2_Normalize","type":"sentence_transformers.models.Normalize"}]"#;

    /// Ensures that a sentence-transformers MiniLM directory reads as a mean-pooling,
    /// normalizing encoder limited to its `max_seq_length`, and a plain BERT directory as
    /// mean pooling without normalization, limited by its position table.
    #[test]
    fn reads_sentence_transformers_directory() {
        let dir = dir_with(
            &minilm(),
            &[
                ("modules.json", MODULES),
                (
                    "1_Pooling/config.json",
                    r#"{"pooling_mode_mean_tokens": true, "pooling_mode_cls_token": false}"#,
                ),
                ("sentence_bert_config.json", r#"{"max_seq_length": 256}"#),
            ],
        );
        let cfg = ModelConfig::from_hf_json(&dir.join("config.json")).expect("config");
        let Arch::Bert(spec) = cfg.arch else {
            panic!("not an encoder: {:?}", cfg.arch)
        };
        assert_eq!(spec.pooling, Pooling::Mean);
        assert!(spec.normalize);
        assert_eq!((spec.max_positions, spec.type_vocab), (512, 2));
        assert_eq!(
            (cfg.context_len, cfg.head_dim, cfg.n_kv_heads, cfg.n_layers),
            (256, 32, 12, 6)
        );
        assert!(cfg.arch.is_encoder());

        let plain = dir_with(&minilm(), &[]);
        let cfg = ModelConfig::from_hf_json(&plain.join("config.json")).expect("config");
        let Arch::Bert(spec) = cfg.arch else {
            panic!("not an encoder")
        };
        assert_eq!(
            (spec.pooling, spec.normalize, cfg.context_len),
            (Pooling::Mean, false, 512)
        );
    }

    /// Ensures that every encoder feature the engine does not implement is refused with an
    /// error naming it.
    #[test]
    fn unsupported_encoder_features_are_named() {
        let cases: [(&str, Json, Files); 5] = [
            (
                "position_embedding_type",
                serde_json::json!({"position_embedding_type": "relative_key"}),
                &[],
            ),
            (
                "hidden_act",
                serde_json::json!({"hidden_act": "gelu_new"}),
                &[],
            ),
            ("is_decoder", serde_json::json!({"is_decoder": true}), &[]),
            (
                "pooling_mode_max_tokens",
                serde_json::json!({}),
                &[
                    ("modules.json", MODULES),
                    (
                        "1_Pooling/config.json",
                        r#"{"pooling_mode_max_tokens": true}"#,
                    ),
                ],
            ),
            (
                "Dense",
                serde_json::json!({}),
                &[(
                    "modules.json",
                    r#"[{"path":"2_Dense","type":"sentence_transformers.models.Dense"}]"#,
                )],
            ),
        ];
        for (name, patch, files) in cases {
            let mut cfg = minilm();
            for (k, v) in patch.as_object().expect("object") {
                cfg[k] = v.clone();
            }
            let dir = dir_with(&cfg, files);
            let err = ModelConfig::from_hf_json(&dir.join("config.json"))
                .expect_err(name)
                .to_string();
            assert!(err.contains(name), "{name}: {err}");
        }
    }
}
