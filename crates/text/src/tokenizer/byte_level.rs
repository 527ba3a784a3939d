//! GPT-2's byte-level alphabet: every byte gets a printable Unicode character so that BPE can
//! work on text while still covering arbitrary bytes.
//!
//! Printable Latin-1 bytes (`!`..=`~`, `¡`..=`¬`, `®`..=`ÿ`) stand for themselves; the other 68
//! bytes (controls, space, DEL, NBSP, soft hyphen) are shifted, in byte order, to U+0100 onwards
//! (so space is `Ġ` U+0120 and newline `Ċ` U+010A). Vocabulary strings of byte-level BPE models
//! are written in this alphabet; [`decode_str`] turns them back into raw bytes.

/// Whether `b` is one of the bytes that stand for themselves.
const fn is_direct(b: u8) -> bool {
    matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF)
}

/// The alphabet, indexed by byte: the scalar value standing for that byte.
const BYTE_TO_CHAR: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut shifted = 0u32;
    let mut b = 0usize;
    while b < 256 {
        if is_direct(b as u8) {
            table[b] = b as u32;
        } else {
            table[b] = 256 + shifted;
            shifted += 1;
        }
        b += 1;
    }
    table
};

/// The inverse, indexed by scalar value below [`INVERSE_LEN`]; `u16::MAX` marks characters
/// outside the alphabet.
const INVERSE_LEN: usize = 324;
const CHAR_TO_BYTE: [u16; INVERSE_LEN] = {
    let mut table = [u16::MAX; INVERSE_LEN];
    let mut b = 0usize;
    while b < 256 {
        table[BYTE_TO_CHAR[b] as usize] = b as u16;
        b += 1;
    }
    table
};

/// The character that stands for byte `b`.
pub fn byte_to_char(b: u8) -> char {
    // Every table entry is below U+0144, a valid scalar value.
    char::from_u32(BYTE_TO_CHAR[b as usize]).unwrap_or('\u{FFFD}')
}

/// The byte that `c` stands for, or `None` when `c` is not in the alphabet.
pub fn char_to_byte(c: char) -> Option<u8> {
    let v = *CHAR_TO_BYTE.get(c as usize)?;
    u8::try_from(v).ok()
}

/// Appends the alphabet form of `bytes` to `out` (what BPE sees).
pub fn encode_into(bytes: &[u8], out: &mut String) {
    out.reserve(bytes.len() * 2);
    out.extend(bytes.iter().map(|&b| byte_to_char(b)));
}

/// The raw bytes a vocabulary string stands for, or `None` when it holds a character outside
/// the alphabet (llama.cpp then prints an `[UNK_BYTE_…]` marker; we let the caller decide).
pub fn decode_str(s: &str) -> Option<Vec<u8>> {
    s.chars().map(char_to_byte).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Ensures that the alphabet is a bijection from the 256 bytes onto 256 distinct characters.
    #[test]
    fn alphabet_is_a_bijection() {
        let mut seen = std::collections::HashSet::new();
        for b in 0..=255u8 {
            let c = byte_to_char(b);
            assert!(seen.insert(c), "byte {b} maps to a duplicate {c:?}");
            assert_eq!(char_to_byte(c), Some(b));
        }
        assert_eq!(char_to_byte('a'), Some(b'a'));
        assert_eq!(char_to_byte('\u{0144}'), None);
        assert_eq!(char_to_byte('中'), None);
    }

    /// Ensures that the well-known GPT-2 code points come out: space is Ġ, newline Ċ, tab ĉ.
    #[test]
    fn known_code_points() {
        assert_eq!(byte_to_char(b' '), 'Ġ');
        assert_eq!(byte_to_char(b'\n'), 'Ċ');
        assert_eq!(byte_to_char(b'\t'), 'ĉ');
        assert_eq!(byte_to_char(0), 'Ā');
        assert_eq!(byte_to_char(0x7F), 'ġ');
        assert_eq!(byte_to_char(0xAD), 'Ń');
        assert_eq!(byte_to_char(b'!'), '!');
    }

    proptest! {
        /// Ensures that any byte string survives encode then decode unchanged.
        #[test]
        fn round_trip(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut s = String::new();
            encode_into(&bytes, &mut s);
            prop_assert_eq!(s.chars().count(), bytes.len());
            prop_assert_eq!(decode_str(&s), Some(bytes));
        }
    }
}
