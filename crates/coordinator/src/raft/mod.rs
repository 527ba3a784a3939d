//! Raft consensus for the coordinators: a replicated, durable log driving a deterministic state
//! machine, built on raft-rs (`raft` 0.7, its protobuf codec).
//!
//! The pieces, each in its own file, meet only through three seams:
//! - [`RedbStorage`] (`storage.rs`) implements `raft::Storage` on one redb file: log entries,
//!   hard state, conf state, the latest snapshot (metadata and data) and peer addresses. Entries
//!   and hard state are written in one fsync'd transaction.
//! - [`StateMachine`] (`state_machine.rs`) is what the log replicates; this module is generic
//!   over it, so it does not know what a command means.
//! - [`Transport`] (`transport.rs`) sends a Raft message to a peer without blocking: one task
//!   per peer with a bounded queue. [`MemNetwork`] is the in-memory implementation for tests
//!   (partitions, loss, delay); [`GrpcTransport`] and [`RaftService`] (`grpc.rs`) carry the
//!   messages over the `tessera.cluster.v1.Raft` gRPC service.
//!
//! [`RaftNode`] (`node.rs`) owns a `raft::RawNode` on its own thread and runs the Ready loop;
//! [`RaftHandle`] (`handle.rs`) is the cloneable way in: propose a command and await its applied
//! result, confirm a linearizable read (ReadIndex), change membership, read the status, step
//! messages from the transport. [`Failpoints`] (`failpoint.rs`) let tests crash a node at named
//! places in the Ready loop and the storage transactions. [`self_join`] (`join.rs`) is how a
//! node outside the founding voters asks to be added.
//!
//! Every error of this module is a [`RaftError`]; [`RaftError::to_status`] is the single
//! mapping to gRPC.

mod config;
mod failpoint;
mod grpc;
mod handle;
mod join;
mod logger;
mod node;
mod read_index;
mod state_machine;
mod storage;
mod transport;

pub use config::RaftConfig;
pub use failpoint::{FailPoint, Failpoints};
pub use grpc::{GrpcTransport, RaftService};
pub use handle::{MemberChange, Members, RaftHandle, RaftRole, RaftStatus};
pub use join::self_join;
pub use node::RaftNode;
pub use state_machine::{ApplyError, StateMachine};
pub use storage::RedbStorage;
pub(crate) use storage::{decode_peers, encode_peers, snapshot_state};
pub use transport::{MemNetwork, MemTransport, Transport};

/// Raft messages, entries and conf-change types as raft-rs defines them (re-exported so users
/// need not depend on `raft` themselves).
pub use raft::eraftpb;

use std::path::PathBuf;

/// Everything that can go wrong in the Raft layer.
#[derive(Debug, thiserror::Error)]
pub enum RaftError {
    /// The data directory cannot be opened, read or written: unreadable, corrupt, or locked by
    /// another process. Nothing is assumed about its content; the node does not start.
    #[error(
        "raft storage at {}: {message} (if it is damaged or lost, replace this member: README \
         \"Replacing a coordinator\")",
        path.display()
    )]
    Storage {
        /// The redb file.
        path: PathBuf,
        /// What failed.
        message: String,
    },
    /// This node is not the leader; `leader` is the one it knows of (`None` during an election).
    #[error("not the Raft leader (leader: {})", leader.map_or_else(|| "unknown".to_string(), |l| l.to_string()))]
    NotLeader {
        /// The current leader's node id, if known.
        leader: Option<u64>,
    },
    /// The proposal was not applied in time; it may still be applied later.
    #[error("Raft proposal timed out after {0:?}; it may still be applied")]
    Timeout(std::time::Duration),
    /// The proposal was certainly not applied: its log slot went to another entry (leadership
    /// changed) or Raft refused it (for example another membership change is in progress).
    #[error("Raft proposal dropped: {0}")]
    Dropped(String),
    /// The proposal's slot was covered by a snapshot: it may or may not have been applied.
    #[error("Raft proposal outcome unknown: its entry was compacted into a snapshot")]
    OutcomeUnknown,
    /// The state machine rejected the command (deterministically, on every node).
    #[error("command rejected: {0}")]
    Rejected(#[from] ApplyError),
    /// An invalid membership change (checked before proposing, or refused when applied).
    #[error("changes: {0}")]
    InvalidConfChange(String),
    /// A member to be added never caught up with the log, so it was removed again.
    #[error("member {id} did not catch up within {timeout:?} (unreachable?); it was not added")]
    Unreachable {
        /// The node that was being added.
        id: u64,
        /// How long it was given.
        timeout: std::time::Duration,
    },
    /// The node's mailbox is full; try again.
    #[error("Raft node {0} is overloaded (mailbox full)")]
    Overloaded(u64),
    /// The node's Raft loop has stopped (shut down, or a fatal storage error).
    #[error("Raft node {0} has stopped")]
    Stopped(u64),
    /// The node's Raft loop failed (its storage, or a broken invariant such as a commit index
    /// beyond its log): this process can no longer take part in the cluster.
    #[error(
        "Raft node {id} failed: {reason}. If its data directory was lost or damaged, replace \
         this member (README: \"Replacing a coordinator\")"
    )]
    Failed {
        /// The node.
        id: u64,
        /// Why.
        reason: String,
    },
    /// A test failpoint fired: the node stopped there as if killed (see [`Failpoints`]).
    #[error("crashed at failpoint {0}")]
    Crashed(FailPoint),
    /// A Raft message could not be decoded or was not meant for this node.
    #[error("message: {0}")]
    InvalidMessage(String),
    /// raft-rs refused an operation.
    #[error("raft: {0}")]
    Raft(#[from] raft::Error),
}

/// Shorthand for results of this module.
pub type Result<T, E = RaftError> = std::result::Result<T, E>;

impl RaftError {
    /// The one mapping of Raft errors to gRPC statuses.
    pub fn to_status(&self) -> tonic::Status {
        use tonic::Status;
        let msg = self.to_string();
        match self {
            RaftError::NotLeader { .. }
            | RaftError::Stopped(_)
            | RaftError::Failed { .. }
            | RaftError::Crashed(_)
            | RaftError::Overloaded(_)
            | RaftError::Unreachable { .. } => Status::unavailable(msg),
            RaftError::Timeout(_) => Status::deadline_exceeded(msg),
            RaftError::Dropped(_) | RaftError::OutcomeUnknown => Status::aborted(msg),
            RaftError::Rejected(_) => Status::failed_precondition(msg),
            RaftError::InvalidConfChange(_) | RaftError::InvalidMessage(_) => {
                Status::invalid_argument(msg)
            }
            RaftError::Storage { .. } | RaftError::Raft(_) => Status::internal(msg),
        }
    }
}

impl From<RaftError> for tonic::Status {
    fn from(e: RaftError) -> Self {
        e.to_status()
    }
}
