//! Sampling: turning one step's logits into the next token, and deciding when a sequence ends.
//!
//! - [`params`]: the user-facing [`SamplingParams`] and their one-time validation into
//!   [`ValidSamplingParams`].
//! - [`sampler`]: the per-sequence [`Sampler`] (penalties → top-k → top-p → min-p → temperature →
//!   draw), with logprobs.
//! - [`stop`]: [`StopConditions`] and the per-sequence [`StopChecker`] that holds back text that
//!   may still turn into a stop string.
//! - [`rng`]: the crate's own seeded generator, so seeds stay reproducible across upgrades.

pub mod params;
pub mod rng;
pub mod sampler;
pub mod stop;

pub use params::{MAX_TOP_LOGPROBS, SamplingParams, ValidSamplingParams};
pub use rng::Rng;
pub use sampler::{SampledToken, Sampler};
pub use stop::{
    FinishReason, MAX_STOP_STRINGS, StopChecker, StopConditions, StopStep, ValidStopConditions,
};

/// Sampling errors: a request parameter that cannot be honoured.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SamplingError {
    /// A sampling parameter or stop condition is out of range; `field` is the request field's
    /// name (e.g. `"top_p"`, `"max_tokens"`), so the RPC layer can answer `INVALID_ARGUMENT`.
    #[error("invalid `{field}`: {reason}")]
    InvalidField {
        /// The request field at fault, named as in [`SamplingParams`] / [`StopConditions`].
        field: &'static str,
        /// Why it is rejected, with the accepted range.
        reason: String,
    },
}

impl SamplingError {
    /// Shorthand for [`SamplingError::InvalidField`].
    pub(crate) fn field(field: &'static str, reason: impl Into<String>) -> Self {
        Self::InvalidField {
            field,
            reason: reason.into(),
        }
    }

    /// The request field this error is about.
    pub fn field_name(&self) -> &'static str {
        match self {
            Self::InvalidField { field, .. } => field,
        }
    }
}
