//! Registration with the coordinators, the heartbeat loop, and leaving when the worker stops.
//!
//! The loop runs on its own tokio task and reads the shard's published numbers, so a long
//! step on the executor thread never delays a heartbeat. While no coordinator is reachable
//! the worker keeps serving and retries with capped backoff, trying each configured
//! coordinator in turn. A coordinator that is not the Raft leader answers with the leader's
//! address, and the worker follows it, keeping its id (the state is replicated). It registers
//! again only when a coordinator answers `known = false` (dropped, or a coordinator that kept
//! no state); failing heartbeats alone never drop the id, so a cluster of coordinators restarted
//! from disk finds its workers (and their loaded shards) as they were.
//!
//! Each heartbeat says how long the executor has been on its current step (`step_busy_ms`),
//! which is how the coordinator tells a wedged worker — heartbeating, its step never
//! answering — from a healthy one when a step times out. A dropped worker registers again
//! only once its executor answers a command: a wedged one would otherwise be planned back in
//! at once, and its shard load would hang behind the stuck step.
//!
//! A worker that stops on purpose leaves first (`Coordination.Leave`): the leader commits its
//! removal and re-plans without it while it still answers, so its requests migrate once, by
//! plan, instead of each failing step by step into plans that still name it.

use std::time::{Duration, Instant};

use tessera_proto::cluster::v1 as pb;
use tessera_proto::cluster::v1::coordination_client::CoordinationClient;
use tessera_tls::{ClusterTls, Role};
use tokio::sync::watch;
use tonic::transport::{Channel, Endpoint};

use crate::memory::resident_bytes;
use crate::shard::ShardHandle;

/// First retry delay after a failed registration; doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// The longest wait between registration attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// Bound on connecting to and calling the coordinator.
const RPC_TIMEOUT: Duration = Duration::from_secs(2);
/// Heartbeat interval used when the coordinator answers 0.
const DEFAULT_INTERVAL: Duration = Duration::from_millis(500);
/// How often a worker waiting for its stuck executor says so.
const EXECUTOR_WAIT_LOG: Duration = Duration::from_secs(5);
/// Bound on a stopping worker's attempts to leave the cluster.
const LEAVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Heartbeats failing this many intervals in a row are logged as the coordinators being lost.
pub const LOST_AFTER_INTERVALS: u32 = 3;

/// Who this worker is, as it registers.
#[derive(Clone, Debug)]
pub(crate) struct Registration {
    /// The coordinator endpoints (at least one).
    pub endpoints: Vec<Endpoint>,
    /// How leader hints are dialed.
    pub tls: ClusterTls,
    /// What Register carries.
    pub request: pb::RegisterRequest,
}

/// Which coordinator to talk to: the leader a coordinator pointed at, else the configured
/// ones in turn.
struct Cursor {
    tls: ClusterTls,
    endpoints: Vec<Endpoint>,
    next: usize,
    leader: Option<Endpoint>,
}

impl Cursor {
    fn current(&self) -> Endpoint {
        match &self.leader {
            Some(e) => e.clone(),
            None => self.endpoints[self.next % self.endpoints.len()].clone(),
        }
    }

    /// The current coordinator failed: try the next configured one.
    fn rotate(&mut self) {
        if self.leader.take().is_none() {
            self.next = (self.next + 1) % self.endpoints.len();
        }
    }

    /// Follows a leader hint (host:port); false when it is not a usable address.
    fn follow(&mut self, leader: &str) -> bool {
        match self.tls.endpoint(leader, Role::Coordinator) {
            Ok(e) => {
                self.leader = Some(e.connect_timeout(Duration::from_secs(1)));
                true
            }
            Err(e) => {
                tracing::warn!(leader, error = %e.message(), "unusable leader address");
                false
            }
        }
    }
}

/// Registers and heartbeats until `leave` turns true; then, when registered, asks the leader
/// to remove this worker ([`leave`]). Whether the leader committed the removal.
pub(crate) async fn run(
    reg: Registration,
    shard: ShardHandle,
    mut leave: watch::Receiver<bool>,
) -> bool {
    let mut cursor = Cursor {
        tls: reg.tls.clone(),
        endpoints: reg.endpoints.clone(),
        next: 0,
        leader: None,
    };
    let mut id = None;
    tokio::select! {
        _ = leave.wait_for(|&s| s) => {}
        () = register_forever(&reg, &shard, &mut cursor, &mut id) => {}
    }
    match id {
        Some(id) => self::leave(&mut cursor, &id).await,
        None => false,
    }
}

/// Registers and heartbeats for ever; `id` holds the id while registered.
async fn register_forever(
    reg: &Registration,
    shard: &ShardHandle,
    cursor: &mut Cursor,
    id: &mut Option<String>,
) {
    loop {
        *id = None;
        let (got, interval) = register(reg, cursor).await;
        tracing::info!(worker_id = %got, interval_ms = interval.as_millis() as u64, "registered");
        let got = id.insert(got);
        heartbeat(cursor, got, interval, shard).await;
        executor_answers(shard).await;
    }
}

/// Asks the leader (following one redirect per try) to remove worker `id`, within
/// [`LEAVE_TIMEOUT`] in all; whether it committed the removal. A worker that cannot leave
/// (no coordinator answers) stops all the same: the liveness monitor drops it later.
async fn leave(cursor: &mut Cursor, id: &str) -> bool {
    // Every coordinator failing in turn (a whole cluster stopping) ends the attempts early.
    let give_up_after = cursor.endpoints.len() + 1;
    let attempt = async {
        let mut failures = 0;
        while failures < give_up_after {
            let asked = client(cursor.current())
                .leave(pb::LeaveRequest {
                    worker_id: id.to_owned(),
                })
                .await;
            match asked {
                Ok(r) if r.get_ref().leader.is_empty() => return true,
                Ok(r) if cursor.follow(&r.get_ref().leader) => {}
                Ok(_) => cursor.rotate(),
                Err(s) => {
                    tracing::debug!(error = %s, "leave failed");
                    failures += 1;
                    cursor.rotate();
                }
            }
            tokio::time::sleep(FIRST_BACKOFF).await;
        }
        false
    };
    let left = tokio::time::timeout(LEAVE_TIMEOUT, attempt)
        .await
        .unwrap_or(false);
    if left {
        tracing::info!(
            worker_id = id,
            "left the cluster: the coordinator re-plans without this worker"
        );
    } else {
        // Not a warning: a whole cluster stopping at once (Ctrl-C to `tessera up`, a namespace
        // deleted) leaves no coordinator to answer; the liveness monitor drops it anyway.
        tracing::info!(
            worker_id = id,
            "no coordinator confirmed this worker's leave; stopping anyway"
        );
    }
    left
}

/// Resolves once the executor takes a command again (at once unless a step holds it), logging
/// while it does not. A stopped executor resolves too: registering then fails its first load
/// with a clear error, where waiting would hide it.
async fn executor_answers(shard: &ShardHandle) {
    let began = Instant::now();
    loop {
        match tokio::time::timeout(EXECUTOR_WAIT_LOG, shard.ping()).await {
            Ok(Ok(())) => return,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "the executor has stopped");
                return;
            }
            Err(_) => tracing::warn!(
                waited_s = began.elapsed().as_secs(),
                step_busy_ms = shard.step_busy_ms(),
                "dropped by the coordinator while the executor is stuck in a step; registering \
                 again once it answers"
            ),
        }
    }
}

/// Registers, retrying with capped backoff until the leader answers.
async fn register(reg: &Registration, cursor: &mut Cursor) -> (String, Duration) {
    let mut backoff = FIRST_BACKOFF;
    loop {
        match try_register(reg, cursor.current()).await {
            Ok(resp) if !resp.worker_id.is_empty() => {
                let interval = match resp.heartbeat_interval_ms {
                    0 => DEFAULT_INTERVAL,
                    ms => Duration::from_millis(u64::from(ms)),
                };
                return (resp.worker_id, interval);
            }
            Ok(resp) if !resp.leader.is_empty() && cursor.follow(&resp.leader) => {
                tracing::debug!(leader = %resp.leader, "registering with the leader");
                // A redirect is not a failure, but two followers pointing at each other must
                // not spin.
                tokio::time::sleep(FIRST_BACKOFF / 4).await;
                continue;
            }
            Ok(_) => {
                tracing::debug!("register answered without an id or a leader");
                cursor.rotate();
            }
            Err(e) => {
                tracing::debug!(error = %e, retry_in_ms = backoff.as_millis() as u64, "register failed");
                cursor.rotate();
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

async fn try_register(
    reg: &Registration,
    endpoint: Endpoint,
) -> Result<pb::RegisterResponse, String> {
    let channel = tokio::time::timeout(RPC_TIMEOUT, endpoint.connect())
        .await
        .map_err(|_| "connect timed out".to_owned())?
        .map_err(|e| e.to_string())?;
    let mut client = CoordinationClient::new(channel);
    let resp = tokio::time::timeout(RPC_TIMEOUT, client.register(reg.request.clone()))
        .await
        .map_err(|_| "Register timed out".to_owned())?
        .map_err(|s| s.to_string())?
        .into_inner();
    Ok(resp)
}

fn client(endpoint: Endpoint) -> CoordinationClient<Channel> {
    // Lazy: a dead coordinator shows up as a failed heartbeat, never as a stalled loop.
    CoordinationClient::new(endpoint.connect_lazy())
}

/// Heartbeats every `interval`; returns when the worker must register again.
async fn heartbeat(cursor: &mut Cursor, id: &str, interval: Duration, shard: &ShardHandle) {
    let mut client = client(cursor.current());
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing_since: Option<Instant> = None;
    let mut lost_logged = false;
    loop {
        ticker.tick().await;
        let status = shard.status();
        let req = pb::HeartbeatRequest {
            worker_id: id.to_owned(),
            resident_bytes: resident_bytes(),
            weight_bytes: status.weight_bytes,
            plan_epoch: status.plan_epoch,
            link_rtt_us: status.link_rtt_us,
            kv_bytes: status.kv_bytes,
            tp_steps: status.tp_steps,
            tp_reduce_us: status.tp_reduce_us,
            peer_bytes_sent: status.peer_bytes_sent,
            kv_used_bytes: status.kv_used_bytes(),
            step_busy_ms: shard.step_busy_ms(),
        };
        let answer = tokio::time::timeout(interval.max(RPC_TIMEOUT), client.heartbeat(req)).await;
        match answer {
            Ok(Ok(r)) if r.get_ref().known => {
                failing_since = None;
                lost_logged = false;
                let leader = &r.get_ref().leader;
                if !leader.is_empty() && cursor.follow(leader) {
                    tracing::info!(worker_id = id, leader = %leader, "following the coordinator leader");
                    client = self::client(cursor.current());
                }
            }
            Ok(Ok(_)) => {
                tracing::info!(
                    worker_id = id,
                    "the coordinator does not know this worker; registering again"
                );
                return;
            }
            Ok(Err(_)) | Err(_) => {
                let since = *failing_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= interval * LOST_AFTER_INTERVALS && !lost_logged {
                    tracing::warn!(worker_id = id, "no coordinator answers; still trying");
                    lost_logged = true;
                }
                if cursor.endpoints.len() > 1 || cursor.leader.is_some() {
                    cursor.rotate();
                }
                // A fresh channel: the old one may hold a connection to a dead process.
                client = self::client(cursor.current());
            }
        }
    }
}
