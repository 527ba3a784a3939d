//! FlashAttention-style CPU attention, llama.cpp-order attention, and the log-sum-exp merge.
//!
//! This module owns the attention math: [`ggml_attention`] (what the engine and every pipeline
//! stage run: llama.cpp's non-flash order of operations with f16 Q/K/V/P, so greedy output
//! matches the llama.cpp goldens token for token), [`flash_attention`] (tiled over keys, online
//! softmax, no score matrix, GQA, bottom-right causal masking, keys read through a block table
//! so the paged KV cache needs no copy; the kernel for partial results over key subsets),
//! [`merge_into`] (combining partial results over disjoint key sets, used by flash-decoding
//! here and by ring/context-parallel attention), and [`reference`](mod@reference), the naive
//! f64 implementation tests everywhere are judged against. Both kernels return the output and
//! the log-sum-exp per row, so either's results merge with [`merge_into`].
//!
//! Shapes follow the candle convention: `q`/`out` are `(seq_q, n_heads, head_dim)`, `lse` is
//! `(seq_q, n_heads)`, a K/V block is `(block_size, n_kv_heads, head_dim)`, all row-major f32.

#[cfg(test)]
mod bench;
mod flash;
mod ggml;
#[cfg(target_arch = "x86_64")]
mod ggml_simd;
#[cfg(test)]
mod ggml_tests;
mod merge;
pub mod reference;
mod ring;
mod simd;
#[cfg(test)]
mod tests;

pub use flash::{MAX_HEAD_DIM, flash_attention, flash_attention_unsplit};
pub use ggml::ggml_attention;
pub use merge::merge_into;
pub use ring::{Ring, RingLayout, ring_attention, ring_decode};

/// The only block of a contiguous K/V buffer.
const SINGLE_BLOCK: &[u32] = &[0];

/// K/V of one layer seen through a block table.
///
/// Each block holds `block_size` tokens laid out `(block_size, n_kv_heads, head_dim)`; token `t`
/// lives in block `block_table[t / block_size]` at slot `t % block_size`. A contiguous
/// `(len, n_kv_heads, head_dim)` buffer is one block of size `len` (see [`KvView::contiguous`]).
/// `k` and `v` share the layout and the block table.
#[derive(Clone, Copy, Debug)]
pub struct KvView<'a> {
    /// Key pool: whole blocks, `(num_blocks, block_size, n_kv_heads, head_dim)`.
    pub k: &'a [f32],
    /// Value pool, laid out like `k`.
    pub v: &'a [f32],
    /// Block index (into the pools) of each run of `block_size` tokens, in token order; at least
    /// `len.div_ceil(block_size)` entries.
    pub block_table: &'a [u32],
    /// Tokens per block; must be at least 1.
    pub block_size: usize,
    /// How many tokens (keys) are visible.
    pub len: usize,
}

impl<'a> KvView<'a> {
    /// A view of contiguous `(len, n_kv_heads, head_dim)` keys and values.
    ///
    /// `len == 0` is allowed (every query row then sees no key); the single block is given size
    /// `max(len, 1)` so the view stays well formed.
    pub fn contiguous(k: &'a [f32], v: &'a [f32], len: usize) -> Self {
        Self {
            k,
            v,
            block_table: SINGLE_BLOCK,
            block_size: len.max(1),
            len,
        }
    }

    /// Offset into `k`/`v` of token `t`'s row for KV head `kv_head`, given the row layout.
    ///
    /// # Panics
    /// When `t` is past the block table (a caller bug; [`flash_attention`] validates views
    /// before it reads them).
    #[inline]
    pub fn offset(&self, t: usize, kv_head: usize, n_kv_heads: usize, head_dim: usize) -> usize {
        let block = self.block_table[t / self.block_size] as usize;
        let slot = t % self.block_size;
        ((block * self.block_size + slot) * n_kv_heads + kv_head) * head_dim
    }

    /// Checks that every visible token of this view lies inside `k` and `v` for rows of
    /// `n_kv_heads * head_dim` values.
    ///
    /// # Panics
    /// With a message naming the inconsistency: `block_size == 0`, `k`/`v` lengths differ, the
    /// block table is shorter than `len` needs, or a block index points past the pools.
    pub fn validate(&self, n_kv_heads: usize, head_dim: usize) {
        assert!(self.block_size > 0, "KvView: block_size must be at least 1");
        assert_eq!(
            self.k.len(),
            self.v.len(),
            "KvView: k and v pools differ in length"
        );
        let n_blocks = self.len.div_ceil(self.block_size);
        assert!(
            self.block_table.len() >= n_blocks,
            "KvView: block table has {} entries, {} tokens of block size {} need {}",
            self.block_table.len(),
            self.len,
            self.block_size,
            n_blocks
        );
        let block_floats = self.block_size * n_kv_heads * head_dim;
        // The last block may be partial, but blocks are whole units of the pool: requiring the
        // whole block to exist keeps the check O(blocks) and matches how pools are allocated.
        let pool_blocks = self.k.len().checked_div(block_floats).unwrap_or(usize::MAX);
        if let Some(&bad) = self.block_table[..n_blocks]
            .iter()
            .find(|&&b| b as usize >= pool_blocks)
        {
            panic!("KvView: block index {bad} is past the pool of {pool_blocks} blocks");
        }
    }
}

/// What one attention call computes: its dimensions, masking and score scale.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttnSpec {
    /// Dimensions.
    pub shape: AttnShape,
    /// Bottom-right causal masking (query i sees key j iff j <= i + len - seq_q).
    pub causal: bool,
    /// The factor on `q · k`, usually `1 / sqrt(head_dim)`.
    pub scale: f32,
}

/// Where an attention call writes: `out` `(seq_q, n_heads, head_dim)` and the log-sum-exp of
/// each row's scores `lse` `(seq_q, n_heads)`.
#[derive(Debug)]
pub struct AttnOut<'a> {
    /// The attention output.
    pub out: &'a mut [f32],
    /// The log-sum-exp per query row and head (`-inf` for a row with no visible key).
    pub lse: &'a mut [f32],
}

/// Dimensions of one attention call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttnShape {
    /// Query rows (tokens) in this call.
    pub seq_q: usize,
    /// Query heads; a multiple of `n_kv_heads`.
    pub n_heads: usize,
    /// Key/value heads (GQA groups).
    pub n_kv_heads: usize,
    /// Values per head, `1..=MAX_HEAD_DIM`.
    pub head_dim: usize,
}

impl AttnShape {
    /// Query heads sharing one KV head.
    ///
    /// # Panics
    /// When `n_kv_heads` is 0.
    pub fn group(&self) -> usize {
        self.n_heads / self.n_kv_heads
    }

    /// Checks one kernel call's buffers against this shape: heads divisible into groups, a
    /// supported head size, q and out `(seq_q, n_heads, head_dim)`, lse `(seq_q, n_heads)`,
    /// and the KV view. `kernel` names the caller in the panic message.
    ///
    /// # Panics
    /// On any mismatch (a caller bug).
    pub fn check(&self, kernel: &str, q: &[f32], out: &[f32], lse: &[f32], kv: &KvView<'_>) {
        let AttnShape {
            seq_q,
            n_heads,
            n_kv_heads,
            head_dim,
        } = *self;
        assert!(n_kv_heads > 0, "{kernel}: n_kv_heads must be at least 1");
        assert!(
            n_heads % n_kv_heads == 0,
            "{kernel}: n_heads {n_heads} is not a multiple of n_kv_heads {n_kv_heads}"
        );
        assert!(
            (1..=MAX_HEAD_DIM).contains(&head_dim),
            "{kernel}: head_dim {head_dim} is outside 1..={MAX_HEAD_DIM}"
        );
        let rows = seq_q * n_heads;
        assert_eq!(
            q.len(),
            rows * head_dim,
            "{kernel}: q is not (seq_q, n_heads, head_dim)"
        );
        assert_eq!(
            out.len(),
            rows * head_dim,
            "{kernel}: out is not (seq_q, n_heads, head_dim)"
        );
        assert_eq!(lse.len(), rows, "{kernel}: lse is not (seq_q, n_heads)");
        kv.validate(n_kv_heads, head_dim);
    }

    /// Index of the last key query row `i` may see, plus one (0 when it sees none), for `len`
    /// keys: bottom-right aligned, row `i` sees key `j` iff `j <= i + len - seq_q`.
    pub fn causal_limit(&self, i: usize, len: usize) -> usize {
        (i + len + 1).saturating_sub(self.seq_q).min(len)
    }
}
