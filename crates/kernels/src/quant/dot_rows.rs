//! The decode micro-kernel: four weight rows against one token's activations.
//!
//! A decode step is a matrix-vector product, and the single-row kernels' float accumulation is
//! one serial chain of fused multiply-adds per row (block after block, in ggml's order, which
//! the results must keep: see `dot_scalar`). One row at a time, each block waits for the
//! previous block's FMA; four rows at a time, four independent chains overlap, and each
//! activation block is loaded once for four rows. Every row's arithmetic is exactly its
//! single-row kernel's, so which kernel computed a row never shows in the result.
//!
//! Two integer-dot variants come from one body: AVX2 (`vpmaddubsw` + `vpmaddwd`) and AVX-512
//! VNNI on 256-bit vectors (`vpdpbusd`); integer sums are exact, so they agree bit for bit.

#![cfg(target_arch = "x86_64")]

use super::act::BlockQ8;
use super::dot_avx2::{f16x1 as f16_at, hsum, load_act, unpack_q4};
use std::arch::x86_64::*;

macro_rules! row_kernels {
    ($kind:ident, $features:literal, $q4:ident, $q8:ident, $dot:ident) => {
        /// Eight i32 sums of adjacent u8·i8 quadruples, as f32.
        #[inline]
        #[target_feature(enable = $features)]
        fn $dot(u: __m256i, s: __m256i) -> __m256 {
            row_kernels!(@dot $kind, u, s)
        }

        /// Four Q4_0 (`Q41 = false`) or Q4_1 rows · one token: `[dot_q4(w[r], a) for r]`.
        ///
        /// # Safety
        /// The CPU has this function's features; every `w[r]` holds at least `a.len()` blocks.
        #[target_feature(enable = $features)]
        pub(crate) unsafe fn $q4<const Q41: bool>(w: [&[u8]; 4], a: &[BlockQ8]) -> [f32; 4] {
            let (ts, o) = if Q41 { (20, 4) } else { (18, 2) };
            debug_assert!(w.iter().all(|r| r.len() >= a.len() * ts));
            let mut acc = [_mm256_setzero_ps(); 4];
            // Lane r holds row r's offset sum; a lane-wise FMA is the scalar FMA of `dot_q4`.
            let mut accm = _mm_setzero_ps();
            for (i, ai) in a.iter().enumerate() {
                let aq = load_act(ai);
                let mut m = [0.0f32; 4];
                for r in 0..4 {
                    // SAFETY: block i is inside w[r].
                    unsafe {
                        let b = w[r].as_ptr().add(i * ts);
                        let d = f16_at(b);
                        m[r] = if Q41 { f16_at(b.add(2)) } else { -8.0 * d };
                        let p = $dot(unpack_q4(b.add(o)), aq);
                        acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * ai.d), p, acc[r]);
                    }
                }
                // SAFETY: m holds 4 f32.
                let mv = unsafe { _mm_loadu_ps(m.as_ptr()) };
                accm = _mm_fmadd_ps(mv, _mm_set1_ps(ai.s), accm);
            }
            let mut out = [0.0f32; 4];
            // SAFETY: out holds 4 f32.
            unsafe { _mm_storeu_ps(out.as_mut_ptr(), accm) };
            for r in 0..4 {
                out[r] += hsum(acc[r]);
            }
            out
        }

        /// Four Q8_0 rows · one token: `[dot_q8_0(w[r], a) for r]`.
        ///
        /// # Safety
        /// The CPU has this function's features; every `w[r]` holds at least `a.len()` blocks.
        #[target_feature(enable = $features)]
        pub(crate) unsafe fn $q8(w: [&[u8]; 4], a: &[BlockQ8]) -> [f32; 4] {
            debug_assert!(w.iter().all(|r| r.len() >= a.len() * 34));
            let mut acc = [_mm256_setzero_ps(); 4];
            for (i, ai) in a.iter().enumerate() {
                let aq = load_act(ai);
                for r in 0..4 {
                    // SAFETY: block i is inside w[r].
                    unsafe {
                        let b = w[r].as_ptr().add(i * 34);
                        let wq = _mm256_loadu_si256(b.add(2).cast());
                        // |w| · (a with w's sign): the unsigned operand is the weight magnitude.
                        let p = $dot(_mm256_sign_epi8(wq, wq), _mm256_sign_epi8(aq, wq));
                        acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(f16_at(b) * ai.d), p, acc[r]);
                    }
                }
            }
            std::array::from_fn(|r| hsum(acc[r]))
        }
    };
    (@dot maddubs, $u:ident, $s:ident) => {
        _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16($u, $s), _mm256_set1_epi16(1)))
    };
    (@dot vnni, $u:ident, $s:ident) => {
        _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(_mm256_setzero_si256(), $u, $s))
    };
}

row_kernels!(maddubs, "avx2,fma,f16c", dot_q4_r4, dot_q8_0_r4, dot_u8i8);
row_kernels!(
    vnni,
    "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c",
    dot_q4_r4_vnni,
    dot_q8_0_r4_vnni,
    dot_u8i8_vnni
);
