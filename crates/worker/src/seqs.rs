//! The live sequences of a loaded shard: each one's KV blocks, its sampler (last stage only)
//! and the inbound stream that created it.
//!
//! Freeing is dropping: a [`SeqKv`] hands its blocks back to the cache when it drops, so
//! releasing a sequence, closing its stream or replacing the shard all free its KV.

use std::collections::HashMap;

use tessera_model::kv_cache::SeqKv;
use tessera_text::sampling::Sampler;

/// Identifies one inbound Pipeline stream for the life of the worker process.
pub type StreamId = u64;

/// One live sequence on this stage.
#[derive(Debug)]
pub(crate) struct SeqEntry {
    /// Its KV blocks in this stage's cache.
    pub kv: SeqKv,
    /// Its sampler, on the stage that holds the head.
    pub sampler: Option<Sampler>,
    /// The inbound stream that created it; closing that stream frees it.
    pub stream: StreamId,
    /// Its length over the whole stage: `kv.len()`, except on a context-parallel rank,
    /// whose cache holds only its part of the sequence.
    pub pos: usize,
}

/// Live sequences by coordinator-chosen id.
#[derive(Debug, Default)]
pub(crate) struct SeqTable {
    map: HashMap<u64, SeqEntry>,
}

impl SeqTable {
    /// How many sequences are live.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether `id` is live.
    pub fn contains(&self, id: u64) -> bool {
        self.map.contains_key(&id)
    }

    /// Adds a sequence and returns true; when the id is already live, returns false, leaves
    /// the live one alone and drops `entry` (freeing its blocks).
    pub fn insert(&mut self, id: u64, entry: SeqEntry) -> bool {
        match self.map.entry(id) {
            std::collections::hash_map::Entry::Occupied(_) => false,
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(entry);
                true
            }
        }
    }

    /// A live sequence, to change in place (sharing its blocks into a prefix store).
    pub fn get_mut(&mut self, id: u64) -> Option<&mut SeqEntry> {
        self.map.get_mut(&id)
    }

    /// Takes a sequence out for a step (put it back with [`SeqTable::restore`]).
    pub fn take(&mut self, id: u64) -> Option<SeqEntry> {
        self.map.remove(&id)
    }

    /// Puts back a sequence taken by [`SeqTable::take`].
    pub fn restore(&mut self, id: u64, entry: SeqEntry) {
        self.map.insert(id, entry);
    }

    /// Frees the listed sequences; unknown ids are ignored (a release may race the
    /// sequence's end, and every stage sees the same list). Returns how many were freed.
    pub fn release(&mut self, ids: &[u64]) -> usize {
        ids.iter()
            .filter(|id| self.map.remove(id).is_some())
            .count()
    }

    /// Frees every sequence created on `stream`; returns how many.
    pub fn close_stream(&mut self, stream: StreamId) -> usize {
        let before = self.map.len();
        self.map.retain(|_, e| e.stream != stream);
        before - self.map.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use tessera_model::kv_cache::{KvCacheConfig, PagedKvCache};

    fn cache(blocks: usize) -> PagedKvCache {
        PagedKvCache::new(KvCacheConfig {
            n_layers: 1,
            n_kv_heads: 1,
            head_dim: 4,
            block_size: 4,
            num_blocks: blocks,
        })
        .expect("cache")
    }

    fn entry(cache: &PagedKvCache, tokens: usize, stream: StreamId) -> SeqEntry {
        let mut kv = cache.new_seq();
        cache.reserve(&mut kv, tokens).expect("reserve");
        kv.commit(tokens);
        SeqEntry {
            kv,
            sampler: None,
            stream,
            pos: tokens,
        }
    }

    /// Ensures that a duplicate id is refused without disturbing the live sequence, and that
    /// releasing frees exactly the named sequences' blocks, ignoring unknown ids.
    #[test]
    fn insert_release_and_duplicates() {
        let c = cache(16);
        let mut t = SeqTable::default();
        assert!(t.insert(1, entry(&c, 5, 0)));
        assert!(t.insert(2, entry(&c, 4, 0)));
        assert_eq!(c.free_blocks(), 16 - 3);
        assert!(!t.insert(1, entry(&c, 8, 0)), "duplicate");
        assert_eq!(c.free_blocks(), 13, "the refused entry's blocks came back");
        assert_eq!(t.take(1).map(|e| e.kv.len()), Some(5));
        assert_eq!(
            t.release(&[1, 2, 99]),
            1,
            "1 was taken out, 99 never existed"
        );
        assert_eq!(c.free_blocks(), 16);
        assert_eq!(t.len(), 0);
    }

    /// Ensures that closing a stream frees its sequences and nobody else's.
    #[test]
    fn close_stream_frees_only_its_own() {
        let c = cache(32);
        let mut t = SeqTable::default();
        for id in 0..6 {
            assert!(t.insert(id, entry(&c, 3, id % 2)));
        }
        assert_eq!(t.close_stream(1), 3);
        assert_eq!(c.free_blocks(), 29);
        assert!((0..6).all(|id| t.contains(id) == (id % 2 == 0)));
        assert_eq!(t.close_stream(1), 0);
        assert_eq!(t.close_stream(0), 3);
        assert_eq!(c.free_blocks(), 32);
    }

    proptest! {
        /// Ensures that after any sequence of inserts, releases, take/restore and stream
        /// closes, the blocks in use are exactly those of the live sequences.
        #[test]
        fn blocks_in_use_match_live_sequences(
            ops in proptest::collection::vec((0u8..4, 0u64..8, 1usize..9, 0u64..3), 1..60)
        ) {
            let c = cache(256);
            let mut t = SeqTable::default();
            let mut model: HashMap<u64, (usize, StreamId)> = HashMap::new();
            for (op, id, tokens, stream) in ops {
                match op {
                    0 => {
                        let ok = t.insert(id, entry(&c, tokens, stream));
                        prop_assert_eq!(ok, !model.contains_key(&id));
                        model.entry(id).or_insert((tokens.div_ceil(4), stream));
                    }
                    1 => {
                        let n = t.release(&[id]);
                        prop_assert_eq!(n, usize::from(model.remove(&id).is_some()));
                    }
                    2 => {
                        if let Some(e) = t.take(id) {
                            t.restore(id, e);
                        }
                    }
                    _ => {
                        let n = t.close_stream(stream);
                        let before = model.len();
                        model.retain(|_, (_, s)| *s != stream);
                        prop_assert_eq!(n, before - model.len());
                    }
                }
                let used: usize = model.values().map(|(b, _)| b).sum();
                prop_assert_eq!(c.free_blocks(), 256 - used);
                prop_assert_eq!(t.len(), model.len());
            }
        }
    }
}
