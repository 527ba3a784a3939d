//! The GGUF tokenizer against llama.cpp's goldens (tests/golden/tokens.json, made by
//! tests/golden/make_goldens.py with llama-cpp-python): identical ids for every string, the
//! same detokenized text, and incremental decoding that streams exactly that text.

use std::path::PathBuf;
use std::sync::OnceLock;

use candle_core::quantized::gguf_file::Content;
use proptest::prelude::*;
use serde::Deserialize;
use tessera_text::tokenizer::{IncrementalDecoder, Tokenizer};

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
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()))
}

fn smollm2() -> Option<Tokenizer> {
    let path = tessera_testkit::smollm2_gguf()?;
    let mut file =
        std::fs::File::open(&path).unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    let content =
        Content::read(&mut file).unwrap_or_else(|e| panic!("reading GGUF {}: {e}", path.display()));
    Some(
        Tokenizer::from_gguf(&content)
            .unwrap_or_else(|e| panic!("tokenizer from {}: {e}", path.display())),
    )
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
            let text = tok
                .decode(&case.ids, skip)
                .expect("golden ids are in the vocabulary");
            if &text != want {
                failures.push(format!(
                    "case {i} decode(skip={skip}): ours {text:?}, llama {want:?}"
                ));
            }
            let mut dec = IncrementalDecoder::new(skip);
            let mut streamed: String = case.ids.iter().map(|&id| dec.push(&tok, id)).collect();
            streamed.push_str(&dec.flush());
            if streamed != text {
                failures.push(format!(
                    "case {i} stream(skip={skip}): {streamed:?} != decode {text:?}"
                ));
            }
        }
        // Round trip: decoding the ids of plain text gives the text back.
        if case.parse_special && case.decoded != case.text {
            failures.push(format!(
                "case {i}: llama.cpp's decode {:?} is not the input",
                case.decoded
            ));
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
    assert!(
        tok.chat_template()
            .is_some_and(|t| t.contains("<|im_start|>"))
    );
    assert_eq!(
        tok.encode("hi", true, true).expect("encode"),
        tok.encode("hi", false, true).expect("encode")
    );
}

/// The SmolLM2 tokenizer, loaded once for the property tests.
fn shared() -> Option<&'static Tokenizer> {
    static TOK: OnceLock<Option<Tokenizer>> = OnceLock::new();
    TOK.get_or_init(smollm2).as_ref()
}

/// Ensures that a large mixed text (code, prose, CJK, emoji, digits) round-trips through
/// encode and decode, and reports the encoder's throughput (dev profile, so a floor only).
#[test]
fn smollm2_large_round_trip() {
    let Some(tok) = shared() else { return };
    let unit = "fn main() {\n    let x = 42_000; // Größe 😀👍🏽\n}\n日本語のテキスト、 Ünïcödé;  \t tabs\n\
                The quick brown fox jumps over the lazy dog 1234567890 times. ";
    let text = unit.repeat(2000);
    let start = std::time::Instant::now();
    let ids = tok.encode(&text, false, true).expect("encode");
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "encoded {} bytes into {} tokens in {secs:.3} s ({:.2} MB/s)",
        text.len(),
        ids.len(),
        text.len() as f64 / secs / 1e6
    );
    assert_eq!(tok.decode(&ids, false).expect("decode"), text);
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 128,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// Ensures that for random UTF-8 text the real model's ids stream as deltas that never
    /// contain a broken character and concatenate to the text and to decode().
    #[test]
    fn smollm2_stream_random_text(text in "(\\PC|👨‍👩‍👧|🇫🇷|\\s|<\\|im_end\\|>){0,40}") {
        let Some(tok) = shared() else { return Ok(()) };
        let ids = tok.encode(&text, false, true).expect("encode");
        let mut dec = IncrementalDecoder::new(false);
        let mut all = String::new();
        for &id in &ids {
            let delta = dec.push(tok, id);
            let broken = delta.contains(char::REPLACEMENT_CHARACTER)
                && !text.contains(char::REPLACEMENT_CHARACTER);
            prop_assert!(!broken, "broken delta {:?}", delta);
            all.push_str(&delta);
        }
        all.push_str(&dec.flush());
        prop_assert_eq!(&all, &text);
        prop_assert_eq!(all, tok.decode(&ids, false).expect("decode"));
    }
}
