//! The stage step: the one forward pass every caller runs.
//!
//! A stage is a contiguous range of layers, possibly with the embedding (first stage) and the
//! final norm and output head (last stage); the whole model is the stage that has all three.
//! [`Llama::step`](crate::llama::Llama::step) runs one batched step of it:
//!
//! 1. input: token ids on a stage with the embedding ([`StageInput::Tokens`]), otherwise the
//!    previous stage's hidden states ([`StageInput::Hidden`], `(n, hidden)`);
//! 2. every layer of the stage over the batch's rows, writing K/V into the cache and committing
//!    the new tokens to each sequence;
//! 3. output: on the last stage the logits `(m, vocab)` of the last row of the `m` sequences
//!    that sample ([`StageOutput::Logits`]), elsewhere the hidden states `(n, hidden)` for the
//!    next stage ([`StageOutput::Hidden`]).
//!
//! The engine calls it with the whole model, the worker with its shard, so a pipeline does the
//! engine's arithmetic by construction. What tensor and ring parallelism need is already part
//! of the contract, though only whole slices run today:
//! - [`TensorSlice`]: which KV heads (with their query heads) and MLP columns a tensor-parallel
//!   rank holds, fixed when the stage loads ([`crate::llama::LoadSpec::tensor`]);
//! - [`SeqSlice`]: which part of each sequence a context-parallel rank holds, given per step;
//! - [`Reduce`]: called after the attention output projection and after the MLP down
//!   projection with this rank's partial sums, in place; a group of one rank has nothing to
//!   add ([`LocalReduce`]).

use std::ops::Range;

use tessera_format::ModelConfig;
use tessera_kernels::ThreadPool;

use crate::error::{ModelError, Result};
use crate::kv_cache::PagedKvCache;
use crate::layers::block::StepScratch;

/// The part of every layer a tensor-parallel rank holds: KV heads `kv_heads` with the query
/// heads of their groups (column slices of Q/K/V, row slice of the output projection), and
/// MLP columns `ffn` (column slices of gate/up, row slice of down).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorSlice {
    /// This rank's index in its group.
    pub rank: usize,
    /// Ranks in the group.
    pub ranks: usize,
    /// The KV heads this rank holds.
    pub kv_heads: Range<usize>,
    /// The MLP intermediate columns this rank holds.
    pub ffn: Range<usize>,
    /// The vocabulary rows of the embedding and output head this rank holds.
    pub vocab: Range<usize>,
}

impl TensorSlice {
    /// Every head and column: a group of one.
    pub fn whole(cfg: &ModelConfig) -> Self {
        Self {
            rank: 0,
            ranks: 1,
            kv_heads: 0..cfg.n_kv_heads,
            ffn: 0..cfg.intermediate,
            vocab: 0..cfg.vocab_size,
        }
    }

    /// Checks that the slice fits `cfg` and that this build can run it.
    ///
    /// # Errors
    /// [`ModelError::InvalidArgument`] naming `tensor` otherwise.
    pub fn check(&self, cfg: &ModelConfig) -> Result<()> {
        if *self != Self::whole(cfg) {
            return Err(ModelError::InvalidArgument {
                field: "tensor",
                reason: format!(
                    "tensor-parallel slice {self:?}: only whole layers (one rank) run in this \
                     version"
                ),
            });
        }
        Ok(())
    }
}

/// The part of each sequence a context-parallel (ring) rank holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SeqSlice {
    /// This rank's index in the ring.
    pub rank: usize,
    /// Ranks in the ring.
    pub ranks: usize,
}

impl SeqSlice {
    /// The whole sequence: a ring of one.
    pub const WHOLE: Self = Self { rank: 0, ranks: 1 };

    /// Checks that this build can run the slice.
    ///
    /// # Errors
    /// [`ModelError::InvalidArgument`] naming `seq_slice` otherwise.
    pub fn check(self) -> Result<()> {
        if self != Self::WHOLE {
            return Err(ModelError::InvalidArgument {
                field: "seq_slice",
                reason: format!(
                    "context-parallel slice {self:?}: only whole sequences run in this version"
                ),
            });
        }
        Ok(())
    }
}

/// Where a layer's partial sums are complete.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReducePoint {
    /// After the embedding lookup of a vocabulary slice, `(n, hidden)`.
    Embed,
    /// After the attention output projection, `(n, hidden)`.
    AttnOut,
    /// After the MLP down projection, `(n, hidden)`.
    MlpDown,
}

/// Sums a tensor-parallel group's partial outputs in place, in a fixed rank order (so every
/// rank, and every run, gets the same bits).
pub trait Reduce {
    /// Replaces `x` (this rank's partial sum at `point` of global layer `layer`) by the
    /// group's sum.
    ///
    /// # Errors
    /// When a peer cannot be reached or answers inconsistently.
    fn reduce(&mut self, point: ReducePoint, layer: usize, x: &mut [f32]) -> Result<()>;

    /// Gathers each rank's vocabulary slice of the logits, `local` = (m, vocab_r), into full
    /// rows `out` = (m, vocab) (slices in rank order) on rank 0, which samples; returns true
    /// there. Other ranks send theirs and return false (`out` untouched).
    ///
    /// # Errors
    /// When a peer cannot be reached or answers inconsistently.
    fn gather_logits(&mut self, local: &[f32], m: usize, out: &mut Vec<f32>) -> Result<bool>;
}

/// The reduction of a group of one: its partial sums are the sums.
#[derive(Clone, Copy, Debug, Default)]
pub struct LocalReduce;

impl Reduce for LocalReduce {
    fn reduce(&mut self, _point: ReducePoint, _layer: usize, _x: &mut [f32]) -> Result<()> {
        Ok(())
    }

    fn gather_logits(&mut self, local: &[f32], _m: usize, out: &mut Vec<f32>) -> Result<bool> {
        out.clear();
        out.extend_from_slice(local);
        Ok(true)
    }
}

/// What a step starts from.
#[derive(Clone, Copy, Debug)]
pub enum StageInput<'a> {
    /// The batch's token ids (the stage holds the embedding).
    Tokens,
    /// The previous stage's hidden states, `(n, hidden)`.
    Hidden(&'a [f32]),
}

/// What a step produces.
#[derive(Debug)]
pub enum StageOutput<'s> {
    /// Hidden states for the next stage, `(n, hidden)`.
    Hidden(&'s [f32]),
    /// Logits of the sampling sequences' last rows, `(m, vocab)`, in batch order; empty when
    /// none samples. Mutable: samplers apply penalties in place, and the next step rewrites it.
    Logits(&'s mut [f32]),
    /// A tensor-parallel rank other than 0 on the last stage: its slice of the logits went to
    /// rank 0 through [`Reduce::gather_logits`].
    Delivered,
}

/// Everything a step uses besides the model and the batch.
pub struct StageCtx<'a> {
    /// The stage's KV cache, indexed by global layer.
    pub cache: &'a mut PagedKvCache,
    /// The compute pool.
    pub pool: &'a ThreadPool,
    /// This rank's part of each sequence.
    pub seq_slice: SeqSlice,
    /// The tensor-parallel reduction.
    pub reduce: &'a mut dyn Reduce,
}

/// Buffers for [`Llama::step`](crate::llama::Llama::step), reused across steps.
#[derive(Default)]
pub struct StageScratch {
    /// The residual stream, (n, hidden).
    pub x: Vec<f32>,
    /// Last rows of the sequences that want logits, (m, hidden).
    pub last: Vec<f32>,
    /// Their normalised form.
    pub last_norm: Vec<f32>,
    /// Logits, (m, vocab).
    pub logits: Vec<f32>,
    /// Per-layer buffers.
    pub step: StepScratch,
}
