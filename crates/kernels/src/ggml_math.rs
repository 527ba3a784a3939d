//! llama.cpp's elementwise arithmetic, reproduced bit for bit: f16 rounding, ggml's vectorised
//! `exp` approximation and the SiLU built on it.
//!
//! The real model's greedy continuations hinge on near-ties (top-1/top-2 logit margins of a few
//! thousandths), so matching llama.cpp's output token for token needs its rounding, not just an
//! accurate result. These are the pieces of ggml's CPU backend whose results differ from libm's
//! in the last bits: `ggml_v_expf` (ggml-cpu `vec.h`, the AVX2/AVX-512/NEON polynomial used by
//! softmax and SiLU) and the f16 conversions of the KV cache and of activation-block scales.
//!
//! Every function is written one lane at a time with [`f32::mul_add`] wherever ggml uses a fused
//! multiply-add, so it computes exactly what one SIMD lane computes; the slice functions are
//! compiled with AVX2+FMA when the CPU has them so `mul_add` is one instruction (elsewhere it is
//! the libm `fmaf`, slower but identical).

use half::f16;

/// `x` rounded to the nearest f16 (ties to even, as `vcvtps2ph` with mode 0 and ggml's
/// `GGML_FP32_TO_FP16`) and widened back: the value an f16 tensor stores.
#[inline(always)]
pub fn round_f16(x: f32) -> f32 {
    f16::from_f32(x).to_f32()
}

/// Rounds every element of `x` to f16 in place (see [`round_f16`]).
pub fn round_f16_in_place(x: &mut [f32]) {
    for v in x {
        *v = round_f16(*v);
    }
}

/// ggml's `ggml_v_expf`, one lane: `e^x` from a degree-5 polynomial on the reduced argument,
/// within about 1.5 ulp of the true value, with ggml's handling of overflow (`inf`), underflow
/// (0) and NaN.
#[inline(always)]
pub fn v_expf(x: f32) -> f32 {
    let r = f32::from_bits(0x4B40_0000); // 0x1.8p23: adding it rounds to an integer
    let z = x.mul_add(f32::from_bits(0x3FB8_AA3B), r); // log2(e)
    let n = z - r;
    // x - n·ln2, in two fused steps (ln2 split into a high and a low part).
    let hi = (-n).mul_add(f32::from_bits(0x3F31_7200), x);
    let b = (-n).mul_add(f32::from_bits(0x35BF_BE8E), hi);
    let e = z.to_bits().wrapping_shl(23);
    let k = f32::from_bits(e.wrapping_add(1.0f32.to_bits()));
    let u = b * b;
    let j = f32::from_bits(0x3C07_2010)
        .mul_add(b, f32::from_bits(0x3D2B_9F17))
        .mul_add(
            u,
            f32::from_bits(0x3E2A_AF33).mul_add(b, f32::from_bits(0x3EFF_FEDB)),
        )
        .mul_add(u, f32::from_bits(0x3F7F_FFF6) * b);
    // NaN compares false everywhere, which is what the SIMD compares (_CMP_GT_OQ) give too.
    if n.abs() <= 126.0 || n.is_nan() {
        return j.mul_add(k, k);
    }
    let g: u32 = if n <= 0.0 { 0x8200_0000 } else { 0 };
    let s1 = f32::from_bits(g.wrapping_add(0x7F00_0000));
    if n.abs() > 192.0 {
        return s1 * s1;
    }
    let s2 = f32::from_bits(e.wrapping_sub(g));
    s2.mul_add(j, s2) * s1
}

/// ggml's `ggml_v_silu`, one lane: `x / (1 + v_expf(0 - x))`.
#[inline(always)]
pub fn v_silu(x: f32) -> f32 {
    x / (1.0 + v_expf(0.0 - x))
}

/// `g[i] = silu(g[i]) · u[i]`, ggml's `ggml_vec_swiglu_f32` (the gate is `g`, the linear part
/// `u`).
///
/// # Panics
/// When the lengths differ.
pub fn swiglu_in_place(g: &mut [f32], u: &[f32]) {
    assert_eq!(g.len(), u.len(), "swiglu: gate and up lengths differ");
    #[cfg(target_arch = "x86_64")]
    if avx2::available() {
        // SAFETY: AVX2 and FMA were detected at run time.
        unsafe { avx2::swiglu(g, u) };
        return;
    }
    swiglu_portable(g, u);
}

#[inline(always)]
fn swiglu_portable(g: &mut [f32], u: &[f32]) {
    for (g, &u) in g.iter_mut().zip(u) {
        *g = v_silu(*g) * u;
    }
}

/// `y[i] = v_expf(x[i] - max)` and the sum of the `y[i]`, as ggml's `ggml_vec_soft_max_f32`
/// forms it on AVX2: each run of eight is summed in f32 by the lane reduction
/// ([`hsum8`]) and the run sums are added in f64. `x.len()` must be a multiple of 8 (callers pad
/// with `-inf`, whose exponential is exactly 0, as llama.cpp's padded KV length does).
///
/// # Panics
/// When `x` and `y` differ in length or the length is not a multiple of 8.
pub fn exp_sum(x: &[f32], max: f32, y: &mut [f32]) -> f64 {
    assert!(
        x.len() == y.len() && x.len().is_multiple_of(8),
        "exp_sum: lengths must match and be a multiple of 8"
    );
    #[cfg(target_arch = "x86_64")]
    if avx2::available() {
        // SAFETY: AVX2 and FMA were detected at run time.
        return unsafe { avx2::exp_sum(x, max, y) };
    }
    exp_sum_portable(x, max, y)
}

#[inline(always)]
fn exp_sum_portable(x: &[f32], max: f32, y: &mut [f32]) -> f64 {
    let mut sum = 0.0f64;
    for (xs, ys) in x.chunks_exact(8).zip(y.chunks_exact_mut(8)) {
        let mut v = [0.0f32; 8];
        for ((o, &xi), yo) in v.iter_mut().zip(xs).zip(ys.iter_mut()) {
            *o = v_expf(xi - max);
            *yo = *o;
        }
        sum += f64::from(hsum8(&v));
    }
    sum
}

/// [`hsum8`] on a 256-bit vector, in the same order: the one horizontal sum every AVX2 kernel
/// (quantized dot products, both attention kernels) reduces its accumulators with.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(crate) fn hsum8_m256(v: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2)))
}

/// The same arithmetic eight lanes at a time, as ggml's AVX2 build runs it: every function
/// here gives the portable one's bits (tested), it only stops the compiler from evaluating
/// `v_expf` one lane at a time.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{hsum8, v_expf, v_silu};
    use std::arch::x86_64::*;

    /// Whether this CPU runs the functions below.
    pub(super) fn available() -> bool {
        crate::isa::avx2()
    }

    /// An f32 constant given by its bits, in every lane.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn c(bits: u32) -> __m256 {
        _mm256_set1_ps(f32::from_bits(bits))
    }

    /// [`v_expf`] on eight lanes; `None` when a lane needs the overflow / underflow branch
    /// (|n| > 126), which callers then take lane by lane with the scalar function.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn expf8(x: __m256) -> Option<__m256> {
        let r = c(0x4B40_0000);
        let z = _mm256_fmadd_ps(x, c(0x3FB8_AA3B), r);
        let n = _mm256_sub_ps(z, r);
        let abs_n = _mm256_andnot_ps(_mm256_set1_ps(-0.0), n);
        // Ordered compare: a NaN lane stays on the fast path, as in the scalar function.
        let slow = _mm256_cmp_ps::<_CMP_GT_OQ>(abs_n, _mm256_set1_ps(126.0));
        if _mm256_movemask_ps(slow) != 0 {
            return None;
        }
        // fnmadd(n, c, x) = fma(-n, c, x) exactly: negation is exact.
        let hi = _mm256_fnmadd_ps(n, c(0x3F31_7200), x);
        let b = _mm256_fnmadd_ps(n, c(0x35BF_BE8E), hi);
        let e = _mm256_slli_epi32::<23>(_mm256_castps_si256(z));
        let one = _mm256_castps_si256(_mm256_set1_ps(1.0));
        let k = _mm256_castsi256_ps(_mm256_add_epi32(e, one));
        let u = _mm256_mul_ps(b, b);
        let j = _mm256_fmadd_ps(
            _mm256_fmadd_ps(
                _mm256_fmadd_ps(c(0x3C07_2010), b, c(0x3D2B_9F17)),
                u,
                _mm256_fmadd_ps(c(0x3E2A_AF33), b, c(0x3EFF_FEDB)),
            ),
            u,
            _mm256_mul_ps(c(0x3F7F_FFF6), b),
        );
        Some(_mm256_fmadd_ps(j, k, k))
    }

    /// [`super::swiglu_in_place`]'s loop.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; `g` and `u` have the same length.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn swiglu(g: &mut [f32], u: &[f32]) {
        let mut gc = g.chunks_exact_mut(8);
        let mut uc = u.chunks_exact(8);
        for (gs, us) in (&mut gc).zip(&mut uc) {
            // SAFETY: both chunks hold 8 f32.
            let (x, up) = unsafe { (_mm256_loadu_ps(gs.as_ptr()), _mm256_loadu_ps(us.as_ptr())) };
            match expf8(_mm256_sub_ps(_mm256_setzero_ps(), x)) {
                Some(e) => {
                    let silu = _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.0), e));
                    // SAFETY: gs holds 8 f32.
                    unsafe { _mm256_storeu_ps(gs.as_mut_ptr(), _mm256_mul_ps(silu, up)) };
                }
                None => {
                    for (g, &u) in gs.iter_mut().zip(us) {
                        *g = v_silu(*g) * u;
                    }
                }
            }
        }
        for (g, &u) in gc.into_remainder().iter_mut().zip(uc.remainder()) {
            *g = v_silu(*g) * u;
        }
    }

    /// [`super::exp_sum`]'s loop.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; `x` and `y` have the same length, a multiple of 8.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn exp_sum(x: &[f32], max: f32, y: &mut [f32]) -> f64 {
        let m = _mm256_set1_ps(max);
        let mut sum = 0.0f64;
        for (xs, ys) in x.chunks_exact(8).zip(y.chunks_exact_mut(8)) {
            // SAFETY: xs holds 8 f32.
            let d = _mm256_sub_ps(unsafe { _mm256_loadu_ps(xs.as_ptr()) }, m);
            let mut v = [0.0f32; 8];
            match expf8(d) {
                // SAFETY: v holds 8 f32.
                Some(e) => unsafe { _mm256_storeu_ps(v.as_mut_ptr(), e) },
                None => {
                    for (o, &xi) in v.iter_mut().zip(xs) {
                        *o = v_expf(xi - max);
                    }
                }
            }
            ys.copy_from_slice(&v);
            sum += f64::from(hsum8(&v));
        }
        sum
    }
}

/// The horizontal sum of eight lanes in ggml's order (`hsum_float_8` and the soft-max
/// reduction): high half onto low half, then lanes 2–3 onto 0–1, then lane 1 onto lane 0.
#[inline(always)]
pub fn hsum8(v: &[f32; 8]) -> f32 {
    let s4 = [v[0] + v[4], v[1] + v[5], v[2] + v[6], v[3] + v[7]];
    (s4[0] + s4[2]) + (s4[1] + s4[3])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ensures that `v_expf` is within 2 ulp of the f64 exponential over the whole finite
    /// range it returns normal numbers for, and handles the edges as ggml does.
    #[test]
    fn v_expf_tracks_f64_exp() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let got = f64::from(v_expf(x));
            let want = f64::from(x).exp();
            let ulp = f64::from(f32::EPSILON) * want;
            worst = worst.max((got - want).abs() / ulp);
            x += 0.0137;
        }
        assert!(worst <= 2.0, "worst error {worst} ulp");
        assert_eq!(v_expf(0.0), 1.0);
        assert_eq!(v_expf(f32::NEG_INFINITY), 0.0);
        assert_eq!(v_expf(-200.0), 0.0);
        assert_eq!(v_expf(200.0), f32::INFINITY);
        assert!(v_expf(f32::NAN).is_nan());
    }

    /// Ensures that the subnormal branch (|n| in 126..192) stays close to the f64 exponential.
    #[test]
    fn v_expf_subnormal_and_huge_branches() {
        for x in [-88.5f32, -95.0, -100.0, -103.0, 88.5, 88.7] {
            let got = f64::from(v_expf(x));
            let want = f64::from(x).exp();
            // Subnormals carry fewer bits: compare against the smallest subnormal step too.
            let tol = (want * 4e-7).max(1.5e-45);
            let want_f32 = want as f32;
            if want_f32.is_infinite() {
                assert!(got.is_infinite(), "{x}: {got}");
            } else {
                assert!((got - want).abs() <= tol, "{x}: {got} vs {want}");
            }
        }
    }

    /// Ensures that SiLU-times-up matches the f64 formula within 3 ulp-relative, and that the
    /// accelerated and portable paths are bit-identical.
    #[test]
    fn swiglu_matches_f64_and_paths_agree() {
        let g0: Vec<f32> = (0..203).map(|i| (i as f32 - 101.0) * 0.173).collect();
        let u: Vec<f32> = (0..203).map(|i| 1.0 + (i % 7) as f32 * 0.31).collect();
        let mut g = g0.clone();
        swiglu_in_place(&mut g, &u);
        let mut p = g0.clone();
        swiglu_portable(&mut p, &u);
        assert_eq!(g, p);
        for ((&x, &uv), &got) in g0.iter().zip(&u).zip(&g) {
            let (x, uv) = (f64::from(x), f64::from(uv));
            let want = x / (1.0 + (-x).exp()) * uv;
            assert!(
                (f64::from(got) - want).abs() <= 4.0 * f64::from(f32::EPSILON) * want.abs(),
                "{x}: {got} vs {want}"
            );
        }
    }

    /// Ensures that the vectorised swiglu and exp_sum give the portable loops' exact bits on
    /// adversarial inputs: both signs of zero, NaN, infinities, subnormals, values around the
    /// overflow / underflow branch (|x| near 87.3), and chunks mixing them with ordinary values.
    #[test]
    fn vector_paths_are_bit_identical() {
        let mut x: Vec<f32> = vec![
            0.0,
            -0.0,
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            1e-40,
            -1e-40,
            87.3,
            -87.3,
            88.8,
            -88.8,
            103.0,
            -103.0,
            1e30,
            -1e30,
            126.5,
            -126.5,
            0.5,
        ];
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        for i in 0..4000 {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1);
            let unit = (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            x.push(unit * if i % 3 == 0 { 250.0 } else { 20.0 });
        }
        x.truncate(x.len() / 8 * 8);
        let u: Vec<f32> = x.iter().map(|v| 1.0 - v * 0.01).collect();
        let (mut g, mut gp) = (x.clone(), x.clone());
        swiglu_in_place(&mut g, &u);
        swiglu_portable(&mut gp, &u);
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&g), bits(&gp));
        let finite_max = 40.0;
        let (mut y, mut yp) = (vec![0.0; x.len()], vec![0.0; x.len()]);
        let sum = exp_sum(&x, finite_max, &mut y);
        let sum_p = exp_sum_portable(&x, finite_max, &mut yp);
        assert_eq!(bits(&y), bits(&yp));
        assert_eq!(sum.to_bits(), sum_p.to_bits());
    }

    /// Ensures that `exp_sum` returns the exponentials and their exact-enough sum, that padded
    /// `-inf` entries contribute exactly 0, and that both paths agree bit for bit.
    #[test]
    fn exp_sum_matches_f64() {
        let mut x: Vec<f32> = (0..40)
            .map(|i| ((i * 37) % 23) as f32 * 0.41 - 5.0)
            .collect();
        x[37..].fill(f32::NEG_INFINITY);
        let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut y = vec![0.0; 40];
        let sum = exp_sum(&x, max, &mut y);
        let mut yp = vec![0.0; 40];
        assert_eq!(sum, exp_sum_portable(&x, max, &mut yp));
        assert_eq!(y, yp);
        let want: f64 = x
            .iter()
            .map(|&v| (f64::from(v) - f64::from(max)).exp())
            .sum();
        assert!((sum - want).abs() <= 1e-6 * want, "{sum} vs {want}");
        assert!(y[37..].iter().all(|&v| v == 0.0));
    }

    /// Ensures that f16 rounding is round-to-nearest-even at a tie and exact on f16 values.
    #[test]
    fn f16_rounding_is_nearest_even() {
        assert_eq!(round_f16(1.0), 1.0);
        // 1 + 2^-11 is halfway between 1 and 1 + 2^-10: ties to the even mantissa, 1.
        assert_eq!(round_f16(1.0 + 2f32.powi(-11)), 1.0);
        // 1 + 3·2^-11 is halfway between 1 + 2^-10 and 1 + 2^-9: ties to 1 + 2^-9.
        assert_eq!(round_f16(1.0 + 3.0 * 2f32.powi(-11)), 1.0 + 2f32.powi(-9));
        assert_eq!(round_f16(65520.0), f32::INFINITY);
    }
}
