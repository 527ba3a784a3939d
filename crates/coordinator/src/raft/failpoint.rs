//! Failpoints: named places inside the Ready loop and the storage transactions where a test can
//! make a node crash, as `kill -9` would, to show that Raft's promises survive a crash there.
//!
//! A node gets a [`Failpoints`] through [`RaftConfig::failpoints`](super::RaftConfig); without
//! one (the default, and always in production) every check is a test of `None`. A test arms one
//! point; the next time the node reaches it, the check returns [`RaftError::Crashed`], which
//! the code at that point propagates with `?` before doing anything else. The Ready loop treats
//! that error as a kill: it stops at once, drops an open redb transaction uncommitted, sends
//! nothing more and answers no waiting client (their handles see the node stopped, an
//! indeterminate outcome).
//!
//! The `fail` crate was not used: its failpoints are process-wide by name, while these tests
//! run several nodes in one process and must crash exactly one of them.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use super::{RaftError, Result};

/// A place where a node can be made to crash.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailPoint {
    /// In the append transaction: new entries (and the hard state) are written but the
    /// transaction is not committed, so none of it is durable.
    AppendBeforeCommit,
    /// After entries and hard state are durable, before the messages that promise them (votes,
    /// append responses) are sent.
    PersistedBeforeSend,
    /// After committed entries were applied to the state machine, before `advance` and before
    /// the new commit index is persisted; proposers have not been answered.
    AppliedBeforeAdvance,
    /// In the transaction that installs a leader's snapshot: the log is cleared and the
    /// snapshot written, not committed.
    SnapshotApplyBeforeCommit,
    /// After a leader's snapshot is durable, before the state machine is restored from it.
    SnapshotStoredBeforeRestore,
    /// In the compaction transaction: the new snapshot is written and the log truncated, not
    /// committed.
    CompactBeforeCommit,
}

impl FailPoint {
    /// Every failpoint, in the order a node meets them.
    pub const ALL: [FailPoint; 6] = [
        FailPoint::AppendBeforeCommit,
        FailPoint::PersistedBeforeSend,
        FailPoint::AppliedBeforeAdvance,
        FailPoint::SnapshotApplyBeforeCommit,
        FailPoint::SnapshotStoredBeforeRestore,
        FailPoint::CompactBeforeCommit,
    ];
}

impl std::fmt::Display for FailPoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

/// The failpoints of one node: at most one armed point, and the points that fired. Cloning
/// shares them, so the test keeps a clone to arm and observe the node's.
#[derive(Debug, Clone, Default)]
pub struct Failpoints {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Fast path: false while nothing is armed, so an unarmed check is one atomic load.
    armed: AtomicBool,
    /// The armed point and how many of its hits to let pass before it fires.
    point: Mutex<Option<FailPoint>>,
    skip: AtomicU32,
    fired: Mutex<Vec<FailPoint>>,
}

impl Failpoints {
    /// Failpoints with nothing armed.
    pub fn new() -> Self {
        Self::default()
    }

    /// Arms `point`: the node crashes at its `skip + 1`-th hit from now. Replaces any armed
    /// point.
    pub fn arm(&self, point: FailPoint, skip: u32) {
        *self.lock_point() = Some(point);
        self.inner.skip.store(skip, Ordering::SeqCst);
        self.inner.armed.store(true, Ordering::SeqCst);
    }

    /// Disarms whatever is armed.
    pub fn disarm(&self) {
        self.inner.armed.store(false, Ordering::SeqCst);
        *self.lock_point() = None;
    }

    /// The points that fired so far, in order.
    pub fn fired(&self) -> Vec<FailPoint> {
        self.inner
            .fired
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn lock_point(&self) -> std::sync::MutexGuard<'_, Option<FailPoint>> {
        self.inner
            .point
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Reports reaching `point`: fires (disarming itself) when it is the armed point and its
    /// skips are used up.
    fn reach(&self, point: FailPoint) -> Result<()> {
        if !self.inner.armed.load(Ordering::SeqCst) {
            return Ok(());
        }
        let mut armed = self.lock_point();
        if *armed != Some(point) {
            return Ok(());
        }
        if self.inner.skip.load(Ordering::SeqCst) > 0 {
            self.inner.skip.fetch_sub(1, Ordering::SeqCst);
            return Ok(());
        }
        *armed = None;
        self.inner.armed.store(false, Ordering::SeqCst);
        self.inner
            .fired
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(point);
        tracing::warn!(%point, "failpoint fired: the node crashes");
        Err(RaftError::Crashed(point))
    }
}

/// Checks `point` against optional failpoints: `Err(RaftError::Crashed)` when it fires.
///
/// # Errors
/// [`RaftError::Crashed`] when `point` is armed and due.
#[inline]
pub(crate) fn check(failpoints: Option<&Failpoints>, point: FailPoint) -> Result<()> {
    match failpoints {
        None => Ok(()),
        Some(f) => f.reach(point),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ensures that an armed point fires exactly once after its skips, only at that point,
    /// and is recorded; and that no failpoints never fire.
    #[test]
    fn fires_once_after_skips() {
        let f = Failpoints::new();
        assert!(
            check(Some(&f), FailPoint::AppendBeforeCommit).is_ok(),
            "unarmed"
        );
        f.arm(FailPoint::AppendBeforeCommit, 2);
        assert!(
            check(Some(&f), FailPoint::CompactBeforeCommit).is_ok(),
            "other"
        );
        assert!(
            check(Some(&f), FailPoint::AppendBeforeCommit).is_ok(),
            "skip 1"
        );
        assert!(
            check(Some(&f), FailPoint::AppendBeforeCommit).is_ok(),
            "skip 2"
        );
        let err = check(Some(&f), FailPoint::AppendBeforeCommit).expect_err("fires");
        assert!(
            matches!(err, RaftError::Crashed(FailPoint::AppendBeforeCommit)),
            "{err}"
        );
        assert!(
            check(Some(&f), FailPoint::AppendBeforeCommit).is_ok(),
            "once"
        );
        assert_eq!(f.fired(), vec![FailPoint::AppendBeforeCommit]);
        f.arm(FailPoint::PersistedBeforeSend, 0);
        f.disarm();
        assert!(
            check(Some(&f), FailPoint::PersistedBeforeSend).is_ok(),
            "disarmed"
        );
        assert!(check(None, FailPoint::PersistedBeforeSend).is_ok(), "none");
    }
}
