//! AVX-512 dot products for the 32-element formats (Q4_0, Q4_1, Q8_0), two blocks per vector.
//!
//! Two variants are generated from one body: plain AVX-512 BW (`vpmaddubsw` + `vpmaddwd`) and
//! AVX-512 VNNI (`vpdpbusd`, the same u8·i8 sum in one instruction). Both are compiled on every
//! x86-64 build and only called after [`crate::isa::isa`] detects the features, so a
//! machine without AVX-512 still builds and tests the rest.
//!
//! Only the integer work is 512 bits wide. The float accumulation is the AVX2 kernel's, step for
//! step: one eight-lane accumulator, each block's lane sums folded in with its own fused
//! multiply-add in block order, and the `m · s` offsets on a separate fused scalar accumulator.
//! Keeping two blocks in two accumulator halves (the natural 512-bit layout) would add the
//! blocks in a different order and make the result depend on the CPU; the scalar, AVX2 and
//! AVX-512 paths must agree bit for bit (see `dot_scalar`), and integer sums are exact, so the
//! integer part is the only place wider vectors may be used freely.
//!
//! The matrix-vector (decode) product is where the wider vectors pay; the prefill micro-kernel
//! keeps using the AVX2 `_x4` kernels on AVX-512 machines.

#![cfg(target_arch = "x86_64")]

use super::act::BlockQ8;
use super::dot_avx2;
use std::arch::x86_64::*;

/// Two 256-bit halves as one 512-bit integer vector (low, high).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
fn join_i(lo: __m256i, hi: __m256i) -> __m512i {
    _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1)
}

/// Lanes 0..8 and 8..16 of `v`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
fn halves(v: __m512) -> (__m256, __m256) {
    (
        _mm512_castps512_ps256(v),
        _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)),
    )
}

/// A block's f16 scale at `p`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn f16_at(p: *const u8) -> f32 {
    // SAFETY: the caller guarantees 2 readable bytes at p.
    let bits = unsafe { p.cast::<u16>().read_unaligned() };
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
}

/// Loads a Q8 activation block's quants.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
fn load_act(a: &BlockQ8) -> __m256i {
    // SAFETY: qs is 32 bytes.
    unsafe { _mm256_loadu_si256(a.qs.as_ptr().cast()) }
}

macro_rules! avx512_kernels {
    ($kind:ident, $features:literal, $q4:ident, $q8:ident, $dot:ident) => {
        /// Sixteen i32 sums of adjacent u8·i8 quadruples, as f32.
        #[inline]
        #[target_feature(enable = $features)]
        fn $dot(u: __m512i, s: __m512i) -> __m512 {
            avx512_kernels!(@dot $kind, u, s)
        }

        /// Q4_0 (`Q41 = false`) or Q4_1 row · Q8 activations.
        ///
        /// # Safety
        /// The CPU has this function's features; `w` holds at least `a.len()` blocks.
        #[target_feature(enable = $features)]
        pub(crate) unsafe fn $q4<const Q41: bool>(w: &[u8], a: &[BlockQ8]) -> f32 {
            let (ts, o) = if Q41 { (20, 4) } else { (18, 2) };
            debug_assert!(w.len() >= a.len() * ts);
            let mut acc = _mm256_setzero_ps();
            let mut accm = 0.0f32;
            let mut i = 0;
            while i < a.len() {
                // A lone last block pairs with zeros; its (zero) second half is never added.
                let pair = i + 1 < a.len();
                // SAFETY: block i, and block i + 1 when `pair`, are inside w.
                unsafe {
                    let b0 = w.as_ptr().add(i * ts);
                    let (w1, a1) = if pair {
                        (dot_avx2::unpack_q4(b0.add(ts + o)), load_act(&a[i + 1]))
                    } else {
                        (_mm256_setzero_si256(), _mm256_setzero_si256())
                    };
                    let wq = join_i(dot_avx2::unpack_q4(b0.add(o)), w1);
                    let (p0, p1) = halves($dot(wq, join_i(load_act(&a[i]), a1)));
                    for (k, p) in [(0, p0), (1, p1)].into_iter().take(1 + pair as usize) {
                        let b = b0.add(k * ts);
                        let d = f16_at(b);
                        let m = if Q41 { f16_at(b.add(2)) } else { -8.0 * d };
                        acc = _mm256_fmadd_ps(_mm256_set1_ps(d * a[i + k].d), p, acc);
                        accm = m.mul_add(a[i + k].s, accm);
                    }
                }
                i += 2;
            }
            accm + dot_avx2::hsum(acc)
        }

        /// Q8_0 row · Q8 activations.
        ///
        /// # Safety
        /// The CPU has this function's features; `w` holds at least `a.len()` blocks.
        #[target_feature(enable = $features)]
        pub(crate) unsafe fn $q8(w: &[u8], a: &[BlockQ8]) -> f32 {
            debug_assert!(w.len() >= a.len() * 34);
            let mut acc = _mm256_setzero_ps();
            let mut i = 0;
            while i < a.len() {
                let pair = i + 1 < a.len();
                // SAFETY: block i, and block i + 1 when `pair`, are inside w.
                unsafe {
                    let b0 = w.as_ptr().add(i * 34);
                    let (w1, a1) = if pair {
                        (_mm256_loadu_si256(b0.add(34 + 2).cast()), load_act(&a[i + 1]))
                    } else {
                        (_mm256_setzero_si256(), _mm256_setzero_si256())
                    };
                    let wq = join_i(_mm256_loadu_si256(b0.add(2).cast()), w1);
                    let aq = join_i(load_act(&a[i]), a1);
                    // |w| · (a with w's sign): the unsigned operand must be the weight magnitude.
                    let neg = _mm512_movepi8_mask(wq);
                    let aw = _mm512_abs_epi8(wq);
                    let sa = _mm512_mask_sub_epi8(aq, neg, _mm512_setzero_si512(), aq);
                    let (p0, p1) = halves($dot(aw, sa));
                    for (k, p) in [(0, p0), (1, p1)].into_iter().take(1 + pair as usize) {
                        let d = f16_at(b0.add(k * 34));
                        acc = _mm256_fmadd_ps(_mm256_set1_ps(d * a[i + k].d), p, acc);
                    }
                }
                i += 2;
            }
            dot_avx2::hsum(acc)
        }
    };
    (@dot bw, $u:ident, $s:ident) => {
        _mm512_cvtepi32_ps(_mm512_madd_epi16(_mm512_maddubs_epi16($u, $s), _mm512_set1_epi16(1)))
    };
    (@dot vnni, $u:ident, $s:ident) => {
        _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), $u, $s))
    };
}

avx512_kernels!(
    bw,
    "avx512f,avx512bw,avx512vl,avx2,fma,f16c",
    dot_q4_bw,
    dot_q8_0_bw,
    dot_bw
);
avx512_kernels!(
    vnni,
    "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c",
    dot_q4_vnni,
    dot_q8_0_vnni,
    dot_vnni
);
