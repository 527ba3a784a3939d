//! The request targets: what a client sends to the public gRPC API and to the OpenAI HTTP
//! API, validated as the coordinator validates it against SmolLM2.

use std::time::Instant;

use prost::Message as _;
use tessera_coordinator::error::MAX_STATUS_MESSAGE;
use tessera_coordinator::openai::{self, Endpoint};
use tessera_proto::v1 as pb;

use crate::model::{MODEL, validator};

/// Bytes an error's message may add around the clipped text (the status code's own words).
const STATUS_SLACK: usize = 64;

/// A `GenerateRequest` as `tessera.v1.Inference/Generate` receives it: decoded, then checked
/// and validated.
///
/// Asserts: a refusal's message stays bounded whatever the request held; an accepted request
/// fits the context (its prompt and `max_tokens` together) and has a prompt.
pub fn generate_request(data: &[u8]) {
    let Ok(req) = pb::GenerateRequest::decode(data) else {
        return;
    };
    validate(req);
}

/// A body of `/v1/chat/completions` (first byte even) or `/v1/completions` (odd): parsed, and
/// every choice it asks for validated as [`generate_request`] does.
///
/// Asserts: a refusal's OpenAI error body is JSON with a bounded message.
pub fn openai(data: &[u8]) {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    let endpoint = if which & 1 == 0 {
        Endpoint::Chat
    } else {
        Endpoint::Completions
    };
    match openai::parse(endpoint, body, MODEL) {
        Ok(valid) => {
            assert!(
                valid.choices.len() <= openai::MAX_CHOICES as usize,
                "choices are bounded"
            );
            for req in valid.choices {
                validate(req);
            }
        }
        Err(e) => {
            let body = e.body();
            let text = serde_json::to_string(&body).expect("an error body serialises");
            assert!(
                text.len() <= 2 * MAX_STATUS_MESSAGE + STATUS_SLACK * 4,
                "an error body is bounded: {} bytes",
                text.len()
            );
        }
    }
}

/// Validates one request as the coordinator's API does (`validate` runs the size check
/// first).
fn validate(req: pb::GenerateRequest) {
    let v = validator();
    match v.validate(req, Instant::now()) {
        Ok(valid) => {
            assert!(!valid.inner.prompt_ids.is_empty(), "a prompt has tokens");
            assert!(
                valid.max_len() <= v.context(),
                "an accepted request fits the context"
            );
        }
        Err(e) => {
            let status = tonic::Status::from(e);
            assert!(
                status.message().len() <= MAX_STATUS_MESSAGE + STATUS_SLACK,
                "a refusal's message is bounded: {} bytes",
                status.message().len()
            );
        }
    }
}
