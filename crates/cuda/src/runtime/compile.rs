//! NVRTC compilation of the kernel modules, cached per (module, architecture).
//!
//! Compiling a module takes a fraction of a second to seconds, so each is compiled at most once
//! per process and target architecture; every device of that architecture reuses the PTX.
//! Target is the virtual architecture (`compute_XY`): the driver JIT-compiles the PTX for the
//! exact chip at load time.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use crate::error::{CudaError, Result};
use crate::kernels::KernelModule;

use super::libs::probe_nvrtc;

type Cache = Mutex<HashMap<(&'static str, u32), Arc<str>>>;

fn cache() -> &'static Cache {
    static CACHE: OnceLock<Cache> = OnceLock::new();
    CACHE.get_or_init(|| Mutex::new(HashMap::new()))
}

/// NVRTC's name of the virtual architecture for compute capability `cc` (e.g. 90 →
/// `compute_90`).
pub fn arch_name(cc: u32) -> String {
    format!("compute_{cc}")
}

/// PTX of `module` for compute capability `cc` (major·10 + minor, e.g. 80, 90), compiled on
/// first use and cached for the process.
///
/// # Errors
/// [`CudaError::NoNvrtc`] when `libnvrtc` cannot be loaded; [`CudaError::Compile`] with the
/// compiler log when NVRTC rejects the module (or does not know the architecture).
pub fn compile_ptx(module: &KernelModule, cc: u32) -> Result<Arc<str>> {
    probe_nvrtc()?;
    let key = (module.name, cc);
    if let Some(ptx) = lock(cache()).get(&key) {
        return Ok(ptx.clone());
    }
    // Compile outside the lock: other modules may compile concurrently; a rare duplicate
    // compile of the same key is harmless (the results are identical).
    let opts = cudarc::nvrtc::CompileOptions {
        name: Some(format!("{}.cu", module.name)),
        options: vec![
            format!("--gpu-architecture={}", arch_name(cc)),
            "--std=c++17".to_owned(),
        ],
        ..Default::default()
    };
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(module.source(), opts).map_err(|e| {
        let log = match e {
            cudarc::nvrtc::CompileError::CompileError { log, .. } => {
                log.to_string_lossy().into_owned()
            }
            other => format!("{other:?}"),
        };
        CudaError::Compile {
            module: module.name,
            arch: arch_name(cc),
            log,
        }
    })?;
    let bytes = ptx.as_bytes().unwrap_or_default();
    // The image is NUL-terminated text; PTX is ASCII.
    let text = bytes.split(|&b| b == 0).next().unwrap_or_default();
    let ptx: Arc<str> = String::from_utf8_lossy(text).into();
    lock(cache()).insert(key, ptx.clone());
    Ok(ptx)
}

/// Locks the cache, ignoring poisoning: the map is only ever inserted into whole entries.
fn lock(c: &Cache) -> std::sync::MutexGuard<'_, HashMap<(&'static str, u32), Arc<str>>> {
    c.lock().unwrap_or_else(|p| p.into_inner())
}
