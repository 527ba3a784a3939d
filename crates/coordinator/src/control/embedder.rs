//! The embedding scheduler, for clusters that serve an encoder: a cloneable
//! [`EmbedderHandle`] and one task that owns the queue of inputs and the pipeline stream.
//!
//! An encoder keeps no state between steps (see "Encoder shards" in `worker.proto`), so
//! this is the generation scheduler without sequences, KV or sampling:
//!
//! 1. a request is split into its inputs, queued in arrival order;
//! 2. each step takes queued inputs — from any number of requests — up to
//!    `max_batch_tokens` tokens (at least one input), as whole inputs, and goes to stage 0 of
//!    ONE long-lived Pipeline stream per plan epoch; up to `max_inflight_steps` (by default
//!    the plan's stages) are in flight, so every stage computes while the others do;
//! 3. each answer (in step order: the stream is FIFO at every stage) gives every input of
//!    the step its vector; a request is answered when all of its inputs have one.
//!
//! Failure: when the stream breaks, the plan changes, or the oldest step goes unanswered past
//! its timeout ([`timeout`]; wedged workers are dropped as the generation scheduler does), the
//! inputs of every step in flight go back to the front of the queue, in order, and run again
//! on the next plan: recomputing an input gives the same vector, so a client sees nothing but
//! the delay. A request that loses [`MAX_MIGRATIONS`] plans, or waits `ready_wait` with no
//! plan serving, ends with UNAVAILABLE; one whose client went away is dropped from the queue.
//! At most `max_queued` requests are unanswered at once, queued or running
//! (RESOURCE_EXHAUSTED beyond).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use tessera_proto::cluster::v1 as cpb;
use tokio::sync::{mpsc, oneshot, watch};
use tonic::{Status, Streaming};
use tracing::Instrument;

use super::scheduler::timeout::{self, StepClock};
use super::scheduler::{QueueSlot, wait_plan_change};
use crate::error::CoordinatorError;
use crate::services::embed::ValidEmbedRequest;
use crate::state::cluster::{Cluster, Serving};

/// How many plans a request may lose before it fails.
const MAX_MIGRATIONS: u32 = super::scheduler::MAX_MIGRATIONS;
/// How often waiting requests are looked at for clients that left.
const QUEUE_SWEEP: std::time::Duration = std::time::Duration::from_millis(500);

/// What a request gets: one vector per input, in input order.
pub type EmbedResult = Result<Vec<Vec<f32>>, Status>;

/// One request handed to the task.
struct Submit {
    req: ValidEmbedRequest,
    reply: oneshot::Sender<EmbedResult>,
    span: tracing::Span,
    /// Its place under `max_queued`, handed on to its [`Job`].
    slot: QueueSlot,
}

/// Submits requests to the embedding task.
#[derive(Clone, Debug)]
pub struct EmbedderHandle {
    tx: mpsc::UnboundedSender<Submit>,
    queued: Arc<AtomicUsize>,
    max_queued: usize,
}

impl EmbedderHandle {
    /// Queues a validated request; the answer comes on the returned receiver. Dropping the
    /// receiver cancels whatever of it has not run.
    ///
    /// # Errors
    /// [`CoordinatorError::ResourceExhausted`] when `max_queued` requests already wait;
    /// [`CoordinatorError::Internal`] when the task is gone.
    pub fn submit(
        &self,
        req: ValidEmbedRequest,
    ) -> Result<oneshot::Receiver<EmbedResult>, CoordinatorError> {
        let slot = QueueSlot(Arc::clone(&self.queued));
        let waiting = self.queued.fetch_add(1, Ordering::SeqCst);
        if waiting >= self.max_queued {
            return Err(CoordinatorError::ResourceExhausted(format!(
                "{waiting} requests are already waiting (--max-queued {}); retry later",
                self.max_queued
            )));
        }
        let span = tracing::info_span!(parent: None, "embed", request_id = %req.request_id,
            inputs = req.inputs.len(), tokens = req.tokens());
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Submit {
                req,
                reply,
                span,
                slot,
            })
            .map_err(|_| {
                CoordinatorError::Internal("the embedding scheduler has stopped".into())
            })?;
        Ok(rx)
    }
}

/// A request being served.
struct Job {
    inputs: Vec<Vec<u32>>,
    out: Vec<Option<Vec<f32>>>,
    /// Inputs without a vector yet.
    left: usize,
    migrations: u32,
    /// Since when it waits with no plan to run on (arrival, or its latest lost plan).
    waiting_since: Instant,
    reply: oneshot::Sender<EmbedResult>,
    span: tracing::Span,
    /// Its place under `max_queued`, held until it is answered or dropped: an embed request
    /// counts until it ends, not only while it sits in the channel.
    _slot: QueueSlot,
}

/// A step sent and not answered yet: which (request, input) each of its `seq_id`s is.
struct Sent {
    step_id: u64,
    items: Vec<(u64, usize)>,
    tokens: usize,
    sent_at: Instant,
    span: tracing::Span,
}

/// The pipeline stream of one plan epoch.
struct Link {
    epoch: u64,
    limit: usize,
    tx: mpsc::Sender<cpb::StepRequest>,
    rx: Streaming<cpb::StepResponse>,
    in_flight: VecDeque<Sent>,
    workers: Vec<String>,
}

/// The task's state.
struct Embedder {
    cluster: Arc<Cluster>,
    rx: mpsc::UnboundedReceiver<Submit>,
    serving: watch::Receiver<Option<Serving>>,
    jobs: HashMap<u64, Job>,
    /// Inputs waiting for a step, oldest first: (request, input index).
    pending: VecDeque<(u64, usize)>,
    link: Option<Link>,
    next_job: u64,
    next_step: u64,
    dead_epoch: u64,
    clock: StepClock,
}

/// What the task woke up to.
enum Woken {
    Answer(Result<Option<cpb::StepResponse>, Status>),
    Submitted(Option<Submit>),
    PlanChanged,
    TimedOut,
    Sweep,
}

/// Starts the embedding task; returns its handle and the task.
pub fn spawn(cluster: Arc<Cluster>) -> (EmbedderHandle, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let handle = EmbedderHandle {
        tx,
        queued: Arc::new(AtomicUsize::new(0)),
        max_queued: cluster.cfg.max_queued,
    };
    let e = Embedder {
        serving: cluster.subscribe_leading(),
        cluster,
        rx,
        jobs: HashMap::new(),
        pending: VecDeque::new(),
        link: None,
        next_job: 1,
        next_step: 1,
        dead_epoch: 0,
        clock: StepClock::default(),
    };
    (handle, tokio::spawn(e.run()))
}

fn unavailable(msg: impl Into<String>) -> Status {
    CoordinatorError::Unavailable(msg.into()).into()
}

impl Embedder {
    async fn run(mut self) {
        loop {
            while let Ok(s) = self.rx.try_recv() {
                self.accept(s);
            }
            let dead = self.dead_epoch;
            let serving = self
                .serving
                .borrow_and_update()
                .clone()
                .filter(|s| s.epoch > dead);
            if self.link.as_ref().map(|l| l.epoch) != serving.as_ref().map(|s| s.epoch) {
                self.lose_link("the plan stopped serving (a worker was lost)");
            }
            if serving.is_none() && !self.cluster.replica().is_leading() {
                self.abdicate();
            }
            self.expire(serving.is_some());
            self.publish_load();
            let Some(serving) = serving else {
                if !self.wait(None).await {
                    return;
                }
                continue;
            };
            if self.link.is_none() {
                match self.open(&serving).await {
                    Ok(link) => self.link = Some(link),
                    Err(e) => {
                        tracing::warn!(epoch = serving.epoch, error = %e, "embedding pipeline failed to open");
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
            while self
                .link
                .as_ref()
                .is_some_and(|l| l.in_flight.len() < l.limit)
                && !self.pending.is_empty()
            {
                if !self.send_step().await {
                    break;
                }
            }
            let epoch = serving.epoch;
            if !self.wait(Some(epoch)).await {
                return;
            }
        }
    }

    /// Takes a request in: its inputs join the end of the queue.
    fn accept(&mut self, s: Submit) {
        let id = self.next_job;
        self.next_job += 1;
        let n = s.req.inputs.len();
        self.pending.extend((0..n).map(|i| (id, i)));
        self.jobs.insert(
            id,
            Job {
                inputs: s.req.inputs,
                out: vec![None; n],
                left: n,
                migrations: 0,
                waiting_since: s.req.received,
                reply: s.reply,
                span: s.span,
                _slot: s.slot,
            },
        );
    }

    /// Ends requests whose client left, and (when no plan serves) those that waited
    /// `ready_wait` for one.
    fn expire(&mut self, serving: bool) {
        let wait = self.cluster.cfg.ready_wait;
        let reason = self.cluster.replan.failure();
        let mut gone = Vec::new();
        for (id, job) in &self.jobs {
            if job.reply.is_closed() {
                gone.push((*id, None));
            } else if !serving && job.waiting_since.elapsed() >= wait {
                let why = reason
                    .clone()
                    .unwrap_or_else(|| format!("waited {wait:?} for enough workers"));
                gone.push((*id, Some(format!("no plan serves the model: {why}"))));
            }
        }
        for (id, why) in gone {
            match why {
                None => self.finish(id, None),
                Some(why) => self.finish(id, Some(unavailable(why))),
            }
        }
    }

    /// This coordinator stopped leading: every request ends with UNAVAILABLE at once (the new
    /// leader's scheduler serves a retry; waiting here would only delay it).
    fn abdicate(&mut self) {
        let ids: Vec<u64> = self.jobs.keys().copied().collect();
        for id in ids {
            let msg = "this coordinator stopped leading; retry the request on the new leader";
            self.finish(id, Some(unavailable(msg)));
        }
    }

    /// Ends request `id`: with its vectors, or with `error` (`None` and vectors missing: its
    /// client left). Its inputs still queued leave the queue; any in flight are ignored when
    /// their answers come.
    fn finish(&mut self, id: u64, error: Option<Status>) {
        let Some(job) = self.jobs.remove(&id) else {
            return;
        };
        self.pending.retain(|(j, _)| *j != id);
        let outcome = match (error, job.left) {
            (Some(e), _) => {
                job.span
                    .in_scope(|| tracing::warn!(error = %e.message(), "embed request failed"));
                let _ = job.reply.send(Err(e));
                "unavailable"
            }
            (None, 0) => {
                let vectors = job.out.into_iter().flatten().collect();
                let _ = job.reply.send(Ok(vectors));
                "ok"
            }
            (None, _) => {
                job.span
                    .in_scope(|| tracing::info!("client went away; cancelling"));
                "cancelled"
            }
        };
        self.cluster.metrics.request_ended(outcome);
    }

    fn publish_load(&self) {
        let running = self.link.as_ref().map_or(0, |l| l.in_flight.len());
        self.cluster.load.set(running, self.jobs.len());
        self.cluster
            .metrics
            .set_load(running, self.pending.len(), 0, 0);
    }

    /// Opens the pipeline stream of `serving`'s plan on its first stage.
    async fn open(&self, serving: &Serving) -> Result<Link, Status> {
        let stream = super::open_pipeline(&self.cluster, serving).await?;
        Ok(Link {
            epoch: serving.epoch,
            limit: stream.limit,
            tx: stream.tx,
            rx: stream.rx,
            in_flight: VecDeque::new(),
            workers: stream.workers,
        })
    }

    /// Builds the next step from the front of the queue and sends it; false when the stream
    /// failed (and was lost).
    async fn send_step(&mut self) -> bool {
        let budget = self.cluster.cfg.max_batch_tokens.max(1) as usize;
        let (mut items, mut seqs, mut tokens) = (Vec::new(), Vec::new(), 0);
        while let Some(&(job, index)) = self.pending.front() {
            let Some(j) = self.jobs.get(&job) else {
                self.pending.pop_front();
                continue;
            };
            let input = &j.inputs[index];
            if !items.is_empty() && tokens + input.len() > budget {
                break;
            }
            self.pending.pop_front();
            tokens += input.len();
            seqs.push(cpb::SeqStep {
                seq_id: items.len() as u64,
                tokens: input.clone(),
                sample: false,
                start: None,
            });
            items.push((job, index));
        }
        if items.is_empty() {
            return true;
        }
        let Some(link) = self.link.as_mut() else {
            return false;
        };
        let step_id = self.next_step;
        self.next_step += 1;
        let span = tracing::info_span!("embed_step", step_id, inputs = items.len(), tokens);
        let step = cpb::StepRequest {
            plan_epoch: link.epoch,
            step_id,
            seqs,
            trace_context: tessera_telemetry::trace_context::inject(&span),
            ..Default::default()
        };
        link.in_flight.push_back(Sent {
            step_id,
            items,
            tokens,
            sent_at: Instant::now(),
            span: span.clone(),
        });
        if link.tx.send(step).instrument(span).await.is_err() {
            self.lose_link("the pipeline stream closed");
            return false;
        }
        true
    }

    /// Waits for something to do: an answer, a request, the plan changing, the oldest step's
    /// timeout, or the queue sweep. False when the handle side is gone.
    async fn wait(&mut self, epoch: Option<u64>) -> bool {
        let floor = self.cluster.cfg.heartbeat_timeout * 2;
        let oldest = self
            .link
            .as_ref()
            .and_then(|l| l.in_flight.front())
            .map(|s| s.sent_at + self.clock.timeout(s.tokens, floor));
        let sweep = Instant::now() + QUEUE_SWEEP;
        let deadline = oldest.map_or(sweep, |d| d.min(sweep));
        let timed_out = oldest.is_some_and(|d| d <= sweep);
        let (link, serving, rx) = (&mut self.link, &mut self.serving, &mut self.rx);
        let answer = async {
            match link.as_mut().filter(|l| !l.in_flight.is_empty()) {
                Some(l) => l.rx.message().await,
                None => std::future::pending().await,
            }
        };
        let plan_change = async {
            match epoch {
                Some(e) => wait_plan_change(serving, e).await,
                // No plan: any change may bring one (a closed watch never does).
                None => {
                    if serving.changed().await.is_err() {
                        std::future::pending::<()>().await;
                    }
                }
            }
        };
        let woken = tokio::select! {
            r = answer => Woken::Answer(r),
            s = rx.recv() => Woken::Submitted(s),
            () = plan_change => Woken::PlanChanged,
            () = tokio::time::sleep_until(deadline.into()) => {
                if timed_out { Woken::TimedOut } else { Woken::Sweep }
            }
        };
        match woken {
            Woken::Submitted(Some(s)) => self.accept(s),
            Woken::Submitted(None) => return false,
            Woken::PlanChanged => self.lose_link("a worker of the plan was lost mid-request"),
            Woken::Sweep => {}
            Woken::TimedOut => self.step_timed_out().await,
            Woken::Answer(r) => self.absorb(r),
        }
        true
    }

    /// Takes the oldest step's answer.
    fn absorb(&mut self, resp: Result<Option<cpb::StepResponse>, Status>) {
        let Some(sent) = self.link.as_mut().and_then(|l| l.in_flight.pop_front()) else {
            return self.lose_link("the pipeline answered with no step in flight");
        };
        let resp = match resp {
            Ok(Some(r)) if r.step_id == sent.step_id => r,
            Ok(Some(r)) => {
                let msg = format!(
                    "pipeline answered step {} for step {}",
                    r.step_id, sent.step_id
                );
                return self.lose_with(sent, &msg);
            }
            Ok(None) => return self.lose_with(sent, "the pipeline stream ended"),
            Err(status) => {
                let msg = format!("a worker was lost mid-request: {}", status.message());
                return self.lose_with(sent, &msg);
            }
        };
        if resp.embeddings.len() != sent.items.len() {
            let msg = format!(
                "step {} answered {} embeddings for {} inputs",
                sent.step_id,
                resp.embeddings.len(),
                sent.items.len()
            );
            return self.lose_with(sent, &msg);
        }
        let secs = sent.sent_at.elapsed().as_secs_f64();
        self.cluster.metrics.step(sent.tokens as u64, secs);
        self.clock.observe(sent.tokens, secs);
        let _g = sent.span.enter();
        let mut done = Vec::new();
        for e in resp.embeddings {
            let Some(&(job, index)) = sent.items.get(e.seq_id as usize) else {
                continue;
            };
            // A request whose client left is gone; its inputs' answers are dropped.
            if let Some(j) = self.jobs.get_mut(&job)
                && j.out[index].is_none()
            {
                j.out[index] = Some(e.values);
                j.left -= 1;
                if j.left == 0 {
                    done.push(job);
                }
            }
        }
        for job in done {
            self.finish(job, None);
        }
    }

    /// Loses the stream after `sent` (already taken off it) failed: it goes back first.
    fn lose_with(&mut self, sent: Sent, why: &str) {
        if let Some(link) = self.link.as_mut() {
            link.in_flight.push_front(sent);
        }
        self.lose_link(why);
    }

    /// The oldest step went unanswered past its timeout: drops wedged workers, loses the
    /// stream.
    async fn step_timed_out(&mut self) {
        let Some((step_id, waited, workers)) = self.link.as_ref().and_then(|l| {
            let s = l.in_flight.front()?;
            Some((s.step_id, s.sent_at.elapsed(), l.workers.clone()))
        }) else {
            return;
        };
        let blamed = timeout::drop_wedged(&self.cluster, &workers, step_id, waited).await;
        self.lose_link(&format!(
            "step {step_id} had no answer in {} ms{blamed}",
            waited.as_millis()
        ));
    }

    /// Drops the stream: the inputs of every step in flight go back to the front of the
    /// queue in their order, their requests count a lost plan (past [`MAX_MIGRATIONS`] they
    /// fail), the epoch is not used again, and the controller re-plans.
    fn lose_link(&mut self, why: &str) {
        let Some(link) = self.link.take() else {
            return;
        };
        let epoch = link.epoch;
        if link.in_flight.is_empty() {
            // No input lost (a cluster stopping, typically).
            tracing::info!(epoch, error = why, "embedding pipeline closed while idle");
        } else {
            tracing::warn!(
                epoch,
                error = why,
                in_flight = link.in_flight.len(),
                "embedding pipeline lost"
            );
        }
        let now = Instant::now();
        let mut hit = Vec::new();
        for sent in link.in_flight.into_iter().rev() {
            for item in sent.items.into_iter().rev() {
                if self.jobs.contains_key(&item.0) {
                    self.pending.push_front(item);
                    hit.push(item.0);
                }
            }
        }
        hit.sort_unstable();
        hit.dedup();
        for id in hit {
            let Some(job) = self.jobs.get_mut(&id) else {
                continue;
            };
            job.migrations += 1;
            job.waiting_since = now;
            if job.migrations > MAX_MIGRATIONS {
                let msg = format!("{why}; the request lost {MAX_MIGRATIONS} plans, giving up");
                self.finish(id, Some(unavailable(msg)));
            } else {
                self.cluster.metrics.migrated(0);
            }
        }
        self.dead_epoch = epoch;
        self.cluster.replan.report_failure(epoch);
    }
}
