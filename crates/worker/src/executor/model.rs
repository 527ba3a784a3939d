//! The loaded stage on its backend: the CPU engine's `Llama`, or the GPU stage
//! (`tessera_cuda::stage::GpuStage`) on a CUDA device or over host operations — one step
//! contract, so the executor does not care which.
//!
//! A GPU stage keeps its K/V in device pools; the executor's `PagedKvCache` then keeps only the
//! block tables ([`PagedKvCache::without_storage`]), and prefix sharing, releases and
//! occupancy work on them as on the CPU. Tensor-parallel ranks and ring ranks run on the CPU
//! whatever the device (the GPU stage runs whole layers): the loader falls back, with a
//! warning.

use tessera_cuda::stage::{CudaOps, GpuStage, HostOps};
use tessera_format::{ModelConfig, WeightStore};
use tessera_model::encoder::Bert;
use tessera_model::kv_cache::{KvCacheConfig, PagedKvCache};
use tessera_model::layers::SeqStep;
use tessera_model::llama::{Llama, LoadSpec};
use tessera_model::stage::{StageCtx, StageInput, StageOutput, StageScratch};

use crate::device::{Backend, GPU_DTYPE};
use crate::error::WorkerError;

/// A loaded stage (see the module docs).
pub(super) enum StageModel {
    /// The CPU engine's stage.
    Cpu(Llama),
    /// A stage on a CUDA device.
    Cuda(Box<GpuStage<CudaOps>>),
    /// The GPU stage over host operations (testing; see `crate::device`).
    Emulated(GpuStage<HostOps>),
    /// An encoder's stage (CPU). It keeps no KV: its cache is an empty table of no blocks'
    /// storage, and its steps run through `super::encode`, not [`StageModel::step`].
    Encoder(Box<Bert>),
}

impl StageModel {
    /// Loads `spec` of the model in `store` on `backend` — the CPU when the shard is a
    /// tensor-parallel or ring rank (`whole == false`) — with a KV cache of `kv`'s geometry.
    ///
    /// # Errors
    /// The model's load errors; a device that fails (out of memory, a launch).
    pub(super) fn load(
        backend: &Backend,
        whole: bool,
        store: &dyn WeightStore,
        cfg: &ModelConfig,
        spec: LoadSpec,
        kv: KvCacheConfig,
    ) -> Result<(Self, PagedKvCache), WorkerError> {
        let progress = &mut |done, total| tracing::debug!(done, total, "loading shard");
        let on_device = !matches!(backend, Backend::Cpu);
        if on_device && !whole {
            tracing::warn!(
                "a tensor-parallel or ring rank runs on the CPU backend (the GPU stage runs \
                 whole layers)"
            );
        }
        let bad_kv = |e: tessera_model::kv_cache::KvCacheError| {
            WorkerError::invalid("kv_tokens", e.to_string())
        };
        if cfg.arch.is_encoder() {
            if on_device {
                tracing::warn!("encoders run on the CPU backend (no GPU encoder stage yet)");
            }
            let model = Bert::load(store, cfg, &spec)?;
            let cache = PagedKvCache::without_storage(kv).map_err(bad_kv)?;
            return Ok((Self::Encoder(Box::new(model)), cache));
        }
        Ok(match backend {
            Backend::Cuda { ordinal, .. } if whole => {
                let ops = CudaOps::new(*ordinal, GPU_DTYPE)?;
                let stage = GpuStage::load(ops, store, cfg, spec, &kv, progress)?;
                let cache = PagedKvCache::without_storage(kv).map_err(bad_kv)?;
                (Self::Cuda(Box::new(stage)), cache)
            }
            Backend::Emulated if whole => {
                let stage =
                    GpuStage::load(HostOps::new(GPU_DTYPE), store, cfg, spec, &kv, progress)?;
                let cache = PagedKvCache::without_storage(kv).map_err(bad_kv)?;
                (Self::Emulated(stage), cache)
            }
            _ => {
                let model = Llama::load(store, cfg, spec, progress)?;
                (Self::Cpu(model), PagedKvCache::new(kv).map_err(bad_kv)?)
            }
        })
    }

    /// The model's configuration.
    pub(super) fn config(&self) -> &ModelConfig {
        match self {
            Self::Cpu(m) => m.config(),
            Self::Cuda(m) => m.config(),
            Self::Emulated(m) => m.config(),
            Self::Encoder(m) => m.config(),
        }
    }

    /// What this stage holds.
    pub(super) fn spec(&self) -> &LoadSpec {
        match self {
            Self::Cpu(m) => m.spec(),
            Self::Cuda(m) => m.spec(),
            Self::Emulated(m) => m.spec(),
            Self::Encoder(m) => m.spec(),
        }
    }

    /// Bytes of weights held.
    pub(super) fn weight_bytes(&self) -> usize {
        match self {
            Self::Cpu(m) => m.weight_bytes(),
            Self::Cuda(m) => m.weight_bytes(),
            Self::Emulated(m) => m.weight_bytes(),
            Self::Encoder(m) => m.weight_bytes(),
        }
    }

    /// Which backend runs it, for logs and metrics.
    pub(super) fn backend_name(&self) -> &'static str {
        match self {
            Self::Cpu(_) | Self::Encoder(_) => "cpu",
            Self::Cuda(_) => "cuda",
            Self::Emulated(_) => "emulated",
        }
    }

    /// One step ([`Llama::step`]'s contract; a GPU stage uses `ctx.cache` for its block
    /// tables and has neither reduction nor ring).
    ///
    /// # Errors
    /// As the backend's step.
    pub(super) fn step<'s>(
        &mut self,
        batch: &mut [SeqStep<'_>],
        input: StageInput<'_>,
        ctx: &mut StageCtx<'_>,
        scratch: &'s mut StageScratch,
    ) -> Result<StageOutput<'s>, WorkerError> {
        Ok(match self {
            Self::Cpu(m) => m.step(batch, input, ctx, scratch)?,
            Self::Cuda(m) => m.step(batch, input, ctx.cache, scratch)?,
            Self::Emulated(m) => m.step(batch, input, ctx.cache, scratch)?,
            Self::Encoder(_) => {
                return Err(WorkerError::Executor(
                    "an encoder stage runs encoder steps, not decoder steps".into(),
                ));
            }
        })
    }
}
