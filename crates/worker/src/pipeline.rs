//! One inbound Pipeline stream: each step runs on this stage's shard, its hidden states go to
//! the next stage over ONE outbound Pipeline stream (opened at the first step that needs it),
//! and the answer comes back up. When the inbound stream ends, the outbound one is closed and
//! every sequence created on the stream is freed.
//!
//! Failures end the inbound stream with a status, never a hang: the next stage unreachable
//! (connect timeout), its stream broken or ended — noticed even between steps — or this worker
//! shutting down all answer UNAVAILABLE.

use std::time::Duration;

use tessera_proto::cluster::v1 as pb;
use tessera_proto::cluster::v1::worker_client::WorkerClient;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tonic::{Status, Streaming};
use tracing::Instrument;

use tessera_telemetry::trace_context;

use crate::error::relay_status;
use crate::seqs::StreamId;
use crate::shard::{ShardHandle, StepOutput};

/// What a stream ends with when its worker stops normally.
const SHUTTING_DOWN: &str = "worker shutting down";

/// How long dialling the next stage may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// HTTP/2 pings on the outbound connection, so a peer that vanished without a reset (power
/// loss, partition) is noticed within a few seconds even while the stream is idle.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(1);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest message on a pipeline stream (hidden states of a large prefill batch).
pub(crate) const MAX_MESSAGE_BYTES: usize = 1 << 30;

/// The responses of one inbound stream, as tonic sends them.
pub(crate) type ResponseTx = mpsc::Sender<Result<pb::StepResponse, Status>>;

/// The outbound stream to the next stage.
struct Outbound {
    next: String,
    tx: mpsc::Sender<pb::StepRequest>,
    rx: Streaming<pb::StepResponse>,
}

/// Serves one inbound stream until it ends, fails, or the worker shuts down.
pub(crate) async fn run(
    shard: ShardHandle,
    mut inbound: Streaming<pb::StepRequest>,
    responses: ResponseTx,
    mut shutdown: watch::Receiver<bool>,
) {
    let stream = shard.new_stream();
    let span = tracing::info_span!("pipeline", stream);
    async {
        let mut outbound: Option<Outbound> = None;
        let end = loop {
            let msg = tokio::select! {
                _ = shutdown.wait_for(|&s| s) => {
                    break Err(Status::unavailable(SHUTTING_DOWN));
                }
                // Between steps nothing may arrive from the next stage: anything that does
                // (an error, or the end of its stream) means it is gone.
                ev = next_event(&mut outbound) => {
                    let next = outbound.as_ref().map_or_else(String::new, |o| o.next.clone());
                    break Err(match ev {
                        Err(s) => relay_status(&next, s),
                        Ok(_) => Status::unavailable(format!(
                            "next stage {next} ended the pipeline stream"
                        )),
                    });
                }
                msg = inbound.message() => msg,
            };
            let req = match msg {
                Ok(Some(req)) => req,
                Ok(None) => break Ok(()),
                Err(s) => {
                    tracing::debug!(status = %s, "inbound stream failed");
                    break Ok(());
                }
            };
            match handle(&shard, stream, req, &mut outbound, &mut shutdown).await {
                Ok(resp) => {
                    if responses.send(Ok(resp)).await.is_err() {
                        break Ok(());
                    }
                }
                Err(s) => break Err(s),
            }
        };
        if let Err(s) = end {
            // This worker stopping (Ctrl-C, SIGTERM, its parent gone) ends every stream it
            // serves: a normal shutdown, not a warning — and so does the next stage's own
            // normal shutdown, relayed (a whole cluster stopping races that way). Anything
            // else is a warning.
            if *shutdown.borrow() || s.message().ends_with(SHUTTING_DOWN) {
                tracing::info!(code = ?s.code(), message = s.message(), "pipeline stream ends");
            } else {
                tracing::warn!(code = ?s.code(), message = s.message(), "pipeline stream ends");
            }
            // The caller may already be gone; nothing else to tell.
            let _ = responses.send(Err(s)).await;
        }
        // Closing our sender ends the outbound stream, so the next stage frees its sequences
        // too; ours go now.
        drop(outbound);
        shard.close_stream(stream);
    }
    .instrument(span)
    .await;
}

/// The next message on the outbound stream; pending forever when there is none.
async fn next_event(outbound: &mut Option<Outbound>) -> Result<Option<pb::StepResponse>, Status> {
    match outbound {
        Some(o) => o.rx.message().await,
        None => std::future::pending().await,
    }
}

/// Runs one step here and, unless this is the last stage, on the rest of the pipeline.
async fn handle(
    shard: &ShardHandle,
    stream: StreamId,
    req: pb::StepRequest,
    outbound: &mut Option<Outbound>,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<pb::StepResponse, Status> {
    let step_id = req.step_id;
    let tokens: usize = req.seqs.iter().map(|s| s.tokens.len()).sum();
    let stage = shard.status();
    // A step of releases alone is bookkeeping, not part of any request: no span (it would be
    // a trace of its own, with nothing in it).
    let span = if req.seqs.is_empty() {
        tracing::Span::none()
    } else {
        tracing::info_span!(
            "step",
            step_id,
            seqs = req.seqs.len(),
            tokens,
            epoch = stage.plan_epoch
        )
    };
    // The sender's step span is this one's parent in the request's trace.
    trace_context::set_parent(&span, &req.trace_context);
    async move {
        match shard.step(stream, req).await.map_err(Status::from)? {
            StepOutput::Answer(resp) => Ok(resp),
            StepOutput::Forward { next, mut request } => {
                // The next stage's step is a child of this one.
                request.trace_context = trace_context::inject(&tracing::Span::current());
                if outbound.is_none() {
                    *outbound = Some(open(&next).await?);
                }
                let Some(o) = outbound.as_mut() else {
                    return Err(Status::internal("outbound stream missing"));
                };
                if o.tx.send(request).await.is_err() {
                    return Err(Status::unavailable(format!(
                        "next stage {} closed the pipeline stream",
                        o.next
                    )));
                }
                let resp = tokio::select! {
                    _ = shutdown.wait_for(|&s| s) => {
                        return Err(Status::unavailable(SHUTTING_DOWN));
                    }
                    r = o.rx.message() => r.map_err(|s| relay_status(&o.next, s))?,
                };
                match resp {
                    Some(r) if r.step_id == step_id => Ok(r),
                    Some(r) => Err(Status::internal(format!(
                        "next stage {} answered step {} for step {step_id}",
                        o.next, r.step_id
                    ))),
                    None => Err(Status::unavailable(format!(
                        "next stage {} ended the pipeline stream mid-step",
                        o.next
                    ))),
                }
            }
        }
    }
    .instrument(span)
    .await
}

/// Dials the next stage and opens the outbound stream.
async fn open(next: &str) -> Result<Outbound, Status> {
    let unavailable = |what: String| Status::unavailable(format!("next stage {next}: {what}"));
    let endpoint = Endpoint::from_shared(format!("http://{next}"))
        .map_err(|e| unavailable(format!("bad address: {e}")))?
        .connect_timeout(CONNECT_TIMEOUT)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true)
        .tcp_nodelay(true);
    let channel: Channel = tokio::time::timeout(CONNECT_TIMEOUT, endpoint.connect())
        .await
        .map_err(|_| unavailable("connect timed out".into()))?
        .map_err(|e| unavailable(format!("unreachable: {e}")))?;
    let mut client = WorkerClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let (tx, rx) = mpsc::channel(4);
    let rx = tokio::time::timeout(CONNECT_TIMEOUT, client.pipeline(ReceiverStream::new(rx)))
        .await
        .map_err(|_| unavailable("opening the stream timed out".into()))?
        .map_err(|s| relay_status(next, s))?
        .into_inner();
    Ok(Outbound {
        next: next.to_owned(),
        tx,
        rx,
    })
}
