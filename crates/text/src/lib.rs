//! The text side of a model: everything a request needs before and after compute, and no
//! compute.
//!
//! - [`tokenizer`]: GGUF byte-level BPE (token for token with llama.cpp) and Hugging Face
//!   tokenizers, streaming detokenization, chat templates;
//! - [`sampling`]: sampling parameters and their validation, the per-sequence sampler, stop
//!   conditions;
//! - [`frontend`]: request types, validation into [`ValidGenerateRequest`] once, and the
//!   output stream that turns sampled ids into text deltas with stops applied.
//!
//! The coordinator uses this crate and never links the kernels; the engine and the last
//! pipeline stage use the same types, so a request is validated and its output assembled by
//! one piece of code whoever runs the model.

#![forbid(unsafe_code)]

mod error;
pub mod frontend;
pub mod sampling;
pub mod tokenizer;

pub use error::{Result, TextError};
pub use frontend::{
    Frontend, GenerateRequest, OutputStream, Prompt, TokenEvent, ValidGenerateRequest,
};
