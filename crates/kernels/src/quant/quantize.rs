//! Reference quantizers: f32 rows into GGUF blocks.
//!
//! These build test and random models, so they aim at valid blocks with a small, bounded error
//! rather than ggml's iterative optimal-scale search. Scales are rounded to their stored
//! precision (f16, 6-bit, i8) *before* the quants are chosen, so the error stays within half a
//! quantization step of the scale the reader will actually use.

use super::blocks::{pack_scale_min_k4, put_f16};
use half::{bf16, f16};
use tessera_format::{QK_K, QType};

/// Quantizes one row of `x.len()` elements into `out` (`qtype.row_bytes(x.len())` bytes).
///
/// # Panics
/// When `x.len()` is not a multiple of the block size or `out` has the wrong length (internal
/// invariant: [`super::QMatrix::quantize`] validates shapes first).
pub(crate) fn quantize_row(qtype: QType, x: &[f32], out: &mut [u8]) {
    assert_eq!(x.len() % qtype.block_size(), 0, "row length");
    assert_eq!(out.len(), qtype.row_bytes(x.len()), "row byte length");
    let (bs, ts) = (qtype.block_size(), qtype.type_size());
    match qtype {
        QType::F32 => {
            for (o, v) in out.chunks_exact_mut(4).zip(x) {
                o.copy_from_slice(&v.to_le_bytes());
            }
        }
        QType::F16 => {
            for (o, v) in out.chunks_exact_mut(2).zip(x) {
                o.copy_from_slice(&f16::from_f32(*v).to_le_bytes());
            }
        }
        QType::BF16 => {
            for (o, v) in out.chunks_exact_mut(2).zip(x) {
                o.copy_from_slice(&bf16::from_f32(*v).to_le_bytes());
            }
        }
        _ => {
            for (xb, b) in x.chunks_exact(bs).zip(out.chunks_exact_mut(ts)) {
                match qtype {
                    QType::Q4_0 => quant_q4_0(xb, b),
                    QType::Q4_1 => quant_q4_1(xb, b),
                    QType::Q8_0 => quant_q8_0(xb, b),
                    QType::Q4K => quant_qk_asym(xb, b, 15),
                    QType::Q5K => quant_qk_asym(xb, b, 31),
                    QType::Q6K => quant_q6k(xb, b),
                    QType::F32 | QType::F16 | QType::BF16 => unreachable!("handled above"),
                }
            }
        }
    }
}

/// The f16-rounded value of `v`, so quants are chosen against the scale the reader sees.
fn f16_round(v: f32) -> f32 {
    f16::from_f32(v).to_f32()
}

/// `1 / d`, or 0 for an all-zero block (whose quants then all encode zero).
fn inv(d: f32) -> f32 {
    if d == 0.0 { 0.0 } else { 1.0 / d }
}

fn quant_q4_0(x: &[f32], b: &mut [u8]) {
    // The signed extreme maps to -8 so the full 16 levels are used on its side.
    let ext = x
        .iter()
        .copied()
        .fold(0.0f32, |a, v| if v.abs() > a.abs() { v } else { a });
    let d = f16_round(ext / -8.0);
    put_f16(b, 0, d);
    let id = inv(d);
    let q = |v: f32| ((v * id).round() as i32 + 8).clamp(0, 15) as u8;
    for l in 0..16 {
        b[2 + l] = q(x[l]) | (q(x[l + 16]) << 4);
    }
}

fn quant_q4_1(x: &[f32], b: &mut [u8]) {
    let mn = x.iter().copied().fold(f32::INFINITY, f32::min);
    let mx = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let d = f16_round((mx - mn) / 15.0);
    let m = f16_round(mn);
    put_f16(b, 0, d);
    put_f16(b, 2, m);
    let id = inv(d);
    let q = |v: f32| ((v - m) * id).round().clamp(0.0, 15.0) as u8;
    for l in 0..16 {
        b[4 + l] = q(x[l]) | (q(x[l + 16]) << 4);
    }
}

fn quant_q8_0(x: &[f32], b: &mut [u8]) {
    let amax = x.iter().fold(0.0f32, |a, v| a.max(v.abs()));
    let d = f16_round(amax / 127.0);
    put_f16(b, 0, d);
    let id = inv(d);
    for l in 0..32 {
        b[2 + l] = ((x[l] * id).round().clamp(-127.0, 127.0) as i8) as u8;
    }
}

/// Q4_K (`nmax` = 15) and Q5_K (`nmax` = 31): eight sub-blocks of 32, each `d*sc*q - dmin*m`.
fn quant_qk_asym(x: &[f32], b: &mut [u8], nmax: u8) {
    // Per sub-block: the offset that brings its minimum to zero (never negative: a positive
    // minimum is represented as offset 0, which only widens the range), then the step needed.
    let mut offs = [0f32; 8];
    let mut maxs = [0f32; 8];
    for (s, xs) in x.chunks_exact(32).enumerate() {
        offs[s] = -xs.iter().copied().fold(0.0f32, f32::min);
        maxs[s] = xs.iter().copied().fold(0.0f32, f32::max);
    }
    let dmin = f16_round(offs.iter().copied().fold(0.0, f32::max) / 63.0);
    let mn: [u8; 8] = std::array::from_fn(|s| (offs[s] * inv(dmin)).round().clamp(0.0, 63.0) as u8);
    // The step must cover max + the offset actually stored, so it is chosen after mins are.
    let need: [f32; 8] = std::array::from_fn(|s| (maxs[s] + dmin * mn[s] as f32) / nmax as f32);
    let d = f16_round(need.iter().copied().fold(0.0, f32::max) / 63.0);
    let sc: [u8; 8] = std::array::from_fn(|s| (need[s] * inv(d)).ceil().clamp(0.0, 63.0) as u8);
    put_f16(b, 0, d);
    put_f16(b, 2, dmin);
    b[4..16].copy_from_slice(&pack_scale_min_k4(&sc, &mn));
    let mut q = [0u8; QK_K];
    for (i, qi) in q.iter_mut().enumerate() {
        let s = i / 32;
        let step = d * sc[s] as f32;
        *qi = ((x[i] + dmin * mn[s] as f32) * inv(step))
            .round()
            .clamp(0.0, nmax as f32) as u8;
    }
    let qs_at = if nmax == 15 { 16 } else { 48 };
    if nmax == 31 {
        b[16..48].fill(0);
    }
    for c in 0..4 {
        for l in 0..32 {
            let (lo, hi) = (q[64 * c + l], q[64 * c + 32 + l]);
            b[qs_at + 32 * c + l] = (lo & 0x0F) | ((hi & 0x0F) << 4);
            if nmax == 31 {
                b[16 + l] |= ((lo >> 4) << (2 * c)) | ((hi >> 4) << (2 * c + 1));
            }
        }
    }
}

fn quant_q6k(x: &[f32], b: &mut [u8]) {
    // Sixteen sub-blocks of 16 with a signed i8 scale each, quants in -32..32.
    let steps: [f32; 16] = std::array::from_fn(|s| {
        x[16 * s..16 * s + 16]
            .iter()
            .fold(0.0f32, |a, v| a.max(v.abs()))
            / 31.0
    });
    let d = f16_round(steps.iter().copied().fold(0.0, f32::max) / 127.0);
    let sc: [i8; 16] = std::array::from_fn(|s| (steps[s] * inv(d)).ceil().clamp(0.0, 127.0) as i8);
    b.fill(0);
    for (i, &v) in x.iter().enumerate() {
        let step = d * sc[i / 16] as f32;
        let q = ((v * inv(step)).round().clamp(-32.0, 31.0) as i32 + 32) as u8;
        let (n, r) = (i / 128, i % 128);
        let (part, l) = (r / 32, r % 32);
        let ql = 64 * n + l + if part & 1 == 1 { 32 } else { 0 };
        b[ql] |= if part >= 2 { (q & 0x0F) << 4 } else { q & 0x0F };
        b[128 + 32 * n + l] |= (q >> 4) << (2 * part);
    }
    for (s, &v) in sc.iter().enumerate() {
        b[192 + s] = v as u8;
    }
    put_f16(b, 208, d);
}
