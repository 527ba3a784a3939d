//! The vocabulary shared by both tokenizer kinds: token strings, their raw bytes, their types,
//! and the special ids (BOS, EOS, the end-of-generation set).
//!
//! Decoding lives here because it only needs the vocabulary: it concatenates each token's raw
//! bytes (llama.cpp's `token_to_piece` with no space cleaning) and converts to UTF-8 once, at
//! the end. [`super::IncrementalDecoder`] streams the same bytes, so the two always agree.

use std::collections::HashMap;

use super::TokenizerError;

/// A token's type, as GGUF's `tokenizer.ggml.token_type` numbers them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenType {
    /// 0: not specified.
    Undefined,
    /// 1: an ordinary vocabulary entry.
    Normal,
    /// 2: the unknown token.
    Unknown,
    /// 3: a control token such as `<|im_start|>`; not rendered when skipping specials.
    Control,
    /// 4: a user-defined token, matched as a whole before BPE and always rendered.
    UserDefined,
    /// 5: a reserved slot.
    Unused,
    /// 6: a byte-fallback token.
    Byte,
}

impl TokenType {
    /// The type for GGUF's number; unknown numbers are [`TokenType::Undefined`] as in llama.cpp.
    pub fn from_gguf(v: i64) -> Self {
        match v {
            1 => Self::Normal,
            2 => Self::Unknown,
            3 => Self::Control,
            4 => Self::UserDefined,
            5 => Self::Unused,
            6 => Self::Byte,
            _ => Self::Undefined,
        }
    }
}

/// Texts llama.cpp treats as end of generation whatever their declared type.
const EOG_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|eom_id|>",
    "<EOT>",
    // DeepSeek's; llama.cpp reaches it as the detected EOT token.
    "<｜end▁of▁sentence｜>",
];

/// The vocabulary. Token ids index every vector.
#[derive(Debug)]
pub struct Vocab {
    /// Vocabulary strings as stored (byte-level alphabet for BPE models).
    pub texts: Vec<String>,
    /// Raw bytes each token renders to (control tokens: their text).
    pub pieces: Vec<Vec<u8>>,
    /// Token types.
    pub types: Vec<TokenType>,
    /// Inverse of `texts`.
    pub text_to_id: HashMap<String, u32>,
    /// Beginning of sequence.
    pub bos: Option<u32>,
    /// End of sequence.
    pub eos: Option<u32>,
    /// Whether `encode(add_special = true)` prepends BOS.
    pub add_bos: bool,
    /// Whether `encode(add_special = true)` appends EOS.
    pub add_eos: bool,
    /// End-of-generation ids, sorted.
    pub eog: Vec<u32>,
    /// The chat template, if the model has one.
    pub chat_template: Option<String>,
}

impl Vocab {
    /// Builds the inverse map and the end-of-generation set (`extra_eog` plus the tokens with
    /// EOG texts), and promotes those tokens to control tokens as llama.cpp does (so
    /// `skip_special` hides them).
    ///
    /// # Errors
    /// [`TokenizerError::InvalidMetadata`] when two tokens share a string or the vectors'
    /// lengths disagree.
    pub fn finish(
        texts: Vec<String>,
        pieces: Vec<Vec<u8>>,
        mut types: Vec<TokenType>,
        extra_eog: &[u32],
    ) -> Result<Self, TokenizerError> {
        if pieces.len() != texts.len() || types.len() != texts.len() {
            return Err(TokenizerError::InvalidMetadata {
                key: "tokenizer.ggml.token_type",
                reason: format!(
                    "{} token types and {} pieces for {} tokens",
                    types.len(),
                    pieces.len(),
                    texts.len()
                ),
            });
        }
        let mut text_to_id = HashMap::with_capacity(texts.len());
        for (id, t) in texts.iter().enumerate() {
            let id = u32::try_from(id).map_err(|_| TokenizerError::InvalidMetadata {
                key: "tokenizer.ggml.tokens",
                reason: "more than 2^32 tokens".into(),
            })?;
            if let Some(prev) = text_to_id.insert(t.clone(), id) {
                return Err(TokenizerError::InvalidMetadata {
                    key: "tokenizer.ggml.tokens",
                    reason: format!("tokens {prev} and {id} are both {t:?}"),
                });
            }
        }
        let mut eog: Vec<u32> = Vec::with_capacity(extra_eog.len() + EOG_TEXTS.len());
        for &id in extra_eog {
            if let Some(ty) = types.get_mut(id as usize) {
                *ty = TokenType::Control;
                eog.push(id);
            }
        }
        for text in EOG_TEXTS {
            if let Some(&id) = text_to_id.get(*text) {
                eog.push(id);
                types[id as usize] = TokenType::Control;
            }
        }
        eog.sort_unstable();
        eog.dedup();
        Ok(Self {
            texts,
            pieces,
            types,
            text_to_id,
            bos: None,
            eos: None,
            add_bos: false,
            add_eos: false,
            eog,
            chat_template: None,
        })
    }

    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.texts.len()
    }

    /// Sets BOS/EOS, adding EOS to the end-of-generation set.
    pub fn set_bos_eos(&mut self, bos: Option<u32>, eos: Option<u32>) {
        self.bos = bos;
        self.eos = eos;
        if let Some(e) = eos {
            self.add_eog(e);
        }
    }

    /// Adds `id` to the end-of-generation set.
    pub fn add_eog(&mut self, id: u32) {
        if let Err(pos) = self.eog.binary_search(&id) {
            self.eog.insert(pos, id);
        }
    }

    /// Whether `id` is a control or unknown token (not rendered when skipping specials).
    pub fn is_hidden_special(&self, id: u32) -> bool {
        matches!(
            self.types.get(id as usize),
            Some(TokenType::Control | TokenType::Unknown)
        )
    }

    /// Whether `id` is matched as a whole before BPE: control, user-defined or unknown.
    pub fn is_special(&self, id: u32) -> bool {
        matches!(
            self.types.get(id as usize),
            Some(TokenType::Control | TokenType::UserDefined | TokenType::Unknown)
        )
    }

    /// Appends the raw bytes of `ids` to `out`.
    ///
    /// # Errors
    /// [`TokenizerError::TokenOutOfRange`] for an id outside the vocabulary.
    pub fn decode_bytes_into(
        &self,
        ids: &[u32],
        skip_special: bool,
        out: &mut Vec<u8>,
    ) -> Result<(), TokenizerError> {
        for &id in ids {
            let piece = self
                .pieces
                .get(id as usize)
                .ok_or(TokenizerError::TokenOutOfRange {
                    id,
                    vocab_size: self.len(),
                })?;
            if skip_special && self.is_hidden_special(id) {
                continue;
            }
            out.extend_from_slice(piece);
        }
        Ok(())
    }
}
