//! Worker liveness: the leader drops workers that stop heartbeating, so the plan controller
//! re-plans without them.

use std::sync::Arc;
use std::time::Instant;

use crate::state::cluster::Cluster;

/// Drops workers silent for longer than the heartbeat timeout, checking a few times per
/// heartbeat interval so a silent worker goes within timeout + interval/4.
pub async fn monitor(cluster: Arc<Cluster>) {
    let period = (cluster.cfg.heartbeat_interval / 4).max(std::time::Duration::from_millis(10));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if !cluster.replica().is_leading() {
            continue;
        }
        let now = Instant::now();
        // A worker whose registration just committed may not have its first heartbeat
        // recorded yet (the Register call records it after the commit returns): its clock
        // starts now, rather than it being dropped as silent the moment it joined.
        cluster.adopt_workers(now);
        let seen = cluster.liveness.snapshot();
        let silent: Vec<String> = cluster
            .state()
            .workers()
            .filter(|w| {
                seen.get(&w.id)
                    .is_none_or(|s| now.duration_since(s.at) > cluster.cfg.heartbeat_timeout)
            })
            .map(|w| w.id.clone())
            .collect();
        for id in silent {
            tracing::warn!(worker = %id, "worker missed heartbeats; dropping it");
            cluster.drop_worker(&id).await;
        }
    }
}
