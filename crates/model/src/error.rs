//! The model crate's error type.
//!
//! Each layer below keeps its own precise error (model files, kernels, the text side, the KV
//! cache, model sources) and converts into [`ModelError`]; [`ModelError::kind`] says which
//! class of failure it is, and the wire boundary maps that class to one gRPC code for every
//! service.

/// Everything that can go wrong inside the engine.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The model's files cannot be read or are not a model we run.
    #[error(transparent)]
    Format(#[from] tessera_format::FormatError),
    /// A kernel rejected its arguments, or the compute threads could not start.
    #[error(transparent)]
    Kernel(#[from] tessera_kernels::KernelError),
    /// The tokenizer, a sampling parameter or a stop condition failed.
    #[error(transparent)]
    Text(#[from] tessera_text::TextError),
    /// The KV cache is out of blocks or was used inconsistently.
    #[error(transparent)]
    KvCache(#[from] crate::kv_cache::KvCacheError),
    /// The model could not be found, fetched or verified.
    #[error(transparent)]
    Source(#[from] tessera_hub::SourceError),
    /// A tensor-parallel collective failed: a peer rank is gone, silent, or failed the step.
    #[error("tensor-parallel group: {0}")]
    Collective(String),
    /// A request is invalid for this model (too long for its context, empty, …).
    #[error("invalid argument `{field}`: {reason}")]
    InvalidArgument {
        /// The request field at fault.
        field: &'static str,
        /// Why it is rejected.
        reason: String,
    },
}

impl From<tessera_text::tokenizer::TokenizerError> for ModelError {
    fn from(e: tessera_text::tokenizer::TokenizerError) -> Self {
        Self::Text(e.into())
    }
}

impl From<tessera_text::sampling::SamplingError> for ModelError {
    fn from(e: tessera_text::sampling::SamplingError) -> Self {
        Self::Text(e.into())
    }
}

impl ModelError {
    /// This error's class (see `tessera_format::ErrorKind`).
    pub fn kind(&self) -> tessera_format::ErrorKind {
        use crate::kv_cache::KvCacheError as Kv;
        use tessera_format::ErrorKind as K;
        match self {
            Self::Format(e) => e.kind(),
            Self::Kernel(e) => e.kind(),
            Self::Text(e) => e.kind(),
            Self::KvCache(Kv::OutOfBlocks { .. }) => K::ResourceExhausted,
            Self::KvCache(Kv::InvalidConfig { .. }) => K::InvalidArgument,
            // A broken ownership or prefix-store invariant: a bug, never the client's fault.
            Self::KvCache(
                Kv::ForeignSequence
                | Kv::NotShareable { .. }
                | Kv::PrefixMissing { .. }
                | Kv::PrefixDuplicate { .. },
            ) => K::Internal,
            Self::Source(e) => e.kind(),
            Self::InvalidArgument { .. } => K::InvalidArgument,
            // The worker reports the peer's failure itself (UNAVAILABLE); reaching a client
            // through this class means a fault of the cluster, not of the request.
            Self::Collective(_) => K::Internal,
        }
    }

    /// The request field at fault, as the engine names it, when there is one.
    pub fn field(&self) -> Option<&'static str> {
        match self {
            Self::Text(e) => e.field(),
            Self::Kernel(tessera_kernels::KernelError::InvalidArgument { field, .. })
            | Self::InvalidArgument { field, .. } => Some(field),
            _ => None,
        }
    }
}

/// The crate's result type.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;
