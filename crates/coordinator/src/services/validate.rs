//! Request validation: a proto `GenerateRequest` becomes a [`ValidRequest`] once, at the edge;
//! nothing downstream re-checks it. Defaults follow the proto (OpenAI's), the field names in
//! errors are the proto's paths, and the arithmetic of validation is the engine's own
//! ([`Frontend::validate`]), so a cluster accepts exactly what the engine accepts.

use std::time::Instant;

use tessera_proto::cluster::v1 as cpb;
use tessera_proto::v1 as pb;
use tessera_proto::wire;
use tessera_text::frontend::{Frontend, GenerateRequest, Prompt, ValidGenerateRequest};
use tessera_text::sampling::{Rng, StopConditions};

use crate::error::CoordinatorError;

/// `max_tokens` when the request gives none (capped so the prompt plus it fits the context).
pub const DEFAULT_MAX_TOKENS: u32 = 256;
/// The longest stop string, in bytes (a stop string longer than any prompt is a mistake, and
/// the stop checker holds back that many bytes of output).
pub const MAX_STOP_BYTES: usize = 1024;
/// Too many stop token ids is as much a mistake as too many stop strings.
pub const MAX_STOP_TOKEN_IDS: usize = 1024;

/// Size limits checked on the raw request, before any tokenization: what a request may cost
/// the coordinator before it is known to be valid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// The longest prompt: text bytes, or the chat messages' content and roles together.
    pub max_prompt_bytes: usize,
    /// The most chat messages.
    pub max_messages: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_prompt_bytes: 1 << 20,
            max_messages: 1024,
        }
    }
}

/// A generate request that passed validation.
#[derive(Clone, Debug)]
pub struct ValidRequest {
    /// The caller's id, or one made up.
    pub request_id: String,
    /// Tokenized prompt, validated sampling parameters and stop conditions.
    pub inner: ValidGenerateRequest,
    /// The seed the last stage samples with (the request's, or one drawn for it).
    pub seed: u64,
    /// When the coordinator received it (time to first token counts from here).
    pub received: Instant,
    /// The tokens a resumed request already received (empty for a new one): fewer than
    /// `max_tokens`, every one in the vocabulary.
    pub resume: Vec<u32>,
}

impl ValidRequest {
    /// Tokens this request may occupy in the KV cache: the prompt plus `max_tokens`.
    pub fn max_len(&self) -> usize {
        self.inner.prompt_ids.len() + self.inner.stop.conditions().max_tokens as usize
    }

    /// The sampler of the sequence as the last stage receives it.
    pub fn seq_start(&self) -> cpb::SeqStart {
        let p = self.inner.sampling.params();
        cpb::SeqStart {
            sampling: Some(pb::SamplingParams {
                seed: Some(self.seed),
                ..wire::sampling_to_proto(p)
            }),
            logprobs: p.logprobs,
            top_logprobs: p.top_logprobs,
            seed: self.seed,
            prompt: self.inner.prompt_ids.clone(),
            // Set by the scheduler when the prompt starts with cached blocks.
            cached_tokens: 0,
            cached_blocks: Vec::new(),
            generated: Vec::new(),
        }
    }
}

/// Validates requests for one model and serving context.
#[derive(Clone, Debug)]
pub struct Validator {
    frontend: Frontend,
    model: String,
    context: usize,
    limits: Limits,
}

impl Validator {
    /// A validator for `model` (its name as clients give it) with `context` tokens per sequence
    /// (the model's context, or less when the KV cache is smaller).
    pub fn new(frontend: Frontend, model: &str, context: usize) -> Self {
        let context = context.min(frontend.config().context_len);
        Self {
            frontend,
            model: model.to_owned(),
            context,
            limits: Limits::default(),
        }
    }

    /// The validator with these size limits.
    #[must_use]
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// The size limits.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Checks what a request costs before anything expensive is done with it: prompt bytes,
    /// message count, stop strings. Cheap (no tokenization), so a follower runs it before
    /// forwarding and the leader before it tokenizes.
    ///
    /// # Errors
    /// INVALID_ARGUMENT naming the field and the limit.
    pub fn check_size(&self, req: &pb::GenerateRequest) -> Result<(), CoordinatorError> {
        let max = self.limits.max_prompt_bytes;
        let (field, bytes) = match &req.prompt {
            Some(pb::generate_request::Prompt::Text(t)) => ("prompt", t.len()),
            Some(pb::generate_request::Prompt::Chat(c)) => {
                if c.messages.len() > self.limits.max_messages {
                    return Err(CoordinatorError::invalid(
                        "chat.messages",
                        format!(
                            "{} messages; at most {} are accepted",
                            c.messages.len(),
                            self.limits.max_messages
                        ),
                    ));
                }
                let bytes = c
                    .messages
                    .iter()
                    .map(|m| m.content.len() + m.role.len())
                    .sum();
                ("chat.messages", bytes)
            }
            None => ("prompt", 0),
        };
        if bytes > max {
            return Err(CoordinatorError::invalid(
                field,
                format!("{bytes} bytes; prompts of at most {max} bytes are accepted"),
            ));
        }
        if let Some(r) = &req.resume
            && r.tokens.len() > self.context
        {
            return Err(CoordinatorError::invalid(
                "resume.tokens",
                format!(
                    "{} tokens; a sequence holds at most {}",
                    r.tokens.len(),
                    self.context
                ),
            ));
        }
        if let Some(stop) = &req.stop {
            if let Some((i, s)) = stop
                .stop
                .iter()
                .enumerate()
                .find(|(_, s)| s.len() > MAX_STOP_BYTES)
            {
                return Err(CoordinatorError::invalid(
                    "stop.stop",
                    format!(
                        "string #{} is {} bytes; at most {MAX_STOP_BYTES}",
                        i + 1,
                        s.len()
                    ),
                ));
            }
            if stop.stop_token_ids.len() > MAX_STOP_TOKEN_IDS {
                return Err(CoordinatorError::invalid(
                    "stop.stop_token_ids",
                    format!(
                        "{} ids; at most {MAX_STOP_TOKEN_IDS}",
                        stop.stop_token_ids.len()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The model's frontend.
    pub fn frontend(&self) -> &Frontend {
        &self.frontend
    }

    /// The longest sequence a request may reach.
    pub fn context(&self) -> usize {
        self.context
    }

    /// The name of the model this cluster serves.
    pub fn model(&self) -> &str {
        &self.model
    }

    /// Checks a requested model name (empty = the default).
    ///
    /// # Errors
    /// INVALID_ARGUMENT on `model` when it is not the one served.
    pub fn check_model(&self, model: &str) -> Result<(), CoordinatorError> {
        if model.is_empty() || model == self.model {
            Ok(())
        } else {
            Err(CoordinatorError::invalid(
                "model",
                format!(
                    "unknown model `{}`; this cluster serves `{}`",
                    crate::error::clip(model, 64),
                    self.model
                ),
            ))
        }
    }

    /// The prompt of a generate or tokenize request.
    ///
    /// # Errors
    /// INVALID_ARGUMENT on `prompt` when neither text nor chat is given.
    pub fn prompt(
        text: Option<String>,
        chat: Option<pb::ChatMessages>,
    ) -> Result<Prompt, CoordinatorError> {
        wire::prompt(text, chat)
            .ok_or_else(|| CoordinatorError::invalid("prompt", "required: give text or chat"))
    }

    /// Validates a generate request received at `received`.
    ///
    /// # Errors
    /// INVALID_ARGUMENT naming the field's proto path.
    pub fn validate(
        &self,
        req: pb::GenerateRequest,
        received: Instant,
    ) -> Result<ValidRequest, CoordinatorError> {
        self.check_model(&req.model)?;
        if self.frontend.config().arch.is_encoder() {
            return Err(CoordinatorError::invalid(
                "model",
                format!(
                    "`{}` is an embedding model (an encoder): use Embed or /v1/embeddings",
                    self.model
                ),
            ));
        }
        self.check_size(&req)?;
        let (text, chat) = match req.prompt {
            Some(pb::generate_request::Prompt::Text(t)) => (Some(t), None),
            Some(pb::generate_request::Prompt::Chat(c)) => (None, Some(c)),
            None => (None, None),
        };
        let prompt = Self::prompt(text, chat)?;
        let s = req.sampling.unwrap_or_default();
        let stop = req.stop.unwrap_or_default();
        let resume = req.resume.map(|r| r.tokens).unwrap_or_default();
        if !resume.is_empty() && s.seed.is_none() && s.temperature.unwrap_or(1.0) != 0.0 {
            // A fresh seed would sample other tokens than the broken stream would have.
            return Err(CoordinatorError::invalid(
                "sampling.seed",
                "a resumed request that samples needs the seed its first response named \
                 (the x-tessera-seed header)",
            ));
        }
        let seed = s.seed.unwrap_or_else(Rng::entropy_seed);
        let sampling = wire::sampling_params(Some(s), seed, req.logprobs, req.top_logprobs);
        let max_tokens = match stop.max_tokens {
            Some(m) => m,
            None => {
                let prompt_len = self.frontend.tokenize_prompt(&prompt)?.len();
                let room = self.context.saturating_sub(prompt_len).max(1);
                DEFAULT_MAX_TOKENS.min(u32::try_from(room).unwrap_or(u32::MAX))
            }
        };
        let model_req = GenerateRequest {
            prompt,
            sampling,
            stop: StopConditions {
                max_tokens,
                stop: stop.stop,
                stop_token_ids: stop.stop_token_ids,
                ignore_eos: stop.ignore_eos,
            },
        };
        let inner = self.frontend.validate(&model_req, self.context)?;
        let vocab = self.frontend.config().vocab_size;
        if let Some(t) = resume.iter().find(|&&t| t as usize >= vocab) {
            return Err(CoordinatorError::invalid(
                "resume.tokens",
                format!("token id {t} is outside the vocabulary of {vocab}"),
            ));
        }
        let max_tokens = inner.stop.conditions().max_tokens as usize;
        if resume.len() >= max_tokens {
            return Err(CoordinatorError::invalid(
                "resume.tokens",
                format!(
                    "{} tokens already reach max_tokens ({max_tokens}): nothing is left to \
                     generate",
                    resume.len()
                ),
            ));
        }
        let request_id = if req.request_id.is_empty() {
            format!("req-{:016x}", Rng::entropy_seed())
        } else {
            req.request_id
        };
        Ok(ValidRequest {
            request_id,
            inner,
            seed,
            received,
            resume,
        })
    }
}
