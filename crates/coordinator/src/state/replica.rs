//! The coordinator's [`ClusterState`] as the Raft state machine: every node applies the same
//! committed [`Command`]s (serde JSON in the log) to its own copy and publishes the serving plan
//! they describe.
//!
//! Two serving values are published: the cluster-wide one (readiness, status, model listing on
//! every coordinator) and the one the local scheduler follows, which is set only while this node
//! leads, so a follower never opens a pipeline stream to the workers.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::watch;

use crate::raft::{ApplyError, StateMachine};
use crate::state::cluster::Serving;
use crate::state::{ClusterState, Command};

/// The replicated state and what is published from it.
#[derive(Debug)]
pub struct Replica {
    state: Mutex<ClusterState>,
    serving: watch::Sender<Option<Serving>>,
    leading: watch::Sender<Option<Serving>>,
    leader: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every update is a whole apply or restore, so a poisoned lock holds a consistent state.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Replica {
    /// An empty state serving `model`.
    pub fn new(model: &str) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(ClusterState::new(model)),
            serving: watch::channel(None).0,
            leading: watch::channel(None).0,
            leader: AtomicBool::new(false),
        })
    }

    /// A copy of the state as applied on this node.
    pub fn state(&self) -> ClusterState {
        lock(&self.state).clone()
    }

    /// Runs `f` on the state without copying it.
    pub fn with<R>(&self, f: impl FnOnce(&ClusterState) -> R) -> R {
        f(&lock(&self.state))
    }

    /// The serving plan as the replicated state describes it.
    pub fn serving(&self) -> &watch::Sender<Option<Serving>> {
        &self.serving
    }

    /// The serving plan the local scheduler follows: `None` unless this node leads.
    pub fn leading(&self) -> &watch::Sender<Option<Serving>> {
        &self.leading
    }

    /// Whether this node leads and has adopted the state (see `leadership.rs`).
    pub fn is_leading(&self) -> bool {
        self.leader.load(Ordering::SeqCst)
    }

    /// Records whether this node leads and re-publishes.
    pub fn set_leader(&self, leader: bool) {
        self.leader.store(leader, Ordering::SeqCst);
        self.publish(&lock(&self.state));
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
        let leading = next.clone().filter(|_| self.leader.load(Ordering::SeqCst));
        set(&self.serving, next);
        set(&self.leading, leading);
    }
}

fn set(tx: &watch::Sender<Option<Serving>>, next: Option<Serving>) {
    tx.send_if_modified(|cur| {
        if *cur == next {
            false
        } else {
            *cur = next;
            true
        }
    });
}

/// The [`StateMachine`] the Raft node drives: a shared [`Replica`].
#[derive(Debug, Clone)]
pub struct ReplicaMachine(pub Arc<Replica>);

impl StateMachine for ReplicaMachine {
    fn apply(&mut self, index: u64, data: &[u8]) -> Result<Vec<u8>, ApplyError> {
        let cmd: Command = serde_json::from_slice(data)
            .map_err(|e| ApplyError(format!("entry {index}: undecodable command: {e}")))?;
        let mut st = lock(&self.0.state);
        tracing::debug!(index, ?cmd, "apply");
        st.apply(cmd).map_err(|e| ApplyError(e.to_string()))?;
        self.0.publish(&st);
        Ok(Vec::new())
    }

    fn snapshot(&self) -> Vec<u8> {
        // A state of maps and strings always serialises.
        serde_json::to_vec(&*lock(&self.0.state)).unwrap_or_default()
    }

    fn restore(&mut self, data: &[u8]) -> Result<(), ApplyError> {
        let st: ClusterState = serde_json::from_slice(data)
            .map_err(|e| ApplyError(format!("undecodable cluster state snapshot: {e}")))?;
        let mut cur = lock(&self.0.state);
        *cur = st;
        self.0.publish(&cur);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ensures that a command applied through the state machine changes the state, a refused
    /// one leaves it unchanged, and a snapshot restores to an equal state.
    #[test]
    fn applies_refuses_and_round_trips() {
        let mut sm = ReplicaMachine(Replica::new("m"));
        let reg = Command::RegisterWorker {
            id: "w1".into(),
            address: "a:1".into(),
            name: "n".into(),
            memory_bytes: 0,
            threads: 1,
            devices: vec![],
            peer_address: String::new(),
        };
        let bytes = serde_json::to_vec(&reg).expect("serialise");
        sm.apply(1, &bytes).expect("register applies");
        assert!(sm.apply(2, &bytes).is_err(), "a duplicate id is refused");
        assert!(sm.apply(3, b"not json").is_err());
        let snap = sm.snapshot();
        let mut other = ReplicaMachine(Replica::new("other"));
        other.restore(&snap).expect("restore");
        assert_eq!(other.0.state(), sm.0.state());
        assert_eq!(other.0.state().workers().count(), 1);
    }
}
