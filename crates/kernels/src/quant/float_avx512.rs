//! AVX-512 kernels of the float-weight product (f32, f16 and bf16 weights): weight packing
//! and the register-blocked GEMM micro-kernel.
//!
//! Every kernel computes each (row, token) pair as one serial chain of fused multiply-adds in
//! element order (see `matmul_float`), vectorized *across* pairs: a vector holds sixteen
//! output rows of one token, so no lane ever adds anything but its own pair's products and
//! no horizontal sum is needed.
//!
//! * [`pack`] transposes up to 32 weight rows into a panel `p[k · 32 + j]` (row `j`, element
//!   `k`; missing rows are zeros), widening f16/bf16 exactly, sixteen by sixteen in registers.
//! * [`gemm`] multiplies a panel by up to twelve tokens: 24 accumulators (two row vectors ×
//!   twelve tokens), two panel loads and twelve broadcasts per element for 24 multiply-adds.
//! * [`matvec`] is the decode kernel: it transposes two groups of sixteen rows × sixteen
//!   elements in registers and applies them to up to four tokens, reading the weights once, in
//!   place (the two groups' chains overlap).
//!
//! Every function is `unsafe` because it requires AVX-512 F/BW/VL, AVX2, FMA and F16C; the
//! driver checks [`crate::isa::isa`] first.

#![cfg(target_arch = "x86_64")]

use super::matmul_float::{F16, F32, TileOut};
use std::arch::x86_64::*;

/// Rows per panel: two 16-lane vectors.
pub(crate) const PANEL: usize = 32;
/// Most tokens one [`gemm`] call takes.
pub(crate) const GEMM_TOKENS: usize = 12;

/// Most tokens one [`matvec`] call takes.
pub(crate) const MATVEC_TOKENS: usize = 4;
/// Rows one [`matvec`] call takes.
pub(crate) const MATVEC_ROWS: usize = 32;

/// Lanes of a vector.
const L: usize = 16;

/// Elements `k0..k0 + n` (`n ≤ 16`) of a row stored as format `FMT`, widened to f32, zeros
/// past `n`.
///
/// # Safety
/// The CPU has AVX-512 BW; `row` holds at least `k0 + n` elements of the format.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn load<const FMT: u8>(row: &[u8], k0: usize, n: usize) -> __m512 {
    let full = n == L;
    // Masked-off elements are neither read nor faulted on.
    let mask: u16 = if full { u16::MAX } else { (1u16 << n) - 1 };
    // SAFETY: elements k0..k0 + n are inside the row (caller); the mask covers only them.
    unsafe {
        if FMT == F32 {
            _mm512_maskz_loadu_ps(mask, row.as_ptr().add(4 * k0).cast())
        } else {
            let h = _mm256_maskz_loadu_epi16(mask, row.as_ptr().add(2 * k0).cast());
            if FMT == F16 {
                _mm512_cvtph_ps(h)
            } else {
                // bf16 is the top half of an f32.
                _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
            }
        }
    }
}

/// Transposes sixteen rows of sixteen f32 into sixteen columns: `out[j][i] = r[i][j]`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
fn transpose16(r: &[__m512; L]) -> [__m512; L] {
    // t[2i], t[2i + 1]: rows 2i and 2i + 1 interleaved (elements 4l, 4l + 1 and 4l + 2,
    // 4l + 3 of each 128-bit lane l).
    let mut t = [_mm512_setzero_ps(); L];
    for i in 0..L / 2 {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    // u[4i + c]: 128-bit lane l holds rows 4i..4i + 4 of column 4l + c.
    let mut u = [_mm512_setzero_ps(); L];
    for i in 0..L / 4 {
        let a = _mm512_castps_pd(t[4 * i]);
        let b = _mm512_castps_pd(t[4 * i + 1]);
        let c = _mm512_castps_pd(t[4 * i + 2]);
        let d = _mm512_castps_pd(t[4 * i + 3]);
        u[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
        u[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
        u[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
        u[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
    }
    // Column 4l + c gathers lane l of u[c], u[4 + c], u[8 + c], u[12 + c].
    let mut out = [_mm512_setzero_ps(); L];
    for c in 0..4 {
        let v0 = _mm512_shuffle_f32x4::<0x44>(u[c], u[4 + c]);
        let v1 = _mm512_shuffle_f32x4::<0xEE>(u[c], u[4 + c]);
        let v2 = _mm512_shuffle_f32x4::<0x44>(u[8 + c], u[12 + c]);
        let v3 = _mm512_shuffle_f32x4::<0xEE>(u[8 + c], u[12 + c]);
        out[c] = _mm512_shuffle_f32x4::<0x88>(v0, v2);
        out[4 + c] = _mm512_shuffle_f32x4::<0xDD>(v0, v2);
        out[8 + c] = _mm512_shuffle_f32x4::<0x88>(v1, v3);
        out[12 + c] = _mm512_shuffle_f32x4::<0xDD>(v1, v3);
    }
    out
}

/// Sixteen rows' elements `k0..k0 + n` as columns: `c[j]` holds element `k0 + j` of every
/// row, zero lanes for missing rows.
///
/// # Safety
/// As [`load`] for every row; `rows.len() ≤ 16`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn columns<const FMT: u8>(rows: &[&[u8]], k0: usize, n: usize) -> [__m512; L] {
    if rows.len() == L {
        // SAFETY: forwarded contract.
        unsafe { columns_full::<FMT>(rows, k0, n) }
    } else {
        // SAFETY: forwarded contract.
        unsafe { columns_part::<FMT>(rows, k0, n) }
    }
}

/// [`columns`] of exactly `L` rows: a fixed count, so the loads stay in registers (the
/// common, full-panel case).
///
/// # Safety
/// As [`columns`], with `rows.len() == L`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn columns_full<const FMT: u8>(rows: &[&[u8]], k0: usize, n: usize) -> [__m512; L] {
    let mut r = [_mm512_setzero_ps(); L];
    for i in 0..L {
        // SAFETY: forwarded contract.
        r[i] = unsafe { load::<FMT>(rows[i], k0, n) };
    }
    transpose16(&r)
}

/// [`columns`] of fewer than `L` rows (a matrix's last group), kept out of line so it does not
/// crowd the registers of the full case.
///
/// # Safety
/// As [`columns`].
#[cold]
#[inline(never)]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn columns_part<const FMT: u8>(rows: &[&[u8]], k0: usize, n: usize) -> [__m512; L] {
    let mut r = [_mm512_setzero_ps(); L];
    for (ri, row) in r.iter_mut().zip(rows) {
        // SAFETY: forwarded contract.
        *ri = unsafe { load::<FMT>(row, k0, n) };
    }
    transpose16(&r)
}

/// Stores the first `n` columns of a block at elements `k0..` of a panel, in half `half`:
/// column `j` at `out[(k0 + j) · PANEL + half · L..][..L]`.
///
/// # Safety
/// The CPU has this module's features; `out` holds `PANEL · (k0 + n)` f32.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn store_columns(out: &mut [f32], k0: usize, half: usize, c: &[__m512; L], n: usize) {
    debug_assert!(out.len() >= PANEL * (k0 + n));
    for (j, cj) in c.iter().take(n).enumerate() {
        // SAFETY: (k0 + j) · PANEL + half · L + L <= PANEL · (k0 + n) (caller).
        unsafe { _mm512_storeu_ps(out.as_mut_ptr().add((k0 + j) * PANEL + half * L), *cj) };
    }
}

/// Packs up to [`PANEL`] rows of `k` elements (format `FMT`) into `out[k · 32 + j]`, zeros
/// for the rows past `rows.len()`.
///
/// # Safety
/// The CPU has this module's features; every row holds `k` elements; `out` holds `32 k`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub(crate) unsafe fn pack<const FMT: u8>(rows: &[&[u8]], k: usize, out: &mut [f32]) {
    debug_assert!(rows.len() <= PANEL && out.len() >= PANEL * k);
    let split = rows.len().min(L);
    let full = k - k % L;
    for (half, part) in [&rows[..split], &rows[split..]].into_iter().enumerate() {
        for k0 in (0..full).step_by(L) {
            // SAFETY: forwarded contract; elements k0..k0 + 16 are inside every row.
            let c = unsafe { columns::<FMT>(part, k0, L) };
            // SAFETY: out holds PANEL · k f32.
            unsafe { store_columns(out, k0, half, &c, L) };
        }
        if full < k {
            // SAFETY: as above, for the last k - full elements.
            let c = unsafe { columns::<FMT>(part, full, k - full) };
            // SAFETY: as above.
            unsafe { store_columns(out, full, half, &c, k - full) };
        }
    }
}

/// The lane mask of the first `n` of sixteen rows.
#[inline]
fn row_mask(n: usize) -> u16 {
    if n >= L { u16::MAX } else { (1u16 << n) - 1 }
}

/// A panel of `k` elements against `T` tokens (see [`gemm`]).
///
/// # Safety
/// As [`gemm`], with `x.len() == T`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn gemm_t<const T: usize>(p: &[f32], x: &[&[f32]], out: TileOut, nrows: usize) {
    let k = x[0].len();
    debug_assert!(x.len() == T && p.len() >= PANEL * k && x.iter().all(|t| t.len() == k));
    let mut xp = [std::ptr::null::<f32>(); T];
    for (xt, s) in xp.iter_mut().zip(x) {
        *xt = s.as_ptr();
    }
    let mut acc = [[_mm512_setzero_ps(); T]; 2];
    let pp = p.as_ptr();
    for kk in 0..k {
        // SAFETY: element kk of the panel (32 f32 at kk · 32) and of every token is inside.
        unsafe {
            let p0 = _mm512_loadu_ps(pp.add(kk * PANEL));
            let p1 = _mm512_loadu_ps(pp.add(kk * PANEL + L));
            for t in 0..T {
                let b = _mm512_set1_ps(*xp[t].add(kk));
                acc[0][t] = _mm512_fmadd_ps(p0, b, acc[0][t]);
                acc[1][t] = _mm512_fmadd_ps(p1, b, acc[1][t]);
            }
        }
    }
    let (m0, m1) = (row_mask(nrows), row_mask(nrows.saturating_sub(L)));
    for t in 0..T {
        // SAFETY: the caller guarantees `nrows` writable f32 at dst + t · stride; the masks
        // write no more.
        unsafe {
            let d = out.dst.add(t * out.stride);
            _mm512_mask_storeu_ps(d, m0, acc[0][t]);
            if m1 != 0 {
                _mm512_mask_storeu_ps(d.add(L), m1, acc[1][t]);
            }
        }
    }
}

/// A packed panel (see [`pack`]) against `x.len() ≤ 12` tokens of `k = x[0].len()`
/// activations: writes pair (row `j`, token `t`) to `out.dst[t · out.stride + j]` for the
/// first `nrows` rows.
///
/// # Safety
/// The CPU has this module's features; `p` holds `32 k`; every token holds `k` values; the
/// `nrows ≤ 32` outputs of every token are writable.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub(crate) unsafe fn gemm(p: &[f32], x: &[&[f32]], out: TileOut, nrows: usize) {
    // SAFETY: forwarded contract; each arm passes exactly its token count.
    unsafe {
        match x.len() {
            1 => gemm_t::<1>(p, x, out, nrows),
            2 => gemm_t::<2>(p, x, out, nrows),
            3 => gemm_t::<3>(p, x, out, nrows),
            4 => gemm_t::<4>(p, x, out, nrows),
            5 => gemm_t::<5>(p, x, out, nrows),
            6 => gemm_t::<6>(p, x, out, nrows),
            7 => gemm_t::<7>(p, x, out, nrows),
            8 => gemm_t::<8>(p, x, out, nrows),
            9 => gemm_t::<9>(p, x, out, nrows),
            10 => gemm_t::<10>(p, x, out, nrows),
            11 => gemm_t::<11>(p, x, out, nrows),
            _ => gemm_t::<12>(p, x, out, nrows),
        }
    }
}

/// One block of a [`matvec`]: elements `k0..k0 + n` of up to sixteen rows, transposed,
/// folded into each token's chain `acc[t]` in element order; `FULL` blocks have `n = L`.
///
/// # Safety
/// As [`columns`] for `rows`; every token pointer has elements `k0..k0 + n`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn block<const FMT: u8, const T: usize, const FULL: bool>(
    rows: &[&[u8]],
    xp: &[*const f32; T],
    k0: usize,
    n: usize,
    acc: &mut [__m512; T],
) {
    // A whole block has a constant count, so the compiler unrolls it.
    let n = if FULL { L } else { n };
    // SAFETY: forwarded contract.
    let c = unsafe { columns::<FMT>(rows, k0, n) };
    for (j, cj) in c.iter().take(n).enumerate() {
        for t in 0..T {
            // SAFETY: element k0 + j of token t (caller).
            let b = _mm512_set1_ps(unsafe { *xp[t].add(k0 + j) });
            acc[t] = _mm512_fmadd_ps(*cj, b, acc[t]);
        }
    }
}

/// Up to 32 rows against `T` tokens, read in place (see [`matvec`]).
///
/// # Safety
/// As [`matvec`], with `x.len() == T`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn matvec_t<const FMT: u8, const T: usize>(rows: &[&[u8]], x: &[&[f32]], out: TileOut) {
    let k = x[0].len();
    debug_assert!(x.len() == T && rows.len() <= MATVEC_ROWS && x.iter().all(|t| t.len() == k));
    let mut xp = [std::ptr::null::<f32>(); T];
    for (xt, s) in xp.iter_mut().zip(x) {
        *xt = s.as_ptr();
    }
    // Two groups of L rows (the second possibly short or empty): two independent sets of
    // chains, so one group's transposes overlap the other's dependent multiply-adds.
    let split = rows.len().min(L);
    let groups = [&rows[..split], &rows[split..]];
    let mut acc = [[_mm512_setzero_ps(); T]; 2];
    // Whole blocks with a fixed count, so the columns stay in registers; then the tail.
    let full = k - k % L;
    for k0 in (0..full).step_by(L) {
        // SAFETY: elements k0..k0 + L are inside every row and token.
        unsafe {
            block::<FMT, T, true>(groups[0], &xp, k0, L, &mut acc[0]);
            if !groups[1].is_empty() {
                block::<FMT, T, true>(groups[1], &xp, k0, L, &mut acc[1]);
            }
        }
    }
    if full < k {
        // SAFETY: elements full..k are inside every row and token.
        unsafe {
            block::<FMT, T, false>(groups[0], &xp, full, k - full, &mut acc[0]);
            block::<FMT, T, false>(groups[1], &xp, full, k - full, &mut acc[1]);
        }
    }
    let masks = [row_mask(split), row_mask(rows.len() - split)];
    for (g, a) in acc.iter().enumerate() {
        // An empty group has no outputs, and its address may lie past the output.
        if masks[g] == 0 {
            continue;
        }
        for (t, at) in a.iter().enumerate() {
            // SAFETY: the caller guarantees rows.len() writable f32 at dst + t · stride, and
            // group g has rows, so dst + t · stride + 16 g is inside; the mask writes no more.
            unsafe { _mm512_mask_storeu_ps(out.dst.add(t * out.stride + g * L), masks[g], *at) };
        }
    }
}

/// Up to 32 weight rows (format `FMT`, read in place, transposed in registers) against
/// `x.len() ≤ 4` tokens of `k = x[0].len()` activations: writes pair (row `j`, token `t`)
/// to `out.dst[t · out.stride + j]`. The decode kernel: no packing pass.
///
/// # Safety
/// The CPU has this module's features; every row holds `k` elements and every token `k`
/// values; the `rows.len()` outputs of every token are writable.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub(crate) unsafe fn matvec<const FMT: u8>(rows: &[&[u8]], x: &[&[f32]], out: TileOut) {
    // SAFETY: forwarded contract; each arm passes exactly its token count.
    unsafe {
        match x.len() {
            1 => matvec_t::<FMT, 1>(rows, x, out),
            2 => matvec_t::<FMT, 2>(rows, x, out),
            3 => matvec_t::<FMT, 3>(rows, x, out),
            _ => matvec_t::<FMT, 4>(rows, x, out),
        }
    }
}
