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

use tessera_tls::{ClusterTls, Role};
use tonic::transport::Channel;

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
