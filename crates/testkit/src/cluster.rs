//! A cluster of `tessera` processes on loopback: one coordinator (not replicated) and its
//! workers, with a client runtime, for the multi-process tests. Everything it starts is killed
//! when it is dropped. (Three replicated coordinators: [`crate::RaftCluster`].)

use std::process::Child;
use std::time::{Duration, Instant};

use tessera_proto::v1 as pb;
use tessera_proto::v1::inference_client::InferenceClient;
use tonic::transport::Channel;

use crate::net::free_addr;
use crate::process::{Tessera, kill};
use crate::requests::{collect, runtime, stream_error};

/// Heartbeat timeout a [`ProcessCluster`] runs with: a dead worker must end streams within
/// twice this.
pub const HEARTBEAT_TIMEOUT_MS: u64 = 1000;
/// KV capacity per worker of a [`ProcessCluster`]: enough for the tests, small enough that
/// memory plans stay modest.
pub const KV_TOKENS: u32 = 2048;

/// `--model-dir DIR` for a model given as a path (workers open only the model store's models
/// otherwise): the model's directory.
fn model_dir_args(model: &str) -> Vec<String> {
    tessera_hub::model_dir(model).map_or_else(Vec::new, |dir| {
        vec!["--model-dir".to_owned(), dir.to_string_lossy().into_owned()]
    })
}

/// A coordinator and workers, killed when dropped.
pub struct ProcessCluster {
    coordinator: Child,
    /// The worker processes in start order (`w0`, `w1`, …); `None` once killed.
    pub workers: Vec<Option<Child>>,
    /// The coordinator's public API, `http://host:port`.
    pub endpoint: String,
    /// host:port of the coordinator's Prometheus endpoint.
    pub metrics: String,
    /// The runtime the test's clients run on.
    pub rt: tokio::runtime::Runtime,
    /// The binary and the coordinator's cluster URL, to add workers later.
    tessera: Tessera,
    cluster_endpoint: String,
    /// `--model-dir` for the workers, when the model is a path.
    model_dirs: Vec<String>,
}

impl ProcessCluster {
    /// Starts a coordinator (heartbeats every 250 ms, [`HEARTBEAT_TIMEOUT_MS`], [`KV_TOKENS`],
    /// metrics on a free port) and one worker per `(threads, memory)` named `w0`, `w1`, …;
    /// waits up to 60 s for a plan.
    ///
    /// # Panics
    /// When a process does not start or the cluster is not ready in time.
    pub fn start(tessera: &Tessera, model: &str, workers: &[(u32, &str)]) -> Self {
        Self::start_with(tessera, model, workers, &[])
    }

    /// As [`ProcessCluster::start`], with more coordinator arguments (e.g. `--tp 2`; a
    /// `--kv-tokens` among them replaces [`KV_TOKENS`]).
    ///
    /// # Panics
    /// As [`ProcessCluster::start`].
    pub fn start_with(
        tessera: &Tessera,
        model: &str,
        workers: &[(u32, &str)],
        coordinator_args: &[&str],
    ) -> Self {
        let n = workers.len().to_string();
        let hb = HEARTBEAT_TIMEOUT_MS.to_string();
        let kv = KV_TOKENS.to_string();
        let metrics = free_addr();
        let mut args = vec![
            "--metrics-listen",
            &metrics,
            "--min-workers",
            &n,
            "--heartbeat-ms",
            "250",
            "--heartbeat-timeout-ms",
            &hb,
        ];
        // A test may ask for another KV budget (a long context).
        if !coordinator_args.contains(&"--kv-tokens") {
            args.extend_from_slice(&["--kv-tokens", &kv]);
        }
        args.extend_from_slice(coordinator_args);
        let (coordinator, addr, cluster_addr) = tessera.spawn_lone_coordinator(model, &args);
        let endpoint = format!("http://{addr}");
        let cluster_endpoint = format!("http://{cluster_addr}");
        let dirs = model_dir_args(model);
        let dir_args: Vec<&str> = dirs.iter().map(String::as_str).collect();
        let workers = workers
            .iter()
            .enumerate()
            .map(|(i, (threads, memory))| {
                let name = format!("w{i}");
                let child = tessera.spawn_worker(
                    &cluster_endpoint,
                    *threads,
                    memory,
                    Some(&name),
                    &dir_args,
                );
                Some(child)
            })
            .collect();
        let cluster = Self {
            coordinator,
            workers,
            endpoint,
            metrics,
            rt: runtime(),
            tessera: tessera.clone(),
            cluster_endpoint,
            model_dirs: dirs.clone(),
        };
        cluster.wait_ready(Duration::from_secs(60));
        cluster
    }

    /// The coordinator's process id.
    pub fn coordinator_pid(&self) -> u32 {
        self.coordinator.id()
    }

    /// The coordinator's cluster port, `http://host:port`.
    pub fn cluster_endpoint(&self) -> &str {
        &self.cluster_endpoint
    }

    /// A client of the coordinator, connected.
    ///
    /// # Panics
    /// When the coordinator cannot be reached.
    pub fn client(&self) -> InferenceClient<Channel> {
        self.rt.block_on(async {
            InferenceClient::connect(self.endpoint.clone())
                .await
                .expect("connect to the coordinator")
        })
    }

    /// The coordinator's cluster status.
    ///
    /// # Panics
    /// When the call fails.
    pub fn status(&self) -> pb::ClusterStatusResponse {
        let mut c = self.client();
        self.rt
            .block_on(c.cluster_status(pb::ClusterStatusRequest::default()))
            .expect("cluster status")
            .into_inner()
    }

    /// Waits until the cluster reports itself ready; returns that status.
    ///
    /// # Panics
    /// When it is not ready within `timeout`.
    pub fn wait_ready(&self, timeout: Duration) -> pb::ClusterStatusResponse {
        let start = Instant::now();
        loop {
            let s = self.status();
            if s.ready {
                return s;
            }
            assert!(start.elapsed() < timeout, "cluster not ready: {s:#?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs one request to the end: its tokens (with logprobs, when asked) or its error
    /// status.
    ///
    /// # Errors
    /// As [`collect`].
    pub fn generate(&self, req: pb::GenerateRequest) -> Result<Vec<pb::TokenEvent>, tonic::Status> {
        let mut c = self.client();
        self.rt.block_on(collect(&mut c, req))
    }

    /// Starts `req` and reads its first `tokens` token events: a stream known to be
    /// generating, and what it gave so far.
    ///
    /// # Panics
    /// When the request fails or the stream ends before `tokens` token events.
    pub fn stream_begun(
        &self,
        req: pb::GenerateRequest,
        tokens: usize,
    ) -> (tonic::Streaming<pb::GenerateEvent>, Vec<pb::TokenEvent>) {
        let mut c = self.client();
        let mut stream = self
            .rt
            .block_on(c.generate(req))
            .expect("start")
            .into_inner();
        let mut got = Vec::new();
        while got.len() < tokens {
            let ev = self
                .rt
                .block_on(stream.message())
                .expect("tokens before the failure")
                .expect("stream open");
            if let Some(pb::generate_event::Event::Token(t)) = ev.event {
                got.push(t);
            }
        }
        (stream, got)
    }

    /// Reads a generate stream to its error, which must come within 30 s.
    ///
    /// # Panics
    /// As [`stream_error`].
    pub fn stream_error(&self, stream: &mut tonic::Streaming<pb::GenerateEvent>) -> tonic::Status {
        self.rt
            .block_on(stream_error(stream, Duration::from_secs(30)))
    }

    /// Starts one more worker (`w<n>`) with `threads` and `memory`; returns its index.
    ///
    /// # Panics
    /// When the process does not start.
    pub fn add_worker(&mut self, threads: u32, memory: &str) -> usize {
        self.add_worker_with(threads, memory, &[])
    }

    /// As [`ProcessCluster::add_worker`], with more worker arguments (e.g. a `--failpoint`).
    ///
    /// # Panics
    /// When the process does not start.
    pub fn add_worker_with(&mut self, threads: u32, memory: &str, extra: &[&str]) -> usize {
        let i = self.workers.len();
        let name = format!("w{i}");
        let mut args: Vec<&str> = self.model_dirs.iter().map(String::as_str).collect();
        args.extend_from_slice(extra);
        let child =
            self.tessera
                .spawn_worker(&self.cluster_endpoint, threads, memory, Some(&name), &args);
        self.workers.push(Some(child));
        i
    }

    /// `kill -9` of worker `i`; returns when the process is gone.
    ///
    /// # Panics
    /// When worker `i` was killed already.
    pub fn kill_worker(&mut self, i: usize) {
        let mut w = self.workers[i].take().expect("worker still running");
        w.kill().expect("kill -9");
        let _ = w.wait();
    }

    /// SIGTERM to worker `i` (a pod deleted, a node drained): returns once the process has
    /// exited, and how long that took.
    ///
    /// # Panics
    /// When worker `i` is gone already, or has not exited within `within`, or exited with a
    /// failure.
    pub fn stop_worker(&mut self, i: usize, within: Duration) -> Duration {
        let mut w = self.workers[i].take().expect("worker still running");
        let began = Instant::now();
        crate::process::signal(&w, "-TERM");
        loop {
            if let Some(status) = w.try_wait().expect("wait") {
                assert!(status.success(), "worker {i} exited with {status}");
                return began.elapsed();
            }
            if began.elapsed() > within {
                kill(&mut w);
                panic!("worker {i} did not exit within {within:?} of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ProcessCluster {
    fn drop(&mut self) {
        for w in self.workers.iter_mut().flatten() {
            kill(w);
        }
        kill(&mut self.coordinator);
    }
}
