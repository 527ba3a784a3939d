//! One inbound Pipeline stream: each step runs on this stage's shard, its hidden states go to
//! the next stage over ONE outbound Pipeline stream (opened at the first step that needs it),
//! and the answer comes back up. When the inbound stream ends, the answers of the steps still
//! in flight are relayed, then the outbound one is closed and every sequence created on the
//! stream is freed.
//!
//! Steps are pipelined: the stage takes its next inbound step as soon as it has computed the
//! previous one and handed its hidden states on, so while the next stage works on step N this
//! one computes step N+1 — up to [`MAX_IN_FLIGHT`] steps per stream (beyond that the inbound
//! stream is not read, which bounds memory and pushes back on the sender). The executor still
//! computes one step at a time, in arrival order. Answers go back up in step order: every
//! stream is FIFO at every stage, so the next stage's answers arrive in the order the steps
//! were forwarded, and each must name the step first in line. One task serves the stream; its
//! arms — the inbound stream, the step being computed, the next stage's answers — never wait
//! on one another, so an answer is relayed up while the next step computes.
//!
//! Failures end the inbound stream with a status, never a hang, and fail every step in flight
//! with it: the next stage unreachable (connect timeout), its stream broken or ended — noticed
//! even between steps — or this worker shutting down all answer UNAVAILABLE; an answer for
//! another step than the one first in line (or for none) is INTERNAL.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use tessera_proto::cluster::v1 as pb;
use tessera_proto::cluster::v1::worker_client::WorkerClient;
use tessera_tls::{ClusterTls, Role};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Status, Streaming};
use tracing::Instrument;

use tessera_telemetry::trace_context;

use crate::error::relay_status;
use crate::parts::{Assembler, Inbound, Parts};
use crate::seqs::StreamId;
use crate::shard::{ShardHandle, StepOutput};

/// What a stream ends with when its worker stops normally.
const SHUTTING_DOWN: &str = "worker shutting down";

/// The most steps of one inbound stream in flight on this stage and the stages behind it
/// (computed, or forwarded and not yet answered): each holds its hidden states in a queue,
/// so this bounds the stream's memory. A coordinator keeps one step per micro-batch in
/// flight (by default one per stage); a sender with more in flight than this only waits.
pub const MAX_IN_FLIGHT: usize = 8;

/// How long dialling the next stage may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// HTTP/2 pings on the outbound connection, so a peer that vanished without a reset (power
/// loss, partition) is noticed within a few seconds even while the stream is idle.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(1);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest message on a worker's gRPC streams: a step's token ids and one part of its hidden
/// states (`crate::parts`), with room to spare.
pub(crate) const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// The responses of one inbound stream, as tonic sends them.
pub(crate) type ResponseTx = mpsc::Sender<Result<pb::StepResponse, Status>>;

/// The outbound stream to the next stage.
struct Outbound {
    next: String,
    tx: mpsc::Sender<pb::StepRequest>,
    rx: Streaming<pb::StepResponse>,
}

/// A step computed here, whose answer has not gone up yet.
enum InFlight {
    /// Forwarded: the next stage's answer for `step_id` is awaited. The span (the step's
    /// trace) lasts until that answer goes up.
    Forwarded { step_id: u64, _span: tracing::Span },
    /// Answered here (the last stage), waiting behind earlier steps' answers.
    Answered(pb::StepResponse),
}

/// The step on the executor: its id, its span, and what the shard made of it.
type Computed = (u64, tracing::Span, Result<StepOutput, Status>);

/// The step being computed, as a future the stream's task polls beside its other arms.
type Computing = Pin<Box<dyn Future<Output = Computed> + Send>>;

/// Serves one inbound stream until it ends, fails, or the worker shuts down.
pub(crate) async fn run(
    shard: ShardHandle,
    mut inbound: Streaming<pb::StepRequest>,
    responses: ResponseTx,
    mut shutdown: watch::Receiver<bool>,
    tls: ClusterTls,
) {
    let stream = shard.new_stream();
    let span = tracing::info_span!("pipeline", stream);
    async {
        let mut outbound: Option<Outbound> = None;
        // The steps in flight, oldest first: their answers go up in this order.
        let mut in_flight: VecDeque<InFlight> = VecDeque::new();
        let mut computing: Option<Computing> = None;
        let mut inbound_open = true;
        // Joins each step's hidden-state parts (cancel-safe across the select's turns).
        let mut parts = Assembler::default();
        let end = loop {
            // Answers first in line go up now (the last stage's, as soon as computed).
            while let Some(InFlight::Answered(_)) = in_flight.front() {
                let Some(InFlight::Answered(resp)) = in_flight.pop_front() else {
                    break;
                };
                if responses.send(Ok(resp)).await.is_err() {
                    break;
                }
            }
            if responses.is_closed() {
                // The caller is gone: nobody reads what is still in flight.
                break Ok(());
            }
            if !inbound_open && computing.is_none() && in_flight.is_empty() {
                break Ok(());
            }
            // One step computes at a time, and at most MAX_IN_FLIGHT are unanswered.
            let take_next = inbound_open && computing.is_none() && in_flight.len() < MAX_IN_FLIGHT;
            tokio::select! {
                () = stopping(&mut shutdown) => {
                    break Err(Status::unavailable(SHUTTING_DOWN));
                }
                () = responses.closed() => break Ok(()),
                // The next stage's answers, in order; anything else from it (an error, or
                // the end of its stream) means it is gone.
                ev = next_event(&mut outbound) => {
                    let next = outbound.as_ref().map_or_else(String::new, |o| o.next.clone());
                    match answered(&next, ev, &mut in_flight) {
                        Ok(resp) => {
                            if responses.send(Ok(resp)).await.is_err() {
                                break Ok(());
                            }
                        }
                        Err(s) => break Err(s),
                    }
                }
                (step_id, span, out) = computed(&mut computing) => {
                    computing = None;
                    let out = match out {
                        Ok(out) => out,
                        Err(s) => break Err(s),
                    };
                    match forward(out, step_id, span, &mut outbound, &tls).await {
                        Ok(f) => in_flight.push_back(f),
                        Err(s) => break Err(s),
                    }
                }
                msg = parts.next(&mut inbound), if take_next => match msg {
                    Ok(Some(req)) => computing = Some(compute(&shard, stream, req)),
                    // The caller sent its last step: relay what is in flight, then end.
                    Ok(None) => inbound_open = false,
                    Err(Inbound::Stream(s)) => {
                        tracing::debug!(status = %s, "inbound stream failed");
                        break Ok(());
                    }
                    // The caller is there but sent a step's parts wrongly: it hears why.
                    Err(Inbound::Parts(s)) => break Err(s),
                },
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
            // The caller may already be gone; nothing else to tell. Every step in flight
            // ends with this status: the stream carries no more answers.
            let _ = responses.send(Err(s)).await;
        }
        // A step still on the executor finishes there; its result is dropped. Closing our
        // sender ends the outbound stream, so the next stage frees its sequences too; ours
        // go now (after that step: the executor runs commands in order).
        drop(computing);
        drop(outbound);
        shard.close_stream(stream);
    }
    .instrument(span)
    .await;
}

/// Resolves once the worker shuts down (or its shutdown signal is gone). Yields nothing to
/// hold: the watch guard must not live across the select's other awaits (it is not `Send`).
async fn stopping(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|&s| s).await;
}

/// The next message on the outbound stream; pending forever when there is none.
async fn next_event(outbound: &mut Option<Outbound>) -> Result<Option<pb::StepResponse>, Status> {
    match outbound {
        Some(o) => o.rx.message().await,
        None => std::future::pending().await,
    }
}

/// The step being computed, once done; pending forever when none is.
async fn computed(computing: &mut Option<Computing>) -> Computed {
    match computing {
        Some(c) => c.await,
        None => std::future::pending().await,
    }
}

/// Checks a message from the next stage against the step first in line, which it must
/// answer; that step's answer to relay up.
fn answered(
    next: &str,
    ev: Result<Option<pb::StepResponse>, Status>,
    in_flight: &mut VecDeque<InFlight>,
) -> Result<pb::StepResponse, Status> {
    let resp = ev.map_err(|s| relay_status(next, s))?;
    let expected = match in_flight.front() {
        Some(InFlight::Forwarded { step_id, .. }) => Some(*step_id),
        // Answers computed here are relayed before the loop waits again: none is first.
        Some(InFlight::Answered(_)) | None => None,
    };
    match (resp, expected) {
        (Some(r), Some(id)) if r.step_id == id => {
            in_flight.pop_front();
            Ok(r)
        }
        (Some(r), Some(id)) => Err(Status::internal(format!(
            "next stage {next} answered step {} for step {id}",
            r.step_id
        ))),
        (Some(r), None) => Err(Status::internal(format!(
            "next stage {next} answered step {} with no step in flight",
            r.step_id
        ))),
        (None, Some(_)) => Err(Status::unavailable(format!(
            "next stage {next} ended the pipeline stream mid-step"
        ))),
        (None, None) => Err(Status::unavailable(format!(
            "next stage {next} ended the pipeline stream"
        ))),
    }
}

/// Starts one step on the shard, inside its span (a child of the sender's step span).
fn compute(shard: &ShardHandle, stream: StreamId, req: pb::StepRequest) -> Computing {
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
    let shard = shard.clone();
    Box::pin(async move {
        let out = shard
            .step(stream, req)
            .instrument(span.clone())
            .await
            .map_err(Status::from);
        (step_id, span, out)
    })
}

/// Hands a computed step on: its answer to wait behind earlier ones (the last stage), or its
/// hidden states to the next stage, whose answer is then awaited.
async fn forward(
    out: StepOutput,
    step_id: u64,
    span: tracing::Span,
    outbound: &mut Option<Outbound>,
    tls: &ClusterTls,
) -> Result<InFlight, Status> {
    let (next, mut request) = match out {
        StepOutput::Answer(resp) => return Ok(InFlight::Answered(resp)),
        StepOutput::Forward { next, request } => (next, request),
    };
    // The next stage's step is a child of this one.
    request.trace_context = trace_context::inject(&span);
    if outbound.is_none() {
        *outbound = Some(open(tls, &next).instrument(span.clone()).await?);
    }
    let Some(o) = outbound.as_mut() else {
        return Err(Status::internal("outbound stream missing"));
    };
    // Never waits: the queue holds MAX_IN_FLIGHT steps, more than are ever unanswered.
    if o.tx.send(request).await.is_err() {
        return Err(Status::unavailable(format!(
            "next stage {} closed the pipeline stream",
            o.next
        )));
    }
    Ok(InFlight::Forwarded {
        step_id,
        _span: span,
    })
}

/// Dials the next stage (which must hold a worker's certificate under mutual TLS) and opens
/// the outbound stream.
async fn open(tls: &ClusterTls, next: &str) -> Result<Outbound, Status> {
    let unavailable = |what: String| Status::unavailable(format!("next stage {next}: {what}"));
    let endpoint = tls
        .endpoint(next, Role::Worker)
        .map_err(|e| unavailable(format!("bad address: {}", e.message())))?
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
    let (tx, rx) = mpsc::channel(MAX_IN_FLIGHT);
    let rx = tokio::time::timeout(
        CONNECT_TIMEOUT,
        client.pipeline(Parts::new(ReceiverStream::new(rx))),
    )
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
