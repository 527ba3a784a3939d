//! Hugging Face `tokenizer.json` models through the `tokenizers` crate, plus the
//! `tokenizer_config.json` beside it for BOS/EOS and the chat template.
//!
//! Encoding is delegated to `tokenizers`. Decoding uses our own per-token byte pieces (see
//! [`super::vocab`]) so that it agrees with the incremental decoder and never loses bytes
//! mid-stream; the pieces follow the decoder the file declares (byte-level, or SentencePiece
//! style `▁` and `<0xNN>` byte fallback).

use std::path::Path;

use serde_json::Value as Json;

use super::TokenizerError;
use super::byte_level;
use super::vocab::{TokenType, Vocab};

/// The `tokenizers` model, twice: once as loaded (special-token text is recognised) and once
/// with `encode_special_tokens` set (special-token text is plain text), because the setting
/// lives on the tokenizer and `encode` takes `&self`.
pub struct HfModel {
    parse_special: tokenizers::Tokenizer,
    plain: tokenizers::Tokenizer,
}

impl std::fmt::Debug for HfModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HfModel").finish_non_exhaustive()
    }
}

fn hf_err(path: &Path, reason: impl std::fmt::Display) -> TokenizerError {
    TokenizerError::HfTokenizer {
        path: path.to_owned(),
        reason: reason.to_string(),
    }
}

fn read_json(path: &Path) -> Result<Json, TokenizerError> {
    let text = std::fs::read_to_string(path).map_err(|source| TokenizerError::Io {
        path: path.to_owned(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| hf_err(path, e))
}

/// How the file's decoder turns vocabulary strings into bytes.
#[derive(Debug, Clone, Copy)]
struct PieceStyle {
    byte_level: bool,
    byte_fallback: bool,
    metaspace: bool,
}

fn decoder_types(v: &Json, out: &mut Vec<String>) {
    if let Some(t) = v.get("type").and_then(Json::as_str) {
        out.push(t.to_owned());
        if t == "Replace" && v.pointer("/pattern/String").and_then(Json::as_str) == Some("▁") {
            out.push("Metaspace".to_owned());
        }
    }
    if let Some(list) = v.get("decoders").and_then(Json::as_array) {
        for d in list {
            decoder_types(d, out);
        }
    }
}

fn piece_of(text: &str, ty: TokenType, style: PieceStyle) -> Vec<u8> {
    if matches!(
        ty,
        TokenType::Control | TokenType::UserDefined | TokenType::Unknown
    ) {
        return text.as_bytes().to_vec();
    }
    if style.byte_level {
        return byte_level::decode_str(text).unwrap_or_else(|| text.as_bytes().to_vec());
    }
    if style.byte_fallback
        && let Some(hex) = text.strip_prefix("<0x").and_then(|s| s.strip_suffix('>'))
        && let Ok(b) = u8::from_str_radix(hex, 16)
    {
        return vec![b];
    }
    if style.metaspace {
        return text.replace('▁', " ").into_bytes();
    }
    text.as_bytes().to_vec()
}

/// A token named in `tokenizer_config.json`: a string or `{"content": …}`.
fn config_token(cfg: &Json, key: &str) -> Option<String> {
    match cfg.get(key)? {
        Json::String(s) => Some(s.clone()),
        obj => obj.get("content")?.as_str().map(str::to_owned),
    }
}

/// The chat template in `tokenizer_config.json`: a string, or a list of named templates of
/// which we take `default`.
fn config_template(cfg: &Json) -> Option<String> {
    match cfg.get("chat_template")? {
        Json::String(s) => Some(s.clone()),
        Json::Array(list) => list
            .iter()
            .find(|t| t.get("name").and_then(Json::as_str) == Some("default"))
            .and_then(|t| t.get("template")?.as_str().map(str::to_owned)),
        _ => None,
    }
}

/// Loads `tokenizer.json` at `path` and the optional `tokenizer_config.json` beside it.
///
/// # Errors
/// [`TokenizerError::Io`] when a file cannot be read, [`TokenizerError::HfTokenizer`] when one
/// does not parse.
pub fn load(path: &Path) -> Result<(Vocab, HfModel), TokenizerError> {
    let json = read_json(path)?;
    let mut tok = tokenizers::Tokenizer::from_file(path).map_err(|e| hf_err(path, e))?;
    // A file's padding and truncation settings are for batched training (MiniLM's pads every
    // input to 128 ids and cuts it there): ids are per text here, and the limit is the
    // caller's ([`HfModel::encode_limited`]).
    tok.with_padding(None);
    tok.with_truncation(None).map_err(|e| hf_err(path, e))?;
    let mut types_found = Vec::new();
    if let Some(d) = json.get("decoder") {
        decoder_types(d, &mut types_found);
    }
    let has = |t: &str| types_found.iter().any(|x| x == t);
    let style = PieceStyle {
        byte_level: has("ByteLevel"),
        byte_fallback: has("ByteFallback"),
        metaspace: has("Metaspace"),
    };

    let n = tok.get_vocab_size(true);
    let mut texts: Vec<Option<String>> = vec![None; n];
    let mut types = vec![TokenType::Normal; n];
    for (text, id) in tok.get_vocab(true) {
        let i = id as usize;
        if i >= texts.len() {
            texts.resize(i + 1, None);
            types.resize(i + 1, TokenType::Normal);
        }
        texts[i] = Some(text);
    }
    for (id, added) in tok.get_added_tokens_decoder() {
        if let Some(t) = types.get_mut(id as usize) {
            *t = if added.special {
                TokenType::Control
            } else {
                TokenType::UserDefined
            };
        }
    }
    let texts: Vec<String> = texts
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            t.unwrap_or_else(|| {
                types[i] = TokenType::Unused;
                format!("[EMPTY_{i}]")
            })
        })
        .collect();
    let pieces = texts
        .iter()
        .zip(&types)
        .map(|(t, &ty)| piece_of(t, ty, style))
        .collect();
    let mut vocab = Vocab::finish(texts, pieces, types, &[]).map_err(|e| hf_err(path, e))?;

    let cfg_path = path.with_file_name("tokenizer_config.json");
    let cfg = if cfg_path.is_file() {
        Some(read_json(&cfg_path)?)
    } else {
        None
    };
    if let Some(cfg) = &cfg {
        let id_of =
            |key: &str| config_token(cfg, key).and_then(|t| vocab.text_to_id.get(&t).copied());
        let (bos, eos) = (id_of("bos_token"), id_of("eos_token"));
        vocab.set_bos_eos(bos, eos);
        vocab.add_bos = cfg
            .get("add_bos_token")
            .and_then(Json::as_bool)
            .unwrap_or(false);
        vocab.add_eos = cfg
            .get("add_eos_token")
            .and_then(Json::as_bool)
            .unwrap_or(false);
        vocab.chat_template = config_template(cfg);
    }
    // Newer Hugging Face repos keep the template in its own file.
    let jinja = path.with_file_name("chat_template.jinja");
    if vocab.chat_template.is_none() && jinja.is_file() {
        let source = std::fs::read_to_string(&jinja).map_err(|source| TokenizerError::Io {
            path: jinja.clone(),
            source,
        })?;
        vocab.chat_template = Some(source);
    }
    let mut plain = tok.clone();
    plain.set_encode_special_tokens(true);
    Ok((
        vocab,
        HfModel {
            parse_special: tok,
            plain,
        },
    ))
}

impl HfModel {
    /// The tokenizer that recognises special-token text (`parse_special`) or the one that
    /// reads it as plain text.
    fn tokenizer(&self, parse_special: bool) -> &tokenizers::Tokenizer {
        if parse_special {
            &self.parse_special
        } else {
            &self.plain
        }
    }

    /// Tokenizes with `tokenizers`; its post-processor decides what `add_special` adds.
    ///
    /// # Errors
    /// [`TokenizerError::Encode`] when `tokenizers` fails.
    pub fn encode(
        &self,
        text: &str,
        add_special: bool,
        parse_special: bool,
    ) -> Result<Vec<u32>, TokenizerError> {
        let enc = self
            .tokenizer(parse_special)
            .encode(text, add_special)
            .map_err(|e| TokenizerError::Encode {
                reason: e.to_string(),
            })?;
        Ok(enc.get_ids().to_vec())
    }

    /// As [`HfModel::encode`] with special tokens added, keeping at most `limit` ids: the text's
    /// tokens are cut from the right to leave room for the ones the post-processor adds, as
    /// `transformers` truncates (`truncation=True, max_length=limit`), so an encoder's
    /// [CLS] … [SEP] framing survives truncation.
    ///
    /// # Errors
    /// [`TokenizerError::Encode`] when `tokenizers` fails, or when `limit` cannot hold even
    /// the added special tokens.
    pub fn encode_limited(
        &self,
        text: &str,
        limit: usize,
        parse_special: bool,
    ) -> Result<Vec<u32>, TokenizerError> {
        let tok = self.tokenizer(parse_special);
        let err = |e: &dyn std::fmt::Display| TokenizerError::Encode {
            reason: e.to_string(),
        };
        let added = tok
            .get_post_processor()
            .map_or(0, |p| tokenizers::PostProcessor::added_tokens(p, false));
        if limit <= added {
            return Err(err(&format!(
                "a limit of {limit} ids cannot hold the {added} special tokens"
            )));
        }
        let mut enc = tok.encode(text, false).map_err(|e| err(&e))?;
        enc.truncate(limit - added, 0, tokenizers::TruncationDirection::Right);
        let enc = tok.post_process(enc, None, true).map_err(|e| err(&e))?;
        Ok(enc.get_ids().to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ensures that a small byte-level tokenizer.json loads, encodes through `tokenizers`,
    /// reads BOS/EOS and the chat template from tokenizer_config.json, and decodes bytes.
    #[test]
    fn loads_byte_level_json_with_config() {
        let dir = std::env::temp_dir().join(format!("tessera-hf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let vocab: serde_json::Map<String, Json> = ["h", "i", "Ġ", "hi", "Ġhi", "<|end|>"]
            .iter()
            .enumerate()
            .map(|(i, t)| ((*t).to_owned(), Json::from(i)))
            .collect();
        let tj = serde_json::json!({
            "version": "1.0",
            "added_tokens": [{"id": 5, "content": "<|end|>", "single_word": false, "lstrip": false,
                              "rstrip": false, "normalized": false, "special": true}],
            "normalizer": null,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                      "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                      "vocab": vocab, "merges": ["h i", "Ġ hi"]}
        });
        let path = dir.join("tokenizer.json");
        std::fs::write(&path, tj.to_string()).expect("write tokenizer.json");
        std::fs::write(
            dir.join("tokenizer_config.json"),
            r#"{"eos_token": "<|end|>", "chat_template": "{{ messages[0]['content'] }}"}"#,
        )
        .expect("write config");
        let (vocab, model) = load(&path).expect("loads");
        assert_eq!(
            model.encode("hi hi<|end|>", false, true).expect("encode"),
            [3, 4, 5]
        );
        assert_eq!(vocab.eos, Some(5));
        assert!(vocab.eog.contains(&5));
        assert_eq!(
            vocab.chat_template.as_deref(),
            Some("{{ messages[0]['content'] }}")
        );
        let mut out = Vec::new();
        vocab
            .decode_bytes_into(&[3, 4, 5], false, &mut out)
            .expect("decode");
        assert_eq!(out, b"hi hi<|end|>");

        // Without a template in the config, chat_template.jinja beside it is used.
        std::fs::write(
            dir.join("tokenizer_config.json"),
            r#"{"eos_token": "<|end|>"}"#,
        )
        .expect("write config");
        std::fs::write(dir.join("chat_template.jinja"), "{{ eos_token }}").expect("write jinja");
        let (vocab, _) = load(&path).expect("loads");
        assert_eq!(vocab.chat_template.as_deref(), Some("{{ eos_token }}"));
        std::fs::remove_dir_all(&dir).ok();
    }
}
