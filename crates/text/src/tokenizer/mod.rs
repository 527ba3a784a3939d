//! Tokenizers, streaming detokenization and chat templates.
//!
//! [`Tokenizer`] wraps either a GGUF byte-level BPE vocabulary (built from the file's
//! `tokenizer.ggml.*` metadata and matching llama.cpp token for token) or a Hugging Face
//! `tokenizer.json` (through the `tokenizers` crate). Both share one vocabulary view, so
//! decoding, special-token queries and [`IncrementalDecoder`] work the same for either.
//! [`ChatTemplate`] renders a model's Jinja chat template.

mod bpe;
mod byte_level;
mod chat;
mod gguf;
mod hf;
mod incremental;
mod pretokenize;
mod vocab;

use std::path::{Path, PathBuf};

pub use byte_level::byte_to_char;
pub use chat::{ChatMessage, ChatTemplate};
pub use incremental::IncrementalDecoder;
pub use pretokenize::SUPPORTED as SUPPORTED_PRE_TOKENIZERS;

/// Tokenizer, detokenizer and chat-template errors.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// A metadata key the tokenizer needs is absent.
    #[error("GGUF metadata key `{key}` is missing")]
    MissingMetadata {
        /// The key.
        key: &'static str,
    },
    /// A metadata key has the wrong type or an inconsistent value.
    #[error("GGUF metadata key `{key}` is invalid: {reason}")]
    InvalidMetadata {
        /// The key.
        key: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// `tokenizer.ggml.model` names a tokenizer we do not implement.
    #[error("tokenizer model `{model}` is not supported (only `gpt2` byte-level BPE is)")]
    UnsupportedModel {
        /// The `tokenizer.ggml.model` value.
        model: String,
    },
    /// `tokenizer.ggml.pre` names a pre-tokenizer we do not implement.
    #[error("unknown pre-tokenizer `{name}` (tokenizer.ggml.pre); supported: {supported}")]
    UnknownPreTokenizer {
        /// The `tokenizer.ggml.pre` value.
        name: String,
        /// The supported names.
        supported: &'static str,
    },
    /// A pre-tokenizer regex failed to compile or to run.
    #[error("pre-tokenizer regex `{pattern}`: {reason}")]
    Regex {
        /// The pattern.
        pattern: String,
        /// The regex engine's message.
        reason: String,
    },
    /// A token id outside the vocabulary.
    #[error("token id {id} is outside the vocabulary (size {vocab_size})")]
    TokenOutOfRange {
        /// The id.
        id: u32,
        /// The vocabulary size.
        vocab_size: usize,
    },
    /// Reading a tokenizer file failed.
    #[error("reading {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A `tokenizer.json` or `tokenizer_config.json` could not be parsed or used.
    #[error("tokenizer file {path}: {reason}")]
    HfTokenizer {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The `tokenizers` crate failed to encode.
    #[error("encoding failed: {reason}")]
    Encode {
        /// Its message.
        reason: String,
    },
    /// A chat template does not compile.
    #[error("chat template syntax error{}: {reason}", line.map(|l| format!(" at line {l}")).unwrap_or_default())]
    TemplateSyntax {
        /// The 1-based line, when known.
        line: Option<usize>,
        /// The template engine's message.
        reason: String,
    },
    /// A chat template failed while rendering (including `raise_exception`).
    #[error("chat template error{}: {reason}", line.map(|l| format!(" at line {l}")).unwrap_or_default())]
    TemplateRender {
        /// The 1-based line, when known.
        line: Option<usize>,
        /// The template engine's message.
        reason: String,
    },
}

#[derive(Debug)]
enum Backend {
    Gguf(bpe::BpeModel),
    Hf(Box<hf::HfModel>),
}

/// A tokenizer: GGUF byte-level BPE or a Hugging Face `tokenizer.json`.
///
/// Immutable once built and `Send + Sync`: share one behind an `Arc`.
#[derive(Debug)]
pub struct Tokenizer {
    vocab: vocab::Vocab,
    backend: Backend,
}

impl Tokenizer {
    /// Builds the tokenizer described by a GGUF file's `tokenizer.ggml.*` metadata.
    ///
    /// # Errors
    /// [`TokenizerError::MissingMetadata`] / [`TokenizerError::InvalidMetadata`] naming the key,
    /// [`TokenizerError::UnsupportedModel`] for non-`gpt2` vocabularies,
    /// [`TokenizerError::UnknownPreTokenizer`] listing the supported pre-tokenizers.
    pub fn from_gguf(content: &tessera_format::gguf_file::Content) -> Result<Self, TokenizerError> {
        let (vocab, model) = gguf::load(content)?;
        Ok(Self {
            vocab,
            backend: Backend::Gguf(model),
        })
    }

    /// Loads a Hugging Face `tokenizer.json`, and `tokenizer_config.json` beside it if present
    /// (for BOS/EOS, `add_bos_token`/`add_eos_token` and `chat_template`; the template may
    /// instead be a `chat_template.jinja` beside it).
    ///
    /// # Errors
    /// [`TokenizerError::Io`] or [`TokenizerError::HfTokenizer`] naming the file.
    pub fn from_hf_file(path: &Path) -> Result<Self, TokenizerError> {
        let (vocab, model) = hf::load(path)?;
        Ok(Self {
            vocab,
            backend: Backend::Hf(Box::new(model)),
        })
    }

    /// Tokenizes `text`.
    ///
    /// `add_special` adds BOS/EOS as the model's metadata says (llama.cpp's `add_special`; for
    /// `tokenizer.json`, its post-processor). `parse_special` recognises special-token text such
    /// as `"<|im_start|>"` as that token (llama.cpp's `parse_special`); without it such text is
    /// tokenized as plain text (user-defined tokens are still matched whole, as in llama.cpp).
    ///
    /// # Errors
    /// [`TokenizerError::Regex`] if the pre-tokenizer gives up on pathological input,
    /// [`TokenizerError::Encode`] if `tokenizers` fails.
    pub fn encode(
        &self,
        text: &str,
        add_special: bool,
        parse_special: bool,
    ) -> Result<Vec<u32>, TokenizerError> {
        match &self.backend {
            Backend::Gguf(m) => m.encode(&self.vocab, text, add_special, parse_special),
            Backend::Hf(m) => m.encode(text, add_special, parse_special),
        }
    }

    /// Tokenizes `text` with the model's special tokens, keeping at most `limit` ids: an
    /// encoder's input, truncated as `transformers` does (see [`hf::HfModel::encode_limited`];
    /// for a GGUF vocabulary, the first `limit` ids).
    ///
    /// # Errors
    /// As [`Tokenizer::encode`]; for `tokenizer.json` models, also when `limit` cannot hold
    /// the special tokens.
    pub fn encode_limited(
        &self,
        text: &str,
        limit: usize,
        parse_special: bool,
    ) -> Result<Vec<u32>, TokenizerError> {
        match &self.backend {
            Backend::Gguf(m) => {
                let mut ids = m.encode(&self.vocab, text, true, parse_special)?;
                ids.truncate(limit);
                Ok(ids)
            }
            Backend::Hf(m) => m.encode_limited(text, limit, parse_special),
        }
    }

    /// The text of `ids`: their bytes concatenated (control and unknown tokens left out when
    /// `skip_special`), converted to UTF-8 once at the end with U+FFFD for invalid bytes. No
    /// spaces are added or cleaned: this is llama.cpp's `token_to_piece` concatenation.
    ///
    /// # Errors
    /// [`TokenizerError::TokenOutOfRange`] for an id outside the vocabulary.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, TokenizerError> {
        let mut bytes = Vec::with_capacity(ids.len() * 4);
        self.vocab
            .decode_bytes_into(ids, skip_special, &mut bytes)?;
        Ok(match String::from_utf8(bytes) {
            Ok(s) => s,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        })
    }

    /// The raw bytes token `id` renders to (control tokens: their text), or `None` when `id` is
    /// outside the vocabulary.
    pub fn token_bytes(&self, id: u32) -> Option<&[u8]> {
        self.vocab.pieces.get(id as usize).map(Vec::as_slice)
    }

    /// Number of tokens (including added/special tokens).
    pub fn vocab_size(&self) -> usize {
        self.vocab.len()
    }

    /// Beginning-of-sequence token, if the model has one.
    pub fn bos_id(&self) -> Option<u32> {
        self.vocab.bos
    }

    /// End-of-sequence token, if the model has one.
    pub fn eos_id(&self) -> Option<u32> {
        self.vocab.eos
    }

    /// Whether `id` is a special token: control, user-defined or unknown (the tokens matched
    /// whole before BPE). Only control and unknown tokens are hidden by `skip_special`.
    pub fn is_special(&self, id: u32) -> bool {
        self.vocab.is_special(id)
    }

    /// Whether generating `id` ends generation (see [`Tokenizer::eog_ids`]).
    pub fn is_eog(&self, id: u32) -> bool {
        self.vocab.eog.binary_search(&id).is_ok()
    }

    /// End-of-generation tokens, sorted: EOS, EOT/EOM when declared, and tokens whose text is
    /// `<|im_end|>`, `<|endoftext|>`, `<|eot_id|>`, `<|end|>`, `<end_of_turn>`, `<|eom_id|>`,
    /// `<EOT>` (and FIM pad/repo/separator tokens), as llama.cpp's EOG set.
    pub fn eog_ids(&self) -> &[u32] {
        &self.vocab.eog
    }

    /// The vocabulary string of `id` as stored (byte-level alphabet for BPE, e.g. `"Ġthe"`).
    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.vocab.texts.get(id as usize).map(String::as_str)
    }

    /// The id whose vocabulary string is exactly `text` (e.g. `"<|im_end|>"` or `"Ġthe"`).
    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.vocab.text_to_id.get(text).copied()
    }

    /// The model's chat template source, if it ships one.
    pub fn chat_template(&self) -> Option<&str> {
        self.vocab.chat_template.as_deref()
    }

    /// Whether `encode(…, add_special = true, …)` prepends BOS (GGUF metadata / config).
    pub fn add_bos(&self) -> bool {
        self.vocab.add_bos
    }
}

#[cfg(test)]
mod tests;
