//! The Llama-family model: embedding, a range of blocks, final norm and output head.
//!
//! A model may be loaded whole or as one pipeline stage ([`LoadSpec`]): a stage holds only its
//! layers, the first stage the embedding, the last the final norm and head. The forward pass is
//! split the same way — [`Llama::embed`], [`Llama::forward_hidden`], [`Llama::logits`] — and
//! [`Llama::forward`] composes them for the single-process engine, so a pipeline of stages does
//! exactly the same arithmetic as one process.

use std::ops::Range;
use std::sync::Arc;

use crate::ThreadPool;
use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::kv_cache::PagedKvCache;
use crate::layers::block::StepScratch;
use crate::layers::{Block, RmsNorm, Rope, SeqStep};
use crate::profile::{self, Op};
use crate::quant::{QMatrix, QScratch};
use crate::weights::{TensorKey, WeightStore};

/// Which parts of the model to load.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadSpec {
    /// The blocks to load, by global layer index.
    pub layers: Range<usize>,
    /// Whether to load the token embedding (the first stage).
    pub embed: bool,
    /// Whether to load the final norm and output head (the last stage).
    pub head: bool,
}

impl LoadSpec {
    /// The whole model.
    pub fn full(cfg: &ModelConfig) -> Self {
        Self {
            layers: 0..cfg.n_layers,
            embed: true,
            head: true,
        }
    }
}

/// Buffers for [`Llama::forward`], reused across steps.
#[derive(Default)]
pub struct ForwardScratch {
    /// The residual stream, (n, hidden).
    pub x: Vec<f32>,
    /// Last rows of the sequences that want logits, (m, hidden).
    last: Vec<f32>,
    /// Their normalised form.
    last_norm: Vec<f32>,
    /// Logits, (m, vocab).
    pub logits: Vec<f32>,
    /// Per-layer buffers.
    pub step: StepScratch,
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
    /// Loads the parts of the model `spec` names, calling `progress(done, total)` after each
    /// tensor group so callers can show a bar.
    ///
    /// # Errors
    /// When a tensor is missing, misshapen or of an unsupported type, or `spec` names layers
    /// the model does not have.
    pub fn load(
        store: &dyn WeightStore,
        cfg: &ModelConfig,
        spec: LoadSpec,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Self> {
        if spec.layers.end > cfg.n_layers || spec.layers.start > spec.layers.end {
            return Err(ModelError::InvalidArgument {
                field: "layers",
                reason: format!(
                    "{:?} is not within the model's {} layers",
                    spec.layers, cfg.n_layers
                ),
            });
        }
        let total = spec.layers.len() + 2;
        let embed = if spec.embed {
            Some(Arc::new(store.matrix(
                TensorKey::TokenEmbd,
                cfg.vocab_size,
                cfg.hidden,
            )?))
        } else {
            None
        };
        progress(1, total);
        let mut blocks = Vec::with_capacity(spec.layers.len());
        for (i, layer) in spec.layers.clone().enumerate() {
            blocks.push(Block::load(store, cfg, layer)?);
            progress(i + 2, total);
        }
        let (norm, output) = if spec.head {
            let norm = RmsNorm::load(store, TensorKey::OutputNorm, cfg.hidden, cfg.rms_eps)?;
            let output = if store.contains(TensorKey::Output) {
                Arc::new(store.matrix(TensorKey::Output, cfg.vocab_size, cfg.hidden)?)
            } else if let Some(e) = &embed {
                // Tied embeddings: the head is the embedding matrix itself, shared, not copied.
                Arc::clone(e)
            } else {
                Arc::new(store.matrix(TensorKey::TokenEmbd, cfg.vocab_size, cfg.hidden)?)
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

    /// Bytes of weights held (shared tensors counted once).
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

    /// Checks a batch before any state changes: tokens present, in the vocabulary, within the
    /// context.
    fn validate(&self, batch: &[SeqStep<'_>]) -> Result<usize> {
        let mut n = 0;
        for step in batch {
            if step.tokens.is_empty() {
                return Err(ModelError::InvalidArgument {
                    field: "tokens",
                    reason: "a sequence step has no tokens".into(),
                });
            }
            if let Some(&t) = step
                .tokens
                .iter()
                .find(|&&t| t as usize >= self.cfg.vocab_size)
            {
                return Err(ModelError::InvalidArgument {
                    field: "tokens",
                    reason: format!(
                        "token id {t} is outside the vocabulary of {}",
                        self.cfg.vocab_size
                    ),
                });
            }
            let end = step.seq.len() + step.tokens.len();
            if end > self.rope.max_positions() {
                return Err(ModelError::InvalidArgument {
                    field: "tokens",
                    reason: format!(
                        "sequence would reach {end} tokens, past the context length of {}",
                        self.rope.max_positions()
                    ),
                });
            }
            n += step.tokens.len();
        }
        Ok(n)
    }

    /// Writes the embeddings of `tokens` into `x` (n, hidden).
    ///
    /// # Errors
    /// [`ModelError::InvalidArgument`] when this stage has no embedding.
    pub fn embed(&self, tokens: impl Iterator<Item = u32>, x: &mut Vec<f32>) -> Result<()> {
        let embed = self
            .embed
            .as_ref()
            .ok_or_else(|| ModelError::InvalidArgument {
                field: "tokens",
                reason: "this stage does not hold the embedding".into(),
            })?;
        let h = self.cfg.hidden;
        x.clear();
        for t in tokens {
            let at = x.len();
            x.resize(at + h, 0.0);
            embed.dequantize_row(t as usize, &mut x[at..])?;
        }
        Ok(())
    }

    /// Runs this instance's blocks over the hidden states `x` (n, hidden) of a batch, writing
    /// K/V into `cache`, and commits the new tokens to each sequence.
    ///
    /// # Errors
    /// Invalid batches ([`ModelError::InvalidArgument`]) and a full KV cache
    /// ([`ModelError::KvCache`]), both before anything is written.
    pub fn forward_hidden(
        &self,
        batch: &mut [SeqStep<'_>],
        x: &mut [f32],
        cache: &mut PagedKvCache,
        s: &mut StepScratch,
        pool: &ThreadPool,
    ) -> Result<()> {
        let n = self.validate(batch)?;
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
        for step in batch.iter_mut() {
            cache.reserve(step.seq, step.tokens.len())?;
        }
        s.prepare(&self.cfg, n);
        s.positions.clear();
        for step in batch.iter() {
            let base = step.seq.len();
            s.positions.extend(base..base + step.tokens.len());
        }
        let first = self.spec.layers.start;
        for (i, block) in self.blocks.iter().enumerate() {
            // The cache is indexed by global layer so a stage's cache lines up with the plan.
            block.forward(x, batch, cache, first + i, &self.rope, s, pool)?;
        }
        for step in batch.iter_mut() {
            step.seq.commit(step.tokens.len());
        }
        Ok(())
    }

    /// Final norm and output head over `x` (m, hidden) into `logits` (m, vocab).
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
        logits.resize(m * self.cfg.vocab_size, 0.0);
        let _timer = profile::scope(Op::Head);
        output.matmul(normed, m, logits, q8, pool)
    }

    /// The whole model over a batch: embeds, runs every block, and returns the logits (m, vocab)
    /// of the last token of each sequence that asked for them, in batch order.
    ///
    /// # Errors
    /// As [`Llama::forward_hidden`]; also when this instance is not the whole model.
    pub fn forward<'s>(
        &self,
        batch: &mut [SeqStep<'_>],
        cache: &mut PagedKvCache,
        scratch: &'s mut ForwardScratch,
        pool: &ThreadPool,
    ) -> Result<&'s [f32]> {
        self.validate(batch)?;
        let ForwardScratch {
            x,
            last,
            last_norm,
            logits,
            step,
        } = scratch;
        let timer = profile::scope(Op::Embed);
        self.embed(batch.iter().flat_map(|s| s.tokens.iter().copied()), x)?;
        drop(timer);
        self.forward_hidden(batch, x, cache, step, pool)?;
        let h = self.cfg.hidden;
        last.clear();
        let mut end = 0;
        for s in batch.iter() {
            end += s.tokens.len();
            if s.logits {
                last.extend_from_slice(&x[(end - 1) * h..end * h]);
            }
        }
        if last.is_empty() {
            logits.clear();
            return Ok(logits);
        }
        self.logits(last, last_norm, logits, &mut step.q8, pool)?;
        Ok(logits)
    }
}
