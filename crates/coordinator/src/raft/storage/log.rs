//! The log side of [`RedbStorage`]: appending entries with the hard state in one fsync'd
//! transaction, persisting the commit index and the conf state, and reading entries back.

use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState};

use super::{CONF_INDEX, CONF_STATE, ENTRIES, HARD_STATE, META, PEERS, RedbStorage};
use crate::raft::Result;
use crate::raft::failpoint::FailPoint;
use redb::ReadableDatabase;

impl RedbStorage {
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
        if !entries.is_empty() {
            self.failpoint(FailPoint::AppendBeforeCommit)?;
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

    pub(super) fn read_entries(&self, low: u64, high: u64) -> Result<Vec<Entry>> {
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

#[cfg(test)]
mod tests {
    use super::super::test_util::{TempDir, bootstrapped, entry};
    use super::*;
    use raft::{Storage as _, StorageError};

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
}
