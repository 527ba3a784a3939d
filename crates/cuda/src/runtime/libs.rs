//! Checks that the dynamically loaded CUDA libraries exist before `cudarc` is asked to use them.
//!
//! `cudarc` loads `libcuda`, `libnvrtc` and `libnccl` lazily on the first call and panics when a
//! library is missing; these probes `dlopen` the same candidate names first and turn absence
//! into a typed error, so callers (and tests that must skip) never see that panic.

use crate::error::{CudaError, Result};

/// `Ok` when `libcuda` (the NVIDIA driver's user-space library) can be loaded.
///
/// # Errors
/// [`CudaError::NoDriver`] when it cannot.
pub fn probe_driver() -> Result<()> {
    // SAFETY: loading the driver library runs its initialisers only; cudarc would do the same.
    if unsafe { cudarc::driver::sys::is_culib_present() } {
        Ok(())
    } else {
        Err(CudaError::NoDriver)
    }
}

/// `Ok` when `libnvrtc` can be loaded.
///
/// # Errors
/// [`CudaError::NoNvrtc`] when it cannot.
pub fn probe_nvrtc() -> Result<()> {
    // SAFETY: as in `probe_driver`.
    if unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        Ok(())
    } else {
        Err(CudaError::NoNvrtc)
    }
}

/// `Ok` when `libcublas` can be loaded.
///
/// # Errors
/// [`CudaError::NoCublas`] when it cannot.
pub fn probe_cublas() -> Result<()> {
    // SAFETY: as in `probe_driver`.
    if unsafe { cudarc::cublas::sys::is_culib_present() } {
        Ok(())
    } else {
        Err(CudaError::NoCublas)
    }
}

/// `Ok` when `libnccl` can be loaded.
///
/// # Errors
/// [`CudaError::NoNccl`] when it cannot.
pub fn probe_nccl() -> Result<()> {
    // SAFETY: as in `probe_driver`.
    if unsafe { cudarc::nccl::sys::is_culib_present() } {
        Ok(())
    } else {
        Err(CudaError::NoNccl)
    }
}

/// NVRTC's version as `(major, minor)`.
///
/// # Errors
/// [`CudaError::NoNvrtc`] when the library is absent, [`CudaError::Compile`] never.
pub fn nvrtc_version() -> Result<(i32, i32)> {
    probe_nvrtc()?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: the library is present (probed above) and both pointers are valid for writes.
    let status = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    if status == cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS {
        Ok((major, minor))
    } else {
        Err(CudaError::Driver {
            op: "nvrtcVersion",
            message: format!("{status:?}"),
        })
    }
}
