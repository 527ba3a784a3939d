//! The CUDA C sources of every kernel, grouped into NVRTC modules.
//!
//! Each module is compiled as one translation unit: the shared [`prelude`], the attention core
//! where needed, then the module body. Sources are plain strings so they exist (and are
//! checked by tests) whether or not the `cuda` feature is on; the runtime compiles them per
//! device architecture and caches the PTX.

pub mod attn_core;
pub mod decode;
pub mod elementwise;
pub mod merge;
pub mod prefill;
pub mod prefill_tc;
pub mod prelude;

/// One NVRTC translation unit: its name, its source parts in order, and its entry points.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct KernelModule {
    /// Module name (also the NVRTC program name and the cache key).
    pub name: &'static str,
    /// Source fragments, concatenated in order.
    pub parts: &'static [&'static str],
    /// `extern "C"` kernels the module defines.
    pub entries: &'static [&'static str],
}

impl KernelModule {
    /// The complete CUDA C source of the module.
    pub fn source(&self) -> String {
        self.parts.concat()
    }
}

/// Prefill attention.
pub const PREFILL: KernelModule = KernelModule {
    name: "tessera_prefill",
    parts: &[prelude::SOURCE, attn_core::SOURCE, prefill::SOURCE],
    entries: prefill::ENTRIES,
};

/// Tensor-core prefill attention for head dims 64 and 128 (compute capability 8.0+).
pub const PREFILL_TC: KernelModule = KernelModule {
    name: "tessera_prefill_tc",
    parts: &[prelude::SOURCE, prefill_tc::SOURCE],
    entries: prefill_tc::ENTRIES,
};

/// Split-KV paged decode attention and its combine step.
pub const DECODE: KernelModule = KernelModule {
    name: "tessera_decode",
    parts: &[prelude::SOURCE, attn_core::SOURCE, decode::SOURCE],
    entries: decode::ENTRIES,
};

/// Ring-attention (O, LSE) merge and the final cast.
pub const MERGE: KernelModule = KernelModule {
    name: "tessera_merge",
    parts: &[prelude::SOURCE, merge::SOURCE],
    entries: merge::ENTRIES,
};

/// RMSNorm, RoPE, SwiGLU, embedding gather, residual add.
pub const ELEMENTWISE: KernelModule = KernelModule {
    name: "tessera_elementwise",
    parts: &[prelude::SOURCE, elementwise::SOURCE],
    entries: elementwise::ENTRIES,
};

/// Every module; the PTX test compiles each of them.
pub const ALL: &[KernelModule] = &[PREFILL, PREFILL_TC, DECODE, MERGE, ELEMENTWISE];

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    /// Ensures that every declared entry point is defined in its module's source (as a direct
    /// `extern "C"` kernel or through the module's entry macro), and that names are unique.
    #[test]
    fn entries_are_defined_once() {
        let mut seen = HashSet::new();
        for m in ALL {
            let src = m.source();
            for e in m.entries {
                assert!(seen.insert(*e), "{e} declared twice");
                let direct = src.contains(&format!("void {e}("));
                let via_macro = src.contains(&format!("_ENTRY({e},"))
                    || src.contains(&format!("{e},"))
                    || src.contains(&format!("{e})"));
                assert!(direct || via_macro, "{e} not defined in {}", m.name);
            }
        }
    }

    /// Ensures that module names are unique (they are the PTX cache keys).
    #[test]
    fn module_names_unique() {
        let names: HashSet<_> = ALL.iter().map(|m| m.name).collect();
        assert_eq!(names.len(), ALL.len());
    }
}
