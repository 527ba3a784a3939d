//! Forwarding to the leader: a follower hands client calls to the coordinator Raft elected,
//! over one cached channel per leader address, so a client connected to any coordinator gets
//! its answer.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tessera_proto::v1 as pb;
use tonic::transport::{Channel, Endpoint};

use crate::cluster::Cluster;
use crate::error::CoordinatorError;

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
    /// Forward it to the leader.
    Leader(pb::inference_client::InferenceClient<Channel>),
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
            Ok(Some(Some(addr))) => Ok(Route::Leader(self.client(&addr)?)),
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
        addr: &str,
    ) -> Result<pb::inference_client::InferenceClient<Channel>, CoordinatorError> {
        let mut channels = self
            .channels
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let channel = match channels.get(addr) {
            Some(c) => c.clone(),
            None => {
                let uri = if addr.contains("://") {
                    addr.to_owned()
                } else {
                    format!("http://{addr}")
                };
                let c = Endpoint::from_shared(uri)
                    .map_err(|e| {
                        CoordinatorError::Unavailable(format!("leader address {addr}: {e}"))
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
        Ok(pb::inference_client::InferenceClient::new(channel))
    }
}
