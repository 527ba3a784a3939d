//! Random-weight Llama-shaped GGUF files: a model of any shape we have no checkpoint of (a
//! long position range, grouped-query attention), with a real tokenizer borrowed from another
//! GGUF, so that whole clusters of `tessera` processes can load it by path and serve text.
//! The same [`RandomLlama`] (seed included) writes the same bytes everywhere.

use std::path::Path;

use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
use candle_core::{Device, Tensor};

use crate::rng::TestRng;

/// The shape and seed of a random Llama model.
#[derive(Clone, Debug)]
pub struct RandomLlama {
    /// Transformer blocks.
    pub layers: usize,
    /// Width of the residual stream.
    pub hidden: usize,
    /// Width of the MLP.
    pub intermediate: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (a divisor of `heads`).
    pub kv_heads: usize,
    /// Values per head.
    pub head_dim: usize,
    /// The position range (`llama.context_length`).
    pub context_len: usize,
    /// The seed of every weight.
    pub seed: u64,
}

/// A GGUF metadata key and value.
type Meta = (String, gguf_file::Value);

/// Writes `shape` as a GGUF file at `out`: f32 weights (no 8-bit rounding of activations, so
/// two runs that differ only in summation order stay within the kernels' f32 tolerances; the
/// embedding tied to the head, as SmolLM2's), and every `tokenizer.*` key of the GGUF at
/// `tokenizer_from` (the vocabulary size follows its tokenizer).
///
/// # Errors
/// A sentence saying what could not be read, built or written.
pub fn write_random_llama(
    out: &Path,
    shape: &RandomLlama,
    tokenizer_from: &Path,
) -> Result<(), String> {
    let mut src = std::fs::File::open(tokenizer_from)
        .map_err(|e| format!("{}: {e}", tokenizer_from.display()))?;
    let content = gguf_file::Content::read(&mut src)
        .map_err(|e| format!("{}: {e}", tokenizer_from.display()))?;
    let vocab = match content.metadata.get("tokenizer.ggml.tokens") {
        Some(gguf_file::Value::Array(tokens)) => tokens.len(),
        _ => return Err(format!("{}: no tokenizer", tokenizer_from.display())),
    };
    let mut meta = metadata(shape, vocab);
    let mut borrowed: Vec<Meta> = content
        .metadata
        .into_iter()
        .filter(|(k, _)| k.starts_with("tokenizer."))
        .collect();
    // HashMap order is random: sorted keys write the same bytes every time.
    borrowed.sort_by(|a, b| a.0.cmp(&b.0));
    meta.extend(borrowed);
    let tensors = tensors(shape, vocab).map_err(|e| format!("random weights: {e}"))?;
    let meta_refs: Vec<(&str, &gguf_file::Value)> =
        meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    let mut file = std::io::BufWriter::new(
        std::fs::File::create(out).map_err(|e| format!("{}: {e}", out.display()))?,
    );
    gguf_file::write(&mut file, &meta_refs, &tensor_refs)
        .map_err(|e| format!("{}: {e}", out.display()))?;
    std::io::Write::flush(&mut file).map_err(|e| format!("{}: {e}", out.display()))
}

/// The model's `general.*` and `llama.*` keys.
fn metadata(s: &RandomLlama, vocab: usize) -> Vec<Meta> {
    use gguf_file::Value as V;
    let u = |n: usize| V::U32(u32::try_from(n).unwrap_or(u32::MAX));
    vec![
        ("general.architecture".into(), V::String("llama".into())),
        ("general.name".into(), V::String("random-llama".into())),
        ("llama.block_count".into(), u(s.layers)),
        ("llama.context_length".into(), u(s.context_len)),
        ("llama.embedding_length".into(), u(s.hidden)),
        ("llama.feed_forward_length".into(), u(s.intermediate)),
        ("llama.attention.head_count".into(), u(s.heads)),
        ("llama.attention.head_count_kv".into(), u(s.kv_heads)),
        ("llama.attention.key_length".into(), u(s.head_dim)),
        ("llama.attention.value_length".into(), u(s.head_dim)),
        ("llama.rope.dimension_count".into(), u(s.head_dim)),
        ("llama.rope.freq_base".into(), V::F32(100_000.0)),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            V::F32(1e-5),
        ),
        ("llama.vocab_size".into(), u(vocab)),
    ]
}

/// Every tensor, in GGUF names. Scales keep activations O(1) through the layers, as trained
/// models do.
fn tensors(s: &RandomLlama, vocab: usize) -> candle_core::Result<Vec<(String, QTensor)>> {
    let mut rng = TestRng::new(s.seed);
    let (h, q, kv, i) = (
        s.hidden,
        s.heads * s.head_dim,
        s.kv_heads * s.head_dim,
        s.intermediate,
    );
    let mut out = Vec::new();
    let mut mat = |name: String, rows: usize, cols: usize, scale: f32| {
        let data = rng.normals(rows * cols, scale);
        let t = Tensor::from_vec(data, (rows, cols), &Device::Cpu)?;
        out.push((name, QTensor::quantize(&t, GgmlDType::F32)?));
        Ok::<(), candle_core::Error>(())
    };
    let scale = |cols: usize| 1.0 / (cols as f32).sqrt();
    // Tied to the head: at this scale the logits of a unit-RMS hidden state are O(1), so the
    // next-token distribution is spread over many tokens (near-ties are possible, as in a
    // trained model) instead of one token taking all the mass.
    mat("token_embd.weight".into(), vocab, h, scale(h))?;
    for l in 0..s.layers {
        mat(format!("blk.{l}.attn_q.weight"), q, h, scale(h))?;
        mat(format!("blk.{l}.attn_k.weight"), kv, h, scale(h))?;
        mat(format!("blk.{l}.attn_v.weight"), kv, h, scale(h))?;
        mat(format!("blk.{l}.attn_output.weight"), h, q, scale(q))?;
        mat(format!("blk.{l}.ffn_gate.weight"), i, h, scale(h))?;
        mat(format!("blk.{l}.ffn_up.weight"), i, h, scale(h))?;
        mat(format!("blk.{l}.ffn_down.weight"), h, i, scale(i))?;
    }
    let mut norm = |name: String| {
        let data: Vec<f32> = (0..h).map(|_| 1.0 + 0.1 * rng.uniform()).collect();
        let t = Tensor::from_vec(data, h, &Device::Cpu)?;
        out.push((name, QTensor::quantize(&t, GgmlDType::F32)?));
        Ok::<(), candle_core::Error>(())
    };
    norm("output_norm.weight".into())?;
    for l in 0..s.layers {
        norm(format!("blk.{l}.attn_norm.weight"))?;
        norm(format!("blk.{l}.ffn_norm.weight"))?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_format::{GgufWeights, QType, TensorKey, WeightStore};

    /// Ensures that a written model opens as a GGUF of exactly its shape — layers, widths,
    /// grouped-query heads, head size, position range, the borrowed tokenizer's vocabulary —
    /// with f32 weights the loader accepts, and that the same shape and seed write the same
    /// bytes.
    #[test]
    fn written_models_load_with_their_shape() {
        let Some(src) = crate::smollm2_gguf() else {
            return;
        };
        let shape = RandomLlama {
            layers: 2,
            hidden: 64,
            intermediate: 96,
            heads: 2,
            kv_heads: 1,
            head_dim: 32,
            context_len: 9000,
            seed: 3,
        };
        let dir = crate::temp_dir("random-gguf");
        let (a, b) = (dir.path().join("a.gguf"), dir.path().join("b.gguf"));
        write_random_llama(&a, &shape, &src).expect("writes");
        write_random_llama(&b, &shape, &src).expect("writes");
        let bytes = std::fs::read(&a).expect("read");
        assert!(
            bytes == std::fs::read(&b).expect("read"),
            "same shape and seed, same bytes"
        );
        let w = GgufWeights::open(&a).expect("opens");
        let cfg = w.config().expect("config");
        assert_eq!(
            (cfg.n_layers, cfg.hidden, cfg.intermediate),
            (2, 64, 96),
            "{cfg:?}"
        );
        assert_eq!(
            (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.context_len),
            (2, 1, 32, 9000),
            "{cfg:?}"
        );
        assert_eq!(cfg.vocab_size, 49152, "SmolLM2's tokenizer");
        assert_eq!(w.stored_qtype(TensorKey::AttnK(1)), Some(QType::F32));
        assert!(w.contains(TensorKey::TokenEmbd) && !w.contains(TensorKey::Output));
    }
}
