//! Hugging Face checkpoints: a model written to `*.safetensors` with HF tensor names loads and
//! computes exactly what the same weights give from memory.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use tessera_format::QType;
use tessera_format::SafetensorsWeights;
use tessera_format::WeightStore;
use tessera_format::{Arch, ModelConfig, RopeLayout};
use tessera_kernels::ThreadPool;
use tessera_model::kv_cache::{KvCacheConfig, PagedKvCache};
use tessera_model::layers::SeqStep;
use tessera_model::llama::{Llama, LoadSpec};
use tessera_model::stage::StageScratch;
use tessera_testkit::MemoryWeights;

fn logits(model: &Llama, cfg: &ModelConfig, tokens: &[u32]) -> Vec<f32> {
    let pool = ThreadPool::new(2).expect("pool");
    let mut cache = PagedKvCache::new(KvCacheConfig {
        n_layers: cfg.n_layers,
        n_kv_heads: cfg.n_kv_heads,
        head_dim: cfg.head_dim,
        block_size: 8,
        num_blocks: 8,
    })
    .expect("cache");
    let mut seq = cache.new_seq();
    let mut scratch = StageScratch::default();
    let mut batch = [SeqStep {
        tokens,
        seq: &mut seq,
        logits: true,
    }];
    model
        .forward(&mut batch, &mut cache, &mut scratch, &pool)
        .expect("forward")
        .to_vec()
}

/// Ensures that f32, f16 and bf16 safetensors checkpoints with HF names load through
/// `SafetensorsWeights` and give the logits of the same (rounded) weights held in memory.
#[test]
fn safetensors_checkpoint_matches_memory_weights() {
    let cfg = ModelConfig {
        arch: Arch::Qwen2,
        n_layers: 2,
        hidden: 32,
        intermediate: 64,
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 8,
        vocab_size: 50,
        context_len: 64,
        rope_theta: 10_000.0,
        rope_layout: RopeLayout::Half,
        rms_eps: 1e-6,
        qkv_bias: true,
    };
    for (dtype, qtype) in [
        (DType::F32, QType::F32),
        (DType::F16, QType::F16),
        (DType::BF16, QType::BF16),
    ] {
        let mem = MemoryWeights::random(&cfg, QType::F32, true, 9).expect("weights");
        let dir = std::env::temp_dir().join(format!("tessera-st-{}-{dtype:?}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let mut tensors = HashMap::new();
        let mut rounded = MemoryWeights::default();
        for (key, m) in mem.iter() {
            let data = m.dequantize();
            let dims: Vec<usize> = if m.rows() == 1 {
                vec![m.cols()]
            } else {
                vec![m.rows(), m.cols()]
            };
            let t = Tensor::from_vec(data.clone(), dims, &Device::Cpu)
                .expect("tensor")
                .to_dtype(dtype)
                .expect("cast");
            // Vectors stay f32 in memory either way; matrices are stored in the file's precision.
            let back = t
                .to_dtype(DType::F32)
                .expect("f32")
                .flatten_all()
                .expect("flat")
                .to_vec1::<f32>()
                .expect("vec");
            let q = if m.rows() == 1 { QType::F32 } else { qtype };
            rounded.insert(
                key,
                tessera_kernels::quant::QMatrix::quantize(q, m.rows(), m.cols(), &back).expect("q"),
            );
            tensors.insert(key.hf_name(), t);
        }
        candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).expect("save");
        let st = SafetensorsWeights::open_dir(&dir).expect("open");
        // The planner reads each tensor's format without loading it: the file's dtype, as
        // `tensor` returns it.
        for (key, _) in mem.iter() {
            assert_eq!(st.stored_qtype(key), Some(qtype), "{key:?}");
        }
        assert_eq!(st.stored_qtype(tessera_format::TensorKey::Output), None);
        let from_file =
            Llama::load(&st, &cfg, LoadSpec::full(&cfg), &mut |_, _| {}).expect("load file");
        let from_mem =
            Llama::load(&rounded, &cfg, LoadSpec::full(&cfg), &mut |_, _| {}).expect("load mem");
        let tokens = [3, 14, 15, 9, 26];
        assert_eq!(
            logits(&from_file, &cfg, &tokens),
            logits(&from_mem, &cfg, &tokens),
            "{dtype:?}"
        );
        std::fs::remove_dir_all(&dir).ok();
    }
}
