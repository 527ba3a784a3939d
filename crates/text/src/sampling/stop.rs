//! Stop conditions and the per-sequence stop checker.
//!
//! A sequence ends on the first of: a stop token id, an end-of-generation token (unless
//! `ignore_eos`), a stop string appearing in the generated text, or `max_tokens` generated
//! tokens. It ends at the first token that completes any stop string (generation cannot wait to
//! see whether a longer one completes later); when one delta completes several, the output is cut
//! at the one that starts earliest. Text that could still become a stop string is held back, so a client never sees the
//! beginning of a stop string that later completes; the stop string itself and the text of a
//! stop or end-of-generation token are never emitted (OpenAI and vLLM behave the same way).

use serde::{Deserialize, Serialize};

use super::SamplingError;

/// The most stop strings one request may give.
pub const MAX_STOP_STRINGS: usize = 16;

/// When a sequence stops, as a request states it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StopConditions {
    /// The most tokens to generate; `>= 1`, and the prompt plus these must fit the context.
    pub max_tokens: u32,
    /// Stop when any of these strings appears in the output (not included in it); non-empty
    /// strings, at most [`MAX_STOP_STRINGS`].
    #[serde(default)]
    pub stop: Vec<String>,
    /// Stop when one of these token ids is sampled (its text is not included).
    #[serde(default)]
    pub stop_token_ids: Vec<u32>,
    /// Keep going past the tokenizer's end-of-generation tokens.
    #[serde(default)]
    pub ignore_eos: bool,
}

/// Stop conditions that passed [`StopConditions::validate`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValidStopConditions {
    cond: StopConditions,
}

impl ValidStopConditions {
    /// The validated conditions.
    pub fn conditions(&self) -> &StopConditions {
        &self.cond
    }
}

/// Why a sequence finished, in OpenAI's terms.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// A stop string, stop token or end-of-generation token (OpenAI `"stop"`).
    Stop,
    /// `max_tokens` reached (OpenAI `"length"`).
    Length,
}

impl FinishReason {
    /// OpenAI's name for it (`"stop"`, `"length"`), as metrics and clients print it.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
        }
    }
}

impl StopConditions {
    /// Checks the conditions for a model with `vocab_size` tokens and `context_len` positions,
    /// for a prompt of `prompt_len` tokens.
    ///
    /// # Errors
    /// [`SamplingError::InvalidField`] naming the field: `max_tokens` 0 or
    /// `prompt_len + max_tokens > context_len`; `stop` with an empty string or more than
    /// [`MAX_STOP_STRINGS`] strings; `stop_token_ids` with an id `>= vocab_size`.
    pub fn validate(
        &self,
        vocab_size: usize,
        prompt_len: usize,
        context_len: usize,
    ) -> Result<ValidStopConditions, SamplingError> {
        if self.max_tokens == 0 {
            return Err(SamplingError::field("max_tokens", "must be at least 1"));
        }
        if prompt_len.saturating_add(self.max_tokens as usize) > context_len {
            return Err(SamplingError::field(
                "max_tokens",
                format!(
                    "the prompt ({prompt_len} tokens) plus max_tokens ({}) exceeds the model's \
                     context of {context_len} tokens; lower max_tokens to at most {}",
                    self.max_tokens,
                    context_len.saturating_sub(prompt_len)
                ),
            ));
        }
        if self.stop.len() > MAX_STOP_STRINGS {
            return Err(SamplingError::field(
                "stop",
                format!(
                    "at most {MAX_STOP_STRINGS} stop strings, got {}",
                    self.stop.len()
                ),
            ));
        }
        if let Some(i) = self.stop.iter().position(String::is_empty) {
            return Err(SamplingError::field(
                "stop",
                format!("stop string {i} is empty"),
            ));
        }
        if let Some(&id) = self
            .stop_token_ids
            .iter()
            .find(|&&id| id as usize >= vocab_size)
        {
            return Err(SamplingError::field(
                "stop_token_ids",
                format!("token id {id} is outside the vocabulary (size {vocab_size})"),
            ));
        }
        Ok(ValidStopConditions { cond: self.clone() })
    }
}

/// What [`StopChecker::push`] decided for one token.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StopStep {
    /// Text that is safe to send to the client now (may be empty).
    pub text: String,
    /// `Some` once the sequence has finished; no more tokens should be generated.
    pub finished: Option<FinishReason>,
}

/// Tracks one sequence's stop state over its generated tokens.
#[derive(Clone, Debug)]
pub struct StopChecker {
    cond: StopConditions,
    /// Bytes in the longest stop string: at most that minus one is ever held back.
    max_stop_len: usize,
    /// Generated tokens seen so far.
    generated: u32,
    /// Text received but not yet emitted: a suffix that may still start a stop string.
    pending: String,
    finished: Option<FinishReason>,
}

impl StopChecker {
    /// A checker for one sequence.
    pub fn new(cond: ValidStopConditions) -> Self {
        let cond = cond.cond;
        let max_stop_len = cond.stop.iter().map(String::len).max().unwrap_or(0);
        Self {
            cond,
            max_stop_len,
            generated: 0,
            pending: String::new(),
            finished: None,
        }
    }

    /// Whether the sequence has finished, and why.
    pub fn finished(&self) -> Option<FinishReason> {
        self.finished
    }

    /// How many tokens have been pushed.
    pub fn generated(&self) -> u32 {
        self.generated
    }

    /// Feeds the next sampled token `id`, whether the tokenizer calls it end-of-generation, and
    /// its text `delta` from the incremental detokenizer. Returns the text safe to emit and, once
    /// the sequence is done, why. After it has finished, further pushes return no text and the
    /// same reason.
    pub fn push(&mut self, id: u32, is_eog: bool, delta: &str) -> StopStep {
        if let Some(reason) = self.finished {
            return StopStep {
                text: String::new(),
                finished: Some(reason),
            };
        }
        self.generated = self.generated.saturating_add(1);

        // A stop or end-of-generation token ends the sequence without its own text; what was
        // held back can no longer become a stop string, so it is released.
        if self.cond.stop_token_ids.contains(&id) || (is_eog && !self.cond.ignore_eos) {
            return self.finish(FinishReason::Stop);
        }

        self.pending.push_str(delta);
        if let Some(at) = self.earliest_stop() {
            self.pending.truncate(at);
            return self.finish(FinishReason::Stop);
        }
        if self.generated >= self.cond.max_tokens {
            return self.finish(FinishReason::Length);
        }

        let hold = self.held_suffix_len();
        let emit_to = self.pending.len() - hold;
        let text = self.pending[..emit_to].to_owned();
        self.pending.drain(..emit_to);
        StopStep {
            text,
            finished: None,
        }
    }

    /// Releases the held-back text, for a sequence ended from outside (client gone, context
    /// full). Returns `""` once finished, since then nothing is held.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }

    fn finish(&mut self, reason: FinishReason) -> StopStep {
        self.finished = Some(reason);
        StopStep {
            text: std::mem::take(&mut self.pending),
            finished: Some(reason),
        }
    }

    /// The byte offset of the earliest stop string occurrence in `pending`.
    ///
    /// Searching all of `pending` suffices: everything before it was already checked when it was
    /// held or emitted, and held text is shorter than the longest stop string.
    fn earliest_stop(&self) -> Option<usize> {
        self.cond
            .stop
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min()
    }

    /// The length of the longest suffix of `pending` that is a proper prefix of some stop string.
    ///
    /// Such a suffix always starts on a char boundary: it starts with the first byte of a stop
    /// string, which is never a UTF-8 continuation byte.
    fn held_suffix_len(&self) -> usize {
        let bytes = self.pending.as_bytes();
        let longest = self.max_stop_len.saturating_sub(1).min(bytes.len());
        (1..=longest)
            .rev()
            .find(|&l| {
                let suffix = &bytes[bytes.len() - l..];
                self.cond
                    .stop
                    .iter()
                    .any(|s| s.len() > l && s.as_bytes().starts_with(suffix))
            })
            .unwrap_or(0)
    }
}

#[cfg(test)]
#[path = "stop_tests.rs"]
mod tests;
