//! CUDA C of the tensor-core prefill attention for head dims 64 and 128 (sm_80+).
//!
//! FlashAttention-2 on `mma.sync.m16n8k16` (f16 or bf16 operands, f32 accumulators): a block of
//! four warps owns 64 query rows of one head, each warp 16 rows whose Q fragments stay in
//! registers for the whole call. K and V tiles of 64 keys are staged in shared memory with
//! 16-byte vector loads (rows padded by 8 elements so fragment reads hit distinct banks);
//! `S = Q·Kᵀ` is accumulated in registers, masked (bottom-right causal), turned into
//! probabilities with an online softmax (row max and per-thread partial sums, combined across
//! the 4 lanes of a row by shuffles), re-packed in registers as the A operand of `P·V` (the C
//! fragment of two n-tiles is exactly an A fragment), and V's B fragments come from
//! `ldmatrix.trans`. Tiles past the block's last visible key are never loaded. Same layouts and
//! conventions as [`super::prefill`]; the host picks this variant for head dims 64 and 128 on
//! compute capability 8.0 and newer.

/// Entry points of this module.
pub const ENTRIES: &[&str] = &[
    "attn_prefill_tc_f16_d64",
    "attn_prefill_tc_f16_d128",
    "attn_prefill_tc_bf16_d64",
    "attn_prefill_tc_bf16_d128",
];

/// The module body (`cu/prefill_tc.cu`); needs the prelude before it.
pub const SOURCE: &str = include_str!("cu/prefill_tc.cu");
