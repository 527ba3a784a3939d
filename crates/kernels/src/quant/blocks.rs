//! Byte-level block layouts of the GGUF formats and their dequantization.
//!
//! Blocks are read straight out of the matrix's byte buffer (GGUF blocks are packed, e.g. 20
//! bytes for Q4_1, so they are never aligned): every accessor here takes a block's byte slice.
//! The element order within a block follows ggml: for 4-bit formats the low nibbles of `qs`
//! hold elements `0..16` and the high nibbles elements `16..32`.

use half::{bf16, f16};
use tessera_format::{QK_K, QType};

/// Reads a little-endian f16 at `at` as f32.
#[inline(always)]
pub(crate) fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Writes `v` as a little-endian f16 at `at`.
#[inline(always)]
pub(crate) fn put_f16(b: &mut [u8], at: usize, v: f32) {
    b[at..at + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes());
}

/// The 6-bit (scale, min) pair `j` (0..8) of a Q4_K/Q5_K super-block's 12 packed scale bytes.
///
/// Pairs 0..4 sit in the low 6 bits of bytes `j` and `j + 4`; pairs 4..8 keep their low 4 bits
/// in byte `j + 4` and their top 2 bits in the spare top bits of bytes `j - 4` and `j`.
#[inline(always)]
pub(crate) fn scale_min_k4(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

/// Packs eight 6-bit (scale, min) pairs into the 12-byte layout [`scale_min_k4`] reads.
pub(crate) fn pack_scale_min_k4(sc: &[u8; 8], mn: &[u8; 8]) -> [u8; 12] {
    let mut s = [0u8; 12];
    for j in 0..8 {
        debug_assert!(sc[j] < 64 && mn[j] < 64);
        if j < 4 {
            s[j] |= sc[j];
            s[j + 4] |= mn[j];
        } else {
            s[j + 4] = (sc[j] & 0x0F) | ((mn[j] & 0x0F) << 4);
            s[j - 4] |= (sc[j] >> 4) << 6;
            s[j] |= (mn[j] >> 4) << 6;
        }
    }
    s
}

/// Dequantizes one row: `bytes` holds `out.len() / block_size` blocks of `qtype`.
///
/// # Panics
/// When `bytes.len()` is not `qtype.row_bytes(out.len())` (an internal invariant: callers
/// slice rows out of a validated matrix).
pub(crate) fn dequantize_row(qtype: QType, bytes: &[u8], out: &mut [f32]) {
    assert_eq!(bytes.len(), qtype.row_bytes(out.len()), "row byte length");
    let (bs, ts) = (qtype.block_size(), qtype.type_size());
    match qtype {
        QType::F32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        QType::F16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        QType::BF16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = bf16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        _ => {
            for (y, b) in out.chunks_exact_mut(bs).zip(bytes.chunks_exact(ts)) {
                match qtype {
                    QType::Q4_0 => dequant_q4_0(b, y),
                    QType::Q4_1 => dequant_q4_1(b, y),
                    QType::Q8_0 => dequant_q8_0(b, y),
                    QType::Q4K => dequant_q4k(b, y),
                    QType::Q5K => dequant_q5k(b, y),
                    QType::Q6K => dequant_q6k(b, y),
                    QType::F32 | QType::F16 | QType::BF16 => unreachable!("handled above"),
                }
            }
        }
    }
}

fn dequant_q4_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for (l, &q) in b[2..18].iter().enumerate() {
        y[l] = d * ((q & 0x0F) as i32 - 8) as f32;
        y[l + 16] = d * ((q >> 4) as i32 - 8) as f32;
    }
}

fn dequant_q4_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
    for (l, &q) in b[4..20].iter().enumerate() {
        y[l] = d * (q & 0x0F) as f32 + m;
        y[l + 16] = d * (q >> 4) as f32 + m;
    }
}

fn dequant_q8_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for (l, &q) in b[2..34].iter().enumerate() {
        y[l] = d * (q as i8) as f32;
    }
}

fn dequant_q4k(b: &[u8], y: &mut [f32]) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let scales = &b[4..16];
    let qs = &b[16..16 + QK_K / 2];
    // Four chunks of 64 elements; each chunk's 32 bytes carry sub-block 2c in the low nibbles
    // and sub-block 2c+1 in the high nibbles.
    for c in 0..4 {
        let q = &qs[32 * c..32 * c + 32];
        let (s0, m0) = scale_min_k4(2 * c, scales);
        let (s1, m1) = scale_min_k4(2 * c + 1, scales);
        let (d0, d1) = (d * s0 as f32, d * s1 as f32);
        let (n0, n1) = (dmin * m0 as f32, dmin * m1 as f32);
        for l in 0..32 {
            y[64 * c + l] = d0 * (q[l] & 0x0F) as f32 - n0;
            y[64 * c + 32 + l] = d1 * (q[l] >> 4) as f32 - n1;
        }
    }
}

fn dequant_q5k(b: &[u8], y: &mut [f32]) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let scales = &b[4..16];
    let qh = &b[16..48];
    let qs = &b[48..48 + QK_K / 2];
    for c in 0..4 {
        let q = &qs[32 * c..32 * c + 32];
        let (s0, m0) = scale_min_k4(2 * c, scales);
        let (s1, m1) = scale_min_k4(2 * c + 1, scales);
        let (d0, d1) = (d * s0 as f32, d * s1 as f32);
        let (n0, n1) = (dmin * m0 as f32, dmin * m1 as f32);
        // The fifth bit of sub-block s lives in bit s of qh[l].
        let (u0, u1) = (1u8 << (2 * c), 1u8 << (2 * c + 1));
        for l in 0..32 {
            let h0 = if qh[l] & u0 != 0 { 16 } else { 0 };
            let h1 = if qh[l] & u1 != 0 { 16 } else { 0 };
            y[64 * c + l] = d0 * ((q[l] & 0x0F) + h0) as f32 - n0;
            y[64 * c + 32 + l] = d1 * ((q[l] >> 4) + h1) as f32 - n1;
        }
    }
}

fn dequant_q6k(b: &[u8], y: &mut [f32]) {
    let ql_all = &b[0..128];
    let qh_all = &b[128..192];
    let sc_all = &b[192..208];
    let d = f16_at(b, 208);
    // Two halves of 128 elements: 64 ql bytes, 32 qh bytes and 8 scales each.
    for n in 0..2 {
        let ql = &ql_all[64 * n..64 * n + 64];
        let qh = &qh_all[32 * n..32 * n + 32];
        let sc = &sc_all[8 * n..8 * n + 8];
        let y = &mut y[128 * n..128 * n + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            y[l] = d * (sc[is] as i8) as f32 * q1 as f32;
            y[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
            y[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
            y[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ensures that packing and unpacking the K-quant 6-bit scales round-trips every value.
    #[test]
    fn scale_min_packing_round_trips() {
        for seed in 0..64u8 {
            let sc: [u8; 8] =
                std::array::from_fn(|j| seed.wrapping_mul(7).wrapping_add(11 * j as u8) % 64);
            let mn: [u8; 8] =
                std::array::from_fn(|j| seed.wrapping_mul(13).wrapping_add(5 * j as u8) % 64);
            let packed = pack_scale_min_k4(&sc, &mn);
            for j in 0..8 {
                assert_eq!(
                    scale_min_k4(j, &packed),
                    (sc[j], mn[j]),
                    "seed {seed} j {j}"
                );
            }
        }
    }
}
