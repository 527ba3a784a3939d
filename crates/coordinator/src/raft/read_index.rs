//! Linearizable reads by Raft's ReadIndex: the node's bookkeeping between a handle's
//! [`read_index`](super::RaftHandle::read_index) request and its answer, on the leader and on
//! followers.
//!
//! A read is answered with an index `i` only after three things, in order:
//! 1. the leader has committed an entry of its own term (before that its commit index may be
//!    behind a previous leader's, and raft-rs 0.7 silently drops read requests, so the
//!    leader's own reads wait here instead; a follower's request is forwarded by raft-rs at
//!    once, and one the leader dropped is answered by the caller's timeout);
//! 2. raft-rs on the leader has confirmed, by a quorum of heartbeat acknowledgements carrying
//!    the request's context, that it was still the leader when the request was made; `i` is
//!    its commit index at that moment, so it covers every command that completed before the
//!    request (a follower gets `i` back in a `MsgReadIndexResp`);
//! 3. this node has applied up to `i`.
//!
//! After that, reading the local state machine is linearizable, on a follower as on the
//! leader. A read whose term or leader changes on the way fails with [`RaftError::NotLeader`]
//! (raft-rs forgets pending reads on a term or role change, on both sides): a read has no
//! effect, so failing is always safe and the caller may retry elsewhere.
//!
//! Request contexts are unique across the cluster and across restarts (node id, a random
//! incarnation, a counter): the leader keys its pending reads by context and ignores a
//! duplicate, so two nodes (or two incarnations of one) using the same context would lose a
//! read.

use std::collections::BTreeMap;
use std::hash::{BuildHasher, Hasher};

use raft::{RawNode, ReadState, StateRole};
use tokio::sync::oneshot;

use super::{RaftError, RedbStorage, Result};

type Reply = oneshot::Sender<Result<u64>>;

/// Where a read was requested: the term, and the leader then (this node for its own reads).
#[derive(Clone, Copy, PartialEq, Eq)]
struct Origin {
    term: u64,
    leader: u64,
}

/// The reads of one node, at every stage.
pub(super) struct Reads {
    /// This node's id and incarnation: the first 16 bytes of every context it issues.
    prefix: [u8; 16],
    next_ctx: u64,
    /// Requested, not yet handed to raft-rs.
    waiting: Vec<(Origin, Reply)>,
    /// Handed to raft-rs, by request context.
    issued: BTreeMap<u64, (Origin, Reply)>,
    /// Confirmed by a quorum: answered once the index is applied.
    confirmed: Vec<(u64, Reply)>,
}

impl Reads {
    /// The reads of node `id`, with contexts no earlier incarnation of it used.
    pub(super) fn new(id: u64) -> Self {
        // std's RandomState is seeded from the OS's randomness.
        let incarnation = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        let mut prefix = [0; 16];
        prefix[..8].copy_from_slice(&id.to_le_bytes());
        prefix[8..].copy_from_slice(&incarnation.to_le_bytes());
        Self {
            prefix,
            next_ctx: 0,
            waiting: Vec::new(),
            issued: BTreeMap::new(),
            confirmed: Vec::new(),
        }
    }

    /// Queues a read requested in `term` while `leader` leads (this node's id when it leads).
    pub(super) fn request(&mut self, term: u64, leader: u64, reply: Reply) {
        self.waiting.push((Origin { term, leader }, reply));
    }

    /// Fails the reads whose term or leader is gone, forgets those whose caller gave up, and
    /// hands the waiting ones to raft-rs: a leader's once it has committed an entry of its
    /// term, a follower's at once. Called before each Ready.
    pub(super) fn issue(&mut self, raw: &mut RawNode<RedbStorage>) {
        if self.waiting.is_empty() && self.issued.is_empty() {
            return;
        }
        let r = &raw.raft;
        let now = Origin {
            term: r.term,
            leader: r.leader_id,
        };
        let known = (r.leader_id != 0).then_some(r.leader_id);
        // raft-rs forgets pending reads when the term or role changes (`reset`), and a
        // follower's forwarded read dies with the leader it went to.
        let stale = |o: &Origin| *o != now || now.leader == 0;
        for (_, reply) in self.waiting.extract_if(.., |(o, _)| stale(o)) {
            let _ = reply.send(Err(RaftError::NotLeader { leader: known }));
        }
        let gone: Vec<u64> = self
            .issued
            .iter()
            .filter(|(_, (o, reply))| stale(o) || reply.is_closed())
            .map(|(ctx, _)| *ctx)
            .collect();
        for ctx in gone {
            if let Some((_, reply)) = self.issued.remove(&ctx) {
                let _ = reply.send(Err(RaftError::NotLeader { leader: known }));
            }
        }
        let leading = r.state == StateRole::Leader;
        if self.waiting.is_empty() || (leading && !raw.raft.commit_to_current_term()) {
            return;
        }
        for (origin, reply) in std::mem::take(&mut self.waiting) {
            let ctx = self.next_ctx;
            self.next_ctx += 1;
            let mut bytes = self.prefix.to_vec();
            bytes.extend_from_slice(&ctx.to_le_bytes());
            raw.read_index(bytes);
            self.issued.insert(ctx, (origin, reply));
        }
    }

    /// Takes the read states of a Ready: those reads are confirmed at their index.
    pub(super) fn confirmed(&mut self, states: Vec<ReadState>) {
        for rs in states {
            let Some(ctx) = rs
                .request_ctx
                .strip_prefix(self.prefix.as_slice())
                .and_then(|c| <[u8; 8]>::try_from(c).ok())
            else {
                continue;
            };
            if let Some((_, reply)) = self.issued.remove(&u64::from_le_bytes(ctx)) {
                self.confirmed.push((rs.index, reply));
            }
        }
    }

    /// Answers the confirmed reads whose index is applied. Called after the status (with
    /// `applied`) is published.
    pub(super) fn answer(&mut self, applied: u64) {
        for (index, reply) in self.confirmed.extract_if(.., |(i, _)| *i <= applied) {
            let _ = reply.send(Ok(index));
        }
    }

    /// Fails every read: node `id` stopped.
    pub(super) fn stop(self, id: u64) {
        let all = self
            .waiting
            .into_iter()
            .chain(self.issued.into_values())
            .map(|(_, reply)| reply)
            .chain(self.confirmed.into_iter().map(|(_, reply)| reply));
        for reply in all {
            let _ = reply.send(Err(RaftError::Stopped(id)));
        }
    }
}
