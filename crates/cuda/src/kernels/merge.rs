//! CUDA C of the (O, LSE) merge used by ring attention, and the f32 → 16-bit cast that ends it.
//!
//! `attn_merge_{f16,bf16}` folds one partial result (output in the input dtype, f32 LSE, e.g. a
//! kernel's output for one KV block of the ring) into an f32 accumulator in place, one warp per
//! row, with DESIGN.md's formula: `lse = max + log1p(exp(min - max))`,
//! `o = exp(lseA - lse)·oA + exp(lseB - lse)·oB`; an empty part `(0, -inf)` leaves the
//! accumulator unchanged and two empties stay `(0, -inf)`. Keeping the accumulator in f32 means
//! P ring steps round once, not P times. `cast_f32_to_{f16,bf16}` converts the final result.

/// Entry points of this module.
pub const ENTRIES: &[&str] = &[
    "attn_merge_f16",
    "attn_merge_bf16",
    "cast_f32_to_f16",
    "cast_f32_to_bf16",
];

/// The module body (`cu/merge.cu`); needs the prelude before it.
pub const SOURCE: &str = include_str!("cu/merge.cu");
