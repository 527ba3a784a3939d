//! The cluster protocol under attack, against real processes: three coordinators (one Raft
//! group) and a two-stage pipeline of workers, all speaking mutual TLS with certificates of the
//! test CA. The attacker reaches every cluster port over TCP and tries, in turn: no
//! certificate, a certificate of another CA, a certified worker acting as a coordinator, and a
//! certified coordinator that is not a member or claims another node's id. Every attempt is
//! refused, the leader keeps its leadership and term, and the cluster keeps answering.

use std::path::Path;
use std::time::{Duration, Instant};

use protobuf::Message as _;
use raft::eraftpb::MessageType;
use tessera_proto::cluster::v1 as cpb;
use tessera_proto::v1 as pb;
use tessera_tls::{Authority, ClusterTls, Identity, MemberFiles, Role};
use tonic::Code;
use tonic::transport::Channel;

use tessera_testkit::{
    RaftCluster, Tessera, kill, lazy_channel, member_tls, smollm2_arg as model, story, temp_dir,
};

fn tessera() -> Tessera {
    Tessera::new(env!("CARGO_BIN_EXE_tessera"))
}

/// A lazily connected channel to `addr` as `tls` dials a peer of `role`, 5 s per call.
fn channel(rt: &tokio::runtime::Runtime, tls: &ClusterTls, addr: &str, role: Role) -> Channel {
    let _in_runtime = rt.enter();
    tls.endpoint(addr, role)
        .expect("endpoint")
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(5))
        .connect_lazy()
}

/// A plain-text channel: an attacker with no certificate at all.
fn plain(rt: &tokio::runtime::Runtime, addr: &str) -> Channel {
    let _in_runtime = rt.enter();
    lazy_channel(format!("http://{addr}"), Some(Duration::from_secs(5)))
}

/// A Raft message as an attacker forges it: `kind` from node `from` to node 1, a term far
/// ahead and a commit index far beyond the log.
fn forged(kind: MessageType, from: u64, term: u64) -> cpb::RaftMessage {
    let mut m = raft::eraftpb::Message::default();
    m.set_msg_type(kind);
    m.from = from;
    m.to = 1;
    m.term = term + 1_000_000;
    m.commit = 1_000_000_000;
    cpb::RaftMessage {
        message: m.write_to_bytes().expect("encode"),
        from_address: "127.0.0.1:9".into(),
    }
}

/// Every call the cluster protocol has, from one caller; each result is `(what, outcome)`.
fn try_everything(
    rt: &tokio::runtime::Runtime,
    coordinator: Channel,
    worker: Channel,
    term: u64,
    worker_ids: &[String],
) -> Vec<(String, Result<(), tonic::Status>)> {
    let mut out = Vec::new();
    let mut raft = cpb::raft_client::RaftClient::new(coordinator.clone());
    for (kind, from) in [
        (MessageType::MsgHeartbeat, 99),
        (MessageType::MsgTimeoutNow, 99),
        (MessageType::MsgRequestVote, 99),
        (MessageType::MsgAppend, 2),
        (MessageType::MsgTimeoutNow, 2),
    ] {
        let r = rt.block_on(raft.send(forged(kind, from, term)));
        out.push((format!("Raft/Send {kind:?} from {from}"), r.map(drop)));
    }
    let r = rt.block_on(raft.add_member(cpb::AddMemberRequest {
        id: 99,
        address: "127.0.0.1:9".into(),
    }));
    out.push(("Raft/AddMember".into(), r.map(drop)));
    let r = rt.block_on(raft.remove_member(cpb::RemoveMemberRequest { id: 2 }));
    out.push(("Raft/RemoveMember".into(), r.map(drop)));
    let r = rt.block_on(raft.members(cpb::MembersRequest {}));
    out.push(("Raft/Members".into(), r.map(drop)));
    let mut forward = cpb::forward_client::ForwardClient::new(coordinator.clone());
    let r = rt.block_on(forward.cluster_status(pb::ClusterStatusRequest::default()));
    out.push(("Forward/ClusterStatus".into(), r.map(drop)));
    let r = rt.block_on(forward.generate(story(4)));
    out.push(("Forward/Generate".into(), r.map(drop)));
    let mut coordination = cpb::coordination_client::CoordinationClient::new(coordinator);
    for id in worker_ids {
        let r = rt.block_on(coordination.heartbeat(cpb::HeartbeatRequest {
            worker_id: id.clone(),
            ..Default::default()
        }));
        out.push((format!("Coordination/Heartbeat as {id}"), r.map(drop)));
        // Leaving for another worker would take it out of every plan.
        let r = rt.block_on(coordination.leave(cpb::LeaveRequest {
            worker_id: id.clone(),
        }));
        out.push((format!("Coordination/Leave as {id}"), r.map(drop)));
    }
    let mut w = cpb::worker_client::WorkerClient::new(worker);
    let r = rt.block_on(w.load_shard(cpb::LoadShardRequest {
        plan_epoch: 1_000_000,
        model: "/etc/shadow".into(),
        ..Default::default()
    }));
    out.push(("Worker/LoadShard".into(), r.map(drop)));
    let r = rt.block_on(w.release(cpb::ReleaseRequest {
        seq_ids: (0..64).collect(),
    }));
    out.push(("Worker/Release".into(), r.map(drop)));
    let r = rt.block_on(w.pipeline(tokio_stream::iter(Vec::<cpb::StepRequest>::new())));
    out.push(("Worker/Pipeline".into(), r.map(drop)));
    out
}

/// A certificate and key of `identity` issued by a CA of its own in `dir`: a look-alike that
/// names a member but was never issued by the cluster's CA.
fn foreign(dir: &Path, identity: &Identity) -> ClusterTls {
    let (ca, _) = Authority::open_or_create(dir).expect("foreign CA");
    ca.issue_into(dir, identity).expect("issue");
    ClusterTls::mutual(MemberFiles::in_dir(dir, identity).load().expect("load"))
}

/// Ensures that nobody outside the cluster can act inside it: with no certificate or another
/// CA's, every cluster call fails at the handshake; a certified worker cannot speak Raft,
/// change membership, forward, heartbeat or leave for another worker, or call a worker; a
/// certified coordinator that is not a member, or claims another node's id, has its Raft messages
/// refused; rogue worker processes (no certificate, or another CA's) never register. After
/// all of it the leader and its term are unchanged and the cluster still answers.
#[test]
fn only_certified_members_act_in_the_cluster() {
    let Some(model) = model() else { return };
    let cluster = RaftCluster::start(&tessera(), &model, "attacks", 2);
    let (status, leader) = cluster.wait_ready(0, Duration::from_secs(120));
    let term = status.term;
    let worker_ids: Vec<String> = status.workers.iter().map(|w| w.worker_id.clone()).collect();
    assert_eq!(worker_ids.len(), 2, "{status:?}");
    // Attack coordinator 1 (node id 1, the forged messages' addressee) and the second stage.
    let coordinator = &cluster.cluster_addrs[0];
    let stage1 = status
        .workers
        .iter()
        .find(|w| w.shard.as_ref().is_some_and(|s| s.layer_start > 0))
        .map(|w| w.address.clone())
        .expect("a second stage");
    let rt = &cluster.rt;

    // No certificate: not a single call gets past the handshake.
    let results = try_everything(
        rt,
        plain(rt, coordinator),
        plain(rt, &stage1),
        term,
        &worker_ids,
    );
    for (what, r) in &results {
        let e = r.as_ref().expect_err(what);
        assert!(
            matches!(
                e.code(),
                Code::Unavailable | Code::Unknown | Code::Internal | Code::Cancelled
            ),
            "{what}: {e:?}"
        );
    }

    // Another CA's certificates, even naming real members: refused at the handshake.
    let other = temp_dir("attacks-foreign-ca");
    for id in [
        Identity::coordinator(2),
        Identity::new(Role::Worker, "w0").expect("valid"),
    ] {
        let tls = foreign(other.path(), &id);
        let results = try_everything(
            rt,
            channel(rt, &tls, coordinator, Role::Coordinator),
            channel(rt, &tls, &stage1, Role::Worker),
            term,
            &worker_ids,
        );
        for (what, r) in &results {
            let e = r.as_ref().expect_err(what);
            assert_eq!(e.code(), Code::Unavailable, "{id} {what}: {e:?}");
        }
    }

    // A certified worker that is no stage's upstream: every call is PERMISSION_DENIED.
    let rogue = member_tls(&Identity::new(Role::Worker, "w9").expect("valid"));
    let results = try_everything(
        rt,
        channel(rt, &rogue, coordinator, Role::Coordinator),
        channel(rt, &rogue, &stage1, Role::Worker),
        term,
        &worker_ids,
    );
    for (what, r) in &results {
        let e = r.as_ref().expect_err(what);
        assert_eq!(e.code(), Code::PermissionDenied, "{what}: {e:?}");
        assert!(e.message().len() < 200, "{what}: {e:?}");
    }

    // A certified coordinator: as a non-member (99), or as node 2 claiming node 1's voice.
    for (id, from) in [(99, 99), (2, 1), (3, 99)] {
        let tls = member_tls(&Identity::coordinator(id));
        let mut raft =
            cpb::raft_client::RaftClient::new(channel(rt, &tls, coordinator, Role::Coordinator));
        for kind in [
            MessageType::MsgHeartbeat,
            MessageType::MsgTimeoutNow,
            MessageType::MsgRequestVote,
        ] {
            let e = rt
                .block_on(raft.send(forged(kind, from, term)))
                .expect_err("a forged message");
            assert_eq!(
                e.code(),
                Code::PermissionDenied,
                "coordinator {id} as {from}: {e:?}"
            );
        }
        // Not addressed to this node: refused too.
        let mut m = forged(MessageType::MsgHeartbeat, id, term);
        let mut msg = raft::eraftpb::Message::parse_from_bytes(&m.message).expect("valid");
        msg.to = 7;
        m.message = msg.write_to_bytes().expect("valid");
        assert!(rt.block_on(raft.send(m)).is_err());
    }

    // Even a coordinator's LoadShard opens nothing outside the model store, and the refusal
    // does not tell whether the path exists.
    let coordinator_tls = member_tls(&Identity::coordinator(1));
    let mut w =
        cpb::worker_client::WorkerClient::new(channel(rt, &coordinator_tls, &stage1, Role::Worker));
    let mut refusals = Vec::new();
    for model in [
        "/etc/shadow",
        "/nonexistent/model.gguf",
        "/var/../etc/passwd",
    ] {
        let e = rt
            .block_on(w.load_shard(cpb::LoadShardRequest {
                plan_epoch: 1_000_000,
                model: model.into(),
                ..Default::default()
            }))
            .expect_err(model);
        assert_eq!(e.code(), Code::InvalidArgument, "{model}: {e:?}");
        refusals.push(e.message().to_owned());
    }
    assert!(
        refusals
            .iter()
            .all(|m| *m == refusals[0] && m.starts_with("model: ")),
        "{refusals:?}"
    );

    // Rogue worker processes: one with no certificate, one with another CA's.
    let foreign_w = Identity::new(Role::Worker, "w0").expect("valid");
    foreign(other.path(), &foreign_w);
    let coordinators = cluster
        .cluster_addrs
        .iter()
        .map(|a| format!("http://{a}"))
        .collect::<Vec<_>>()
        .join(",");
    let files = MemberFiles::in_dir(other.path(), &foreign_w);
    let path = |p: &Path| p.to_string_lossy().into_owned();
    let mut rogues = vec![
        tessera().spawn_worker(
            &coordinators,
            1,
            "1GiB",
            Some("r0"),
            &["--insecure-cluster"],
        ),
        tessera().spawn_worker(
            &coordinators,
            1,
            "1GiB",
            None,
            &[
                "--cluster-ca",
                &path(&files.ca),
                "--cluster-cert",
                &path(&files.cert),
                "--cluster-key",
                &path(&files.key),
            ],
        ),
    ];
    // Several registration attempts (and leader election timeouts) later: nothing moved.
    std::thread::sleep(Duration::from_secs(3));
    let (after, after_leader) = cluster.wait_ready(0, Duration::from_secs(30));
    assert_eq!(after_leader, leader, "the leader changed");
    assert_eq!(after.term, term, "the term moved");
    let ids: Vec<String> = after.workers.iter().map(|w| w.worker_id.clone()).collect();
    assert_eq!(ids, worker_ids, "a rogue worker registered");
    for i in 0..3 {
        let s = cluster.local_status(i).expect("local status");
        assert_eq!(s.term, term, "coordinator {i}'s term moved");
    }
    let start = Instant::now();
    assert_eq!(
        cluster.generate(0, story(4)).expect("the cluster answers"),
        4
    );
    assert!(start.elapsed() < Duration::from_secs(60));
    for r in &mut rogues {
        kill(r);
    }
}
