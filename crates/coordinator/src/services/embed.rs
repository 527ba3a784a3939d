//! Embed requests: validation into a [`ValidEmbedRequest`] once at the edge, and the
//! public service's `Embed` (on a follower, forwarded to the leader like Generate).
//!
//! Validation: the served model must be an encoder (a decoder's cluster refuses `Embed`
//! naming `model`, as an encoder's refuses `Generate`); 1 to [`MAX_EMBED_INPUTS`] inputs,
//! their text [`Limits::max_prompt_bytes`](super::validate::Limits) in all (checked before
//! any tokenization); a text is tokenized with the model's special tokens and truncated to
//! the model's input limit (sentence-transformers' behaviour, so long documents embed by
//! their beginning); token ids are taken as given and must be in the vocabulary, non-empty
//! and within the limit (ids are the caller's exact input: they are not cut).

use std::time::Instant;

use tessera_proto::v1 as pb;
use tessera_text::sampling::Rng;

use super::validate::Validator;
use crate::error::CoordinatorError;

/// The most inputs one request may carry (OpenAI's limit).
pub const MAX_EMBED_INPUTS: usize = 2048;

/// An embed request that passed validation.
#[derive(Clone, Debug)]
pub struct ValidEmbedRequest {
    /// An id for logs and traces.
    pub request_id: String,
    /// Each input's token ids: non-empty, within the vocabulary and the model's input limit.
    pub inputs: Vec<Vec<u32>>,
    /// When the coordinator received it.
    pub received: Instant,
}

impl ValidEmbedRequest {
    /// Tokens over all inputs.
    pub fn tokens(&self) -> usize {
        self.inputs.iter().map(Vec::len).sum()
    }
}

impl Validator {
    /// The checks that cost no tokenization: the model, the number of inputs, their bytes.
    ///
    /// # Errors
    /// INVALID_ARGUMENT naming `model` or `inputs`.
    pub fn check_embed_size(&self, req: &pb::EmbedRequest) -> Result<(), CoordinatorError> {
        self.check_model(&req.model)?;
        if !self.frontend().config().arch.is_encoder() {
            return Err(CoordinatorError::invalid(
                "model",
                format!(
                    "`{}` generates text and has no embeddings: use Generate (an embedding \
                     cluster serves an encoder such as all-minilm-l6-v2)",
                    self.model()
                ),
            ));
        }
        let n = req.inputs.len();
        if n == 0 || n > MAX_EMBED_INPUTS {
            return Err(CoordinatorError::invalid(
                "inputs",
                format!("{n} inputs; give 1 to {MAX_EMBED_INPUTS}"),
            ));
        }
        let max = self.limits().max_prompt_bytes;
        let bytes: usize = req
            .inputs
            .iter()
            .map(|i| match &i.input {
                Some(pb::embed_input::Input::Text(t)) => t.len(),
                Some(pb::embed_input::Input::Ids(ids)) => 4 * ids.ids.len(),
                None => 0,
            })
            .sum();
        if bytes > max {
            return Err(CoordinatorError::invalid(
                "inputs",
                format!("{bytes} bytes in all; at most {max} are accepted"),
            ));
        }
        Ok(())
    }

    /// Validates an embed request (tokenizing its texts).
    ///
    /// # Errors
    /// INVALID_ARGUMENT naming the field at fault (`inputs[3].ids`, …).
    pub fn validate_embed(
        &self,
        req: pb::EmbedRequest,
        received: Instant,
    ) -> Result<ValidEmbedRequest, CoordinatorError> {
        self.check_embed_size(&req)?;
        let frontend = self.frontend();
        let (vocab, limit) = (frontend.config().vocab_size, frontend.config().context_len);
        let mut inputs = Vec::with_capacity(req.inputs.len());
        for (i, input) in req.inputs.into_iter().enumerate() {
            let field = |f: &str| format!("inputs[{i}]{f}");
            let ids = match input.input {
                Some(pb::embed_input::Input::Text(t)) => frontend
                    .tokenize_encoder_input(&t)
                    .map_err(|e| CoordinatorError::invalid(field(".text"), e.to_string()))?,
                Some(pb::embed_input::Input::Ids(ids)) => {
                    let ids = ids.ids;
                    if ids.is_empty() || ids.len() > limit {
                        return Err(CoordinatorError::invalid(
                            field(".ids"),
                            format!("{} ids; give 1 to {limit} (the model's limit)", ids.len()),
                        ));
                    }
                    if let Some(bad) = ids.iter().find(|&&t| t as usize >= vocab) {
                        return Err(CoordinatorError::invalid(
                            field(".ids"),
                            format!("id {bad} is outside the vocabulary of {vocab}"),
                        ));
                    }
                    ids
                }
                None => {
                    return Err(CoordinatorError::invalid(
                        field(""),
                        "required: give text or ids",
                    ));
                }
            };
            inputs.push(ids);
        }
        Ok(ValidEmbedRequest {
            request_id: format!("emb-{:016x}", Rng::entropy_seed()),
            inputs,
            received,
        })
    }
}
