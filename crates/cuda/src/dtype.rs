//! The 16-bit storage dtypes the kernels take, and their host-side conversions.
//!
//! Device tensors are raw `u16` words; the dtype says how to read them. Host code converts
//! with the `half` crate (round to nearest even, like the kernels' stores).

use half::{bf16, f16};

/// Storage dtype of a device tensor. Arithmetic is always f32.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE 754 binary16.
    F16,
    /// bfloat16 (the top half of an f32).
    Bf16,
}

impl DType {
    /// Both dtypes, for tests and benchmarks that sweep them.
    pub const ALL: [DType; 2] = [DType::F16, DType::Bf16];

    /// Suffix of the kernels instantiated for this dtype (`f16`, `bf16`).
    pub fn suffix(self) -> &'static str {
        match self {
            DType::F16 => "f16",
            DType::Bf16 => "bf16",
        }
    }

    /// Encodes f32 values as 16-bit words, rounding to nearest even.
    pub fn encode(self, xs: &[f32]) -> Vec<u16> {
        xs.iter().map(|&x| self.encode_one(x)).collect()
    }

    /// Decodes 16-bit words to f32 (exact).
    pub fn decode(self, ws: &[u16]) -> Vec<f32> {
        ws.iter().map(|&w| self.decode_one(w)).collect()
    }

    /// Encodes one value.
    pub fn encode_one(self, x: f32) -> u16 {
        match self {
            DType::F16 => f16::from_f32(x).to_bits(),
            DType::Bf16 => bf16::from_f32(x).to_bits(),
        }
    }

    /// Decodes one value.
    pub fn decode_one(self, w: u16) -> f32 {
        match self {
            DType::F16 => f16::from_bits(w).to_f32(),
            DType::Bf16 => bf16::from_bits(w).to_f32(),
        }
    }

    /// `x` rounded through this dtype: what a kernel sees when given `x`.
    pub fn round(self, x: f32) -> f32 {
        self.decode_one(self.encode_one(x))
    }

    /// Absolute tolerance of an output in this dtype against the f64 reference on N(0,1) data
    /// (DESIGN.md "Numerics": fp16 2e-3, bf16 1.6e-2).
    pub fn tolerance(self) -> f64 {
        match self {
            DType::F16 => 2e-3,
            DType::Bf16 => 1.6e-2,
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.suffix())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Ensures that values exactly representable in each dtype round-trip unchanged, and that
    /// the known bit patterns of 1.0 are produced.
    #[test]
    fn exact_values_round_trip() {
        for dt in DType::ALL {
            for x in [0.0f32, -0.0, 1.0, -2.5, 0.125, 65504.0f32.min(3.0e4)] {
                let r = dt.round(x);
                assert_eq!(r.to_bits(), dt.round(r).to_bits(), "{dt} {x}");
            }
        }
        assert_eq!(DType::F16.encode_one(1.0), 0x3c00);
        assert_eq!(DType::Bf16.encode_one(1.0), 0x3f80);
    }

    /// Ensures that bf16 rounds to nearest even on a tie (1 + 2^-8 lies halfway between 1 and
    /// 1 + 2^-7 and must go to the even mantissa, 1).
    #[test]
    fn bf16_ties_to_even() {
        assert_eq!(DType::Bf16.round(1.0 + 1.0 / 256.0), 1.0);
        assert_eq!(
            DType::Bf16.round(1.0 + 3.0 / 256.0),
            1.0 + 4.0 / 256.0,
            "odd mantissa rounds up"
        );
    }

    proptest! {
        /// Ensures that the rounding error stays within half a unit in the last place of each
        /// dtype (relative 2^-11 for f16 normals, 2^-8 for bf16).
        #[test]
        fn rounding_error_is_half_ulp(x in -1000.0f32..1000.0) {
            prop_assume!(x.abs() > 1e-3);
            let e16 = ((DType::F16.round(x) - x) / x).abs();
            let eb = ((DType::Bf16.round(x) - x) / x).abs();
            prop_assert!(e16 <= 1.0 / 2048.0 + 1e-7, "f16 {x}: {e16}");
            prop_assert!(eb <= 1.0 / 256.0 + 1e-7, "bf16 {x}: {eb}");
        }

        /// Ensures that encode/decode of slices agrees with the per-value functions.
        #[test]
        fn slices_match_scalars(xs in proptest::collection::vec(-10.0f32..10.0, 0..40)) {
            for dt in DType::ALL {
                let enc = dt.encode(&xs);
                let dec = dt.decode(&enc);
                for (i, &x) in xs.iter().enumerate() {
                    prop_assert_eq!(enc[i], dt.encode_one(x));
                    prop_assert_eq!(dec[i].to_bits(), dt.round(x).to_bits());
                }
            }
        }
    }
}
