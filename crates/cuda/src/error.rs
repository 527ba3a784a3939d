//! The error type of the CUDA crate.
//!
//! Every failure a caller can meet is a variant here, never a panic: a missing library names the
//! library and what to do, an invalid parameter names the field, and driver/NVRTC/NCCL failures
//! carry the operation they interrupted.

/// Errors of the CUDA runtime, kernels and collectives.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    /// `libcuda` (the driver API, shipped with the NVIDIA driver) could not be loaded.
    #[error("no CUDA driver: libcuda could not be loaded (install the NVIDIA driver)")]
    NoDriver,
    /// `libnvrtc` could not be loaded.
    #[error(
        "no NVRTC: libnvrtc could not be loaded (run scripts/install-nvrtc.sh and put the \
         directory it prints on LD_LIBRARY_PATH)"
    )]
    NoNvrtc,
    /// `libnccl` could not be loaded.
    #[error("no NCCL: libnccl could not be loaded (install nvidia-nccl-cu12 or the NCCL package)")]
    NoNccl,
    /// `libcublas` could not be loaded.
    #[error(
        "no cuBLAS: libcublas could not be loaded (install nvidia-cublas-cu12 or the CUDA \
         toolkit's libraries, and put them on LD_LIBRARY_PATH)"
    )]
    NoCublas,
    /// The driver loaded but reports no device with this ordinal.
    #[error("no CUDA device {ordinal}: the driver reports {count} device(s)")]
    NoDevice {
        /// The ordinal asked for.
        ordinal: usize,
        /// How many devices the driver sees.
        count: usize,
    },
    /// A caller-supplied parameter is invalid.
    #[error("invalid argument `{field}`: {reason}")]
    InvalidArgument {
        /// The parameter's name.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// NVRTC rejected a kernel module (a bug in this crate, or an NVRTC too old for the arch).
    #[error("NVRTC failed to compile {module} for {arch}: {log}")]
    Compile {
        /// The module's name.
        module: &'static str,
        /// The target architecture, e.g. `sm_90`.
        arch: String,
        /// The compiler's log (or error).
        log: String,
    },
    /// A CUDA driver call failed.
    #[error("CUDA driver error during {op}: {message}")]
    Driver {
        /// What was being done.
        op: &'static str,
        /// The driver's error.
        message: String,
    },
    /// An NCCL call failed.
    #[error("NCCL error during {op}: {message}")]
    Nccl {
        /// What was being done.
        op: &'static str,
        /// NCCL's error.
        message: String,
    },
    /// A cuBLAS call failed.
    #[error("cuBLAS error during {op}: {message}")]
    Cublas {
        /// The operation.
        op: &'static str,
        /// cuBLAS's error.
        message: String,
    },
    /// The model a GPU stage runs refused a load or a step (missing tensors, an invalid
    /// batch, a full KV cache): the same errors the CPU backend gives.
    #[error(transparent)]
    Model(#[from] tessera_model::ModelError),
}

impl CudaError {
    /// An [`CudaError::InvalidArgument`] for `field`.
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field,
            reason: reason.into(),
        }
    }
}

/// `Ok` when buffer `field` holds the `want` elements its shape needs.
///
/// # Errors
/// [`CudaError::InvalidArgument`] naming `field` otherwise.
pub(crate) fn check_len(field: &'static str, got: usize, want: usize) -> Result<()> {
    if got == want {
        Ok(())
    } else {
        Err(CudaError::invalid(
            field,
            format!("has {got} elements, the shape needs {want}"),
        ))
    }
}

/// The range `at..at + n` of buffer `field` of `len` elements.
///
/// # Errors
/// [`CudaError::InvalidArgument`] naming `field` when it runs past the buffer.
pub(crate) fn check_range(
    field: &'static str,
    at: usize,
    n: usize,
    len: usize,
) -> Result<std::ops::Range<usize>> {
    match at.checked_add(n) {
        Some(end) if end <= len => Ok(at..end),
        _ => Err(CudaError::invalid(
            field,
            format!("{at}..+{n} is past its {len} elements"),
        )),
    }
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, CudaError>;
