//! A two-stage cluster in one process, for the tests that check that requests give back
//! their KV (`kv_release.rs`, `soak.rs`, `prefix_cache.rs`): a coordinator and two equal
//! workers, which the planner splits the layers between (two stages beat one on the slowest
//! stage's time), so releases and prefix ops must reach a stage behind the first; and waiting
//! for the workers to hold nothing but cached prefix blocks.

use std::time::{Duration, Instant};

use tessera_coordinator::CoordinatorConfig;
use tessera_proto::v1::inference_client::InferenceClient;
use tessera_worker::{RunningWorker, ShardStatus};
use tonic::transport::Channel;

use crate::common::{Coordinator, wait_ready};

/// A coordinator serving through two worker stages.
pub struct TwoStages {
    /// The coordinator.
    pub coord: Coordinator,
    /// Its two workers, `a` (stage 0) and `b`.
    pub workers: Vec<RunningWorker>,
    /// A client of its public API.
    pub client: InferenceClient<Channel>,
}

/// Starts a coordinator with `cfg` (waiting for two workers) and two one-thread workers
/// without a memory limit; returns once a two-stage plan serves.
///
/// # Panics
/// When something does not start or the plan is not ready in time.
pub async fn start(cfg: CoordinatorConfig) -> TwoStages {
    let coord = Coordinator::start(CoordinatorConfig {
        min_workers: 2,
        ..cfg
    })
    .await;
    let workers = vec![
        coord.start_worker(0, 1, "a").await,
        coord.start_worker(0, 1, "b").await,
    ];
    let mut client = coord.client().await;
    wait_ready(&mut client, 2).await;
    TwoStages {
        coord,
        workers,
        client,
    }
}

/// Whether a worker holds no sequence and every block in use is a cached prefix block.
pub fn idle(s: &ShardStatus) -> bool {
    s.live_sequences == 0 && s.free_kv_blocks + s.cached_kv_blocks == s.total_kv_blocks
}

/// Waits (at most `within`) until every worker is [`idle`]; their statuses then.
///
/// # Panics
/// When some worker still holds KV after `within`.
pub async fn settle(workers: &[RunningWorker], within: Duration) -> Vec<ShardStatus> {
    let deadline = Instant::now() + within;
    loop {
        let status: Vec<ShardStatus> = workers.iter().map(|w| w.shard().status()).collect();
        if status.iter().all(idle) {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "KV still held {within:?} after the last request: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
