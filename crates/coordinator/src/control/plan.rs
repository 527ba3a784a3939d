//! The plan controller: a task that keeps a loaded plan serving the live workers.
//!
//! Re-plan = planner over the live workers → `SetPlan` → `LoadShard` on every worker of the
//! plan, concurrently (each told the next stage's address) → `PlanReady`. It re-plans at once
//! when the cluster is not ready (first plan, a plan worker dropped, a broken pipeline), and
//! when a worker joined and the planner would now use it — under load too: the scheduler
//! migrates the running requests onto the new plan (see its `migrate` module), so adopting a
//! joiner costs them a pause while the shards load, not their answers. A worker whose load fails is dropped (it
//! registers again if it is alive) and planning starts over — except a worker that only
//! reports that a tensor-parallel peer could not be reached: that peer is dropped instead
//! ([`to_drop`]). Before a new plan is committed, each of its workers is dialled once
//! ([`probe`]): one that served the previous plan and cannot be reached is dropped, one new to
//! the plan is held back (left registered, left out, dialled again after a backoff).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tessera_proto::cluster::v1 as pb;
use tokio::task::JoinSet;

use super::probe::{self, Holds};
use crate::error::CoordinatorError;
use crate::state::cluster::Cluster;
use crate::state::planner::{self, Plan, PlanPolicy, PlanStage};
use crate::state::{ClusterState, Command};

/// How long a shard may take to load before the worker is given up on.
const LOAD_TIMEOUT: Duration = Duration::from_secs(300);
/// From this hold on, a worker the leader cannot reach is logged as a warning: it has failed
/// three dials in a row (1 s, 2 s, then this), so it is not a network settling.
const PERSISTENT_HOLD: Duration = Duration::from_secs(4);

/// Runs the controller until the task is aborted.
pub async fn run(cluster: Arc<Cluster>) {
    let mut tick = tokio::time::interval(cluster.cfg.heartbeat_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let holds = Holds::default();
    loop {
        tokio::select! {
            () = cluster.replan.requested() => {}
            _ = tick.tick() => {}
        }
        // Only the leader plans and drives the workers; a new leader finds the plan its
        // predecessor committed and keeps it when it still fits (no reload).
        if !cluster.replica().is_leading() {
            continue;
        }
        // Logged once per change, not every tick: workers short of memory stay so until one
        // joins or leaves. The reason is kept for the requests no plan serves.
        let workers = worker_ids(&cluster);
        match reconcile(&cluster, &holds).await {
            Ok(()) => {
                if cluster.replan.record_outcome(None) {
                    tracing::info!("planning succeeds again");
                }
            }
            // A worker left or was dropped while the plan was made (its commit then names a
            // worker the state no longer has): not a failure, the next round plans without it.
            Err(e) if worker_ids(&cluster) != workers => {
                tracing::info!(error = %e, "the workers changed while planning; planning again");
                cluster.replan.request();
            }
            Err(e) => {
                if cluster.replan.record_outcome(Some(e.to_string())) {
                    tracing::warn!(error = %e, "planning failed");
                }
            }
        }
    }
}

/// The registered workers' ids, in the state's order.
fn worker_ids(cluster: &Cluster) -> Vec<String> {
    cluster
        .replica()
        .with(|st| st.workers().map(|w| w.id.clone()).collect())
}

/// The plan the planner makes over the registered workers now, but for those `held` back.
fn candidate(cluster: &Cluster, held: &HashSet<String>) -> Result<Option<Plan>, CoordinatorError> {
    let st = cluster.state();
    // The link latency each worker measured to its last group's peers (leader-local, like
    // every heartbeat figure): an input of the cost model, not of the replicated state.
    let seen = cluster.liveness.snapshot();
    let workers: Vec<_> = st
        .workers()
        .filter(|w| !held.contains(&w.id))
        .map(|w| {
            let mut c = w.capacity();
            c.link_rtt_us = seen.get(&w.id).map_or(0, |s| s.link_rtt_us);
            c
        })
        .collect();
    // The quorum gates the first plan only: after a loss, the survivors serve.
    let quorum = if st.plan_epoch() == 0 {
        cluster.cfg.min_workers.max(1)
    } else {
        1
    };
    if workers.len() < quorum {
        return Ok(None);
    }
    let policy = PlanPolicy {
        kv_tokens: cluster.kv_tokens,
        tp: cluster.cfg.tp,
        cp: cluster.cfg.cp,
        block_size: cluster.cfg.block_size,
    };
    Ok(Some(planner::plan(&cluster.footprint, &workers, &policy)?))
}

/// One look at the cluster: plans and loads when needed.
async fn reconcile(cluster: &Cluster, holds: &Holds) -> Result<(), CoordinatorError> {
    let st = cluster.state();
    let failed = cluster.replan.failed_epoch() >= st.plan_epoch() && st.plan_epoch() > 0;
    let ready = st.ready() && !failed;
    let registered: HashSet<String> = st.workers().map(|w| w.id.clone()).collect();
    let held = holds.active(Instant::now(), &registered);
    let Some(plan) = candidate(cluster, &held)? else {
        if st.plan().is_some() {
            // No workers left: no plan.
            cluster
                .commit(Command::SetPlan {
                    epoch: st.plan_epoch() + 1,
                    plan: None,
                })
                .await?;
        }
        return Ok(());
    };
    if ready && st.plan() == Some(&plan) {
        return Ok(());
    }
    let unreachable = probe::dial(cluster, &st, &plan).await;
    if !unreachable.is_empty() {
        for u in &unreachable {
            if u.in_previous_plan {
                tracing::info!(worker = %u.id, error = %u.error, "unreachable; planning without it");
                cluster.drop_worker(&u.id).await;
                continue;
            }
            let wait = holds.hold(&u.id, Instant::now());
            cluster.metrics.worker_held_back();
            let why = "registered, but this coordinator cannot reach it; planning without it";
            if wait >= PERSISTENT_HOLD {
                tracing::warn!(worker = %u.id, error = %u.error, retry_in = ?wait, "{why}");
            } else {
                tracing::info!(worker = %u.id, error = %u.error, retry_in = ?wait, "{why}");
            }
        }
        cluster.replan.request();
        return Ok(());
    }
    holds.release(plan.stages.iter().map(|s| s.worker_id.as_str()));
    let epoch = st.plan_epoch() + 1;
    tracing::info!(
        epoch,
        stages = plan.n_stages(),
        workers = plan.stages.len(),
        ?plan,
        "new plan"
    );
    cluster
        .commit(Command::SetPlan {
            epoch,
            plan: Some(plan.clone()),
        })
        .await?;
    let failures = load_all(cluster, epoch, &plan).await;
    if failures.is_empty() {
        cluster.commit(Command::PlanReady { epoch }).await?;
        tracing::info!(epoch, "plan ready");
        return Ok(());
    }
    for (worker, e) in &failures {
        tracing::warn!(worker = %worker, error = %e, "shard load failed");
    }
    for worker in to_drop(&failures, &st) {
        tracing::warn!(worker = %worker, "dropping the worker after a failed load");
        if cluster
            .commit(Command::RemoveWorker { id: worker.clone() })
            .await
            .is_ok()
        {
            cluster.liveness.forget(&worker);
        }
    }
    cluster.replan.request();
    Ok(())
}

/// The workers to drop after the loads that failed: each that failed on its own account, and
/// each peer another worker names as unreachable (its group could not form) — a worker that
/// answered that way is alive and stays. When that blames nobody (the named peers are not
/// workers of the state), every failed worker is dropped, so planning never loops on the
/// same failing group.
fn to_drop(failures: &[(String, CoordinatorError)], st: &ClusterState) -> Vec<String> {
    let peer_of = |e: &CoordinatorError| match e {
        CoordinatorError::Worker { status, .. } => {
            tessera_proto::status::unreachable_peer(status).map(str::to_owned)
        }
        _ => None,
    };
    let mut drop: Vec<String> = Vec::new();
    for (worker, e) in failures {
        let blamed = match peer_of(e) {
            Some(peer) => st
                .workers()
                .find(|w| !w.peer_address.is_empty() && w.peer_address == peer)
                .map(|w| w.id.clone()),
            None => Some(worker.clone()),
        };
        if let Some(id) = blamed.filter(|id| !drop.contains(id)) {
            drop.push(id);
        }
    }
    if drop.is_empty() {
        drop = failures.iter().map(|(w, _)| w.clone()).collect();
    }
    drop
}

/// Loads every stage's shard concurrently; returns the workers that failed.
async fn load_all(cluster: &Cluster, epoch: u64, plan: &Plan) -> Vec<(String, CoordinatorError)> {
    let st = cluster.state();
    let address = |id: &str| st.worker(id).map(|w| w.address.clone());
    let peer_address = |id: &str| st.worker(id).map(|w| w.peer_address.clone());
    let worker_name = |id: &str| st.worker(id).map(|w| w.name.clone());
    let mut set = JoinSet::new();
    let mut failures = Vec::new();
    for stage in &plan.stages {
        let Some(addr) = address(&stage.worker_id) else {
            failures.push((
                stage.worker_id.clone(),
                CoordinatorError::Unavailable("worker left before loading".into()),
            ));
            continue;
        };
        // Rank 0 alone (tensor-parallel rank 0 of ring rank 0) is in the pipeline: it
        // forwards to the next stage's rank 0.
        let leader = |s: &PlanStage| s.tp_rank == 0 && s.cp_rank == 0;
        let next = if leader(stage) {
            plan.stages
                .iter()
                .find(|s| s.stage == stage.stage + 1 && leader(s))
                .and_then(|s| address(&s.worker_id))
                .unwrap_or_default()
        } else {
            String::new()
        };
        let upstream = if leader(stage) {
            plan.stages
                .iter()
                .find(|s| s.stage + 1 == stage.stage && leader(s))
                .and_then(|s| st.worker(&s.worker_id).map(|w| w.name.clone()))
                .unwrap_or_default()
        } else {
            String::new()
        };
        let (group, group_names): (Vec<String>, Vec<String>) =
            if stage.tp_ranks.max(1) * stage.cp_ranks.max(1) > 1 {
                let mut ranks: Vec<&PlanStage> = plan
                    .stages
                    .iter()
                    .filter(|s| s.stage == stage.stage)
                    .collect();
                // Group order: cp_rank · tp_ranks + tp_rank.
                ranks.sort_by_key(|s| (s.cp_rank, s.tp_rank));
                // Each rank's worker name too: under mutual TLS its certificate must name it
                // on every link of the group, as `upstream` does on the pipeline.
                ranks
                    .iter()
                    .map(|s| {
                        (
                            peer_address(&s.worker_id).unwrap_or_default(),
                            worker_name(&s.worker_id).unwrap_or_default(),
                        )
                    })
                    .unzip()
            } else {
                (Vec::new(), Vec::new())
            };
        let req = pb::LoadShardRequest {
            plan_epoch: epoch,
            model: cluster.cfg.model.clone(),
            shard: Some(assignment(stage)),
            next_address: next,
            // A ring rank holds its share of every sequence.
            kv_tokens: planner::rank_kv_tokens(
                cluster.kv_tokens,
                stage.cp_ranks.max(1),
                cluster.cfg.block_size,
            ),
            block_size: cluster.cfg.block_size,
            group,
            upstream,
            group_names,
        };
        let id = stage.worker_id.clone();
        let connect = cluster.cfg.heartbeat_timeout;
        let tls = cluster.cfg.cluster_tls.clone();
        set.spawn(async move {
            let r = load_one(&tls, &addr, req, connect).await;
            (id, r)
        });
    }
    while let Some(joined) = set.join_next().await {
        match joined {
            Ok((id, Ok(resp))) => {
                // Known now, not a heartbeat later: status is right as soon as the plan serves.
                cluster
                    .liveness
                    .record_load(&id, resp.weight_bytes, resp.resident_bytes, epoch);
            }
            Ok((id, Err(e))) => failures.push((id, e)),
            Err(e) => tracing::error!(error = %e, "shard load task failed"),
        }
    }
    failures
}

async fn load_one(
    tls: &tessera_tls::ClusterTls,
    addr: &str,
    req: pb::LoadShardRequest,
    connect_timeout: Duration,
) -> Result<pb::LoadShardResponse, CoordinatorError> {
    let worker_err = |status| CoordinatorError::Worker {
        worker: addr.to_owned(),
        status,
    };
    let channel = super::connect(tls, addr, connect_timeout)
        .await
        .map_err(worker_err)?;
    let mut client = pb::worker_client::WorkerClient::new(channel);
    let shard = req.shard;
    let resp = tokio::time::timeout(LOAD_TIMEOUT, client.load_shard(req))
        .await
        .map_err(|_| worker_err(tonic::Status::deadline_exceeded("LoadShard timed out")))?
        .map_err(worker_err)?
        .into_inner();
    tracing::info!(
        worker = addr,
        ?shard,
        weight_bytes = resp.weight_bytes,
        resident_bytes = resp.resident_bytes,
        load_ms = resp.load_ms,
        "shard loaded"
    );
    Ok(resp)
}

/// A plan stage as the proto describes it.
pub fn assignment(s: &PlanStage) -> tessera_proto::v1::ShardAssignment {
    tessera_proto::v1::ShardAssignment {
        stage: s.stage,
        tp_rank: s.tp_rank,
        cp_rank: s.cp_rank,
        layer_start: s.layers.start,
        layer_end: s.layers.end,
        embed: s.embed,
        head: s.head,
        tp_ranks: s.tp_ranks.max(1),
        cp_ranks: s.cp_ranks.max(1),
        kv_head_start: s.kv_heads.start,
        kv_head_end: s.kv_heads.end,
        ffn_start: s.ffn.start,
        ffn_end: s.ffn.end,
        vocab_start: s.vocab.start,
        vocab_end: s.vocab.end,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> ClusterState {
        let mut st = ClusterState::new("m");
        for i in 0..3 {
            st.apply(Command::RegisterWorker {
                id: format!("w{i}"),
                address: format!("127.0.0.1:{}", 5000 + i),
                name: format!("w{i}"),
                memory_bytes: 0,
                threads: 1,
                devices: Vec::new(),
                peer_address: format!("127.0.0.1:{}", 6000 + i),
            })
            .expect("registers");
        }
        st
    }

    /// Failed loads, as `reconcile` collects them.
    type Failures = Vec<(String, CoordinatorError)>;

    fn failed(worker: &str, status: tonic::Status) -> (String, CoordinatorError) {
        (
            worker.to_owned(),
            CoordinatorError::Worker {
                worker: worker.to_owned(),
                status,
            },
        )
    }

    /// Ensures that a failed load drops the peer a worker names as unreachable, not the worker
    /// that said so; that a worker failing on its own account is dropped; and that when the
    /// named peer is no known worker, every failed worker is, so planning cannot loop.
    #[test]
    fn drops_the_unreachable_peer_not_the_messenger() {
        let st = state();
        let peer =
            |addr: &str| tessera_proto::status::peer_unreachable(addr, "did not connect".into());
        let cases: Vec<(Failures, Vec<&str>)> = vec![
            // w0 could not reach w1's peer port; w1 itself failed to answer.
            (
                vec![
                    failed("w0", peer("127.0.0.1:6001")),
                    failed("w1", tonic::Status::unavailable("transport error")),
                ],
                vec!["w1"],
            ),
            // w1 never answered at all, only w0 reported it.
            (vec![failed("w0", peer("127.0.0.1:6001"))], vec!["w1"]),
            // Two ranks each name the other: both dropped, once each.
            (
                vec![
                    failed("w0", peer("127.0.0.1:6002")),
                    failed("w2", peer("127.0.0.1:6000")),
                ],
                vec!["w2", "w0"],
            ),
            // A peer address no worker has: fall back to the failed workers.
            (vec![failed("w0", peer("127.0.0.1:7777"))], vec!["w0"]),
            // An ordinary failure.
            (
                vec![(
                    "w2".to_owned(),
                    CoordinatorError::Unavailable("worker left before loading".into()),
                )],
                vec!["w2"],
            ),
        ];
        for (failures, want) in cases {
            assert_eq!(to_drop(&failures, &st), want, "{failures:?}");
        }
    }
}
