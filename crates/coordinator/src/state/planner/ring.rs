//! Rings: context-parallel ranks in the mesh, for contexts whose KV cache no single group can
//! hold.
//!
//! A ring of `P` ranks serves a stage with `P` copies of the stage's weights (or of each
//! tensor-parallel slice), each holding the KV cache of `1/P` of every sequence. So the
//! planner treats `P` consecutive workers (in id order) as one *ring set*: a virtual worker
//! with the smallest memory and threads of its members, planned by the mesh planner for the
//! per-rank share of the KV cache ([`rank_kv_tokens`]). Each virtual worker's part then goes
//! to every member, with `cp_rank` 0, 1, …, P − 1; a group of `T` virtual workers is a stage
//! group of `T × P` workers, ordered `cp_rank · T + tp_rank`.
//!
//! [`CpPolicy::Auto`] takes the smallest ring (1, 2, …) whose plan fits: a ring only when the
//! KV cache does not fit otherwise. A pipeline already splits the KV cache by layers, so with
//! as many layers as workers a plan without rings fits whenever one with rings does; rings
//! let more workers share the cache than a pipeline can use (a worker per layer at most), and
//! split one long prompt's prefill over their ranks, which a pipeline does not.
//! [`CpPolicy::AutoFrom`] is `Auto` with a length policy: when sequences may be that many
//! tokens or longer (the KV budget per sequence, `--kv-tokens`), a ring of at least two even
//! where one worker would hold the cache — so a long prompt's prefill is split over the ring's
//! ranks. [`CpPolicy::Fixed`] asks for a ring size.

use serde::{Deserialize, Serialize};

use super::cost::CostInputs;
use super::{Plan, PlanError, PlanPolicy, PlanStage, WorkerCapacity, plan_tp};
use crate::state::footprint::ModelFootprint;

/// How many workers split each stage's sequences as a ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CpPolicy {
    /// Every stage has a ring of exactly this many ranks; `Fixed(1)` is no ring.
    Fixed(u32),
    /// The smallest ring whose plan fits the workers' memory.
    Auto,
    /// As `Auto`, and a ring of at least two ranks when sequences may be this many tokens or
    /// longer (`PlanPolicy::kv_tokens` at least this); one worker alone plans without a ring.
    AutoFrom(u32),
}

impl Default for CpPolicy {
    /// No ring, as plans were before context parallelism.
    fn default() -> Self {
        Self::Fixed(1)
    }
}

/// KV tokens each rank of a ring of `ranks` holds so that `total` tokens of sequences fit:
/// a rank keeps at most `⌈n / P⌉ + 2` tokens of a sequence of `n` (two zigzag chunks, each
/// rounded up, then every P-th later token), plus a block for the round-off of its blocks.
/// A ring of one holds all `total`.
pub fn rank_kv_tokens(total: u32, ranks: u32, block: u32) -> u32 {
    if ranks <= 1 {
        return total;
    }
    let block = block.max(1);
    let tokens = total.div_ceil(ranks) + 2;
    (tokens.div_ceil(block) + 1) * block
}

/// Plans `model` over `workers` as rings of `p` for `policy` (see the module doc).
///
/// # Errors
/// [`PlanError::ContextParallel`] when fewer than `p` workers are registered or `p` is 0;
/// otherwise as the mesh planner over the ring sets.
pub(super) fn rings(
    m: &ModelFootprint,
    workers: &[WorkerCapacity],
    policy: &PlanPolicy,
    p: u32,
    block: u32,
    c: &CostInputs,
) -> Result<Plan, PlanError> {
    let pu = p as usize;
    if p == 0 || workers.len() < pu {
        return Err(PlanError::ContextParallel(format!(
            "a ring of {p} needs {p} workers; {} are registered",
            workers.len()
        )));
    }
    // The last `W mod P` workers wait, as with tensor-parallel groups.
    let sets: Vec<&[WorkerCapacity]> = workers.chunks_exact(pu).collect();
    let virt: Vec<WorkerCapacity> = sets
        .iter()
        .map(|set| WorkerCapacity {
            id: set[0].id.clone(),
            memory_bytes: set.iter().map(|w| w.memory_bytes).min().unwrap_or(0),
            threads: set.iter().map(|w| w.threads.max(1)).min().unwrap_or(1),
            link_rtt_us: set.iter().map(|w| w.link_rtt_us).max().unwrap_or(0),
            // `plan_with` has already turned every worker's speed into threads.
            device_bytes_s: 0,
        })
        .collect();
    let inner = PlanPolicy {
        kv_tokens: rank_kv_tokens(policy.kv_tokens, p, block),
        ..policy.clone()
    };
    let plan = plan_tp(m, &virt, &inner, c).map_err(|e| match e {
        PlanError::DoesNotFit(why) => PlanError::DoesNotFit(format!(
            "{why} (rings of {p}: each rank holds the KV cache of {} tokens)",
            inner.kv_tokens
        )),
        other => other,
    })?;
    let mut stages: Vec<PlanStage> = Vec::with_capacity(plan.stages.len() * pu);
    for s in &plan.stages {
        let set = virt
            .iter()
            .position(|v| v.id == s.worker_id)
            .ok_or_else(|| PlanError::ContextParallel(format!("unknown worker {}", s.worker_id)))?;
        for (cp, w) in sets[set].iter().enumerate() {
            stages.push(PlanStage {
                worker_id: w.id.clone(),
                cp_rank: cp as u32,
                cp_ranks: p,
                ..s.clone()
            });
        }
    }
    stages.sort_by_key(|s| (s.stage, s.cp_rank, s.tp_rank));
    Ok(Plan { stages })
}

/// The smallest ring size from 1 whose plan fits; the first refusal when none does.
///
/// # Errors
/// The ring of one's refusal when no ring size gives a plan.
pub(super) fn auto(
    m: &ModelFootprint,
    workers: &[WorkerCapacity],
    policy: &PlanPolicy,
    block: u32,
    c: &CostInputs,
) -> Result<Plan, PlanError> {
    let long = match policy.cp {
        CpPolicy::AutoFrom(tokens) => policy.kv_tokens >= tokens,
        CpPolicy::Auto | CpPolicy::Fixed(_) => false,
    };
    // A ring by length policy needs two workers; one alone plans as it can.
    let smallest = if long && workers.len() >= 2 { 2 } else { 1 };
    let mut first = None;
    for p in smallest..=workers.len() as u32 {
        let r = if p == 1 {
            plan_tp(m, workers, policy, c)
        } else {
            rings(m, workers, policy, p, block, c)
        };
        match r {
            Ok(plan) => return Ok(plan),
            Err(e) => {
                first.get_or_insert(e);
            }
        }
    }
    Err(first.unwrap_or(PlanError::NoWorkers))
}
