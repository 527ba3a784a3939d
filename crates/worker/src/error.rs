//! The worker's error type and its one mapping to gRPC status codes.

use tessera_model::ModelError;
use tonic::{Code, Status};

/// Everything a worker can fail with, from a bad step to a port that cannot be bound.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// A request field is invalid; `field` is its protocol path (`seqs[2].start`, `hidden`).
    #[error("{field}: {reason}")]
    InvalidArgument {
        /// The request field at fault, spelled as in the proto.
        field: String,
        /// Why it is rejected.
        reason: String,
    },
    /// The request does not fit the worker's state (no shard loaded, or a stream opened for
    /// an older plan epoch).
    #[error("{0}")]
    FailedPrecondition(String),
    /// The model named by `LoadShard` is not on this worker.
    #[error("model: {0}")]
    ModelNotFound(String),
    /// Out of KV cache blocks or declared memory.
    #[error("{0}")]
    ResourceExhausted(String),
    /// The next stage cannot be reached, broke its stream, or this worker is shutting down.
    #[error("{0}")]
    Unavailable(String),
    /// A rank of this worker's tensor-parallel group could not be reached, or did not dial
    /// in, while the group formed: UNAVAILABLE naming `peer` in the status metadata
    /// ([`tessera_proto::status::unreachable_peer`]), so the coordinator drops that peer and
    /// not this worker.
    #[error("{message}")]
    PeerUnreachable {
        /// The peer's peer-port address.
        peer: String,
        /// What happened, naming the rank.
        message: String,
    },
    /// The model failed in a way not caused by the request (unreadable file, bad tensor).
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The GPU failed, or cannot be used (no driver, no such device, no cuBLAS, out of
    /// memory, a launch that failed). A device error in a step is never the request's fault:
    /// the stage validated it first.
    #[error("device: {0}")]
    Device(tessera_cuda::CudaError),
    /// The listen address could not be bound.
    #[error("binding {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: std::net::SocketAddr,
        /// Why it failed.
        source: std::io::Error,
    },
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The shard executor thread could not start or has stopped.
    #[error("shard executor: {0}")]
    Executor(String),
    /// This stage's prefix store no longer mirrors the coordinator's prefix index (a block
    /// asked for is missing, or a hash to store is already held): a broken invariant, so the
    /// step fails rather than compute with the wrong K/V.
    #[error("prefix cache out of sync with the coordinator: {0}")]
    PrefixOutOfSync(String),
}

impl WorkerError {
    /// An [`WorkerError::InvalidArgument`] for `field`.
    pub(crate) fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// The gRPC code this error is reported with.
    pub fn code(&self) -> Code {
        match self {
            Self::InvalidArgument { .. } => Code::InvalidArgument,
            Self::FailedPrecondition(_) => Code::FailedPrecondition,
            Self::ModelNotFound(_) => Code::NotFound,
            Self::ResourceExhausted(_) => Code::ResourceExhausted,
            Self::Unavailable(_) | Self::PeerUnreachable { .. } => Code::Unavailable,
            Self::Model(e) => tessera_proto::wire::code(e.kind()),
            Self::Bind { .. }
            | Self::Transport(_)
            | Self::Executor(_)
            | Self::Device(_)
            | Self::PrefixOutOfSync(_) => Code::Internal,
        }
    }
}

impl From<tessera_cuda::CudaError> for WorkerError {
    /// The GPU stage's model errors (an invalid batch, a full KV cache) are the CPU
    /// backend's, reported the same way; everything else is the device's.
    fn from(e: tessera_cuda::CudaError) -> Self {
        match e {
            tessera_cuda::CudaError::Model(m) => Self::Model(m),
            other => Self::Device(other),
        }
    }
}

impl From<WorkerError> for Status {
    fn from(e: WorkerError) -> Self {
        if let WorkerError::PeerUnreachable { peer, message } = e {
            return tessera_proto::status::peer_unreachable(&peer, message);
        }
        let message = match &e {
            // The engine names its own fields (`tokens`, `layers`); keep them first.
            WorkerError::Model(ModelError::InvalidArgument { field, reason }) => {
                format!("{field}: {reason}")
            }
            WorkerError::Model(ModelError::Source(s)) => format!("model: {s}"),
            WorkerError::Model(m) => match m.field() {
                Some(field) => format!("{field}: {m}"),
                None => m.to_string(),
            },
            other => other.to_string(),
        };
        Status::new(e.code(), message)
    }
}

/// A status from the next stage, or from the transport to it, as this stage reports it
/// upstream: transport failures become UNAVAILABLE naming the stage; a status the next stage
/// chose itself is passed on unchanged, so the caller sees the original cause.
pub(crate) fn relay_status(next: &str, s: Status) -> Status {
    match s.code() {
        Code::Unknown | Code::Unavailable | Code::Cancelled | Code::DeadlineExceeded => {
            Status::unavailable(format!("next stage {next}: {}", s.message()))
        }
        _ => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_hub::SourceError;
    use tessera_model::kv_cache::KvCacheError;

    /// Ensures that each kind of failure reaches callers with the code the protocol promises.
    #[test]
    fn codes_follow_the_contract() {
        let cases: Vec<(WorkerError, Code, &str)> = vec![
            (
                WorkerError::invalid("seqs[0].start", "missing"),
                Code::InvalidArgument,
                "seqs[0].start: missing",
            ),
            (
                ModelError::KvCache(KvCacheError::OutOfBlocks { needed: 2, free: 1 }).into(),
                Code::ResourceExhausted,
                "KV cache is full",
            ),
            (
                ModelError::InvalidArgument {
                    field: "tokens",
                    reason: "bad".into(),
                }
                .into(),
                Code::InvalidArgument,
                "tokens: bad",
            ),
            (
                // The worker's own environment, not the request.
                ModelError::Source(SourceError::NoCacheDir).into(),
                Code::Internal,
                "model: ",
            ),
            (
                ModelError::Source(SourceError::Unknown {
                    spec: "x".into(),
                    known: String::new(),
                })
                .into(),
                Code::NotFound,
                "model: ",
            ),
            (
                WorkerError::FailedPrecondition("plan_epoch: old".into()),
                Code::FailedPrecondition,
                "plan_epoch",
            ),
            (
                WorkerError::Unavailable("next stage gone".into()),
                Code::Unavailable,
                "next stage",
            ),
            (
                WorkerError::PeerUnreachable {
                    peer: "127.0.0.1:4100".into(),
                    message: "tensor-parallel rank 1 (127.0.0.1:4100): refused".into(),
                },
                Code::Unavailable,
                "tensor-parallel rank 1",
            ),
            (
                // The GPU stage's invalid batch is the CPU's.
                tessera_cuda::CudaError::Model(ModelError::InvalidArgument {
                    field: "tokens",
                    reason: "bad".into(),
                })
                .into(),
                Code::InvalidArgument,
                "tokens: bad",
            ),
            (
                tessera_cuda::CudaError::NoCublas.into(),
                Code::Internal,
                "device: no cuBLAS",
            ),
            (
                WorkerError::PrefixOutOfSync("block 00000000000000ff missing".into()),
                Code::Internal,
                "prefix cache out of sync",
            ),
        ];
        for (err, code, prefix) in cases {
            let s = Status::from(err);
            assert_eq!(s.code(), code, "{s:?}");
            assert!(s.message().starts_with(prefix), "{s:?}");
        }
    }

    /// Ensures that transport failures from the next stage turn into UNAVAILABLE while a
    /// status it chose (INVALID_ARGUMENT) passes through unchanged.
    #[test]
    fn relayed_statuses() {
        let s = relay_status("1.2.3.4:5", Status::unknown("h2 protocol error"));
        assert_eq!(s.code(), Code::Unavailable);
        assert!(s.message().contains("1.2.3.4:5"));
        let s = relay_status("x", Status::invalid_argument("hidden: bad"));
        assert_eq!(s.code(), Code::InvalidArgument);
        assert_eq!(s.message(), "hidden: bad");
    }
}
