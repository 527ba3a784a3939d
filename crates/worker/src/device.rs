//! Which device a worker's shards run on, decided once at start.
//!
//! `--device auto` (the default) uses CUDA device 0 when the driver, a device, cuBLAS and NVRTC
//! are all there, and the CPU otherwise — with no flag and no error on a machine without a GPU:
//! the CUDA libraries are loaded at run time, never linked, so the same binary runs anywhere.
//! `--device cuda:N` insists (a worker told to use a GPU it cannot open does not start);
//! `--device cpu` never looks.
//!
//! `emulated` runs the GPU stage step with its device operations computed on the CPU
//! (`tessera_cuda::stage::HostOps`): slow, and only for testing the GPU path's host-side
//! logic end to end on machines without a GPU. It declares no accelerator.

use std::str::FromStr;

use tessera_cuda::DType;
use tessera_proto::v1 as pb;

use crate::error::WorkerError;

/// Share of a device's free memory at start that the worker declares for weights and KV:
/// the rest is left to cuBLAS's workspace, a step's activations and the CUDA context.
const DEVICE_MEMORY_SHARE: f64 = 0.9;

/// What `--device` asks for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DeviceChoice {
    /// CUDA device 0 where one can be used, else the CPU.
    #[default]
    Auto,
    /// The CPU.
    Cpu,
    /// CUDA device `N`, or the worker does not start.
    Cuda(usize),
    /// The GPU step with host operations (testing only; see the module docs).
    Emulated,
}

impl FromStr for DeviceChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "emulated" => Ok(Self::Emulated),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| format!("{s:?}: expected auto, cpu or cuda:N")),
        }
    }
}

impl std::fmt::Display for DeviceChoice {
    /// The `--device` spelling, which [`DeviceChoice::from_str`] reads back.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
            Self::Emulated => f.write_str("emulated"),
        }
    }
}

/// The device a worker's shards run on, once resolved.
#[derive(Clone, Debug, PartialEq)]
pub enum Backend {
    /// The CPU kernels.
    Cpu,
    /// A CUDA device.
    Cuda {
        /// Its ordinal.
        ordinal: usize,
        /// What registration declares of it.
        info: pb::Device,
        /// Memory free for weights and KV at start ([`DEVICE_MEMORY_SHARE`] of what was free).
        usable_bytes: u64,
    },
    /// The GPU stage step with host operations.
    Emulated,
}

/// The storage dtype of a GPU worker's weights, activations and KV (see
/// `tessera_cuda::stage`'s numerics: f16, measured closer to the CPU engine than bf16).
pub const GPU_DTYPE: DType = DType::F16;

impl Backend {
    /// Resolves `choice` on this machine.
    ///
    /// # Errors
    /// [`WorkerError::Device`] when `cuda:N` was asked for and cannot be used (no driver, no
    /// such device, no cuBLAS, no NVRTC), saying which.
    pub fn resolve(choice: DeviceChoice) -> Result<Self, WorkerError> {
        match choice {
            DeviceChoice::Cpu => Ok(Self::Cpu),
            DeviceChoice::Emulated => Ok(Self::Emulated),
            DeviceChoice::Cuda(n) => Self::open(n),
            DeviceChoice::Auto => match Self::open(0) {
                Ok(b) => Ok(b),
                Err(e) => {
                    tracing::info!(reason = %e, "no usable CUDA device: running on the CPU");
                    Ok(Self::Cpu)
                }
            },
        }
    }

    fn open(ordinal: usize) -> Result<Self, WorkerError> {
        let ops = tessera_cuda::stage::CudaOps::new(ordinal, GPU_DTYPE)?;
        // Kernels compile at their first launch: without NVRTC every step would fail, so a
        // device without it is no device.
        tessera_cuda::runtime::libs::probe_nvrtc()?;
        let dev = ops.device();
        let info = pb::Device {
            id: format!("cuda:{ordinal}"),
            name: dev.name().to_owned(),
            memory_bytes: dev.total_memory()?,
            bandwidth_bytes_s: dev.peak_bandwidth()?,
        };
        let usable_bytes = (dev.free_memory()? as f64 * DEVICE_MEMORY_SHARE) as u64;
        tracing::info!(device = %info.id, name = %info.name, memory = info.memory_bytes,
            usable = usable_bytes, bandwidth = info.bandwidth_bytes_s, "running on a CUDA device");
        Ok(Self::Cuda {
            ordinal,
            info,
            usable_bytes,
        })
    }

    /// The accelerators registration declares: the CUDA device, or none.
    pub fn devices(&self) -> Vec<pb::Device> {
        match self {
            Self::Cuda { info, .. } => vec![info.clone()],
            Self::Cpu | Self::Emulated => Vec::new(),
        }
    }

    /// The memory to declare for weights and KV: on a device, what it had free (capped by
    /// `declared` when that is set); on the CPU, `declared` (0 = no limit).
    pub fn memory_bytes(&self, declared: u64) -> u64 {
        match self {
            Self::Cuda { usable_bytes, .. } if declared == 0 => *usable_bytes,
            Self::Cuda { usable_bytes, .. } => declared.min(*usable_bytes),
            Self::Cpu | Self::Emulated => declared,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ensures that `--device` parses its four forms, prints them back, and names the accepted
    /// ones otherwise.
    #[test]
    fn device_choices_parse() {
        for c in [
            DeviceChoice::Auto,
            DeviceChoice::Cpu,
            DeviceChoice::Cuda(2),
            DeviceChoice::Emulated,
        ] {
            assert_eq!(c.to_string().parse(), Ok(c));
        }
        assert_eq!("auto".parse(), Ok(DeviceChoice::Auto));
        assert_eq!("cpu".parse(), Ok(DeviceChoice::Cpu));
        assert_eq!("cuda:3".parse(), Ok(DeviceChoice::Cuda(3)));
        assert_eq!("emulated".parse(), Ok(DeviceChoice::Emulated));
        for bad in ["gpu", "cuda:", "cuda:x", "cuda:-1", ""] {
            let e = bad.parse::<DeviceChoice>().expect_err(bad);
            assert!(e.contains("cuda:N"), "{e}");
        }
    }

    /// Ensures that `auto` on a machine without a usable GPU runs on the CPU, without an
    /// error, and that `cuda:N` there is an error naming what is missing — never a panic.
    /// (On a machine with a GPU, `auto` resolves to it and declares it.)
    #[test]
    fn auto_falls_back_to_the_cpu_and_cuda_n_insists() {
        let auto = Backend::resolve(DeviceChoice::Auto).expect("auto never fails");
        match &auto {
            Backend::Cpu => {
                assert!(auto.devices().is_empty());
                assert_eq!(auto.memory_bytes(123), 123);
                let e = Backend::resolve(DeviceChoice::Cuda(0)).expect_err("no device here");
                let text = e.to_string();
                assert!(
                    text.contains("driver") || text.contains("device") || text.contains("cuBLAS"),
                    "{text}"
                );
            }
            Backend::Cuda {
                info, usable_bytes, ..
            } => {
                assert_eq!(info.id, "cuda:0");
                assert!(info.memory_bytes >= *usable_bytes && *usable_bytes > 0);
                assert_eq!(auto.memory_bytes(1), 1, "a smaller declaration caps it");
            }
            Backend::Emulated => panic!("auto never emulates"),
        }
        assert_eq!(
            Backend::resolve(DeviceChoice::Cpu).expect("cpu"),
            Backend::Cpu
        );
    }
}
