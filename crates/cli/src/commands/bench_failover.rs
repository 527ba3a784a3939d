//! `tessera bench-failover`: how long the cluster is without a leader. Starts three replicated
//! coordinators and workers on loopback, then repeatedly `kill -9`s the Raft leader and times
//! the gap from the kill to the first successful generate through a survivor; the killed
//! coordinator restarts from its data directory before the next round. Prints p50, p99 and max.
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
    let mut workers = Vec::new();
    for i in 0..args.workers {
        let mut w = spawn(&[
            "worker".into(),
            "--coordinator".into(),
            list.clone(),
            "--threads".into(),
            "1".into(),
            "--memory".into(),
            "1GiB".into(),
            "--name".into(),
            format!("bench-{i}"),
            "--exit-on-stdin-eof".into(),
        ])?;
        listening_address(&mut w, &format!("worker {i}")).await?;
        workers.push(w);
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
            eprintln!("kill {:>2}: leader {} -> served after {gap:.2?}", round + 1, leader + 1);
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
        gaps.sort();
        println!(
            "failover over {} leader kills: p50 {:.2?}  p99 {:.2?}  max {:.2?}  (plan epochs seen: {:?})",
            gaps.len(),
            percentile(&gaps, 0.5),
            percentile(&gaps, 0.99),
            gaps.last().copied().unwrap_or_default(),
            epochs
        );
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
