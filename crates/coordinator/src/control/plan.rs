//! The plan controller: a task that keeps a loaded plan serving the live workers.
//!
//! Re-plan = planner over the live workers → `SetPlan` → `LoadShard` on every worker of the
//! plan, concurrently (each told the next stage's address) → `PlanReady`. It re-plans at once
//! when the cluster is not ready (first plan, a plan worker dropped, a broken pipeline), and
//! when a worker joined and the planner would now use it, only while no request is running or
//! waiting, so adopting it interrupts nothing. A worker whose load fails is dropped (it
//! registers again if it is alive) and planning starts over.

use std::sync::Arc;
use std::time::Duration;

use tessera_proto::cluster::v1 as pb;
use tokio::task::JoinSet;

use crate::error::CoordinatorError;
use crate::state::Command;
use crate::state::cluster::Cluster;
use crate::state::planner::{self, Plan, PlanPolicy, PlanStage};

/// How long a shard may take to load before the worker is given up on.
const LOAD_TIMEOUT: Duration = Duration::from_secs(300);

/// Runs the controller until the task is aborted.
pub async fn run(cluster: Arc<Cluster>) {
    let mut tick = tokio::time::interval(cluster.cfg.heartbeat_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
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
        match reconcile(&cluster).await {
            Ok(()) => {
                if cluster.replan.record_outcome(None) {
                    tracing::info!("planning succeeds again");
                }
            }
            Err(e) => {
                if cluster.replan.record_outcome(Some(e.to_string())) {
                    tracing::warn!(error = %e, "planning failed");
                }
            }
        }
    }
}

/// The plan the planner makes over the registered workers now.
fn candidate(cluster: &Cluster) -> Result<Option<Plan>, CoordinatorError> {
    let st = cluster.state();
    // The link latency each worker measured to its last group's peers (leader-local, like
    // every heartbeat figure): an input of the cost model, not of the replicated state.
    let seen = cluster.liveness.snapshot();
    let workers: Vec<_> = st
        .workers()
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
    };
    Ok(Some(planner::plan(&cluster.footprint, &workers, &policy)?))
}

/// One look at the cluster: plans and loads when needed.
async fn reconcile(cluster: &Cluster) -> Result<(), CoordinatorError> {
    let st = cluster.state();
    let failed = cluster.replan.failed_epoch() >= st.plan_epoch() && st.plan_epoch() > 0;
    let ready = st.ready() && !failed;
    if ready && cluster.load.busy() {
        return Ok(());
    }
    let Some(plan) = candidate(cluster)? else {
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
    for (worker, e) in failures {
        tracing::warn!(worker = %worker, error = %e, "shard load failed; dropping the worker");
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

/// Loads every stage's shard concurrently; returns the workers that failed.
async fn load_all(cluster: &Cluster, epoch: u64, plan: &Plan) -> Vec<(String, CoordinatorError)> {
    let st = cluster.state();
    let address = |id: &str| st.worker(id).map(|w| w.address.clone());
    let peer_address = |id: &str| st.worker(id).map(|w| w.peer_address.clone());
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
        // Rank 0 alone is in the pipeline: it forwards to the next stage's rank 0.
        let next = if stage.tp_rank == 0 {
            plan.stages
                .iter()
                .find(|s| s.stage == stage.stage + 1 && s.tp_rank == 0)
                .and_then(|s| address(&s.worker_id))
                .unwrap_or_default()
        } else {
            String::new()
        };
        let group: Vec<String> = if stage.tp_ranks > 1 {
            let mut ranks: Vec<&PlanStage> = plan
                .stages
                .iter()
                .filter(|s| s.stage == stage.stage)
                .collect();
            ranks.sort_by_key(|s| s.tp_rank);
            ranks
                .iter()
                .map(|s| peer_address(&s.worker_id).unwrap_or_default())
                .collect()
        } else {
            Vec::new()
        };
        let req = pb::LoadShardRequest {
            plan_epoch: epoch,
            model: cluster.cfg.model.clone(),
            shard: Some(assignment(stage)),
            next_address: next,
            kv_tokens: cluster.kv_tokens,
            block_size: cluster.cfg.block_size,
            group,
        };
        let id = stage.worker_id.clone();
        let connect = cluster.cfg.heartbeat_timeout;
        set.spawn(async move {
            let r = load_one(&addr, req, connect).await;
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
    addr: &str,
    req: pb::LoadShardRequest,
    connect_timeout: Duration,
) -> Result<pb::LoadShardResponse, CoordinatorError> {
    let worker_err = |status| CoordinatorError::Worker {
        worker: addr.to_owned(),
        status,
    };
    let channel = super::connect(addr, connect_timeout)
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
        kv_head_start: s.kv_heads.start,
        kv_head_end: s.kv_heads.end,
        ffn_start: s.ffn.start,
        ffn_end: s.ffn.end,
        vocab_start: s.vocab.start,
        vocab_end: s.vocab.end,
    }
}
