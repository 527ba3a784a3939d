//! Pre-tokenizers: the regex cascades that cut text into words before BPE, as llama.cpp's
//! `llm_tokenizer_bpe` defines them per `tokenizer.ggml.pre`.
//!
//! llama.cpp applies a list of regexes in turn: each one is run over every fragment the previous
//! ones produced, and both its matches and the gaps between them become fragments. A regex never
//! sees beyond its fragment, so a lookahead at a fragment's end sees end of text. We reproduce
//! that with `fancy-regex` run on each fragment's own slice.

use fancy_regex::Regex;

use super::TokenizerError;

/// GPT-2's word regex. llama.cpp's hand-written matcher for it also takes a lone whitespace
/// that the lookahead rejects; the trailing `|\s+` does the same.
const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";

/// Llama 3's regex, with llama.cpp's case-insensitive contractions spelled out.
const LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Qwen2's regex: Llama 3's with single digits.
const QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The pre-tokenizer names we support, for error messages.
pub const SUPPORTED: &str = "smollm, starcoder, refact, command-r, codeshell, exaone, minerva-7b, \
     llama3, llama-v3, llama-bpe, falcon3, dbrx, smaug-bpe, qwen2, stablelm2, megrez, gpt-2, \
     phi-2, roberta-bpe, mpt, olmo, jais, default";

/// The pre-tokenizer families (llama.cpp's `LLAMA_VOCAB_PRE_TYPE_*` that share regexes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreKind {
    /// Single digits, then GPT-2 (SmolLM, StarCoder, …).
    SmolLm,
    /// Llama 3 (also DBRX, Smaug); whole-word vocabulary hits skip merging.
    Llama3,
    /// Qwen2 (also StableLM2).
    Qwen2,
    /// Plain GPT-2 (also MPT, OLMo, JAIS, Phi-2).
    Gpt2,
    /// llama.cpp's fallback for unknown or missing names.
    Default,
}

impl PreKind {
    /// Maps a `tokenizer.ggml.pre` value to its family.
    ///
    /// # Errors
    /// [`TokenizerError::UnknownPreTokenizer`] listing the supported names.
    pub fn from_name(name: &str) -> Result<Self, TokenizerError> {
        Ok(match name {
            "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone"
            | "minerva-7b" => Self::SmolLm,
            "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "dbrx" | "smaug-bpe" => Self::Llama3,
            "qwen2" | "stablelm2" | "megrez" => Self::Qwen2,
            "gpt-2" | "phi-2" | "roberta-bpe" | "mpt" | "olmo" | "jais" => Self::Gpt2,
            "default" => Self::Default,
            other => {
                return Err(TokenizerError::UnknownPreTokenizer {
                    name: other.to_owned(),
                    supported: SUPPORTED,
                });
            }
        })
    }

    /// Whether a word that is itself in the vocabulary is emitted without merging
    /// (llama.cpp's `ignore_merges`).
    pub fn ignore_merges(self) -> bool {
        self == Self::Llama3
    }

    /// Whether the vocabulary adds BOS by default when the metadata does not say.
    pub fn default_add_bos(self) -> bool {
        self == Self::Llama3
    }

    fn patterns(self) -> &'static [&'static str] {
        match self {
            Self::SmolLm => &[r"\p{N}", GPT2],
            Self::Llama3 => &[LLAMA3],
            Self::Qwen2 => &[QWEN2],
            Self::Gpt2 => &[GPT2],
            Self::Default => &[r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", "[0-9][0-9][0-9]"],
        }
    }
}

/// A compiled regex cascade.
#[derive(Debug)]
pub struct PreTokenizer {
    kind: PreKind,
    regexes: Vec<Regex>,
}

impl PreTokenizer {
    /// Compiles the cascade for `kind`.
    ///
    /// # Errors
    /// [`TokenizerError::Regex`] if a pattern does not compile (a bug, not user input).
    pub fn new(kind: PreKind) -> Result<Self, TokenizerError> {
        let regexes = kind
            .patterns()
            .iter()
            .map(|p| {
                Regex::new(p).map_err(|e| TokenizerError::Regex {
                    pattern: (*p).to_owned(),
                    reason: e.to_string(),
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { kind, regexes })
    }

    /// The family this cascade implements.
    pub fn kind(&self) -> PreKind {
        self.kind
    }

    /// Splits `text` into words, returned as byte ranges covering `text` in order.
    ///
    /// # Errors
    /// [`TokenizerError::Regex`] when the regex engine gives up (backtrack limit).
    pub fn split(&self, text: &str) -> Result<Vec<std::ops::Range<usize>>, TokenizerError> {
        if text.is_empty() {
            return Ok(Vec::new());
        }
        let mut fragments = Vec::with_capacity(text.len() / 3 + 1);
        fragments.push(0..text.len());
        let mut next = Vec::with_capacity(text.len() / 3 + 1);
        for re in &self.regexes {
            next.clear();
            for frag in &fragments {
                let slice = &text[frag.clone()];
                let mut last = 0;
                for m in re.find_iter(slice) {
                    let m = m.map_err(|e| TokenizerError::Regex {
                        pattern: re.as_str().to_owned(),
                        reason: e.to_string(),
                    })?;
                    if m.start() > last {
                        next.push(frag.start + last..frag.start + m.start());
                    }
                    if m.end() > m.start() {
                        next.push(frag.start + m.start()..frag.start + m.end());
                    }
                    last = m.end();
                }
                if last < slice.len() {
                    next.push(frag.start + last..frag.end);
                }
            }
            std::mem::swap(&mut fragments, &mut next);
        }
        Ok(fragments)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(kind: PreKind, text: &str) -> Vec<String> {
        let pre = PreTokenizer::new(kind).expect("patterns compile");
        pre.split(text)
            .expect("split")
            .into_iter()
            .map(|r| text[r].to_owned())
            .collect()
    }

    /// Ensures that SmolLM splits every digit on its own and keeps GPT-2's word rules.
    #[test]
    fn smollm_digits_and_words() {
        assert_eq!(words(PreKind::SmolLm, "ab 123"), ["ab", " ", "1", "2", "3"]);
        assert_eq!(words(PreKind::SmolLm, "I'm here"), ["I", "'m", " here"]);
        assert_eq!(words(PreKind::SmolLm, "a   b"), ["a", "  ", " b"]);
        assert_eq!(words(PreKind::SmolLm, "x  "), ["x", "  "]);
        assert_eq!(words(PreKind::SmolLm, "\tfoo"), ["\t", "foo"]);
        assert_eq!(words(PreKind::SmolLm, "hi!!"), ["hi", "!!"]);
    }

    /// Ensures that Llama 3 groups digits by three and folds the apostrophe case.
    #[test]
    fn llama3_rules() {
        assert_eq!(words(PreKind::Llama3, "12345"), ["123", "45"]);
        assert_eq!(words(PreKind::Llama3, "I'M ok"), ["I", "'M", " ok"]);
        assert_eq!(words(PreKind::Llama3, "a\n\nb"), ["a", "\n\n", "b"]);
    }

    /// Ensures that the ranges always tile the input exactly, whatever the pre-tokenizer.
    #[test]
    fn ranges_tile_input() {
        let text = "Héllo  wörld\n\n\t 42 😀👍🏽 <|x|> 'll";
        for kind in [
            PreKind::SmolLm,
            PreKind::Llama3,
            PreKind::Qwen2,
            PreKind::Gpt2,
            PreKind::Default,
        ] {
            let ranges = PreTokenizer::new(kind)
                .expect("compile")
                .split(text)
                .expect("split");
            let mut pos = 0;
            for r in ranges {
                assert_eq!(r.start, pos, "{kind:?}");
                assert!(r.end > r.start);
                pos = r.end;
            }
            assert_eq!(pos, text.len());
        }
    }

    /// Ensures that an unknown name is a typed error that lists the supported ones.
    #[test]
    fn unknown_name_lists_supported() {
        let err = PreKind::from_name("klingon").expect_err("unknown");
        let msg = err.to_string();
        assert!(
            msg.contains("klingon") && msg.contains("smollm") && msg.contains("qwen2"),
            "{msg}"
        );
    }
}
