//! The worker process: binds, serves `tessera.cluster.v1.Worker` and `grpc.health.v1` (and
//! Prometheus metrics when asked), registers with the coordinators' cluster port, and shuts
//! down on request — draining first: it leaves the cluster (the leader re-plans without it,
//! migrating its requests while it still answers) and waits, bounded, for the coordinator to
//! close the pipeline streams it serves. A worker speaks only the cluster protocol.

use std::future::Future;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tessera_hub::ModelCache;
use tessera_proto::cluster::v1 as pb;
use tessera_proto::cluster::v1::worker_server::WorkerServer;
use tessera_tls::Role;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::transport::Server;

use crate::config::WorkerConfig;
use crate::error::WorkerError;
use crate::group::{PeerListener, PeerTls};
use crate::pipeline::MAX_MESSAGE_BYTES;
use crate::register::{self, Registration};
use crate::service::WorkerService;
use crate::shard::ShardHandle;

/// How long shutdown waits for connections to drain before giving up on them.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a worker that left waits for the coordinator to close the pipeline streams it
/// serves (it re-plans, and its requests migrate) before it ends them itself.
const STREAMS_TIMEOUT: Duration = Duration::from_secs(10);
/// How often that wait looks.
const STREAMS_POLL: Duration = Duration::from_millis(20);

/// A started worker; dropping it does not stop it — call [`RunningWorker::shutdown`].
#[derive(Debug)]
pub struct RunningWorker {
    local_addr: SocketAddr,
    advertise: String,
    peer_address: String,
    shard: ShardHandle,
    shutdown: watch::Sender<bool>,
    /// Tells the registration task to leave the cluster.
    leave: watch::Sender<bool>,
    /// The registration task: whether the leader confirmed the leave.
    register: JoinHandle<bool>,
    task: JoinHandle<Result<(), WorkerError>>,
}

impl RunningWorker {
    /// The address the services are bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The `host:port` registered with the coordinator.
    pub fn advertise(&self) -> &str {
        &self.advertise
    }

    /// The `host:port` of its peer port, registered with the coordinator.
    pub fn peer_address(&self) -> &str {
        &self.peer_address
    }

    /// The shard this worker runs (its status: epoch, weight bytes, free KV blocks).
    pub fn shard(&self) -> &ShardHandle {
        &self.shard
    }

    /// Stops the worker: drains (see [`RunningWorker::drain`]), then ends every pipeline
    /// stream still open with UNAVAILABLE, stops the server, and waits for it.
    ///
    /// # Errors
    /// When the server had failed.
    pub async fn shutdown(mut self) -> Result<(), WorkerError> {
        self.drain().await;
        let _ = self.shutdown.send(true);
        join(self.task).await
    }

    /// Leaves the cluster and waits for the coordinator to close the pipeline streams this
    /// worker serves (bounded by [`STREAMS_TIMEOUT`]): their requests migrate to a plan
    /// without it, and the steps in flight here still answer meanwhile. No wait when the
    /// leave was not confirmed (no coordinator answered): nobody will close them.
    async fn drain(&mut self) {
        let _ = self.leave.send(true);
        let left = matches!((&mut self.register).await, Ok(true));
        if !left {
            return;
        }
        let began = std::time::Instant::now();
        while self.shard.open_streams() > 0 {
            if began.elapsed() >= STREAMS_TIMEOUT {
                tracing::warn!(
                    streams = self.shard.open_streams(),
                    "the coordinator did not close its pipeline streams in time; ending them"
                );
                return;
            }
            tokio::time::sleep(STREAMS_POLL).await;
        }
        tracing::info!(
            waited_ms = began.elapsed().as_millis() as u64,
            "drained: no pipeline stream open"
        );
    }
}

async fn join(
    task: impl Future<Output = Result<Result<(), WorkerError>, tokio::task::JoinError>>,
) -> Result<(), WorkerError> {
    task.await
        .map_err(|e| WorkerError::Executor(format!("server task: {e}")))?
}

/// Binds and starts a worker: the gRPC services serve at once; registration proceeds in the
/// background (retrying while the coordinator is unreachable).
///
/// # Errors
/// [`WorkerError::Bind`] when the address cannot be bound; [`WorkerError::InvalidArgument`]
/// for a malformed coordinator URL; [`WorkerError::Executor`] when the compute thread cannot
/// start.
pub async fn start(cfg: WorkerConfig) -> Result<RunningWorker, WorkerError> {
    // Any or all coordinators, comma-separated: the worker follows whichever leads.
    let coordinators = cfg
        .coordinator
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(|u| {
            cfg.cluster_tls
                .endpoint(u, Role::Coordinator)
                .map(|e| e.connect_timeout(Duration::from_secs(1)))
                .map_err(|e| WorkerError::invalid("coordinator", e.message().to_owned()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if coordinators.is_empty() {
        return Err(WorkerError::invalid(
            "coordinator",
            "at least one URL is required",
        ));
    }
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|source| WorkerError::Bind {
            addr: cfg.listen,
            source,
        })?;
    let local_addr = listener.local_addr().map_err(|source| WorkerError::Bind {
        addr: cfg.listen,
        source,
    })?;
    let advertise = cfg
        .advertise
        .clone()
        .unwrap_or_else(|| local_addr.to_string());
    // The peer port: the same interface as the gRPC port unless told otherwise; advertised
    // under the same host as the gRPC address.
    let peer_bind = cfg
        .peer_listen
        .unwrap_or_else(|| SocketAddr::new(local_addr.ip(), 0));
    let peers = Arc::new(PeerListener::bind(
        peer_bind,
        PeerTls::new(&cfg.cluster_tls),
    )?);
    let peer_address = peer_advertise(&advertise, peers.local_addr().port());
    // Registration declares the device; every shard runs on it.
    let backend = cfg.backend.clone();
    let mut capacity = cfg.capacity.clone();
    capacity.memory_bytes = backend.memory_bytes(capacity.memory_bytes);
    capacity.devices.extend(backend.devices());
    let shard = ShardHandle::spawn(
        capacity.threads as usize,
        cfg.model_home.clone().map(ModelCache::at),
        capacity.memory_bytes,
        Some(Arc::clone(&peers)),
        cfg.failpoint,
        backend,
    )?;
    let metrics = match cfg.metrics_listen {
        Some(addr) => {
            let listener = tessera_telemetry::http::bind(addr, "worker")
                .await
                .map_err(|source| WorkerError::Bind { addr, source })?;
            let shard = shard.clone();
            Some(tokio::spawn(tessera_telemetry::http::serve(
                listener,
                move || shard.metrics_text(),
            )))
        }
        None => None,
    };
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let (leave_tx, leave_rx) = watch::channel(false);
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<WorkerServer<WorkerService>>().await;
    // Under mutual TLS the certificate names this worker: that is the name it registers under
    // and the one a downstream stage checks.
    let name = match cfg.cluster_tls.identity() {
        Some(me) => me.name().to_owned(),
        None => {
            tracing::warn!(
                "the cluster protocol runs WITHOUT TLS (--insecure-cluster): anyone who can \
                 reach this worker can load shards, feed it steps and read its outputs"
            );
            cfg.name.clone()
        }
    };
    let service = WorkerServer::new(WorkerService::new(
        shard.clone(),
        shutdown_rx.clone(),
        cfg.cluster_tls.clone(),
        cfg.model_paths.clone(),
    ))
    .max_decoding_message_size(MAX_MESSAGE_BYTES)
    .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let registration = Registration {
        endpoints: coordinators,
        tls: cfg.cluster_tls.clone(),
        request: pb::RegisterRequest {
            address: advertise.clone(),
            capacity: Some(capacity.to_proto()),
            name: name.clone(),
            peer_address: peer_address.clone(),
        },
    };
    let register = tokio::spawn(register::run(registration, shard.clone(), leave_rx));
    let stop_registering = register.abort_handle();
    // The probe port: health alone, in the clear; it stops with the worker.
    let probe = match cfg.health_listen {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| WorkerError::Bind { addr, source })?;
            let mut stop = shutdown_rx.clone();
            let health = health_service.clone();
            let gate = tessera_tls::Gate::new("health", cfg.connections);
            Some(tokio::spawn(async move {
                let served = Server::builder()
                    .add_service(health)
                    .serve_with_incoming_shutdown(gate.incoming(listener), async move {
                        let _ = stop.wait_for(|&s| s).await;
                    })
                    .await;
                if let Err(e) = served {
                    tracing::error!(error = %e, "the health port stopped");
                }
            }))
        }
        None => None,
    };
    let mut stop = shutdown_rx;
    let mut builder = Server::builder();
    if let Some(tls) = cfg.cluster_tls.server_tls() {
        builder = builder
            .tls_config(tls)
            .map_err(|e| WorkerError::Executor(format!("TLS configuration: {e}")))?;
    }
    let server = builder
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(tessera_tls::KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(tessera_tls::KEEPALIVE_TIMEOUT))
        .add_service(health_service)
        .add_service(service)
        .serve_with_incoming_shutdown(
            tessera_tls::Gate::new("worker", cfg.connections).incoming(listener),
            async move {
                let _ = stop.wait_for(|&s| s).await;
            },
        );
    let span = tracing::info_span!("worker", addr = %advertise, name = %name);
    let mut drained = shutdown_tx.subscribe();
    let task = tokio::spawn(tracing::Instrument::instrument(
        async move {
            let mut server = std::pin::pin!(server);
            // Pipeline streams end themselves on shutdown; a peer that keeps its connection
            // open must not keep this process alive.
            let result = tokio::select! {
                r = &mut server => r.map_err(WorkerError::from),
                () = async {
                    let _ = drained.wait_for(|&s| s).await;
                    tokio::time::sleep(DRAIN_TIMEOUT).await;
                } => {
                    tracing::warn!("connections did not drain; stopping anyway");
                    Ok(())
                }
            };
            stop_registering.abort();
            if let Some(m) = metrics {
                m.abort();
            }
            if let Some(p) = probe {
                p.abort();
            }
            result
        },
        span,
    ));
    tracing::info!(addr = %local_addr, peer = %peer_address, "worker started");
    Ok(RunningWorker {
        local_addr,
        advertise,
        peer_address,
        shard,
        shutdown: shutdown_tx,
        leave: leave_tx,
        register,
        task,
    })
}

/// The peer port's advertised address: the host of the advertised gRPC address with the peer
/// port's number.
fn peer_advertise(advertise: &str, port: u16) -> String {
    match advertise.rsplit_once(':') {
        Some((host, _)) => format!("{host}:{port}"),
        None => format!("{advertise}:{port}"),
    }
}

/// Runs a worker until `shutdown` resolves: binds, prints `tessera worker listening on <addr>`
/// on stdout once bound, serves, registers and heartbeats.
///
/// # Errors
/// As [`start`]; also when the server fails while running.
pub async fn serve(
    cfg: WorkerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), WorkerError> {
    let mut worker = start(cfg).await?;
    {
        let mut out = std::io::stdout().lock();
        // A closed stdout must not stop the worker; the line is for humans and scripts.
        let _ = writeln!(out, "tessera worker listening on {}", worker.local_addr());
        let _ = out.flush();
    }
    let shutdown = std::pin::pin!(shutdown);
    tokio::select! {
        () = shutdown => {}
        // The server only stops by itself when it fails.
        r = &mut worker.task => {
            return r.map_err(|e| WorkerError::Executor(format!("server task: {e}")))?;
        }
    }
    worker.shutdown().await
}
