//! The kernels' error type: a caller passed buffers or shapes that do not fit, or the compute
//! threads could not start.

/// What can go wrong calling a kernel.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KernelError {
    /// An argument does not fit the kernel (a length, a shape, an instruction set this CPU
    /// lacks). Inside the engine this is a caller bug; at an API edge, a bad request.
    #[error("invalid argument `{field}`: {reason}")]
    InvalidArgument {
        /// The argument at fault.
        field: &'static str,
        /// Why it is rejected.
        reason: String,
    },
    /// The compute thread pool could not start.
    #[error("thread pool: {0}")]
    ThreadPool(String),
}

impl KernelError {
    /// This error's class.
    pub fn kind(&self) -> tessera_format::ErrorKind {
        match self {
            Self::InvalidArgument { .. } => tessera_format::ErrorKind::InvalidArgument,
            Self::ThreadPool(_) => tessera_format::ErrorKind::Internal,
        }
    }
}

/// The crate's result type.
pub type Result<T, E = KernelError> = std::result::Result<T, E>;
