//! Forwarding to the leader: a follower hands client calls to the coordinator Raft elected,
//! over one cached channel per leader address, so a client connected to any coordinator gets
//! its answer.
//!
//! Forwarding is member-to-member traffic, so it goes to the leader's cluster address (the one
//! Raft knows; a member's public address is nowhere in the replicated state) and to a service
//! of the cluster protocol, `tessera.cluster.v1.Forward`, rather than to `tessera.v1.Inference`
//! mounted a second time on the cluster port. That keeps the cluster port to the cluster
//! package alone — one place to authenticate members — and tells a forwarded call apart from a
//! client's. [`ForwardService`] serves it with the very same code as the public API, to
//! coordinators only (a worker's or an operator's certificate is refused).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tessera_proto::cluster::v1 as cpb;
use tessera_proto::v1 as pb;
use tessera_tls::{ClusterTls, Role};
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::error::CoordinatorError;
use crate::services::api::Api;
use crate::state::cluster::Cluster;

/// How long a call waits for a leader to be elected before failing with UNAVAILABLE.
const LEADER_WAIT: Duration = Duration::from_secs(5);
/// Bound on connecting to the leader.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// How long the leader may take to accept a forwarded call (its response headers; a
/// generate's tokens may take as long as they take). A leader that is cut off rather than
/// dead accepts TCP connections that never answer: without this bound the call would hang.
pub const ACCEPT_TIMEOUT: Duration = Duration::from_secs(5);
/// HTTP/2 pings on forwarding channels: a leader that vanishes mid-stream without closing
/// the connection (a partition, a frozen host) ends the relayed stream within
/// interval + timeout instead of never.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(1);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(2);

/// Where a call goes.
pub enum Route {
    /// This node leads: serve it here.
    Local,
    /// Forward it to the leader, at its cluster address.
    Leader(cpb::forward_client::ForwardClient<Channel>),
}

/// Cached channels to leaders.
#[derive(Debug, Default)]
pub struct Forwarder {
    channels: Mutex<HashMap<String, Channel>>,
}

impl Forwarder {
    /// Where a call should go now, waiting (bounded) for an election to finish.
    ///
    /// # Errors
    /// UNAVAILABLE when no leader is known within [`LEADER_WAIT`].
    pub async fn route(&self, cluster: &Cluster) -> Result<Route, CoordinatorError> {
        let mut status = cluster.raft().watch_status();
        let found = tokio::time::timeout(LEADER_WAIT, async {
            loop {
                if cluster.replica().is_leading() {
                    return Some(None);
                }
                if let Some(addr) = cluster.leader_address() {
                    return Some(Some(addr));
                }
                // The leadership task flips `is_leading` after the status changes; poll too.
                tokio::select! {
                    r = status.changed() => if r.is_err() { return None },
                    () = tokio::time::sleep(Duration::from_millis(20)) => {}
                }
            }
        })
        .await;
        match found {
            Ok(Some(None)) => Ok(Route::Local),
            Ok(Some(Some(addr))) => {
                Ok(Route::Leader(self.client(&cluster.cfg.cluster_tls, &addr)?))
            }
            Ok(None) => Err(CoordinatorError::Unavailable(
                "this coordinator's Raft node has stopped".into(),
            )),
            Err(_) => Err(CoordinatorError::Unavailable(format!(
                "no coordinator leader elected within {LEADER_WAIT:?}"
            ))),
        }
    }

    fn client(
        &self,
        tls: &ClusterTls,
        addr: &str,
    ) -> Result<cpb::forward_client::ForwardClient<Channel>, CoordinatorError> {
        let mut channels = self
            .channels
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let channel = match channels.get(addr) {
            Some(c) => c.clone(),
            None => {
                let c = tls
                    .endpoint(addr, Role::Coordinator)
                    .map_err(|e| {
                        CoordinatorError::Unavailable(format!(
                            "leader address {addr}: {}",
                            e.message()
                        ))
                    })?
                    .connect_timeout(CONNECT_TIMEOUT)
                    .tcp_nodelay(true)
                    .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
                    .keep_alive_timeout(KEEPALIVE_TIMEOUT)
                    .keep_alive_while_idle(true)
                    .connect_lazy();
                channels.insert(addr.to_owned(), c.clone());
                c
            }
        };
        Ok(cpb::forward_client::ForwardClient::new(channel))
    }
}

/// `tessera.cluster.v1.Forward`: what a follower forwards, answered by the public API's own
/// code (so by the same rules, and forwarded on if this node no longer leads).
#[derive(Clone, Debug)]
pub struct ForwardService {
    api: Api,
    tls: ClusterTls,
}

impl ForwardService {
    /// The service over the public API's handler, admitting callers by `tls`.
    pub fn new(api: Api, tls: ClusterTls) -> Self {
        Self { api, tls }
    }
}

#[tonic::async_trait]
impl cpb::forward_server::Forward for ForwardService {
    type GenerateStream = <Api as pb::inference_server::Inference>::GenerateStream;

    async fn generate(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        self.tls.authorize(&request, &[Role::Coordinator])?;
        pb::inference_server::Inference::generate(&self.api, request).await
    }

    async fn embed(
        &self,
        request: Request<pb::EmbedRequest>,
    ) -> Result<Response<pb::EmbedResponse>, Status> {
        self.tls.authorize(&request, &[Role::Coordinator])?;
        pb::inference_server::Inference::embed(&self.api, request).await
    }

    async fn cluster_status(
        &self,
        request: Request<pb::ClusterStatusRequest>,
    ) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        self.tls.authorize(&request, &[Role::Coordinator])?;
        pb::inference_server::Inference::cluster_status(&self.api, request).await
    }
}
