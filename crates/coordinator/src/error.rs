//! The coordinator's error type and its one mapping to `tonic::Status`.

use tessera_text::TextError;
use tessera_text::sampling::SamplingError;

use crate::raft::RaftError;
use crate::state::StateError;
use crate::state::planner::PlanError;

/// Everything that can go wrong in the coordinator.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    /// A request field is invalid; `field` is its proto path (`sampling.top_p`, `prompt`, …).
    #[error("{field}: {reason}")]
    InvalidArgument {
        /// The field's proto path.
        field: String,
        /// Why it is rejected.
        reason: String,
    },
    /// The model could not be found or opened (its files, tokenizer or chat template).
    #[error("model: {0}")]
    Model(String),
    /// No plan serves the model (too few workers, or reloading), or a worker was lost
    /// mid-request; retrying later may succeed.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The cluster cannot take the request now (queue or KV capacity).
    #[error("resource exhausted: {0}")]
    ResourceExhausted(String),
    /// No plan fits the workers.
    #[error(transparent)]
    Plan(#[from] PlanError),
    /// A cluster state command was refused.
    #[error("cluster state: {0}")]
    State(#[from] StateError),
    /// A worker call failed.
    #[error("worker {worker}: {status}")]
    Worker {
        /// The worker's id or address.
        worker: String,
        /// What it answered.
        status: tonic::Status,
    },
    /// The listen address could not be bound or served.
    #[error("serving {addr}: {reason}")]
    Serve {
        /// The address.
        addr: String,
        /// What failed.
        reason: String,
    },
    /// Raft refused or lost a proposal, or its storage failed (see [`RaftError::to_status`]).
    #[error(transparent)]
    Raft(#[from] RaftError),
    /// A bug: an internal task or channel went away.
    #[error("internal: {0}")]
    Internal(String),
}

/// The proto path of a `tessera_text` request field.
fn proto_field(field: &str) -> String {
    match field {
        "temperature" | "top_k" | "top_p" | "min_p" | "repetition_penalty"
        | "frequency_penalty" | "presence_penalty" | "seed" => format!("sampling.{field}"),
        "max_tokens" | "stop" | "stop_token_ids" | "ignore_eos" => format!("stop.{field}"),
        "messages" => "chat.messages".into(),
        other => other.into(),
    }
}

impl From<TextError> for CoordinatorError {
    fn from(e: TextError) -> Self {
        match e {
            TextError::InvalidArgument { field, reason } => Self::InvalidArgument {
                field: proto_field(field),
                reason,
            },
            TextError::Sampling(SamplingError::InvalidField { field, reason }) => {
                Self::InvalidArgument {
                    field: proto_field(field),
                    reason,
                }
            }
            // A chat template that cannot render these messages is the messages' fault.
            TextError::Tokenizer(t) => Self::InvalidArgument {
                field: "prompt".into(),
                reason: t.to_string(),
            },
            TextError::Format(f) => Self::Model(f.to_string()),
        }
    }
}

impl From<tessera_format::FormatError> for CoordinatorError {
    fn from(e: tessera_format::FormatError) -> Self {
        Self::Model(e.to_string())
    }
}

impl From<tessera_hub::SourceError> for CoordinatorError {
    fn from(e: tessera_hub::SourceError) -> Self {
        Self::Model(e.to_string())
    }
}

/// The longest message a status carries: it travels in an HTTP/2 header (`grpc-message`), and
/// one past the peer's header limit ends the call with a protocol error instead of the status.
pub const MAX_STATUS_MESSAGE: usize = 1024;

/// `text` cut to `max` bytes (on a character boundary) with an ellipsis, so that no error
/// echoes unbounded input.
pub fn clip(text: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if text.len() <= max {
        return text.into();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes)", &text[..end], text.len()).into()
}

impl CoordinatorError {
    /// An [`CoordinatorError::InvalidArgument`].
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

impl From<CoordinatorError> for tonic::Status {
    fn from(e: CoordinatorError) -> Self {
        use tonic::Code;
        let code = match &e {
            CoordinatorError::InvalidArgument { .. } => Code::InvalidArgument,
            CoordinatorError::Model(_) => Code::Internal,
            CoordinatorError::Unavailable(_) => Code::Unavailable,
            CoordinatorError::ResourceExhausted(_) => Code::ResourceExhausted,
            CoordinatorError::Plan(_) => Code::Unavailable,
            CoordinatorError::State(_) => Code::FailedPrecondition,
            CoordinatorError::Worker { .. } => Code::Unavailable,
            CoordinatorError::Serve { .. } => Code::Internal,
            CoordinatorError::Internal(_) => Code::Internal,
            CoordinatorError::Raft(r) => return r.to_status(),
        };
        let retry = matches!(e, CoordinatorError::ResourceExhausted(_));
        // Invalid arguments start with the field's proto path, as the proto promises.
        let mut status = tonic::Status::new(code, clip(&e.to_string(), MAX_STATUS_MESSAGE));
        if retry {
            // The retry hint, in seconds, as HTTP's Retry-After (gRPC has no standard header
            // short of google.rpc.RetryInfo details).
            status
                .metadata_mut()
                .insert("retry-after", tonic::metadata::MetadataValue::from(1u32));
        }
        status
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ensures that model errors become INVALID_ARGUMENT prefixed with the proto field path.
    #[test]
    fn model_errors_map_to_proto_paths() {
        let cases = [
            (
                SamplingError::InvalidField {
                    field: "top_p",
                    reason: "r".into(),
                }
                .into(),
                "sampling.top_p: r",
            ),
            (
                SamplingError::InvalidField {
                    field: "max_tokens",
                    reason: "r".into(),
                }
                .into(),
                "stop.max_tokens: r",
            ),
            (
                TextError::InvalidArgument {
                    field: "prompt",
                    reason: "r".into(),
                },
                "prompt: r",
            ),
            (
                TextError::InvalidArgument {
                    field: "messages",
                    reason: "r".into(),
                },
                "chat.messages: r",
            ),
        ];
        for (model_err, want) in cases {
            let s = tonic::Status::from(CoordinatorError::from(model_err));
            assert_eq!(s.code(), tonic::Code::InvalidArgument);
            assert_eq!(s.message(), want);
        }
        let s = tonic::Status::from(CoordinatorError::Unavailable("x".into()));
        assert_eq!(s.code(), tonic::Code::Unavailable);
    }
}
