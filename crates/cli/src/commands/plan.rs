//! `tessera plan --simulate CLUSTER.yaml`: the plan the coordinator's planner makes for a
//! described cluster, and the decode speed its cost model predicts — for clusters larger than
//! any test machine.
//!
//! The YAML names a model (`model:`, a cache name or a path, read like every other command's
//! `--model`) or describes one (`footprint:`, a Llama-family shape and block formats), the
//! workers (one entry each, or `count:` alike ones), the link, the tensor-parallel policy and
//! the KV cache to provide for. Examples: `deploy/simulate/*.yaml`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;
use serde::Deserialize;
use tessera_coordinator::footprint::ModelFootprint;
use tessera_coordinator::planner::{
    self, CostInputs, CpPolicy, Plan, PlanPolicy, Prediction, TpPolicy, WorkerCapacity,
};
use tessera_format::{Arch, ModelConfig, QType, RopeLayout};

/// Arguments of `tessera plan`.
#[derive(Args, Debug)]
pub struct PlanArgs {
    /// The cluster to plan, described in YAML (see deploy/simulate/).
    #[arg(long, value_name = "CLUSTER.yaml")]
    pub simulate: PathBuf,
}

/// A described cluster.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClusterSpec {
    /// A model from the cache or a path (relative to the YAML's folder when it exists there).
    model: Option<String>,
    /// Or the shape of one.
    footprint: Option<ShapeSpec>,
    /// The workers, in id order.
    workers: Vec<WorkerSpec>,
    /// The links between workers.
    #[serde(default)]
    link: LinkSpec,
    /// Measured compute rate, if not the default.
    #[serde(default)]
    compute: ComputeSpec,
    /// `auto` or a group size.
    #[serde(default)]
    tp: TpSpec,
    /// KV cache tokens per layer every stage holds.
    kv_tokens: u32,
}

/// A model's shape, as a config file gives it, and its block formats.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ShapeSpec {
    layers: usize,
    hidden: usize,
    intermediate: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    vocab: usize,
    /// Format of the layers' matrices (ggml names: q4_1, q4_K, q8_0, f16…).
    qtype: String,
    /// Format of the embedding and an untied head (default: `qtype`).
    embed_qtype: Option<String>,
    #[serde(default)]
    tied: bool,
    #[serde(default)]
    qkv_bias: bool,
}

/// One worker, or `count` alike.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WorkerSpec {
    #[serde(default = "one")]
    count: usize,
    /// Bytes, or a size such as `16GiB`, `512MiB`, `2GB`.
    memory: Bytes,
    threads: u32,
    /// Measured RTT to its peers in µs (0 or absent: the link's latency).
    #[serde(default)]
    rtt_us: u32,
    /// A GPU worker: its device's peak memory bandwidth in GB/s (absent: a CPU worker).
    /// `memory` is then the device's memory.
    #[serde(default)]
    device_gbs: f64,
}

fn one() -> usize {
    1
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Bytes {
    Count(u64),
    Size(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct LinkSpec {
    latency_us: f64,
    bandwidth_gbps: f64,
}

impl Default for LinkSpec {
    fn default() -> Self {
        let c = CostInputs::default();
        Self {
            latency_us: c.link_latency_us,
            bandwidth_gbps: c.bandwidth_gbps,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct ComputeSpec {
    bytes_per_thread_s: f64,
}

impl Default for ComputeSpec {
    fn default() -> Self {
        Self {
            bytes_per_thread_s: CostInputs::default().bytes_per_thread_s,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum TpSpec {
    Size(u32),
    Word(String),
}

impl Default for TpSpec {
    fn default() -> Self {
        Self::Size(1)
    }
}

/// Runs `tessera plan`.
///
/// # Errors
/// When the file cannot be read or parsed, the model cannot be opened, or no plan exists.
pub fn run(args: PlanArgs) -> Result<()> {
    let text = std::fs::read_to_string(&args.simulate)
        .with_context(|| format!("reading {}", args.simulate.display()))?;
    let spec: ClusterSpec = serde_yaml_ng::from_str(&text)
        .with_context(|| format!("parsing {}", args.simulate.display()))?;
    let dir = args.simulate.parent().unwrap_or(Path::new("."));
    let model = footprint(&spec, dir)?;
    let workers = workers(&spec.workers)?;
    let tp = match &spec.tp {
        TpSpec::Size(k) => TpPolicy::Fixed(*k),
        TpSpec::Word(w) if w == "auto" => TpPolicy::Auto,
        TpSpec::Word(w) => bail!("tp: {w:?} is neither `auto` nor a group size"),
    };
    let cost = CostInputs {
        bytes_per_thread_s: spec.compute.bytes_per_thread_s,
        link_latency_us: spec.link.latency_us,
        bandwidth_gbps: spec.link.bandwidth_gbps,
        ..CostInputs::default()
    };
    let policy = PlanPolicy {
        kv_tokens: spec.kv_tokens,
        tp,
        cp: CpPolicy::Fixed(1),
        block_size: 0,
    };
    let plan = planner::plan_with(&model, &workers, &policy, &cost)?;
    let prediction = planner::predict(&plan, &model, &workers, &cost)
        .context("the plan names a worker the simulation does not have")?;
    print_header(&model, &workers, &cost, tp);
    print_plan(&plan, &prediction);
    print_prediction(&plan, &prediction, workers.len());
    Ok(())
}

/// The model's footprint: read from its weights, or computed from its shape.
fn footprint(spec: &ClusterSpec, dir: &Path) -> Result<ModelFootprint> {
    match (&spec.model, &spec.footprint) {
        (Some(name), None) => {
            let beside = dir.join(name);
            let name = if beside.exists() {
                beside.to_string_lossy().into_owned()
            } else {
                name.clone()
            };
            let location = super::model::resolve_or_pull(&name)?;
            let (store, cfg) = tessera_format::open_weights(&location)?;
            Ok(ModelFootprint::from_store(store.as_ref(), &cfg)?)
        }
        (None, Some(s)) => {
            let cfg = ModelConfig {
                arch: Arch::Llama,
                n_layers: s.layers,
                hidden: s.hidden,
                intermediate: s.intermediate,
                n_heads: s.heads,
                n_kv_heads: s.kv_heads,
                head_dim: s.head_dim,
                vocab_size: s.vocab,
                // Not used by the footprint.
                context_len: 0,
                rope_theta: 0.0,
                rope_layout: RopeLayout::Interleaved,
                rms_eps: 0.0,
                qkv_bias: s.qkv_bias,
            };
            let matrices = qtype(&s.qtype)?;
            let embed = s.embed_qtype.as_deref().map_or(Ok(matrices), qtype)?;
            Ok(ModelFootprint::from_shape(&cfg, matrices, embed, s.tied)?)
        }
        _ => bail!("give exactly one of `model:` (a name or a path) and `footprint:` (a shape)"),
    }
}

/// A block format by its ggml name, any case.
fn qtype(name: &str) -> Result<QType> {
    QType::ALL
        .into_iter()
        .find(|q| q.name().eq_ignore_ascii_case(name))
        .with_context(|| {
            let names: Vec<_> = QType::ALL.iter().map(|q| q.name()).collect();
            format!("unknown qtype {name:?}; one of {}", names.join(", "))
        })
}

/// The workers, ids `w0…` zero-padded so that id order is the file's order.
fn workers(specs: &[WorkerSpec]) -> Result<Vec<WorkerCapacity>> {
    let total: usize = specs.iter().map(|w| w.count).sum();
    let width = total.saturating_sub(1).to_string().len();
    let mut out = Vec::with_capacity(total);
    for w in specs {
        let memory_bytes = bytes(&w.memory)?;
        for _ in 0..w.count {
            out.push(WorkerCapacity {
                id: format!("w{:0width$}", out.len()),
                memory_bytes,
                threads: w.threads,
                link_rtt_us: w.rtt_us,
                device_bytes_s: (w.device_gbs * 1e9) as u64,
            });
        }
    }
    if out.is_empty() {
        bail!("no workers: give `workers:` at least one entry with a count above 0");
    }
    Ok(out)
}

/// A byte count, or a size with a unit (B, KB/MB/GB/TB powers of 1000, KiB/MiB/GiB/TiB
/// powers of 1024).
fn bytes(b: &Bytes) -> Result<u64> {
    let s = match b {
        Bytes::Count(n) => return Ok(*n),
        Bytes::Size(s) => s.trim(),
    };
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let number: f64 = number
        .parse()
        .with_context(|| format!("memory {s:?} is not a number with a unit"))?;
    let scale: u64 = match unit.trim() {
        "" | "B" => 1,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        other => {
            bail!("memory {s:?}: unknown unit {other:?} (B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)")
        }
    };
    Ok((number * scale as f64) as u64)
}

/// Bytes for people: GiB / MiB / KiB with two decimals.
fn human(b: u64) -> String {
    let b = b as f64;
    for (unit, size) in [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
        if b >= size as f64 {
            return format!("{:.2} {unit}", b / size as f64);
        }
    }
    format!("{b} B")
}

fn print_header(m: &ModelFootprint, workers: &[WorkerCapacity], c: &CostInputs, tp: TpPolicy) {
    println!(
        "model: {} layers, hidden {}, {} heads / {} KV heads of {}, MLP {}, vocab {}; {} of \
         weights",
        m.n_layers(),
        m.hidden,
        m.n_heads,
        m.n_kv_heads,
        m.head_dim,
        m.intermediate,
        m.vocab,
        human(m.weight_bytes())
    );
    // CPU threads; a GPU worker's speed is listed below.
    let threads: u64 = workers
        .iter()
        .filter(|w| w.device_bytes_s == 0)
        .map(|w| u64::from(w.threads))
        .sum();
    let memory: u64 = workers.iter().map(|w| w.memory_bytes).sum();
    println!(
        "workers: {} ({threads} threads, {} in all); link {} µs one way, {} Gbit/s; {:.2} GB/s \
         streamed per thread; tp {tp:?}",
        workers.len(),
        human(memory),
        c.link_latency_us,
        c.bandwidth_gbps,
        c.bytes_per_thread_s / 1e9
    );
    for w in workers.iter().filter(|w| w.device_bytes_s > 0) {
        println!(
            "  {} is a GPU worker: {:.0} GB/s at {:.0}% streams as fast as {} threads",
            w.id,
            w.device_bytes_s as f64 / 1e9,
            c.device_efficiency * 100.0,
            w.speed(c)
        );
    }
    println!();
}

fn print_plan(plan: &Plan, p: &Prediction) {
    println!(
        "{:>5} {:>4} {:<8} {:<9} {:<8} {:<13} {:<15} {:>11} {:>11} {:>9}",
        "stage",
        "rank",
        "worker",
        "layers",
        "kv heads",
        "ffn columns",
        "vocab rows",
        "weights",
        "kv cache",
        "busy ms"
    );
    for s in &plan.stages {
        let busy = p.stages[s.stage as usize].busy_s() * 1e3;
        println!(
            "{:>5} {:>4} {:<8} {:<9} {:<8} {:<13} {:<15} {:>11} {:>11} {:>9.3}",
            s.stage,
            s.tp_rank,
            s.worker_id,
            format!("{:?}", s.layers),
            format!("{:?}", s.kv_heads),
            format!("{:?}", s.ffn),
            format!("{:?}", s.vocab),
            human(s.weight_bytes),
            human(s.kv_bytes),
            busy
        );
    }
    println!();
}

fn print_prediction(plan: &Plan, p: &Prediction, offered: usize) {
    let stages = plan.n_stages();
    let ranks = plan.stages.first().map_or(1, |s| s.tp_ranks.max(1));
    let slowest = 1e3 / p.aggregate_tok_s;
    let reduce: f64 = p.stages.iter().map(|s| s.reduce_s + s.gather_s).sum();
    let hops: f64 = p.stages.iter().map(|s| s.hop_s).sum();
    println!(
        "plan: {stages} stages × {ranks} ranks = {} of {offered} workers",
        plan.stages.len()
    );
    println!(
        "predicted decode: {:.1} tok/s for one stream ({:.3} ms/token, of which {:.3} ms \
         reductions and gathers, {:.3} ms hops)",
        p.single_stream_tok_s,
        1e3 / p.single_stream_tok_s,
        reduce * 1e3,
        hops * 1e3
    );
    println!(
        "predicted aggregate: {:.1} tok/s with at least {stages} streams in flight (slowest \
         stage {slowest:.3} ms)",
        p.aggregate_tok_s
    );
}
