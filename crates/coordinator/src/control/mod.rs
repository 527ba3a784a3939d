//! The coordinator's control tasks: long-running loops that act on the replicated state.
//!
//! - [`scheduler`]: continuous batching of admitted requests into steps through the pipeline;
//!   its KV account ([`kv_budget`]) and prefix index ([`prefix`]); [`embedder`]: its
//!   counterpart for encoders, batching whole inputs into stateless steps;
//! - [`plan`]: on the leader, computes and loads a shard plan when workers come and go;
//!   [`probe`] dials a plan's workers first and holds back those it cannot reach;
//! - [`leadership`]: follows this node's Raft role (step up, step down);
//! - [`liveness`]: drops workers that stop heartbeating.

pub mod embedder;
pub(crate) mod kv_budget;
pub(crate) mod leadership;
pub(crate) mod liveness;
pub(crate) mod plan;
pub mod prefix;
pub(crate) mod probe;
pub mod scheduler;

use std::time::Duration;

use tessera_proto::cluster::v1 as cpb;
use tessera_tls::{ClusterTls, Role};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use crate::error::CoordinatorError;
use crate::state::cluster::{Cluster, Serving};

/// Connects to a worker at host:port, as `tls` says (the worker must hold a worker's
/// certificate under mutual TLS).
pub(crate) async fn connect(
    tls: &ClusterTls,
    addr: &str,
    timeout: Duration,
) -> Result<Channel, tonic::Status> {
    let endpoint = tls
        .endpoint(addr, Role::Worker)?
        .connect_timeout(timeout)
        .tcp_nodelay(true);
    endpoint
        .connect()
        .await
        .map_err(|e| tonic::Status::unavailable(format!("connecting to {addr}: {e}")))
}

/// A `Pipeline` stream open on a plan's first stage: where steps go, where answers come.
pub(crate) struct PipelineStream {
    /// Steps to stage 0 (room for every step in flight, so sending one never waits).
    pub(crate) tx: mpsc::Sender<cpb::StepRequest>,
    /// Stage 0's answers, in step order.
    pub(crate) rx: tonic::Streaming<cpb::StepResponse>,
    /// The most steps in flight at once (`--max-inflight-steps`, by default the stages).
    pub(crate) limit: usize,
    /// The plan's workers, stage by stage: whom a step timeout may blame.
    pub(crate) workers: Vec<String>,
}

/// Opens the `Pipeline` stream of `serving`'s plan on its first stage, both the connection
/// and the stream within twice the heartbeat timeout (the generation and the embedding
/// schedulers each hold one per plan epoch).
///
/// # Errors
/// UNAVAILABLE when stage 0 cannot be reached or does not open the stream in time.
pub(crate) async fn open_pipeline(
    cluster: &Cluster,
    serving: &Serving,
) -> Result<PipelineStream, tonic::Status> {
    let timeout = cluster.cfg.heartbeat_timeout * 2;
    let limit = cluster
        .cfg
        .inflight_steps_for(serving.plan.n_stages() as usize);
    let channel = connect(&cluster.cfg.cluster_tls, &serving.stage0, timeout).await?;
    let mut client = cpb::worker_client::WorkerClient::new(channel);
    let (tx, rx) = mpsc::channel(limit.max(4));
    let resp = tokio::time::timeout(timeout, client.pipeline(ReceiverStream::new(rx)))
        .await
        .map_err(|_| {
            tonic::Status::from(CoordinatorError::Unavailable(
                "opening the pipeline stream timed out".into(),
            ))
        })??;
    tracing::info!(epoch = serving.epoch, stage0 = %serving.stage0, limit, "pipeline stream open");
    Ok(PipelineStream {
        tx,
        rx: resp.into_inner(),
        limit,
        workers: serving
            .plan
            .stages
            .iter()
            .map(|s| s.worker_id.clone())
            .collect(),
    })
}
