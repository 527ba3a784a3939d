//! What each rank of a tensor-parallel group holds, and what that costs in bytes.
//!
//! A group of `k` ranks splits three things, each in proportion to the ranks' threads (their
//! speed; memory is the constraint the layer split checks, see `pipeline`), by the largest
//! remainder method with every rank getting at least one unit:
//! - **KV heads**, each with its `n_heads / n_kv_heads` query heads: Q, K, V rows and the
//!   attention output's columns. The output projection's split falls between query heads, so a
//!   boundary must sit on a whole block of that matrix's format (Q4_1: 32 columns, K-quants:
//!   256): the unit is the fewest KV heads whose query columns fill whole blocks.
//! - **MLP columns** (gate/up rows, down columns), in units of the down projection's block,
//!   weighed so that each rank's layer bytes (its heads' attention plus its columns) follow
//!   its threads: the coarse head split is evened out by the fine column split.
//! - **Vocabulary rows** of the embedding and the output head, any row boundary.
//!
//! KV heads are never replicated: a group has at most `n_kv_heads` ranks (a rank without a KV
//! head would hold no attention and still pay every reduction; replication would double the
//! KV cache). Byte counts of a share are the model's part scaled by the share's fraction,
//! rounded up, so a rank's memory is never under-counted.

use std::ops::Range;

use crate::state::footprint::ModelFootprint;

/// The slices of a model one rank of a group holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Share {
    /// KV heads (with their query heads).
    pub kv_heads: Range<u32>,
    /// MLP intermediate columns.
    pub ffn: Range<u32>,
    /// Vocabulary rows of the embedding / output head.
    pub vocab: Range<u32>,
}

impl Share {
    /// The whole model: the share of a group of one (empty ranges where the footprint does not
    /// know the widths, which scale as "all").
    pub fn whole(m: &ModelFootprint) -> Self {
        Self {
            kv_heads: 0..m.n_kv_heads,
            ffn: 0..m.intermediate,
            vocab: 0..m.vocab,
        }
    }
}

/// `x × part / whole`, rounded up; all of `x` when the part is the whole (or the whole is
/// unknown, 0).
fn scale(x: u64, part: Range<u32>, whole: u32) -> u64 {
    let part = u64::from(part.end - part.start);
    let whole = u64::from(whole);
    if part >= whole {
        x
    } else {
        (u128::from(x) * u128::from(part)).div_ceil(u128::from(whole)) as u64
    }
}

/// Prefix sums of the per-layer bytes, so a stage's bytes cost O(1).
pub(super) struct Sizer<'a> {
    m: &'a ModelFootprint,
    /// Whole layers, attention parts and MLP parts: `x[b] - x[a]` is layers `[a, b)`.
    layers: Vec<u64>,
    attn: Vec<u64>,
    ffn: Vec<u64>,
    /// KV cache bytes of one layer (all its KV heads) for the policy's tokens.
    kv_layer: u64,
}

impl<'a> Sizer<'a> {
    /// A sizer of `m` with a KV cache of `kv_tokens` tokens per layer.
    pub fn new(m: &'a ModelFootprint, kv_tokens: u32) -> Self {
        let prefix = |v: &[u64]| {
            let mut p = vec![0u64; m.n_layers() + 1];
            for l in 0..m.n_layers() {
                // A footprint without the attention / MLP breakdown counts them as 0: its
                // layers are then held whole, which only a group of one does.
                p[l + 1] = p[l] + v.get(l).copied().unwrap_or(0);
            }
            p
        };
        Self {
            m,
            layers: prefix(&m.layer_bytes),
            attn: prefix(&m.attn_bytes),
            ffn: prefix(&m.ffn_bytes),
            kv_layer: m.kv_bytes_per_token_layer * u64::from(kv_tokens),
        }
    }

    /// The model.
    pub fn model(&self) -> &ModelFootprint {
        self.m
    }

    /// Bytes of layers `[a, b)` a rank with `s` holds: its parts of attention and MLP, the
    /// norms whole.
    fn layer_part(&self, s: &Share, a: usize, b: usize) -> u64 {
        let attn = self.attn[b] - self.attn[a];
        let ffn = self.ffn[b] - self.ffn[a];
        let rest = self.layers[b] - self.layers[a] - attn - ffn;
        rest + scale(attn, s.kv_heads.clone(), self.m.n_kv_heads)
            + scale(ffn, s.ffn.clone(), self.m.intermediate)
    }

    /// Bytes of the output head a last-stage rank holds: its vocabulary rows, the norm whole.
    fn head_part(&self, s: &Share) -> u64 {
        let norm = self.m.head_norm_bytes().min(self.m.head_bytes);
        scale(self.m.head_bytes - norm, s.vocab.clone(), self.m.vocab) + norm
    }

    /// Bytes of weights a rank with `s` holds on a stage over layers `[a, b)` (the embedding
    /// rows on the first stage, the head rows on the last; a tied head shares the embedding's
    /// rows when one stage holds both).
    pub fn weights(&self, s: &Share, a: usize, b: usize) -> u64 {
        let n = self.m.n_layers();
        let mut bytes = self.layer_part(s, a, b);
        let embed = scale(self.m.embed_bytes, s.vocab.clone(), self.m.vocab);
        if a == 0 {
            bytes += embed;
        }
        if b == n {
            bytes += self.head_part(s);
            if a == 0 && self.m.tied {
                bytes -= embed;
            }
        }
        bytes
    }

    /// Bytes of weights a rank streams per decoded token: its layer parts, and its head rows
    /// on the last stage (the embedding lookup reads one row: free).
    pub fn streamed(&self, s: &Share, a: usize, b: usize) -> u64 {
        let head = if b == self.m.n_layers() {
            self.head_part(s)
        } else {
            0
        };
        self.layer_part(s, a, b) + head
    }

    /// A rank's share of a batched step's arithmetic over layers `[a, b)`, in bytes: as
    /// [`Sizer::streamed`] with the head counted by its parameters
    /// ([`ModelFootprint::head_work_bytes`]). Pipeline stages are balanced with it.
    pub fn work(&self, s: &Share, a: usize, b: usize) -> u64 {
        let head = if b == self.m.n_layers() {
            let norm = self.m.head_norm_bytes().min(self.m.head_work_bytes());
            scale(
                self.m.head_work_bytes() - norm,
                s.vocab.clone(),
                self.m.vocab,
            ) + norm
        } else {
            0
        };
        self.layer_part(s, a, b) + head
    }

    /// Bytes of KV cache a rank with `s` holds for layers `[a, b)` (its KV heads only).
    pub fn kv(&self, s: &Share, a: usize, b: usize) -> u64 {
        scale(self.kv_layer, s.kv_heads.clone(), self.m.n_kv_heads) * (b - a) as u64
    }

    /// Bytes a rank needs: weights and KV cache.
    pub fn memory(&self, s: &Share, a: usize, b: usize) -> u64 {
        self.weights(s, a, b) + self.kv(s, a, b)
    }
}

/// Splits `units` into one count per weight, proportional to the weights (0 read as 1), each
/// at least 1: largest remainder, ties to the lower rank. `None` when there are fewer units
/// than weights.
pub(super) fn apportion(units: u64, weights: &[u64]) -> Option<Vec<u64>> {
    let k = weights.len();
    if k == 0 || units < k as u64 {
        return None;
    }
    let w = |i: usize| u128::from(weights[i].max(1));
    let total: u128 = (0..k).map(w).sum();
    let units_w = |i: usize| u128::from(units) * w(i);
    let mut n: Vec<u64> = (0..k)
        .map(|i| ((units_w(i) / total) as u64).max(1))
        .collect();
    // How far rank i is over its exact quota, in units of 1/total (negative: under).
    let over = |n: &[u64], i: usize| (u128::from(n[i]) * total) as i128 - units_w(i) as i128;
    let mut sum: u64 = n.iter().sum();
    while sum < units {
        // Floors lose less than one unit per rank: at most k rounds.
        let i = (0..k).min_by_key(|&i| over(&n, i)).unwrap_or(0);
        n[i] += 1;
        sum += 1;
    }
    while sum > units {
        // Only the minimum of 1 overshoots, by at most k; a rank with more than 1 gives back.
        let i = (0..k)
            .filter(|&i| n[i] > 1)
            .max_by_key(|&i| (over(&n, i), std::cmp::Reverse(i)))?;
        n[i] -= 1;
        sum -= 1;
    }
    Some(n)
}

/// Ranges over `[0, len)` in units of `step` (the last unit may be shorter), `counts[r]` units
/// for rank `r`, in rank order.
fn ranges(len: u32, step: u32, counts: &[u64]) -> Vec<Range<u32>> {
    let mut start = 0u64;
    counts
        .iter()
        .map(|&c| {
            let end = start + c;
            let r = (start * u64::from(step)).min(u64::from(len)) as u32
                ..(end * u64::from(step)).min(u64::from(len)) as u32;
            start = end;
            r
        })
        .collect()
}

/// Splits `len` elements in units of `step` over ranks weighted by `threads`.
fn split(len: u32, step: u32, threads: &[u32]) -> Option<Vec<Range<u32>>> {
    let units = u64::from(len).div_ceil(u64::from(step.max(1)));
    let weights: Vec<u64> = threads.iter().map(|&t| u64::from(t)).collect();
    Some(ranges(len, step.max(1), &apportion(units, &weights)?))
}

/// How to weigh the MLP split so that each rank's layer bytes — its KV heads' attention plus
/// its MLP columns — are in proportion to its threads: KV heads come in few, large units
/// (SmolLM2's 3 over two ranks is 2 + 1), and the MLP columns, in fine units, even the ranks
/// out. A rank whose heads already exceed its share still gets a sliver (every rank holds at
/// least one block of columns).
fn ffn_weights(m: &ModelFootprint, kv: &[Range<u32>], threads: &[u32]) -> Vec<u64> {
    let attn: u64 = m.attn_bytes.iter().sum();
    let mlp: u64 = m.ffn_bytes.iter().sum();
    let total: f64 = threads.iter().map(|&t| f64::from(t.max(1))).sum();
    let sliver = mlp as f64 / (100.0 * threads.len() as f64);
    kv.iter()
        .zip(threads)
        .map(|(heads, &t)| {
            let want = (attn + mlp) as f64 * f64::from(t.max(1)) / total;
            let have = attn as f64 * f64::from(heads.end - heads.start) / f64::from(m.n_kv_heads);
            (want - have).max(sliver).round() as u64
        })
        .collect()
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// The shares of a group whose ranks have `threads`, in rank order.
///
/// # Errors
/// A sentence naming why the model cannot be split over that many ranks: the footprint lacks
/// its shape, more ranks than KV heads, or too few aligned units of heads or MLP columns.
pub(super) fn split_group(m: &ModelFootprint, threads: &[u32]) -> Result<Vec<Share>, String> {
    let k = threads.len() as u32;
    if !m.splittable() {
        return Err(
            "the model's footprint does not give its head counts, widths and the \
                    attention / MLP bytes of its layers, which a split needs"
                .into(),
        );
    }
    if k > m.n_kv_heads {
        return Err(format!(
            "a group of {k} ranks needs at least {k} KV heads and the model has {}; KV heads \
             are not replicated, so a group has at most {} ranks",
            m.n_kv_heads, m.n_kv_heads
        ));
    }
    // Columns of the attention output per KV head: its query heads × head_dim.
    let per_kv = (m.n_heads / m.n_kv_heads) * m.head_dim;
    let block = m.attn_out_block.max(1);
    let heads_step = block / gcd(block, per_kv);
    let kv = split(m.n_kv_heads, heads_step, threads).ok_or_else(|| {
        format!(
            "no split of {} KV heads over {k} ranks puts the attention output's column \
             boundaries on its {block}-column blocks (a KV head is {} query heads × {} = \
             {per_kv} columns, so only every {heads_step} KV heads is a boundary)",
            m.n_kv_heads,
            m.n_heads / m.n_kv_heads,
            m.head_dim
        )
    })?;
    let fblock = m.ffn_down_block.max(1);
    let units = u64::from(m.intermediate).div_ceil(u64::from(fblock));
    let ffn = apportion(units, &ffn_weights(m, &kv, threads))
        .map(|u| ranges(m.intermediate, fblock, &u))
        .ok_or_else(|| {
            format!(
                "the MLP's {} columns make {} blocks of {fblock} for the down projection, fewer \
             than the {k} ranks",
                m.intermediate,
                m.intermediate.div_ceil(fblock)
            )
        })?;
    let vocab = split(m.vocab, 1, threads)
        .ok_or_else(|| format!("{} vocabulary rows are fewer than the {k} ranks", m.vocab))?;
    Ok(kv
        .into_iter()
        .zip(ffn)
        .zip(vocab)
        .map(|((kv_heads, ffn), vocab)| Share {
            kv_heads,
            ffn,
            vocab,
        })
        .collect())
}
