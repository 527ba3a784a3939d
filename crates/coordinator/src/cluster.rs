//! The coordinator's shared core: the [`ClusterState`] behind its one commit path, the
//! liveness table (not replicated), and the serving plan the scheduler follows.
//!
//! Every state change goes through [`Cluster::commit`]; with Raft, that is where a command is
//! proposed and applied once committed. After each commit the published [`Serving`] value is
//! brought in line with the state, so the scheduler learns of a lost plan at once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use tokio::sync::{Notify, watch};

use crate::config::CoordinatorConfig;
use crate::footprint::ModelFootprint;
use crate::planner::Plan;
use crate::state::{ClusterState, Command, StateError};

/// A loaded plan the scheduler can send steps to.
#[derive(Clone, Debug, PartialEq)]
pub struct Serving {
    /// The plan's epoch (each epoch gets its own pipeline stream).
    pub epoch: u64,
    /// host:port of the first stage's worker.
    pub stage0: String,
    /// The plan.
    pub plan: Plan,
}

/// What the coordinator last heard from a worker (kept outside the replicated state).
#[derive(Clone, Copy, Debug)]
pub struct Seen {
    /// When its last heartbeat (or registration) arrived.
    pub at: Instant,
    /// Its resident set size.
    pub resident_bytes: u64,
    /// Bytes of weights it holds.
    pub weight_bytes: u64,
    /// The plan epoch of its loaded shard.
    pub plan_epoch: u64,
}

/// State, liveness and the serving plan, shared by the services and tasks.
#[derive(Debug)]
pub struct Cluster {
    /// The configuration.
    pub cfg: CoordinatorConfig,
    /// The model's footprint, for planning.
    pub footprint: ModelFootprint,
    /// KV capacity per worker, in tokens.
    pub kv_tokens: u32,
    state: Mutex<ClusterState>,
    seen: Mutex<HashMap<String, Seen>>,
    serving: watch::Sender<Option<Serving>>,
    /// Wakes the controller to (re)consider the plan.
    pub replan: Notify,
    failed_epoch: AtomicU64,
    running: AtomicUsize,
    queued: AtomicUsize,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave these maps half-updated in a way later
    // readers would misread (every update is a single insert/remove or a whole apply).
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Cluster {
    /// A cluster with no workers yet.
    pub fn new(cfg: CoordinatorConfig, footprint: ModelFootprint, kv_tokens: u32) -> Self {
        let state = ClusterState::new(&cfg.model);
        Self {
            cfg,
            footprint,
            kv_tokens,
            state: Mutex::new(state),
            seen: Mutex::new(HashMap::new()),
            serving: watch::channel(None).0,
            replan: Notify::new(),
            failed_epoch: AtomicU64::new(0),
            running: AtomicUsize::new(0),
            queued: AtomicUsize::new(0),
        }
    }

    /// A copy of the cluster state.
    pub fn state(&self) -> ClusterState {
        lock(&self.state).clone()
    }

    /// Applies a command: the one way the state changes.
    ///
    /// # Errors
    /// When the state refuses it (unchanged then).
    pub fn commit(&self, cmd: Command) -> Result<(), StateError> {
        let mut st = lock(&self.state);
        tracing::debug!(?cmd, "commit");
        st.apply(cmd)?;
        self.publish(&st);
        Ok(())
    }

    /// Builds a command from the current state and applies it, atomically (for ids the
    /// state assigns).
    ///
    /// # Errors
    /// As [`Cluster::commit`].
    pub fn commit_with<R>(
        &self,
        make: impl FnOnce(&ClusterState) -> (Command, R),
    ) -> Result<R, StateError> {
        let mut st = lock(&self.state);
        let (cmd, r) = make(&st);
        tracing::debug!(?cmd, "commit");
        st.apply(cmd)?;
        self.publish(&st);
        Ok(r)
    }

    fn publish(&self, st: &ClusterState) {
        let next = match (st.ready(), st.plan()) {
            (true, Some(plan)) => plan.stages.first().and_then(|s0| {
                st.worker(&s0.worker_id).map(|w| Serving {
                    epoch: st.plan_epoch(),
                    stage0: w.address.clone(),
                    plan: plan.clone(),
                })
            }),
            _ => None,
        };
        self.serving.send_if_modified(|cur| {
            if *cur == next {
                false
            } else {
                *cur = next;
                true
            }
        });
    }

    /// Follows the serving plan.
    pub fn subscribe(&self) -> watch::Receiver<Option<Serving>> {
        self.serving.subscribe()
    }

    /// The serving plan now.
    pub fn serving(&self) -> Option<Serving> {
        self.serving.borrow().clone()
    }

    /// Records a heartbeat; false when the worker is unknown.
    pub fn heartbeat(&self, worker: &str, seen: Seen) -> bool {
        if lock(&self.state).worker(worker).is_none() {
            return false;
        }
        lock(&self.seen).insert(worker.to_owned(), seen);
        true
    }

    /// What was last heard from every worker.
    pub fn seen(&self) -> HashMap<String, Seen> {
        lock(&self.seen).clone()
    }

    /// Forgets a worker's liveness entry.
    pub fn forget(&self, worker: &str) {
        lock(&self.seen).remove(worker);
    }

    /// The scheduler reports that the plan at `epoch` failed (stream broken): the controller
    /// replaces it.
    pub fn report_failure(&self, epoch: u64) {
        self.failed_epoch.fetch_max(epoch, Ordering::SeqCst);
        self.replan.notify_one();
    }

    /// The highest plan epoch reported failed.
    pub fn failed_epoch(&self) -> u64 {
        self.failed_epoch.load(Ordering::SeqCst)
    }

    /// The scheduler's counts: requests generating, and waiting.
    pub fn set_load(&self, running: usize, queued: usize) {
        self.running.store(running, Ordering::SeqCst);
        self.queued.store(queued, Ordering::SeqCst);
    }

    /// Requests generating now.
    pub fn running(&self) -> usize {
        self.running.load(Ordering::SeqCst)
    }

    /// Requests generating or waiting.
    pub fn busy(&self) -> bool {
        self.running() + self.queued.load(Ordering::SeqCst) > 0
    }
}
