//! The model-file targets: a GGUF file, and a Hugging Face checkpoint directory, read the way
//! the coordinator (configuration, tokenizer, template, footprint) and a worker (tensors) read
//! them. A model file is input like any other: a worker opens what `LoadShard` names and a
//! cluster may be pointed at a file someone else made.

use tessera_coordinator::footprint::ModelFootprint;
use tessera_format::{ModelConfig, ModelLocation, TensorKey, open_weights};
use tessera_text::Frontend;
use tessera_text::tokenizer::ChatMessage;

use crate::model::Scratch;

/// Layers whose tensors are read (a fuzzed configuration may declare millions).
const LAYERS_READ: usize = 2;

/// A GGUF file: opened, its configuration and footprint computed, its tensors read at the
/// shapes the configuration implies, and its tokenizer and chat template built and used.
pub fn gguf(data: &[u8]) {
    let scratch = Scratch::new();
    let path = scratch.write("model.gguf", data);
    read_model(&ModelLocation::Gguf(path));
}

/// A checkpoint directory: the input is `[n: u16 LE][config.json: n bytes][tokenizer.json
/// length: u16 LE][tokenizer.json][model.safetensors: the rest]`, each file written when its
/// part is present; then as [`gguf`].
pub fn safetensors(data: &[u8]) {
    let scratch = Scratch::new();
    let (config, rest) = take_prefixed(data);
    let (tokenizer, weights) = take_prefixed(rest);
    scratch.write("config.json", config);
    if !tokenizer.is_empty() {
        scratch.write("tokenizer.json", tokenizer);
    }
    scratch.write("model.safetensors", weights);
    read_model(&ModelLocation::HfDir(scratch.path().to_owned()));
}

/// The part of `data` its u16 LE length prefix announces (clipped to what is there), and the
/// rest.
fn take_prefixed(data: &[u8]) -> (&[u8], &[u8]) {
    let [a, b, rest @ ..] = data else {
        return (&[], &[]);
    };
    let n = usize::from(u16::from_le_bytes([*a, *b])).min(rest.len());
    rest.split_at(n)
}

/// Everything a cluster does with a model's files before it computes.
fn read_model(location: &ModelLocation) {
    if let Ok((store, cfg)) = open_weights(location) {
        // The coordinator sizes shards from this; it must not overflow on any declared shape.
        let _ = ModelFootprint::from_store(store.as_ref(), &cfg);
        for (key, rows, cols) in tensors(&cfg) {
            if store.contains(key) {
                let _ = store.stored_bytes(key);
                let _ = store.stored_qtype(key);
                let _ = store.tensor(key, rows, cols);
            }
        }
    }
    if let Ok(frontend) = Frontend::open(location) {
        let _ = frontend.render_chat(&[
            ChatMessage::new("system", "Be brief."),
            ChatMessage::new("user", "Hello <|im_start|> ünïcödé"),
        ]);
        let tok = frontend.tokenizer();
        if let Ok(ids) = tok.encode("Hello world, ünïcödé 🦀 <|im_end|>", true, true) {
            let _ = tok.decode(&ids, false);
        }
        let _ = tok.decode(&[0, 1, 2, u32::MAX], true);
    }
}

/// The tensors of the first [`LAYERS_READ`] layers and the embedding and head, at the shapes
/// the model loader asks for.
fn tensors(cfg: &ModelConfig) -> Vec<(TensorKey, usize, usize)> {
    let (h, v) = (cfg.hidden, cfg.vocab_size);
    let (q, kv, ff) = (cfg.q_dim(), cfg.kv_dim(), cfg.intermediate);
    let mut out = vec![
        (TensorKey::TokenEmbd, v, h),
        (TensorKey::OutputNorm, 1, h),
        (TensorKey::Output, v, h),
    ];
    for l in 0..cfg.n_layers.min(LAYERS_READ) {
        out.extend([
            (TensorKey::AttnNorm(l), 1, h),
            (TensorKey::AttnQ(l), q, h),
            (TensorKey::AttnK(l), kv, h),
            (TensorKey::AttnV(l), kv, h),
            (TensorKey::AttnQBias(l), 1, q),
            (TensorKey::AttnKBias(l), 1, kv),
            (TensorKey::AttnVBias(l), 1, kv),
            (TensorKey::AttnOutput(l), h, q),
            (TensorKey::FfnNorm(l), 1, h),
            (TensorKey::FfnGate(l), ff, h),
            (TensorKey::FfnUp(l), ff, h),
            (TensorKey::FfnDown(l), h, ff),
        ]);
    }
    out
}
