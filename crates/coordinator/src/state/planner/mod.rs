//! The shard planner: a pure function from (model footprint, workers, policy) to a plan — a
//! mesh of pipeline stages, each served by a tensor-parallel group of one or more workers.
//!
//! - `pipeline`: contiguous layer ranges over groups in order, by a dynamic program that
//!   minimises the slowest stage's time per token, then the stage count, within every rank's
//!   memory (weights plus the KV cache of its layers and heads for `kv_tokens` tokens).
//! - `split`: what each rank of a group holds — KV heads with their query heads, MLP columns,
//!   vocabulary rows, in proportion to threads and on quant-block boundaries — and its bytes.
//! - `mesh`: forming groups from the workers in id order, [`TpPolicy::Fixed`] and
//!   [`TpPolicy::Auto`], and the reasons a plan is refused.
//! - `cost`: the cost model ([`CostInputs`], [`predict`]) that times mesh stages and picks
//!   the group size for `Auto`.
//! - `ring`: context-parallel rings ([`CpPolicy`]): `P` workers per rank of the mesh, each
//!   holding `1/P` of every sequence's KV cache — for contexts no group can hold alone.
//!
//! `Fixed(1)` is the pipeline-only planner as it was before tensor parallelism: the same
//! stages, workers and byte counts for the same inputs. A group never has more ranks than the
//! model has KV heads (they are not replicated). Every plan is deterministic.

mod cost;
mod mesh;
mod pipeline;
mod ring;
mod split;

use std::ops::Range;

use serde::{Deserialize, Serialize};

pub use cost::{CostInputs, Prediction, StageCost, predict};
pub use ring::{CpPolicy, rank_kv_tokens};

use crate::state::footprint::ModelFootprint;

/// What the planner knows of a worker.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerCapacity {
    /// The worker's id in the cluster state.
    pub id: String,
    /// Memory it may use for weights and KV cache.
    pub memory_bytes: u64,
    /// Compute threads (0 is read as 1).
    pub threads: u32,
    /// Median round-trip time to its peers as the worker measured it, in µs; 0 = unknown
    /// (the cost model then uses [`CostInputs::link_latency_us`]).
    #[serde(default)]
    pub link_rtt_us: u32,
    /// Peak memory bandwidth of the accelerators its shard runs on, bytes per second; 0 for
    /// a CPU worker. (Its `memory_bytes` is then what those devices hold.)
    #[serde(default)]
    pub device_bytes_s: u64,
}

impl WorkerCapacity {
    /// Its decode speed in the unit the planner splits and times work in, compute threads:
    /// a CPU worker's threads; for a worker with accelerators, the number of threads that
    /// would stream weights as fast as its devices do — their bandwidth ×
    /// [`CostInputs::device_efficiency`] over [`CostInputs::bytes_per_thread_s`] — so GPU and
    /// CPU workers share one mesh and one cost model.
    pub fn speed(&self, c: &CostInputs) -> u32 {
        if self.device_bytes_s == 0 {
            return self.threads.max(1);
        }
        let threads = self.device_bytes_s as f64 * c.device_efficiency / c.bytes_per_thread_s;
        // `as` saturates; the clamp keeps a tiny device at one thread.
        threads.round().max(1.0) as u32
    }
}

/// How many workers serve each stage as a tensor-parallel group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TpPolicy {
    /// Every stage's group has exactly this many ranks; `Fixed(1)` is a pipeline-only plan.
    Fixed(u32),
    /// The group size the cost model predicts fastest.
    Auto,
}

impl Default for TpPolicy {
    /// Pipeline only, as plans were before tensor parallelism.
    fn default() -> Self {
        Self::Fixed(1)
    }
}

/// What the plan must provide for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanPolicy {
    /// KV cache capacity every stage holds, in tokens, for each of its layers.
    pub kv_tokens: u32,
    /// Tensor-parallel group sizes.
    #[serde(default)]
    pub tp: TpPolicy,
    /// Context-parallel ring sizes.
    #[serde(default)]
    pub cp: CpPolicy,
    /// Tokens per KV block (a ring rank's share is rounded to whole blocks; 0 reads as 1).
    #[serde(default)]
    pub block_size: u32,
}

/// One worker's part of a plan: its coordinate in the mesh and what it holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanStage {
    /// The worker that runs it.
    pub worker_id: String,
    /// Pipeline stage.
    pub stage: u32,
    /// Tensor-parallel rank inside the stage's group (rank 0 gathers the logits and samples
    /// on the last stage).
    pub tp_rank: u32,
    /// Context-parallel rank: which part of every sequence this rank holds in the stage's
    /// ring (rank 0 of the ring, with tensor-parallel rank 0, is the stage's rank in the
    /// pipeline).
    pub cp_rank: u32,
    /// Global layer range (the same for every rank of a stage).
    pub layers: Range<u32>,
    /// Holds its rows of the token embedding (every rank of the first stage).
    pub embed: bool,
    /// Holds the final norm and its rows of the output head (every rank of the last stage).
    pub head: bool,
    /// Bytes of weights this rank holds.
    pub weight_bytes: u64,
    /// Bytes of KV cache this rank holds.
    pub kv_bytes: u64,
    /// Ranks in the stage's group (0 in plans serialized before tensor parallelism: read 1).
    #[serde(default)]
    pub tp_ranks: u32,
    /// Ranks in the stage's ring (0 in plans serialized before context parallelism: read 1).
    #[serde(default)]
    pub cp_ranks: u32,
    /// KV heads this rank holds, with their query heads (empty in old plans: all).
    #[serde(default)]
    pub kv_heads: Range<u32>,
    /// MLP intermediate columns this rank holds (empty in old plans: all).
    #[serde(default)]
    pub ffn: Range<u32>,
    /// Vocabulary rows of the embedding / output head this rank holds (empty in old plans:
    /// all).
    #[serde(default)]
    pub vocab: Range<u32>,
}

/// A shard plan: one entry per worker, sorted by (stage, cp_rank, tp_rank); the stages cover
/// every layer exactly once, in order, and the tensor-parallel ranks of each ring rank of a
/// stage cover every KV head, MLP column and vocabulary row exactly once.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// The workers' parts, by (stage, tp_rank).
    pub stages: Vec<PlanStage>,
}

impl Plan {
    /// The part a worker runs, if any.
    pub fn stage_of(&self, worker_id: &str) -> Option<&PlanStage> {
        self.stages.iter().find(|s| s.worker_id == worker_id)
    }

    /// The ranks of `stage`, in rank order.
    pub fn group(&self, stage: u32) -> impl Iterator<Item = &PlanStage> {
        self.stages.iter().filter(move |s| s.stage == stage)
    }

    /// Number of pipeline stages.
    pub fn n_stages(&self) -> u32 {
        self.stages.last().map_or(0, |s| s.stage + 1)
    }
}

/// Why no plan exists.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// There are no workers to plan over.
    #[error("no workers to plan over")]
    NoWorkers,
    /// The model has no layers.
    #[error("the model has no layers")]
    NoLayers,
    /// No split of the model over these workers fits their memory.
    #[error("the model does not fit: {0}")]
    DoesNotFit(String),
    /// The tensor-parallel group size asked for cannot split this model over these workers.
    #[error("tensor parallelism refused: {0}")]
    TensorParallel(String),
    /// The ring size asked for cannot be formed from these workers.
    #[error("context parallelism refused: {0}")]
    ContextParallel(String),
}

/// Plans `model` over `workers` (in the given order) for `policy`, with the default
/// [`CostInputs`] (see [`plan_with`]).
///
/// # Errors
/// As [`plan_with`].
pub fn plan(
    model: &ModelFootprint,
    workers: &[WorkerCapacity],
    policy: &PlanPolicy,
) -> Result<Plan, PlanError> {
    plan_with(model, workers, policy, &CostInputs::default())
}

/// Plans `model` over `workers` (in the given order) for `policy`, timing mesh stages with
/// `cost` (pipeline-only plans, `Fixed(1)`, do not depend on it).
///
/// # Errors
/// [`PlanError::NoWorkers`], [`PlanError::NoLayers`], [`PlanError::DoesNotFit`] saying which
/// part of the model does not fit which memory, or [`PlanError::TensorParallel`] saying why
/// groups of the fixed size cannot be formed (fewer workers than one group, more ranks than
/// KV heads, or no split falls on whole quant blocks).
pub fn plan_with(
    model: &ModelFootprint,
    workers: &[WorkerCapacity],
    policy: &PlanPolicy,
    cost: &CostInputs,
) -> Result<Plan, PlanError> {
    if model.n_layers() == 0 {
        return Err(PlanError::NoLayers);
    }
    if workers.is_empty() {
        return Err(PlanError::NoWorkers);
    }
    // From here on `threads` is each worker's speed (`WorkerCapacity::speed`): a device
    // worker becomes the CPU worker that streams weights as fast, so splits, layer spans and
    // stage times weigh GPU and CPU workers alike. CPU workers are unchanged.
    let workers: Vec<WorkerCapacity> = workers
        .iter()
        .map(|w| WorkerCapacity {
            threads: w.speed(cost),
            device_bytes_s: 0,
            ..w.clone()
        })
        .collect();
    let workers = workers.as_slice();
    match policy.cp {
        CpPolicy::Fixed(0 | 1) => plan_tp(model, workers, policy, cost),
        CpPolicy::Fixed(p) => ring::rings(model, workers, policy, p, policy.block_size, cost),
        CpPolicy::Auto | CpPolicy::AutoFrom(_) => {
            ring::auto(model, workers, policy, policy.block_size, cost)
        }
    }
}

/// The mesh of stages × tensor-parallel groups for `policy.tp`, without rings.
fn plan_tp(
    model: &ModelFootprint,
    workers: &[WorkerCapacity],
    policy: &PlanPolicy,
    cost: &CostInputs,
) -> Result<Plan, PlanError> {
    match policy.tp {
        TpPolicy::Fixed(1) => mesh::pipeline_only(model, workers, policy),
        TpPolicy::Fixed(k) => mesh::fixed(model, workers, policy, k, cost),
        TpPolicy::Auto => mesh::auto(model, workers, policy, cost),
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod legacy_oracle;

#[cfg(test)]
mod mesh_tests;

#[cfg(test)]
mod cost_tests;

#[cfg(test)]
mod ring_tests;
