//! `tessera bench-cluster --tp K`: what tensor parallelism costs and buys. One greedy
//! stream's decode tokens/s through one worker with all the threads and through a group of K
//! workers sharing them, side by side in one run, with the time per step the group's ranks
//! spend in reductions (what they report in `ClusterStatus`: sending, waiting for the other
//! ranks, adding) and what the planner's cost model predicted for each configuration.
//!
//! A benchmark, not a test: it prints figures and asserts nothing about speed.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tessera_coordinator::footprint::ModelFootprint;
use tessera_coordinator::planner::{
    self, CostInputs, CpPolicy, PlanPolicy, TpPolicy, WorkerCapacity,
};
use tessera_hub::ModelLocation;
use tessera_proto::v1 as pb;

use super::bench_cluster::{BenchClusterArgs, request, start_cluster};
use super::client::{Client, connect, stream_generate, wait_ready};

/// One configuration's figures.
struct Measured {
    /// Best decode tokens/s over the runs.
    decode_tok_s: f64,
    /// Per rank: microseconds in reductions per step over the measured runs.
    reduce_ms_per_step: Vec<f64>,
    /// The ranks' median link RTT, µs (0: none).
    rtt_us: u32,
}

/// Runs the comparison for `args.tp` ranks.
pub(super) fn run(args: &BenchClusterArgs, location: &ModelLocation) -> Result<()> {
    let k = args.tp;
    let total = args.total_threads.max(1);
    let per = (total / k).max(1);
    let rt = super::runtime()?;
    let one = rt.block_on(measure(args, 1, total, Vec::new()))?;
    let tp_args = vec!["--tp".to_owned(), k.to_string()];
    let group = rt.block_on(measure(args, k, per, tp_args))?;

    let (store, cfg) = tessera_format::open_weights(location)?;
    let model = ModelFootprint::from_store(store.as_ref(), &cfg)?;
    let c = CostInputs::default();
    let predict = |workers: u32, threads: u32, tp: u32, rtt: u32| -> Result<f64> {
        let ws: Vec<WorkerCapacity> = (0..workers)
            .map(|i| WorkerCapacity {
                id: format!("w{i}"),
                memory_bytes: 4 << 30,
                threads,
                link_rtt_us: rtt,
                device_bytes_s: 0,
            })
            .collect();
        let policy = PlanPolicy {
            kv_tokens: 0,
            tp: TpPolicy::Fixed(tp),
            cp: CpPolicy::Fixed(1),
            block_size: 0,
        };
        let plan = planner::plan_with(&model, &ws, &policy, &c)?;
        Ok(planner::predict(&plan, &model, &ws, &c)
            .context("prediction")?
            .single_stream_tok_s)
    };
    let p_one = predict(1, total, 1, 0)?;
    let p_group = predict(k, per, k, group.rtt_us)?;

    println!(
        "model {} | prompt {} repeats, decode {} tokens, {total} total threads, best of {}",
        args.model, args.prompt_repeats, args.decode, args.runs
    );
    println!(
        "{:<24} {:>13} {:>11} {:>24} {:>15} {:>10}",
        "configuration",
        "decode tok/s",
        "ms / token",
        "reduce ms/step by rank",
        "predicted tok/s",
        "measured"
    );
    for (name, m, p) in [
        (format!("1 worker x {total} thr"), &one, p_one),
        (format!("TP={k} x {per} thr"), &group, p_group),
    ] {
        let reduce = if m.reduce_ms_per_step.is_empty() {
            "-".to_owned()
        } else {
            m.reduce_ms_per_step
                .iter()
                .map(|r| format!("{r:.2}"))
                .collect::<Vec<_>>()
                .join(" / ")
        };
        println!(
            "{name:<24} {:>13.1} {:>11.2} {reduce:>24} {p:>15.1} {:>9.2}x",
            m.decode_tok_s,
            1e3 / m.decode_tok_s,
            m.decode_tok_s / p
        );
    }
    println!(
        "TP={k} / one worker: {:.2}x (link RTT {} us)",
        group.decode_tok_s / one.decode_tok_s,
        group.rtt_us
    );
    Ok(())
}

/// The tensor-parallel figures of every worker in the plan, in rank order: (steps, µs).
fn tp_totals(s: &pb::ClusterStatusResponse) -> Vec<(u64, u64, u32)> {
    let mut ranks: Vec<_> = s
        .workers
        .iter()
        .filter_map(|w| {
            let sh = w.shard?;
            (sh.tp_ranks > 1).then_some((
                sh.tp_rank,
                (w.tp_steps, w.tp_reduce_us, w.link_rtt_us.unwrap_or(0)),
            ))
        })
        .collect();
    ranks.sort_by_key(|r| r.0);
    ranks.into_iter().map(|r| r.1).collect()
}

/// The cluster status once every worker has reported the steps it has computed (heartbeats
/// carry the counters, so they lag by up to one interval).
pub(super) async fn settled_status(client: &mut Client) -> Result<pb::ClusterStatusResponse> {
    tokio::time::sleep(Duration::from_millis(1200)).await;
    Ok(client
        .cluster_status(pb::ClusterStatusRequest::default())
        .await?
        .into_inner())
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
        // Warm-up, then the counters' starting point.
        stream_generate(
            &mut client,
            request(args),
            &mut std::io::sink(),
            &mut |_| {},
        )
        .await?;
        let before = tp_totals(&settled_status(&mut client).await?);
        let mut best = 0.0f64;
        for _ in 0..args.runs.max(1) {
            let mut first = None;
            let done = stream_generate(
                &mut client,
                request(args),
                &mut std::io::sink(),
                &mut |_| {
                    first.get_or_insert_with(Instant::now);
                },
            )
            .await?;
            let end = Instant::now();
            let first = first.context("no tokens")?;
            best = best.max((done.tokens.len() - 1) as f64 / (end - first).as_secs_f64());
        }
        let after = tp_totals(&settled_status(&mut client).await?);
        let reduce_ms_per_step = after
            .iter()
            .zip(&before)
            .map(|(a, b)| {
                let steps = a.0.saturating_sub(b.0).max(1);
                a.1.saturating_sub(b.1) as f64 / 1e3 / steps as f64
            })
            .collect();
        let mut rtts: Vec<u32> = after.iter().map(|r| r.2).filter(|&r| r > 0).collect();
        rtts.sort_unstable();
        Ok(Measured {
            decode_tok_s: best,
            reduce_ms_per_step,
            rtt_us: rtts.get(rtts.len() / 2).copied().unwrap_or(0),
        })
    }
    .await;
    cluster.shutdown().await;
    result
}
