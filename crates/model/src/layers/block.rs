//! One transformer block: pre-norm attention and pre-norm MLP, each added to the residual
//! once the tensor-parallel group has summed it.

use crate::error::Result;
use crate::layers::attention::AttnScratch;
use crate::layers::mlp::MlpScratch;
use crate::layers::ring_attention::RingScratch;
use crate::layers::{Attention, LayerCtx, Mlp, RmsNorm};
use crate::stage::ReducePoint;
use crate::tensor_slice::TensorSlice;
use crate::weights::{TensorKey, WeightStore};
use tessera_format::ModelConfig;
use tessera_kernels::profile::{self, Op};
use tessera_kernels::quant::QScratch;

/// Buffers one step of a batch needs; they grow to the largest batch seen and are reused, so
/// a warm decode step allocates nothing.
#[derive(Default)]
pub struct StepScratch {
    /// Normalised input, (n, hidden).
    pub xn: Vec<f32>,
    /// Sub-layer output, (n, hidden).
    pub y: Vec<f32>,
    /// Queries, (n, query heads held · head_dim).
    pub q: Vec<f32>,
    /// New keys, (n, KV heads held · head_dim).
    pub k: Vec<f32>,
    /// New values, (n, KV heads held · head_dim).
    pub v: Vec<f32>,
    /// Attention context, (n, query heads held · head_dim).
    pub ctx: Vec<f32>,
    /// Log-sum-exp, (n, query heads held).
    pub lse: Vec<f32>,
    /// MLP gate, (n, ffn columns held).
    pub gate: Vec<f32>,
    /// MLP up, (n, ffn columns held).
    pub up: Vec<f32>,
    /// Global position of each row.
    pub positions: Vec<usize>,
    /// Activation quantization buffers.
    pub q8: QScratch,
    /// A context-parallel rank's attention buffers.
    pub ring: RingScratch,
}

impl StepScratch {
    /// Sizes every buffer for `n` rows of `cfg`'s model cut to `slice` (the heads and MLP
    /// columns a rank holds; all of them for a whole model).
    pub fn prepare(&mut self, cfg: &ModelConfig, slice: &TensorSlice, n: usize) {
        let fit = |v: &mut Vec<f32>, len: usize| v.resize(len, 0.0);
        let (q_heads, kv_heads) = (slice.q_heads(cfg).len(), slice.kv_heads.len());
        fit(&mut self.xn, n * cfg.hidden);
        fit(&mut self.y, n * cfg.hidden);
        fit(&mut self.q, n * q_heads * cfg.head_dim);
        fit(&mut self.k, n * kv_heads * cfg.head_dim);
        fit(&mut self.v, n * kv_heads * cfg.head_dim);
        fit(&mut self.ctx, n * q_heads * cfg.head_dim);
        fit(&mut self.lse, n * q_heads);
        fit(&mut self.gate, n * slice.ffn.len());
        fit(&mut self.up, n * slice.ffn.len());
    }
}

/// A pre-norm Llama block.
#[derive(Debug)]
pub struct Block {
    attn_norm: RmsNorm,
    attn: Attention,
    ffn_norm: RmsNorm,
    mlp: Mlp,
}

impl Block {
    /// Loads layer `layer`, cut to `slice` (norms replicated).
    ///
    /// # Errors
    /// When a tensor is missing or misshapen, or a cut splits a quantized block.
    pub fn load(
        store: &dyn WeightStore,
        cfg: &ModelConfig,
        layer: usize,
        slice: &TensorSlice,
    ) -> Result<Self> {
        Ok(Self {
            attn_norm: RmsNorm::load(store, TensorKey::AttnNorm(layer), cfg.hidden, cfg.rms_eps)?,
            attn: Attention::load(store, cfg, layer, slice)?,
            ffn_norm: RmsNorm::load(store, TensorKey::FfnNorm(layer), cfg.hidden, cfg.rms_eps)?,
            mlp: Mlp::load(store, cfg, layer, &slice.ffn)?,
        })
    }

    /// Bytes of weights held.
    pub fn nbytes(&self) -> usize {
        (self.attn_norm.dim() + self.ffn_norm.dim()) * 4 + self.attn.nbytes() + self.mlp.nbytes()
    }

    /// Runs the block on the residual stream `x` (n, hidden) in place; `s` must be prepared for
    /// n rows and hold the rows' positions. Each sub-layer's output is completed by
    /// `ctx.reduce` before it is added to the residual.
    ///
    /// # Errors
    /// When buffer sizes disagree with the batch (a caller bug), or the reduction fails.
    pub fn forward(
        &self,
        x: &mut [f32],
        ctx: &mut LayerCtx<'_, '_>,
        s: &mut StepScratch,
    ) -> Result<()> {
        let n = s.positions.len();
        let timer = profile::scope(Op::Norm);
        self.attn_norm.forward(x, &mut s.xn);
        drop(timer);
        let scratch = AttnScratch {
            q: &mut s.q,
            k: &mut s.k,
            v: &mut s.v,
            ctx: &mut s.ctx,
            lse: &mut s.lse,
            q8: &mut s.q8,
            ring: &mut s.ring,
        };
        self.attn
            .forward(&s.xn, &mut s.y, &s.positions, ctx, scratch)?;
        ctx.reduce
            .reduce(ReducePoint::AttnOut, ctx.layer, &mut s.y)?;
        let timer = profile::scope(Op::Residual);
        add_in_place(x, &s.y);
        drop(timer);
        let timer = profile::scope(Op::Norm);
        self.ffn_norm.forward(x, &mut s.xn);
        drop(timer);
        let scratch = MlpScratch {
            gate: &mut s.gate,
            up: &mut s.up,
            q8: &mut s.q8,
        };
        self.mlp.forward(&s.xn, n, &mut s.y, scratch, ctx.pool)?;
        ctx.reduce
            .reduce(ReducePoint::MlpDown, ctx.layer, &mut s.y)?;
        let _timer = profile::scope(Op::Residual);
        add_in_place(x, &s.y);
        Ok(())
    }
}

fn add_in_place(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}
