//! The scheduler's pipeline stream of one plan epoch and the steps in flight on it: opening
//! it, sending a step, waiting for the next answer, and losing it.
//!
//! Up to `limit` steps are in flight at once (`--max-inflight-steps`, by default the plan's
//! number of stages), one per micro-batch: while the last stage computes one micro-batch the
//! earlier stages compute the next ones. The stream is FIFO at every stage, so answers come
//! back in the order the steps went out and each must name the oldest step in flight. The
//! ordering the workers rely on — prefix ops before the sequences that use them, a retain
//! after the step that computed its blocks, a release after every step of its sequence — is
//! the order steps are built in, which is the order they are sent in: a step in flight never
//! reorders anything, it only delays the answer that frees its sequences for their next step.

use std::collections::VecDeque;
use std::time::Instant;

use tessera_proto::cluster::v1 as cpb;
use tokio::sync::{mpsc, watch};
use tonic::{Status, Streaming};
use tracing::Instrument;

use super::{Scheduler, unavailable};
use crate::state::cluster::Serving;

/// A step sent and not answered yet.
struct Sent {
    step_id: u64,
    /// Its span, closed when its answer has been absorbed.
    span: tracing::Span,
    sent_at: Instant,
    /// Tokens it carries (0 for a step of releases alone).
    tokens: usize,
}

/// The pipeline stream of one plan epoch.
pub(super) struct Link {
    pub(super) epoch: u64,
    /// The most steps in flight at once (at least 1).
    pub(super) limit: usize,
    /// Ranks in the plan's context-parallel rings (1: none).
    pub(super) ring: u32,
    tx: mpsc::Sender<cpb::StepRequest>,
    rx: Streaming<cpb::StepResponse>,
    /// The steps in flight, oldest first.
    in_flight: VecDeque<Sent>,
    /// The plan's workers: whom a step timeout may blame.
    workers: Vec<String>,
}

impl Link {
    /// Whether another step may go out now.
    pub(super) fn has_room(&self) -> bool {
        self.in_flight.len() < self.limit
    }

    /// Whether a step is in flight.
    pub(super) fn busy(&self) -> bool {
        !self.in_flight.is_empty()
    }
}

/// What the scheduler woke up to while steps were in flight.
enum Woken {
    Answer(Result<Option<cpb::StepResponse>, Status>),
    PlanChanged,
    /// Boxed: a request is far larger than an answer.
    Submitted(Option<Box<super::Submit>>),
    /// The oldest step in flight passed its timeout.
    TimedOut,
}

impl Scheduler {
    /// Opens the pipeline stream of `serving`'s plan on its first stage.
    pub(super) async fn open(&self, serving: &Serving) -> Result<Link, Status> {
        let stream = super::super::open_pipeline(&self.cluster, serving).await?;
        Ok(Link {
            epoch: serving.epoch,
            limit: stream.limit,
            ring: serving.plan.stages.first().map_or(1, |s| s.cp_ranks.max(1)),
            tx: stream.tx,
            rx: stream.rx,
            in_flight: VecDeque::new(),
            workers: stream.workers,
        })
    }

    /// Sends a step inside its span; on failure loses the stream (see
    /// [`Scheduler::lose_link`]) and returns false.
    pub(super) async fn send_step(&mut self, mut step: cpb::StepRequest) -> bool {
        let span = self.step_span(&step);
        step.trace_context = tessera_telemetry::trace_context::inject(&span);
        let Some(link) = self.link.as_mut() else {
            return false;
        };
        let sent = Sent {
            step_id: step.step_id,
            span: span.clone(),
            sent_at: Instant::now(),
            tokens: step.seqs.iter().map(|s| s.tokens.len()).sum(),
        };
        if link.tx.send(step).instrument(span).await.is_err() {
            self.lose_link(&unavailable("the pipeline stream closed"));
            return false;
        }
        link.in_flight.push_back(sent);
        true
    }

    /// Waits for the oldest step's answer and feeds it to its sequences — or, while another
    /// step may go out, for a new request (queued, to be admitted into a micro-batch of its
    /// own at once). Loses the stream when it fails or the plan stops serving. False when the
    /// handle side is gone.
    pub(super) async fn next_answer(&mut self) -> bool {
        let Some(link) = self.link.as_mut() else {
            return true;
        };
        let epoch = link.epoch;
        let room = link.has_room();
        let floor = self.cluster.cfg.heartbeat_timeout * 2;
        let deadline = link.in_flight.front().map_or_else(
            || Instant::now() + floor,
            |s| s.sent_at + self.clock.timeout(s.tokens, floor),
        );
        let woken = tokio::select! {
            r = link.rx.message() => Woken::Answer(r),
            () = wait_plan_change(&mut self.serving, epoch) => Woken::PlanChanged,
            s = self.rx.recv(), if room => Woken::Submitted(s.map(Box::new)),
            () = tokio::time::sleep_until(deadline.into()) => Woken::TimedOut,
        };
        let resp = match woken {
            Woken::TimedOut => {
                self.step_timed_out().await;
                return true;
            }
            Woken::Submitted(Some(s)) => {
                self.queue.push_back(*s);
                return true;
            }
            Woken::Submitted(None) => return false,
            Woken::PlanChanged => {
                self.lose_link(&unavailable("a worker of the plan was lost mid-request"));
                return true;
            }
            Woken::Answer(r) => r,
        };
        let Some(sent) = link.in_flight.pop_front() else {
            self.lose_link(&unavailable("the pipeline answered with no step in flight"));
            return true;
        };
        let step_id = sent.step_id;
        let resp = match resp {
            Ok(Some(resp)) if resp.step_id == step_id => resp,
            Ok(Some(resp)) => {
                self.lose_link(&unavailable(format!(
                    "pipeline answered step {} for step {step_id}",
                    resp.step_id
                )));
                return true;
            }
            Ok(None) => {
                self.lose_link(&unavailable("the pipeline stream ended"));
                return true;
            }
            Err(status) => {
                self.lose_link(&unavailable(format!(
                    "a worker was lost mid-request: {}",
                    status.message()
                )));
                return true;
            }
        };
        if sent.tokens > 0 {
            // A release-only step is bookkeeping, not model work.
            let secs = sent.sent_at.elapsed().as_secs_f64();
            self.cluster.metrics.step(sent.tokens as u64, secs);
            self.clock.observe(sent.tokens, secs);
        }
        // Its sequences may go into the next step, whether they sampled or not (a prefill
        // chunk before the last samples nothing).
        for s in &mut self.running {
            if s.in_step == Some(step_id) {
                s.in_step = None;
            }
        }
        sent.span.in_scope(|| self.absorb(resp));
        true
    }

    /// The oldest step in flight went unanswered past its timeout: drops the workers the
    /// heartbeats show stuck on a step (committed before the re-plan the lost stream asks
    /// for, so the next plan leaves them out), then loses the stream.
    async fn step_timed_out(&mut self) {
        let Some(link) = self.link.as_ref() else {
            return;
        };
        let Some(oldest) = link.in_flight.front() else {
            return;
        };
        let (step_id, waited) = (oldest.step_id, oldest.sent_at.elapsed());
        let workers = link.workers.clone();
        let blamed = super::timeout::drop_wedged(&self.cluster, &workers, step_id, waited).await;
        self.lose_link(&unavailable(format!(
            "step {step_id} had no answer in {} ms{blamed}",
            waited.as_millis()
        )));
    }

    /// Drops the stream after a failure: every running request (on every step in flight)
    /// is migrated to the next plan (see [`super::migrate`]), the epoch is not used again,
    /// and the controller re-plans.
    pub(super) fn lose_link(&mut self, status: &Status) {
        let Some(link) = self.link.take() else {
            return;
        };
        let epoch = link.epoch;
        if self.running.is_empty() {
            // Steps of releases alone: no request lost (a cluster stopping, typically).
            tracing::info!(epoch, error = %status.message(), "pipeline closed while idle");
        } else {
            tracing::warn!(epoch, error = %status.message(), in_flight = link.in_flight.len(),
                "pipeline failed");
        }
        self.dead_epoch = epoch;
        self.migrate_running(status.message());
        self.cluster.replan.report_failure(epoch);
    }
}

/// Resolves once the serving plan is no longer the one of `epoch`.
pub(crate) async fn wait_plan_change(serving: &mut watch::Receiver<Option<Serving>>, epoch: u64) {
    loop {
        if serving.borrow_and_update().as_ref().map(|s| s.epoch) != Some(epoch) {
            return;
        }
        if serving.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}
