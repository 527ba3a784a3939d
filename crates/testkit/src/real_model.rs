//! Locating the real model for tests and benchmarks.
//!
//! Tests that run SmolLM2 must run in CI (where `.ci/run` pulls the model first) and may be
//! skipped on a developer machine that has not pulled it yet, with a message saying how.

use std::path::PathBuf;

use tessera_hub::DEFAULT_MODEL;

/// The file name of the default model inside the model cache.
pub const SMOLLM2_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// The default model's name in the model cache (the hub's default model).
pub const SMOLLM2_NAME: &str = DEFAULT_MODEL;
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

/// [`smollm2_gguf`] as a process argument (lossily converted to UTF-8).
///
/// # Panics
/// As [`smollm2_gguf`].
pub fn smollm2_arg() -> Option<String> {
    Some(smollm2_gguf()?.to_string_lossy().into_owned())
}
