//! What the leader has heard from each worker: the liveness table. It is local to the node
//! (never replicated): a new leader starts it afresh and gives every worker a full heartbeat
//! timeout to find it.
//!
//! The table only records; deciding that a worker is dead (and committing its removal) is
//! the liveness monitor's job (`control/liveness.rs`), and checking that a worker is known is
//! the replicated state's ([`super::cluster::Cluster::heartbeat`] combines the two).

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Instant;

/// What the coordinator last heard from a worker.
#[derive(Clone, Copy, Debug)]
pub struct Seen {
    /// When its last heartbeat (or registration) arrived.
    pub at: Instant,
    /// Its resident set size.
    pub resident_bytes: u64,
    /// Bytes of weights it holds.
    pub weight_bytes: u64,
    /// The plan epoch of its loaded shard.
    pub plan_epoch: u64,
    /// Bytes of KV cache its shard holds.
    pub kv_bytes: u64,
    /// Median round-trip time to its tensor-parallel group's peers (0 = none measured).
    pub link_rtt_us: u32,
    /// Tensor-parallel steps it computed.
    pub tp_steps: u64,
    /// Microseconds those steps spent in reductions.
    pub tp_reduce_us: u64,
    /// Bytes it wrote to its group's peers.
    pub peer_bytes_sent: u64,
    /// Bytes of its KV cache in use.
    pub kv_used_bytes: u64,
    /// How long its executor had been on its current step when it reported (0: between
    /// steps); see the scheduler's step timeout.
    pub step_busy_ms: u64,
}

impl Seen {
    /// Heard from at `at`, with nothing reported yet.
    pub fn at(at: Instant) -> Self {
        Self {
            at,
            resident_bytes: 0,
            weight_bytes: 0,
            plan_epoch: 0,
            kv_bytes: 0,
            link_rtt_us: 0,
            tp_steps: 0,
            tp_reduce_us: 0,
            peer_bytes_sent: 0,
            kv_used_bytes: 0,
            step_busy_ms: 0,
        }
    }
}

/// The liveness table, keyed by worker id.
#[derive(Debug, Default)]
pub struct Liveness {
    seen: Mutex<HashMap<String, Seen>>,
}

impl Liveness {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Seen>> {
        // Every update is a single insert, remove or field store: a panic while holding the
        // lock cannot leave an entry half-written in a way a later reader would misread.
        self.seen.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records what `worker` just reported (replacing what was there).
    pub fn record(&self, worker: &str, seen: Seen) {
        self.lock().insert(worker.to_owned(), seen);
    }

    /// What was last heard from every worker.
    pub fn snapshot(&self) -> HashMap<String, Seen> {
        self.lock().clone()
    }

    /// Starts the clock at `now` for each of `workers` not heard from yet.
    pub fn adopt(&self, workers: impl IntoIterator<Item = String>, now: Instant) {
        let mut seen = self.lock();
        for id in workers {
            seen.entry(id).or_insert(Seen::at(now));
        }
    }

    /// Records what a worker reported when it loaded its shard for the plan at `epoch`;
    /// nothing when the worker has no entry (it was dropped meanwhile).
    pub fn record_load(&self, worker: &str, weight_bytes: u64, resident_bytes: u64, epoch: u64) {
        if let Some(s) = self.lock().get_mut(worker) {
            s.weight_bytes = weight_bytes;
            s.resident_bytes = resident_bytes;
            s.plan_epoch = epoch;
        }
    }

    /// Forgets one worker.
    pub fn forget(&self, worker: &str) {
        self.lock().remove(worker);
    }

    /// Forgets every worker (this node no longer leads).
    pub fn forget_all(&self) {
        self.lock().clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ensures that adopting keeps what was heard and starts the clock only for new workers,
    /// and that a load report needs an entry.
    #[test]
    fn adopt_keeps_heard_workers_and_load_needs_an_entry() {
        let t = Liveness::default();
        let early = Instant::now();
        t.record(
            "w1",
            Seen {
                plan_epoch: 3,
                ..Seen::at(early)
            },
        );
        let later = early + std::time::Duration::from_secs(5);
        t.adopt(["w1".to_owned(), "w2".to_owned()], later);
        let s = t.snapshot();
        assert_eq!(s["w1"].at, early);
        assert_eq!(s["w1"].plan_epoch, 3);
        assert_eq!(s["w2"].at, later);
        t.record_load("w9", 1, 2, 3);
        assert!(!t.snapshot().contains_key("w9"));
        t.record_load("w2", 10, 20, 4);
        assert_eq!(t.snapshot()["w2"].weight_bytes, 10);
        t.forget("w1");
        assert_eq!(t.snapshot().len(), 1);
        t.forget_all();
        assert!(t.snapshot().is_empty());
    }
}
