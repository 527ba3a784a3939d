//! What the control tasks tell each other without going through the replicated state: the
//! scheduler's load (read by the plan controller, which re-plans only when idle, and by
//! status), and requests to reconsider the plan (from registration, the liveness monitor,
//! leadership changes and a failed pipeline).
//!
//! Both are local to one coordinator and lose nothing on a restart that matters: a new
//! leader's scheduler starts empty, and its plan controller looks at the plan on start.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use tokio::sync::Notify;

/// The scheduler's counts, as last published.
#[derive(Debug, Default)]
pub struct Load {
    running: AtomicUsize,
    queued: AtomicUsize,
}

impl Load {
    /// Publishes the counts: requests generating, and waiting.
    pub fn set(&self, running: usize, queued: usize) {
        self.running.store(running, Ordering::SeqCst);
        self.queued.store(queued, Ordering::SeqCst);
    }

    /// Requests generating now.
    pub fn running(&self) -> usize {
        self.running.load(Ordering::SeqCst)
    }

    /// Requests waiting for admission now.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::SeqCst)
    }

    /// Whether any request is generating or waiting.
    pub fn busy(&self) -> bool {
        self.running() + self.queued() > 0
    }
}

/// Wakes the plan controller, and remembers which plan epoch failed.
#[derive(Debug, Default)]
pub struct Replan {
    wake: Notify,
    failed_epoch: AtomicU64,
}

impl Replan {
    /// Asks the plan controller to reconsider the plan (coalesced: many asks before it looks
    /// wake it once).
    pub fn request(&self) {
        self.wake.notify_one();
    }

    /// Resolves at the next [`Replan::request`] (or at once if one is pending).
    pub async fn requested(&self) {
        self.wake.notified().await;
    }

    /// The plan at `epoch` failed (its pipeline broke): remembered, and the controller is
    /// woken to replace it.
    pub fn report_failure(&self, epoch: u64) {
        self.failed_epoch.fetch_max(epoch, Ordering::SeqCst);
        self.request();
    }

    /// The highest plan epoch reported failed (0: none).
    pub fn failed_epoch(&self) -> u64 {
        self.failed_epoch.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ensures that a failure report keeps the highest epoch and wakes a waiting controller.
    #[tokio::test]
    async fn failure_keeps_the_highest_epoch_and_wakes() {
        let r = Replan::default();
        r.report_failure(5);
        r.report_failure(3);
        assert_eq!(r.failed_epoch(), 5);
        tokio::time::timeout(std::time::Duration::from_secs(1), r.requested())
            .await
            .expect("the failure report woke the controller");
    }

    /// Ensures that the load is busy while anything runs or waits.
    #[test]
    fn busy_while_running_or_queued() {
        let l = Load::default();
        assert!(!l.busy());
        l.set(0, 1);
        assert!(l.busy());
        l.set(2, 0);
        assert_eq!((l.running(), l.queued()), (2, 0));
        l.set(0, 0);
        assert!(!l.busy());
    }
}
