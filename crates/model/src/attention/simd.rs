//! The two inner loops of attention, per key tile: scores (`q·k` for a run of keys) and the
//! `p·V` accumulation, as a portable scalar path and an AVX2+FMA path chosen at run time.
//!
//! Dispatch happens once per tile (a match on [`Isa`]), not per key, so the target-feature
//! functions are whole loops and the branch costs nothing next to them. Both paths accumulate
//! in f32; they differ only in summation order, which the tests bound.

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
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
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

/// Lanes of the scalar dot product: independent partial sums break the dependency chain so the
/// portable path is not latency bound.
const LANES: usize = 8;

fn dot_scalar(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0.0f32; LANES];
    let mut ca = a.chunks_exact(LANES);
    let mut cb = b.chunks_exact(LANES);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for l in 0..LANES {
            lanes[l] = x[l].mul_add(y[l], lanes[l]);
        }
    }
    let mut tail = 0.0f32;
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        tail = x.mul_add(*y, tail);
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
            *a = pj.mul_add(x, *a);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// Horizontal sum of the 8 lanes.
    #[target_feature(enable = "avx2,fma")]
    fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps::<1>(v);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps::<0b01>(s, s));
        _mm_cvtss_f32(s)
    }

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
                    let x = _mm256_loadu_ps(a.add(d + 8 * r));
                    let y = _mm256_loadu_ps(b.add(d + 8 * r));
                    *a_r = _mm256_fmadd_ps(x, y, *a_r);
                }
                d += 32;
            }
            while d + 8 <= n {
                acc[0] =
                    _mm256_fmadd_ps(_mm256_loadu_ps(a.add(d)), _mm256_loadu_ps(b.add(d)), acc[0]);
                d += 8;
            }
            let sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
            let mut total = hsum(sum);
            while d < n {
                total = (*a.add(d)).mul_add(*b.add(d), total);
                d += 1;
            }
            total
        }
    }

    /// AVX2 version of `scores_scalar`.
    ///
    /// # Safety
    /// CPU has AVX2+FMA; `k.len() >= (out.len() - 1) * stride + q.len()`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn scores(q: &[f32], k: &[f32], stride: usize, scale: f32, out: &mut [f32]) {
        let hd = q.len();
        for (j, s) in out.iter_mut().enumerate() {
            // SAFETY: row j spans `[j*stride, j*stride + hd)`, inside `k` by the contract.
            *s = scale * unsafe { dot(q.as_ptr(), k.as_ptr().add(j * stride), hd) };
        }
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
                    _mm256_loadu_ps(a.add(d)),
                    _mm256_loadu_ps(a.add(d + 8)),
                    _mm256_loadu_ps(a.add(d + 16)),
                    _mm256_loadu_ps(a.add(d + 24)),
                ];
                for (j, &pj) in p.iter().enumerate() {
                    let w = _mm256_set1_ps(pj);
                    let row = vp.add(j * stride + d);
                    for (i, r_i) in r.iter_mut().enumerate() {
                        *r_i = _mm256_fmadd_ps(w, _mm256_loadu_ps(row.add(8 * i)), *r_i);
                    }
                }
                for (i, r_i) in r.iter().enumerate() {
                    _mm256_storeu_ps(a.add(d + 8 * i), *r_i);
                }
                d += 32;
            }
            while d + 8 <= hd {
                let mut r = _mm256_loadu_ps(a.add(d));
                for (j, &pj) in p.iter().enumerate() {
                    r = _mm256_fmadd_ps(
                        _mm256_set1_ps(pj),
                        _mm256_loadu_ps(vp.add(j * stride + d)),
                        r,
                    );
                }
                _mm256_storeu_ps(a.add(d), r);
                d += 8;
            }
            while d < hd {
                let mut r = *a.add(d);
                for (j, &pj) in p.iter().enumerate() {
                    r = pj.mul_add(*vp.add(j * stride + d), r);
                }
                *a.add(d) = r;
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
    }
}
