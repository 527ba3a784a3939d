//! A gRPC client of a running cluster: connecting with a bounded wait, streaming a generate
//! request to the terminal, and reading the cluster's status.

use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tessera_proto::v1::generate_event::Event;
use tessera_proto::v1::inference_client::InferenceClient;
use tessera_proto::v1::{ClusterStatusRequest, ClusterStatusResponse, GenerateRequest};
use tonic::transport::{Channel, Endpoint};

/// The public endpoint `tessera up` serves on and the client commands use by default.
pub const DEFAULT_ENDPOINT: &str = "http://127.0.0.1:50051";

/// The cluster port of that same coordinator: what workers and `tessera cluster` dial by
/// default.
pub const DEFAULT_CLUSTER_ENDPOINT: &str = "http://127.0.0.1:50052";

/// Connects to a coordinator, failing within `timeout` with a message that says how to start one.
///
/// # Errors
/// When the endpoint is malformed or nothing answers there.
pub async fn connect(endpoint: &str, timeout: Duration) -> Result<InferenceClient<Channel>> {
    let url = if endpoint.contains("://") {
        endpoint.to_owned()
    } else {
        format!("http://{endpoint}")
    };
    let channel = Endpoint::from_shared(url.clone())
        .with_context(|| format!("--endpoint {endpoint:?} is not a valid address"))?
        .connect_timeout(timeout)
        .connect()
        .await
        .with_context(|| {
            format!(
                "no tessera cluster answers at {url}: start one with `tessera up`, pass \
                 --endpoint, or use --embedded to run the model in this process"
            )
        })?;
    Ok(InferenceClient::new(channel))
}

/// Waits until the cluster has a serving plan, polling its status.
///
/// # Errors
/// When the cluster is not ready within `timeout`, with its last status.
pub async fn wait_ready(
    client: &mut InferenceClient<Channel>,
    timeout: Duration,
) -> Result<ClusterStatusResponse> {
    let start = Instant::now();
    loop {
        let status = client
            .cluster_status(ClusterStatusRequest::default())
            .await
            .map(tonic::Response::into_inner);
        match status {
            Ok(s) if s.ready => return Ok(s),
            Ok(s) if start.elapsed() > timeout => bail!(
                "the cluster is not ready after {:.0?}: {} worker(s) registered, plan epoch {}",
                timeout,
                s.workers.len(),
                s.plan_epoch
            ),
            Err(e) if start.elapsed() > timeout => {
                bail!("the cluster did not answer its status: {}", e.message())
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// What a streamed generation produced.
#[derive(Debug, Default)]
pub struct Streamed {
    /// Every token id.
    pub tokens: Vec<u32>,
    /// The finish reason's name, `None` when the stream ended without one.
    pub finish: Option<String>,
    /// Prompt tokens, from the usage.
    pub prompt_tokens: u32,
    /// Time to first token as the coordinator measured it.
    pub ttft_ms: f64,
    /// Total time as the coordinator measured it.
    pub total_ms: f64,
}

/// Sends `request` and writes the text to `out` as it arrives; `on_token` sees every event.
///
/// # Errors
/// The request's gRPC status (with its code) or a failed write.
pub async fn stream_generate(
    client: &mut InferenceClient<Channel>,
    request: GenerateRequest,
    out: &mut dyn Write,
    on_token: &mut dyn FnMut(&tessera_proto::v1::TokenEvent),
) -> Result<Streamed> {
    let mut stream = client
        .generate(request)
        .await
        .map_err(status_error)?
        .into_inner();
    let mut done = Streamed::default();
    while let Some(event) = stream
        .message()
        .await
        .map_err(|s| status_error(tessera_proto::status::lost_peer(s, "the coordinator")))?
    {
        match event.event {
            Some(Event::Token(t)) => {
                on_token(&t);
                done.tokens.push(t.id);
                out.write_all(t.text.as_bytes())?;
                out.flush()?;
            }
            Some(Event::Finished(f)) => {
                out.write_all(f.text.as_bytes())?;
                out.flush()?;
                done.finish = Some(
                    tessera_proto::wire::finish_reason_from_proto(f.reason)
                        .map_or("unspecified", |r| r.as_str())
                        .to_owned(),
                );
                if let Some(u) = f.usage {
                    done.prompt_tokens = u.prompt_tokens;
                    done.ttft_ms = u.time_to_first_token_ms;
                    done.total_ms = u.total_ms;
                }
            }
            None => {}
        }
    }
    Ok(done)
}

/// A gRPC status as an error that keeps its code visible.
pub fn status_error(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", s.code(), s.message())
}
