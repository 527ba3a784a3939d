//! In-process Raft clusters over the in-memory transport: election and replication,
//! partitions, loss and delay, crash/restart from redb, snapshot catch-up, membership changes,
//! and a seeded random-fault run checking that committed state never diverges.

mod raft_support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use raft_support::Cluster;
use tessera_coordinator::raft::{MemberChange, RaftError, RaftRole};

const T: Duration = Duration::from_secs(10);

/// Ensures that three nodes elect one leader, replicate proposals to all, and that a
/// follower refuses proposals naming the leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_elect_and_replicate() {
    let c = Cluster::new("replicate", &[1, 2, 3], 1);
    let leader = c.leader(T).await;
    for i in 0..30 {
        c.propose(&format!("set k{i} v{i}"), T)
            .await
            .expect("propose");
    }
    let prev = c.propose("set k0 again", T).await.expect("overwrite");
    assert_eq!(prev, b"v0", "the applied result comes back to the proposer");
    let err = c.propose("bogus", T).await.expect_err("refused command");
    assert!(matches!(err, RaftError::Rejected(_)), "{err}");
    c.assert_converged(&[1, 2, 3], T).await;
    assert_eq!(c.view(2).map.len(), 30);

    let follower = [1, 2, 3]
        .into_iter()
        .find(|i| *i != leader)
        .expect("a follower");
    let err = c.handles[&follower]
        .propose(b"set x y".to_vec())
        .await
        .expect_err("follower");
    assert!(
        matches!(err, RaftError::NotLeader { leader: Some(l) } if l == leader),
        "{err}"
    );
    let s = c.handles[&leader].status();
    assert_eq!(s.members.voters, vec![1, 2, 3]);
    assert!(s.commit >= 32 && s.term >= 2, "{s:?}");
    c.assert_no_divergence();
    c.shutdown().await;
}

/// Ensures that an isolated leader cannot commit, the majority elects a new leader and
/// commits, and the old leader catches up once healed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn isolated_leader_cannot_commit_and_catches_up() {
    let c = Cluster::new("isolate", &[1, 2, 3], 2);
    let old = c.leader(T).await;
    c.propose("set a 1", T).await.expect("propose");
    c.assert_converged(&[1, 2, 3], T).await;

    c.net.isolate(old);
    let commit_before = c.handles[&old].status().commit;
    let r = c.handles[&old].propose(b"set lost 1".to_vec()).await;
    assert!(r.is_err(), "an isolated leader must not commit: {r:?}");
    assert_eq!(c.handles[&old].status().commit, commit_before);
    assert_ne!(
        c.handles[&old].status().role,
        RaftRole::Leader,
        "check-quorum steps it down"
    );

    let rest: Vec<u64> = [1, 2, 3].into_iter().filter(|i| *i != old).collect();
    let new = c.leader_among(&rest, T).await;
    assert_ne!(new, old);
    for i in 0..10 {
        c.handles[&new]
            .propose(format!("set b{i} 2").into_bytes())
            .await
            .expect("majority commits");
    }
    assert_eq!(
        c.handles[&old].status().commit,
        commit_before,
        "still cut off"
    );

    c.net.heal();
    c.assert_converged(&[1, 2, 3], T).await;
    let v = c.view(old);
    assert!(
        !v.map.contains_key("lost") && v.map.len() == 11,
        "{:?}",
        v.map
    );
    c.assert_no_divergence();
    c.shutdown().await;
}

/// Ensures that replication completes despite 20% message loss and random delays (which
/// reorder messages).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loss_and_delay() {
    let c = Cluster::new("lossy", &[1, 2, 3], 3);
    c.leader(T).await;
    c.net.set_loss(0.2);
    c.net.set_delay(Duration::ZERO, Duration::from_millis(15));
    for i in 0..20 {
        c.propose(&format!("set k{i} {i}"), Duration::from_secs(20))
            .await
            .expect("propose");
    }
    c.net.set_loss(0.0);
    c.assert_converged(&[1, 2, 3], T).await;
    let (delivered, dropped) = c.net.counts();
    assert!(
        dropped > 0 && delivered > dropped,
        "{delivered} delivered, {dropped} dropped"
    );
    c.assert_no_divergence();
    c.shutdown().await;
}

/// Ensures that a full-cluster crash and restart from the redb files keeps every committed
/// command, and the cluster then serves again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_and_restart_from_disk() {
    let mut c = Cluster::new("restart", &[1, 2, 3], 4);
    c.snapshot_interval = 15;
    for i in 0..25 {
        c.propose(&format!("set k{i} {i}"), T)
            .await
            .expect("propose");
    }
    c.assert_converged(&[1, 2, 3], T).await;
    let before = c.view(1).map;
    for id in [1, 2, 3] {
        c.crash(id).await;
    }
    for id in [1, 2, 3] {
        c.start(id, None);
    }
    // Each node rebuilds its state from its own snapshot and log, before any election.
    c.wait_applied(&[1, 2, 3], 25, T).await;
    for id in [1, 2, 3] {
        assert_eq!(c.view(id).map, before, "node {id} after restart");
    }
    c.leader(T).await;
    c.propose("set after restart", T)
        .await
        .expect("serves after restart");
    c.assert_converged(&[1, 2, 3], T).await;
    c.assert_no_divergence();
    c.shutdown().await;
}

/// Ensures that a node down while the others compact their log catches up by snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lagging_node_catches_up_by_snapshot() {
    let mut c = Cluster::empty("snapshot", 5);
    c.snapshot_interval = 10;
    let peers: BTreeMap<u64, String> = [1, 2, 3].map(|i| (i, format!("mem:{i}"))).into();
    for id in [1, 2, 3] {
        c.start(id, Some(peers.clone()));
    }
    c.leader(T).await;
    c.propose("set early 1", T).await.expect("propose");
    c.assert_converged(&[1, 2, 3], T).await;
    let lag = [1, 2, 3]
        .into_iter()
        .find(|i| c.handles[i].status().role != RaftRole::Leader)
        .expect("a follower");
    let lag_applied = c.view(lag).applied;
    c.crash(lag).await;
    for i in 0..40 {
        c.propose(&format!("set k{i} {i}"), T)
            .await
            .expect("propose");
    }
    c.start(lag, None);
    let all = [1, 2, 3];
    c.assert_converged(&all, T).await;
    let v = c.view(lag);
    assert!(
        v.restored.iter().any(|i| *i > lag_applied + 10),
        "node {lag} should have restored a leader snapshot past {lag_applied}: {:?}",
        v.restored
    );
    assert_eq!(v.map.len(), 41);
    c.assert_no_divergence();
    c.shutdown().await;
}

/// Ensures that membership grows 1 -> 3 -> 5 and shrinks 5 -> 3 (by one joint change) while
/// serving, that nodes join by snapshot, and that bad changes are refused without harm.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_one_three_five_three() {
    let mut c = Cluster::empty("members", 6);
    c.start(1, Some([(1, "mem:1".to_string())].into()));
    for id in 2..=5 {
        c.start(id, None);
    }
    assert_eq!(c.leader_among(&[1], T).await, 1);
    c.propose("set stage 1", T).await.expect("propose");
    let h = c.handles[&1].clone();
    let catch_up = Duration::from_secs(5);
    for id in [2, 3] {
        h.add_member(id, format!("mem:{id}"), catch_up)
            .await
            .expect("add");
    }
    assert_eq!(h.status().members.voters, vec![1, 2, 3]);
    c.propose("set stage 3", T).await.expect("propose");
    for id in [4, 5] {
        h.add_member(id, format!("mem:{id}"), catch_up)
            .await
            .expect("add");
    }
    assert_eq!(h.status().members.voters, vec![1, 2, 3, 4, 5]);
    c.propose("set stage 5", T).await.expect("propose");
    c.assert_converged(&[1, 2, 3, 4, 5], T).await;

    // Two removals at once go through joint consensus and leave it automatically.
    let leader = c.leader(T).await;
    let members = c.handles[&leader]
        .propose_conf_change(vec![
            MemberChange::Remove { id: 4 },
            MemberChange::Remove { id: 5 },
        ])
        .await
        .expect("joint removal");
    assert_eq!(members.voters, vec![1, 2, 3]);
    let deadline = Instant::now() + T;
    while !c.handles[&leader]
        .status()
        .members
        .outgoing_voters
        .is_empty()
    {
        assert!(Instant::now() < deadline, "joint config not left");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    c.propose("set stage 3b", T)
        .await
        .expect("propose after shrink");
    c.assert_converged(&[1, 2, 3], T).await;
    assert_eq!(c.view(2).map.get("stage").map(String::as_str), Some("3b"));

    // Bad input: an unreachable member is not added; removing every voter is refused.
    let leader = c.leader_among(&[1, 2, 3], T).await;
    let h = c.handles[&leader].clone();
    let err = h
        .add_member(9, "mem:9".into(), Duration::from_millis(500))
        .await
        .expect_err("unreachable");
    assert!(matches!(err, RaftError::Unreachable { id: 9, .. }), "{err}");
    let err = h
        .propose_conf_change([1, 2, 3].map(|id| MemberChange::Remove { id }).to_vec())
        .await
        .expect_err("no voter left");
    assert!(matches!(err, RaftError::InvalidConfChange(_)), "{err}");
    let deadline = Instant::now() + T;
    while h.status().members.learners.contains(&9) {
        assert!(Instant::now() < deadline, "learner 9 not removed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(h.status().members.voters, vec![1, 2, 3]);
    c.propose("set still 1", T).await.expect("still serving");
    c.assert_converged(&[1, 2, 3], T).await;
    c.assert_no_divergence();
    c.shutdown().await;
}

/// Ensures that under a seeded random schedule of partitions, loss, delay, crashes and
/// restarts, no two nodes ever apply different commands at the same index, and all converge
/// once the faults stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_faults_never_diverge() {
    let seed: u64 = std::env::var("RAFT_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed);
    let mut rng = seed | 1;
    let mut next = move |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    let ids = [1u64, 2, 3, 4, 5];
    let mut c = Cluster::new("faults", &ids, seed);
    c.snapshot_interval = 8;
    let mut down: Vec<u64> = Vec::new();
    let mut ok = 0;
    for round in 0..25 {
        match next(6) {
            0 => {
                let a = ids[next(5) as usize];
                let b = ids[next(5) as usize];
                let g1: Vec<u64> = ids.iter().copied().filter(|i| *i == a || *i == b).collect();
                let g2: Vec<u64> = ids.iter().copied().filter(|i| *i != a && *i != b).collect();
                c.net.partition(&[&g1, &g2]);
            }
            1 => c.net.heal(),
            2 => c.net.set_loss(next(30) as f64 / 100.0),
            3 => c
                .net
                .set_delay(Duration::ZERO, Duration::from_millis(next(20))),
            4 if down.len() < 2 => {
                let id = ids[next(5) as usize];
                if !down.contains(&id) {
                    c.crash(id).await;
                    down.push(id);
                }
            }
            _ => {
                if let Some(id) = down.pop() {
                    c.start(id, None);
                }
            }
        }
        for i in 0..3 {
            if c.propose(&format!("set r{round} {i}"), Duration::from_millis(300))
                .await
                .is_ok()
            {
                ok += 1;
            }
        }
        c.assert_no_divergence();
    }
    c.net.heal();
    c.net.set_loss(0.0);
    c.net.set_delay(Duration::ZERO, Duration::ZERO);
    for id in down.drain(..) {
        c.start(id, None);
    }
    c.leader(Duration::from_secs(20)).await;
    c.propose("set final 1", Duration::from_secs(20))
        .await
        .expect("serves after the faults");
    c.assert_converged(&ids, Duration::from_secs(20)).await;
    c.assert_no_divergence();
    assert!(
        ok > 0,
        "some proposals must have committed during the faults (seed {seed})"
    );
    c.shutdown().await;
}
