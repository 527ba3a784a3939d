//! Where a model lives on disk, and opening its weights and configuration.

use std::path::PathBuf;

use crate::config::ModelConfig;
use crate::error::Result;
use crate::gguf::GgufWeights;
use crate::safetensors::SafetensorsWeights;
use crate::tensor::WeightStore;

/// The files that make a model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelLocation {
    /// A single GGUF file (weights, tokenizer and template inside).
    Gguf(PathBuf),
    /// A Hugging Face–style directory: `config.json`, `*.safetensors` and `tokenizer.json`.
    HfDir(PathBuf),
}

/// Opens a model's weights and configuration (tensor data is read later, per tensor).
///
/// # Errors
/// When the files cannot be read or are not a supported model.
pub fn open_weights(location: &ModelLocation) -> Result<(Box<dyn WeightStore>, ModelConfig)> {
    Ok(match location {
        ModelLocation::Gguf(path) => {
            let w = GgufWeights::open(path)?;
            let cfg = w.config()?;
            (Box::new(w), cfg)
        }
        ModelLocation::HfDir(dir) => {
            let cfg = ModelConfig::from_hf_json(&dir.join("config.json"))?;
            (Box::new(SafetensorsWeights::open_dir(dir)?), cfg)
        }
    })
}
