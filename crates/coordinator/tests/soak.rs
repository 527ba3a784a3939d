//! Soak: in one process, a coordinator and two real workers (two pipeline stages) serving the
//! real SmolLM2 model take many sequential requests, then 64 concurrent streams of which a
//! random share is cancelled at a random point, in rounds. No request fails, every worker's KV
//! returns to empty, and resident memory is flat: the same after the sequential requests as
//! after the first fifty, and the same after the last concurrent round as after the second
//! (the first two grow the buffers that batches of many sequences need).
//!
//! CI runs a bounded version (150 sequential requests, 3 concurrent rounds); the issue's
//! figure is `TESSERA_SOAK_SEQUENTIAL=2000 TESSERA_SOAK_ROUNDS=6`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

mod common;
mod two_stages;

use common::WAIT;
use tessera_coordinator::CoordinatorConfig;
use tessera_proto::v1 as pb;
use tessera_proto::v1::inference_client::InferenceClient;
use tessera_testkit::{PROMPTS, TestRng, greedy};
use tonic::transport::Channel;
use two_stages::{TwoStages, settle};

/// Concurrent streams of the second phase.
const CONCURRENT: usize = 64;
/// Requests before the resident-memory baseline is taken (caches, pools and buffers grown).
const WARM_UP: usize = 50;
/// Resident-memory growth tolerated over the sequential requests (one shape of batch: measured
/// 0 MiB from the 50th to the 2,000th): allocator slack, not a leak.
const RSS_SLACK: u64 = 16 << 20;
/// Resident-memory growth tolerated from the second concurrent round to the last. Batch
/// buffers grow to the largest batch seen, and how requests batch depends on timing: measured
/// +5, +5, +20 MiB over a third round (the last with another soak running beside it), 0–10 MiB
/// over rounds three to six. A leak of 1 MiB per request would add 64 MiB a round.
const ROUNDS_SLACK: u64 = 48 << 20;
const SETTLE: Duration = Duration::from_secs(10);

/// This process's resident set, in bytes (Linux).
fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .expect("VmRSS")
}

/// How a concurrent stream ends.
#[derive(Clone, Copy, Debug)]
enum Plan {
    /// Read to the Finished event.
    Finish,
    /// Drop the stream after this many tokens (0: right after sending).
    CancelAfter(usize),
}

/// Runs one request as planned; an error is a failure of the soak.
async fn run(
    client: &mut InferenceClient<Channel>,
    req: pb::GenerateRequest,
    plan: Plan,
) -> Result<(), tonic::Status> {
    let mut stream = client.generate(req).await?.into_inner();
    let mut tokens = 0;
    loop {
        if let Plan::CancelAfter(n) = plan
            && tokens >= n
        {
            return Ok(());
        }
        let ev = tokio::time::timeout(WAIT, stream.message())
            .await
            .map_err(|_| tonic::Status::deadline_exceeded("no event within WAIT"))??;
        match ev.and_then(|e| e.event) {
            Some(pb::generate_event::Event::Token(_)) => tokens += 1,
            Some(pb::generate_event::Event::Finished(_)) => return Ok(()),
            None => return Err(tonic::Status::internal("stream ended without Finished")),
        }
    }
}

/// Ensures that many sequential requests and then 64 concurrent streams with random cancels
/// all succeed, leave no KV on any worker, and leave resident memory flat.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn soak_leaves_no_kv_and_flat_memory() {
    let Some(path) = tessera_testkit::smollm2_gguf() else {
        return;
    };
    let sequential: usize = std::env::var("TESSERA_SOAK_SEQUENTIAL")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(150);
    let TwoStages {
        coord,
        workers,
        mut client,
    } = two_stages::start(CoordinatorConfig {
        model: PathBuf::from(&path).display().to_string(),
        kv_tokens: 2048,
        ready_wait: WAIT,
        ..CoordinatorConfig::default()
    })
    .await;
    let started = Instant::now();

    let mut failures = Vec::new();
    let mut warm = 0;
    for i in 0..sequential.max(WARM_UP + 1) {
        if i == WARM_UP {
            warm = rss();
        }
        let req = greedy(PROMPTS[i % PROMPTS.len()], 1 + (i % 6) as u32);
        if let Err(e) = run(&mut client, req, Plan::Finish).await {
            failures.push((i, e));
        }
    }
    let sequential_done = started.elapsed();

    let after_sequential = rss();
    // Rounds of concurrent streams: the first two grow the buffers that batches of different
    // shapes need (measured: +93 MiB, then +44, then +5, +1, +2, +0 over six rounds); from
    // the second on, memory must stay flat.
    let mut rng = TestRng::new(12);
    let rounds: usize = std::env::var("TESSERA_SOAK_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
        .max(3);
    let mut after_round = vec![0u64; rounds];
    for (round, rss_after) in after_round.iter_mut().enumerate() {
        let mut tasks = Vec::new();
        for i in 0..CONCURRENT {
            let plan = match rng.next_u64() % 3 {
                0 => Plan::Finish,
                _ => Plan::CancelAfter((rng.next_u64() % 8) as usize),
            };
            let req = greedy(PROMPTS[i % PROMPTS.len()], 4 + (rng.next_u64() % 20) as u32);
            let mut c = client.clone();
            tasks.push(tokio::spawn(async move {
                (i, plan, run(&mut c, req, plan).await)
            }));
        }
        for t in tasks {
            let (i, plan, r) = t.await.expect("stream task");
            if let Err(e) = r {
                let what = format!("round {round}, stream {i}, {plan:?}: {e}");
                failures.push((sequential + i, tonic::Status::internal(what)));
            }
        }
        *rss_after = rss();
    }
    assert!(failures.is_empty(), "failed requests: {failures:?}");

    // No sequence is live; what stays in use is the prefix cache, within its capacity.
    let status = settle(&workers, SETTLE).await;
    assert!(
        status
            .iter()
            .all(|s| s.cached_kv_blocks <= s.total_kv_blocks),
        "{status:?}"
    );
    let mib = |b: u64| b >> 20;
    eprintln!(
        "soak: {sequential} sequential in {sequential_done:?}, then {rounds} x {CONCURRENT} \
         concurrent streams (random cancels), total {:?}; RSS MiB: after {WARM_UP} requests {}, \
         after the sequential ones {}, after each concurrent round {:?}",
        started.elapsed(),
        mib(warm),
        mib(after_sequential),
        after_round.iter().map(|b| mib(*b)).collect::<Vec<_>>(),
    );
    assert!(
        after_sequential <= warm + RSS_SLACK,
        "resident memory grew over the sequential requests: {} -> {} MiB",
        mib(warm),
        mib(after_sequential)
    );
    let last = after_round[rounds - 1];
    assert!(
        last <= after_round[1] + ROUNDS_SLACK,
        "resident memory grew over the concurrent rounds after the second: {} -> {} MiB",
        mib(after_round[1]),
        mib(last)
    );
    coord.stop(workers).await;
}
