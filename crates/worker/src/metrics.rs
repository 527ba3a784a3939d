//! Prometheus metrics of a worker: steps and tokens computed, step latency, and — read from
//! the shard's published state at scrape time — resident and weight bytes, KV blocks and live
//! sequences. `tessera_telemetry::http` serves them on `--metrics-listen`.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;

use crate::shard::ShardStatus;

/// The worker's metrics, registered once under the `tessera_worker_` prefix. Counters are
/// updated by the executor thread after each step; gauges are set from a [`ShardStatus`] when
/// rendered, so they are never stale and cost nothing between scrapes.
#[derive(Debug)]
pub(crate) struct WorkerMetrics {
    registry: Registry,
    steps: Counter,
    tokens: Counter,
    step_seconds: Histogram,
    resident_bytes: Gauge,
    weight_bytes: Gauge,
    kv_blocks_used: Gauge,
    kv_blocks_total: Gauge,
    kv_blocks_cached: Gauge,
    active_sequences: Gauge,
    plan_epoch: Gauge,
    kv_bytes: Gauge,
    tp_steps: Counter,
    tp_reduce_seconds: Counter<f64, AtomicU64>,
    /// The shard's cumulative tensor-parallel figures as of the last render: the counters
    /// above advance by the difference, so they stay monotonic whoever reads first.
    tp_seen: Mutex<(u64, u64, u64)>,
    peer_bytes_sent: Counter,
}

/// A gauge value from an unsigned count (saturating: no count here comes near `i64::MAX`).
fn gauge_value(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl WorkerMetrics {
    /// Registers every metric; `backend` names the device the shards run on
    /// (`tessera_worker_device_info{backend, device}`, value 1: `cpu`, or `cuda` with the
    /// device's name).
    pub fn new(backend: &crate::Backend) -> Self {
        let mut registry = Registry::with_prefix("tessera_worker");
        let (kind, device) = match backend {
            crate::Backend::Cpu => ("cpu", String::new()),
            crate::Backend::Cuda { info, .. } => ("cuda", format!("{} ({})", info.name, info.id)),
            crate::Backend::Emulated => ("emulated", String::new()),
        };
        registry.register(
            "device",
            "The device this worker's shards run on",
            Info::new(vec![("backend", kind.to_owned()), ("device", device)]),
        );
        let steps = Counter::default();
        registry.register(
            "steps",
            "Pipeline steps computed on this stage",
            steps.clone(),
        );
        let tokens = Counter::default();
        registry.register(
            "step_tokens",
            "Tokens computed on this stage (prefill chunks and decode tokens)",
            tokens.clone(),
        );
        // 0.5 ms .. ~8 s: one decode token of a few layers up to a long prefill chunk.
        let step_seconds = Histogram::new(exponential_buckets(0.0005, 2.0, 15));
        registry.register(
            "step_seconds",
            "Compute time of one step on this stage (the next stages not included)",
            step_seconds.clone(),
        );
        let mut gauge = |name: &str, help: &str| {
            let g = Gauge::default();
            registry.register(name, help, g.clone());
            g
        };
        let resident_bytes = gauge("resident_bytes", "Resident set size of the worker process");
        let weight_bytes = gauge("weight_bytes", "Bytes of model weights held");
        let kv_blocks_used = gauge(
            "kv_blocks_used",
            "KV cache blocks held by sequences or the prefix cache",
        );
        let kv_blocks_total = gauge("kv_blocks_total", "KV cache blocks in all");
        let kv_blocks_cached = gauge(
            "kv_blocks_cached",
            "KV cache blocks held by the prefix cache (some may be shared by live sequences)",
        );
        let active_sequences = gauge("active_sequences", "Sequences live on this stage");
        let plan_epoch = gauge("plan_epoch", "Plan epoch of the loaded shard (0: none)");
        let kv_bytes = gauge("kv_bytes", "Bytes of KV cache the loaded shard holds");
        let tp_steps = Counter::default();
        registry.register(
            "tp_steps",
            "Steps computed as a rank of a tensor-parallel group",
            tp_steps.clone(),
        );
        let tp_reduce_seconds = Counter::<f64, AtomicU64>::default();
        registry.register(
            "tp_reduce_seconds",
            "Time tensor-parallel steps spent sending, waiting for and adding partial sums",
            tp_reduce_seconds.clone(),
        );
        let peer_bytes_sent = Counter::default();
        registry.register(
            "peer_bytes_sent",
            "Bytes written to the stage group's peers: tensor-parallel partial sums, ring K/V \
             blocks and gathers",
            peer_bytes_sent.clone(),
        );
        Self {
            registry,
            steps,
            tokens,
            step_seconds,
            resident_bytes,
            weight_bytes,
            kv_blocks_used,
            kv_blocks_total,
            kv_blocks_cached,
            active_sequences,
            plan_epoch,
            kv_bytes,
            tp_steps,
            tp_reduce_seconds,
            tp_seen: Mutex::new((0, 0, 0)),
            peer_bytes_sent,
        }
    }

    /// Records one step that computed `tokens` tokens in `seconds`.
    pub fn step(&self, tokens: u64, seconds: f64) {
        self.steps.inc();
        self.tokens.inc_by(tokens);
        self.step_seconds.observe(seconds);
    }

    /// The Prometheus text exposition, gauges taken from `status` and `resident_bytes`.
    pub fn render(&self, status: ShardStatus, resident_bytes: u64) -> String {
        self.resident_bytes.set(gauge_value(resident_bytes));
        self.weight_bytes.set(gauge_value(status.weight_bytes));
        let used = status.total_kv_blocks.saturating_sub(status.free_kv_blocks);
        self.kv_blocks_used.set(gauge_value(used));
        self.kv_blocks_total
            .set(gauge_value(status.total_kv_blocks));
        self.kv_blocks_cached
            .set(gauge_value(status.cached_kv_blocks));
        self.active_sequences
            .set(gauge_value(status.live_sequences));
        self.plan_epoch.set(gauge_value(status.plan_epoch));
        self.kv_bytes.set(gauge_value(status.kv_bytes));
        {
            let mut seen = self
                .tp_seen
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let (steps, us, bytes) = *seen;
            self.tp_steps.inc_by(status.tp_steps.saturating_sub(steps));
            self.tp_reduce_seconds
                .inc_by(status.tp_reduce_us.saturating_sub(us) as f64 / 1e6);
            self.peer_bytes_sent
                .inc_by(status.peer_bytes_sent.saturating_sub(bytes));
            *seen = (
                steps.max(status.tp_steps),
                us.max(status.tp_reduce_us),
                bytes.max(status.peer_bytes_sent),
            );
        }
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ensures that steps and the shard's state show up under their names with their values.
    #[test]
    fn renders_steps_and_shard_state() {
        let m = WorkerMetrics::new(&crate::Backend::Cpu);
        m.step(7, 0.002);
        m.step(1, 0.001);
        let status = ShardStatus {
            plan_epoch: 3,
            weight_bytes: 1000,
            free_kv_blocks: 10,
            total_kv_blocks: 16,
            cached_kv_blocks: 4,
            live_sequences: 2,
            kv_bytes: 4096,
            tp_steps: 10,
            tp_reduce_us: 2_500_000,
            ..ShardStatus::default()
        };
        let text = m.render(status, 5 << 20);
        for want in [
            "tessera_worker_steps_total 2",
            "tessera_worker_step_tokens_total 8",
            "tessera_worker_step_seconds_count 2",
            "tessera_worker_resident_bytes 5242880",
            "tessera_worker_weight_bytes 1000",
            "tessera_worker_kv_blocks_used 6",
            "tessera_worker_kv_blocks_total 16",
            "tessera_worker_kv_blocks_cached 4",
            "tessera_worker_active_sequences 2",
            "tessera_worker_plan_epoch 3",
            "tessera_worker_kv_bytes 4096",
            "tessera_worker_tp_steps_total 10",
            "tessera_worker_tp_reduce_seconds_total 2.5",
            r#"tessera_worker_device_info{backend="cpu",device=""} 1"#,
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
        // Gauges follow the state at each render, not the first one.
        let text = m.render(ShardStatus::default(), 0);
        assert!(text.contains("tessera_worker_active_sequences 0"), "{text}");
        assert!(text.contains("tessera_worker_steps_total 2"), "{text}");
        // The tensor-parallel counters advance by differences and never go back.
        let text = m.render(
            ShardStatus {
                tp_steps: 12,
                tp_reduce_us: 3_000_000,
                ..ShardStatus::default()
            },
            0,
        );
        assert!(text.contains("tessera_worker_tp_steps_total 12"), "{text}");
        assert!(
            text.contains("tessera_worker_tp_reduce_seconds_total 3"),
            "{text}"
        );
    }
}
