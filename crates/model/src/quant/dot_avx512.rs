//! AVX-512 dot products for the 32-element formats (Q4_0, Q4_1, Q8_0), two blocks per vector.
//!
//! Two variants are generated from one body: plain AVX-512 BW (`vpmaddubsw` + `vpmaddwd`) and
//! AVX-512 VNNI (`vpdpbusd`, the same u8·i8 sum in one instruction). Both are compiled on every
//! x86-64 build and only called after [`super::dispatch::isa`] detects the features, so a
//! machine without AVX-512 (like the 2-core development box) still builds and tests the rest;
//! the tests compare these against the scalar kernels wherever the CPU has them.
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

/// Eight lanes of `a` then eight lanes of `b`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
fn join_scales(a: f32, b: f32) -> __m512 {
    let lo = _mm512_castps256_ps512(_mm256_set1_ps(a));
    _mm512_castpd_ps(_mm512_insertf64x4(
        _mm512_castps_pd(lo),
        _mm256_castps_pd(_mm256_set1_ps(b)),
        1,
    ))
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
            let mut acc = _mm512_setzero_ps();
            let mut accm = 0.0f32;
            let mut i = 0;
            while i + 1 < a.len() {
                // SAFETY: blocks i and i + 1 are inside w.
                unsafe {
                    let b0 = w.as_ptr().add(i * ts);
                    let b1 = b0.add(ts);
                    let (d0, d1) = (f16_at(b0), f16_at(b1));
                    let (m0, m1) =
                        if Q41 { (f16_at(b0.add(2)), f16_at(b1.add(2))) } else { (-8.0 * d0, -8.0 * d1) };
                    let wq = join_i(dot_avx2::unpack_q4(b0.add(o)), dot_avx2::unpack_q4(b1.add(o)));
                    let aq = join_i(load_act(&a[i]), load_act(&a[i + 1]));
                    let sc = join_scales(d0 * a[i].d, d1 * a[i + 1].d);
                    acc = _mm512_fmadd_ps(sc, $dot(wq, aq), acc);
                    accm += m0 * a[i].s + m1 * a[i + 1].s;
                }
                i += 2;
            }
            let mut sum = _mm512_reduce_add_ps(acc) + accm;
            if i < a.len() {
                // SAFETY: forwarded contract; AVX2/FMA/F16C are implied by these features.
                sum += unsafe { dot_avx2::dot_q4::<Q41>(&w[i * ts..], &a[i..]) };
            }
            sum
        }

        /// Q8_0 row · Q8 activations.
        ///
        /// # Safety
        /// The CPU has this function's features; `w` holds at least `a.len()` blocks.
        #[target_feature(enable = $features)]
        pub(crate) unsafe fn $q8(w: &[u8], a: &[BlockQ8]) -> f32 {
            debug_assert!(w.len() >= a.len() * 34);
            let mut acc = _mm512_setzero_ps();
            let mut i = 0;
            while i + 1 < a.len() {
                // SAFETY: blocks i and i + 1 are inside w.
                unsafe {
                    let b0 = w.as_ptr().add(i * 34);
                    let b1 = b0.add(34);
                    let wq = join_i(_mm256_loadu_si256(b0.add(2).cast()), _mm256_loadu_si256(b1.add(2).cast()));
                    let aq = join_i(load_act(&a[i]), load_act(&a[i + 1]));
                    // |w| · (a with w's sign): the unsigned operand must be the weight magnitude.
                    let neg = _mm512_movepi8_mask(wq);
                    let aw = _mm512_abs_epi8(wq);
                    let sa = _mm512_mask_sub_epi8(aq, neg, _mm512_setzero_si512(), aq);
                    let sc = join_scales(f16_at(b0) * a[i].d, f16_at(b1) * a[i + 1].d);
                    acc = _mm512_fmadd_ps(sc, $dot(aw, sa), acc);
                }
                i += 2;
            }
            let mut sum = _mm512_reduce_add_ps(acc);
            if i < a.len() {
                // SAFETY: forwarded contract; AVX2/FMA/F16C are implied by these features.
                sum += unsafe { dot_avx2::dot_q8_0(&w[i * 34..], &a[i..]) };
            }
            sum
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
