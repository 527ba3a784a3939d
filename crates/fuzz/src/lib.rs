//! The bodies of tessera's fuzz targets: every decoder that reads bytes someone else wrote — a
//! model file, a client's request, a peer's message — driven with arbitrary input.
//!
//! | target | input | what runs |
//! |---|---|---|
//! | `gguf` | a GGUF file | header, configuration, tokenizer, footprint, every tensor read |
//! | `safetensors` | a checkpoint directory (config.json + one .safetensors) | the same |
//! | `tokenizer` | flags + text or ids | SmolLM2's tokenizer: encode, decode, streaming decode |
//! | `chat_template` | a template and messages | template compilation and rendering |
//! | `generate_request` | a protobuf `GenerateRequest` | the gRPC API's validation |
//! | `openai` | an HTTP body | the OpenAI API's parsing, then the same validation |
//! | `stage` | steps on pipeline streams | a worker stage receiving hidden states |
//! | `group_frames` | a peer's byte stream | the tensor-parallel frame readers |
//! | `raft_message` | a raft-rs `Message` | decoding, and its entries applied to the cluster state |
//!
//! `fuzz/` runs them under libFuzzer (cargo-fuzz, nightly); `tests/corpus.rs` replays every
//! committed input (`fuzz/corpus/<target>`, `fuzz/regressions/<target>`) on stable, so an
//! input that once crashed stays in the test suite. Each body must not panic on any input;
//! where an invariant holds for every input (a round trip, no leaked KV block) it asserts it,
//! so a violation is a crash the fuzzer reports.
//!
//! The targets that need a real tokenizer or model use SmolLM2 from the model cache (pulled by
//! `tessera model pull smollm2-135m-instruct`, as the test command does).

#![forbid(unsafe_code)]

mod cluster;
mod files;
mod model;
mod requests;
pub mod seeds;
mod text;

/// A fuzz target: its name (the file under `fuzz/fuzz_targets/` and the corpus directory)
/// and its body.
#[derive(Clone, Copy, Debug)]
pub struct Target {
    /// The target's name.
    pub name: &'static str,
    /// Runs one input.
    pub run: fn(&[u8]),
}

/// Every target.
pub const TARGETS: &[Target] = &[
    Target {
        name: "gguf",
        run: files::gguf,
    },
    Target {
        name: "safetensors",
        run: files::safetensors,
    },
    Target {
        name: "tokenizer",
        run: text::tokenizer,
    },
    Target {
        name: "chat_template",
        run: text::chat_template,
    },
    Target {
        name: "generate_request",
        run: requests::generate_request,
    },
    Target {
        name: "openai",
        run: requests::openai,
    },
    Target {
        name: "stage",
        run: cluster::stage,
    },
    Target {
        name: "group_frames",
        run: cluster::group_frames,
    },
    Target {
        name: "raft_message",
        run: cluster::raft_message,
    },
];

/// The target called `name`.
pub fn target(name: &str) -> Option<Target> {
    TARGETS.iter().copied().find(|t| t.name == name)
}

pub use cluster::{group_frames, raft_message, stage, stage_steps};
pub use files::{gguf, safetensors};
pub use requests::{generate_request, openai};
pub use text::{chat_template, tokenizer};
