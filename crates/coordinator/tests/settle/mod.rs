//! Waiting for workers to hold nothing but cached prefix blocks, for the tests that check
//! that requests give back their KV (`kv_release.rs`, `soak.rs`, `prefix_cache.rs`).

use std::time::{Duration, Instant};

use tessera_worker::{RunningWorker, ShardStatus};

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
