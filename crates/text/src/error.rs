//! The text crate's error type.
//!
//! Each concern keeps its own precise error (tokenizer, sampling) and converts into
//! [`TextError`]; the wire boundary maps every one to a gRPC status by its kind.

/// What can go wrong on the text side of a request.
#[derive(Debug, thiserror::Error)]
pub enum TextError {
    /// The model's files could not be read (tokenizer metadata, configuration).
    #[error(transparent)]
    Format(#[from] tessera_format::FormatError),
    /// The tokenizer or chat template failed.
    #[error(transparent)]
    Tokenizer(#[from] crate::tokenizer::TokenizerError),
    /// A sampling parameter or stop condition is invalid.
    #[error(transparent)]
    Sampling(#[from] crate::sampling::SamplingError),
    /// A request is invalid for this model (empty, too long for its context, …).
    #[error("invalid argument `{field}`: {reason}")]
    InvalidArgument {
        /// The request field at fault.
        field: &'static str,
        /// Why it is rejected.
        reason: String,
    },
}

impl TextError {
    /// This error's class: the request's fault, except a model file that cannot be read.
    /// (A tokenizer or chat template that fails on a request's text is the request's fault.)
    pub fn kind(&self) -> tessera_format::ErrorKind {
        match self {
            Self::Format(e) => e.kind(),
            Self::Tokenizer(_) | Self::Sampling(_) | Self::InvalidArgument { .. } => {
                tessera_format::ErrorKind::InvalidArgument
            }
        }
    }

    /// The request field at fault, as the engine names it (`prompt`, `top_p`, `max_tokens`),
    /// when there is one.
    pub fn field(&self) -> Option<&'static str> {
        match self {
            Self::InvalidArgument { field, .. } => Some(field),
            Self::Sampling(s) => Some(s.field_name()),
            Self::Tokenizer(_) => Some("prompt"),
            Self::Format(_) => None,
        }
    }
}

/// The crate's result type.
pub type Result<T, E = TextError> = std::result::Result<T, E>;
