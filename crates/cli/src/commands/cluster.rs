//! `tessera cluster add-coordinator` / `remove-coordinator` / `scale`: membership changes of the
//! replicated coordinators, sent to any coordinator's cluster port (membership is part of the
//! cluster protocol, `tessera.cluster.v1.Raft`; the public port answers UNIMPLEMENTED). A
//! follower forwards them to the leader.
//!
//! Under mutual TLS they present an operator's certificate (`admin-<name>.pem`, which
//! `tessera certs` issues as `admin-operator.pem`): `--certs DIR [--as NAME]`, or the
//! certificate's files one by one.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Result;
use clap::{Args, Subcommand};
use tessera_proto::cluster::v1::raft_client::RaftClient;
use tessera_proto::cluster::v1::{AddMemberRequest, MembersResponse, RemoveMemberRequest};

use tessera_tls::{Identity, Role};

use super::certs::{ClusterTlsArgs, OPERATOR};
use super::client::{DEFAULT_CLUSTER_ENDPOINT, status_error};

/// `tessera cluster …`.
#[derive(Subcommand, Debug)]
pub enum ClusterCommand {
    /// Adds a coordinator (it must already run with `--join` and an empty data dir): it
    /// catches up as a learner, then becomes a voter. An unreachable one is refused.
    AddCoordinator(AddArgs),
    /// Removes a coordinator from the voters. The last one cannot be removed.
    RemoveCoordinator(RemoveArgs),
    /// Makes the voters exactly the given coordinators: adds those missing (one at a time,
    /// retrying while one is not up yet) and removes the others (highest id first). What the
    /// Helm chart's hook Jobs run when `coordinator.replicas` changes.
    Scale(ScaleArgs),
}

/// Which changes `scale` makes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ScaleOnly {
    /// Only add the missing coordinators (after a scale-up's pods start).
    Add,
    /// Only remove the extra ones (before a scale-down's pods go, so a quorum stays).
    Remove,
}

/// Arguments of `scale`.
#[derive(Args, Debug)]
pub struct ScaleArgs {
    /// Current coordinators' cluster ports, comma-separated: the first that answers is asked
    /// (a follower forwards to the leader).
    #[arg(long, default_value = DEFAULT_CLUSTER_ENDPOINT, value_delimiter = ',')]
    pub endpoint: Vec<String>,
    /// The voters there should be, at their cluster addresses: `1=HOST:PORT,2=HOST:PORT,...`
    /// (as `tessera coordinator --peers` spells it).
    #[arg(long, value_parser = super::serve::parse_peers)]
    pub voters: BTreeMap<u64, String>,
    /// Make only these changes (default: both).
    #[arg(long, value_enum)]
    pub only: Option<ScaleOnly>,
    /// How long to keep trying (a new coordinator's pod may still be starting).
    #[arg(long, default_value = "600", value_name = "SECONDS")]
    pub timeout: u64,
    /// Who makes the change.
    #[command(flatten)]
    pub operator: OperatorArgs,
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
    /// Who makes the change.
    #[command(flatten)]
    pub operator: OperatorArgs,
}

/// The operator's credentials on the cluster protocol.
#[derive(Args, Debug)]
pub struct OperatorArgs {
    /// The operator's name: with --certs, its certificate is admin-<name>.pem.
    #[arg(long = "as", default_value = OPERATOR)]
    pub name: String,
    /// The certificates (or `--insecure-cluster` for a cluster that runs without).
    #[command(flatten)]
    pub tls: ClusterTlsArgs,
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
    /// Who makes the change.
    #[command(flatten)]
    pub operator: OperatorArgs,
}

/// Runs `tessera cluster …`.
///
/// # Errors
/// When the coordinator cannot be reached or refuses the change (with its reason).
pub async fn run(cmd: ClusterCommand) -> Result<()> {
    let members = match cmd {
        ClusterCommand::AddCoordinator(a) => client(&a.endpoint, &a.operator)
            .await?
            .add_member(AddMemberRequest {
                id: a.id,
                address: a.address,
            })
            .await
            .map_err(|s| membership_error(s, &a.endpoint))?
            .into_inner(),
        ClusterCommand::RemoveCoordinator(r) => client(&r.endpoint, &r.operator)
            .await?
            .remove_member(RemoveMemberRequest { id: r.id })
            .await
            .map_err(|s| membership_error(s, &r.endpoint))?
            .into_inner(),
        ClusterCommand::Scale(a) => super::scale::run(&a).await?,
    };
    print_members(&members);
    Ok(())
}

/// A refused change, with a hint when `endpoint` is not a cluster port at all (a public port
/// answers UNIMPLEMENTED to the Raft service).
pub(super) fn membership_error(s: tonic::Status, endpoint: &str) -> anyhow::Error {
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
pub(super) async fn client(
    endpoint: &str,
    operator: &OperatorArgs,
) -> Result<RaftClient<tonic::transport::Channel>> {
    let tls = operator
        .tls
        .load(&Identity::new(Role::Admin, &operator.name)?)?;
    let target = tls
        .endpoint(endpoint, Role::Coordinator)
        .map_err(status_error)?
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(30));
    let channel = tokio::time::timeout(Duration::from_secs(6), target.connect())
        .await
        .map_err(|_| {
            anyhow::anyhow!("{endpoint} accepted the connection but did not answer within 6 s")
        })?
        .map_err(|e| {
            // rustls's word for a server that answered the handshake in plain text.
            // The whole chain, as text: which failure it was is only said in the sources.
            let mut detail = format!("{e:?}");
            let mut source: Option<&dyn std::error::Error> = Some(&e);
            while let Some(s) = source {
                detail.push_str(&format!(" {s}"));
                source = s.source();
            }
            if detail.contains("handshake timeout") {
                return anyhow::anyhow!(
                    "{endpoint} accepted the connection but did not answer the TLS handshake \
                     within {:?}: is it a tessera cluster port (and is the process there \
                     running, not stopped)?",
                    tessera_tls::HANDSHAKE_TIMEOUT
                );
            }
            if tls.is_mutual() && detail.contains("InvalidContentType") {
                return anyhow::anyhow!(
                    "{endpoint} does not serve the cluster protocol: it answers in plain text, \
                     not mutual TLS. Pass a coordinator's cluster port (its --advertise / \
                     --cluster-listen address), not its public --listen address (or \
                     --insecure-cluster for a cluster that runs without TLS)"
                );
            }
            anyhow::Error::new(e).context(format!(
                "no coordinator's cluster port answers at {endpoint} (with mutual TLS, check \
                 that the coordinator and this certificate share a CA)"
            ))
        })?;
    Ok(RaftClient::new(channel))
}

pub(super) fn print_members(m: &MembersResponse) {
    let list = |v: &[u64]| v.iter().map(u64::to_string).collect::<Vec<_>>().join(",");
    println!("voters {}  learners {}", list(&m.voters), list(&m.learners));
}
