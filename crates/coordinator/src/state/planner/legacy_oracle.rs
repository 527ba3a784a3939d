//! The planner as it was before tensor parallelism, kept verbatim (but for the fields added to
//! `PlanStage`, and the head timed by [`ModelFootprint::head_work_bytes`] since pipeline
//! stages are balanced by arithmetic) as the oracle `Fixed(1)` must equal.

use std::cmp::Ordering;

use super::{Plan, PlanError, PlanPolicy, PlanStage, WorkerCapacity};
use crate::state::footprint::ModelFootprint;

/// A stage's time per token as a fraction `bytes / threads`, compared exactly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Time {
    bytes: u64,
    threads: u64,
}

impl Time {
    const ZERO: Self = Self {
        bytes: 0,
        threads: 1,
    };
}

impl Ord for Time {
    fn cmp(&self, other: &Self) -> Ordering {
        (u128::from(self.bytes) * u128::from(other.threads))
            .cmp(&(u128::from(other.bytes) * u128::from(self.threads)))
    }
}

impl PartialOrd for Time {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// The best way found to cover layers `[0, p)`: slowest stage, stage count, and where the last
/// stage starts with which worker (for the walk back).
#[derive(Clone, Copy, Debug)]
struct Best {
    slowest: Time,
    stages: usize,
    from: Option<(usize, usize)>,
}

fn better(a: (Time, usize), b: Option<&Best>) -> bool {
    match b {
        None => true,
        Some(b) => a < (b.slowest, b.stages),
    }
}

/// The memory a stage over `range` needs.
fn stage_memory(m: &ModelFootprint, prefix: &[u64], kv_layer: u64, a: usize, b: usize) -> u64 {
    let n = m.n_layers();
    let mut bytes = prefix[b] - prefix[a] + kv_layer * (b - a) as u64;
    if a == 0 {
        bytes += m.embed_bytes;
    }
    if b == n {
        bytes += m.head_bytes;
        if a == 0 && m.tied {
            bytes -= m.embed_bytes;
        }
    }
    bytes
}

/// Plans `model` over `workers` (in the given order) for `policy`.
///
/// # Errors
/// [`PlanError::NoWorkers`], [`PlanError::NoLayers`], or [`PlanError::DoesNotFit`] saying
/// which part of the model does not fit which memory.
pub(super) fn plan(
    model: &ModelFootprint,
    workers: &[WorkerCapacity],
    policy: &PlanPolicy,
) -> Result<Plan, PlanError> {
    let n = model.n_layers();
    if n == 0 {
        return Err(PlanError::NoLayers);
    }
    if workers.is_empty() {
        return Err(PlanError::NoWorkers);
    }
    let kv_layer = model.kv_bytes_per_token_layer * u64::from(policy.kv_tokens);
    let mut prefix = vec![0u64; n + 1];
    for (l, b) in model.layer_bytes.iter().enumerate() {
        prefix[l + 1] = prefix[l] + b;
    }
    let compute = |a: usize, b: usize| {
        prefix[b] - prefix[a] + if b == n { model.head_work_bytes() } else { 0 }
    };
    // best[p]: covering [0, p) with the workers considered so far.
    let mut best: Vec<Option<Best>> = vec![None; n + 1];
    best[0] = Some(Best {
        slowest: Time::ZERO,
        stages: 0,
        from: None,
    });
    // Per worker, a snapshot of `best` before it, so the walk back can find earlier stages.
    let mut history: Vec<Vec<Option<Best>>> = Vec::with_capacity(workers.len());
    for (w, worker) in workers.iter().enumerate() {
        let threads = u64::from(worker.threads.max(1));
        let before = best.clone();
        for a in 0..n {
            let Some(prev) = before[a] else { continue };
            for b in a + 1..=n {
                if stage_memory(model, &prefix, kv_layer, a, b) > worker.memory_bytes {
                    // Later ends only add layers: nothing past here fits either.
                    break;
                }
                let t = Time {
                    bytes: compute(a, b),
                    threads,
                };
                let cand = (prev.slowest.max(t), prev.stages + 1);
                if better(cand, best[b].as_ref()) {
                    best[b] = Some(Best {
                        slowest: cand.0,
                        stages: cand.1,
                        from: Some((w, a)),
                    });
                }
            }
        }
        history.push(before);
    }
    if best[n].is_none() {
        return Err(PlanError::DoesNotFit(explain(
            model, workers, &prefix, kv_layer, policy,
        )));
    }
    // Walk back: the entry at p was set by worker w starting at a; the entry before it is in
    // the snapshot taken before worker w.
    let mut ranges = Vec::new();
    let mut p = n;
    let mut table = &best;
    while p > 0 {
        let Some(Best {
            from: Some((w, a)), ..
        }) = table[p]
        else {
            return Err(PlanError::DoesNotFit(
                "internal planner inconsistency".into(),
            ));
        };
        ranges.push((w, a, p));
        p = a;
        table = &history[w];
    }
    ranges.reverse();
    let stages = ranges
        .into_iter()
        .enumerate()
        .map(|(s, (w, a, b))| PlanStage {
            worker_id: workers[w].id.clone(),
            stage: s as u32,
            tp_rank: 0,
            cp_rank: 0,
            cp_ranks: 1,
            layers: a as u32..b as u32,
            embed: a == 0,
            head: b == n,
            weight_bytes: stage_memory(model, &prefix, 0, a, b),
            kv_bytes: kv_layer * (b - a) as u64,
            tp_ranks: 1,
            kv_heads: 0..0,
            ffn: 0..0,
            vocab: 0..0,
        })
        .collect();
    Ok(Plan { stages })
}

/// A sentence naming what does not fit.
fn explain(
    m: &ModelFootprint,
    workers: &[WorkerCapacity],
    prefix: &[u64],
    kv_layer: u64,
    policy: &PlanPolicy,
) -> String {
    let n = m.n_layers();
    let largest = workers.iter().map(|w| w.memory_bytes).max().unwrap_or(0);
    let total: u64 = workers.iter().map(|w| w.memory_bytes).sum();
    let need_all = m.weight_bytes() + kv_layer * n as u64;
    let kv = format!("KV cache for {} tokens", policy.kv_tokens);
    let first = stage_memory(m, prefix, kv_layer, 0, 1);
    let last = stage_memory(m, prefix, kv_layer, n - 1, n);
    if total < need_all {
        format!(
            "the model needs {need_all} bytes (weights {} + {kv}) but the {} workers offer \
             {total} bytes in all",
            m.weight_bytes(),
            workers.len()
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
    } else if let Some(l) = (0..n).find(|&l| m.layer_bytes[l] + kv_layer > largest) {
        format!(
            "layer {l} with its {kv} needs {} bytes, more than the largest worker's {largest}",
            m.layer_bytes[l] + kv_layer
        )
    } else {
        format!(
            "no contiguous split of {n} layers ({need_all} bytes with the {kv}) fits the \
             workers' memory ({} bytes in all, split {:?})",
            total,
            workers.iter().map(|w| w.memory_bytes).collect::<Vec<_>>()
        )
    }
}
