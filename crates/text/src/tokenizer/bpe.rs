//! Byte-level BPE as llama.cpp runs it for `tokenizer.ggml.model = gpt2`: special tokens are cut
//! out first (`tokenizer_st_partition`), the rest is split by the pre-tokenizer, each word is
//! mapped to the byte-level alphabet and merged by rank.
//!
//! Merging works on token ids: a `(left, right) -> (rank, merged)` map and a min-heap of
//! candidate pairs ordered by (rank, left position), with stale entries skipped on pop, so a
//! word of n characters costs O(n log n) and nothing is cached between calls.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::ops::Range;

use super::TokenizerError;
use super::byte_level;
use super::pretokenize::PreTokenizer;
use super::vocab::{TokenType, Vocab};

/// Marks a symbol whose text is not in the vocabulary; it never merges and emits nothing,
/// as in llama.cpp.
const NO_TOKEN: u32 = u32::MAX;

/// The merge rules and pre-tokenizer of a byte-level BPE vocabulary.
#[derive(Debug)]
pub struct BpeModel {
    /// `(left id, right id) -> (rank, merged id)`.
    merges: HashMap<(u32, u32), (u32, u32)>,
    pre: PreTokenizer,
    /// Control, user-defined and unknown tokens, longest text first.
    specials: Vec<u32>,
}

/// A piece of the input after special-token partitioning.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Fragment {
    Text(Range<usize>),
    Token(u32),
}

#[derive(Debug, Clone, Copy)]
struct Symbol {
    id: u32,
    prev: u32,
    next: u32,
}

const NONE: u32 = u32::MAX;

/// A merge candidate: (rank, left position, right position, left id, right id). Ordering by
/// the tuple gives llama.cpp's priority: lowest rank, then leftmost.
type Candidate = (u32, u32, u32, u32, u32);

impl BpeModel {
    /// Builds the merge map from ranked `"left right"` strings.
    ///
    /// Rules whose halves or result are not tokens cannot fire on id symbols and are dropped
    /// (a well-formed vocabulary has none); their count is logged.
    ///
    /// # Errors
    /// [`TokenizerError::InvalidMetadata`] naming `tokenizer.ggml.merges` for a rule with no
    /// separating space.
    pub fn new<'a>(
        vocab: &Vocab,
        merges: impl IntoIterator<Item = &'a str>,
        pre: PreTokenizer,
    ) -> Result<Self, TokenizerError> {
        let mut map = HashMap::new();
        let mut dropped = 0usize;
        for (rank, rule) in merges.into_iter().enumerate() {
            // Like llama.cpp, search from the second byte so a rule may start with a space.
            let split = rule
                .char_indices()
                .skip(1)
                .find(|&(_, c)| c == ' ')
                .map(|(i, _)| i)
                .ok_or_else(|| TokenizerError::InvalidMetadata {
                    key: "tokenizer.ggml.merges",
                    reason: format!("rule {rank} {rule:?} has no space between its halves"),
                })?;
            let (left, right) = (&rule[..split], &rule[split + 1..]);
            let ids = (
                vocab.text_to_id.get(left),
                vocab.text_to_id.get(right),
                vocab.text_to_id.get(&format!("{left}{right}")),
            );
            match ids {
                (Some(&l), Some(&r), Some(&m)) => {
                    let rank = u32::try_from(rank).unwrap_or(u32::MAX);
                    map.entry((l, r)).or_insert((rank, m));
                }
                _ => dropped += 1,
            }
        }
        if dropped > 0 {
            tracing::warn!(
                dropped,
                "BPE merge rules over strings that are not tokens were ignored"
            );
        }
        let mut specials: Vec<u32> = (0..vocab.len() as u32)
            .filter(|&id| vocab.is_special(id))
            .collect();
        specials.sort_by_key(|&id| Reverse(vocab.texts[id as usize].len()));
        Ok(Self {
            merges: map,
            pre,
            specials,
        })
    }

    /// Tokenizes `text`; see [`super::Tokenizer::encode`].
    ///
    /// # Errors
    /// [`TokenizerError::Regex`] if the pre-tokenizer's regex engine gives up.
    pub fn encode(
        &self,
        vocab: &Vocab,
        text: &str,
        add_special: bool,
        parse_special: bool,
    ) -> Result<Vec<u32>, TokenizerError> {
        let mut out = Vec::with_capacity(text.len() / 3 + 2);
        if add_special && vocab.add_bos {
            out.extend(vocab.bos);
        }
        let mut mapped = String::new();
        for frag in self.partition(vocab, text, parse_special) {
            match frag {
                Fragment::Token(id) => out.push(id),
                Fragment::Text(range) => {
                    let piece = &text[range];
                    for word in self.pre.split(piece)? {
                        mapped.clear();
                        byte_level::encode_into(piece[word].as_bytes(), &mut mapped);
                        self.merge_word(vocab, &mapped, &mut out);
                    }
                }
            }
        }
        if add_special && vocab.add_eos {
            out.extend(vocab.eos);
        }
        Ok(out)
    }

    /// Cuts special-token text out of `text`, longest special first, like llama.cpp's
    /// `tokenizer_st_partition`. Without `parse_special` only user-defined tokens are cut.
    fn partition(&self, vocab: &Vocab, text: &str, parse_special: bool) -> Vec<Fragment> {
        let mut frags = Vec::new();
        if text.is_empty() {
            return frags;
        }
        frags.push(Fragment::Text(0..text.len()));
        let mut next = Vec::new();
        for &id in &self.specials {
            let ty = vocab.types[id as usize];
            if !parse_special && matches!(ty, TokenType::Control | TokenType::Unknown) {
                continue;
            }
            let needle = vocab.texts[id as usize].as_str();
            if needle.is_empty() || !text.contains(needle) {
                continue;
            }
            next.clear();
            for frag in frags.drain(..) {
                let Fragment::Text(range) = frag else {
                    next.push(frag);
                    continue;
                };
                let mut start = range.start;
                while let Some(pos) = text[start..range.end].find(needle) {
                    let at = start + pos;
                    if at > start {
                        next.push(Fragment::Text(start..at));
                    }
                    next.push(Fragment::Token(id));
                    start = at + needle.len();
                }
                if start < range.end {
                    next.push(Fragment::Text(start..range.end));
                }
            }
            std::mem::swap(&mut frags, &mut next);
        }
        frags
    }

    /// Merges one pre-tokenized word (already in the byte-level alphabet) and appends its ids.
    fn merge_word(&self, vocab: &Vocab, word: &str, out: &mut Vec<u32>) {
        if self.pre.kind().ignore_merges()
            && let Some(&id) = vocab.text_to_id.get(word)
        {
            out.push(id);
            return;
        }
        let mut buf = [0u8; 4];
        let mut syms: Vec<Symbol> = word
            .chars()
            .enumerate()
            .map(|(i, c)| Symbol {
                id: vocab
                    .text_to_id
                    .get(c.encode_utf8(&mut buf) as &str)
                    .copied()
                    .unwrap_or(NO_TOKEN),
                prev: if i == 0 { NONE } else { i as u32 - 1 },
                next: i as u32 + 1,
            })
            .collect();
        if let Some(last) = syms.last_mut() {
            last.next = NONE;
        }
        let mut heap: BinaryHeap<Reverse<Candidate>> = BinaryHeap::new();
        let push = |heap: &mut BinaryHeap<_>, syms: &[Symbol], l: u32, r: u32| {
            if l == NONE || r == NONE {
                return;
            }
            let (a, b) = (syms[l as usize].id, syms[r as usize].id);
            if let Some(&(rank, _)) = self.merges.get(&(a, b)) {
                heap.push(Reverse((rank, l, r, a, b)));
            }
        };
        for i in 1..syms.len() as u32 {
            push(&mut heap, &syms, i - 1, i);
        }
        while let Some(Reverse((_, l, r, a, b))) = heap.pop() {
            let (ls, rs) = (syms[l as usize], syms[r as usize]);
            // Stale: one side merged since (ids changed) or the pair is no longer adjacent.
            if ls.id != a || rs.id != b || ls.next != r {
                continue;
            }
            let Some(&(_, merged)) = self.merges.get(&(a, b)) else {
                continue;
            };
            syms[l as usize].id = merged;
            syms[l as usize].next = rs.next;
            syms[r as usize].id = NO_TOKEN;
            syms[r as usize].prev = NONE;
            if rs.next != NONE {
                syms[rs.next as usize].prev = l;
            }
            let prev = syms[l as usize].prev;
            push(&mut heap, &syms, prev, l);
            push(&mut heap, &syms, l, rs.next);
        }
        let mut i = if syms.is_empty() { NONE } else { 0 };
        while i != NONE {
            let s = syms[i as usize];
            if s.id != NO_TOKEN {
                out.push(s.id);
            }
            i = s.next;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::pretokenize::PreKind;

    /// A toy byte-level vocabulary: all 256 byte characters, then `extra` strings.
    fn toy(extra: &[&str], types: &[(usize, TokenType)]) -> Vocab {
        let mut texts: Vec<String> = (0..=255u8)
            .map(|b| byte_level::byte_to_char(b).to_string())
            .collect();
        texts.extend(extra.iter().map(|s| s.to_string()));
        let pieces = texts
            .iter()
            .map(|t| byte_level::decode_str(t).unwrap_or_else(|| t.as_bytes().to_vec()))
            .collect();
        let mut tys = vec![TokenType::Normal; texts.len()];
        for &(i, t) in types {
            tys[256 + i] = t;
        }
        Vocab::finish(texts, pieces, tys, &[]).expect("valid toy vocab")
    }

    fn model(vocab: &Vocab, merges: &[&str]) -> BpeModel {
        let pre = PreTokenizer::new(PreKind::Gpt2).expect("compile");
        BpeModel::new(vocab, merges.iter().copied(), pre).expect("valid merges")
    }

    fn text_of(v: &Vocab, ids: &[u32]) -> Vec<String> {
        ids.iter().map(|&i| v.texts[i as usize].clone()).collect()
    }

    /// Ensures that merges fire by rank, not by position: "abc" with rank(b c) < rank(a b)
    /// gives "a" + "bc", and with the ranks swapped gives "ab" + "c".
    #[test]
    fn merge_order_follows_rank() {
        let v = toy(&["ab", "bc", "abc"], &[]);
        let m = model(&v, &["b c", "a b", "ab c"]);
        assert_eq!(
            text_of(&v, &m.encode(&v, "abc", false, false).expect("encode")),
            ["a", "bc"]
        );
        let m = model(&v, &["a b", "b c", "ab c"]);
        assert_eq!(
            text_of(&v, &m.encode(&v, "abc", false, false).expect("encode")),
            ["abc"]
        );
    }

    /// Ensures that equal-rank candidates merge leftmost first ("aaa" -> "aa" + "a").
    #[test]
    fn ties_merge_leftmost() {
        let v = toy(&["aa"], &[]);
        let m = model(&v, &["a a"]);
        assert_eq!(
            text_of(&v, &m.encode(&v, "aaa", false, false).expect("encode")),
            ["aa", "a"]
        );
        assert_eq!(
            text_of(&v, &m.encode(&v, "aaaa", false, false).expect("encode")),
            ["aa", "aa"]
        );
    }

    /// Ensures that a merge applies through the byte-level alphabet (space is Ġ).
    #[test]
    fn merges_see_byte_level_text() {
        let v = toy(&["Ġh", "Ġhi"], &[]);
        let m = model(&v, &["Ġ h", "Ġh i"]);
        let ids = m.encode(&v, "a hi", false, false).expect("encode");
        assert_eq!(text_of(&v, &ids), ["a", "Ġhi"]);
    }

    /// Ensures that special tokens are cut out whole only with parse_special (control) and
    /// always (user-defined), longest first.
    #[test]
    fn special_token_splitting() {
        // 256: control "<s>", 257: control "<s><s>", 258: user-defined "@@".
        let v = toy(
            &["<s>", "<s><s>", "@@"],
            &[
                (0, TokenType::Control),
                (1, TokenType::Control),
                (2, TokenType::UserDefined),
            ],
        );
        let m = model(&v, &[]);
        let ids = m.encode(&v, "x<s><s><s>y@@", false, true).expect("encode");
        assert_eq!(text_of(&v, &ids), ["x", "<s><s>", "<s>", "y", "@@"]);
        let ids = m.encode(&v, "x<s>@@", false, false).expect("encode");
        assert_eq!(text_of(&v, &ids), ["x", "<", "s", ">", "@@"]);
    }

    /// Ensures that add_special adds BOS/EOS exactly as the vocabulary's flags say.
    #[test]
    fn add_special_follows_flags() {
        let mut v = toy(
            &["<b>", "<e>"],
            &[(0, TokenType::Control), (1, TokenType::Control)],
        );
        v.set_bos_eos(Some(256), Some(257));
        let m = model(&v, &[]);
        assert_eq!(
            m.encode(&v, "a", true, false).expect("encode"),
            [u32::from(b'a')]
        );
        v.add_bos = true;
        v.add_eos = true;
        assert_eq!(
            m.encode(&v, "a", true, false).expect("encode"),
            [256, u32::from(b'a'), 257]
        );
        assert_eq!(m.encode(&v, "", true, false).expect("encode"), [256, 257]);
    }
}
