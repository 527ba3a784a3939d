//! The tessera coordinator: the public gRPC API, request validation, the shard planner, the
//! cluster state, worker registry and liveness, and the continuous-batching scheduler.
//!
//! [`serve`] runs one coordinator: it reads the model's tokenizer and footprint (no weights),
//! keeps a plan loaded on the registered workers, and serves two protocols on two ports:
//!
//! - the **public port** (`listen`): `tessera.v1.Inference`, `grpc.health.v1` and server
//!   reflection (v1 and v1alpha), which lists exactly those services — nothing of the cluster;
//! - the **cluster port** (`cluster_listen`, advertised as `advertise`): `tessera.cluster.v1`'s
//!   `Raft`, `Coordination` (workers register and heartbeat) and `Forward` (followers hand
//!   client calls to the leader), and `grpc.health.v1`. This is the address Raft peers and
//!   workers know a coordinator by.
//!
//! - the **HTTP port** (`http_listen`, optional): the OpenAI-compatible API ([`openai`]),
//!   a translation layer over the public gRPC service.
//!
//! API keys (`api_keys`) guard the public gRPC service and the HTTP API alike
//! ([`services::auth`]). Each port is its own `tonic` server, so a call to a service of the other port is answered
//! `UNIMPLEMENTED`, and each can get its own transport security.

#![forbid(unsafe_code)]

use std::future::Future;
use std::io::Write;
use std::sync::Arc;

use tessera_hub::{ModelCache, resolve};
use tessera_proto::cluster::v1 as cpb;
use tessera_proto::v1 as pb;

use {tessera_format::open_weights, tessera_text::Frontend};

pub mod config;
pub mod control;
pub mod error;
#[doc(hidden)]
pub mod fuzz;
pub mod metrics;
pub mod openai;
pub mod raft;
pub mod services;
pub mod state;

pub use control::scheduler;
pub use services::{api, validate};
pub use state::{footprint, planner, replica};

pub use config::CoordinatorConfig;
pub use error::CoordinatorError;

/// Aborts the background tasks when `serve` returns, however it returns.
struct Tasks(Vec<tokio::task::JoinHandle<()>>);

impl Drop for Tasks {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

/// How long the servers of a coordinator whose Raft node failed get to stop before it exits.
const FAILED_GRACE: std::time::Duration = std::time::Duration::from_secs(3);

/// The sockets a coordinator serves on.
#[derive(Debug)]
pub struct Listeners {
    /// The public API (`tessera.v1`), what clients dial.
    pub public: tokio::net::TcpListener,
    /// The cluster protocol (`tessera.cluster.v1`), what peers and workers dial.
    pub cluster: tokio::net::TcpListener,
    /// The OpenAI-compatible HTTP API ([`openai`]), when served.
    pub http: Option<tokio::net::TcpListener>,
}

impl Listeners {
    /// Binds both addresses.
    ///
    /// # Errors
    /// [`CoordinatorError::Serve`] naming the address that could not be bound.
    pub async fn bind(
        public: std::net::SocketAddr,
        cluster: std::net::SocketAddr,
    ) -> Result<Self, CoordinatorError> {
        let bind = |addr: std::net::SocketAddr| async move {
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| CoordinatorError::Serve {
                    addr: addr.to_string(),
                    reason: e.to_string(),
                })
        };
        Ok(Self {
            public: bind(public).await?,
            cluster: bind(cluster).await?,
            http: None,
        })
    }

    /// Also serves the OpenAI-compatible HTTP API on `addr`.
    ///
    /// # Errors
    /// [`CoordinatorError::Serve`] when it cannot be bound.
    pub async fn with_http(mut self, addr: std::net::SocketAddr) -> Result<Self, CoordinatorError> {
        self.http = Some(tokio::net::TcpListener::bind(addr).await.map_err(|e| {
            CoordinatorError::Serve {
                addr: addr.to_string(),
                reason: e.to_string(),
            }
        })?);
        Ok(self)
    }
}

/// Runs a coordinator until `shutdown` resolves.
///
/// Prints exactly two stdout lines once both ports are bound, in this order:
/// `tessera coordinator cluster on <cluster addr>` then
/// `tessera coordinator listening on <public addr>` (the last line means "up"; tools that only
/// look for "listening on" get the public address).
///
/// # Errors
/// [`CoordinatorError::Model`] when the model cannot be resolved or read;
/// [`CoordinatorError::Serve`] when an address cannot be bound or serving fails.
pub async fn serve(
    cfg: CoordinatorConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), CoordinatorError> {
    let mut listeners = Listeners::bind(cfg.listen, cfg.cluster_listen).await?;
    if let Some(http) = cfg.http_listen {
        listeners = listeners.with_http(http).await?;
    }
    serve_on(listeners, cfg, shutdown).await
}

/// An encoder is served by pipeline stages only (its inputs are short and whole, and its
/// layers are not split by heads or sequence): `--tp auto` and `--cp auto` plan no groups for
/// it, a fixed group or ring larger than one is refused naming the flag.
fn encoder_policy(
    mut cfg: CoordinatorConfig,
    encoder: bool,
) -> Result<CoordinatorConfig, CoordinatorError> {
    use crate::state::planner::{CpPolicy, TpPolicy};
    if !encoder {
        return Ok(cfg);
    }
    if matches!(cfg.tp, TpPolicy::Fixed(k) if k > 1) {
        return Err(CoordinatorError::invalid(
            "tp",
            "an encoder is not split by tensor parallelism: serve it with pipeline stages",
        ));
    }
    if matches!(cfg.cp, CpPolicy::Fixed(p) if p > 1) {
        return Err(CoordinatorError::invalid(
            "cp",
            "an encoder is not split over a ring: serve it with pipeline stages",
        ));
    }
    cfg.tp = TpPolicy::Fixed(1);
    cfg.cp = CpPolicy::Fixed(1);
    Ok(cfg)
}

/// As [`serve`], on listeners the caller bound (`cfg.listen`, `cfg.cluster_listen` and
/// `cfg.http_listen` are ignored): tests and embedders bind port 0 and know the addresses before the coordinator
/// starts.
///
/// # Errors
/// As [`serve`].
pub async fn serve_on(
    listeners: Listeners,
    cfg: CoordinatorConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), CoordinatorError> {
    let cache = match &cfg.model_home {
        Some(home) => ModelCache::at(home.clone()),
        None => ModelCache::from_env()?,
    };
    let location = resolve(&cfg.model, &cache)?;
    let frontend = Frontend::open(&location)?;
    let (store, model_cfg) = open_weights(&location)?;
    let footprint = footprint::ModelFootprint::from_store(store.as_ref(), &model_cfg)?;
    drop(store);
    let cfg = encoder_policy(cfg, model_cfg.arch.is_encoder())?;
    let kv_tokens = cfg.kv_tokens_for(model_cfg.context_len);
    let validator = validate::Validator::new(frontend.clone(), &cfg.model, kv_tokens as usize)
        .with_limits(cfg.limits);
    let keys = services::auth::ApiKeys::new(&cfg.api_keys)?;
    match cfg.cluster_tls.identity() {
        // Peers check that a Raft message's sender is the node its certificate names: a
        // coordinator holding another node's certificate could not take part at all.
        Some(me) if me.coordinator_id() != Some(cfg.id) => {
            return Err(CoordinatorError::invalid(
                "id",
                format!(
                    "this coordinator is node {} but its cluster certificate is for {me}",
                    cfg.id
                ),
            ));
        }
        Some(_) => {}
        None => tracing::warn!(
            "the cluster port runs WITHOUT TLS (--insecure-cluster): anyone who can reach it \
             can register workers, send Raft messages and read prompts"
        ),
    }

    let listen = cfg.listen;
    let serve_err = |reason: String| CoordinatorError::Serve {
        addr: listen.to_string(),
        reason,
    };
    let Listeners {
        public: listener,
        cluster: cluster_listener,
        http: http_listener,
    } = listeners;
    let http_addr = http_listener
        .as_ref()
        .map(tokio::net::TcpListener::local_addr)
        .transpose()
        .map_err(|e| serve_err(e.to_string()))?;
    let addr = listener
        .local_addr()
        .map_err(|e| serve_err(e.to_string()))?;
    let cluster_addr = cluster_listener
        .local_addr()
        .map_err(|e| serve_err(e.to_string()))?;

    let data = DataDir::open(cfg.data_dir.clone(), cfg.id).map_err(serve_err)?;
    // Peers and workers dial the cluster port; the public address is only for clients.
    let advertise = cfg
        .advertise
        .clone()
        .unwrap_or_else(|| cluster_addr.to_string());
    let mut peers = cfg.peers.clone();
    if cfg.join && !peers.is_empty() {
        return Err(CoordinatorError::invalid(
            "peers",
            "a joining coordinator founds nothing: give either --join or --peers",
        ));
    }
    // A coordinator whose id is not among the founding voters joins, and asks to be added. So
    // the pods of a StatefulSet share one --peers (the founders'), and those after the
    // founders join by themselves when the StatefulSet scales up.
    let not_founder = !peers.is_empty() && !peers.contains_key(&cfg.id);
    let join = cfg.join || not_founder;
    // Such a node asks the founders to add it (raft/join.rs); an explicit --join waits for an
    // operator's add-coordinator.
    let ask_to_join: Option<Vec<String>> = not_founder.then(|| peers.values().cloned().collect());
    if peers.is_empty() {
        peers.insert(cfg.id, advertise.clone());
    }
    let storage = raft::RedbStorage::open(&data.path)?;
    let replica = replica::Replica::new(&cfg.model);
    let transport = raft::GrpcTransport::new(
        &advertise,
        peers
            .iter()
            .filter(|(id, _)| **id != cfg.id)
            .map(|(id, a)| (*id, a.clone())),
        cfg.cluster_tls.clone(),
    );
    let raft = raft::RaftNode::start(
        raft::RaftConfig::new(cfg.id),
        storage,
        replica::ReplicaMachine(Arc::clone(&replica)),
        transport.clone(),
        // A joining node learns its peers from the leader's snapshot.
        (!join).then_some(peers),
    )?;
    let cluster = Arc::new(state::cluster::Cluster::new(
        cfg,
        footprint,
        kv_tokens,
        replica,
        raft.clone(),
    ));
    // An encoder's cluster embeds; every other model's generates.
    let (serve, sched_task) = if frontend.config().arch.is_encoder() {
        let (h, task) = control::embedder::spawn(Arc::clone(&cluster));
        (api::Serve::Embed(h), task)
    } else {
        let (h, task) = scheduler::spawn(Arc::clone(&cluster), frontend);
        (api::Serve::Generate(h), task)
    };
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "tessera coordinator cluster on {cluster_addr}")
            .and_then(|()| match http_addr {
                Some(http) => writeln!(out, "tessera coordinator http on {http}"),
                None => Ok(()),
            })
            .and_then(|()| writeln!(out, "tessera coordinator listening on {addr}"))
            .and_then(|()| out.flush())
            .map_err(|e| serve_err(format!("writing stdout: {e}")))?;
    }
    tracing::info!(%addr, %cluster_addr, %advertise, model = %cluster.cfg.model, kv_tokens, layers = cluster.footprint.n_layers(),
        weight_bytes = cluster.footprint.weight_bytes(), "coordinator up");
    let (health, health_service) = tonic_health::server::health_reporter();
    // The cluster port's own health: "" is SERVING while the process serves.
    let (cluster_health, cluster_health_service) = tonic_health::server::health_reporter();
    let (not_serving, not_serving_cluster) = (health.clone(), cluster_health.clone());
    let mut tasks = Tasks(vec![
        sched_task,
        tokio::spawn(control::leadership::run(Arc::clone(&cluster))),
        tokio::spawn(control::plan::run(Arc::clone(&cluster))),
        tokio::spawn(control::liveness::monitor(Arc::clone(&cluster))),
    ]);
    if let Some(founders) = ask_to_join {
        tasks.0.push(tokio::spawn(raft::self_join(
            raft.clone(),
            cluster.cfg.cluster_tls.clone(),
            cluster.cfg.id,
            advertise.clone(),
            founders,
        )));
    }
    tasks.0.push(tokio::spawn(mirror_health(
        raft.watch_status(),
        [health.clone(), cluster_health],
        VOTER_HEALTH,
        |s: &raft::RaftStatus| s.leader.is_some() && s.members.voters.contains(&s.id),
    )));
    // The server is SERVING once up; `tessera.v1.Inference` only while a plan serves the model.
    tasks.0.push(tokio::spawn(mirror_health(
        cluster.subscribe(),
        [health],
        <pb::inference_server::InferenceServer<api::Api> as tonic::server::NamedService>::NAME,
        Option::is_some,
    )));
    if let Some(addr) = cluster.cfg.metrics_listen {
        let listener = tessera_telemetry::http::bind(addr, "coordinator")
            .await
            .map_err(|e| serve_err(format!("metrics endpoint {addr}: {e}")))?;
        let metrics = Arc::clone(&cluster.metrics);
        tasks.0.push(tokio::spawn(tessera_telemetry::http::serve(
            listener,
            move || metrics.render(),
        )));
    }
    let (reflection_v1, reflection_v1alpha) = public_reflection().map_err(serve_err)?;
    let (stop, _) = tokio::sync::watch::channel(false);
    let api = api::Api::new(Arc::clone(&cluster), validator, serve);
    if let Some(listener) = http_listener {
        let max_prompt = cluster.cfg.limits.max_prompt_bytes;
        let app = openai::OpenAi::new(api.clone(), Arc::clone(&cluster), keys.clone(), max_prompt)
            .router();
        // Aborted with the other tasks on shutdown: an open event stream must not hold the
        // process up.
        let listener = openai::listener::HttpListener::new(
            listener,
            tessera_tls::Gate::new("http", cluster.cfg.connections),
            cluster.cfg.public_tls.clone(),
        )
        .map_err(|e| serve_err(format!("HTTP port: {e}")))?;
        tasks.0.push(tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!(error = %e, "the HTTP API stopped");
            }
        }));
    }

    // Every port admits through a gate (a connection limit, an idle timeout); HTTP/2 pings keep
    // a live client's connection from ever looking idle, and find dead ones.
    let connections = cluster.cfg.connections;
    let mut public_builder = tonic::transport::Server::builder();
    if let Some(tls) = &cluster.cfg.public_tls {
        public_builder = public_builder
            .tls_config(tls.grpc())
            .map_err(|e| serve_err(format!("public port TLS: {e}")))?;
    }
    let public = public_builder
        .http2_keepalive_interval(Some(tessera_tls::KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(tessera_tls::KEEPALIVE_TIMEOUT))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(pb::inference_server::InferenceServer::with_interceptor(
            api.clone(),
            keys.interceptor(),
        ))
        .serve_with_incoming_shutdown(
            tessera_tls::Gate::new("public", connections).incoming(listener),
            shutdown_rx(&stop),
        );
    let cluster_tls = cluster.cfg.cluster_tls.clone();
    let mut cluster_builder = tonic::transport::Server::builder();
    if let Some(tls) = cluster_tls.server_tls() {
        cluster_builder = cluster_builder
            .tls_config(tls)
            .map_err(|e| serve_err(format!("cluster port TLS: {e}")))?;
    }
    let cluster_server = cluster_builder
        .http2_keepalive_interval(Some(tessera_tls::KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(tessera_tls::KEEPALIVE_TIMEOUT))
        .add_service(cluster_health_service)
        .add_service(raft::RaftService::new(raft.clone(), transport).into_server())
        .add_service(cpb::coordination_server::CoordinationServer::new(
            services::registry::Registry::new(Arc::clone(&cluster)),
        ))
        .add_service(cpb::forward_server::ForwardServer::new(
            services::forward::ForwardService::new(api, cluster_tls),
        ))
        .serve_with_incoming_shutdown(
            tessera_tls::Gate::new("cluster", connections).incoming(cluster_listener),
            shutdown_rx(&stop),
        );
    // `shutdown` stops both servers, and either one failing stops the other.
    let servers = async {
        tokio::join!(
            async {
                let r = public.await;
                stop.send_replace(true);
                r.map_err(|e| serve_err(format!("public port {addr}: {e}")))
            },
            async {
                let r = cluster_server.await;
                stop.send_replace(true);
                r.map_err(|e| serve_err(format!("cluster port {cluster_addr}: {e}")))
            },
            async {
                let mut stopped = stop.subscribe();
                tokio::select! {
                    () = shutdown => { stop.send_replace(true); }
                    _ = stopped.wait_for(|s| *s) => {}
                }
            },
        )
    };
    tokio::pin!(servers);
    // So does the Raft node failing: a coordinator without Raft must not stay up answering
    // health checks. (Its loop stops on its own only by failing: a requested stop comes after
    // the servers.)
    let mut node = raft.watch_status();
    let node_failed = async {
        // An owned reason: a `watch::Ref` must not live across an await.
        node.wait_for(|s| !s.running)
            .await
            .map(|s| s.failure.clone())
            .ok()
            .flatten()
            .unwrap_or_else(|| "its loop stopped".to_owned())
    };
    let (public, cluster_server) = tokio::select! {
        (public, cluster_server, ()) = &mut servers => (public, cluster_server),
        reason = node_failed => {
            tracing::error!(%reason, "the raft node failed: this coordinator stops");
            for health in [&not_serving, &not_serving_cluster] {
                health
                    .set_service_status("", tonic_health::ServingStatus::NotServing)
                    .await;
            }
            stop.send_replace(true);
            // Clients' open streams are not waited for: the servers get a moment to say
            // goodbye, then the process exits.
            let _ = tokio::time::timeout(FAILED_GRACE, &mut servers).await;
            drop(tasks);
            drop(data);
            return Err(raft::RaftError::Failed {
                id: raft.id(),
                reason,
            }
            .into());
        }
    };
    let result = public.and(cluster_server);
    drop(tasks);
    raft.shutdown().await;
    drop(data);
    result
}

/// Resolves once `stop` is set.
fn shutdown_rx(stop: &tokio::sync::watch::Sender<bool>) -> impl Future<Output = ()> + use<> {
    let mut rx = stop.subscribe();
    async move {
        let _ = rx.wait_for(|s| *s).await;
    }
}

/// Server reflection for the public port, in both protocol versions (v1, and v1alpha that
/// many stock clients still speak): the public API's descriptors, health's and reflection's
/// own, so either version lists exactly `tessera.v1.Inference`, `grpc.health.v1.Health` and
/// the two `ServerReflection` services. The cluster protocol's descriptors are not registered.
fn public_reflection() -> Result<
    (
        tonic_reflection::server::v1::ServerReflectionServer<
            impl tonic_reflection::server::v1::ServerReflection,
        >,
        tonic_reflection::server::v1alpha::ServerReflectionServer<
            impl tonic_reflection::server::v1alpha::ServerReflection,
        >,
    ),
    String,
> {
    let base = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(tessera_proto::PUBLIC_FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    // Each build adds its own version's descriptors; the other version's are added here.
    let v1 = base()
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| format!("reflection v1: {e}"))?;
    let v1alpha = base()
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(|e| format!("reflection v1alpha: {e}"))?;
    Ok((v1, v1alpha))
}

/// The Raft data directory; a temporary one is removed when dropped.
struct DataDir {
    path: std::path::PathBuf,
    temporary: bool,
}

impl DataDir {
    fn open(dir: Option<std::path::PathBuf>, id: u64) -> Result<Self, String> {
        let (path, temporary) = match dir {
            Some(p) => (p, false),
            None => {
                let nanos = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos());
                let name = format!("tessera-coordinator-{id}-{}-{nanos}", std::process::id());
                (std::env::temp_dir().join(name), true)
            }
        };
        std::fs::create_dir_all(&path).map_err(|e| format!("data dir {}: {e}", path.display()))?;
        Ok(Self { path, temporary })
    }
}

impl Drop for DataDir {
    fn drop(&mut self) {
        if self.temporary {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// Keeps `grpc.health.v1` service `name`, on every reporter, SERVING while `serving` holds
/// for the newest value `rx` carries, NOT_SERVING otherwise (set on changes only).
async fn mirror_health<T, const N: usize>(
    mut rx: tokio::sync::watch::Receiver<T>,
    health: [tonic_health::server::HealthReporter; N],
    name: &'static str,
    serving: impl Fn(&T) -> bool,
) {
    let mut last = None;
    loop {
        let now = serving(&rx.borrow_and_update());
        if last != Some(now) {
            let to = if now {
                tonic_health::ServingStatus::Serving
            } else {
                tonic_health::ServingStatus::NotServing
            };
            for h in &health {
                h.set_service_status(name, to).await;
            }
            last = Some(now);
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// The `grpc.health.v1` service name that says "a voter that knows its leader": SERVING
/// while this coordinator is a voter of the applied membership and knows which node leads.
/// Kubernetes readiness uses it, so the client Service sends nothing to a coordinator that has
/// not been added yet (`--join`), has been removed, or is cut off from a quorum.
pub const VOTER_HEALTH: &str = "tessera.cluster.v1.Raft";
