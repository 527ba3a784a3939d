//! Durable Raft storage in one redb file: log entries, hard state, conf state, the latest
//! snapshot (metadata and data) and the peers' addresses.
//!
//! Writes are redb transactions committed with `Durability::Immediate` (fsync), so whatever a
//! method returned `Ok` for survives a crash; entries and hard state go in one transaction.
//! Small values (hard state, conf state, snapshot metadata, last index) are cached in memory;
//! entries are read from redb on demand. The log is compacted only by [`RedbStorage::compact`],
//! which stores a state-machine snapshot first, so `first_index() - 1` is always the stored
//! snapshot's index.
//!
//! This file owns the type, opening and loading, and the `raft::Storage` reads; `log.rs` the
//! log and hard/conf state writes; `snapshot.rs` bootstrap, snapshots and compaction, and the
//! snapshot data format.

#[cfg(test)]
mod differential;
mod log;
mod snapshot;

pub(crate) use snapshot::{decode_peers, encode_peers, snapshot_state};

use std::collections::{BTreeMap, HashMap};
use std::fmt::Display;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, StorageError};
use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition,
};

use super::failpoint::{FailPoint, check};
use super::{Failpoints, RaftError, Result};

const ENTRIES: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("raft_entries");
const META: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("raft_meta");
const PEERS: TableDefinition<'_, u64, &str> = TableDefinition::new("raft_peers");

const HARD_STATE: &str = "hard_state";
const CONF_STATE: &str = "conf_state";
const CONF_INDEX: &str = "conf_index";
const SNAPSHOT: &str = "snapshot";

/// The file name inside the data directory.
const FILE_NAME: &str = "raft.redb";

/// Raft storage backed by one redb file (see the module docs).
pub struct RedbStorage {
    db: Database,
    path: PathBuf,
    hard_state: HardState,
    conf_state: ConfState,
    /// Index of the entry (or snapshot) the conf state is from.
    conf_index: u64,
    snapshot_meta: SnapshotMetadata,
    last_index: u64,
    peers: BTreeMap<u64, String>,
    /// Set when raft asked for a snapshot newer than the stored one.
    snapshot_wanted: AtomicBool,
    /// Test crash points inside the write transactions (none in production).
    failpoints: Option<Failpoints>,
}

impl std::fmt::Debug for RedbStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbStorage")
            .field("path", &self.path)
            .field("first_index", &self.first())
            .field("last_index", &self.last_index)
            .finish_non_exhaustive()
    }
}

impl RedbStorage {
    /// Opens (or creates) the storage in `dir`, reading back everything persisted there.
    ///
    /// # Errors
    /// [`RaftError::Storage`] when the directory cannot be created, the file is not a redb
    /// database or is corrupt, another process holds it, or its content is inconsistent (for
    /// example a hole in the log). Never panics on bad files.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        // A damaged file can make redb panic rather than return an error: either way the
        // caller gets a storage error naming the file, never a panic.
        let path = dir.as_ref().join(FILE_NAME);
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            Self::open_inner(dir.as_ref())
        }))
        .unwrap_or_else(|panic| {
            Err(RaftError::Storage {
                path,
                message: format!(
                    "the database is damaged (reading it failed: {})",
                    crate::raft::node::panic_message(panic.as_ref())
                ),
            })
        })
    }

    fn open_inner(dir: &Path) -> Result<Self> {
        let path = dir.join(FILE_NAME);
        let fail = |what: &str, e: &dyn Display| RaftError::Storage {
            path: path.clone(),
            message: format!("{what}: {e}"),
        };
        std::fs::create_dir_all(dir).map_err(|e| fail("cannot create directory", &e))?;
        let db = Database::create(&path).map_err(|e| fail("cannot open database", &e))?;
        let mut storage = RedbStorage {
            db,
            path: path.clone(),
            hard_state: HardState::default(),
            conf_state: ConfState::default(),
            conf_index: 0,
            snapshot_meta: SnapshotMetadata::default(),
            last_index: 0,
            peers: BTreeMap::new(),
            snapshot_wanted: AtomicBool::new(false),
            failpoints: None,
        };
        // Creates the tables of a new file, so that reads never meet a missing table.
        let txn = storage.write_txn()?;
        for r in [
            txn.open_table(ENTRIES).map(drop),
            txn.open_table(META).map(drop),
            txn.open_table(PEERS).map(drop),
        ] {
            r.map_err(|e| storage.fail("cannot open tables", e))?;
        }
        txn.commit().map_err(|e| storage.fail("cannot commit", e))?;
        storage.load()?;
        Ok(storage)
    }

    fn load(&mut self) -> Result<()> {
        let txn = self.db.begin_read().map_err(|e| self.fail("read", e))?;
        let meta = txn.open_table(META).map_err(|e| self.fail("read", e))?;
        let mut values = HashMap::new();
        for key in [HARD_STATE, CONF_STATE, CONF_INDEX, SNAPSHOT] {
            if let Some(v) = meta.get(key).map_err(|e| self.fail(key, e))? {
                values.insert(key, v.value().to_vec());
            }
        }
        if let Some(b) = values.remove(HARD_STATE) {
            self.hard_state =
                HardState::parse_from_bytes(&b).map_err(|e| self.fail(HARD_STATE, e))?;
        }
        if let Some(b) = values.remove(CONF_STATE) {
            self.conf_state =
                ConfState::parse_from_bytes(&b).map_err(|e| self.fail(CONF_STATE, e))?;
        }
        if let Some(b) = values.remove(CONF_INDEX) {
            let arr: [u8; 8] = b
                .as_slice()
                .try_into()
                .map_err(|_| self.fail(CONF_INDEX, "not 8 bytes"))?;
            self.conf_index = u64::from_le_bytes(arr);
        }
        if let Some(b) = values.remove(SNAPSHOT) {
            let snap = Snapshot::parse_from_bytes(&b).map_err(|e| self.fail(SNAPSHOT, e))?;
            self.snapshot_meta = snap.get_metadata().clone();
        }
        let entries = txn
            .open_table(ENTRIES)
            .map_err(|e| self.fail("entries", e))?;
        let first = entries
            .first()
            .map_err(|e| self.fail("entries", e))?
            .map(|(k, _)| k.value());
        let last = entries
            .last()
            .map_err(|e| self.fail("entries", e))?
            .map(|(k, _)| k.value());
        let count = entries.len().map_err(|e| self.fail("entries", e))?;
        self.last_index = self.snapshot_meta.index;
        if let (Some(first), Some(last)) = (first, last) {
            if first != self.snapshot_meta.index + 1 || last - first + 1 != count {
                return Err(self.fail(
                    "log",
                    format!(
                        "entries {first}..={last} ({count} stored) do not follow the snapshot at {}",
                        self.snapshot_meta.index
                    ),
                ));
            }
            self.last_index = last;
        }
        if self.hard_state.commit > self.last_index {
            return Err(self.fail(
                "hard state",
                format!(
                    "commit {} is past the last entry {}",
                    self.hard_state.commit, self.last_index
                ),
            ));
        }
        let peers = txn.open_table(PEERS).map_err(|e| self.fail("peers", e))?;
        for row in peers.iter().map_err(|e| self.fail("peers", e))? {
            let (k, v) = row.map_err(|e| self.fail("peers", e))?;
            self.peers.insert(k.value(), v.value().to_string());
        }
        Ok(())
    }

    /// A [`RaftError::Storage`] naming this storage's file.
    pub(crate) fn fail(&self, what: &str, e: impl Display) -> RaftError {
        RaftError::Storage {
            path: self.path.clone(),
            message: format!("{what}: {e}"),
        }
    }

    fn write_txn(&self) -> Result<redb::WriteTransaction> {
        let mut txn = self
            .db
            .begin_write()
            .map_err(|e| self.fail("begin write", e))?;
        txn.set_durability(Durability::Immediate)
            .map_err(|e| self.fail("set durability", e))?;
        Ok(txn)
    }

    /// Makes the write transactions stop at `failpoints` (tests only; see [`Failpoints`]).
    pub(crate) fn set_failpoints(&mut self, failpoints: Option<Failpoints>) {
        self.failpoints = failpoints;
    }

    /// Checks a failpoint inside a write transaction: on `Err` the caller returns at once and
    /// the dropped transaction is aborted, as if the process had died before committing.
    fn failpoint(&self, point: FailPoint) -> Result<()> {
        check(self.failpoints.as_ref(), point)
    }

    fn first(&self) -> u64 {
        self.snapshot_meta.index + 1
    }

    /// Whether this storage holds a cluster configuration (bootstrapped, or joined by snapshot).
    pub fn is_initialized(&self) -> bool {
        self.conf_state != ConfState::default()
    }

    /// The persisted hard state (term, vote, commit).
    pub fn hard_state(&self) -> &HardState {
        &self.hard_state
    }

    /// The persisted conf state and the log index it is from.
    pub fn conf_state(&self) -> (&ConfState, u64) {
        (&self.conf_state, self.conf_index)
    }

    /// The metadata of the stored snapshot (index 0: none).
    pub fn snapshot_metadata(&self) -> &SnapshotMetadata {
        &self.snapshot_meta
    }

    /// The known peer addresses, by node id.
    pub fn peers(&self) -> &BTreeMap<u64, String> {
        &self.peers
    }
}

fn store_err(e: RaftError) -> raft::Error {
    raft::Error::Store(StorageError::Other(Box::new(e)))
}

impl raft::Storage for RedbStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState::new(
            self.hard_state.clone(),
            self.conf_state.clone(),
        ))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low < self.first() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > self.last_index + 1 || low > high {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let mut ents = self.read_entries(low, high).map_err(store_err)?;
        raft::util::limit_size(&mut ents, max_size.into());
        Ok(ents)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        if idx == self.snapshot_meta.index {
            return Ok(self.snapshot_meta.term);
        }
        if idx < self.first() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if idx > self.last_index {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        Ok(self.read_entries(idx, idx + 1).map_err(store_err)?[0].term)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.first())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last_index)
    }

    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        let snap = self.read_snapshot().map_err(store_err)?;
        let meta = snap.get_metadata();
        let cs = meta.get_conf_state();
        // A node ignores a snapshot whose configuration does not include it (a new member
        // added after the snapshot was taken), so such a snapshot is not worth sending.
        let includes_to = [
            &cs.voters,
            &cs.learners,
            &cs.voters_outgoing,
            &cs.learners_next,
        ]
        .iter()
        .any(|ids| ids.contains(&to));
        if meta.index == 0 || meta.index < request_index || !includes_to {
            // The node loop sees the flag and compacts at its applied index, then raft retries.
            self.snapshot_wanted.store(true, Ordering::Relaxed);
            return Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        Ok(snap)
    }
}

#[cfg(test)]
pub(super) mod test_util {
    //! Helpers shared by the storage unit tests.

    use super::*;

    /// A fresh directory under the system temp dir, removed on drop.
    pub(crate) struct TempDir(pub(crate) PathBuf);
    impl TempDir {
        pub(crate) fn new(name: &str) -> Self {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            let p = std::env::temp_dir().join(format!(
                "tessera-raft-{name}-{}-{nanos}",
                std::process::id()
            ));
            std::fs::create_dir_all(&p).expect("create temp dir");
            TempDir(p)
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    pub(crate) fn entry(index: u64, term: u64, data: &[u8]) -> Entry {
        Entry {
            index,
            term,
            data: data.to_vec().into(),
            ..Default::default()
        }
    }

    pub(crate) fn bootstrapped(dir: &Path) -> RedbStorage {
        let mut s = RedbStorage::open(dir).expect("open");
        let peers = BTreeMap::from([(1, "a:1".to_string()), (2, "b:2".to_string())]);
        s.initialize(ConfState::from((vec![1, 2], vec![])), peers, b"init")
            .expect("initialize");
        s
    }
}

#[cfg(test)]
mod tests {
    use super::test_util::{TempDir, bootstrapped, entry};
    use super::*;
    use raft::Storage as _;

    /// Ensures that entries, hard state, conf state and peers written before a close are all
    /// read back by a reopen.
    #[test]
    fn reopen_reads_everything_back() {
        let dir = TempDir::new("reopen");
        {
            let mut s = bootstrapped(&dir.0);
            let hs = HardState {
                term: 3,
                vote: 2,
                commit: 3,
                ..Default::default()
            };
            s.append(&[entry(2, 2, b"x"), entry(3, 3, b"y")], Some(&hs))
                .expect("append");
            let cs = ConfState::from((vec![1, 2, 3], vec![]));
            s.set_conf_state(&cs, 3, &[(3, Some("c:3".into()))])
                .expect("conf");
        }
        let s = RedbStorage::open(&dir.0).expect("reopen");
        let st = s.initial_state().expect("state");
        assert_eq!(
            (st.hard_state.term, st.hard_state.vote, st.hard_state.commit),
            (3, 2, 3)
        );
        assert_eq!(st.conf_state.voters, vec![1, 2, 3]);
        assert_eq!(s.conf_state().1, 3);
        assert_eq!(
            (
                s.first_index().expect("first"),
                s.last_index().expect("last")
            ),
            (2, 3)
        );
        let ents = s
            .entries(2, 4, None, GetEntriesContext::empty(false))
            .expect("entries");
        assert_eq!(
            ents.iter()
                .map(|e| (e.index, e.term, e.data.to_vec()))
                .collect::<Vec<_>>(),
            vec![(2, 2, b"x".to_vec()), (3, 3, b"y".to_vec())]
        );
        assert_eq!(s.term(1).expect("term 1"), 1);
        assert_eq!(s.peers().get(&3).map(String::as_str), Some("c:3"));
        let snap = s.read_snapshot().expect("snapshot");
        assert_eq!(snapshot_state(snap.get_data()).expect("state"), b"init");
    }

    /// Ensures that a garbage data file and a file held by another open give errors naming
    /// the file, not panics.
    #[test]
    fn bad_files_are_clear_errors() {
        let dir = TempDir::new("corrupt");
        std::fs::write(dir.0.join(FILE_NAME), vec![0xA5; 8192]).expect("write garbage");
        let err = RedbStorage::open(&dir.0).expect_err("garbage must not open");
        assert!(
            matches!(err, RaftError::Storage { .. }) && err.to_string().contains("raft.redb"),
            "{err}"
        );

        let dir = TempDir::new("locked");
        let _held = RedbStorage::open(&dir.0).expect("first open");
        let err = RedbStorage::open(&dir.0).expect_err("second open must fail");
        assert!(err.to_string().contains("cannot open database"), "{err}");

        let dir = TempDir::new("twice");
        let mut s = bootstrapped(&dir.0);
        let err = s
            .initialize(ConfState::from((vec![1], vec![])), BTreeMap::new(), b"")
            .expect_err("initialize twice");
        assert!(err.to_string().contains("already"), "{err}");
    }
}
