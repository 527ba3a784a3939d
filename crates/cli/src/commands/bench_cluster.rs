//! `tessera bench-cluster`: what pipeline sharding costs — decode tokens/s and time to first
//! token for the embedded engine and for local clusters of 1, 2, 3… workers at equal total
//! threads, with the latency each extra pipeline hop adds, printed side by side.
//!
//! With `--streams N`, aggregate throughput instead: N concurrent greedy streams through one
//! worker with all the threads, through two pipeline stages with half each and their
//! micro-batches overlapped (several steps in flight), and through the same two stages with
//! `--max-inflight-steps 1` (one step at a time), as tokens/s side by side with their ratios.
//!
//! With `--tp K`, tensor parallelism instead (`bench_tp`): one stream through one worker with
//! all the threads and through a group of K workers sharing them, with the group's reduction
//! time per step and the cost model's predictions.
//!
//! With `--tls-cost N`, what mutual TLS costs: decode through N pipeline stages, or with
//! `--tp K` through one tensor-parallel group (TLS on the peer port's every reduction), with
//! TLS and without, both clusters up at once.
//!
//! With `--cp P`, context parallelism instead (`bench_ring`): a long prompt's time to first
//! token through one worker with all the threads and through a ring of P workers sharing
//! them, with the bytes each rank sends.
//!
//! A benchmark, not a test: it prints figures and asserts nothing about speed.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use tessera_hub::DEFAULT_MODEL;
use tessera_model::engine::{GenerateRequest, Prompt};
use tessera_proto::v1 as pb;
use tessera_text::sampling::{SamplingParams, StopConditions};

use super::client::{Client, connect, stream_generate, wait_ready};
use super::up::{LocalCluster, LocalClusterSpec};

/// Arguments of `tessera bench-cluster`.
#[derive(Args, Debug)]
pub struct BenchClusterArgs {
    /// A model name from the cache or a path.
    #[arg(long, default_value = DEFAULT_MODEL)]
    pub model: String,
    /// Compute threads in total, shared evenly by the workers (at least one each).
    #[arg(long, default_value_t = 2)]
    pub total_threads: u32,
    /// Clusters of 1..=this many workers are measured.
    #[arg(long, default_value_t = 3)]
    pub max_workers: u32,
    /// Prompt length, in repetitions of a two-token phrase.
    #[arg(long, default_value_t = 64)]
    pub prompt_repeats: usize,
    /// Tokens to decode per run.
    #[arg(long, default_value_t = 64)]
    pub decode: u32,
    /// Measured runs per configuration (after one warm-up); the best is reported.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Measure aggregate throughput of this many concurrent streams instead (0: off): one
    /// worker vs two overlapped stages vs two stages one step at a time.
    #[arg(long, default_value_t = 0)]
    pub streams: usize,
    /// Compare one worker with a tensor-parallel group of this many workers instead (0: off),
    /// at equal total threads.
    #[arg(long, default_value_t = 0)]
    pub tp: u32,
    /// Compare one worker with a context-parallel ring of this many workers instead (0:
    /// off), at equal total threads: time to first token of the prompt (make it long with
    /// `--prompt-repeats`) and bytes each rank sends.
    #[arg(long, default_value_t = 0)]
    pub cp: u32,
    /// Measure what mutual TLS on the cluster protocol costs instead (0: off): decode
    /// through a pipeline of this many stages with TLS and without, both clusters up at once
    /// and their runs interleaved. With `--tp K`, through one tensor-parallel group of K
    /// workers instead, where the peer port's TLS is on every reduction.
    #[arg(long, default_value_t = 0)]
    pub tls_cost: u32,
}

/// Where benchmark clusters keep their certificates (issued on first use, then reused).
fn bench_certs() -> std::path::PathBuf {
    std::env::temp_dir().join("tessera-bench-certs")
}

/// One configuration's best figures.
#[derive(Clone, Copy, Debug)]
struct Figures {
    ttft_ms: f64,
    decode_tok_s: f64,
}

impl Figures {
    fn best(self, other: Self) -> Self {
        Self {
            ttft_ms: self.ttft_ms.min(other.ttft_ms),
            decode_tok_s: self.decode_tok_s.max(other.decode_tok_s),
        }
    }
}

fn prompt(args: &BenchClusterArgs) -> String {
    "the cat ".repeat(args.prompt_repeats)
}

/// Runs `tessera bench-cluster`.
pub fn run(args: BenchClusterArgs) -> Result<()> {
    let location = super::model::resolve_or_pull(&args.model)?;
    if args.streams > 0 {
        return throughput(&args);
    }
    // Before `--tp`, which `--tls-cost` uses to choose a tensor-parallel group.
    if args.tls_cost > 0 {
        return super::runtime()?.block_on(tls_cost(&args, args.tls_cost));
    }
    if args.tp > 1 {
        return super::bench_tp::run(&args, &location);
    }
    if args.cp > 1 {
        return super::bench_ring::run(&args, args.cp);
    }
    let embedded = {
        let mut engine = super::generate::load_engine(&location, args.total_threads as usize)?;
        let req = engine.validate(&GenerateRequest {
            prompt: Prompt::Text(prompt(&args)),
            sampling: SamplingParams::greedy(),
            stop: StopConditions {
                max_tokens: args.decode,
                stop: Vec::new(),
                stop_token_ids: Vec::new(),
                ignore_eos: true,
            },
        })?;
        let mut best = None::<Figures>;
        for run in 0..=args.runs {
            let out = engine.generate(&req, &mut |_| std::ops::ControlFlow::Continue(()))?;
            let f = Figures {
                ttft_ms: out.time_to_first_token.as_secs_f64() * 1e3,
                decode_tok_s: (out.tokens.len() - 1) as f64
                    / (out.elapsed - out.time_to_first_token).as_secs_f64(),
            };
            if run > 0 {
                best = Some(best.map_or(f, |b| b.best(f)));
            }
        }
        best.context("no runs")?
    };
    let rt = super::runtime()?;
    let mut rows = Vec::new();
    for n in 1..=args.max_workers.max(1) {
        let threads = (args.total_threads / n).max(1);
        let f = rt.block_on(measure_cluster(&args, n, threads))?;
        rows.push((n, threads, f));
    }
    // The cost of a hop is only visible against one worker with the same threads per worker:
    // measure that baseline for every thread count the larger clusters used.
    let mut extra = Vec::new();
    for &(_, threads, _) in &rows {
        if !rows
            .iter()
            .chain(&extra)
            .any(|r| r.0 == 1 && r.1 == threads)
        {
            extra.push((1, threads, rt.block_on(measure_cluster(&args, 1, threads))?));
        }
    }
    rows.extend(extra);
    println!(
        "model {} | prompt {} repeats, decode {} tokens, {} total threads, best of {}",
        args.model, args.prompt_repeats, args.decode, args.total_threads, args.runs
    );
    println!(
        "{:<22} {:>12} {:>14} {:>14} {:>16}",
        "configuration", "TTFT ms", "decode tok/s", "ms / token", "added per hop ms"
    );
    let embedded_ms = 1e3 / embedded.decode_tok_s;
    println!(
        "{:<22} {:>12.1} {:>14.1} {:>14.2} {:>16}",
        format!("embedded ({} thr)", args.total_threads),
        embedded.ttft_ms,
        embedded.decode_tok_s,
        embedded_ms,
        "-"
    );
    for (n, threads, f) in &rows {
        let ms = 1e3 / f.decode_tok_s;
        // n workers add n-1 worker-to-worker hops to one worker with the same threads; one
        // worker adds the coordinator round trip to the embedded engine.
        let one = rows
            .iter()
            .find(|r| r.0 == 1 && r.1 == *threads)
            .map(|r| 1e3 / r.2.decode_tok_s);
        let per_hop = match (one, *n) {
            (Some(base), n) if n > 1 => format!("{:.2}", (ms - base) / f64::from(n - 1)),
            _ => format!("{:.2} (rpc)", ms - embedded_ms),
        };
        println!(
            "{:<22} {:>12.1} {:>14.1} {:>14.2} {:>16}",
            format!("{n} worker(s) x {threads} thr"),
            f.ttft_ms,
            f.decode_tok_s,
            ms,
            per_hop
        );
    }
    Ok(())
}

/// A local cluster of one coordinator (with `coordinator_args`) and `workers` workers,
/// speaking mutual TLS among themselves.
pub(super) async fn start_cluster(
    args: &BenchClusterArgs,
    workers: u32,
    threads: u32,
    coordinator_args: Vec<String>,
) -> Result<LocalCluster> {
    start_cluster_with(
        args,
        workers,
        threads,
        coordinator_args,
        Some(bench_certs()),
    )
    .await
}

/// As [`start_cluster`], with the certificates in `certs` (`None`: `--insecure-cluster`).
async fn start_cluster_with(
    args: &BenchClusterArgs,
    workers: u32,
    threads: u32,
    coordinator_args: Vec<String>,
    certs: Option<std::path::PathBuf>,
) -> Result<LocalCluster> {
    LocalCluster::start(&LocalClusterSpec {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        cluster_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        http_listen: None,
        model: args.model.clone(),
        workers,
        threads,
        memory: 4 << 30,
        coordinators: 1,
        coordinator_args,
        worker_args: Vec::new(),
        certs,
        data_dir: None,
        metrics: None,
    })
    .await
}

/// A greedy request for exactly `args.decode` tokens of the benchmark's prompt.
pub(super) fn request(args: &BenchClusterArgs) -> pb::GenerateRequest {
    pb::GenerateRequest {
        prompt: Some(pb::generate_request::Prompt::Text(prompt(args))),
        sampling: Some(pb::SamplingParams {
            temperature: Some(0.0),
            ..Default::default()
        }),
        stop: Some(pb::StopConditions {
            max_tokens: Some(args.decode),
            ignore_eos: true,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// `tessera bench-cluster --streams N`: the three configurations' aggregate tokens/s.
fn throughput(args: &BenchClusterArgs) -> Result<()> {
    let rt = super::runtime()?;
    let total = args.total_threads.max(2);
    let one = rt.block_on(measure_streams(args, 1, total, Vec::new()))?;
    let half = total / 2;
    let overlapped = rt.block_on(measure_streams(args, 2, half, Vec::new()))?;
    let serial = rt.block_on(measure_streams(
        args,
        2,
        half,
        vec!["--max-inflight-steps".into(), "1".into()],
    ))?;
    println!(
        "model {} | {} streams, prompt {} repeats, decode {} tokens each, best of {}",
        args.model, args.streams, args.prompt_repeats, args.decode, args.runs
    );
    println!(
        "{:<34} {:>10} {:>14} {:>16}",
        "configuration", "tok/s", "vs 1 worker", "vs 1 in flight"
    );
    let rows = [
        (format!("1 worker x {total} thr"), one),
        (format!("2 stages x {half} thr, overlapped"), overlapped),
        (format!("2 stages x {half} thr, 1 in flight"), serial),
    ];
    for (name, tok_s) in rows {
        println!(
            "{name:<34} {tok_s:>10.1} {:>13.2}x {:>15.2}x",
            tok_s / one,
            tok_s / serial
        );
    }
    Ok(())
}

/// The best aggregate tokens/s of `args.streams` concurrent streams (all tokens of all
/// streams over the wall time from the first request to the last token), after a warm-up.
async fn measure_streams(
    args: &BenchClusterArgs,
    workers: u32,
    threads: u32,
    coordinator_args: Vec<String>,
) -> Result<f64> {
    let cluster = start_cluster(args, workers, threads, coordinator_args).await?;
    let result = async {
        let client = connect(&cluster.endpoint, Duration::from_secs(10)).await?;
        let mut c = client.clone();
        wait_ready(&mut c, Duration::from_secs(120)).await?;
        let mut best = 0.0f64;
        for run in 0..=args.runs {
            let start = Instant::now();
            let tasks: Vec<_> = (0..args.streams)
                .map(|_| {
                    let mut c = client.clone();
                    let req = request(args);
                    tokio::spawn(async move { count_tokens(&mut c, req).await })
                })
                .collect();
            let mut tokens = 0;
            for t in tasks {
                tokens += t.await.context("stream task")??;
            }
            let tok_s = tokens as f64 / start.elapsed().as_secs_f64();
            if run > 0 {
                best = best.max(tok_s);
            }
        }
        Ok(best)
    }
    .await;
    cluster.shutdown().await;
    result
}

/// Runs one request to its end; the tokens it streamed.
async fn count_tokens(client: &mut Client, req: pb::GenerateRequest) -> Result<usize> {
    let mut stream = client.generate(req).await?.into_inner();
    let mut tokens = 0;
    while let Some(ev) = stream.message().await? {
        if let Some(pb::generate_event::Event::Token(_)) = ev.event {
            tokens += 1;
        }
    }
    Ok(tokens)
}

/// One greedy request's figures, on the client's clock: what a user sees, including the RPC
/// to the coordinator.
async fn one_run(client: &mut Client, args: &BenchClusterArgs) -> Result<Figures> {
    let req = request(args);
    let start = Instant::now();
    let mut first = None;
    let done = stream_generate(client, req, &mut std::io::sink(), &mut |_| {
        first.get_or_insert_with(Instant::now);
    })
    .await?;
    let end = Instant::now();
    let first = first.context("no tokens")?;
    Ok(Figures {
        ttft_ms: (first - start).as_secs_f64() * 1e3,
        decode_tok_s: (done.tokens.len() - 1) as f64 / (end - first).as_secs_f64(),
    })
}

async fn measure_cluster(args: &BenchClusterArgs, workers: u32, threads: u32) -> Result<Figures> {
    let cluster = start_cluster(args, workers, threads, Vec::new()).await?;
    let result = async {
        let mut client = connect(&cluster.endpoint, Duration::from_secs(10)).await?;
        wait_ready(&mut client, Duration::from_secs(120)).await?;
        let mut best = None::<Figures>;
        for run in 0..=args.runs {
            let f = one_run(&mut client, args).await?;
            if run > 0 {
                best = Some(best.map_or(f, |b| b.best(f)));
            }
        }
        best.context("no runs")
    }
    .await;
    cluster.shutdown().await;
    result
}

/// `tessera bench-cluster --tls-cost N`: decode through N stages (or, with `--tp K`, one
/// tensor-parallel group of K ranks) with mutual TLS and without. Both clusters run at once
/// and each round measures one run on each, so noise on the machine falls on both alike.
async fn tls_cost(args: &BenchClusterArgs, stages: u32) -> Result<()> {
    let (workers, coordinator_args, shape) = if args.tp > 1 {
        let k = args.tp.to_string();
        (
            args.tp,
            vec!["--tp".to_owned(), k],
            format!("TP={}", args.tp),
        )
    } else {
        (stages, Vec::new(), format!("{stages} stages"))
    };
    let threads = (args.total_threads / workers).max(1);
    let secure = start_cluster_with(
        args,
        workers,
        threads,
        coordinator_args.clone(),
        Some(bench_certs()),
    )
    .await?;
    let clear = match start_cluster_with(args, workers, threads, coordinator_args, None).await {
        Ok(c) => c,
        Err(e) => {
            secure.shutdown().await;
            return Err(e);
        }
    };
    let result = async {
        let mut clients = Vec::new();
        for c in [&secure, &clear] {
            let mut client = connect(&c.endpoint, Duration::from_secs(10)).await?;
            wait_ready(&mut client, Duration::from_secs(120)).await?;
            clients.push(client);
        }
        let mut best: [Option<Figures>; 2] = [None, None];
        for run in 0..=args.runs {
            for (i, client) in clients.iter_mut().enumerate() {
                let f = one_run(client, args).await?;
                if run > 0 {
                    best[i] = Some(best[i].map_or(f, |b| b.best(f)));
                }
            }
        }
        let [Some(tls), Some(plain)] = best else {
            anyhow::bail!("no runs");
        };
        println!(
            "model {} | {shape} x {threads} thr, prompt {} repeats, decode {} tokens, best of {}",
            args.model, args.prompt_repeats, args.decode, args.runs
        );
        println!(
            "{:<26} {:>10} {:>14}",
            "cluster protocol", "TTFT ms", "decode tok/s"
        );
        println!(
            "{:<26} {:>10.1} {:>14.1}",
            "mutual TLS", tls.ttft_ms, tls.decode_tok_s
        );
        println!(
            "{:<26} {:>10.1} {:>14.1}",
            "in the clear", plain.ttft_ms, plain.decode_tok_s
        );
        println!(
            "TLS / clear: decode {:.3}x, TTFT {:.3}x",
            tls.decode_tok_s / plain.decode_tok_s,
            tls.ttft_ms / plain.ttft_ms
        );
        Ok(())
    }
    .await;
    secure.shutdown().await;
    clear.shutdown().await;
    result
}
