//! An in-process cluster for the coordinator's end-to-end tests: one coordinator
//! (`serve_on`, not replicated) and real workers (`tessera_worker::start`) on loopback, in the
//! test's own Tokio runtime, serving the real model. (The multi-process fixtures live in
//! `tessera-testkit`; this one needs the coordinator and worker crates themselves, which the
//! kit cannot depend on without a second copy of their types.)

use std::time::{Duration, Instant};

use tessera_coordinator::{CoordinatorConfig, CoordinatorError};
use tessera_proto::v1 as pb;
use tessera_proto::v1::inference_client::InferenceClient;
use tessera_worker::{Capacity, RunningWorker, WorkerConfig};
use tonic::transport::Channel;

/// Bound on anything these fixtures wait for.
pub const WAIT: Duration = Duration::from_secs(120);

/// A coordinator running in this process, stopped by [`Coordinator::stop`].
pub struct Coordinator {
    /// Its public API, `host:port`.
    pub addr: String,
    /// Its cluster port, `host:port`, which workers register with.
    pub cluster_addr: String,
    /// Its OpenAI-compatible HTTP API, `host:port`.
    pub http_addr: String,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), CoordinatorError>>,
}

impl Coordinator {
    /// Starts a coordinator with `cfg` on three free loopback ports — public, cluster, HTTP
    /// (`cfg`'s addresses are ignored) — and, once per test binary, a log of warnings.
    ///
    /// # Panics
    /// When the ports cannot be bound.
    pub async fn start(cfg: CoordinatorConfig) -> Self {
        // Warnings (a pipeline lost, a request migrated) go to the test's captured output, so
        // a failing test shows what the cluster went through; RUST_LOG widens it.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
            )
            .with_test_writer()
            .try_init();
        let any = "127.0.0.1:0".parse().expect("addr");
        let listeners = tessera_coordinator::Listeners::bind(any, any)
            .await
            .expect("bind")
            .with_http(any)
            .await
            .expect("bind http");
        let addr = listeners.public.local_addr().expect("addr").to_string();
        let cluster_addr = listeners.cluster.local_addr().expect("addr").to_string();
        let http_addr = listeners
            .http
            .as_ref()
            .and_then(|l| l.local_addr().ok())
            .expect("http addr")
            .to_string();
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(tessera_coordinator::serve_on(listeners, cfg, async move {
            let _ = stop_rx.await;
        }));
        Self {
            addr,
            cluster_addr,
            http_addr,
            stop,
            task,
        }
    }

    /// A client of the public API.
    ///
    /// # Panics
    /// When the coordinator does not accept the connection.
    pub async fn client(&self) -> InferenceClient<Channel> {
        InferenceClient::connect(format!("http://{}", self.addr))
            .await
            .expect("connect")
    }

    /// Starts a worker registering here, with `threads` threads and at most `memory_bytes`
    /// (0: no limit).
    ///
    /// # Panics
    /// When the worker cannot start.
    pub async fn start_worker(&self, memory_bytes: u64, threads: u32, name: &str) -> RunningWorker {
        self.start_worker_at("127.0.0.1:0", None, memory_bytes, threads, name)
            .await
    }

    /// Starts a worker listening on `listen` that tells the coordinator to reach it at
    /// `advertise` (default: its listening address).
    pub async fn start_worker_at(
        &self,
        listen: &str,
        advertise: Option<String>,
        memory_bytes: u64,
        threads: u32,
        name: &str,
    ) -> RunningWorker {
        tessera_worker::start(WorkerConfig {
            listen: listen.parse().expect("addr"),
            advertise,
            coordinator: format!("http://{}", self.cluster_addr),
            capacity: Capacity {
                memory_bytes,
                threads,
                devices: vec![],
            },
            name: name.into(),
            model_home: None,
            metrics_listen: None,
            peer_listen: None,
            cluster_tls: tessera_tls::ClusterTls::insecure(),
            health_listen: None,
            connections: tessera_tls::Limits::default(),
            model_paths: tessera_worker::ModelPaths::any(),
            failpoint: None,
            // Bit-for-bit comparisons with the CPU engine: never a GPU.
            backend: tessera_worker::Backend::Cpu,
        })
        .await
        .expect("start worker")
    }

    /// Checks that the HTTP API still answers `/health`, shuts `workers` down, then stops the
    /// coordinator and waits for it to end cleanly.
    ///
    /// # Panics
    /// When `/health` does not answer 200, a worker or the coordinator fails to stop, or the
    /// coordinator's serve failed.
    pub async fn stop(self, workers: Vec<RunningWorker>) {
        // Whatever a test did, the HTTP API still answers its health check.
        let health = tokio::task::spawn_blocking({
            let addr = self.http_addr.clone();
            move || tessera_testkit::http::get(&addr, "/health", &[])
        })
        .await
        .expect("health check");
        assert_eq!(health.status, 200, "{}", health.body);
        for w in workers {
            w.shutdown().await.expect("worker shutdown");
        }
        let _ = self.stop.send(());
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("coordinator stops")
            .expect("task")
            .expect("serve");
    }
}

/// Waits until the cluster serves with `stages` stages; its status then.
///
/// # Panics
/// When that does not happen within [`WAIT`].
pub async fn wait_ready(
    client: &mut InferenceClient<Channel>,
    stages: usize,
) -> pb::ClusterStatusResponse {
    let deadline = Instant::now() + WAIT;
    loop {
        let s = client
            .cluster_status(pb::ClusterStatusRequest::default())
            .await
            .expect("status")
            .into_inner();
        let planned = s.workers.iter().filter(|w| w.shard.is_some()).count();
        if s.ready && planned == stages {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "cluster not ready in time: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
