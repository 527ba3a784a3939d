//! Checks on a step before it changes anything, and the sampler parameters it carries.

use std::collections::HashSet;

use tessera_proto::cluster::v1 as pb;
use tessera_text::sampling::SamplingParams;

use crate::error::WorkerError;
use crate::seqs::SeqTable;

/// Checks a step against the live sequences before anything changes (but after its prefix
/// ops and releases); returns its token count.
pub(super) fn check_step(
    req: &pb::StepRequest,
    seqs: &SeqTable,
    vocab: usize,
    context: usize,
    block_size: usize,
) -> Result<usize, WorkerError> {
    let mut seen = HashSet::with_capacity(req.seqs.len());
    let mut n = 0;
    for (i, s) in req.seqs.iter().enumerate() {
        if !seen.insert(s.seq_id) {
            return Err(WorkerError::invalid(
                format!("seqs[{i}].seq_id"),
                format!("sequence {} appears twice in the step", s.seq_id),
            ));
        }
        let live = seqs.contains(s.seq_id);
        match (&s.start, live) {
            (Some(_), true) => {
                return Err(WorkerError::invalid(
                    format!("seqs[{i}].start"),
                    format!("sequence {} is already live", s.seq_id),
                ));
            }
            (None, false) => {
                return Err(WorkerError::invalid(
                    format!("seqs[{i}].seq_id"),
                    format!(
                        "unknown sequence {} (a sequence's first step must carry start)",
                        s.seq_id
                    ),
                ));
            }
            _ => {}
        }
        if s.tokens.is_empty() {
            return Err(WorkerError::invalid(format!("seqs[{i}].tokens"), "empty"));
        }
        if let Some(t) = s.tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(WorkerError::invalid(
                format!("seqs[{i}].tokens"),
                format!("token id {t} is outside the vocabulary of {vocab}"),
            ));
        }
        let cached = s.start.as_ref().map_or(0, |st| st.cached_tokens as usize);
        if let Some(st) = &s.start
            && cached != st.cached_blocks.len() * block_size
        {
            return Err(WorkerError::invalid(
                format!("seqs[{i}].start.cached_tokens"),
                format!(
                    "{cached} is not the {} cached blocks of {block_size} tokens",
                    st.cached_blocks.len()
                ),
            ));
        }
        if let Some(st) = &s.start {
            // A migrated sequence's sampler state: its tokens count in the penalties, so
            // they must be ids of this vocabulary, and they sit inside the context.
            if let Some(t) = st.generated.iter().find(|&&t| t as usize >= vocab) {
                return Err(WorkerError::invalid(
                    format!("seqs[{i}].start.generated"),
                    format!("token id {t} is outside the vocabulary of {vocab}"),
                ));
            }
            if st.generated.len() >= context {
                return Err(WorkerError::invalid(
                    format!("seqs[{i}].start.generated"),
                    format!(
                        "{} generated tokens leave no room in the context of {context}",
                        st.generated.len()
                    ),
                ));
            }
        }
        if s.tokens.len() + cached > context {
            return Err(WorkerError::invalid(
                format!("seqs[{i}].tokens"),
                format!(
                    "{} tokens after {cached} cached exceed the context of {context}",
                    s.tokens.len()
                ),
            ));
        }
        n += s.tokens.len();
    }
    Ok(n)
}

/// The engine's sampling parameters for a sequence, as the proto states them (unset fields
/// take the documented defaults; the seed is always the coordinator's).
pub(crate) fn sampling_params(start: &pb::SeqStart) -> SamplingParams {
    tessera_proto::wire::sampling_params(
        start.sampling,
        start.seed,
        start.logprobs,
        start.top_logprobs,
    )
}

/// An invalid sampling field of `seqs[i]`, named by its proto path.
pub(super) fn sampling_error(i: usize, e: &tessera_text::sampling::SamplingError) -> WorkerError {
    let field = e.field_name();
    let path = match field {
        "logprobs" | "top_logprobs" => format!("seqs[{i}].start.{field}"),
        _ => format!("seqs[{i}].start.sampling.{field}"),
    };
    let tessera_text::sampling::SamplingError::InvalidField { reason, .. } = e;
    WorkerError::invalid(path, reason.clone())
}
