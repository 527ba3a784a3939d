//! The layer split: contiguous layer ranges over an ordered list of units (single workers, or
//! tensor-parallel groups), by a dynamic program.
//!
//! It minimises the slowest stage's time per token, then the number of stages (fewer hops),
//! subject to every rank of a stage holding its weights and the KV cache of its layers. Units
//! keep their order (the cluster state's id order); one that would not make the slowest stage
//! faster is left out. A DP over (unit, layer) finds the optimum of that order exactly; the
//! result is deterministic. The time is a parameter: the exact `bytes / threads` fraction for
//! pipeline-only plans (today's planner), the cost model's seconds for meshes.

use std::cmp::Ordering;

use super::PlanPolicy;
use super::split::{Share, Sizer};
use crate::state::footprint::ModelFootprint;

/// A stage's time per token as a fraction `bytes / threads`, compared exactly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Fraction {
    /// Weight bytes streamed per token.
    pub bytes: u64,
    /// Threads streaming them.
    pub threads: u64,
}

impl Fraction {
    /// No time at all.
    pub const ZERO: Self = Self {
        bytes: 0,
        threads: 1,
    };
}

impl Ord for Fraction {
    fn cmp(&self, other: &Self) -> Ordering {
        (u128::from(self.bytes) * u128::from(other.threads))
            .cmp(&(u128::from(other.bytes) * u128::from(self.threads)))
    }
}

impl PartialOrd for Fraction {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// The best way found to cover layers `[0, p)`: slowest stage, stage count, and where the last
/// stage starts with which unit (for the walk back).
#[derive(Clone, Copy, Debug)]
struct Best<C> {
    slowest: C,
    stages: usize,
    from: Option<(usize, usize)>,
}

/// One stage of a split: unit `unit` runs layers `[start, end)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Span {
    /// Index of the unit.
    pub unit: usize,
    /// First layer.
    pub start: usize,
    /// One past the last layer.
    pub end: usize,
}

/// Splits `n` layers over `units` units in order: `fits(u, a, b)` says whether unit `u` can
/// hold layers `[a, b)` (it must stay false for every later `b` once false: more layers never
/// need less memory), `time(u, a, b)` is its time per token there.
///
/// Returns the stages in pipeline order, or `None` when no split fits.
pub(super) fn split_layers<C: Ord + Copy>(
    n: usize,
    units: usize,
    zero: C,
    fits: impl Fn(usize, usize, usize) -> bool,
    time: impl Fn(usize, usize, usize) -> C,
) -> Option<Vec<Span>> {
    // best[p]: covering [0, p) with the units considered so far.
    let mut best: Vec<Option<Best<C>>> = vec![None; n + 1];
    best[0] = Some(Best {
        slowest: zero,
        stages: 0,
        from: None,
    });
    // Per unit, a snapshot of `best` before it, so the walk back can find earlier stages.
    let mut history: Vec<Vec<Option<Best<C>>>> = Vec::with_capacity(units);
    for u in 0..units {
        let before = best.clone();
        for a in 0..n {
            let Some(prev) = before[a] else { continue };
            for b in a + 1..=n {
                if !fits(u, a, b) {
                    // Later ends only add layers: nothing past here fits either.
                    break;
                }
                let cand = (prev.slowest.max(time(u, a, b)), prev.stages + 1);
                let better = best[b]
                    .as_ref()
                    .is_none_or(|old| cand < (old.slowest, old.stages));
                if better {
                    best[b] = Some(Best {
                        slowest: cand.0,
                        stages: cand.1,
                        from: Some((u, a)),
                    });
                }
            }
        }
        history.push(before);
    }
    best[n]?;
    // Walk back: the entry at p was set by unit u starting at a; the entry before it is in
    // the snapshot taken before unit u.
    let mut spans = Vec::new();
    let mut p = n;
    let mut table = &best;
    while p > 0 {
        let (unit, start) = table[p]?.from?;
        spans.push(Span {
            unit,
            start,
            end: p,
        });
        p = start;
        table = &history[unit];
    }
    spans.reverse();
    Some(spans)
}

/// A sentence naming what does not fit when no pipeline of single workers (`memory`, in
/// order) holds the model.
pub(super) fn explain(sizer: &Sizer<'_>, memory: &[u64], policy: &PlanPolicy) -> String {
    let m: &ModelFootprint = sizer.model();
    let whole = Share::whole(m);
    let n = m.n_layers();
    let largest = memory.iter().copied().max().unwrap_or(0);
    let total: u64 = memory.iter().sum();
    let need_all = sizer.memory(&whole, 0, n);
    let kv = format!("KV cache for {} tokens", policy.kv_tokens);
    let first = sizer.memory(&whole, 0, 1);
    let last = sizer.memory(&whole, n - 1, n);
    let layer = |l: usize| m.layer_bytes[l] + sizer.kv(&whole, l, l + 1);
    if total < need_all {
        format!(
            "the model needs {need_all} bytes (weights {} + {kv}) but the {} workers offer \
             {total} bytes in all",
            m.weight_bytes(),
            memory.len()
        )
    } else if first > largest && n > 1 {
        format!(
            "the first stage (embedding {} bytes + layer 0 + its {kv}) needs {first} bytes, \
             more than the largest worker's {largest}",
            m.embed_bytes
        )
    } else if last > largest && n > 1 {
        format!(
            "the last stage (output head {} bytes + layer {} + its {kv}) needs {last} bytes, \
             more than the largest worker's {largest}",
            m.head_bytes,
            n - 1
        )
    } else if let Some(l) = (0..n).find(|&l| layer(l) > largest) {
        format!(
            "layer {l} with its {kv} needs {} bytes, more than the largest worker's {largest}",
            layer(l)
        )
    } else {
        format!(
            "no contiguous split of {n} layers ({need_all} bytes with the {kv}) fits the \
             workers' memory ({total} bytes in all, split {memory:?})"
        )
    }
}
