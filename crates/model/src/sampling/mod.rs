//! Sampling. (in progress)

/// Sampling errors.
#[derive(Debug, thiserror::Error)]
pub enum SamplingError {
    /// Placeholder.
    #[error("sampling: {0}")]
    Other(String),
}
