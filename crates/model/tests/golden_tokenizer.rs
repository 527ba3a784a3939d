//! The GGUF tokenizer against llama.cpp's goldens (tests/golden/tokens.json, made by
//! tests/golden/make_goldens.py with llama-cpp-python): identical ids for every string, the
//! same detokenized text, and incremental decoding that streams exactly that text.

use std::path::PathBuf;

use candle_core::quantized::gguf_file::Content;
use serde::Deserialize;
use tessera_model::tokenizer::{IncrementalDecoder, Tokenizer};

#[derive(Deserialize)]
struct Golden {
    llama_cpp_python: String,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    text: String,
    parse_special: bool,
    ids: Vec<u32>,
    decoded: String,
    decoded_skip_special: String,
}

fn golden() -> Golden {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/golden/tokens.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()))
}

fn smollm2() -> Option<Tokenizer> {
    let path = tessera_model::testing::smollm2_gguf()?;
    let mut file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    let content = Content::read(&mut file).unwrap_or_else(|e| panic!("reading GGUF {}: {e}", path.display()));
    Some(Tokenizer::from_gguf(&content).unwrap_or_else(|e| panic!("tokenizer from {}: {e}", path.display())))
}

/// Ensures that every golden string tokenizes to llama.cpp's ids, and that decoding those ids
/// (with and without special tokens) and streaming them give llama.cpp's text.
#[test]
fn smollm2_matches_llama_cpp() {
    let Some(tok) = smollm2() else { return };
    let golden = golden();
    assert!(golden.cases.len() >= 30, "too few golden strings");
    let mut failures = Vec::new();
    for (i, case) in golden.cases.iter().enumerate() {
        let ids = match tok.encode(&case.text, false, case.parse_special) {
            Ok(ids) => ids,
            Err(e) => {
                failures.push(format!("case {i} {:?}: encode failed: {e}", case.text));
                continue;
            }
        };
        if ids != case.ids {
            failures.push(format!(
                "case {i} {:?} (parse_special={}):\n  ours  {ids:?}\n  llama {:?}",
                case.text, case.parse_special, case.ids
            ));
        }
        for (skip, want) in [(false, &case.decoded), (true, &case.decoded_skip_special)] {
            let text = tok.decode(&case.ids, skip).expect("golden ids are in the vocabulary");
            if &text != want {
                failures.push(format!("case {i} decode(skip={skip}): ours {text:?}, llama {want:?}"));
            }
            let mut dec = IncrementalDecoder::new(skip);
            let mut streamed: String = case.ids.iter().map(|&id| dec.push(&tok, id)).collect();
            streamed.push_str(&dec.flush());
            if streamed != text {
                failures.push(format!("case {i} stream(skip={skip}): {streamed:?} != decode {text:?}"));
            }
        }
        // Round trip: decoding the ids of plain text gives the text back.
        if case.parse_special && case.decoded != case.text {
            failures.push(format!("case {i}: llama.cpp's decode {:?} is not the input", case.decoded));
        }
    }
    assert!(
        failures.is_empty(),
        "{} mismatches against llama-cpp-python {}:\n{}",
        failures.len(),
        golden.llama_cpp_python,
        failures.join("\n")
    );
}

/// Ensures that SmolLM2's special ids and end-of-generation set are llama.cpp's.
#[test]
fn smollm2_special_ids() {
    let Some(tok) = smollm2() else { return };
    assert_eq!(tok.vocab_size(), 49152);
    assert_eq!(tok.bos_id(), Some(1));
    assert_eq!(tok.eos_id(), Some(2));
    assert!(!tok.add_bos());
    assert_eq!(tok.eog_ids(), [0, 2]);
    assert_eq!(tok.token_id("<|im_end|>"), Some(2));
    assert!(tok.is_special(1) && tok.is_eog(2) && !tok.is_eog(1));
    assert!(tok.chat_template().is_some_and(|t| t.contains("<|im_start|>")));
    assert_eq!(tok.encode("hi", true, true).expect("encode"), tok.encode("hi", false, true).expect("encode"));
}
