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
        let size = file.metadata().map_err(io)?.len();
        check_directory(&content, size).map_err(|reason| FormatError::InvalidModel {
            path: path.to_owned(),
            reason,
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

/// Checks every entry of the tensor directory against the file: a shape whose element count
/// fits a `usize`, a whole number of its type's blocks, and data that lies inside the file's
/// `size` bytes. candle reads the directory without these checks; after them, every size and
/// offset derived from an entry (footprints, reads) is exact arithmetic on the file's own
/// bounds, so a malformed header is refused here, naming the tensor, rather than overflowing
/// later (found by the `gguf` fuzz target).
fn check_directory(content: &gguf_file::Content, size: u64) -> std::result::Result<(), String> {
    for (name, info) in &content.tensor_infos {
        let dims = info.shape.dims();
        let dt = info.ggml_dtype;
        let elems = dims
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .ok_or_else(|| format!("tensor {name}: shape {dims:?} has too many elements"))?;
        if !elems.is_multiple_of(dt.block_size()) {
            return Err(format!(
                "tensor {name}: {elems} values are not a whole number of {dt:?} blocks"
            ));
        }
        let bytes = (elems / dt.block_size())
            .checked_mul(dt.type_size())
            .and_then(|b| u64::try_from(b).ok());
        let end = bytes.and_then(|b| {
            content
                .tensor_data_offset
                .checked_add(info.offset)?
                .checked_add(b)
        });
        if end.is_none_or(|end| end > size) {
            return Err(format!(
                "tensor {name} ({dims:?} {dt:?} at offset {}) lies past the end of the file's \
                 {size} bytes; the file is truncated or damaged — download it again",
                info.offset
            ));
        }
    }
    Ok(())
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
        // Loaded quantized blocks are the file's bytes, unchanged; `check_directory` made
        // this arithmetic exact.
        let dt = info.ggml_dtype;
        let elems = info.shape.elem_count();
        Some((elems / dt.block_size() * dt.type_size()) as u64)
    }

    fn stored_qtype(&self, key: TensorKey) -> Option<QType> {
        let info = self.content.tensor_infos.get(&key.gguf_name())?;
        QType::from_ggml(info.ggml_dtype).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A GGUF v3 file with no metadata and one F32 tensor `t` of `dims` at data offset
    /// `offset`, followed by `data` bytes of tensor data (after the 32-byte alignment).
    fn gguf(dims: &[u64], offset: u64, data: usize) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend_from_slice(&3u32.to_le_bytes());
        b.extend_from_slice(&1u64.to_le_bytes()); // tensors
        b.extend_from_slice(&0u64.to_le_bytes()); // metadata entries
        b.extend_from_slice(&1u64.to_le_bytes());
        b.push(b't');
        b.extend_from_slice(&u32::try_from(dims.len()).expect("few dims").to_le_bytes());
        for d in dims {
            b.extend_from_slice(&d.to_le_bytes());
        }
        b.extend_from_slice(&0u32.to_le_bytes()); // F32
        b.extend_from_slice(&offset.to_le_bytes());
        b.resize(b.len().div_ceil(32) * 32 + data, 0);
        b
    }

    fn open(bytes: &[u8]) -> Result<GgufWeights> {
        let dir = std::env::temp_dir().join(format!("tessera-gguf-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join(format!("{}.gguf", bytes.len()));
        std::fs::write(&path, bytes).expect("write");
        let out = GgufWeights::open(&path);
        std::fs::remove_file(&path).expect("clean up");
        out
    }

    fn reason(r: Result<GgufWeights>) -> String {
        match r {
            Err(FormatError::InvalidModel { reason, .. }) => reason,
            Err(e) => panic!("another error: {e}"),
            Ok(_) => panic!("opened"),
        }
    }

    /// Ensures that a tensor whose element count overflows is refused at open, naming it (the
    /// `gguf` fuzz target's first finding: the footprint multiplied the dimensions and
    /// overflowed), and that a directory pointing past the end of the file is refused as
    /// truncated, while the same tensor with its data present opens.
    #[test]
    fn directory_is_checked_against_the_file() {
        let huge = reason(open(&gguf(&[1 << 32, 1 << 32, 1 << 32], 0, 0)));
        assert!(
            huge.contains("tensor t") && huge.contains("too many elements"),
            "{huge}"
        );
        let short = reason(open(&gguf(&[2, 3], 0, 23)));
        assert!(
            short.contains("tensor t") && short.contains("truncated"),
            "{short}"
        );
        let far = reason(open(&gguf(&[2, 3], u64::MAX - 8, 24)));
        assert!(far.contains("truncated"), "{far}");
        let w = open(&gguf(&[2, 3], 0, 24)).expect("a whole file opens");
        assert_eq!(w.stored_qtype(TensorKey::TokenEmbd), None);
        assert_eq!(w.content().tensor_infos.len(), 1);
    }
}
