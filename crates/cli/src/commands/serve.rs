//! `tessera coordinator` and `tessera worker`: the two long-running processes of a cluster.
//!
//! Both stop cleanly on Ctrl-C / SIGTERM, and — when started by `tessera up` — when their
//! standard input closes, so a parent that dies (even by `kill -9`) takes its cluster with it
//! (see [`super::process`], which owns what every server process shares).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use tessera_coordinator::planner::{CpPolicy, TpPolicy};
use tessera_hub::DEFAULT_MODEL;

use super::client::DEFAULT_CLUSTER_ENDPOINT;
use super::process::ProcessArgs;

/// Arguments of `tessera coordinator`.
#[derive(Args, Debug, Clone)]
pub struct CoordinatorArgs {
    /// Address to serve the public API on (`tessera.v1.Inference`, gRPC health and
    /// reflection): what clients dial.
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// Address to serve the cluster protocol on (`tessera.cluster.v1`: Raft, worker
    /// registration, forwarding to the leader): what peers and workers dial. Keep it off the
    /// network clients reach.
    #[arg(long, default_value = "127.0.0.1:50052")]
    pub cluster_listen: SocketAddr,
    /// The model to serve: a name from the model cache or a path valid on every worker.
    #[arg(long, default_value = DEFAULT_MODEL)]
    pub model: String,
    /// Plan once this many workers have registered.
    #[arg(long, default_value_t = 1)]
    pub min_workers: usize,
    /// Milliseconds between worker heartbeats.
    #[arg(long, default_value_t = 500)]
    pub heartbeat_ms: u64,
    /// Milliseconds of silence after which a worker is dropped.
    #[arg(long, default_value_t = 2000)]
    pub heartbeat_timeout_ms: u64,
    /// Milliseconds a request waits for a serving plan (enough workers, with enough memory)
    /// before it fails with UNAVAILABLE and the planner's reason.
    #[arg(long, default_value_t = 30_000)]
    pub ready_wait_ms: u64,
    /// KV cache capacity per worker, in tokens (default: the model's context).
    #[arg(long)]
    pub kv_tokens: Option<u32>,
    /// Prefix caching, `on` or `off`: requests whose prompts start alike share the KV blocks
    /// of the common prefix (kept after a request ends, evicted least recently used when
    /// room is needed), so they skip recomputing it. Outputs are the same either way.
    #[arg(
        long,
        default_value = "on",
        value_name = "on|off",
        action = clap::ArgAction::Set,
        value_parser = parse_switch
    )]
    pub prefix_cache: bool,
    /// Tensor parallelism: `K` puts K workers in every pipeline stage's group (their KV
    /// heads, MLP columns and vocabulary split by threads; 1: a pipeline of single workers),
    /// `auto` lets the planner's cost model choose the mesh. K cannot exceed the model's KV
    /// heads; the last (workers mod K) workers wait.
    #[arg(long, default_value = "1", value_name = "K|auto", value_parser = parse_tp)]
    pub tp: TpPolicy,
    /// Context parallelism (ring attention): `P` puts P workers in a ring for every rank of
    /// the mesh, each holding 1/P of every sequence's KV cache, so `--kv-tokens` may exceed
    /// what one worker holds (1: no ring); `auto` uses the smallest ring whose plan fits;
    /// `auto:TOKENS` also rings (at least two ranks) when `--kv-tokens` is TOKENS or more, so
    /// long prompts' prefill is split over the ring. Prefix caching is off on a ring.
    #[arg(long, default_value = "1", value_name = "P|auto|auto:TOKENS", value_parser = parse_cp)]
    pub cp: CpPolicy,
    /// Most steps in flight on the pipeline at once: the running requests are split into
    /// this many micro-batches so that pipeline stages compute at the same time (default: the
    /// plan's number of stages; 1: one step at a time).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_inflight_steps: Option<u32>,
    /// The cluster address (HOST:PORT of --cluster-listen) that peers and workers dial
    /// (default: the bound cluster address).
    #[arg(long)]
    pub advertise: Option<String>,
    /// Raft node id (>= 1), or `auto`: the trailing ordinal of $HOSTNAME + 1 (a StatefulSet pod
    /// `tessera-coordinator-2` is node 3).
    #[arg(long, default_value = "1", value_parser = parse_id)]
    pub id: u64,
    /// The founding voters at their cluster addresses (their --advertise):
    /// `1=HOST:PORT,2=HOST:PORT,...`. A coordinator whose --id is not listed joins instead,
    /// and asks the founders to add it (an explicit --join waits for `tessera cluster
    /// add-coordinator`): the Helm chart gives every pod the same list, so a scale-up needs
    /// nothing but more pods. Omitted: a single-node cluster of this coordinator.
    #[arg(long, value_parser = parse_peers, conflicts_with = "join")]
    pub peers: Option<BTreeMap<u64, String>>,
    /// Join an existing cluster instead of founding one: with an empty data dir, wait until a
    /// member runs `tessera cluster add-coordinator --id <this id> --address <this
    /// --advertise>`.
    #[arg(long)]
    pub join: bool,
    /// Raft storage directory (default with --peers or --join: $TESSERA_HOME/coordinator-<id>;
    /// otherwise a temporary directory, so a lone coordinator keeps no state across restarts).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Serve the OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions,
    /// /v1/models, /health, /ready) on this address (port 0: any free port, printed as
    /// "tessera coordinator http on ADDR").
    #[arg(long)]
    pub http_listen: Option<SocketAddr>,
    /// Serve the public API (gRPC on --listen and HTTP on --http-listen) over TLS with this
    /// certificate (PEM, leaf first, then its chain); needs --tls-key. `tessera certs
    /// --public HOST,…` makes one from the cluster CA for local use.
    #[arg(long, env = "TESSERA_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, env = "TESSERA_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Admission, limits and API keys.
    #[command(flatten)]
    pub admission: AdmissionArgs,
    /// Metrics, span export and lifetime.
    #[command(flatten)]
    pub process: ProcessArgs,
}

/// Who may call a coordinator's public API, and how much it takes on.
#[derive(Args, Debug, Clone, Default)]
pub struct AdmissionArgs {
    /// An API key clients must send as `authorization: Bearer KEY` (gRPC metadata or HTTP
    /// header); repeat for several, or give them comma-separated in $TESSERA_API_KEYS.
    /// Without keys the API is open. Health and reflection stay open.
    #[arg(
        long = "api-key",
        env = "TESSERA_API_KEYS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub api_keys: Vec<String>,
    /// A file of API keys, one per line (blank lines and lines starting with # ignored).
    #[arg(long)]
    pub api_key_file: Option<PathBuf>,
    /// The most requests waiting for admission; more are refused with RESOURCE_EXHAUSTED
    /// (HTTP 429) and a retry hint.
    #[arg(long, default_value_t = 256)]
    pub max_queued: usize,
    /// The longest prompt accepted, in bytes (text, or chat messages together); checked before
    /// tokenization.
    #[arg(long, default_value_t = 1 << 20)]
    pub max_prompt_bytes: usize,
    /// The most chat messages in one request.
    #[arg(long, default_value_t = 1024)]
    pub max_messages: usize,
}

impl AdmissionArgs {
    /// Every API key: the flags' and the file's.
    ///
    /// # Errors
    /// When the key file cannot be read.
    pub fn keys(&self) -> Result<Vec<String>> {
        let mut keys: Vec<String> = self
            .api_keys
            .iter()
            .map(|k| k.trim().to_owned())
            .filter(|k| !k.is_empty())
            .collect();
        if let Some(path) = &self.api_key_file {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading the API key file {}", path.display()))?;
            keys.extend(
                text.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    .map(str::to_owned),
            );
        }
        Ok(keys)
    }
}

/// Parses an `on|off` switch (`true|false` also accepted).
///
/// # Errors
/// When it is neither.
pub fn parse_switch(s: &str) -> Result<bool, String> {
    match s {
        "on" | "true" => Ok(true),
        "off" | "false" => Ok(false),
        _ => Err(format!("expected `on` or `off`, got `{s}`")),
    }
}

/// Parses `--id`: a positive number, or `auto` (from `$HOSTNAME`).
///
/// # Errors
/// When it is neither, or `$HOSTNAME` has no trailing number.
pub fn parse_id(s: &str) -> Result<u64, String> {
    if s == "auto" {
        let host = std::env::var("HOSTNAME").map_err(|_| "--id auto needs $HOSTNAME".to_owned())?;
        return id_from_hostname(&host);
    }
    match s.parse::<u64>() {
        Ok(0) => Err("node id 0 is reserved; ids start at 1".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("{s:?} is not a node id (a number >= 1, or auto)")),
    }
}

/// The node id of a StatefulSet pod: its trailing ordinal + 1.
fn id_from_hostname(host: &str) -> Result<u64, String> {
    let digits: String = host
        .chars()
        .rev()
        .take_while(char::is_ascii_digit)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    digits
        .parse::<u64>()
        .map(|n| n + 1)
        .map_err(|_| format!("--id auto: host name {host:?} does not end in an ordinal"))
}

/// Parses `--peers 1=HOST:PORT,2=HOST:PORT`.
///
/// # Errors
/// On a malformed entry, id 0, or a duplicate id.
pub fn parse_peers(s: &str) -> Result<BTreeMap<u64, String>, String> {
    let mut peers = BTreeMap::new();
    for entry in s.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let (id, addr) = entry
            .split_once('=')
            .ok_or_else(|| format!("{entry:?} is not ID=HOST:PORT"))?;
        let id = parse_id(id.trim())?;
        let addr = addr.trim();
        if addr.is_empty() || !addr.contains(':') {
            return Err(format!("{entry:?}: the address must be HOST:PORT"));
        }
        if peers.insert(id, addr.to_owned()).is_some() {
            return Err(format!("node id {id} appears twice"));
        }
    }
    if peers.is_empty() {
        return Err("no peers given".into());
    }
    Ok(peers)
}

/// Arguments of `tessera worker`.
#[derive(Args, Debug, Clone)]
pub struct WorkerArgs {
    /// The coordinator(s) to register with, at their cluster port (--cluster-listen /
    /// --advertise, not the public API): one URL or a comma-separated list; the worker follows
    /// whichever is the Raft leader.
    #[arg(long, default_value = DEFAULT_CLUSTER_ENDPOINT)]
    pub coordinator: String,
    /// Address to serve the worker protocol on (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// Address the coordinator and other workers dial (default: the bound address).
    #[arg(long)]
    pub advertise: Option<String>,
    /// Address of the peer port, where the other ranks of this worker's tensor-parallel
    /// groups dial it (default: the --listen interface, any free port; advertised under the
    /// --advertise host).
    #[arg(long)]
    pub peer_listen: Option<SocketAddr>,
    /// Compute threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    pub threads: u32,
    /// A fault to inject, for failure tests only: `wedge-at-step=N` stops the executor at its
    /// N-th step while heartbeats go on (see `tessera_worker::Failpoint`).
    #[arg(long, hide = true)]
    pub failpoint: Option<tessera_worker::Failpoint>,
    /// Memory this worker may use for weights and KV cache, e.g. 512MiB, 2GiB (default: 2GiB
    /// on the CPU; on a GPU, 90% of what the device has free at start).
    #[arg(long, value_parser = parse_bytes)]
    pub memory: Option<u64>,
    /// The device shards run on: `auto` (CUDA device 0 where the driver, a device, cuBLAS and
    /// NVRTC are present, else the CPU), `cpu`, or `cuda:N` (fail unless it can be used).
    #[arg(long, default_value = "auto")]
    pub device: tessera_worker::DeviceChoice,
    /// The worker's name (default: worker-<pid>). With --certs it picks the worker's
    /// certificate (worker-<name>.pem), whose name it registers under.
    #[arg(long)]
    pub name: Option<String>,
    /// Also serve `grpc.health.v1` alone, in the clear, on this address: for probes that
    /// cannot present a cluster certificate (Kubernetes gRPC probes, compose health checks).
    /// It tells whether the process is up, and nothing else.
    #[arg(long)]
    pub health_listen: Option<SocketAddr>,
    /// Model cache root (default: $TESSERA_HOME or ~/.cache/tessera).
    #[arg(long)]
    pub model_home: Option<PathBuf>,
    /// Another directory the coordinators may have this worker load models from (repeatable).
    /// By default only models of the store (`<model home>/models`) are opened, whatever path
    /// a LoadShard names.
    #[arg(long = "model-dir")]
    pub model_dirs: Vec<PathBuf>,
    /// Metrics, span export and lifetime.
    #[command(flatten)]
    pub process: ProcessArgs,
}

/// `--tp`'s spelling of `tp` (what [`parse_tp`] reads back).
pub fn tp_arg(tp: TpPolicy) -> String {
    match tp {
        TpPolicy::Fixed(k) => k.to_string(),
        TpPolicy::Auto => "auto".to_owned(),
    }
}

/// Parses `--tp`: a group size of at least 1, or `auto`.
///
/// # Errors
/// When it is neither.
pub fn parse_tp(s: &str) -> Result<TpPolicy, String> {
    if s.eq_ignore_ascii_case("auto") {
        return Ok(TpPolicy::Auto);
    }
    match s.parse::<u32>() {
        Ok(k) if k >= 1 => Ok(TpPolicy::Fixed(k)),
        _ => Err(format!(
            "{s:?} is not a tensor-parallel group size (1, 2, 3, …) or `auto`"
        )),
    }
}

/// `--cp`'s spelling of `cp` (what [`parse_cp`] reads back).
pub fn cp_arg(cp: CpPolicy) -> String {
    match cp {
        CpPolicy::Fixed(p) => p.to_string(),
        CpPolicy::Auto => "auto".to_owned(),
        CpPolicy::AutoFrom(tokens) => format!("auto:{tokens}"),
    }
}

/// Parses `--cp`: a ring size of at least 1, `auto`, or `auto:TOKENS`.
///
/// # Errors
/// When it is none of them.
pub fn parse_cp(s: &str) -> Result<CpPolicy, String> {
    if s.eq_ignore_ascii_case("auto") {
        return Ok(CpPolicy::Auto);
    }
    if let Some(tokens) = s.strip_prefix("auto:") {
        return match tokens.parse::<u32>() {
            Ok(t) if t >= 1 => Ok(CpPolicy::AutoFrom(t)),
            _ => Err(format!(
                "{s:?}: `auto:` takes a sequence length in tokens (at least 1)"
            )),
        };
    }
    match s.parse::<u32>() {
        Ok(p) if p >= 1 => Ok(CpPolicy::Fixed(p)),
        _ => Err(format!(
            "{s:?} is not a context-parallel ring size (1, 2, 3, …), `auto` or `auto:TOKENS`"
        )),
    }
}

/// Parses a byte size such as `512MiB`, `2GiB`, `1.5G` or `1048576`.
///
/// # Errors
/// When the number or unit is not understood.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let num: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size like 512MiB or 2GiB"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        other => return Err(format!("unknown size unit {other:?} in {s:?}")),
    };
    Ok((num * mult as f64) as u64)
}

/// Runs `tessera coordinator` until it is stopped.
pub fn run_coordinator(args: CoordinatorArgs) -> Result<()> {
    // A known model is pulled here so that `tessera coordinator` alone works on a fresh machine.
    super::model::resolve_or_pull(&args.model)?;
    let cfg = tessera_coordinator::CoordinatorConfig {
        listen: args.listen,
        cluster_listen: args.cluster_listen,
        model: args.model.clone(),
        heartbeat_interval: Duration::from_millis(args.heartbeat_ms),
        heartbeat_timeout: Duration::from_millis(args.heartbeat_timeout_ms),
        min_workers: args.min_workers,
        ready_wait: Duration::from_millis(args.ready_wait_ms),
        kv_tokens: args.kv_tokens.unwrap_or(0),
        prefix_cache: args.prefix_cache,
        tp: args.tp,
        cp: args.cp,
        max_inflight_steps: args.max_inflight_steps.unwrap_or(0),
        id: args.id,
        peers: args.peers.clone().unwrap_or_default(),
        advertise: args.advertise.clone(),
        join: args.join,
        data_dir: match (&args.data_dir, args.peers.is_some() || args.join) {
            (Some(d), _) => Some(d.clone()),
            (None, true) => Some(
                tessera_hub::ModelCache::from_env()?
                    .root()
                    .join(format!("coordinator-{}", args.id)),
            ),
            (None, false) => None,
        },
        metrics_listen: args.process.metrics_listen,
        http_listen: args.http_listen,
        api_keys: args.admission.keys()?,
        max_queued: args.admission.max_queued,
        limits: tessera_coordinator::validate::Limits {
            max_prompt_bytes: args.admission.max_prompt_bytes,
            max_messages: args.admission.max_messages,
        },
        cluster_tls: args
            .process
            .cluster_tls
            .load(&tessera_tls::Identity::coordinator(args.id))?,
        connections: args.process.connections(),
        public_tls: match (&args.tls_cert, &args.tls_key) {
            (Some(cert), Some(key)) => Some(
                tessera_tls::ServerIdentity::load(cert, key).context("--tls-cert / --tls-key")?,
            ),
            _ => None,
        },
        ..tessera_coordinator::CoordinatorConfig::default()
    };
    let instance = format!("coordinator-{}", args.id);
    args.process
        .serve("tessera-coordinator", instance, |shutdown| async move {
            tessera_coordinator::serve(cfg, shutdown)
                .await
                .context("coordinator")
        })
}

/// A CPU worker's `--memory` when none is given.
const DEFAULT_WORKER_MEMORY: u64 = 2 << 30;

/// Runs `tessera worker` until it is stopped.
pub fn run_worker(args: WorkerArgs) -> Result<()> {
    let name = args
        .name
        .clone()
        .unwrap_or_else(|| format!("worker-{}", std::process::id()));
    let identity = tessera_tls::Identity::new(tessera_tls::Role::Worker, &name);
    let cluster_tls = match (&identity, &args.process.cluster_tls) {
        // --certs picks the file by name, so the name must be one a certificate can carry.
        (Err(e), tls) if tls.certs.is_some() => {
            anyhow::bail!("--name: {e} (with --certs, the worker's name picks its certificate)")
        }
        (Ok(id), tls) => tls.load(id)?,
        // Explicit files: the certificate gives the name; any placeholder identity of the
        // right role does for the check.
        (Err(_), tls) => tls.load(&tessera_tls::Identity::new(
            tessera_tls::Role::Worker,
            "unnamed",
        )?)?,
    };
    let name = cluster_tls
        .identity()
        .map_or(name, |me| me.name().to_owned());
    let backend = tessera_worker::Backend::resolve(args.device)?;
    let memory_bytes = match (args.memory, &backend) {
        (Some(m), _) => m,
        // 0 on a device: what it has free.
        (None, tessera_worker::Backend::Cuda { .. }) => 0,
        (None, _) => DEFAULT_WORKER_MEMORY,
    };
    let cfg = tessera_worker::WorkerConfig {
        listen: args.listen,
        advertise: args.advertise.clone(),
        coordinator: args.coordinator.clone(),
        capacity: tessera_worker::Capacity {
            memory_bytes,
            threads: args.threads,
            devices: Vec::new(),
        },
        name: name.clone(),
        model_home: args.model_home.clone(),
        metrics_listen: args.process.metrics_listen,
        peer_listen: args.peer_listen,
        health_listen: args.health_listen,
        cluster_tls,
        connections: args.process.connections(),
        failpoint: args.failpoint,
        backend,
        model_paths: {
            let store = match &args.model_home {
                Some(home) => tessera_hub::ModelCache::at(home.clone()),
                None => tessera_hub::ModelCache::from_env()?,
            };
            tessera_worker::ModelPaths::within(
                std::iter::once(store.models_dir()).chain(args.model_dirs.iter().cloned()),
            )
        },
    };
    args.process
        .serve("tessera-worker", name, |shutdown| async move {
            tessera_worker::serve(cfg, shutdown).await.context("worker")
        })
}

#[cfg(test)]
mod tests {
    use super::parse_bytes;

    /// Ensures that sizes parse in the units people write, and nonsense is refused.
    #[test]
    fn byte_sizes_parse() {
        assert_eq!(parse_bytes("512MiB"), Ok(512 << 20));
        assert_eq!(parse_bytes("2GiB"), Ok(2 << 30));
        assert_eq!(parse_bytes("1.5G"), Ok(3 << 29));
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("3 parsecs").is_err());
    }

    /// Ensures that `--cp` reads ring sizes, `auto` and `auto:TOKENS`, that what `cp_arg`
    /// writes reads back the same, and that nonsense is refused naming the forms.
    #[test]
    fn cp_policies_parse_and_round_trip() {
        use super::{CpPolicy, cp_arg, parse_cp};
        for (s, want) in [
            ("1", CpPolicy::Fixed(1)),
            ("4", CpPolicy::Fixed(4)),
            ("auto", CpPolicy::Auto),
            ("AUTO", CpPolicy::Auto),
            ("auto:32768", CpPolicy::AutoFrom(32768)),
        ] {
            assert_eq!(parse_cp(s), Ok(want), "{s}");
            assert_eq!(parse_cp(&cp_arg(want)), Ok(want), "{s}");
        }
        for bad in ["0", "auto:", "auto:0", "auto:x", "ring", "-2"] {
            let e = parse_cp(bad).expect_err(bad);
            assert!(e.contains("auto"), "{bad}: {e}");
        }
    }

    /// Ensures that `on|off` switches (and `true|false`) parse, and anything else is refused.
    #[test]
    fn switches_parse() {
        use super::parse_switch;
        assert_eq!(parse_switch("on"), Ok(true));
        assert_eq!(parse_switch("off"), Ok(false));
        assert_eq!(parse_switch("true"), Ok(true));
        assert_eq!(parse_switch("false"), Ok(false));
        assert!(parse_switch("maybe").is_err());
    }

    /// Ensures that node ids, `auto` host names and peer lists parse, and bad ones are refused.
    #[test]
    fn ids_and_peers_parse() {
        use super::{id_from_hostname, parse_id, parse_peers};
        assert_eq!(parse_id("3"), Ok(3));
        assert!(parse_id("0").is_err());
        assert!(parse_id("x").is_err());
        assert_eq!(id_from_hostname("tessera-coordinator-2"), Ok(3));
        assert!(id_from_hostname("tessera").is_err());
        let p = parse_peers("1=a:1, 2=b:2").expect("valid peers");
        assert_eq!(p.get(&2).map(String::as_str), Some("b:2"));
        assert!(parse_peers("1=a:1,1=b:2").is_err());
        assert!(parse_peers("1=a").is_err());
        assert!(parse_peers("a:1").is_err());
    }
}
