//! A differential test of [`RedbStorage`] against raft-rs's own `MemStorage`, the storage
//! raft-rs's tests run on: random sequences of the writes the node loop makes (appends that
//! truncate a conflicting suffix, hard states, commits, conf states, compactions, snapshots
//! from a leader) and reopens of the redb file, with every `raft::Storage` read compared after
//! each step.
//!
//! Two differences are by design and checked as such rather than compared:
//! - compaction: ours stores a snapshot at `i` and drops the log up to `i` in one write;
//!   `MemStorage` keeps snapshots apart (`compact(i + 1)` drops the same entries), so only ours
//!   answers `term(i)` for the compacted entry, with the stored snapshot's term, and only ours
//!   forgets an older snapshot's index (`Compacted`). A compaction of the whole log is given to
//!   `MemStorage` as the snapshot it is (`apply_snapshot` at `i`), since with no entry left it
//!   derives its first index from its last snapshot;
//! - out-of-range reads: ours answers `Unavailable` where `MemStorage` panics.

use std::collections::BTreeMap;

use proptest::prelude::*;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use raft::storage::MemStorage;
use raft::{GetEntriesContext, Storage, StorageError};

use super::RedbStorage;
use super::snapshot::encode_snapshot_data;
use super::test_util::TempDir;

/// One write, its numbers resolved against the current log when it is applied.
#[derive(Clone, Debug)]
enum Step {
    /// Entries from a position in `first..=last + 1`, with terms from the previous entry's
    /// up; optionally with a hard state in the same write.
    Append {
        at: u16,
        len: u8,
        bump: u8,
        with_hard_state: bool,
    },
    /// A new hard state: term raised by `bump`, a vote, a commit within the log.
    HardState { bump: u8, vote: u8, commit: u16 },
    /// A commit index within the log.
    Commit { at: u16 },
    /// A conf state applied at a log index from the current conf index up.
    Conf { voters: u8, at: u16 },
    /// A compaction at an applied index past the snapshot.
    Compact { at: u16, state: Vec<u8> },
    /// A leader's snapshot past the commit index.
    Snapshot { ahead: u8, bump: u8, voters: u8 },
    /// Close and reopen the redb file.
    Reopen,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (any::<u16>(), 1u8..5, 0u8..2, any::<bool>()).prop_map(|(at, len, bump, hs)| {
            Step::Append { at, len, bump, with_hard_state: hs }
        }),
        1 => (0u8..2, 0u8..4, any::<u16>())
            .prop_map(|(bump, vote, commit)| Step::HardState { bump, vote, commit }),
        1 => any::<u16>().prop_map(|at| Step::Commit { at }),
        1 => (1u8..8, any::<u16>()).prop_map(|(voters, at)| Step::Conf { voters, at }),
        1 => (any::<u16>(), proptest::collection::vec(any::<u8>(), 0..16))
            .prop_map(|(at, state)| Step::Compact { at, state }),
        1 => (0u8..6, 0u8..2, 1u8..8)
            .prop_map(|(ahead, bump, voters)| Step::Snapshot { ahead, bump, voters }),
        1 => Just(Step::Reopen),
    ]
}

/// Voter ids from the bits of `mask` (ids 1..=3).
fn conf(mask: u8) -> ConfState {
    let voters: Vec<u64> = (0..3)
        .filter(|b| mask & (1 << b) != 0)
        .map(|b| b + 1)
        .collect();
    ConfState::from((voters, vec![]))
}

/// `n` mapped into `lo..=hi` (`lo` when the range is empty).
fn pick(n: u16, lo: u64, hi: u64) -> u64 {
    if hi <= lo {
        lo
    } else {
        lo + u64::from(n) % (hi - lo + 1)
    }
}

/// Both storages, and what the test tracks beside them.
struct Pair {
    dir: TempDir,
    /// `None` only while reopening (redb allows one open handle per file).
    file: Option<RedbStorage>,
    mem: MemStorage,
    /// Our stored snapshot's index and term (from a compaction or a leader's snapshot).
    snapshot: (u64, u64),
    /// The index of the entry the conf state is from: compactions may not go before it.
    conf_index: u64,
    next_data: u8,
}

impl Pair {
    fn new() -> Self {
        let dir = TempDir::new("differential");
        let redb = RedbStorage::open(&dir.0).expect("open");
        let mut pair = Pair {
            dir,
            file: Some(redb),
            mem: MemStorage::new(),
            snapshot: (0, 0),
            conf_index: 0,
            next_data: 0,
        };
        // Bootstrap as a new cluster does: a snapshot at index 1, term 1.
        let peers = BTreeMap::from([(1, "a:1".to_string())]);
        pair.redb_mut()
            .initialize(conf(1), peers, b"init")
            .expect("initialize");
        let mut snap = Snapshot::default();
        snap.mut_metadata().index = 1;
        snap.mut_metadata().term = 1;
        snap.mut_metadata().set_conf_state(conf(1));
        pair.mem.wl().apply_snapshot(snap).expect("mem bootstrap");
        pair.snapshot = (1, 1);
        pair.conf_index = 1;
        pair
    }

    fn redb(&self) -> &RedbStorage {
        self.file.as_ref().expect("the redb file is open")
    }

    fn redb_mut(&mut self) -> &mut RedbStorage {
        self.file.as_mut().expect("the redb file is open")
    }

    fn first(&self) -> u64 {
        self.mem.first_index().expect("first")
    }

    fn last(&self) -> u64 {
        self.mem.last_index().expect("last")
    }

    fn term_of(&self, idx: u64) -> u64 {
        self.redb().term(idx).expect("a term in the log")
    }

    fn apply(&mut self, s: &Step) {
        let (first, last) = (self.first(), self.last());
        let commit = self.mem.rl().hard_state().commit;
        match s {
            Step::Append {
                at,
                len,
                bump,
                with_hard_state,
            } => {
                let start = pick(*at, first, last + 1);
                let mut term = self.term_of(start - 1) + u64::from(*bump);
                let mut entries = Vec::new();
                for i in 0..u64::from(*len) {
                    self.next_data = self.next_data.wrapping_add(1);
                    entries.push(Entry {
                        index: start + i,
                        term,
                        data: vec![self.next_data; usize::from(self.next_data % 7)].into(),
                        ..Entry::default()
                    });
                    term += u64::from(i % 2 == 1 && *bump > 0);
                }
                // Raft never truncates below its commit index.
                if start <= commit {
                    return;
                }
                // Entries are never newer than the hard state's term: a newer term comes with
                // its hard state.
                let mut hs = self.mem.rl().hard_state().clone();
                let newer = term > hs.term;
                hs.term = hs.term.max(term);
                let hs = (*with_hard_state || newer).then_some(hs);
                self.redb_mut()
                    .append(&entries, hs.as_ref())
                    .expect("redb append");
                let mut core = self.mem.wl();
                core.append(&entries).expect("mem append");
                if let Some(hs) = hs {
                    core.set_hardstate(hs);
                }
            }
            Step::HardState {
                bump,
                vote,
                commit: c,
            } => {
                let mut hs = self.mem.rl().hard_state().clone();
                hs.term += u64::from(*bump);
                hs.vote = u64::from(*vote);
                hs.commit = pick(*c, commit, last);
                self.redb_mut()
                    .append(&[], Some(&hs))
                    .expect("redb hard state");
                self.mem.wl().set_hardstate(hs);
            }
            Step::Commit { at } => {
                let c = pick(*at, commit, last);
                self.redb_mut().set_commit(c).expect("redb commit");
                self.mem.wl().mut_hard_state().commit = c;
            }
            Step::Conf { voters, at } => {
                let index = pick(*at, self.conf_index.max(self.snapshot.0), commit);
                self.redb_mut()
                    .set_conf_state(&conf(*voters), index, &[])
                    .expect("redb conf state");
                self.mem.wl().set_conf_state(conf(*voters));
                self.conf_index = index;
            }
            Step::Compact { at, state } => {
                let lo = (self.snapshot.0 + 1).max(self.conf_index);
                if lo > commit {
                    return;
                }
                let index = pick(*at, lo, commit);
                let term = self.term_of(index);
                self.redb_mut().compact(index, state).expect("redb compact");
                if index == last {
                    let mut snap = Snapshot::default();
                    snap.mut_metadata().index = index;
                    snap.mut_metadata().term = term;
                    let conf = self.mem.initial_state().expect("mem state").conf_state;
                    snap.mut_metadata().set_conf_state(conf);
                    self.mem.wl().apply_snapshot(snap).expect("mem compact all");
                } else {
                    self.mem.wl().compact(index + 1).expect("mem compact");
                }
                self.snapshot = (index, term);
                let stored = self.redb().read_snapshot().expect("read snapshot");
                assert_eq!(stored.get_metadata().index, index);
                assert_eq!(stored.get_metadata().term, term);
                let conf = self.mem.initial_state().expect("mem state").conf_state;
                assert_eq!(stored.get_metadata().get_conf_state(), &conf);
            }
            Step::Snapshot {
                ahead,
                bump,
                voters,
            } => {
                let index = commit.max(self.snapshot.0) + 1 + u64::from(*ahead);
                let term = self.mem.rl().hard_state().term + u64::from(*bump);
                let mut snap = Snapshot::default();
                snap.mut_metadata().index = index;
                snap.mut_metadata().term = term;
                snap.mut_metadata().set_conf_state(conf(*voters));
                let peers = BTreeMap::from([(1, "a:1".to_string()), (2, "b:2".to_string())]);
                snap.set_data(encode_snapshot_data(&peers, b"leader").into());
                self.redb_mut()
                    .apply_snapshot(&snap)
                    .expect("redb snapshot");
                self.mem.wl().apply_snapshot(snap).expect("mem snapshot");
                self.snapshot = (index, term);
                self.conf_index = index;
                assert_eq!(self.redb().peers(), &peers);
            }
            Step::Reopen => {
                self.file = None;
                self.file = Some(RedbStorage::open(&self.dir.0).expect("reopen"));
            }
        }
    }

    /// Compares every read of the two storages (see the module docs for the two exceptions).
    fn compare(&self, after: &Step) {
        let ctx = || GetEntriesContext::empty(false);
        let (first, last) = (self.first(), self.last());
        let ours = self.redb().initial_state().expect("initial state");
        let theirs = self.mem.initial_state().expect("mem initial state");
        assert_eq!(
            ours.hard_state, theirs.hard_state,
            "hard state after {after:?}"
        );
        assert_eq!(
            ours.conf_state, theirs.conf_state,
            "conf state after {after:?}"
        );
        assert_eq!(
            self.redb().first_index().expect("first"),
            first,
            "first after {after:?}"
        );
        assert_eq!(
            self.redb().last_index().expect("last"),
            last,
            "last after {after:?}"
        );
        for idx in 0..=last + 2 {
            let ours = self.redb().term(idx);
            if idx + 1 < first {
                assert!(
                    matches!(ours, Err(raft::Error::Store(StorageError::Compacted))),
                    "term({idx}) before the snapshot after {after:?}: {ours:?}"
                );
            } else if idx + 1 == first {
                assert_eq!(self.snapshot.0, idx, "the snapshot is just before the log");
                assert_eq!(
                    ours.ok(),
                    Some(self.snapshot.1),
                    "term({idx}) after {after:?}"
                );
            } else {
                let theirs = self.mem.term(idx);
                assert_eq!(
                    format!("{ours:?}"),
                    format!("{theirs:?}"),
                    "term({idx}) after {after:?}"
                );
            }
        }
        if first <= last {
            let all = |max: Option<u64>| {
                let ours = self.redb().entries(first, last + 1, max, ctx());
                let theirs = self.mem.entries(first, last + 1, max, ctx());
                assert_eq!(
                    ours,
                    theirs,
                    "entries({first}, {}, {max:?}) after {after:?}",
                    last + 1
                );
            };
            all(None);
            all(Some(0));
            all(Some(40));
            for lo in first..=last {
                let ours = self.redb().entries(lo, lo + 1, None, ctx());
                assert_eq!(
                    ours,
                    self.mem.entries(lo, lo + 1, None, ctx()),
                    "entry {lo}"
                );
            }
        }
        if first > 1 {
            let ours = self.redb().entries(first - 1, first, None, ctx());
            let theirs = self.mem.entries(first - 1, first, None, ctx());
            assert_eq!(
                format!("{ours:?}"),
                format!("{theirs:?}"),
                "a compacted read"
            );
        }
        let beyond = self.redb().entries(first, last + 2, None, ctx());
        assert!(
            matches!(beyond, Err(raft::Error::Store(StorageError::Unavailable))),
            "a read past the log: {beyond:?}"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    /// Ensures that after any sequence of the node loop's writes, and after reopening the file,
    /// the redb storage answers every `raft::Storage` read as raft-rs's `MemStorage` does.
    #[test]
    fn redb_storage_reads_as_raft_rs_memory_storage(
        steps in proptest::collection::vec(step(), 1..40)
    ) {
        let mut pair = Pair::new();
        pair.compare(&Step::Reopen);
        for s in &steps {
            pair.apply(s);
            pair.compare(s);
        }
        pair.apply(&Step::Reopen);
        pair.compare(&Step::Reopen);
        // The hard state a restart reads is the last one written.
        let hs: HardState = pair.redb().hard_state().clone();
        let theirs = pair.mem.rl().hard_state().clone();
        prop_assert_eq!(hs, theirs);
    }
}
