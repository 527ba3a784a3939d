//! Weights in a GGUF file, read with positioned reads so concurrent layers never seek.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file;

use crate::config::ModelConfig;
use crate::error::{FormatError, Result};
use crate::qtype::QType;
use crate::tensor::{RawTensor, TensorKey, WeightStore, missing, shape_error, shape_matches};

/// A GGUF file: its parsed header (metadata and tensor directory) and the open file.
pub struct GgufWeights {
    path: PathBuf,
    file: File,
    content: gguf_file::Content,
}

impl GgufWeights {
    /// Opens a GGUF file and reads its header.
    ///
    /// # Errors
    /// [`FormatError::Io`] when unreadable; [`FormatError::InvalidModel`] when it is not GGUF.
    pub fn open(path: &Path) -> Result<Self> {
        let io = |source| FormatError::Io {
            path: path.to_owned(),
            source,
        };
        let mut file = File::open(path).map_err(io)?;
        let content =
            gguf_file::Content::read(&mut file).map_err(|e| FormatError::InvalidModel {
                path: path.to_owned(),
                reason: format!(
                    "not a readable GGUF file ({e}); re-download it, e.g. `tessera model pull`"
                ),
            })?;
        Ok(Self {
            path: path.to_owned(),
            file,
            content,
        })
    }

    /// The parsed header: metadata and tensor directory.
    pub fn content(&self) -> &gguf_file::Content {
        &self.content
    }

    /// The file this reads from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The model configuration in the file's metadata.
    ///
    /// # Errors
    /// As [`ModelConfig::from_gguf`].
    pub fn config(&self) -> Result<ModelConfig> {
        ModelConfig::from_gguf(&self.content, &self.path)
    }
}

impl WeightStore for GgufWeights {
    fn contains(&self, key: TensorKey) -> bool {
        self.content.tensor_infos.contains_key(&key.gguf_name())
    }

    fn tensor(&self, key: TensorKey, rows: usize, cols: usize) -> Result<RawTensor> {
        let name = key.gguf_name();
        let info = self
            .content
            .tensor_infos
            .get(&name)
            .ok_or_else(|| missing(&name, &self.path))?;
        // candle reverses ggml's dimension order, so a (rows, cols) matrix reads as [rows, cols]
        // and a vector as [len].
        let dims = info.shape.dims();
        if !shape_matches(dims, rows, cols) {
            return Err(shape_error(key, &name, &[rows, cols], dims));
        }
        let qtype = QType::from_ggml(info.ggml_dtype)?;
        let block = qtype.block_size();
        if !cols.is_multiple_of(block) {
            return Err(FormatError::Tensor {
                name,
                reason: format!("{cols} columns are not a whole number of {block}-wide blocks"),
            });
        }
        let nbytes = rows * qtype.row_bytes(cols);
        let mut bytes = vec![0u8; nbytes];
        let start = self.content.tensor_data_offset + info.offset;
        self.file
            .read_exact_at(&mut bytes, start)
            .map_err(|source| FormatError::InvalidModel {
                path: self.path.clone(),
                reason: format!(
                    "tensor {name} ({nbytes} bytes at {start}) cannot be read: {source}; the \
                     file is probably truncated — download it again"
                ),
            })?;
        RawTensor::new(&name, qtype, rows, cols, bytes)
    }

    fn stored_bytes(&self, key: TensorKey) -> Option<u64> {
        let info = self.content.tensor_infos.get(&key.gguf_name())?;
        // Loaded quantized blocks are the file's bytes, unchanged.
        let dt = info.ggml_dtype;
        let elems = info.shape.elem_count();
        Some((elems / dt.block_size() * dt.type_size()) as u64)
    }

    fn stored_qtype(&self, key: TensorKey) -> Option<QType> {
        let info = self.content.tensor_infos.get(&key.gguf_name())?;
        QType::from_ggml(info.ggml_dtype).ok()
    }
}
