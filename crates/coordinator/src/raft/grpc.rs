//! Raft over gRPC: [`GrpcTransport`] sends each peer's messages from one task over a lazily
//! connected channel; [`RaftService`] serves `tessera.cluster.v1.Raft` and steps what it receives
//! into the local node.
//!
//! A message travels as raft-rs's own protobuf encoding inside `RaftMessage.message`, so the
//! wire format is exactly raft-rs's and this crate's proto files do not duplicate it.
//!
//! **Who may speak.** Under mutual TLS ([`ClusterTls`]) only coordinators may send Raft
//! messages, and a message is stepped only when the sender's certificate names the node the
//! message claims to come from. In every mode a message must be addressed to this node and come
//! from a current member (or reach a node that is still joining, see
//! [`RaftHandle::admits_sender`]): a forged heartbeat from a stranger with a huge term would
//! otherwise depose the leader. Membership changes may come from coordinators (a follower
//! forwards to the leader) and operators' admin certificates.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use protobuf::Message as _;
use raft::eraftpb::Message;
use tessera_proto::cluster::v1::raft_client::RaftClient;
use tessera_proto::cluster::v1::raft_server::{Raft, RaftServer};
use tessera_proto::cluster::v1::{
    AddMemberRequest, MembersRequest, MembersResponse, RaftAck, RaftMessage, RemoveMemberRequest,
};
use tessera_tls::{ClusterTls, Role};
use tokio::sync::mpsc;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};

use super::transport::PeerQueues;
use super::{RaftError, RaftHandle, Transport};

/// How long a connection attempt to a peer may take.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// How long a new member may take to catch up with the log before it is given up on.
const CATCH_UP: Duration = Duration::from_secs(5);
/// How long one send may take; a peer slower than this is treated as down for this message.
const SEND_TIMEOUT: Duration = Duration::from_secs(2);

type Addresses = Arc<Mutex<HashMap<u64, String>>>;

/// Sends Raft messages to peers over gRPC (see the module docs).
pub struct GrpcTransport {
    queues: PeerQueues,
    addresses: Addresses,
    /// This node's own address, stamped on every message it sends.
    own: Arc<str>,
    tls: ClusterTls,
}

impl GrpcTransport {
    /// A transport for the node reachable at `own` (host:port), knowing the given peer
    /// addresses (host:port, or a full `http://` URI); more are learnt from membership changes
    /// through [`Transport::set_peer`], and from senders it has none for (see
    /// [`GrpcTransport::learn`]).
    ///
    /// Peers are dialed with `tls`.
    ///
    /// # Panics
    /// Outside a Tokio runtime.
    pub fn new(
        own: &str,
        peers: impl IntoIterator<Item = (u64, String)>,
        tls: ClusterTls,
    ) -> Arc<Self> {
        Arc::new(GrpcTransport {
            queues: PeerQueues::new(),
            addresses: Arc::new(Mutex::new(peers.into_iter().collect())),
            own: Arc::from(own),
            tls,
        })
    }

    /// Records `address` for node `id` unless one is known: how a node that joined, and has
    /// no configuration yet, can answer the leader. Known addresses (from the configuration
    /// or membership changes) are never replaced by what a message claims.
    pub fn learn(&self, id: u64, address: &str) {
        if address.is_empty() || id == 0 {
            return;
        }
        let mut map = self
            .addresses
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        map.entry(id).or_insert_with(|| {
            tracing::info!(peer = id, %address, "learnt a raft peer's address from its message");
            address.to_owned()
        });
    }
}

impl Transport for GrpcTransport {
    fn send(&self, msg: Message) {
        let to = msg.to;
        let addresses = self.addresses.clone();
        let own = Arc::clone(&self.own);
        let tls = self.tls.clone();
        self.queues
            .push(msg, move |rx| peer_task(to, addresses, own, tls, rx));
    }

    fn set_peer(&self, id: u64, address: Option<&str>) {
        let mut map = self
            .addresses
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let changed = match address {
            Some(a) => map.insert(id, a.to_string()).as_deref() != Some(a),
            None => map.remove(&id).is_some(),
        };
        if changed {
            // The task holds a channel to the old address; the next message starts a new one.
            self.queues.remove(id);
        }
    }
}

/// A coordinator peer's endpoint at `address`, with the transport's connect and call bounds.
pub(super) fn endpoint(tls: &ClusterTls, address: &str) -> Result<Endpoint, Status> {
    Ok(tls
        .endpoint(address, Role::Coordinator)?
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(SEND_TIMEOUT))
}

/// Sends peer `to`'s queue, one message at a time. A failed send drops what is queued
/// behind it too: those messages are as stale as the one that failed, and Raft resends.
async fn peer_task(
    to: u64,
    addresses: Addresses,
    own: Arc<str>,
    tls: ClusterTls,
    mut rx: mpsc::Receiver<Message>,
) {
    let mut client: Option<(String, RaftClient<Channel>)> = None;
    while let Some(msg) = rx.recv().await {
        let span = tracing::trace_span!("raft_send", to, kind = ?msg.get_msg_type());
        let _enter = span.enter();
        let Some(address) = addresses
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&to)
            .cloned()
        else {
            tracing::debug!(to, "no address for raft peer; message dropped");
            continue;
        };
        if client.as_ref().is_none_or(|(a, _)| *a != address) {
            match endpoint(&tls, &address) {
                Ok(e) => client = Some((address.clone(), RaftClient::new(e.connect_lazy()))),
                Err(e) => {
                    tracing::warn!(to, %address, "bad raft peer address: {}", e.message());
                    continue;
                }
            }
        }
        let Some((_, c)) = client.as_mut() else {
            continue;
        };
        let bytes = match msg.write_to_bytes() {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(to, "cannot encode a raft message: {e}");
                continue;
            }
        };
        drop(_enter);
        let sent = c
            .send(RaftMessage {
                message: bytes,
                from_address: own.to_string(),
            })
            .await;
        if let Err(status) = sent {
            tracing::debug!(to, %address, "raft send failed: {status}");
            while rx.try_recv().is_ok() {}
        }
    }
}

/// The `tessera.cluster.v1.Raft` service: hands received messages to the local node.
#[derive(Clone)]
pub struct RaftService {
    handle: RaftHandle,
    transport: Arc<GrpcTransport>,
}

impl std::fmt::Debug for RaftService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftService")
            .field("node", &self.handle.status().id)
            .finish_non_exhaustive()
    }
}

impl RaftService {
    /// A service stepping into `handle`'s node, whose messages leave through `transport`
    /// (which learns the addresses of senders it has none for).
    pub fn new(handle: RaftHandle, transport: Arc<GrpcTransport>) -> Self {
        RaftService { handle, transport }
    }

    /// The tonic server to add to a router.
    pub fn into_server(self) -> RaftServer<Self> {
        RaftServer::new(self)
    }
}

#[tonic::async_trait]
impl Raft for RaftService {
    async fn send(&self, request: Request<RaftMessage>) -> Result<Response<RaftAck>, Status> {
        let caller = self.tls().authorize(&request, &[Role::Coordinator])?;
        let msg = Message::parse_from_bytes(&request.get_ref().message)
            .map_err(|e| RaftError::InvalidMessage(format!("not a raft message: {e}")))?;
        if let Some(caller) = caller
            && caller.coordinator_id() != Some(msg.from)
        {
            tracing::warn!(%caller, claimed = msg.from, "raft message refused: sender is not the caller");
            return Err(Status::permission_denied(format!(
                "{caller} may not send raft messages as node {}",
                msg.from
            )));
        }
        if msg.to != self.handle.id() {
            return Err(Status::invalid_argument(format!(
                "message: addressed to node {}, this is node {}",
                msg.to,
                self.handle.id()
            )));
        }
        if !self.handle.admits_sender(msg.from) {
            tracing::warn!(from = msg.from, kind = ?msg.get_msg_type(), "raft message from a non-member refused");
            return Err(Status::permission_denied(format!(
                "node {} is not a member of this raft group",
                msg.from
            )));
        }
        self.transport
            .learn(msg.from, &request.get_ref().from_address);
        let _span = tracing::trace_span!("raft_recv", from = msg.from, kind = ?msg.get_msg_type())
            .entered();
        self.handle.step(msg)?;
        Ok(Response::new(RaftAck {}))
    }

    async fn add_member(
        &self,
        request: Request<AddMemberRequest>,
    ) -> Result<Response<MembersResponse>, Status> {
        self.tls()
            .authorize(&request, &[Role::Coordinator, Role::Admin])?;
        let req = request.into_inner();
        tracing::info!(id = req.id, address = %req.address, "add member");
        if req.id == 0 {
            return Err(Status::invalid_argument("id: node ids start at 1"));
        }
        if req.address.is_empty() {
            return Err(Status::invalid_argument("address: required (host:port)"));
        }
        match self
            .handle
            .add_member(req.id, req.address.clone(), CATCH_UP)
            .await
        {
            Err(RaftError::NotLeader { leader: Some(l) }) => {
                let mut leader = self.leader_client(l)?;
                leader.add_member(req).await
            }
            r => Ok(Response::new(members(r?))),
        }
    }

    async fn remove_member(
        &self,
        request: Request<RemoveMemberRequest>,
    ) -> Result<Response<MembersResponse>, Status> {
        self.tls()
            .authorize(&request, &[Role::Coordinator, Role::Admin])?;
        let req = request.into_inner();
        tracing::info!(id = req.id, "remove member");
        if req.id == 0 {
            return Err(Status::invalid_argument("id: node ids start at 1"));
        }
        let st = self.handle.status();
        if !st.members.voters.contains(&req.id) && !st.members.learners.contains(&req.id) {
            return Err(Status::invalid_argument(format!(
                "id: node {} is not a member (members: {:?})",
                req.id, st.members.voters
            )));
        }
        match self.handle.remove_member(req.id).await {
            Err(RaftError::NotLeader { leader: Some(l) }) => {
                let mut leader = self.leader_client(l)?;
                leader.remove_member(req).await
            }
            r => Ok(Response::new(members(r?))),
        }
    }

    async fn members(
        &self,
        request: Request<MembersRequest>,
    ) -> Result<Response<MembersResponse>, Status> {
        self.tls()
            .authorize(&request, &[Role::Coordinator, Role::Admin])?;
        let st = self.handle.status();
        match (st.role, st.leader) {
            (super::RaftRole::Leader, _) => Ok(Response::new(members(st.members))),
            (_, Some(l)) => self.leader_client(l)?.members(request.into_inner()).await,
            (_, None) => Err(Status::unavailable(
                "no leader known (an election, or cut off from the majority); retry",
            )),
        }
    }
}

impl RaftService {
    fn tls(&self) -> &ClusterTls {
        &self.transport.tls
    }

    /// A client to the leader `id`, for forwarding a membership change.
    fn leader_client(&self, id: u64) -> Result<RaftClient<Channel>, Status> {
        let address = self
            .handle
            .status()
            .addresses
            .get(&id)
            .cloned()
            .ok_or_else(|| Status::unavailable(format!("no address known for leader {id}")))?;
        // No per-call timeout here: an add waits for the new member to catch up.
        let e = endpoint(self.tls(), &address)?.timeout(CATCH_UP * 3);
        Ok(RaftClient::new(e.connect_lazy()))
    }
}

fn members(m: super::Members) -> MembersResponse {
    MembersResponse {
        voters: m.voters,
        learners: m.learners,
    }
}
