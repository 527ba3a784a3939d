//! Activation quantization: the f32 input of a product turned into 8-bit blocks once per call.
//!
//! Integer dot products need both operands quantized. Like llama.cpp, activations are quantized
//! per block of 32 (for Q4_0, Q4_1, Q8_0 weights) or per super-block of 256 (K formats), with a
//! symmetric scale `d = amax / 127`, and exactly as ggml's `quantize_row_q8_0`/`q8_1` do it:
//! quants are `round(x · 127 / amax)` (not `x / d`, which differs in the last bit), and the
//! block's `d` and `s = d · Σq` are stored rounded to f16 (Q8_K keeps an f32 `d`, as ggml does).
//! The f16 rounding costs accuracy (`|x − d·q| ≤ d/2 + 127·|d − d₁₆|`, about `0.53 d`), but
//! the golden continuations are llama.cpp's, and its rounding decides their near-ties.

use crate::ggml_math::round_f16;
use tessera_format::QK_K;

/// 32 activations `d * qs[i]`, plus `s = d * sum(qs)` (the Q8_1 term that lets Q4_1's offset
/// `m` and Q4_0's implicit `-8` be applied once per block instead of per element).
#[derive(Debug, Clone, Copy)]
#[repr(C, align(8))]
pub(crate) struct BlockQ8 {
    /// Scale (an f16 value).
    pub d: f32,
    /// `d * sum(qs)` from the unrounded scale, rounded to f16.
    pub s: f32,
    /// Quants in `-127..=127`.
    pub qs: [i8; 32],
}

impl BlockQ8 {
    pub(crate) const ZERO: BlockQ8 = BlockQ8 {
        d: 0.0,
        s: 0.0,
        qs: [0; 32],
    };
}

/// 256 activations `d * qs[i]` with the sums of each group of 16 quants (K formats subtract
/// their per-sub-block minimum through these sums).
#[derive(Debug, Clone, Copy)]
#[repr(C, align(8))]
pub(crate) struct BlockQ8K {
    /// Scale.
    pub d: f32,
    /// Quants in `-127..=127`.
    pub qs: [i8; QK_K],
    /// `bsums[g] = sum(qs[16 g .. 16 g + 16])`.
    pub bsums: [i16; QK_K / 16],
}

impl BlockQ8K {
    pub(crate) const ZERO: BlockQ8K = BlockQ8K {
        d: 0.0,
        qs: [0; QK_K],
        bsums: [0; QK_K / 16],
    };
}

/// The scale and the quantizing multiplier for a block whose largest magnitude is `amax`:
/// ggml's `d = amax / 127` and `id = 127 / amax`.
#[inline(always)]
fn scale(amax: f32) -> (f32, f32) {
    let d = amax / 127.0;
    (d, if amax == 0.0 { 0.0 } else { 127.0 / amax })
}

/// The stored `d` and `s` of a Q8 block: ggml rounds both to f16, `s` from the unrounded `d`.
#[inline(always)]
fn stored(d: f32, sum: i32) -> (f32, f32) {
    (round_f16(d), round_f16(d * sum as f32))
}

/// Quantizes `x` (a multiple of 32 long) into `out` (`x.len() / 32` blocks).
///
/// # Panics
/// When the lengths disagree (internal invariant).
pub(crate) fn quantize_q8(x: &[f32], out: &mut [BlockQ8]) {
    assert_eq!(x.len(), out.len() * 32, "activation length");
    #[cfg(target_arch = "x86_64")]
    if crate::isa::isa() >= crate::isa::Isa::Avx2 {
        // SAFETY: AVX2 and FMA were detected at run time.
        unsafe { quantize_q8_avx2(x, out) };
        return;
    }
    quantize_q8_scalar(x, out);
}

/// The portable version of [`quantize_q8`].
pub(crate) fn quantize_q8_scalar(x: &[f32], out: &mut [BlockQ8]) {
    for (xb, b) in x.chunks_exact(32).zip(out.iter_mut()) {
        let amax = xb.iter().fold(0.0f32, |a, v| a.max(v.abs()));
        let (d, id) = scale(amax);
        let mut sum = 0i32;
        for (q, v) in b.qs.iter_mut().zip(xb) {
            // round() here and _mm256_round_ps(nearest-even) in the AVX2 path differ only on
            // exact .5 ties; both keep the error within d / 2.
            *q = (v * id).round_ties_even() as i8;
            sum += *q as i32;
        }
        (b.d, b.s) = stored(d, sum);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn quantize_q8_avx2(x: &[f32], out: &mut [BlockQ8]) {
    use std::arch::x86_64::*;
    let sign = _mm256_set1_ps(-0.0);
    for (xb, b) in x.chunks_exact(32).zip(out.iter_mut()) {
        // SAFETY: xb has 32 f32; b.qs has 32 bytes; all loads and stores are unaligned ones.
        unsafe {
            let p = xb.as_ptr();
            let v = [
                _mm256_loadu_ps(p),
                _mm256_loadu_ps(p.add(8)),
                _mm256_loadu_ps(p.add(16)),
                _mm256_loadu_ps(p.add(24)),
            ];
            let a01 = _mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1]));
            let a23 = _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3]));
            let m = _mm256_max_ps(a01, a23);
            let m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
            let m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
            let m1 = _mm_max_ss(m2, _mm_movehdup_ps(m2));
            let (d, id) = scale(_mm_cvtss_f32(m1));
            let idv = _mm256_set1_ps(id);
            let r = |v: __m256| {
                _mm256_cvtps_epi32(_mm256_round_ps(
                    _mm256_mul_ps(v, idv),
                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
                ))
            };
            let (i0, i1, i2, i3) = (r(v[0]), r(v[1]), r(v[2]), r(v[3]));
            // Sum the quants in i32 before narrowing (exact: at most 32 * 127).
            let s = _mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3));
            let s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
            let s2 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0b0100_1110));
            let s1 = _mm_add_epi32(s2, _mm_shuffle_epi32(s2, 0b1011_0001));
            let sum = _mm_cvtsi128_si32(s1);
            // packs works within 128-bit lanes; the final permute restores element order.
            let w01 = _mm256_packs_epi32(i0, i1);
            let w23 = _mm256_packs_epi32(i2, i3);
            let bytes = _mm256_packs_epi16(w01, w23);
            let ordered =
                _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            _mm256_storeu_si256(b.qs.as_mut_ptr().cast(), ordered);
            (b.d, b.s) = stored(d, sum);
        }
    }
}

/// Quantizes `x` (a multiple of 256 long) into `out` (`x.len() / 256` super-blocks).
///
/// # Panics
/// When the lengths disagree (internal invariant).
pub(crate) fn quantize_q8k(x: &[f32], out: &mut [BlockQ8K]) {
    assert_eq!(x.len(), out.len() * QK_K, "activation length");
    for (xb, b) in x.chunks_exact(QK_K).zip(out.iter_mut()) {
        let amax = xb.iter().fold(0.0f32, |a, v| a.max(v.abs()));
        let (d, id) = scale(amax);
        for (q, v) in b.qs.iter_mut().zip(xb) {
            *q = (v * id).round_ties_even() as i8;
        }
        for (g, s) in b.bsums.iter_mut().enumerate() {
            *s = b.qs[16 * g..16 * g + 16].iter().map(|&q| q as i16).sum();
        }
        b.d = d;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: u32) -> Vec<f32> {
        // A cheap deterministic spread of magnitudes, including exact zeros and ties.
        (0..n)
            .map(|i| {
                let h = (i as u32)
                    .wrapping_mul(2654435761)
                    .wrapping_add(seed.wrapping_mul(40503));
                ((h >> 8) as f32 / (1 << 24) as f32 - 0.5) * (1 + (i % 7)) as f32
            })
            .collect()
    }

    /// Ensures that every quantized activation is within half a step (plus the f16 rounding of
    /// the scale) of its input, that `d` and `s` are ggml's f16-rounded values, and that the
    /// quants are ggml's `round(x · 127 / amax)`.
    #[test]
    fn q8_error_is_half_a_step() {
        let x = data(32 * 40, 3);
        let mut b = vec![BlockQ8::ZERO; 40];
        quantize_q8_scalar(&x, &mut b);
        for (xb, blk) in x.chunks_exact(32).zip(&b) {
            let amax = xb.iter().fold(0.0f32, |a, v| a.max(v.abs()));
            let d = f64::from(amax) / 127.0;
            let sum: i32 = blk.qs.iter().map(|&q| q as i32).sum();
            assert_eq!(blk.d, round_f16(amax / 127.0));
            assert_eq!(blk.s, round_f16(amax / 127.0 * sum as f32));
            let d16_err = (f64::from(blk.d) - d).abs();
            assert!(d16_err <= d * 2f64.powi(-11), "f16 rounding of d");
            for (v, &q) in xb.iter().zip(&blk.qs) {
                assert_eq!(q as f32, (v * (127.0 / amax)).round_ties_even());
                let err = (f64::from(*v) - f64::from(blk.d) * f64::from(q)).abs();
                assert!(err <= d * 0.5 * (1.0 + 1e-5) + 127.0 * d16_err, "{v} {q}");
            }
        }
    }

    /// Ensures that the AVX2 activation quantizer produces the scalar one's blocks.
    #[test]
    fn q8_avx2_matches_scalar() {
        if crate::isa::isa() < crate::isa::Isa::Avx2 {
            eprintln!("skipping: no AVX2");
            return;
        }
        let mut x = data(32 * 64, 9);
        x[..32].fill(0.0);
        let mut a = vec![BlockQ8::ZERO; 64];
        let mut b = vec![BlockQ8::ZERO; 64];
        quantize_q8_scalar(&x, &mut a);
        quantize_q8(&x, &mut b);
        for (i, (p, q)) in a.iter().zip(&b).enumerate() {
            assert_eq!(p.d, q.d, "block {i}");
            assert_eq!(p.qs, q.qs, "block {i}");
            assert_eq!(p.s, q.s, "block {i}");
        }
    }

    /// Ensures that Q8_K blocks keep the half-step bound and correct group sums.
    #[test]
    fn q8k_error_and_sums() {
        let x = data(QK_K * 3, 5);
        let mut b = vec![BlockQ8K::ZERO; 3];
        quantize_q8k(&x, &mut b);
        for (xb, blk) in x.chunks_exact(QK_K).zip(&b) {
            for (v, &q) in xb.iter().zip(&blk.qs) {
                assert!((v - blk.d * q as f32).abs() <= blk.d * 0.5 * (1.0 + 1e-5));
            }
            for g in 0..16 {
                let s: i32 = blk.qs[16 * g..16 * g + 16].iter().map(|&q| q as i32).sum();
                assert_eq!(s, blk.bsums[g] as i32);
            }
        }
    }
}
