//! AVX2 forms of the ggml-order attention's inner loops, bit-identical to the portable ones.
//!
//! The portable loops in [`super::ggml`] describe the arithmetic lane by lane; the compiler
//! vectorises their 8-lane accumulators poorly (two lanes at a time), which made attention a
//! third of a prefill. These functions do the same fused multiply-adds in the same lanes and
//! reduce in the same order with explicit 256-bit vectors; `ggml_tests` checks them bit for bit
//! against the portable forms. Scores are computed four keys at a time, so four independent
//! accumulation chains overlap instead of one waiting on itself.

#![cfg(target_arch = "x86_64")]

use super::KvView;
use super::ggml::{PAD, dot_tiled};
use crate::ggml_math::hsum8_m256 as hsum;
use std::arch::x86_64::*;

/// `reduce_vec`'s order over four accumulators: (0 + 2) + (1 + 3) lane-wise, high half onto
/// low half, then (lane 0 + lane 1) + (lane 2 + lane 3).
#[inline]
#[target_feature(enable = "avx2,fma")]
fn reduce4(a: [__m256; 4]) -> f32 {
    let z = _mm256_add_ps(_mm256_add_ps(a[0], a[2]), _mm256_add_ps(a[1], a[3]));
    let t = _mm_add_ps(_mm256_castps256_ps128(z), _mm256_extractf128_ps(z, 1));
    let h = _mm_hadd_ps(t, t);
    _mm_cvtss_f32(_mm_hadd_ps(h, h))
}

/// `w[t] = dot(K[t], q) · scale` for the keys `0..w.len()` of KV head `kvh`: tinyBLAS's order
/// (one 8-lane accumulator, [`hsum`]) when `tiled`, else `ggml_vec_dot_f16`'s (four, over runs
/// of 32, a tail in f64).
///
/// # Safety
/// The CPU has AVX2 and FMA; `tiled` only when `q.len()` is a multiple of 8; every key of
/// `0..w.len()` lies inside `kv` (the kernel's shape check).
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn scores(
    kv: &KvView<'_>,
    kvh: usize,
    n_kv_heads: usize,
    q: &[f32],
    scale: f32,
    tiled: bool,
    w: &mut [f32],
) {
    let hd = q.len();
    let key = |t: usize| {
        let off = kv.offset(t, kvh, n_kv_heads, hd);
        &kv.k[off..off + hd]
    };
    if !tiled {
        for (t, wt) in w.iter_mut().enumerate() {
            // SAFETY: forwarded contract.
            *wt = unsafe { dot_vec(key(t), q) } * scale;
        }
        return;
    }
    let mut t = 0;
    while t + 4 <= w.len() {
        let k = [key(t), key(t + 1), key(t + 2), key(t + 3)];
        let mut acc = [_mm256_setzero_ps(); 4];
        for c in (0..hd).step_by(8) {
            // SAFETY: c + 8 <= hd, the length of q and of every k[j].
            unsafe {
                let qc = _mm256_loadu_ps(q.as_ptr().add(c));
                for j in 0..4 {
                    let kc = _mm256_loadu_ps(k[j].as_ptr().add(c));
                    acc[j] = _mm256_fmadd_ps(kc, qc, acc[j]);
                }
            }
        }
        for j in 0..4 {
            w[t + j] = hsum(acc[j]) * scale;
        }
        t += 4;
    }
    // The last one to three keys: the portable loop, compiled here with AVX2 and FMA.
    for (t, wt) in w.iter_mut().enumerate().skip(t) {
        *wt = dot_tiled(key(t), q) * scale;
    }
}

/// `dot_vec` ([`super::ggml`]) with explicit vectors.
///
/// # Safety
/// The CPU has AVX2 and FMA; `x` and `y` have the same length.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn dot_vec(x: &[f32], y: &[f32]) -> f32 {
    debug_assert_eq!(x.len(), y.len());
    let n = x.len();
    let np = n - n % PAD;
    let mut acc = [_mm256_setzero_ps(); 4];
    for i in (0..np).step_by(PAD) {
        for (j, a) in acc.iter_mut().enumerate() {
            // SAFETY: i + 8 j + 8 <= np <= n.
            unsafe {
                let xv = _mm256_loadu_ps(x.as_ptr().add(i + 8 * j));
                *a = _mm256_fmadd_ps(xv, _mm256_loadu_ps(y.as_ptr().add(i + 8 * j)), *a);
            }
        }
    }
    let mut sum = f64::from(reduce4(acc));
    for (&xv, &yv) in x[np..].iter().zip(&y[np..]) {
        sum += f64::from(xv * yv);
    }
    sum as f32
}

/// `p[i] = round_f16(p[i] · inv)`, eight at a time with the F16C conversions (round to nearest
/// even, as `round_f16`).
///
/// # Safety
/// The CPU has AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn scale_round_f16(p: &mut [f32], inv: f32) {
    let s = _mm256_set1_ps(inv);
    let mut chunks = p.chunks_exact_mut(8);
    for c in &mut chunks {
        // SAFETY: c holds 8 f32.
        unsafe {
            let v = _mm256_mul_ps(_mm256_loadu_ps(c.as_ptr()), s);
            let h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT);
            _mm256_storeu_ps(c.as_mut_ptr(), _mm256_cvtph_ps(h));
        }
    }
    for v in chunks.into_remainder() {
        *v = crate::ggml_math::round_f16(*v * inv);
    }
}
