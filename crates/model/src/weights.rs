//! Weights as the model's layers hold them: a [`WeightStore`]'s stored tensors turned into
//! [`QMatrix`]es (quantized blocks kept as they are) and f32 vectors.
//!
//! The stores themselves (GGUF, safetensors) live in `tessera_format`, which knows nothing of
//! compute; this is where their bytes meet the kernels.

use tessera_kernels::quant::QMatrix;

pub use tessera_format::{RawTensor, TensorKey, WeightStore};

use crate::error::Result;

/// Reading matrices and vectors from any [`WeightStore`].
pub trait WeightStoreExt {
    /// Reads a matrix of `rows` output features × `cols` input features, in its stored format.
    ///
    /// # Errors
    /// [`crate::ModelError::Format`] when missing, misshapen or unreadable.
    fn matrix(&self, key: TensorKey, rows: usize, cols: usize) -> Result<QMatrix>;

    /// Reads a vector of `len` values as f32 (norm weights, biases).
    ///
    /// # Errors
    /// As [`WeightStoreExt::matrix`].
    fn vector(&self, key: TensorKey, len: usize) -> Result<Vec<f32>> {
        Ok(self.matrix(key, 1, len)?.dequantize())
    }
}

impl<S: WeightStore + ?Sized> WeightStoreExt for S {
    fn matrix(&self, key: TensorKey, rows: usize, cols: usize) -> Result<QMatrix> {
        let t = self.tensor(key, rows, cols)?;
        Ok(QMatrix::from_bytes(t.qtype, t.rows, t.cols, t.bytes)?)
    }
}
