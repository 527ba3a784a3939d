//! The engine's attention: llama.cpp's non-flash path, in its exact order of operations.
//!
//! The golden continuations come from llama.cpp with `flash_attn` off, f16 K/V and two threads.
//! There, attention is three ggml ops: `KQ = mul_mat(K, Q)` (K is f16, so Q is rounded to f16
//! first and each score is an f16·f16 dot product accumulated in f32), `soft_max_ext` (scale,
//! mask, `ggml_v_expf`, run sums in f64, multiply by the reciprocal) and `KQV = mul_mat(Vᵀ, P)`
//! (P rounded to f16). The dot products are summed in one of two orders, both reproduced here:
//!
//! * a single new token (decode) goes through `ggml_vec_dot_f16`: four 8-lane accumulators
//!   over runs of 32, reduced pairwise, then a tail (if any) added in f64;
//! * two or more (prefill) go through llamafile's `tinyBLAS`: one 8-lane accumulator per
//!   output, reduced by [`hsum8`].
//!
//! The KV length is padded to a multiple of 32 with masked keys (llama.cpp pads to 256), whose
//! probability is exactly 0, so padding changes no sum: all real keys fall in the vector parts.
//!
//! Why a second kernel next to [`flash_attention`](super::flash_attention): the flash kernel's
//! online softmax rescales partial sums, which rounds differently from llama.cpp, and the
//! model's near-ties turn those last bits into different greedy tokens. The flash kernel stays
//! for what needs partial results over key subsets (ring attention, flash-decoding merges by
//! log-sum-exp); this kernel also returns the log-sum-exp, so its output can be merged the same
//! way. The single-process engine and every pipeline stage use this kernel, so they agree bit
//! for bit.
//!
//! K and V must hold f16 values (the attention layer rounds them before writing the cache);
//! the kernel rounds Q and P itself.

use super::flash::Shared;
use super::{AttnOut, AttnShape, AttnSpec, KvView, MAX_HEAD_DIM};
use crate::ThreadPool;
use crate::ggml_math::{exp_sum, hsum8, round_f16};
use std::cell::RefCell;

/// Keys are padded to a multiple of this (one `ggml_vec_dot_f16` step).
pub(super) const PAD: usize = 32;

thread_local! {
    /// Per-thread scores / probabilities of one query vector (grown, never shrunk).
    static ROW: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Attention of `q` over `kv` in llama.cpp's non-flash order (see the module docs).
///
/// Same contract as [`flash_attention`](super::flash_attention): `q`/`out` are
/// `(seq_q, n_heads, head_dim)`, `lse` `(seq_q, n_heads)`, causal masking bottom-right, GQA by
/// `n_heads / n_kv_heads`, a row with no visible key gets 0 and `-inf`. `seq_q >= 2` uses the
/// prefill summation order, `seq_q == 1` the decode one, so a sequence's result does not depend
/// on what else is in the batch.
///
/// # Panics
/// On inconsistent shapes (caller bugs), as [`flash_attention`](super::flash_attention).
pub fn ggml_attention(
    q: &[f32],
    kv: KvView<'_>,
    spec: AttnSpec,
    o: AttnOut<'_>,
    pool: &ThreadPool,
) {
    let AttnSpec {
        shape,
        causal,
        scale,
    } = spec;
    let AttnOut { out, lse } = o;
    let AttnShape {
        seq_q,
        n_heads,
        head_dim,
        ..
    } = shape;
    shape.check("ggml_attention", q, out, lse, &kv);
    let rows = seq_q * n_heads;
    let job = Job {
        q,
        kv,
        shape,
        causal,
        scale,
        // tinyBLAS takes the product only when the inner sizes are multiples of its vector.
        tiled_kq: seq_q >= 2 && head_dim.is_multiple_of(8),
        tiled_kqv: seq_q >= 2 && head_dim.is_multiple_of(4),
    };
    let out = Shared::new(out);
    let lse = Shared::new(lse);
    pool.for_each(rows, |r| {
        // SAFETY: task r writes only row r of `out` and `lse`.
        let (o, l) = unsafe { (out.slice(r * head_dim, head_dim), lse.slice(r, 1)) };
        ROW.with(|buf| job.row(r, o, &mut l[0], &mut buf.borrow_mut()));
    });
}

#[derive(Clone, Copy)]
struct Job<'a> {
    q: &'a [f32],
    kv: KvView<'a>,
    shape: AttnShape,
    causal: bool,
    scale: f32,
    tiled_kq: bool,
    tiled_kqv: bool,
}

impl Job<'_> {
    /// Query vector `r` (row `r / n_heads`, head `r % n_heads`).
    fn row(&self, r: usize, out: &mut [f32], lse: &mut f32, buf: &mut Vec<f32>) {
        #[cfg(target_arch = "x86_64")]
        if crate::isa::avx2() {
            // SAFETY: AVX2 and FMA were detected at run time.
            unsafe { self.row_fma(r, out, lse, buf) };
            return;
        }
        self.row_impl::<false>(r, out, lse, buf);
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn row_fma(&self, r: usize, out: &mut [f32], lse: &mut f32, buf: &mut Vec<f32>) {
        self.row_impl::<true>(r, out, lse, buf);
    }

    /// One query vector; `SIMD` only where AVX2, FMA and F16C were detected (then the inner
    /// loops are `ggml_simd`'s, which compute the same bits).
    #[inline(always)]
    fn row_impl<const SIMD: bool>(
        &self,
        r: usize,
        out: &mut [f32],
        lse: &mut f32,
        buf: &mut Vec<f32>,
    ) {
        let AttnShape {
            n_heads,
            n_kv_heads,
            head_dim: hd,
            ..
        } = self.shape;
        let (i, h) = (r / n_heads, r % n_heads);
        let kvh = h / self.shape.group();
        let len = if self.causal {
            self.shape.causal_limit(i, self.kv.len)
        } else {
            self.kv.len
        };
        if len == 0 {
            out.fill(0.0);
            *lse = f32::NEG_INFINITY;
            return;
        }
        let mut q16 = [0.0f32; MAX_HEAD_DIM];
        for (d, s) in q16.iter_mut().zip(&self.q[r * hd..(r + 1) * hd]) {
            *d = round_f16(*s);
        }
        let q16 = &q16[..hd];
        let padded = len.next_multiple_of(PAD);
        buf.resize(2 * padded, 0.0);
        let (w, p) = buf.split_at_mut(padded);

        // KQ, scaled (soft_max_ext multiplies by the scale, then adds the 0 / -inf mask).
        let simd = SIMD && cfg!(target_arch = "x86_64");
        if simd {
            // SAFETY: SIMD is set only after detecting AVX2 and FMA; tiled_kq implies
            // hd % 8 == 0; the shape check put every visible key inside the view.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                super::ggml_simd::scores(
                    &self.kv,
                    kvh,
                    n_kv_heads,
                    q16,
                    self.scale,
                    self.tiled_kq,
                    &mut w[..len],
                );
            }
        } else {
            for (t, wt) in w[..len].iter_mut().enumerate() {
                let off = self.kv.offset(t, kvh, n_kv_heads, hd);
                let k = &self.kv.k[off..off + hd];
                let s = if self.tiled_kq {
                    dot_tiled(k, q16)
                } else {
                    dot_vec(k, q16)
                };
                *wt = s * self.scale;
            }
        }
        w[len..].fill(f32::NEG_INFINITY);
        let max = w[..len].iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum = exp_sum(w, max, p);
        // ggml takes 1/sum in f64 and scales by it as f32; P is then rounded to f16 by the
        // KQV product's conversion to V's type.
        let inv = (1.0 / sum) as f32;
        if simd {
            // SAFETY: SIMD is set only after detecting AVX2, FMA and F16C.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                super::ggml_simd::scale_round_f16(&mut p[..len], inv)
            };
        } else {
            for v in p[..len].iter_mut() {
                *v = round_f16(*v * inv);
            }
        }
        *lse = max + sum.ln() as f32;

        // KQV: out[d] = Σ_t P[t]·V[t][d], accumulated by key position in ggml's lanes.
        if self.tiled_kqv {
            let mut acc = [[0.0f32; MAX_HEAD_DIM]; 8];
            for (t, &pt) in p[..len].iter().enumerate() {
                let off = self.kv.offset(t, kvh, n_kv_heads, hd);
                fma_row(&mut acc[t % 8][..hd], &self.kv.v[off..off + hd], pt);
            }
            for (d, o) in out.iter_mut().enumerate() {
                *o = hsum8(&std::array::from_fn(|l| acc[l][d]));
            }
        } else {
            let mut acc = [[0.0f32; MAX_HEAD_DIM]; PAD];
            for (t, &pt) in p[..len].iter().enumerate() {
                let off = self.kv.offset(t, kvh, n_kv_heads, hd);
                fma_row(&mut acc[t % PAD][..hd], &self.kv.v[off..off + hd], pt);
            }
            for (d, o) in out.iter_mut().enumerate() {
                *o = reduce_vec(&std::array::from_fn(|l| acc[l][d]));
            }
        }
    }
}

/// `acc[d] = v[d] · p + acc[d]`, fused.
#[inline(always)]
fn fma_row(acc: &mut [f32], v: &[f32], p: f32) {
    for (a, &x) in acc.iter_mut().zip(v) {
        *a = x.mul_add(p, *a);
    }
}

/// `ggml_vec_dot_f16` on AVX2: elements `32 i + 8 j + l` accumulate (fused) into accumulator
/// `j` lane `l`; accumulators reduce as [`reduce_vec`]; a tail of fewer than 32 is added
/// product by product in f64.
#[inline(always)]
pub(crate) fn dot_vec(x: &[f32], y: &[f32]) -> f32 {
    let n = x.len();
    let np = n - n % PAD;
    let mut acc = [0.0f32; PAD];
    for (xs, ys) in x[..np].chunks_exact(PAD).zip(y[..np].chunks_exact(PAD)) {
        for ((a, &xv), &yv) in acc.iter_mut().zip(xs).zip(ys) {
            *a = xv.mul_add(yv, *a);
        }
    }
    let mut sum = f64::from(reduce_vec(&acc));
    for (&xv, &yv) in x[np..].iter().zip(&y[np..]) {
        sum += f64::from(xv * yv);
    }
    sum as f32
}

/// `GGML_F32x8_REDUCE` of four 8-lane accumulators (`acc[8 j + l]`): accumulator 2 onto 0 and
/// 3 onto 1, then 1 onto 0; then lanes `l + 4` onto `l`, and two horizontal adds, which pair
/// (0, 1) and (2, 3) before adding the pairs.
#[inline(always)]
pub(crate) fn reduce_vec(acc: &[f32; PAD]) -> f32 {
    let z: [f32; 8] = std::array::from_fn(|l| (acc[l] + acc[16 + l]) + (acc[8 + l] + acc[24 + l]));
    let t: [f32; 4] = std::array::from_fn(|l| z[l] + z[l + 4]);
    (t[0] + t[1]) + (t[2] + t[3])
}

/// llamafile's `tinyBLAS` dot product on AVX2: element `8 i + l` accumulates (fused) into lane
/// `l`, the lanes reduce by [`hsum8`]. `x.len()` must be a multiple of 8.
#[inline(always)]
pub(crate) fn dot_tiled(x: &[f32], y: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    for (xs, ys) in x.chunks_exact(8).zip(y.chunks_exact(8)) {
        for ((a, &xv), &yv) in acc.iter_mut().zip(xs).zip(ys) {
            *a = xv.mul_add(yv, *a);
        }
    }
    hsum8(&acc)
}
