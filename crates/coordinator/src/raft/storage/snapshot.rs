//! The snapshot side of [`RedbStorage`]: bootstrapping a cluster, applying a leader's
//! snapshot, compacting the log behind a state-machine snapshot, and the snapshot data format
//! (peer addresses, then the state machine's bytes).

use std::collections::BTreeMap;
use std::fmt::Display;
use std::sync::atomic::Ordering;

use protobuf::Message as _;
use raft::eraftpb::{ConfState, Snapshot};

use super::{CONF_INDEX, CONF_STATE, ENTRIES, HARD_STATE, META, PEERS, RedbStorage, SNAPSHOT};
use crate::raft::Result;
use crate::raft::failpoint::FailPoint;
use redb::ReadableDatabase;

impl RedbStorage {
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
        self.failpoint(FailPoint::SnapshotApplyBeforeCommit)?;
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
        self.failpoint(FailPoint::CompactBeforeCommit)?;
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
pub(super) fn encode_snapshot_data(peers: &BTreeMap<u64, String>, state: &[u8]) -> Vec<u8> {
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

#[cfg(test)]
mod tests {
    use super::super::test_util::{TempDir, bootstrapped, entry};
    use super::*;
    use raft::eraftpb::Entry;
    use raft::{GetEntriesContext, Storage as _, StorageError};

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
}
