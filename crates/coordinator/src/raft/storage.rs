//! Durable Raft storage in one redb file: log entries, hard state, conf state, the latest
//! snapshot (metadata and data) and the peers' addresses.
//!
//! Writes are redb transactions committed with `Durability::Immediate` (fsync), so whatever a
//! method returned `Ok` for survives a crash; entries and hard state go in one transaction.
//! Small values (hard state, conf state, snapshot metadata, last index) are cached in memory;
//! entries are read from redb on demand. The log is compacted only by [`RedbStorage::compact`],
//! which stores a state-machine snapshot first, so `first_index() - 1` is always the stored
//! snapshot's index.

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

use super::{RaftError, Result};

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
        let path = dir.as_ref().join(FILE_NAME);
        let fail = |what: &str, e: &dyn Display| RaftError::Storage {
            path: path.clone(),
            message: format!("{what}: {e}"),
        };
        std::fs::create_dir_all(dir.as_ref()).map_err(|e| fail("cannot create directory", &e))?;
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

    /// Bootstraps a new cluster: a snapshot at index 1, term 1, with configuration `conf`, the
    /// peers' addresses and the state machine's initial `state`. Nodes joining later start
    /// empty and receive a snapshot from the leader, since the log before index 2 is compacted.
    ///
    /// # Errors
    /// [`RaftError::Storage`] if already initialized or the write fails.
    pub fn initialize(
        &mut self,
        conf: ConfState,
        peers: BTreeMap<u64, String>,
        state: &[u8],
    ) -> Result<()> {
        if self.is_initialized() || self.last_index > 0 {
            return Err(self.fail("initialize", "the storage already holds a cluster"));
        }
        let mut snap = Snapshot::default();
        snap.mut_metadata().index = 1;
        snap.mut_metadata().term = 1;
        snap.mut_metadata().set_conf_state(conf);
        snap.set_data(encode_snapshot_data(&peers, state).into());
        self.apply_snapshot(&snap)
    }

    /// Appends `entries` (replacing any conflicting suffix) and stores `hard_state`, in one
    /// fsync'd transaction.
    ///
    /// # Errors
    /// [`RaftError::Storage`] when the write fails or the entries do not fit the log (before
    /// its first index, or after a gap).
    pub fn append(&mut self, entries: &[Entry], hard_state: Option<&HardState>) -> Result<()> {
        if entries.is_empty() && hard_state.is_none() {
            return Ok(());
        }
        if let Some(first) = entries.first()
            && (first.index < self.first() || first.index > self.last_index + 1)
        {
            return Err(self.fail(
                "append",
                format!(
                    "entry {} does not fit log {}..={}",
                    first.index,
                    self.first(),
                    self.last_index
                ),
            ));
        }
        let txn = self.write_txn()?;
        {
            let mut table = txn
                .open_table(ENTRIES)
                .map_err(|e| self.fail("append", e))?;
            if let Some(first) = entries.first() {
                table
                    .retain_in(first.index.., |_, _| false)
                    .map_err(|e| self.fail("truncate", e))?;
            }
            for e in entries {
                let bytes = e
                    .write_to_bytes()
                    .map_err(|e| self.fail("encode entry", e))?;
                table
                    .insert(e.index, bytes.as_slice())
                    .map_err(|e| self.fail("append", e))?;
            }
            if let Some(hs) = hard_state {
                let bytes = hs
                    .write_to_bytes()
                    .map_err(|e| self.fail("encode hard state", e))?;
                let mut meta = txn.open_table(META).map_err(|e| self.fail("append", e))?;
                meta.insert(HARD_STATE, bytes.as_slice())
                    .map_err(|e| self.fail("append", e))?;
            }
        }
        txn.commit().map_err(|e| self.fail("commit append", e))?;
        if let Some(last) = entries.last() {
            self.last_index = last.index;
        }
        if let Some(hs) = hard_state {
            self.hard_state = hs.clone();
        }
        Ok(())
    }

    /// Persists a new commit index (from a light ready).
    ///
    /// # Errors
    /// [`RaftError::Storage`] when the write fails.
    pub fn set_commit(&mut self, commit: u64) -> Result<()> {
        let mut hs = self.hard_state.clone();
        hs.commit = commit;
        self.append(&[], Some(&hs))
    }

    /// Persists the conf state produced by applying the conf change at `index`, with the peer
    /// address changes it carried (`None`: forget the peer).
    ///
    /// # Errors
    /// [`RaftError::Storage`] when the write fails.
    pub fn set_conf_state(
        &mut self,
        cs: &ConfState,
        index: u64,
        peers: &[(u64, Option<String>)],
    ) -> Result<()> {
        let txn = self.write_txn()?;
        {
            let mut meta = txn
                .open_table(META)
                .map_err(|e| self.fail("conf state", e))?;
            let bytes = cs
                .write_to_bytes()
                .map_err(|e| self.fail("encode conf state", e))?;
            meta.insert(CONF_STATE, bytes.as_slice())
                .map_err(|e| self.fail("conf state", e))?;
            meta.insert(CONF_INDEX, index.to_le_bytes().as_slice())
                .map_err(|e| self.fail("conf state", e))?;
            let mut table = txn.open_table(PEERS).map_err(|e| self.fail("peers", e))?;
            for (id, addr) in peers {
                match addr {
                    Some(a) => table.insert(*id, a.as_str()).map(drop),
                    None => table.remove(*id).map(drop),
                }
                .map_err(|e| self.fail("peers", e))?;
            }
        }
        txn.commit()
            .map_err(|e| self.fail("commit conf state", e))?;
        self.conf_state = cs.clone();
        self.conf_index = index;
        for (id, addr) in peers {
            match addr {
                Some(a) => self.peers.insert(*id, a.clone()),
                None => self.peers.remove(id),
            };
        }
        Ok(())
    }

    /// Replaces the log with `snap` (from the leader, or [`RedbStorage::initialize`]): stores it,
    /// drops every entry, takes its conf state and peers, and moves the hard state's term and
    /// commit up to it, in one transaction.
    ///
    /// # Errors
    /// [`RaftError::Storage`] when the snapshot is older than the log's start, its data is not
    /// in the format [`RedbStorage::compact`] writes, or the write fails.
    pub fn apply_snapshot(&mut self, snap: &Snapshot) -> Result<()> {
        let meta = snap.get_metadata();
        if meta.index < self.snapshot_meta.index {
            return Err(self.fail(
                "apply snapshot",
                format!(
                    "snapshot {} is older than the stored one {}",
                    meta.index, self.snapshot_meta.index
                ),
            ));
        }
        let (peers, _) =
            decode_snapshot_data(snap.get_data()).map_err(|e| self.fail("snapshot data", e))?;
        let mut hs = self.hard_state.clone();
        hs.term = hs.term.max(meta.term);
        hs.commit = hs.commit.max(meta.index);
        let txn = self.write_txn()?;
        {
            let f = |e: &dyn Display| self.fail("apply snapshot", e);
            let mut entries = txn.open_table(ENTRIES).map_err(|e| f(&e))?;
            entries.retain(|_, _| false).map_err(|e| f(&e))?;
            let mut m = txn.open_table(META).map_err(|e| f(&e))?;
            let bytes = snap.write_to_bytes().map_err(|e| f(&e))?;
            m.insert(SNAPSHOT, bytes.as_slice()).map_err(|e| f(&e))?;
            let bytes = meta.get_conf_state().write_to_bytes().map_err(|e| f(&e))?;
            m.insert(CONF_STATE, bytes.as_slice()).map_err(|e| f(&e))?;
            m.insert(CONF_INDEX, meta.index.to_le_bytes().as_slice())
                .map_err(|e| f(&e))?;
            let bytes = hs.write_to_bytes().map_err(|e| f(&e))?;
            m.insert(HARD_STATE, bytes.as_slice()).map_err(|e| f(&e))?;
            let mut p = txn.open_table(PEERS).map_err(|e| f(&e))?;
            p.retain(|_, _| false).map_err(|e| f(&e))?;
            for (id, addr) in &peers {
                p.insert(*id, addr.as_str()).map_err(|e| f(&e))?;
            }
        }
        txn.commit().map_err(|e| self.fail("commit snapshot", e))?;
        self.snapshot_meta = meta.clone();
        self.conf_state = meta.get_conf_state().clone();
        self.conf_index = meta.index;
        self.hard_state = hs;
        self.last_index = meta.index;
        self.peers = peers;
        Ok(())
    }

    /// Stores a snapshot at `index` (applied, at or after the conf state's index) holding the
    /// state machine's `state`, then drops the log up to `index`, in one transaction.
    /// Does nothing if `index` is not past the stored snapshot.
    ///
    /// # Errors
    /// [`RaftError::Storage`] when `index` is not in the log or the write fails.
    pub fn compact(&mut self, index: u64, state: &[u8]) -> Result<()> {
        if index <= self.snapshot_meta.index {
            return Ok(());
        }
        if index > self.last_index || index < self.conf_index {
            return Err(self.fail(
                "compact",
                format!(
                    "index {index} outside {}..={} or before the conf state",
                    self.conf_index, self.last_index
                ),
            ));
        }
        let term = raft::Storage::term(self, index).map_err(|e| self.fail("compact", e))?;
        let mut snap = Snapshot::default();
        snap.mut_metadata().index = index;
        snap.mut_metadata().term = term;
        snap.mut_metadata().set_conf_state(self.conf_state.clone());
        snap.set_data(encode_snapshot_data(&self.peers, state).into());
        let txn = self.write_txn()?;
        {
            let f = |e: &dyn Display| self.fail("compact", e);
            let mut m = txn.open_table(META).map_err(|e| f(&e))?;
            let bytes = snap.write_to_bytes().map_err(|e| f(&e))?;
            m.insert(SNAPSHOT, bytes.as_slice()).map_err(|e| f(&e))?;
            let mut entries = txn.open_table(ENTRIES).map_err(|e| f(&e))?;
            entries
                .retain_in(..=index, |_, _| false)
                .map_err(|e| f(&e))?;
        }
        txn.commit()
            .map_err(|e| self.fail("commit compaction", e))?;
        self.snapshot_meta = snap.get_metadata().clone();
        Ok(())
    }

    /// The stored snapshot with its data.
    ///
    /// # Errors
    /// [`RaftError::Storage`] when it cannot be read.
    pub fn read_snapshot(&self) -> Result<Snapshot> {
        let txn = self
            .db
            .begin_read()
            .map_err(|e| self.fail("read snapshot", e))?;
        let meta = txn
            .open_table(META)
            .map_err(|e| self.fail("read snapshot", e))?;
        match meta
            .get(SNAPSHOT)
            .map_err(|e| self.fail("read snapshot", e))?
        {
            Some(b) => Snapshot::parse_from_bytes(b.value()).map_err(|e| self.fail(SNAPSHOT, e)),
            None => Ok(Snapshot::default()),
        }
    }

    /// Whether raft asked for a snapshot newer than the stored one since the last call.
    pub fn take_snapshot_request(&self) -> bool {
        self.snapshot_wanted.swap(false, Ordering::Relaxed)
    }

    fn read_entries(&self, low: u64, high: u64) -> Result<Vec<Entry>> {
        let txn = self
            .db
            .begin_read()
            .map_err(|e| self.fail("read entries", e))?;
        let table = txn
            .open_table(ENTRIES)
            .map_err(|e| self.fail("read entries", e))?;
        let mut out = Vec::with_capacity((high - low) as usize);
        for row in table
            .range(low..high)
            .map_err(|e| self.fail("read entries", e))?
        {
            let (k, v) = row.map_err(|e| self.fail("read entries", e))?;
            let e = Entry::parse_from_bytes(v.value()).map_err(|e| self.fail("decode entry", e))?;
            if e.index != k.value() {
                return Err(self.fail(
                    "entries",
                    format!("key {} holds entry {}", k.value(), e.index),
                ));
            }
            out.push(e);
        }
        if out.len() as u64 != high - low {
            return Err(self.fail("entries", format!("missing entries in {low}..{high}")));
        }
        Ok(out)
    }
}

/// The state machine's part of a snapshot's data written by [`RedbStorage::compact`].
///
/// # Errors
/// A message when the data is not in that format.
pub(crate) fn snapshot_state(data: &[u8]) -> Result<&[u8], String> {
    decode_snapshot_data(data).map(|(_, state)| state)
}

/// Encodes peer addresses (a conf change's context).
pub(crate) fn encode_peers(peers: &BTreeMap<u64, String>) -> Vec<u8> {
    encode_snapshot_data(peers, &[])
}

/// Decodes what [`encode_peers`] wrote (an empty context: no addresses).
///
/// # Errors
/// A message when the bytes are not in that format.
pub(crate) fn decode_peers(data: &[u8]) -> Result<BTreeMap<u64, String>, String> {
    if data.is_empty() {
        return Ok(BTreeMap::new());
    }
    decode_snapshot_data(data).map(|(peers, _)| peers)
}

/// Snapshot data = peer count (u32 LE), then per peer id (u64 LE), address length (u32 LE) and
/// address, then the state machine's bytes. Addresses travel with snapshots because a node that
/// catches up by snapshot never sees the conf-change entries that carried them.
fn encode_snapshot_data(peers: &BTreeMap<u64, String>, state: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + state.len());
    out.extend_from_slice(&(peers.len() as u32).to_le_bytes());
    for (id, addr) in peers {
        out.extend_from_slice(&id.to_le_bytes());
        out.extend_from_slice(&(addr.len() as u32).to_le_bytes());
        out.extend_from_slice(addr.as_bytes());
    }
    out.extend_from_slice(state);
    out
}

fn decode_snapshot_data(data: &[u8]) -> Result<(BTreeMap<u64, String>, &[u8]), String> {
    fn take<'a>(d: &mut &'a [u8], n: usize) -> Result<&'a [u8], String> {
        if d.len() < n {
            return Err("truncated snapshot data".into());
        }
        let (head, rest) = d.split_at(n);
        *d = rest;
        Ok(head)
    }
    let mut d = data;
    let u32_of = |b: &[u8]| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize;
    let count = u32_of(take(&mut d, 4)?);
    let mut peers = BTreeMap::new();
    for _ in 0..count {
        let id = take(&mut d, 8)?;
        let id = u64::from_le_bytes([id[0], id[1], id[2], id[3], id[4], id[5], id[6], id[7]]);
        let len = u32_of(take(&mut d, 4)?);
        let addr =
            std::str::from_utf8(take(&mut d, len)?).map_err(|e| format!("peer address: {e}"))?;
        peers.insert(id, addr.to_string());
    }
    Ok((peers, d))
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
mod tests {
    use super::*;
    use raft::Storage as _;

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);
    impl TempDir {
        fn new(name: &str) -> Self {
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

    fn entry(index: u64, term: u64, data: &[u8]) -> Entry {
        Entry {
            index,
            term,
            data: data.to_vec().into(),
            ..Default::default()
        }
    }

    fn bootstrapped(dir: &Path) -> RedbStorage {
        let mut s = RedbStorage::open(dir).expect("open");
        let peers = BTreeMap::from([(1, "a:1".to_string()), (2, "b:2".to_string())]);
        s.initialize(ConfState::from((vec![1, 2], vec![])), peers, b"init")
            .expect("initialize");
        s
    }

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

    /// Ensures that appending at an index inside the log replaces the conflicting suffix.
    #[test]
    fn append_truncates_conflicting_suffix() {
        let dir = TempDir::new("truncate");
        let mut s = bootstrapped(&dir.0);
        s.append(
            &[entry(2, 1, b"a"), entry(3, 1, b"b"), entry(4, 1, b"c")],
            None,
        )
        .expect("append");
        s.append(&[entry(3, 2, b"B")], None).expect("overwrite");
        drop(s);
        let mut s = RedbStorage::open(&dir.0).expect("reopen");
        assert_eq!(s.last_index().expect("last"), 3);
        assert_eq!(s.term(3).expect("term"), 2);
        assert!(matches!(
            s.term(4),
            Err(raft::Error::Store(StorageError::Unavailable))
        ));
        assert!(
            s.append(&[entry(9, 2, b"gap")], None).is_err(),
            "a gap is refused"
        );
    }

    /// Ensures that compaction keeps a snapshot at the index, drops the entries up to it, and
    /// that a restart sees the compacted log.
    #[test]
    fn compaction_survives_restart() {
        let dir = TempDir::new("compact");
        {
            let mut s = bootstrapped(&dir.0);
            let ents: Vec<Entry> = (2..=10).map(|i| entry(i, 2, b"e")).collect();
            s.append(&ents, None).expect("append");
            s.compact(7, b"state@7").expect("compact");
            assert!(matches!(
                s.term(6),
                Err(raft::Error::Store(StorageError::Compacted))
            ));
        }
        let s = RedbStorage::open(&dir.0).expect("reopen");
        assert_eq!(
            (
                s.first_index().expect("first"),
                s.last_index().expect("last")
            ),
            (8, 10)
        );
        assert_eq!(s.term(7).expect("snapshot term"), 2);
        let snap = s.snapshot(7, 2).expect("snapshot");
        assert_eq!(snap.get_metadata().index, 7);
        assert_eq!(snapshot_state(snap.get_data()).expect("state"), b"state@7");
        assert!(
            s.snapshot(9, 2).is_err(),
            "a newer snapshot is not there yet"
        );
        assert!(s.take_snapshot_request(), "and the request is remembered");
        assert!(matches!(
            s.entries(5, 9, None, GetEntriesContext::empty(false)),
            Err(raft::Error::Store(StorageError::Compacted))
        ));
    }

    /// Ensures that applying a leader's snapshot replaces log, conf state and peers.
    #[test]
    fn apply_snapshot_replaces_log() {
        let dir = TempDir::new("apply");
        let mut s = bootstrapped(&dir.0);
        s.append(&[entry(2, 1, b"a")], None).expect("append");
        let mut snap = Snapshot::default();
        snap.mut_metadata().index = 20;
        snap.mut_metadata().term = 4;
        snap.mut_metadata()
            .set_conf_state(ConfState::from((vec![1, 2, 3], vec![])));
        let peers = BTreeMap::from([(3, "c:3".to_string())]);
        snap.set_data(encode_snapshot_data(&peers, b"s20").into());
        s.apply_snapshot(&snap).expect("apply");
        drop(s);
        let s = RedbStorage::open(&dir.0).expect("reopen");
        assert_eq!(
            (
                s.first_index().expect("first"),
                s.last_index().expect("last")
            ),
            (21, 20)
        );
        assert_eq!(s.hard_state().commit, 20);
        assert_eq!(s.hard_state().term, 4);
        assert_eq!(s.conf_state().0.voters, vec![1, 2, 3]);
        assert_eq!(s.peers().keys().copied().collect::<Vec<_>>(), vec![3]);
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
