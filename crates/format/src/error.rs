//! The format crate's error type: a model file that cannot be read or is not a model we run.

use std::path::PathBuf;

/// What can go wrong reading a model's files.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
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
}

/// What class of failure an error is, across every crate: each error type says its kind, and
/// the wire boundary (`tessera_proto::wire`) maps a kind to one gRPC code, so the same failure
/// reaches a client with the same code whichever service reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The request (or the model it names) is at fault; retrying it unchanged fails again.
    InvalidArgument,
    /// The named model or file does not exist here.
    NotFound,
    /// Out of a bounded resource (KV blocks, memory); retrying later may succeed.
    ResourceExhausted,
    /// A fault of this process or machine, not of the request.
    Internal,
}

impl FormatError {
    /// This error's class.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
                ErrorKind::NotFound
            }
            Self::Io { .. } => ErrorKind::Internal,
            // A model file we cannot run is a bad request for whoever asked for that model.
            Self::InvalidModel { .. } | Self::Tensor { .. } | Self::UnsupportedDType(_) => {
                ErrorKind::InvalidArgument
            }
        }
    }
}

/// The crate's result type.
pub type Result<T, E = FormatError> = std::result::Result<T, E>;
