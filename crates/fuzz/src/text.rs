//! The text targets: SmolLM2's tokenizer on any text or ids a client can send, and chat
//! templates — the model's own with any messages, and any template (a model file's metadata)
//! with fixed messages.

use tessera_text::tokenizer::{
    ChatMessage, ChatTemplate, IncrementalDecoder, Tokenizer, byte_to_char,
};

use crate::model::frontend;

/// The tokenizer: the first byte's bits choose the mode and flags, the rest is text (lossy
/// UTF-8) or, in ids mode, u16 LE token ids (some beyond the vocabulary).
///
/// Asserts: every id encoded is in the vocabulary; plain text (no specials added or parsed)
/// decodes back to itself, byte for byte (but for bytes without a token); the streaming decoder's deltas concatenate to the
/// whole decode, with and without special tokens; ids outside the vocabulary are refused.
pub fn tokenizer(data: &[u8]) {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let tok = frontend().tokenizer();
    if flags & 0x80 != 0 {
        let ids: Vec<u32> = rest
            .chunks_exact(2)
            .map(|c| u32::from(u16::from_le_bytes([c[0], c[1]])))
            .collect();
        let outside = ids.iter().any(|&i| i as usize >= tok.vocab_size());
        for skip in [false, true] {
            match tok.decode(&ids, skip) {
                Ok(text) => {
                    assert!(!outside, "an id outside the vocabulary is refused");
                    assert_eq!(streamed(tok, &ids, skip), text, "streaming decode agrees");
                }
                Err(_) => assert!(outside, "ids inside the vocabulary decode"),
            }
        }
        return;
    }
    let text = String::from_utf8_lossy(rest);
    let (add_special, parse_special) = (flags & 1 != 0, flags & 2 != 0);
    // A pre-tokenizer that gives up on pathological input is an error answer, not a crash.
    let Ok(ids) = tok.encode(&text, add_special, parse_special) else {
        return;
    };
    assert!(
        ids.iter().all(|&i| (i as usize) < tok.vocab_size()),
        "encoded ids are in the vocabulary"
    );
    let decoded = tok.decode(&ids, false).expect("encoded ids decode");
    if !add_special && !parse_special {
        // Lossless but for bytes the vocabulary has no token for (SmolLM2 lacks some control
        // bytes): those emit nothing, as in llama.cpp (found by this target: U+0016).
        let kept: Vec<u8> = text
            .bytes()
            .filter(|&b| tok.token_id(&byte_to_char(b).to_string()).is_some())
            .collect();
        // Decoding converts once at the end, lossily: a character that lost its lead byte
        // shows as U+FFFD, as in llama.cpp's detokenizer.
        assert_eq!(
            decoded,
            String::from_utf8_lossy(&kept),
            "byte-level BPE is lossless"
        );
    }
    for skip in [false, true] {
        let whole = tok.decode(&ids, skip).expect("encoded ids decode");
        assert_eq!(streamed(tok, &ids, skip), whole, "streaming decode agrees");
    }
}

/// `ids` through the streaming decoder, one at a time.
fn streamed(tok: &Tokenizer, ids: &[u32], skip_special: bool) -> String {
    let mut d = IncrementalDecoder::new(skip_special);
    let mut out: String = ids.iter().map(|&i| d.push(tok, i)).collect();
    out.push_str(&d.flush());
    out
}

/// Chat templates. First byte even: SmolLM2's template renders messages read from the rest
/// (fields separated by NUL: role, content, role, content…). Odd: the rest up to the first NUL
/// is a template, compiled and rendered with two fixed messages (what a model file's
/// `tokenizer.chat_template` can do to the process that loads it).
pub fn chat_template(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        let fields: Vec<String> = rest
            .split(|&b| b == 0)
            .map(|f| String::from_utf8_lossy(f).into_owned())
            .collect();
        let messages: Vec<ChatMessage> = fields
            .chunks(2)
            .map(|p| ChatMessage::new(p[0].clone(), p.get(1).cloned().unwrap_or_default()))
            .collect();
        if let Ok(text) = frontend().render_chat(&messages) {
            // Every message's content appears in the rendering: nothing is dropped or cut.
            for m in &messages {
                assert!(text.contains(&m.content), "the prompt holds every message");
            }
        }
        return;
    }
    let source = rest.split(|&b| b == 0).next().unwrap_or_default();
    let Ok(template) = ChatTemplate::new(&String::from_utf8_lossy(source), "<s>", "</s>") else {
        return;
    };
    let messages = [
        ChatMessage::new("system", "Be brief."),
        ChatMessage::new("user", "Hello"),
    ];
    let _ = template.render(&messages, true);
}
