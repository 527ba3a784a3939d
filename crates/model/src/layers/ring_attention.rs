//! Attention on a context-parallel rank: the two modes of [`crate::context_parallel`] over the
//! queries, keys and values the attention layer projected for the rows this rank carries.
//!
//! Both modes keep the new K/V of the rank's positions in its cache and leave in `ctx`/`lse`
//! the attention of its rows over the whole sequence, every partial result computed by
//! [`flash_attention`] and merged by log-sum-exp ([`merge_into`]) in an order every rank and
//! every run share:
//! - split: the rank's own block first, then the blocks of ranks `r − 1, r − 2, …` as they
//!   arrive round the ring; within a block, sequence by sequence, chunk by chunk;
//! - replicated: each rank's partial (its cached keys, then on rank 0 the step's new keys)
//!   is all-gathered and the partials merged in rank order 0, 1, …, P − 1 — so every rank
//!   ends with the same bits.

use crate::context_parallel::{RingMode, RingStep};
use crate::error::{ModelError, Result};
use crate::kv_cache::PagedKvCache;
use crate::layers::{LayerRing, SeqStep};
use tessera_kernels::ThreadPool;
use tessera_kernels::attention::{
    AttnOut, AttnShape, AttnSpec, KvView, flash_attention, merge_into,
};

/// Buffers a ring step reuses across layers and steps.
#[derive(Debug, Default)]
pub struct RingScratch {
    /// The block this rank holds at the current hop: K rows then V rows.
    cur: Vec<f32>,
    /// The block arriving from the previous rank.
    next: Vec<f32>,
    /// One partial result's output.
    part_o: Vec<f32>,
    /// One partial result's log-sum-exp.
    part_lse: Vec<f32>,
    /// Kept K rows of one sequence (replicated mode).
    keep_k: Vec<f32>,
    /// Kept V rows of one sequence (replicated mode).
    keep_v: Vec<f32>,
    /// Every rank's partial, gathered (replicated mode).
    gathered: Vec<f32>,
}

/// The layer's projected rows, this rank's part of the step.
pub struct RingRows<'a> {
    /// Queries, (rows, n_heads, head_dim), RoPE applied.
    pub q: &'a [f32],
    /// New keys, (rows, n_kv_heads, head_dim), RoPE applied, f16-rounded.
    pub k: &'a [f32],
    /// New values, (rows, n_kv_heads, head_dim), f16-rounded.
    pub v: &'a [f32],
}

/// Where the attention of the rank's rows goes: `ctx` (rows, n_heads, head_dim) and `lse`
/// (rows, n_heads).
pub struct RingOut<'a> {
    /// The attention output.
    pub ctx: &'a mut [f32],
    /// Its log-sum-exp.
    pub lse: &'a mut [f32],
}

/// Ring attention of one layer (see the module docs): writes the K/V this rank keeps to
/// `cache` at `layer` (call [`crate::kv_cache::SeqKv::commit`] with
/// [`RingStep::kept`]'s counts once every layer is written) and the attention of its rows
/// into `out`.
///
/// # Errors
/// When the ring's exchange fails, or a peer's block or partial has the wrong size.
///
/// # Panics
/// When the cache was not reserved for the kept rows (a caller bug).
#[allow(clippy::too_many_arguments)]
pub fn ring_attend(
    ring: &mut LayerRing<'_>,
    layer: usize,
    shape: AttnShape,
    rows: RingRows<'_>,
    cache: &mut PagedKvCache,
    batch: &[SeqStep<'_>],
    out: RingOut<'_>,
    s: &mut RingScratch,
    pool: &ThreadPool,
) -> Result<()> {
    out.ctx.fill(0.0);
    out.lse.fill(f32::NEG_INFINITY);
    match ring.step.mode {
        RingMode::Split => split(ring, layer, shape, rows, cache, batch, out, s, pool),
        RingMode::Replicated => replicated(ring, layer, shape, rows, cache, batch, out, s, pool),
    }
}

/// Split mode: keep every row's K/V, then attend to each block as it comes round the ring.
#[allow(clippy::too_many_arguments)]
fn split(
    ring: &mut LayerRing<'_>,
    layer: usize,
    shape: AttnShape,
    rows: RingRows<'_>,
    cache: &mut PagedKvCache,
    batch: &[SeqStep<'_>],
    out: RingOut<'_>,
    s: &mut RingScratch,
    pool: &ThreadPool,
) -> Result<()> {
    let step = ring.step;
    let kvd = shape.n_kv_heads * shape.head_dim;
    for (b, sp) in batch.iter().zip(&step.seqs) {
        let r = sp.rows.start * kvd..sp.rows.end * kvd;
        cache.write(layer, b.seq, &rows.k[r.clone()], &rows.v[r]);
    }
    s.cur.clear();
    s.cur.extend_from_slice(rows.k);
    s.cur.extend_from_slice(rows.v);
    let (rank, ranks) = (step.rank, step.ranks);
    for hop in 0..ranks {
        let from = (rank + ranks - hop) % ranks;
        // Hand on the block before computing on it, so the wire and the kernel overlap.
        let last = hop + 1 == ranks;
        if !last {
            ring.comm.send_next(layer, &s.cur)?;
        }
        let blk = step.block_len(from) * kvd;
        if s.cur.len() != 2 * blk {
            return Err(ModelError::InvalidArgument {
                field: "ring",
                reason: format!(
                    "layer {layer}: rank {from}'s K/V block has {} values, the step's layout \
                     says {}",
                    s.cur.len(),
                    2 * blk
                ),
            });
        }
        let (k, v) = s.cur.split_at(blk);
        let mut part = Part {
            o: &mut s.part_o,
            lse: &mut s.part_lse,
        };
        attend_block(
            step,
            from,
            shape,
            rows.q,
            (k, v),
            &mut part,
            &mut *out.ctx,
            &mut *out.lse,
            pool,
        );
        if !last {
            ring.comm.recv_prev(layer, &mut s.next)?;
            std::mem::swap(&mut s.cur, &mut s.next);
        }
    }
    Ok(())
}

/// Scratch for one partial result.
struct Part<'a> {
    o: &'a mut Vec<f32>,
    lse: &'a mut Vec<f32>,
}

impl Part<'_> {
    /// Flash attention of `q` over `kv` under `spec` into the scratch, then merged into the
    /// rows `ctx`/`lse`.
    fn merge_attention(
        &mut self,
        q: &[f32],
        kv: KvView<'_>,
        spec: AttnSpec,
        ctx: &mut [f32],
        lse: &mut [f32],
        pool: &ThreadPool,
    ) {
        self.o.clear();
        self.o.resize(q.len(), 0.0);
        self.lse.clear();
        self.lse.resize(lse.len(), f32::NEG_INFINITY);
        let o = AttnOut {
            out: self.o,
            lse: self.lse,
        };
        flash_attention(q, kv, spec, o, pool);
        merge_into(ctx, lse, self.o, self.lse, spec.shape.head_dim);
    }
}

/// Merges the attention of this rank's query chunks over rank `from`'s key chunks (`k`, `v`:
/// its block) into `ctx`/`lse`. Chunks of one sequence partition its positions, so a key chunk
/// is the query chunk itself (causal), wholly before it (all visible) or wholly after it
/// (invisible, skipped).
#[allow(clippy::too_many_arguments)]
fn attend_block(
    step: &RingStep,
    from: usize,
    shape: AttnShape,
    q: &[f32],
    (k, v): (&[f32], &[f32]),
    part: &mut Part<'_>,
    ctx: &mut [f32],
    lse: &mut [f32],
    pool: &ThreadPool,
) {
    let (nh, d) = (shape.n_heads, shape.head_dim);
    let kvd = shape.n_kv_heads * d;
    let scale = 1.0 / (d as f32).sqrt();
    for sp in &step.seqs {
        let mut row = sp.rows.start;
        for qc in &sp.chunks[step.rank] {
            let (qr, lr) = (
                row * nh * d..(row + qc.len()) * nh * d,
                row * nh..(row + qc.len()) * nh,
            );
            row += qc.len();
            let mut key = sp.block_rows[from];
            for kc in &sp.chunks[from] {
                let keys = key * kvd..(key + kc.len()) * kvd;
                key += kc.len();
                if kc.start >= qc.end {
                    continue;
                }
                let spec = AttnSpec {
                    shape: AttnShape {
                        seq_q: qc.len(),
                        ..shape
                    },
                    causal: kc == qc,
                    scale,
                };
                let kv = KvView::contiguous(&k[keys.clone()], &v[keys], kc.len());
                part.merge_attention(
                    &q[qr.clone()],
                    kv,
                    spec,
                    &mut ctx[qr.clone()],
                    &mut lse[lr.clone()],
                    pool,
                );
            }
        }
    }
}

/// Replicated mode: keep the K/V of this rank's positions, attend every row to the cached keys
/// (and on rank 0 to the step's new keys), then merge every rank's partial in rank order.
#[allow(clippy::too_many_arguments)]
fn replicated(
    ring: &mut LayerRing<'_>,
    layer: usize,
    shape: AttnShape,
    rows: RingRows<'_>,
    cache: &mut PagedKvCache,
    batch: &[SeqStep<'_>],
    out: RingOut<'_>,
    s: &mut RingScratch,
    pool: &ThreadPool,
) -> Result<()> {
    let step = ring.step;
    let (nh, d) = (shape.n_heads, shape.head_dim);
    let kvd = shape.n_kv_heads * d;
    let scale = 1.0 / (d as f32).sqrt();
    for (i, (b, sp)) in batch.iter().zip(&step.seqs).enumerate() {
        let (qr, lr) = (
            sp.rows.start * nh * d..sp.rows.end * nh * d,
            sp.rows.start * nh..sp.rows.end * nh,
        );
        let kr = sp.rows.start * kvd..sp.rows.end * kvd;
        let cached = b.seq.len();
        let mut part = Part {
            o: &mut s.part_o,
            lse: &mut s.part_lse,
        };
        let seq_shape = AttnShape {
            seq_q: sp.n,
            ..shape
        };
        if cached > 0 {
            // Every cached key is older than every new query: all visible.
            let spec = AttnSpec {
                shape: seq_shape,
                causal: false,
                scale,
            };
            let kv = cache.view(layer, b.seq, cached);
            part.merge_attention(
                &rows.q[qr.clone()],
                kv,
                spec,
                &mut out.ctx[qr.clone()],
                &mut out.lse[lr.clone()],
                pool,
            );
        }
        if step.rank == 0 {
            let spec = AttnSpec {
                shape: seq_shape,
                causal: true,
                scale,
            };
            let kv = KvView::contiguous(&rows.k[kr.clone()], &rows.v[kr.clone()], sp.n);
            part.merge_attention(
                &rows.q[qr.clone()],
                kv,
                spec,
                &mut out.ctx[qr],
                &mut out.lse[lr],
                pool,
            );
        }
        s.keep_k.clear();
        s.keep_v.clear();
        for &j in step.kept(i) {
            let at = (sp.rows.start + j) * kvd..(sp.rows.start + j + 1) * kvd;
            s.keep_k.extend_from_slice(&rows.k[at.clone()]);
            s.keep_v.extend_from_slice(&rows.v[at]);
        }
        if !s.keep_k.is_empty() {
            cache.write(layer, b.seq, &s.keep_k, &s.keep_v);
        }
    }
    // Every rank's partial (ctx then lse), gathered; merged in rank order on every rank.
    s.cur.clear();
    s.cur.extend_from_slice(out.ctx);
    s.cur.extend_from_slice(out.lse);
    ring.comm.all_gather(layer, &s.cur, &mut s.gathered)?;
    let each = s.cur.len();
    if s.gathered.len() != each * step.ranks {
        return Err(ModelError::InvalidArgument {
            field: "ring",
            reason: format!(
                "layer {layer}: the ring gathered {} values, {} ranks of {each} expected",
                s.gathered.len(),
                step.ranks
            ),
        });
    }
    out.ctx.fill(0.0);
    out.lse.fill(f32::NEG_INFINITY);
    let n_ctx = out.ctx.len();
    for p in s.gathered.chunks_exact(each) {
        let (o, l) = p.split_at(n_ctx);
        merge_into(out.ctx, out.lse, o, l, d);
    }
    Ok(())
}
