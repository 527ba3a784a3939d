//! Block ownership: the shared free list with a reference count per block, the per-sequence
//! block table, and [`BlockRef`], one counted reference to a block held outside any sequence
//! (a prefix store entry).
//!
//! The allocator sits behind an `Arc<Mutex<_>>` shared by the cache, every [`SeqKv`] and every
//! [`BlockRef`], so an owner can hand its blocks back from `Drop` wherever it ends (request
//! finished, client gone, scheduler preempting, prefix evicted). The lock is held only to move
//! block ids and counts, never while K/V data is read or written.
//!
//! Sharing: a block may have several owners (sequences that start from the same cached prompt
//! prefix, and the prefix store entry itself). It returns to the free list when its last owner
//! lets go. Shared blocks are read-only: a sequence never writes into one of its first
//! [`SeqKv::shared_blocks`] blocks ([`PagedKvCache::write`](super::PagedKvCache::write)
//! enforces it), so the K/V other owners see never changes under them.

use std::sync::{Arc, Mutex, MutexGuard};

use super::KvCacheError;

/// The free blocks of one cache and how many owners each block has.
#[derive(Debug)]
pub(super) struct BlockAllocator {
    /// Free block ids; the most recently freed is reused first (its data is likely cached).
    free: Vec<u32>,
    /// `refs[b]`: owners of block `b` (sequences and [`BlockRef`]s); 0 exactly when free.
    refs: Vec<u32>,
}

/// The allocator as the cache and its owners share it.
pub(super) type SharedAllocator = Arc<Mutex<BlockAllocator>>;

impl BlockAllocator {
    /// All `num_blocks` blocks free, handed out in increasing order at first.
    pub(super) fn shared(num_blocks: u32) -> SharedAllocator {
        Arc::new(Mutex::new(Self {
            free: (0..num_blocks).rev().collect(),
            refs: vec![0; num_blocks as usize],
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

    /// How many owners block `b` has, for invariant checks.
    #[cfg(test)]
    pub(super) fn refs(&self, b: u32) -> u32 {
        self.refs[b as usize]
    }

    /// Moves `n` free blocks (one owner each) to the end of `table`, or nothing when fewer
    /// are free.
    fn take(&mut self, n: usize, table: &mut Vec<u32>) -> Result<(), KvCacheError> {
        if n > self.free.len() {
            return Err(KvCacheError::OutOfBlocks {
                needed: n,
                free: self.free.len(),
            });
        }
        let from = self.free.len() - n;
        for &b in &self.free[from..] {
            self.refs[b as usize] = 1;
        }
        table.extend(self.free.drain(from..).rev());
        Ok(())
    }

    /// Adds an owner to a block that already has one.
    ///
    /// # Panics
    /// When the block is free: sharing a free block would hand it out twice.
    fn share(&mut self, b: u32) {
        let r = &mut self.refs[b as usize];
        assert!(*r > 0, "BlockAllocator::share: block {b} is free");
        *r += 1;
    }

    /// Drops one owner of each block; a block whose last owner left goes back to the free list.
    ///
    /// # Panics
    /// When a block is already free (a double free would hand it out twice).
    fn give_back(&mut self, blocks: impl DoubleEndedIterator<Item = u32>) {
        // Reversed so the lowest-indexed block of the run is handed out again first.
        for b in blocks.rev() {
            let r = &mut self.refs[b as usize];
            assert!(
                *r > 0,
                "BlockAllocator::give_back: block {b} is already free"
            );
            *r -= 1;
            if *r == 0 {
                self.free.push(b);
            }
        }
    }
}

/// Locks the allocator. Its state is consistent after every operation (the only panics are
/// invariant checks made before anything changes), so a poisoned lock is still safe to use.
pub(super) fn lock(alloc: &SharedAllocator) -> MutexGuard<'_, BlockAllocator> {
    alloc
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One counted reference to a KV block, held outside any sequence: what a prefix store keeps
/// for each cached block. Cloning adds an owner; dropping removes one, and the block is freed
/// when no sequence and no other `BlockRef` holds it.
///
/// Made by [`PagedKvCache::share_block`](super::PagedKvCache::share_block) from a full,
/// committed block of a sequence; its contents never change while it is shared.
#[derive(Debug)]
pub struct BlockRef {
    id: u32,
    alloc: SharedAllocator,
}

impl BlockRef {
    /// The block's id in its cache's pools.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Whether the block comes from `alloc`.
    pub(super) fn belongs_to(&self, alloc: &SharedAllocator) -> bool {
        Arc::ptr_eq(&self.alloc, alloc)
    }
}

impl Clone for BlockRef {
    fn clone(&self) -> Self {
        lock(&self.alloc).share(self.id);
        Self {
            id: self.id,
            alloc: Arc::clone(&self.alloc),
        }
    }
}

impl Drop for BlockRef {
    fn drop(&mut self) {
        lock(&self.alloc).give_back(std::iter::once(self.id));
    }
}

/// One sequence's share of a [`PagedKvCache`](super::PagedKvCache): its block table and how
/// many tokens are committed. Dropping it gives up its blocks (each is freed unless another
/// owner still holds it).
///
/// Created by [`PagedKvCache::new_seq`](super::PagedKvCache::new_seq) (empty) or
/// [`PagedKvCache::new_seq_with_prefix`](super::PagedKvCache::new_seq_with_prefix) (starting
/// from cached blocks); grown by [`PagedKvCache::reserve`](super::PagedKvCache::reserve). The
/// same table serves every layer.
#[derive(Debug)]
pub struct SeqKv {
    blocks: Vec<u32>,
    len: usize,
    /// The first `shared` blocks are read-only: taken from a prefix store, or handed to one.
    shared: usize,
    block_size: usize,
    alloc: SharedAllocator,
}

impl SeqKv {
    pub(super) fn new(alloc: SharedAllocator, block_size: usize) -> Self {
        Self {
            blocks: Vec::new(),
            len: 0,
            shared: 0,
            block_size,
            alloc,
        }
    }

    /// A sequence whose first tokens are the full blocks `prefix` (already written by another
    /// sequence): it adds itself as an owner of each, and its length is their tokens.
    /// The caller checks that every block comes from `alloc`.
    pub(super) fn with_prefix(
        alloc: SharedAllocator,
        block_size: usize,
        prefix: &[&BlockRef],
    ) -> Self {
        let blocks: Vec<u32> = prefix.iter().map(|b| b.id).collect();
        {
            let mut a = lock(&alloc);
            for &b in &blocks {
                a.share(b);
            }
        }
        Self {
            len: blocks.len() * block_size,
            shared: blocks.len(),
            blocks,
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

    /// Leading blocks that are read-only (shared with a prefix store): positions below
    /// `shared_blocks() * block_size` are never written through this sequence.
    pub fn shared_blocks(&self) -> usize {
        self.shared
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

    /// Keeps only the first `len` tokens (no-op when `len >= self.len()`) and gives up the
    /// blocks no longer needed for them, including reserved, uncommitted ones. A shared block
    /// that stays keeps its read-only mark, so truncating into the middle of one makes the
    /// next write panic rather than change K/V another owner reads.
    pub fn truncate(&mut self, len: usize) {
        if len >= self.len {
            return;
        }
        self.len = len;
        let keep = len.div_ceil(self.block_size);
        if keep < self.blocks.len() {
            lock(&self.alloc).give_back(self.blocks.drain(keep..));
        }
        self.shared = self.shared.min(keep);
    }

    /// Whether this sequence's blocks come from `alloc`.
    pub(super) fn belongs_to(&self, alloc: &SharedAllocator) -> bool {
        Arc::ptr_eq(&self.alloc, alloc)
    }

    /// A new owner of block `index`, which must be full and committed; the block (and every
    /// one before it) becomes read-only for this sequence.
    pub(super) fn share(&mut self, index: usize) -> Result<BlockRef, KvCacheError> {
        let full = (index + 1)
            .checked_mul(self.block_size)
            .is_some_and(|end| end <= self.len);
        if !full {
            return Err(KvCacheError::NotShareable {
                index,
                len: self.len,
            });
        }
        let id = self.blocks[index];
        lock(&self.alloc).share(id);
        self.shared = self.shared.max(index + 1);
        Ok(BlockRef {
            id,
            alloc: Arc::clone(&self.alloc),
        })
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
