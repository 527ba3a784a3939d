//! Weights in one or more `.safetensors` files (a Hugging Face checkpoint directory), read
//! with positioned reads.
//!
//! The container is an 8-byte little-endian header length, a JSON header mapping each tensor's
//! name to `{dtype, shape, data_offsets}` (offsets relative to the end of the header), then the
//! data. Reading it ourselves, rather than mapping the files, keeps this crate free of `unsafe`
//! and reads only the tensors a stage loads.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::{FormatError, Result};
use crate::qtype::QType;
use crate::tensor::{RawTensor, TensorKey, WeightStore, missing, shape_error, shape_matches};

/// Headers larger than this are not a checkpoint we read (safetensors itself caps them at
/// 100 MB); the bound keeps a corrupt length from allocating gigabytes.
const MAX_HEADER: u64 = 100 << 20;

/// One tensor's entry in a header.
#[derive(Clone, Debug)]
struct Entry {
    /// Which of the directory's files holds it.
    file: usize,
    dtype: String,
    shape: Vec<usize>,
    /// Absolute byte offset of its data in that file.
    start: u64,
    len: u64,
}

/// Which naming scheme a checkpoint's tensors follow, told by what it holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Naming {
    /// Llama/Qwen2 (`model.layers.N…`): [`TensorKey::hf_name`].
    Llama,
    /// BERT (`embeddings…`, `encoder.layer.N…`): [`TensorKey::bert_name`], under `bert.` when
    /// the checkpoint was saved from a task model.
    Bert { prefixed: bool },
}

impl Naming {
    /// The scheme of a checkpoint holding `tensors`: BERT when it has BERT's word embedding.
    fn detect(tensors: &HashMap<String, Entry>) -> Self {
        let word = "embeddings.word_embeddings.weight";
        if tensors.contains_key(word) {
            Self::Bert { prefixed: false }
        } else if tensors.contains_key(&format!("bert.{word}")) {
            Self::Bert { prefixed: true }
        } else {
            Self::Llama
        }
    }
}

/// Every `*.safetensors` file in a directory, with their tensor directories merged.
pub struct SafetensorsWeights {
    dir: PathBuf,
    files: Vec<(PathBuf, File)>,
    tensors: HashMap<String, Entry>,
    naming: Naming,
}

impl SafetensorsWeights {
    /// Opens every `*.safetensors` file in `dir` and reads their headers.
    ///
    /// # Errors
    /// [`FormatError::InvalidModel`] when there is none or one is not valid safetensors.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|source| FormatError::Io {
                path: dir.to_owned(),
                source,
            })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        paths.sort();
        if paths.is_empty() {
            return Err(FormatError::InvalidModel {
                path: dir.to_owned(),
                reason: "no *.safetensors files".into(),
            });
        }
        let mut files = Vec::with_capacity(paths.len());
        let mut tensors = HashMap::new();
        for (i, path) in paths.into_iter().enumerate() {
            let file = File::open(&path).map_err(|source| FormatError::Io {
                path: path.clone(),
                source,
            })?;
            for (name, entry) in read_header(&path, &file, i)? {
                tensors.insert(name, entry);
            }
            files.push((path, file));
        }
        Ok(Self {
            dir: dir.to_owned(),
            files,
            naming: Naming::detect(&tensors),
            tensors,
        })
    }

    /// The name `key` has in this checkpoint (one the checkpoint's family lacks is a name
    /// that is never found, so it reads as missing).
    fn name(&self, key: TensorKey) -> String {
        match self.naming {
            Naming::Llama => key.hf_name(),
            Naming::Bert { prefixed } => match key.bert_name() {
                Some(n) if prefixed => format!("bert.{n}"),
                Some(n) => n,
                None => format!("{key:?} (not a BERT tensor)"),
            },
        }
    }
}

/// Parses one file's header into its tensors' entries.
fn read_header(path: &Path, file: &File, index: usize) -> Result<Vec<(String, Entry)>> {
    let invalid = |reason: String| FormatError::InvalidModel {
        path: path.to_owned(),
        reason: format!("invalid safetensors: {reason}"),
    };
    let size = file
        .metadata()
        .map_err(|source| FormatError::Io {
            path: path.to_owned(),
            source,
        })?
        .len();
    let mut len = [0u8; 8];
    file.read_exact_at(&mut len, 0)
        .map_err(|e| invalid(format!("no header length ({e})")))?;
    let n = u64::from_le_bytes(len);
    if n > MAX_HEADER || 8 + n > size {
        return Err(invalid(format!(
            "header of {n} bytes in a file of {size} bytes"
        )));
    }
    let mut header = vec![0u8; n as usize];
    file.read_exact_at(&mut header, 8)
        .map_err(|e| invalid(format!("header unreadable ({e})")))?;
    let json: serde_json::Value =
        serde_json::from_slice(&header).map_err(|e| invalid(format!("header is not JSON: {e}")))?;
    let map = json
        .as_object()
        .ok_or_else(|| invalid("header is not a JSON object".into()))?;
    let data_start = 8 + n;
    let mut out = Vec::with_capacity(map.len());
    for (name, v) in map {
        if name == "__metadata__" {
            continue;
        }
        let bad = |what: &str| invalid(format!("tensor {name}: {what}"));
        let dtype = v
            .get("dtype")
            .and_then(serde_json::Value::as_str)
            .ok_or_else(|| bad("no dtype"))?;
        let shape = v
            .get("shape")
            .and_then(serde_json::Value::as_array)
            .and_then(|a| {
                a.iter()
                    .map(|d| d.as_u64().map(|d| d as usize))
                    .collect::<Option<Vec<_>>>()
            })
            .ok_or_else(|| bad("no shape"))?;
        let offsets = v
            .get("data_offsets")
            .and_then(serde_json::Value::as_array)
            .and_then(|a| match a.as_slice() {
                [b, e] => Some((b.as_u64()?, e.as_u64()?)),
                _ => None,
            })
            .ok_or_else(|| bad("no data_offsets"))?;
        let (b, e) = offsets;
        // Checked: offsets and shapes are the file's word, up to u64::MAX each.
        if b > e || data_start.checked_add(e).is_none_or(|end| end > size) {
            return Err(bad(&format!(
                "data {b}..{e} outside the file's {} data bytes",
                size - data_start
            )));
        }
        let elems = shape
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .ok_or_else(|| bad(&format!("shape {shape:?} has too many elements")))?;
        if let Some(width) = dtype_width(dtype)
            && elems.checked_mul(width).and_then(|n| u64::try_from(n).ok()) != Some(e - b)
        {
            return Err(bad(&format!("{} bytes for {elems} {dtype} values", e - b)));
        }
        out.push((
            name.clone(),
            Entry {
                file: index,
                dtype: dtype.to_owned(),
                shape,
                start: data_start + b,
                len: e - b,
            },
        ));
    }
    Ok(out)
}

/// Bytes per value of the dtypes we read.
fn dtype_width(dtype: &str) -> Option<usize> {
    match dtype {
        "F16" | "BF16" => Some(2),
        "F32" => Some(4),
        "F64" => Some(8),
        _ => None,
    }
}

impl WeightStore for SafetensorsWeights {
    fn contains(&self, key: TensorKey) -> bool {
        self.tensors.contains_key(&self.name(key))
    }

    fn tensor(&self, key: TensorKey, rows: usize, cols: usize) -> Result<RawTensor> {
        let name = self.name(key);
        let entry = self
            .tensors
            .get(&name)
            .ok_or_else(|| missing(&name, &self.dir))?;
        if !shape_matches(&entry.shape, rows, cols) {
            return Err(shape_error(key, &name, &[rows, cols], &entry.shape));
        }
        if dtype_width(&entry.dtype).is_none() {
            return Err(FormatError::UnsupportedDType(format!(
                "{} (tensor {name}; F32, F16, BF16 and F64 are supported)",
                entry.dtype
            )));
        }
        let (path, file) = &self.files[entry.file];
        let mut bytes = vec![0u8; entry.len as usize];
        file.read_exact_at(&mut bytes, entry.start)
            .map_err(|source| FormatError::InvalidModel {
                path: path.clone(),
                reason: format!("tensor {name} cannot be read: {source}"),
            })?;
        // Half-precision checkpoints stay half precision (it halves resident memory; the F16 and
        // BF16 product kernels widen as they go): their little-endian values are already the
        // F16/BF16 layout. F32 likewise; F64 narrows to F32.
        let (qtype, bytes) = match entry.dtype.as_str() {
            "F16" => (QType::F16, bytes),
            "BF16" => (QType::BF16, bytes),
            "F32" => (QType::F32, bytes),
            _ => (
                QType::F32,
                bytes
                    .chunks_exact(8)
                    .flat_map(|c| {
                        let mut b = [0u8; 8];
                        b.copy_from_slice(c);
                        (f64::from_le_bytes(b) as f32).to_le_bytes()
                    })
                    .collect(),
            ),
        };
        RawTensor::new(&name, qtype, rows, cols, bytes)
    }

    fn stored_bytes(&self, key: TensorKey) -> Option<u64> {
        let entry = self.tensors.get(&self.name(key))?;
        let elems: usize = entry.shape.iter().product();
        // As `tensor` returns them: 16-bit floats stay 16-bit, everything else becomes f32.
        let width = if dtype_width(&entry.dtype) == Some(2) {
            2
        } else {
            4
        };
        // The header check bounded `elems` (and the bytes of every dtype we read); a dtype we
        // do not read may still claim any count, which saturates rather than wraps.
        Some(elems.saturating_mul(width) as u64)
    }

    fn stored_qtype(&self, key: TensorKey) -> Option<QType> {
        // As `tensor` converts them: F64 narrows to F32.
        match self.tensors.get(&self.name(key))?.dtype.as_str() {
            "F16" => Some(QType::F16),
            "BF16" => Some(QType::BF16),
            "F32" | "F64" => Some(QType::F32),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Opens a directory holding one `model.safetensors` whose header is `header`, followed by
    /// `data` bytes.
    fn open(header: &serde_json::Value, data: usize) -> Result<SafetensorsWeights> {
        let dir = std::env::temp_dir().join(format!(
            "tessera-st-test-{}-{}",
            std::process::id(),
            header.to_string().len()
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let h = header.to_string().into_bytes();
        let mut b = (h.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(&h);
        b.resize(b.len() + data, 0);
        std::fs::write(dir.join("model.safetensors"), b).expect("write");
        let out = SafetensorsWeights::open_dir(&dir);
        std::fs::remove_dir_all(&dir).expect("clean up");
        out
    }

    /// Ensures that offsets and shapes near the integer limits are refused with a message
    /// naming the tensor, not wrapped or overflowed: an end offset that overflows when added to
    /// the data start, a shape whose element count overflows (for a dtype we read and one we
    /// do not), while a well-formed header opens.
    #[test]
    fn header_arithmetic_is_checked() {
        let refused = |h: serde_json::Value| match open(&h, 16) {
            Err(FormatError::InvalidModel { reason, .. }) => reason,
            Err(e) => panic!("another error: {e}"),
            Ok(_) => panic!("opened {h}"),
        };
        let far = refused(serde_json::json!({"w": {"dtype": "F32", "shape": [4],
            "data_offsets": [0, u64::MAX]}}));
        assert!(far.contains("tensor w") && far.contains("outside"), "{far}");
        for dtype in ["F32", "I64"] {
            let huge = refused(serde_json::json!({"w": {"dtype": dtype,
                "shape": [1u64 << 32, 1u64 << 32, 1u64 << 32], "data_offsets": [0, 16]}}));
            assert!(huge.contains("too many elements"), "{huge}");
        }
        let ok = open(
            &serde_json::json!({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}),
            16,
        )
        .expect("a well-formed header opens");
        assert_eq!(ok.tensors.len(), 1);
    }
}
