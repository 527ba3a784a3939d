//! The coordinator's configuration: where it listens, which model it serves, and the knobs of
//! liveness, planning and scheduling.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::state::planner::{CpPolicy, TpPolicy};

/// How to run a coordinator.
#[derive(Clone, Debug)]
pub struct CoordinatorConfig {
    /// Where to serve the public API (`tessera.v1`, health, reflection): what clients dial.
    /// Port 0 picks a free one (the bound address is printed).
    pub listen: SocketAddr,
    /// Where to serve the cluster protocol (`tessera.cluster.v1`: Raft, worker registration,
    /// forwarding to the leader): what peers and workers dial. Port 0 picks a free one.
    pub cluster_listen: SocketAddr,
    /// The model: a name in the model cache or a path; sent to workers as is.
    pub model: String,
    /// The model cache root (`TESSERA_HOME`); `None` = the environment's.
    pub model_home: Option<PathBuf>,
    /// How often workers heartbeat.
    pub heartbeat_interval: Duration,
    /// A worker silent this long is dropped.
    pub heartbeat_timeout: Duration,
    /// Plan once this many workers are registered.
    pub min_workers: usize,
    /// KV cache capacity per worker, in tokens; 0 = the model's context length.
    pub kv_tokens: u32,
    /// Tokens per KV block.
    pub block_size: u32,
    /// Longest prompt chunk prefilled in one step.
    pub prefill_chunk: u32,
    /// Most tokens (prefill and decode together) in one step.
    pub max_batch_tokens: u32,
    /// Most steps in flight on the pipeline stream at once: the running sequences are split
    /// into this many micro-batches, so that the stages of a multi-stage plan compute
    /// different micro-batches at the same time. 0 = the plan's number of stages; 1 = one
    /// step at a time (no overlap).
    pub max_inflight_steps: u32,
    /// Share the KV blocks of identical prompt prefixes across requests (cached after a
    /// request ends, evicted least recently used when admission needs room). Outputs are the
    /// same either way; only the work (and time to first token) differs.
    pub prefix_cache: bool,
    /// Tensor-parallel group sizes the planner uses: `Fixed(k)` groups of k workers per stage
    /// (`Fixed(1)`: a pipeline of single workers), or `Auto`, the mesh its cost model predicts
    /// fastest.
    pub tp: TpPolicy,
    /// Context-parallel ring sizes: `Fixed(p)` rings of p workers per rank of the mesh, each
    /// holding 1/p of every sequence's KV cache (`Fixed(1)`: no ring), or `Auto`, the smallest
    /// ring whose plan fits the KV cache of `kv_tokens`.
    pub cp: CpPolicy,
    /// How long a request waits for a serving plan before failing with UNAVAILABLE.
    pub ready_wait: Duration,
    /// This coordinator's Raft node id (>= 1).
    pub id: u64,
    /// The founding voters, id -> cluster address (host:port); empty = a single-node cluster
    /// of this node alone. A node not listed joins, and asks the listed ones to add it
    /// (`raft::self_join`). Ignored when the data directory already holds a cluster.
    pub peers: BTreeMap<u64, String>,
    /// Found nothing: with an empty data directory, wait to be added to an existing cluster
    /// (`tessera cluster add-coordinator`), which sends this node a snapshot. Excludes `peers`.
    pub join: bool,
    /// The cluster address peers and workers dial (host:port of `cluster_listen` as they can
    /// reach it); `None` = the bound cluster address. `peers` names these addresses too.
    pub advertise: Option<String>,
    /// The Raft storage directory; `None` = a fresh temporary directory removed at exit
    /// (state is then not durable).
    pub data_dir: Option<PathBuf>,
    /// Where to serve Prometheus metrics over HTTP (`GET /metrics`); `None` = not served.
    pub metrics_listen: Option<SocketAddr>,
    /// Where to serve the OpenAI-compatible HTTP API (`/v1/…`, `/health`, `/ready`); `None`
    /// = not served. Port 0 picks a free one (printed).
    pub http_listen: Option<SocketAddr>,
    /// API keys the public API (gRPC and HTTP) requires as `authorization: Bearer <key>`;
    /// empty = open. Health and reflection stay open.
    pub api_keys: Vec<String>,
    /// The most requests that may wait for admission; more are refused with
    /// RESOURCE_EXHAUSTED (HTTP 429).
    pub max_queued: usize,
    /// Size limits checked before tokenization.
    pub limits: crate::validate::Limits,
    /// How the cluster port speaks: mutual TLS as this coordinator's certificate, or in the
    /// clear. The default here is the clear (for in-process tests); the `tessera` binary
    /// requires certificates unless `--insecure-cluster` is given.
    pub cluster_tls: tessera_tls::ClusterTls,
    /// Connections each port (public, cluster, HTTP) holds at once, and how long a silent one
    /// stays open.
    pub connections: tessera_tls::Limits,
    /// TLS on the public API (gRPC and HTTP ports): the server's certificate and key; `None`
    /// serves them in the clear.
    pub public_tls: Option<tessera_tls::ServerIdentity>,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            cluster_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            model: tessera_hub::DEFAULT_MODEL.to_owned(),
            model_home: None,
            heartbeat_interval: Duration::from_millis(500),
            heartbeat_timeout: Duration::from_secs(2),
            min_workers: 1,
            kv_tokens: 0,
            block_size: 16,
            prefill_chunk: 512,
            max_batch_tokens: 2048,
            max_inflight_steps: 0,
            prefix_cache: true,
            tp: TpPolicy::Fixed(1),
            cp: CpPolicy::Fixed(1),
            ready_wait: Duration::from_secs(30),
            id: 1,
            peers: BTreeMap::new(),
            join: false,
            advertise: None,
            data_dir: None,
            metrics_listen: None,
            http_listen: None,
            api_keys: Vec::new(),
            max_queued: 256,
            limits: crate::validate::Limits::default(),
            cluster_tls: tessera_tls::ClusterTls::insecure(),
            connections: tessera_tls::Limits::default(),
            public_tls: None,
        }
    }
}

impl CoordinatorConfig {
    /// The most steps in flight for a plan of `stages` stages: the configured value, or the
    /// number of stages when 0; at least 1.
    pub fn inflight_steps_for(&self, stages: usize) -> usize {
        match self.max_inflight_steps {
            0 => stages.max(1),
            n => n as usize,
        }
    }

    /// The KV capacity per worker in tokens for a model of `context_len` positions: the
    /// configured value, or the context when 0; rounded down to whole blocks.
    pub fn kv_tokens_for(&self, context_len: usize) -> u32 {
        let ctx = u32::try_from(context_len).unwrap_or(u32::MAX);
        let tokens = if self.kv_tokens == 0 {
            ctx
        } else {
            self.kv_tokens
        };
        let block = self.block_size.max(1);
        (tokens / block * block).max(block)
    }
}
