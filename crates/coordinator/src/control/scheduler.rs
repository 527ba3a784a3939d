//! The continuous-batching scheduler: a cloneable [`SchedulerHandle`] and one task that owns
//! the queue, the running batch and the pipeline stream.
//!
//! Requests are admitted while the KV cache allows (prompt + max_tokens reserved, in whole
//! blocks; the reservation frees itself on drop). Each step carries one decode token per
//! running sequence and prefill chunks of at most `prefill_chunk` tokens, `max_batch_tokens`
//! in all, on ONE long-lived Pipeline stream to stage 0, opened per plan epoch. Sampled tokens
//! go through each request's [`OutputStream`] (the engine's own detokenizer and stop checker)
//! to the client. Finished and abandoned sequences are released in-band on the next step (a
//! step of releases alone when no sequence runs, so an idle cluster holds no KV).
//!
//! Failure: when the stream breaks or the serving plan goes away (a plan worker dropped by
//! the liveness monitor, or replaced), every running request ends with UNAVAILABLE and the
//! controller re-plans; queued requests wait for the new plan up to `ready_wait`.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use tessera_proto::cluster::v1 as cpb;
use tessera_proto::v1 as pb;
use tessera_text::frontend::{Frontend, OutputStream};
use tessera_text::sampling::{FinishReason, SampledToken};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};
use tracing::Instrument;

use crate::error::CoordinatorError;
use crate::services::validate::ValidRequest;
use crate::state::cluster::{Cluster, Serving};

/// How often waiting requests are looked at for clients that left.
const QUEUE_SWEEP: std::time::Duration = std::time::Duration::from_millis(500);

/// What a generate stream carries.
pub type EventResult = Result<pb::GenerateEvent, Status>;

/// One request handed to the scheduler.
struct Submit {
    req: ValidRequest,
    events: mpsc::UnboundedSender<EventResult>,
    span: tracing::Span,
    /// Its place in the bounded queue, given back when it is admitted or dropped.
    _slot: QueueSlot,
}

/// A place in the queue of requests not yet admitted; counts itself out on drop, wherever the
/// request leaves the queue (admitted, expired, abandoned, or the task gone).
struct QueueSlot(Arc<AtomicUsize>);

impl Drop for QueueSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Submits requests to the scheduler task.
#[derive(Clone, Debug)]
pub struct SchedulerHandle {
    tx: mpsc::UnboundedSender<Submit>,
    /// Requests submitted and not yet admitted (in the channel or the task's queue).
    queued: Arc<AtomicUsize>,
    /// The most that may wait; more are refused with RESOURCE_EXHAUSTED.
    max_queued: usize,
}

impl SchedulerHandle {
    /// Queues a validated request; its events (tokens, then Finished or an error status) go
    /// to `events`. Dropping the receiver cancels it. The request's `generate` span continues
    /// the client's trace when `metadata` carries a W3C `traceparent`.
    ///
    /// # Errors
    /// [`CoordinatorError::ResourceExhausted`] when `max_queued` requests already wait;
    /// [`CoordinatorError::Internal`] when the scheduler task is gone.
    pub fn submit(
        &self,
        req: ValidRequest,
        events: mpsc::UnboundedSender<EventResult>,
        metadata: &tonic::metadata::MetadataMap,
    ) -> Result<(), CoordinatorError> {
        // Taken before the check, so concurrent submits cannot overshoot the bound together.
        let slot = QueueSlot(Arc::clone(&self.queued));
        let waiting = self.queued.fetch_add(1, Ordering::SeqCst);
        if waiting >= self.max_queued {
            return Err(CoordinatorError::ResourceExhausted(format!(
                "{waiting} requests are already waiting (--max-queued {}); retry later",
                self.max_queued
            )));
        }
        let span = tracing::info_span!(parent: None, "generate", request_id = %req.request_id,
            prompt_tokens = req.inner.prompt_ids.len());
        tessera_telemetry::trace_context::set_parent_from_metadata(&span, metadata);
        self.tx
            .send(Submit {
                req,
                events,
                span,
                _slot: slot,
            })
            .map_err(|_| CoordinatorError::Internal("the scheduler has stopped".into()))
    }
}

/// KV tokens reserved for one sequence; given back on drop.
struct KvReservation {
    pool: Arc<AtomicU64>,
    tokens: u64,
}

impl Drop for KvReservation {
    fn drop(&mut self) {
        self.pool.fetch_sub(self.tokens, Ordering::SeqCst);
    }
}

/// A running sequence.
struct Seq {
    id: u64,
    req: ValidRequest,
    events: mpsc::UnboundedSender<EventResult>,
    output: OutputStream,
    /// Prompt tokens already sent.
    prefilled: usize,
    /// The token to feed on the next decode step.
    next: Option<u32>,
    /// Whether its SeqStart went out.
    started: bool,
    first_token: Option<Instant>,
    /// When its latest token came (inter-token latency counts from here).
    last_token: Option<Instant>,
    span: tracing::Span,
    _kv: KvReservation,
}

/// The pipeline stream of one plan epoch.
struct Link {
    epoch: u64,
    tx: mpsc::Sender<cpb::StepRequest>,
    rx: Streaming<cpb::StepResponse>,
}

/// The scheduler task's state.
struct Scheduler {
    cluster: Arc<Cluster>,
    frontend: Frontend,
    rx: mpsc::UnboundedReceiver<Submit>,
    serving: watch::Receiver<Option<Serving>>,
    queue: VecDeque<Submit>,
    running: Vec<Seq>,
    release: Vec<u64>,
    link: Option<Link>,
    kv_used: Arc<AtomicU64>,
    next_seq: u64,
    next_step: u64,
    /// The newest plan epoch whose pipeline failed: not used again, even while it is still
    /// published, until the controller replaces it.
    dead_epoch: u64,
}

/// Starts the scheduler task; returns its handle and the task.
pub fn spawn(
    cluster: Arc<Cluster>,
    frontend: Frontend,
) -> (SchedulerHandle, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let handle = SchedulerHandle {
        tx,
        queued: Arc::new(AtomicUsize::new(0)),
        max_queued: cluster.cfg.max_queued,
    };
    let serving = cluster.subscribe_leading();
    let s = Scheduler {
        cluster,
        frontend,
        rx,
        serving,
        queue: VecDeque::new(),
        running: Vec::new(),
        release: Vec::new(),
        link: None,
        kv_used: Arc::new(AtomicU64::new(0)),
        next_seq: 1,
        next_step: 1,
        dead_epoch: 0,
    };
    (handle, tokio::spawn(s.run()))
}

fn unavailable(msg: impl Into<String>) -> Status {
    CoordinatorError::Unavailable(msg.into()).into()
}

impl Scheduler {
    async fn run(mut self) {
        loop {
            while let Ok(s) = self.rx.try_recv() {
                self.queue.push_back(s);
            }
            let dead = self.dead_epoch;
            let serving = self
                .serving
                .borrow_and_update()
                .clone()
                .filter(|s| s.epoch > dead);
            if self.link.as_ref().map(|l| l.epoch) != serving.as_ref().map(|s| s.epoch)
                && let Some(link) = self.link.take()
            {
                self.fail_running(&format!(
                    "the plan of epoch {} stopped serving (a worker was lost)",
                    link.epoch
                ));
            }
            self.expire_queue(serving.is_some());
            self.publish_load();
            let Some(serving) = serving else {
                if !self.wait_for_work(true).await {
                    return;
                }
                continue;
            };
            if self.link.is_none() {
                match self.open(&serving).await {
                    Ok(link) => self.link = Some(link),
                    Err(e) => {
                        tracing::warn!(epoch = serving.epoch, error = %e, "pipeline stream failed to open");
                        self.dead_epoch = serving.epoch;
                        self.cluster.replan.report_failure(serving.epoch);
                        let pause = self.cluster.cfg.heartbeat_interval;
                        tokio::select! {
                            _ = self.serving.changed() => {}
                            () = tokio::time::sleep(pause) => {}
                        }
                        continue;
                    }
                }
            }
            self.admit();
            self.drop_abandoned();
            self.publish_load();
            let Some(step) = self.build_step() else {
                if !self.wait_for_work(false).await {
                    return;
                }
                continue;
            };
            self.run_step(step).await;
        }
    }

    /// Sleeps until a request arrives, the serving plan changes, or (when `deadlines`) the
    /// first queued request's wait expires. False when the handle side is gone.
    async fn wait_for_work(&mut self, deadlines: bool) -> bool {
        let wait = self.cluster.cfg.ready_wait;
        let expiry = self
            .queue
            .iter()
            .map(|s| s.req.received + wait)
            .min()
            .filter(|_| deadlines);
        // While requests wait, look at the queue every QUEUE_SWEEP too: one whose client
        // left gives its place back then, not only when something else wakes the task.
        let sweep = (!self.queue.is_empty()).then(|| Instant::now() + QUEUE_SWEEP);
        let deadline = match (expiry, sweep) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let sleep = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            s = self.rx.recv() => match s {
                Some(s) => self.queue.push_back(s),
                None => return false,
            },
            r = self.serving.changed() => {
                if r.is_err() {
                    return false;
                }
            }
            () = sleep => {}
        }
        true
    }

    fn publish_load(&self) {
        self.cluster.load.set(self.running.len(), self.queue.len());
        self.cluster.metrics.set_load(
            self.running.len(),
            self.queue.len(),
            self.kv_used.load(Ordering::SeqCst),
            u64::from(self.cluster.kv_tokens),
        );
    }

    /// Ends queued requests whose client left, and (when no plan serves) those that waited
    /// longer than `ready_wait`.
    fn expire_queue(&mut self, serving: bool) {
        let wait = self.cluster.cfg.ready_wait;
        let now = Instant::now();
        let reason = self.cluster.replan.failure();
        self.queue.retain(|s| {
            if s.events.is_closed() {
                return false;
            }
            if !serving && now.duration_since(s.req.received) >= wait {
                let _e = s.span.enter();
                tracing::warn!("no plan served the model in time");
                // The planner's reason ("the model does not fit: …") when it has one.
                let why = reason
                    .clone()
                    .unwrap_or_else(|| format!("waited {wait:?} for enough workers"));
                let _ = s
                    .events
                    .send(Err(unavailable(format!("no plan serves the model: {why}"))));
                return false;
            }
            true
        });
    }

    async fn open(&self, serving: &Serving) -> Result<Link, Status> {
        let timeout = self.cluster.cfg.heartbeat_timeout * 2;
        let channel = super::connect(&serving.stage0, timeout).await?;
        let mut client = cpb::worker_client::WorkerClient::new(channel);
        let (tx, rx) = mpsc::channel(4);
        let resp = tokio::time::timeout(timeout, client.pipeline(ReceiverStream::new(rx)))
            .await
            .map_err(|_| unavailable("opening the pipeline stream timed out"))??;
        tracing::info!(epoch = serving.epoch, stage0 = %serving.stage0, "pipeline stream open");
        Ok(Link {
            epoch: serving.epoch,
            tx,
            rx: resp.into_inner(),
        })
    }

    /// Admits queued requests, oldest first, while their KV reservation fits.
    fn admit(&mut self) {
        let block = u64::from(self.cluster.cfg.block_size.max(1));
        let capacity = u64::from(self.cluster.kv_tokens);
        while let Some(front) = self.queue.front() {
            let need = (front.req.max_len() as u64).div_ceil(block) * block;
            if self.kv_used.load(Ordering::SeqCst) + need > capacity {
                break;
            }
            let Some(s) = self.queue.pop_front() else {
                break;
            };
            self.kv_used.fetch_add(need, Ordering::SeqCst);
            let id = self.next_seq;
            self.next_seq += 1;
            s.span
                .in_scope(|| tracing::debug!(seq = id, kv_tokens = need, "admitted"));
            self.cluster
                .metrics
                .queued_for(s.req.received.elapsed().as_secs_f64());
            self.running.push(Seq {
                id,
                output: self.frontend.output(&s.req.inner),
                req: s.req,
                events: s.events,
                prefilled: 0,
                next: None,
                started: false,
                first_token: None,
                last_token: None,
                span: s.span,
                _kv: KvReservation {
                    pool: Arc::clone(&self.kv_used),
                    tokens: need,
                },
            });
        }
    }

    /// Releases sequences whose client went away.
    fn drop_abandoned(&mut self) {
        let mut i = 0;
        while i < self.running.len() {
            if self.running[i].events.is_closed() {
                let s = self.running.swap_remove(i);
                s.span
                    .in_scope(|| tracing::info!("client went away; cancelling"));
                if s.started {
                    self.release.push(s.id);
                }
            } else {
                i += 1;
            }
        }
    }

    /// The next step: one decode token per decoding sequence, then prefill chunks, within
    /// `max_batch_tokens`, carrying the pending releases. A step with no sequences still goes
    /// out when releases are pending (the workers free them and answer with no tokens): the
    /// last requests to finish must not hold their KV until the next request comes. `None`
    /// when there is nothing to send.
    fn build_step(&mut self) -> Option<cpb::StepRequest> {
        let cfg = &self.cluster.cfg;
        let mut budget = cfg.max_batch_tokens.max(1) as usize;
        let chunk = cfg.prefill_chunk.max(1) as usize;
        let mut seqs = Vec::new();
        for s in self.running.iter_mut().filter(|s| s.next.is_some()) {
            if budget == 0 {
                break;
            }
            budget -= 1;
            seqs.push(cpb::SeqStep {
                seq_id: s.id,
                tokens: s.next.into_iter().collect(),
                sample: true,
                start: None,
            });
        }
        for s in self.running.iter_mut().filter(|s| s.next.is_none()) {
            let prompt = &s.req.inner.prompt_ids;
            let left = prompt.len() - s.prefilled;
            if budget == 0 || left == 0 {
                continue;
            }
            let n = left.min(chunk).min(budget);
            budget -= n;
            let tokens = prompt[s.prefilled..s.prefilled + n].to_vec();
            s.prefilled += n;
            let start = (!s.started).then(|| s.req.seq_start());
            s.started = true;
            seqs.push(cpb::SeqStep {
                seq_id: s.id,
                tokens,
                sample: s.prefilled == prompt.len(),
                start,
            });
        }
        if seqs.is_empty() && self.release.is_empty() {
            return None;
        }
        let step_id = self.next_step;
        self.next_step += 1;
        Some(cpb::StepRequest {
            plan_epoch: self.link.as_ref().map_or(0, |l| l.epoch),
            step_id,
            seqs,
            hidden: Vec::new(),
            release: std::mem::take(&mut self.release),
            // Set in run_step, from the step's span.
            trace_context: Default::default(),
        })
    }

    /// The span of a step: a child of the `generate` span of the batch's first sequence,
    /// following from those of the others — so a request served alone
    /// gets one trace holding every step, and a batched step links every request it serves.
    fn step_span(&self, step: &cpb::StepRequest) -> tracing::Span {
        // A step of releases alone serves no request: no span, and no trace context for the
        // workers (which then make none either).
        if step.seqs.is_empty() {
            return tracing::Span::none();
        }
        let tokens: usize = step.seqs.iter().map(|s| s.tokens.len()).sum();
        let mut spans = step
            .seqs
            .iter()
            .filter_map(|q| self.running.iter().find(|s| s.id == q.seq_id))
            .map(|s| &s.span);
        let first = spans.next();
        let span = tracing::info_span!(
            parent: first.and_then(tracing::Span::id),
            "step",
            step_id = step.step_id,
            seqs = step.seqs.len(),
            tokens,
            epoch = step.plan_epoch
        );
        for other in spans {
            span.follows_from(other);
        }
        span
    }

    /// Sends a step and feeds its answer to the sequences; on failure ends every running
    /// request with UNAVAILABLE.
    async fn run_step(&mut self, mut step: cpb::StepRequest) {
        let span = self.step_span(&step);
        step.trace_context = tessera_telemetry::trace_context::inject(&span);
        let Some(link) = self.link.as_mut() else {
            return;
        };
        let tokens: usize = step.seqs.iter().map(|s| s.tokens.len()).sum();
        let step_id = step.step_id;
        let epoch = link.epoch;
        let sent_at = Instant::now();
        let answer = async {
            if link.tx.send(step).await.is_err() {
                return Err(unavailable("the pipeline stream closed"));
            }
            tokio::select! {
                r = link.rx.message() => match r {
                    Ok(Some(resp)) if resp.step_id == step_id => Ok(resp),
                    Ok(Some(resp)) => Err(unavailable(format!(
                        "pipeline answered step {} for step {step_id}", resp.step_id))),
                    Ok(None) => Err(unavailable("the pipeline stream ended")),
                    Err(status) => Err(unavailable(format!(
                        "a worker was lost mid-request: {}", status.message()))),
                },
                _ = wait_plan_change(&mut self.serving, epoch) => {
                    Err(unavailable("a worker of the plan was lost mid-request"))
                }
            }
        }
        .instrument(span.clone())
        .await;
        match answer {
            Ok(resp) => {
                if tokens > 0 {
                    // A release-only step is bookkeeping, not model work.
                    self.cluster
                        .metrics
                        .step(tokens as u64, sent_at.elapsed().as_secs_f64());
                }
                span.in_scope(|| self.absorb(resp));
            }
            Err(status) => {
                tracing::warn!(epoch, error = %status.message(), "pipeline failed");
                self.link = None;
                self.dead_epoch = epoch;
                self.fail_running(status.message());
                self.cluster.replan.report_failure(epoch);
            }
        }
    }

    /// Feeds sampled tokens to their sequences and streams the events.
    fn absorb(&mut self, resp: cpb::StepResponse) {
        for t in resp.tokens {
            let Some(i) = self.running.iter().position(|s| s.id == t.seq_id) else {
                continue;
            };
            let s = &mut self.running[i];
            let now = Instant::now();
            s.first_token.get_or_insert(now);
            if let Some(last) = s.last_token.replace(now) {
                self.cluster.metrics.inter_token((now - last).as_secs_f64());
            }
            let token = SampledToken {
                id: t.id,
                logprob: t.logprob,
                top_logprobs: t.top_logprobs.iter().map(|l| (l.id, l.logprob)).collect(),
            };
            let (event, finished) = s.output.push(token);
            let mut token = pb::TokenEvent {
                id: event.token.id,
                text: event.text,
                logprob: event.token.logprob,
                top_logprobs: t.top_logprobs,
                ..Default::default()
            };
            if token.logprob.is_some() {
                name_tokens(&self.frontend, &mut token);
            }
            let sent = s
                .events
                .send(Ok(pb::GenerateEvent {
                    event: Some(pb::generate_event::Event::Token(token)),
                }))
                .is_ok();
            if let Some(reason) = finished {
                let s = self.running.swap_remove(i);
                self.finish(s, reason);
            } else if !sent {
                let s = self.running.swap_remove(i);
                s.span
                    .in_scope(|| tracing::info!("client went away; cancelling"));
                self.cluster.metrics.request_ended("cancelled");
                self.release.push(s.id);
            } else {
                s.next = Some(t.id);
            }
        }
    }

    /// Sends a sequence's Finished event and releases it.
    fn finish(&mut self, mut s: Seq, reason: FinishReason) {
        let now = Instant::now();
        let received = s.req.received;
        let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
        let usage = pb::Usage {
            prompt_tokens: s.req.inner.prompt_ids.len() as u32,
            completion_tokens: s.output.generated(),
            time_to_first_token_ms: ms(s.first_token.unwrap_or(now) - received),
            total_ms: ms(now - received),
        };
        let (reason, outcome) = (tessera_proto::wire::finish_reason(reason), reason.as_str());
        self.cluster.metrics.request_ended(outcome);
        self.cluster.metrics.finished(
            u64::from(usage.prompt_tokens),
            u64::from(usage.completion_tokens),
            usage.time_to_first_token_ms / 1e3,
            usage.total_ms / 1e3,
        );
        s.span.in_scope(|| {
            tracing::info!(
                completion_tokens = usage.completion_tokens,
                ttft_ms = usage.time_to_first_token_ms,
                total_ms = usage.total_ms,
                "finished"
            );
        });
        let _ = s.events.send(Ok(pb::GenerateEvent {
            event: Some(pb::generate_event::Event::Finished(pb::Finished {
                request_id: s.req.request_id.clone(),
                reason: reason as i32,
                usage: Some(usage),
                text: s.output.flush(),
            })),
        }));
        self.release.push(s.id);
    }

    /// Ends every running request with UNAVAILABLE; their sequences die with the stream.
    fn fail_running(&mut self, msg: &str) {
        for s in self.running.drain(..) {
            s.span
                .in_scope(|| tracing::warn!(error = msg, "request failed"));
            self.cluster.metrics.request_ended("unavailable");
            let _ = s.events.send(Err(unavailable(msg.to_owned())));
        }
        // The stream that held them is gone, and with it their state on every worker.
        self.release.clear();
        self.publish_load();
    }
}

/// Fills in the text and bytes of a token event's sampled token and alternatives (what
/// logprobs show a client; the workers send ids only).
fn name_tokens(frontend: &Frontend, token: &mut pb::TokenEvent) {
    let tokenizer = frontend.tokenizer();
    let bytes = |id: u32| tokenizer.token_bytes(id).unwrap_or_default().to_vec();
    token.token_bytes = bytes(token.id);
    token.token_text = String::from_utf8_lossy(&token.token_bytes).into_owned();
    for alt in &mut token.top_logprobs {
        alt.bytes = bytes(alt.id);
        alt.text = String::from_utf8_lossy(&alt.bytes).into_owned();
    }
}

/// Resolves once the serving plan is no longer the one of `epoch`.
async fn wait_plan_change(serving: &mut watch::Receiver<Option<Serving>>, epoch: u64) {
    loop {
        if serving.borrow_and_update().as_ref().map(|s| s.epoch) != Some(epoch) {
            return;
        }
        if serving.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}
