//! Replicated coordinators for the multi-process Raft tests: three `tessera coordinator`
//! processes in one Raft group plus real workers, optionally wired through cuttable proxies
//! ([`crate::Proxy`]) so a test can partition them. Everything it starts is killed, and its
//! data removed, when the cluster is dropped.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Child;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tessera_proto::v1 as pb;
use tessera_proto::v1::inference_client::InferenceClient;
use tonic::transport::Channel;

use crate::net::{Proxy, free_addr, url_list};
use crate::process::{Tessera, kill, member_args, strings};
use crate::requests::{count_tokens, inference_client, runtime, story};

/// Two three-coordinator clusters at once on a two-core machine starve each other's elections
/// and streams, so the clusters of a test binary run one at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Three coordinators and some workers, killed (and their data removed) when dropped.
pub struct RaftCluster {
    /// This cluster's turn; released after `Drop` has stopped the processes.
    _turn: MutexGuard<'static, ()>,
    tessera: Tessera,
    model: String,
    /// Where each coordinator serves the public API.
    pub addrs: Vec<String>,
    /// Where each coordinator serves the cluster protocol (Raft, workers).
    pub cluster_addrs: Vec<String>,
    /// Where each coordinator serves the OpenAI-compatible HTTP API.
    pub http_addrs: Vec<String>,
    data: PathBuf,
    coordinators: Vec<Option<Child>>,
    /// Each worker's name and process (`None` while killed).
    workers: Vec<(String, Option<Child>)>,
    /// Link `(from, to)` between coordinators, when the cluster is partitionable.
    proxies: BTreeMap<(usize, usize), Proxy>,
    /// The runtime the test's clients (and the proxies) run on.
    pub rt: tokio::runtime::Runtime,
}

impl RaftCluster {
    /// Starts three coordinators of `model` that dial each other directly, and `workers`
    /// workers (`w0`, `w1`, …), with `tessera`; `name` tells its data directory from other
    /// clusters'. Clusters of one test binary run one at a time: this waits for the previous
    /// one to be dropped.
    ///
    /// # Panics
    /// When a process does not start.
    pub fn start(tessera: &Tessera, model: &str, name: &str, workers: usize) -> Self {
        Self::start_with(tessera, model, name, workers, false)
    }

    /// As [`RaftCluster::start`], with every coordinator-to-coordinator link through a proxy
    /// that [`RaftCluster::isolate`] can cut. Workers dial the coordinators directly.
    ///
    /// # Panics
    /// As [`RaftCluster::start`].
    pub fn start_partitionable(tessera: &Tessera, model: &str, name: &str, workers: usize) -> Self {
        Self::start_with(tessera, model, name, workers, true)
    }

    fn start_with(
        tessera: &Tessera,
        model: &str,
        name: &str,
        workers: usize,
        proxied: bool,
    ) -> Self {
        // Taken before picking ports, so a waiting cluster's ports are not stale by its turn.
        let turn = ONE_AT_A_TIME.lock().unwrap_or_else(PoisonError::into_inner);
        let addrs: Vec<String> = (0..3).map(|_| free_addr()).collect();
        let cluster_addrs: Vec<String> = (0..3).map(|_| free_addr()).collect();
        let http_addrs: Vec<String> = (0..3).map(|_| free_addr()).collect();
        let data = std::env::temp_dir().join(format!("tessera-raft-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&data);
        let rt = runtime();
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
            tessera: tessera.clone(),
            model: model.to_owned(),
            addrs,
            cluster_addrs,
            http_addrs,
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

    /// Starts one more worker (one thread, 1 GiB), named `name`, that knows every
    /// coordinator's cluster port.
    ///
    /// # Panics
    /// When it does not start.
    pub fn add_worker(&mut self, name: &str) {
        let w = self.spawn_worker(name);
        self.workers.push((name.to_owned(), Some(w)));
    }

    /// Starts a worker named `name` (one thread, 1 GiB) that knows every coordinator.
    fn spawn_worker(&self, name: &str) -> Child {
        let list = url_list(&self.cluster_addrs);
        self.tessera.spawn_worker(&list, 1, "1GiB", Some(name), &[])
    }

    /// `kill -9` of worker `i` (nothing when it is not running).
    pub fn kill_worker(&mut self, i: usize) {
        if let Some(mut w) = self.workers[i].1.take() {
            kill(&mut w);
        }
    }

    /// Starts worker `i` again under its name, as [`RaftCluster::add_worker`] did (it registers
    /// as a new worker); nothing when it runs.
    ///
    /// # Panics
    /// When it does not start.
    pub fn restart_worker(&mut self, i: usize) {
        if self.workers[i].1.is_some() {
            return;
        }
        let w = self.spawn_worker(&self.workers[i].0);
        self.workers[i].1 = Some(w);
    }

    /// The processes that exited on their own (not killed through the cluster), each with
    /// its exit status; they stay listed as running.
    pub fn exited(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        for (i, c) in self.coordinators.iter_mut().enumerate() {
            if let Some(Ok(Some(status))) = c.as_mut().map(Child::try_wait) {
                out.push(format!("coordinator {}: {status}", i + 1));
            }
        }
        for (name, w) in &mut self.workers {
            if let Some(Ok(Some(status))) = w.as_mut().map(Child::try_wait) {
                out.push(format!("worker {name}: {status}"));
            }
        }
        out
    }

    /// How many workers were started (running or killed).
    pub fn worker_count(&self) -> usize {
        self.workers.len()
    }

    /// Worker `i`'s process, while it runs.
    pub fn worker(&self, i: usize) -> Option<&Child> {
        self.workers[i].1.as_ref()
    }

    /// Coordinator `i`'s process, while it runs.
    pub fn coordinator(&self, i: usize) -> Option<&Child> {
        self.coordinators[i].as_ref()
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

    /// Coordinator `i`'s data directory.
    pub fn data_dir(&self, i: usize) -> PathBuf {
        self.data.join(format!("c{}", i + 1))
    }

    /// (Re)starts coordinator `i` on its data directory, waiting for `min_workers` (at least
    /// one) before planning.
    ///
    /// # Panics
    /// When it does not start.
    pub fn start_coordinator(&mut self, i: usize, min_workers: usize) {
        let args = self.coordinator_args(i, min_workers);
        let (child, _) = self.tessera.spawn(&args);
        self.coordinators[i] = Some(child);
    }

    /// Starts coordinator `i` as a new member waiting to be added (`--join`, on its data
    /// directory, which should be empty).
    ///
    /// # Panics
    /// When it does not start.
    pub fn start_joining(&mut self, i: usize) {
        let mut args = self.coordinator_args(i, 1);
        let at = args.iter().position(|a| a == "--peers").expect("--peers");
        args.drain(at..at + 2);
        args.push("--join".to_owned());
        let (child, _) = self.tessera.spawn(&args);
        self.coordinators[i] = Some(child);
    }

    /// The arguments [`RaftCluster::start_coordinator`] runs coordinator `i` with.
    pub fn coordinator_args(&self, i: usize, min_workers: usize) -> Vec<String> {
        let mut args = member_args(
            &self.addrs[i],
            &self.cluster_addrs[i],
            i as u64 + 1,
            &self.data.join(format!("c{}", i + 1)),
            &self.model,
        );
        args.extend(strings(&[
            "--peers",
            &self.peers_for(i),
            "--min-workers",
            &min_workers.max(1).to_string(),
            "--http-listen",
            &self.http_addrs[i],
        ]));
        args
    }

    /// `kill -9` of coordinator `i` (nothing when it is not running).
    ///
    /// # Panics
    /// When the kill fails.
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
        let _in_runtime = self.rt.enter();
        inference_client(&self.addrs[i], Duration::from_secs(30))
    }

    /// Coordinator `i`'s view of the cluster (the leader's, when `i` can reach it).
    ///
    /// # Errors
    /// The status of the call.
    pub fn status(&self, i: usize) -> Result<pb::ClusterStatusResponse, tonic::Status> {
        self.ask_status(i, false)
    }

    /// Coordinator `i`'s own replica: its term, commit index, workers and plan.
    ///
    /// # Errors
    /// The status of the call.
    pub fn local_status(&self, i: usize) -> Result<pb::ClusterStatusResponse, tonic::Status> {
        self.ask_status(i, true)
    }

    /// Coordinator `i`'s model list, confirmed current unless `local` (see
    /// `ListModelsResponse.linearizable`).
    ///
    /// # Errors
    /// The status of the call.
    pub fn models(&self, i: usize, local: bool) -> Result<pb::ListModelsResponse, tonic::Status> {
        let mut c = self.client(i);
        self.rt
            .block_on(c.list_models(pb::ListModelsRequest { local }))
            .map(tonic::Response::into_inner)
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
    ///
    /// # Panics
    /// When it is not ready within `timeout`.
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

    /// Retries `generate` of [`story`]`(4)` on coordinator `i`, every `poll`, until it yields
    /// its 4 tokens; returns when it did.
    ///
    /// # Panics
    /// When it has not within `timeout`: `what`, with the last result.
    pub fn wait_serving(&self, i: usize, timeout: Duration, poll: Duration, what: &str) -> Instant {
        let deadline = Instant::now() + timeout;
        loop {
            match self.generate(i, story(4)) {
                Ok(4) => return Instant::now(),
                other => {
                    assert!(Instant::now() < deadline, "{what}: {other:?}");
                    std::thread::sleep(poll);
                }
            }
        }
    }

    /// Runs a request on coordinator `i` to the end: its token count or error status.
    ///
    /// # Errors
    /// As [`count_tokens`].
    pub fn generate(&self, i: usize, req: pb::GenerateRequest) -> Result<usize, tonic::Status> {
        let mut c = self.client(i);
        self.rt.block_on(count_tokens(&mut c, req))
    }
}

impl Drop for RaftCluster {
    fn drop(&mut self) {
        for c in self
            .workers
            .iter_mut()
            .filter_map(|(_, w)| w.as_mut())
            .chain(self.coordinators.iter_mut().flatten())
        {
            kill(c);
        }
        let _ = std::fs::remove_dir_all(&self.data);
    }
}
