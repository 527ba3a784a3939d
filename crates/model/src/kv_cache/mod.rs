//! The paged KV cache: per-layer K and V pools cut into fixed-size blocks, and per-sequence
//! block tables.
//!
//! This is the layout workers use when sequences are batched and sharded: a sequence owns a
//! list of blocks (not a contiguous range), so sequences grow, shrink and end without moving
//! anyone's data, and the attention kernel reads them in place through
//! [`KvView`]. A block holds `block_size` tokens laid out
//! `(block_size, n_kv_heads, head_dim)`; all layers share each sequence's block table.
//!
//! Once a sequence holds its blocks, writing and viewing allocate nothing; [`PagedKvCache::reserve`]
//! takes a block from the shared free list only when a token crosses a block boundary.
//!
//! Prefix caching: a full, committed block can be shared ([`PagedKvCache::share_block`]) into
//! a [`PrefixStore`], and a later sequence can start from a chain of stored blocks
//! ([`PagedKvCache::new_seq_with_prefix`]) instead of recomputing them. Blocks are reference
//! counted; shared blocks are read-only, and a sequence writes only into blocks after them.

mod allocator;
mod prefix;
#[cfg(test)]
mod prefix_tests;
#[cfg(test)]
mod tests;

use allocator::{BlockAllocator, SharedAllocator, lock};
pub use allocator::{BlockRef, SeqKv};
pub use prefix::PrefixStore;

use tessera_kernels::attention::KvView;

/// KV cache errors.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KvCacheError {
    /// Not enough free blocks for a reservation; nothing was allocated.
    #[error("KV cache is full: {needed} more blocks needed, {free} free")]
    OutOfBlocks {
        /// Blocks the reservation needed.
        needed: usize,
        /// Blocks free at the time.
        free: usize,
    },
    /// A configuration value is out of range.
    #[error("invalid KV cache config `{field}`: {reason}")]
    InvalidConfig {
        /// The [`KvCacheConfig`] field at fault.
        field: &'static str,
        /// Why it is rejected.
        reason: String,
    },
    /// A [`SeqKv`] or [`BlockRef`] was used with a cache other than the one that created it.
    #[error("the sequence or block belongs to another KV cache")]
    ForeignSequence,
    /// Only a full, committed block can be shared.
    #[error("block {index} of a sequence of {len} tokens is not full and committed")]
    NotShareable {
        /// The block's index in the sequence's table.
        index: usize,
        /// The sequence's committed tokens.
        len: usize,
    },
    /// A prefix store has no block under this hash.
    #[error("the prefix store has no block {hash:016x}")]
    PrefixMissing {
        /// The block hash asked for.
        hash: u64,
    },
    /// A prefix store already has a block under this hash.
    #[error("the prefix store already has a block {hash:016x}")]
    PrefixDuplicate {
        /// The block hash offered.
        hash: u64,
    },
}

/// Shape and capacity of a [`PagedKvCache`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvCacheConfig {
    /// Layers held (a pipeline stage holds only its own).
    pub n_layers: usize,
    /// KV heads held (a tensor-parallel rank holds only its own).
    pub n_kv_heads: usize,
    /// Values per head.
    pub head_dim: usize,
    /// Tokens per block.
    pub block_size: usize,
    /// Blocks in each layer's pool; every sequence's blocks come from these.
    pub num_blocks: usize,
}

impl KvCacheConfig {
    /// Floats one token takes in one layer's K (or V) pool.
    pub fn token_floats(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    /// Checks every field and that the pools are addressable; returns the floats per pool.
    fn pool_floats(&self) -> Result<usize, KvCacheError> {
        let positive = |field: &'static str, value: usize| {
            if value == 0 {
                Err(KvCacheError::InvalidConfig {
                    field,
                    reason: "must be at least 1".into(),
                })
            } else {
                Ok(())
            }
        };
        positive("n_layers", self.n_layers)?;
        positive("n_kv_heads", self.n_kv_heads)?;
        positive("head_dim", self.head_dim)?;
        positive("block_size", self.block_size)?;
        positive("num_blocks", self.num_blocks)?;
        if u32::try_from(self.num_blocks).is_err() {
            return Err(KvCacheError::InvalidConfig {
                field: "num_blocks",
                reason: format!("{} exceeds the block id range (u32)", self.num_blocks),
            });
        }
        let too_large = || KvCacheError::InvalidConfig {
            field: "num_blocks",
            reason: "the K/V pools would exceed the address space".into(),
        };
        let per_pool = [self.block_size, self.n_kv_heads, self.head_dim]
            .into_iter()
            .try_fold(self.num_blocks, usize::checked_mul)
            .ok_or_else(too_large)?;
        // Both pools of every layer, in bytes, must be addressable too.
        per_pool
            .checked_mul(2 * self.n_layers)
            .and_then(|f| f.checked_mul(size_of::<f32>()))
            .filter(|&bytes| bytes <= isize::MAX as usize)
            .ok_or_else(too_large)?;
        Ok(per_pool)
    }
}

/// A run of a sequence's positions that lie in one block: where its K/V go in the pools.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockRun {
    /// The run's first position in the sequence.
    pub pos: usize,
    /// That position's slot in the pools, `block id × block_size + offset`; the run's other
    /// tokens follow it.
    pub slot: usize,
    /// Tokens in the run.
    pub len: usize,
}

/// The positions `range` of a sequence with block table `table` cut into runs that stay inside
/// one block each, in order: how any holder of the pools (the CPU cache, a GPU stage's device
/// pools) writes a step's new K/V with one copy per run.
///
/// # Panics
/// When `block_size` is 0 or `table` does not cover `range` (a caller bug: blocks are reserved
/// before a step writes).
pub fn block_runs(
    table: &[u32],
    block_size: usize,
    range: std::ops::Range<usize>,
) -> impl Iterator<Item = BlockRun> + '_ {
    let mut t = range.start;
    std::iter::from_fn(move || {
        if t >= range.end {
            return None;
        }
        let len = (block_size - t % block_size).min(range.end - t);
        let run = BlockRun {
            pos: t,
            slot: table[t / block_size] as usize * block_size + t % block_size,
            len,
        };
        t += len;
        Some(run)
    })
}

/// Per-layer K and V pools of `num_blocks` blocks each (f32), and the shared block allocator.
#[derive(Debug)]
pub struct PagedKvCache {
    cfg: KvCacheConfig,
    /// `k[layer]`: `(num_blocks, block_size, n_kv_heads, head_dim)`.
    k: Vec<Vec<f32>>,
    /// `v[layer]`, laid out like `k`.
    v: Vec<Vec<f32>>,
    alloc: SharedAllocator,
}

impl PagedKvCache {
    /// A cache with every block free; the pools are zero-filled (lazily, by the OS).
    ///
    /// # Errors
    /// [`KvCacheError::InvalidConfig`] naming the field when a dimension is 0, `num_blocks` does
    /// not fit a `u32` block id, or the pools would not be addressable.
    pub fn new(cfg: KvCacheConfig) -> Result<Self, KvCacheError> {
        Self::build(cfg, true)
    }

    /// The cache of `cfg`, with its K/V pools when `storage`.
    fn build(cfg: KvCacheConfig, storage: bool) -> Result<Self, KvCacheError> {
        let floats = cfg.pool_floats()?;
        let layers = if storage { cfg.n_layers } else { 0 };
        let pools = || (0..layers).map(|_| vec![0.0f32; floats]).collect();
        let num_blocks =
            u32::try_from(cfg.num_blocks).map_err(|_| KvCacheError::InvalidConfig {
                field: "num_blocks",
                reason: "exceeds u32".into(),
            })?;
        Ok(Self {
            k: pools(),
            v: pools(),
            alloc: BlockAllocator::shared(num_blocks),
            cfg,
        })
    }

    /// A cache that keeps block tables, reference counts and the prefix bookkeeping only:
    /// the K/V themselves live elsewhere (a GPU stage's device pools, addressed by the same
    /// block ids). [`PagedKvCache::write`] and [`PagedKvCache::view`] panic on it; everything
    /// else behaves as on [`PagedKvCache::new`]'s.
    ///
    /// # Errors
    /// As [`PagedKvCache::new`].
    pub fn without_storage(cfg: KvCacheConfig) -> Result<Self, KvCacheError> {
        Self::build(cfg, false)
    }

    /// Whether this cache holds the K/V (see [`PagedKvCache::without_storage`]).
    pub fn has_storage(&self) -> bool {
        !self.k.is_empty()
    }

    /// The configuration the cache was built with.
    pub fn config(&self) -> &KvCacheConfig {
        &self.cfg
    }

    /// An empty sequence holding no block.
    pub fn new_seq(&self) -> SeqKv {
        SeqKv::new(self.alloc.clone(), self.cfg.block_size)
    }

    /// A sequence starting from the full blocks `prefix` (a chain from a [`PrefixStore`]):
    /// its first `prefix.len() * block_size` tokens are theirs, read-only and shared; its own
    /// tokens go into fresh blocks after them.
    ///
    /// # Errors
    /// [`KvCacheError::ForeignSequence`] when a block comes from another cache.
    pub fn new_seq_with_prefix(&self, prefix: &[&BlockRef]) -> Result<SeqKv, KvCacheError> {
        if prefix.iter().any(|b| !b.belongs_to(&self.alloc)) {
            return Err(KvCacheError::ForeignSequence);
        }
        Ok(SeqKv::with_prefix(
            self.alloc.clone(),
            self.cfg.block_size,
            prefix,
        ))
    }

    /// A new reference to block `index` of `seq`, for a [`PrefixStore`]. The block must be
    /// full and committed; from now on it (and every block before it) is read-only for `seq`.
    ///
    /// # Errors
    /// [`KvCacheError::NotShareable`] when the block is not full and committed;
    /// [`KvCacheError::ForeignSequence`] when `seq` comes from another cache.
    pub fn share_block(&self, seq: &mut SeqKv, index: usize) -> Result<BlockRef, KvCacheError> {
        if !seq.belongs_to(&self.alloc) {
            return Err(KvCacheError::ForeignSequence);
        }
        seq.share(index)
    }

    /// Makes room for `n` more tokens after `seq.len()`, taking blocks from the free list only
    /// when the sequence's current blocks are not enough.
    ///
    /// # Errors
    /// [`KvCacheError::OutOfBlocks`] when too few blocks are free — the sequence and the free
    /// list are then unchanged; [`KvCacheError::ForeignSequence`] when `seq` comes from another
    /// cache.
    pub fn reserve(&self, seq: &mut SeqKv, n: usize) -> Result<(), KvCacheError> {
        if !seq.belongs_to(&self.alloc) {
            return Err(KvCacheError::ForeignSequence);
        }
        seq.grow(n)
    }

    /// Writes `k`, `v` `(n, n_kv_heads, head_dim)` of `layer` at positions
    /// `seq.len()..seq.len() + n` (call [`SeqKv::commit`] once every layer is written).
    ///
    /// # Panics
    /// Caller bugs: `layer >= n_layers`, `k`/`v` not whole tokens or of different lengths,
    /// the positions not reserved or inside the sequence's shared (read-only) blocks, or `seq`
    /// from another cache.
    pub fn write(&mut self, layer: usize, seq: &SeqKv, k: &[f32], v: &[f32]) {
        assert!(
            self.has_storage(),
            "PagedKvCache::write: this cache keeps block tables only (its K/V live on a device)"
        );
        assert!(
            seq.belongs_to(&self.alloc),
            "PagedKvCache::write: the sequence belongs to another cache"
        );
        assert!(
            layer < self.cfg.n_layers,
            "PagedKvCache::write: layer {layer} >= n_layers {}",
            self.cfg.n_layers
        );
        let row = self.cfg.token_floats();
        assert!(
            k.len() == v.len() && k.len().is_multiple_of(row),
            "PagedKvCache::write: k/v are not (n, n_kv_heads, head_dim)"
        );
        let n = k.len() / row;
        let (start, end) = (seq.len(), seq.len() + n);
        assert!(
            end <= seq.capacity(),
            "PagedKvCache::write: positions {start}..{end} not reserved"
        );
        // Shared blocks hold K/V other sequences and the prefix store read.
        assert!(
            start >= seq.shared_blocks() * self.cfg.block_size,
            "PagedKvCache::write: position {start} is in a shared block"
        );
        let (kp, vp) = (&mut self.k[layer], &mut self.v[layer]);
        for run in block_runs(seq.block_table(), self.cfg.block_size, start..end) {
            let (dst, src, len) = (run.slot * row, (run.pos - start) * row, run.len * row);
            kp[dst..dst + len].copy_from_slice(&k[src..src + len]);
            vp[dst..dst + len].copy_from_slice(&v[src..src + len]);
        }
    }

    /// A view of `layer` over the first `len` tokens of `seq` (`len` may include tokens just
    /// written and not yet committed), for [`flash_attention`](tessera_kernels::attention::flash_attention).
    ///
    /// The view borrows both the cache and the sequence's block table.
    ///
    /// # Panics
    /// When `layer >= n_layers`, `len > seq.capacity()`, or `seq` is from another cache.
    pub fn view<'a>(&'a self, layer: usize, seq: &'a SeqKv, len: usize) -> KvView<'a> {
        assert!(
            self.has_storage(),
            "PagedKvCache::view: this cache keeps block tables only (its K/V live on a device)"
        );
        assert!(
            seq.belongs_to(&self.alloc),
            "PagedKvCache::view: the sequence belongs to another cache"
        );
        assert!(
            layer < self.cfg.n_layers,
            "PagedKvCache::view: layer {layer} >= n_layers {}",
            self.cfg.n_layers
        );
        assert!(
            len <= seq.capacity(),
            "PagedKvCache::view: {len} tokens exceed the reserved {}",
            seq.capacity()
        );
        KvView {
            k: &self.k[layer],
            v: &self.v[layer],
            block_table: seq.block_table(),
            block_size: self.cfg.block_size,
            len,
        }
    }

    /// Blocks not owned by any sequence or [`BlockRef`].
    pub fn free_blocks(&self) -> usize {
        lock(&self.alloc).free()
    }

    /// The free block ids, for invariant checks.
    #[cfg(test)]
    fn free_ids(&self) -> Vec<u32> {
        lock(&self.alloc).free_ids()
    }

    /// How many owners block `b` has, for invariant checks.
    #[cfg(test)]
    fn refs(&self, b: u32) -> u32 {
        lock(&self.alloc).refs(b)
    }

    /// Blocks needed to hold `tokens` tokens (what a scheduler checks before admitting).
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.cfg.block_size)
    }
}
