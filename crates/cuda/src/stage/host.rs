//! [`HostOps`]: every [`StageOps`] operation computed on the CPU to its kernel's contract —
//! f32 arithmetic on values stored in the device dtype, each result rounded to that dtype
//! where the kernel stores it, attention by the f64 reference — so a GPU stage's host-side
//! logic runs, and is compared with the CPU engine, on a machine without a GPU.
//!
//! It is the executable statement of what [`super::CudaOps`] must compute, not a fast path:
//! matmuls are plain dot products (split over the machine's cores), attention is the naive
//! f64 reference. The kernels themselves are checked against the same references on a device
//! (`tests/gpu.rs`).
//!
//! A 16-bit buffer is held as f32 values that are each exactly representable in the dtype
//! (every write rounds), which is what the device holds, read as f32.

use std::thread;

use tessera_kernels::attention::reference::attention_f64;
use tessera_kernels::attention::{AttnShape, KvView};

use super::ops::{MatmulDims, Rope, StageOps};
use crate::dtype::DType;
use crate::error::{CudaError, Result, check_len as check, check_range};
use crate::plan::{DecodeParams, PrefillParams, RopeLayout, norm_rows};

/// The host implementation of [`StageOps`] (see the module docs).
#[derive(Clone, Copy, Debug)]
pub struct HostOps {
    dtype: DType,
}

impl HostOps {
    /// Operations storing 16-bit values as `dtype`.
    pub fn new(dtype: DType) -> Self {
        Self { dtype }
    }

    /// Attention by the f64 reference, written to `out` rounded to the dtype: the contract
    /// of both attention kernels.
    fn reference(
        &self,
        q: &[f32],
        kv: KvView<'_>,
        shape: AttnShape,
        (causal, scale): (bool, f32),
        out: &mut [f32],
    ) {
        let r = attention_f64(q, kv, shape, causal, scale);
        for (o, &x) in out.iter_mut().zip(&r.out) {
            *o = self.dtype.round(x as f32);
        }
    }

    fn round_all(&self, xs: &mut [f32]) {
        for x in xs {
            *x = self.dtype.round(*x);
        }
    }
}

/// `x · y` with eight partial sums (what a vectorised device reduction does, roughly; the
/// order of f32 sums is the one liberty an implementation has).
fn dot(x: &[f32], y: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (xc, yc) = (x.chunks_exact(8), y.chunks_exact(8));
    let tail: f32 = xc
        .remainder()
        .iter()
        .zip(yc.remainder())
        .map(|(a, b)| a * b)
        .sum();
    for (a, b) in xc.zip(yc) {
        // Plain multiply-add (not `mul_add`, a libm call without FMA): it vectorises.
        for i in 0..8 {
            acc[i] += a[i] * b[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `out (m, n) = x (m, k) · w (n, k)ᵀ` in f32, output columns split over the cores; `round`
/// applied to each result.
fn matmul_f32(
    x: &[f32],
    w: &[f32],
    out: &mut [f32],
    d: MatmulDims,
    round: impl Fn(f32) -> f32 + Sync,
) {
    let MatmulDims { m, n, k } = d;
    let threads = thread::available_parallelism()
        .map_or(1, |t| t.get())
        .min(n.max(1));
    let per = n.div_ceil(threads.max(1)).max(1);
    // Each thread computes whole columns; results are scattered into `out` afterwards.
    let parts: Vec<Vec<f32>> = thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .step_by(per)
            .map(|c0| {
                let round = &round;
                s.spawn(move || {
                    let c1 = (c0 + per).min(n);
                    let mut part = Vec::with_capacity(m * (c1 - c0));
                    for r in 0..m {
                        let xr = &x[r * k..(r + 1) * k];
                        for c in c0..c1 {
                            part.push(round(dot(xr, &w[c * k..(c + 1) * k])));
                        }
                    }
                    part
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_default())
            .collect()
    });
    for (i, part) in parts.iter().enumerate() {
        let c0 = i * per;
        let width = (c0 + per).min(n) - c0;
        for r in 0..m {
            out[r * n + c0..r * n + c0 + width].copy_from_slice(&part[r * width..(r + 1) * width]);
        }
    }
}

impl StageOps for HostOps {
    type Half = Vec<f32>;
    type Float = Vec<f32>;
    type Positions = Vec<i32>;

    fn dtype(&self) -> DType {
        self.dtype
    }

    fn half_len(&self, b: &Vec<f32>) -> usize {
        b.len()
    }

    fn upload_half(&self, xs: &[f32]) -> Result<Vec<f32>> {
        let mut v = xs.to_vec();
        self.round_all(&mut v);
        Ok(v)
    }

    fn zeros_half(&self, n: usize) -> Result<Vec<f32>> {
        Ok(vec![0.0; n])
    }

    fn upload_float(&self, xs: &[f32]) -> Result<Vec<f32>> {
        Ok(xs.to_vec())
    }

    fn zeros_float(&self, n: usize) -> Result<Vec<f32>> {
        Ok(vec![0.0; n])
    }

    fn download_float(&self, b: &Vec<f32>, out: &mut Vec<f32>) -> Result<()> {
        out.clear();
        out.extend_from_slice(b);
        Ok(())
    }

    fn copy_half(
        &self,
        src: &Vec<f32>,
        src_at: usize,
        dst: &mut Vec<f32>,
        dst_at: usize,
        n: usize,
    ) -> Result<()> {
        // Both kinds of buffer are f32 values here.
        self.copy_float(src, src_at, dst, dst_at, n)
    }

    fn copy_float(
        &self,
        src: &Vec<f32>,
        src_at: usize,
        dst: &mut Vec<f32>,
        dst_at: usize,
        n: usize,
    ) -> Result<()> {
        let s = check_range("src", src_at, n, src.len())?;
        let d = check_range("dst", dst_at, n, dst.len())?;
        dst[d].copy_from_slice(&src[s]);
        Ok(())
    }

    fn matmul(&self, x: &Vec<f32>, w: &Vec<f32>, out: &mut Vec<f32>, d: MatmulDims) -> Result<()> {
        d.check(x.len(), w.len(), out.len())?;
        let dt = self.dtype;
        matmul_f32(x, w, out, d, move |v| dt.round(v));
        Ok(())
    }

    fn matmul_float(
        &self,
        x: &Vec<f32>,
        w: &Vec<f32>,
        out: &mut Vec<f32>,
        d: MatmulDims,
    ) -> Result<()> {
        d.check(x.len(), w.len(), out.len())?;
        matmul_f32(x, w, out, d, |v| v);
        Ok(())
    }

    fn rmsnorm(&self, x: &Vec<f32>, w: &Vec<f32>, out: &mut Vec<f32>, eps: f32) -> Result<()> {
        let dim = w.len();
        if norm_rows((x.len(), dim, out.len()), dim, eps)?.is_none() {
            return Ok(());
        }
        for (xr, or) in x.chunks_exact(dim).zip(out.chunks_exact_mut(dim)) {
            let ss = xr.iter().fold(0.0f32, |a, &v| a + v * v);
            let inv = 1.0 / (ss / dim as f32 + eps).sqrt();
            for ((o, &v), &g) in or.iter_mut().zip(xr).zip(w) {
                *o = self.dtype.round(v * inv * g);
            }
        }
        Ok(())
    }

    fn bias(&self, x: &mut Vec<f32>, b: &Vec<f32>) -> Result<()> {
        if b.is_empty() || !x.len().is_multiple_of(b.len()) {
            return Err(CudaError::invalid(
                "b",
                format!("{} values do not divide x's {}", b.len(), x.len()),
            ));
        }
        for row in x.chunks_exact_mut(b.len()) {
            for (v, &c) in row.iter_mut().zip(b) {
                *v = self.dtype.round(*v + c);
            }
        }
        Ok(())
    }

    fn upload_positions(&self, positions: &[i32]) -> Result<Vec<i32>> {
        Ok(positions.to_vec())
    }

    fn rope(
        &self,
        x: &mut Vec<f32>,
        positions: &Vec<i32>,
        n_heads: usize,
        head_dim: usize,
        rope: Rope,
    ) -> Result<()> {
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            return Err(CudaError::invalid(
                "head_dim",
                format!("{head_dim} must be even"),
            ));
        }
        check("x", x.len(), positions.len() * n_heads * head_dim)?;
        let half = head_dim / 2;
        for (t, &pos) in positions.iter().enumerate() {
            for h in 0..n_heads {
                let row = &mut x[(t * n_heads + h) * head_dim..][..head_dim];
                for p in 0..half {
                    // As the kernel: the angle in f64, exactly theta^(-2p/d).
                    let freq = f64::from(rope.theta).powf(-2.0 * p as f64 / head_dim as f64);
                    let (sd, cd) = (f64::from(pos) * freq).sin_cos();
                    let (s, c) = (sd as f32, cd as f32);
                    let (i0, i1) = match rope.layout {
                        RopeLayout::Interleaved => (2 * p, 2 * p + 1),
                        RopeLayout::Neox => (p, p + half),
                    };
                    let (a, b) = (row[i0], row[i1]);
                    row[i0] = self.dtype.round(a * c - b * s);
                    row[i1] = self.dtype.round(a * s + b * c);
                }
            }
        }
        Ok(())
    }

    fn swiglu(&self, gate: &Vec<f32>, up: &Vec<f32>, out: &mut Vec<f32>) -> Result<()> {
        check("up", up.len(), gate.len())?;
        check("out", out.len(), gate.len())?;
        for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
            *o = self.dtype.round(g / (1.0 + (-g).exp()) * u);
        }
        Ok(())
    }

    fn add(&self, x: &mut Vec<f32>, y: &Vec<f32>) -> Result<()> {
        check("y", y.len(), x.len())?;
        for (a, &b) in x.iter_mut().zip(y) {
            *a += b;
        }
        Ok(())
    }

    fn prefill(
        &self,
        p: &PrefillParams,
        q: &Vec<f32>,
        k: &Vec<f32>,
        v: &Vec<f32>,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        p.geometry()?;
        if p.batch != 1 {
            return Err(CudaError::invalid(
                "batch",
                "a stage step attends one sequence per call",
            ));
        }
        let shape = AttnShape {
            seq_q: p.seq_q,
            n_heads: p.n_heads,
            n_kv_heads: p.n_kv_heads,
            head_dim: p.head_dim,
        };
        check("q", q.len(), p.seq_q * p.n_heads * p.head_dim)?;
        check("k", k.len(), p.seq_k * p.n_kv_heads * p.head_dim)?;
        check("v", v.len(), k.len())?;
        check("out", out.len(), q.len())?;
        self.reference(
            q,
            KvView::contiguous(k, v, p.seq_k),
            shape,
            (p.causal, p.scale),
            out,
        );
        Ok(())
    }

    fn paged(
        &self,
        p: &DecodeParams,
        q: &Vec<f32>,
        pools: (&Vec<f32>, &Vec<f32>),
        table: &[u32],
        out: &mut Vec<f32>,
    ) -> Result<()> {
        // The launch plan's checks, for any device size.
        p.plan(1)?;
        crate::plan::validate_block_table(table, p.block_size, p.len, p.num_blocks)?;
        let pool = p.num_blocks * p.block_size * p.n_kv_heads * p.head_dim;
        check("k_pool", pools.0.len(), pool)?;
        check("v_pool", pools.1.len(), pool)?;
        check("q", q.len(), p.seq_q * p.n_heads * p.head_dim)?;
        check("out", out.len(), q.len())?;
        let view = KvView {
            k: pools.0,
            v: pools.1,
            block_table: table,
            block_size: p.block_size,
            len: p.len,
        };
        let shape = AttnShape {
            seq_q: p.seq_q,
            n_heads: p.n_heads,
            n_kv_heads: p.n_kv_heads,
            head_dim: p.head_dim,
        };
        self.reference(q, view, shape, (p.causal, p.scale), out);
        Ok(())
    }
}
