//! Portable dot products of one weight row (raw GGUF blocks) with quantized activations.
//!
//! These are the reference every SIMD kernel is tested against, and the path on CPUs without
//! AVX2. They are *bit-identical* to the SIMD kernels, not merely close: a token's logits must
//! not depend on which machine (scalar, AVX2, AVX-512) serves it, or greedy output would change
//! with the CPU. So this file spells out the SIMD kernels' arithmetic one lane at a time:
//!
//! * an integer "lane" is the i32 sum of four adjacent products (`vpmaddubsw` + `vpmaddwd`, or
//!   `vpdpbusd`, both sum elements `4l..4l+4` into lane `l`); integer sums are exact (i32 cannot
//!   overflow: at most 256 · 63 · 127 · 31 per super-block), so only the lane *partition* has to
//!   match, not the order;
//! * each block scales its eight lane sums into eight f32 accumulators with one fused
//!   multiply-add each ([`f32::mul_add`], the same single rounding as `vfmadd`), in block order;
//! * the accumulators are reduced by [`hsum8`], the exact pairing of the SIMD horizontal sum.
//!
//! This is also llama.cpp's own AVX2 order for Q4_1 · Q8_1 (`ggml_vec_dot_q4_1_q8_1`), which the
//! golden tests compare against. Float weights (f32, f16, bf16) have their own, simpler order —
//! one serial fused chain per pair — documented in `matmul_float`.

use super::act::{BlockQ8, BlockQ8K};
use super::blocks::{f16_at, scale_min_k4};
use half::{bf16, f16};
use tessera_format::QK_K;

/// Lanes of one 256-bit f32 vector.
pub(crate) const LANES: usize = 8;

/// The horizontal sum of eight lanes in the SIMD kernels' order: high half onto low half, then
/// lanes 2–3 onto 0–1, then lane 1 onto lane 0 (`hsum` in `dot_avx2`, ggml's `hsum_float_8`).
#[inline(always)]
pub(crate) fn hsum8(v: &[f32; LANES]) -> f32 {
    let s4 = [v[0] + v[4], v[1] + v[5], v[2] + v[6], v[3] + v[7]];
    let s2 = [s4[0] + s4[2], s4[1] + s4[3]];
    s2[0] + s2[1]
}

/// The i32 sum of `u[4l..4l+4] · s[4l..4l+4]` for each of the eight lanes of a 32-element block.
#[inline(always)]
fn lane_dots(u: &[i32; 32], s: &[i8]) -> [i32; LANES] {
    std::array::from_fn(|l| (4 * l..4 * l + 4).map(|e| u[e] * s[e] as i32).sum())
}

/// `acc[l] = scale · p[l] + acc[l]`, fused, for every lane.
#[inline(always)]
fn fma_lanes(acc: &mut [f32; LANES], scale: f32, p: &[i32; LANES]) {
    for (a, &v) in acc.iter_mut().zip(p) {
        *a = scale.mul_add(v as f32, *a);
    }
}

/// A Q4 block's 32 quants in element order (low nibbles are elements 0..16).
#[inline(always)]
fn q4_quants(qs: &[u8]) -> [i32; 32] {
    std::array::from_fn(|e| if e < 16 { qs[e] & 0x0F } else { qs[e - 16] >> 4 } as i32)
}

/// Q4_0 (`Q41 = false`) or Q4_1 row · Q8 activations:
/// `Σ_b d_w d_a Σ(q_w q_a) + m_w s_a`, with Q4_0's `d (q - 8)` taken as `m = -8 d`.
///
/// The `-8` (Q4_0) or `m` (Q4_1) offset is applied once per block through the activation sum
/// `s`, on its own fused accumulator, added to the lane sum at the end (ggml's `summs`).
pub(crate) fn dot_q4<const Q41: bool>(w: &[u8], a: &[BlockQ8]) -> f32 {
    let (ts, o) = if Q41 { (20, 4) } else { (18, 2) };
    let mut acc = [0.0f32; LANES];
    let mut accm = 0.0f32;
    for (b, ab) in w.chunks_exact(ts).zip(a) {
        let d = f16_at(b, 0);
        let m = if Q41 { f16_at(b, 2) } else { -8.0 * d };
        let p = lane_dots(&q4_quants(&b[o..o + 16]), &ab.qs);
        fma_lanes(&mut acc, d * ab.d, &p);
        accm = m.mul_add(ab.s, accm);
    }
    accm + hsum8(&acc)
}

/// Q4_0 row · Q8 activations.
pub(crate) fn dot_q4_0(w: &[u8], a: &[BlockQ8]) -> f32 {
    dot_q4::<false>(w, a)
}

/// Q4_1 row · Q8 activations.
pub(crate) fn dot_q4_1(w: &[u8], a: &[BlockQ8]) -> f32 {
    dot_q4::<true>(w, a)
}

/// Q8_0 row · Q8 activations.
pub(crate) fn dot_q8_0(w: &[u8], a: &[BlockQ8]) -> f32 {
    let mut acc = [0.0f32; LANES];
    for (b, ab) in w.chunks_exact(34).zip(a) {
        let q: [i32; 32] = std::array::from_fn(|e| (b[2 + e] as i8) as i32);
        fma_lanes(&mut acc, f16_at(b, 0) * ab.d, &lane_dots(&q, &ab.qs));
    }
    hsum8(&acc)
}

/// Q4_K / Q5_K shared tail over one super-block whose (unsigned) quants are unpacked into `q`:
/// lane `l` sums `sc_j · Σ_{k<4} q·a` at elements `32 j + 4 l + k` over the eight sub-blocks
/// `j`, exactly the lanes of the AVX2 kernel's `vpmaddwd` against the broadcast scale.
/// Returns the lane sums and the `Σ_j m_j · asum_j` minimum correction.
fn qk_asym_lanes(b: &[u8], q: &[u8; QK_K], ab: &BlockQ8K) -> ([i32; LANES], i32) {
    let scales = &b[4..16];
    let mut lanes = [0i32; LANES];
    let mut summ = 0i32;
    for j in 0..8 {
        let (sc, mn) = scale_min_k4(j, scales);
        for (l, lane) in lanes.iter_mut().enumerate() {
            let at = 32 * j + 4 * l;
            let dot: i32 = (at..at + 4).map(|i| q[i] as i32 * ab.qs[i] as i32).sum();
            *lane += sc as i32 * dot;
        }
        summ += mn as i32 * (ab.bsums[2 * j] as i32 + ab.bsums[2 * j + 1] as i32);
    }
    (lanes, summ)
}

/// Q4_K (`Q5 = false`) or Q5_K row · Q8_K activations:
/// `Σ_sb d_a (d Σ_j sc_j dot_j) − Σ_sb d_a dmin Σ_j m_j asum_j`, the minimum terms summed
/// separately (plain multiplies and adds) and subtracted at the end, as the AVX2 kernel does.
fn dot_q45k<const Q5: bool>(w: &[u8], a: &[BlockQ8K]) -> f32 {
    let ts = if Q5 { 176 } else { 144 };
    let mut acc = [0.0f32; LANES];
    let mut mins = 0.0f32;
    let mut q = [0u8; QK_K];
    for (b, ab) in w.chunks_exact(ts).zip(a) {
        if Q5 {
            let (qh, qs) = (&b[16..48], &b[48..176]);
            for c in 0..4 {
                for l in 0..32 {
                    let h0 = ((qh[l] >> (2 * c)) & 1) << 4;
                    let h1 = ((qh[l] >> (2 * c + 1)) & 1) << 4;
                    q[64 * c + l] = (qs[32 * c + l] & 0x0F) | h0;
                    q[64 * c + 32 + l] = (qs[32 * c + l] >> 4) | h1;
                }
            }
        } else {
            let qs = &b[16..144];
            for c in 0..4 {
                for l in 0..32 {
                    q[64 * c + l] = qs[32 * c + l] & 0x0F;
                    q[64 * c + 32 + l] = qs[32 * c + l] >> 4;
                }
            }
        }
        let (lanes, summ) = qk_asym_lanes(b, &q, ab);
        fma_lanes(&mut acc, f16_at(b, 0) * ab.d, &lanes);
        mins += f16_at(b, 2) * ab.d * summ as f32;
    }
    hsum8(&acc) - mins
}

/// Q4_K row · Q8_K activations.
pub(crate) fn dot_q4k(w: &[u8], a: &[BlockQ8K]) -> f32 {
    dot_q45k::<false>(w, a)
}

/// Q5_K row · Q8_K activations.
pub(crate) fn dot_q5k(w: &[u8], a: &[BlockQ8K]) -> f32 {
    dot_q45k::<true>(w, a)
}

/// Q6_K row · Q8_K activations: `d_a d Σ_g sc_g Σ(q q_a)` over sixteen groups of 16.
///
/// Quants are taken unsigned (0..64) like the AVX2 kernel, which removes the `-32` offset as
/// `32 Σ_g sc_g bsum_g` from lane 0 only; lane `l` of 32-element part `p` uses the scale of
/// group `2p` for lanes 0..4 and `2p + 1` for lanes 4..8.
pub(crate) fn dot_q6k(w: &[u8], a: &[BlockQ8K]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let mut q = [0u8; QK_K];
    for (b, ab) in w.chunks_exact(210).zip(a) {
        for n in 0..2 {
            let ql = &b[64 * n..64 * n + 64];
            let qh = &b[128 + 32 * n..128 + 32 * n + 32];
            let y = &mut q[128 * n..128 * n + 128];
            for l in 0..32 {
                y[l] = (ql[l] & 0x0F) | ((qh[l] & 3) << 4);
                y[l + 32] = (ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4);
                y[l + 64] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
                y[l + 96] = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
            }
        }
        let sc = |g: usize| (b[192 + g] as i8) as i32;
        let mut lanes = [0i32; LANES];
        for p in 0..8 {
            for (l, lane) in lanes.iter_mut().enumerate() {
                let at = 32 * p + 4 * l;
                let dot: i32 = (at..at + 4).map(|i| q[i] as i32 * ab.qs[i] as i32).sum();
                *lane += sc(2 * p + l / 4) * dot;
            }
        }
        let offset: i32 = (0..16).map(|g| sc(g) * ab.bsums[g] as i32).sum();
        lanes[0] -= 32 * offset;
        fma_lanes(&mut acc, f16_at(b, 208) * ab.d, &lanes);
    }
    hsum8(&acc)
}

/// Float row · f32 activations, `w` widened by `load`: one fused multiply-add per element, in
/// element order, from `+0` — the order every float kernel keeps (see `matmul_float`).
#[inline(always)]
fn dot_float(w: &[u8], x: &[f32], elem: usize, load: impl Fn(&[u8]) -> f32) -> f32 {
    let mut acc = 0.0f32;
    for (c, &xk) in w.chunks_exact(elem).zip(x) {
        acc = load(c).mul_add(xk, acc);
    }
    acc
}

/// [`dot_float`] of one row with four tokens: four independent chains, so their latencies
/// overlap, each exactly its single-pair chain.
#[inline(always)]
fn dot_float_x4(w: &[u8], x: [&[f32]; 4], elem: usize, load: impl Fn(&[u8]) -> f32) -> [f32; 4] {
    let mut acc = [0.0f32; 4];
    for (k, c) in w.chunks_exact(elem).take(x[0].len()).enumerate() {
        let wk = load(c);
        for t in 0..4 {
            acc[t] = wk.mul_add(x[t][k], acc[t]);
        }
    }
    acc
}

/// [`dot_float`] of four rows with one token: four independent chains.
#[inline(always)]
fn dot_float_r4(w: [&[u8]; 4], x: &[f32], elem: usize, load: impl Fn(&[u8]) -> f32) -> [f32; 4] {
    let mut acc = [0.0f32; 4];
    for (k, &xk) in x.iter().enumerate() {
        for r in 0..4 {
            acc[r] = load(&w[r][k * elem..(k + 1) * elem]).mul_add(xk, acc[r]);
        }
    }
    acc
}

/// An f32 weight's bytes as the value.
#[inline(always)]
fn f32_at(c: &[u8]) -> f32 {
    f32::from_le_bytes([c[0], c[1], c[2], c[3]])
}

/// An f16 weight's bytes widened to f32 (exactly).
#[inline(always)]
fn f16_val(c: &[u8]) -> f32 {
    f16::from_le_bytes([c[0], c[1]]).to_f32()
}

/// A bf16 weight's bytes widened to f32 (exactly).
#[inline(always)]
fn bf16_val(c: &[u8]) -> f32 {
    bf16::from_le_bytes([c[0], c[1]]).to_f32()
}

/// f32 row · f32 activations.
pub(crate) fn dot_f32(w: &[u8], x: &[f32]) -> f32 {
    dot_float(w, x, 4, f32_at)
}

/// f16 row · f32 activations.
pub(crate) fn dot_f16(w: &[u8], x: &[f32]) -> f32 {
    dot_float(w, x, 2, f16_val)
}

/// bf16 row · f32 activations.
pub(crate) fn dot_bf16(w: &[u8], x: &[f32]) -> f32 {
    dot_float(w, x, 2, bf16_val)
}

/// f32 row · four tokens.
pub(crate) fn dot_f32_x4(w: &[u8], x: [&[f32]; 4]) -> [f32; 4] {
    dot_float_x4(w, x, 4, f32_at)
}

/// f16 row · four tokens.
pub(crate) fn dot_f16_x4(w: &[u8], x: [&[f32]; 4]) -> [f32; 4] {
    dot_float_x4(w, x, 2, f16_val)
}

/// bf16 row · four tokens.
pub(crate) fn dot_bf16_x4(w: &[u8], x: [&[f32]; 4]) -> [f32; 4] {
    dot_float_x4(w, x, 2, bf16_val)
}

/// Four f32 rows · one token.
pub(crate) fn dot_f32_r4(w: [&[u8]; 4], x: &[f32]) -> [f32; 4] {
    dot_float_r4(w, x, 4, f32_at)
}

/// Four f16 rows · one token.
pub(crate) fn dot_f16_r4(w: [&[u8]; 4], x: &[f32]) -> [f32; 4] {
    dot_float_r4(w, x, 2, f16_val)
}

/// Four bf16 rows · one token.
pub(crate) fn dot_bf16_r4(w: [&[u8]; 4], x: &[f32]) -> [f32; 4] {
    dot_float_r4(w, x, 2, bf16_val)
}
