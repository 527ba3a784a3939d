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
//! engine's arithmetic by construction.
//!
//! # Tensor parallelism
//! A stage may be served by a group of R ranks, each loaded with a [`TensorSlice`]
//! ([`crate::llama::LoadSpec::tensor`]) and holding, of every layer of the stage:
//! - KV heads `kv_heads` with the query heads of their GQA groups ([`TensorSlice::q_heads`]):
//!   rows of `wq`, `wk`, `wv` (and their biases), columns of `wo`; its KV cache holds only
//!   those heads ([`crate::llama::Llama::kv_heads_held`]);
//! - MLP columns `ffn`: rows of gate and up, columns of down;
//! - on the first stage, embedding rows `vocab`; on the last, output-head rows `vocab` (the
//!   same slice of the embedding when tied); norms are replicated.
//!
//! Column cuts must fall on block boundaries of the stored format ([`tensor_alignment`]).
//! Each rank runs the same batches; [`Reduce`] completes its partial results in rank order:
//! the embedding (rows of other ranks' tokens are zeros, so the sum is exact), then per layer
//! the attention output and MLP down projections; on the last stage
//! [`Reduce::gather_logits`] brings the vocabulary slices of the logits to rank 0, which
//! samples ([`StageOutput::Logits`]) while the others get [`StageOutput::Delivered`]. A group
//! of one ([`TensorSlice::whole`], [`LocalReduce`]) is the whole model, unchanged and
//! uncopied.
//!
//! Numerics: a rank computes its heads, rows and logits exactly as the whole model does; only
//! the order of the two f32 sums per layer differs (a few ulps). The model's roundings (f16
//! K/V/probabilities, 8-bit activation blocks) turn a rare such ulp into a rounding step, which
//! later layers carry on, so sliced and whole logits agree within measured bounds, not bit
//! for bit (`tests/tensor_parallel.rs`: ≤ 2e-3 on random f32 models, 3e-2 on SmolLM2 widened
//! to f32, about 2 on SmolLM2 Q4_1, whose massive activations amplify a flipped 8-bit
//! rounding; every run gives the same bits).
//!
//! # Context parallelism
//! A stage may also be served by a ring of P ranks, each holding the KV cache of its part of
//! every sequence ([`crate::context_parallel`]): given a [`RingCtx`] (the ring's exchange and
//! each sequence's global start), a step embeds and projects only the rows the rank carries,
//! attends across the ring, and keeps the K/V of its positions only. A rank with a head
//! returns the sampling rows' logits on ring rank 0 and [`StageOutput::Delivered`] elsewhere.

use tessera_kernels::ThreadPool;

use crate::error::{ModelError, Result};
use crate::kv_cache::PagedKvCache;
use crate::layers::SeqStep;
use crate::layers::block::StepScratch;

pub use crate::context_parallel::{RingComm, RingCtx};
pub use crate::tensor_slice::{TensorAlignment, TensorSlice, tensor_alignment};

/// Where a tensor-parallel group's partial sums are complete.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReducePoint {
    /// After the embedding lookup, `(n, hidden)`: each rank holds the rows of its vocabulary
    /// slice and zeros elsewhere, so the sum has one non-zero term per row and is exact.
    Embed,
    /// After the attention output projection, `(n, hidden)`.
    AttnOut,
    /// After the MLP down projection, `(n, hidden)`.
    MlpDown,
}

/// How a tensor-parallel group completes its partial results. Every rank of a group makes the
/// same calls in the same order (they run the same batches), so an implementation can match
/// calls by order; `point` and `layer` let it check that they agree.
pub trait Reduce {
    /// Replaces `x` (this rank's partial sum at `point` of global layer `layer`; for
    /// [`ReducePoint::Embed`], `layer` is the stage's first layer) by the group's sum, added in
    /// rank order 0, 1, …, R−1 (so every rank and every run gets the same bits).
    ///
    /// # Errors
    /// When a peer cannot be reached or answers inconsistently.
    fn reduce(&mut self, point: ReducePoint, layer: usize, x: &mut [f32]) -> Result<()>;

    /// Gathers each rank's vocabulary slice of the logits, `local` = `(m, vocab_r)` row-major,
    /// into full rows `out` = `(m, vocab)` (slices concatenated in rank order) on rank 0, which
    /// samples; returns true there. Other ranks send theirs and return false (`out`
    /// untouched). Called once per last-stage step that has rows to sample (`m > 0`), and only
    /// by a sliced model: a whole one writes its logits in place.
    ///
    /// # Errors
    /// When a peer cannot be reached or answers inconsistently.
    fn gather_logits(&mut self, local: &[f32], m: usize, out: &mut Vec<f32>) -> Result<bool>;
}

/// The reduction of a group of one: its partial sums are the sums, its logits all the logits.
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
    /// The previous stage's hidden states, `(n, hidden)` (every row of the step, also on a
    /// context-parallel rank, which keeps its own).
    Hidden(&'a [f32]),
}

/// What a step produces.
#[derive(Debug)]
pub enum StageOutput<'s> {
    /// Hidden states for the next stage, `(n, hidden)` (every row of the step, also on a
    /// context-parallel rank).
    Hidden(&'s [f32]),
    /// Logits of the sampling sequences' last rows, `(m, vocab)`, in batch order; empty when
    /// none samples. Mutable: samplers apply penalties in place, and the next step rewrites it.
    /// On a tensor-parallel last stage only rank 0 gets them (gathered, full rows).
    Logits(&'s mut [f32]),
    /// A tensor-parallel rank other than 0 on the last stage (its logits slice went to rank 0
    /// through [`Reduce::gather_logits`]), or a ring rank other than 0 there (rank 0 holds
    /// the sampling rows).
    Delivered,
}

/// Everything a step uses besides the model and the batch.
pub struct StageCtx<'a> {
    /// The stage's KV cache, indexed by global layer.
    pub cache: &'a mut PagedKvCache,
    /// The compute pool.
    pub pool: &'a ThreadPool,
    /// The context-parallel ring this rank belongs to, if any (`None`: it holds whole
    /// sequences).
    pub ring: Option<RingCtx<'a>>,
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
    /// This rank's vocabulary slice of the logits, (m, vocab_r), before the gather (unused by
    /// a whole model).
    pub local_logits: Vec<f32>,
    /// Per-layer buffers.
    pub step: StepScratch,
    /// A context-parallel rank's stage output: the whole step's hidden states, gathered.
    pub ring_full: Vec<f32>,
    /// Its padded rows and every rank's, on the way.
    pub ring_rows: (Vec<f32>, Vec<f32>),
}

/// Checks a batch before any state changes: every sequence step has tokens, each below
/// `vocab`, and the sequence stays within `context` positions. `starts` gives each sequence's
/// global start on a ring (its cached length otherwise). Returns the batch's rows. Every
/// backend's step calls it first.
///
/// # Errors
/// [`ModelError::InvalidArgument`] naming `tokens`.
pub fn validate_batch(
    batch: &[SeqStep<'_>],
    vocab: usize,
    context: usize,
    starts: Option<&[usize]>,
) -> Result<usize> {
    let mut n = 0;
    for (i, step) in batch.iter().enumerate() {
        if step.tokens.is_empty() {
            return Err(ModelError::InvalidArgument {
                field: "tokens",
                reason: "a sequence step has no tokens".into(),
            });
        }
        if let Some(&t) = step.tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(ModelError::InvalidArgument {
                field: "tokens",
                reason: format!("token id {t} is outside the vocabulary of {vocab}"),
            });
        }
        let start = starts
            .and_then(|s| s.get(i).copied())
            .unwrap_or(step.seq.len());
        let end = start + step.tokens.len();
        if end > context {
            return Err(ModelError::InvalidArgument {
                field: "tokens",
                reason: format!(
                    "sequence would reach {end} tokens, past the context length of {context}"
                ),
            });
        }
        n += step.tokens.len();
    }
    Ok(n)
}
