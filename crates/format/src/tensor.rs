//! Tensors by role: [`TensorKey`] names what a layer needs, [`WeightStore`] hands it over as
//! the file stores it ([`RawTensor`]).
//!
//! Layers ask for tensors by role, never by file-specific name, so one model definition serves
//! both formats. Tensors are read on demand: a pipeline stage that loads layers 10..20 reads
//! those layers' bytes and nothing else, which is what makes a worker's resident memory fall
//! with its share of the model.

use crate::error::{FormatError, Result};
use crate::qtype::QType;

/// A tensor's role in a Llama-family model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TensorKey {
    /// Token embedding, (vocab, hidden).
    TokenEmbd,
    /// Final RMSNorm weight.
    OutputNorm,
    /// Output head, (vocab, hidden); absent when tied to the embedding.
    Output,
    /// Layer `l`'s attention RMSNorm weight.
    AttnNorm(usize),
    /// Layer `l`'s query projection.
    AttnQ(usize),
    /// Layer `l`'s key projection.
    AttnK(usize),
    /// Layer `l`'s value projection.
    AttnV(usize),
    /// Layer `l`'s query bias.
    AttnQBias(usize),
    /// Layer `l`'s key bias.
    AttnKBias(usize),
    /// Layer `l`'s value bias.
    AttnVBias(usize),
    /// Layer `l`'s attention output projection.
    AttnOutput(usize),
    /// Layer `l`'s MLP RMSNorm weight.
    FfnNorm(usize),
    /// Layer `l`'s MLP gate projection.
    FfnGate(usize),
    /// Layer `l`'s MLP up projection.
    FfnUp(usize),
    /// Layer `l`'s MLP down projection.
    FfnDown(usize),
    /// Learned absolute position embedding, (positions, hidden) (encoders).
    PosEmbd,
    /// Token-type (segment) embedding, (types, hidden) (encoders).
    TypeEmbd,
    /// The embedding LayerNorm's weight (encoders).
    EmbdNorm,
    /// The embedding LayerNorm's bias (encoders).
    EmbdNormBias,
    /// Layer `l`'s attention output projection bias.
    AttnOutputBias(usize),
    /// Layer `l`'s attention norm bias (encoders' LayerNorm after attention).
    AttnNormBias(usize),
    /// Layer `l`'s MLP up projection bias.
    FfnUpBias(usize),
    /// Layer `l`'s MLP down projection bias.
    FfnDownBias(usize),
    /// Layer `l`'s MLP norm bias (encoders' LayerNorm after the MLP).
    FfnNormBias(usize),
}

impl TensorKey {
    /// The name llama.cpp's converter gives this tensor in a GGUF file.
    pub fn gguf_name(self) -> String {
        use TensorKey as K;
        match self {
            K::TokenEmbd => "token_embd.weight".into(),
            K::OutputNorm => "output_norm.weight".into(),
            K::Output => "output.weight".into(),
            K::AttnNorm(l) => format!("blk.{l}.attn_norm.weight"),
            K::AttnQ(l) => format!("blk.{l}.attn_q.weight"),
            K::AttnK(l) => format!("blk.{l}.attn_k.weight"),
            K::AttnV(l) => format!("blk.{l}.attn_v.weight"),
            K::AttnQBias(l) => format!("blk.{l}.attn_q.bias"),
            K::AttnKBias(l) => format!("blk.{l}.attn_k.bias"),
            K::AttnVBias(l) => format!("blk.{l}.attn_v.bias"),
            K::AttnOutput(l) => format!("blk.{l}.attn_output.weight"),
            K::FfnNorm(l) => format!("blk.{l}.ffn_norm.weight"),
            K::FfnGate(l) => format!("blk.{l}.ffn_gate.weight"),
            K::FfnUp(l) => format!("blk.{l}.ffn_up.weight"),
            K::FfnDown(l) => format!("blk.{l}.ffn_down.weight"),
            K::PosEmbd => "position_embd.weight".into(),
            K::TypeEmbd => "token_types.weight".into(),
            K::EmbdNorm => "token_embd_norm.weight".into(),
            K::EmbdNormBias => "token_embd_norm.bias".into(),
            K::AttnOutputBias(l) => format!("blk.{l}.attn_output.bias"),
            K::AttnNormBias(l) => format!("blk.{l}.attn_output_norm.bias"),
            K::FfnUpBias(l) => format!("blk.{l}.ffn_up.bias"),
            K::FfnDownBias(l) => format!("blk.{l}.ffn_down.bias"),
            K::FfnNormBias(l) => format!("blk.{l}.layer_output_norm.bias"),
        }
    }

    /// The name a Hugging Face BERT checkpoint gives this tensor (without the `bert.` prefix a
    /// checkpoint saved from a task model carries), or `None` for a role BERT does not have.
    /// The attention norm is BERT's LayerNorm after attention, the MLP norm the one after the
    /// MLP (post-LN); the MLP's up projection is BERT's `intermediate`, its down `output`.
    pub fn bert_name(self) -> Option<String> {
        use TensorKey as K;
        let layer = |l: usize, rest: &str| Some(format!("encoder.layer.{l}.{rest}"));
        match self {
            K::TokenEmbd => Some("embeddings.word_embeddings.weight".into()),
            K::PosEmbd => Some("embeddings.position_embeddings.weight".into()),
            K::TypeEmbd => Some("embeddings.token_type_embeddings.weight".into()),
            K::EmbdNorm => Some("embeddings.LayerNorm.weight".into()),
            K::EmbdNormBias => Some("embeddings.LayerNorm.bias".into()),
            K::AttnQ(l) => layer(l, "attention.self.query.weight"),
            K::AttnK(l) => layer(l, "attention.self.key.weight"),
            K::AttnV(l) => layer(l, "attention.self.value.weight"),
            K::AttnQBias(l) => layer(l, "attention.self.query.bias"),
            K::AttnKBias(l) => layer(l, "attention.self.key.bias"),
            K::AttnVBias(l) => layer(l, "attention.self.value.bias"),
            K::AttnOutput(l) => layer(l, "attention.output.dense.weight"),
            K::AttnOutputBias(l) => layer(l, "attention.output.dense.bias"),
            K::AttnNorm(l) => layer(l, "attention.output.LayerNorm.weight"),
            K::AttnNormBias(l) => layer(l, "attention.output.LayerNorm.bias"),
            K::FfnUp(l) => layer(l, "intermediate.dense.weight"),
            K::FfnUpBias(l) => layer(l, "intermediate.dense.bias"),
            K::FfnDown(l) => layer(l, "output.dense.weight"),
            K::FfnDownBias(l) => layer(l, "output.dense.bias"),
            K::FfnNorm(l) => layer(l, "output.LayerNorm.weight"),
            K::FfnNormBias(l) => layer(l, "output.LayerNorm.bias"),
            K::OutputNorm | K::Output | K::FfnGate(_) => None,
        }
    }

    /// The name a Hugging Face Llama/Qwen2 checkpoint gives this tensor.
    pub fn hf_name(self) -> String {
        use TensorKey as K;
        match self {
            K::TokenEmbd => "model.embed_tokens.weight".into(),
            K::OutputNorm => "model.norm.weight".into(),
            K::Output => "lm_head.weight".into(),
            K::AttnNorm(l) => format!("model.layers.{l}.input_layernorm.weight"),
            K::AttnQ(l) => format!("model.layers.{l}.self_attn.q_proj.weight"),
            K::AttnK(l) => format!("model.layers.{l}.self_attn.k_proj.weight"),
            K::AttnV(l) => format!("model.layers.{l}.self_attn.v_proj.weight"),
            K::AttnQBias(l) => format!("model.layers.{l}.self_attn.q_proj.bias"),
            K::AttnKBias(l) => format!("model.layers.{l}.self_attn.k_proj.bias"),
            K::AttnVBias(l) => format!("model.layers.{l}.self_attn.v_proj.bias"),
            K::AttnOutput(l) => format!("model.layers.{l}.self_attn.o_proj.weight"),
            K::FfnNorm(l) => format!("model.layers.{l}.post_attention_layernorm.weight"),
            K::FfnGate(l) => format!("model.layers.{l}.mlp.gate_proj.weight"),
            K::FfnUp(l) => format!("model.layers.{l}.mlp.up_proj.weight"),
            K::FfnDown(l) => format!("model.layers.{l}.mlp.down_proj.weight"),
            // Encoder-only roles: a Llama checkpoint has none (the name is never found).
            K::PosEmbd
            | K::TypeEmbd
            | K::EmbdNorm
            | K::EmbdNormBias
            | K::AttnOutputBias(_)
            | K::AttnNormBias(_)
            | K::FfnUpBias(_)
            | K::FfnDownBias(_)
            | K::FfnNormBias(_) => format!("{self:?} (encoder-only)"),
        }
    }
}

/// A matrix of `rows` output features × `cols` input features (a vector is one row), as
/// stored: `bytes` holds `rows` rows of [`QType::row_bytes`]`(cols)` bytes each, in `qtype`'s
/// block layout (ggml's, byte for byte).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawTensor {
    /// The storage format.
    pub qtype: QType,
    /// Rows (output features).
    pub rows: usize,
    /// Columns (input features); a whole number of `qtype` blocks.
    pub cols: usize,
    /// The row-major block bytes.
    pub bytes: Vec<u8>,
}

impl RawTensor {
    /// A tensor over `bytes`, checked against its geometry.
    ///
    /// # Errors
    /// [`FormatError::Tensor`] (named `name`) when `cols` is not a whole number of blocks or
    /// `bytes` is not `rows` rows long.
    pub fn new(name: &str, qtype: QType, rows: usize, cols: usize, bytes: Vec<u8>) -> Result<Self> {
        let block = qtype.block_size();
        if !cols.is_multiple_of(block) {
            return Err(FormatError::Tensor {
                name: name.to_owned(),
                reason: format!("{cols} columns are not a whole number of {block}-wide blocks"),
            });
        }
        let want = rows * qtype.row_bytes(cols);
        if bytes.len() != want {
            return Err(FormatError::Tensor {
                name: name.to_owned(),
                reason: format!(
                    "{} bytes for a ({rows}, {cols}) {qtype:?} tensor of {want} bytes",
                    bytes.len()
                ),
            });
        }
        Ok(Self {
            qtype,
            rows,
            cols,
            bytes,
        })
    }
}

/// A source of weights: what layers' `load` functions read from.
pub trait WeightStore: Send + Sync {
    /// Whether the file has this tensor.
    fn contains(&self, key: TensorKey) -> bool;

    /// Reads a matrix of `rows` output features × `cols` input features (a vector of `len`
    /// values is `(1, len)`), in its stored format.
    ///
    /// # Errors
    /// [`FormatError::Tensor`] when missing or of another shape; I/O and format errors.
    fn tensor(&self, key: TensorKey, rows: usize, cols: usize) -> Result<RawTensor>;

    /// Bytes this tensor occupies once loaded (what a worker holding it keeps resident), or
    /// `None` when absent or the store cannot tell without loading it. Planners size shards
    /// with it.
    fn stored_bytes(&self, key: TensorKey) -> Option<u64> {
        let _ = key;
        None
    }

    /// The block format this tensor is loaded in (what [`WeightStore::tensor`] would return as
    /// [`RawTensor::qtype`]), without loading it, or `None` when absent or the store cannot
    /// tell. Planners read block sizes from it: a tensor-parallel split of a matrix's columns
    /// must fall on whole blocks.
    fn stored_qtype(&self, key: TensorKey) -> Option<QType> {
        let _ = key;
        None
    }
}

/// The error for a tensor of the wrong shape.
pub(crate) fn shape_error(
    key: TensorKey,
    name: &str,
    want: &[usize],
    got: &[usize],
) -> FormatError {
    FormatError::Tensor {
        name: name.to_owned(),
        reason: format!("{key:?} should have shape {want:?}, the file has {got:?}"),
    }
}

/// The error for a tensor the file lacks.
pub(crate) fn missing(name: &str, path: &std::path::Path) -> FormatError {
    FormatError::Tensor {
        name: name.to_owned(),
        reason: format!("not found in {}", path.display()),
    }
}

/// Whether a file's `dims` hold a `(rows, cols)` matrix (a vector is `[cols]` with one row).
pub(crate) fn shape_matches(dims: &[usize], rows: usize, cols: usize) -> bool {
    match dims {
        [r, c] => *r == rows && *c == cols,
        [c] => rows == 1 && *c == cols,
        _ => false,
    }
}
