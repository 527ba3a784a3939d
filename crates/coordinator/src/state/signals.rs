//! What the control tasks tell each other without going through the replicated state: the
//! scheduler's load (read by the plan controller, which re-plans only when idle, and by
//! status), requests to reconsider the plan (from registration, the liveness monitor,
//! leadership changes and a failed pipeline), and why planning last failed (read by the
//! scheduler, so a request that no plan served learns why).
//!
//! All are local to one coordinator and lose nothing on a restart that matters: a new
//! leader's scheduler starts empty, and its plan controller looks at the plan on start.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};

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

/// Wakes the plan controller, and remembers which plan epoch failed and why planning last
/// failed.
#[derive(Debug, Default)]
pub struct Replan {
    wake: Notify,
    failed_epoch: AtomicU64,
    /// The last planning attempt's error; `None` once an attempt succeeds.
    reason: Mutex<Option<String>>,
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

    /// Records the outcome of a planning attempt: its error, or `None` when it succeeded.
    /// True when that differs from the last outcome recorded, i.e. when it is worth a log
    /// line (the controller retries every heartbeat interval, and the same "does not fit"
    /// twice a second is noise).
    pub fn record_outcome(&self, reason: Option<String>) -> bool {
        let mut last = self.reason.lock().unwrap_or_else(PoisonError::into_inner);
        if *last == reason {
            return false;
        }
        *last = reason;
        true
    }

    /// Why the last planning attempt failed; `None` when it succeeded (or none failed yet).
    pub fn failure(&self) -> Option<String> {
        self.reason
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
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

    /// Ensures that a planning failure is reported as a change once, kept until an attempt
    /// succeeds, and reported again when its reason changes.
    #[test]
    fn planning_failure_changes_once() {
        let r = Replan::default();
        assert_eq!(r.failure(), None);
        assert!(!r.record_outcome(None), "no failure yet: nothing changed");
        assert!(r.record_outcome(Some("does not fit".into())));
        assert!(!r.record_outcome(Some("does not fit".into())));
        assert_eq!(r.failure().as_deref(), Some("does not fit"));
        assert!(r.record_outcome(Some("still does not fit".into())));
        assert!(r.record_outcome(None));
        assert_eq!(r.failure(), None);
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
