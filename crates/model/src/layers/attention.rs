//! The self-attention layer: projections, RoPE, KV cache writes and the attention kernel.
//!
//! K and V are rounded to f16 before they enter the cache, and attention runs
//! [`ggml_attention`], llama.cpp's non-flash order: the reference the real model is judged
//! against (its greedy continuations) keeps an f16 KV cache and rounds that way, and the model's
//! near-ties turn any other rounding into different tokens. The cache pools stay f32 (holding
//! f16 values) so the flash kernel and the ring paths read them unchanged.
//!
//! Long prefills switch to the tiled [`flash_attention_unsplit`] (no key splits, so a row's
//! bits do not depend on how the prompt was chunked): a prefill chunk (two or more new
//! rows) whose keys number [`LONG_ATTENTION_KEYS`] or more. llama.cpp's order computes every
//! query row's scores over all keys before its softmax, so a chunk over a long cache re-reads
//! the keys once per row, out of cache: on SmolLM2's heads, one 512-row chunk over 7400 keys
//! takes 7.75 s on one thread there and 1.22 s tiled (6.3×; 2.7–3.2× at 2048 keys, 1.9× at
//! 512; `attention::bench` in the kernels crate), with outputs within 1.1e-5 at 7400 keys. The
//! golden prompts are far shorter than the switch, so they keep llama.cpp's bits; decode steps
//! (one row) always run llama.cpp's order. Every caller — the engine, pipeline stages,
//! tensor-parallel ranks — takes the same switch, so they still agree bit for bit.

use crate::error::Result;
use crate::kv_cache::SeqKv;
use crate::layers::LayerCtx;
use crate::layers::ring_attention::{RingOut, RingRows, RingScratch, ring_attend};
use crate::tensor_slice::{TensorSlice, cut_cols, cut_rows, cut_vec};
use crate::weights::{TensorKey, WeightStore, WeightStoreExt};
use tessera_format::ModelConfig;
use tessera_kernels::attention::{
    AttnOut, AttnShape, AttnSpec, flash_attention_unsplit, ggml_attention,
};
use tessera_kernels::ggml_math::round_f16_in_place;
use tessera_kernels::profile::{self, Op};
use tessera_kernels::quant::{QMatrix, QScratch};

/// Keys from which a prefill chunk runs the tiled kernel instead of llama.cpp's order (see
/// the module docs).
pub const LONG_ATTENTION_KEYS: usize = 1024;

/// One sequence's part of a batched step: its new tokens (a prefill chunk or one decode
/// token), continuing after the `seq.len()` tokens already in the KV cache. A batch's rows are
/// the sequences' tokens one sequence after another.
///
/// On a context-parallel rank ([`crate::context_parallel`]) `tokens` are the sequence's new
/// tokens over the whole ring (the rank picks the rows it carries), `seq` holds only this
/// rank's positions, and the global start comes from [`crate::stage::RingCtx::starts`].
#[derive(Debug)]
pub struct SeqStep<'a> {
    /// The new tokens.
    pub tokens: &'a [u32],
    /// The sequence's KV cache blocks.
    pub seq: &'a mut SeqKv,
    /// Whether the caller wants logits for this sequence's last token.
    pub logits: bool,
}

/// Scratch rows the attention layer writes; sized by the caller for the batch.
pub struct AttnScratch<'a> {
    /// Queries, (n, n_heads, head_dim).
    pub q: &'a mut [f32],
    /// New keys, (n, n_kv_heads, head_dim).
    pub k: &'a mut [f32],
    /// New values, (n, n_kv_heads, head_dim).
    pub v: &'a mut [f32],
    /// Attention output before the output projection, (n, n_heads, head_dim).
    pub ctx: &'a mut [f32],
    /// Log-sum-exp per query row and head, (n, n_heads).
    pub lse: &'a mut [f32],
    /// Activation quantization buffers.
    pub q8: &'a mut QScratch,
    /// Buffers of a context-parallel rank's attention.
    pub ring: &'a mut RingScratch,
}

/// Grouped-query self-attention with optional QKV bias, over the heads this rank holds (all of
/// them unless the model is tensor-parallel).
#[derive(Debug)]
pub struct Attention {
    wq: QMatrix,
    wk: QMatrix,
    wv: QMatrix,
    wo: QMatrix,
    bias: Option<[Vec<f32>; 3]>,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    /// Loads layer `layer`'s projections (and biases when the model has them), cut to
    /// `slice`: rows of `wq` for its query heads, rows of `wk`/`wv` (and the biases) for its
    /// KV heads, columns of `wo` for its query heads. The output is then this rank's partial
    /// sum of the projection.
    ///
    /// # Errors
    /// When a tensor is missing or misshapen, or `wo`'s cut splits one of its blocks
    /// ([`crate::ModelError::InvalidArgument`] naming `tensor.kv_heads`).
    pub fn load(
        store: &dyn WeightStore,
        cfg: &ModelConfig,
        layer: usize,
        slice: &TensorSlice,
    ) -> Result<Self> {
        let (h, hd, qd, kvd) = (cfg.hidden, cfg.head_dim, cfg.q_dim(), cfg.kv_dim());
        let (q_heads, kv_heads) = (slice.q_heads(cfg), slice.kv_heads.clone());
        let q_rows = q_heads.start * hd..q_heads.end * hd;
        let kv_rows = kv_heads.start * hd..kv_heads.end * hd;
        let bias = if cfg.qkv_bias {
            Some([
                cut_vec(store.vector(TensorKey::AttnQBias(layer), qd)?, &q_rows),
                cut_vec(store.vector(TensorKey::AttnKBias(layer), kvd)?, &kv_rows),
                cut_vec(store.vector(TensorKey::AttnVBias(layer), kvd)?, &kv_rows),
            ])
        } else {
            None
        };
        let wo = cut_cols(
            store.matrix(TensorKey::AttnOutput(layer), h, qd)?,
            &q_rows,
            "tensor.kv_heads",
            || {
                format!(
                    "layer {layer}'s attention output projection, cut at KV heads {kv_heads:?}                      (query heads {q_heads:?} of head_dim {hd})"
                )
            },
        )?;
        Ok(Self {
            wq: cut_rows(store.matrix(TensorKey::AttnQ(layer), qd, h)?, &q_rows)?,
            wk: cut_rows(store.matrix(TensorKey::AttnK(layer), kvd, h)?, &kv_rows)?,
            wv: cut_rows(store.matrix(TensorKey::AttnV(layer), kvd, h)?, &kv_rows)?,
            wo,
            bias,
            n_heads: q_heads.len(),
            n_kv_heads: kv_heads.len(),
            head_dim: hd,
        })
    }

    /// Bytes of weights held.
    pub fn nbytes(&self) -> usize {
        self.wq.nbytes() + self.wk.nbytes() + self.wv.nbytes() + self.wo.nbytes()
    }

    /// Attention of a batch: `x` is (n, hidden) normalised input, `out` (n, hidden) receives the
    /// projected output (this rank's partial sum when the heads are sliced); the scratch rows
    /// are sized for the heads held, and `ctx.cache` holds only this rank's KV heads. Each sequence's new K/V are written to `ctx.cache` at `ctx.layer`
    /// after its cached tokens; `positions[t]` is row t's global position.
    ///
    /// # Errors
    /// When buffer sizes disagree with the batch (a caller bug).
    ///
    /// # Panics
    /// When the KV cache was not reserved for the batch (a caller bug).
    pub fn forward(
        &self,
        x: &[f32],
        out: &mut [f32],
        positions: &[usize],
        ctx: &mut LayerCtx<'_, '_>,
        s: AttnScratch<'_>,
    ) -> Result<()> {
        let LayerCtx {
            batch,
            cache,
            layer,
            rope,
            pool,
            ring,
            ..
        } = ctx;
        let (layer, pool) = (*layer, *pool);
        let n = positions.len();
        let (qd, kvd) = (
            self.n_heads * self.head_dim,
            self.n_kv_heads * self.head_dim,
        );
        let timer = profile::scope(Op::QkvProj);
        self.wq.matmul(x, n, s.q, s.q8, pool)?;
        self.wk.matmul(x, n, s.k, s.q8, pool)?;
        self.wv.matmul(x, n, s.v, s.q8, pool)?;
        if let Some([bq, bk, bv]) = &self.bias {
            add_row_bias(s.q, bq);
            add_row_bias(s.k, bk);
            add_row_bias(s.v, bv);
        }
        drop(timer);
        let timer = profile::scope(Op::RopeKv);
        rope.forward(s.q, positions);
        rope.forward(s.k, positions);
        // The cache holds f16 values, as llama.cpp's default f16 KV cache does.
        round_f16_in_place(s.k);
        round_f16_in_place(s.v);
        drop(timer);
        if let Some(ring) = ring.as_mut() {
            let _timer = profile::scope(Op::Attention);
            let shape = AttnShape {
                seq_q: n,
                n_heads: self.n_heads,
                n_kv_heads: self.n_kv_heads,
                head_dim: self.head_dim,
            };
            let rows = RingRows {
                q: s.q,
                k: s.k,
                v: s.v,
            };
            let attn = RingOut {
                ctx: s.ctx,
                lse: s.lse,
            };
            ring_attend(ring, layer, shape, rows, cache, batch, attn, s.ring, pool)?;
            let _timer = profile::scope(Op::OutProj);
            return Ok(self.wo.matmul(s.ctx, n, out, s.q8, pool)?);
        }
        let scale = 1.0 / (self.head_dim as f32).sqrt();
        let mut start = 0;
        for step in batch.iter() {
            let (seq, len) = (&*step.seq, step.tokens.len());
            let rows = start..start + len;
            start += len;
            let timer = profile::scope(Op::RopeKv);
            cache.write(
                layer,
                seq,
                &s.k[rows.start * kvd..rows.end * kvd],
                &s.v[rows.start * kvd..rows.end * kvd],
            );
            drop(timer);
            let _timer = profile::scope(Op::Attention);
            let view = cache.view(layer, seq, seq.len() + len);
            let spec = AttnSpec {
                shape: AttnShape {
                    seq_q: len,
                    n_heads: self.n_heads,
                    n_kv_heads: self.n_kv_heads,
                    head_dim: self.head_dim,
                },
                causal: true,
                scale,
            };
            let o = AttnOut {
                out: &mut s.ctx[rows.start * qd..rows.end * qd],
                lse: &mut s.lse[rows.start * self.n_heads..rows.end * self.n_heads],
            };
            let q = &s.q[rows.start * qd..rows.end * qd];
            if len >= 2 && view.len >= LONG_ATTENTION_KEYS {
                flash_attention_unsplit(q, view, spec, o, pool);
            } else {
                ggml_attention(q, view, spec, o, pool);
            }
        }
        let _timer = profile::scope(Op::OutProj);
        Ok(self.wo.matmul(s.ctx, n, out, s.q8, pool)?)
    }
}

fn add_row_bias(x: &mut [f32], bias: &[f32]) {
    for row in x.chunks_exact_mut(bias.len()) {
        for (v, b) in row.iter_mut().zip(bias) {
            *v += b;
        }
    }
}
