//! Context parallelism's arithmetic: how a sequence's positions are laid out over the ranks of
//! a ring, and ring attention over that layout — each rank's queries attending to every rank's
//! keys as the key/value blocks come round the ring, the partial results merged by
//! log-sum-exp ([`merge_into`]).
//!
//! The distributed ring (ranks on different workers, blocks on the wire) runs exactly these
//! per-block calls in exactly this order; here the ranks are simulated in one process over the
//! whole sequence's arrays, so the kernel, the causal handling of non-contiguous slices and the
//! merge are checked against the f64 reference for every ring size and layout before any byte
//! travels.
//!
//! Layouts (DESIGN.md, "Numerics"): the sequence is cut into `2P` (zigzag) or `P`
//! (contiguous) near-equal chunks. Zigzag rank `r` of `P` holds chunks `r` and `2P − 1 − r`,
//! which balances the causal mask's work: every rank holds one early and one late chunk.
//! Positions stay global (RoPE and the mask use them), so chunks of one partition never
//! overlap partially: a key chunk is the query chunk itself (causal), wholly before it (all
//! visible) or wholly after it (invisible: the empty part `(0, −inf)`, merged as a no-op).

use std::ops::Range;

use super::merge::merge_into;
use super::{AttnOut, AttnShape, AttnSpec, KvView, flash_attention};
use crate::ThreadPool;

/// How a sequence's positions are spread over the ranks of a ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RingLayout {
    /// Rank `r` holds the `r`-th of `P` contiguous chunks (unbalanced under the causal mask:
    /// the last rank does most of the work).
    Contiguous,
    /// Rank `r` holds chunks `r` and `2P − 1 − r` of `2P` (balanced under the causal mask).
    Zigzag,
}

impl RingLayout {
    /// The global position ranges rank `rank` of `ranks` holds, in increasing order; empty
    /// ranges are left out (a sequence shorter than the chunk count leaves some ranks with
    /// fewer positions, or none).
    ///
    /// # Panics
    /// When `ranks` is 0 or `rank >= ranks` (a caller bug).
    pub fn chunks(self, len: usize, ranks: usize, rank: usize) -> Vec<Range<usize>> {
        assert!(
            rank < ranks,
            "RingLayout::chunks: rank {rank} of a ring of {ranks}"
        );
        let picked = match self {
            Self::Contiguous => vec![piece(len, ranks, rank)],
            Self::Zigzag => vec![
                piece(len, 2 * ranks, rank),
                piece(len, 2 * ranks, 2 * ranks - 1 - rank),
            ],
        };
        picked.into_iter().filter(|c| !c.is_empty()).collect()
    }

    /// The rank holding global position `pos` of a sequence of `len` positions.
    ///
    /// # Panics
    /// When `ranks` is 0 or `pos >= len`.
    pub fn owner(self, len: usize, ranks: usize, pos: usize) -> usize {
        assert!(pos < len, "RingLayout::owner: position {pos} of {len}");
        (0..ranks)
            .find(|&r| self.chunks(len, ranks, r).iter().any(|c| c.contains(&pos)))
            .unwrap_or(ranks - 1)
    }
}

/// A ring of ranks and the layout of a sequence over it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ring {
    /// How positions are spread.
    pub layout: RingLayout,
    /// Ranks in the ring, at least 1.
    pub ranks: usize,
}

/// The `i`-th of `n` near-equal contiguous pieces of `0..len` (the first `len % n` one longer).
fn piece(len: usize, n: usize, i: usize) -> Range<usize> {
    let (base, extra) = (len / n, len % n);
    let start = i * base + i.min(extra);
    start..start + base + usize::from(i < extra)
}

/// Ring attention of a whole sequence over itself (a prefill), causal, on the simulated ranks
/// of `ring`: for every rank, its query chunks attend to the key chunks of rank
/// `r, r − 1, …` (mod `ranks`, the order blocks arrive round the ring), each visible block
/// pair one [`flash_attention`] call, merged into the rank's rows by log-sum-exp in arrival
/// order. `q` is `(len, n_heads, head_dim)`, `k`/`v` `(len, n_kv_heads, head_dim)`; `out` and
/// `lse` as [`flash_attention`]'s, at global positions.
///
/// # Panics
/// On inconsistent lengths or shapes (caller bugs, as [`flash_attention`]), or a ring of 0
/// ranks.
#[allow(clippy::too_many_arguments)]
pub fn ring_attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    shape: AttnShape,
    scale: f32,
    ring: Ring,
    out: AttnOut<'_>,
    pool: &ThreadPool,
) {
    let Ring { layout, ranks } = ring;
    let len = shape.seq_q;
    let (nh, d) = (shape.n_heads, shape.head_dim);
    let (out, lse) = begin("ring_attention", q, k, v, len, shape, ranks, out);
    let mut part = Part::default();
    for rank in 0..ranks {
        let mine = layout.chunks(len, ranks, rank);
        for step in 0..ranks {
            let from = (rank + ranks - step) % ranks;
            for kc in layout.chunks(len, ranks, from) {
                for qc in &mine {
                    let (o_rows, l_rows) = (
                        qc.start * nh * d..qc.end * nh * d,
                        qc.start * nh..qc.end * nh,
                    );
                    // Chunks of one partition: the same (causal), wholly before (all visible),
                    // or wholly after: invisible, its part the empty (0, -inf), merged like any
                    // other (it leaves the rows as they were, bit for bit).
                    let spec = AttnSpec {
                        shape: AttnShape {
                            seq_q: qc.len(),
                            ..shape
                        },
                        causal: kc == *qc,
                        scale,
                    };
                    let visible = kc.start < qc.end;
                    part.attend(&q[o_rows.clone()], k, v, &kc, spec, visible, pool);
                    merge_into(&mut out[o_rows], &mut lse[l_rows], &part.o, &part.lse, d);
                }
            }
        }
    }
}

/// Checks a ring call's arguments (`len` whole-sequence keys and values, `q` and `out` for
/// `shape`, at least one rank) and empties `out` for the merges: output 0, lse `-inf`.
#[allow(clippy::too_many_arguments)]
fn begin<'o>(
    kernel: &str,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    len: usize,
    shape: AttnShape,
    ranks: usize,
    out: AttnOut<'o>,
) -> (&'o mut [f32], &'o mut [f32]) {
    assert!(ranks > 0, "{kernel}: a ring of 0 ranks");
    let (nkv, d) = (shape.n_kv_heads, shape.head_dim);
    assert_eq!(
        k.len(),
        len * nkv * d,
        "{kernel}: k is not (len, n_kv_heads, head_dim)"
    );
    assert_eq!(v.len(), k.len(), "{kernel}: v and k differ in length");
    shape.check(kernel, q, out.out, out.lse, &KvView::contiguous(k, v, len));
    let AttnOut { out, lse } = out;
    out.fill(0.0);
    lse.fill(f32::NEG_INFINITY);
    (out, lse)
}

/// One block's partial result: scratch reused across blocks.
#[derive(Default)]
struct Part {
    o: Vec<f32>,
    lse: Vec<f32>,
}

impl Part {
    /// The part of the query rows `q` over the key positions `kc` of the whole-sequence `k`
    /// and `v` under `spec`: flash attention when `visible`, else the empty `(0, −inf)`.
    #[allow(clippy::too_many_arguments)]
    fn attend(
        &mut self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        kc: &Range<usize>,
        spec: AttnSpec,
        visible: bool,
        pool: &ThreadPool,
    ) {
        let AttnShape {
            seq_q,
            n_heads,
            n_kv_heads,
            head_dim,
        } = spec.shape;
        let rows = seq_q * n_heads;
        self.o.clear();
        self.o.resize(rows * head_dim, 0.0);
        self.lse.clear();
        self.lse.resize(rows, f32::NEG_INFINITY);
        if !visible {
            return;
        }
        let span = kc.start * n_kv_heads * head_dim..kc.end * n_kv_heads * head_dim;
        let kv = KvView::contiguous(&k[span.clone()], &v[span], kc.len());
        let out = AttnOut {
            out: &mut self.o,
            lse: &mut self.lse,
        };
        flash_attention(q, kv, spec, out, pool);
    }
}

/// Distributed flash-decoding on the simulated ranks of `ring`: the query `q` `(1, n_heads,
/// head_dim)` of the newest position (which sees every key) attends to each rank's key chunks
/// of the `len` cached positions, and the partials are merged by log-sum-exp in rank order —
/// what every rank of a ring computes for one decode step. `out`/`lse` as
/// [`flash_attention`]'s for one row.
///
/// # Panics
/// On inconsistent lengths or shapes, or a ring of 0 ranks.
#[allow(clippy::too_many_arguments)]
pub fn ring_decode(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    len: usize,
    shape: AttnShape,
    scale: f32,
    ring: Ring,
    out: AttnOut<'_>,
    pool: &ThreadPool,
) {
    let Ring { layout, ranks } = ring;
    assert_eq!(shape.seq_q, 1, "ring_decode: one query row");
    let d = shape.head_dim;
    let (out, lse) = begin("ring_decode", q, k, v, len, shape, ranks, out);
    let mut part = Part::default();
    let spec = AttnSpec {
        shape,
        causal: false,
        scale,
    };
    for rank in 0..ranks {
        for kc in layout.chunks(len, ranks, rank) {
            part.attend(q, k, v, &kc, spec, true, pool);
            merge_into(out, lse, &part.o, &part.lse, d);
        }
    }
}

#[cfg(test)]
#[path = "ring_tests.rs"]
mod tests;
