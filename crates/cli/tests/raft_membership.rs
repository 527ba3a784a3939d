//! Online membership changes of real coordinator processes, driven by the CLI: one founding
//! coordinator grows to three and five with `tessera cluster add-coordinator` (the new ones
//! started with `--join`), then shrinks to three with `remove-coordinator`, while a client keeps
//! generating. Every wait is bounded.

use std::collections::BTreeMap;
use std::process::Child;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tessera_proto::v1 as pb;

mod support;
use support::raft::{collect, request, strings, tessera};
use support::{free_port, model, spawn};

/// Coordinators by node id, killed (and their data removed) when dropped.
struct Members {
    model: String,
    data: std::path::PathBuf,
    /// Public addresses, what clients call.
    addrs: BTreeMap<u64, String>,
    /// Cluster addresses: what members and workers dial, and what membership changes name.
    cluster_addrs: BTreeMap<u64, String>,
    procs: BTreeMap<u64, Child>,
    worker: Option<Child>,
}

impl Members {
    fn new(model: &str) -> Self {
        let data =
            std::env::temp_dir().join(format!("tessera-raft-members-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&data);
        let addrs = (1..=5)
            .map(|id| (id, format!("127.0.0.1:{}", free_port())))
            .collect();
        let cluster_addrs = (1..=5)
            .map(|id| (id, format!("127.0.0.1:{}", free_port())))
            .collect();
        Self {
            model: model.to_owned(),
            data,
            addrs,
            cluster_addrs,
            procs: BTreeMap::new(),
            worker: None,
        }
    }

    /// Starts node `id`: the founder of a one-member cluster, or a node waiting to be added.
    fn start(&mut self, id: u64, found: bool) {
        let addr = self.addrs[&id].clone();
        let cluster = self.cluster_addrs[&id].clone();
        let dir = self.data.join(format!("c{id}"));
        let mut args = strings(&[
            "coordinator",
            "--listen",
            &addr,
            "--cluster-listen",
            &cluster,
            "--id",
            &id.to_string(),
            "--data-dir",
            &dir.to_string_lossy(),
            "--model",
            &self.model,
            "--heartbeat-ms",
            "250",
            "--heartbeat-timeout-ms",
            "3000",
            "--kv-tokens",
            "2048",
            "--exit-on-stdin-eof",
        ]);
        if found {
            args.extend(strings(&["--peers", &format!("{id}={cluster}")]));
        } else {
            args.push("--join".to_owned());
        }
        let (child, _) = spawn(&args);
        self.procs.insert(id, child);
    }

    fn endpoint(&self, id: u64) -> String {
        format!("http://{}", self.addrs[&id])
    }

    /// Node `id`'s cluster port, where membership changes go.
    fn cluster_endpoint(&self, id: u64) -> String {
        format!("http://{}", self.cluster_addrs[&id])
    }

    /// `tessera cluster add-coordinator` through node `via`; returns what it printed.
    fn add(&self, via: u64, id: u64) -> String {
        let out = tessera(&[
            "cluster",
            "add-coordinator",
            "--endpoint",
            &self.cluster_endpoint(via),
            "--id",
            &id.to_string(),
            "--address",
            &self.cluster_addrs[&id],
        ]);
        assert!(out.status.success(), "adding {id}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `tessera cluster remove-coordinator` through node `via`; returns what it printed.
    fn remove(&self, via: u64, id: u64) -> String {
        let out = tessera(&[
            "cluster",
            "remove-coordinator",
            "--endpoint",
            &self.cluster_endpoint(via),
            "--id",
            &id.to_string(),
        ]);
        assert!(out.status.success(), "removing {id}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Node `id`'s own replica, not the leader's view (what `tessera status --local` prints).
    fn local_status(
        &self,
        rt: &tokio::runtime::Runtime,
        id: u64,
    ) -> Result<pb::ClusterStatusResponse, tonic::Status> {
        let url = self.endpoint(id);
        rt.block_on(async {
            let ch = tonic::transport::Endpoint::from_shared(url)
                .expect("url")
                .connect_timeout(Duration::from_secs(2))
                .timeout(Duration::from_secs(10))
                .connect_lazy();
            pb::inference_client::InferenceClient::new(ch)
                .cluster_status(pb::ClusterStatusRequest { local: true })
                .await
                .map(tonic::Response::into_inner)
        })
    }
}

impl Drop for Members {
    fn drop(&mut self) {
        for c in self.worker.iter_mut().chain(self.procs.values_mut()) {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.data);
    }
}

/// The voter ids a status lists (members are `ID=ADDR`, learners marked).
fn voters(s: &pb::ClusterStatusResponse) -> Vec<u64> {
    s.members
        .iter()
        .filter(|m| !m.ends_with("(learner)"))
        .filter_map(|m| m.split_once('=')?.0.parse().ok())
        .collect()
}

/// Ensures that coordinators grow 1 → 3 → 5 → 3 online through the CLI, every member agreeing
/// on the voters and the committed state at each size, while generate requests keep succeeding.
#[test]
fn membership_grows_and_shrinks_while_serving() {
    let Some(model) = model() else {
        eprintln!("skipped: set TESSERA_MODEL_GGUF to the SmolLM2 GGUF");
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut m = Members::new(&model);
    m.start(1, true);
    let list = m
        .cluster_addrs
        .values()
        .map(|a| format!("http://{a}"))
        .collect::<Vec<_>>()
        .join(",");
    let (w, _) = spawn(&strings(&[
        "worker",
        "--coordinator",
        &list,
        "--threads",
        "1",
        "--memory",
        "1GiB",
        "--exit-on-stdin-eof",
    ]));
    m.worker = Some(w);
    let deadline = Instant::now() + Duration::from_secs(90);
    while !m.local_status(&rt, 1).is_ok_and(|s| s.ready) {
        assert!(Instant::now() < deadline, "the founder never serves");
        std::thread::sleep(Duration::from_millis(100));
    }

    // Load: short requests, one after another, through node 1 (which forwards if it stops
    // leading), counted until the membership changes are done.
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let stop = Arc::clone(&stop);
        let url = m.endpoint(1);
        rt.spawn(async move {
            let ch = tonic::transport::Endpoint::from_shared(url)
                .expect("url")
                .timeout(Duration::from_secs(30))
                .connect_lazy();
            let mut client = pb::inference_client::InferenceClient::new(ch);
            let (mut ok, mut failed) = (0_usize, Vec::new());
            while !stop.load(Ordering::SeqCst) {
                match collect(&mut client, request(2)).await {
                    Ok(2) => ok += 1,
                    other => failed.push(format!("{other:?}")),
                }
            }
            (ok, failed)
        })
    };

    // Waits until every listed node's own replica shows `want` as voters at the same commit.
    let agree = |m: &Members, ids: &[u64], want: &[u64]| {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let seen: Vec<_> = ids.iter().map(|id| m.local_status(&rt, *id)).collect();
            let views: Vec<_> = seen.iter().flatten().collect();
            if views.len() == ids.len()
                && views.iter().all(|s| voters(s) == want)
                && views
                    .iter()
                    .all(|s| s.commit_index == views[0].commit_index)
            {
                return views[0].commit_index;
            }
            assert!(
                Instant::now() < deadline,
                "members {ids:?} do not agree on voters {want:?}: {seen:#?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };

    for id in [2, 3] {
        m.start(id, false);
    }
    assert!(
        m.add(1, 2).contains("voters 1,2 "),
        "one at a time, as a voter"
    );
    assert!(m.add(1, 3).contains("voters 1,2,3 "));
    let at3 = agree(&m, &[1, 2, 3], &[1, 2, 3]);

    for id in [4, 5] {
        m.start(id, false);
    }
    // Through followers too: they forward membership changes to the leader.
    m.add(2, 4);
    assert!(m.add(3, 5).contains("voters 1,2,3,4,5 "));
    let at5 = agree(&m, &[1, 2, 3, 4, 5], &[1, 2, 3, 4, 5]);
    assert!(at5 > at3);

    // Shrink by the two highest ids that do not lead, so requests never wait for an election.
    let leader = m.local_status(&rt, 1).expect("status").leader;
    let leader: u64 = leader
        .split_once('=')
        .and_then(|(id, _)| id.parse().ok())
        .expect("a leader");
    let mut gone: Vec<u64> = (2..=5).rev().filter(|id| *id != leader).take(2).collect();
    gone.sort_unstable();
    for id in &gone {
        m.remove(1, *id);
    }
    let stay: Vec<u64> = (1..=5).filter(|id| !gone.contains(id)).collect();
    let at3_again = agree(&m, &stay, &stay);
    assert!(at3_again > at5);
    for id in &gone {
        if let Some(mut c) = m.procs.remove(id) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    stop.store(true, Ordering::SeqCst);
    let (ok, failed) = rt.block_on(load).expect("load task");
    assert!(
        failed.is_empty(),
        "requests failed during the changes: {failed:?}"
    );
    assert!(ok >= 3, "only {ok} requests completed");
    // The remaining three still serve, through any of them.
    for id in &stay {
        let url = m.endpoint(*id);
        let n = rt.block_on(async {
            let ch = tonic::transport::Endpoint::from_shared(url)
                .expect("url")
                .connect_lazy();
            collect(
                &mut pb::inference_client::InferenceClient::new(ch),
                request(2),
            )
            .await
        });
        assert_eq!(n.expect("serves"), 2, "through node {id}");
    }
    eprintln!("membership 1 -> 3 -> 5 -> 3: {ok} requests served, none failed");
}
