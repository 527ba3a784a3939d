//! The continuous-batching scheduler: a cloneable [`SchedulerHandle`] and one task that owns
//! the queue, the running batch and the pipeline stream.
//!
//! Requests are admitted while the KV cache allows (prompt + max_tokens reserved, in whole
//! blocks, less the cached prefix blocks a prompt starts with; the reservation frees itself on
//! drop; see [`super::kv_budget`]). Each step carries one decode token per
//! sequence of its micro-batch and prefill chunks of at most `prefill_chunk` tokens,
//! `max_batch_tokens` in all, on ONE long-lived Pipeline stream to stage 0, opened per plan
//! epoch. Sampled tokens go through each request's [`OutputStream`] (the engine's own
//! detokenizer and stop checker) to the client. Finished and abandoned sequences are released
//! in-band on the next step (a step of releases alone when no sequence runs, so an idle
//! cluster holds no KV but its prefix cache).
//!
//! Micro-batches: with a plan of S > 1 stages, up to `max_inflight_steps` (default S) steps
//! are in flight at once ([`link`]), so every stage computes while the others do. The running
//! sequences are split into that many disjoint micro-batches: a step takes at most
//! `ceil(running / limit)` sequences not already in flight — those that waited longest
//! first — because a sequence's next decode token is the previous step's answer. Each
//! micro-batch cycles on its own: sent, answered, absorbed, its next step built and sent at
//! once while the others are still in flight. With one step in flight (S = 1, or
//! `max_inflight_steps` 1) a step takes every running sequence, as a single batch.
//!
//! Prefix caching (unless off): a sequence starts from the cached blocks its prompt begins
//! with ([`super::prefix`]), named in its SeqStart; when it ends, its prompt blocks are
//! cached. The workers' stores follow this stream's index through each step's prefix ops.
//!
//! Failure ([`migrate`]): when the stream breaks or the serving plan goes away (a plan worker
//! dropped by the liveness monitor, or replaced), the controller re-plans and every running
//! request — on every step in flight — is migrated, not failed: the scheduler keeps each
//! sequence's prompt and the tokens it streamed, and replays them into the next plan (its
//! sampler resumed after them on the last stage), so the client's stream goes on with the
//! tokens the first plan would have produced. A sequence that waits longer than
//! `ready_wait` for a new plan, or loses its plan [`migrate::MAX_MIGRATIONS`] times, ends with
//! UNAVAILABLE; queued requests wait for the new plan up to `ready_wait` as well. A step that
//! goes unanswered past its [`timeout`] (a worker wedged while it heartbeats) loses the stream
//! the same way, after dropping the worker whose heartbeats show it stuck on that step.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use tessera_proto::status::final_unavailable;
use tessera_proto::v1 as pb;
use tessera_text::frontend::{Frontend, OutputStream};
use tessera_text::sampling::SampledToken;
use tokio::sync::{mpsc, watch};
use tonic::Status;

use super::kv_budget::{KvBudget, KvReservation};
use crate::error::CoordinatorError;
use crate::services::validate::ValidRequest;
use crate::state::cluster::{Cluster, Serving};
use crate::state::planner;

mod link;
mod migrate;
mod step;
pub(crate) mod timeout;

pub(crate) use link::wait_plan_change;
pub(crate) use migrate::MAX_MIGRATIONS;

use link::Link;

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
pub(crate) struct QueueSlot(pub(crate) Arc<AtomicUsize>);

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
    /// The step in flight it is part of: it joins no other until that one is answered.
    in_step: Option<u64>,
    /// The latest step it was part of (0: none yet); the longest waiting go first.
    last_step: u64,
    first_token: Option<Instant>,
    /// When its latest token came (inter-token latency counts from here).
    last_token: Option<Instant>,
    /// The lengths of the steps its input went to the workers in, first run only (the
    /// cached prefix it started from counts as one): what a migration replays them in.
    chunks: Vec<u32>,
    /// Every token streamed to the client so far, in order: what a migration replays.
    generated: Vec<u32>,
    /// Generated tokens replayed after the prompt since its latest migration (0: never
    /// migrated): its input is `prompt ++ generated[..resumed]`, and its next sample follows.
    resumed: usize,
    /// How many plans it lost.
    migrations: u32,
    /// Since when it waits for a new plan to replay into (`None` once its replay started).
    stranded_since: Option<Instant>,
    span: tracing::Span,
    /// Its KV reservation; `None` while a migrated sequence waits for room on the new plan
    /// (see [`migrate`]): it joins no step until it has one.
    kv: Option<KvReservation>,
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
    /// What answered steps took: the step timeout's measure (see [`timeout`]).
    clock: timeout::StepClock,
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
        clock: timeout::StepClock::default(),
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
                self.migrate_running(&format!(
                    "the plan of epoch {} stopped serving (a worker was lost)",
                    link.epoch
                ));
            }
            if serving.is_none() && !self.cluster.replica().is_leading() {
                self.abdicate();
            }
            self.expire_queue(serving.is_some());
            self.expire_stranded(serving.is_some());
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
                        let cfg = &self.cluster.cfg;
                        self.kv.set_ring(
                            link.ring,
                            planner::rank_kv_tokens(
                                self.cluster.kv_tokens,
                                link.ring,
                                cfg.block_size,
                            ),
                        );
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
            // Fill the free places on the stream: one step per micro-batch.
            while self.link.as_ref().is_some_and(Link::has_room) {
                let Some(step) = self.build_step() else {
                    break;
                };
                if !self.send_step(step).await {
                    break;
                }
            }
            if self.link.as_ref().is_some_and(Link::busy) {
                if !self.next_answer().await {
                    return;
                }
            } else if self.link.is_some() && !self.wait_for_work(false).await {
                return;
            }
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
            .chain(
                self.running
                    .iter()
                    .filter_map(|s| s.stranded_since.map(|t| t + wait)),
            )
            .min()
            .filter(|_| deadlines);
        // While requests wait (queued, or stranded by a lost plan), look at them every
        // QUEUE_SWEEP too: one whose client left gives its place back then, not only when
        // something else wakes the task.
        let waiting =
            !self.queue.is_empty() || self.running.iter().any(|s| s.stranded_since.is_some());
        let sweep = waiting.then(|| Instant::now() + QUEUE_SWEEP);
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
            // Running requests' reservations; cached prefix blocks are evictable, not in use.
            self.kv.used_tokens().saturating_sub(
                self.kv.cached_blocks() as u64 * u64::from(self.cluster.cfg.block_size.max(1)),
            ),
            self.kv.capacity(),
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
                let _ = s.events.send(Err(final_unavailable(format!(
                    "no plan serves the model: {why}"
                ))));
                return false;
            }
            true
        });
    }

    /// Gives migrated sequences their KV back, oldest first, then admits queued requests,
    /// oldest first, while their KV reservation fits (evicting unreferenced cached prefix
    /// blocks when that makes it fit). No queued request overtakes a migrated one: its
    /// client has waited longer, and holds tokens already.
    fn admit(&mut self) {
        if !self.readmit_migrated() {
            return;
        }
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
            self.cluster
                .metrics
                .queued_for(s.req.received.elapsed().as_secs_f64());
            // A resumed request (see `migrate`) replays what its client already has: the
            // output stream reads those tokens without sending them, the workers get them
            // after the prompt, and the stream goes on from the next one.
            let generated = s.req.resume.clone();
            let mut output = self.frontend.output(&s.req.inner);
            let mut done = None;
            for &t in &generated {
                done = output
                    .push(SampledToken {
                        id: t,
                        logprob: None,
                        top_logprobs: Vec::new(),
                    })
                    .1;
            }
            self.running.push(Seq {
                id,
                output,
                req: s.req,
                events: s.events,
                prefilled: adm.cached_tokens,
                chunks: (adm.cached_tokens > 0)
                    .then_some(adm.cached_tokens as u32)
                    .into_iter()
                    .collect(),
                chain: adm.chain,
                next: None,
                started: false,
                in_step: None,
                last_step: 0,
                first_token: None,
                last_token: None,
                resumed: generated.len(),
                generated,
                migrations: 0,
                stranded_since: None,
                span: s.span,
                kv: Some(adm.reservation),
            });
            if let Some(reason) = done {
                // What the client has already ends the request (a stop string it holds):
                // it needed only its Finished event.
                if let Some(s) = self.running.pop() {
                    self.finish(s, reason);
                }
            }
        }
    }

    /// Reserves the KV of migrated sequences waiting for it (see [`migrate`]), oldest first,
    /// while it fits; whether none waits any more.
    fn readmit_migrated(&mut self) -> bool {
        let mut waiting: Vec<usize> = (0..self.running.len())
            .filter(|&i| self.running[i].kv.is_none())
            .collect();
        waiting.sort_by_key(|&i| self.running[i].id);
        for i in waiting {
            let s = &mut self.running[i];
            match self.kv.readmit(s.req.max_len()) {
                Some(r) => s.kv = Some(r),
                None => return false,
            }
        }
        true
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
}
