//! tessera's numeric kernels, and all of its `unsafe` code.
//!
//! - [`quant`]: quantized weight matrices (GGUF block formats, byte-exact with ggml) and their
//!   products, per instruction set;
//! - [`attention`]: llama.cpp-order attention (what the engine runs, token for token with the
//!   llama.cpp goldens), FlashAttention-style attention returning O and the log-sum-exp, the
//!   merge of partial results, and the f64 reference every kernel is judged against;
//! - [`ggml_math`]: llama.cpp's elementwise arithmetic (exp, SiLU, RMSNorm, RoPE rounding);
//! - [`ThreadPool`]: the compute pool every parallel kernel runs on;
//! - [`isa`]: the one instruction-set detection every kernel asks;
//! - [`profile`]: wall-clock time per kind of operation, for `tessera bench --profile`.
//!
//! Every `unsafe` block states the invariant that makes it sound; the crates above this one
//! forbid `unsafe` altogether.

pub mod attention;
mod error;
pub mod ggml_math;
pub mod isa;
pub mod profile;
pub mod quant;
pub mod threadpool;

pub use error::{KernelError, Result};
pub use threadpool::ThreadPool;
