//! Context parallelism: a stage's sequences spread over the ranks of a ring, each rank holding
//! the KV cache of its part only (DESIGN.md, "The shard plan": `cp_rank`).
//!
//! Every rank of a ring holds the stage's whole weights (or the same tensor slice) and runs the
//! same batches; what it holds of each sequence is a set of global positions, and RoPE and the
//! causal mask use those global positions. A step runs in one of two modes, chosen from what
//! every rank knows (the batch's global starts and token counts), so the ranks always agree:
//!
//! * **Split** — every sequence of the batch is a fresh prefill (global start 0) of at least
//!   `2P` tokens: rank `r` of `P` takes the zigzag chunks `r` and `2P − 1 − r` of each
//!   sequence ([`RingLayout::Zigzag`]), embeds and projects only those rows, and keeps their
//!   K/V. Attention is ring attention: each rank's new K/V block travels round the ring
//!   ([`RingComm::send_next`] / [`RingComm::recv_prev`], the next hop's block on the wire
//!   while the current one is computed on), and every arrival's partial result is merged
//!   into the rank's rows by log-sum-exp in arrival order. The last position of every
//!   sequence lies in chunk `2P − 1`, which rank 0 holds: rank 0 has the rows that sample.
//! * **Replicated** — anything else (decode, a later prefill chunk, a mixed batch): every rank
//!   carries all the step's rows, computes their queries, and attends to the keys it holds —
//!   every cached key is older than every new query, so visible, no mask — while rank 0 also
//!   attends to the step's new keys (causal among themselves). The partial results are
//!   all-gathered ([`RingComm::all_gather`]) and merged in rank order, so every rank gets the
//!   same bits and the residual stream stays replicated (distributed flash-decoding). Each
//!   new token's K/V is kept by rank `position mod P` only.
//!
//! A ring changes the order of attention's sums and runs the flash kernel instead of the
//! llama.cpp-order one, so its logits match the single-process engine within measured bounds,
//! not bit for bit (`tests/ring_attention.rs`).
//!
//! A ring of one is no ring: callers pass no [`RingCtx`] and get the engine's arithmetic.

use std::ops::Range;

use tessera_kernels::attention::RingLayout;

use crate::error::{ModelError, Result};
use crate::layers::SeqStep;

/// How the ranks of a ring exchange data. Every rank of a ring makes the same calls in the
/// same order (they run the same batches), so an implementation can match calls by order;
/// `layer` lets it check that they agree.
pub trait RingComm {
    /// This rank's index in the ring.
    fn rank(&self) -> usize;

    /// Ranks in the ring (at least 2).
    fn ranks(&self) -> usize;

    /// Starts handing `block` to the next rank (`rank + 1 mod P`). It may return before the
    /// block is delivered; the matching [`RingComm::recv_prev`] completes it. At most one
    /// block is in flight per rank.
    ///
    /// # Errors
    /// When the next rank cannot be reached.
    fn send_next(&mut self, layer: usize, block: &[f32]) -> Result<()>;

    /// Receives into `block` what the previous rank (`rank − 1 mod P`) passed to its
    /// [`RingComm::send_next`], and completes this rank's own pending send.
    ///
    /// # Errors
    /// When a neighbour cannot be reached or answers inconsistently.
    fn recv_prev(&mut self, layer: usize, block: &mut Vec<f32>) -> Result<()>;

    /// Every rank's `local` (the same length on every rank), concatenated in rank order into
    /// `out`, on every rank.
    ///
    /// # Errors
    /// When a peer cannot be reached or answers inconsistently.
    fn all_gather(&mut self, layer: usize, local: &[f32], out: &mut Vec<f32>) -> Result<()>;
}

/// What a step of a context-parallel rank needs besides the batch.
pub struct RingCtx<'a> {
    /// The ring's exchange.
    pub comm: &'a mut dyn RingComm,
    /// The global position of each batch sequence's first new token (the sequence's length
    /// over the whole ring before this step), in batch order.
    pub starts: &'a [usize],
}

/// How a step runs on a ring (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RingMode {
    /// Fresh prefills split in the zigzag layout; K/V blocks travel round the ring.
    Split,
    /// Every rank carries every row; partial attention results are all-gathered.
    Replicated,
}

/// One sequence's part of a ring step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeqPlan {
    /// Global position of the first new token.
    pub start: usize,
    /// New tokens over the whole ring.
    pub n: usize,
    /// This rank's rows of the step's hidden states for this sequence.
    pub rows: Range<usize>,
    /// Split mode: the global positions each rank holds of this step, by rank (the zigzag
    /// chunks); replicated mode: empty.
    pub chunks: Vec<Vec<Range<usize>>>,
    /// Split mode: where this sequence's rows start in each rank's K/V block, by rank.
    pub block_rows: Vec<usize>,
    /// The global positions of this rank's rows, in row order. Computed once here because the
    /// embedding, RoPE and every layer's K/V write read them (the decode hot path).
    positions: Vec<usize>,
    /// Indices into this rank's rows whose K/V this rank keeps.
    kept: Vec<usize>,
}

/// The layout of one step over a ring, computed identically on every rank.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RingStep {
    /// This rank.
    pub rank: usize,
    /// Ranks in the ring.
    pub ranks: usize,
    /// How the step runs.
    pub mode: RingMode,
    /// Each batch sequence's part, in batch order.
    pub seqs: Vec<SeqPlan>,
}

impl RingStep {
    /// The layout of `batch` (its token counts) starting at the global positions `starts` on
    /// rank `rank` of `ranks`.
    ///
    /// # Errors
    /// [`ModelError::InvalidArgument`] naming `ring` when `starts` does not give one start
    /// per sequence or the rank is outside the ring.
    pub fn new(batch: &[SeqStep<'_>], starts: &[usize], rank: usize, ranks: usize) -> Result<Self> {
        if starts.len() != batch.len() || rank >= ranks || ranks < 2 {
            return Err(ModelError::InvalidArgument {
                field: "ring",
                reason: format!(
                    "{} starts for {} sequences on rank {rank} of a ring of {ranks}",
                    starts.len(),
                    batch.len()
                ),
            });
        }
        let split = batch
            .iter()
            .zip(starts)
            .all(|(s, &start)| start == 0 && s.tokens.len() >= 2 * ranks);
        let mode = if split {
            RingMode::Split
        } else {
            RingMode::Replicated
        };
        let mut seqs = Vec::with_capacity(batch.len());
        let mut row = 0;
        let mut block_row = vec![0; ranks];
        for (s, &start) in batch.iter().zip(starts) {
            let n = s.tokens.len();
            let (chunks, block_rows, mine) = match mode {
                RingMode::Split => {
                    let chunks: Vec<Vec<Range<usize>>> = (0..ranks)
                        .map(|r| RingLayout::Zigzag.chunks(n, ranks, r))
                        .collect();
                    let block_rows = block_row.clone();
                    for (at, c) in block_row.iter_mut().zip(&chunks) {
                        *at += c.iter().map(Range::len).sum::<usize>();
                    }
                    let mine = chunks[rank].iter().map(Range::len).sum();
                    (chunks, block_rows, mine)
                }
                RingMode::Replicated => (Vec::new(), Vec::new(), n),
            };
            let positions: Vec<usize> = match mode {
                RingMode::Split => chunks[rank]
                    .iter()
                    .flat_map(|c| c.clone().map(|p| start + p))
                    .collect(),
                RingMode::Replicated => (start..start + n).collect(),
            };
            let kept = match mode {
                RingMode::Split => (0..positions.len()).collect(),
                RingMode::Replicated => positions
                    .iter()
                    .enumerate()
                    .filter(|(_, p)| *p % ranks == rank)
                    .map(|(j, _)| j)
                    .collect(),
            };
            seqs.push(SeqPlan {
                start,
                n,
                rows: row..row + mine,
                chunks,
                block_rows,
                positions,
                kept,
            });
            row += mine;
        }
        Ok(Self {
            rank,
            ranks,
            mode,
            seqs,
        })
    }

    /// Rows of the step's hidden states this rank carries.
    pub fn rows(&self) -> usize {
        self.seqs.last().map_or(0, |s| s.rows.end)
    }

    /// Rows of rank `rank`'s K/V block (split mode).
    pub fn block_len(&self, rank: usize) -> usize {
        self.seqs
            .iter()
            .flat_map(|s| s.chunks.get(rank))
            .flatten()
            .map(Range::len)
            .sum()
    }

    /// The global positions of this rank's rows of sequence `i`, in row order.
    pub fn positions(&self, i: usize) -> &[usize] {
        &self.seqs[i].positions
    }

    /// Of sequence `i`'s rows on this rank, the indices (into those rows) whose K/V this rank
    /// keeps: all of them in split mode, those at positions `p` with `p mod P == rank` in
    /// replicated mode.
    pub fn kept(&self, i: usize) -> &[usize] {
        &self.seqs[i].kept
    }

    /// Whether this rank holds the rows that sample (the last row of every sequence): rank 0.
    pub fn samples(&self) -> bool {
        self.rank == 0
    }

    /// Rows of the whole step over the ring (every sequence's new tokens).
    pub fn total_rows(&self) -> usize {
        self.seqs.iter().map(|s| s.n).sum()
    }

    /// The step-wide row (sequence by sequence, in position order) of each of rank `rank`'s
    /// rows, in that rank's row order.
    fn global_rows(&self, rank: usize) -> Vec<usize> {
        let mut out = Vec::new();
        let mut base = 0;
        for s in &self.seqs {
            match self.mode {
                RingMode::Split => {
                    out.extend(
                        s.chunks[rank]
                            .iter()
                            .flat_map(|c| c.clone().map(|p| base + p)),
                    );
                }
                RingMode::Replicated => out.extend(base..base + s.n),
            }
            base += s.n;
        }
        out
    }

    /// This rank's rows of `full`, the whole step's hidden states `(total_rows, hidden)`, into
    /// `x` (a stage without the embedding gets every row, as the ranks of a tensor-parallel
    /// group do, and keeps its own).
    ///
    /// # Errors
    /// [`ModelError::InvalidArgument`] naming `hidden` when `full` is not `total_rows` rows.
    pub fn pick_rows(&self, full: &[f32], hidden: usize, x: &mut Vec<f32>) -> Result<()> {
        if full.len() != self.total_rows() * hidden {
            return Err(ModelError::InvalidArgument {
                field: "hidden",
                reason: format!(
                    "{} values for {} tokens of width {hidden}",
                    full.len(),
                    self.total_rows()
                ),
            });
        }
        x.clear();
        for g in self.global_rows(self.rank) {
            x.extend_from_slice(&full[g * hidden..(g + 1) * hidden]);
        }
        Ok(())
    }

    /// Every rank's rows `x` (split mode), gathered into the whole step's hidden states
    /// `full` `(total_rows, hidden)` on every rank, so the next stage gets what a stage
    /// without a ring hands on. Ranks hold up to one row more than others per chunk, so each
    /// sends its rows padded to the largest count. `layer` names the exchange (one past the
    /// stage's last layer).
    ///
    /// # Errors
    /// When the exchange fails or gathers the wrong amount.
    pub fn gather_rows(
        &self,
        comm: &mut dyn RingComm,
        layer: usize,
        x: &[f32],
        hidden: usize,
        (local, gathered): (&mut Vec<f32>, &mut Vec<f32>),
        full: &mut Vec<f32>,
    ) -> Result<()> {
        let most = (0..self.ranks)
            .map(|r| self.block_len(r))
            .max()
            .unwrap_or(0);
        local.clear();
        local.extend_from_slice(x);
        local.resize(most * hidden, 0.0);
        comm.all_gather(layer, local, gathered)?;
        if gathered.len() != self.ranks * most * hidden {
            return Err(ModelError::InvalidArgument {
                field: "ring",
                reason: format!(
                    "the stage's hidden states gathered {} values, {} ranks of {} expected",
                    gathered.len(),
                    self.ranks,
                    most * hidden
                ),
            });
        }
        full.clear();
        full.resize(self.total_rows() * hidden, 0.0);
        for (r, rows) in gathered.chunks_exact(most * hidden).enumerate() {
            for (j, g) in self.global_rows(r).into_iter().enumerate() {
                full[g * hidden..(g + 1) * hidden]
                    .copy_from_slice(&rows[j * hidden..(j + 1) * hidden]);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv_cache::{KvCacheConfig, PagedKvCache};

    fn cache() -> PagedKvCache {
        PagedKvCache::new(KvCacheConfig {
            n_layers: 1,
            n_kv_heads: 1,
            head_dim: 2,
            block_size: 4,
            num_blocks: 4,
        })
        .expect("cache")
    }

    /// Ensures that a fresh prefill of every sequence splits in the zigzag layout (every
    /// position on exactly one rank, rank 0 holding each sequence's last position, block
    /// offsets consistent), and that anything else is replicated with K/V kept by position
    /// modulo the ring size.
    #[test]
    fn steps_split_or_replicate() {
        let c = cache();
        let (mut a, mut b) = (c.new_seq(), c.new_seq());
        let (ta, tb) = (vec![1u32; 10], vec![2u32; 7]);
        for ranks in 2..=3 {
            let batch = [
                SeqStep {
                    tokens: &ta,
                    seq: &mut a,
                    logits: true,
                },
                SeqStep {
                    tokens: &tb,
                    seq: &mut b,
                    logits: true,
                },
            ];
            let mut seen = [vec![0; 10], vec![0; 7]];
            let mut rows = 0;
            for rank in 0..ranks {
                let st = RingStep::new(&batch, &[0, 0], rank, ranks).expect("step");
                assert_eq!(st.mode, RingMode::Split);
                for (i, s) in st.seqs.iter().enumerate() {
                    for &p in st.positions(i) {
                        seen[i][p] += 1;
                    }
                    assert_eq!(st.positions(i).len(), s.rows.len());
                    assert_eq!(st.kept(i).len(), s.rows.len());
                    if rank == 0 {
                        assert_eq!(st.positions(i).last(), Some(&(s.n - 1)));
                    }
                }
                assert_eq!(st.block_len(rank), st.rows());
                assert_eq!(st.seqs[1].block_rows[rank], st.seqs[0].rows.len());
                rows += st.rows();
            }
            assert_eq!(rows, 17);
            assert!(seen.iter().flatten().all(|&k| k == 1), "{seen:?}");
            let st = RingStep::new(&batch, &[0, 5], 1, ranks).expect("step");
            assert_eq!(st.mode, RingMode::Replicated);
            assert_eq!(st.rows(), 17);
            assert_eq!(st.positions(1), (5..12).collect::<Vec<_>>().as_slice());
            let kept: Vec<usize> = st.kept(1).iter().map(|&j| 5 + j).collect();
            assert!(kept.iter().all(|p| p % ranks == 1) && !kept.is_empty());
        }
        let batch = [SeqStep {
            tokens: &tb,
            seq: &mut a,
            logits: true,
        }];
        // 7 tokens over a ring of 4 is fewer than 8 chunks: replicated.
        let st = RingStep::new(&batch, &[0], 0, 4).expect("step");
        assert_eq!(st.mode, RingMode::Replicated);
        assert!(RingStep::new(&batch, &[0, 1], 0, 2).is_err());
        assert!(RingStep::new(&batch, &[0], 2, 2).is_err());
    }
}
