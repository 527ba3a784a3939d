//! `tessera bench-cluster --cp P`: what a context-parallel ring gives a long prompt — time to
//! first token through one worker with all the threads and through a ring of P workers
//! sharing them (`--cp P`), side by side in one run, with the bytes each ring rank wrote to
//! its peers per request (the K/V blocks passed round the ring and the partial results
//! gathered), as the workers count them.
//!
//! A benchmark, not a test: it prints figures and asserts nothing about speed.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tessera_proto::v1 as pb;

use super::bench_cluster::{BenchClusterArgs, request, start_cluster};
use super::bench_tp::settled_status;
use super::client::{connect, stream_generate, wait_ready};

/// One configuration's best time to first token and its ranks' bytes sent per request.
struct Measured {
    ttft_ms: f64,
    bytes_per_request: Vec<u64>,
}

/// Runs the comparison for a ring of `p`.
pub(super) fn run(args: &BenchClusterArgs, p: u32) -> Result<()> {
    let rt = super::runtime()?;
    let total = args.total_threads.max(p);
    // Room for the prompt: the test kit's 2048-token default is too small for long prompts.
    let kv = vec!["--kv-tokens".to_owned(), "16384".to_owned()];
    // Every run prefills the whole prompt on both sides: a ring caches no prefixes, and one
    // worker that did would answer every run after the warm-up from its cache.
    let no_cache = ["--prefix-cache".to_owned(), "off".to_owned()];
    let one = rt.block_on(measure(
        args,
        1,
        total,
        [kv.clone(), no_cache.to_vec()].concat(),
    ))?;
    let ring_args = [kv, vec!["--cp".to_owned(), p.to_string()]].concat();
    let ring = rt.block_on(measure(args, p, total / p, ring_args))?;
    println!(
        "model {} | prompt {} repeats, {} total threads, best of {}",
        args.model, args.prompt_repeats, total, args.runs
    );
    println!(
        "{:<28} {:>12} {:>14}",
        "configuration", "TTFT ms", "vs 1 worker"
    );
    println!(
        "{:<28} {:>12.1} {:>13.2}x",
        format!("1 worker x {total} thr"),
        one.ttft_ms,
        1.0
    );
    println!(
        "{:<28} {:>12.1} {:>13.2}x",
        format!("ring of {p} x {} thr", total / p),
        ring.ttft_ms,
        one.ttft_ms / ring.ttft_ms
    );
    for (r, b) in ring.bytes_per_request.iter().enumerate() {
        println!(
            "ring rank {r}: {:.1} MB sent to its peers per request",
            *b as f64 / 1e6
        );
    }
    Ok(())
}

/// Every plan worker's cumulative peer bytes, in (stage, cp_rank, tp_rank) order.
fn peer_bytes(s: &pb::ClusterStatusResponse) -> Vec<u64> {
    let mut ranks: Vec<_> = s
        .workers
        .iter()
        .filter_map(|w| {
            let sh = w.shard?;
            Some(((sh.stage, sh.cp_rank, sh.tp_rank), w.peer_bytes_sent))
        })
        .collect();
    ranks.sort_by_key(|r| r.0);
    ranks.into_iter().map(|r| r.1).collect()
}

async fn measure(
    args: &BenchClusterArgs,
    workers: u32,
    threads: u32,
    coordinator_args: Vec<String>,
) -> Result<Measured> {
    let cluster = start_cluster(args, workers, threads, coordinator_args).await?;
    let result = async {
        let mut client = connect(&cluster.endpoint, Duration::from_secs(10)).await?;
        wait_ready(&mut client, Duration::from_secs(120)).await?;
        let mut best = f64::INFINITY;
        let mut before = Vec::new();
        for run in 0..=args.runs {
            if run == 1 {
                before = peer_bytes(&settled_status(&mut client).await?);
            }
            let start = Instant::now();
            let mut first = None;
            stream_generate(
                &mut client,
                request(args),
                &mut std::io::sink(),
                &mut |_| {
                    first.get_or_insert_with(Instant::now);
                },
            )
            .await?;
            let first = first.context("no tokens")?;
            if run > 0 {
                best = best.min((first - start).as_secs_f64() * 1e3);
            }
        }
        let after = peer_bytes(&settled_status(&mut client).await?);
        let runs = args.runs.max(1) as u64;
        let bytes_per_request = after
            .iter()
            .zip(before.iter().chain(std::iter::repeat(&0)))
            .map(|(a, b)| a.saturating_sub(*b) / runs)
            .collect();
        Ok(Measured {
            ttft_ms: best,
            bytes_per_request,
        })
    }
    .await;
    cluster.shutdown().await;
    result
}
