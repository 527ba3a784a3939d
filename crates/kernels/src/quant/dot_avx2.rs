//! AVX2 (+FMA, F16C) dot products: the hot path on today's x86 servers and laptops.
//!
//! 4-bit weights are unpacked to 32 unsigned bytes (low nibbles → elements 0..16 in the low
//! lane, high nibbles → 16..32 in the high lane, matching the activation order), multiplied
//! with the signed activation bytes by `vpmaddubsw` (u8·i8 pairs summed into i16: at most
//! 2·15·127, so no saturation) and widened to i32 by `vpmaddwd` against ones. Q8_0 weights are
//! signed, so the sign is moved onto the activations first (`vpsignb`) and `|w|` is the
//! unsigned operand: |w|·sign(a, w) = w·a, with at most 2·128·127 < 32767 per pair.
//!
//! The `_x4` kernels are the prefill micro-kernel: one weight row against four tokens, so each
//! weight block is loaded and unpacked once and used four times.
//!
//! Every function is `unsafe` because it requires AVX2, FMA and F16C; callers check
//! [`crate::isa::isa`] first. Slices are walked with raw pointers only inside their bounds:
//! `w` holds `a.len()` blocks (checked with debug assertions; the matmul driver guarantees it).

#![cfg(target_arch = "x86_64")]

use super::act::BlockQ8;
use std::arch::x86_64::*;

pub(crate) use crate::ggml_math::hsum8_m256 as hsum;

/// The two f16 values at `p` and `p + 2` (a block's `d` and `m`), as f32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f16x2(p: *const u8) -> (f32, f32) {
    // SAFETY: the caller guarantees 4 readable bytes at p.
    let v = _mm_cvtph_ps(_mm_cvtsi32_si128(unsafe {
        p.cast::<i32>().read_unaligned()
    }));
    (_mm_cvtss_f32(v), _mm_cvtss_f32(_mm_movehdup_ps(v)))
}

/// The f16 at `p` as f32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn f16x1(p: *const u8) -> f32 {
    // SAFETY: the caller guarantees 2 readable bytes at p.
    let bits = unsafe { p.cast::<u16>().read_unaligned() };
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
}

/// 16 packed nibble bytes at `p` as 32 bytes in element order.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn unpack_q4(p: *const u8) -> __m256i {
    // SAFETY: the caller guarantees 16 readable bytes at p.
    let q = unsafe { _mm_loadu_si128(p.cast()) };
    let mask = _mm_set1_epi8(0x0F);
    let lo = _mm_and_si128(q, mask);
    let hi = _mm_and_si128(_mm_srli_epi16(q, 4), mask);
    _mm256_set_m128i(hi, lo)
}

/// Eight i32 partial sums of `u · s` (u unsigned, s signed bytes), as f32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn dot_u8i8(u: __m256i, s: __m256i) -> __m256 {
    let p16 = _mm256_maddubs_epi16(u, s);
    _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, _mm256_set1_epi16(1)))
}

/// Loads a Q8 activation block's 32 quants.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn load_act(a: &BlockQ8) -> __m256i {
    // SAFETY: qs is 32 bytes.
    unsafe { _mm256_loadu_si256(a.qs.as_ptr().cast()) }
}

/// A Q4 block's `(d, m, qs offset)`: Q4_1 stores `m`; Q4_0 is `d (q - 8)`, i.e. `m = -8 d`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_params<const Q41: bool>(b: *const u8) -> (f32, f32, usize) {
    if Q41 {
        // SAFETY: a Q4_1 block has 20 bytes.
        let (d, m) = unsafe { f16x2(b) };
        (d, m, 4)
    } else {
        // SAFETY: a Q4_0 block has 18 bytes.
        let d = unsafe { f16x1(b) };
        (d, -8.0 * d, 2)
    }
}

/// Bytes per block of the Q4 variant.
const fn q4_size<const Q41: bool>() -> usize {
    if Q41 { 20 } else { 18 }
}

/// Q4_0 (`Q41 = false`) or Q4_1 row · Q8 activations.
///
/// # Safety
/// AVX2, FMA and F16C must be available; `w` holds at least `a.len()` blocks.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dot_q4<const Q41: bool>(w: &[u8], a: &[BlockQ8]) -> f32 {
    let ts = q4_size::<Q41>();
    debug_assert!(w.len() >= a.len() * ts);
    // The same operations in the same order as one lane of `dot_q4_x4`: a token's result must
    // not depend on how many tokens share the call, or batching would change the output.
    let mut acc = _mm256_setzero_ps();
    let mut accm = 0.0f32;
    for (i, ai) in a.iter().enumerate() {
        // SAFETY: block i is inside w.
        unsafe {
            let b = w.as_ptr().add(i * ts);
            let (d, m, o) = q4_params::<Q41>(b);
            let p = dot_u8i8(unpack_q4(b.add(o)), load_act(ai));
            acc = _mm256_fmadd_ps(_mm256_set1_ps(d * ai.d), p, acc);
            accm = m.mul_add(ai.s, accm);
        }
    }
    accm + hsum(acc)
}

/// One Q4_0/Q4_1 row against four tokens' activations: `[dot(w, a[t]) for t in 0..4]`.
///
/// # Safety
/// As [`dot_q4`]; all four activation slices have the same length.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dot_q4_x4<const Q41: bool>(w: &[u8], a: [&[BlockQ8]; 4]) -> [f32; 4] {
    let ts = q4_size::<Q41>();
    let nb = a[0].len();
    debug_assert!(w.len() >= nb * ts && a.iter().all(|x| x.len() == nb));
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut accm = _mm_setzero_ps();
    for i in 0..nb {
        // SAFETY: block i is inside w and every a[t].
        unsafe {
            let b = w.as_ptr().add(i * ts);
            let (d, m, o) = q4_params::<Q41>(b);
            let wq = unpack_q4(b.add(o));
            for t in 0..4 {
                let p = dot_u8i8(wq, load_act(&a[t][i]));
                acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(d * a[t][i].d), p, acc[t]);
            }
            let s = _mm_setr_ps(a[0][i].s, a[1][i].s, a[2][i].s, a[3][i].s);
            accm = _mm_fmadd_ps(_mm_set1_ps(m), s, accm);
        }
    }
    let mut out = [0.0f32; 4];
    // SAFETY: out has 4 f32.
    unsafe { _mm_storeu_ps(out.as_mut_ptr(), accm) };
    for t in 0..4 {
        out[t] += hsum(acc[t]);
    }
    out
}

/// Q8_0 row · Q8 activations.
///
/// # Safety
/// AVX2, FMA and F16C must be available; `w` holds at least `a.len()` blocks.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dot_q8_0(w: &[u8], a: &[BlockQ8]) -> f32 {
    debug_assert!(w.len() >= a.len() * 34);
    // Mirrors one lane of `dot_q8_0_x4` exactly, so batching never changes a token's result.
    let mut acc = _mm256_setzero_ps();
    for (i, ai) in a.iter().enumerate() {
        // SAFETY: block i is inside w.
        unsafe {
            let b = w.as_ptr().add(i * 34);
            let wq = _mm256_loadu_si256(b.add(2).cast());
            let p = dot_u8i8(_mm256_sign_epi8(wq, wq), _mm256_sign_epi8(load_act(ai), wq));
            acc = _mm256_fmadd_ps(_mm256_set1_ps(f16x1(b) * ai.d), p, acc);
        }
    }
    hsum(acc)
}

/// One Q8_0 row against four tokens' activations.
///
/// # Safety
/// As [`dot_q8_0`]; all four activation slices have the same length.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dot_q8_0_x4(w: &[u8], a: [&[BlockQ8]; 4]) -> [f32; 4] {
    let nb = a[0].len();
    debug_assert!(w.len() >= nb * 34 && a.iter().all(|x| x.len() == nb));
    let mut acc = [_mm256_setzero_ps(); 4];
    for i in 0..nb {
        // SAFETY: block i is inside w and every a[t].
        unsafe {
            let b = w.as_ptr().add(i * 34);
            let wq = _mm256_loadu_si256(b.add(2).cast());
            let aw = _mm256_sign_epi8(wq, wq);
            let d = f16x1(b);
            for t in 0..4 {
                let p = dot_u8i8(aw, _mm256_sign_epi8(load_act(&a[t][i]), wq));
                acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(d * a[t][i].d), p, acc[t]);
            }
        }
    }
    std::array::from_fn(|t| hsum(acc[t]))
}
