//! The llama.cpp goldens of the real model (`tests/golden/*.json`, written by
//! `tests/golden/make_goldens.py` with llama-cpp-python) and helpers to read them, shared by
//! the test crates that judge the model against them (`golden_model`, `tensor_parallel`).

// Each test crate that includes this module reads a different subset of the goldens' fields.
#![allow(dead_code)]

use serde::Deserialize;

/// `logits.json`: llama.cpp's top-k logits at every position of each prompt.
#[derive(Deserialize)]
pub struct LogitsFile {
    /// The prompts.
    pub cases: Vec<LogitCase>,
}

/// One prompt of `logits.json`.
#[derive(Deserialize)]
pub struct LogitCase {
    /// The prompt text.
    pub prompt: String,
    /// Its token ids.
    pub ids: Vec<u32>,
    /// llama.cpp's top-k at each position of `ids`.
    pub positions: Vec<TopK>,
}

/// llama.cpp's top-k at one position, best first.
#[derive(Deserialize)]
pub struct TopK {
    /// Token ids, best first.
    pub ids: Vec<u32>,
    /// Their logits, rounded to 5 decimals.
    pub logits: Vec<f32>,
}

/// `greedy.json`: llama.cpp's greedy continuation of each prompt.
#[derive(Deserialize)]
pub struct GreedyFile {
    /// The prompts.
    pub cases: Vec<GreedyCase>,
}

/// One prompt of `greedy.json`.
#[derive(Deserialize)]
pub struct GreedyCase {
    /// The prompt text.
    pub prompt: String,
    /// Its token ids.
    pub prompt_ids: Vec<u32>,
    /// The continuation's token ids.
    pub tokens: Vec<u32>,
    /// Each continuation step's margin.
    pub steps: Vec<GreedyStep>,
}

/// One greedy step: llama.cpp's top-1/top-2 logit margin there.
#[derive(Deserialize)]
pub struct GreedyStep {
    /// llama.cpp's top-1 logit minus its top-2 logit.
    pub margin: f32,
}

/// Reads golden file `name` from `tests/golden/`.
///
/// # Panics
/// When it is missing or malformed.
pub fn golden<T: for<'de> Deserialize<'de>>(name: &str) -> T {
    let path = format!("{}/../../tests/golden/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Index of the largest value, lowest index on ties (as the golden script does).
pub use tessera_testkit::argmax;
