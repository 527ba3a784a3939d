//! The paged KV cache. (in progress)

/// KV cache errors.
#[derive(Debug, thiserror::Error)]
pub enum KvCacheError {
    /// No free block is left.
    #[error("KV cache is full")]
    OutOfBlocks,
}
