//! Dialling a new plan's workers before it is committed, and holding back the ones the leader
//! cannot reach.
//!
//! A worker is registered and kept alive by what *it* sends (registration, heartbeats); a plan
//! needs the opposite direction too (the leader loads its shard and streams steps to it). So
//! before a plan is committed each of its workers is dialled once ([`PROBE_TIMEOUT`]:
//! connection and TLS handshake, concurrently). One that fails is handled by where it comes
//! from:
//! - **it served the previous plan**: it has most likely died since its last heartbeat (still
//!   registered until the heartbeat timeout). Planning it in would cost a whole round of loads
//!   — a tensor-parallel survivor waits out its group's formation (30 s) for it — so it is
//!   dropped; if alive, it registers again.
//! - **it is new to the plan**: it just spoke to this coordinator, so it is alive, but the
//!   leader cannot reach it: a partition one way only, an advertised address that is wrong or
//!   that no longer resolves (a container back on its network without its name). Dropping it
//!   would make it register again at its next heartbeat, be planned, fail and be dropped,
//!   re-planning — and migrating every running request — once per heartbeat. It is **held
//!   back** instead ([`Holds`]): it stays registered, plans leave it out, and it is dialled
//!   again after a backoff (1 s, doubling to 30 s) until it answers.
//!
//! Holds are the leader's own bookkeeping, like liveness: a new leader starts without any and
//! finds the unreachable workers again by dialling them.

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::task::JoinSet;

use crate::state::ClusterState;
use crate::state::cluster::Cluster;
use crate::state::planner::Plan;

/// How long the connection to each worker of a new plan may take before it is committed.
pub(crate) const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// The first wait before a held-back worker is dialled again.
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// The longest wait between two dials of a held-back worker.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// A worker dialled in vain for the plan below: its id, why, and whether it served the
/// previous plan.
pub(crate) struct Unreachable {
    pub id: String,
    pub error: tonic::Status,
    pub in_previous_plan: bool,
}

/// Dials every worker of `plan` concurrently, at its address in `st` (the state the plan was
/// made from); returns those that could not be reached.
pub(crate) async fn dial(cluster: &Cluster, st: &ClusterState, plan: &Plan) -> Vec<Unreachable> {
    let mut set = JoinSet::new();
    for stage in &plan.stages {
        let Some(addr) = st.worker(&stage.worker_id).map(|w| w.address.clone()) else {
            continue;
        };
        let in_previous_plan = st
            .plan()
            .is_some_and(|p| p.stage_of(&stage.worker_id).is_some());
        let (id, tls) = (stage.worker_id.clone(), cluster.cfg.cluster_tls.clone());
        set.spawn(async move {
            let r = super::connect(&tls, &addr, PROBE_TIMEOUT).await;
            r.err().map(|error| Unreachable {
                id,
                error,
                in_previous_plan,
            })
        });
    }
    let mut failed = Vec::new();
    while let Some(joined) = set.join_next().await {
        if let Ok(Some(u)) = joined {
            failed.push(u);
        }
    }
    failed
}

/// One held-back worker: when it may be dialled again, and the wait after that.
#[derive(Clone, Copy, Debug)]
struct Hold {
    until: Instant,
    next: Duration,
}

/// The workers held back from plans, by id (see the module docs).
#[derive(Debug, Default)]
pub(crate) struct Holds(Mutex<HashMap<String, Hold>>);

impl Holds {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Hold>> {
        // Every update is one insert or removal: a poisoned map is still consistent.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The workers still held back at `now`, forgetting those no longer registered.
    pub(crate) fn active(&self, now: Instant, registered: &HashSet<String>) -> HashSet<String> {
        let mut map = self.map();
        map.retain(|id, _| registered.contains(id));
        map.iter()
            .filter(|(_, h)| h.until > now)
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Holds `id` back from `now`: for the first backoff, or twice as long as last time (up to
    /// the maximum). Returns how long.
    pub(crate) fn hold(&self, id: &str, now: Instant) -> Duration {
        let mut map = self.map();
        let wait = map.get(id).map_or(FIRST_BACKOFF, |h| h.next);
        map.insert(
            id.to_owned(),
            Hold {
                until: now + wait,
                next: (wait * 2).min(MAX_BACKOFF),
            },
        );
        wait
    }

    /// Forgets `ids`: they answered.
    pub(crate) fn release<'a>(&self, ids: impl IntoIterator<Item = &'a str>) {
        let mut map = self.map();
        for id in ids {
            map.remove(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(ids: &[&str]) -> HashSet<String> {
        ids.iter().map(|s| (*s).to_owned()).collect()
    }

    /// Ensures that a held-back worker waits 1 s, then twice as long at each failed dial up to
    /// 30 s, is free again once its wait is over or it answered, and is forgotten once it is
    /// no longer registered.
    #[test]
    fn holds_back_off_and_end() {
        let holds = Holds::default();
        let t0 = Instant::now();
        let waits: Vec<u64> = (0..7).map(|_| holds.hold("w1", t0).as_secs()).collect();
        assert_eq!(waits, vec![1, 2, 4, 8, 16, 30, 30]);
        let registered = set(&["w1", "w2"]);
        assert_eq!(holds.active(t0, &registered), set(&["w1"]));
        assert!(holds.active(t0 + MAX_BACKOFF, &registered).is_empty());
        holds.release(["w1"]);
        assert_eq!(
            holds.hold("w1", t0).as_secs(),
            1,
            "an answer resets the backoff"
        );
        assert!(holds.active(t0, &set(&["w2"])).is_empty(), "w1 left");
        assert_eq!(holds.hold("w1", t0).as_secs(), 1, "and was forgotten");
    }
}
