//! `tessera up`: a whole local cluster — replicated coordinators (3 by default, one Raft
//! group) and N workers as child processes on loopback — with the model pulled first when it
//! is missing. Each coordinator gets a public port (what the printed endpoint names) and a
//! cluster port (what its peers and the workers dial).
//!
//! Children get a pipe as standard input and exit when it closes, so the cluster goes away with
//! this process however it ends (Ctrl-C, SIGTERM, or `kill -9`).

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use tessera_hub::DEFAULT_MODEL;
use tessera_proto::v1 as pb;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use super::client::{connect, stream_generate, wait_ready};

/// Arguments of `tessera up`.
#[derive(Args, Debug)]
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
    /// Memory per worker, e.g. 1GiB.
    #[arg(long, default_value = "2GiB", value_parser = super::serve::parse_bytes)]
    pub memory: u64,
    /// Send this prompt once the cluster is ready, print the answer, and shut down.
    #[arg(long)]
    pub prompt: Option<String>,
    /// With --prompt: apply the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// With --prompt: most tokens to generate.
    #[arg(long, default_value_t = 128)]
    pub max_tokens: u32,
    /// With --prompt: sampling temperature (0: greedy).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Seconds to wait for the cluster to load the model and become ready.
    #[arg(long, default_value_t = 300)]
    pub ready_timeout: u64,
    /// Have every coordinator and worker export spans over OTLP/gRPC to this collector
    /// (default: $OTEL_EXPORTER_OTLP_ENDPOINT, which the children also inherit).
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
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
    Ok(start_lines(child, what).await?.0)
}

/// A coordinator's addresses from its start lines: (public, cluster).
pub(crate) async fn coordinator_addresses(
    child: &mut Child,
    what: &str,
) -> Result<(String, String)> {
    let (public, cluster) = start_lines(child, what).await?;
    let cluster = cluster.with_context(|| format!("{what} printed no cluster address"))?;
    Ok((public, cluster))
}

/// Reads a child's stdout until its "listening on ADDR" line, noting a "cluster on ADDR" line
/// before it (coordinators print both, cluster first), then keeps draining it.
async fn start_lines(child: &mut Child, what: &str) -> Result<(String, Option<String>)> {
    let stdout = child
        .stdout
        .take()
        .with_context(|| format!("{what} has no stdout"))?;
    let mut lines = BufReader::new(stdout).lines();
    let read = async {
        let mut cluster = None;
        while let Some(line) = lines.next_line().await? {
            if let Some(addr) = line.split("cluster on ").nth(1) {
                cluster = Some(addr.trim().to_owned());
            }
            if let Some(addr) = line.split("listening on ").nth(1) {
                return Ok::<_, std::io::Error>(Some((addr.trim().to_owned(), cluster)));
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
}

/// The public and cluster ports of coordinator `i`: the spec's for the first, when not 0,
/// else free ones.
fn coordinator_ports(spec: &LocalClusterSpec, i: u32) -> Result<(SocketAddr, SocketAddr)> {
    let pick = |want: SocketAddr| -> Result<SocketAddr> {
        let port = if i == 0 && want.port() != 0 {
            want.port()
        } else {
            free_port()?
        };
        Ok(SocketAddr::new(want.ip(), port))
    };
    Ok((pick(spec.listen)?, pick(spec.cluster_listen)?))
}

/// Coordinators started: (public endpoints, cluster endpoints, processes).
type Started = (Vec<String>, Vec<String>, Vec<Child>);

/// Starts `n` coordinators as one Raft group on fresh loopback ports; on failure the ones
/// started are killed. They know each other (`--peers`) by their cluster addresses.
async fn start_group(
    spec: &LocalClusterSpec,
    n: u32,
    data: &std::path::Path,
    base: &dyn Fn(String, String) -> Vec<String>,
) -> Result<Started> {
    let addrs = (0..n)
        .map(|i| coordinator_ports(spec, i))
        .collect::<Result<Vec<_>>>()?;
    let peers = addrs
        .iter()
        .enumerate()
        .map(|(i, (_, cluster))| format!("{}={cluster}", i + 1))
        .collect::<Vec<_>>()
        .join(",");
    let (mut endpoints, mut cluster_endpoints) = (Vec::new(), Vec::new());
    let mut children: Vec<Child> = Vec::new();
    for (i, (public, cluster)) in addrs.iter().enumerate() {
        let mut args = base(public.to_string(), cluster.to_string());
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
            Ok((c, (public, cluster))) => {
                endpoints.push(format!("http://{public}"));
                cluster_endpoints.push(format!("http://{cluster}"));
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
    Ok((endpoints, cluster_endpoints, children))
}

impl LocalCluster {
    /// Starts the coordinator, then the workers, each once its predecessor listens.
    ///
    /// # Errors
    /// When a process cannot start or does not listen within two minutes.
    pub async fn start(spec: &LocalClusterSpec) -> Result<Self> {
        let n = spec.coordinators.max(1);
        let base = |listen: String, cluster_listen: String| -> Vec<String> {
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
            args.extend(spec.coordinator_args.iter().cloned());
            args
        };
        let mut cluster = Self {
            endpoint: String::new(),
            endpoints: Vec::new(),
            cluster_endpoints: Vec::new(),
            children: Vec::new(),
            coordinators: n as usize,
            data: None,
        };
        if n == 1 {
            let mut c = spawn(&base(
                spec.listen.to_string(),
                spec.cluster_listen.to_string(),
            ))?;
            let (public, cluster_addr) = coordinator_addresses(&mut c, "the coordinator").await?;
            cluster.endpoints.push(format!("http://{public}"));
            cluster
                .cluster_endpoints
                .push(format!("http://{cluster_addr}"));
            cluster.children.push(c);
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
                    Ok((endpoints, cluster_endpoints, children)) => {
                        cluster.endpoints = endpoints;
                        cluster.cluster_endpoints = cluster_endpoints;
                        cluster.children = children;
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
                format!("worker-{i}"),
                "--exit-on-stdin-eof".into(),
            ];
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
    let coordinator_args = [
        otlp.clone(),
        vec!["--prefix-cache".to_owned(), switch.to_owned()],
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
        model: args.model.clone(),
        workers: args.workers,
        threads,
        memory: args.memory,
        coordinators: args.coordinators,
        coordinator_args,
        worker_args: otlp,
    })
    .await?;
    let endpoint = cluster.endpoint.clone();
    let coordinators = cluster.coordinators;
    let cluster_endpoints = cluster.cluster_endpoints.join(",");
    let result = serve(
        &args,
        &endpoint,
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
        let prompt = if args.chat {
            pb::generate_request::Prompt::Chat(pb::ChatMessages {
                messages: vec![pb::ChatMessage {
                    role: "user".into(),
                    content: prompt.clone(),
                }],
            })
        } else {
            pb::generate_request::Prompt::Text(prompt.clone())
        };
        let req = pb::GenerateRequest {
            prompt: Some(prompt),
            sampling: Some(pb::SamplingParams {
                temperature: Some(args.temperature),
                ..Default::default()
            }),
            stop: Some(pb::StopConditions {
                max_tokens: Some(args.max_tokens),
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut stdout = std::io::stdout();
        let done = stream_generate(&mut client, req, &mut stdout, &mut |_| {}).await?;
        println!();
        eprintln!(
            "[{} prompt tokens, {} generated, finish: {}, first token {:.0} ms]",
            done.prompt_tokens,
            done.tokens.len(),
            done.finish.as_deref().unwrap_or("none"),
            done.ttft_ms
        );
        return Ok(());
    }
    println!("{endpoint}");
    eprintln!("cluster port (more workers: tessera worker --coordinator {cluster_endpoints})");
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
        _ = tokio::signal::ctrl_c() => {
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
