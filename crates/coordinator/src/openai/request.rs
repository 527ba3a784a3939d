//! OpenAI request bodies → the public API's `GenerateRequest`s, validated once.
//!
//! Bodies are read field by field from JSON (not derived), so every error names the field in
//! OpenAI's spelling (`temperature: expected a number`, `messages[2].content[0].type: …`), and
//! fields that would change the answer but are not implemented (tools, `logit_bias`, `echo`,
//! JSON response formats) are refused rather than silently ignored. Unknown fields are ignored,
//! as OpenAI's own server does. Ranges the engine checks (top_p, penalties, stop strings, the
//! context) are left to the gRPC path's validation, so both APIs accept exactly the same.
//!
//! Accepted beyond OpenAI's fields, as vLLM does: `top_k`, `min_p`, `repetition_penalty`,
//! `ignore_eos`, `stop_token_ids`, `return_token_ids` (each choice of a response or chunk
//! carries `token_ids`, the ids of the tokens whose text it carries). Ours: `resume`, which
//! continues a stream broken by a coordinator's death (see [`ValidCompletion::resume_id`]).

use serde_json::{Map, Value};
use tessera_proto::v1 as pb;

use super::error::{ApiError, Endpoint};
use super::resume;

/// The most choices one request may ask for (`n`, and prompts × `n` for completions): each
/// is a full sequence with its own KV reservation.
pub const MAX_CHOICES: u32 = 16;
/// `max_tokens` of `/v1/completions` when absent (OpenAI's default there).
pub const COMPLETIONS_DEFAULT_MAX_TOKENS: u32 = 16;
/// OpenAI's range for `temperature`.
const MAX_TEMPERATURE: f32 = 2.0;
/// The most alternatives the legacy completions `logprobs` integer may ask for (OpenAI's).
const MAX_COMPLETION_LOGPROBS: u64 = 5;

/// A request of either endpoint, validated: one `GenerateRequest` per choice.
#[derive(Clone, Debug)]
pub struct ValidCompletion {
    /// Which endpoint it came through (shapes the response).
    pub endpoint: Endpoint,
    /// Stream as server-sent events.
    pub stream: bool,
    /// Send a last chunk with the usage of the whole request (`stream_options.include_usage`).
    pub include_usage: bool,
    /// Log-probabilities asked for, with this many alternatives per token.
    pub logprobs: Option<u32>,
    /// Choices per prompt.
    pub n: u32,
    /// The request's `seed`; choice `i` of each prompt samples with `seed + i`. Without one,
    /// the server draws it and names it in the `x-tessera-seed` response header.
    pub seed: Option<u64>,
    /// `return_token_ids`: every choice carries the ids of its tokens.
    pub token_ids: bool,
    /// `resume.id`: the id of the response this request continues (`x-request-id`, also each
    /// chunk's `id`). A client whose stream broke mid-answer sends the same body again with
    /// `seed` set to the first response's `x-tessera-seed` and `resume: {"id": …,
    /// "token_ids": [[…], …]}` (per choice, the ids it received, from `return_token_ids`);
    /// the stream then carries the tokens that follow, exactly those the broken one would have.
    pub resume_id: Option<String>,
    /// One request per choice, in choice order (prompt-major for several prompts).
    pub choices: Vec<pb::GenerateRequest>,
}

impl ValidCompletion {
    /// Seeds every choice from `seed`: choice `i` of each prompt samples with `seed + i`, so
    /// the same request gives the same choices, and the choices differ from one another.
    #[must_use]
    pub fn seeded(mut self, seed: u64) -> Self {
        let n = self.n.max(1) as usize;
        for (k, req) in self.choices.iter_mut().enumerate() {
            if let Some(s) = req.sampling.as_mut() {
                s.seed = Some(seed.wrapping_add((k % n) as u64));
            }
        }
        self.seed = Some(seed);
        self
    }

    /// [`ValidCompletion::seeded`] when the body named a seed.
    fn seeded_if(self, seed: Option<u64>) -> Self {
        match seed {
            Some(seed) => self.seeded(seed),
            None => self,
        }
    }
}

/// A JSON object body, read field by field.
pub struct Body(Map<String, Value>);

impl Body {
    /// Parses a request body.
    ///
    /// # Errors
    /// 400 when it is not a JSON object.
    pub fn parse(bytes: &[u8]) -> Result<Self, ApiError> {
        match serde_json::from_slice::<Value>(bytes) {
            Ok(Value::Object(map)) => Ok(Self(map)),
            Ok(_) => Err(ApiError::invalid("body", "must be a JSON object")),
            Err(e) => Err(ApiError::invalid("body", format!("not valid JSON: {e}"))),
        }
    }

    /// A field's value; JSON `null` counts as absent (OpenAI's SDKs send nulls).
    pub(super) fn get(&self, key: &str) -> Option<&Value> {
        self.0.get(key).filter(|v| !v.is_null())
    }

    fn bool(&self, key: &str) -> Result<Option<bool>, ApiError> {
        self.get(key)
            .map(|v| {
                v.as_bool()
                    .ok_or_else(|| ApiError::invalid(key, "expected true or false"))
            })
            .transpose()
    }

    fn f32(&self, key: &str) -> Result<Option<f32>, ApiError> {
        self.get(key)
            .map(|v| {
                v.as_f64()
                    .map(|f| f as f32)
                    .ok_or_else(|| ApiError::invalid(key, "expected a number"))
            })
            .transpose()
    }

    fn u64(&self, key: &str) -> Result<Option<u64>, ApiError> {
        self.get(key)
            .map(|v| {
                v.as_u64()
                    .ok_or_else(|| ApiError::invalid(key, "expected a non-negative integer"))
            })
            .transpose()
    }

    fn u32(&self, key: &str) -> Result<Option<u32>, ApiError> {
        self.u64(key)?
            .map(|n| u32::try_from(n).map_err(|_| ApiError::invalid(key, "too large")))
            .transpose()
    }

    fn str(&self, key: &str) -> Result<Option<&str>, ApiError> {
        self.get(key)
            .map(|v| {
                v.as_str()
                    .ok_or_else(|| ApiError::invalid(key, "expected a string"))
            })
            .transpose()
    }

    /// Refuses `key` unless absent or `allowed(value)`.
    fn refuse_unless(
        &self,
        key: &str,
        allowed: impl Fn(&Value) -> bool,
        why: &str,
    ) -> Result<(), ApiError> {
        match self.get(key) {
            Some(v) if !allowed(v) => Err(ApiError::invalid(key, why)),
            _ => Ok(()),
        }
    }

    /// `model`: absent or empty means the served model; another name is a 404.
    fn model(&self, served: &str) -> Result<String, ApiError> {
        match self.str("model")? {
            None | Some("") => Ok(served.to_owned()),
            Some(m) if m == served => Ok(served.to_owned()),
            Some(m) => Err(ApiError::model_not_found(m, served)),
        }
    }

    /// `stop`: a string or an array of strings.
    fn stop(&self) -> Result<Vec<String>, ApiError> {
        match self.get("stop") {
            None => Ok(Vec::new()),
            Some(Value::String(s)) => Ok(vec![s.clone()]),
            Some(Value::Array(items)) => items
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    v.as_str()
                        .map(str::to_owned)
                        .ok_or_else(|| ApiError::invalid(format!("stop[{i}]"), "expected a string"))
                })
                .collect(),
            Some(_) => Err(ApiError::invalid(
                "stop",
                "expected a string or an array of strings",
            )),
        }
    }

    /// `seed`: any integer (negative ones are taken as their two's complement).
    fn seed(&self) -> Result<Option<u64>, ApiError> {
        self.get("seed")
            .map(|v| {
                v.as_u64()
                    .or_else(|| v.as_i64().map(|i| i as u64))
                    .ok_or_else(|| ApiError::invalid("seed", "expected an integer"))
            })
            .transpose()
    }

    fn stop_token_ids(&self) -> Result<Vec<u32>, ApiError> {
        match self.get("stop_token_ids") {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    v.as_u64()
                        .and_then(|n| u32::try_from(n).ok())
                        .ok_or_else(|| {
                            ApiError::invalid(format!("stop_token_ids[{i}]"), "expected a token id")
                        })
                })
                .collect(),
            Some(_) => Err(ApiError::invalid(
                "stop_token_ids",
                "expected an array of token ids",
            )),
        }
    }

    /// What both endpoints share: sampling, stopping, `n`, streaming.
    fn common(&self, default_max_tokens: Option<u32>) -> Result<Common, ApiError> {
        self.refuse_unless(
            "logit_bias",
            |v| v.as_object().is_some_and(Map::is_empty),
            "not supported by this server",
        )?;
        let temperature = self.f32("temperature")?;
        if let Some(t) = temperature
            && !(0.0..=MAX_TEMPERATURE).contains(&t)
        {
            return Err(ApiError::invalid(
                "temperature",
                format!("must be in [0, {MAX_TEMPERATURE}], got {t}"),
            ));
        }
        let n = self.u32("n")?.unwrap_or(1);
        if !(1..=MAX_CHOICES).contains(&n) {
            return Err(ApiError::invalid(
                "n",
                format!("must be in [1, {MAX_CHOICES}], got {n}"),
            ));
        }
        let stream = self.bool("stream")?.unwrap_or(false);
        let include_usage = match self.get("stream_options") {
            None => false,
            Some(_) if !stream => {
                return Err(ApiError::invalid(
                    "stream_options",
                    "only allowed when stream is true",
                ));
            }
            Some(Value::Object(o)) => match o.get("include_usage") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(_) => {
                    return Err(ApiError::invalid(
                        "stream_options.include_usage",
                        "expected true or false",
                    ));
                }
            },
            Some(_) => return Err(ApiError::invalid("stream_options", "expected an object")),
        };
        Ok(Common {
            n,
            stream,
            include_usage,
            token_ids: self.bool("return_token_ids")?.unwrap_or(false),
            sampling: pb::SamplingParams {
                temperature,
                top_k: self.u32("top_k")?.unwrap_or(0),
                top_p: self.f32("top_p")?,
                min_p: self.f32("min_p")?.unwrap_or(0.0),
                repetition_penalty: self.f32("repetition_penalty")?,
                frequency_penalty: self.f32("frequency_penalty")?.unwrap_or(0.0),
                presence_penalty: self.f32("presence_penalty")?.unwrap_or(0.0),
                seed: self.seed()?,
            },
            stop: pb::StopConditions {
                max_tokens: self.u32("max_tokens")?.or(default_max_tokens),
                stop: self.stop()?,
                stop_token_ids: self.stop_token_ids()?,
                ignore_eos: self.bool("ignore_eos")?.unwrap_or(false),
            },
        })
    }
}

/// The fields both endpoints share.
struct Common {
    n: u32,
    stream: bool,
    include_usage: bool,
    token_ids: bool,
    sampling: pb::SamplingParams,
    stop: pb::StopConditions,
}

impl Common {
    /// `n` requests for one prompt, unseeded ([`ValidCompletion::seeded`] seeds them).
    fn requests(
        &self,
        model: &str,
        prompt: &pb::generate_request::Prompt,
        logprobs: Option<u32>,
    ) -> impl Iterator<Item = pb::GenerateRequest> {
        (0..self.n).map(move |_| pb::GenerateRequest {
            request_id: String::new(),
            model: model.to_owned(),
            prompt: Some(prompt.clone()),
            sampling: Some(pb::SamplingParams {
                seed: None,
                ..self.sampling
            }),
            stop: Some(self.stop.clone()),
            logprobs: logprobs.is_some(),
            top_logprobs: logprobs.unwrap_or(0),
            // Set by `ValidCompletion::resumed` for a `resume` body.
            resume: None,
        })
    }
}

/// Parses and validates a body of `endpoint` for the model `served`: what the HTTP routes do
/// with the bytes they receive.
///
/// # Errors
/// 400 naming the field (or `body` when it is not a JSON object); 404 for another model.
pub fn parse(endpoint: Endpoint, bytes: &[u8], served: &str) -> Result<ValidCompletion, ApiError> {
    let body = Body::parse(bytes)?;
    match endpoint {
        Endpoint::Chat => chat(&body, served),
        Endpoint::Completions => completions(&body, served),
    }
}

/// Validates a `/v1/chat/completions` body for the model `served`.
///
/// # Errors
/// 400 naming the field; 404 for another model.
pub fn chat(body: &Body, served: &str) -> Result<ValidCompletion, ApiError> {
    let model = body.model(served)?;
    for key in ["tools", "functions", "function_call"] {
        body.refuse_unless(
            key,
            |v| v.as_array().is_some_and(Vec::is_empty),
            "tool calling is not supported by this server",
        )?;
    }
    body.refuse_unless(
        "tool_choice",
        |v| v == "none",
        "tool calling is not supported by this server",
    )?;
    body.refuse_unless(
        "response_format",
        |v| v.get("type").and_then(Value::as_str) == Some("text"),
        "only {\"type\": \"text\"} is supported by this server",
    )?;
    let messages = messages(body)?;
    let mut common = body.common(None)?;
    if let Some(m) = body.u32("max_completion_tokens")? {
        common.stop.max_tokens = Some(m);
    }
    let top = body.u32("top_logprobs")?;
    let logprobs = match (body.bool("logprobs")?.unwrap_or(false), top) {
        (true, top) => Some(top.unwrap_or(0)),
        (false, Some(t)) if t > 0 => {
            return Err(ApiError::invalid(
                "top_logprobs",
                "requires logprobs to be true",
            ));
        }
        (false, _) => None,
    };
    let prompt = pb::generate_request::Prompt::Chat(pb::ChatMessages { messages });
    ValidCompletion {
        endpoint: Endpoint::Chat,
        stream: common.stream,
        include_usage: common.include_usage,
        logprobs,
        n: common.n,
        seed: None,
        token_ids: common.token_ids,
        resume_id: None,
        choices: common.requests(&model, &prompt, logprobs).collect(),
    }
    .seeded_if(common.sampling.seed)
    .resumed(resume::parse(body, Endpoint::Chat)?)
}

/// `messages`: a non-empty array of `{role, content}`, content a string or text parts.
fn messages(body: &Body) -> Result<Vec<pb::ChatMessage>, ApiError> {
    let items = match body.get("messages") {
        Some(Value::Array(items)) if !items.is_empty() => items,
        Some(Value::Array(_)) => return Err(ApiError::invalid("messages", "must not be empty")),
        Some(_) => {
            return Err(ApiError::invalid(
                "messages",
                "expected an array of messages",
            ));
        }
        None => return Err(ApiError::invalid("messages", "required")),
    };
    items
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let at = |field: &str| format!("messages[{i}].{field}");
            let Some(m) = m.as_object() else {
                return Err(ApiError::invalid(
                    format!("messages[{i}]"),
                    "expected an object",
                ));
            };
            let role = m
                .get("role")
                .and_then(Value::as_str)
                .ok_or_else(|| ApiError::invalid(at("role"), "required: a string"))?;
            if m.get("tool_calls").is_some_and(|v| !v.is_null()) {
                return Err(ApiError::invalid(
                    at("tool_calls"),
                    "tool calling is not supported by this server",
                ));
            }
            let content = match m.get("content") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(parts)) => text_parts(parts, &at("content"))?,
                Some(Value::Null) | None => {
                    return Err(ApiError::invalid(
                        at("content"),
                        "required: a string or text parts",
                    ));
                }
                Some(_) => {
                    return Err(ApiError::invalid(
                        at("content"),
                        "expected a string or an array of parts",
                    ));
                }
            };
            Ok(pb::ChatMessage {
                role: role.to_owned(),
                content,
            })
        })
        .collect()
}

/// The text of content parts (`[{"type": "text", "text": …}]`), concatenated.
fn text_parts(parts: &[Value], at: &str) -> Result<String, ApiError> {
    let mut text = String::new();
    for (j, part) in parts.iter().enumerate() {
        match (
            part.get("type").and_then(Value::as_str),
            part.get("text").and_then(Value::as_str),
        ) {
            (Some("text"), Some(t)) => text.push_str(t),
            (Some("text"), None) => {
                return Err(ApiError::invalid(
                    format!("{at}[{j}].text"),
                    "required: a string",
                ));
            }
            (Some(other), _) => {
                return Err(ApiError::invalid(
                    format!("{at}[{j}].type"),
                    format!(
                        "only \"text\" parts are supported by this server, got {:?}",
                        crate::error::clip(other, 64)
                    ),
                ));
            }
            (None, _) => return Err(ApiError::invalid(format!("{at}[{j}].type"), "required")),
        }
    }
    Ok(text)
}

/// Validates a `/v1/completions` body for the model `served`.
///
/// # Errors
/// 400 naming the field; 404 for another model.
pub fn completions(body: &Body, served: &str) -> Result<ValidCompletion, ApiError> {
    let model = body.model(served)?;
    body.refuse_unless(
        "echo",
        |v| v == false,
        "echo is not supported by this server",
    )?;
    body.refuse_unless(
        "suffix",
        |v| v == "",
        "suffix is not supported by this server",
    )?;
    let prompts: Vec<String> = match body.get("prompt") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) if !items.is_empty() => items
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_str().map(str::to_owned).ok_or_else(|| {
                    ApiError::invalid(
                        format!("prompt[{i}]"),
                        "expected a string (token-id prompts are not supported by this server)",
                    )
                })
            })
            .collect::<Result<_, _>>()?,
        Some(Value::Array(_)) => return Err(ApiError::invalid("prompt", "must not be empty")),
        Some(_) => {
            return Err(ApiError::invalid(
                "prompt",
                "expected a string or an array of strings",
            ));
        }
        None => return Err(ApiError::invalid("prompt", "required")),
    };
    let common = body.common(Some(COMPLETIONS_DEFAULT_MAX_TOKENS))?;
    if let Some(best_of) = body.u32("best_of")?
        && best_of != common.n
    {
        return Err(ApiError::invalid(
            "best_of",
            "only best_of equal to n is supported by this server",
        ));
    }
    let total = prompts.len() as u64 * u64::from(common.n);
    if total > u64::from(MAX_CHOICES) {
        return Err(ApiError::invalid(
            "prompt",
            format!(
                "{} prompts × n={} is {total} choices; at most {MAX_CHOICES}",
                prompts.len(),
                common.n
            ),
        ));
    }
    let logprobs = match body.u64("logprobs")? {
        Some(k) if k > MAX_COMPLETION_LOGPROBS => {
            return Err(ApiError::invalid(
                "logprobs",
                format!("must be in [0, {MAX_COMPLETION_LOGPROBS}], got {k}"),
            ));
        }
        Some(k) => Some(k as u32),
        None => None,
    };
    let choices = prompts
        .into_iter()
        .flat_map(|p| {
            let prompt = pb::generate_request::Prompt::Text(p);
            common
                .requests(&model, &prompt, logprobs)
                .collect::<Vec<_>>()
        })
        .collect();
    ValidCompletion {
        endpoint: Endpoint::Completions,
        stream: common.stream,
        include_usage: common.include_usage,
        logprobs,
        n: common.n,
        seed: None,
        token_ids: common.token_ids,
        resume_id: None,
        choices,
    }
    .seeded_if(common.sampling.seed)
    .resumed(resume::parse(body, Endpoint::Completions)?)
}

#[cfg(test)]
#[path = "request_tests.rs"]
mod tests;
