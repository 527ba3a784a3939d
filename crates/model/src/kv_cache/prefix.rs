//! The prefix store: cached KV blocks of prompt prefixes, by block hash.
//!
//! A store maps a block hash (chosen by whoever drives it: the coordinator hashes each full
//! prompt block together with the hash of the block before it, so a hash names a whole
//! prefix) to a [`BlockRef`] on one of this cache's blocks. A sequence starting with a cached
//! prefix takes the chain's blocks ([`PrefixStore::chain`], then
//! [`PagedKvCache::new_seq_with_prefix`](super::PagedKvCache::new_seq_with_prefix)) instead of
//! computing them.
//!
//! The store holds no policy: it does not choose what to keep or what to evict. A worker's
//! store mirrors the coordinator's prefix index, which sends every insertion and eviction
//! explicitly, so each pipeline stage holds the same hashes in the same order. That is why a
//! missing or duplicate hash is an error here ([`KvCacheError::PrefixMissing`],
//! [`KvCacheError::PrefixDuplicate`]) rather than a miss: it means the mirror broke, and
//! computing on would give wrong output. Evicting an entry a running sequence still uses only
//! drops the store's reference; the sequence's own keeps the block alive.

use std::collections::HashMap;

use super::{BlockRef, KvCacheError};

/// Cached blocks by hash. Dropping the store (or [`PrefixStore::clear`]) drops its references.
#[derive(Debug, Default)]
pub struct PrefixStore {
    blocks: HashMap<u64, BlockRef>,
}

impl PrefixStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Blocks held.
    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    /// Whether no block is held.
    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    /// Whether a block is held under `hash`.
    pub fn contains(&self, hash: u64) -> bool {
        self.blocks.contains_key(&hash)
    }

    /// Keeps `block` under `hash`.
    ///
    /// # Errors
    /// [`KvCacheError::PrefixDuplicate`] when `hash` is already held; the store is unchanged
    /// and `block` is dropped (its reference given up).
    pub fn insert(&mut self, hash: u64, block: BlockRef) -> Result<(), KvCacheError> {
        match self.blocks.entry(hash) {
            std::collections::hash_map::Entry::Occupied(_) => {
                Err(KvCacheError::PrefixDuplicate { hash })
            }
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(block);
                Ok(())
            }
        }
    }

    /// Drops the block held under `hash` (freed unless a sequence still holds it).
    ///
    /// # Errors
    /// [`KvCacheError::PrefixMissing`] when nothing is held under `hash`.
    pub fn evict(&mut self, hash: u64) -> Result<(), KvCacheError> {
        self.blocks
            .remove(&hash)
            .map(drop)
            .ok_or(KvCacheError::PrefixMissing { hash })
    }

    /// The blocks of the chain `hashes`, in order, for
    /// [`PagedKvCache::new_seq_with_prefix`](super::PagedKvCache::new_seq_with_prefix).
    ///
    /// # Errors
    /// [`KvCacheError::PrefixMissing`] naming the first hash not held.
    pub fn chain(&self, hashes: &[u64]) -> Result<Vec<&BlockRef>, KvCacheError> {
        hashes
            .iter()
            .map(|&hash| {
                self.blocks
                    .get(&hash)
                    .ok_or(KvCacheError::PrefixMissing { hash })
            })
            .collect()
    }

    /// Drops every block.
    pub fn clear(&mut self) {
        self.blocks.clear();
    }
}
