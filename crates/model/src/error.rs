//! The model crate's error type.
//!
//! Each concern keeps its own precise error (tokenizer, sampling, KV cache, model source) and
//! converts into [`ModelError`], which the RPC crates map to `tonic::Status` in one place.

use std::path::PathBuf;

/// Everything that can go wrong inside the engine.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// Reading a model file failed.
    #[error("reading {path}: {source}")]
    Io {
        /// The file being read.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The model file is readable but not a model we can run.
    #[error("invalid model {path}: {reason}")]
    InvalidModel {
        /// The file or directory.
        path: PathBuf,
        /// What is wrong with it, and how to fix it where we know.
        reason: String,
    },
    /// A tensor the architecture needs is missing or has the wrong shape.
    #[error("tensor {name}: {reason}")]
    Tensor {
        /// The tensor's name in the file.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// A weight format we do not implement.
    #[error("unsupported weight type {0}")]
    UnsupportedDType(String),
    /// An error from candle while reading weights.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// The compute thread pool could not start.
    #[error("thread pool: {0}")]
    ThreadPool(String),
    /// The tokenizer failed.
    #[error(transparent)]
    Tokenizer(#[from] crate::tokenizer::TokenizerError),
    /// A sampling parameter or stop condition is invalid.
    #[error(transparent)]
    Sampling(#[from] crate::sampling::SamplingError),
    /// The KV cache is out of blocks or was used inconsistently.
    #[error(transparent)]
    KvCache(#[from] crate::kv_cache::KvCacheError),
    /// The model could not be found, fetched or verified.
    #[error(transparent)]
    Source(#[from] crate::source::SourceError),
    /// A request is invalid for this model (too long for its context, empty, …).
    #[error("invalid argument `{field}`: {reason}")]
    InvalidArgument {
        /// The request field at fault.
        field: &'static str,
        /// Why it is rejected.
        reason: String,
    },
}

/// The crate's result type.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;
