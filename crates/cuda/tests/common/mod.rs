//! Helpers shared by the GPU test and benchmark binaries: device acquisition, deterministic
//! N(0,1) data, and error measurement.
#![allow(dead_code)]

use tessera_cuda::runtime::Device;

/// Device 0. The tests that call this are `#[ignore]`d (a machine without a GPU reports
/// them skipped, never passed); run on purpose (`--ignored`, as
/// `scripts/gpu-check.sh` does), a missing device is a failure saying what is missing.
///
/// # Panics
/// When there is no usable device.
pub fn device() -> Device {
    Device::new(0).unwrap_or_else(|e| panic!("this test needs a CUDA device: {e}"))
}

/// SplitMix64 with Box–Muller normals: deterministic across platforms.
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed ^ 0x9e37_79b9_7f4a_7c15)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1).
    pub fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    /// `n` standard normal values.
    pub fn normals(&mut self, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| {
                let (u, v) = (self.uniform(), self.uniform());
                ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()) as f32
            })
            .collect()
    }

    /// A random permutation of `0..n`.
    pub fn permutation(&mut self, n: usize) -> Vec<u32> {
        let mut p: Vec<u32> = (0..n as u32).collect();
        for i in (1..n).rev() {
            let j = (self.next_u64() % (i as u64 + 1)) as usize;
            p.swap(i, j);
        }
        p
    }
}

/// Largest absolute difference between `got` and `want`.
pub fn max_abs(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len(), "length mismatch");
    got.iter()
        .zip(want)
        .map(|(&g, &w)| {
            if g as f64 == w {
                0.0
            } else {
                (g as f64 - w).abs()
            }
        })
        .fold(0.0, f64::max)
}

/// Largest LSE error, relative to max(1, |lse|) (f32 carries ~7 digits of the value); both
/// -inf counts as exact, one -inf as infinite error.
pub fn lse_err(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len(), "length mismatch");
    got.iter()
        .zip(want)
        .map(|(&g, &w)| {
            if w == f64::NEG_INFINITY || g == f32::NEG_INFINITY {
                if g as f64 == w { 0.0 } else { f64::INFINITY }
            } else {
                (g as f64 - w).abs() / w.abs().max(1.0)
            }
        })
        .fold(0.0, f64::max)
}

/// LSE tolerance (DESIGN.md "Numerics").
pub const LSE_TOL: f64 = 1e-5;
