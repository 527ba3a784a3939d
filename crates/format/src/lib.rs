//! A model's files, without any compute: the configuration, the GGUF and safetensors
//! containers read tensor by tensor, the GGML block types they store, and where a model lives
//! on disk.
//!
//! Everything that needs to know a model's shape without running it — the coordinator's
//! planner and footprint, the tokenizer loader, the engine's loader — reads it through this
//! crate, so none of them links the numeric kernels. Tensors come out as [`RawTensor`]s (the
//! stored bytes in a [`QType`] layout); turning them into matrices is the model crate's job.

#![forbid(unsafe_code)]

mod config;
mod encoder;
mod error;
mod gguf;
mod location;
mod qtype;
mod safetensors;
mod tensor;

pub use candle_core::quantized::gguf_file;
pub use config::{Arch, ModelConfig, RopeLayout};
pub use encoder::{EncoderSpec, Pooling};
pub use error::{ErrorKind, FormatError, Result};
pub use gguf::GgufWeights;
pub use location::{ModelLocation, open_weights};
pub use qtype::{QK_K, QType};
pub use safetensors::SafetensorsWeights;
pub use tensor::{RawTensor, TensorKey, WeightStore};
