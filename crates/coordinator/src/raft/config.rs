//! A Raft node's tunables: timing (tick, heartbeat, election), safety options (pre-vote,
//! check-quorum), log compaction, flow control, and the failpoints tests crash it with.

use std::time::Duration;

use super::Failpoints;

/// Tunables of a node. [`RaftConfig::new`] gives etcd-like defaults.
#[derive(Debug, Clone)]
pub struct RaftConfig {
    /// This node's id (non-zero, unique in the cluster).
    pub id: u64,
    /// One Raft tick (default 100 ms).
    pub tick_interval: Duration,
    /// Ticks between leader heartbeats (default 1).
    pub heartbeat_ticks: usize,
    /// Ticks without a leader before an election (default 6; randomised up to twice that).
    pub election_ticks: usize,
    /// Pre-vote: a partitioned node cannot disrupt the cluster when it returns (default on).
    pub pre_vote: bool,
    /// Check-quorum: a leader that cannot reach a quorum steps down (default on).
    pub check_quorum: bool,
    /// Applied entries between snapshots; the log is compacted at each (default 1000).
    pub snapshot_interval: u64,
    /// How long a proposal waits to be applied (default 5 s).
    pub proposal_timeout: Duration,
    /// Commands and messages queued for the node before handles get `Overloaded`
    /// (default 4096).
    pub mailbox_capacity: usize,
    /// Largest append message in bytes (default 1 MiB).
    pub max_size_per_msg: u64,
    /// Append messages in flight per follower (default 256).
    pub max_inflight_msgs: usize,
    /// Crash points for tests (default `None`: every check is a test of `None`).
    pub failpoints: Option<Failpoints>,
}

impl RaftConfig {
    /// The defaults for node `id`.
    pub fn new(id: u64) -> Self {
        RaftConfig {
            id,
            tick_interval: Duration::from_millis(100),
            heartbeat_ticks: 1,
            // 0.6–1.2 s without a leader's heartbeat (one every tick): a failover, kill to
            // first answer, then takes at most ~1.35 s (`tessera bench-failover` p99; 10
            // ticks gave 1–2 s). Six missed heartbeats in a row is still far beyond a loaded
            // machine's hiccup, and pre-vote with check-quorum keeps a slow follower from
            // deposing a healthy leader.
            election_ticks: 6,
            pre_vote: true,
            check_quorum: true,
            snapshot_interval: 1000,
            proposal_timeout: Duration::from_secs(5),
            mailbox_capacity: 4096,
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 256,
            failpoints: None,
        }
    }
}
