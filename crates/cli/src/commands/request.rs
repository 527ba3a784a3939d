//! What a generate request asks for besides its prompt: chat formatting, sampling and stop
//! conditions, and logprobs. One clap [`Args`] struct, flattened into `tessera generate` and
//! `tessera up --prompt`, so the two commands take the same flags with the same defaults (they
//! used to differ: `up` sampled greedily and could not pass penalties, top-p or a seed).
//!
//! The flags are read in one place too: [`RequestArgs::to_proto`] for a cluster,
//! [`RequestArgs::sampling`] and [`RequestArgs::stop_conditions`] for the embedded engine.

use clap::Args;
use tessera_proto::v1 as pb;
use tessera_text::sampling::{SamplingParams, StopConditions};
use tessera_text::tokenizer::ChatMessage;

/// Chat formatting, sampling, stop conditions and logprobs of a generate request.
///
/// In `tessera up` these only make sense with `--prompt`: every flag given explicitly
/// `requires = "prompt"`, which names `up`'s `--prompt` there and `generate`'s positional
/// prompt (always present) here. Defaults do not trigger `requires`.
#[derive(Args, Debug, Clone)]
pub struct RequestArgs {
    /// Apply the model's chat template to the prompt (as a user message).
    #[arg(long, requires = "prompt")]
    pub chat: bool,
    /// A system message, with --chat.
    #[arg(long, requires = "chat")]
    pub system: Option<String>,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.7, requires = "prompt")]
    pub temperature: f32,
    /// Keep only the k most likely tokens (0: off).
    #[arg(long, default_value_t = 40, requires = "prompt")]
    pub top_k: u32,
    /// Nucleus sampling mass (1: off).
    #[arg(long, default_value_t = 0.95, requires = "prompt")]
    pub top_p: f32,
    /// Drop tokens below this fraction of the top token's probability (0: off).
    #[arg(long, default_value_t = 0.05, requires = "prompt")]
    pub min_p: f32,
    /// Repetition penalty over prompt and output (1: off).
    #[arg(long, default_value_t = 1.0, requires = "prompt")]
    pub repetition_penalty: f32,
    /// Frequency penalty over the output.
    #[arg(long, default_value_t = 0.0, requires = "prompt")]
    pub frequency_penalty: f32,
    /// Presence penalty over the output.
    #[arg(long, default_value_t = 0.0, requires = "prompt")]
    pub presence_penalty: f32,
    /// Random seed; the same seed gives the same output.
    #[arg(long, requires = "prompt")]
    pub seed: Option<u64>,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 256, requires = "prompt")]
    pub max_tokens: u32,
    /// Stop when this text is produced (repeatable).
    #[arg(long, requires = "prompt")]
    pub stop: Vec<String>,
    /// Print the top-N log-probabilities of each token to standard error.
    #[arg(long, default_value_t = 0, requires = "prompt")]
    pub logprobs: u32,
}

impl RequestArgs {
    /// The chat messages for `prompt`: the system message when given, then the prompt as the
    /// user's.
    pub fn messages(&self, prompt: &str) -> Vec<ChatMessage> {
        let mut messages = Vec::new();
        if let Some(system) = &self.system {
            messages.push(ChatMessage {
                role: "system".into(),
                content: system.clone(),
            });
        }
        messages.push(ChatMessage {
            role: "user".into(),
            content: prompt.to_owned(),
        });
        messages
    }

    /// The sampling parameters, as the engine takes them.
    pub fn sampling(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repetition_penalty: self.repetition_penalty,
            frequency_penalty: self.frequency_penalty,
            presence_penalty: self.presence_penalty,
            seed: self.seed,
            logprobs: self.logprobs > 0,
            top_logprobs: self.logprobs,
        }
    }

    /// The stop conditions, as the engine takes them.
    pub fn stop_conditions(&self) -> StopConditions {
        StopConditions {
            max_tokens: self.max_tokens,
            stop: self.stop.clone(),
            stop_token_ids: Vec::new(),
            ignore_eos: false,
        }
    }

    /// The request for `prompt` to `model` ("": the cluster's own) as the public gRPC API
    /// spells it.
    pub fn to_proto(&self, prompt: &str, model: &str) -> pb::GenerateRequest {
        let prompt = if self.chat {
            pb::generate_request::Prompt::Chat(pb::ChatMessages {
                messages: self
                    .messages(prompt)
                    .into_iter()
                    .map(|m| pb::ChatMessage {
                        role: m.role,
                        content: m.content,
                    })
                    .collect(),
            })
        } else {
            pb::generate_request::Prompt::Text(prompt.to_owned())
        };
        let sampling = self.sampling();
        let stop = self.stop_conditions();
        pb::GenerateRequest {
            request_id: String::new(),
            model: model.to_owned(),
            prompt: Some(prompt),
            sampling: Some(pb::SamplingParams {
                temperature: Some(sampling.temperature),
                top_k: sampling.top_k,
                top_p: Some(sampling.top_p),
                min_p: sampling.min_p,
                repetition_penalty: Some(sampling.repetition_penalty),
                frequency_penalty: sampling.frequency_penalty,
                presence_penalty: sampling.presence_penalty,
                seed: sampling.seed,
            }),
            stop: Some(pb::StopConditions {
                max_tokens: Some(stop.max_tokens),
                stop: stop.stop,
                stop_token_ids: stop.stop_token_ids,
                ignore_eos: stop.ignore_eos,
            }),
            logprobs: sampling.logprobs,
            top_logprobs: sampling.top_logprobs,
            // Set by the client when it resumes a broken stream.
            resume: None,
        }
    }
}
