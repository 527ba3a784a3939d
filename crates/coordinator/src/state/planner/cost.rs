//! The cost model: predicted decode time per token of a stage group, of a plan, and the
//! tokens per second that follow.
//!
//! Decode is bound by streaming the weights (README, "Benchmark": its profile is projections
//! and the output head), so a rank's compute time is the bytes of weights it streams per token
//! over its threads' streaming rate. Inside a group of `k > 1` ranks, partial sums are reduced
//! worker to worker; between stages the hidden state hops to the next group. For one token:
//!
//! ```text
//! compute(stage)  = max over ranks r of  streamed_bytes(r) / (bytes_per_thread_s × threads(r))
//! reduce(stage)   = (2 × layers + [first stage]) × (latency + (k − 1) × hidden × 4 B / bandwidth)
//! gather(last)    = latency + (vocab − vocab rows of rank 0) × 4 B / bandwidth      (k > 1)
//! busy(stage)     = compute + reduce + gather
//! hop(s → s + 1)  = latency + k(s + 1) × hidden × 4 B / bandwidth
//! single-stream tok/s = 1 / (Σ busy + Σ hop)
//! aggregate tok/s     = 1 / max busy      (S stages with ≥ S streams in flight: hops overlap)
//! ```
//!
//! A reduction is one round in which every rank sends its f32 partial (hidden × 4 bytes per
//! token) to each of the k − 1 others and adds what it receives in rank order: one latency,
//! and k − 1 partials through each rank's link. The logits gather sends every other rank's
//! vocabulary rows (f32) to rank 0, which samples. `latency` is one way: half the RTT a worker
//! measured to its peers (`WorkerCapacity::link_rtt_us`), the group's slowest, or
//! [`CostInputs::link_latency_us`] where a worker measured none. The coordinator's round trip
//! per token is the same for every plan and is left out.

use std::cmp::Ordering;

use super::split::{Share, Sizer};
use super::{Plan, WorkerCapacity};
use crate::state::footprint::ModelFootprint;

/// Bytes of one hidden-state element on the wire (f32).
const F32: f64 = 4.0;

/// What the cost model is given: measured rates, with defaults measured on the 2-core
/// development machine. `bench-cluster` and the simulator pass their own.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CostInputs {
    /// Weight bytes one compute thread streams per second in decode.
    pub bytes_per_thread_s: f64,
    /// One-way latency of a message between two workers, in µs, where a worker measured none.
    pub link_latency_us: f64,
    /// Bandwidth of a worker's link, in Gbit/s.
    pub bandwidth_gbps: f64,
    /// The fraction of an accelerator's peak memory bandwidth its decode streams weights at
    /// ([`WorkerCapacity::speed`]).
    pub device_efficiency: f64,
}

impl Default for CostInputs {
    /// SmolLM2-135M Q4_1 decodes at about 105–110 tok/s with 2 threads on the development
    /// machine while streaming ~96.6 MB per token (its Q4_1 layers and Q8_0 tied head, as
    /// `ModelFootprint::from_shape` counts them): 96.6e6 × 107.5 / 2 ≈ 5.2e9 bytes per
    /// thread-second. Loopback RTT measured ≈ 50 µs, so 25 µs one way. Bandwidth: 10 Gbit/s,
    /// a data-centre NIC (loopback is faster; the reductions of small models are latency-bound
    /// either way). Device efficiency 0.6: not measured here (no GPU on the development
    /// machine); batch-1 decode of bandwidth-bound engines is commonly reported at 50–80% of
    /// peak, and the low end keeps a GPU from being handed more layers than it can stream.
    fn default() -> Self {
        Self {
            bytes_per_thread_s: 5.2e9,
            link_latency_us: 25.0,
            bandwidth_gbps: 10.0,
            device_efficiency: 0.6,
        }
    }
}

impl CostInputs {
    /// One-way latency in seconds for a worker that measured `rtt_us` (0 = not measured).
    pub fn latency_s(&self, rtt_us: u32) -> f64 {
        if rtt_us > 0 {
            f64::from(rtt_us) / 2.0 * 1e-6
        } else {
            self.link_latency_us * 1e-6
        }
    }

    /// Seconds to push `bytes` through one link.
    pub fn transfer_s(&self, bytes: f64) -> f64 {
        bytes * 8.0 / (self.bandwidth_gbps * 1e9)
    }

    /// Seconds for `threads` threads to stream `bytes` of weights.
    pub fn compute_s(&self, bytes: u64, threads: u32) -> f64 {
        bytes as f64 / (self.bytes_per_thread_s * f64::from(threads.max(1)))
    }
}

/// The predicted time per token of one stage group.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StageCost {
    /// Streaming the weights: the slowest rank's.
    pub compute_s: f64,
    /// The group's reductions of partial sums.
    pub reduce_s: f64,
    /// The logits gather to rank 0 (last stage of a group of more than one).
    pub gather_s: f64,
    /// The hop of the hidden state to the next stage (0 on the last).
    pub hop_s: f64,
}

impl StageCost {
    /// Time the group is busy with one token (what bounds the pipeline's throughput).
    pub fn busy_s(&self) -> f64 {
        self.compute_s + self.reduce_s + self.gather_s
    }
}

/// What the cost model predicts for a plan.
#[derive(Clone, Debug, PartialEq)]
pub struct Prediction {
    /// Per stage, first to last.
    pub stages: Vec<StageCost>,
    /// Decode tokens per second of one stream (every stage and hop in turn).
    pub single_stream_tok_s: f64,
    /// Decode tokens per second with at least one stream in flight per stage.
    pub aggregate_tok_s: f64,
}

/// Seconds, totally ordered (the DP's time for meshes).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct Secs(pub f64);

impl Eq for Secs {}

impl Ord for Secs {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.total_cmp(&other.0)
    }
}

impl PartialOrd for Secs {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// The slowest one-way latency of a group's workers.
pub(super) fn group_latency_s(c: &CostInputs, ranks: &[&WorkerCapacity]) -> f64 {
    ranks
        .iter()
        .map(|w| c.latency_s(w.link_rtt_us))
        .fold(0.0, f64::max)
}

/// The busy time of a group (`ranks` with their `shares`, in rank order) over layers
/// `[a, b)`, its hop left at 0.
pub(super) fn stage_cost(
    c: &CostInputs,
    sizer: &Sizer<'_>,
    ranks: &[&WorkerCapacity],
    shares: &[Share],
    a: usize,
    b: usize,
) -> StageCost {
    let m = sizer.model();
    let compute_s = ranks
        .iter()
        .zip(shares)
        .map(|(w, s)| c.compute_s(sizer.streamed(s, a, b), w.speed(c)))
        .fold(0.0, f64::max);
    let k = ranks.len();
    let (mut reduce_s, mut gather_s) = (0.0, 0.0);
    if k > 1 {
        let lat = group_latency_s(c, ranks);
        let partial = f64::from(m.hidden) * F32;
        let count = 2 * (b - a) + usize::from(a == 0);
        reduce_s = count as f64 * (lat + c.transfer_s((k - 1) as f64 * partial));
        if b == m.n_layers() {
            let rank0 = shares[0].vocab.end - shares[0].vocab.start;
            gather_s = lat + c.transfer_s(f64::from(m.vocab - rank0) * F32);
        }
    }
    StageCost {
        compute_s,
        reduce_s,
        gather_s,
        hop_s: 0.0,
    }
}

/// The hop from a group to the next (of `next_ranks` ranks): the slower side's latency and
/// the hidden state sent to every rank of the next group.
pub(super) fn hop_s(c: &CostInputs, m: &ModelFootprint, lat: f64, next_ranks: usize) -> f64 {
    lat + c.transfer_s(next_ranks as f64 * f64::from(m.hidden) * F32)
}

/// Predicts `plan`'s decode speed for `model` on `workers` (the plan's workers must be among
/// them; `kv_tokens` does not change the prediction: decode reads one token's K/V rows).
///
/// Returns `None` when a worker of the plan is not in `workers`.
pub fn predict(
    plan: &Plan,
    model: &ModelFootprint,
    workers: &[WorkerCapacity],
    c: &CostInputs,
) -> Option<Prediction> {
    let sizer = Sizer::new(model, 0);
    let whole = Share::whole(model);
    let mut groups = Vec::new();
    for s in 0..plan.n_stages() {
        let mut ranks = Vec::new();
        let mut shares = Vec::new();
        let mut layers = 0..0;
        for r in plan.group(s) {
            ranks.push(workers.iter().find(|w| w.id == r.worker_id)?);
            // Plans of groups of one (and old ones, with empty ranges) hold everything.
            shares.push(if r.tp_ranks > 1 {
                Share {
                    kv_heads: r.kv_heads.clone(),
                    ffn: r.ffn.clone(),
                    vocab: r.vocab.clone(),
                }
            } else {
                whole.clone()
            });
            layers = r.layers.start as usize..r.layers.end as usize;
        }
        groups.push((ranks, shares, layers));
    }
    let mut stages: Vec<StageCost> = groups
        .iter()
        .map(|(ranks, shares, l)| stage_cost(c, &sizer, ranks, shares, l.start, l.end))
        .collect();
    for i in 1..groups.len() {
        let lat = group_latency_s(c, &groups[i - 1].0).max(group_latency_s(c, &groups[i].0));
        stages[i - 1].hop_s = hop_s(c, model, lat, groups[i].0.len());
    }
    let single: f64 = stages.iter().map(|s| s.busy_s() + s.hop_s).sum();
    let slowest = stages.iter().map(StageCost::busy_s).fold(0.0, f64::max);
    Some(Prediction {
        stages,
        single_stream_tok_s: 1.0 / single,
        aggregate_tok_s: 1.0 / slowest,
    })
}
