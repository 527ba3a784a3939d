//! Portable dot products of one weight row (raw GGUF blocks) with quantized activations.
//!
//! These are the reference every SIMD kernel is tested against, and the path on CPUs without
//! AVX2. Integer sums are exact (i32 cannot overflow: at most 256 · 63 · 127 · 31 per
//! super-block); only the per-block scaling is floating point.

use super::act::{BlockQ8, BlockQ8K};
use super::blocks::{f16_at, scale_min_k4};
use super::qtype::QK_K;
use half::{bf16, f16};

/// Q4_0 row · Q8 activations: `sum_b d_w d_a sum(q_w q_a) - 8 d_w s_a`.
pub(crate) fn dot_q4_0(w: &[u8], a: &[BlockQ8]) -> f32 {
    let mut acc = 0.0f32;
    for (b, ab) in w.chunks_exact(18).zip(a) {
        let d = f16_at(b, 0);
        let mut sumi = 0i32;
        for l in 0..16 {
            sumi += (b[2 + l] & 0x0F) as i32 * ab.qs[l] as i32;
            sumi += (b[2 + l] >> 4) as i32 * ab.qs[l + 16] as i32;
        }
        // The -8 offset is folded into the activation sum rather than applied per element.
        acc += d * (ab.d * sumi as f32 - 8.0 * ab.s);
    }
    acc
}

/// Q4_1 row · Q8 activations: `sum_b d_w d_a sum(q_w q_a) + m_w s_a`.
pub(crate) fn dot_q4_1(w: &[u8], a: &[BlockQ8]) -> f32 {
    let mut acc = 0.0f32;
    for (b, ab) in w.chunks_exact(20).zip(a) {
        let (d, m) = (f16_at(b, 0), f16_at(b, 2));
        let mut sumi = 0i32;
        for l in 0..16 {
            sumi += (b[4 + l] & 0x0F) as i32 * ab.qs[l] as i32;
            sumi += (b[4 + l] >> 4) as i32 * ab.qs[l + 16] as i32;
        }
        acc += d * ab.d * sumi as f32 + m * ab.s;
    }
    acc
}

/// Q8_0 row · Q8 activations.
pub(crate) fn dot_q8_0(w: &[u8], a: &[BlockQ8]) -> f32 {
    let mut acc = 0.0f32;
    for (b, ab) in w.chunks_exact(34).zip(a) {
        let d = f16_at(b, 0);
        let sumi: i32 = b[2..34]
            .iter()
            .zip(&ab.qs)
            .map(|(&q, &x)| (q as i8) as i32 * x as i32)
            .sum();
        acc += d * ab.d * sumi as f32;
    }
    acc
}

/// Q4_K / Q5_K shared tail: `d_a (d sum_j sc_j dot_j - dmin sum_j m_j asum_j)` over the eight
/// 32-element sub-blocks of one super-block whose quants are already unpacked into `q`.
fn qk_asym_block(b: &[u8], q: &[u8; QK_K], ab: &BlockQ8K) -> f32 {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let scales = &b[4..16];
    let (mut sumi, mut summ) = (0i32, 0i32);
    for j in 0..8 {
        let (sc, mn) = scale_min_k4(j, scales);
        let dot: i32 = (32 * j..32 * j + 32)
            .map(|i| q[i] as i32 * ab.qs[i] as i32)
            .sum();
        sumi += sc as i32 * dot;
        summ += mn as i32 * (ab.bsums[2 * j] as i32 + ab.bsums[2 * j + 1] as i32);
    }
    ab.d * (d * sumi as f32 - dmin * summ as f32)
}

/// Q4_K row · Q8_K activations.
pub(crate) fn dot_q4k(w: &[u8], a: &[BlockQ8K]) -> f32 {
    let mut acc = 0.0f32;
    let mut q = [0u8; QK_K];
    for (b, ab) in w.chunks_exact(144).zip(a) {
        let qs = &b[16..144];
        for c in 0..4 {
            for l in 0..32 {
                q[64 * c + l] = qs[32 * c + l] & 0x0F;
                q[64 * c + 32 + l] = qs[32 * c + l] >> 4;
            }
        }
        acc += qk_asym_block(b, &q, ab);
    }
    acc
}

/// Q5_K row · Q8_K activations.
pub(crate) fn dot_q5k(w: &[u8], a: &[BlockQ8K]) -> f32 {
    let mut acc = 0.0f32;
    let mut q = [0u8; QK_K];
    for (b, ab) in w.chunks_exact(176).zip(a) {
        let (qh, qs) = (&b[16..48], &b[48..176]);
        for c in 0..4 {
            for l in 0..32 {
                let h0 = ((qh[l] >> (2 * c)) & 1) << 4;
                let h1 = ((qh[l] >> (2 * c + 1)) & 1) << 4;
                q[64 * c + l] = (qs[32 * c + l] & 0x0F) | h0;
                q[64 * c + 32 + l] = (qs[32 * c + l] >> 4) | h1;
            }
        }
        acc += qk_asym_block(b, &q, ab);
    }
    acc
}

/// Q6_K row · Q8_K activations: `d_a d sum_g sc_g sum(q q_a)` over sixteen groups of 16.
pub(crate) fn dot_q6k(w: &[u8], a: &[BlockQ8K]) -> f32 {
    let mut acc = 0.0f32;
    let mut q = [0i8; QK_K];
    for (b, ab) in w.chunks_exact(210).zip(a) {
        for n in 0..2 {
            let ql = &b[64 * n..64 * n + 64];
            let qh = &b[128 + 32 * n..128 + 32 * n + 32];
            let y = &mut q[128 * n..128 * n + 128];
            for l in 0..32 {
                y[l] = ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) as i8 - 32;
                y[l + 32] = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) as i8 - 32;
                y[l + 64] = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i8 - 32;
                y[l + 96] = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i8 - 32;
            }
        }
        let mut sumi = 0i32;
        for g in 0..16 {
            let dot: i32 = (16 * g..16 * g + 16)
                .map(|i| q[i] as i32 * ab.qs[i] as i32)
                .sum();
            sumi += (b[192 + g] as i8) as i32 * dot;
        }
        acc += ab.d * f16_at(b, 208) * sumi as f32;
    }
    acc
}

/// f32 row · f32 activations.
pub(crate) fn dot_f32(w: &[u8], x: &[f32]) -> f32 {
    w.chunks_exact(4)
        .zip(x)
        .map(|(c, v)| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) * v)
        .sum()
}

/// f16 row · f32 activations.
pub(crate) fn dot_f16(w: &[u8], x: &[f32]) -> f32 {
    w.chunks_exact(2)
        .zip(x)
        .map(|(c, v)| f16::from_le_bytes([c[0], c[1]]).to_f32() * v)
        .sum()
}

/// bf16 row · f32 activations.
pub(crate) fn dot_bf16(w: &[u8], x: &[f32]) -> f32 {
    w.chunks_exact(2)
        .zip(x)
        .map(|(c, v)| bf16::from_le_bytes([c[0], c[1]]).to_f32() * v)
        .sum()
}
