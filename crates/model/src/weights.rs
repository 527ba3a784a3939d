//! Reading weights from GGUF and safetensors files, tensor by tensor.
//!
//! Layers ask for tensors by role ([`TensorKey`]), never by file-specific name, so one model
//! definition serves both formats. Tensors are read on demand: a pipeline stage that loads
//! layers 10..20 reads those layers' bytes and nothing else, which is what makes a worker's
//! resident memory fall with its share of the model.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device};

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::quant::{QMatrix, QType};

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
        }
    }
}

/// A source of weights: what layers' `load` functions read from.
pub trait WeightStore: Send + Sync {
    /// Whether the file has this tensor.
    fn contains(&self, key: TensorKey) -> bool;

    /// Reads a matrix of `rows` output features × `cols` input features, in its stored format.
    ///
    /// # Errors
    /// [`ModelError::Tensor`] when missing or of another shape; I/O and format errors.
    fn matrix(&self, key: TensorKey, rows: usize, cols: usize) -> Result<QMatrix>;

    /// Reads a vector of `len` values as f32 (norm weights, biases).
    ///
    /// # Errors
    /// As for [`WeightStore::matrix`].
    fn vector(&self, key: TensorKey, len: usize) -> Result<Vec<f32>> {
        let m = self.matrix(key, 1, len)?;
        Ok(m.dequantize())
    }

    /// Bytes this tensor occupies once loaded (what a worker holding it keeps resident), or
    /// `None` when absent or the store cannot tell without loading it. Planners size shards
    /// with it.
    fn stored_bytes(&self, key: TensorKey) -> Option<u64> {
        let _ = key;
        None
    }
}

fn shape_error(key: TensorKey, name: &str, want: &[usize], got: &[usize]) -> ModelError {
    ModelError::Tensor {
        name: name.to_owned(),
        reason: format!("{key:?} should have shape {want:?}, the file has {got:?}"),
    }
}

fn missing(name: &str, path: &Path) -> ModelError {
    ModelError::Tensor {
        name: name.to_owned(),
        reason: format!("not found in {}", path.display()),
    }
}

/// Weights in a GGUF file, read with positioned reads so concurrent layers never seek.
pub struct GgufWeights {
    path: PathBuf,
    file: File,
    content: gguf_file::Content,
}

impl GgufWeights {
    /// Opens a GGUF file and reads its header.
    ///
    /// # Errors
    /// [`ModelError::Io`] when unreadable; [`ModelError::InvalidModel`] when it is not GGUF.
    pub fn open(path: &Path) -> Result<Self> {
        let io = |source| ModelError::Io {
            path: path.to_owned(),
            source,
        };
        let mut file = File::open(path).map_err(io)?;
        let content =
            gguf_file::Content::read(&mut file).map_err(|e| ModelError::InvalidModel {
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

    fn matrix(&self, key: TensorKey, rows: usize, cols: usize) -> Result<QMatrix> {
        let name = key.gguf_name();
        let info = self
            .content
            .tensor_infos
            .get(&name)
            .ok_or_else(|| missing(&name, &self.path))?;
        // candle reverses ggml's dimension order, so a (rows, cols) matrix reads as [rows, cols]
        // and a vector as [len].
        let dims = info.shape.dims();
        let ok = match dims {
            [r, c] => *r == rows && *c == cols,
            [c] => rows == 1 && *c == cols,
            _ => false,
        };
        if !ok {
            return Err(shape_error(key, &name, &[rows, cols], dims));
        }
        let qtype = QType::from_ggml(info.ggml_dtype)?;
        let block = qtype.block_size();
        if !cols.is_multiple_of(block) {
            return Err(ModelError::Tensor {
                name,
                reason: format!("{cols} columns are not a whole number of {block}-wide blocks"),
            });
        }
        let nbytes = rows * (cols / block) * qtype.type_size();
        let mut bytes = vec![0u8; nbytes];
        let start = self.content.tensor_data_offset + info.offset;
        self.file
            .read_exact_at(&mut bytes, start)
            .map_err(|source| ModelError::InvalidModel {
                path: self.path.clone(),
                reason: format!(
                    "tensor {name} ({nbytes} bytes at {start}) cannot be read: {source}; the \
                     file is probably truncated — download it again"
                ),
            })?;
        QMatrix::from_bytes(qtype, rows, cols, bytes)
    }

    fn stored_bytes(&self, key: TensorKey) -> Option<u64> {
        let info = self.content.tensor_infos.get(&key.gguf_name())?;
        // Loaded quantized blocks are the file's bytes, unchanged.
        let dt = info.ggml_dtype;
        let elems = info.shape.elem_count();
        Some((elems / dt.block_size() * dt.type_size()) as u64)
    }
}

/// Weights in one or more `.safetensors` files (a Hugging Face checkpoint directory).
pub struct SafetensorsWeights {
    dir: PathBuf,
    tensors: candle_core::safetensors::MmapedSafetensors,
    names: HashMap<String, ()>,
}

impl SafetensorsWeights {
    /// Opens every `*.safetensors` file in `dir`.
    ///
    /// # Errors
    /// [`ModelError::InvalidModel`] when there is none or one is not valid safetensors.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let invalid = |reason: String| ModelError::InvalidModel {
            path: dir.to_owned(),
            reason,
        };
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|source| ModelError::Io {
                path: dir.to_owned(),
                source,
            })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(invalid("no *.safetensors files".into()));
        }
        // SAFETY: the files are mapped read-only; like every mmap-based loader we rely on nobody
        // truncating a checkpoint while it is being loaded.
        let tensors = unsafe { candle_core::safetensors::MmapedSafetensors::multi(&files) }
            .map_err(|e| invalid(format!("invalid safetensors: {e}")))?;
        let names = tensors
            .tensors()
            .into_iter()
            .map(|(n, _)| (n, ()))
            .collect();
        Ok(Self {
            dir: dir.to_owned(),
            tensors,
            names,
        })
    }
}

impl WeightStore for SafetensorsWeights {
    fn contains(&self, key: TensorKey) -> bool {
        self.names.contains_key(&key.hf_name())
    }

    fn matrix(&self, key: TensorKey, rows: usize, cols: usize) -> Result<QMatrix> {
        let name = key.hf_name();
        if !self.names.contains_key(&name) {
            return Err(missing(&name, &self.dir));
        }
        let t = self.tensors.load(&name, &Device::Cpu)?;
        let dims = t.dims().to_vec();
        let ok = match dims.as_slice() {
            [r, c] => *r == rows && *c == cols,
            [c] => rows == 1 && *c == cols,
            _ => false,
        };
        if !ok {
            return Err(shape_error(key, &name, &[rows, cols], &dims));
        }
        // Keep half-precision checkpoints in half precision: it halves resident memory, and the
        // F16/BF16 product kernels widen to f32 as they go.
        let qtype = match t.dtype() {
            DType::F16 => QType::F16,
            DType::BF16 => QType::BF16,
            _ => QType::F32,
        };
        let data = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        QMatrix::quantize(qtype, rows, cols, &data)
    }

    fn stored_bytes(&self, key: TensorKey) -> Option<u64> {
        let view = self.tensors.get(&key.hf_name()).ok()?;
        let elems: usize = view.shape().iter().product();
        // As `matrix` stores them: 16-bit floats stay 16-bit, everything else becomes f32.
        let width = if view.dtype().bitsize() == 16 { 2 } else { 4 };
        Some((elems * width) as u64)
    }
}
