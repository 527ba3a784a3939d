//! The sentence-transformers goldens of all-MiniLM-L6-v2 (`tests/golden/minilm/`, written by
//! `tests/golden/make_embedding_goldens.py`) and the measure tests judge embeddings by.

use std::path::PathBuf;

use serde_json::Value;

/// One golden sentence.
#[derive(Clone, Debug)]
pub struct EmbeddingCase {
    /// The input text.
    pub text: String,
    /// Its token ids as sentence-transformers fed them to the model (truncated to 256).
    pub ids: Vec<u32>,
    /// Whether the text was longer than the model's limit.
    pub truncated: bool,
    /// `model.encode(text)`: the normalized 384-dim embedding, f32.
    pub embedding: Vec<f32>,
}

/// The repository's `tests/golden/minilm/` directory.
pub fn minilm_golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/golden/minilm")
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(Value::as_f64)
                .map(|x| x as f32)
                .collect()
        })
        .unwrap_or_default()
}

/// The 64 golden sentences of `embeddings.json`.
///
/// # Panics
/// When the file is missing or not in the script's format (a broken checkout).
pub fn minilm_golden() -> Vec<EmbeddingCase> {
    let path = minilm_golden_dir().join("embeddings.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let v: Value = serde_json::from_str(&text).expect("embeddings.json is JSON");
    v["cases"]
        .as_array()
        .expect("embeddings.json has cases")
        .iter()
        .map(|c| EmbeddingCase {
            text: c["text"].as_str().expect("text").to_owned(),
            ids: c["ids"]
                .as_array()
                .expect("ids")
                .iter()
                .map(|i| i.as_u64().expect("id") as u32)
                .collect(),
            truncated: c["truncated"].as_bool().unwrap_or(false),
            embedding: floats(&c["embedding"]),
        })
        .collect()
}

/// The cosine similarity of two vectors, in f64.
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "cosine of vectors of different lengths");
    let dot: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum();
    let na: f64 = a.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}
