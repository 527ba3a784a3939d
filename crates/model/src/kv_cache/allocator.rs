//! Block ownership: the shared free list and the per-sequence block table.
//!
//! The free list sits behind an `Arc<Mutex<_>>` shared by the cache and every [`SeqKv`], so a
//! sequence can hand its blocks back from `Drop` wherever it ends (request finished, client
//! gone, scheduler preempting). The lock is held only to move block ids, never while K/V data
//! is read or written.

use std::sync::{Arc, Mutex, MutexGuard};

use super::KvCacheError;

/// The free blocks of one cache.
#[derive(Debug)]
pub(super) struct BlockAllocator {
    /// Free block ids; the most recently freed is reused first (its data is likely cached).
    free: Vec<u32>,
}

/// The allocator as the cache and its sequences share it.
pub(super) type SharedAllocator = Arc<Mutex<BlockAllocator>>;

impl BlockAllocator {
    /// All `num_blocks` blocks free, handed out in increasing order at first.
    pub(super) fn shared(num_blocks: u32) -> SharedAllocator {
        Arc::new(Mutex::new(Self {
            free: (0..num_blocks).rev().collect(),
        }))
    }

    /// How many blocks are free.
    pub(super) fn free(&self) -> usize {
        self.free.len()
    }

    /// The free block ids, for invariant checks.
    #[cfg(test)]
    pub(super) fn free_ids(&self) -> Vec<u32> {
        self.free.clone()
    }

    /// Moves `n` free blocks to the end of `table`, or nothing when fewer are free.
    fn take(&mut self, n: usize, table: &mut Vec<u32>) -> Result<(), KvCacheError> {
        if n > self.free.len() {
            return Err(KvCacheError::OutOfBlocks {
                needed: n,
                free: self.free.len(),
            });
        }
        let from = self.free.len() - n;
        table.extend(self.free.drain(from..).rev());
        Ok(())
    }

    fn give_back(&mut self, blocks: impl DoubleEndedIterator<Item = u32>) {
        // Reversed so the lowest-indexed block of the run is handed out again first.
        self.free.extend(blocks.rev());
    }
}

/// Locks the allocator. Its state is consistent after every operation (none can panic half
/// way), so a poisoned lock is still safe to use.
pub(super) fn lock(alloc: &SharedAllocator) -> MutexGuard<'_, BlockAllocator> {
    alloc
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One sequence's share of a [`PagedKvCache`](super::PagedKvCache): its block table and how
/// many tokens are committed. Dropping it returns its blocks to the cache.
///
/// Created by [`PagedKvCache::new_seq`](super::PagedKvCache::new_seq); grown by
/// [`PagedKvCache::reserve`](super::PagedKvCache::reserve). The same table serves every layer.
#[derive(Debug)]
pub struct SeqKv {
    blocks: Vec<u32>,
    len: usize,
    block_size: usize,
    alloc: SharedAllocator,
}

impl SeqKv {
    pub(super) fn new(alloc: SharedAllocator, block_size: usize) -> Self {
        Self {
            blocks: Vec::new(),
            len: 0,
            block_size,
            alloc,
        }
    }

    /// Committed tokens: positions `0..len()` hold K/V of this sequence.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no token is committed.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Tokens the blocks held now can store (committed or not).
    pub fn capacity(&self) -> usize {
        self.blocks.len() * self.block_size
    }

    /// Block ids in token order: token `t` is in block `block_table()[t / block_size]`.
    pub fn block_table(&self) -> &[u32] {
        &self.blocks
    }

    /// Marks `n` more tokens (written at `len()..len() + n`) as part of the sequence.
    ///
    /// # Panics
    /// When `len() + n` exceeds [`capacity`](Self::capacity): tokens must be reserved first.
    pub fn commit(&mut self, n: usize) {
        let new_len = self.len.checked_add(n).filter(|&l| l <= self.capacity());
        match new_len {
            Some(l) => self.len = l,
            None => panic!(
                "SeqKv::commit: {} + {n} tokens exceed the reserved {}",
                self.len,
                self.capacity()
            ),
        }
    }

    /// Keeps only the first `len` tokens (no-op when `len >= self.len()`) and returns the
    /// blocks no longer needed for them to the cache, including reserved, uncommitted ones.
    pub fn truncate(&mut self, len: usize) {
        if len >= self.len {
            return;
        }
        self.len = len;
        let keep = len.div_ceil(self.block_size);
        if keep < self.blocks.len() {
            lock(&self.alloc).give_back(self.blocks.drain(keep..));
        }
    }

    /// Whether this sequence's blocks come from `alloc`.
    pub(super) fn belongs_to(&self, alloc: &SharedAllocator) -> bool {
        Arc::ptr_eq(&self.alloc, alloc)
    }

    /// Takes blocks so that `len() + n` tokens fit; all or nothing.
    pub(super) fn grow(&mut self, n: usize) -> Result<(), KvCacheError> {
        let tokens = self
            .len
            .checked_add(n)
            .ok_or_else(|| KvCacheError::OutOfBlocks {
                needed: usize::MAX,
                free: lock(&self.alloc).free(),
            })?;
        let needed = tokens
            .div_ceil(self.block_size)
            .saturating_sub(self.blocks.len());
        if needed == 0 {
            return Ok(());
        }
        lock(&self.alloc).take(needed, &mut self.blocks)
    }
}

impl Drop for SeqKv {
    fn drop(&mut self) {
        if !self.blocks.is_empty() {
            lock(&self.alloc).give_back(self.blocks.drain(..));
        }
    }
}
