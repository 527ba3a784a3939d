//! Reading a tokenizer out of GGUF metadata (`tokenizer.ggml.*`), the way llama.cpp's
//! `llama_vocab::load` does for byte-level BPE (`tokenizer.ggml.model = gpt2`).

use std::collections::HashMap;

use tessera_format::gguf_file::{Content, Value};

use super::TokenizerError;
use super::bpe::BpeModel;
use super::byte_level;
use super::pretokenize::{PreKind, PreTokenizer};
use super::vocab::{TokenType, Vocab};

type Metadata = HashMap<String, Value>;

fn get<'a>(md: &'a Metadata, key: &'static str) -> Result<&'a Value, TokenizerError> {
    md.get(key).ok_or(TokenizerError::MissingMetadata { key })
}

fn invalid(key: &'static str, reason: impl Into<String>) -> TokenizerError {
    TokenizerError::InvalidMetadata {
        key,
        reason: reason.into(),
    }
}

fn string_array<'a>(md: &'a Metadata, key: &'static str) -> Result<Vec<&'a str>, TokenizerError> {
    let arr = get(md, key)?
        .to_vec()
        .map_err(|e| invalid(key, e.to_string()))?;
    arr.iter()
        .enumerate()
        .map(|(i, v)| match v {
            Value::String(s) => Ok(s.as_str()),
            other => Err(invalid(
                key,
                format!("element {i} is {:?}, not a string", other.value_type()),
            )),
        })
        .collect()
}

fn int_of(v: &Value) -> Option<i64> {
    Some(match *v {
        Value::U8(x) => x.into(),
        Value::I8(x) => x.into(),
        Value::U16(x) => x.into(),
        Value::I16(x) => x.into(),
        Value::U32(x) => x.into(),
        Value::I32(x) => x.into(),
        Value::U64(x) => i64::try_from(x).ok()?,
        Value::I64(x) => x,
        _ => return None,
    })
}

/// An optional token id; ids outside the vocabulary are ignored with a warning, like llama.cpp.
fn opt_id(
    md: &Metadata,
    key: &'static str,
    n_tokens: usize,
) -> Result<Option<u32>, TokenizerError> {
    let Some(v) = md.get(key) else {
        return Ok(None);
    };
    let id =
        int_of(v).ok_or_else(|| invalid(key, format!("{:?} is not an integer", v.value_type())))?;
    match u32::try_from(id) {
        Ok(id) if (id as usize) < n_tokens => Ok(Some(id)),
        _ => {
            tracing::warn!(
                key,
                id,
                n_tokens,
                "special token id outside the vocabulary, ignored"
            );
            Ok(None)
        }
    }
}

fn opt_bool(md: &Metadata, key: &'static str) -> Result<Option<bool>, TokenizerError> {
    md.get(key)
        .map(|v| v.to_bool().map_err(|e| invalid(key, e.to_string())))
        .transpose()
}

/// Builds the vocabulary and BPE model from a GGUF file's metadata.
///
/// # Errors
/// Missing or mistyped `tokenizer.ggml.*` keys, a tokenizer model other than `gpt2`, or an
/// unknown `tokenizer.ggml.pre`.
pub fn load(content: &Content) -> Result<(Vocab, BpeModel), TokenizerError> {
    let md = &content.metadata;
    let model = get(md, "tokenizer.ggml.model")?
        .to_string()
        .map_err(|e| invalid("tokenizer.ggml.model", e.to_string()))?;
    if model != "gpt2" {
        return Err(TokenizerError::UnsupportedModel {
            model: model.clone(),
        });
    }
    let pre_kind = match md.get("tokenizer.ggml.pre") {
        Some(v) => PreKind::from_name(
            v.to_string()
                .map_err(|e| invalid("tokenizer.ggml.pre", e.to_string()))?,
        )?,
        None => {
            tracing::warn!(
                "GGUF has no tokenizer.ggml.pre; using llama.cpp's 'default' pre-tokenizer"
            );
            PreKind::Default
        }
    };

    let tokens = string_array(md, "tokenizer.ggml.tokens")?;
    let n = tokens.len();
    let types: Vec<TokenType> = match md.get("tokenizer.ggml.token_type") {
        Some(v) => {
            let arr = v
                .to_vec()
                .map_err(|e| invalid("tokenizer.ggml.token_type", e.to_string()))?;
            if arr.len() != n {
                return Err(invalid(
                    "tokenizer.ggml.token_type",
                    format!("{} types for {n} tokens", arr.len()),
                ));
            }
            arr.iter()
                .map(|v| int_of(v).map_or(TokenType::Undefined, TokenType::from_gguf))
                .collect()
        }
        None => vec![TokenType::Normal; n],
    };
    let mut texts = Vec::with_capacity(n);
    let mut pieces = Vec::with_capacity(n);
    for (i, (&t, &ty)) in tokens.iter().zip(&types).enumerate() {
        // llama.cpp renames empty tokens so the text -> id map stays a bijection.
        let text = if t.is_empty() {
            format!("[EMPTY_{i}]")
        } else {
            t.to_owned()
        };
        pieces.push(piece_of(&text, ty));
        texts.push(text);
    }
    let fim_eog: Vec<u32> = [
        "<|fim_pad|>",
        "<fim-pad>",
        "<PAD>",
        "<|fim_repo|>",
        "<|repo_name|>",
        "<fim-repo>",
        "<REPO>",
        "<|file_sep|>",
    ]
    .iter()
    .filter_map(|t| tokens.iter().position(|x| x == t).map(|p| p as u32))
    .collect();
    let mut vocab = Vocab::finish(texts, pieces, types, &fim_eog)?;

    let bos = opt_id(md, "tokenizer.ggml.bos_token_id", n)?;
    let eos = opt_id(md, "tokenizer.ggml.eos_token_id", n)?;
    vocab.set_bos_eos(bos, eos);
    for key in ["tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"] {
        if let Some(id) = opt_id(md, key, n)? {
            vocab.add_eog(id);
        }
    }
    vocab.add_bos =
        opt_bool(md, "tokenizer.ggml.add_bos_token")?.unwrap_or(pre_kind.default_add_bos());
    vocab.add_eos = opt_bool(md, "tokenizer.ggml.add_eos_token")?.unwrap_or(false);
    if vocab.add_bos && vocab.bos.is_none() {
        return Err(invalid(
            "tokenizer.ggml.bos_token_id",
            "add_bos_token is set but there is no BOS id",
        ));
    }
    if vocab.add_eos && vocab.eos.is_none() {
        return Err(invalid(
            "tokenizer.ggml.eos_token_id",
            "add_eos_token is set but there is no EOS id",
        ));
    }
    vocab.chat_template = match md.get("tokenizer.chat_template") {
        Some(v) => Some(
            v.to_string()
                .map_err(|e| invalid("tokenizer.chat_template", e.to_string()))?
                .clone(),
        ),
        None => None,
    };

    let merges = match md.get("tokenizer.ggml.merges") {
        Some(_) => string_array(md, "tokenizer.ggml.merges")?,
        None => {
            return Err(TokenizerError::MissingMetadata {
                key: "tokenizer.ggml.merges",
            });
        }
    };
    let model = BpeModel::new(&vocab, merges, PreTokenizer::new(pre_kind)?)?;
    Ok((vocab, model))
}

/// The bytes a token renders to, as llama.cpp's `token_to_piece(special = true)` for BPE:
/// control, unknown and user-defined tokens render their text; normal tokens are decoded from
/// the byte-level alphabet; anything else renders nothing.
fn piece_of(text: &str, ty: TokenType) -> Vec<u8> {
    match ty {
        TokenType::Control | TokenType::Unknown | TokenType::UserDefined => {
            text.as_bytes().to_vec()
        }
        TokenType::Normal => byte_level::decode_str(text).unwrap_or_else(|| {
            // llama.cpp would print an [UNK_BYTE_…] marker; keep the text instead.
            text.as_bytes().to_vec()
        }),
        _ => Vec::new(),
    }
}
