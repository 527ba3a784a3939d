//! The request side of a model, without its weights: tokenizer, chat template, validation, and
//! turning sampled token ids back into streamed text with stop conditions applied.
//!
//! The single-process engine and the cluster coordinator both use this, so a
//! request is validated and its output assembled by exactly the same code whether one process
//! runs the model or a pipeline of workers does.

use std::borrow::Cow;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use tessera_format::{GgufWeights, ModelConfig, ModelLocation};

use crate::error::{Result, TextError};
use crate::sampling::{
    FinishReason, SampledToken, SamplingParams, StopChecker, StopConditions, ValidSamplingParams,
    ValidStopConditions,
};
use crate::tokenizer::{ChatMessage, ChatTemplate, IncrementalDecoder, Tokenizer};

/// What to generate from.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Prompt {
    /// Raw text, tokenized as is (special-token text recognised).
    Text(String),
    /// Chat messages, rendered with the model's chat template.
    Chat(Vec<ChatMessage>),
}

/// A generate request as a caller writes it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GenerateRequest {
    /// The prompt.
    pub prompt: Prompt,
    /// How to pick tokens.
    pub sampling: SamplingParams,
    /// When to stop.
    pub stop: StopConditions,
}

/// A request that passed validation: tokenized, within the context, parameters in range.
#[derive(Clone, Debug)]
pub struct ValidGenerateRequest {
    /// The prompt's token ids.
    pub prompt_ids: Vec<u32>,
    /// Validated sampling parameters.
    pub sampling: ValidSamplingParams,
    /// Validated stop conditions.
    pub stop: ValidStopConditions,
}

/// One generated token as it is streamed.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenEvent {
    /// The token and its log-probabilities.
    pub token: SampledToken,
    /// Text that became final with this token (may be empty while a multi-byte character or
    /// a possible stop string is incomplete).
    pub text: String,
}

/// A model's tokenizer, chat template and limits: everything a request needs before compute.
#[derive(Clone)]
pub struct Frontend {
    cfg: ModelConfig,
    tokenizer: Arc<Tokenizer>,
    template: Option<Arc<ChatTemplate>>,
}

impl std::fmt::Debug for Frontend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Frontend")
            .field("cfg", &self.cfg)
            .field("chat_template", &self.template.is_some())
            .finish_non_exhaustive()
    }
}

impl Frontend {
    /// Reads the configuration, tokenizer and chat template of a model (no weights).
    ///
    /// # Errors
    /// When the model cannot be read, or its tokenizer or chat template is invalid.
    pub fn open(location: &ModelLocation) -> Result<Self> {
        let (cfg, tokenizer) = match location {
            ModelLocation::Gguf(path) => {
                let w = GgufWeights::open(path)?;
                (w.config()?, Tokenizer::from_gguf(w.content())?)
            }
            ModelLocation::HfDir(dir) => (
                ModelConfig::from_hf_json(&dir.join("config.json"))?,
                Tokenizer::from_hf_file(&dir.join("tokenizer.json"))?,
            ),
        };
        Self::new(cfg, tokenizer)
    }

    /// A frontend over an already loaded tokenizer.
    ///
    /// # Errors
    /// When the tokenizer's chat template does not compile.
    pub fn new(cfg: ModelConfig, tokenizer: Tokenizer) -> Result<Self> {
        let token_text = |id: Option<u32>| {
            id.and_then(|i| tokenizer.token_text(i))
                .unwrap_or_default()
                .to_owned()
        };
        let template = match tokenizer.chat_template() {
            Some(src) => Some(Arc::new(ChatTemplate::new(
                src,
                &token_text(tokenizer.bos_id()),
                &token_text(tokenizer.eos_id()),
            )?)),
            None => None,
        };
        Ok(Self {
            cfg,
            tokenizer: Arc::new(tokenizer),
            template,
        })
    }

    /// The model's configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The model's tokenizer, shareable with threads that detokenize.
    pub fn tokenizer(&self) -> &Arc<Tokenizer> {
        &self.tokenizer
    }

    /// Renders chat messages with the model's template, ready for generation.
    ///
    /// # Errors
    /// When the model has no chat template, or rendering fails.
    pub fn render_chat(&self, messages: &[ChatMessage]) -> Result<String> {
        let template = self
            .template
            .as_ref()
            .ok_or_else(|| TextError::InvalidArgument {
                field: "messages",
                reason: "this model has no chat template; send a plain prompt".into(),
            })?;
        Ok(template.render(messages, true)?)
    }

    /// The text a prompt is tokenized from (the rendered template for chat).
    ///
    /// # Errors
    /// As [`Frontend::render_chat`].
    pub fn prompt_text<'p>(&self, prompt: &'p Prompt) -> Result<Cow<'p, str>> {
        Ok(match prompt {
            Prompt::Text(t) => Cow::Borrowed(t.as_str()),
            Prompt::Chat(m) => Cow::Owned(self.render_chat(m)?),
        })
    }

    /// Tokenizes a prompt the way generation will.
    ///
    /// # Errors
    /// As [`Frontend::render_chat`] and the tokenizer.
    pub fn tokenize_prompt(&self, prompt: &Prompt) -> Result<Vec<u32>> {
        let text = self.prompt_text(prompt)?;
        Ok(self.tokenizer.encode(&text, true, true)?)
    }

    /// Tokenizes one input of an encoder (with its special tokens, special-token text
    /// recognised, as `transformers` does), truncated to the model's input limit as
    /// sentence-transformers truncates (`context_len`; see `Tokenizer::encode_limited`).
    ///
    /// # Errors
    /// The tokenizer's.
    pub fn tokenize_encoder_input(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self
            .tokenizer
            .encode_limited(text, self.cfg.context_len, true)?)
    }

    /// Validates a request once, for a serving context of `context` tokens (the model's
    /// context length or less, as the KV cache allows): everything generation needs to trust.
    ///
    /// # Errors
    /// [`TextError::InvalidArgument`] / [`TextError::Sampling`] naming the field at fault.
    pub fn validate(&self, req: &GenerateRequest, context: usize) -> Result<ValidGenerateRequest> {
        let prompt_ids = self.tokenize_prompt(&req.prompt)?;
        if prompt_ids.is_empty() {
            return Err(TextError::InvalidArgument {
                field: "prompt",
                reason: "the prompt is empty".into(),
            });
        }
        let context = context.min(self.cfg.context_len);
        if prompt_ids.len() >= context {
            return Err(TextError::InvalidArgument {
                field: "prompt",
                reason: format!(
                    "the prompt is {} tokens, the context holds {context}",
                    prompt_ids.len()
                ),
            });
        }
        let sampling = req.sampling.validate(self.cfg.vocab_size)?;
        let stop = req
            .stop
            .validate(self.cfg.vocab_size, prompt_ids.len(), context)?;
        Ok(ValidGenerateRequest {
            prompt_ids,
            sampling,
            stop,
        })
    }

    /// The output side of one validated request: feed it sampled tokens in order.
    pub fn output(&self, req: &ValidGenerateRequest) -> OutputStream {
        OutputStream {
            tokenizer: Arc::clone(&self.tokenizer),
            stop: StopChecker::new(req.stop.clone()),
            decoder: IncrementalDecoder::new(true),
            finished: None,
        }
    }
}

/// Turns one sequence's sampled tokens into text deltas and decides when it stops.
pub struct OutputStream {
    tokenizer: Arc<Tokenizer>,
    stop: StopChecker,
    decoder: IncrementalDecoder,
    finished: Option<FinishReason>,
}

impl OutputStream {
    /// Records the next sampled token: returns the event to stream and, when this token ends
    /// the sequence, why.
    pub fn push(&mut self, token: SampledToken) -> (TokenEvent, Option<FinishReason>) {
        let is_eog = self.tokenizer.is_eog(token.id);
        let delta = if is_eog {
            String::new()
        } else {
            self.decoder.push(&self.tokenizer, token.id)
        };
        let step = self.stop.push(token.id, is_eog, &delta);
        self.finished = step.finished;
        (
            TokenEvent {
                token,
                text: step.text,
            },
            step.finished,
        )
    }

    /// Why the sequence finished, once it has.
    pub fn finished(&self) -> Option<FinishReason> {
        self.finished
    }

    /// Tokens pushed so far.
    pub fn generated(&self) -> u32 {
        self.stop.generated()
    }

    /// Text held back (a possible stop string) that is final once the sequence has finished;
    /// empty unless it has.
    pub fn flush(&mut self) -> String {
        if self.finished.is_some() {
            self.stop.flush()
        } else {
            String::new()
        }
    }
}
