//! Replicated coordinators on loopback — three `tessera coordinator` processes in one Raft
//! group and real workers — under the failures Raft is there for: `kill -9` of the leader
//! mid-stream (every client's answer resumed, unchanged), a leader cut off in a minority partition, a full-cluster restart from disk,
//! bad membership changes and a corrupt data directory. Every wait is bounded.

use std::time::{Duration, Instant};

use serde_json::json;
use tessera_proto::v1 as pb;
use tessera_testkit::{
    RaftCluster, StreamingChild, Tessera, finish_stream, free_addr, ids_and_logprobs, kill,
    lone_coordinator_args, python, resumed_after, seeded_exact, smollm2_arg as model,
    story as request, strings, worker_ids,
};

/// The `tessera` binary under test.
fn tessera() -> Tessera {
    Tessera::new(env!("CARGO_BIN_EXE_tessera"))
}

/// Ensures that `kill -9` of the leader mid-stream costs no client anything: a `tessera
/// generate` connected to the leader itself resumes on another coordinator, and so do the
/// Python examples connected to it (gRPC `client.py`, HTTP `http_client.py`: their streams
/// broken mid-answer); a gRPC stream and an HTTP completion through followers are resumed by
/// the followers; and each gives exactly its fault-free output — the gRPC one unseeded, so it
/// resumes with the seed the cluster drew and named in `x-tessera-seed`; and that the new
/// leader serves with the same workers and plan epoch (no weights reloaded).
#[test]
fn leader_kill_mid_stream_resumes_with_identical_output() {
    let Some(model) = model() else { return };
    let tessera = tessera();
    // The Python examples, when this machine has their packages (always under CI).
    let python = python();
    let examples = python
        .as_deref()
        .map(tessera_testkit::python_examples)
        .unwrap_or_default();
    let mut c = RaftCluster::start(&tessera, &model, "failover", 2);
    let (before, leader) = c.wait_ready(0, Duration::from_secs(90));
    assert_eq!(before.workers.len(), 2, "{before:#?}");
    assert_eq!(before.members.len(), 3, "{before:#?}");
    assert!(before.term > 0 && before.commit_index > 0, "{before:#?}");
    let survivor = (leader + 1) % 3;
    let other = (leader + 2) % 3;

    // The CLI, on the leader first, then the followers (what it resumes on).
    let endpoints = [leader, survivor, other]
        .map(|i| format!("http://{}", c.addrs[i]))
        .join(",");
    let cli = |endpoints: &str| {
        tessera
            .command()
            .args([
                "generate",
                "--endpoint",
                endpoints,
                "--seed",
                "7",
                "--temperature",
                "0.8",
            ])
            .args([
                "--max-tokens",
                "64",
                "Once upon a time, in a quiet village,",
            ])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("tessera generate")
    };
    let completion = json!({"model": "", "prompt": "The three laws of robotics are",
        "max_tokens": 64, "temperature": 0});
    let http_addrs = c.http_addrs.clone();
    let http_text = |i: usize| {
        let r =
            tessera_testkit::http::post_json(&http_addrs[i], "/v1/completions", &[], &completion);
        assert_eq!(r.status, 200, "{}", r.body);
        r.json()["choices"][0]["text"]
            .as_str()
            .expect("text")
            .to_owned()
    };
    // The Python clients, on the leader first.
    let py = |script: &str, endpoints: &str| {
        let mut cmd = std::process::Command::new(python.as_deref().unwrap_or("python3"));
        cmd.args([
            script,
            "--endpoint",
            endpoints,
            "--seed",
            "11",
            "--temperature",
            "0.8",
        ])
        .args(["--max-tokens", "64", "A lighthouse keeper once"])
        .current_dir(&examples);
        StreamingChild::spawn(cmd)
    };
    let grpc_endpoints = [leader, survivor, other]
        .map(|i| c.addrs[i].clone())
        .join(",");
    let http_endpoints = [leader, survivor, other]
        .map(|i| c.http_addrs[i].clone())
        .join(",");
    let py_free = python.as_ref().map(|_| {
        [
            ("client.py", &grpc_endpoints),
            ("http_client.py", &http_endpoints),
        ]
        .map(|(script, endpoints)| {
            let (ok, out, err) = py(script, endpoints).finish();
            assert!(ok, "fault-free {script}: {err}");
            out
        })
    });
    let mut unseeded = seeded_exact("Tell me about the sea.", 64, 0);
    if let Some(s) = unseeded.sampling.as_mut() {
        s.seed = None;
    }

    // Fault-free answers (the gRPC one after the kill, once its seed is known).
    let cli_free = cli(&endpoints).wait_with_output().expect("fault-free CLI");
    assert!(
        cli_free.status.success(),
        "{}",
        String::from_utf8_lossy(&cli_free.stderr)
    );
    let http_free = http_text(other);

    // The same ones in flight when the leader dies.
    let on_leader = cli(&endpoints);
    let py_faulted = python.as_ref().map(|_| {
        let clients = [
            py("client.py", &grpc_endpoints),
            py("http_client.py", &http_endpoints),
        ];
        for (client, what) in clients.iter().zip(["client.py", "http_client.py"]) {
            client.wait_first(what);
        }
        clients
    });
    let http = std::thread::scope(|scope| {
        let http = scope.spawn(|| http_text(other));
        let mut via_follower = c.client(survivor);
        let (seed, mut stream) = c.rt.block_on(async {
            let resp = via_follower
                .generate(unseeded.clone())
                .await
                .expect("start");
            let seed: u64 = resp
                .metadata()
                .get("x-tessera-seed")
                .expect("seed header")
                .to_str()
                .expect("ascii")
                .parse()
                .expect("a seed");
            (seed, resp.into_inner())
        });
        let mut got = Vec::new();
        while got.len() < 3 {
            let ev =
                c.rt.block_on(stream.message())
                    .expect("tokens")
                    .expect("open");
            if let Some(pb::generate_event::Event::Token(t)) = ev.event {
                got.push(t);
            }
        }
        std::thread::sleep(Duration::from_millis(200));
        let killed_at = Instant::now();
        c.kill_coordinator(leader);
        let rest =
            c.rt.block_on(finish_stream(&mut stream, Duration::from_secs(60)))
                .expect("the stream through a follower survives the leader's death");
        eprintln!(
            "leader kill: the follower's stream waited at most {:?} ({:?} after the kill)",
            rest.longest_gap,
            killed_at.elapsed()
        );
        got.extend(rest.tokens);
        if let Some(s) = unseeded.sampling.as_mut() {
            s.seed = Some(seed);
        }
        (http.join().expect("http thread"), got)
    });
    let (http_faulted, grpc_faulted) = http;
    let cli_faulted = on_leader.wait_with_output().expect("CLI across the kill");
    assert!(
        cli_faulted.status.success(),
        "the CLI on the leader failed: {}",
        String::from_utf8_lossy(&cli_faulted.stderr)
    );
    assert!(
        String::from_utf8_lossy(&cli_faulted.stderr).contains("resuming on"),
        "the CLI did not resume: {}",
        String::from_utf8_lossy(&cli_faulted.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&cli_faulted.stdout),
        String::from_utf8_lossy(&cli_free.stdout),
        "the CLI's answer changed across the kill"
    );
    assert_eq!(
        http_faulted, http_free,
        "the HTTP answer changed across the kill"
    );
    if let (Some(free), Some(faulted)) = (py_free, py_faulted) {
        for ((client, free), script) in faulted
            .into_iter()
            .zip(free)
            .zip(["client.py", "http_client.py"])
        {
            let (ok, out, err) = client.finish();
            assert!(ok, "{script} across the kill: {err}");
            // Its stream broke mid-answer, and it resumed with the tokens it had.
            let had = resumed_after(&err);
            assert!(
                had.is_some_and(|n| n > 0),
                "{script} did not resume mid-answer: {err}"
            );
            assert_eq!(
                out, free,
                "{script}'s answer changed across the kill: {err}"
            );
            eprintln!("{script}: resumed after {had:?} tokens, output unchanged");
        }
    }

    // A new leader serves; the gRPC stream's fault-free twin, with the seed it was given.
    c.wait_serving(
        survivor,
        Duration::from_secs(30),
        Duration::from_millis(50),
        "no new leader serves",
    );
    let grpc_free = {
        let mut client = c.client(other);
        c.rt.block_on(tessera_testkit::collect(&mut client, unseeded))
            .expect("fault-free")
    };
    assert_eq!(
        ids_and_logprobs(&grpc_faulted),
        ids_and_logprobs(&grpc_free),
        "the stream through a follower changed across the kill"
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
            .all(|w| w.weight_bytes > 0 && w.last_seen_ms.is_some_and(|ms| ms < 1000))
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

/// Ensures that a leader cut off from the other coordinators cannot commit — it steps down, its
/// commit index stands still, its clients get UNAVAILABLE in bounded time — while the majority
/// elects a new leader that commits (a worker joins) and serves; that status read through the
/// majority is linearizable (confirmed by ReadIndex), and so is a majority follower's model
/// list, while the cut-off node's are marked unconfirmed; healed, it catches up.
#[test]
fn minority_partition_cannot_commit() {
    let Some(model) = model() else { return };
    let mut c = RaftCluster::start_partitionable(&tessera(), &model, "partition", 1);
    let (before, old) = c.wait_ready(0, Duration::from_secs(90));
    assert_eq!(c.generate(old, request(4)).expect("serves"), 4);
    let majority: Vec<usize> = (0..3).filter(|i| *i != old).collect();

    c.isolate(old);
    // Check-quorum: a leader that hears from no majority for an election timeout steps down.
    let deadline = Instant::now() + Duration::from_secs(15);
    let cut_off = loop {
        let s = c.local_status(old).expect("the isolated node answers");
        if c.leader_index(&s) != Some(old) {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the isolated leader keeps leading: {s:#?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    // The majority elects a new leader and serves through it (the worker follows it).
    c.wait_serving(
        majority[0],
        Duration::from_secs(30),
        Duration::from_millis(100),
        "the majority does not serve",
    );
    let (_, new) = c.wait_ready(majority[1], Duration::from_secs(10));
    assert_ne!(new, old);

    // The isolated node has no leader to forward to: clear errors, bounded in time.
    let asked = Instant::now();
    let e = c
        .generate(old, request(4))
        .expect_err("an isolated node cannot serve");
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    assert!(
        asked.elapsed() < Duration::from_secs(10),
        "took {:?}",
        asked.elapsed()
    );
    // Membership changes go to the cluster port.
    let endpoint = format!("http://{}", c.cluster_addrs[old]);
    let out = tessera().remove_coordinator(&endpoint, majority[0] as u64 + 1);
    assert!(
        !out.status.success(),
        "a membership change commits in a minority: {out:?}"
    );

    // The majority commits: a new worker's registration.
    c.add_worker("w-late");
    let deadline = Instant::now() + Duration::from_secs(30);
    let committed = loop {
        let s = c.local_status(majority[0]).expect("majority status");
        if s.workers.len() == 2 {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the majority does not commit: {s:#?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let isolated = c.local_status(old).expect("isolated status");
    assert_eq!(isolated.commit_index, cut_off.commit_index, "{isolated:#?}");
    // Reads: the majority's view is confirmed by its leader (ReadIndex); the cut-off node can
    // only answer from its own stale replica, and says so.
    let confirmed = c.status(majority[0]).expect("majority status");
    assert!(confirmed.linearizable, "{confirmed:#?}");
    assert_eq!(confirmed.workers.len(), 2, "{confirmed:#?}");
    let stale = c.status(old).expect("isolated status, leader's view asked");
    assert!(!stale.linearizable, "{stale:#?}");
    assert!(!isolated.linearizable, "a local answer is never confirmed");
    // Model lists are read on the coordinator asked, leader or follower: a follower of the
    // majority confirms its replica through the leader; the cut-off node cannot, and says so
    // within its bound.
    let follower = *majority.iter().find(|i| **i != new).expect("a follower");
    let models = c.models(follower, false).expect("a follower's model list");
    assert!(models.linearizable, "{models:#?}");
    assert!(!c.models(follower, true).expect("local list").linearizable);
    let asked = Instant::now();
    let models = c.models(old, false).expect("the cut-off node's model list");
    assert!(!models.linearizable, "{models:#?}");
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "{:?}",
        asked.elapsed()
    );
    assert_eq!(worker_ids(&isolated), worker_ids(&before), "{isolated:#?}");
    assert!(
        committed.commit_index > isolated.commit_index,
        "{committed:#?}"
    );
    assert!(committed.term > before.term, "{committed:#?}");

    // Healed, the old leader follows the new one and holds what the majority committed.
    c.heal();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = c.local_status(old).expect("healed status");
        if s.commit_index >= committed.commit_index && s.workers.len() == 2 {
            assert_eq!(c.leader_index(&s), Some(new), "{s:#?}");
            assert_eq!(worker_ids(&s), worker_ids(&committed), "{s:#?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the healed node does not catch up: {s:#?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        c.generate(old, request(4)).expect("serves via the leader"),
        4
    );
}

/// Ensures that a client's deadline reaches the leader through a follower — a request far too
/// long for its 300 ms ends DEADLINE_EXCEEDED in bounded time and the leader stops computing
/// it at once, so the next request is not held up behind it — and that a full-cluster restart
/// from disk comes back with the same workers and plan, and serves again without re-planning.
#[test]
fn deadlines_reach_the_leader_and_a_restart_keeps_the_state() {
    let Some(model) = model() else { return };
    let mut c = RaftCluster::start(&tessera(), &model, "restart", 1);
    let (before, leader) = c.wait_ready(0, Duration::from_secs(90));
    assert_eq!(c.generate(0, request(4)).expect("serves"), 4);

    // 400 tokens take the one worker ~10 s: the deadline cuts it short on every hop.
    let follower = (leader + 1) % 3;
    let mut call = tonic::Request::new(request(400));
    call.set_timeout(Duration::from_millis(300));
    let sent = Instant::now();
    let mut client = c.client(follower);
    let err =
        c.rt.block_on(async {
            let mut stream = client.generate(call).await?.into_inner();
            while stream.message().await?.is_some() {}
            Ok::<_, tonic::Status>(())
        })
        .expect_err("a 400-token request cannot finish in 300 ms");
    let ended = sent.elapsed();
    assert_eq!(err.code(), tonic::Code::DeadlineExceeded, "{err:?}");
    assert!(
        ended < Duration::from_secs(3),
        "the deadline ended it after {ended:?}"
    );
    let stop = Instant::now() + Duration::from_secs(2);
    let idle = loop {
        let running = c.status(leader).expect("leader status").running_requests;
        if running == 0 {
            break sent.elapsed();
        }
        assert!(
            Instant::now() < stop,
            "the leader still runs the expired request {:?} after its deadline",
            sent.elapsed()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let next = Instant::now();
    assert_eq!(
        c.generate(follower, request(4)).expect("the next request"),
        4
    );
    eprintln!(
        "deadline: DEADLINE_EXCEEDED {ended:?} after sending, the leader idle {idle:?} after \
         sending; the next request took {:?}",
        next.elapsed()
    );
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
    c.wait_serving(
        2,
        Duration::from_secs(30),
        Duration::from_millis(100),
        "restarted cluster does not serve",
    );
    let s = c.status(0).expect("status");
    assert_eq!(s.plan_epoch, before.plan_epoch, "{s:#?}");
}

/// Ensures that adding an unreachable coordinator and removing the last one fail with clear
/// errors and leave the membership as it was.
#[test]
fn bad_membership_changes_are_clear_errors() {
    let Some(model) = model() else { return };
    let tessera = tessera();
    let (mut coord, addr, cluster_addr) = tessera.spawn_lone_coordinator(&model, &[]);
    let endpoint = format!("http://{addr}");
    let cluster_endpoint = format!("http://{cluster_addr}");
    // Wait for the single node to elect itself.
    let status = || tessera.run(&["status", "--endpoint", &endpoint]);
    let start = Instant::now();
    while !String::from_utf8_lossy(&status().stdout).contains("leader 1=") {
        assert!(start.elapsed() < Duration::from_secs(20), "no leader");
        std::thread::sleep(Duration::from_millis(100));
    }
    let nowhere = free_addr();
    // Membership is a cluster operation: the public port does not serve it, and says so —
    // whether the operator speaks mutual TLS (the public port answers in plain text) or not
    // (it answers UNIMPLEMENTED).
    let out = tessera.add_coordinator(&endpoint, 2, &nowhere);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("does not serve the cluster protocol") && err.contains("plain text"),
        "{err}"
    );
    let id = "2".to_owned();
    let out = tessera.run(&[
        "cluster",
        "add-coordinator",
        "--endpoint",
        &endpoint,
        "--id",
        &id,
        "--address",
        &nowhere,
        "--insecure-cluster",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("does not serve the cluster protocol") && err.contains("Unimplemented"),
        "{err}"
    );
    let out = tessera.add_coordinator(&cluster_endpoint, 2, &nowhere);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("did not catch up") && err.contains("not added"),
        "{err}"
    );
    let out = tessera.remove_coordinator(&cluster_endpoint, 1);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("InvalidArgument") && err.contains("no voter"),
        "{err}"
    );
    let s = String::from_utf8_lossy(&status().stdout).into_owned();
    // Members are named by their cluster addresses.
    assert!(s.contains(&format!("members 1={cluster_addr}\n")), "{s}");
    let health = tessera.run(&["health", "--endpoint", &endpoint]);
    assert!(health.status.success(), "{health:?}");
    kill(&mut coord);
}

/// Ensures that a coordinator refuses to start on a corrupt data directory, saying which file.
#[test]
fn corrupt_data_dir_is_a_clear_startup_error() {
    let Some(model) = model() else { return };
    let dir = std::env::temp_dir().join(format!("tessera-raft-corrupt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::write(dir.join("raft.redb"), b"this is not a redb database at all").expect("write");
    let mut args = lone_coordinator_args(&model);
    args.extend(strings(&["--data-dir", &dir.to_string_lossy()]));
    let out = tessera().run(&args);
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
