//! CUDA C of the FlashAttention-2 style inner loop shared by prefill and split-KV decode.
//!
//! A block of [`WARPS`](crate::plan::WARPS) warps owns up to `WARPS * RPW` query rows (each warp
//! `RPW` of them). Their queries sit in shared memory as f32 for the whole call; keys and values
//! stream through shared memory in tiles of 32 (one key per lane), read through an optional
//! block table so a paged KV cache needs no copy. Scores are computed lane-per-key, the online
//! softmax keeps a running max (log2 domain) per row and a per-lane running sum, and the value
//! product is lane-per-dimension with the probabilities broadcast by shuffles, so no score matrix
//! is ever materialised. Tiles past the last key any row of the block may see are never loaded
//! (this is how causal prefill skips fully masked tiles).
//!
//! The caller (a kernel's prologue) describes each row in shared memory: where its query lives,
//! where its output and log-sum-exp go, and how many keys it may see (`lim`, exclusive). The
//! shared-memory layout and its size formula are mirrored on the host by
//! [`crate::plan::attn_smem_bytes`].

/// The attention core source (`cu/attn_core.cu`); needs the prelude before it.
pub const SOURCE: &str = include_str!("cu/attn_core.cu");
