//! tessera's GPU path: attention and Llama elementwise kernels as CUDA C compiled at run time by
//! NVRTC, and NCCL collectives, all through `cudarc` with dynamic loading.
//!
//! Without the `cuda` feature this crate is its host-side logic only — launch planning
//! ([`plan`]), dtype conversion ([`dtype`]), the kernel sources ([`kernels`]) and the error
//! type — so the workspace builds and tests anywhere. With it, [`runtime`] adds the device
//! (context, streams, buffers, per-architecture PTX cache), the kernel launchers and
//! [`runtime::nccl`]. Nothing needs a CUDA toolkit at build time; a machine without a driver,
//! a device or NVRTC gets a typed [`CudaError`], never a panic.
//!
//! Conventions follow `tessera_kernels::attention`: `q`/`out` `(seq_q, n_heads, head_dim)`,
//! `lse` `(seq_q, n_heads)` in f32 natural log, bottom-right causal alignment, GQA head
//! `h → h / (n_heads / n_kv_heads)`, a row with no visible key gives `(0, -inf)`.

pub mod dtype;
pub mod error;
pub mod kernels;
pub mod plan;
#[cfg(feature = "cuda")]
pub mod runtime;
pub mod stage;

pub use dtype::DType;
pub use error::{CudaError, Result};
