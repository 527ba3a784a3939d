//! The wire boundary: every translation between the protocol's messages and the engine's
//! types, written once, with one set of defaults, used by every service and client.
//!
//! - errors: each crate's error says its [`ErrorKind`]; [`code`] is the one gRPC code per kind;
//! - sampling parameters and stop conditions: proto → engine, unset fields taking the engine's
//!   documented defaults;
//! - sampled tokens, logprobs and finish reasons: engine → proto.

use tessera_format::ErrorKind;
use tessera_text::frontend::Prompt;
use tessera_text::sampling::{FinishReason, SampledToken, SamplingParams};
use tessera_text::tokenizer::ChatMessage;
use tonic::Code;

use crate::cluster::v1 as cpb;
use crate::v1 as pb;

/// The gRPC code every service answers a failure of `kind` with.
pub fn code(kind: ErrorKind) -> Code {
    match kind {
        ErrorKind::InvalidArgument => Code::InvalidArgument,
        ErrorKind::NotFound => Code::NotFound,
        ErrorKind::ResourceExhausted => Code::ResourceExhausted,
        ErrorKind::Internal => Code::Internal,
    }
}

/// A token sampled for sequence `seq_id`, with its logprobs, as the last stage reports it.
pub fn sampled_token(seq_id: u64, t: SampledToken) -> cpb::SampledToken {
    cpb::SampledToken {
        seq_id,
        id: t.id,
        logprob: t.logprob,
        top_logprobs: t
            .top_logprobs
            .into_iter()
            .map(|(id, logprob)| pb::TokenLogprob {
                id,
                logprob,
                ..Default::default()
            })
            .collect(),
    }
}

/// The engine's sampling parameters from the proto's: unset fields take the engine's defaults
/// ([`SamplingParams::default`], which the proto documents), `seed` is the one the sequence
/// samples with (the caller's, or one drawn for it).
pub fn sampling_params(
    p: Option<pb::SamplingParams>,
    seed: u64,
    logprobs: bool,
    top_logprobs: u32,
) -> SamplingParams {
    let d = SamplingParams::default();
    let p = p.unwrap_or_default();
    SamplingParams {
        temperature: p.temperature.unwrap_or(d.temperature),
        top_k: p.top_k,
        top_p: p.top_p.unwrap_or(d.top_p),
        min_p: p.min_p,
        repetition_penalty: p.repetition_penalty.unwrap_or(d.repetition_penalty),
        frequency_penalty: p.frequency_penalty,
        presence_penalty: p.presence_penalty,
        seed: Some(seed),
        logprobs,
        top_logprobs,
    }
}

/// The proto's sampling parameters from the engine's, every field set (so the receiver's
/// defaults never apply).
pub fn sampling_to_proto(p: &SamplingParams) -> pb::SamplingParams {
    pb::SamplingParams {
        temperature: Some(p.temperature),
        top_k: p.top_k,
        top_p: Some(p.top_p),
        min_p: p.min_p,
        repetition_penalty: Some(p.repetition_penalty),
        frequency_penalty: p.frequency_penalty,
        presence_penalty: p.presence_penalty,
        seed: p.seed,
    }
}

/// The engine's chat messages from the proto's.
pub fn chat_messages(c: pb::ChatMessages) -> Vec<ChatMessage> {
    c.messages
        .into_iter()
        .map(|m| ChatMessage {
            role: m.role,
            content: m.content,
        })
        .collect()
}

/// The proto's chat messages from the engine's.
pub fn chat_to_proto(messages: &[ChatMessage]) -> pb::ChatMessages {
    pb::ChatMessages {
        messages: messages
            .iter()
            .map(|m| pb::ChatMessage {
                role: m.role.clone(),
                content: m.content.clone(),
            })
            .collect(),
    }
}

/// A request's prompt: text if given, else chat messages; `None` when it has neither.
pub fn prompt(text: Option<String>, chat: Option<pb::ChatMessages>) -> Option<Prompt> {
    match (text, chat) {
        (Some(t), _) => Some(Prompt::Text(t)),
        (None, Some(c)) => Some(Prompt::Chat(chat_messages(c))),
        (None, None) => None,
    }
}

/// The proto's finish reason from the engine's.
pub fn finish_reason(r: FinishReason) -> pb::FinishReason {
    match r {
        FinishReason::Stop => pb::FinishReason::Stop,
        FinishReason::Length => pb::FinishReason::Length,
    }
}

/// The engine's finish reason from the proto's wire value; `None` when unspecified or unknown.
pub fn finish_reason_from_proto(r: i32) -> Option<FinishReason> {
    match pb::FinishReason::try_from(r) {
        Ok(pb::FinishReason::Stop) => Some(FinishReason::Stop),
        Ok(pb::FinishReason::Length) => Some(FinishReason::Length),
        _ => None,
    }
}
