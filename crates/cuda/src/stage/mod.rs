//! The GPU backend of the stage step: a Llama-family pipeline stage whose weights, activations
//! and KV cache live on a device, stepped exactly as `tessera_model::llama::Llama::step` is —
//! same inputs (token ids or the previous stage's hidden states, a batch of `SeqStep`s whose
//! KV blocks the shared `PagedKvCache` bookkeeping hands out), same outputs (f32 hidden
//! states for the next stage, or f32 logits of the sampling rows), so a worker swaps one for
//! the other behind the same executor.
//!
//! # Numerics (the choice, and why)
//! - Weights are dequantized at load into the device dtype (f16 by default: the choice
//!   measured in `tests/stage.rs` — f16's 11-bit mantissa keeps SmolLM2's logits several
//!   times closer to the CPU engine than bf16's 8 bits, and its range holds every weight and
//!   activation the stage stores), and multiplied by cuBLAS with f32 accumulation. Keeping
//!   weights quantized behind a dequantizing matmul would save memory; it is not built.
//! - The residual stream stays f32 on the device, as on the CPU; norms read it and write the
//!   16-bit inputs of the projections; sub-layer outputs are added back in f32.
//! - K and V are stored in the dtype (the CPU engine stores f16, like llama.cpp).
//! - Logits come out of the output head in f32 (cuBLAS with an f32 output).
//! - The embedding is gathered on the host from the stored (quantized) table — exactly the
//!   CPU's rows — and uploaded with the step: n rows, not a vocabulary's worth of memory.
//!
//! # The step, per layer
//! 1. RMSNorm of the residual → Q, K, V projections (+ biases) → RoPE at the rows' global
//!    positions;
//! 2. each sequence's new K/V rows copied into its blocks of the layer's device pools (the
//!    block table of its `SeqKv`: the same bookkeeping as the CPU cache);
//! 3. attention per sequence: a fresh prefill of at least [`PREFILL_KERNEL_MIN`] tokens runs
//!    the FlashAttention-style prefill kernel on its own rows; every other step (decode,
//!    chunked prefill, a continuation after a cached prefix) runs the paged split-KV kernel
//!    over the pools;
//! 4. output projection added to the residual; RMSNorm → gate/up → SwiGLU → down, added.
//!
//! Sequences are committed (their new tokens counted in their `SeqKv`) after the last layer,
//! as on the CPU. A step that fails part-way leaves its sequences uncommitted; the worker then
//! drops them, as it does after a CPU failure.
//!
//! # What it does not do
//! Tensor-parallel slices and context-parallel rings run on the CPU backend (the worker falls
//! back); NCCL tensor parallelism between GPUs of one host is not built.

mod host;
mod ops;

#[cfg(feature = "cuda")]
mod cuda;

use std::sync::Arc;

pub use host::HostOps;
pub use ops::{MatmulDims, Rope, StageOps};

#[cfg(feature = "cuda")]
pub use cuda::CudaOps;

use tessera_format::{ModelConfig, RopeLayout as ModelRope};
use tessera_kernels::quant::QMatrix;
use tessera_model::ModelError;
use tessera_model::kv_cache::{KvCacheConfig, PagedKvCache, block_runs};
use tessera_model::layers::SeqStep;
use tessera_model::llama::LoadSpec;
use tessera_model::stage::{StageInput, StageOutput, StageScratch, validate_batch};
use tessera_model::weights::{TensorKey, WeightStore, WeightStoreExt};

use crate::error::{CudaError, Result};
use crate::plan::{DecodeParams, PrefillParams, RopeLayout};

/// Fresh prefills of at least this many tokens run the prefill kernel (tensor cores, one
/// launch over the whole prompt); shorter ones run the paged kernel, whose split-KV
/// parallelism suits few query rows.
pub const PREFILL_KERNEL_MIN: usize = 16;

/// One layer's device tensors.
struct Layer<O: StageOps> {
    attn_norm: O::Float,
    wq: O::Half,
    wk: O::Half,
    wv: O::Half,
    /// Q, K, V biases (Qwen2).
    bias: Option<[O::Half; 3]>,
    wo: O::Half,
    ffn_norm: O::Float,
    gate: O::Half,
    up: O::Half,
    down: O::Half,
    /// `(num_blocks, block_size, n_kv_heads, head_dim)`.
    k_pool: O::Half,
    v_pool: O::Half,
}

/// The final norm and output head.
struct Head<O: StageOps> {
    norm: O::Float,
    output: O::Half,
}

/// A pipeline stage on a device (see the module docs).
pub struct GpuStage<O: StageOps> {
    ops: O,
    cfg: ModelConfig,
    spec: LoadSpec,
    kv: KvCacheConfig,
    embed: Option<Arc<QMatrix>>,
    layers: Vec<Layer<O>>,
    head: Option<Head<O>>,
    rope: Rope,
    weight_bytes: usize,
}

impl<O: StageOps> std::fmt::Debug for GpuStage<O> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuStage")
            .field("dtype", &self.ops.dtype())
            .field("spec", &self.spec)
            .field("kv", &self.kv)
            .field("weight_bytes", &self.weight_bytes)
            .finish_non_exhaustive()
    }
}

fn invalid(field: &'static str, reason: impl Into<String>) -> CudaError {
    CudaError::Model(ModelError::InvalidArgument {
        field,
        reason: reason.into(),
    })
}

impl<O: StageOps> GpuStage<O> {
    /// Loads the layers `spec` names onto `ops`' device, with KV pools of `kv`'s geometry
    /// (the geometry of the `PagedKvCache` whose block tables the steps use), calling
    /// `progress(done, total)` after each layer.
    ///
    /// # Errors
    /// [`CudaError::Model`] for a missing or misshapen tensor, a layer range past the model,
    /// a tensor-parallel slice (the GPU backend runs whole layers), or a `kv` whose heads do
    /// not match the model; device errors (out of memory) as they come.
    pub fn load(
        ops: O,
        store: &dyn WeightStore,
        cfg: &ModelConfig,
        spec: LoadSpec,
        kv: &KvCacheConfig,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Self> {
        spec.check(cfg)?;
        if !spec.tensor.is_whole() {
            return Err(invalid(
                "tensor",
                "the GPU backend runs whole layers; a tensor-parallel rank runs on the CPU",
            ));
        }
        if (kv.n_kv_heads, kv.head_dim) != (cfg.n_kv_heads, cfg.head_dim) {
            return Err(invalid(
                "cache",
                format!(
                    "the KV cache holds {} heads of {}; the model has {} of {}",
                    kv.n_kv_heads, kv.head_dim, cfg.n_kv_heads, cfg.head_dim
                ),
            ));
        }
        let (h, inter, qd, kvd) = (cfg.hidden, cfg.intermediate, cfg.q_dim(), cfg.kv_dim());
        let mut bytes = 0usize;
        let mut half = |m: &QMatrix| -> Result<O::Half> {
            let w = m.dequantize();
            bytes += w.len() * 2;
            ops.upload_half(&w)
        };
        let total = spec.layers.len() + 2;
        let vocab_rows = |key| store.matrix(key, cfg.vocab_size, h);
        let embed = if spec.embed {
            Some(Arc::new(vocab_rows(TensorKey::TokenEmbd)?))
        } else {
            None
        };
        progress(1, total);
        let mut layers = Vec::with_capacity(spec.layers.len());
        let mut floats = 0usize;
        let pool = kv.num_blocks * kv.block_size * kvd;
        for (i, l) in spec.layers.clone().enumerate() {
            let mut vector = |key| -> Result<O::Float> {
                let v = store.vector(key, h)?;
                floats += v.len();
                ops.upload_float(&v)
            };
            let (attn_norm, ffn_norm) = (
                vector(TensorKey::AttnNorm(l))?,
                vector(TensorKey::FfnNorm(l))?,
            );
            let bias = if cfg.qkv_bias {
                let mut b = |key, len| -> Result<O::Half> { half(&store.matrix(key, 1, len)?) };
                Some([
                    b(TensorKey::AttnQBias(l), qd)?,
                    b(TensorKey::AttnKBias(l), kvd)?,
                    b(TensorKey::AttnVBias(l), kvd)?,
                ])
            } else {
                None
            };
            layers.push(Layer {
                attn_norm,
                wq: half(&store.matrix(TensorKey::AttnQ(l), qd, h)?)?,
                wk: half(&store.matrix(TensorKey::AttnK(l), kvd, h)?)?,
                wv: half(&store.matrix(TensorKey::AttnV(l), kvd, h)?)?,
                bias,
                wo: half(&store.matrix(TensorKey::AttnOutput(l), h, qd)?)?,
                ffn_norm,
                gate: half(&store.matrix(TensorKey::FfnGate(l), inter, h)?)?,
                up: half(&store.matrix(TensorKey::FfnUp(l), inter, h)?)?,
                down: half(&store.matrix(TensorKey::FfnDown(l), h, inter)?)?,
                k_pool: ops.zeros_half(pool)?,
                v_pool: ops.zeros_half(pool)?,
            });
            progress(i + 2, total);
        }
        let head = if spec.head {
            let norm = store.vector(TensorKey::OutputNorm, h)?;
            floats += norm.len();
            let output = if store.contains(TensorKey::Output) {
                half(&vocab_rows(TensorKey::Output)?)?
            } else if let Some(e) = &embed {
                // Tied: the head is the embedding matrix — a device copy of the table the
                // host keeps, quantized, for lookups (read once).
                half(e)?
            } else {
                half(&vocab_rows(TensorKey::TokenEmbd)?)?
            };
            Some(Head {
                norm: ops.upload_float(&norm)?,
                output,
            })
        } else {
            None
        };
        progress(total, total);
        let weight_bytes = bytes + floats * 4 + embed.as_ref().map_or(0, |e| e.nbytes());
        let rope = Rope {
            theta: cfg.rope_theta,
            layout: match cfg.rope_layout {
                ModelRope::Interleaved => RopeLayout::Interleaved,
                ModelRope::Half => RopeLayout::Neox,
            },
        };
        Ok(Self {
            ops,
            cfg: cfg.clone(),
            spec,
            kv: kv.clone(),
            embed,
            layers,
            head,
            rope,
            weight_bytes,
        })
    }

    /// The model's configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// What this stage holds.
    pub fn spec(&self) -> &LoadSpec {
        &self.spec
    }

    /// Bytes of weights held (device copies, and the host embedding table).
    pub fn weight_bytes(&self) -> usize {
        self.weight_bytes
    }

    /// One batched step (see the module docs), with `Llama::step`'s contract for a whole
    /// (not tensor-sliced, not ringed) stage: `cache` hands out and records each sequence's
    /// blocks; the step's hidden states (for the next stage) are left in `scratch.x`, the
    /// logits in `scratch.logits`.
    ///
    /// # Errors
    /// [`CudaError::Model`] for an invalid batch or input (checked before anything changes)
    /// or a full KV cache; device errors as they come.
    pub fn step<'s>(
        &mut self,
        batch: &mut [SeqStep<'_>],
        input: StageInput<'_>,
        cache: &PagedKvCache,
        scratch: &'s mut StageScratch,
    ) -> Result<StageOutput<'s>> {
        let n = self.validate(batch, cache)?;
        let h = self.cfg.hidden;
        let x = &mut scratch.x;
        match input {
            StageInput::Tokens => {
                let Some(embed) = &self.embed else {
                    return Err(invalid("tokens", "this stage does not hold the embedding"));
                };
                x.clear();
                x.resize(n * h, 0.0);
                let tokens = batch.iter().flat_map(|s| s.tokens.iter());
                for (row, &t) in x.chunks_exact_mut(h).zip(tokens) {
                    embed
                        .dequantize_row(t as usize, row)
                        .map_err(|e| CudaError::Model(e.into()))?;
                }
            }
            StageInput::Hidden(hidden) => {
                if self.embed.is_some() {
                    return Err(invalid(
                        "hidden",
                        "the first stage embeds token ids itself; send no hidden states",
                    ));
                }
                if hidden.len() != n * h {
                    return Err(invalid(
                        "hidden",
                        format!("{} values for {n} tokens of width {h}", hidden.len()),
                    ));
                }
                x.clear();
                x.extend_from_slice(hidden);
            }
        }
        for step in batch.iter_mut() {
            cache
                .reserve(step.seq, step.tokens.len())
                .map_err(|e| CudaError::Model(e.into()))?;
        }
        let mut positions = Vec::with_capacity(n);
        for step in batch.iter() {
            let base = step.seq.len();
            for p in base..base + step.tokens.len() {
                positions
                    .push(i32::try_from(p).map_err(|_| invalid("tokens", "position past i32"))?);
            }
        }
        // Once per step: every layer's RoPE reads the same positions.
        let positions = self.ops.upload_positions(&positions)?;
        let mut resid = self.ops.upload_float(x)?;
        let ctx = LayerCtx {
            ops: &self.ops,
            cfg: &self.cfg,
            kv: &self.kv,
            rope: self.rope,
        };
        for layer in &mut self.layers {
            ctx.layer(layer, batch, (&positions, n), &mut resid)?;
        }
        for step in batch.iter_mut() {
            step.seq.commit(step.tokens.len());
        }
        let Some(head) = &self.head else {
            self.ops.download_float(&resid, x)?;
            return Ok(StageOutput::Hidden(x.as_slice()));
        };
        // The last row of every sequence that samples.
        let mut rows = Vec::new();
        let mut end = 0;
        for s in batch.iter() {
            end += s.tokens.len();
            if s.logits {
                rows.push(end - 1);
            }
        }
        let logits = &mut scratch.logits;
        logits.clear();
        if rows.is_empty() {
            return Ok(StageOutput::Logits(logits.as_mut_slice()));
        }
        let m = rows.len();
        let mut last = self.ops.zeros_float(m * h)?;
        for (i, &r) in rows.iter().enumerate() {
            self.ops.copy_float(&resid, r * h, &mut last, i * h, h)?;
        }
        let mut normed = self.ops.zeros_half(m * h)?;
        self.ops
            .rmsnorm(&last, &head.norm, &mut normed, self.cfg.rms_eps)?;
        let vocab = self.cfg.vocab_size;
        let mut out = self.ops.zeros_float(m * vocab)?;
        let dims = MatmulDims { m, n: vocab, k: h };
        self.ops
            .matmul_float(&normed, &head.output, &mut out, dims)?;
        self.ops.download_float(&out, logits)?;
        Ok(StageOutput::Logits(logits.as_mut_slice()))
    }

    /// Checks a batch before anything changes (the CPU step's checks, and the cache of this
    /// stage's geometry). Returns the batch's rows.
    fn validate(&self, batch: &[SeqStep<'_>], cache: &PagedKvCache) -> Result<usize> {
        if cache.config().block_size != self.kv.block_size
            || cache.config().num_blocks != self.kv.num_blocks
        {
            return Err(invalid(
                "cache",
                "the KV bookkeeping's geometry differs from the device pools'",
            ));
        }
        Ok(validate_batch(
            batch,
            self.cfg.vocab_size,
            self.cfg.context_len,
            None,
        )?)
    }
}

/// What a step's layers share: the operations, the model's shape and the KV geometry.
struct LayerCtx<'a, O: StageOps> {
    ops: &'a O,
    cfg: &'a ModelConfig,
    kv: &'a KvCacheConfig,
    rope: Rope,
}

impl<O: StageOps> LayerCtx<'_, O> {
    /// One block over the residual stream `resid` (n, hidden), in place, its `n` rows at
    /// `positions`.
    fn layer(
        &self,
        l: &mut Layer<O>,
        batch: &[SeqStep<'_>],
        (positions, n): (&O::Positions, usize),
        resid: &mut O::Float,
    ) -> Result<()> {
        let (ops, c) = (self.ops, self.cfg);
        let (h, hd, qd, kvd) = (c.hidden, c.head_dim, c.q_dim(), c.kv_dim());
        let mut xn = ops.zeros_half(n * h)?;
        ops.rmsnorm(resid, &l.attn_norm, &mut xn, c.rms_eps)?;
        let (mut q, mut k, mut v) = (
            ops.zeros_half(n * qd)?,
            ops.zeros_half(n * kvd)?,
            ops.zeros_half(n * kvd)?,
        );
        ops.matmul(&xn, &l.wq, &mut q, MatmulDims { m: n, n: qd, k: h })?;
        ops.matmul(&xn, &l.wk, &mut k, MatmulDims { m: n, n: kvd, k: h })?;
        ops.matmul(&xn, &l.wv, &mut v, MatmulDims { m: n, n: kvd, k: h })?;
        if let Some([bq, bk, bv]) = &l.bias {
            ops.bias(&mut q, bq)?;
            ops.bias(&mut k, bk)?;
            ops.bias(&mut v, bv)?;
        }
        ops.rope(&mut q, positions, c.n_heads, hd, self.rope)?;
        ops.rope(&mut k, positions, c.n_kv_heads, hd, self.rope)?;
        let mut ctx = ops.zeros_half(n * qd)?;
        self.attend(l, batch, (&q, &k, &v), &mut ctx)?;
        let mut y = ops.zeros_half(n * h)?;
        ops.matmul(&ctx, &l.wo, &mut y, MatmulDims { m: n, n: h, k: qd })?;
        ops.add(resid, &y)?;
        ops.rmsnorm(resid, &l.ffn_norm, &mut xn, c.rms_eps)?;
        let inter = c.intermediate;
        let (mut gate, mut up) = (ops.zeros_half(n * inter)?, ops.zeros_half(n * inter)?);
        ops.matmul(
            &xn,
            &l.gate,
            &mut gate,
            MatmulDims {
                m: n,
                n: inter,
                k: h,
            },
        )?;
        ops.matmul(
            &xn,
            &l.up,
            &mut up,
            MatmulDims {
                m: n,
                n: inter,
                k: h,
            },
        )?;
        let mut act = ops.zeros_half(n * inter)?;
        ops.swiglu(&gate, &up, &mut act)?;
        ops.matmul(
            &act,
            &l.down,
            &mut y,
            MatmulDims {
                m: n,
                n: h,
                k: inter,
            },
        )?;
        ops.add(resid, &y)
    }

    /// Writes each sequence's new K/V rows into its blocks of `l`'s pools, then attends each
    /// sequence's queries over its keys into `ctx` (n, n_heads · head_dim).
    fn attend(
        &self,
        l: &mut Layer<O>,
        batch: &[SeqStep<'_>],
        (q, k, v): (&O::Half, &O::Half, &O::Half),
        ctx: &mut O::Half,
    ) -> Result<()> {
        let ops = self.ops;
        let (qd, kvd, bs) = (self.cfg.q_dim(), self.cfg.kv_dim(), self.kv.block_size);
        let mut row = 0;
        for step in batch {
            let (len, base) = (step.tokens.len(), step.seq.len());
            let table = step.seq.block_table();
            // 1. K/V rows into the pools, one copy per run inside a block.
            for run in block_runs(table, bs, base..base + len) {
                let (dst, src, n) = (run.slot * kvd, (row + run.pos - base) * kvd, run.len * kvd);
                ops.copy_half(k, src, &mut l.k_pool, dst, n)?;
                ops.copy_half(v, src, &mut l.v_pool, dst, n)?;
            }
            // 2. Attention of this sequence's rows: a batch of one uses the step's buffers
            //    as they are; otherwise its rows are copied out and its output back.
            let prefill = base == 0 && len >= PREFILL_KERNEL_MIN;
            if batch.len() == 1 {
                if prefill {
                    self.prefill(len, (q, k, v), ctx)?;
                } else {
                    self.paged(l, (len, base, table), q, ctx)?;
                }
            } else {
                let mut qi = ops.zeros_half(len * qd)?;
                ops.copy_half(q, row * qd, &mut qi, 0, len * qd)?;
                let mut oi = ops.zeros_half(len * qd)?;
                if prefill {
                    let (mut ki, mut vi) = (ops.zeros_half(len * kvd)?, ops.zeros_half(len * kvd)?);
                    ops.copy_half(k, row * kvd, &mut ki, 0, len * kvd)?;
                    ops.copy_half(v, row * kvd, &mut vi, 0, len * kvd)?;
                    self.prefill(len, (&qi, &ki, &vi), &mut oi)?;
                } else {
                    self.paged(l, (len, base, table), &qi, &mut oi)?;
                }
                ops.copy_half(&oi, 0, ctx, row * qd, len * qd)?;
            }
            row += len;
        }
        Ok(())
    }

    fn scale(&self) -> f32 {
        1.0 / (self.cfg.head_dim as f32).sqrt()
    }

    /// Causal attention of a fresh sequence's `len` rows over themselves (contiguous `q`,
    /// `k`, `v` of that sequence alone): the prefill kernel.
    fn prefill(
        &self,
        len: usize,
        (q, k, v): (&O::Half, &O::Half, &O::Half),
        out: &mut O::Half,
    ) -> Result<()> {
        let c = self.cfg;
        let p = PrefillParams {
            batch: 1,
            seq_q: len,
            seq_k: len,
            n_heads: c.n_heads,
            n_kv_heads: c.n_kv_heads,
            head_dim: c.head_dim,
            causal: true,
            scale: self.scale(),
        };
        self.ops.prefill(&p, q, k, v, out)
    }

    /// Attention of a sequence's `len` new rows `q` after `base` cached tokens, over all
    /// `base + len` keys in `l`'s pools through `table`: the paged split-KV kernel.
    fn paged(
        &self,
        l: &Layer<O>,
        (len, base, table): (usize, usize, &[u32]),
        q: &O::Half,
        out: &mut O::Half,
    ) -> Result<()> {
        let c = self.cfg;
        let p = DecodeParams {
            seq_q: len,
            n_heads: c.n_heads,
            n_kv_heads: c.n_kv_heads,
            head_dim: c.head_dim,
            len: base + len,
            block_size: self.kv.block_size,
            num_blocks: self.kv.num_blocks,
            causal: true,
            scale: self.scale(),
        };
        self.ops.paged(&p, q, (&l.k_pool, &l.v_pool), table, out)
    }
}
