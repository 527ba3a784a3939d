//! [`RaftHandle`]: the cloneable way into a running Raft node, and the status it publishes.
//!
//! A handle talks to the node's thread through a bounded mailbox and never blocks: a full
//! mailbox is [`RaftError::Overloaded`], a stopped node [`RaftError::Stopped`]. Proposals await
//! the node's answer, sent once their entry is applied (or known lost), under a timeout.

use std::collections::BTreeMap;
use std::sync::mpsc::{SyncSender, TrySendError};
use std::time::Duration;

use raft::eraftpb::{ConfChangeSingle, ConfChangeType, ConfChangeV2, ConfState, Message};
use tokio::sync::{oneshot, watch};
use tracing::Instrument as _;

use super::{RaftError, Result};

/// The members of the cluster, from the applied conf state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Members {
    /// Voters (the incoming configuration during a joint change), sorted.
    pub voters: Vec<u64>,
    /// Voters of the outgoing configuration; empty unless a joint change is in progress.
    pub outgoing_voters: Vec<u64>,
    /// Learners (receive the log, do not vote), sorted.
    pub learners: Vec<u64>,
}

impl From<&ConfState> for Members {
    fn from(cs: &ConfState) -> Self {
        let sorted = |v: &[u64]| {
            let mut v = v.to_vec();
            v.sort_unstable();
            v
        };
        Members {
            voters: sorted(&cs.voters),
            outgoing_voters: sorted(&cs.voters_outgoing),
            learners: sorted(&cs.learners),
        }
    }
}

/// A node's Raft role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RaftRole {
    /// Follows a leader (or waits for one).
    Follower,
    /// Probing whether an election could win (pre-vote).
    PreCandidate,
    /// Running an election.
    Candidate,
    /// Leads the cluster: the only node that accepts proposals.
    Leader,
}

/// What a node publishes after every step of its loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RaftStatus {
    /// This node's id.
    pub id: u64,
    /// Its role.
    pub role: RaftRole,
    /// The leader it knows of.
    pub leader: Option<u64>,
    /// Its current term.
    pub term: u64,
    /// Its commit index.
    pub commit: u64,
    /// The last index applied to its state machine.
    pub applied: u64,
    /// The members as of its applied conf state.
    pub members: Members,
    /// On the leader only: each member's highest log index known to be replicated there.
    pub matched: BTreeMap<u64, u64>,
    /// Every member's transport address (host:port), as stored with the membership.
    pub addresses: BTreeMap<u64, String>,
    /// False once the node's loop has stopped.
    pub running: bool,
    /// Why the loop stopped, when it failed (a storage error, or a panic in the Raft thread,
    /// such as raft-rs refusing a commit index beyond a log that was lost); `None` while it
    /// runs and after a requested stop. A node that failed never runs again in this process.
    pub failure: Option<String>,
}

impl RaftStatus {
    pub(crate) fn initial(id: u64) -> Self {
        RaftStatus {
            id,
            role: RaftRole::Follower,
            leader: None,
            term: 0,
            commit: 0,
            applied: 0,
            members: Members::default(),
            matched: BTreeMap::new(),
            addresses: BTreeMap::new(),
            running: true,
            failure: None,
        }
    }
}

/// One membership change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemberChange {
    /// Adds a voter (or promotes a learner) reachable at `address`.
    AddVoter {
        /// Node id (non-zero).
        id: u64,
        /// Its Raft transport address (host:port for gRPC).
        address: String,
    },
    /// Adds a learner reachable at `address`.
    AddLearner {
        /// Node id (non-zero).
        id: u64,
        /// Its Raft transport address.
        address: String,
    },
    /// Removes a voter or learner.
    Remove {
        /// Node id.
        id: u64,
    },
}

/// What the node's thread is asked to do.
pub(super) enum Command {
    Propose {
        data: Vec<u8>,
        reply: oneshot::Sender<Result<Vec<u8>>>,
    },
    ConfChange {
        cc: ConfChangeV2,
        reply: oneshot::Sender<Result<Members>>,
    },
    Step(Message),
    /// A linearizable read: answered with the confirmed read index once it is applied.
    ReadIndex(oneshot::Sender<Result<u64>>),
    Stop(oneshot::Sender<()>),
}

/// A cloneable handle to a running Raft node.
#[derive(Clone)]
pub struct RaftHandle {
    id: u64,
    tx: SyncSender<Command>,
    status: watch::Receiver<RaftStatus>,
    proposal_timeout: Duration,
}

impl std::fmt::Debug for RaftHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftHandle")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl RaftHandle {
    pub(super) fn new(
        id: u64,
        tx: SyncSender<Command>,
        status: watch::Receiver<RaftStatus>,
        proposal_timeout: Duration,
    ) -> Self {
        RaftHandle {
            id,
            tx,
            status,
            proposal_timeout,
        }
    }

    /// This node's id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Whether a message from node `from` may be stepped: `from` is a member (voter of either
    /// configuration, or learner) — or this node has no configuration yet (it is joining, and
    /// learns the members from the leader's first messages). A message from anyone else could
    /// only disturb the group (a higher term deposes the leader).
    pub fn admits_sender(&self, from: u64) -> bool {
        let st = self.status.borrow();
        let m = &st.members;
        let unconfigured = m.voters.is_empty() && m.learners.is_empty();
        unconfigured
            || m.voters.contains(&from)
            || m.outgoing_voters.contains(&from)
            || m.learners.contains(&from)
    }

    /// The node's latest published status.
    pub fn status(&self) -> RaftStatus {
        self.status.borrow().clone()
    }

    /// A receiver that sees every status change (for waiting on a leader, a commit index...).
    pub fn watch_status(&self) -> watch::Receiver<RaftStatus> {
        self.status.clone()
    }

    fn send(&self, cmd: Command) -> Result<()> {
        self.tx.try_send(cmd).map_err(|e| match e {
            TrySendError::Full(_) => RaftError::Overloaded(self.id),
            TrySendError::Disconnected(_) => RaftError::Stopped(self.id),
        })
    }

    async fn await_reply<T>(&self, rx: oneshot::Receiver<Result<T>>) -> Result<T> {
        match tokio::time::timeout(self.proposal_timeout, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(RaftError::Stopped(self.id)),
            Err(_) => Err(RaftError::Timeout(self.proposal_timeout)),
        }
    }

    /// Proposes a command and waits until it is applied on this node, returning the state
    /// machine's result.
    ///
    /// # Errors
    /// [`RaftError::NotLeader`] (with the leader's id) when this node is not the leader;
    /// [`RaftError::Rejected`] when the state machine refused it; [`RaftError::Timeout`] or
    /// [`RaftError::OutcomeUnknown`] when it may or may not have been applied;
    /// [`RaftError::Dropped`] when it certainly was not; [`RaftError::Overloaded`] /
    /// [`RaftError::Stopped`] when the node cannot take it.
    pub async fn propose(&self, data: Vec<u8>) -> Result<Vec<u8>> {
        let span = tracing::debug_span!("raft_propose", node = self.id, bytes = data.len());
        async {
            let (reply, rx) = oneshot::channel();
            self.send(Command::Propose { data, reply })?;
            self.await_reply(rx).await
        }
        .instrument(span)
        .await
    }

    /// Confirms a linearizable read with Raft's ReadIndex, on the leader or on a follower:
    /// waits until a quorum has confirmed that the leader still leads (a follower asks the
    /// leader for its commit index) and this node has applied everything committed when the
    /// read was requested. After `Ok(index)`, this node's state machine reflects every command
    /// that completed before the call (and applied index >= `index`), so reading it then is
    /// linearizable. Nothing is written to the log.
    ///
    /// # Errors
    /// [`RaftError::NotLeader`] when this node knows no leader, or the term or leader changes
    /// before the read is confirmed; [`RaftError::Timeout`] when no quorum confirmed in time
    /// (a partitioned node, a leader that has not yet committed in its term);
    /// [`RaftError::Overloaded`] / [`RaftError::Stopped`] when the node cannot take it. A
    /// failed read had no effect.
    pub async fn read_index(&self) -> Result<u64> {
        let span = tracing::debug_span!("raft_read_index", node = self.id);
        async {
            let (reply, rx) = oneshot::channel();
            self.send(Command::ReadIndex(reply))?;
            self.await_reply(rx).await
        }
        .instrument(span)
        .await
    }

    /// Proposes a membership change and waits until it is applied, returning the new members.
    /// One change is applied directly; several at once go through joint consensus, which the
    /// node leaves by itself.
    ///
    /// # Errors
    /// [`RaftError::InvalidConfChange`] for an empty list, node id 0, or a change that would
    /// leave no voter; [`RaftError::Dropped`] when Raft refuses it (another change is still in
    /// progress); otherwise as [`RaftHandle::propose`].
    pub async fn propose_conf_change(&self, changes: Vec<MemberChange>) -> Result<Members> {
        let span = tracing::info_span!("raft_conf_change", node = self.id, ?changes);
        async {
            let cc = self.validate(&changes)?;
            let (reply, rx) = oneshot::channel();
            self.send(Command::ConfChange { cc, reply })?;
            self.await_reply(rx).await
        }
        .instrument(span)
        .await
    }

    fn validate(&self, changes: &[MemberChange]) -> Result<ConfChangeV2> {
        if changes.is_empty() {
            return Err(RaftError::InvalidConfChange("empty list of changes".into()));
        }
        let mut voters = self.status().members.voters;
        let mut addresses = BTreeMap::new();
        let mut cc = ConfChangeV2::default();
        for c in changes {
            let (id, ty) = match c {
                MemberChange::AddVoter { id, address } => {
                    addresses.insert(*id, address.clone());
                    voters.push(*id);
                    (*id, ConfChangeType::AddNode)
                }
                MemberChange::AddLearner { id, address } => {
                    addresses.insert(*id, address.clone());
                    voters.retain(|v| v != id);
                    (*id, ConfChangeType::AddLearnerNode)
                }
                MemberChange::Remove { id } => {
                    voters.retain(|v| v != id);
                    (*id, ConfChangeType::RemoveNode)
                }
            };
            if id == 0 {
                return Err(RaftError::InvalidConfChange("node id 0 is reserved".into()));
            }
            let mut single = ConfChangeSingle::default();
            single.set_change_type(ty);
            single.node_id = id;
            cc.mut_changes().push(single);
        }
        if voters.is_empty() {
            return Err(RaftError::InvalidConfChange(
                "the change would leave no voter".into(),
            ));
        }
        cc.set_context(super::storage::encode_peers(&addresses).into());
        Ok(cc)
    }

    /// Adds a member safely: first as a learner, then, once it has replicated the log up to
    /// the commit index at the time it was added, promotes it to voter. A member that does not
    /// catch up within `catch_up` is removed again, so an unreachable address never costs the
    /// cluster its quorum.
    ///
    /// # Errors
    /// [`RaftError::Unreachable`] when it did not catch up; otherwise as
    /// [`RaftHandle::propose_conf_change`].
    pub async fn add_member(
        &self,
        id: u64,
        address: String,
        catch_up: Duration,
    ) -> Result<Members> {
        if self.status().members.voters.contains(&id) {
            return Err(RaftError::InvalidConfChange(format!(
                "node {id} is already a voter"
            )));
        }
        self.propose_conf_change(vec![MemberChange::AddLearner {
            id,
            address: address.clone(),
        }])
        .await?;
        let target = self.status().commit;
        let mut status = self.watch_status();
        let caught_up = tokio::time::timeout(catch_up, async {
            loop {
                let s = status.borrow_and_update().clone();
                if s.role != RaftRole::Leader {
                    return Err(RaftError::NotLeader { leader: s.leader });
                }
                if s.matched.get(&id).is_some_and(|&m| m >= target) {
                    return Ok(());
                }
                if status.changed().await.is_err() {
                    return Err(RaftError::Stopped(self.id));
                }
            }
        })
        .await;
        match caught_up {
            Ok(Ok(())) => {
                self.propose_conf_change(vec![MemberChange::AddVoter { id, address }])
                    .await
            }
            Ok(Err(e)) => Err(e),
            Err(_) => {
                if let Err(e) = self
                    .propose_conf_change(vec![MemberChange::Remove { id }])
                    .await
                {
                    tracing::warn!(
                        node = self.id,
                        learner = id,
                        "could not remove the learner: {e}"
                    );
                }
                Err(RaftError::Unreachable {
                    id,
                    timeout: catch_up,
                })
            }
        }
    }

    /// Removes a member (a single conf change).
    ///
    /// # Errors
    /// As [`RaftHandle::propose_conf_change`] (removing the last voter is refused).
    pub async fn remove_member(&self, id: u64) -> Result<Members> {
        self.propose_conf_change(vec![MemberChange::Remove { id }])
            .await
    }

    /// Hands a message from a peer to the node (for the transport's server side). Never
    /// blocks: when the mailbox is full the message is dropped and Raft retries.
    ///
    /// # Errors
    /// [`RaftError::InvalidMessage`] when it is addressed to another node;
    /// [`RaftError::Overloaded`] / [`RaftError::Stopped`] when it could not be queued.
    pub fn step(&self, msg: Message) -> Result<()> {
        if msg.to != self.id {
            return Err(RaftError::InvalidMessage(format!(
                "addressed to node {}, this is node {}",
                msg.to, self.id
            )));
        }
        self.send(Command::Step(msg))
    }

    /// Stops the node and waits until its thread has released the storage (so the data
    /// directory can be reopened). Idempotent.
    pub async fn shutdown(&self) {
        let (reply, rx) = oneshot::channel();
        let mut cmd = Command::Stop(reply);
        // The mailbox may be briefly full; a stop must still get through.
        loop {
            match self.tx.try_send(cmd) {
                Ok(()) => break,
                Err(TrySendError::Full(c)) => {
                    cmd = c;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Err(TrySendError::Disconnected(_)) => return,
            }
        }
        let _ = rx.await;
    }
}
