//! Which instruction set the kernels use, detected once per process: the one place every
//! kernel (quantized products, attention, elementwise math) asks.
//!
//! The choice can be lowered (never raised) with `TESSERA_ISA=scalar|avx2|avx512|avx512vnni`
//! (`TESSERA_QUANT_ISA`, its older name, is still read) to benchmark or debug one path on a
//! machine that has a better one. Every path computes the same bits (each kernel family has a
//! test that says so), so the override changes speed, never results.

use std::sync::OnceLock;

/// An instruction set level, ordered: a machine with a level has every lower one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Isa {
    /// Portable Rust, no intrinsics.
    Scalar,
    /// AVX2 with FMA and F16C.
    Avx2,
    /// AVX-512 F/BW/VL (plus everything in [`Isa::Avx2`]).
    Avx512,
    /// [`Isa::Avx512`] plus AVX-512 VNNI (`vpdpbusd`).
    Avx512Vnni,
}

impl Isa {
    /// Every level, lowest first.
    pub const ALL: [Isa; 4] = [Isa::Scalar, Isa::Avx2, Isa::Avx512, Isa::Avx512Vnni];

    /// The level's name, as `TESSERA_ISA` spells it.
    pub const fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
            Isa::Avx512Vnni => "avx512vnni",
        }
    }
}

/// The best level this CPU supports, ignoring any override.
pub fn detected() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        let avx2 = is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c");
        let avx512 = avx2
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl");
        if avx512 && is_x86_feature_detected!("avx512vnni") {
            return Isa::Avx512Vnni;
        }
        if avx512 {
            return Isa::Avx512;
        }
        if avx2 {
            return Isa::Avx2;
        }
    }
    Isa::Scalar
}

/// The level the kernels use: [`detected`], lowered by `TESSERA_ISA` (or `TESSERA_QUANT_ISA`)
/// when set.
pub fn isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| {
        let best = detected();
        let var = std::env::var("TESSERA_ISA").or_else(|_| std::env::var("TESSERA_QUANT_ISA"));
        let wanted = var.ok().and_then(|v| {
            Isa::ALL
                .into_iter()
                .find(|i| i.name().eq_ignore_ascii_case(v.trim()))
        });
        match wanted {
            Some(w) if w < best => w,
            _ => best,
        }
    })
}

/// Whether the kernels may use AVX2 with FMA and F16C: [`isa`] is at least [`Isa::Avx2`].
/// Code behind this check may call `#[target_feature(enable = "avx2,fma,f16c")]` functions.
pub fn avx2() -> bool {
    isa() >= Isa::Avx2
}
