//! Replicated coordinators on loopback — three `tessera coordinator` processes in one Raft
//! group and real workers — under the failures Raft is there for: `kill -9` of the leader under
//! generate load, a full-cluster restart from disk, bad membership changes and a corrupt data
//! directory. Every wait is bounded.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard, PoisonError, mpsc};
use std::time::{Duration, Instant};

use tessera_proto::v1 as pb;
use tessera_proto::v1::generate_event::Event;
use tessera_proto::v1::inference_client::InferenceClient;
use tonic::transport::Channel;

mod support;
use support::{free_port, model, spawn};

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| (*s).to_owned()).collect()
}

/// Two three-coordinator clusters at once on a two-core machine starve each other's elections
/// and streams, so the clusters of this file run one at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Three coordinators and some workers, killed (and their data removed) when dropped.
struct RaftCluster {
    /// This cluster's turn; released after `Drop` has stopped the processes.
    _turn: MutexGuard<'static, ()>,
    model: String,
    addrs: Vec<String>,
    peers: String,
    data: PathBuf,
    coordinators: Vec<Option<Child>>,
    workers: Vec<Child>,
    rt: tokio::runtime::Runtime,
}

impl RaftCluster {
    fn start(model: &str, name: &str, workers: usize) -> Self {
        // Taken before picking ports, so a waiting cluster's ports are not stale by its turn.
        let turn = ONE_AT_A_TIME.lock().unwrap_or_else(PoisonError::into_inner);
        let addrs: Vec<String> = (0..3)
            .map(|_| format!("127.0.0.1:{}", free_port()))
            .collect();
        let peers = addrs
            .iter()
            .enumerate()
            .map(|(i, a)| format!("{}={a}", i + 1))
            .collect::<Vec<_>>()
            .join(",");
        let data = std::env::temp_dir().join(format!("tessera-raft-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&data);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let mut c = Self {
            _turn: turn,
            model: model.to_owned(),
            addrs,
            peers,
            data,
            coordinators: vec![None, None, None],
            workers: Vec::new(),
            rt,
        };
        for i in 0..3 {
            c.start_coordinator(i, workers);
        }
        let list = c
            .addrs
            .iter()
            .map(|a| format!("http://{a}"))
            .collect::<Vec<_>>()
            .join(",");
        for i in 0..workers {
            let (w, _) = spawn(&strings(&[
                "worker",
                "--coordinator",
                &list,
                "--threads",
                "1",
                "--memory",
                "1GiB",
                "--name",
                &format!("w{i}"),
                "--exit-on-stdin-eof",
            ]));
            c.workers.push(w);
        }
        c
    }

    fn start_coordinator(&mut self, i: usize, min_workers: usize) {
        let (child, _) = spawn(&strings(&[
            "coordinator",
            "--listen",
            &self.addrs[i],
            "--id",
            &(i + 1).to_string(),
            "--peers",
            &self.peers,
            "--data-dir",
            &self.data.join(format!("c{}", i + 1)).to_string_lossy(),
            "--model",
            &self.model,
            "--min-workers",
            &min_workers.max(1).to_string(),
            "--heartbeat-ms",
            "250",
            "--heartbeat-timeout-ms",
            "3000",
            "--kv-tokens",
            "2048",
            "--exit-on-stdin-eof",
        ]));
        self.coordinators[i] = Some(child);
    }

    fn kill_coordinator(&mut self, i: usize) {
        if let Some(mut c) = self.coordinators[i].take() {
            c.kill().expect("kill -9");
            let _ = c.wait();
        }
    }

    fn client(&self, i: usize) -> InferenceClient<Channel> {
        let url = format!("http://{}", self.addrs[i]);
        self.rt.block_on(async {
            let ch = tonic::transport::Endpoint::from_shared(url)
                .expect("url")
                .connect_timeout(Duration::from_secs(2))
                .timeout(Duration::from_secs(30))
                .connect_lazy();
            InferenceClient::new(ch)
        })
    }

    fn status(&self, i: usize) -> Result<pb::ClusterStatusResponse, tonic::Status> {
        let mut c = self.client(i);
        self.rt
            .block_on(c.cluster_status(pb::ClusterStatusRequest {}))
            .map(tonic::Response::into_inner)
    }

    /// Waits until coordinator `i` reports a ready plan and a leader; returns the status and the
    /// leader's index.
    fn wait_ready(&self, i: usize, timeout: Duration) -> (pb::ClusterStatusResponse, usize) {
        let start = Instant::now();
        loop {
            if let Ok(s) = self.status(i)
                && s.ready
                && let Some(l) = self.leader_index(&s)
            {
                return (s, l);
            }
            assert!(
                start.elapsed() < timeout,
                "coordinator {i} not ready: {:?}",
                self.status(i)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn leader_index(&self, s: &pb::ClusterStatusResponse) -> Option<usize> {
        let addr = s.leader.split_once('=')?.1;
        self.addrs.iter().position(|a| a == addr)
    }

    fn generate(&self, i: usize, req: pb::GenerateRequest) -> Result<usize, tonic::Status> {
        let mut c = self.client(i);
        self.rt.block_on(collect(&mut c, req))
    }
}

impl Drop for RaftCluster {
    fn drop(&mut self) {
        for c in self
            .workers
            .iter_mut()
            .chain(self.coordinators.iter_mut().flatten())
        {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.data);
    }
}

/// Runs a request to the end: the number of tokens, or its error status.
async fn collect(
    c: &mut InferenceClient<Channel>,
    req: pb::GenerateRequest,
) -> Result<usize, tonic::Status> {
    let mut stream = c.generate(req).await?.into_inner();
    let mut n = 0;
    while let Some(ev) = stream.message().await? {
        match ev.event {
            Some(Event::Token(_)) => n += 1,
            Some(Event::Finished(_)) => return Ok(n),
            None => {}
        }
    }
    Err(tonic::Status::internal(
        "stream ended without a Finished event",
    ))
}

fn request(max_tokens: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        prompt: Some(pb::generate_request::Prompt::Text(
            "Once upon a time".into(),
        )),
        sampling: Some(pb::SamplingParams {
            temperature: Some(0.0),
            ..Default::default()
        }),
        stop: Some(pb::StopConditions {
            max_tokens: Some(max_tokens),
            ignore_eos: true,
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn worker_ids(s: &pb::ClusterStatusResponse) -> Vec<String> {
    let mut ids: Vec<String> = s.workers.iter().map(|w| w.worker_id.clone()).collect();
    ids.sort();
    ids
}

/// Ensures that `kill -9` of the leader under generate load ends its in-flight streams with
/// UNAVAILABLE, and that a new leader serves new requests with the same workers and the same
/// plan epoch (no weights reloaded).
#[test]
fn leader_kill_under_load_fails_over_without_reload() {
    let Some(model) = model() else {
        eprintln!("skipped: set TESSERA_MODEL_GGUF to the SmolLM2 GGUF");
        return;
    };
    let mut c = RaftCluster::start(&model, "failover", 2);
    let (before, leader) = c.wait_ready(0, Duration::from_secs(90));
    assert_eq!(before.workers.len(), 2, "{before:#?}");
    assert_eq!(before.members.len(), 3, "{before:#?}");
    assert!(before.term > 0 && before.commit_index > 0, "{before:#?}");
    let survivor = (leader + 1) % 3;
    // Load: a long stream on the leader itself, and one through a follower (forwarded).
    let (first_tx, first_rx) = mpsc::channel();
    let mut on_leader = c.client(leader);
    let in_flight = c.rt.spawn(async move {
        let mut stream = on_leader.generate(request(1500)).await?.into_inner();
        let mut told = false;
        loop {
            match stream.message().await? {
                Some(_) if !told => {
                    let _ = first_tx.send(());
                    told = true;
                }
                Some(_) => {}
                None => return Ok::<_, tonic::Status>(()),
            }
        }
    });
    let mut via_follower = c.client(survivor);
    let forwarded =
        c.rt.spawn(async move { collect(&mut via_follower, request(1500)).await });
    first_rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the leader streams a first token");
    std::thread::sleep(Duration::from_millis(200));
    let killed_at = Instant::now();
    c.kill_coordinator(leader);

    let r =
        c.rt.block_on(async { tokio::time::timeout(Duration::from_secs(15), in_flight).await })
            .expect("the stream on the leader hangs after the kill")
            .expect("task");
    let e = r.expect_err("a stream on a killed leader cannot finish");
    // Nothing answers from a killed process: tonic reports the torn connection as
    // UNAVAILABLE, or as UNKNOWN with the transport's error when it breaks mid-body.
    let torn = e.code() == tonic::Code::Unknown && e.message().contains("h2 protocol error");
    assert!(
        e.code() == tonic::Code::Unavailable || torn,
        "on the leader: {e:?}"
    );
    let fwd =
        c.rt.block_on(async { tokio::time::timeout(Duration::from_secs(15), forwarded).await })
            .expect("the forwarded stream hangs after the kill")
            .expect("task");
    let e = fwd.expect_err("a stream forwarded to a killed leader cannot finish");
    assert_eq!(e.code(), tonic::Code::Unavailable, "forwarded: {e:?}");

    // A new leader serves new requests, through either survivor.
    let deadline = Instant::now() + Duration::from_secs(30);
    let served_at = loop {
        match c.generate(survivor, request(4)) {
            Ok(4) => break Instant::now(),
            other => {
                assert!(Instant::now() < deadline, "no new leader serves: {other:?}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    };
    eprintln!(
        "failover: kill -> first successful generate in {:?}",
        served_at - killed_at
    );
    let other = (leader + 2) % 3;
    assert_eq!(
        c.generate(other, request(4))
            .expect("other survivor serves"),
        4
    );
    let (after, new_leader) = c.wait_ready(survivor, Duration::from_secs(10));
    assert_ne!(new_leader, leader, "{after:#?}");
    assert!(after.term > before.term, "{after:#?}");
    assert_eq!(
        after.plan_epoch, before.plan_epoch,
        "the plan changed: {after:#?}"
    );
    assert_eq!(worker_ids(&after), worker_ids(&before), "{after:#?}");
    // The workers follow the new leader: their heartbeats (with the weights they kept) reach it.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = c.status(new_leader).expect("status from the new leader");
        if s.workers
            .iter()
            .all(|w| w.weight_bytes > 0 && w.last_seen_ms < 1000)
        {
            assert_eq!(s.plan_epoch, before.plan_epoch, "{s:#?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "workers do not follow the new leader: {s:#?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Ensures that a full-cluster restart from disk comes back with the same workers and plan, and
/// serves again without re-planning.
#[test]
fn full_restart_from_disk_keeps_the_state() {
    let Some(model) = model() else {
        eprintln!("skipped: set TESSERA_MODEL_GGUF to the SmolLM2 GGUF");
        return;
    };
    let mut c = RaftCluster::start(&model, "restart", 1);
    let (before, _) = c.wait_ready(0, Duration::from_secs(90));
    assert_eq!(c.generate(0, request(4)).expect("serves"), 4);
    for i in 0..3 {
        c.kill_coordinator(i);
    }
    for i in 0..3 {
        c.start_coordinator(i, 1);
    }
    let (after, _) = c.wait_ready(1, Duration::from_secs(30));
    assert_eq!(after.plan_epoch, before.plan_epoch, "{after:#?}");
    assert_eq!(worker_ids(&after), worker_ids(&before), "{after:#?}");
    assert!(after.commit_index >= before.commit_index, "{after:#?}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match c.generate(2, request(4)) {
            Ok(4) => break,
            other => {
                assert!(
                    Instant::now() < deadline,
                    "restarted cluster does not serve: {other:?}"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    let s = c.status(0).expect("status");
    assert_eq!(s.plan_epoch, before.plan_epoch, "{s:#?}");
}

fn tessera(args: &[&str]) -> std::process::Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start tessera");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if child.try_wait().expect("wait").is_some() {
            return child.wait_with_output().expect("output");
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("`tessera {}` did not finish", args.join(" "));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Ensures that adding an unreachable coordinator and removing the last one fail with clear
/// errors and leave the membership as it was.
#[test]
fn bad_membership_changes_are_clear_errors() {
    let Some(model) = model() else {
        eprintln!("skipped: set TESSERA_MODEL_GGUF to the SmolLM2 GGUF");
        return;
    };
    let (mut coord, addr) = spawn(&strings(&[
        "coordinator",
        "--listen",
        "127.0.0.1:0",
        "--model",
        &model,
        "--exit-on-stdin-eof",
    ]));
    let endpoint = format!("http://{addr}");
    // Wait for the single node to elect itself.
    let status = || tessera(&["status", "--endpoint", &endpoint]);
    let start = Instant::now();
    while !String::from_utf8_lossy(&status().stdout).contains("leader 1=") {
        assert!(start.elapsed() < Duration::from_secs(20), "no leader");
        std::thread::sleep(Duration::from_millis(100));
    }
    let nowhere = format!("127.0.0.1:{}", free_port());
    let out = tessera(&[
        "cluster",
        "add-coordinator",
        "--endpoint",
        &endpoint,
        "--id",
        "2",
        "--address",
        &nowhere,
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("did not catch up") && err.contains("not added"),
        "{err}"
    );
    let out = tessera(&[
        "cluster",
        "remove-coordinator",
        "--endpoint",
        &endpoint,
        "--id",
        "1",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("InvalidArgument") && err.contains("no voter"),
        "{err}"
    );
    let s = String::from_utf8_lossy(&status().stdout).into_owned();
    assert!(s.contains(&format!("members 1={addr}\n")), "{s}");
    let health = tessera(&["health", "--endpoint", &endpoint]);
    assert!(health.status.success(), "{health:?}");
    let _ = coord.kill();
    let _ = coord.wait();
}

/// Ensures that a coordinator refuses to start on a corrupt data directory, saying which file.
#[test]
fn corrupt_data_dir_is_a_clear_startup_error() {
    let Some(model) = model() else {
        eprintln!("skipped: set TESSERA_MODEL_GGUF to the SmolLM2 GGUF");
        return;
    };
    let dir = std::env::temp_dir().join(format!("tessera-raft-corrupt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::write(dir.join("raft.redb"), b"this is not a redb database at all").expect("write");
    let out = tessera(&[
        "coordinator",
        "--listen",
        "127.0.0.1:0",
        "--model",
        &model,
        "--data-dir",
        &dir.to_string_lossy(),
    ]);
    let _ = std::fs::remove_dir_all(&dir);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("raft storage at") && err.contains("raft.redb"),
        "{err}"
    );
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("listening"),
        "{err}"
    );
}
