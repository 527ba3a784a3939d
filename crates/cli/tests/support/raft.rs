//! Replicated coordinators for the multi-process Raft tests: three `tessera coordinator`
//! processes in one Raft group plus real workers, optionally wired through cuttable proxies
//! ([`super::proxy`]) so a test can partition them. Everything it starts is killed, and its
//! data removed, when the cluster is dropped.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tessera_proto::v1 as pb;
use tessera_proto::v1::generate_event::Event;
use tessera_proto::v1::inference_client::InferenceClient;
use tonic::transport::Channel;

use super::proxy::Proxy;
use super::{free_port, spawn};

/// Owned strings from string slices, for process arguments.
pub fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| (*s).to_owned()).collect()
}

/// Two three-coordinator clusters at once on a two-core machine starve each other's elections
/// and streams, so the clusters of a test binary run one at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Three coordinators and some workers, killed (and their data removed) when dropped.
pub struct RaftCluster {
    /// This cluster's turn; released after `Drop` has stopped the processes.
    _turn: MutexGuard<'static, ()>,
    model: String,
    /// Where each coordinator serves the public API.
    pub addrs: Vec<String>,
    /// Where each coordinator serves the cluster protocol (Raft, workers).
    pub cluster_addrs: Vec<String>,
    data: PathBuf,
    coordinators: Vec<Option<Child>>,
    workers: Vec<Child>,
    /// Link `(from, to)` between coordinators, when the cluster is partitionable.
    proxies: BTreeMap<(usize, usize), Proxy>,
    /// The runtime the test's clients (and the proxies) run on.
    pub rt: tokio::runtime::Runtime,
}

impl RaftCluster {
    /// Starts three coordinators that dial each other directly, and `workers` workers.
    pub fn start(model: &str, name: &str, workers: usize) -> Self {
        Self::start_with(model, name, workers, false)
    }

    /// As [`RaftCluster::start`], with every coordinator-to-coordinator link through a proxy
    /// that [`RaftCluster::isolate`] can cut. Workers dial the coordinators directly.
    pub fn start_partitionable(model: &str, name: &str, workers: usize) -> Self {
        Self::start_with(model, name, workers, true)
    }

    fn start_with(model: &str, name: &str, workers: usize, proxied: bool) -> Self {
        // Taken before picking ports, so a waiting cluster's ports are not stale by its turn.
        let turn = ONE_AT_A_TIME.lock().unwrap_or_else(PoisonError::into_inner);
        let addrs: Vec<String> = (0..3)
            .map(|_| format!("127.0.0.1:{}", free_port()))
            .collect();
        let cluster_addrs: Vec<String> = (0..3)
            .map(|_| format!("127.0.0.1:{}", free_port()))
            .collect();
        let data = std::env::temp_dir().join(format!("tessera-raft-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&data);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let mut proxies = BTreeMap::new();
        if proxied {
            for from in 0..3 {
                for to in (0..3).filter(|to| *to != from) {
                    let p = rt.block_on(Proxy::start(cluster_addrs[to].clone()));
                    proxies.insert((from, to), p);
                }
            }
        }
        let mut c = Self {
            _turn: turn,
            model: model.to_owned(),
            addrs,
            cluster_addrs,
            data,
            coordinators: vec![None, None, None],
            workers: Vec::new(),
            proxies,
            rt,
        };
        for i in 0..3 {
            c.start_coordinator(i, workers);
        }
        for i in 0..workers {
            c.add_worker(&format!("w{i}"));
        }
        c
    }

    /// Starts one more worker, named `name`, that knows every coordinator's cluster port.
    pub fn add_worker(&mut self, name: &str) {
        let list = self
            .cluster_addrs
            .iter()
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
            "--name",
            name,
            "--exit-on-stdin-eof",
        ]));
        self.workers.push(w);
    }

    /// Coordinator `i`'s founding peer list: itself at its own cluster address, the others
    /// where `i` dials them (their proxy for `i`, when partitionable).
    fn peers_for(&self, i: usize) -> String {
        (0..3)
            .map(|j| {
                let addr = match self.proxies.get(&(i, j)) {
                    Some(p) => p.address.as_str(),
                    None => self.cluster_addrs[j].as_str(),
                };
                format!("{}={addr}", j + 1)
            })
            .collect::<Vec<_>>()
            .join(",")
    }

    /// (Re)starts coordinator `i` on its data directory.
    pub fn start_coordinator(&mut self, i: usize, min_workers: usize) {
        let (child, _) = spawn(&strings(&[
            "coordinator",
            "--listen",
            &self.addrs[i],
            "--cluster-listen",
            &self.cluster_addrs[i],
            "--id",
            &(i + 1).to_string(),
            "--peers",
            &self.peers_for(i),
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

    /// `kill -9` of coordinator `i`.
    pub fn kill_coordinator(&mut self, i: usize) {
        if let Some(mut c) = self.coordinators[i].take() {
            c.kill().expect("kill -9");
            let _ = c.wait();
        }
    }

    /// Cuts every link between coordinator `i` and the others, both ways.
    ///
    /// # Panics
    /// When the cluster was not started partitionable.
    pub fn isolate(&self, i: usize) {
        assert!(!self.proxies.is_empty(), "start_partitionable first");
        for ((from, to), p) in &self.proxies {
            if *from == i || *to == i {
                p.set_cut(true);
            }
        }
    }

    /// Restores every link between coordinators.
    pub fn heal(&self) {
        for p in self.proxies.values() {
            p.set_cut(false);
        }
    }

    /// A client of coordinator `i` (connects lazily; 30 s per call).
    pub fn client(&self, i: usize) -> InferenceClient<Channel> {
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

    /// Coordinator `i`'s view of the cluster (the leader's, when `i` can reach it).
    pub fn status(&self, i: usize) -> Result<pb::ClusterStatusResponse, tonic::Status> {
        self.ask_status(i, false)
    }

    /// Coordinator `i`'s own replica: its term, commit index, workers and plan.
    pub fn local_status(&self, i: usize) -> Result<pb::ClusterStatusResponse, tonic::Status> {
        self.ask_status(i, true)
    }

    fn ask_status(
        &self,
        i: usize,
        local: bool,
    ) -> Result<pb::ClusterStatusResponse, tonic::Status> {
        let mut c = self.client(i);
        self.rt
            .block_on(c.cluster_status(pb::ClusterStatusRequest { local }))
            .map(tonic::Response::into_inner)
    }

    /// Waits until coordinator `i` reports a ready plan and a leader; returns the status and the
    /// leader's index.
    pub fn wait_ready(&self, i: usize, timeout: Duration) -> (pb::ClusterStatusResponse, usize) {
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

    /// The index of the coordinator a status names as leader, by its node id.
    pub fn leader_index(&self, s: &pb::ClusterStatusResponse) -> Option<usize> {
        let (id, _) = s.leader.split_once('=')?;
        let id: usize = id.parse().ok()?;
        (1..=3).contains(&id).then(|| id - 1)
    }

    /// Runs a request on coordinator `i` to the end: its token count or error status.
    pub fn generate(&self, i: usize, req: pb::GenerateRequest) -> Result<usize, tonic::Status> {
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
pub async fn collect(
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

/// A greedy request for exactly `max_tokens` tokens.
pub fn request(max_tokens: u32) -> pb::GenerateRequest {
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

/// The worker ids of a status, sorted.
pub fn worker_ids(s: &pb::ClusterStatusResponse) -> Vec<String> {
    let mut ids: Vec<String> = s.workers.iter().map(|w| w.worker_id.clone()).collect();
    ids.sort();
    ids
}

/// Runs `tessera ARGS…` to completion (at most 60 s) and returns its output.
///
/// # Panics
/// When it cannot start or does not finish in time.
pub fn tessera(args: &[&str]) -> std::process::Output {
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
