//! The cluster-protocol targets: what one member receives from another — a previous stage's
//! steps and hidden states, a tensor-parallel peer's frames, a Raft peer's messages. Mutual
//! TLS keeps strangers out; these keep a faulty or compromised member from crashing the rest.

use std::cell::RefCell;

use tessera_worker::fuzz::{Stage, Steps};

use crate::model::smollm2;

/// KV cache tokens of a fuzzed stage: small, so inputs reach the cache's limits.
const KV_TOKENS: u32 = 256;

thread_local! {
    /// A middle stage (layer 1: hidden states in and out) and a last stage (layer 29 and the
    /// head: hidden states in, sampled tokens out), loaded once per thread.
    static STAGES: RefCell<Option<[Stage; 2]>> = const { RefCell::new(None) };
}

/// Steps on pipeline streams into a stage: the first byte's low bit picks the middle or the
/// last stage, the rest is [`Stage::run`]'s records. Asserts what [`Stage::run`] asserts (no
/// sequence or KV block outlives its stream; forwarded hidden states have the right size).
pub fn stage(data: &[u8]) {
    stage_steps(data);
}

/// [`stage`], returning what its steps came to (the seeds' test checks they all run).
pub fn stage_steps(data: &[u8]) -> Steps {
    let Some((&which, records)) = data.split_first() else {
        return Steps::default();
    };
    STAGES.with(|cell| {
        let mut stages = cell.borrow_mut();
        let stages = stages.get_or_insert_with(|| {
            let model = smollm2().to_string_lossy().into_owned();
            [
                Stage::load(&model, 1..2, false, KV_TOKENS).expect("the middle stage loads"),
                Stage::load(&model, 29..30, true, KV_TOKENS).expect("the last stage loads"),
            ]
        });
        stages[usize::from(which & 1)].run(records)
    })
}

/// A tensor-parallel peer's byte stream (see [`tessera_worker::fuzz::group_frames`]).
pub fn group_frames(data: &[u8]) {
    tessera_worker::fuzz::group_frames(data);
}

/// A Raft peer's message (see [`tessera_coordinator::fuzz::raft_message`]).
pub fn raft_message(data: &[u8]) {
    tessera_coordinator::fuzz::raft_message(data);
}
