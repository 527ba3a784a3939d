//! `tessera cluster add-coordinator` / `remove-coordinator`: membership changes of the
//! replicated coordinators, sent to any coordinator's cluster port (membership is part of the
//! cluster protocol, `tessera.cluster.v1.Raft`; the public port answers UNIMPLEMENTED). A
//! follower forwards them to the leader.

use std::time::Duration;

use anyhow::Result;
use clap::{Args, Subcommand};
use tessera_proto::cluster::v1::raft_client::RaftClient;
use tessera_proto::cluster::v1::{AddMemberRequest, MembersResponse, RemoveMemberRequest};

use super::client::{DEFAULT_CLUSTER_ENDPOINT, channel, status_error};

/// `tessera cluster …`.
#[derive(Subcommand, Debug)]
pub enum ClusterCommand {
    /// Adds a coordinator (it must already run with `--join` and an empty data dir): it
    /// catches up as a learner, then becomes a voter. An unreachable one is refused.
    AddCoordinator(AddArgs),
    /// Removes a coordinator from the voters. The last one cannot be removed.
    RemoveCoordinator(RemoveArgs),
}

/// Arguments of `add-coordinator`.
#[derive(Args, Debug)]
pub struct AddArgs {
    /// Any current coordinator's cluster port (its --advertise / --cluster-listen address, not
    /// the public API's --listen): membership is a cluster operation.
    #[arg(long, default_value = DEFAULT_CLUSTER_ENDPOINT)]
    pub endpoint: String,
    /// The new coordinator's Raft node id (>= 1).
    #[arg(long, value_parser = super::serve::parse_id)]
    pub id: u64,
    /// The new coordinator's cluster address, HOST:PORT (its --advertise).
    #[arg(long)]
    pub address: String,
}

/// Arguments of `remove-coordinator`.
#[derive(Args, Debug)]
pub struct RemoveArgs {
    /// Any current coordinator's cluster port (its --advertise / --cluster-listen address, not
    /// the public API's --listen): membership is a cluster operation.
    #[arg(long, default_value = DEFAULT_CLUSTER_ENDPOINT)]
    pub endpoint: String,
    /// The node id to remove.
    #[arg(long, value_parser = super::serve::parse_id)]
    pub id: u64,
}

/// Runs `tessera cluster …`.
///
/// # Errors
/// When the coordinator cannot be reached or refuses the change (with its reason).
pub async fn run(cmd: ClusterCommand) -> Result<()> {
    let members = match cmd {
        ClusterCommand::AddCoordinator(a) => client(&a.endpoint)
            .await?
            .add_member(AddMemberRequest {
                id: a.id,
                address: a.address,
            })
            .await
            .map_err(|s| membership_error(s, &a.endpoint))?
            .into_inner(),
        ClusterCommand::RemoveCoordinator(r) => client(&r.endpoint)
            .await?
            .remove_member(RemoveMemberRequest { id: r.id })
            .await
            .map_err(|s| membership_error(s, &r.endpoint))?
            .into_inner(),
    };
    print_members(&members);
    Ok(())
}

/// A refused change, with a hint when `endpoint` is not a cluster port at all (a public port
/// answers UNIMPLEMENTED to the Raft service).
fn membership_error(s: tonic::Status, endpoint: &str) -> anyhow::Error {
    if s.code() == tonic::Code::Unimplemented {
        anyhow::anyhow!(
            "{endpoint} does not serve the cluster protocol: pass a coordinator's cluster port \
             (its --advertise / --cluster-listen address), not its public --listen address \
             ({:?}: {})",
            s.code(),
            s.message()
        )
    } else {
        status_error(s)
    }
}

/// A Raft client of the coordinator at `endpoint`, which must answer within 3 s.
async fn client(endpoint: &str) -> Result<RaftClient<tonic::transport::Channel>> {
    let channel = channel(endpoint, Duration::from_secs(3))
        .await
        .map_err(|e| e.into_error("no coordinator's cluster port answers there"))?;
    Ok(RaftClient::new(channel))
}

fn print_members(m: &MembersResponse) {
    let list = |v: &[u64]| v.iter().map(u64::to_string).collect::<Vec<_>>().join(",");
    println!("voters {}  learners {}", list(&m.voters), list(&m.learners));
}
