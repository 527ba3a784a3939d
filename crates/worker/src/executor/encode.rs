//! Steps on an encoder shard: a batch of whole inputs through this stage's layers, nothing
//! kept afterwards (see "Encoder shards" in `worker.proto`).
//!
//! The step is checked whole before anything runs: unique input ids, every input non-empty
//! and within the model's limit, no sequence-state fields (`start`, `sample`, `release`,
//! `prefix_ops`: an encoder has no sequences to start, sample or free), hidden states of the
//! right size on later stages. Rank 0 of a stage computes it; encoders are not split by
//! tensor or context parallelism (the planner does not form groups for them, and the model
//! refuses a slice).

use std::collections::HashSet;

use tessera_kernels::ThreadPool;
use tessera_model::encoder::{Bert, EncoderInput, EncoderOutput};
use tessera_proto::cluster::v1 as pb;

use super::Scratch;
use crate::error::WorkerError;
use crate::hidden;
use crate::shard::StepOutput;

/// Checks an encoder step; returns each input's length.
fn check(req: &pb::StepRequest, context: usize) -> Result<Vec<usize>, WorkerError> {
    let stateful = |field: &str| {
        WorkerError::invalid(
            field,
            "an encoder shard keeps no sequences: steps carry whole inputs only",
        )
    };
    if !req.release.is_empty() {
        return Err(stateful("release"));
    }
    if !req.prefix_ops.is_empty() {
        return Err(stateful("prefix_ops"));
    }
    let mut seen = HashSet::with_capacity(req.seqs.len());
    let mut lens = Vec::with_capacity(req.seqs.len());
    for (i, s) in req.seqs.iter().enumerate() {
        if s.start.is_some() {
            return Err(stateful(&format!("seqs[{i}].start")));
        }
        if s.sample {
            return Err(stateful(&format!("seqs[{i}].sample")));
        }
        if !seen.insert(s.seq_id) {
            return Err(WorkerError::invalid(
                format!("seqs[{i}].seq_id"),
                format!("input {} appears twice in the step", s.seq_id),
            ));
        }
        if s.tokens.is_empty() || s.tokens.len() > context {
            return Err(WorkerError::invalid(
                format!("seqs[{i}].tokens"),
                format!(
                    "{} tokens; an input has 1..={context} (the model's limit)",
                    s.tokens.len()
                ),
            ));
        }
        lens.push(s.tokens.len());
    }
    Ok(lens)
}

/// Runs encoder step `req` on `model`; the last stage (`next == None`) answers the inputs'
/// embeddings, the others forward their hidden states to `next`.
///
/// # Errors
/// INVALID_ARGUMENT for a malformed step (nothing ran); kernel failures.
pub(super) fn encode_step(
    model: &mut Bert,
    next: Option<&str>,
    mut req: pb::StepRequest,
    sc: &mut Scratch,
    pool: &ThreadPool,
) -> Result<StepOutput, WorkerError> {
    let cfg = model.config();
    let (h, context) = (cfg.hidden, cfg.context_len);
    let lens = check(&req, context)?;
    let n: usize = lens.iter().sum();
    let embed = model.spec().embed;
    if embed && !req.hidden.is_empty() {
        return Err(WorkerError::invalid(
            "hidden",
            "the first stage embeds token ids itself; send no hidden states",
        ));
    }
    let ids: Vec<u32>;
    let input = if embed {
        ids = req
            .seqs
            .iter()
            .flat_map(|s| s.tokens.iter().copied())
            .collect();
        EncoderInput::Tokens(&ids)
    } else {
        hidden::decode_into(&req.hidden, n, h, &mut sc.hidden)?;
        EncoderInput::Hidden(&sc.hidden)
    };
    let out = if lens.is_empty() {
        // A step of nothing (the scheduler never sends one, but it is well-formed).
        match next {
            Some(_) => EncoderOutput::Hidden(Vec::new()),
            None => EncoderOutput::Embeddings(Vec::new()),
        }
    } else {
        model.encode(input, &lens, pool)?
    };
    match (out, next) {
        (EncoderOutput::Hidden(x), Some(next)) => {
            let mut bytes = std::mem::take(&mut req.hidden);
            bytes.clear();
            hidden::encode_into(&x, &mut bytes);
            req.hidden = bytes;
            Ok(StepOutput::Forward {
                next: next.to_owned(),
                request: req,
            })
        }
        (EncoderOutput::Embeddings(e), None) => Ok(StepOutput::Answer(pb::StepResponse {
            step_id: req.step_id,
            tokens: Vec::new(),
            embeddings: req
                .seqs
                .iter()
                .zip(e.chunks_exact(h))
                .map(|(s, v)| pb::InputEmbedding {
                    seq_id: s.seq_id,
                    values: v.to_vec(),
                })
                .collect(),
        })),
        // The shard's head flag and its next address are set together at load.
        _ => Err(WorkerError::Executor(
            "encoder stage: its pooling and its next stage disagree".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seq(id: u64, n: usize) -> pb::SeqStep {
        pb::SeqStep {
            seq_id: id,
            tokens: vec![1; n],
            sample: false,
            start: None,
        }
    }

    /// Ensures that an encoder step refuses every sequence-state field, a repeated input id
    /// and inputs that are empty or over the model's limit, naming the field.
    #[test]
    fn refuses_stateful_and_malformed_steps() {
        let ok = pb::StepRequest {
            seqs: vec![seq(1, 3), seq(2, 8)],
            ..Default::default()
        };
        assert_eq!(check(&ok, 8).expect("valid"), [3, 8]);
        let cases: Vec<(&str, pb::StepRequest)> = vec![
            (
                "release",
                pb::StepRequest {
                    release: vec![1],
                    ..ok.clone()
                },
            ),
            (
                "prefix_ops",
                pb::StepRequest {
                    prefix_ops: vec![pb::PrefixOp::default()],
                    ..ok.clone()
                },
            ),
            ("seqs[1].start", {
                let mut r = ok.clone();
                r.seqs[1].start = Some(pb::SeqStart::default());
                r
            }),
            ("seqs[0].sample", {
                let mut r = ok.clone();
                r.seqs[0].sample = true;
                r
            }),
            ("seqs[1].seq_id", {
                let mut r = ok.clone();
                r.seqs[1].seq_id = 1;
                r
            }),
            ("seqs[1].tokens", {
                let mut r = ok.clone();
                r.seqs[1].tokens = vec![1; 9];
                r
            }),
            ("seqs[0].tokens", {
                let mut r = ok.clone();
                r.seqs[0].tokens.clear();
                r
            }),
        ];
        for (field, req) in cases {
            let e = check(&req, 8).expect_err(field);
            assert!(e.to_string().contains(field), "{field}: {e}");
        }
    }
}
