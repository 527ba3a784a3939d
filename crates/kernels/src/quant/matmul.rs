//! `y = x · Wᵀ` over a [`QMatrix`]: activation quantization, kernel choice and the parallel
//! split over output rows.
//!
//! One call quantizes the `m` activation rows once into a [`QScratch`] (Q8 blocks of 32 with
//! their scaled sums for Q4_0/Q4_1/Q8_0, Q8_K super-blocks for the K formats, nothing for float
//! weights), then splits the output rows into tasks on the [`ThreadPool`]. Inside a task, rows
//! are walked in cache-sized tiles; for `m ≥ 4` each row is applied to four tokens at a time by
//! the `_x4` micro-kernel so every weight block is unpacked once per four tokens, and the tokens
//! left over (all of them in a decode step) go four rows at a time through the `_r4`
//! micro-kernel (`dot_rows`), whose four independent accumulation chains overlap.
//!
//! Float weights (f32, f16, bf16) take their own path (`matmul_float`): register-blocked
//! GEMM micro-kernels over packed weight panels for prefill, an in-place transposing kernel
//! for decode, all computing each pair as the one serial chain of fused multiply-adds that the
//! portable `dot` also computes.

use super::act::{self, BlockQ8, BlockQ8K};
use super::dot_scalar as sc;
use super::matmul_float::float_kernels;
use super::matrix::QMatrix;
use crate::ThreadPool;
use crate::error::{KernelError, Result};
use crate::isa::{self, Isa};
use tessera_format::{QK_K, QType};

/// Reusable buffers for [`QMatrix::matmul`]: they grow to the largest call seen and are then
/// reused, so a warm decode step allocates nothing.
#[derive(Debug, Default)]
pub struct QScratch {
    q8: Vec<BlockQ8>,
    q8k: Vec<BlockQ8K>,
}

impl QScratch {
    /// Empty buffers.
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes currently held (for memory accounting).
    pub fn capacity_bytes(&self) -> usize {
        self.q8.capacity() * size_of::<BlockQ8>() + self.q8k.capacity() * size_of::<BlockQ8K>()
    }
}

/// A dot product of one weight row with one token's activations.
type Dot<A> = unsafe fn(&[u8], &[A]) -> f32;
/// One weight row with four tokens' activations.
type Dot4<A> = unsafe fn(&[u8], [&[A]; 4]) -> [f32; 4];
/// Four weight rows with one token's activations.
type DotR4<A> = unsafe fn([&[u8]; 4], &[A]) -> [f32; 4];

/// The kernels of one product. Each computes, for every (row, token) pair it covers, exactly
/// the arithmetic of `dot`, so which one ran never shows in the result.
#[derive(Clone, Copy)]
struct Kernels<A> {
    /// One row, one token.
    dot: Dot<A>,
    /// One row, four tokens (the prefill micro-kernel).
    tokens4: Option<Dot4<A>>,
    /// Four rows, one token (the decode micro-kernel).
    rows4: Option<DotR4<A>>,
}

impl<A> Kernels<A> {
    /// Only the single-pair kernel.
    fn single(dot: Dot<A>) -> Self {
        Self {
            dot,
            tokens4: None,
            rows4: None,
        }
    }
}

/// Four scalar dot products, the `_x4` fallback where no SIMD micro-kernel exists.
macro_rules! scalar_x4 {
    ($name:ident, $dot:path, $a:ty) => {
        fn $name(w: &[u8], a: [&[$a]; 4]) -> [f32; 4] {
            std::array::from_fn(|t| $dot(w, a[t]))
        }
    };
}
scalar_x4!(q4_0_x4, sc::dot_q4_0, BlockQ8);
scalar_x4!(q4_1_x4, sc::dot_q4_1, BlockQ8);
scalar_x4!(q8_0_x4, sc::dot_q8_0, BlockQ8);

/// The Q8-activation kernels for `qtype` at `isa`.
///
/// A token's result must be the same whatever `m` is (batched decode steps must equal solo
/// ones), so the `_x4` kernel does exactly the arithmetic of the single-token `dot`. AVX-512
/// has no `_x4` kernel of its own: its `dot` is bit-identical to AVX2's (only the exact integer
/// part is wider), so AVX-512 machines use the AVX2 `_x4`, which unpacks each weight block once
/// per four tokens — the difference between a prefill bound by weight unpacking and one bound
/// by arithmetic.
fn q8_kernels(qtype: QType, isa: Isa) -> Kernels<BlockQ8> {
    #[cfg(target_arch = "x86_64")]
    {
        use super::{dot_avx2 as v2, dot_avx512 as v5, dot_rows as rows};
        let x4: Dot4<BlockQ8> = match (qtype, isa >= Isa::Avx2) {
            (QType::Q4_0, true) => v2::dot_q4_x4::<false>,
            (QType::Q4_1, true) => v2::dot_q4_x4::<true>,
            (QType::Q8_0, true) => v2::dot_q8_0_x4,
            (QType::Q4_0, false) => q4_0_x4,
            (QType::Q4_1, false) => q4_1_x4,
            _ => q8_0_x4,
        };
        let dot: Dot<BlockQ8> = match (qtype, isa) {
            (QType::Q4_0, Isa::Avx512Vnni) => v5::dot_q4_vnni::<false>,
            (QType::Q4_1, Isa::Avx512Vnni) => v5::dot_q4_vnni::<true>,
            (QType::Q8_0, Isa::Avx512Vnni) => v5::dot_q8_0_vnni,
            (QType::Q4_0, Isa::Avx512) => v5::dot_q4_bw::<false>,
            (QType::Q4_1, Isa::Avx512) => v5::dot_q4_bw::<true>,
            (QType::Q8_0, Isa::Avx512) => v5::dot_q8_0_bw,
            (QType::Q4_0, Isa::Avx2) => v2::dot_q4::<false>,
            (QType::Q4_1, Isa::Avx2) => v2::dot_q4::<true>,
            (QType::Q8_0, Isa::Avx2) => v2::dot_q8_0,
            (QType::Q4_0, _) => sc::dot_q4_0,
            (QType::Q4_1, _) => sc::dot_q4_1,
            _ => sc::dot_q8_0,
        };
        let rows4: Option<DotR4<BlockQ8>> = match (qtype, isa) {
            (QType::Q4_0, Isa::Avx512Vnni) => Some(rows::dot_q4_r4_vnni::<false>),
            (QType::Q4_1, Isa::Avx512Vnni) => Some(rows::dot_q4_r4_vnni::<true>),
            (QType::Q8_0, Isa::Avx512Vnni) => Some(rows::dot_q8_0_r4_vnni),
            (QType::Q4_0, Isa::Avx2 | Isa::Avx512) => Some(rows::dot_q4_r4::<false>),
            (QType::Q4_1, Isa::Avx2 | Isa::Avx512) => Some(rows::dot_q4_r4::<true>),
            (QType::Q8_0, Isa::Avx2 | Isa::Avx512) => Some(rows::dot_q8_0_r4),
            _ => None,
        };
        Kernels {
            dot,
            tokens4: Some(x4),
            rows4,
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = isa;
        let (dot, x4): (Dot<BlockQ8>, Dot4<BlockQ8>) = match qtype {
            QType::Q4_0 => (sc::dot_q4_0, q4_0_x4),
            QType::Q4_1 => (sc::dot_q4_1, q4_1_x4),
            _ => (sc::dot_q8_0, q8_0_x4),
        };
        Kernels {
            dot,
            tokens4: Some(x4),
            rows4: None,
        }
    }
}

/// The Q8_K-activation kernel for the K format `qtype` at `isa`.
fn k_kernel(qtype: QType, isa: Isa) -> Dot<BlockQ8K> {
    #[cfg(target_arch = "x86_64")]
    if isa >= Isa::Avx2 {
        use super::dot_avx2_k as v2;
        return match qtype {
            QType::Q4K => v2::dot_q45k::<false>,
            QType::Q5K => v2::dot_q45k::<true>,
            _ => v2::dot_q6k,
        };
    }
    let _ = isa;
    match qtype {
        QType::Q4K => sc::dot_q4k,
        QType::Q5K => sc::dot_q5k,
        _ => sc::dot_q6k,
    }
}

/// The portable float kernels for `qtype` (F32, F16 or BF16), for CPUs without AVX2: one
/// serial fused chain per pair (see `matmul_float`), four independent chains at a time in the
/// `_x4` and `_r4` kernels so their latencies overlap. `pairs_only` leaves just `dot`.
fn float_portable(qtype: QType, pairs_only: bool) -> Kernels<f32> {
    let (dot, x4, r4): (Dot<f32>, Dot4<f32>, DotR4<f32>) = match qtype {
        QType::F16 => (sc::dot_f16, sc::dot_f16_x4, sc::dot_f16_r4),
        QType::BF16 => (sc::dot_bf16, sc::dot_bf16_x4, sc::dot_bf16_r4),
        _ => (sc::dot_f32, sc::dot_f32_x4, sc::dot_f32_r4),
    };
    if pairs_only {
        return Kernels::single(dot);
    }
    Kernels {
        dot,
        tokens4: Some(x4),
        rows4: Some(r4),
    }
}

/// A raw output pointer shared by tasks that write disjoint elements.
#[derive(Clone, Copy)]
pub(super) struct OutPtr(pub(super) *mut f32);
// SAFETY: every task writes only the (token, row) elements of its own row range.
unsafe impl Send for OutPtr {}
// SAFETY: as above; no element is read or written by two tasks.
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// Writes `v` at element `i`.
    ///
    /// # Safety
    /// `i` is inside the output and no other task writes it. (A method, not field access, so
    /// closures capture the whole `Sync` wrapper rather than the bare pointer.)
    unsafe fn write(&self, i: usize, v: f32) {
        // SAFETY: forwarded contract.
        unsafe { self.0.add(i).write(v) }
    }

    /// The address of element `i`, for a kernel that writes a block from there.
    ///
    /// # Safety
    /// `i` is inside the output.
    pub(super) unsafe fn at(&self, i: usize) -> *mut f32 {
        // SAFETY: forwarded contract.
        unsafe { self.0.add(i) }
    }
}

/// Work (multiply-adds) below which a product runs on the calling thread: waking the pool
/// costs a few microseconds, more than a tiny product.
const MIN_PARALLEL_WORK: usize = 64 * 1024;
/// Tasks per thread: a few, so a thread slowed by another process does not hold up the rest.
const TASKS_PER_THREAD: usize = 4;
/// Weight bytes per row tile: about half a typical L2, so a tile survives the token loop.
const TILE_BYTES: usize = 256 * 1024;

impl QMatrix {
    /// `y (m, rows) = x (m, cols) · Wᵀ`, both row-major; `m = 1` is a decode step's
    /// matrix-vector product, larger `m` a prefill.
    ///
    /// Quantized formats quantize `x` to 8 bits per block first (see the module docs of
    /// `act`): the result then differs from the exact product by at most
    /// `Σ_blocks (amax_block(x) / 254) · Σ_block |w|` plus f32 rounding.
    ///
    /// # Errors
    /// [`KernelError::InvalidArgument`] naming `x` (length is not `m · cols`) or `y` (length is
    /// not `m · rows`).
    pub fn matmul(
        &self,
        x: &[f32],
        m: usize,
        y: &mut [f32],
        scratch: &mut QScratch,
        pool: &ThreadPool,
    ) -> Result<()> {
        self.matmul_isa(isa::isa(), x, m, y, scratch, pool)
    }

    /// [`QMatrix::matmul`] with the instruction set forced to `isa` (tests compare paths).
    ///
    /// # Errors
    /// As [`QMatrix::matmul`], plus [`KernelError::InvalidArgument`] naming `isa` when the CPU
    /// lacks it.
    pub fn matmul_isa(
        &self,
        isa: Isa,
        x: &[f32],
        m: usize,
        y: &mut [f32],
        scratch: &mut QScratch,
        pool: &ThreadPool,
    ) -> Result<()> {
        self.matmul_impl(isa, true, x, m, y, scratch, pool)
    }

    /// [`QMatrix::matmul_isa`] with float weights computed by the portable `dot`, one pair at
    /// a time: the reference the SIMD float kernels must equal bit for bit (tests).
    #[cfg(test)]
    pub(crate) fn matmul_pairs(
        &self,
        isa: Isa,
        x: &[f32],
        m: usize,
        y: &mut [f32],
        pool: &ThreadPool,
    ) -> Result<()> {
        self.matmul_impl(isa, false, x, m, y, &mut QScratch::new(), pool)
    }

    /// [`QMatrix::matmul_isa`], with the SIMD float kernels allowed (`simd`) or not.
    #[allow(clippy::too_many_arguments)]
    fn matmul_impl(
        &self,
        isa: Isa,
        simd: bool,
        x: &[f32],
        m: usize,
        y: &mut [f32],
        scratch: &mut QScratch,
        pool: &ThreadPool,
    ) -> Result<()> {
        let (rows, cols) = (self.rows(), self.cols());
        if isa > isa::detected() {
            return Err(KernelError::InvalidArgument {
                field: "isa",
                reason: format!("this CPU does not support {}", isa.name()),
            });
        }
        if Some(x.len()) != m.checked_mul(cols) {
            return Err(KernelError::InvalidArgument {
                field: "x",
                reason: format!("{} values for {m} tokens of {cols} features", x.len()),
            });
        }
        if Some(y.len()) != m.checked_mul(rows) {
            return Err(KernelError::InvalidArgument {
                field: "y",
                reason: format!("{} values for {m} tokens of {rows} outputs", y.len()),
            });
        }
        if m == 0 {
            return Ok(());
        }
        match self.qtype() {
            QType::Q4_0 | QType::Q4_1 | QType::Q8_0 => {
                let nb = cols / 32;
                grow(&mut scratch.q8, m * nb, BlockQ8::ZERO);
                let acts = &mut scratch.q8[..m * nb];
                quantize_parallel(x, acts, cols, nb, pool, act::quantize_q8);
                self.run(acts, nb, m, y, pool, q8_kernels(self.qtype(), isa));
            }
            QType::Q4K | QType::Q5K | QType::Q6K => {
                let nb = cols / QK_K;
                grow(&mut scratch.q8k, m * nb, BlockQ8K::ZERO);
                let acts = &mut scratch.q8k[..m * nb];
                quantize_parallel(x, acts, cols, nb, pool, act::quantize_q8k);
                let kernels = Kernels::single(k_kernel(self.qtype(), isa));
                self.run(acts, nb, m, y, pool, kernels);
            }
            QType::F32 | QType::F16 | QType::BF16 => match float_kernels(self.qtype(), isa) {
                Some(k) if simd => self.run_float(x, m, y, pool, k),
                _ => {
                    let kernels = float_portable(self.qtype(), !simd);
                    self.run(x, cols, m, y, pool, kernels);
                }
            },
        }
        Ok(())
    }

    /// Runs `k` over every (token, row) pair, tasks split by output rows: four tokens at a time
    /// where it can, then the remaining tokens four rows at a time. `acts` holds `m` tokens of
    /// `per_token` activation units.
    fn run<A: Sync>(
        &self,
        acts: &[A],
        per_token: usize,
        m: usize,
        y: &mut [f32],
        pool: &ThreadPool,
        k: Kernels<A>,
    ) {
        let rows = self.rows();
        let n_tasks = self.n_tasks(m, pool);
        let rows_per_task = rows.div_ceil(n_tasks);
        let tile = (TILE_BYTES / self.row_bytes().max(1)).clamp(4, rows_per_task.max(4));
        let out = OutPtr(y.as_mut_ptr());
        let tok = |t: usize| &acts[t * per_token..(t + 1) * per_token];
        let task = |i: usize| {
            let r_end = rows.min((i + 1) * rows_per_task);
            let mut r0 = i * rows_per_task;
            while r0 < r_end {
                let r1 = r_end.min(r0 + tile);
                let mut t = 0;
                if let Some(dot4) = k.tokens4 {
                    while t + 4 <= m {
                        let a = [tok(t), tok(t + 1), tok(t + 2), tok(t + 3)];
                        for r in r0..r1 {
                            // SAFETY: the kernels were chosen for an ISA the CPU has (checked in
                            // matmul_isa); each row holds per_token units' worth of blocks.
                            let v = unsafe { dot4(self.row(r), a) };
                            for (k, vk) in v.into_iter().enumerate() {
                                // SAFETY: (t + k, r) is inside y and owned by this task's rows.
                                unsafe { out.write((t + k) * rows + r, vk) };
                            }
                        }
                        t += 4;
                    }
                }
                for t in t..m {
                    let a = tok(t);
                    let mut r = r0;
                    if let Some(rows4) = k.rows4 {
                        while r + 4 <= r1 {
                            let w = [
                                self.row(r),
                                self.row(r + 1),
                                self.row(r + 2),
                                self.row(r + 3),
                            ];
                            // SAFETY: as above.
                            let v = unsafe { rows4(w, a) };
                            for (j, vj) in v.into_iter().enumerate() {
                                // SAFETY: (t, r + j) is inside y and owned by this task's rows.
                                unsafe { out.write(t * rows + r + j, vj) };
                            }
                            r += 4;
                        }
                    }
                    for r in r..r1 {
                        // SAFETY: as above.
                        let v = unsafe { (k.dot)(self.row(r), a) };
                        // SAFETY: (t, r) is inside y and owned by this task's rows.
                        unsafe { out.write(t * rows + r, v) };
                    }
                }
                r0 = r1;
            }
        };
        if n_tasks == 1 {
            task(0);
        } else {
            pool.for_each(n_tasks, task);
        }
    }

    /// How many row tasks a product over `m` tokens is split into.
    pub(super) fn n_tasks(&self, m: usize, pool: &ThreadPool) -> usize {
        let rows = self.rows();
        if pool.n_threads() == 1 || rows * m * self.cols() < MIN_PARALLEL_WORK {
            1
        } else {
            (pool.n_threads() * TASKS_PER_THREAD)
                .min(rows.div_ceil(4))
                .max(1)
        }
    }
}

/// Grows `v` to at least `n` elements (never shrinks, so warm calls do not allocate).
pub(super) fn grow<T: Copy>(v: &mut Vec<T>, n: usize, zero: T) {
    if v.len() < n {
        v.resize(n, zero);
    }
}

/// Quantizes `m` tokens of `cols` activations into `nb` blocks each, in parallel for prefill.
fn quantize_parallel<B: Send>(
    x: &[f32],
    out: &mut [B],
    cols: usize,
    nb: usize,
    pool: &ThreadPool,
    f: fn(&[f32], &mut [B]),
) {
    let m = x.len() / cols;
    if m < 16 || pool.n_threads() == 1 {
        f(x, out);
        return;
    }
    let n_tasks = pool.n_threads().min(m);
    let per = m.div_ceil(n_tasks);
    let ptr = OutBlocks(out.as_mut_ptr());
    pool.for_each(n_tasks, |i| {
        let ptr = &ptr;
        let (t0, t1) = (i * per, m.min((i + 1) * per));
        if t0 >= t1 {
            return;
        }
        // SAFETY: tasks take disjoint token ranges [t0, t1) of `out`, which holds m · nb blocks.
        let dst = unsafe { std::slice::from_raw_parts_mut(ptr.0.add(t0 * nb), (t1 - t0) * nb) };
        f(&x[t0 * cols..t1 * cols], dst);
    });
}

/// A block pointer shared by tasks that write disjoint token ranges.
struct OutBlocks<B>(*mut B);
// SAFETY: every task writes only its own token range; B is Send.
unsafe impl<B: Send> Send for OutBlocks<B> {}
// SAFETY: as above.
unsafe impl<B: Send> Sync for OutBlocks<B> {}
