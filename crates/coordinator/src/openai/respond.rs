//! Generate streams → OpenAI responses: a whole `chat.completion` / `text_completion` object,
//! or server-sent `…chunk` events ending in `data: [DONE]`.
//!
//! The choices of one request are separate generate streams, merged with a [`StreamMap`]
//! keyed by choice index. Cancellation follows the client: a non-streaming handler dropped
//! by a closed connection drops the streams, and a streaming body that is dropped ends the
//! relay task at its next send — or at once, since it also waits on the body's closing — and
//! each dropped stream cancels its request in the scheduler (the KV is freed on the next step).

use std::convert::Infallible;

use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse as _, Response};
use serde_json::{Value, json};
use tessera_proto::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{StreamExt as _, StreamMap};

use super::error::{ApiError, Endpoint};
use super::request::ValidCompletion;
use crate::scheduler::EventResult;

/// What the choices' streams are.
pub type Choices = StreamMap<usize, tokio_stream::wrappers::UnboundedReceiverStream<EventResult>>;

/// The envelope every response and chunk of one request shares.
#[derive(Clone, Debug)]
pub struct Envelope {
    /// `chatcmpl-…` / `cmpl-…`.
    pub id: String,
    /// Unix seconds.
    pub created: u64,
    /// The served model's name.
    pub model: String,
    /// Chat or completions.
    pub endpoint: Endpoint,
    /// Log-probabilities asked for (and how many alternatives).
    pub logprobs: Option<u32>,
    /// Choices per prompt (`n`): usage counts each prompt once.
    pub n: usize,
    /// Send the usage chunk at the end of a stream.
    pub include_usage: bool,
    /// Each choice carries `token_ids` (`return_token_ids`).
    pub token_ids: bool,
}

impl Envelope {
    /// The envelope of `valid`: the id of the response it resumes, or a fresh one.
    pub fn new(valid: &ValidCompletion, model: &str, id_seed: u64) -> Self {
        let prefix = match valid.endpoint {
            Endpoint::Chat => "chatcmpl",
            Endpoint::Completions => "cmpl",
        };
        Self {
            id: valid
                .resume_id
                .clone()
                .unwrap_or_else(|| format!("{prefix}-{id_seed:016x}")),
            created: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            model: model.to_owned(),
            endpoint: valid.endpoint,
            logprobs: valid.logprobs,
            n: valid.n as usize,
            include_usage: valid.include_usage,
            token_ids: valid.token_ids,
        }
    }

    /// `choice` with the ids of its tokens, when the request asked for them.
    fn with_ids(&self, mut choice: Value, ids: impl FnOnce() -> Vec<u32>) -> Value {
        if self.token_ids {
            choice["token_ids"] = json!(ids());
        }
        choice
    }

    fn object(&self, chunk: bool) -> &'static str {
        match (self.endpoint, chunk) {
            (Endpoint::Chat, false) => "chat.completion",
            (Endpoint::Chat, true) => "chat.completion.chunk",
            (Endpoint::Completions, _) => "text_completion",
        }
    }

    fn wrap(&self, chunk: bool, choices: Vec<Value>) -> Value {
        json!({
            "id": self.id,
            "object": self.object(chunk),
            "created": self.created,
            "model": self.model,
            "choices": choices,
        })
    }

    /// One choice of a response or chunk: its text (or delta), logprobs and finish reason.
    fn choice(
        &self,
        index: usize,
        text: &str,
        logprobs: Option<Value>,
        finish: Option<&str>,
        chunk: bool,
        first: bool,
    ) -> Value {
        match self.endpoint {
            Endpoint::Chat => {
                // A whole message, and a stream's first delta, carry the role.
                let body = if !chunk || first {
                    json!({"role": "assistant", "content": text})
                } else if finish.is_some() && text.is_empty() {
                    json!({})
                } else {
                    json!({"content": text})
                };
                let key = if chunk { "delta" } else { "message" };
                json!({"index": index, key: body, "logprobs": logprobs, "finish_reason": finish})
            }
            Endpoint::Completions => {
                json!({"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish})
            }
        }
    }

    /// The logprobs object of `tokens`, in the endpoint's shape; `offset` is where the first
    /// token's text starts in the choice's text (the legacy `text_offset`).
    fn logprobs_of(&self, tokens: &[pb::TokenEvent], mut offset: usize) -> Option<Value> {
        self.logprobs?;
        Some(match self.endpoint {
            Endpoint::Chat => {
                let content: Vec<Value> = tokens
                    .iter()
                    .map(|t| {
                        let top: Vec<Value> = t
                            .top_logprobs
                            .iter()
                            .map(|a| json!({"token": a.text, "logprob": a.logprob, "bytes": a.bytes}))
                            .collect();
                        json!({"token": t.token_text, "logprob": t.logprob.unwrap_or(0.0),
                            "bytes": t.token_bytes, "top_logprobs": top})
                    })
                    .collect();
                json!({"content": content})
            }
            Endpoint::Completions => {
                let mut offsets = Vec::with_capacity(tokens.len());
                for t in tokens {
                    offsets.push(offset);
                    offset += t.token_text.chars().count();
                }
                let top: Vec<Value> = tokens
                    .iter()
                    .map(|t| {
                        let map: serde_json::Map<String, Value> = t
                            .top_logprobs
                            .iter()
                            .map(|a| (a.text.clone(), json!(a.logprob)))
                            .collect();
                        Value::Object(map)
                    })
                    .collect();
                json!({
                    "tokens": tokens.iter().map(|t| &t.token_text).collect::<Vec<_>>(),
                    "token_logprobs": tokens.iter().map(|t| t.logprob.unwrap_or(0.0)).collect::<Vec<_>>(),
                    "top_logprobs": top,
                    "text_offset": offsets,
                })
            }
        })
    }

    fn usage(&self, usage: &[Option<pb::Usage>]) -> Value {
        let n = self.n.max(1);
        let prompt: u32 = usage
            .iter()
            .enumerate()
            .filter(|(i, _)| i % n == 0)
            .map(|(_, u)| u.as_ref().map_or(0, |u| u.prompt_tokens))
            .sum();
        let completion: u32 = usage
            .iter()
            .map(|u| u.as_ref().map_or(0, |u| u.completion_tokens))
            .sum();
        json!({"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion})
    }
}

/// OpenAI's name of a finish reason.
fn finish_reason(f: &pb::Finished) -> &'static str {
    match pb::FinishReason::try_from(f.reason) {
        Ok(pb::FinishReason::Length) => "length",
        _ => "stop",
    }
}

/// One choice as it accumulates.
#[derive(Default)]
struct Choice {
    text: String,
    tokens: Vec<pb::TokenEvent>,
    ids: Vec<u32>,
    finished: Option<pb::Finished>,
}

/// Reads every choice to its end and builds the whole response.
///
/// # Errors
/// The first choice's failure (the others are cancelled by being dropped).
pub async fn collect(env: &Envelope, mut streams: Choices) -> Result<Value, ApiError> {
    let mut choices: Vec<Choice> = (0..streams.len()).map(|_| Choice::default()).collect();
    while let Some((i, event)) = streams.next().await {
        let event = event.map_err(|s| ApiError::from_status(&s, env.endpoint))?;
        let c = &mut choices[i];
        match event.event {
            Some(pb::generate_event::Event::Token(t)) => {
                c.text.push_str(&t.text);
                c.ids.push(t.id);
                if env.logprobs.is_some() {
                    c.tokens.push(t);
                }
            }
            Some(pb::generate_event::Event::Finished(f)) => {
                c.text.push_str(&f.text);
                c.finished = Some(f);
            }
            None => {}
        }
    }
    let usage: Vec<Option<pb::Usage>> = choices
        .iter()
        .map(|c| c.finished.as_ref().and_then(|f| f.usage))
        .collect();
    let list = choices
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let finish = c.finished.as_ref().map(finish_reason);
            let choice = env.choice(
                i,
                &c.text,
                env.logprobs_of(&c.tokens, 0),
                finish,
                false,
                false,
            );
            env.with_ids(choice, || c.ids.clone())
        })
        .collect();
    let mut body = env.wrap(false, list);
    body["usage"] = env.usage(&usage);
    Ok(body)
}

/// Relays every choice as server-sent events; the last event is `data: [DONE]`, after an
/// error body when a choice fails mid-stream.
pub fn stream(env: Envelope, streams: Choices) -> Response {
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(relay(env, streams, tx));
    Sse::new(ReceiverStream::new(rx))
        .keep_alive(KeepAlive::default())
        .into_response()
}

async fn relay(env: Envelope, mut streams: Choices, tx: mpsc::Sender<Result<Event, Infallible>>) {
    let n = streams.len();
    let mut sent_role = vec![false; n];
    let mut offsets = vec![0usize; n];
    let mut usage: Vec<Option<pb::Usage>> = vec![None; n];
    let send = |v: Value| {
        let tx = tx.clone();
        async move {
            tx.send(Ok(Event::default().data(v.to_string())))
                .await
                .is_ok()
        }
    };
    loop {
        let next = tokio::select! {
            next = streams.next() => next,
            // The client went away: drop the streams now, even while nothing is generated.
            () = tx.closed() => return,
        };
        let Some((i, event)) = next else { break };
        let chunk = match event {
            Err(status) => {
                let _ = send(ApiError::from_status(&status, env.endpoint).body()).await;
                break;
            }
            Ok(pb::GenerateEvent {
                event: Some(pb::generate_event::Event::Token(t)),
            }) => {
                // A token whose text is held back still goes out when its id was asked for:
                // a client resuming needs every id.
                if t.text.is_empty() && env.logprobs.is_none() && !env.token_ids && sent_role[i] {
                    continue;
                }
                let logprobs = env.logprobs_of(std::slice::from_ref(&t), offsets[i]);
                offsets[i] += t.text.chars().count();
                let c = env.choice(i, &t.text, logprobs, None, true, !sent_role[i]);
                sent_role[i] = true;
                env.with_ids(c, || vec![t.id])
            }
            Ok(pb::GenerateEvent {
                event: Some(pb::generate_event::Event::Finished(f)),
            }) => {
                usage[i] = f.usage;
                let c = env.choice(
                    i,
                    &f.text,
                    None,
                    Some(finish_reason(&f)),
                    true,
                    !sent_role[i],
                );
                sent_role[i] = true;
                env.with_ids(c, Vec::new)
            }
            Ok(pb::GenerateEvent { event: None }) => continue,
        };
        if !send(env.wrap(true, vec![chunk])).await {
            return;
        }
    }
    if env.include_usage && usage.iter().all(Option::is_some) {
        let mut last = env.wrap(true, Vec::new());
        last["usage"] = env.usage(&usage);
        if !send(last).await {
            return;
        }
    }
    let _ = tx.send(Ok(Event::default().data("[DONE]"))).await;
}
