//! AVX2 dot products of the K formats (Q4_K, Q5_K, Q6_K) with Q8_K activations.
//!
//! Per super-block the integer work stays in i32 lanes: `vpmaddubsw` forms u8·i8 pair sums
//! (quants are unsigned here; Q6_K's `-32` offset is applied afterwards through the activation
//! group sums `bsums`), and `vpmaddwd` against the broadcast sub-block scale both widens to
//! i32 and applies the scale in one instruction. Only one int→float conversion and one FMA per
//! super-block remain. Bounds: a pair sum is at most 2·63·127 = 16002 (< i16 max), times a
//! scale ≤ 127 and summed over 256 elements stays far inside i32.
//!
//! Every function is `unsafe`: it requires AVX2, FMA and F16C, and `w` must hold `a.len()`
//! super-blocks (the matmul driver guarantees both).

#![cfg(target_arch = "x86_64")]

use super::act::BlockQ8K;
use super::blocks::{f16_at, scale_min_k4};
use super::dot_avx2::hsum;
use std::arch::x86_64::*;

/// 32 activation quants starting at element `at`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn act32(a: &BlockQ8K, at: usize) -> __m256i {
    // SAFETY: at + 32 <= 256 for every caller (sub-block starts).
    debug_assert!(at + 32 <= a.qs.len());
    unsafe { _mm256_loadu_si256(a.qs.as_ptr().add(at).cast()) }
}

/// `sc · Σ u·s` as eight i32 partial sums (u unsigned quants, s activation quants).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn scaled_dot(u: __m256i, s: __m256i, sc: __m256i) -> __m256i {
    _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), sc)
}

/// The `Σ_j m_j · (sum of activation quants of sub-block j)` correction of Q4_K/Q5_K.
#[inline]
fn mins_term(scales: &[u8], a: &BlockQ8K) -> i32 {
    (0..8)
        .map(|j| {
            let (_, m) = scale_min_k4(j, scales);
            m as i32 * (a.bsums[2 * j] as i32 + a.bsums[2 * j + 1] as i32)
        })
        .sum()
}

/// Q4_K (`Q5 = false`) or Q5_K row · Q8_K activations.
///
/// # Safety
/// AVX2, FMA and F16C must be available; `w` holds at least `a.len()` super-blocks.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dot_q45k<const Q5: bool>(w: &[u8], a: &[BlockQ8K]) -> f32 {
    let (ts, qs_at) = if Q5 { (176, 48) } else { (144, 16) };
    debug_assert!(w.len() >= a.len() * ts);
    let mask = _mm256_set1_epi8(0x0F);
    let one = _mm256_set1_epi8(1);
    let mut acc = _mm256_setzero_ps();
    let mut mins = 0.0f32;
    for (b, ab) in w.chunks_exact(ts).zip(a) {
        let scales = &b[4..16];
        // SAFETY: a Q5_K block holds 32 qh bytes at 16.
        let qh = if Q5 {
            unsafe { _mm256_loadu_si256(b.as_ptr().add(16).cast()) }
        } else {
            one
        };
        let mut sumi = _mm256_setzero_si256();
        for c in 0..4 {
            // SAFETY: qs holds 128 bytes from qs_at; chunk c reads 32 of them.
            let q = unsafe { _mm256_loadu_si256(b.as_ptr().add(qs_at + 32 * c).cast()) };
            let mut lo = _mm256_and_si256(q, mask);
            let mut hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), mask);
            if Q5 {
                // Bit s of qh[l] is the fifth bit of sub-block s's element l. The 16-bit shift
                // leaks neighbouring bits only into bit positions the mask then clears.
                let h = |s: i32| {
                    let bit = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(s)), one);
                    _mm256_slli_epi16(bit, 4)
                };
                lo = _mm256_or_si256(lo, h(2 * c as i32));
                hi = _mm256_or_si256(hi, h(2 * c as i32 + 1));
            }
            let (s0, _) = scale_min_k4(2 * c, scales);
            let (s1, _) = scale_min_k4(2 * c + 1, scales);
            let p0 = scaled_dot(lo, act32(ab, 64 * c), _mm256_set1_epi16(s0 as i16));
            let p1 = scaled_dot(hi, act32(ab, 64 * c + 32), _mm256_set1_epi16(s1 as i16));
            sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(p0, p1));
        }
        let d = f16_at(b, 0) * ab.d;
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
        mins += f16_at(b, 2) * ab.d * mins_term(scales, ab) as f32;
    }
    hsum(acc) - mins
}

/// Q6_K row · Q8_K activations.
///
/// # Safety
/// AVX2, FMA and F16C must be available; `w` holds at least `a.len()` super-blocks.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dot_q6k(w: &[u8], a: &[BlockQ8K]) -> f32 {
    debug_assert!(w.len() >= a.len() * 210);
    let mask4 = _mm256_set1_epi8(0x0F);
    let mask2 = _mm256_set1_epi8(0x03);
    let mut acc = _mm256_setzero_ps();
    for (b, ab) in w.chunks_exact(210).zip(a) {
        let sc = |g: usize| b[192 + g] as i8 as i16;
        let mut sumi = _mm256_setzero_si256();
        for n in 0..2 {
            // SAFETY: half n reads ql[64n..64n+64] and qh[32n..32n+32] inside the block.
            let (ql0, ql1, qh) = unsafe {
                let p = b.as_ptr();
                (
                    _mm256_loadu_si256(p.add(64 * n).cast()),
                    _mm256_loadu_si256(p.add(64 * n + 32).cast()),
                    _mm256_loadu_si256(p.add(128 + 32 * n).cast()),
                )
            };
            // Parts 0..4 of the half are elements 32·part + l: low/high nibbles of ql0/ql1
            // with bits 2·part of qh on top.
            let lows = [
                _mm256_and_si256(ql0, mask4),
                _mm256_and_si256(ql1, mask4),
                _mm256_and_si256(_mm256_srli_epi16(ql0, 4), mask4),
                _mm256_and_si256(_mm256_srli_epi16(ql1, 4), mask4),
            ];
            for (part, low) in lows.into_iter().enumerate() {
                let high = _mm256_and_si256(
                    _mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * part as i32)),
                    mask2,
                );
                let q = _mm256_or_si256(low, _mm256_slli_epi16(high, 4));
                let at = 128 * n + 32 * part;
                let g = at / 16;
                // Elements at..at+16 use scale g, the next 16 use g + 1 (one per 128-bit lane).
                let scv = _mm256_set_m128i(_mm_set1_epi16(sc(g + 1)), _mm_set1_epi16(sc(g)));
                sumi = _mm256_add_epi32(sumi, scaled_dot(q, act32(ab, at), scv));
            }
        }
        // Quants were taken unsigned (0..64); remove the offset: 32 · Σ_g sc_g · bsum_g.
        let offset: i32 = (0..16).map(|g| sc(g) as i32 * ab.bsums[g] as i32).sum();
        let sumi = _mm256_sub_epi32(sumi, _mm256_setr_epi32(32 * offset, 0, 0, 0, 0, 0, 0, 0));
        let d = f16_at(b, 208) * ab.d;
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
    }
    hsum(acc)
}
