//! Tokenizer-level tests over a small synthetic GGUF vocabulary: metadata parsing, EOG
//! detection, decoding, and the incremental decoder's streaming guarantee.

use std::collections::HashMap;

use proptest::prelude::*;
use tessera_format::gguf_file::{Content, Value, VersionedMagic};

use super::*;

fn strings(v: &[&str]) -> Value {
    Value::Array(v.iter().map(|s| Value::String((*s).to_owned())).collect())
}

/// 256 byte tokens, then merges that build "😀" (F0 9F 98 80) as "F0 9F" + "98" + "80", and
/// "Ġhi"; then three control tokens.
fn toy_content() -> Content {
    let mut tokens: Vec<String> = (0..=255u8)
        .map(|b| byte_level::byte_to_char(b).to_string())
        .collect();
    let enc = |bytes: &[u8]| {
        let mut s = String::new();
        byte_level::encode_into(bytes, &mut s);
        s
    };
    let pair = enc(&[0xF0, 0x9F]);
    tokens.push(pair.clone()); // 256
    tokens.push("Ġh".into()); // 257
    tokens.push("Ġhi".into()); // 258
    tokens.push("<|im_start|>".into()); // 259
    tokens.push("<|im_end|>".into()); // 260
    tokens.push("<|endoftext|>".into()); // 261
    let mut types = vec![1i32; tokens.len()];
    types[259..].fill(3);
    let mut chars = pair.chars();
    let (a, b) = (chars.next().unwrap_or(' '), chars.next().unwrap_or(' '));
    let merges = [format!("{a} {b}"), "Ġ h".into(), "Ġh i".into()];
    let mut md = HashMap::new();
    md.insert("tokenizer.ggml.model".into(), Value::String("gpt2".into()));
    md.insert("tokenizer.ggml.pre".into(), Value::String("smollm".into()));
    let tok_refs: Vec<&str> = tokens.iter().map(String::as_str).collect();
    md.insert("tokenizer.ggml.tokens".into(), strings(&tok_refs));
    md.insert(
        "tokenizer.ggml.token_type".into(),
        Value::Array(types.into_iter().map(Value::I32).collect()),
    );
    let merge_refs: Vec<&str> = merges.iter().map(String::as_str).collect();
    md.insert("tokenizer.ggml.merges".into(), strings(&merge_refs));
    md.insert("tokenizer.ggml.bos_token_id".into(), Value::U32(259));
    md.insert("tokenizer.ggml.eos_token_id".into(), Value::U32(260));
    md.insert("tokenizer.ggml.add_bos_token".into(), Value::Bool(false));
    md.insert(
        "tokenizer.chat_template".into(),
        Value::String("{{ bos_token }}".into()),
    );
    Content {
        magic: VersionedMagic::GgufV3,
        metadata: md,
        tensor_infos: HashMap::new(),
        tensor_data_offset: 0,
    }
}

fn toy() -> Tokenizer {
    Tokenizer::from_gguf(&toy_content()).expect("toy vocabulary loads")
}

/// Ensures that the metadata is read: sizes, BOS/EOS, EOG set, template, lookups.
#[test]
fn gguf_metadata() {
    let t = toy();
    assert_eq!(t.vocab_size(), 262);
    assert_eq!((t.bos_id(), t.eos_id()), (Some(259), Some(260)));
    assert_eq!(t.eog_ids(), [260, 261]);
    assert!(t.is_eog(261) && !t.is_eog(259));
    assert!(t.is_special(259) && !t.is_special(258));
    assert_eq!(t.chat_template(), Some("{{ bos_token }}"));
    assert_eq!(t.token_id("Ġhi"), Some(258));
    assert_eq!(t.token_text(258), Some("Ġhi"));
    assert_eq!(t.token_bytes(258), Some(&b" hi"[..]));
    assert_eq!(t.token_bytes(259), Some(&b"<|im_start|>"[..]));
    assert_eq!(t.token_bytes(262), None);
}

/// Ensures that missing keys and unknown pre-tokenizers are typed errors naming the problem.
#[test]
fn gguf_errors_name_the_key() {
    let mut c = toy_content();
    c.metadata.remove("tokenizer.ggml.tokens");
    let err = Tokenizer::from_gguf(&c).expect_err("no tokens");
    assert!(
        matches!(
            err,
            TokenizerError::MissingMetadata {
                key: "tokenizer.ggml.tokens"
            }
        ),
        "{err}"
    );
    let mut c = toy_content();
    c.metadata
        .insert("tokenizer.ggml.pre".into(), Value::String("nope".into()));
    let err = Tokenizer::from_gguf(&c).expect_err("bad pre");
    assert!(
        err.to_string().contains("nope") && err.to_string().contains("llama3"),
        "{err}"
    );
    let mut c = toy_content();
    c.metadata
        .insert("tokenizer.ggml.model".into(), Value::String("llama".into()));
    assert!(matches!(
        Tokenizer::from_gguf(&c),
        Err(TokenizerError::UnsupportedModel { .. })
    ));
}

/// Ensures that the emoji is split over three tokens, and special text is parsed only on request.
#[test]
fn encode_toy() {
    let t = toy();
    assert_eq!(
        t.encode("😀", false, true).expect("encode"),
        [256, 0x98, 0x80]
    );
    assert_eq!(
        t.encode("<|im_start|> hi", false, true).expect("encode"),
        [259, 258]
    );
    let plain = t.encode("<|im_start|>", false, false).expect("encode");
    assert_eq!(t.decode(&plain, false).expect("decode"), "<|im_start|>");
    assert!(plain.len() > 1);
}

/// Ensures that decode keeps or hides control tokens and rejects out-of-range ids.
#[test]
fn decode_special_and_range() {
    let t = toy();
    assert_eq!(
        t.decode(&[259, 258, 260], false).expect("decode"),
        "<|im_start|> hi<|im_end|>"
    );
    assert_eq!(t.decode(&[259, 258, 260], true).expect("decode"), " hi");
    assert!(matches!(
        t.decode(&[9999], false),
        Err(TokenizerError::TokenOutOfRange { id: 9999, .. })
    ));
    // A lone continuation byte is invalid: lossy only at the end.
    assert_eq!(
        t.decode(&[0x80, u32::from(b'a')], false).expect("decode"),
        "\u{FFFD}a"
    );
}

/// Ensures that an emoji split over three tokens streams as nothing, nothing, then the emoji.
#[test]
fn incremental_emoji_split() {
    let t = toy();
    let mut d = IncrementalDecoder::new(false);
    assert_eq!(d.push(&t, 258), " hi");
    assert_eq!(d.push(&t, 256), "");
    assert_eq!(d.push(&t, 0x98), "");
    assert_eq!(d.push(&t, 0x80), "😀");
    assert_eq!(d.flush(), "");
}

/// Ensures that a sequence that can never complete is replaced as soon as that is known, and
/// a dangling prefix is replaced at flush.
#[test]
fn incremental_invalid_bytes() {
    let t = toy();
    let mut d = IncrementalDecoder::new(false);
    assert_eq!(d.push(&t, 0xF0), "");
    assert_eq!(d.push(&t, u32::from(b'x')), "\u{FFFD}x");
    assert_eq!(d.push(&t, 0xE4), "");
    assert_eq!(d.flush(), "\u{FFFD}");
}

fn stream(t: &Tokenizer, ids: &[u32], skip: bool) -> (Vec<String>, String) {
    let mut d = IncrementalDecoder::new(skip);
    let mut deltas: Vec<String> = ids.iter().map(|&id| d.push(t, id)).collect();
    deltas.push(d.flush());
    let all = deltas.concat();
    (deltas, all)
}

proptest! {
    /// Ensures that for any text, streaming its ids yields deltas with no replacement
    /// character (never a broken sequence) that concatenate to the text and to decode().
    #[test]
    fn incremental_text_round_trip(text in "(\\PC|😀|👍🏽| hi|<\\|im_start\\|>){0,24}") {
        let t = toy();
        let ids = t.encode(&text, false, true).expect("encode");
        let (deltas, all) = stream(&t, &ids, false);
        for d in &deltas {
            let broken = d.contains(char::REPLACEMENT_CHARACTER)
                && !text.contains(char::REPLACEMENT_CHARACTER);
            prop_assert!(!broken, "broken delta {:?}", d);
        }
        prop_assert_eq!(&all, &text);
        prop_assert_eq!(all, t.decode(&ids, false).expect("decode"));
    }

    /// Ensures that for any id sequence (including invalid byte runs and control tokens) the
    /// deltas plus flush equal decode(), with and without skipping specials.
    #[test]
    fn incremental_matches_decode(ids in proptest::collection::vec(0u32..262, 0..40), skip in any::<bool>()) {
        let t = toy();
        let (_, all) = stream(&t, &ids, skip);
        prop_assert_eq!(all, t.decode(&ids, skip).expect("decode"));
    }
}

/// Ensures that a tokenizer can be shared across threads (the coordinator holds one in an Arc).
#[test]
fn tokenizer_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Tokenizer>();
    assert_send_sync::<ChatTemplate>();
    let t = std::sync::Arc::new(toy());
    let handles: Vec<_> = (0..2)
        .map(|_| {
            let t = std::sync::Arc::clone(&t);
            std::thread::spawn(move || t.encode(" hi😀", false, true).expect("encode"))
        })
        .collect();
    for h in handles {
        assert_eq!(h.join().expect("thread"), [258, 256, 0x98, 0x80]);
    }
}

/// Ensures that long degenerate inputs (one huge word, whitespace or digit runs) neither hit
/// the regex engine's backtracking limit nor lose text.
#[test]
fn pathological_inputs_round_trip() {
    let t = toy();
    let n = 100_000;
    let inputs = [
        "a".repeat(n),
        " ".repeat(n),
        "\n".repeat(n),
        "7".repeat(n),
        "!".repeat(n),
        format!("{}x", " \t".repeat(n / 2)),
        "😀".repeat(n / 4),
    ];
    for text in &inputs {
        let ids = t
            .encode(text, false, true)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(&t.decode(&ids, false).expect("decode"), text);
    }
}
