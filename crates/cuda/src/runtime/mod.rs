//! The CUDA runtime (feature `cuda`): library probes, NVRTC compilation with a per-architecture
//! PTX cache, the device with its buffers, the kernel launchers and NCCL.
//!
//! Order of use: [`Device::new`] probes `libcuda` (and `libnvrtc` on first compile) before
//! touching `cudarc`, whose own loaders panic when a library is missing; every later failure is
//! a [`CudaError`](crate::CudaError).

pub mod attention;
pub mod compile;
pub mod device;
pub mod elementwise;
pub mod libs;
pub mod nccl;

pub use device::{Device, Tensor16};
