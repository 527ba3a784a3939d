//! Compiles every kernel module to PTX with NVRTC, for each architecture we target.
//!
//! Needs only `libnvrtc` (no driver, no GPU): CI installs the PyPI wheel with
//! `scripts/install-nvrtc.sh` and puts it on `LD_LIBRARY_PATH` (`scripts/test.sh` does both).
//! Without the library the tests fail saying how to get it: CI cannot silently stop compiling
//! the kernels.
#![cfg(feature = "cuda")]

use tessera_cuda::CudaError;
use tessera_cuda::kernels::ALL;
use tessera_cuda::runtime::compile::compile_ptx;
use tessera_cuda::runtime::libs::{nvrtc_version, probe_nvrtc};

/// Ampere (A100), Ada (L4/RTX 40), Hopper (H100/H200).
const ARCHS: [u32; 3] = [80, 89, 90];

/// Checks that NVRTC is there; its absence is a failure, never a skip.
fn require_nvrtc() {
    if let Err(e) = probe_nvrtc() {
        panic!(
            "{e}: run scripts/install-nvrtc.sh and put the directory it prints on \
             LD_LIBRARY_PATH (scripts/test.sh does both)"
        );
    }
}

/// Ensures that every kernel module compiles for every target architecture and that the PTX
/// defines each of the module's declared entry points.
#[test]
fn every_kernel_compiles_to_ptx() {
    require_nvrtc();
    let (major, minor) = nvrtc_version().expect("version");
    eprintln!("NVRTC {major}.{minor}");
    for cc in ARCHS {
        for module in ALL {
            let ptx = match compile_ptx(module, cc) {
                Ok(p) => p,
                Err(CudaError::Compile { log, .. }) => {
                    panic!("{} for compute_{cc} failed:\n{log}", module.name)
                }
                Err(e) => panic!("{}: {e}", module.name),
            };
            assert!(ptx.contains(&format!(".target sm_{cc}")), "{}", module.name);
            for entry in module.entries {
                assert!(
                    ptx.contains(&format!(".entry {entry}(")),
                    "{entry} missing from the PTX of {} for compute_{cc}",
                    module.name
                );
            }
            // The attention kernels keep their per-row arrays in registers; a `.local` array
            // would mean an unrolled index became dynamic. (The elementwise module may use
            // local memory: libdevice's f64 sincos argument reduction does.)
            if module.name.contains("prefill") || module.name.contains("decode") {
                assert!(!ptx.contains(".local"), "{} uses local memory", module.name);
            }
            if module.name == "tessera_prefill_tc" {
                assert!(
                    ptx.contains("mma.sync.aligned.m16n8k16"),
                    "no tensor-core mma"
                );
                assert!(
                    ptx.contains("ldmatrix.sync.aligned.m8n8.x2.trans"),
                    "no ldmatrix"
                );
            }
            eprintln!(
                "{} compute_{cc}: {} entries, {} bytes of PTX",
                module.name,
                module.entries.len(),
                ptx.len()
            );
        }
    }
}

/// Ensures that the PTX cache returns the same text for a second request.
#[test]
fn compile_is_cached() {
    require_nvrtc();
    let a = compile_ptx(&ALL[2], 90).expect("compile");
    let b = compile_ptx(&ALL[2], 90).expect("compile");
    assert!(std::sync::Arc::ptr_eq(&a, &b));
}
