//! `tessera cluster scale`: makes the coordinators' voters exactly a wanted list, one
//! membership change at a time — what the Helm chart's hook Jobs run when
//! `coordinator.replicas` changes (a pre-upgrade Job removes, a post-upgrade Job adds).
//!
//! Each round reads the membership from the leader (`Raft.Members`, through any coordinator),
//! decides the next change ([`next_change`]) and makes it, until nothing is left to do. Rounds
//! that fail (a new coordinator's pod not started yet, so it cannot catch up; an election in
//! progress) are retried until `--timeout`. Re-running it is harmless: a list already in place
//! changes nothing.
//!
//! Order: stale learners go first (a failed earlier add leaves none, but an interrupted one
//! may); then missing voters are added, lowest id first, each caught up before the next; then
//! voters not wanted are removed, highest id first — a StatefulSet's scale-down deletes its
//! highest ordinals, and removing them before their pods go (the pre-upgrade hook) keeps a
//! quorum of running voters at every step, however far it shrinks.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Result;
use tessera_proto::cluster::v1::{
    AddMemberRequest, MembersRequest, MembersResponse, RemoveMemberRequest,
};

use super::cluster::{ScaleArgs, ScaleOnly, client, membership_error};

/// Pause between failed rounds.
const RETRY: Duration = Duration::from_secs(2);

/// One membership change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Add node `id` at `address` (as a learner, promoted once caught up).
    Add { id: u64, address: String },
    /// Remove node `id`.
    Remove { id: u64 },
}

/// The next change that brings `members` toward `wanted` (id → address) within `only`;
/// `None` when there is nothing left to do.
pub fn next_change(
    members: &MembersResponse,
    wanted: &BTreeMap<u64, String>,
    only: Option<ScaleOnly>,
) -> Option<Change> {
    let adds = only != Some(ScaleOnly::Remove);
    let removes = only != Some(ScaleOnly::Add);
    // A learner is a member half added: wanted, it is removed and added again from scratch
    // (only when adding); not wanted, it goes (only when removing).
    if let Some(&id) = members.learners.iter().rev().find(|id| {
        if wanted.contains_key(id) {
            adds
        } else {
            removes
        }
    }) {
        return Some(Change::Remove { id });
    }
    if adds && let Some((&id, address)) = wanted.iter().find(|(id, _)| !members.voters.contains(id))
    {
        return Some(Change::Add {
            id,
            address: address.clone(),
        });
    }
    if removes
        && let Some(&id) = members
            .voters
            .iter()
            .rev()
            .find(|id| !wanted.contains_key(id))
    {
        return Some(Change::Remove { id });
    }
    None
}

/// Runs `tessera cluster scale`; the membership it left.
///
/// # Errors
/// When no coordinator answers, or a change keeps failing, until `--timeout`; or when the
/// wanted list is empty.
pub(super) async fn run(a: &ScaleArgs) -> Result<MembersResponse> {
    anyhow::ensure!(!a.voters.is_empty(), "--voters: at least one coordinator");
    let deadline = Instant::now() + Duration::from_secs(a.timeout);
    loop {
        match round(a).await {
            Ok(None) => {}
            Ok(Some(done)) => return Ok(done),
            Err(e) if Instant::now() < deadline => {
                eprintln!("{e:#}; retrying in {RETRY:?}");
                tokio::time::sleep(RETRY).await;
            }
            Err(e) => {
                return Err(e.context(format!(
                    "the voters are not {:?} after {} s",
                    a.voters.keys().collect::<Vec<_>>(),
                    a.timeout
                )));
            }
        }
    }
}

/// One round: reads the membership and makes the next change. `Some(membership)` when there
/// was nothing left to do.
async fn round(a: &ScaleArgs) -> Result<Option<MembersResponse>> {
    let mut last = None;
    for endpoint in &a.endpoint {
        let mut raft = match client(endpoint, &a.operator).await {
            Ok(c) => c,
            Err(e) => {
                last = Some(e);
                continue;
            }
        };
        let members = raft
            .members(MembersRequest {})
            .await
            .map_err(|s| membership_error(s, endpoint))?
            .into_inner();
        let Some(change) = next_change(&members, &a.voters, a.only) else {
            return Ok(Some(members));
        };
        println!("{change:?}");
        let after = match change {
            Change::Add { id, address } => raft.add_member(AddMemberRequest { id, address }).await,
            Change::Remove { id } => raft.remove_member(RemoveMemberRequest { id }).await,
        }
        .map_err(|s| membership_error(s, endpoint))?
        .into_inner();
        super::cluster::print_members(&after);
        return Ok(None);
    }
    Err(last
        .unwrap_or_else(|| anyhow::anyhow!("no endpoint given"))
        .context("no coordinator answers"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(voters: &[u64], learners: &[u64]) -> MembersResponse {
        MembersResponse {
            voters: voters.to_vec(),
            learners: learners.to_vec(),
        }
    }

    fn wanted(n: u64) -> BTreeMap<u64, String> {
        (1..=n).map(|id| (id, format!("c{id}:7001"))).collect()
    }

    /// Applies changes until none is left (at most 20); the changes made.
    fn converge(
        mut m: MembersResponse,
        want: &BTreeMap<u64, String>,
        only: Option<ScaleOnly>,
    ) -> (MembersResponse, Vec<Change>) {
        let mut made = Vec::new();
        while let Some(c) = next_change(&m, want, only) {
            match &c {
                Change::Add { id, .. } => {
                    m.voters.push(*id);
                    m.voters.sort_unstable();
                }
                Change::Remove { id } => {
                    m.voters.retain(|v| v != id);
                    m.learners.retain(|v| v != id);
                }
            }
            made.push(c);
            assert!(made.len() <= 20, "does not converge: {made:?}");
        }
        (m, made)
    }

    /// Ensures that a scale-up adds the missing voters lowest id first and a scale-down removes
    /// the extra ones highest id first, that each hook's half does only its part, and that a
    /// list already in place changes nothing.
    #[test]
    fn three_to_five_to_three() {
        let add = |id: u64| Change::Add {
            id,
            address: format!("c{id}:7001"),
        };
        let (five, made) = converge(members(&[1, 2, 3], &[]), &wanted(5), None);
        assert_eq!(made, [add(4), add(5)]);
        assert_eq!(five.voters, [1, 2, 3, 4, 5]);
        // The pre-upgrade hook of a scale-up has nothing to remove.
        assert_eq!(
            next_change(
                &members(&[1, 2, 3], &[]),
                &wanted(5),
                Some(ScaleOnly::Remove)
            ),
            None
        );
        let (three, made) = converge(five.clone(), &wanted(3), Some(ScaleOnly::Remove));
        assert_eq!(made, [Change::Remove { id: 5 }, Change::Remove { id: 4 }]);
        assert_eq!(three.voters, [1, 2, 3]);
        // The post-upgrade hook of a scale-down has nothing to add.
        assert_eq!(next_change(&five, &wanted(3), Some(ScaleOnly::Add)), None);
        assert_eq!(next_change(&three, &wanted(3), None), None);
    }

    /// Ensures that a learner left by an interrupted add is added again from scratch when
    /// wanted, and removed when not.
    #[test]
    fn stale_learners_are_redone_or_removed() {
        let m = members(&[1, 2, 3], &[4]);
        assert_eq!(
            next_change(&m, &wanted(4), Some(ScaleOnly::Add)),
            Some(Change::Remove { id: 4 })
        );
        let (done, _) = converge(m.clone(), &wanted(4), None);
        assert_eq!((done.voters, done.learners), (vec![1, 2, 3, 4], vec![]));
        assert_eq!(next_change(&m, &wanted(4), Some(ScaleOnly::Remove)), None);
        let (done, made) = converge(m, &wanted(3), None);
        assert_eq!(made, [Change::Remove { id: 4 }]);
        assert!(done.learners.is_empty());
    }
}
