//! Registration with the coordinator and the heartbeat loop.
//!
//! The loop runs on its own tokio task and reads the shard's published numbers, so a long
//! step on the executor thread never delays a heartbeat. While the coordinator is unreachable
//! the worker keeps serving and retries with capped backoff; it registers again when a
//! heartbeat answers `known = false` (dropped, or a new coordinator) or when heartbeats have
//! failed for [`LOST_AFTER_INTERVALS`] intervals (the coordinator was lost).

use std::time::{Duration, Instant};

use tessera_proto::v1 as pb;
use tessera_proto::v1::coordination_client::CoordinationClient;
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
/// Heartbeats failing this many intervals in a row mean the coordinator was lost.
pub const LOST_AFTER_INTERVALS: u32 = 3;

/// Who this worker is, as it registers.
#[derive(Clone, Debug)]
pub(crate) struct Registration {
    /// The coordinator endpoint.
    pub endpoint: Endpoint,
    /// What Register carries.
    pub request: pb::RegisterRequest,
}

/// Registers and heartbeats until `shutdown` turns true.
pub(crate) async fn run(
    reg: Registration,
    shard: ShardHandle,
    mut shutdown: watch::Receiver<bool>,
) {
    let stop = async move {
        let _ = shutdown.wait_for(|&s| s).await;
    };
    tokio::select! {
        () = stop => {}
        () = register_forever(reg, shard) => {}
    }
}

async fn register_forever(reg: Registration, shard: ShardHandle) {
    loop {
        let (client, id, interval) = register(&reg).await;
        tracing::info!(worker_id = %id, interval_ms = interval.as_millis() as u64, "registered");
        heartbeat(client, &id, interval, &shard).await;
    }
}

/// Registers, retrying with capped backoff until the coordinator answers.
async fn register(reg: &Registration) -> (CoordinationClient<Channel>, String, Duration) {
    let mut backoff = FIRST_BACKOFF;
    loop {
        match try_register(reg).await {
            Ok(ok) => return ok,
            Err(e) => {
                tracing::debug!(error = %e, retry_in_ms = backoff.as_millis() as u64, "register failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

async fn try_register(
    reg: &Registration,
) -> Result<(CoordinationClient<Channel>, String, Duration), String> {
    let channel = tokio::time::timeout(RPC_TIMEOUT, reg.endpoint.connect())
        .await
        .map_err(|_| "connect timed out".to_owned())?
        .map_err(|e| e.to_string())?;
    let mut client = CoordinationClient::new(channel);
    let resp = tokio::time::timeout(RPC_TIMEOUT, client.register(reg.request.clone()))
        .await
        .map_err(|_| "Register timed out".to_owned())?
        .map_err(|s| s.to_string())?
        .into_inner();
    let interval = match resp.heartbeat_interval_ms {
        0 => DEFAULT_INTERVAL,
        ms => Duration::from_millis(u64::from(ms)),
    };
    Ok((client, resp.worker_id, interval))
}

/// Heartbeats every `interval`; returns when the worker must register again.
async fn heartbeat(
    mut client: CoordinationClient<Channel>,
    id: &str,
    interval: Duration,
    shard: &ShardHandle,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing_since: Option<Instant> = None;
    loop {
        ticker.tick().await;
        let status = shard.status();
        let req = pb::HeartbeatRequest {
            worker_id: id.to_owned(),
            resident_bytes: resident_bytes(),
            weight_bytes: status.weight_bytes,
            plan_epoch: status.plan_epoch,
        };
        let answer = tokio::time::timeout(interval.max(RPC_TIMEOUT), client.heartbeat(req)).await;
        match answer {
            Ok(Ok(r)) if r.get_ref().known => failing_since = None,
            Ok(Ok(_)) => {
                tracing::info!(
                    worker_id = id,
                    "the coordinator does not know this worker; registering again"
                );
                return;
            }
            Ok(Err(_)) | Err(_) => {
                let since = *failing_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= interval * LOST_AFTER_INTERVALS {
                    tracing::warn!(worker_id = id, "coordinator lost; registering again");
                    return;
                }
            }
        }
    }
}
