//! Model sources. (in progress)

/// Model source errors.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// Placeholder.
    #[error("source: {0}")]
    Other(String),
}
