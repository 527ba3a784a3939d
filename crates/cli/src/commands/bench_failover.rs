//! `tessera bench-failover`: how long the cluster is without a leader, and how long a worker's
//! death holds up the requests it served. Starts three replicated coordinators and workers on
//! loopback, then repeatedly `kill -9`s the Raft leader and times the gap from the kill to the
//! first successful generate through a survivor; the killed coordinator restarts from its data
//! directory before the next round. With `--worker-kills N` (and two workers or more), it then
//! `kill -9`s a worker N times in the middle of a streaming request and times how long that
//! stream waited for its next token (it migrates to the surviving workers, with no error; a
//! stream that fails is reported); the worker restarts and is planned in again before the next
//! round. Prints p50, p99 and max of each.
//!
//! A benchmark, not a test: it prints figures and asserts nothing about speed.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use tessera_hub::DEFAULT_MODEL;
use tessera_proto::v1 as pb;
use tokio::process::Child;

use super::client::connect;
use super::up::{free_port, listening_address, spawn};

/// Arguments of `tessera bench-failover`.
#[derive(Args, Debug)]
pub struct BenchFailoverArgs {
    /// A model name from the cache or a path.
    #[arg(long, default_value = DEFAULT_MODEL)]
    pub model: String,
    /// Leader kills to measure.
    #[arg(long, default_value_t = 20)]
    pub kills: usize,
    /// Worker processes.
    #[arg(long, default_value_t = 1)]
    pub workers: u32,
    /// Worker kills to measure (needs --workers 2 or more).
    #[arg(long, default_value_t = 0)]
    pub worker_kills: usize,
    /// Seconds one failover may take before the run is abandoned.
    #[arg(long, default_value_t = 30)]
    pub timeout: u64,
}

/// Runs `tessera bench-failover`.
///
/// # Errors
/// When a process cannot start, the cluster never becomes ready, or a failover exceeds the
/// timeout.
pub fn run(args: BenchFailoverArgs) -> Result<()> {
    super::model::resolve_or_pull(&args.model)?;
    super::runtime()?.block_on(bench(args))
}

struct Coordinators {
    /// Public addresses, what clients dial.
    addrs: Vec<String>,
    /// Cluster addresses, what the Raft status names members by.
    cluster_addrs: Vec<String>,
    args: Vec<Vec<String>>,
    children: Vec<Option<Child>>,
}

impl Coordinators {
    async fn start(&mut self, i: usize) -> Result<()> {
        let mut c = spawn(&self.args[i])?;
        listening_address(&mut c, &format!("coordinator {}", i + 1)).await?;
        self.children[i] = Some(c);
        Ok(())
    }

    async fn status(&self, i: usize) -> Option<pb::ClusterStatusResponse> {
        let mut c = connect(&self.addrs[i], Duration::from_millis(300))
            .await
            .ok()?;
        let r = tokio::time::timeout(
            Duration::from_secs(1),
            c.cluster_status(pb::ClusterStatusRequest::default()),
        )
        .await
        .ok()?
        .ok()?;
        Some(r.into_inner())
    }

    /// The leader's index, as a live coordinator reports it, once the plan serves.
    async fn leader(&self, deadline: Instant) -> Result<usize> {
        loop {
            for i in 0..self.addrs.len() {
                if self.children[i].is_none() {
                    continue;
                }
                if let Some(s) = self.status(i).await
                    && s.ready
                    && let Some((_, addr)) = s.leader.split_once('=')
                    && let Some(l) = self.cluster_addrs.iter().position(|a| a == addr)
                {
                    return Ok(l);
                }
            }
            if Instant::now() > deadline {
                bail!("no leader with a serving plan in time");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A streaming request long enough to be mid-stream when its worker is killed.
fn long_request() -> pb::GenerateRequest {
    pb::GenerateRequest {
        prompt: Some(pb::generate_request::Prompt::Text(
            "Once upon a time".into(),
        )),
        stop: Some(pb::StopConditions {
            max_tokens: Some(96),
            ignore_eos: true,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Streams [`long_request`] from `addr`, calls `kill` after its 4th token, and returns how
/// long the stream then waited for its next token, once it finished with no error.
async fn delay_across(addr: &str, kill: impl FnOnce() -> Result<()>) -> Result<Duration> {
    let mut c = connect(addr, Duration::from_secs(3)).await?;
    let mut s = c.generate(long_request()).await?.into_inner();
    let mut tokens = 0;
    let mut kill = Some(kill);
    let mut killed_at = None;
    let mut delay = None;
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(120), s.message())
            .await
            .context("the stream stalled for 120 s")??
            .context("the stream ended unfinished")?;
        match ev.event {
            Some(pb::generate_event::Event::Token(_)) => {
                tokens += 1;
                if let Some(at) = killed_at.take() {
                    delay = Some(Instant::now().duration_since(at));
                }
                if tokens == 4
                    && let Some(kill) = kill.take()
                {
                    kill()?;
                    killed_at = Some(Instant::now());
                }
            }
            Some(pb::generate_event::Event::Finished(_)) => break,
            _ => {}
        }
    }
    delay.context("no token came after the kill")
}

async fn generate_one(addr: &str) -> bool {
    let Ok(mut c) = connect(addr, Duration::from_millis(300)).await else {
        return false;
    };
    let req = pb::GenerateRequest {
        prompt: Some(pb::generate_request::Prompt::Text("Hello".into())),
        stop: Some(pb::StopConditions {
            max_tokens: Some(1),
            ..Default::default()
        }),
        ..Default::default()
    };
    let run = async {
        let mut s = c.generate(req).await.ok()?.into_inner();
        while let Some(ev) = s.message().await.ok()? {
            if let Some(pb::generate_event::Event::Finished(_)) = ev.event {
                return Some(());
            }
        }
        None
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(5), run).await,
        Ok(Some(()))
    )
}

/// `what: p50 …  p99 …  max …` of `v` (sorted in place).
fn summary(what: &str, v: &mut [Duration]) -> String {
    v.sort();
    format!(
        "{what}: p50 {:.2?}  p99 {:.2?}  max {:.2?}",
        percentile(v, 0.5),
        percentile(v, 0.99),
        v.last().copied().unwrap_or_default()
    )
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

async fn bench(args: BenchFailoverArgs) -> Result<()> {
    let data = std::env::temp_dir().join(format!("tessera-bench-failover-{}", std::process::id()));
    let addrs: Vec<String> = (0..3)
        .map(|_| free_port().map(|p| format!("127.0.0.1:{p}")))
        .collect::<Result<_>>()?;
    let cluster_addrs: Vec<String> = (0..3)
        .map(|_| free_port().map(|p| format!("127.0.0.1:{p}")))
        .collect::<Result<_>>()?;
    // The cluster protocol runs on mutual TLS, as in production: certificates for the three
    // coordinators and the workers, issued into the run's directory.
    let certs = data.join("certs");
    let mut members: Vec<tessera_tls::Identity> =
        (1..=3).map(tessera_tls::Identity::coordinator).collect();
    for i in 0..args.workers {
        members.push(tessera_tls::Identity::new(
            tessera_tls::Role::Worker,
            &format!("bench-{i}"),
        )?);
    }
    super::certs::issue(&certs, &members)?;
    let certs = certs.to_string_lossy().into_owned();
    let peers = cluster_addrs
        .iter()
        .enumerate()
        .map(|(i, a)| format!("{}={a}", i + 1))
        .collect::<Vec<_>>()
        .join(",");
    let coord_args = addrs
        .iter()
        .enumerate()
        .map(|(i, a)| {
            [
                "coordinator",
                "--listen",
                a,
                "--cluster-listen",
                &cluster_addrs[i],
                "--id",
                &(i + 1).to_string(),
                "--peers",
                &peers,
                "--data-dir",
                &data.join(format!("c{}", i + 1)).to_string_lossy(),
                "--model",
                &args.model,
                "--min-workers",
                &args.workers.to_string(),
                "--heartbeat-ms",
                "250",
                "--certs",
                &certs,
                "--exit-on-stdin-eof",
            ]
            .iter()
            .map(|s| (*s).to_owned())
            .collect()
        })
        .collect();
    let mut cs = Coordinators {
        addrs: addrs.clone(),
        cluster_addrs: cluster_addrs.clone(),
        args: coord_args,
        children: vec![None, None, None],
    };
    for i in 0..3 {
        cs.start(i).await?;
    }
    let list = cluster_addrs
        .iter()
        .map(|a| format!("http://{a}"))
        .collect::<Vec<_>>()
        .join(",");
    let worker_args = |i: u32| -> Vec<String> {
        vec![
            "worker".into(),
            "--coordinator".into(),
            list.clone(),
            "--threads".into(),
            "1".into(),
            "--memory".into(),
            "1GiB".into(),
            "--name".into(),
            format!("bench-{i}"),
            "--certs".into(),
            certs.clone(),
            "--exit-on-stdin-eof".into(),
        ]
    };
    let mut workers = Vec::new();
    for i in 0..args.workers {
        let mut w = spawn(&worker_args(i))?;
        listening_address(&mut w, &format!("worker {i}")).await?;
        workers.push(w);
    }
    if args.worker_kills > 0 && args.workers < 2 {
        bail!("--worker-kills needs --workers 2 or more: the survivors serve the request");
    }
    let timeout = Duration::from_secs(args.timeout);
    let result = async {
        let mut gaps = Vec::new();
        let mut epochs = Vec::new();
        for round in 0..args.kills {
            let leader = cs.leader(Instant::now() + Duration::from_secs(120)).await?;
            if let Some(s) = cs.status(leader).await {
                epochs.push(s.plan_epoch);
            }
            let mut child = cs.children[leader].take().context("leader not running")?;
            let killed = Instant::now();
            child.start_kill().context("kill -9 the leader")?;
            let survivors: Vec<usize> = (0..3).filter(|&i| i != leader).collect();
            let mut k = 0;
            let gap = loop {
                if generate_one(&addrs[survivors[k % 2]]).await {
                    break killed.elapsed();
                }
                k += 1;
                if killed.elapsed() > timeout {
                    bail!("round {round}: no generate succeeded within {timeout:?}");
                }
            };
            let _ = child.wait().await;
            eprintln!(
                "kill {:>2}: leader {} -> served after {gap:.2?}",
                round + 1,
                leader + 1
            );
            gaps.push(gap);
            cs.start(leader).await?;
            // Let the restarted node rejoin before the next kill, so a quorum of 3 is back.
            let deadline = Instant::now() + Duration::from_secs(30);
            while cs.status(leader).await.is_none_or(|s| s.leader.is_empty()) {
                if Instant::now() > deadline {
                    bail!("coordinator {} did not rejoin", leader + 1);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        if !gaps.is_empty() {
            let what = format!("failover over {} leader kills", gaps.len());
            println!(
                "{}  (plan epochs seen: {epochs:?})",
                summary(&what, &mut gaps)
            );
        }
        let mut delays = Vec::new();
        for round in 0..args.worker_kills {
            let all_planned = |s: &pb::ClusterStatusResponse| {
                s.ready
                    && s.workers.len() == workers.len()
                    && s.workers.iter().all(|w| w.shard.is_some())
            };
            let deadline = Instant::now() + timeout;
            let leader = loop {
                let leader = cs.leader(deadline).await?;
                if cs.status(leader).await.is_some_and(|s| all_planned(&s)) {
                    break leader;
                }
                if Instant::now() > deadline {
                    bail!("round {round}: the workers were not all planned in within {timeout:?}");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            };
            let victim = round % workers.len();
            let w = &mut workers[victim];
            let delay = delay_across(&addrs[leader], || {
                w.start_kill().context("kill -9 the worker")
            })
            .await
            .with_context(|| format!("round {round}: the stream across the worker's kill"))?;
            let _ = workers[victim].wait().await;
            eprintln!(
                "worker kill {:>2}: bench-{victim} -> the stream waited {delay:.2?}",
                round + 1
            );
            delays.push(delay);
            let mut w = spawn(&worker_args(victim as u32))?;
            listening_address(&mut w, &format!("worker {victim}")).await?;
            workers[victim] = w;
        }
        if !delays.is_empty() {
            let what = format!(
                "a killed worker's stream delayed over {} kills",
                delays.len()
            );
            println!("{}  (no stream failed)", summary(&what, &mut delays));
        }
        Ok(())
    }
    .await;
    for c in cs.children.iter_mut().flatten().chain(workers.iter_mut()) {
        let _ = c.start_kill();
        let _ = c.wait().await;
    }
    let _ = std::fs::remove_dir_all(&data);
    result
}
