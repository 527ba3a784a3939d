//! Encoder-only models (BERT family): a stage of layers that turns token ids into pooled
//! sentence embeddings, stateless from one call to the next.
//!
//! A [`Bert`] is loaded like a Llama stage ([`LoadSpec`]: a range of layers, with the
//! embeddings when it is the first stage and the pooling when it is the last), so the
//! planner cuts an encoder into pipeline stages like any model. One call,
//! [`Bert::encode`], runs a batch of whole inputs:
//!
//! 1. input: token ids on a stage with the embeddings ([`EncoderInput::Tokens`]), otherwise
//!    the previous stage's hidden states ([`EncoderInput::Hidden`], `(n, hidden)`), the
//!    inputs' rows one after another (`lens` gives each input's length);
//! 2. every layer of the stage over the rows, each input attending to all of its own tokens;
//! 3. output: on the last stage one pooled (and, if the model says so, unit-length) vector
//!    per input, `(m, hidden)` ([`EncoderOutput::Embeddings`]); elsewhere the hidden states
//!    for the next stage ([`EncoderOutput::Hidden`]).
//!
//! There is no KV cache: an input's tokens all arrive at once and nothing outlives the call.
//! The embeddings are word + learned absolute position + token type 0 (one segment: inputs
//! are single texts), then LayerNorm, as transformers' `BertEmbeddings`.

mod layer;

use std::ops::Range;

use tessera_format::{Arch, EncoderSpec, ModelConfig, Pooling};
use tessera_kernels::ThreadPool;
use tessera_kernels::quant::QMatrix;

use crate::error::{ModelError, Result};
use crate::llama::LoadSpec;
use crate::weights::{TensorKey, WeightStore, WeightStoreExt};

use layer::{EncoderLayer, LayerNorm, LayerScratch};

/// A batch's input to an encoder stage.
#[derive(Clone, Copy, Debug)]
pub enum EncoderInput<'a> {
    /// Token ids, the inputs one after another (first stage).
    Tokens(&'a [u32]),
    /// The previous stage's hidden states, `(n, hidden)`.
    Hidden(&'a [f32]),
}

/// What an encoder stage returns.
#[derive(Clone, Debug, PartialEq)]
pub enum EncoderOutput {
    /// Hidden states for the next stage, `(n, hidden)`.
    Hidden(Vec<f32>),
    /// One pooled vector per input, `(m, hidden)`.
    Embeddings(Vec<f32>),
}

/// The embedding tables of the first stage.
#[derive(Debug)]
struct Embeddings {
    word: QMatrix,
    position: QMatrix,
    token_type: Vec<f32>,
    norm: LayerNorm,
}

/// A loaded encoder stage.
#[derive(Debug)]
pub struct Bert {
    cfg: ModelConfig,
    spec: EncoderSpec,
    load: LoadSpec,
    embed: Option<Embeddings>,
    layers: Vec<EncoderLayer>,
    scratch: LayerScratch,
}

impl Bert {
    /// Loads the layers, embeddings and pooling that `spec` names. Tensor-parallel slices are
    /// not supported for encoders: `spec.tensor` must be the whole model.
    ///
    /// # Errors
    /// [`ModelError::InvalidArgument`] when the model is not an encoder, the layers are not
    /// the model's, or a tensor slice is asked for; a format error for a missing or misshapen
    /// tensor.
    pub fn load(store: &dyn WeightStore, cfg: &ModelConfig, spec: &LoadSpec) -> Result<Self> {
        let Arch::Bert(encoder) = cfg.arch else {
            return Err(ModelError::InvalidArgument {
                field: "model",
                reason: format!("a {} model is not an encoder", cfg.arch.name()),
            });
        };
        spec.check(cfg)?;
        if spec.tensor.ranks > 1 {
            return Err(ModelError::InvalidArgument {
                field: "tensor",
                reason: "encoders are not split by tensor parallelism".into(),
            });
        }
        let h = cfg.hidden;
        let embed = if spec.embed {
            Some(Embeddings {
                word: store.matrix(TensorKey::TokenEmbd, cfg.vocab_size, h)?,
                position: store.matrix(TensorKey::PosEmbd, encoder.max_positions, h)?,
                // Type 0 only: single-segment inputs.
                token_type: store
                    .matrix(TensorKey::TypeEmbd, encoder.type_vocab, h)?
                    .dequantize()[..h]
                    .to_vec(),
                norm: LayerNorm::load(
                    store,
                    TensorKey::EmbdNorm,
                    TensorKey::EmbdNormBias,
                    h,
                    cfg.rms_eps,
                )?,
            })
        } else {
            None
        };
        let layers = spec
            .layers
            .clone()
            .map(|l| EncoderLayer::load(store, l, h, cfg.intermediate, cfg.n_heads, cfg.rms_eps))
            .collect::<Result<_>>()?;
        Ok(Self {
            cfg: cfg.clone(),
            spec: encoder,
            load: spec.clone(),
            embed,
            layers,
            scratch: LayerScratch::default(),
        })
    }

    /// The model's configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// What this stage holds.
    pub fn spec(&self) -> &LoadSpec {
        &self.load
    }

    /// Bytes of weights held.
    pub fn weight_bytes(&self) -> usize {
        let embed = self.embed.as_ref().map_or(0, |e| {
            e.word.nbytes() + e.position.nbytes() + 4 * e.token_type.len() + e.norm.bytes()
        });
        embed + self.layers.iter().map(EncoderLayer::bytes).sum::<usize>()
    }

    /// Checks a batch against the model: every input non-empty and within the model's input
    /// limit, token ids within the vocabulary, hidden states of the right size.
    fn check(&self, input: EncoderInput<'_>, lens: &[usize]) -> Result<usize> {
        let invalid = |field, reason| Err(ModelError::InvalidArgument { field, reason });
        if let Some(i) = lens
            .iter()
            .position(|&l| l == 0 || l > self.cfg.context_len)
        {
            return invalid(
                "lens",
                format!(
                    "input {i} has {} tokens; each must have 1..={}",
                    lens[i], self.cfg.context_len
                ),
            );
        }
        let n: usize = lens.iter().sum();
        match (input, &self.embed) {
            (EncoderInput::Tokens(ids), Some(_)) => {
                if ids.len() != n {
                    return invalid("tokens", format!("{} ids for {n} tokens", ids.len()));
                }
                if let Some(bad) = ids.iter().find(|&&t| t as usize >= self.cfg.vocab_size) {
                    return invalid(
                        "tokens",
                        format!(
                            "id {bad} is outside the vocabulary of {}",
                            self.cfg.vocab_size
                        ),
                    );
                }
            }
            (EncoderInput::Hidden(x), None) => {
                if x.len() != n * self.cfg.hidden {
                    return invalid(
                        "hidden",
                        format!("{} values for {n} rows of {}", x.len(), self.cfg.hidden),
                    );
                }
            }
            (EncoderInput::Tokens(_), None) => return Err(wants_hidden()),
            (EncoderInput::Hidden(_), Some(_)) => {
                return invalid("hidden", "the first stage takes token ids".into());
            }
        }
        Ok(n)
    }

    /// Encodes a batch of whole inputs, `lens[i]` rows each (see the module docs).
    ///
    /// # Errors
    /// [`ModelError::InvalidArgument`] naming the input at fault (checked before any work);
    /// kernel errors.
    pub fn encode(
        &mut self,
        input: EncoderInput<'_>,
        lens: &[usize],
        pool: &ThreadPool,
    ) -> Result<EncoderOutput> {
        let n = self.check(input, lens)?;
        let h = self.cfg.hidden;
        let mut x = match (input, &self.embed) {
            (EncoderInput::Tokens(ids), Some(e)) => embed(e, ids, lens, h)?,
            (EncoderInput::Hidden(x), _) => x.to_vec(),
            // Refused by `check` already.
            (EncoderInput::Tokens(_), None) => return Err(wants_hidden()),
        };
        let mut seqs = Vec::with_capacity(lens.len());
        let mut start = 0;
        for &len in lens {
            seqs.push(start..start + len);
            start += len;
        }
        debug_assert_eq!(start, n);
        for layer in &self.layers {
            layer.forward(&mut x, &seqs, &mut self.scratch, pool)?;
        }
        if !self.load.head {
            return Ok(EncoderOutput::Hidden(x));
        }
        Ok(EncoderOutput::Embeddings(pool_rows(
            &x, &seqs, h, self.spec,
        )))
    }
}

/// The error for token ids sent to a stage without the embeddings.
fn wants_hidden() -> ModelError {
    ModelError::InvalidArgument {
        field: "tokens",
        reason: "this stage takes hidden states".into(),
    }
}

/// Word + position + type-0 embeddings of every input's tokens, then LayerNorm.
fn embed(e: &Embeddings, ids: &[u32], lens: &[usize], h: usize) -> Result<Vec<f32>> {
    let mut x = vec![0.0f32; ids.len() * h];
    let mut pos_row = vec![0.0f32; h];
    let mut row = 0;
    for &len in lens {
        for p in 0..len {
            let out = &mut x[row * h..][..h];
            e.word.dequantize_row(ids[row] as usize, out)?;
            e.position.dequantize_row(p, &mut pos_row)?;
            for ((o, p), t) in out.iter_mut().zip(&pos_row).zip(&e.token_type) {
                *o += p + t;
            }
            row += 1;
        }
    }
    e.norm.forward_in_place(&mut x);
    Ok(x)
}

/// One vector per input: the mean of its rows or its first row, scaled to unit length when
/// the model normalizes (÷ max(‖v‖, 1e-12), as `torch.nn.functional.normalize`).
fn pool_rows(x: &[f32], seqs: &[Range<usize>], h: usize, spec: EncoderSpec) -> Vec<f32> {
    let mut out = vec![0.0f32; seqs.len() * h];
    for (seq, o) in seqs.iter().zip(out.chunks_exact_mut(h)) {
        match spec.pooling {
            Pooling::Cls => o.copy_from_slice(&x[seq.start * h..][..h]),
            Pooling::Mean => {
                let mut sum = vec![0.0f64; h];
                for row in x[seq.start * h..seq.end * h].chunks_exact(h) {
                    for (s, v) in sum.iter_mut().zip(row) {
                        *s += f64::from(*v);
                    }
                }
                for (o, s) in o.iter_mut().zip(&sum) {
                    *o = (s / seq.len() as f64) as f32;
                }
            }
        }
        if spec.normalize {
            let norm = o.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>().sqrt();
            let scale = (1.0 / norm.max(1e-12)) as f32;
            for v in o.iter_mut() {
                *v *= scale;
            }
        }
    }
    out
}
