//! The mesh: stages × tensor-parallel groups, for a fixed group size or one the cost model
//! picks.
//!
//! Workers form groups in their given (id) order: ranks `0..k` of the first group are the
//! first `k` workers, and so on. Each group's split of heads, MLP columns and vocabulary rows
//! is fixed by its ranks' threads (`split`); the layer DP (`pipeline`) then gives groups
//! contiguous layer ranges, checking every rank's memory. `Fixed(1)` is today's planner: one
//! worker per stage, time = exact `bytes / threads` with the head counted by its parameters
//! (`Sizer::work`: stages are balanced for batched steps, where several micro-batches keep
//! every stage busy; one stream's time is the sum of the stages whatever the split). `Fixed(k > 1)` forms `W / k` groups of
//! `k` (the last `W mod k` workers left out), timed by the cost model's stage time (compute + reductions, `cost`). `Auto` tries every
//! group size from 1 to the KV-head count, leaving the `W mod k` last workers out, and keeps
//! the plan with the highest predicted aggregate tok/s, then single-stream tok/s, then the
//! smaller group size: deterministic. Group sizes are uniform across stages.

use super::cost::{self, CostInputs, Secs};
use super::pipeline::{self, Fraction, Span};
use super::split::{self, Share, Sizer};
use super::{Plan, PlanError, PlanPolicy, PlanStage, WorkerCapacity};
use crate::state::footprint::ModelFootprint;

/// A tensor-parallel group: consecutive workers and what each holds.
struct Group {
    /// Indices into the workers, in rank order.
    ranks: Vec<usize>,
    /// Rank r's share.
    shares: Vec<Share>,
}

/// Groups of `k` consecutive workers (the last `workers.len() mod k` left out).
fn groups_of(
    m: &ModelFootprint,
    workers: &[WorkerCapacity],
    k: usize,
) -> Result<Vec<Group>, String> {
    let mut groups = Vec::with_capacity(workers.len() / k);
    for chunk in 0..workers.len() / k {
        let ranks: Vec<usize> = (chunk * k..(chunk + 1) * k).collect();
        let shares = if k == 1 {
            vec![Share::whole(m)]
        } else {
            let threads: Vec<u32> = ranks.iter().map(|&w| workers[w].threads).collect();
            split::split_group(m, &threads)?
        };
        groups.push(Group { ranks, shares });
    }
    Ok(groups)
}

/// Today's pipeline-only plan: one worker per stage.
pub(super) fn pipeline_only(
    m: &ModelFootprint,
    workers: &[WorkerCapacity],
    policy: &PlanPolicy,
) -> Result<Plan, PlanError> {
    let sizer = Sizer::new(m, policy.kv_tokens);
    let groups = groups_of(m, workers, 1).map_err(PlanError::TensorParallel)?;
    let whole = Share::whole(m);
    let spans = pipeline::split_layers(
        m.n_layers(),
        workers.len(),
        Fraction::ZERO,
        |u, a, b| sizer.memory(&whole, a, b) <= workers[u].memory_bytes,
        |u, a, b| Fraction {
            bytes: sizer.work(&whole, a, b),
            threads: u64::from(workers[u].threads.max(1)),
        },
    );
    let memory: Vec<u64> = workers.iter().map(|w| w.memory_bytes).collect();
    match spans {
        Some(spans) => Ok(build(&sizer, workers, &groups, &spans)),
        None => Err(PlanError::DoesNotFit(pipeline::explain(
            &sizer, &memory, policy,
        ))),
    }
}

/// A mesh of groups of exactly `k > 1` ranks over all `workers`.
pub(super) fn fixed(
    m: &ModelFootprint,
    workers: &[WorkerCapacity],
    policy: &PlanPolicy,
    k: u32,
    c: &CostInputs,
) -> Result<Plan, PlanError> {
    let refuse = |why: String| PlanError::TensorParallel(format!("{k} ranks per group: {why}"));
    if k == 0 {
        return Err(refuse("a group needs at least one rank".into()));
    }
    // What no number of workers can change comes first.
    if m.splittable() && k > m.n_kv_heads {
        return Err(refuse(format!(
            "a group of {k} ranks needs at least {k} KV heads and the model has {}; KV heads \
             are not replicated, so a group has at most {} ranks",
            m.n_kv_heads, m.n_kv_heads
        )));
    }
    let w = workers.len();
    // As for `Auto`: the last `w mod k` workers wait (a worker that joins, or leaves, gives
    // a new plan), rather than refusing to serve at all.
    if w < k as usize {
        return Err(refuse(format!(
            "only {w} worker(s) are registered; a group needs {k}"
        )));
    }
    let groups = groups_of(m, workers, k as usize).map_err(refuse)?;
    mesh(m, workers, policy, &groups, c)
}

/// The mesh the cost model predicts fastest (see the module doc).
pub(super) fn auto(
    m: &ModelFootprint,
    workers: &[WorkerCapacity],
    policy: &PlanPolicy,
    c: &CostInputs,
) -> Result<Plan, PlanError> {
    let max_k = if m.splittable() {
        (m.n_kv_heads as usize).min(workers.len())
    } else {
        1
    };
    let mut best: Option<(Plan, (f64, f64))> = None;
    let mut first_err = None;
    for k in 1..=max_k {
        let Ok(groups) = groups_of(m, workers, k) else {
            // This size has no aligned split; another may.
            continue;
        };
        let p = match mesh(m, workers, policy, &groups, c) {
            Ok(p) => p,
            Err(e) => {
                first_err.get_or_insert(e);
                continue;
            }
        };
        let Some(pred) = cost::predict(&p, m, workers, c) else {
            continue;
        };
        let score = (pred.aggregate_tok_s, pred.single_stream_tok_s);
        // Strictly better only: ties keep the smaller group.
        if best.as_ref().is_none_or(|(_, s)| score > *s) {
            best = Some((p, score));
        }
    }
    match (best, first_err) {
        (Some((p, _)), _) => Ok(p),
        (None, Some(e)) => Err(e),
        (None, None) => Err(PlanError::DoesNotFit(
            "no group size from 1 to the model's KV heads gives a plan".into(),
        )),
    }
}

/// The layer split over `groups`, timed by the cost model.
fn mesh(
    m: &ModelFootprint,
    workers: &[WorkerCapacity],
    policy: &PlanPolicy,
    groups: &[Group],
    c: &CostInputs,
) -> Result<Plan, PlanError> {
    let sizer = Sizer::new(m, policy.kv_tokens);
    let caps: Vec<Vec<&WorkerCapacity>> = groups
        .iter()
        .map(|g| g.ranks.iter().map(|&w| &workers[w]).collect())
        .collect();
    let spans = pipeline::split_layers(
        m.n_layers(),
        groups.len(),
        Secs(0.0),
        |u, a, b| {
            groups[u]
                .shares
                .iter()
                .zip(&caps[u])
                .all(|(s, w)| sizer.memory(s, a, b) <= w.memory_bytes)
        },
        |u, a, b| Secs(cost::stage_cost(c, &sizer, &caps[u], &groups[u].shares, a, b).busy_s()),
    );
    match spans {
        Some(spans) => Ok(build(&sizer, workers, groups, &spans)),
        None => Err(PlanError::DoesNotFit(explain(
            &sizer, workers, groups, policy,
        ))),
    }
}

/// The plan of `spans` over `groups`: one entry per rank, sorted by (stage, rank).
fn build(sizer: &Sizer<'_>, workers: &[WorkerCapacity], groups: &[Group], spans: &[Span]) -> Plan {
    let n = sizer.model().n_layers();
    let mut stages = Vec::new();
    for (s, span) in spans.iter().enumerate() {
        let g = &groups[span.unit];
        for (r, (&w, share)) in g.ranks.iter().zip(&g.shares).enumerate() {
            let (a, b) = (span.start, span.end);
            stages.push(PlanStage {
                worker_id: workers[w].id.clone(),
                stage: s as u32,
                tp_rank: r as u32,
                cp_rank: 0,
                cp_ranks: 1,
                layers: a as u32..b as u32,
                embed: a == 0,
                head: b == n,
                weight_bytes: sizer.weights(share, a, b),
                kv_bytes: sizer.kv(share, a, b),
                tp_ranks: g.ranks.len() as u32,
                kv_heads: share.kv_heads.clone(),
                ffn: share.ffn.clone(),
                vocab: share.vocab.clone(),
            });
        }
    }
    Plan { stages }
}

/// A sentence naming what does not fit when no split of the layers over `groups` does.
fn explain(
    sizer: &Sizer<'_>,
    workers: &[WorkerCapacity],
    groups: &[Group],
    policy: &PlanPolicy,
) -> String {
    let m = sizer.model();
    let n = m.n_layers();
    let k = groups.first().map_or(1, |g| g.ranks.len());
    let used: Vec<&WorkerCapacity> = groups
        .iter()
        .flat_map(|g| g.ranks.iter().map(|&w| &workers[w]))
        .collect();
    let total: u64 = used.iter().map(|w| w.memory_bytes).sum();
    let whole = Share::whole(m);
    let need = sizer.memory(&whole, 0, n);
    let kv = format!("KV cache for {} tokens", policy.kv_tokens);
    if total < need {
        return format!(
            "the model needs {need} bytes (weights {} + {kv}) but the {} workers in groups \
             of {k} offer {total} bytes in all",
            m.weight_bytes(),
            used.len()
        );
    }
    // The rank that runs out first on a one-layer stage, at either end of the model.
    let tight = groups
        .iter()
        .flat_map(|g| g.ranks.iter().zip(&g.shares))
        .map(|(&w, s)| {
            let need = sizer.memory(s, 0, 1).max(sizer.memory(s, n - 1, n));
            (need, &workers[w], s)
        })
        .find(|(need, w, _)| *need > w.memory_bytes);
    match tight {
        Some((need, w, s)) => format!(
            "worker {} (rank of KV heads {:?}, MLP columns {:?}, vocabulary rows {:?}) needs \
             {need} bytes for one layer at an end of the model with its {kv}, more than its {}",
            w.id, s.kv_heads, s.ffn, s.vocab, w.memory_bytes
        ),
        None => format!(
            "no contiguous split of {n} layers over {} groups of {k} ranks fits the workers' \
             memory ({need} bytes with the {kv}; {total} bytes in all; each rank's share is \
             fixed by its threads)",
            groups.len()
        ),
    }
}
