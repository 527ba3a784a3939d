//! Leadership changes: the task that makes this coordinator act as the cluster's leader, and
//! stop acting as one, as Raft elects.
//!
//! On winning an election the node first commits a [`Command::Barrier`], so its state includes
//! everything its predecessors committed; then it adopts the registered workers (each gets a
//! full heartbeat timeout to find the new leader) and only then lets the controller, monitor and
//! scheduler run. The controller keeps the committed plan when it still fits the workers, so a
//! failover reloads no weights.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::raft::RaftRole;
use crate::state::Command;
use crate::state::cluster::Cluster;

/// Pause between barrier attempts while the node stays leader.
const RETRY: Duration = Duration::from_millis(50);

/// Follows the node's role until the task is aborted.
pub async fn run(cluster: Arc<Cluster>) {
    let mut status = cluster.raft().watch_status();
    loop {
        let (role, term) = {
            let s = status.borrow_and_update();
            // Every status change passes here: the Raft metrics follow it.
            cluster.metrics.raft(&s);
            (s.role, s.term)
        };
        let leader = role == RaftRole::Leader;
        if leader && !cluster.replica().is_leading() {
            match cluster.commit(Command::Barrier).await {
                Ok(()) => {
                    cluster.adopt_workers(Instant::now());
                    cluster.replica().set_leader(true);
                    let st = cluster.state();
                    tracing::info!(
                        term,
                        workers = st.workers().count(),
                        plan_epoch = st.plan_epoch(),
                        "leading: adopted the workers and plan"
                    );
                    cluster.replan.request();
                }
                Err(e) => {
                    tracing::debug!(term, error = %e, "leader barrier failed; retrying");
                    tokio::time::sleep(RETRY).await;
                    continue;
                }
            }
        } else if !leader && cluster.replica().is_leading() {
            tracing::info!(term, "no longer leading");
            cluster.replica().set_leader(false);
            cluster.liveness.forget_all();
        }
        if status.changed().await.is_err() {
            return;
        }
    }
}
