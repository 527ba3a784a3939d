//! Prometheus metrics of a coordinator, every one labelled `model_name`, in the names and
//! units vLLM and TGI dashboards use (a `tessera_` prefix for their `vllm:`):
//!
//! | metric | kind | what |
//! |---|---|---|
//! | `tessera_requests_total{outcome}` | counter | requests by how they ended (stop, length, invalid, rejected, unavailable, cancelled, error) |
//! | `tessera_num_requests_running` / `_waiting` | gauge | admitted and generating / queued for admission |
//! | `tessera_time_to_first_token_seconds` | histogram | received → first token |
//! | `tessera_inter_token_latency_seconds` | histogram | between consecutive tokens of a request |
//! | `tessera_e2e_request_latency_seconds` | histogram | received → finished |
//! | `tessera_request_queue_time_seconds` | histogram | received → admitted |
//! | `tessera_request_prompt_tokens` / `_generation_tokens` | histogram | per finished request |
//! | `tessera_prompt_tokens_total` / `tessera_generated_tokens_total` | counter | all requests |
//! | `tessera_kv_cache_usage_ratio` | gauge | KV tokens reserved / capacity per worker (0–1) |
//! | `tessera_step_seconds`, `tessera_step_tokens_total` | histogram, counter | pipeline steps |
//! | `tessera_raft_term`, `_commit_index`, `_applied_index` | gauge | this node's Raft log |
//! | `tessera_raft_is_leader`, `_has_leader` | gauge | 1 / 0 |
//! | `tessera_raft_leader_changes_seen_total` | counter | leaders this node has seen come (etcd's name) |
//! | `tessera_prefix_cache_queried_tokens_total` / `_hit_tokens_total` | counter | prompt tokens looked up in the prefix cache / found there |
//! | `tessera_prefix_cache_evicted_blocks_total` | counter | cached blocks evicted to admit requests |
//!
//! `tessera_telemetry::http` serves them on `--metrics-listen`.

use std::sync::Mutex;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::raft::{RaftRole, RaftStatus};

/// Labels of the request counter: how a request ended.
type Outcome = Vec<(&'static str, &'static str)>;

/// The coordinator's metrics, registered once; cheap to update from any task.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<Outcome, Counter>,
    prompt_tokens: Counter,
    generated_tokens: Counter,
    ttft: Histogram,
    itl: Histogram,
    e2e: Histogram,
    queue_time: Histogram,
    prompt_len: Histogram,
    generation_len: Histogram,
    step_seconds: Histogram,
    step_tokens: Counter,
    running: Gauge,
    waiting: Gauge,
    kv_usage: Gauge<f64, AtomicU64>,
    raft_term: Gauge,
    raft_commit: Gauge,
    raft_applied: Gauge,
    raft_is_leader: Gauge,
    raft_has_leader: Gauge,
    leader_changes: Counter,
    /// The leader last seen, to count changes.
    last_leader: Mutex<Option<u64>>,
    prefix_queried: Counter,
    prefix_hits: Counter,
    prefix_evicted: Counter,
    migrations: Counter,
    replayed_tokens: Counter,
    step_timeouts: Counter,
    wedged_workers: Counter,
    workers_left: Counter,
    workers_held_back: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new("")
    }
}

/// Registers `metric` as `name` with `help` and returns it.
fn reg<M: prometheus_client::registry::Metric + Clone>(
    r: &mut Registry,
    name: &str,
    help: &str,
    metric: M,
) -> M {
    r.register(name, help, metric.clone());
    metric
}

/// Token counts of one request: 1 .. ~65k, doubling.
fn length_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(1.0, 2.0, 17)
}

impl Metrics {
    /// Registers every metric under the `tessera_` prefix, labelled `model_name = model`.
    pub fn new(model: &str) -> Self {
        let mut r = Registry::with_prefix_and_labels(
            "tessera",
            std::iter::once(("model_name".into(), model.to_owned().into())),
        );
        let r = &mut r;
        let requests = reg(
            r,
            "requests",
            "Generate requests by outcome (stop, length, invalid, rejected, unavailable, cancelled, error)",
            Family::<Outcome, Counter>::default(),
        );
        let prompt_tokens = reg(
            r,
            "prompt_tokens",
            "Prompt tokens of finished requests",
            Counter::default(),
        );
        let generated_tokens = reg(
            r,
            "generated_tokens",
            "Tokens generated for finished requests",
            Counter::default(),
        );
        // 5 ms .. ~80 s: a decode-only TTFT on a fast machine up to a long prefill on a slow one.
        let ttft = reg(
            r,
            "time_to_first_token_seconds",
            "From receiving a request to its first token",
            Histogram::new(exponential_buckets(0.005, 2.0, 15)),
        );
        // 1 ms .. ~16 s between two tokens of one request.
        let itl = reg(
            r,
            "inter_token_latency_seconds",
            "Between consecutive tokens of one request",
            Histogram::new(exponential_buckets(0.001, 2.0, 15)),
        );
        let e2e = reg(
            r,
            "e2e_request_latency_seconds",
            "From receiving a request to its last token",
            Histogram::new(exponential_buckets(0.01, 2.0, 16)),
        );
        let queue_time = reg(
            r,
            "request_queue_time_seconds",
            "From receiving a request to its admission",
            Histogram::new(exponential_buckets(0.001, 2.0, 18)),
        );
        let prompt_len = reg(
            r,
            "request_prompt_tokens",
            "Prompt tokens per finished request",
            Histogram::new(length_buckets()),
        );
        let generation_len = reg(
            r,
            "request_generation_tokens",
            "Generated tokens per finished request",
            Histogram::new(length_buckets()),
        );
        let step_seconds = reg(
            r,
            "step_seconds",
            "One batched pipeline step, all stages, as the scheduler waits for it",
            Histogram::new(exponential_buckets(0.001, 2.0, 15)),
        );
        let step_tokens = reg(
            r,
            "step_tokens",
            "Tokens sent through the pipeline (prefill chunks and decode tokens)",
            Counter::default(),
        );
        let running = reg(
            r,
            "num_requests_running",
            "Requests admitted and generating",
            Gauge::default(),
        );
        let waiting = reg(
            r,
            "num_requests_waiting",
            "Requests queued for admission",
            Gauge::default(),
        );
        let kv_usage = reg(
            r,
            "kv_cache_usage_ratio",
            "KV cache tokens reserved by running requests over each worker's capacity (0-1)",
            Gauge::<f64, AtomicU64>::default(),
        );
        let raft_term = reg(
            r,
            "raft_term",
            "This coordinator's Raft term",
            Gauge::default(),
        );
        let raft_commit = reg(
            r,
            "raft_commit_index",
            "This coordinator's Raft commit index",
            Gauge::default(),
        );
        let raft_applied = reg(
            r,
            "raft_applied_index",
            "The last Raft index applied to this coordinator's state",
            Gauge::default(),
        );
        let raft_is_leader = reg(
            r,
            "raft_is_leader",
            "1 while this coordinator is the Raft leader",
            Gauge::default(),
        );
        let raft_has_leader = reg(
            r,
            "raft_has_leader",
            "1 while this coordinator knows a Raft leader",
            Gauge::default(),
        );
        let leader_changes = reg(
            r,
            "raft_leader_changes_seen",
            "Raft leaders this coordinator has seen take over (elections that changed the leader)",
            Counter::default(),
        );
        let prefix_queried = reg(
            r,
            "prefix_cache_queried_tokens",
            "Prompt tokens of admitted requests looked up in the prefix cache",
            Counter::default(),
        );
        let prefix_hits = reg(
            r,
            "prefix_cache_hit_tokens",
            "Prompt tokens found in the prefix cache (their KV reused, not computed)",
            Counter::default(),
        );
        let prefix_evicted = reg(
            r,
            "prefix_cache_evicted_blocks",
            "Cached prefix blocks evicted to admit requests",
            Counter::default(),
        );
        let migrations = reg(
            r,
            "request_migrations",
            "Running requests moved to a new plan after a worker of theirs was lost",
            Counter::default(),
        );
        let replayed_tokens = reg(
            r,
            "request_migration_replayed_tokens",
            "Tokens (prompt and generated so far) replayed into new plans by migrations",
            Counter::default(),
        );
        let step_timeouts = reg(
            r,
            "step_timeouts",
            "Pipeline steps that had no answer within the step timeout",
            Counter::default(),
        );
        let wedged_workers = reg(
            r,
            "wedged_workers_dropped",
            "Workers dropped because their executor stayed on one step past the step timeout",
            Counter::default(),
        );
        let workers_left = reg(
            r,
            "workers_left",
            "Workers that left the cluster on purpose (drained on shutdown)",
            Counter::default(),
        );
        let workers_held_back = reg(
            r,
            "workers_held_back",
            "Times a registered worker could not be reached from the leader and was left out of \
             a plan (dialled again after a backoff)",
            Counter::default(),
        );
        Self {
            registry: std::mem::take(r),
            requests,
            prompt_tokens,
            generated_tokens,
            ttft,
            itl,
            e2e,
            queue_time,
            prompt_len,
            generation_len,
            step_seconds,
            step_tokens,
            running,
            waiting,
            kv_usage,
            raft_term,
            raft_commit,
            raft_applied,
            raft_is_leader,
            raft_has_leader,
            leader_changes,
            last_leader: Mutex::new(None),
            prefix_queried,
            prefix_hits,
            prefix_evicted,
            migrations,
            replayed_tokens,
            step_timeouts,
            wedged_workers,
            workers_left,
            workers_held_back,
        }
    }

    /// Counts a registered worker left out of a plan because the leader cannot reach it.
    pub fn worker_held_back(&self) {
        self.workers_held_back.inc();
    }

    /// Counts a worker that left the cluster on purpose.
    pub fn worker_left(&self) {
        self.workers_left.inc();
    }

    /// Counts a step that timed out and the wedged workers dropped for it.
    pub fn step_timed_out(&self, wedged: u64) {
        self.step_timeouts.inc();
        self.wedged_workers.inc_by(wedged);
    }

    /// Counts a running sequence moved to a new plan after its plan lost a worker, with the
    /// tokens (prompt and generated so far) it replays there.
    pub fn migrated(&self, replayed_tokens: u64) {
        self.migrations.inc();
        self.replayed_tokens.inc_by(replayed_tokens);
    }

    /// Counts a request that ended with `outcome`.
    pub fn request_ended(&self, outcome: &'static str) {
        self.requests
            .get_or_create(&vec![("outcome", outcome)])
            .inc();
    }

    /// Records a finished request: its lengths, time to first token and end-to-end latency.
    pub fn finished(
        &self,
        prompt_tokens: u64,
        generated_tokens: u64,
        ttft_seconds: f64,
        e2e_seconds: f64,
    ) {
        self.prompt_tokens.inc_by(prompt_tokens);
        self.generated_tokens.inc_by(generated_tokens);
        self.prompt_len.observe(prompt_tokens as f64);
        self.generation_len.observe(generated_tokens as f64);
        self.ttft.observe(ttft_seconds);
        self.e2e.observe(e2e_seconds);
    }

    /// Records the time between two consecutive tokens of one request.
    pub fn inter_token(&self, seconds: f64) {
        self.itl.observe(seconds);
    }

    /// Records how long a request waited for admission.
    pub fn queued_for(&self, seconds: f64) {
        self.queue_time.observe(seconds);
    }

    /// Records one admission's prefix cache lookup: `queried` prompt tokens, `hit` of them
    /// cached, and `evicted` cached blocks evicted to make room.
    pub fn prefix_lookup(&self, queried: u64, hit: u64, evicted: u64) {
        self.prefix_queried.inc_by(queried);
        self.prefix_hits.inc_by(hit);
        self.prefix_evicted.inc_by(evicted);
    }

    /// Records one pipeline step.
    pub fn step(&self, tokens: u64, seconds: f64) {
        self.step_tokens.inc_by(tokens);
        self.step_seconds.observe(seconds);
    }

    /// Sets the scheduler's load: running and waiting requests, and KV tokens reserved out of
    /// `kv_capacity`.
    pub fn set_load(&self, running: usize, waiting: usize, kv_reserved: u64, kv_capacity: u64) {
        self.running.set(i64::try_from(running).unwrap_or(i64::MAX));
        self.waiting.set(i64::try_from(waiting).unwrap_or(i64::MAX));
        let ratio = if kv_capacity == 0 {
            0.0
        } else {
            kv_reserved as f64 / kv_capacity as f64
        };
        self.kv_usage.set(ratio);
    }

    /// Follows this node's Raft status: term, indexes, role, and leader changes.
    pub fn raft(&self, s: &RaftStatus) {
        let gauge = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.raft_term.set(gauge(s.term));
        self.raft_commit.set(gauge(s.commit));
        self.raft_applied.set(gauge(s.applied));
        self.raft_is_leader
            .set(i64::from(s.role == RaftRole::Leader));
        self.raft_has_leader.set(i64::from(s.leader.is_some()));
        let mut last = self
            .last_leader
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if s.leader.is_some() && s.leader != *last {
            self.leader_changes.inc();
        }
        if s.leader.is_some() {
            *last = s.leader;
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ensures that updates show up in the exposition with their names, the model label,
    /// outcome labels and values.
    #[test]
    fn renders_what_was_recorded() {
        let m = Metrics::new("m1");
        m.request_ended("stop");
        m.request_ended("stop");
        m.request_ended("invalid");
        m.finished(5, 16, 0.25, 1.5);
        m.inter_token(0.02);
        m.queued_for(0.1);
        m.step(4, 0.01);
        m.set_load(3, 2, 512, 2048);
        m.prefix_lookup(40, 32, 3);
        let text = m.render();
        for want in [
            "tessera_requests_total{model_name=\"m1\",outcome=\"stop\"} 2",
            "tessera_requests_total{model_name=\"m1\",outcome=\"invalid\"} 1",
            "tessera_generated_tokens_total{model_name=\"m1\"} 16",
            "tessera_prompt_tokens_total{model_name=\"m1\"} 5",
            "tessera_time_to_first_token_seconds_count{model_name=\"m1\"} 1",
            "tessera_e2e_request_latency_seconds_sum{model_name=\"m1\"} 1.5",
            "tessera_inter_token_latency_seconds_count{model_name=\"m1\"} 1",
            "tessera_request_queue_time_seconds_count{model_name=\"m1\"} 1",
            "tessera_request_prompt_tokens_sum{model_name=\"m1\"} 5",
            "tessera_request_generation_tokens_sum{model_name=\"m1\"} 16",
            "tessera_num_requests_running{model_name=\"m1\"} 3",
            "tessera_num_requests_waiting{model_name=\"m1\"} 2",
            "tessera_kv_cache_usage_ratio{model_name=\"m1\"} 0.25",
            "tessera_prefix_cache_queried_tokens_total{model_name=\"m1\"} 40",
            "tessera_prefix_cache_hit_tokens_total{model_name=\"m1\"} 32",
            "tessera_prefix_cache_evicted_blocks_total{model_name=\"m1\"} 3",
        ] {
            assert!(text.contains(want), "{want} missing from\n{text}");
        }
    }

    /// Ensures that Raft gauges follow the status and that a leader change is counted once,
    /// however often the same leader is seen, and not when the leader is merely unknown.
    #[test]
    fn counts_leader_changes() {
        let m = Metrics::new("m1");
        let mut s = RaftStatus::initial(1);
        for (leader, term) in [
            (Some(2), 2),
            (Some(2), 2),
            (None, 3),
            (Some(2), 3),
            (Some(1), 4),
        ] {
            s.leader = leader;
            s.term = term;
            s.role = if leader == Some(1) {
                RaftRole::Leader
            } else {
                RaftRole::Follower
            };
            s.commit = term * 10;
            m.raft(&s);
        }
        let text = m.render();
        for want in [
            "tessera_raft_leader_changes_seen_total{model_name=\"m1\"} 2",
            "tessera_raft_term{model_name=\"m1\"} 4",
            "tessera_raft_commit_index{model_name=\"m1\"} 40",
            "tessera_raft_is_leader{model_name=\"m1\"} 1",
            "tessera_raft_has_leader{model_name=\"m1\"} 1",
        ] {
            assert!(text.contains(want), "{want} missing from\n{text}");
        }
    }
}
