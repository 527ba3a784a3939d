//! [`QMatrix`]: a weight matrix stored as GGUF blocks, row after row.
//!
//! The matrix owns its bytes in a 64-byte aligned buffer (cache-line aligned rows start where
//! the format allows it; blocks themselves are packed and read with unaligned loads).

use super::blocks;
use super::quantize;
use crate::error::{KernelError, Result};
use std::ops::Range;
use tessera_format::QType;

/// Owned bytes whose first byte sits on a 64-byte boundary.
#[derive(Clone)]
pub(crate) struct AlignedBytes {
    buf: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBytes {
    const ALIGN: usize = 64;

    /// `len` zero bytes.
    pub(crate) fn zeroed(len: usize) -> Self {
        let buf = vec![0u8; len + Self::ALIGN];
        // align_offset on a u8 pointer always succeeds for a power-of-two alignment.
        let start = buf.as_ptr().align_offset(Self::ALIGN).min(Self::ALIGN);
        Self { buf, start, len }
    }

    pub(crate) fn as_slice(&self) -> &[u8] {
        &self.buf[self.start..self.start + self.len]
    }

    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.buf[self.start..self.start + self.len]
    }
}

/// A `rows × cols` weight matrix (output features × input features) in one [`QType`].
///
/// Row `r` is `cols / block_size` consecutive blocks, exactly the GGUF tensor layout of a
/// `[cols, rows]` (ggml order) weight, so a tensor's bytes load without conversion.
#[derive(Clone)]
pub struct QMatrix {
    qtype: QType,
    rows: usize,
    cols: usize,
    data: AlignedBytes,
}

impl std::fmt::Debug for QMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QMatrix")
            .field("qtype", &self.qtype)
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .finish()
    }
}

/// Checks that `cols` fits the format's blocks and returns the expected byte size.
fn check_shape(qtype: QType, rows: usize, cols: usize) -> Result<usize> {
    if cols == 0 || !cols.is_multiple_of(qtype.block_size()) {
        return Err(KernelError::InvalidArgument {
            field: "cols",
            reason: format!(
                "{cols} columns is not a positive multiple of {qtype}'s block size {}",
                qtype.block_size()
            ),
        });
    }
    rows.checked_mul(qtype.row_bytes(cols))
        .ok_or_else(|| KernelError::InvalidArgument {
            field: "rows",
            reason: format!("{rows} × {cols} {qtype} overflows the address space"),
        })
}

impl QMatrix {
    /// Wraps raw GGUF bytes (`rows` rows of `cols / block_size` blocks each).
    ///
    /// # Errors
    /// [`KernelError::InvalidArgument`] naming `cols` when it is zero or not a multiple of the
    /// block size, or `bytes` when its length is not `rows · row_bytes(cols)`.
    pub fn from_bytes(qtype: QType, rows: usize, cols: usize, bytes: Vec<u8>) -> Result<QMatrix> {
        let expected = check_shape(qtype, rows, cols)?;
        if bytes.len() != expected {
            return Err(KernelError::InvalidArgument {
                field: "bytes",
                reason: format!(
                    "{} bytes for a {rows} × {cols} {qtype} matrix, which needs {expected}",
                    bytes.len()
                ),
            });
        }
        let mut data = AlignedBytes::zeroed(expected);
        data.as_mut_slice().copy_from_slice(&bytes);
        Ok(QMatrix {
            qtype,
            rows,
            cols,
            data,
        })
    }

    /// Quantizes row-major f32 `data` (`rows × cols`) with the reference quantizer.
    ///
    /// # Errors
    /// [`KernelError::InvalidArgument`] naming `cols` (not a multiple of the block size) or
    /// `data` (length is not `rows · cols`, or holds a non-finite value).
    pub fn quantize(qtype: QType, rows: usize, cols: usize, data: &[f32]) -> Result<QMatrix> {
        let nbytes = check_shape(qtype, rows, cols)?;
        if Some(data.len()) != rows.checked_mul(cols) {
            return Err(KernelError::InvalidArgument {
                field: "data",
                reason: format!("{} values for a {rows} × {cols} matrix", data.len()),
            });
        }
        if let Some(i) = data.iter().position(|v| !v.is_finite()) {
            return Err(KernelError::InvalidArgument {
                field: "data",
                reason: format!("value {} at index {i} is not finite", data[i]),
            });
        }
        let mut buf = AlignedBytes::zeroed(nbytes);
        let rb = qtype.row_bytes(cols);
        if rb > 0 {
            for (x, out) in data
                .chunks_exact(cols)
                .zip(buf.as_mut_slice().chunks_exact_mut(rb))
            {
                quantize::quantize_row(qtype, x, out);
            }
        }
        Ok(QMatrix {
            qtype,
            rows,
            cols,
            data: buf,
        })
    }

    /// The storage format.
    pub fn qtype(&self) -> QType {
        self.qtype
    }

    /// Output features.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes of weight data.
    pub fn nbytes(&self) -> usize {
        self.data.len
    }

    /// Bytes of one row.
    pub fn row_bytes(&self) -> usize {
        self.qtype.row_bytes(self.cols)
    }

    /// The raw GGUF bytes of every row.
    pub fn as_bytes(&self) -> &[u8] {
        self.data.as_slice()
    }

    /// The raw bytes of row `r` (internal: callers keep `r < rows`).
    pub(crate) fn row(&self, r: usize) -> &[u8] {
        let rb = self.row_bytes();
        &self.data.as_slice()[r * rb..(r + 1) * rb]
    }

    /// Dequantizes row `row` into `out`.
    ///
    /// # Errors
    /// [`KernelError::InvalidArgument`] naming `row` when it is out of range, or `out` when its
    /// length is not `cols`.
    pub fn dequantize_row(&self, row: usize, out: &mut [f32]) -> Result<()> {
        if row >= self.rows {
            return Err(KernelError::InvalidArgument {
                field: "row",
                reason: format!("row {row} of a {}-row matrix", self.rows),
            });
        }
        if out.len() != self.cols {
            return Err(KernelError::InvalidArgument {
                field: "out",
                reason: format!("{} values for a {}-column row", out.len(), self.cols),
            });
        }
        blocks::dequantize_row(self.qtype, self.row(row), out);
        Ok(())
    }

    /// The whole matrix as row-major f32.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0.0f32; self.rows * self.cols];
        for (r, o) in out.chunks_exact_mut(self.cols).enumerate() {
            blocks::dequantize_row(self.qtype, self.row(r), o);
        }
        out
    }

    /// A copy of rows `rows` (a tensor-parallel shard of the output features: the product
    /// with it is exactly the matching part of the product with `self`).
    ///
    /// # Errors
    /// [`KernelError::InvalidArgument`] naming `range` when it is empty, reversed or past the
    /// last row.
    pub fn slice_rows(&self, rows: Range<usize>) -> Result<QMatrix> {
        if rows.start >= rows.end || rows.end > self.rows {
            return Err(KernelError::InvalidArgument {
                field: "range",
                reason: format!("rows {rows:?} of a {}-row matrix", self.rows),
            });
        }
        let rb = self.row_bytes();
        let n = rows.end - rows.start;
        let mut data = AlignedBytes::zeroed(n * rb);
        data.as_mut_slice()
            .copy_from_slice(&self.data.as_slice()[rows.start * rb..rows.end * rb]);
        Ok(QMatrix {
            qtype: self.qtype,
            rows: n,
            cols: self.cols,
            data,
        })
    }

    /// A copy of columns `cols` of every row (a tensor-parallel shard of the input features:
    /// the product with it over the matching activation columns is a partial sum of the
    /// product with `self`). Whole blocks are copied byte for byte, so the slice dequantizes to
    /// exactly the parent's values.
    ///
    /// # Errors
    /// [`KernelError::InvalidArgument`] naming `range` when `cols` is empty, reversed or past
    /// the last column, or `cols` when either end is not a multiple of the format's block size
    /// (a block cannot be split).
    pub fn slice_cols(&self, cols: Range<usize>) -> Result<QMatrix> {
        if cols.start >= cols.end || cols.end > self.cols {
            return Err(KernelError::InvalidArgument {
                field: "range",
                reason: format!("columns {cols:?} of a {}-column matrix", self.cols),
            });
        }
        let bs = self.qtype.block_size();
        if !cols.start.is_multiple_of(bs) || !cols.end.is_multiple_of(bs) {
            return Err(KernelError::InvalidArgument {
                field: "cols",
                reason: format!(
                    "columns {cols:?} do not fall on {}'s block boundaries (block size {bs})",
                    self.qtype
                ),
            });
        }
        let n = cols.end - cols.start;
        let (rb, sub) = (self.row_bytes(), self.qtype.row_bytes(n));
        // Byte offset of the first kept block inside each row.
        let skip = self.qtype.row_bytes(cols.start);
        let mut data = AlignedBytes::zeroed(self.rows * sub);
        for (src, dst) in self
            .data
            .as_slice()
            .chunks_exact(rb)
            .zip(data.as_mut_slice().chunks_exact_mut(sub))
        {
            dst.copy_from_slice(&src[skip..skip + sub]);
        }
        Ok(QMatrix {
            qtype: self.qtype,
            rows: self.rows,
            cols: n,
            data,
        })
    }
}
