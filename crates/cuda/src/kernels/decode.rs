//! CUDA C of split-KV decode attention (flash-decoding) over a paged KV cache.
//!
//! For one or a few query tokens the rows are too few to fill a GPU, so the keys are split:
//! `attn_decode_*` runs on grid `(n_splits, n_kv_heads, row_chunks)`, each block attending the
//! rows `(query i, head of the KV head's group)` to one split's key range, reading K/V through
//! the block table, and writes an f32 partial `(n_splits, seq_q, n_heads, head_dim)` with its LSE
//! `(n_splits, seq_q, n_heads)`. `attn_combine_*` (one warp per output row) then merges the
//! splits by log-sum-exp into the output in the input dtype plus the f32 LSE. All query heads of
//! a KV head share one block, so each K/V tile is loaded once per group (GQA without copies).
//!
//! Layouts: `q`/`out` `(seq_q, n_heads, head_dim)`; pools `(num_blocks, block_size, n_kv_heads,
//! head_dim)`; token `t` is in block `table[t / block_size]`, slot `t % block_size`. Causal
//! masking is bottom-right over the `len` keys.

/// Entry points of this module: decode per head-dim class, then the combine kernels.
pub const ENTRIES: &[&str] = &[
    "attn_decode_f16_d64",
    "attn_decode_f16_d128",
    "attn_decode_f16_d256",
    "attn_decode_bf16_d64",
    "attn_decode_bf16_d128",
    "attn_decode_bf16_d256",
    "attn_combine_f16",
    "attn_combine_bf16",
];

/// The module body (`cu/decode.cu`); needs the prelude and the attention core before it.
pub const SOURCE: &str = include_str!("cu/decode.cu");
