//! CUDA C of prefill attention: FlashAttention-2 style over contiguous K/V, batched.
//!
//! Grid `(ceil(seq_q / BM), n_heads, batch)`, [`WARPS`](crate::plan::WARPS) warps per block;
//! each block takes `BM` consecutive query rows of one head and streams the keys of that head's
//! KV head (GQA: `kv_head = head / (n_heads / n_kv_heads)`, read in place, never copied).
//! Causal masking is aligned bottom-right, so the block's last visible key bounds the key loop
//! and fully masked tiles are never touched. Layouts (row-major): `q`/`out`
//! `(batch, seq_q, n_heads, head_dim)`, `k`/`v` `(batch, seq_k, n_kv_heads, head_dim)`, `lse`
//! `(batch, seq_q, n_heads)` f32.
//!
//! Entry points `attn_prefill_{f16,bf16}_d{64,128,256}`: the suffix is the largest head dim the
//! variant holds in registers (any smaller head dim is correct in it; 64 and 128 fill it).

/// Entry points of this module, in the order [`crate::plan::HeadDimClass`] lists them.
pub const ENTRIES: &[&str] = &[
    "attn_prefill_f16_d64",
    "attn_prefill_f16_d128",
    "attn_prefill_f16_d256",
    "attn_prefill_bf16_d64",
    "attn_prefill_bf16_d128",
    "attn_prefill_bf16_d256",
];

/// The module body (`cu/prefill.cu`); needs the prelude and the attention core before it.
pub const SOURCE: &str = include_str!("cu/prefill.cu");
