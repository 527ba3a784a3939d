//! Streaming detokenization: text for a growing list of ids, never splitting a UTF-8 sequence.
//!
//! Tokens are byte strings, and one character (an emoji, a CJK ideograph) is often spread over
//! several tokens. The decoder keeps the bytes of an incomplete trailing sequence until later
//! tokens complete it. Bytes that can never become valid are replaced by U+FFFD exactly where
//! `String::from_utf8_lossy` of the whole stream would put them, so the concatenation of every
//! delta and the final [`IncrementalDecoder::flush`] equals [`super::Tokenizer::decode`].

use super::Tokenizer;

/// Streams text for a growing list of ids; see the module docs for the guarantee.
#[derive(Debug, Clone, Default)]
pub struct IncrementalDecoder {
    skip_special: bool,
    /// Bytes not yet emitted: at most an incomplete UTF-8 sequence between calls.
    pending: Vec<u8>,
}

impl IncrementalDecoder {
    /// A decoder that, like `decode(ids, skip_special)`, leaves out control tokens when
    /// `skip_special` is true.
    pub fn new(skip_special: bool) -> Self {
        Self {
            skip_special,
            pending: Vec::with_capacity(8),
        }
    }

    /// Adds token `id` and returns the text it completes (possibly empty). An id outside the
    /// vocabulary contributes nothing (`decode` would reject it).
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> String {
        if self.skip_special && tok.vocab.is_hidden_special(id) {
            return String::new();
        }
        let Some(piece) = tok.token_bytes(id) else {
            return String::new();
        };
        if self.pending.is_empty() {
            // Fast path: a whole-character token with nothing held back.
            if let Ok(s) = std::str::from_utf8(piece) {
                return s.to_owned();
            }
        }
        self.pending.extend_from_slice(piece);
        let mut out = String::new();
        let mut consumed = 0;
        for chunk in self.pending.utf8_chunks() {
            let invalid = chunk.invalid();
            let end = consumed + chunk.valid().len() + invalid.len();
            if !invalid.is_empty() && end == self.pending.len() && could_complete(invalid) {
                // Possibly the start of a character whose other bytes are still to come.
                out.push_str(chunk.valid());
                consumed += chunk.valid().len();
                break;
            }
            out.push_str(chunk.valid());
            if !invalid.is_empty() {
                out.push(char::REPLACEMENT_CHARACTER);
            }
            consumed = end;
        }
        self.pending.drain(..consumed);
        out
    }

    /// Ends the stream: whatever is still held back, as U+FFFD.
    pub fn flush(&mut self) -> String {
        let out = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        out
    }
}

/// Whether `bytes`, found at the end of the stream, are a proper prefix of some UTF-8
/// sequence (so more bytes could make them valid).
fn could_complete(bytes: &[u8]) -> bool {
    let Some(&lead) = bytes.first() else {
        return false;
    };
    let need = match lead {
        0xC2..=0xDF => 2,
        0xE0..=0xEF => 3,
        0xF0..=0xF4 => 4,
        _ => return false,
    };
    if bytes.len() >= need {
        return false;
    }
    // Validate the prefix by padding it with the smallest continuation that might fit.
    let mut probe = [0u8; 4];
    probe[..bytes.len()].copy_from_slice(bytes);
    for lo in 0x80..=0xBFu8 {
        for slot in probe.iter_mut().take(need).skip(bytes.len()) {
            *slot = lo;
        }
        if std::str::from_utf8(&probe[..need]).is_ok() {
            return true;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ensures that could_complete accepts real prefixes and rejects impossible ones.
    #[test]
    fn prefix_detection() {
        assert!(could_complete(&[0xF0, 0x9F]));
        assert!(could_complete(&[0xE4]));
        assert!(!could_complete(&[0x80]));
        assert!(!could_complete(&[0xE0, 0x80])); // overlong, can never be valid
        assert!(!could_complete(&[0xED, 0xA0])); // surrogate
        assert!(!could_complete(&[0xF5]));
    }
}
