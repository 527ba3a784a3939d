//! tessera's transformer model: layers, the paged KV cache, the stage-step forward pass, and
//! the single-process engine.
//!
//! The numeric kernels come from `tessera_kernels`, model files from `tessera_format`, the
//! tokenizer and sampling from `tessera_text`, model sources from `tessera_hub`. Sharded
//! execution in the worker crate runs the same forward pass as [`engine::Engine`] and is judged
//! against it.

#![forbid(unsafe_code)]

pub mod context_parallel;
pub mod encoder;
pub mod engine;
pub mod error;
pub mod kv_cache;
pub mod layers;
pub mod llama;
pub mod stage;
pub mod tensor_slice;
pub mod weights;

pub use error::{ModelError, Result};
