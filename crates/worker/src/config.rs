//! What a worker is told at start: where to listen, whom to register with, and what it offers.

use std::net::SocketAddr;
use std::path::PathBuf;

use tessera_proto::v1 as pb;

/// The resources a worker declares to the coordinator; the planner sizes its shard by them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Capacity {
    /// Memory the worker may use for weights and KV cache, in bytes; 0 = unlimited (no check
    /// at shard load) on the CPU, and all the device has free on a GPU.
    pub memory_bytes: u64,
    /// Compute threads; 0 = one per available core.
    pub threads: u32,
    /// The accelerators its shard runs on; empty for CPU only. With one, `memory_bytes` is
    /// what the device holds for weights and KV cache.
    pub devices: Vec<pb::Device>,
}

impl Capacity {
    /// The capacity as the protocol carries it.
    pub fn to_proto(&self) -> pb::Capacity {
        pb::Capacity {
            memory_bytes: self.memory_bytes,
            threads: self.threads,
            devices: self.devices.clone(),
        }
    }
}

/// How to run a worker process (see [`crate::serve`]).
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    /// Where the Worker and health services listen; port 0 picks a free port.
    pub listen: SocketAddr,
    /// `host:port` the coordinator and the other workers dial; `None` = the bound address.
    pub advertise: Option<String>,
    /// The coordinators' cluster port (`tessera.cluster.v1.Coordination`; their `--advertise`
    /// address, not the public API's), e.g. `http://127.0.0.1:50052`; several comma-separated
    /// URLs name replicated coordinators, and the worker follows the leader.
    pub coordinator: String,
    /// Resources declared at registration.
    pub capacity: Capacity,
    /// A human-readable name (not an identity).
    pub name: String,
    /// Root of the model cache that `LoadShard` model names resolve in; `None` =
    /// `ModelCache::from_env()` (`$TESSERA_HOME`, else `~/.cache/tessera`).
    pub model_home: Option<PathBuf>,
    /// Where to serve Prometheus metrics over HTTP (`GET /metrics`); `None` = not served.
    pub metrics_listen: Option<SocketAddr>,
    /// Where the peer port listens (the other ranks of its tensor-parallel groups dial it);
    /// `None` = the gRPC address's interface, a free port.
    pub peer_listen: Option<SocketAddr>,
    /// How the cluster protocol is spoken: mutual TLS as this worker's certificate (which
    /// then also gives the name it registers under), or in the clear. The `tessera` binary
    /// requires certificates unless `--insecure-cluster` is given.
    pub cluster_tls: tessera_tls::ClusterTls,
    /// Where to serve `grpc.health.v1` alone, in the clear, for probes that hold no cluster
    /// certificate; `None` = not served (health is always on the main port too).
    pub health_listen: Option<SocketAddr>,
    /// Connections each port (the Worker service, the health port) holds at once, and how
    /// long a silent one stays open.
    pub connections: tessera_tls::Limits,
    /// Which models LoadShard may open (the binary: the model store and `--model-dir`s).
    pub model_paths: crate::ModelPaths,
    /// A fault to inject, for failure tests (`--failpoint`, hidden); `None` in production.
    pub failpoint: Option<crate::Failpoint>,
    /// The device its shards run on ([`crate::Backend::resolve`] of `--device`).
    pub backend: crate::Backend,
}
