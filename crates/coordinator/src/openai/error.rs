//! OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}` with the HTTP status
//! OpenAI's clients act on (400 bad request, 401 bad key, 404 unknown model, 429 retry later,
//! 503 no serving plan). Every failure of the HTTP API goes through [`ApiError`], including
//! gRPC statuses of the Inference service, mapped once here.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::services::auth::Refusal;

/// Seconds a client is told to wait before retrying after a 429 or 503.
pub const RETRY_AFTER_SECS: u64 = 1;

/// An error of the HTTP API.
#[derive(Clone, Debug, PartialEq)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// OpenAI's `type` (`invalid_request_error`, `rate_limit_error`, …).
    pub kind: &'static str,
    /// The request field at fault, in OpenAI's spelling (`temperature`, `messages[1].content`).
    pub param: Option<String>,
    /// OpenAI's `code` (`invalid_api_key`, `model_not_found`, …).
    pub code: Option<&'static str>,
    /// What went wrong, starting with the field's name when one is at fault.
    pub message: String,
}

impl ApiError {
    /// 400 on `param`: the message is `"{param}: {reason}"`, as the gRPC API words it.
    pub fn invalid(param: impl Into<String>, reason: impl std::fmt::Display) -> Self {
        let param = param.into();
        Self {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            message: format!("{param}: {reason}"),
            param: Some(param),
            code: None,
        }
    }

    /// 404 for a model this cluster does not serve.
    pub fn model_not_found(model: &str, served: &str) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            kind: "invalid_request_error",
            param: Some("model".into()),
            code: Some("model_not_found"),
            message: format!(
                "model: unknown model `{}`; this cluster serves `{served}`",
                crate::error::clip(model, 64)
            ),
        }
    }

    /// 401 for a missing or wrong API key.
    pub fn unauthorized(refusal: Refusal) -> Self {
        Self {
            status: StatusCode::UNAUTHORIZED,
            kind: "invalid_request_error",
            param: None,
            code: Some("invalid_api_key"),
            message: refusal.message().into(),
        }
    }

    /// The error for a gRPC status of the Inference service. INVALID_ARGUMENT messages start
    /// with the field's proto path (`sampling.top_p: …`); the `param` is its OpenAI name.
    pub fn from_status(status: &tonic::Status, endpoint: Endpoint) -> Self {
        use tonic::Code;
        let message = status.message().to_owned();
        let (http, kind, code) = match status.code() {
            Code::InvalidArgument | Code::OutOfRange => {
                let (param, reason) = match message.split_once(": ") {
                    Some((path, reason)) if !path.contains(' ') => {
                        (openai_param(path, endpoint), reason.to_owned())
                    }
                    _ => (None, message.clone()),
                };
                return match param {
                    Some(p) => Self::invalid(p, reason),
                    None => Self {
                        status: StatusCode::BAD_REQUEST,
                        kind: "invalid_request_error",
                        param: None,
                        code: None,
                        message,
                    },
                };
            }
            Code::Unauthenticated => (
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                Some("invalid_api_key"),
            ),
            Code::PermissionDenied => (StatusCode::FORBIDDEN, "permission_error", None),
            Code::NotFound => (StatusCode::NOT_FOUND, "invalid_request_error", None),
            Code::ResourceExhausted => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                Some("rate_limit_exceeded"),
            ),
            Code::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "server_error", None),
            Code::DeadlineExceeded => (StatusCode::GATEWAY_TIMEOUT, "timeout_error", None),
            Code::Cancelled => (
                StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
                "cancelled",
                None,
            ),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "server_error", None),
        };
        Self {
            status: http,
            kind,
            param: None,
            code,
            message,
        }
    }

    /// The JSON body, also what a stream carries as its last `data:` event on failure.
    pub fn body(&self) -> serde_json::Value {
        json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let retry = matches!(
            self.status,
            StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE
        );
        let mut response = (self.status, super::json_body(&self.body())).into_response();
        if retry {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
        }
        response
    }
}

/// Which OpenAI endpoint a request came through: field names differ between them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// `/v1/chat/completions` (the prompt is `messages`).
    Chat,
    /// `/v1/completions` (the prompt is `prompt`).
    Completions,
}

/// The OpenAI name of a proto field path, `None` when it has none.
fn openai_param(path: &str, endpoint: Endpoint) -> Option<String> {
    let prompt = match endpoint {
        Endpoint::Chat => "messages",
        Endpoint::Completions => "prompt",
    };
    let name = match path {
        "prompt" | "chat.messages" => prompt,
        "stop.max_tokens" => "max_tokens",
        "stop.stop" => "stop",
        "stop.stop_token_ids" => "stop_token_ids",
        "stop.ignore_eos" => "ignore_eos",
        "top_logprobs" | "logprobs" | "model" => path,
        p => p.strip_prefix("sampling.")?,
    };
    Some(name.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ensures that each gRPC status maps to the HTTP status and OpenAI `type` clients act on,
    /// and that INVALID_ARGUMENT names the field in OpenAI's spelling.
    #[test]
    fn statuses_map_to_openai_errors() {
        use tonic::Status;
        let table = [
            (
                Status::invalid_argument("sampling.top_p: must be in (0, 1]"),
                Endpoint::Chat,
                400,
                Some("top_p"),
                "top_p: must be in (0, 1]",
            ),
            (
                Status::invalid_argument("stop.max_tokens: too many"),
                Endpoint::Completions,
                400,
                Some("max_tokens"),
                "max_tokens: too many",
            ),
            (
                Status::invalid_argument("chat.messages: bad role"),
                Endpoint::Chat,
                400,
                Some("messages"),
                "messages: bad role",
            ),
            (
                Status::invalid_argument("prompt: too long"),
                Endpoint::Completions,
                400,
                Some("prompt"),
                "prompt: too long",
            ),
            (
                Status::invalid_argument("something odd happened"),
                Endpoint::Chat,
                400,
                None,
                "something odd happened",
            ),
            (
                Status::unauthenticated("no key"),
                Endpoint::Chat,
                401,
                None,
                "no key",
            ),
            (
                Status::resource_exhausted("queue full"),
                Endpoint::Chat,
                429,
                None,
                "queue full",
            ),
            (
                Status::unavailable("no plan"),
                Endpoint::Chat,
                503,
                None,
                "no plan",
            ),
            (
                Status::deadline_exceeded("late"),
                Endpoint::Chat,
                504,
                None,
                "late",
            ),
            (Status::internal("bug"), Endpoint::Chat, 500, None, "bug"),
        ];
        for (status, endpoint, http, param, message) in table {
            let e = ApiError::from_status(&status, endpoint);
            assert_eq!(e.status.as_u16(), http, "{status:?}");
            assert_eq!(e.param.as_deref(), param, "{status:?}");
            assert_eq!(e.message, message, "{status:?}");
        }
    }

    /// Ensures that the body has OpenAI's shape and that 429 and 503 carry a Retry-After.
    #[test]
    fn body_shape_and_retry_hint() {
        let e = ApiError::invalid("temperature", "must be in [0, 2]");
        assert_eq!(
            e.body(),
            json!({"error": {"message": "temperature: must be in [0, 2]",
                "type": "invalid_request_error", "param": "temperature", "code": null}})
        );
        assert!(
            e.into_response()
                .headers()
                .get(header::RETRY_AFTER)
                .is_none()
        );
        let busy =
            ApiError::from_status(&tonic::Status::resource_exhausted("full"), Endpoint::Chat);
        let response = busy.into_response();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[header::RETRY_AFTER], "1");
    }
}
