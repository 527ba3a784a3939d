//! The public API from a test's side: the runtime and channels its clients use, greedy
//! `tessera.v1.GenerateRequest`s, and reading a generate stream to its end or to its error.
//! Shared by the cli crate's multi-process tests and the coordinator's in-process ones.

use std::time::Duration;

use tessera_proto::v1 as pb;
use tessera_proto::v1::generate_event::Event;
use tessera_proto::v1::inference_client::InferenceClient;
use tonic::Status;
use tonic::transport::{Channel, Endpoint};

/// Prompts of the in-process pipeline tests (coordinator and worker): plain text, a chat
/// turn, code and a longer sentence.
pub const PROMPTS: [&str; 4] = [
    "The capital of France is",
    "<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\n",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village at the edge of the forest,",
];

/// A two-thread Tokio runtime with I/O and timers, for a synchronous test's clients.
///
/// # Panics
/// When the runtime cannot be built.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// A channel to `url` (`http://host:port`) that connects on first use, within 2 s, and
/// bounds every call by `call_timeout` (`None`: unbounded). Must be called within a Tokio
/// runtime (`rt.enter()` or `rt.block_on`).
///
/// # Panics
/// When `url` is not a valid URI.
pub fn lazy_channel(url: String, call_timeout: Option<Duration>) -> Channel {
    let endpoint = Endpoint::from_shared(url)
        .expect("url")
        .connect_timeout(Duration::from_secs(2));
    match call_timeout {
        Some(t) => endpoint.timeout(t),
        None => endpoint,
    }
    .connect_lazy()
}

/// A client of the public API at `addr` (`host:port`), through a [`lazy_channel`] whose
/// calls are bounded by `call_timeout`. Must be called within a Tokio runtime.
///
/// # Panics
/// As [`lazy_channel`].
pub fn inference_client(addr: &str, call_timeout: Duration) -> InferenceClient<Channel> {
    InferenceClient::new(lazy_channel(format!("http://{addr}"), Some(call_timeout)))
}

/// A greedy (temperature 0) request for at most `max_tokens` tokens of `prompt`; everything
/// else is the server's default.
pub fn greedy(prompt: &str, max_tokens: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        prompt: Some(pb::generate_request::Prompt::Text(prompt.into())),
        sampling: Some(pb::SamplingParams {
            temperature: Some(0.0),
            ..Default::default()
        }),
        stop: Some(pb::StopConditions {
            max_tokens: Some(max_tokens),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// As [`greedy`], ignoring end-of-sequence tokens: a request for exactly `max_tokens`.
pub fn greedy_exact(prompt: &str, max_tokens: u32) -> pb::GenerateRequest {
    let mut req = greedy(prompt, max_tokens);
    if let Some(stop) = req.stop.as_mut() {
        stop.ignore_eos = true;
    }
    req
}

/// The Raft tests' request: [`greedy_exact`] on "Once upon a time", exactly `max_tokens`.
pub fn story(max_tokens: u32) -> pb::GenerateRequest {
    greedy_exact("Once upon a time", max_tokens)
}

/// As [`greedy`], asking for each token's logprob and its `top_logprobs` alternatives.
pub fn greedy_with_logprobs(
    prompt: &str,
    max_tokens: u32,
    top_logprobs: u32,
) -> pb::GenerateRequest {
    pb::GenerateRequest {
        logprobs: true,
        top_logprobs,
        ..greedy(prompt, max_tokens)
    }
}

/// What a generate stream delivered, up to its `Finished` event.
#[derive(Clone, Debug)]
pub struct Collected {
    /// Every token event, in order.
    pub tokens: Vec<pb::TokenEvent>,
    /// The last event: reason, usage and held-back text.
    pub finished: pb::Finished,
}

/// Runs `req` through `client` to its `Finished` event; each event must come within
/// `per_event` (`None`: no bound). Events without a payload are skipped.
///
/// # Errors
/// The status the call or the stream failed with, or INTERNAL when the stream ended without
/// a `Finished` event.
///
/// # Panics
/// When an event does not come within `per_event`.
pub async fn collect_finished(
    client: &mut InferenceClient<Channel>,
    req: pb::GenerateRequest,
    per_event: Option<Duration>,
) -> Result<Collected, Status> {
    let mut stream = client.generate(req).await?.into_inner();
    let mut tokens = Vec::new();
    loop {
        let next = match per_event {
            Some(t) => tokio::time::timeout(t, stream.message())
                .await
                .expect("event in time")?,
            None => stream.message().await?,
        };
        let Some(ev) = next else {
            return Err(Status::internal("stream ended without a Finished event"));
        };
        match ev.event {
            Some(Event::Token(t)) => tokens.push(t),
            Some(Event::Finished(finished)) => return Ok(Collected { tokens, finished }),
            None => {}
        }
    }
}

/// A seeded random-sampling request (temperature 0.8, seed 7) for exactly `max_tokens`
/// tokens of `prompt`, with each token's logprob and `top_logprobs` alternatives: its output
/// is reproducible, and its logprobs expose any change in the logits.
pub fn seeded_exact(prompt: &str, max_tokens: u32, top_logprobs: u32) -> pb::GenerateRequest {
    let mut req = greedy_with_logprobs(prompt, max_tokens, top_logprobs);
    req.sampling = Some(pb::SamplingParams {
        temperature: Some(0.8),
        seed: Some(7),
        ..Default::default()
    });
    if let Some(stop) = req.stop.as_mut() {
        stop.ignore_eos = true;
    }
    req
}

/// What the rest of a generate stream delivered.
#[derive(Clone, Debug)]
pub struct Rest {
    /// Its token events up to `Finished`.
    pub tokens: Vec<pb::TokenEvent>,
    /// The longest wait for one event: how long a failure on the way held the stream up.
    pub longest_gap: Duration,
}

/// Reads a started generate stream to its `Finished` event, which must come within `within`.
///
/// # Errors
/// The status the stream failed with, or INTERNAL when it ended without `Finished`.
///
/// # Panics
/// When the stream hangs past `within`.
pub async fn finish_stream(
    stream: &mut tonic::Streaming<pb::GenerateEvent>,
    within: Duration,
) -> Result<Rest, Status> {
    tokio::time::timeout(within, async {
        let mut rest = Rest {
            tokens: Vec::new(),
            longest_gap: Duration::ZERO,
        };
        loop {
            let waiting = std::time::Instant::now();
            let ev = stream.message().await?;
            rest.longest_gap = rest.longest_gap.max(waiting.elapsed());
            let Some(ev) = ev else {
                return Err(Status::internal("stream ended without a Finished event"));
            };
            match ev.event {
                Some(Event::Token(t)) => rest.tokens.push(t),
                Some(Event::Finished(_)) => return Ok(rest),
                None => {}
            }
        }
    })
    .await
    .expect("the stream hangs instead of finishing")
}

/// Runs `req` through `client` to its end: its token events.
///
/// # Errors
/// As [`collect_finished`].
pub async fn collect(
    client: &mut InferenceClient<Channel>,
    req: pb::GenerateRequest,
) -> Result<Vec<pb::TokenEvent>, Status> {
    Ok(collect_finished(client, req, None).await?.tokens)
}

/// Runs `req` through `client` to its end: the number of tokens.
///
/// # Errors
/// As [`collect_finished`].
pub async fn count_tokens(
    client: &mut InferenceClient<Channel>,
    req: pb::GenerateRequest,
) -> Result<usize, Status> {
    Ok(collect(client, req).await?.len())
}

/// Reads a generate stream to its error, which must come within `within`; tokens on the
/// way are dropped.
///
/// # Panics
/// When the stream ends cleanly, or hangs past `within`.
pub async fn stream_error(
    stream: &mut tonic::Streaming<pb::GenerateEvent>,
    within: Duration,
) -> Status {
    tokio::time::timeout(within, async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => {}
                Ok(None) => panic!("stream ended without an error"),
                Err(e) => return e,
            }
        }
    })
    .await
    .expect("the stream hangs instead of failing")
}

/// The token ids and logprobs of `events`.
///
/// # Panics
/// When an event has no logprob (the request did not ask for them).
pub fn ids_and_logprobs(events: &[pb::TokenEvent]) -> Vec<(u32, f32)> {
    events
        .iter()
        .map(|t| (t.id, t.logprob.expect("logprob asked for")))
        .collect()
}

/// The worker ids of a cluster status, sorted.
pub fn worker_ids(s: &pb::ClusterStatusResponse) -> Vec<String> {
    let mut ids: Vec<String> = s.workers.iter().map(|w| w.worker_id.clone()).collect();
    ids.sort();
    ids
}

/// Index of the largest value, the lowest on ties: greedy decoding's choice from a row of
/// logits.
pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}
