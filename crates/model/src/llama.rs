//! The Llama-family model: embedding, a range of blocks, final norm and output head.
//!
//! A model may be loaded whole or as one pipeline stage ([`LoadSpec`]): a stage holds only its
//! layers, the first stage the embedding, the last the final norm and head. [`Llama::step`] is
//! the one forward pass (see [`crate::stage`]): the engine runs it over the whole model, each
//! worker over its stage, so a pipeline of stages does exactly the arithmetic of one process.
//! Its parts — [`Llama::embed`], [`Llama::forward_hidden`], [`Llama::logits`] — stay public
//! for tests that need logits at every row (teacher forcing).

use std::ops::Range;
use std::sync::Arc;

use crate::context_parallel::{RingMode, RingStep};
use crate::error::{ModelError, Result};
use crate::kv_cache::PagedKvCache;
use crate::layers::block::StepScratch;
use crate::layers::{Block, LayerCtx, LayerRing, RmsNorm, Rope, SeqStep};
use crate::stage::{
    LocalReduce, ReducePoint, StageCtx, StageInput, StageOutput, StageScratch, TensorSlice,
};
use crate::tensor_slice::cut_rows;
use crate::weights::{TensorKey, WeightStore, WeightStoreExt};
use tessera_format::ModelConfig;
use tessera_kernels::ThreadPool;
use tessera_kernels::profile::{self, Op};
use tessera_kernels::quant::{QMatrix, QScratch};

/// Which parts of the model to load.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadSpec {
    /// The blocks to load, by global layer index.
    pub layers: Range<usize>,
    /// Whether to load the token embedding (the first stage).
    pub embed: bool,
    /// Whether to load the final norm and output head (the last stage).
    pub head: bool,
    /// The heads, columns and vocabulary rows this rank holds (tensor parallelism).
    pub tensor: TensorSlice,
}

impl LoadSpec {
    /// The whole model.
    pub fn full(cfg: &ModelConfig) -> Self {
        Self::stage(cfg, 0..cfg.n_layers, true, true)
    }

    /// A pipeline stage: whole layers `layers`, with the embedding and/or the head.
    pub fn stage(cfg: &ModelConfig, layers: Range<usize>, embed: bool, head: bool) -> Self {
        Self {
            layers,
            embed,
            head,
            tensor: TensorSlice::whole(cfg),
        }
    }

    /// Checks that the layers are the model's and the slice is valid
    /// ([`TensorSlice::check`]): what every backend's loader checks first.
    ///
    /// # Errors
    /// [`ModelError::InvalidArgument`] naming `layers`, or the slice's error.
    pub fn check(&self, cfg: &ModelConfig) -> Result<()> {
        if self.layers.end > cfg.n_layers || self.layers.start > self.layers.end {
            return Err(ModelError::InvalidArgument {
                field: "layers",
                reason: format!(
                    "{:?} is not within the model's {} layers",
                    self.layers, cfg.n_layers
                ),
            });
        }
        self.tensor.check(cfg)
    }
}

/// A loaded Llama-family model (or one pipeline stage of it).
#[derive(Debug)]
pub struct Llama {
    cfg: ModelConfig,
    spec: LoadSpec,
    embed: Option<Arc<QMatrix>>,
    blocks: Vec<Block>,
    norm: Option<RmsNorm>,
    output: Option<Arc<QMatrix>>,
    rope: Rope,
}

impl Llama {
    /// Loads the parts of the model `spec` names, cut to its tensor slice, calling
    /// `progress(done, total)` after each tensor group so callers can show a bar. Each matrix
    /// is read whole from `store`, cut, and the whole dropped (a whole slice is not copied).
    ///
    /// # Errors
    /// When a tensor is missing, misshapen or of an unsupported type, `spec` names layers the
    /// model does not have, or its slice is invalid ([`TensorSlice::check`]) or cuts a
    /// quantized block of `wo` (`tensor.kv_heads`) or of the MLP down projection
    /// (`tensor.ffn`).
    pub fn load(
        store: &dyn WeightStore,
        cfg: &ModelConfig,
        spec: LoadSpec,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Self> {
        if cfg.arch.is_encoder() {
            return Err(ModelError::InvalidArgument {
                field: "model",
                reason: "an encoder: load it with `encoder::Bert`".into(),
            });
        }
        spec.check(cfg)?;
        let total = spec.layers.len() + 2;
        let vocab_rows = |key| -> Result<Arc<QMatrix>> {
            let m = store.matrix(key, cfg.vocab_size, cfg.hidden)?;
            Ok(Arc::new(cut_rows(m, &spec.tensor.vocab)?))
        };
        let embed = if spec.embed {
            Some(vocab_rows(TensorKey::TokenEmbd)?)
        } else {
            None
        };
        progress(1, total);
        let mut blocks = Vec::with_capacity(spec.layers.len());
        for (i, layer) in spec.layers.clone().enumerate() {
            blocks.push(Block::load(store, cfg, layer, &spec.tensor)?);
            progress(i + 2, total);
        }
        let (norm, output) = if spec.head {
            let norm = RmsNorm::load(store, TensorKey::OutputNorm, cfg.hidden, cfg.rms_eps)?;
            let output = if store.contains(TensorKey::Output) {
                vocab_rows(TensorKey::Output)?
            } else if let Some(e) = &embed {
                // Tied embeddings: the head is the embedding matrix itself (the same vocabulary
                // slice), shared, not copied.
                Arc::clone(e)
            } else {
                vocab_rows(TensorKey::TokenEmbd)?
            };
            (Some(norm), Some(output))
        } else {
            (None, None)
        };
        progress(total, total);
        let rope = Rope::new(
            cfg.rope_layout,
            cfg.head_dim,
            cfg.rope_theta,
            cfg.context_len,
        );
        Ok(Self {
            cfg: cfg.clone(),
            spec,
            embed,
            blocks,
            norm,
            output,
            rope,
        })
    }

    /// The model's configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// What this instance holds.
    pub fn spec(&self) -> &LoadSpec {
        &self.spec
    }

    /// KV heads this instance holds per layer: what its [`PagedKvCache`] must be sized for.
    pub fn kv_heads_held(&self) -> usize {
        self.spec.tensor.kv_heads.len()
    }

    /// Bytes of weights held, this rank's slices only (shared tensors counted once).
    pub fn weight_bytes(&self) -> usize {
        let embed = self.embed.as_ref().map_or(0, |e| e.nbytes());
        let output = match (&self.output, &self.embed) {
            (Some(o), Some(e)) if Arc::ptr_eq(o, e) => 0,
            (Some(o), _) => o.nbytes(),
            (None, _) => 0,
        };
        let norm = self.norm.as_ref().map_or(0, |n| n.dim() * 4);
        embed + output + norm + self.blocks.iter().map(Block::nbytes).sum::<usize>()
    }

    /// Checks a batch before any state changes ([`crate::stage::validate_batch`] within this
    /// stage's positions).
    fn validate(&self, batch: &[SeqStep<'_>], starts: Option<&[usize]>) -> Result<usize> {
        crate::stage::validate_batch(
            batch,
            self.cfg.vocab_size,
            self.rope.max_positions(),
            starts,
        )
    }

    /// Writes the embeddings of `tokens` into `x` (n, hidden). A tensor-parallel rank writes
    /// the rows of the tokens inside its vocabulary slice and zeros for the others: its part
    /// of the group's sum ([`ReducePoint::Embed`]).
    ///
    /// # Errors
    /// [`ModelError::InvalidArgument`] when this stage has no embedding, or a token is outside
    /// the vocabulary.
    pub fn embed(&self, tokens: impl Iterator<Item = u32>, x: &mut Vec<f32>) -> Result<()> {
        let embed = self
            .embed
            .as_ref()
            .ok_or_else(|| ModelError::InvalidArgument {
                field: "tokens",
                reason: "this stage does not hold the embedding".into(),
            })?;
        let (h, held) = (self.cfg.hidden, &self.spec.tensor.vocab);
        x.clear();
        for t in tokens.map(|t| t as usize) {
            if t >= self.cfg.vocab_size {
                return Err(ModelError::InvalidArgument {
                    field: "tokens",
                    reason: format!(
                        "token id {t} is outside the vocabulary of {}",
                        self.cfg.vocab_size
                    ),
                });
            }
            let at = x.len();
            x.resize(at + h, 0.0);
            if held.contains(&t) {
                embed.dequantize_row(t - held.start, &mut x[at..])?;
            }
        }
        Ok(())
    }

    /// Runs this instance's blocks over the hidden states `x` (n, hidden) of a batch, writing
    /// K/V into `cache`, and commits the new tokens to each sequence. Whole layers only: a
    /// tensor-parallel rank needs its group's reduction, which [`Llama::step`] takes.
    ///
    /// # Errors
    /// Invalid batches ([`ModelError::InvalidArgument`]) and a full KV cache
    /// ([`ModelError::KvCache`]), both before anything is written; a sliced instance
    /// ([`ModelError::InvalidArgument`] naming `tensor`).
    pub fn forward_hidden(
        &self,
        batch: &mut [SeqStep<'_>],
        x: &mut [f32],
        cache: &mut PagedKvCache,
        s: &mut StepScratch,
        pool: &ThreadPool,
    ) -> Result<()> {
        let mut ctx = StageCtx {
            cache,
            pool,
            reduce: &mut LocalReduce,
            ring: None,
        };
        self.require_whole()?;
        let n = self.validate(batch, None)?;
        self.run_layers(batch, n, x, &mut ctx, s, None)
    }

    /// The stage's blocks over `x`, as [`Llama::forward_hidden`] with `ctx`'s slice,
    /// reduction and ring, for a batch [`Llama::validate`] already passed, of which this rank
    /// carries `n` rows (all the batch's tokens, unless `ring` splits them).
    fn run_layers(
        &self,
        batch: &mut [SeqStep<'_>],
        n: usize,
        x: &mut [f32],
        ctx: &mut StageCtx<'_>,
        s: &mut StepScratch,
        ring: Option<&RingStep>,
    ) -> Result<()> {
        if x.len() != n * self.cfg.hidden {
            return Err(ModelError::InvalidArgument {
                field: "hidden",
                reason: format!(
                    "{} values for {n} tokens of width {}",
                    x.len(),
                    self.cfg.hidden
                ),
            });
        }
        let kv = ctx.cache.config();
        if (kv.n_kv_heads, kv.head_dim) != (self.kv_heads_held(), self.cfg.head_dim) {
            return Err(ModelError::InvalidArgument {
                field: "cache",
                reason: format!(
                    "the KV cache holds {} heads of {} values; this rank holds {} of {}",
                    kv.n_kv_heads,
                    kv.head_dim,
                    self.kv_heads_held(),
                    self.cfg.head_dim
                ),
            });
        }
        // The new tokens whose K/V this rank keeps, per sequence.
        let kept: Vec<usize> = match ring {
            Some(r) => (0..batch.len()).map(|i| r.kept(i).len()).collect(),
            None => batch.iter().map(|b| b.tokens.len()).collect(),
        };
        for (step, &k) in batch.iter_mut().zip(&kept) {
            ctx.cache.reserve(step.seq, k)?;
        }
        s.prepare(&self.cfg, &self.spec.tensor, n);
        s.positions.clear();
        for (i, step) in batch.iter().enumerate() {
            match ring {
                Some(r) => s.positions.extend_from_slice(r.positions(i)),
                None => {
                    let base = step.seq.len();
                    s.positions.extend(base..base + step.tokens.len());
                }
            }
        }
        let first = self.spec.layers.start;
        for (i, block) in self.blocks.iter().enumerate() {
            let mut layer = LayerCtx {
                batch,
                cache: &mut *ctx.cache,
                // The cache is indexed by global layer so a stage's cache lines up with the plan.
                layer: first + i,
                rope: &self.rope,
                pool: ctx.pool,
                reduce: &mut *ctx.reduce,
                ring: ctx.ring.as_mut().zip(ring).map(|(r, step)| LayerRing {
                    comm: &mut *r.comm,
                    step,
                }),
            };
            block.forward(x, &mut layer, s)?;
        }
        for (step, k) in batch.iter_mut().zip(kept) {
            step.seq.commit(k);
        }
        Ok(())
    }

    /// Final norm and output head over `x` (m, hidden) into `logits` (m, vocab); on a
    /// tensor-parallel rank, (m, vocab_r): the logits of its vocabulary slice.
    ///
    /// # Errors
    /// [`ModelError::InvalidArgument`] when this stage has no head.
    pub fn logits(
        &self,
        x: &[f32],
        normed: &mut Vec<f32>,
        logits: &mut Vec<f32>,
        q8: &mut QScratch,
        pool: &ThreadPool,
    ) -> Result<()> {
        let (Some(norm), Some(output)) = (&self.norm, &self.output) else {
            return Err(ModelError::InvalidArgument {
                field: "logits",
                reason: "this stage does not hold the output head".into(),
            });
        };
        let m = x.len() / self.cfg.hidden;
        normed.resize(x.len(), 0.0);
        let timer = profile::scope(Op::Norm);
        norm.forward(x, normed);
        drop(timer);
        logits.resize(m * output.rows(), 0.0);
        let _timer = profile::scope(Op::Head);
        Ok(output.matmul(normed, m, logits, q8, pool)?)
    }

    /// One batched step of this stage (see [`crate::stage`]): from token ids or the previous
    /// stage's hidden states, through every layer, to hidden states for the next stage or, on
    /// the last stage, the logits of the sampling sequences' last rows. A tensor-parallel rank
    /// completes its partial sums through `ctx.reduce` (the embedding, then each layer's
    /// attention output and MLP down projection) and sends its logits slice to rank 0 through
    /// [`crate::stage::Reduce::gather_logits`]; rank 0 returns the full rows, the others
    /// [`StageOutput::Delivered`].
    ///
    /// # Errors
    /// As [`Llama::forward_hidden`] (a sliced instance included); also when the input does
    /// not match the stage (token ids without the embedding, hidden states of the wrong size),
    /// the KV cache is not sized for the heads held, the slice cannot run, or the reduction
    /// fails.
    pub fn step<'s>(
        &self,
        batch: &mut [SeqStep<'_>],
        input: StageInput<'_>,
        ctx: &mut StageCtx<'_>,
        scratch: &'s mut StageScratch,
    ) -> Result<StageOutput<'s>> {
        let starts = ctx.ring.as_ref().map(|r| r.starts);
        let mut n = self.validate(batch, starts)?;
        let ring = match &ctx.ring {
            Some(r) => Some(RingStep::new(
                batch,
                r.starts,
                r.comm.rank(),
                r.comm.ranks(),
            )?),
            None => None,
        };
        if let Some(r) = &ring {
            n = r.rows();
        }
        let StageScratch {
            x,
            last,
            last_norm,
            logits,
            local_logits,
            step,
            ring_full,
            ring_rows,
        } = scratch;
        match input {
            StageInput::Tokens => {
                let timer = profile::scope(Op::Embed);
                match &ring {
                    // The rows this rank carries: its positions' tokens.
                    Some(r) => self.embed(
                        batch
                            .iter()
                            .zip(&r.seqs)
                            .enumerate()
                            .flat_map(|(i, (b, sp))| {
                                r.positions(i).iter().map(move |&p| b.tokens[p - sp.start])
                            }),
                        x,
                    )?,
                    None => self.embed(batch.iter().flat_map(|s| s.tokens.iter().copied()), x)?,
                }
                drop(timer);
                ctx.reduce
                    .reduce(ReducePoint::Embed, self.spec.layers.start, x)?;
            }
            StageInput::Hidden(h) => {
                if self.embed.is_some() {
                    return Err(ModelError::InvalidArgument {
                        field: "hidden",
                        reason: "the first stage embeds token ids itself; send no hidden states"
                            .into(),
                    });
                }
                match &ring {
                    Some(r) => r.pick_rows(h, self.cfg.hidden, x)?,
                    None => {
                        x.clear();
                        x.extend_from_slice(h);
                    }
                }
            }
        }
        self.run_layers(batch, n, x, ctx, step, ring.as_ref())?;
        if self.output.is_none() {
            if let (Some(r), Some(rc)) = (&ring, ctx.ring.as_mut())
                && r.mode == RingMode::Split
            {
                let layer = self.spec.layers.end;
                r.gather_rows(
                    &mut *rc.comm,
                    layer,
                    x,
                    self.cfg.hidden,
                    (&mut ring_rows.0, &mut ring_rows.1),
                    ring_full,
                )?;
                // The output stays in `scratch.x`, where callers of a stage without a ring
                // find it too.
                std::mem::swap(x, ring_full);
            }
            return Ok(StageOutput::Hidden(x.as_slice()));
        }
        if ring.as_ref().is_some_and(|r| !r.samples()) {
            // Ring rank 0 holds every sequence's last row and samples.
            return Ok(StageOutput::Delivered);
        }
        let h = self.cfg.hidden;
        last.clear();
        let mut end = 0;
        for (i, s) in batch.iter().enumerate() {
            end = match &ring {
                Some(r) => r.seqs[i].rows.end,
                None => end + s.tokens.len(),
            };
            if s.logits {
                last.extend_from_slice(&x[(end - 1) * h..end * h]);
            }
        }
        logits.clear();
        let tensor = &self.spec.tensor;
        if last.is_empty() || tensor.is_whole() {
            if !last.is_empty() {
                // A whole head writes the full rows in place: no gather, no copy.
                self.logits(last, last_norm, logits, &mut step.q8, ctx.pool)?;
            }
            return Ok(if tensor.rank == 0 {
                StageOutput::Logits(logits.as_mut_slice())
            } else {
                StageOutput::Delivered
            });
        }
        self.logits(last, last_norm, local_logits, &mut step.q8, ctx.pool)?;
        let m = last.len() / h;
        if !ctx.reduce.gather_logits(local_logits, m, logits)? {
            return Ok(StageOutput::Delivered);
        }
        if logits.len() != m * self.cfg.vocab_size {
            return Err(ModelError::InvalidArgument {
                field: "logits",
                reason: format!(
                    "the tensor-parallel gather returned {} logits for {m} rows of {}",
                    logits.len(),
                    self.cfg.vocab_size
                ),
            });
        }
        Ok(StageOutput::Logits(logits.as_mut_slice()))
    }

    /// The whole model over a batch on one rank: [`Llama::step`] from token ids, returning the
    /// logits (m, vocab) of the last token of each sequence that asked for them, in batch order.
    ///
    /// # Errors
    /// As [`Llama::step`]; also when this instance is not the whole model (a pipeline stage,
    /// or a tensor-parallel slice).
    pub fn forward<'s>(
        &self,
        batch: &mut [SeqStep<'_>],
        cache: &mut PagedKvCache,
        scratch: &'s mut StageScratch,
        pool: &ThreadPool,
    ) -> Result<&'s [f32]> {
        let mut ctx = StageCtx {
            cache,
            pool,
            reduce: &mut LocalReduce,
            ring: None,
        };
        self.require_whole()?;
        match self.step(batch, StageInput::Tokens, &mut ctx, scratch)? {
            StageOutput::Logits(l) => Ok(&*l),
            StageOutput::Hidden(_) | StageOutput::Delivered => Err(ModelError::InvalidArgument {
                field: "logits",
                reason: "this stage does not hold the output head".into(),
            }),
        }
    }

    /// Rejects a tensor-parallel slice where a caller runs without a group to reduce with.
    fn require_whole(&self) -> Result<()> {
        if self.spec.tensor.is_whole() {
            return Ok(());
        }
        Err(ModelError::InvalidArgument {
            field: "tensor",
            reason: format!(
                "rank {} of {} holds a slice of each layer; run it with Llama::step and its \
                 group's reduction",
                self.spec.tensor.rank, self.spec.tensor.ranks
            ),
        })
    }
}
