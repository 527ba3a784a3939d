//! The coordinator's shared core: the [`ClusterState`] behind its one commit path, the
//! liveness table (not replicated), and the serving plan the scheduler follows.
//!
//! Every state change goes through [`Cluster::commit`]: the command is proposed to Raft and
//! applied on every coordinator once committed (see `replica.rs`). After each apply the
//! published [`Serving`] value is brought in line with the state, so the scheduler learns of a
//! lost plan at once. Liveness stays local to the leader.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use tokio::sync::{Notify, watch};

use crate::config::CoordinatorConfig;
use crate::error::CoordinatorError;
use crate::raft::{RaftHandle, RaftRole};
use crate::state::footprint::ModelFootprint;
use crate::state::planner::Plan;
use crate::state::replica::Replica;
use crate::state::{ClusterState, Command};

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
    replica: Arc<Replica>,
    raft: RaftHandle,
    /// Serialises [`Cluster::commit_with`], whose command depends on the state it saw.
    propose: tokio::sync::Mutex<()>,
    seen: Mutex<HashMap<String, Seen>>,
    /// Wakes the controller to (re)consider the plan.
    pub replan: Notify,
    failed_epoch: AtomicU64,
    running: AtomicUsize,
    queued: AtomicUsize,
    /// Prometheus metrics, updated by the API and the scheduler.
    pub metrics: Arc<crate::metrics::Metrics>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave these maps half-updated in a way later
    // readers would misread (every update is a single insert/remove).
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Cluster {
    /// A cluster over the replicated state `replica`, which the Raft node `raft` drives.
    pub fn new(
        cfg: CoordinatorConfig,
        footprint: ModelFootprint,
        kv_tokens: u32,
        replica: Arc<Replica>,
        raft: RaftHandle,
    ) -> Self {
        Self {
            cfg,
            footprint,
            kv_tokens,
            replica,
            raft,
            propose: tokio::sync::Mutex::new(()),
            seen: Mutex::new(HashMap::new()),
            replan: Notify::new(),
            failed_epoch: AtomicU64::new(0),
            running: AtomicUsize::new(0),
            queued: AtomicUsize::new(0),
            metrics: Arc::new(crate::metrics::Metrics::new()),
        }
    }

    /// A copy of the cluster state as applied on this node.
    pub fn state(&self) -> ClusterState {
        self.replica.state()
    }

    /// The Raft node.
    pub fn raft(&self) -> &RaftHandle {
        &self.raft
    }

    /// The replicated state.
    pub fn replica(&self) -> &Arc<Replica> {
        &self.replica
    }

    /// Whether this node is the Raft leader now.
    pub fn is_leader(&self) -> bool {
        self.raft.status().role == RaftRole::Leader
    }

    /// The leader's advertised address, when a leader is known and it is not this node.
    pub fn leader_address(&self) -> Option<String> {
        let st = self.raft.status();
        let leader = st.leader?;
        if leader == st.id {
            return None;
        }
        st.addresses.get(&leader).cloned()
    }

    /// Proposes a command through Raft and waits until it is applied here: the one way the
    /// state changes.
    ///
    /// # Errors
    /// [`CoordinatorError::Raft`] when this node is not the leader, the proposal was lost, or
    /// the state refused the command (unchanged then).
    pub async fn commit(&self, cmd: Command) -> Result<(), CoordinatorError> {
        tracing::debug!(?cmd, "propose");
        let data = serde_json::to_vec(&cmd)
            .map_err(|e| CoordinatorError::Internal(format!("serialising {cmd:?}: {e}")))?;
        self.raft.propose(data).await?;
        Ok(())
    }

    /// Builds a command from the current state and commits it, with no other such command in
    /// between (for ids the state assigns).
    ///
    /// # Errors
    /// As [`Cluster::commit`].
    pub async fn commit_with<R>(
        &self,
        make: impl FnOnce(&ClusterState) -> (Command, R),
    ) -> Result<R, CoordinatorError> {
        let _one_at_a_time = self.propose.lock().await;
        let (cmd, r) = self.replica.with(make);
        self.commit(cmd).await?;
        Ok(r)
    }

    /// Follows the serving plan.
    pub fn subscribe(&self) -> watch::Receiver<Option<Serving>> {
        self.replica.serving().subscribe()
    }

    /// Follows the serving plan while this node leads (`None` otherwise): what the scheduler
    /// drives.
    pub fn subscribe_leading(&self) -> watch::Receiver<Option<Serving>> {
        self.replica.leading().subscribe()
    }

    /// The serving plan now.
    pub fn serving(&self) -> Option<Serving> {
        self.replica.serving().borrow().clone()
    }

    /// Records a heartbeat; false when the worker is unknown.
    pub fn heartbeat(&self, worker: &str, seen: Seen) -> bool {
        if self.replica.with(|st| st.worker(worker).is_none()) {
            return false;
        }
        lock(&self.seen).insert(worker.to_owned(), seen);
        true
    }

    /// What was last heard from every worker.
    pub fn seen(&self) -> HashMap<String, Seen> {
        lock(&self.seen).clone()
    }

    /// Starts the liveness clock at `now` for every registered worker not heard from yet: a
    /// new leader gives each a full heartbeat timeout to find it, and a worker whose
    /// registration committed a moment before its first heartbeat was recorded is not silent.
    pub fn adopt_workers(&self, now: Instant) {
        let ids: Vec<String> = self
            .replica
            .with(|st| st.workers().map(|w| w.id.clone()).collect());
        let mut seen = lock(&self.seen);
        for id in ids {
            seen.entry(id).or_insert(Seen {
                at: now,
                resident_bytes: 0,
                weight_bytes: 0,
                plan_epoch: 0,
            });
        }
    }

    /// Records what a worker reported when it loaded its shard for the plan at `epoch`.
    pub fn record_load(&self, worker: &str, weight_bytes: u64, resident_bytes: u64, epoch: u64) {
        if let Some(s) = lock(&self.seen).get_mut(worker) {
            s.weight_bytes = weight_bytes;
            s.resident_bytes = resident_bytes;
            s.plan_epoch = epoch;
        }
    }

    /// Forgets all liveness (this node no longer leads).
    pub fn forget_all(&self) {
        lock(&self.seen).clear();
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
        self.metrics.set_running(running);
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
