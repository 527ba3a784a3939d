//! `tessera up`: a whole local cluster — replicated coordinators (3 by default, one Raft
//! group) and N workers as child processes on loopback — with the model pulled first when it
//! is missing. Each coordinator gets a public port (what the printed endpoint names) and a
//! cluster port (what its peers and the workers dial).
//!
//! Children get a pipe as standard input and exit when it closes, so the cluster goes away with
//! this process however it ends (Ctrl-C, SIGTERM, or `kill -9`); Ctrl-C and SIGTERM are a
//! normal stop, after which `up` exits 0.

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use tessera_hub::DEFAULT_MODEL;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use super::client::{connect, wait_ready};
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
    /// Send this prompt once the cluster is ready, print the answer, and shut down.
    #[arg(long)]
    pub prompt: Option<String>,
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

/// Starts `tessera ARGS…` as a child that dies with this process.
pub(crate) fn spawn(args: &[String]) -> Result<Child> {
    let exe = std::env::current_exe().context("locating the tessera binary")?;
    Command::new(exe)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting `tessera {}`", args.join(" ")))
}

/// Reads a child's stdout until its "listening on ADDR" line, then keeps draining it.
pub(crate) async fn listening_address(child: &mut Child, what: &str) -> Result<String> {
    Ok(start_lines(child, what).await?.public)
}

/// What a coordinator printed as it started.
pub(crate) struct CoordinatorAddrs {
    /// Its public API.
    pub public: String,
    /// Its cluster port.
    pub cluster: String,
    /// Its HTTP API, when it serves one.
    pub http: Option<String>,
}

/// A coordinator's addresses from its start lines.
pub(crate) async fn coordinator_addresses(
    child: &mut Child,
    what: &str,
) -> Result<CoordinatorAddrs> {
    let lines = start_lines(child, what).await?;
    let cluster = lines
        .cluster
        .with_context(|| format!("{what} printed no cluster address"))?;
    Ok(CoordinatorAddrs {
        public: lines.public,
        cluster,
        http: lines.http,
    })
}

/// The addresses a child printed before it was up.
struct StartLines {
    public: String,
    cluster: Option<String>,
    http: Option<String>,
}

/// Reads a child's stdout until its "listening on ADDR" line, noting the "cluster on ADDR" and
/// "http on ADDR" lines before it (coordinators print them first), then keeps draining it.
async fn start_lines(child: &mut Child, what: &str) -> Result<StartLines> {
    let stdout = child
        .stdout
        .take()
        .with_context(|| format!("{what} has no stdout"))?;
    let mut lines = BufReader::new(stdout).lines();
    let read = async {
        let (mut cluster, mut http) = (None, None);
        while let Some(line) = lines.next_line().await? {
            if let Some(addr) = line.split("cluster on ").nth(1) {
                cluster = Some(addr.trim().to_owned());
            }
            if let Some(addr) = line.split("http on ").nth(1) {
                http = Some(addr.trim().to_owned());
            }
            if let Some(addr) = line.split("listening on ").nth(1) {
                return Ok::<_, std::io::Error>(Some(StartLines {
                    public: addr.trim().to_owned(),
                    cluster,
                    http,
                }));
            }
        }
        Ok(None)
    };
    let addrs = tokio::time::timeout(Duration::from_secs(120), read)
        .await
        .with_context(|| format!("{what} did not start listening within 120 s"))??
        .with_context(|| format!("{what} exited before listening (see its log above)"))?;
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            println!("{line}");
        }
    });
    Ok(addrs)
}

/// Coordinators and workers running as child processes of this one.
pub struct LocalCluster {
    /// The first coordinator's public endpoint, `http://host:port`.
    pub endpoint: String,
    /// Every coordinator's public endpoint.
    pub endpoints: Vec<String>,
    /// Every coordinator's cluster endpoint (what workers and peers dial), in the same order.
    pub cluster_endpoints: Vec<String>,
    /// Every coordinator's HTTP API (`host:port`), when served, in the same order.
    pub http: Vec<String>,
    /// The coordinators first, then the workers.
    children: Vec<Child>,
    /// How many of `children` are coordinators.
    coordinators: usize,
    /// The coordinators' Raft data, removed at shutdown.
    data: Option<std::path::PathBuf>,
}

/// A free loopback port (released before the coordinator binds it: a race other processes
/// rarely win).
pub(crate) fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr().context("finding a free port")?.port())
}

/// How to start a [`LocalCluster`].
#[derive(Clone, Debug)]
pub struct LocalClusterSpec {
    /// The first coordinator's public address (port 0: any).
    pub listen: SocketAddr,
    /// The first coordinator's cluster address (port 0: any).
    pub cluster_listen: SocketAddr,
    /// The first coordinator's HTTP API address (port 0: any); `None`: no HTTP API.
    pub http_listen: Option<SocketAddr>,
    /// Model name or path.
    pub model: String,
    /// Workers to start.
    pub workers: u32,
    /// Threads per worker.
    pub threads: u32,
    /// Memory per worker in bytes.
    pub memory: u64,
    /// Coordinators (one Raft group when more than one).
    pub coordinators: u32,
    /// Extra coordinator arguments.
    pub coordinator_args: Vec<String>,
    /// Extra worker arguments.
    pub worker_args: Vec<String>,
    /// The certificate directory the cluster protocol's mutual TLS uses (certificates for
    /// every process are issued into it as needed); `None`: the cluster runs with
    /// `--insecure-cluster`.
    pub certs: Option<std::path::PathBuf>,
}

impl LocalClusterSpec {
    /// `--model-dir` for a model given as a path: its directory, which the workers may then
    /// load from (they open only the store's models otherwise).
    fn model_dir_flags(&self) -> Vec<String> {
        tessera_hub::model_dir(&self.model).map_or_else(Vec::new, |dir| {
            vec!["--model-dir".to_owned(), dir.to_string_lossy().into_owned()]
        })
    }

    /// The name of worker `i`, which is also its certificate's.
    fn worker_name(i: u32) -> String {
        format!("worker-{i}")
    }

    /// Issues what `certs` lacks (coordinators 1..n, the workers, the operator) and returns
    /// the cluster-protocol flags every child gets.
    fn cluster_flags(&self) -> Result<Vec<String>> {
        let Some(dir) = &self.certs else {
            return Ok(vec!["--insecure-cluster".to_owned()]);
        };
        let mut members: Vec<tessera_tls::Identity> = (1..=u64::from(self.coordinators.max(1)))
            .map(tessera_tls::Identity::coordinator)
            .collect();
        for i in 0..self.workers {
            members.push(tessera_tls::Identity::new(
                tessera_tls::Role::Worker,
                &Self::worker_name(i),
            )?);
        }
        members.push(tessera_tls::Identity::new(
            tessera_tls::Role::Admin,
            super::certs::OPERATOR,
        )?);
        super::certs::issue(dir, &members)?;
        Ok(vec![
            "--certs".to_owned(),
            dir.to_string_lossy().into_owned(),
        ])
    }
}

/// The ports of coordinator `i`: public, cluster, HTTP (when served); the spec's for the first,
/// when not 0, else free ones.
type Ports = (SocketAddr, SocketAddr, Option<SocketAddr>);

fn coordinator_ports(spec: &LocalClusterSpec, i: u32) -> Result<Ports> {
    let pick = |want: SocketAddr| -> Result<SocketAddr> {
        let port = if i == 0 && want.port() != 0 {
            want.port()
        } else {
            free_port()?
        };
        Ok(SocketAddr::new(want.ip(), port))
    };
    let http = spec.http_listen.map(pick).transpose()?;
    Ok((pick(spec.listen)?, pick(spec.cluster_listen)?, http))
}

/// Coordinators started: their addresses and processes.
type Started = (Vec<CoordinatorAddrs>, Vec<Child>);

/// Starts `n` coordinators as one Raft group on fresh loopback ports; on failure the ones
/// started are killed. They know each other (`--peers`) by their cluster addresses.
async fn start_group(
    spec: &LocalClusterSpec,
    n: u32,
    data: &std::path::Path,
    base: &dyn Fn(String, String, Option<SocketAddr>) -> Vec<String>,
) -> Result<Started> {
    let addrs = (0..n)
        .map(|i| coordinator_ports(spec, i))
        .collect::<Result<Vec<_>>>()?;
    let peers = addrs
        .iter()
        .enumerate()
        .map(|(i, (_, cluster, _))| format!("{}={cluster}", i + 1))
        .collect::<Vec<_>>()
        .join(",");
    let mut started_addrs = Vec::new();
    let mut children: Vec<Child> = Vec::new();
    for (i, (public, cluster, http)) in addrs.iter().enumerate() {
        let mut args = base(public.to_string(), cluster.to_string(), *http);
        args.extend([
            "--id".into(),
            (i + 1).to_string(),
            "--peers".into(),
            peers.clone(),
            "--data-dir".into(),
            data.join(format!("coordinator-{}", i + 1))
                .to_string_lossy()
                .into_owned(),
        ]);
        let started = async {
            let mut c = spawn(&args)?;
            let addrs = coordinator_addresses(&mut c, &format!("coordinator {}", i + 1)).await?;
            Ok::<_, anyhow::Error>((c, addrs))
        }
        .await;
        match started {
            Ok((c, addrs)) => {
                started_addrs.push(addrs);
                children.push(c);
            }
            Err(e) => {
                for mut c in children {
                    let _ = c.kill().await;
                }
                return Err(e);
            }
        }
    }
    Ok((started_addrs, children))
}

impl LocalCluster {
    /// Notes the coordinators' addresses, in start order.
    fn record(&mut self, addrs: Vec<CoordinatorAddrs>) {
        for a in addrs {
            self.endpoints.push(format!("http://{}", a.public));
            self.cluster_endpoints.push(format!("http://{}", a.cluster));
            self.http.extend(a.http);
        }
    }

    /// Starts the coordinator, then the workers, each once its predecessor listens.
    ///
    /// # Errors
    /// When a process cannot start or does not listen within two minutes.
    pub async fn start(spec: &LocalClusterSpec) -> Result<Self> {
        let n = spec.coordinators.max(1);
        let tls_flags = spec.cluster_flags()?;
        let base =
            |listen: String, cluster_listen: String, http: Option<SocketAddr>| -> Vec<String> {
                let mut args = vec![
                    "coordinator".into(),
                    "--listen".into(),
                    listen,
                    "--cluster-listen".into(),
                    cluster_listen,
                    "--model".into(),
                    spec.model.clone(),
                    "--min-workers".into(),
                    spec.workers.to_string(),
                    "--exit-on-stdin-eof".into(),
                ];
                args.extend(tls_flags.iter().cloned());
                if let Some(http) = http {
                    args.extend(["--http-listen".into(), http.to_string()]);
                }
                args.extend(spec.coordinator_args.iter().cloned());
                args
            };
        let mut cluster = Self {
            endpoint: String::new(),
            endpoints: Vec::new(),
            cluster_endpoints: Vec::new(),
            http: Vec::new(),
            children: Vec::new(),
            coordinators: n as usize,
            data: None,
        };
        if n == 1 {
            let mut c = spawn(&base(
                spec.listen.to_string(),
                spec.cluster_listen.to_string(),
                spec.http_listen,
            ))?;
            let addrs = coordinator_addresses(&mut c, "the coordinator").await?;
            cluster.children.push(c);
            cluster.record(vec![addrs]);
        } else {
            // Peers must know each other's addresses before any of them starts, so ports are
            // picked up front; another process can take one in between, so a failed start is
            // retried on fresh ports.
            let data = std::env::temp_dir().join(format!("tessera-up-{}", std::process::id()));
            cluster.data = Some(data.clone());
            let mut attempt = 0;
            loop {
                attempt += 1;
                match start_group(spec, n, &data, &base).await {
                    Ok((addrs, children)) => {
                        cluster.children = children;
                        cluster.record(addrs);
                        break;
                    }
                    Err(e) if attempt < 3 => {
                        tracing::warn!(
                            attempt,
                            "starting the coordinators failed: {e:#}; retrying"
                        );
                        let _ = std::fs::remove_dir_all(&data);
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        cluster.endpoint = cluster.endpoints[0].clone();
        // Workers speak only the cluster protocol.
        let coordinators = cluster.cluster_endpoints.join(",");
        for i in 0..spec.workers {
            let mut args = vec![
                "worker".into(),
                "--coordinator".into(),
                coordinators.clone(),
                "--threads".into(),
                spec.threads.to_string(),
                "--memory".into(),
                spec.memory.to_string(),
                "--name".into(),
                LocalClusterSpec::worker_name(i),
                "--exit-on-stdin-eof".into(),
            ];
            args.extend(tls_flags.iter().cloned());
            args.extend(spec.model_dir_flags());
            args.extend(spec.worker_args.iter().cloned());
            let mut worker = spawn(&args)?;
            listening_address(&mut worker, &format!("worker {i}")).await?;
            cluster.children.push(worker);
        }
        Ok(cluster)
    }

    /// Closes every child's stdin (their signal to stop), waits a little, then kills stragglers.
    pub async fn shutdown(mut self) {
        for c in &mut self.children {
            drop(c.stdin.take());
        }
        for c in &mut self.children {
            if tokio::time::timeout(Duration::from_secs(5), c.wait())
                .await
                .is_err()
            {
                let _ = c.kill().await;
            }
        }
        if let Some(d) = &self.data {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

async fn up(args: UpArgs) -> Result<()> {
    let threads = if args.threads_per_worker > 0 {
        args.threads_per_worker
    } else {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
        (cores / args.workers).max(1)
    };
    let otlp: Vec<String> = super::serve::otlp_endpoint(&args.otlp_endpoint)
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
        worker_args: otlp,
        certs: if args.insecure_cluster {
            None
        } else {
            Some(match &args.certs {
                Some(d) => d.clone(),
                None => tessera_hub::ModelCache::from_env()?.root().join("certs"),
            })
        },
    })
    .await?;
    let endpoint = cluster.endpoint.clone();
    let http = cluster.http.first().cloned();
    let coordinators = cluster.coordinators;
    let cluster_endpoints = cluster.cluster_endpoints.join(",");
    let result = serve(
        &args,
        &endpoint,
        http.as_deref(),
        &cluster_endpoints,
        &mut cluster.children,
        coordinators,
    )
    .await;
    cluster.shutdown().await;
    result
}

async fn serve(
    args: &UpArgs,
    endpoint: &str,
    http: Option<&str>,
    cluster_endpoints: &str,
    children: &mut [Child],
    coordinators: usize,
) -> Result<()> {
    let mut client = connect(endpoint, Duration::from_secs(10)).await?;
    let status = wait_ready(&mut client, Duration::from_secs(args.ready_timeout)).await?;
    eprintln!(
        "tessera cluster ready at {endpoint}: {} workers, plan epoch {}",
        status.workers.len(),
        status.plan_epoch
    );
    if let Some(prompt) = &args.prompt {
        // The coordinator serves one model: "" asks for it, whatever --model spelled.
        return print_streamed(&mut client, args.request.to_proto(prompt, "")).await;
    }
    println!("{endpoint}");
    eprintln!("cluster port (more workers: tessera worker --coordinator {cluster_endpoints})");
    if let Some(http) = http {
        // The second stdout line: the OpenAI base URL, for scripts as the endpoint above is.
        println!("http://{http}/v1");
        eprintln!(
            "OpenAI-compatible API: http://{http}/v1 (POST …/chat/completions, …/completions)"
        );
    }
    eprintln!("try: tessera generate --endpoint {endpoint} \"Hello\"   (Ctrl-C stops the cluster)");
    let exited = async {
        loop {
            for (i, c) in children.iter_mut().enumerate() {
                if let Ok(Some(status)) = c.try_wait() {
                    return (i, status);
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    tokio::select! {
        // SIGTERM (docker stop, systemd, kill) is as normal a stop as Ctrl-C: the children
        // are stopped and the Raft data removed, not left behind by a killed parent.
        () = super::serve::shutdown_signal(false) => {
            eprintln!("stopping the cluster");
            Ok(())
        }
        (i, status) = exited => {
            let what = if i < coordinators {
                format!("coordinator {}", i + 1)
            } else {
                format!("worker {}", i - coordinators)
            };
            bail!("{what} exited ({status}); stopping the cluster")
        }
    }
}
