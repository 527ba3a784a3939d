//! The layers of a Llama-family transformer, candle style: each has `load(store, &cfg, …)`
//! and `forward(&self, …)`; caches and scratch buffers are passed in as `&mut`, never hidden
//! in the layer, so one loaded layer serves every sequence of a batch.

pub mod attention;
pub mod block;
pub mod mlp;
pub mod norm;
pub mod ring_attention;
pub mod rope;

use tessera_kernels::ThreadPool;

use crate::context_parallel::{RingComm, RingStep};
use crate::kv_cache::PagedKvCache;
use crate::stage::Reduce;

pub use attention::{Attention, SeqStep};
pub use block::Block;
pub use mlp::Mlp;
pub use norm::RmsNorm;
pub use rope::Rope;

/// What one layer of a step needs besides its weights, input and scratch buffers.
pub struct LayerCtx<'a, 'b> {
    /// The batch, one sequence after another.
    pub batch: &'a [SeqStep<'b>],
    /// The KV cache, written at [`LayerCtx::layer`].
    pub cache: &'a mut PagedKvCache,
    /// The global layer index.
    pub layer: usize,
    /// Rotary embedding tables.
    pub rope: &'a Rope,
    /// The compute pool.
    pub pool: &'a ThreadPool,
    /// Where tensor-parallel partial sums are completed.
    pub reduce: &'a mut dyn Reduce,
    /// The context-parallel ring and this step's layout over it, if any.
    pub ring: Option<LayerRing<'a>>,
}

/// A context-parallel rank's part of a layer: the ring's exchange and the step's layout.
pub struct LayerRing<'a> {
    /// The exchange.
    pub comm: &'a mut dyn RingComm,
    /// The step's layout over the ring.
    pub step: &'a RingStep,
}
