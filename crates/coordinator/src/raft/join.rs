//! Self-join: a coordinator started with the founders' `--peers` but an id not among them
//! asks the cluster to add it, so that scaling a StatefulSet up needs nothing but more pods.
//!
//! Why the node asks for itself rather than waiting for an operator (`tessera cluster
//! add-coordinator`, which an explicit `--join` still waits for): Kubernetes readiness is "a
//! voter that knows its leader", so a pod that waits to be added is never ready, and a Helm
//! hook that would add it runs only once the release's pods are ready — under `helm upgrade
//! --wait`, never. The request is the ordinary `Raft.AddMember` for its own id at its own
//! `--advertise`, sent with its own coordinator certificate (coordinators may change
//! membership); the leader adds it as a learner, waits for it to catch up (this node's Raft
//! loop already runs, so the snapshot and log reach it), then makes it a voter.
//!
//! Failure semantics: it retries with capped backoff — the founders may not be up yet, another
//! membership change may be in progress (ABORTED), the leader may be changing — until this
//! node shows up as a voter in its own applied membership, then returns. It never gives up
//! while the process runs, and never blocks anything else: the node serves its ports (not
//! ready) meanwhile.

use std::time::Duration;

use tessera_proto::cluster::v1::AddMemberRequest;
use tessera_proto::cluster::v1::raft_client::RaftClient;
use tessera_tls::ClusterTls;

use super::RaftHandle;

/// First retry delay; doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Bound on one AddMember call: the leader waits for the learner to catch up (5 s) first.
const ADD_TIMEOUT: Duration = Duration::from_secs(20);

/// Asks the coordinators at `peers` (cluster addresses, any order) to add node `id` at
/// `advertise`, until `raft` shows it as a voter.
pub async fn self_join(
    raft: RaftHandle,
    tls: ClusterTls,
    id: u64,
    advertise: String,
    peers: Vec<String>,
) {
    let mut status = raft.watch_status();
    let mut backoff = FIRST_BACKOFF;
    loop {
        if status.borrow_and_update().members.voters.contains(&id) {
            tracing::info!(id, "joined the cluster as a voter");
            return;
        }
        for peer in &peers {
            match ask(&tls, peer, id, &advertise).await {
                Ok(()) => break,
                Err(e) => tracing::debug!(id, %peer, error = %e, "asking to be added failed"),
            }
        }
        // Whatever the answer, the applied membership decides; wait for it to change or for
        // the next try.
        tokio::select! {
            _ = status.changed() => {}
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// One AddMember for `id` at `advertise`, sent to `peer` (a follower forwards it).
async fn ask(tls: &ClusterTls, peer: &str, id: u64, advertise: &str) -> Result<(), String> {
    let status = |s: tonic::Status| format!("{:?}: {}", s.code(), s.message());
    let endpoint = super::grpc::endpoint(tls, peer)
        .map_err(status)?
        .timeout(ADD_TIMEOUT);
    // An error that only says it is a voter already (an earlier try's answer was lost) is
    // settled by the membership check of the caller's next round.
    RaftClient::new(endpoint.connect_lazy())
        .add_member(AddMemberRequest {
            id,
            address: advertise.to_owned(),
        })
        .await
        .map(drop)
        .map_err(status)
}
