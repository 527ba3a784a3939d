//! The layers of a Llama-family transformer, candle style: each has `load(store, &cfg, …)`
//! and `forward(&self, …)`; caches and scratch buffers are passed in as `&mut`, never hidden
//! in the layer, so one loaded layer serves every sequence of a batch.

pub mod attention;
pub mod block;
pub mod mlp;
pub mod norm;
pub mod rope;

pub use attention::{Attention, SeqStep};
pub use block::Block;
pub use mlp::Mlp;
pub use norm::RmsNorm;
pub use rope::Rope;
