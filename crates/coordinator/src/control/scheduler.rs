//! The continuous-batching scheduler: a cloneable [`SchedulerHandle`] and one task that owns
//! the queue, the running batch and the pipeline stream.
//!
//! Requests are admitted while the KV cache allows (prompt + max_tokens reserved, in whole
//! blocks, less the cached prefix blocks a prompt starts with; the reservation frees itself on
//! drop; see [`super::kv_budget`]). Each step carries one decode token per
//! running sequence and prefill chunks of at most `prefill_chunk` tokens, `max_batch_tokens`
//! in all, on ONE long-lived Pipeline stream to stage 0, opened per plan epoch. Sampled tokens
//! go through each request's [`OutputStream`] (the engine's own detokenizer and stop checker)
//! to the client. Finished and abandoned sequences are released in-band on the next step (a
//! step of releases alone when no sequence runs, so an idle cluster holds no KV but its
//! prefix cache).
//!
//! Prefix caching (unless off): a sequence starts from the cached blocks its prompt begins
//! with ([`super::prefix`]), named in its SeqStart; when it ends, its prompt blocks are
//! cached. The workers' stores follow this stream's index through each step's prefix ops.
//!
//! Failure: when the stream breaks or the serving plan goes away (a plan worker dropped by
//! the liveness monitor, or replaced), every running request ends with UNAVAILABLE and the
//! controller re-plans; queued requests wait for the new plan up to `ready_wait`.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use tessera_proto::cluster::v1 as cpb;
use tessera_proto::v1 as pb;
use tessera_text::frontend::{Frontend, OutputStream};
use tessera_text::sampling::{FinishReason, SampledToken};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};
use tracing::Instrument;

use super::kv_budget::{KvBudget, KvReservation};
use crate::error::CoordinatorError;
use crate::services::validate::ValidRequest;
use crate::state::cluster::{Cluster, Serving};

/// What a generate stream carries.
pub type EventResult = Result<pb::GenerateEvent, Status>;

/// One request handed to the scheduler.
struct Submit {
    req: ValidRequest,
    events: mpsc::UnboundedSender<EventResult>,
    span: tracing::Span,
}

/// Submits requests to the scheduler task.
#[derive(Clone, Debug)]
pub struct SchedulerHandle {
    tx: mpsc::UnboundedSender<Submit>,
}

impl SchedulerHandle {
    /// Queues a validated request; its events (tokens, then Finished or an error status) go
    /// to `events`. Dropping the receiver cancels it. The request's `generate` span continues
    /// the client's trace when `metadata` carries a W3C `traceparent`.
    ///
    /// # Errors
    /// [`CoordinatorError::Internal`] when the scheduler task is gone.
    pub fn submit(
        &self,
        req: ValidRequest,
        events: mpsc::UnboundedSender<EventResult>,
        metadata: &tonic::metadata::MetadataMap,
    ) -> Result<(), CoordinatorError> {
        let span = tracing::info_span!(parent: None, "generate", request_id = %req.request_id,
            prompt_tokens = req.inner.prompt_ids.len());
        tessera_telemetry::trace_context::set_parent_from_metadata(&span, metadata);
        self.tx
            .send(Submit { req, events, span })
            .map_err(|_| CoordinatorError::Internal("the scheduler has stopped".into()))
    }
}

/// A running sequence.
struct Seq {
    id: u64,
    req: ValidRequest,
    events: mpsc::UnboundedSender<EventResult>,
    output: OutputStream,
    /// Prompt tokens whose K/V is on the workers or on its way: the cached ones, then those
    /// already sent.
    prefilled: usize,
    /// The cached blocks it starts from (held in the prefix index until it ends).
    chain: Vec<u64>,
    /// The token to feed on the next decode step.
    next: Option<u32>,
    /// Whether its SeqStart went out.
    started: bool,
    first_token: Option<Instant>,
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
    kv: KvBudget,
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
    let serving = cluster.subscribe_leading();
    let kv = KvBudget::new(
        cluster.kv_tokens,
        cluster.cfg.block_size,
        cluster.cfg.prefix_cache,
    );
    let s = Scheduler {
        cluster,
        frontend,
        rx,
        serving,
        queue: VecDeque::new(),
        running: Vec::new(),
        release: Vec::new(),
        link: None,
        kv,
        next_seq: 1,
        next_step: 1,
        dead_epoch: 0,
    };
    (SchedulerHandle { tx }, tokio::spawn(s.run()))
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
                    Ok(link) => {
                        // A new stream: every worker's prefix store for it starts empty.
                        self.kv.reset_prefix();
                        self.link = Some(link);
                    }
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
            // Abandoned sequences first: their retain ops must precede any eviction that
            // admission decides, and the room they free may admit a request now.
            self.drop_abandoned();
            self.admit();
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
        let deadline = self
            .queue
            .iter()
            .map(|s| s.req.received + wait)
            .min()
            .filter(|_| deadlines);
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
        self.cluster.metrics.set_running(self.running.len());
    }

    /// Ends queued requests whose client left, and (when no plan serves) those that waited
    /// longer than `ready_wait`.
    fn expire_queue(&mut self, serving: bool) {
        let wait = self.cluster.cfg.ready_wait;
        let now = Instant::now();
        self.queue.retain(|s| {
            if s.events.is_closed() {
                return false;
            }
            if !serving && now.duration_since(s.req.received) >= wait {
                let _e = s.span.enter();
                tracing::warn!("no plan served the model in time");
                let _ = s.events.send(Err(unavailable(format!(
                    "no plan serves the model (waited {wait:?} for enough workers)"
                ))));
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

    /// Admits queued requests, oldest first, while their KV reservation fits (evicting
    /// unreferenced cached prefix blocks when that makes it fit).
    fn admit(&mut self) {
        while let Some(front) = self.queue.front() {
            let prompt = &front.req.inner.prompt_ids;
            let Some(adm) = self.kv.admit(prompt, front.req.max_len()) else {
                break;
            };
            if self.kv.prefix_cache() {
                self.cluster.metrics.prefix_lookup(
                    prompt.len() as u64,
                    adm.cached_tokens as u64,
                    adm.evicted as u64,
                );
            }
            let Some(s) = self.queue.pop_front() else {
                break;
            };
            let id = self.next_seq;
            self.next_seq += 1;
            let cached = adm.cached_tokens;
            s.span
                .in_scope(|| tracing::debug!(seq = id, cached, "admitted"));
            self.running.push(Seq {
                id,
                output: self.frontend.output(&s.req.inner),
                req: s.req,
                events: s.events,
                prefilled: adm.cached_tokens,
                chain: adm.chain,
                next: None,
                started: false,
                first_token: None,
                span: s.span,
                _kv: adm.reservation,
            });
        }
    }

    /// Ends a sequence's hold on the KV: prefix references dropped, computed prompt blocks
    /// cached, a release on the next step if it started; its reservation goes with `s`.
    fn retire(&mut self, s: Seq) {
        let prompt = &s.req.inner.prompt_ids;
        self.kv
            .retire(s.id, prompt, &s.chain, s.prefilled, s.started);
        if s.started {
            self.release.push(s.id);
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
                self.retire(s);
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
            let start = (!s.started).then(|| cpb::SeqStart {
                cached_tokens: (s.chain.len() * cfg.block_size.max(1) as usize) as u32,
                cached_blocks: s.chain.clone(),
                ..s.req.seq_start()
            });
            s.started = true;
            seqs.push(cpb::SeqStep {
                seq_id: s.id,
                tokens,
                sample: s.prefilled == prompt.len(),
                start,
            });
        }
        if seqs.is_empty() && self.release.is_empty() && !self.kv.has_ops() {
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
            prefix_ops: self.kv.take_ops(),
        })
    }

    /// The span of a step: a child of the `generate` span of the batch's first sequence,
    /// following from those of the others — so a request served alone
    /// gets one trace holding every step, and a batched step links every request it serves.
    fn step_span(&self, step: &cpb::StepRequest) -> tracing::Span {
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
            let token = SampledToken {
                id: t.id,
                logprob: t.logprob,
                top_logprobs: t.top_logprobs.iter().map(|l| (l.id, l.logprob)).collect(),
            };
            let (event, finished) = s.output.push(token);
            let sent = s
                .events
                .send(Ok(pb::GenerateEvent {
                    event: Some(pb::generate_event::Event::Token(pb::TokenEvent {
                        id: event.token.id,
                        text: event.text,
                        logprob: event.token.logprob,
                        top_logprobs: t.top_logprobs,
                    })),
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
                self.retire(s);
            } else {
                s.next = Some(t.id);
            }
        }
    }

    /// Sends a sequence's Finished event and retires it.
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
        self.cluster.metrics.usage(
            u64::from(usage.prompt_tokens),
            u64::from(usage.completion_tokens),
            usage.time_to_first_token_ms / 1e3,
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
        self.retire(s);
    }

    /// Ends every running request with UNAVAILABLE; their sequences die with the stream.
    fn fail_running(&mut self, msg: &str) {
        for s in self.running.drain(..) {
            s.span
                .in_scope(|| tracing::warn!(error = msg, "request failed"));
            self.cluster.metrics.request_ended("unavailable");
            let _ = s.events.send(Err(unavailable(msg.to_owned())));
        }
        // The stream that held them is gone, and with it their state on every worker: their
        // KV, and the stream's prefix stores.
        self.release.clear();
        self.kv.reset_prefix();
        self.publish_load();
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
