//! Crashes at failpoints: for each named point in the Ready loop and the storage transactions,
//! a leader and a follower crash there (as `kill -9` would) while proposals run, restart from
//! their redb files, and the cluster loses no acknowledged command, never diverges, and keeps
//! making progress. Each point runs on the toy key-value machine (leader and follower) and on
//! the coordinator's real cluster state (workers registered; its own snapshots restored).

mod raft_support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use raft_support::{Cluster, Machine};
use tessera_coordinator::raft::FailPoint;

const T: Duration = Duration::from_secs(10);

/// Which node is made to crash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Victim {
    Leader,
    Follower,
}

/// Proposes `<prefix><n> = <n>` ([`Machine::set`]) one by one until `done(cluster, attempts)` says stop
/// (checked before each), and returns the keys whose proposal was acknowledged.
async fn propose_until(
    c: &Cluster,
    prefix: &str,
    next: &mut u64,
    deadline: Instant,
    mut done: impl FnMut(&Cluster, u64) -> bool,
) -> BTreeSet<String> {
    let mut acked = BTreeSet::new();
    let mut attempts = 0;
    while !done(c, attempts) {
        assert!(Instant::now() < deadline, "{prefix}: not done in time");
        attempts += 1;
        let key = format!("{prefix}{next}");
        *next += 1;
        if c.propose(
            &c.machine.set(&key, &next.to_string()),
            Duration::from_millis(500),
        )
        .await
        .is_ok()
        {
            acked.insert(key);
        }
    }
    acked
}

/// Proposes `count` commands; returns the acknowledged keys.
async fn propose_n(c: &Cluster, prefix: &str, next: &mut u64, count: u64) -> BTreeSet<String> {
    propose_until(c, prefix, next, Instant::now() + T * 3, |_, n| n >= count).await
}

/// Crashes `victim` at `point` under proposals, restarts it, and checks the cluster.
async fn crash_at(point: FailPoint, victim: Victim, seed: u64, machine: Machine) {
    let name = format!("fp-{point:?}-{victim:?}-{machine:?}").to_lowercase();
    let mut c = Cluster::empty(&name, seed);
    c.machine = machine;
    // Small snapshots, so that compaction (and snapshot catch-up) happens within the test.
    c.snapshot_interval = 5;
    let peers: BTreeMap<u64, String> = [1, 2, 3].map(|i| (i, format!("mem:{i}"))).into();
    for id in [1, 2, 3] {
        c.start(id, Some(peers.clone()));
    }
    let leader = c.leader(T).await;
    let mut n = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut acked = propose_until(&c, "a", &mut n, deadline, |c, _| {
        c.view(leader).applied >= 8
    })
    .await;
    let target = match victim {
        Victim::Leader => leader,
        Victim::Follower => [1, 2, 3]
            .into_iter()
            .find(|i| *i != leader)
            .expect("a follower"),
    };
    let snapshot_point = matches!(
        point,
        FailPoint::SnapshotApplyBeforeCommit | FailPoint::SnapshotStoredBeforeRestore
    );
    if snapshot_point {
        // A follower installs a snapshot only when it lags behind the leader's compacted log:
        // stop it, let the others compact past it, arm, and bring it back.
        c.crash(target).await;
        acked.extend(propose_n(&c, "b", &mut n, 15).await);
        c.failpoints[&target].arm(point, 0);
        c.start(target, None);
    } else {
        c.failpoints[&target].arm(point, 0);
    }
    acked.extend(
        propose_until(&c, "c", &mut n, deadline, |c, _| {
            c.stopped().contains(&target)
        })
        .await,
    );
    assert_eq!(c.failpoints[&target].fired(), vec![point]);
    c.crash(target).await;
    // The others carry on without it (a new leader if it led).
    let rest: Vec<u64> = [1, 2, 3].into_iter().filter(|i| *i != target).collect();
    c.leader_among(&rest, T).await;
    acked.extend(propose_n(&c, "d", &mut n, 3).await);
    c.start(target, None);
    c.leader(T).await;
    acked.extend(propose_n(&c, "e", &mut n, 3).await);
    c.propose(&c.machine.set("final", "1"), T)
        .await
        .expect("the cluster makes progress after the restart");
    c.assert_converged(&[1, 2, 3], T).await;
    c.assert_no_divergence();
    for id in [1, 2, 3] {
        let map = c.view(id).map;
        let lost: Vec<&String> = acked.iter().filter(|k| !map.contains_key(*k)).collect();
        assert!(
            lost.is_empty(),
            "node {id} lost acknowledged commands {lost:?} ({point:?}, {victim:?}, {machine:?})"
        );
    }
    if snapshot_point {
        let restored = c.view(target).restored;
        assert!(
            restored.iter().any(|i| *i > 8),
            "node {target} caught up by snapshot: {restored:?}"
        );
    }
    c.shutdown().await;
}

/// Ensures that a leader crashing with its new entries written but the append transaction not
/// committed loses no acknowledged command, and the cluster recovers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_crash_mid_append() {
    crash_at(
        FailPoint::AppendBeforeCommit,
        Victim::Leader,
        11,
        Machine::Kv,
    )
    .await;
}

/// Ensures that a follower crashing with appended entries not committed to disk loses nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follower_crash_mid_append() {
    crash_at(
        FailPoint::AppendBeforeCommit,
        Victim::Follower,
        12,
        Machine::Kv,
    )
    .await;
}

/// Ensures that a leader crashing after persisting but before sending the messages that
/// promise it loses nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_crash_after_persist_before_send() {
    crash_at(
        FailPoint::PersistedBeforeSend,
        Victim::Leader,
        13,
        Machine::Kv,
    )
    .await;
}

/// Ensures that a follower crashing after persisting but before acknowledging loses nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follower_crash_after_persist_before_send() {
    crash_at(
        FailPoint::PersistedBeforeSend,
        Victim::Follower,
        14,
        Machine::Kv,
    )
    .await;
}

/// Ensures that a leader crashing after applying committed entries, before advancing and
/// answering its proposers, loses nothing and re-applies identically after the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_crash_after_apply_before_advance() {
    crash_at(
        FailPoint::AppliedBeforeAdvance,
        Victim::Leader,
        15,
        Machine::Kv,
    )
    .await;
}

/// Ensures that a follower crashing after applying, before advancing, re-applies identically.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follower_crash_after_apply_before_advance() {
    crash_at(
        FailPoint::AppliedBeforeAdvance,
        Victim::Follower,
        16,
        Machine::Kv,
    )
    .await;
}

/// Ensures that a leader crashing inside its compaction transaction restarts from the
/// previous snapshot and full log, losing nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_crash_mid_compaction() {
    crash_at(
        FailPoint::CompactBeforeCommit,
        Victim::Leader,
        17,
        Machine::Kv,
    )
    .await;
}

/// Ensures that a follower crashing inside its compaction transaction loses nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follower_crash_mid_compaction() {
    crash_at(
        FailPoint::CompactBeforeCommit,
        Victim::Follower,
        18,
        Machine::Kv,
    )
    .await;
}

/// Ensures that a lagging follower crashing inside the transaction that installs the leader's
/// snapshot comes back on its old log and catches up by snapshot again. (Only followers
/// install snapshots, so there is no leader variant.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follower_crash_mid_snapshot_install() {
    crash_at(
        FailPoint::SnapshotApplyBeforeCommit,
        Victim::Follower,
        19,
        Machine::Kv,
    )
    .await;
}

/// Ensures that a follower crashing after storing the leader's snapshot but before restoring
/// its state machine restores it from disk on restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follower_crash_after_snapshot_stored() {
    crash_at(
        FailPoint::SnapshotStoredBeforeRestore,
        Victim::Follower,
        20,
        Machine::Kv,
    )
    .await;
}

/// Ensures that the coordinator's cluster state, replicated, loses no acknowledged worker
/// registration when a follower crashes mid-append.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_state_follower_crash_mid_append() {
    crash_at(
        FailPoint::AppendBeforeCommit,
        Victim::Follower,
        21,
        Machine::Cluster,
    )
    .await;
}

/// Ensures that the cluster state survives a leader crashing after persisting, before sending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_state_leader_crash_after_persist_before_send() {
    crash_at(
        FailPoint::PersistedBeforeSend,
        Victim::Leader,
        22,
        Machine::Cluster,
    )
    .await;
}

/// Ensures that a leader crashing after applying cluster-state commands, before advancing,
/// re-applies them identically after the restart (its state restored from its own snapshot).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_state_leader_crash_after_apply_before_advance() {
    crash_at(
        FailPoint::AppliedBeforeAdvance,
        Victim::Leader,
        23,
        Machine::Cluster,
    )
    .await;
}

/// Ensures that a leader crashing inside the compaction that stores a cluster-state snapshot
/// restarts from the previous one and the full log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_state_leader_crash_mid_compaction() {
    crash_at(
        FailPoint::CompactBeforeCommit,
        Victim::Leader,
        24,
        Machine::Cluster,
    )
    .await;
}

/// Ensures that a lagging follower crashing while installing the leader's cluster-state
/// snapshot catches up by snapshot again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_state_follower_crash_mid_snapshot_install() {
    crash_at(
        FailPoint::SnapshotApplyBeforeCommit,
        Victim::Follower,
        25,
        Machine::Cluster,
    )
    .await;
}

/// Ensures that a follower crashing after storing the leader's cluster-state snapshot, before
/// restoring it, restores it from disk on restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_state_follower_crash_after_snapshot_stored() {
    crash_at(
        FailPoint::SnapshotStoredBeforeRestore,
        Victim::Follower,
        26,
        Machine::Cluster,
    )
    .await;
}
