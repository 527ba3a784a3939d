//! The weight formats a [`super::QMatrix`] can hold, with their GGUF/ggml block geometry.
//!
//! Sizes here are the on-disk ones: a GGUF tensor's bytes are read verbatim into a matrix, so
//! `block_size` and `type_size` must match ggml's `block_*` structs byte for byte.

use crate::error::{FormatError, Result};
use candle_core::quantized::GgmlDType;

/// Elements per K-quant super-block (`QK_K` in ggml).
pub const QK_K: usize = 256;

/// A weight storage format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QType {
    /// 32-bit float, one element per "block".
    F32,
    /// IEEE half precision.
    F16,
    /// bfloat16.
    BF16,
    /// `block_q4_0 { f16 d; u8 qs[16] }`: 32 weights `d * (q - 8)`.
    Q4_0,
    /// `block_q4_1 { f16 d; f16 m; u8 qs[16] }`: 32 weights `d * q + m`.
    Q4_1,
    /// `block_q8_0 { f16 d; i8 qs[32] }`: 32 weights `d * q`.
    Q8_0,
    /// `block_q4_K { f16 d; f16 dmin; u8 scales[12]; u8 qs[128] }`: 256 weights in 8
    /// sub-blocks of 32 with 6-bit scales and mins.
    Q4K,
    /// `block_q5_K { f16 d; f16 dmin; u8 scales[12]; u8 qh[32]; u8 qs[128] }`.
    Q5K,
    /// `block_q6_K { u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d }`.
    Q6K,
}

impl QType {
    /// Every supported format, for tests and tables.
    pub const ALL: [QType; 9] = [
        QType::F32,
        QType::F16,
        QType::BF16,
        QType::Q4_0,
        QType::Q4_1,
        QType::Q8_0,
        QType::Q4K,
        QType::Q5K,
        QType::Q6K,
    ];

    /// Elements per block; a row's length must be a multiple of it.
    pub const fn block_size(self) -> usize {
        match self {
            QType::F32 | QType::F16 | QType::BF16 => 1,
            QType::Q4_0 | QType::Q4_1 | QType::Q8_0 => 32,
            QType::Q4K | QType::Q5K | QType::Q6K => QK_K,
        }
    }

    /// Bytes per block, exactly as ggml lays the block out.
    pub const fn type_size(self) -> usize {
        match self {
            QType::F32 => 4,
            QType::F16 | QType::BF16 => 2,
            QType::Q4_0 => 2 + 16,
            QType::Q4_1 => 2 + 2 + 16,
            QType::Q8_0 => 2 + 32,
            QType::Q4K => 2 + 2 + 12 + QK_K / 2,
            QType::Q5K => 2 + 2 + 12 + QK_K / 8 + QK_K / 2,
            QType::Q6K => QK_K / 2 + QK_K / 4 + QK_K / 16 + 2,
        }
    }

    /// Bytes of one row of `cols` elements.
    ///
    /// # Panics
    /// Never; callers check `cols % block_size() == 0` first (the result would be truncated).
    pub const fn row_bytes(self, cols: usize) -> usize {
        cols / self.block_size() * self.type_size()
    }

    /// Whether the format is a block-quantized integer format (as opposed to a float one).
    pub const fn is_quantized(self) -> bool {
        !matches!(self, QType::F32 | QType::F16 | QType::BF16)
    }

    /// The format's ggml name, for messages.
    pub const fn name(self) -> &'static str {
        match self {
            QType::F32 => "f32",
            QType::F16 => "f16",
            QType::BF16 => "bf16",
            QType::Q4_0 => "q4_0",
            QType::Q4_1 => "q4_1",
            QType::Q8_0 => "q8_0",
            QType::Q4K => "q4_K",
            QType::Q5K => "q5_K",
            QType::Q6K => "q6_K",
        }
    }

    /// The format of a GGUF tensor as candle reports it.
    ///
    /// # Errors
    /// [`FormatError::UnsupportedDType`] for formats without a kernel here (Q5_0, Q5_1, Q2_K, …).
    pub fn from_ggml(dtype: GgmlDType) -> Result<QType> {
        Ok(match dtype {
            GgmlDType::F32 => QType::F32,
            GgmlDType::F16 => QType::F16,
            GgmlDType::BF16 => QType::BF16,
            GgmlDType::Q4_0 => QType::Q4_0,
            GgmlDType::Q4_1 => QType::Q4_1,
            GgmlDType::Q8_0 => QType::Q8_0,
            GgmlDType::Q4K => QType::Q4K,
            GgmlDType::Q5K => QType::Q5K,
            GgmlDType::Q6K => QType::Q6K,
            other => return Err(FormatError::UnsupportedDType(format!("{other:?}"))),
        })
    }

    /// The candle equivalent, used to cross-check layouts against candle's own codecs.
    pub const fn to_ggml(self) -> GgmlDType {
        match self {
            QType::F32 => GgmlDType::F32,
            QType::F16 => GgmlDType::F16,
            QType::BF16 => GgmlDType::BF16,
            QType::Q4_0 => GgmlDType::Q4_0,
            QType::Q4_1 => GgmlDType::Q4_1,
            QType::Q8_0 => GgmlDType::Q8_0,
            QType::Q4K => GgmlDType::Q4K,
            QType::Q5K => GgmlDType::Q5K,
            QType::Q6K => GgmlDType::Q6K,
        }
    }
}

impl std::fmt::Display for QType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ensures that block sizes and byte sizes agree with candle's (ggml's) for every format.
    #[test]
    fn sizes_match_ggml() {
        for q in QType::ALL {
            let g = q.to_ggml();
            assert_eq!(q.block_size(), g.block_size(), "{q}");
            assert_eq!(q.type_size(), g.type_size(), "{q}");
            assert_eq!(QType::from_ggml(g).expect("supported"), q);
        }
        assert_eq!(QType::Q4_1.type_size(), 20);
        assert_eq!(QType::Q4K.type_size(), 144);
        assert_eq!(QType::Q5K.type_size(), 176);
        assert_eq!(QType::Q6K.type_size(), 210);
    }

    /// Ensures that formats without kernels are refused with a typed error.
    #[test]
    fn rejects_unsupported() {
        for g in [
            GgmlDType::Q5_0,
            GgmlDType::Q5_1,
            GgmlDType::Q2K,
            GgmlDType::Q8K,
        ] {
            assert!(matches!(
                QType::from_ggml(g),
                Err(FormatError::UnsupportedDType(_))
            ));
        }
    }
}
