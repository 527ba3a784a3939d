//! Locating the real models for tests and benchmarks: SmolLM2 (a GGUF file) and
//! all-MiniLM-L6-v2 (a sentence-transformers directory).
//!
//! Tests that run a real model must run in CI (where `scripts/test.sh` pulls both first) and may
//! be skipped on a developer machine that has not pulled it yet, with a message saying how.

use std::path::PathBuf;

use tessera_hub::{DEFAULT_MODEL, MINILM_MODEL};

/// The file name of the default model inside the model cache.
pub const SMOLLM2_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// The default model's name in the model cache (the hub's default model).
pub const SMOLLM2_NAME: &str = DEFAULT_MODEL;
/// The sentence-embedding model's name in the model cache (its directory under `models/`).
pub const MINILM_NAME: &str = MINILM_MODEL;
/// The files the MiniLM directory must hold to count as present: the encoder's configuration
/// and weights, the tokenizer, and the pooling configuration.
const MINILM_FILES: [&str; 4] = [
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "1_Pooling/config.json",
];

/// `$TESSERA_HOME/models/NAME`, `TESSERA_HOME` defaulting to `~/.cache/tessera` (the hub's
/// own cache, [`tessera_hub::ModelCache::from_env`]); `None` when neither variable is set.
fn cached(name: &str) -> Option<PathBuf> {
    let cache = tessera_hub::ModelCache::from_env().ok()?;
    Some(cache.models_dir().join(name))
}

/// What a locator does when its model is missing: panic in CI (which must never skip the
/// real-model tests), else say how to get it and return `None`.
///
/// # Panics
/// When `CI` is set (and not `false`).
fn missing(name: &str, override_var: &str, tried: Option<PathBuf>) -> Option<PathBuf> {
    let in_ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false");
    assert!(
        !in_ci,
        "the real model {name} is missing in CI ({tried:?}); scripts/test.sh must pull it first"
    );
    eprintln!(
        "skipping: real model {name} not found ({tried:?}); run `tessera model pull {name}` or \
         set {override_var}"
    );
    None
}

/// The SmolLM2 GGUF: `$TESSERA_MODEL_GGUF`, else the model cache
/// (`$TESSERA_HOME/models/smollm2-135m-instruct/…`, `TESSERA_HOME` defaulting to
/// `~/.cache/tessera`). `None` when neither exists.
///
/// # Panics
/// When the model is missing and `CI` is set: CI must never skip the real-model tests.
pub fn smollm2_gguf() -> Option<PathBuf> {
    let candidate = std::env::var_os("TESSERA_MODEL_GGUF")
        .map(PathBuf::from)
        .or_else(|| Some(cached(SMOLLM2_NAME)?.join(SMOLLM2_FILE)));
    match candidate {
        Some(p) if p.is_file() => Some(p),
        other => missing(SMOLLM2_NAME, "TESSERA_MODEL_GGUF", other),
    }
}

/// [`smollm2_gguf`] as a process argument (lossily converted to UTF-8).
///
/// # Panics
/// As [`smollm2_gguf`].
pub fn smollm2_arg() -> Option<String> {
    Some(smollm2_gguf()?.to_string_lossy().into_owned())
}

/// The all-MiniLM-L6-v2 model directory (sentence-transformers layout: `config.json`,
/// `model.safetensors`, `tokenizer.json`, `1_Pooling/config.json`, …): `$TESSERA_MINILM_DIR`,
/// else the model cache (`$TESSERA_HOME/models/all-minilm-l6-v2`, `TESSERA_HOME` defaulting to
/// `~/.cache/tessera`). `None` when neither holds those files.
///
/// # Panics
/// When the model is missing and `CI` is set: CI must never skip the real-model tests.
pub fn minilm_dir() -> Option<PathBuf> {
    let candidate = std::env::var_os("TESSERA_MINILM_DIR")
        .map(PathBuf::from)
        .or_else(|| cached(MINILM_NAME));
    match candidate {
        Some(d) if MINILM_FILES.iter().all(|f| d.join(f).is_file()) => Some(d),
        other => missing(MINILM_NAME, "TESSERA_MINILM_DIR", other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ensures that the MiniLM locator, where the model is pulled, finds the pulled files whole
    /// (the weights' size is the published one), so tests built on it read the real model.
    #[test]
    fn minilm_locator_finds_the_pulled_directory() {
        let Some(dir) = minilm_dir() else {
            return;
        };
        let weights = std::fs::metadata(dir.join("model.safetensors")).expect("weights");
        assert_eq!(weights.len(), 90_868_376);
    }
}
