//! A gRPC client of a running cluster: connecting with bounded waits (for the connection, for
//! the process's first answer, for each call's response headers), streaming a generate request
//! to the terminal, and reading the cluster's status.

use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tessera_proto::v1::generate_event::Event;
use tessera_proto::v1::inference_client::InferenceClient;
use tessera_proto::v1::{ClusterStatusRequest, ClusterStatusResponse, GenerateRequest};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

/// The public endpoint `tessera up` serves on and the client commands use by default.
pub const DEFAULT_ENDPOINT: &str = "http://127.0.0.1:50051";

/// The cluster port of that same coordinator: what workers and `tessera cluster` dial by
/// default.
pub const DEFAULT_CLUSTER_ENDPOINT: &str = "http://127.0.0.1:50052";

/// How long a call may wait for its response headers once the process has answered the
/// probe: a backstop, well above a follower's own bounds on forwarding to the leader (about
/// 10 s), so a coordinator's clearer error always comes first.
const HEADERS_TIMEOUT: Duration = Duration::from_secs(30);

/// `endpoint` as a URL (`http://` when it names no scheme).
pub fn endpoint_url(endpoint: &str) -> String {
    if endpoint.contains("://") {
        endpoint.to_owned()
    } else {
        format!("http://{endpoint}")
    }
}

/// Why [`channel`] has no channel to give.
#[derive(Debug)]
pub enum Unreachable {
    /// The address is not a URL.
    Invalid(anyhow::Error),
    /// Nothing accepted a connection there (refused, unroutable, or no TCP answer in time).
    NoConnection(anyhow::Error),
    /// Something accepted the connection but did not answer a gRPC call in time, or answered
    /// with something else than gRPC: not a tessera process's port.
    NoAnswer(anyhow::Error),
}

impl Unreachable {
    /// The error to report, with `hint` (what to do about it) after a connection failure.
    pub fn into_error(self, hint: &str) -> anyhow::Error {
        match self {
            Self::Invalid(e) | Self::NoAnswer(e) => e,
            Self::NoConnection(e) => e.context(hint.to_owned()),
        }
    }
}

/// A channel to the tessera process at `endpoint` that has answered: connected within
/// `timeout`, then probed with a `grpc.health.v1` check (every tessera port serves it) that
/// must answer within `timeout` too. Later calls on it wait at most [`HEADERS_TIMEOUT`] for
/// their response headers.
///
/// Connecting alone proves little: HTTP/2 needs no answer from the server to set up, so a
/// port that accepts TCP and never speaks (a stopped process, a proxy with nothing behind it,
/// the wrong service) would otherwise hang the first call.
///
/// # Errors
/// [`Unreachable`], each naming the address.
pub async fn channel(endpoint: &str, timeout: Duration) -> Result<Channel, Unreachable> {
    let url = endpoint_url(endpoint);
    let mut target = Endpoint::from_shared(url.clone())
        .with_context(|| format!("--endpoint {endpoint:?} is not a valid address"))
        .map_err(Unreachable::Invalid)?
        .connect_timeout(timeout)
        .timeout(HEADERS_TIMEOUT);
    if url.starts_with("https://") {
        target = target
            .tls_config(client_tls().map_err(Unreachable::Invalid)?)
            .context("TLS configuration")
            .map_err(Unreachable::Invalid)?;
    }
    let channel = tokio::time::timeout(timeout, target.connect())
        .await
        .map_err(|_| anyhow::anyhow!("connecting to {url} timed out after {timeout:?}"))
        .and_then(|r| r.map_err(|e| anyhow::Error::new(e).context(format!("connecting to {url}"))))
        .map_err(Unreachable::NoConnection)?;
    let mut health = HealthClient::new(channel.clone());
    let probe = health.check(HealthCheckRequest {
        service: String::new(),
    });
    match tokio::time::timeout(timeout, probe).await {
        Err(_) => Err(Unreachable::NoAnswer(anyhow::anyhow!(
            "{url} accepted the connection but did not answer within {timeout:?}: is it a \
             tessera port (and is the process there running, not stopped)?"
        ))),
        // Any gRPC answer, even "no health service here", proves a gRPC server listens.
        Ok(Ok(_)) => Ok(channel),
        Ok(Err(s)) if s.code() == tonic::Code::Unimplemented => Ok(channel),
        Ok(Err(s)) => Err(Unreachable::NoAnswer(anyhow::anyhow!(
            "{url} does not answer as a tessera port: {:?}: {}",
            s.code(),
            s.message()
        ))),
    }
}

/// The environment variable naming a PEM file of CA certificates to trust for `https://`
/// endpoints, besides the system's.
pub const CA_ENV: &str = "TESSERA_CA";

/// TLS for an `https://` endpoint: the system's roots, and `$TESSERA_CA`'s when set (the
/// cluster CA, for a certificate made by `tessera certs --public`).
fn client_tls() -> Result<tonic::transport::ClientTlsConfig> {
    let mut tls = tonic::transport::ClientTlsConfig::new().with_native_roots();
    if let Some(path) = std::env::var_os(CA_ENV).filter(|p| !p.is_empty()) {
        let pem = std::fs::read(&path).with_context(|| {
            format!(
                "${CA_ENV}: reading {}",
                std::path::Path::new(&path).display()
            )
        })?;
        tls = tls.ca_certificate(tonic::transport::Certificate::from_pem(pem));
    }
    Ok(tls)
}

/// The environment variable holding the API key client commands send (`--api-key`).
pub const API_KEY_ENV: &str = "TESSERA_API_KEY";

/// Sends `authorization: Bearer KEY` with every call when a key is set (a cluster started
/// with `--api-key` requires it).
#[derive(Clone, Debug, Default)]
pub struct ApiKey(Option<tonic::metadata::AsciiMetadataValue>);

impl ApiKey {
    /// The key `key`, or none.
    ///
    /// # Errors
    /// When the key cannot be sent as a header (spaces, control or non-ASCII characters).
    pub fn new(key: Option<&str>) -> Result<Self> {
        let Some(key) = key.map(str::trim).filter(|k| !k.is_empty()) else {
            return Ok(Self(None));
        };
        let value = format!("Bearer {key}")
            .parse()
            .ok()
            .filter(|_| key.bytes().all(|b| b.is_ascii_graphic()))
            .context("the API key must be printable ASCII without spaces")?;
        Ok(Self(Some(value)))
    }
}

impl tonic::service::Interceptor for ApiKey {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// A client of a coordinator's public API, sending the API key if one was given.
pub type Client = InferenceClient<InterceptedService<Channel, ApiKey>>;

/// Connects to a coordinator, failing within about `timeout` (twice at most: connecting, then
/// its first answer) with a message that names the address and says how to start one. Calls
/// carry the key in `$TESSERA_API_KEY`, if set.
///
/// # Errors
/// When the endpoint is malformed, nothing answers there, or what answers is not a tessera
/// process.
pub async fn connect(endpoint: &str, timeout: Duration) -> Result<Client> {
    let key = std::env::var(API_KEY_ENV).ok();
    connect_with_key(endpoint, timeout, key.as_deref()).await
}

/// As [`connect`], with calls carrying `key` (if any) rather than the environment's.
///
/// # Errors
/// As [`connect`]; also when `key` cannot be sent as a header.
pub async fn connect_with_key(
    endpoint: &str,
    timeout: Duration,
    key: Option<&str>,
) -> Result<Client> {
    let key = ApiKey::new(key)?;
    let channel = channel(endpoint, timeout).await.map_err(|e| {
        e.into_error(
            "no tessera cluster answers there: start one with `tessera up`, pass --endpoint, \
             or use --embedded to run the model in this process",
        )
    })?;
    Ok(InferenceClient::with_interceptor(channel, key))
}

/// Waits until the cluster has a serving plan, polling its status.
///
/// # Errors
/// When the cluster is not ready within `timeout`, with its last status.
pub async fn wait_ready(client: &mut Client, timeout: Duration) -> Result<ClusterStatusResponse> {
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
    client: &mut Client,
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
        record(&mut done, event, out, on_token)?;
    }
    Ok(done)
}

/// How often [`stream_generate_resuming`] resumes one answer.
const MAX_RESUMES: u32 = 5;
/// Pause before resuming on the next coordinator (an election takes about a second).
const RESUME_PAUSE: Duration = Duration::from_millis(300);

/// As [`stream_generate`], against a cluster's coordinators (`endpoints`, tried in turn): when
/// the coordinator streaming the answer dies mid-stream, the request is sent again to the next
/// one with the request id and seed the first response named and a `Resume` of the token ids
/// received, and the answer continues with the tokens the broken stream would have sent (see
/// `Resume` in inference.proto). At most [`MAX_RESUMES`] resumptions.
///
/// # Errors
/// As [`stream_generate`]; a broken stream only once resuming failed or is not possible.
pub async fn stream_generate_resuming(
    endpoints: &[String],
    key: Option<&str>,
    mut request: GenerateRequest,
    out: &mut dyn Write,
    on_token: &mut dyn FnMut(&tessera_proto::v1::TokenEvent),
) -> Result<Streamed> {
    use tessera_proto::status;
    let mut done = Streamed::default();
    let mut resumes = 0;
    let mut at = 0;
    loop {
        let endpoint = &endpoints[at % endpoints.len().max(1)];
        let broke = match connect_with_key(endpoint, Duration::from_secs(3), key).await {
            // Nothing answers there (the dead coordinator): resumable, on the next one.
            Err(e) => tonic::Status::unavailable(format!("{endpoint}: {e:#}")),
            Ok(mut client) => match client.generate(request.clone()).await {
                Err(s) => s,
                Ok(resp) => {
                    status::pin_to_response(&mut request, resp.metadata());
                    let mut stream = resp.into_inner();
                    loop {
                        match stream.message().await {
                            Ok(Some(event)) => {
                                if record(&mut done, event, out, on_token)? {
                                    return Ok(done);
                                }
                            }
                            Ok(None) => {
                                break tonic::Status::unavailable("the stream ended unfinished");
                            }
                            Err(s) => break s,
                        }
                    }
                }
            },
        };
        if !status::resumable(&broke) || resumes >= MAX_RESUMES {
            return Err(status_error(status::lost_peer(broke, "the coordinator")));
        }
        resumes += 1;
        at += 1;
        eprintln!(
            "\n[the stream broke after {} tokens ({}); resuming on {}]",
            done.tokens.len(),
            broke.message(),
            endpoints[at % endpoints.len()]
        );
        request.resume = Some(tessera_proto::v1::Resume {
            tokens: done.tokens.clone(),
        });
        tokio::time::sleep(RESUME_PAUSE).await;
    }
}

/// Takes one event of a generate stream into `done` and `out`; true at the Finished event.
fn record(
    done: &mut Streamed,
    event: tessera_proto::v1::GenerateEvent,
    out: &mut dyn Write,
    on_token: &mut dyn FnMut(&tessera_proto::v1::TokenEvent),
) -> Result<bool> {
    match event.event {
        Some(Event::Token(t)) => {
            on_token(&t);
            done.tokens.push(t.id);
            out.write_all(t.text.as_bytes())?;
            out.flush()?;
            Ok(false)
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
            Ok(true)
        }
        None => Ok(false),
    }
}

/// A gRPC status as an error that keeps its code visible.
pub fn status_error(s: tonic::Status) -> anyhow::Error {
    // The channel's own bound on waiting for response headers (tonic reports it as a bare
    // "Cancelled: Timeout expired").
    if s.code() == tonic::Code::Cancelled && s.message() == tonic::TimeoutExpired(()).to_string() {
        return anyhow::anyhow!(
            "the server took the call but sent no response within {HEADERS_TIMEOUT:?}"
        );
    }
    anyhow::anyhow!("{:?}: {}", s.code(), s.message())
}
