//! The inner loops of attention, per key tile: scores (`q·k` for a run of keys), their
//! exponentials, and the `p·V` accumulation, as a portable scalar path and an AVX2+FMA path
//! chosen at run time.
//!
//! Dispatch happens once per tile (a match on [`Isa`]), not per key, so the target-feature
//! functions are whole loops and the branch costs nothing next to them. Both paths accumulate
//! in f32; they differ only in summation order and the last bits of the exponential, which
//! the tests bound.

/// The instruction set the kernels use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Isa {
    /// Plain Rust, any target.
    Scalar,
    /// x86-64 AVX2 with FMA; only constructed after run-time detection.
    #[cfg(target_arch = "x86_64")]
    Avx2Fma,
}

impl Isa {
    /// The best instruction set this CPU supports.
    pub(crate) fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        if crate::isa::avx2() {
            return Isa::Avx2Fma;
        }
        Isa::Scalar
    }

    /// `out[j] = scale * (q · k[j*stride .. j*stride + q.len()])` for `j < out.len()`.
    ///
    /// # Panics
    /// When `k` is too short for `out.len()` rows at `stride`.
    #[inline]
    pub(crate) fn scores(self, q: &[f32], k: &[f32], stride: usize, scale: f32, out: &mut [f32]) {
        let n = out.len();
        if n == 0 {
            return;
        }
        assert!(
            k.len() >= (n - 1) * stride + q.len(),
            "key tile out of bounds"
        );
        match self {
            Isa::Scalar => scores_scalar(q, k, stride, scale, out),
            // SAFETY: `Avx2Fma` exists only when the CPU has AVX2 and FMA; bounds checked above.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2Fma => unsafe { avx2::scores(q, k, stride, scale, out) },
        }
    }

    /// `s[j] = exp(s[j] - max)` for scores `s[j] <= max`; returns `Σ_j s[j]` (after).
    #[inline]
    pub(crate) fn exp_sub(self, s: &mut [f32], max: f32) -> f32 {
        match self {
            Isa::Scalar => exp_sub_scalar(s, max),
            // SAFETY: `Avx2Fma` exists only when the CPU has AVX2 and FMA.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2Fma => unsafe { avx2::exp_sub(s, max) },
        }
    }

    /// `acc[d] += Σ_j p[j] * v[j*stride + d]` for `d < acc.len()`, `j < p.len()`.
    ///
    /// # Panics
    /// When `v` is too short for `p.len()` rows at `stride`.
    #[inline]
    pub(crate) fn accumulate(self, acc: &mut [f32], p: &[f32], v: &[f32], stride: usize) {
        let n = p.len();
        if n == 0 {
            return;
        }
        assert!(
            v.len() >= (n - 1) * stride + acc.len(),
            "value tile out of bounds"
        );
        match self {
            Isa::Scalar => accumulate_scalar(acc, p, v, stride),
            // SAFETY: as in `scores`; bounds checked above.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2Fma => unsafe { avx2::accumulate(acc, p, v, stride) },
        }
    }
}

/// `s[j] = exp(s[j] - max)`; returns the sum of the new values.
fn exp_sub_scalar(s: &mut [f32], max: f32) -> f32 {
    let mut sum = 0.0f32;
    for p in s.iter_mut() {
        *p = (*p - max).exp();
        sum += *p;
    }
    sum
}

/// Lanes of the scalar dot product: independent partial sums break the dependency chain so the
/// portable path is not latency bound.
const LANES: usize = 8;

fn dot_scalar(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0.0f32; LANES];
    let mut ca = a.chunks_exact(LANES);
    let mut cb = b.chunks_exact(LANES);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for l in 0..LANES {
            lanes[l] += x[l] * y[l];
        }
    }
    let mut tail = 0.0f32;
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        tail += x * y;
    }
    lanes.iter().sum::<f32>() + tail
}

fn scores_scalar(q: &[f32], k: &[f32], stride: usize, scale: f32, out: &mut [f32]) {
    let hd = q.len();
    for (j, s) in out.iter_mut().enumerate() {
        *s = scale * dot_scalar(q, &k[j * stride..j * stride + hd]);
    }
}

fn accumulate_scalar(acc: &mut [f32], p: &[f32], v: &[f32], stride: usize) {
    let hd = acc.len();
    for (j, &pj) in p.iter().enumerate() {
        let row = &v[j * stride..j * stride + hd];
        for (a, &x) in acc.iter_mut().zip(row) {
            *a += pj * x;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    //! Pointer offsets use `wrapping_add`: every access is proven in bounds by the callers'
    //! length checks, and unlike `add` it carries no debug-build precondition check, which in
    //! the dev profile cost the inner loops a factor of three.

    use crate::ggml_math::hsum8_m256 as hsum;
    use std::arch::x86_64::*;

    /// # Safety
    /// `a` and `b` must be readable for `n` floats; the CPU must have AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn dot(a: *const f32, b: *const f32, n: usize) -> f32 {
        // SAFETY (whole body): every load reads inside `[0, n)` of `a` and `b`.
        unsafe {
            let mut acc = [_mm256_setzero_ps(); 4];
            let mut d = 0;
            while d + 32 <= n {
                for (r, a_r) in acc.iter_mut().enumerate() {
                    let x = _mm256_loadu_ps(a.wrapping_add(d + 8 * r));
                    let y = _mm256_loadu_ps(b.wrapping_add(d + 8 * r));
                    *a_r = _mm256_fmadd_ps(x, y, *a_r);
                }
                d += 32;
            }
            while d + 8 <= n {
                acc[0] = _mm256_fmadd_ps(
                    _mm256_loadu_ps(a.wrapping_add(d)),
                    _mm256_loadu_ps(b.wrapping_add(d)),
                    acc[0],
                );
                d += 8;
            }
            let sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
            let mut total = hsum(sum);
            while d < n {
                total = (*a.wrapping_add(d)).mul_add(*b.wrapping_add(d), total);
                d += 1;
            }
            total
        }
    }

    /// Sums of 8 vectors, one per lane: lane `r` of the result is the sum of `v[r]`'s lanes.
    #[target_feature(enable = "avx2,fma")]
    fn reduce8(v: [__m256; 8]) -> __m256 {
        // hadd pairs within each 128-bit half; after two rounds half 0 holds the sums of
        // lanes 0..4 of v[0..4] (resp. v[4..8]) and half 1 those of lanes 4..8.
        let h01 = _mm256_hadd_ps(v[0], v[1]);
        let h23 = _mm256_hadd_ps(v[2], v[3]);
        let h45 = _mm256_hadd_ps(v[4], v[5]);
        let h67 = _mm256_hadd_ps(v[6], v[7]);
        let lo4 = _mm256_hadd_ps(h01, h23);
        let hi4 = _mm256_hadd_ps(h45, h67);
        let halves0 = _mm256_permute2f128_ps::<0x20>(lo4, hi4);
        let halves1 = _mm256_permute2f128_ps::<0x31>(lo4, hi4);
        _mm256_add_ps(halves0, halves1)
    }

    /// AVX2 version of `scores_scalar`: eight keys at a time, each with its own accumulator,
    /// reduced together at the end so no per-key horizontal sum is paid.
    ///
    /// # Safety
    /// CPU has AVX2+FMA; `k.len() >= (out.len() - 1) * stride + q.len()`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn scores(q: &[f32], k: &[f32], stride: usize, scale: f32, out: &mut [f32]) {
        let (hd, n) = (q.len(), out.len());
        let body = hd - hd % 8;
        let (qp, kp, op) = (q.as_ptr(), k.as_ptr(), out.as_mut_ptr());
        // SAFETY (whole body): keys stay below `n` and dims below `hd`, inside `k` by the
        // contract; `out` is written below `n`.
        unsafe {
            let mut j = 0;
            while j + 8 <= n {
                let rows: [*const f32; 8] =
                    std::array::from_fn(|r| kp.wrapping_add((j + r) * stride));
                let mut acc = [_mm256_setzero_ps(); 8];
                let mut d = 0;
                while d < body {
                    let qv = _mm256_loadu_ps(qp.wrapping_add(d));
                    for (a, row) in acc.iter_mut().zip(rows) {
                        *a = _mm256_fmadd_ps(qv, _mm256_loadu_ps(row.wrapping_add(d)), *a);
                    }
                    d += 8;
                }
                let mut sums = reduce8(acc);
                if body < hd {
                    let mut tail = [0.0f32; 8];
                    for (t, row) in tail.iter_mut().zip(rows) {
                        for d in body..hd {
                            *t = (*qp.wrapping_add(d)).mul_add(*row.wrapping_add(d), *t);
                        }
                    }
                    sums = _mm256_add_ps(sums, _mm256_loadu_ps(tail.as_ptr()));
                }
                _mm256_storeu_ps(
                    op.wrapping_add(j),
                    _mm256_mul_ps(sums, _mm256_set1_ps(scale)),
                );
                j += 8;
            }
            while j < n {
                *op.wrapping_add(j) = scale * dot(qp, kp.wrapping_add(j * stride), hd);
                j += 1;
            }
        }
    }

    /// `exp(x)` for `x <= 0` (including `-inf`), to a few ulp: `x = n·ln2 + r` with
    /// `|r| <= ln2/2`, `e^r` by its Taylor series to degree 7 (truncation < 1e-8 relative),
    /// `2^n` built in the exponent bits. Results below the smallest normal flush to 0.
    #[target_feature(enable = "avx2,fma")]
    fn exp_nonpositive(x: __m256) -> __m256 {
        const MIN_X: f32 = -87.336_54; // ln(f32::MIN_POSITIVE)
        const LN2_HI: f32 = 0.693_359_4; // ln 2 split so n·LN2_HI is exact for |n| <= 126
        const LN2_LO: f32 = -2.121_944_4e-4;
        let underflow = _mm256_cmp_ps::<_CMP_LT_OQ>(x, _mm256_set1_ps(MIN_X));
        let x = _mm256_max_ps(x, _mm256_set1_ps(MIN_X));
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
        // 1/k! for k = 7 down to 0, Horner.
        const INV_FACT: [f32; 8] = [
            1.0 / 5040.0,
            1.0 / 720.0,
            1.0 / 120.0,
            1.0 / 24.0,
            1.0 / 6.0,
            0.5,
            1.0,
            1.0,
        ];
        let mut p = _mm256_set1_ps(INV_FACT[0]);
        for c in &INV_FACT[1..] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(*c));
        }
        let bits = _mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(n),
            _mm256_set1_epi32(127),
        ));
        _mm256_andnot_ps(underflow, _mm256_mul_ps(p, _mm256_castsi256_ps(bits)))
    }

    /// AVX2 version of `exp_sub_scalar`; a partial last vector is padded with `-inf` (exp 0).
    ///
    /// # Safety
    /// CPU has AVX2+FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn exp_sub(s: &mut [f32], max: f32) -> f32 {
        let vmax = _mm256_set1_ps(max);
        let mut vsum = _mm256_setzero_ps();
        let mut chunks = s.chunks_exact_mut(8);
        for c in &mut chunks {
            // SAFETY: `c` has exactly 8 floats.
            unsafe {
                let e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(c.as_ptr()), vmax));
                _mm256_storeu_ps(c.as_mut_ptr(), e);
                vsum = _mm256_add_ps(vsum, e);
            }
        }
        let rest = chunks.into_remainder();
        if !rest.is_empty() {
            let mut pad = [f32::NEG_INFINITY; 8];
            pad[..rest.len()].copy_from_slice(rest);
            // SAFETY: `pad` has exactly 8 floats.
            unsafe {
                let e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(pad.as_ptr()), vmax));
                _mm256_storeu_ps(pad.as_mut_ptr(), e);
                vsum = _mm256_add_ps(vsum, e);
            }
            rest.copy_from_slice(&pad[..rest.len()]);
        }
        hsum(vsum)
    }

    /// AVX2 version of `accumulate_scalar`: the accumulator stays in registers across all keys
    /// of the tile, 32 dims at a time.
    ///
    /// # Safety
    /// CPU has AVX2+FMA; `v.len() >= (p.len() - 1) * stride + acc.len()`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn accumulate(acc: &mut [f32], p: &[f32], v: &[f32], stride: usize) {
        let hd = acc.len();
        let a = acc.as_mut_ptr();
        let vp = v.as_ptr();
        // SAFETY (whole body): dims stay below `hd` and rows below `p.len()`, so every access is
        // inside `acc` and, by the contract, inside `v`.
        unsafe {
            let mut d = 0;
            while d + 32 <= hd {
                let mut r = [
                    _mm256_loadu_ps(a.wrapping_add(d)),
                    _mm256_loadu_ps(a.wrapping_add(d + 8)),
                    _mm256_loadu_ps(a.wrapping_add(d + 16)),
                    _mm256_loadu_ps(a.wrapping_add(d + 24)),
                ];
                for (j, &pj) in p.iter().enumerate() {
                    let w = _mm256_set1_ps(pj);
                    let row = vp.wrapping_add(j * stride + d);
                    for (i, r_i) in r.iter_mut().enumerate() {
                        *r_i = _mm256_fmadd_ps(w, _mm256_loadu_ps(row.wrapping_add(8 * i)), *r_i);
                    }
                }
                for (i, r_i) in r.iter().enumerate() {
                    _mm256_storeu_ps(a.wrapping_add(d + 8 * i), *r_i);
                }
                d += 32;
            }
            while d + 8 <= hd {
                let mut r = _mm256_loadu_ps(a.wrapping_add(d));
                for (j, &pj) in p.iter().enumerate() {
                    r = _mm256_fmadd_ps(
                        _mm256_set1_ps(pj),
                        _mm256_loadu_ps(vp.wrapping_add(j * stride + d)),
                        r,
                    );
                }
                _mm256_storeu_ps(a.wrapping_add(d), r);
                d += 8;
            }
            while d < hd {
                let mut r = *a.wrapping_add(d);
                for (j, &pj) in p.iter().enumerate() {
                    r = pj.mul_add(*vp.wrapping_add(j * stride + d), r);
                }
                *a.wrapping_add(d) = r;
                d += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn naive_scores(q: &[f32], k: &[f32], stride: usize, n: usize, scale: f32) -> Vec<f64> {
        (0..n)
            .map(|j| {
                let row = &k[j * stride..j * stride + q.len()];
                scale as f64
                    * q.iter()
                        .zip(row)
                        .map(|(&a, &b)| a as f64 * b as f64)
                        .sum::<f64>()
            })
            .collect()
    }

    fn naive_acc(acc: &[f32], p: &[f32], v: &[f32], stride: usize) -> Vec<f64> {
        (0..acc.len())
            .map(|d| {
                acc[d] as f64
                    + p.iter()
                        .enumerate()
                        .map(|(j, &pj)| pj as f64 * v[j * stride + d] as f64)
                        .sum::<f64>()
            })
            .collect()
    }

    fn data(len: usize, seed: u64) -> Vec<f32> {
        // A small LCG keeps this test independent of the rand crate.
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..len)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    proptest! {
        /// Ensures that both instruction-set paths of the tile scores and the p·V accumulation
        /// match an f64 reference for any head dim (tails included) and row stride.
        #[test]
        fn tile_ops_match_f64(hd in 1usize..=100, extra in 0usize..9, n in 1usize..20, seed in any::<u64>()) {
            let stride = hd + extra;
            let q = data(hd, seed);
            let k = data((n - 1) * stride + hd, seed ^ 1);
            let p = data(n, seed ^ 2);
            let acc0 = data(hd, seed ^ 3);
            let want_s = naive_scores(&q, &k, stride, n, 0.5);
            let want_a = naive_acc(&acc0, &p, &k, stride);
            let mut isas = vec![Isa::Scalar];
            if Isa::detect() != Isa::Scalar {
                isas.push(Isa::detect());
            }
            for isa in isas {
                let mut s = vec![0.0; n];
                isa.scores(&q, &k, stride, 0.5, &mut s);
                for (a, b) in s.iter().zip(&want_s) {
                    prop_assert!((*a as f64 - b).abs() < 1e-5, "{isa:?} score {a} vs {b}");
                }
                let mut acc = acc0.clone();
                isa.accumulate(&mut acc, &p, &k, stride);
                for (a, b) in acc.iter().zip(&want_a) {
                    prop_assert!((*a as f64 - b).abs() < 1e-5, "{isa:?} acc {a} vs {b}");
                }
            }
        }

        /// Ensures that both paths of `exp_sub` give `exp(s - max)` to 4e-7 relative (a few
        /// ulp) and its sum, for any length, down to underflow and `-inf` scores.
        #[test]
        fn exp_sub_matches_f64(
            s in proptest::collection::vec(prop_oneof![-120.0f32..0.0, -1.0f32..0.0, Just(f32::NEG_INFINITY)], 0..40),
            shift in -3.0f32..3.0,
        ) {
            let s: Vec<f32> = s.iter().map(|x| x + shift).collect();
            let max = s.iter().copied().fold(shift, f32::max);
            // The f32 subtraction is part of the contract; judge the exponential alone.
            let want: Vec<f64> = s.iter().map(|&x| ((x - max) as f64).exp()).collect();
            for isa in [Isa::Scalar, Isa::detect()] {
                let mut got = s.clone();
                let sum = isa.exp_sub(&mut got, max);
                for (g, w) in got.iter().zip(&want) {
                    // Below f32's normal range both paths may flush or keep a subnormal.
                    let tol = 4e-7 * w + 1.2e-38;
                    prop_assert!((*g as f64 - w).abs() <= tol, "{isa:?}: exp {g} vs {w}");
                }
                let want_sum: f64 = want.iter().sum();
                prop_assert!((sum as f64 - want_sum).abs() <= 1e-6 * want_sum.max(1e-30), "{isa:?}: sum {sum} vs {want_sum}");
            }
        }
    }
}
