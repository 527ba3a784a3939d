//! The coordinator's shared core: the [`ClusterState`] behind its one commit path and the
//! serving plan the scheduler follows, beside the node-local parts the services and control
//! tasks share — the liveness table ([`Liveness`]), the scheduler's load ([`Load`]) and the
//! plan controller's wake-up ([`Replan`]), each its own type with its own contract.
//!
//! Every state change goes through [`Cluster::commit`]: the command is proposed to Raft and
//! applied on every coordinator once committed (see `replica.rs`). After each apply the
//! published [`Serving`] value is brought in line with the state, so the scheduler learns of a
//! lost plan at once. The only methods here that touch two parts are the ones whose meaning
//! needs both ([`Cluster::heartbeat`]: a worker must be known; [`Cluster::adopt_workers`];
//! [`Cluster::drop_worker`]).

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::watch;

use crate::config::CoordinatorConfig;
use crate::error::CoordinatorError;
use crate::raft::{RaftHandle, RaftRole};
use crate::state::footprint::ModelFootprint;
pub use crate::state::liveness::{Liveness, Seen};
use crate::state::planner::Plan;
use crate::state::replica::Replica;
pub use crate::state::signals::{Load, Replan};
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

/// The replicated state and its commit path, with the node-local parts beside it.
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
    /// What the leader last heard from each worker.
    pub liveness: Liveness,
    /// The scheduler's published load.
    pub load: Load,
    /// Wakes the plan controller; remembers failed plans.
    pub replan: Replan,
    /// Prometheus metrics, updated by the API and the scheduler.
    pub metrics: Arc<crate::metrics::Metrics>,
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
        let metrics = Arc::new(crate::metrics::Metrics::new(&cfg.model));
        Self {
            cfg,
            footprint,
            kv_tokens,
            replica,
            raft,
            propose: tokio::sync::Mutex::new(()),
            liveness: Liveness::default(),
            load: Load::default(),
            replan: Replan::default(),
            metrics,
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

    /// Records a heartbeat; false (and nothing recorded) when the worker is unknown.
    pub fn heartbeat(&self, worker: &str, seen: Seen) -> bool {
        if self.replica.with(|st| st.worker(worker).is_none()) {
            return false;
        }
        self.liveness.record(worker, seen);
        true
    }

    /// Drops a worker the leader gave up on (silent, wedged): commits its removal, forgets
    /// what it heard from it and wakes the plan controller. The removal is committed before
    /// the controller is woken, so the next plan cannot include it. A worker already gone is
    /// no error. (Both parts, hence here.)
    pub async fn drop_worker(&self, id: &str) {
        if let Err(e) = self.remove_worker(id).await {
            tracing::debug!(worker = %id, error = %e, "not removed");
        }
    }

    /// Removes a worker for good (it left, or the leader gave up on it): commits its removal
    /// — which ends a plan it is part of — forgets what it heard from it and wakes the plan
    /// controller, in that order, so the next plan cannot include it. An unknown id is no
    /// error (already gone).
    ///
    /// # Errors
    /// As [`Cluster::commit`] (no longer leading, no quorum), the worker then still
    /// registered.
    pub async fn remove_worker(&self, id: &str) -> Result<(), CoordinatorError> {
        if self.replica.with(|st| st.worker(id).is_some()) {
            self.commit(Command::RemoveWorker { id: id.to_owned() })
                .await?;
        }
        self.liveness.forget(id);
        self.replan.request();
        Ok(())
    }

    /// Starts the liveness clock at `now` for every registered worker not heard from yet: a
    /// new leader gives each a full heartbeat timeout to find it, and a worker whose
    /// registration committed a moment before its first heartbeat was recorded is not silent.
    pub fn adopt_workers(&self, now: Instant) {
        let ids: Vec<String> = self
            .replica
            .with(|st| st.workers().map(|w| w.id.clone()).collect());
        self.liveness.adopt(ids, now);
    }
}
