//! CUDA C shared by every kernel module: 16-bit storage conversions and warp reductions.
//!
//! Kernels keep tensors as raw 16-bit words (`u16`) and convert with the tiny `F16`/`BF16`
//! policy structs of `cu/prelude.cu` instead of including `cuda_fp16.h`/`cuda_bf16.h`: NVRTC
//! then needs no header search path at all, which is what lets the PyPI NVRTC wheel compile
//! everything on a machine without a CUDA toolkit. All arithmetic is f32.

/// The prelude source (`cu/prelude.cu`), prepended to every module.
pub const SOURCE: &str = include_str!("cu/prelude.cu");
