//! Tokenizers and chat templates. (in progress)

/// Tokenizer errors.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// Placeholder.
    #[error("tokenizer: {0}")]
    Other(String),
}
