//! The Raft node: one thread owning a `raft::RawNode` over [`RedbStorage`], a
//! [`StateMachine`] and a [`Transport`], running the Ready loop.
//!
//! The loop is written once, in [`NodeLoop::on_ready`], following the raft-rs contract step
//! by step. Everything else here is plumbing: ticking, the mailbox, matching applied entries
//! to waiting proposers, compaction and the published status. It runs on a plain thread
//! because every persist is an fsync and must not stall an async runtime.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::Instant;

use protobuf::Message as _;
use raft::eraftpb::{
    ConfChange, ConfChangeSingle, ConfChangeType, ConfChangeV2, Entry, EntryType, Message,
    MessageType,
};
use raft::{RawNode, SnapshotStatus, StateRole};
use tokio::sync::{oneshot, watch};

use super::failpoint::{FailPoint, check};
use super::handle::{Command, Members, RaftHandle, RaftRole, RaftStatus};
use super::logger::logger;
use super::read_index::Reads;
use super::storage::{decode_peers, snapshot_state};
use super::{RaftConfig, RaftError, RedbStorage, Result, StateMachine, Transport};

/// Starts Raft nodes.
#[derive(Debug)]
pub struct RaftNode;

impl RaftNode {
    /// Starts node `config.id` on `storage` and returns its handle.
    ///
    /// `bootstrap` founds a new cluster when the storage is empty: the given members (id ->
    /// address) become the voters at index 1. It is ignored when the storage already holds a
    /// cluster (a restart), and `None` on an empty storage starts a node that waits to be
    /// added by the leader (it receives a snapshot). On start the state machine is restored
    /// from the stored snapshot; the log after it is re-applied by the loop.
    ///
    /// Must be called within a Tokio runtime when the transport needs one.
    ///
    /// # Errors
    /// [`RaftError::Storage`] when the stored snapshot cannot be read or restored;
    /// [`RaftError::Raft`] for an invalid configuration.
    pub fn start<S: StateMachine>(
        config: RaftConfig,
        mut storage: RedbStorage,
        mut state_machine: S,
        transport: Arc<dyn Transport>,
        bootstrap: Option<BTreeMap<u64, String>>,
    ) -> Result<RaftHandle> {
        let id = config.id;
        if let Some(peers) = bootstrap
            && !storage.is_initialized()
        {
            let conf = raft::eraftpb::ConfState::from((peers.keys().copied(), Vec::<u64>::new()));
            storage.initialize(conf, peers, &state_machine.snapshot())?;
        }
        storage.set_failpoints(config.failpoints.clone());
        let snap = storage.read_snapshot()?;
        let applied = snap.get_metadata().index;
        if applied > 0 {
            let state = snapshot_state(snap.get_data()).map_err(|e| storage_err(&storage, e))?;
            state_machine
                .restore(state)
                .map_err(|e| storage_err(&storage, format!("restore the state machine: {e}")))?;
        }
        for (peer, addr) in storage.peers() {
            transport.set_peer(*peer, Some(addr));
        }
        let raft_config = raft::Config {
            id,
            election_tick: config.election_ticks,
            heartbeat_tick: config.heartbeat_ticks,
            applied,
            pre_vote: config.pre_vote,
            check_quorum: config.check_quorum,
            max_size_per_msg: config.max_size_per_msg,
            max_inflight_msgs: config.max_inflight_msgs,
            ..Default::default()
        };
        raft_config.validate()?;
        let raw = RawNode::new(&raft_config, storage, &logger(id))?;
        let (tx, rx) = std::sync::mpsc::sync_channel(config.mailbox_capacity);
        let (status_tx, status_rx) = watch::channel(RaftStatus::initial(id));
        let handle = RaftHandle::new(id, tx, status_rx, config.proposal_timeout);
        let node = NodeLoop {
            raw,
            sm: state_machine,
            transport,
            rx,
            status: status_tx,
            pending: BTreeMap::new(),
            answers: Vec::new(),
            reads: Reads::new(id),
            applied,
            config,
        };
        // A panic in the loop (raft-rs asserts its invariants by panicking, e.g. a commit index
        // beyond a log that was lost) must not leave a process whose Raft is dead but whose
        // other parts still answer: it is caught and published as the node's failure, which
        // the coordinator turns into NOT_SERVING and a non-zero exit.
        let fatal = node.status.clone();
        std::thread::Builder::new()
            .name(format!("raft-{id}"))
            .spawn(move || {
                let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| node.run()));
                if let Err(panic) = run {
                    let what = panic_message(panic.as_ref());
                    tracing::error!(id, "the raft thread panicked: {what}");
                    fatal.send_modify(|s| {
                        s.running = false;
                        s.failure = Some(format!("the raft thread panicked: {what}"));
                    });
                }
            })
            .map_err(|e| {
                tracing::error!(id, "cannot spawn the raft thread: {e}");
                RaftError::Stopped(id)
            })?;
        Ok(handle)
    }
}

/// The message of a caught panic (a `&str` or `String` payload; anything else is unnamed).
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".to_owned())
}

fn storage_err(storage: &RedbStorage, message: impl std::fmt::Display) -> RaftError {
    storage.fail("snapshot", message)
}

/// Someone waiting for the entry at a log index.
enum Waiter {
    Command(oneshot::Sender<Result<Vec<u8>>>),
    Conf(oneshot::Sender<Result<Members>>),
}

/// What applying one entry produced.
enum Outcome {
    /// An empty entry (a new leader's, or a refused conf change).
    Empty,
    Command(std::result::Result<Vec<u8>, super::ApplyError>),
    Conf(Result<Members>),
}

/// The state owned by the node's thread. When the loop ends, `raw` (and with it the storage) is
/// dropped first, releasing the redb file, before anyone sees the mailbox close or the status
/// say the node stopped.
struct NodeLoop<S> {
    raw: RawNode<RedbStorage>,
    sm: S,
    transport: Arc<dyn Transport>,
    rx: Receiver<Command>,
    status: watch::Sender<RaftStatus>,
    /// Proposals by log index, with the term they were proposed in.
    pending: BTreeMap<u64, (u64, Waiter)>,
    /// Outcomes of this loop pass, answered after the status is published.
    answers: Vec<(Waiter, Outcome)>,
    /// Linearizable reads (ReadIndex) in progress.
    reads: Reads,
    applied: u64,
    config: RaftConfig,
}

impl<S: StateMachine> NodeLoop<S> {
    fn run(mut self) {
        let id = self.config.id;
        let _span = tracing::info_span!("raft_node", id).entered();
        let mut next_tick = Instant::now() + self.config.tick_interval;
        let mut stop = None;
        let mut crashed = None;
        let mut failure = None;
        loop {
            let wait = next_tick.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(wait) {
                Ok(cmd) => {
                    stop = self.handle(cmd);
                    // Take what else is queued, so one Ready covers a burst.
                    while stop.is_none() {
                        match self.rx.try_recv() {
                            Ok(cmd) => stop = self.handle(cmd),
                            Err(_) => break,
                        }
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            if stop.is_some() {
                break;
            }
            if Instant::now() >= next_tick {
                self.raw.tick();
                next_tick = Instant::now() + self.config.tick_interval;
            }
            self.reads.issue(&mut self.raw);
            if let Err(e) = self.on_ready().and_then(|()| self.maybe_compact()) {
                if let RaftError::Crashed(point) = e {
                    crashed = Some(point);
                } else {
                    // Storage or state machine failure: continuing could violate Raft's
                    // promises.
                    tracing::error!(id, "raft node stops: {e}");
                    failure = Some(e.to_string());
                }
                break;
            }
            self.publish_status();
            // Answered only now, so a proposer that gets its answer also sees it in the status.
            for (w, outcome) in self.answers.drain(..) {
                reply(w, outcome);
            }
            self.reads.answer(self.applied);
        }
        // The storage is released first, so that whoever sees the node stopped can reopen it.
        let NodeLoop {
            raw,
            sm,
            transport,
            rx,
            status,
            pending,
            answers,
            reads,
            ..
        } = self;
        drop(raw);
        drop((sm, transport, rx));
        status.send_modify(|s| {
            s.running = false;
            s.failure = failure;
        });
        if let Some(point) = crashed {
            // Like a killed process: nobody is answered; the waiters see the node stopped.
            tracing::warn!(id, %point, "raft node crashed at a failpoint");
            drop((answers, pending, reads));
        } else {
            for (w, outcome) in answers {
                reply(w, outcome);
            }
            for (_, (_, w)) in pending {
                reply(w, Outcome::Conf(Err(RaftError::Stopped(id))));
            }
            reads.stop(id);
        }
        if let Some(done) = stop {
            let _ = done.send(());
        }
    }

    /// Handles one mailbox command; returns the reply channel of a stop.
    fn handle(&mut self, cmd: Command) -> Option<oneshot::Sender<()>> {
        match cmd {
            Command::Step(m) => {
                if let Err(e) = self.raw.step(m) {
                    tracing::trace!("step: {e}");
                }
            }
            Command::Propose { data, reply } => {
                let r = self
                    .leader_check()
                    .and_then(|()| Ok(self.raw.propose(vec![], data)?));
                self.track(r, Waiter::Command(reply));
            }
            Command::ConfChange { cc, reply } => {
                let r = self
                    .leader_check()
                    .and_then(|()| Ok(self.raw.propose_conf_change(vec![], cc)?));
                self.track(r, Waiter::Conf(reply));
            }
            // Any member that knows the leader can serve a linearizable read: a follower's
            // goes to the leader for its index (read_index.rs).
            Command::ReadIndex(reply) => match self.raw.raft.leader_id {
                0 => {
                    let _ = reply.send(Err(RaftError::NotLeader { leader: None }));
                }
                leader => self.reads.request(self.raw.raft.term, leader, reply),
            },
            Command::Stop(done) => return Some(done),
        }
        None
    }

    fn leader_check(&self) -> Result<()> {
        let r = &self.raw.raft;
        if r.state == StateRole::Leader {
            Ok(())
        } else {
            Err(RaftError::NotLeader {
                leader: (r.leader_id != 0).then_some(r.leader_id),
            })
        }
    }

    /// Records a successful proposal's waiter under the index its entry got, or answers now.
    fn track(&mut self, proposed: Result<()>, waiter: Waiter) {
        match proposed {
            Ok(()) => {
                let index = self.raw.raft.raft_log.last_index();
                self.pending.insert(index, (self.raw.raft.term, waiter));
            }
            Err(RaftError::Raft(e)) => reply(
                waiter,
                Outcome::Conf(Err(RaftError::Dropped(e.to_string()))),
            ),
            Err(e) => reply(waiter, Outcome::Conf(Err(e))),
        }
    }

    /// One pass of the raft-rs Ready contract.
    fn on_ready(&mut self) -> Result<()> {
        if !self.raw.has_ready() {
            return Ok(());
        }
        let _span = tracing::trace_span!("raft_ready").entered();
        let mut ready = self.raw.ready();
        // Order matters; each step relies on the ones before it:
        // 1. Messages that need nothing persisted (a leader's appends and heartbeats) go out
        //    first, so followers persist in parallel with the leader.
        self.send(ready.take_messages());
        // Reads confirmed by a quorum of heartbeats now wait for their index to be applied.
        self.reads.confirmed(ready.take_read_states());
        // 2. A snapshot from the leader replaces storage and state machine before any entry
        //    after it is applied.
        if !ready.snapshot().is_empty() {
            let snap = ready.snapshot().clone();
            self.raw.mut_store().apply_snapshot(&snap)?;
            self.failpoint(FailPoint::SnapshotStoredBeforeRestore)?;
            let state =
                snapshot_state(snap.get_data()).map_err(|e| storage_err(self.raw.store(), e))?;
            self.sm
                .restore(state)
                .map_err(|e| storage_err(self.raw.store(), e))?;
            let index = snap.get_metadata().index;
            self.applied = index;
            for (peer, addr) in self.raw.store().peers() {
                self.transport.set_peer(*peer, Some(addr));
            }
            let rest = self.pending.split_off(&(index + 1));
            for (_, (_, w)) in std::mem::replace(&mut self.pending, rest) {
                self.answers
                    .push((w, Outcome::Conf(Err(RaftError::OutcomeUnknown))));
            }
        }
        // 3. Committed entries (already persisted: raft-rs only hands those out) are applied;
        //    conf changes go through apply_conf_change and their conf state is persisted.
        self.apply(ready.take_committed_entries())?;
        // 4. New entries and the hard state are persisted together, in one fsync'd transaction.
        self.raw.mut_store().append(ready.entries(), ready.hs())?;
        if !ready.entries().is_empty() || ready.hs().is_some() {
            self.failpoint(FailPoint::PersistedBeforeSend)?;
        }
        // 5. Only now may messages that promise persisted state (votes, append responses) go.
        self.send(ready.take_persisted_messages());
        // 6. Advance; the light ready carries the new commit index (persisted), more messages
        //    and more committed entries, after which the applied index is advanced.
        let mut light = self.raw.advance(ready);
        if let Some(commit) = light.commit_index() {
            self.raw.mut_store().set_commit(commit)?;
        }
        self.send(light.take_messages());
        self.apply(light.take_committed_entries())?;
        self.raw.advance_apply();
        Ok(())
    }

    fn send(&mut self, msgs: Vec<Message>) {
        for m in msgs {
            let snapshot_to = (m.get_msg_type() == MessageType::MsgSnapshot).then_some(m.to);
            self.transport.send(m);
            if let Some(to) = snapshot_to {
                // The transport cannot tell whether a snapshot arrived, and raft-rs keeps the
                // follower paused in its Snapshot state until told: a snapshot lost on the way
                // (or a follower that crashed before acknowledging it) would stall it forever.
                // Reporting it finished makes the leader probe the next index: a follower that
                // has it accepts, one that does not rejects, and the leader sends it again.
                self.raw.report_snapshot(to, SnapshotStatus::Finish);
            }
        }
    }

    fn failpoint(&self, point: FailPoint) -> Result<()> {
        check(self.config.failpoints.as_ref(), point)
    }

    /// Applies committed entries in order and collects their proposers' outcomes.
    fn apply(&mut self, entries: Vec<Entry>) -> Result<()> {
        let any = !entries.is_empty();
        for e in entries {
            let _span = tracing::trace_span!("raft_apply", index = e.index).entered();
            let outcome = match e.get_entry_type() {
                EntryType::EntryNormal if e.data.is_empty() => Outcome::Empty,
                EntryType::EntryNormal => Outcome::Command(self.sm.apply(e.index, &e.data)),
                EntryType::EntryConfChange | EntryType::EntryConfChangeV2 => {
                    self.apply_conf_change(&e)?
                }
            };
            self.applied = e.index;
            // Waiters for skipped indexes cannot exist: indexes are applied one by one.
            if let Some((term, w)) = self.pending.remove(&e.index) {
                let outcome = if term == e.term {
                    outcome
                } else {
                    Outcome::Conf(Err(RaftError::Dropped(format!(
                        "log index {} went to term {}'s leader",
                        e.index, e.term
                    ))))
                };
                self.answers.push((w, outcome));
            }
        }
        if any {
            // Applied, but neither advanced nor answered (nor, in step 3, the new entries
            // persisted).
            self.failpoint(FailPoint::AppliedBeforeAdvance)?;
        }
        Ok(())
    }

    fn apply_conf_change(&mut self, e: &Entry) -> Result<Outcome> {
        let cc: ConfChangeV2 = if e.get_entry_type() == EntryType::EntryConfChange {
            match ConfChange::parse_from_bytes(&e.data) {
                Ok(cc) => v1_to_v2(cc),
                Err(err) => {
                    return Ok(Outcome::Conf(Err(RaftError::InvalidConfChange(
                        err.to_string(),
                    ))));
                }
            }
        } else {
            match ConfChangeV2::parse_from_bytes(&e.data) {
                Ok(cc) => cc,
                Err(err) => {
                    return Ok(Outcome::Conf(Err(RaftError::InvalidConfChange(
                        err.to_string(),
                    ))));
                }
            }
        };
        let (_, conf_index) = self.raw.store().conf_state();
        if e.index <= conf_index {
            // Replayed after a restart: the stored conf state (which raft loaded) includes it.
            return Ok(Outcome::Conf(Ok(Members::from(
                self.raw.store().conf_state().0,
            ))));
        }
        let cs = match self.raw.apply_conf_change(&cc) {
            Ok(cs) => cs,
            // Refused the same way on every node, so the configuration stays in step.
            Err(err) => {
                return Ok(Outcome::Conf(Err(RaftError::InvalidConfChange(
                    err.to_string(),
                ))));
            }
        };
        let addresses = decode_peers(cc.get_context()).unwrap_or_default();
        // Removed members are forgotten; added ones are learnt when the change carried an address.
        let updates: Vec<(u64, Option<String>)> = cc
            .get_changes()
            .iter()
            .filter_map(|c| match c.get_change_type() {
                ConfChangeType::RemoveNode => Some((c.node_id, None)),
                _ => addresses
                    .get(&c.node_id)
                    .map(|a| (c.node_id, Some(a.clone()))),
            })
            .collect();
        self.raw
            .mut_store()
            .set_conf_state(&cs, e.index, &updates)?;
        for (peer, addr) in &updates {
            if *peer != self.config.id {
                self.transport.set_peer(*peer, addr.as_deref());
            }
        }
        tracing::info!(index = e.index, ?cs, "membership changed");
        Ok(Outcome::Conf(Ok(Members::from(&cs))))
    }

    /// Snapshots the state machine and compacts the log every `snapshot_interval` applied
    /// entries, or at once when raft needed a newer snapshot for a lagging follower.
    fn maybe_compact(&mut self) -> Result<()> {
        let store = self.raw.store();
        let snap_index = store.snapshot_metadata().index;
        let wanted = store.take_snapshot_request();
        let due = self.applied >= snap_index + self.config.snapshot_interval.max(1);
        // The stored conf state must describe the snapshot's index, so never snapshot before
        // an applied conf change (only possible while replaying after a restart).
        if (due || wanted) && self.applied > snap_index && self.applied >= store.conf_state().1 {
            let _span = tracing::debug_span!("raft_compact", index = self.applied).entered();
            let state = self.sm.snapshot();
            let applied = self.applied;
            self.raw.mut_store().compact(applied, &state)?;
        }
        Ok(())
    }

    fn publish_status(&self) {
        let r = &self.raw.raft;
        let role = match r.state {
            StateRole::Leader => RaftRole::Leader,
            StateRole::Candidate => RaftRole::Candidate,
            StateRole::PreCandidate => RaftRole::PreCandidate,
            StateRole::Follower => RaftRole::Follower,
        };
        let matched = if role == RaftRole::Leader {
            r.prs().iter().map(|(id, p)| (*id, p.matched)).collect()
        } else {
            BTreeMap::new()
        };
        let status = RaftStatus {
            id: self.config.id,
            role,
            leader: (r.leader_id != 0).then_some(r.leader_id),
            term: r.term,
            commit: r.raft_log.committed,
            applied: self.applied,
            members: Members::from(&r.prs().conf().to_conf_state()),
            matched,
            addresses: self.raw.store().peers().clone(),
            running: true,
            failure: None,
        };
        self.status.send_if_modified(|s| {
            let changed = *s != status;
            if changed {
                *s = status;
            }
            changed
        });
    }
}

/// A single-change (v1) conf change as a v2 one. raft-rs's own conversion lives in a trait
/// the `raft` crate does not re-export; this node only proposes v2 changes anyway.
fn v1_to_v2(mut cc: ConfChange) -> ConfChangeV2 {
    let mut single = ConfChangeSingle::default();
    single.set_change_type(cc.get_change_type());
    single.node_id = cc.node_id;
    let mut v2 = ConfChangeV2::default();
    v2.mut_changes().push(single);
    v2.set_context(cc.take_context());
    v2
}

/// Answers a waiter; a conf outcome for a command waiter (or the reverse) means its slot held
/// something else.
fn reply(w: Waiter, outcome: Outcome) {
    match (w, outcome) {
        (Waiter::Command(tx), Outcome::Command(r)) => {
            let _ = tx.send(r.map_err(RaftError::from));
        }
        (Waiter::Conf(tx), Outcome::Conf(r)) => {
            let _ = tx.send(r);
        }
        (Waiter::Command(tx), Outcome::Conf(Err(e))) => {
            let _ = tx.send(Err(e));
        }
        (Waiter::Conf(tx), Outcome::Empty) => {
            let _ = tx.send(Err(RaftError::Dropped(
                "Raft refused the change: another membership change is still in progress".into(),
            )));
        }
        (Waiter::Command(tx), _) => {
            let _ = tx.send(Err(RaftError::Dropped(
                "its log slot holds another entry".into(),
            )));
        }
        (Waiter::Conf(tx), _) => {
            let _ = tx.send(Err(RaftError::Dropped(
                "its log slot holds another entry".into(),
            )));
        }
    }
}
