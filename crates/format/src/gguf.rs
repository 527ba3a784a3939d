//! Weights in a GGUF file, read with positioned reads so concurrent layers never seek.

use std::fs::File;
use std::io::{Read as _, Seek as _};
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
        let size = file.metadata().map_err(io)?.len();
        if declared_alignment(&file, size) == Some(0) {
            return Err(FormatError::InvalidModel {
                path: path.to_owned(),
                reason: "general.alignment is 0; GGUF alignments are powers of two".into(),
            });
        }
        // The walk read through the file's cursor; candle reads from where it stands.
        file.rewind().map_err(io)?;
        let content =
            gguf_file::Content::read(&mut file).map_err(|e| FormatError::InvalidModel {
                path: path.to_owned(),
                reason: format!(
                    "not a readable GGUF file ({e}); re-download it, e.g. `tessera model pull`"
                ),
            })?;
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

/// The integer value of `general.alignment`, read by walking the metadata section: candle's
/// reader divides by it (an alignment of 0 panics inside it, found by the `gguf` fuzz target's
/// dictionary), so it is looked at first. `None` when the key is absent, not an integer, or
/// the header is malformed before it (candle then reports what is wrong). Every length is
/// bounded by the file, so this allocates nothing a malformed header asks for.
fn declared_alignment(file: &File, size: u64) -> Option<u64> {
    let mut r = Walker {
        file: std::io::BufReader::new(file),
        at: 0,
        size,
        wide: true,
    };
    if r.bytes(4)? != *b"GGUF" {
        return None;
    }
    // Version 1 uses 32-bit counts and lengths, later versions 64-bit.
    r.wide = r.u32()? != 1;
    let _tensors = r.len()?;
    for _ in 0..r.len()? {
        let n = r.len()?;
        let key = r.bytes(n)?;
        let ty = r.u32()?;
        if key == b"general.alignment" {
            let width = match ty {
                0 | 1 => 1,
                2 | 3 => 2,
                4 | 5 => 4,
                10 | 11 => 8,
                _ => return None,
            };
            let v = r.bytes(width)?;
            let mut le = [0u8; 8];
            le[..v.len()].copy_from_slice(&v);
            return Some(u64::from_le_bytes(le));
        }
        r.skip_value(ty, 0)?;
    }
    None
}

/// Reads GGUF fields off a file in order, within its size (buffered: the walk passes every
/// string of a vocabulary).
struct Walker<'f> {
    file: std::io::BufReader<&'f File>,
    at: u64,
    size: u64,
    /// 64-bit counts and lengths (GGUF version 2 on).
    wide: bool,
}

impl Walker<'_> {
    fn bytes(&mut self, n: u64) -> Option<Vec<u8>> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.size)?;
        let mut b = vec![0u8; usize::try_from(n).ok()?];
        self.file.read_exact(&mut b).ok()?;
        self.at = end;
        Some(b)
    }

    fn u32(&mut self) -> Option<u32> {
        let b = self.bytes(4)?;
        Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A count or length (u32 in version 1, u64 after).
    fn len(&mut self) -> Option<u64> {
        if !self.wide {
            return self.u32().map(u64::from);
        }
        let b = self.bytes(8)?;
        Some(u64::from_le_bytes(b.try_into().ok()?))
    }

    /// Moves past one value of type `ty` (candle's limit on nesting, 64, applies).
    fn skip_value(&mut self, ty: u32, depth: usize) -> Option<()> {
        let fixed = match ty {
            0 | 1 | 7 => 1,
            2 | 3 => 2,
            4..=6 => 4,
            10..=12 => 8,
            8 => {
                let n = self.len()?;
                return self.skip(n);
            }
            9 if depth < 64 => {
                let elem = self.u32()?;
                let n = self.len()?;
                for _ in 0..n {
                    self.skip_value(elem, depth + 1)?;
                }
                return Some(());
            }
            _ => return None,
        };
        self.skip(fixed)
    }

    fn skip(&mut self, n: u64) -> Option<()> {
        self.at = self.at.checked_add(n).filter(|&e| e <= self.size)?;
        self.file.seek_relative(i64::try_from(n).ok()?).ok()
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
        gguf_with(&[], dims, offset, data)
    }

    /// As [`gguf`], with metadata entries `(key, type id, value bytes)` first.
    fn gguf_with(meta: &[(&str, u32, &[u8])], dims: &[u64], offset: u64, data: usize) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend_from_slice(&3u32.to_le_bytes());
        b.extend_from_slice(&1u64.to_le_bytes()); // tensors
        b.extend_from_slice(&(meta.len() as u64).to_le_bytes());
        for (key, ty, value) in meta {
            b.extend_from_slice(&(key.len() as u64).to_le_bytes());
            b.extend_from_slice(key.as_bytes());
            b.extend_from_slice(&ty.to_le_bytes());
            b.extend_from_slice(value);
        }
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

    /// Ensures that an alignment of 0 is refused with a message instead of a division by zero
    /// inside candle's reader, whatever integer type declares it and whatever metadata comes
    /// before it (an array of strings, a nested array), and that a power of two is kept.
    #[test]
    fn zero_alignment_is_refused() {
        let strings: &[u8] = &[
            8, 0, 0, 0, // element type: string
            2, 0, 0, 0, 0, 0, 0, 0, // two of them
            1, 0, 0, 0, 0, 0, 0, 0, b'a', //
            2, 0, 0, 0, 0, 0, 0, 0, b'b', b'c',
        ];
        let nested: &[u8] = &[
            9, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, // one array...
            4, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 7, 0, 0, 0, // ...of one u32
        ];
        for (ty, zero) in [(0u32, &[0u8][..]), (4, &[0; 4][..]), (5, &[0; 4][..])] {
            let meta = [
                ("list", 9, strings),
                ("deep", 9, nested),
                ("general.alignment", ty, zero),
            ];
            let why = reason(open(&gguf_with(&meta, &[2, 3], 0, 24)));
            assert!(why.contains("general.alignment"), "{why}");
        }
        let meta = [("general.alignment", 4, &64u32.to_le_bytes()[..])];
        let w = open(&gguf_with(&meta, &[2, 3], 0, 64)).expect("alignment 64 opens");
        assert_eq!(w.content().tensor_data_offset % 64, 0);
    }
}
