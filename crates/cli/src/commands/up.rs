//! `tessera up`: a whole local cluster — replicated coordinators (3 by default, one Raft
//! group) and N workers as child processes on loopback — with the model pulled first when it
//! is missing. Each coordinator gets a public port (what the printed endpoint names) and a
//! cluster port (what its peers and the workers dial).
//!
//! `up` is also a local simulator of failures: a child that exits or is killed is started
//! again with the same arguments (ports, name, Raft data) after a bounded backoff
//! ([`supervise`]), so `kill -9` of a worker or coordinator shows the cluster recover, and
//! `--chaos-interval` does the killing. `up` prints every child's pid (and metrics address,
//! with `--metrics-listen`) when ready. `--data-dir` keeps the coordinators' Raft data and
//! ports ([`pinned`]) for the next run; by default they live in a temporary directory removed
//! at the end.
//!
//! Children get a pipe as standard input and exit when it closes, so the cluster goes away with
//! this process however it ends (Ctrl-C, SIGTERM, or `kill -9`); Ctrl-C and SIGTERM are a
//! normal stop, after which `up` exits 0.

mod child;
mod local;
mod pinned;
mod supervise;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use clap::Args;
use tessera_hub::DEFAULT_MODEL;
use tessera_proto::v1::ClusterStatusResponse;

pub(crate) use self::child::{listening_address, spawn};
pub(crate) use self::local::free_port;
pub use self::local::{LocalCluster, LocalClusterSpec};
use self::supervise::Chaos;
use super::client::{Client, connect, wait_ready};
use super::generate::print_streamed;
use super::request::RequestArgs;

/// Arguments of `tessera up`.
#[derive(Args, Debug)]
#[command(allow_negative_numbers = true)]
pub struct UpArgs {
    /// Worker processes to start.
    #[arg(long, default_value_t = 3)]
    pub workers: u32,
    /// Coordinators to start (one Raft group; 1 = a single unreplicated coordinator).
    #[arg(long, default_value_t = 3)]
    pub coordinators: u32,
    /// Where the first coordinator serves the public API (port 0: any free port, printed when
    /// ready); the others take free ports.
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// Where the first coordinator serves the cluster protocol, which workers and peers dial
    /// (default: the port after --listen's, 127.0.0.1:50052 with the defaults, or any free port
    /// when --listen's is 0); the others take free ports.
    #[arg(long)]
    pub cluster_listen: Option<SocketAddr>,
    /// Where the first coordinator serves the OpenAI-compatible HTTP API (default: port 8000
    /// on --listen's host, or any free port when --listen's is 0); the others serve it on free
    /// ports. `off`: no HTTP API.
    #[arg(long, value_parser = parse_http_listen)]
    pub http_listen: Option<HttpListen>,
    /// The model to serve.
    #[arg(long, default_value = DEFAULT_MODEL)]
    pub model: String,
    /// Compute threads per worker (0: the machine's cores shared out evenly).
    #[arg(long, default_value_t = 0)]
    pub threads_per_worker: u32,
    /// Prefix caching on every coordinator, `on` or `off` (see `tessera coordinator
    /// --prefix-cache`).
    #[arg(
        long,
        default_value = "on",
        value_name = "on|off",
        action = clap::ArgAction::Set,
        value_parser = super::serve::parse_switch
    )]
    pub prefix_cache: bool,
    /// Tensor parallelism (see `tessera coordinator --tp`): `K` workers per pipeline stage,
    /// or `auto`. With `--workers 2 --tp 2` both workers serve every layer, each half of it.
    #[arg(long, default_value = "1", value_name = "K|auto", value_parser = super::serve::parse_tp)]
    pub tp: tessera_coordinator::planner::TpPolicy,
    /// Context parallelism (see `tessera coordinator --cp`): rings of `P` workers, each
    /// holding 1/P of every sequence's KV cache, `auto`, or `auto:TOKENS` (a ring also when
    /// `--kv-tokens` is TOKENS or more).
    #[arg(long, default_value = "1", value_name = "P|auto|auto:TOKENS", value_parser = super::serve::parse_cp)]
    pub cp: tessera_coordinator::planner::CpPolicy,
    /// Most pipeline steps in flight on every coordinator (see `tessera coordinator
    /// --max-inflight-steps`; default: the plan's number of stages).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_inflight_steps: Option<u32>,
    /// Memory per worker, e.g. 1GiB.
    #[arg(long, default_value = "2GiB", value_parser = super::serve::parse_bytes)]
    pub memory: u64,
    /// The device every worker runs on (see `tessera worker --device`): `auto` uses CUDA
    /// device 0 where one works, else the CPU.
    #[arg(long, default_value = "auto")]
    pub device: tessera_worker::DeviceChoice,
    /// Send this prompt once the cluster is ready, print the answer, and shut down.
    #[arg(long, conflicts_with = "embed")]
    pub prompt: Option<String>,
    /// With an encoder model (e.g. all-minilm-l6-v2): embed these texts (repeat the flag)
    /// once the cluster is ready, print one JSON line per text (its index, token count and
    /// vector), and shut down.
    #[arg(long)]
    pub embed: Vec<String>,
    /// With --prompt: chat formatting, sampling, stop conditions and logprobs, the same flags
    /// with the same defaults as `tessera generate`.
    #[command(flatten)]
    pub request: RequestArgs,
    /// Seconds to wait for the cluster to load the model and become ready.
    #[arg(long, default_value_t = 300)]
    pub ready_timeout: u64,
    /// Have every coordinator and worker export spans over OTLP/gRPC to this collector
    /// (default: $OTEL_EXPORTER_OTLP_ENDPOINT, which the children also inherit).
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// The certificate directory for the cluster protocol's mutual TLS (default:
    /// $TESSERA_HOME/certs): a CA and a certificate per process are created there when
    /// missing (as `tessera certs` does) and kept for the next run.
    #[arg(long, env = "TESSERA_CERTS")]
    pub certs: Option<std::path::PathBuf>,
    /// Run the cluster protocol in the clear, with no member checks (debugging only).
    #[arg(long, conflicts_with = "certs")]
    pub insecure_cluster: bool,
    /// Keep the cluster in DIR across runs: the coordinators' Raft data (DIR/coordinator-N)
    /// and their ports (DIR/up.json). A later `tessera up --data-dir DIR` comes back with the
    /// same cluster state on the same ports — Raft stores the coordinators' addresses, so the
    /// ports in up.json are used whatever --listen, --cluster-listen and --http-listen say —
    /// and must be given the same --coordinators and --model. Default: a temporary directory,
    /// removed when `up` stops.
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Serve Prometheus metrics (`GET /metrics`) from every child: coordinator N (N from 1)
    /// on BASEPORT+N-1, worker J (J from 0) on BASEPORT+COORDINATORS+J (port 0: a free port
    /// each). The addresses are printed when the cluster is ready.
    #[arg(long, value_name = "HOST:BASEPORT")]
    pub metrics_listen: Option<SocketAddr>,
    /// Kill a random coordinator or worker (SIGKILL) every SECS seconds, to watch the cluster
    /// recover as `up` restarts it.
    #[arg(long, value_name = "SECS", value_parser = parse_interval, conflicts_with_all = ["prompt", "embed"])]
    pub chaos_interval: Option<Duration>,
}

/// Parses `--chaos-interval`: seconds, more than 0.
fn parse_interval(s: &str) -> Result<Duration, String> {
    s.parse::<f64>()
        .ok()
        .filter(|secs| *secs > 0.0)
        .and_then(|secs| Duration::try_from_secs_f64(secs).ok())
        .ok_or_else(|| format!("{s:?} is not a number of seconds above 0"))
}

/// The HTTP API's port by default (vLLM's).
const DEFAULT_HTTP_PORT: u16 = 8000;

/// `--http-listen`: an address, or `off`.
#[derive(Clone, Copy, Debug)]
pub struct HttpListen(pub Option<SocketAddr>);

fn parse_http_listen(s: &str) -> Result<HttpListen, String> {
    if s == "off" {
        return Ok(HttpListen(None));
    }
    s.parse()
        .map(|a| HttpListen(Some(a)))
        .map_err(|e| format!("{s:?} is not HOST:PORT or `off`: {e}"))
}

/// Runs `tessera up`.
pub fn run(args: UpArgs) -> Result<()> {
    if args.workers == 0 {
        bail!("--workers must be at least 1");
    }
    if args.coordinators == 0 {
        bail!("--coordinators must be at least 1");
    }
    super::model::resolve_or_pull(&args.model)?;
    super::runtime()?.block_on(up(args))
}

async fn up(args: UpArgs) -> Result<()> {
    let threads = if args.threads_per_worker > 0 {
        args.threads_per_worker
    } else {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
        (cores / args.workers).max(1)
    };
    let otlp: Vec<String> = super::process::otlp_endpoint(&args.otlp_endpoint)
        .into_iter()
        .flat_map(|e| ["--otlp-endpoint".to_owned(), e.clone()])
        .collect();
    let switch = if args.prefix_cache { "on" } else { "off" };
    let inflight = args
        .max_inflight_steps
        .map(|n| vec!["--max-inflight-steps".to_owned(), n.to_string()]);
    let coordinator_args = [
        otlp.clone(),
        vec!["--prefix-cache".to_owned(), switch.to_owned()],
        vec!["--tp".to_owned(), super::serve::tp_arg(args.tp)],
        vec!["--cp".to_owned(), super::serve::cp_arg(args.cp)],
        inflight.unwrap_or_default(),
    ]
    .concat();
    let cluster_listen = args.cluster_listen.unwrap_or_else(|| {
        let port = match args.listen.port() {
            0 | u16::MAX => 0,
            p => p + 1,
        };
        SocketAddr::new(args.listen.ip(), port)
    });
    let mut cluster = LocalCluster::start(&LocalClusterSpec {
        listen: args.listen,
        cluster_listen,
        http_listen: match args.http_listen {
            Some(HttpListen(addr)) => addr,
            None if args.listen.port() == 0 => Some(SocketAddr::new(args.listen.ip(), 0)),
            None => Some(SocketAddr::new(args.listen.ip(), DEFAULT_HTTP_PORT)),
        },
        model: args.model.clone(),
        workers: args.workers,
        threads,
        memory: args.memory,
        coordinators: args.coordinators,
        coordinator_args,
        worker_args: [vec!["--device".into(), args.device.to_string()], otlp].concat(),
        certs: if args.insecure_cluster {
            None
        } else {
            Some(match &args.certs {
                Some(d) => d.clone(),
                None => tessera_hub::ModelCache::from_env()?.root().join("certs"),
            })
        },
        data_dir: args.data_dir.clone(),
        metrics: args.metrics_listen,
    })
    .await?;
    let result = serve(&args, &mut cluster).await;
    cluster.shutdown().await;
    result
}

/// Waits until the cluster serves with a plan of this run's workers. `ready` alone is not
/// enough on kept data (`--data-dir`): its plan names the workers of the run before until the
/// leader finds them silent and plans again.
async fn wait_serving(
    client: &mut Client,
    timeout: Duration,
    workers: &Mutex<Vec<String>>,
) -> Result<ClusterStatusResponse> {
    let deadline = Instant::now() + timeout;
    loop {
        let status = wait_ready(client, deadline.saturating_duration_since(Instant::now())).await?;
        let ours = {
            let workers = workers.lock().unwrap_or_else(PoisonError::into_inner);
            status
                .workers
                .iter()
                .filter(|w| w.shard.is_some())
                .all(|w| workers.contains(&w.address))
        };
        if ours {
            return Ok(status);
        }
        if Instant::now() > deadline {
            bail!("the cluster still plans with the workers of an earlier run after {timeout:.0?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Prints, once ready, each child's pid (what `kill` takes to inject a failure) and metrics
/// address, and where the data is kept.
fn print_members(cluster: &LocalCluster) {
    for m in cluster.members() {
        let pid = m
            .pid()
            .map_or_else(|| "restarting".to_owned(), |p| format!("pid {p}"));
        match m.metrics {
            Some(addr) => eprintln!("{}: {pid}, metrics http://{addr}/metrics", m.what),
            None => eprintln!("{}: {pid}", m.what),
        }
    }
    eprintln!(
        "a child that exits is restarted (try kill -9 PID; kill -STOP PID / kill -CONT PID \
         silences one and brings it back)"
    );
    if let (dir, true) = cluster.data_dir() {
        eprintln!("cluster state kept in {}", dir.display());
    }
}

/// Embeds `texts` and prints one JSON line per text: `{"index", "tokens", "embedding"}`.
async fn print_embeddings(client: &mut Client, texts: &[String]) -> Result<()> {
    let inputs = texts
        .iter()
        .map(|t| tessera_proto::v1::EmbedInput {
            input: Some(tessera_proto::v1::embed_input::Input::Text(t.clone())),
        })
        .collect();
    let resp = client
        .embed(tessera_proto::v1::EmbedRequest {
            model: String::new(),
            inputs,
        })
        .await
        .map_err(|s| anyhow::anyhow!("embed: {}", s.message()))?
        .into_inner();
    for e in &resp.embeddings {
        println!(
            "{}",
            serde_json::json!({"index": e.index, "dimensions": e.values.len(), "embedding": e.values})
        );
    }
    eprintln!(
        "{} texts, {} tokens",
        resp.embeddings.len(),
        resp.prompt_tokens
    );
    Ok(())
}

async fn serve(args: &UpArgs, cluster: &mut LocalCluster) -> Result<()> {
    let endpoint = cluster.endpoint.clone();
    let mut client = connect(&endpoint, Duration::from_secs(10)).await?;
    let timeout = Duration::from_secs(args.ready_timeout);
    let workers = cluster.worker_addresses();
    // Supervised already: a child that dies while the model loads is started again.
    let status = tokio::select! {
        status = wait_serving(&mut client, timeout, &workers) => status?,
        never = cluster.supervise(None) => match never {},
    };
    eprintln!(
        "tessera cluster ready at {endpoint}: {} workers, plan epoch {}",
        status.workers.len(),
        status.plan_epoch
    );
    if let Some(prompt) = &args.prompt {
        // The coordinator serves one model: "" asks for it, whatever --model spelled.
        return print_streamed(&mut client, args.request.to_proto(prompt, "")).await;
    }
    if !args.embed.is_empty() {
        return print_embeddings(&mut client, &args.embed).await;
    }
    println!("{endpoint}");
    let cluster_endpoints = cluster.cluster_endpoints.join(",");
    eprintln!("cluster port (more workers: tessera worker --coordinator {cluster_endpoints})");
    if let Some(http) = cluster.http.first() {
        // The second stdout line: the OpenAI base URL, for scripts as the endpoint above is.
        println!("http://{http}/v1");
        eprintln!(
            "OpenAI-compatible API: http://{http}/v1 (POST …/chat/completions, …/completions)"
        );
    }
    print_members(cluster);
    eprintln!("try: tessera generate --endpoint {endpoint} \"Hello\"   (Ctrl-C stops the cluster)");
    let chaos = args.chaos_interval.map(|every| {
        eprintln!("chaos: a random child is killed every {every:.1?}");
        Chaos { every }
    });
    tokio::select! {
        // SIGTERM (docker stop, systemd, kill) is as normal a stop as Ctrl-C: the children
        // are stopped and a temporary data directory removed, not left behind by a killed
        // parent. A Ctrl-C reaches the children too (one process group); they may exit
        // first, but a restart waits at least the backoff's first 0.5 s, by which time this
        // branch has won.
        () = super::process::shutdown_signal(false) => {
            eprintln!("stopping the cluster");
            Ok(())
        }
        never = cluster.supervise(chaos) => match never {},
    }
}
