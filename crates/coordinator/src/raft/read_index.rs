//! Linearizable reads by Raft's ReadIndex: the node's bookkeeping between a handle's
//! [`read_index`](super::RaftHandle::read_index) request and its answer.
//!
//! A read is answered with an index `i` only after three things, in order:
//! 1. the node is the leader and has committed an entry of its own term (before that its
//!    commit index may be behind a previous leader's, and raft-rs 0.7 silently drops read
//!    requests, so they wait here instead);
//! 2. raft-rs has confirmed, by a quorum of heartbeat acknowledgements carrying the request's
//!    context, that the node was still the leader when the request was made; `i` is its commit
//!    index at that moment, so it covers every command that completed before the request;
//! 3. the node has applied up to `i`.
//!
//! After that, reading the local state machine is linearizable. A request that loses its
//! leadership on the way fails with [`RaftError::NotLeader`]: a read has no effect, so failing
//! is always safe and the caller may retry elsewhere.

use std::collections::BTreeMap;

use raft::{RawNode, ReadState, StateRole};
use tokio::sync::oneshot;

use super::{RaftError, RedbStorage, Result};

type Reply = oneshot::Sender<Result<u64>>;

/// The reads of one node, at every stage.
#[derive(Default)]
pub(super) struct Reads {
    next_ctx: u64,
    /// Requested, not yet handed to raft-rs, with the term they were requested in.
    waiting: Vec<(u64, Reply)>,
    /// Handed to raft-rs, by request context, with the term they were issued in.
    issued: BTreeMap<u64, (u64, Reply)>,
    /// Confirmed by a quorum: answered once the index is applied.
    confirmed: Vec<(u64, Reply)>,
}

impl Reads {
    /// Queues a read requested while leader of `term`.
    pub(super) fn request(&mut self, term: u64, reply: Reply) {
        self.waiting.push((term, reply));
    }

    /// Fails the reads whose leadership is gone, and hands the waiting ones to raft-rs once
    /// this leader has committed an entry of its term. Called before each Ready.
    pub(super) fn issue(&mut self, raw: &mut RawNode<RedbStorage>) {
        if self.waiting.is_empty() && self.issued.is_empty() {
            return;
        }
        let r = &raw.raft;
        let (term, leading) = (r.term, r.state == StateRole::Leader);
        if !leading || self.issued.values().any(|(t, _)| *t != term) {
            // raft-rs forgets pending reads when the term or role changes (`reset`).
            let leader = (r.leader_id != 0).then_some(r.leader_id);
            let stale = |t: u64| !leading || t != term;
            for (_, reply) in self.waiting.extract_if(.., |(t, _)| stale(*t)) {
                let _ = reply.send(Err(RaftError::NotLeader { leader }));
            }
            let gone: Vec<u64> = self
                .issued
                .iter()
                .filter(|(_, (t, _))| stale(*t))
                .map(|(ctx, _)| *ctx)
                .collect();
            for ctx in gone {
                if let Some((_, reply)) = self.issued.remove(&ctx) {
                    let _ = reply.send(Err(RaftError::NotLeader { leader }));
                }
            }
        }
        if leading && raw.raft.commit_to_current_term() {
            for (t, reply) in std::mem::take(&mut self.waiting) {
                let ctx = self.next_ctx;
                self.next_ctx += 1;
                raw.read_index(ctx.to_le_bytes().to_vec());
                self.issued.insert(ctx, (t, reply));
            }
        }
    }

    /// Takes the read states of a Ready: those reads are confirmed at their index.
    pub(super) fn confirmed(&mut self, states: Vec<ReadState>) {
        for rs in states {
            let Ok(bytes) = <[u8; 8]>::try_from(rs.request_ctx.as_slice()) else {
                continue;
            };
            if let Some((_, reply)) = self.issued.remove(&u64::from_le_bytes(bytes)) {
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
            .chain(self.confirmed);
        for (_, reply) in all {
            let _ = reply.send(Err(RaftError::Stopped(id)));
        }
    }
}
