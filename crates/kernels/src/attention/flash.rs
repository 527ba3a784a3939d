//! The FlashAttention-style CPU kernel: tiled over keys with an online softmax.
//!
//! Work is cut into tasks of up to [`VECS_PER_TASK`] query vectors (rows × heads) that share one
//! KV head, so a key tile loaded for one vector is reused from cache by the others (GQA heads of
//! the same row, and neighbouring rows). Each task walks the keys in tiles — a tile is a run of at
//! most [`TILE_KEYS`] keys inside one block of the view — keeping for every vector a running
//! max, a running sum and an f32 accumulator on the stack; tiles no vector can see under the
//! causal mask are never visited. When there are too few tasks to occupy the pool (decode:
//! one row, a handful of KV heads) the keys are also split into ranges whose partial results
//! are merged by log-sum-exp afterwards (flash-decoding). Nothing is heap-allocated per call.

use super::merge::merge_into;
use super::simd::Isa;
use super::{AttnOut, AttnShape, AttnSpec, KvView};
use crate::ThreadPool;

/// Largest head dimension the kernel supports (its accumulators are fixed-size stack arrays).
pub const MAX_HEAD_DIM: usize = 256;

/// Keys per tile: scores of one tile live in a stack array of this size.
const TILE_KEYS: usize = 64;

/// Query vectors (row, head) sharing one KV head that one task processes together.
const VECS_PER_TASK: usize = 8;

/// Tasks per pool thread the planner aims for, so uneven tasks (causal rows) still balance.
const TASKS_PER_THREAD: usize = 4;

/// The thread count key splits are planned for, whatever the pool's size: the split changes
/// rounding, and a pipeline stage must compute exactly what the single-process engine does even
/// when the two run with different thread counts. Eight keeps a 2-16 thread pool busy on decode.
pub(crate) const SPLIT_PLAN_THREADS: usize = 8;

/// A key split shorter than this costs more in merging and scheduling than it saves.
const MIN_KEYS_PER_SPLIT: usize = 128;

/// Stack floats for the partial results of key splits 1.. (split 0 writes straight to `out`):
/// 64 KiB, which bounds `(splits - 1) * seq_q * n_heads * (head_dim + 1)`.
const PARTIAL_FLOATS: usize = 16 * 1024;

/// Attention of `q` over the keys of `kv`, FlashAttention style.
///
/// Computes `out` `(seq_q, n_heads, head_dim)` and `lse` `(seq_q, n_heads)` (natural-log
/// log-sum-exp of the scaled scores) for `q` `(seq_q, n_heads, head_dim)` over the `kv.len` keys,
/// with scores `scale · q·k`. Causal masking is aligned bottom-right: query `i` sees key `j` iff
/// `j <= i + kv.len - seq_q`. GQA: query head `h` uses KV head `h / (n_heads / n_kv_heads)`.
/// A row with no visible key (causal with `seq_q > kv.len`, or `kv.len == 0`) gets output 0
/// and lse `-inf`. Accumulation is f32; the result does not depend on the pool size (key splits
/// for decode are planned for a fixed thread count, and are within rounding of the unsplit
/// result).
///
/// # Panics
/// On inconsistent arguments, which are caller bugs: `n_kv_heads == 0`, `n_heads` not a
/// multiple of `n_kv_heads`, `head_dim` outside `1..=MAX_HEAD_DIM`, `q`, `out` or `lse` not of
/// the lengths above, or a view whose block table or pools do not cover `kv.len` tokens
/// (see [`KvView::validate`]).
pub fn flash_attention(
    q: &[f32],
    kv: KvView<'_>,
    spec: AttnSpec,
    o: AttnOut<'_>,
    pool: &ThreadPool,
) {
    flash_attention_with(Isa::detect(), None, q, kv, spec, o, pool);
}

/// [`flash_attention`] without key splits: every row is computed over its keys in one pass,
/// so a row's result does not depend on the other rows of the call — a long prompt gives the
/// same bits however it is cut into prefill chunks (with or without a cached prefix). For
/// calls with many rows (prefill), where splits would not be planned anyway.
///
/// # Panics
/// As [`flash_attention`].
pub fn flash_attention_unsplit(
    q: &[f32],
    kv: KvView<'_>,
    spec: AttnSpec,
    o: AttnOut<'_>,
    pool: &ThreadPool,
) {
    flash_attention_with(Isa::detect(), Some(1), q, kv, spec, o, pool);
}

/// [`flash_attention`] with the instruction set and, optionally, the number of key splits
/// chosen by the caller (tests use this to exercise every path on any machine). A forced split
/// count is capped by the partial-result storage.
pub(crate) fn flash_attention_with(
    isa: Isa,
    splits: Option<usize>,
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
    let AttnShape { seq_q, n_heads, .. } = shape;
    shape.check("flash_attention", q, out, lse, &kv);
    let rows = seq_q * n_heads;
    if rows == 0 {
        return;
    }

    let job = Job {
        isa,
        q,
        kv,
        shape,
        causal,
        scale,
        n_splits: 1,
    };
    let n_splits = job.plan_splits(SPLIT_PLAN_THREADS, splits);
    if n_splits == 1 {
        job.run(out, lse, None, pool);
    } else {
        run_split(Job { n_splits, ..job }, out, lse, pool);
    }
}

/// Flash-decoding: split 0 goes to `out`, splits 1.. to a stack buffer, then merged in order so
/// the result is deterministic. Kept out of line so the common path has a small frame.
#[inline(never)]
fn run_split(job: Job<'_>, out: &mut [f32], lse: &mut [f32], pool: &ThreadPool) {
    let rows = lse.len();
    let hd = job.shape.head_dim;
    let extra = job.n_splits - 1;
    let mut partial = [0.0f32; PARTIAL_FLOATS];
    let (part_o, rest) = partial.split_at_mut(extra * rows * hd);
    let part_lse = &mut rest[..extra * rows];
    job.run(out, lse, Some((&mut *part_o, &mut *part_lse)), pool);
    for (po, pl) in part_o
        .chunks_exact(rows * hd)
        .zip(part_lse.chunks_exact(rows))
    {
        merge_into(out, lse, po, pl, hd);
    }
}

/// One validated attention call.
#[derive(Clone, Copy)]
struct Job<'a> {
    isa: Isa,
    q: &'a [f32],
    kv: KvView<'a>,
    shape: AttnShape,
    causal: bool,
    scale: f32,
    n_splits: usize,
}

impl Job<'_> {
    /// Query vectors of one KV head, flattened as `row * group + head_in_group`.
    fn vecs_per_kv_head(&self) -> usize {
        self.shape.seq_q * self.shape.group()
    }

    /// Tasks per key split.
    fn tasks_per_split(&self) -> usize {
        self.vecs_per_kv_head().div_ceil(VECS_PER_TASK) * self.shape.n_kv_heads
    }

    /// How many key ranges to split into: enough tasks to keep `threads` busy, no split shorter
    /// than [`MIN_KEYS_PER_SPLIT`], and partials that fit [`PARTIAL_FLOATS`].
    fn plan_splits(&self, threads: usize, forced: Option<usize>) -> usize {
        let per_split = self.shape.seq_q * self.shape.n_heads * (self.shape.head_dim + 1);
        let storage_cap = 1 + PARTIAL_FLOATS / per_split;
        let wanted = match forced {
            Some(n) => n,
            None => {
                let base = self.tasks_per_split();
                let target = threads * TASKS_PER_THREAD;
                if threads <= 1 || base >= target {
                    1
                } else {
                    target.div_ceil(base).min(self.kv.len / MIN_KEYS_PER_SPLIT)
                }
            }
        };
        wanted.clamp(1, storage_cap)
    }

    /// Runs every task. Split 0 writes `out`/`lse`; split `s >= 1` writes block `s - 1` of
    /// `partial` (outputs first, then lses, each laid out like `out`/`lse`).
    fn run(
        &self,
        out: &mut [f32],
        lse: &mut [f32],
        partial: Option<(&mut [f32], &mut [f32])>,
        pool: &ThreadPool,
    ) {
        let out = Shared::new(out);
        let lse = Shared::new(lse);
        let (part_o, part_lse) = match partial {
            Some((o, l)) => (Shared::new(o), Shared::new(l)),
            None => (Shared::new(&mut []), Shared::new(&mut [])),
        };
        let per_split = self.tasks_per_split();
        pool.for_each(per_split * self.n_splits, |task| {
            let split = task / per_split;
            let (o, l) = if split == 0 {
                (&out, &lse)
            } else {
                (&part_o, &part_lse)
            };
            // SAFETY: tasks own disjoint (split, row, head) sets, so their writes never overlap,
            // and `out`, `lse` and the partials outlive `for_each`.
            unsafe { self.task(task % per_split, split, o, l) };
        });
    }

    /// Key range `[start, end)` of split `s`.
    fn split_range(&self, s: usize) -> (usize, usize) {
        let len = self.kv.len;
        (s * len / self.n_splits, (s + 1) * len / self.n_splits)
    }

    /// One task: a chunk of query vectors of one KV head over the keys of one split.
    ///
    /// # Safety
    /// No other live reference may touch this task's rows of `out`/`lse` (block `split - 1`
    /// when `split >= 1`).
    unsafe fn task(&self, task: usize, split: usize, out: &Shared<'_>, lse: &Shared<'_>) {
        let AttnShape {
            n_heads,
            n_kv_heads,
            head_dim: hd,
            ..
        } = self.shape;
        let group = self.shape.group();
        let chunks = self.vecs_per_kv_head().div_ceil(VECS_PER_TASK);
        let kvh = task / chunks;
        let v0 = (task % chunks) * VECS_PER_TASK;
        let n_vec = VECS_PER_TASK.min(self.vecs_per_kv_head() - v0);
        let (k_start, k_end) = self.split_range(split);
        let stride = n_kv_heads * hd;

        // Per vector: q offset, key end under the mask, running max, running sum, accumulator.
        let mut q_off = [0usize; VECS_PER_TASK];
        let mut end = [0usize; VECS_PER_TASK];
        let mut max = [f32::NEG_INFINITY; VECS_PER_TASK];
        let mut sum = [0.0f32; VECS_PER_TASK];
        let mut acc = [[0.0f32; MAX_HEAD_DIM]; VECS_PER_TASK];
        let mut scores = [0.0f32; TILE_KEYS];
        for x in 0..n_vec {
            let (i, g) = ((v0 + x) / group, (v0 + x) % group);
            q_off[x] = (i * n_heads + kvh * group + g) * hd;
            let visible = if self.causal {
                self.shape.causal_limit(i, self.kv.len)
            } else {
                self.kv.len
            };
            end[x] = visible.min(k_end);
        }
        // Rows grow with the vector index, so the last vector sees the most keys; tiles past
        // its limit are fully masked for the whole task.
        let task_end = end[..n_vec].iter().copied().max().unwrap_or(0);

        let mut t = k_start;
        while t < task_end {
            let bs = self.kv.block_size;
            let n = (bs - t % bs).min(TILE_KEYS).min(task_end - t);
            let base = self.kv.offset(t, kvh, n_kv_heads, hd);
            let (k_tile, v_tile) = (&self.kv.k[base..], &self.kv.v[base..]);
            for x in 0..n_vec {
                let nv = end[x].saturating_sub(t).min(n);
                if nv == 0 {
                    continue;
                }
                let s = &mut scores[..nv];
                self.isa
                    .scores(&self.q[q_off[x]..][..hd], k_tile, stride, self.scale, s);
                let tile_max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let acc_x = &mut acc[x][..hd];
                if tile_max > max[x] {
                    if max[x] != f32::NEG_INFINITY {
                        let corr = (max[x] - tile_max).exp();
                        sum[x] *= corr;
                        acc_x.iter_mut().for_each(|a| *a *= corr);
                    }
                    max[x] = tile_max;
                }
                sum[x] += self.isa.exp_sub(s, max[x]);
                self.isa.accumulate(acc_x, s, v_tile, stride);
            }
            t += n;
        }

        let rows = self.shape.seq_q * n_heads;
        let block = split.saturating_sub(1);
        for x in 0..n_vec {
            let row = q_off[x] / hd;
            // SAFETY: (split, row) belongs to this task only (caller contract).
            let (o, l) = unsafe {
                (
                    out.slice((block * rows + row) * hd, hd),
                    lse.slice(block * rows + row, 1),
                )
            };
            if sum[x] == 0.0 {
                o.fill(0.0);
                l[0] = f32::NEG_INFINITY;
            } else {
                let total = sum[x];
                o.iter_mut()
                    .zip(&acc[x][..hd])
                    .for_each(|(o, a)| *o = a / total);
                l[0] = max[x] + sum[x].ln();
            }
        }
    }
}

/// A mutable buffer written by many tasks at once, each in its own disjoint ranges.
pub(super) struct Shared<'a> {
    ptr: *mut f32,
    len: usize,
    _buf: std::marker::PhantomData<&'a mut [f32]>,
}

// SAFETY: `Shared` only hands out ranges through the unsafe `slice`, whose callers guarantee
// that concurrent ranges are disjoint; f32 is Send.
unsafe impl Send for Shared<'_> {}
// SAFETY: as above.
unsafe impl Sync for Shared<'_> {}

impl<'a> Shared<'a> {
    pub(super) fn new(buf: &'a mut [f32]) -> Self {
        Self {
            ptr: buf.as_mut_ptr(),
            len: buf.len(),
            _buf: std::marker::PhantomData,
        }
    }

    /// `len` floats from `start`.
    ///
    /// # Safety
    /// No other live reference may overlap the range while the returned slice lives.
    ///
    /// # Panics
    /// When the range is out of bounds.
    #[allow(clippy::mut_from_ref)]
    pub(super) unsafe fn slice(&self, start: usize, len: usize) -> &mut [f32] {
        assert!(
            start + len <= self.len,
            "attention output range out of bounds"
        );
        // SAFETY: in bounds (checked), exclusive by the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(start), len) }
    }
}

/// The split count the planner picks for `kv`/`shape` on a pool of `threads` threads.
#[cfg(test)]
pub(crate) fn plan_for_tests(kv: KvView<'_>, shape: AttnShape, threads: usize) -> usize {
    let job = Job {
        isa: Isa::Scalar,
        q: &[],
        kv,
        shape,
        causal: true,
        scale: 1.0,
        n_splits: 1,
    };
    job.plan_splits(threads, None)
}
