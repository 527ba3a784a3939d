//! tessera's single-process transformer engine.
//!
//! Everything a worker needs to run a Llama-family model on the CPU lives here, with no async
//! runtime or RPC: model configuration and weights (GGUF, safetensors), the quantized matrix
//! kernels, attention (llama.cpp's order for the engine, FlashAttention-style with its log-sum-exp
//! merge for partial key sets), llama.cpp's elementwise arithmetic, the paged KV cache, the
//! tokenizer and chat templates, and sampling. Sharded execution in the worker crate is judged
//! against the `engine::Engine` defined here.

pub mod attention;
pub mod config;
pub mod engine;
pub mod error;
pub mod frontend;
pub mod ggml_math;
pub mod kv_cache;
pub mod layers;
pub mod llama;
pub mod profile;
pub mod quant;
pub mod sampling;
pub mod source;
pub mod testing;
pub mod threadpool;
pub mod tokenizer;
pub mod weights;

pub use error::{ModelError, Result};
pub use threadpool::ThreadPool;
