//! AVX2 kernels of the float-weight product (f32, f16 and bf16 weights): the eight-lane
//! versions of `float_avx512`, with the same arithmetic per (row, token) pair — one serial
//! chain of fused multiply-adds in element order (see `matmul_float`) — vectorized across
//! eight output rows of one token.
//!
//! * [`pack`] transposes up to 16 weight rows into a panel `p[k · 16 + j]`, eight by eight in
//!   registers, widening f16/bf16 exactly.
//! * [`gemm`] multiplies a panel by up to six tokens: twelve accumulators (two row vectors ×
//!   six tokens), two panel loads and six broadcasts per element for twelve multiply-adds —
//!   what sixteen registers hold.
//! * [`matvec`] is the decode kernel: two groups of eight rows × eight elements transposed in
//!   registers, applied to up to two tokens, the weights read in place.
//!
//! Every function is `unsafe` because it requires AVX2, FMA and F16C; the driver checks
//! [`crate::isa::isa`] first.

#![cfg(target_arch = "x86_64")]

use super::matmul_float::{F16, F32, TileOut};
use std::arch::x86_64::*;

/// Rows per panel: two 8-lane vectors.
pub(crate) const PANEL: usize = 16;
/// Most tokens one [`gemm`] call takes.
pub(crate) const GEMM_TOKENS: usize = 6;

/// Most tokens one [`matvec`] call takes.
pub(crate) const MATVEC_TOKENS: usize = 2;
/// Rows one [`matvec`] call takes.
pub(crate) const MATVEC_ROWS: usize = 16;

/// Lanes of a vector.
const L: usize = 8;

/// Elements `k0..k0 + n` (`n ≤ 8`) of a row stored as format `FMT`, widened to f32, zeros
/// past `n`.
///
/// # Safety
/// The CPU has AVX2, FMA and F16C; `row` holds at least `k0 + n` elements of the format.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load<const FMT: u8>(row: &[u8], k0: usize, n: usize) -> __m256 {
    let size = if FMT == F32 { 4 } else { 2 };
    let mut tail = [0u8; 4 * L];
    let src = if n == L {
        // SAFETY: the n elements from k0 are inside the row (caller).
        unsafe { row.as_ptr().add(size * k0) }
    } else {
        // A short block is copied into zeros, so the vector load never reads past the row.
        tail[..size * n].copy_from_slice(&row[size * k0..size * (k0 + n)]);
        tail.as_ptr()
    };
    // SAFETY: src holds 8 elements (the row's, or the zero-padded copy).
    unsafe {
        if FMT == F32 {
            _mm256_loadu_ps(src.cast())
        } else {
            let h = _mm_loadu_si128(src.cast());
            if FMT == F16 {
                _mm256_cvtph_ps(h)
            } else {
                // bf16 is the top half of an f32.
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
            }
        }
    }
}

/// Transposes eight rows of eight f32 into eight columns: `out[j][i] = r[i][j]`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn transpose8(r: &[__m256; L]) -> [__m256; L] {
    let mut t = [_mm256_setzero_ps(); L];
    for i in 0..L / 2 {
        t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    // u[4i + c]: 128-bit lane l holds rows 4i..4i + 4 of column 4l + c.
    let mut u = [_mm256_setzero_ps(); L];
    for i in 0..L / 4 {
        let a = _mm256_castps_pd(t[4 * i]);
        let b = _mm256_castps_pd(t[4 * i + 1]);
        let c = _mm256_castps_pd(t[4 * i + 2]);
        let d = _mm256_castps_pd(t[4 * i + 3]);
        u[4 * i] = _mm256_castpd_ps(_mm256_unpacklo_pd(a, c));
        u[4 * i + 1] = _mm256_castpd_ps(_mm256_unpackhi_pd(a, c));
        u[4 * i + 2] = _mm256_castpd_ps(_mm256_unpacklo_pd(b, d));
        u[4 * i + 3] = _mm256_castpd_ps(_mm256_unpackhi_pd(b, d));
    }
    let mut out = [_mm256_setzero_ps(); L];
    for c in 0..4 {
        out[c] = _mm256_permute2f128_ps::<0x20>(u[c], u[4 + c]);
        out[4 + c] = _mm256_permute2f128_ps::<0x31>(u[c], u[4 + c]);
    }
    out
}

/// Eight rows' elements `k0..k0 + n` as columns: `c[j]` holds element `k0 + j` of every row,
/// zero lanes for missing rows.
///
/// # Safety
/// As [`load`] for every row; `rows.len() ≤ 8`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn columns<const FMT: u8>(rows: &[&[u8]], k0: usize, n: usize) -> [__m256; L] {
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
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn columns_full<const FMT: u8>(rows: &[&[u8]], k0: usize, n: usize) -> [__m256; L] {
    let mut r = [_mm256_setzero_ps(); L];
    for i in 0..L {
        // SAFETY: forwarded contract.
        r[i] = unsafe { load::<FMT>(rows[i], k0, n) };
    }
    transpose8(&r)
}

/// [`columns`] of fewer than `L` rows (a matrix's last group), kept out of line so it does not
/// crowd the registers of the full case.
///
/// # Safety
/// As [`columns`].
#[cold]
#[inline(never)]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn columns_part<const FMT: u8>(rows: &[&[u8]], k0: usize, n: usize) -> [__m256; L] {
    let mut r = [_mm256_setzero_ps(); L];
    for (ri, row) in r.iter_mut().zip(rows) {
        // SAFETY: forwarded contract.
        *ri = unsafe { load::<FMT>(row, k0, n) };
    }
    transpose8(&r)
}

/// Stores the first `n` columns of a block at elements `k0..` of a panel, in half `half`:
/// column `j` at `out[(k0 + j) · PANEL + half · L..][..L]`.
///
/// # Safety
/// The CPU has this module's features; `out` holds `PANEL · (k0 + n)` f32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn store_columns(out: &mut [f32], k0: usize, half: usize, c: &[__m256; L], n: usize) {
    debug_assert!(out.len() >= PANEL * (k0 + n));
    for (j, cj) in c.iter().take(n).enumerate() {
        // SAFETY: (k0 + j) · PANEL + half · L + L <= PANEL · (k0 + n) (caller).
        unsafe { _mm256_storeu_ps(out.as_mut_ptr().add((k0 + j) * PANEL + half * L), *cj) };
    }
}

/// Packs up to [`PANEL`] rows of `k` elements (format `FMT`) into `out[k · 16 + j]`, zeros
/// for the rows past `rows.len()`.
///
/// # Safety
/// The CPU has AVX2, FMA and F16C; every row holds `k` elements; `out` holds `16 k`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn pack<const FMT: u8>(rows: &[&[u8]], k: usize, out: &mut [f32]) {
    debug_assert!(rows.len() <= PANEL && out.len() >= PANEL * k);
    let split = rows.len().min(L);
    let full = k - k % L;
    for (half, part) in [&rows[..split], &rows[split..]].into_iter().enumerate() {
        for k0 in (0..full).step_by(L) {
            // SAFETY: forwarded contract; elements k0..k0 + 8 are inside every row.
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

/// Stores the first `n` lanes of `v` at `dst`.
///
/// # Safety
/// AVX2 is available; `min(n, 8)` f32 at `dst` are writable.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn store_first(dst: *mut f32, n: usize, v: __m256) {
    if n >= L {
        // SAFETY: 8 f32 are writable (caller).
        unsafe { _mm256_storeu_ps(dst, v) };
    } else if n > 0 {
        let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        let mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(n as i32), lanes);
        // SAFETY: only the first n lanes are written (caller: writable).
        unsafe { _mm256_maskstore_ps(dst, mask, v) };
    }
}

/// A panel of `k` elements against `T` tokens (see [`gemm`]).
///
/// # Safety
/// As [`gemm`], with `x.len() == T`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn gemm_t<const T: usize>(p: &[f32], x: &[&[f32]], out: TileOut, nrows: usize) {
    let k = x[0].len();
    debug_assert!(x.len() == T && p.len() >= PANEL * k && x.iter().all(|t| t.len() == k));
    let mut xp = [std::ptr::null::<f32>(); T];
    for (xt, s) in xp.iter_mut().zip(x) {
        *xt = s.as_ptr();
    }
    let mut acc = [[_mm256_setzero_ps(); T]; 2];
    let pp = p.as_ptr();
    for kk in 0..k {
        // SAFETY: element kk of the panel (16 f32 at kk · 16) and of every token is inside.
        unsafe {
            let p0 = _mm256_loadu_ps(pp.add(kk * PANEL));
            let p1 = _mm256_loadu_ps(pp.add(kk * PANEL + L));
            for t in 0..T {
                let b = _mm256_set1_ps(*xp[t].add(kk));
                acc[0][t] = _mm256_fmadd_ps(p0, b, acc[0][t]);
                acc[1][t] = _mm256_fmadd_ps(p1, b, acc[1][t]);
            }
        }
    }
    for t in 0..T {
        // SAFETY: the caller guarantees `nrows` writable f32 at dst + t · stride.
        unsafe {
            let d = out.dst.add(t * out.stride);
            store_first(d, nrows, acc[0][t]);
            // Past 8 rows only: otherwise d + 8 may lie past the output.
            if nrows > L {
                store_first(d.add(L), nrows - L, acc[1][t]);
            }
        }
    }
}

/// A packed panel (see [`pack`]) against `x.len() ≤ 6` tokens of `k = x[0].len()`
/// activations: writes pair (row `j`, token `t`) to `out.dst[t · out.stride + j]` for the
/// first `nrows` rows.
///
/// # Safety
/// The CPU has AVX2, FMA and F16C; `p` holds `16 k`; every token holds `k` values; the
/// `nrows ≤ 16` outputs of every token are writable.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn gemm(p: &[f32], x: &[&[f32]], out: TileOut, nrows: usize) {
    // SAFETY: forwarded contract; each arm passes exactly its token count.
    unsafe {
        match x.len() {
            1 => gemm_t::<1>(p, x, out, nrows),
            2 => gemm_t::<2>(p, x, out, nrows),
            3 => gemm_t::<3>(p, x, out, nrows),
            4 => gemm_t::<4>(p, x, out, nrows),
            5 => gemm_t::<5>(p, x, out, nrows),
            _ => gemm_t::<6>(p, x, out, nrows),
        }
    }
}

/// One block of a [`matvec`]: elements `k0..k0 + n` of up to eight rows, transposed,
/// folded into each token's chain `acc[t]` in element order; `FULL` blocks have `n = L`.
///
/// # Safety
/// As [`columns`] for `rows`; every token pointer has elements `k0..k0 + n`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn block<const FMT: u8, const T: usize, const FULL: bool>(
    rows: &[&[u8]],
    xp: &[*const f32; T],
    k0: usize,
    n: usize,
    acc: &mut [__m256; T],
) {
    // A whole block has a constant count, so the compiler unrolls it.
    let n = if FULL { L } else { n };
    // SAFETY: forwarded contract.
    let c = unsafe { columns::<FMT>(rows, k0, n) };
    for (j, cj) in c.iter().take(n).enumerate() {
        for t in 0..T {
            // SAFETY: element k0 + j of token t (caller).
            let b = _mm256_set1_ps(unsafe { *xp[t].add(k0 + j) });
            acc[t] = _mm256_fmadd_ps(*cj, b, acc[t]);
        }
    }
}

/// Up to 16 rows against `T` tokens, read in place (see [`matvec`]).
///
/// # Safety
/// As [`matvec`], with `x.len() == T`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
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
    let mut acc = [[_mm256_setzero_ps(); T]; 2];
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
    let counts = [split, rows.len() - split];
    for (g, a) in acc.iter().enumerate() {
        // An empty group has no outputs, and its address may lie past the output.
        if counts[g] == 0 {
            continue;
        }
        for (t, at) in a.iter().enumerate() {
            // SAFETY: the caller guarantees rows.len() writable f32 at dst + t · stride, and
            // group g has rows, so dst + t · stride + 8 g is inside.
            unsafe { store_first(out.dst.add(t * out.stride + g * L), counts[g], *at) };
        }
    }
}

/// Up to 16 weight rows (format `FMT`, read in place, transposed in registers) against
/// `x.len() ≤ 2` tokens of `k = x[0].len()` activations: writes pair (row `j`, token `t`)
/// to `out.dst[t · out.stride + j]`. The decode kernel: no packing pass.
///
/// # Safety
/// The CPU has this module's features; every row holds `k` elements and every token `k`
/// values; the `rows.len()` outputs of every token are writable.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn matvec<const FMT: u8>(rows: &[&[u8]], x: &[&[f32]], out: TileOut) {
    // SAFETY: forwarded contract; each arm passes exactly its token count.
    unsafe {
        match x.len() {
            1 => matvec_t::<FMT, 1>(rows, x, out),
            _ => matvec_t::<FMT, 2>(rows, x, out),
        }
    }
}
