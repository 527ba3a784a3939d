//! `POST /v1/embeddings` in OpenAI's shape, over `tessera.v1.Inference/Embed`.
//!
//! Request: `model` (the served one; may be omitted), `input` — a string, an array of
//! strings, an array of token ids, or an array of arrays of token ids —, `encoding_format`
//! (`"float"`, the default, or `"base64"`: the little-endian f32 bytes, as OpenAI sends
//! them), `dimensions` (accepted only as the model's own width: this model has no shorter
//! embeddings), `user` (ignored). Other fields are refused by name, so a typo is not
//! silently ignored. Response: `{"object": "list", "data": [{"object": "embedding",
//! "index", "embedding"}], "model", "usage": {"prompt_tokens", "total_tokens"}}`.
//!
//! Validation is the gRPC API's: errors name the OpenAI field (`input`, `model`).

use axum::body::Body as HttpBody;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use base64::Engine as _;
use serde_json::{Value, json};
use std::sync::Arc;
use tessera_proto::v1 as pb;
use tessera_proto::v1::inference_server::Inference as _;
use tracing::Instrument as _;

use super::error::{ApiError, Endpoint};
use super::{OpenAi, either, json_body};

/// How the vectors are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Encoding {
    Float,
    Base64,
}

/// A parsed `/v1/embeddings` body.
#[derive(Debug, PartialEq)]
struct EmbeddingsRequest {
    model: String,
    inputs: Vec<pb::EmbedInput>,
    encoding: Encoding,
    dimensions: Option<u64>,
}

/// One element of `input` as text or ids.
fn text(t: &str) -> pb::EmbedInput {
    pb::EmbedInput {
        input: Some(pb::embed_input::Input::Text(t.to_owned())),
    }
}

fn ids(list: &[Value]) -> Option<pb::EmbedInput> {
    let ids = list
        .iter()
        .map(|v| v.as_u64().and_then(|i| u32::try_from(i).ok()))
        .collect::<Option<Vec<u32>>>()?;
    Some(pb::EmbedInput {
        input: Some(pb::embed_input::Input::Ids(pb::TokenIds { ids })),
    })
}

/// Parses the body.
fn parse(body: &[u8]) -> Result<EmbeddingsRequest, ApiError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid("body", format!("not valid JSON: {e}")))?;
    let obj = v
        .as_object()
        .ok_or_else(|| ApiError::invalid("body", "must be a JSON object"))?;
    if let Some(k) = obj.keys().find(|k| {
        !matches!(
            k.as_str(),
            "model" | "input" | "encoding_format" | "dimensions" | "user"
        )
    }) {
        return Err(ApiError::invalid(k.clone(), "unknown field"));
    }
    let model = match obj.get("model") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(m)) => m.clone(),
        Some(_) => return Err(ApiError::invalid("model", "must be a string")),
    };
    let bad_input = || {
        ApiError::invalid(
            "input",
            "must be a string, an array of strings, an array of token ids, or an array of \
             arrays of token ids",
        )
    };
    let inputs = match obj.get("input") {
        None | Some(Value::Null) => return Err(ApiError::invalid("input", "required")),
        Some(Value::String(s)) => vec![text(s)],
        Some(Value::Array(items)) if items.is_empty() => {
            return Err(ApiError::invalid("input", "an empty array embeds nothing"));
        }
        Some(Value::Array(items)) => match &items[0] {
            Value::String(_) => items
                .iter()
                .map(|i| i.as_str().map(text))
                .collect::<Option<_>>()
                .ok_or_else(bad_input)?,
            Value::Number(_) => vec![ids(items).ok_or_else(bad_input)?],
            Value::Array(_) => items
                .iter()
                .map(|i| i.as_array().and_then(|a| ids(a)))
                .collect::<Option<_>>()
                .ok_or_else(bad_input)?,
            _ => return Err(bad_input()),
        },
        Some(_) => return Err(bad_input()),
    };
    let encoding = match obj.get("encoding_format").and_then(Value::as_str) {
        None if obj.get("encoding_format").is_none_or(Value::is_null) => Encoding::Float,
        Some("float") => Encoding::Float,
        Some("base64") => Encoding::Base64,
        _ => {
            return Err(ApiError::invalid(
                "encoding_format",
                "must be \"float\" or \"base64\"",
            ));
        }
    };
    let dimensions = match obj.get("dimensions") {
        None | Some(Value::Null) => None,
        Some(d) => Some(
            d.as_u64()
                .ok_or_else(|| ApiError::invalid("dimensions", "must be a positive integer"))?,
        ),
    };
    Ok(EmbeddingsRequest {
        model,
        inputs,
        encoding,
        dimensions,
    })
}

/// The HTTP error for an Embed failure: field paths become OpenAI's names.
fn embed_error(status: &tonic::Status) -> ApiError {
    if status.code() == tonic::Code::InvalidArgument
        && let Some((path, reason)) = status.message().split_once(": ")
    {
        if path.starts_with("inputs") {
            return ApiError::invalid("input", format!("{path}: {reason}"));
        }
        if path == "model" {
            return ApiError::invalid("model", reason);
        }
    }
    ApiError::from_status(status, Endpoint::Completions)
}

impl OpenAi {
    async fn embeddings(&self, headers: HeaderMap, body: HttpBody) -> Result<Response, ApiError> {
        self.authorize(&headers)?;
        let bytes = self.read_body(body).await?;
        let req = parse(&bytes)?;
        let span = tracing::info_span!("openai_embeddings", inputs = req.inputs.len());
        let resp = self
            .api
            .embed(tonic::Request::new(pb::EmbedRequest {
                model: req.model,
                inputs: req.inputs,
            }))
            .instrument(span)
            .await
            .map_err(|s| embed_error(&s))?
            .into_inner();
        let width = resp.embeddings.first().map_or(0, |e| e.values.len());
        if let Some(d) = req.dimensions
            && d != width as u64
        {
            return Err(ApiError::invalid(
                "dimensions",
                format!("this model's embeddings have {width} dimensions and cannot be shortened"),
            ));
        }
        let data: Vec<Value> = resp
            .embeddings
            .iter()
            .map(|e| {
                let embedding = match req.encoding {
                    Encoding::Float => json!(e.values),
                    Encoding::Base64 => {
                        let bytes: Vec<u8> =
                            e.values.iter().flat_map(|v| v.to_le_bytes()).collect();
                        json!(base64::engine::general_purpose::STANDARD.encode(bytes))
                    }
                };
                json!({"object": "embedding", "index": e.index, "embedding": embedding})
            })
            .collect();
        Ok(json_body(&json!({
            "object": "list",
            "data": data,
            "model": resp.model,
            "usage": {"prompt_tokens": resp.prompt_tokens, "total_tokens": resp.prompt_tokens},
        })))
    }
}

/// The route's handler.
pub(super) async fn embeddings(
    State(s): State<Arc<OpenAi>>,
    headers: HeaderMap,
    body: HttpBody,
) -> Response {
    either(s.embeddings(headers, body).await)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ensures that every shape of `input` OpenAI accepts parses, and that bad shapes,
    /// unknown fields and bad formats are refused naming the field.
    #[test]
    fn parses_openai_inputs_and_names_bad_fields() {
        let ok = |body: Value| parse(body.to_string().as_bytes()).expect("valid");
        assert_eq!(ok(json!({"input": "hi"})).inputs, vec![text("hi")]);
        assert_eq!(
            ok(json!({"model": "m", "input": ["a", "b"]})).inputs,
            vec![text("a"), text("b")]
        );
        let one = ok(json!({"input": [101, 7592, 102], "encoding_format": "base64"}));
        assert_eq!(one.inputs.len(), 1);
        assert_eq!(one.encoding, Encoding::Base64);
        assert_eq!(
            ok(json!({"input": [[101, 102], [101, 7, 102]]}))
                .inputs
                .len(),
            2
        );
        assert_eq!(
            ok(json!({"input": "x", "dimensions": 384})).dimensions,
            Some(384)
        );
        let cases = [
            (json!({}), "input"),
            (json!({"input": []}), "input"),
            (json!({"input": [1, "a"]}), "input"),
            (json!({"input": [-1]}), "input"),
            (json!({"input": {"a": 1}}), "input"),
            (json!({"input": "x", "model": 3}), "model"),
            (
                json!({"input": "x", "encoding_format": "int8"}),
                "encoding_format",
            ),
            (json!({"input": "x", "dimensions": "all"}), "dimensions"),
            (json!({"input": "x", "temperature": 1}), "temperature"),
        ];
        for (body, param) in cases {
            let e = parse(body.to_string().as_bytes()).expect_err(param);
            assert_eq!(e.param.as_deref(), Some(param), "{body}: {}", e.message);
        }
    }
}
