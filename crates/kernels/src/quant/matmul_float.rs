//! The float-weight path of [`QMatrix::matmul`] (f32, f16 and bf16 weights), and the one
//! accumulation order every float kernel keeps.
//!
//! # The accumulation order
//!
//! Every float product computes each (row `r`, token `t`) pair as one serial chain of fused
//! multiply-adds in element order, from `+0`:
//!
//! `acc = 0; for k in 0..cols { acc = fma(w[r][k], x[t][k], acc) }`
//!
//! with `w` widened exactly to f32 first. The portable `dot_float` (`dot_scalar`) is that
//! loop; the SIMD kernels (`float_avx2`, `float_avx512`) vectorize *across* pairs — a vector
//! holds 8 or 16 output rows of one token — and never within one, so every kernel on every
//! CPU gives every pair the same bits, whatever `m`, the thread count or the kernel that ran.
//!
//! It replaced a 16-lane order (lane `k mod 16`, then a horizontal sum). Any order that splits
//! one pair over lanes needs a horizontal reduction per pair: in a 4-row × 4-token AVX-512
//! tile at 384 columns (the encoder's common width) the reductions and their shuffles took
//! about a fifth of the time (profiled), and the product stayed 10–15% below what this order
//! reaches. With one lane per pair the kernels are the classic register-blocked GEMM, with no
//! reduction at all. The single-chain error bound is `cols · u · Σ|w x|` (typically near
//! `√cols · u`), against `(cols / 16 + 4) · u` before; it stays far inside what the tests and
//! the encoder's golden comparison allow (measured in `tests_float`).
//!
//! # The paths
//!
//! * Prefill (more than 4 tokens with AVX-512, 2 with AVX2): tasks split the output rows over
//!   the pool. A task packs its rows, in blocks of about [`ROW_BLOCK_BYTES`] (kept in L2),
//!   into transposed panels of 32 (AVX-512) or 16 (AVX2) rows (`pack`, widening f16/bf16
//!   exactly) in a per-thread buffer, then runs every group of up to 12 (6) tokens over every
//!   panel of the block (`gemm`), writing each token's outputs in contiguous runs. Packing is
//!   one transposing pass over the weights, a few percent of a 640-token prefill (profiled).
//! * Decode (fewer tokens): `matvec` transposes 32 (16) rows × 16 (8) elements in registers
//!   and applies them to every token at once, reading the weights once, in place: a packing
//!   pass (a store and a reload of every weight) would cost more than the multiply-adds. Its
//!   transposes (about a quarter cycle per weight) make it slower than the old 16-lane `dot`
//!   while the weights sit in cache, and about as fast once they stream from memory.
//! * CPUs without AVX2 use the portable `dot` per pair (through `run`).

use super::matmul::{OutPtr, grow};
use super::matrix::QMatrix;
use crate::ThreadPool;
use crate::isa::Isa;
use std::cell::RefCell;
use std::ops::Range;
use tessera_format::QType;

/// Weight format tag of the float kernels' const generic: f32.
pub(crate) const F32: u8 = 0;
/// Weight format tag: f16.
pub(crate) const F16: u8 = 1;
/// Weight format tag: bf16.
pub(crate) const BF16: u8 = 2;

/// Packed (f32) weight bytes per row block: a quarter to a half of a server core's L2, so the
/// panels stay there while every token group passes them.
const ROW_BLOCK_BYTES: usize = 512 * 1024;

/// The widest panel and the most tokens any ISA's kernels take (array bounds).
const MAX_ROWS: usize = 32;
/// See [`MAX_ROWS`].
const MAX_TOKENS: usize = 12;

/// Where a kernel's outputs go: pair (row `j`, token `t`) at `dst[t · stride + j]`.
#[derive(Clone, Copy)]
pub(crate) struct TileOut {
    /// Pair (row 0, token 0).
    pub(crate) dst: *mut f32,
    /// Distance between tokens, in f32.
    pub(crate) stride: usize,
}

/// Packs up to a panel of weight rows of `cols` elements into `panel · cols` f32.
type Pack = unsafe fn(&[&[u8]], usize, &mut [f32]);
/// A packed panel against tokens; the last argument is the number of rows to write.
type Gemm = unsafe fn(&[f32], &[&[f32]], TileOut, usize);
/// Weight rows, read in place, against tokens.
type Matvec = unsafe fn(&[&[u8]], &[&[f32]], TileOut);

/// One ISA's float kernels (see the module docs); the weight format is built into `pack` and
/// `matvec`.
#[derive(Clone, Copy)]
pub(super) struct FloatKernels {
    /// Rows per packed panel.
    panel: usize,
    /// Most tokens per `gemm` call.
    gemm_tokens: usize,
    /// Rows per `matvec` call.
    matvec_rows: usize,
    /// Most tokens the in-place `matvec` path is used for.
    matvec_tokens: usize,
    /// Packs up to `panel` rows of `cols` elements into `panel · cols` f32.
    pack: Pack,
    /// A packed panel against up to `gemm_tokens` tokens; the last argument is the number of
    /// rows to write.
    gemm: Gemm,
    /// Up to `matvec_rows` rows, in place, against up to `matvec_tokens` tokens.
    matvec: Matvec,
}

/// A [`FloatKernels`] from the kernel module `$m` for the format tag `$fmt`.
#[cfg(target_arch = "x86_64")]
macro_rules! float_kernels {
    ($m:ident, $fmt:ident) => {
        FloatKernels {
            panel: $m::PANEL,
            gemm_tokens: $m::GEMM_TOKENS,
            matvec_rows: $m::MATVEC_ROWS,
            matvec_tokens: $m::MATVEC_TOKENS,
            pack: $m::pack::<$fmt>,
            gemm: $m::gemm,
            matvec: $m::matvec::<$fmt>,
        }
    };
}

/// The float kernels for `qtype` (F32, F16 or BF16) at `isa`; `None` without AVX2.
pub(super) fn float_kernels(qtype: QType, isa: Isa) -> Option<FloatKernels> {
    #[cfg(target_arch = "x86_64")]
    {
        use super::{float_avx2 as v2, float_avx512 as v5};
        const { assert!(v5::PANEL <= MAX_ROWS && v5::GEMM_TOKENS <= MAX_TOKENS) };
        const { assert!(v5::MATVEC_ROWS <= MAX_ROWS && v5::MATVEC_TOKENS <= MAX_TOKENS) };
        const { assert!(v2::PANEL <= MAX_ROWS && v2::GEMM_TOKENS <= MAX_TOKENS) };
        const { assert!(v2::MATVEC_ROWS <= MAX_ROWS && v2::MATVEC_TOKENS <= MAX_TOKENS) };
        let k = match (isa, qtype) {
            (Isa::Scalar, _) => return None,
            (Isa::Avx2, QType::F16) => float_kernels!(v2, F16),
            (Isa::Avx2, QType::BF16) => float_kernels!(v2, BF16),
            (Isa::Avx2, _) => float_kernels!(v2, F32),
            (_, QType::F16) => float_kernels!(v5, F16),
            (_, QType::BF16) => float_kernels!(v5, BF16),
            _ => float_kernels!(v5, F32),
        };
        Some(k)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (qtype, isa);
        None
    }
}

thread_local! {
    /// Packed weight panels, per compute thread so warm calls do not allocate (at most one
    /// row block: [`ROW_BLOCK_BYTES`], or one panel if larger).
    static PANELS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

impl QMatrix {
    /// `y (m, rows) = x (m, cols) · Wᵀ` for float weights with the SIMD kernels `k` (see the
    /// module docs).
    pub(super) fn run_float(
        &self,
        x: &[f32],
        m: usize,
        y: &mut [f32],
        pool: &ThreadPool,
        k: FloatKernels,
    ) {
        let rows = self.rows();
        let in_place = m <= k.matvec_tokens;
        let unit = if in_place { k.matvec_rows } else { k.panel };
        let per_task = rows.div_ceil(self.n_tasks(m, pool)).next_multiple_of(unit);
        let n_tasks = rows.div_ceil(per_task);
        let out = OutPtr(y.as_mut_ptr());
        let task = |i: usize| {
            let range = i * per_task..rows.min((i + 1) * per_task);
            if in_place {
                self.matvec_rows(range, x, m, &out, k);
            } else {
                self.gemm_rows(range, x, m, &out, k);
            }
        };
        if n_tasks == 1 {
            task(0);
        } else {
            pool.for_each(n_tasks, task);
        }
    }

    /// Rows `r..r + n` (`n ≤` [`MAX_ROWS`]) as raw byte rows; the rest of the array is empty.
    fn rows_from(&self, r: usize, n: usize) -> [&[u8]; MAX_ROWS] {
        let mut out: [&[u8]; MAX_ROWS] = [&[]; MAX_ROWS];
        for (j, o) in out.iter_mut().take(n).enumerate() {
            *o = self.row(r + j);
        }
        out
    }

    /// Output rows `rows` (a task's) for every token.
    fn gemm_rows(&self, rows: Range<usize>, x: &[f32], m: usize, out: &OutPtr, k: FloatKernels) {
        let (n_rows, cols) = (self.rows(), self.cols());
        let block = (ROW_BLOCK_BYTES / (cols * size_of::<f32>()) / k.panel).max(1) * k.panel;
        let per_panel = k.panel * cols;
        PANELS.with_borrow_mut(|buf| {
            for b0 in rows.clone().step_by(block) {
                let b1 = rows.end.min(b0 + block);
                let n_panels = (b1 - b0).div_ceil(k.panel);
                grow(buf, n_panels * per_panel, 0.0);
                for (pi, panel) in buf.chunks_exact_mut(per_panel).take(n_panels).enumerate() {
                    let r = b0 + pi * k.panel;
                    let nr = k.panel.min(b1 - r);
                    let w = self.rows_from(r, nr);
                    // SAFETY: the kernels were chosen for an ISA the CPU has (checked in
                    // matmul_isa); each row holds `cols` elements; the panel holds
                    // `panel · cols` f32.
                    unsafe { (k.pack)(&w[..nr], cols, panel) };
                }
                for t0 in (0..m).step_by(k.gemm_tokens) {
                    let nt = k.gemm_tokens.min(m - t0);
                    let mut xs: [&[f32]; MAX_TOKENS] = [&[]; MAX_TOKENS];
                    for (t, xt) in xs.iter_mut().take(nt).enumerate() {
                        *xt = &x[(t0 + t) * cols..(t0 + t + 1) * cols];
                    }
                    for (pi, panel) in buf.chunks_exact(per_panel).take(n_panels).enumerate() {
                        let r = b0 + pi * k.panel;
                        let dst = TileOut {
                            // SAFETY: (t0, r) is inside y.
                            dst: unsafe { out.at(t0 * n_rows + r) },
                            stride: n_rows,
                        };
                        // SAFETY: as above; every token holds `cols` values; the outputs
                        // (t0..t0 + nt, r..min(r + panel, b1)) are inside y and owned by this
                        // task's rows.
                        unsafe { (k.gemm)(panel, &xs[..nt], dst, k.panel.min(b1 - r)) };
                    }
                }
            }
        });
    }

    /// Output rows `rows` (a task's) for `m ≤ matvec_tokens` tokens, the weights read in place.
    fn matvec_rows(&self, rows: Range<usize>, x: &[f32], m: usize, out: &OutPtr, k: FloatKernels) {
        let (n_rows, cols) = (self.rows(), self.cols());
        let mut xs: [&[f32]; MAX_TOKENS] = [&[]; MAX_TOKENS];
        for (t, xt) in xs.iter_mut().take(m).enumerate() {
            *xt = &x[t * cols..(t + 1) * cols];
        }
        for r in rows.clone().step_by(k.matvec_rows) {
            let nr = k.matvec_rows.min(rows.end - r);
            let w = self.rows_from(r, nr);
            let dst = TileOut {
                // SAFETY: (0, r) is inside y.
                dst: unsafe { out.at(r) },
                stride: n_rows,
            };
            // SAFETY: the kernels were chosen for an ISA the CPU has; each row holds `cols`
            // elements and each token `cols` values; the outputs (0..m, r..r + nr) are inside y
            // and owned by this task's rows.
            unsafe { (k.matvec)(&w[..nr], &xs[..m], dst) };
        }
    }
}
