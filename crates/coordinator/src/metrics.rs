//! Prometheus metrics of a coordinator — requests by outcome, tokens, time to first token,
//! step latency, running requests, prefix cache hits. `tessera_telemetry::http` serves them on
//! `--metrics-listen`.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

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
    step_seconds: Histogram,
    step_tokens: Counter,
    running: Gauge,
    prefix_queried: Counter,
    prefix_hits: Counter,
    prefix_evicted: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric under the `tessera_` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("tessera");
        let requests = Family::<Outcome, Counter>::default();
        registry.register(
            "requests",
            "Generate requests by outcome (stop, length, invalid, unavailable, cancelled)",
            requests.clone(),
        );
        let prompt_tokens = Counter::default();
        registry.register(
            "prompt_tokens",
            "Prompt tokens prefilled",
            prompt_tokens.clone(),
        );
        let generated_tokens = Counter::default();
        registry.register(
            "generated_tokens",
            "Tokens generated",
            generated_tokens.clone(),
        );
        // 5 ms .. ~80 s: a decode-only TTFT on a fast machine up to a long prefill on a slow one.
        let ttft = Histogram::new(exponential_buckets(0.005, 2.0, 15));
        registry.register(
            "time_to_first_token_seconds",
            "From receiving a request to its first token",
            ttft.clone(),
        );
        let step_seconds = Histogram::new(exponential_buckets(0.001, 2.0, 15));
        registry.register(
            "step_seconds",
            "One batched pipeline step, all stages, as the scheduler waits for it",
            step_seconds.clone(),
        );
        let step_tokens = Counter::default();
        registry.register(
            "step_tokens",
            "Tokens sent through the pipeline (prefill chunks and decode tokens)",
            step_tokens.clone(),
        );
        let running = Gauge::default();
        registry.register(
            "running_requests",
            "Requests generating now",
            running.clone(),
        );
        let prefix_queried = Counter::default();
        registry.register(
            "prefix_cache_queried_tokens",
            "Prompt tokens of admitted requests looked up in the prefix cache",
            prefix_queried.clone(),
        );
        let prefix_hits = Counter::default();
        registry.register(
            "prefix_cache_hit_tokens",
            "Prompt tokens found in the prefix cache (their KV reused, not computed)",
            prefix_hits.clone(),
        );
        let prefix_evicted = Counter::default();
        registry.register(
            "prefix_cache_evicted_blocks",
            "Cached prefix blocks evicted to admit requests",
            prefix_evicted.clone(),
        );
        Self {
            registry,
            requests,
            prompt_tokens,
            generated_tokens,
            ttft,
            step_seconds,
            step_tokens,
            running,
            prefix_queried,
            prefix_hits,
            prefix_evicted,
        }
    }

    /// Counts a request that ended with `outcome`.
    pub fn request_ended(&self, outcome: &'static str) {
        self.requests
            .get_or_create(&vec![("outcome", outcome)])
            .inc();
    }

    /// Records a finished request's usage.
    pub fn usage(&self, prompt_tokens: u64, generated_tokens: u64, ttft_seconds: f64) {
        self.prompt_tokens.inc_by(prompt_tokens);
        self.generated_tokens.inc_by(generated_tokens);
        self.ttft.observe(ttft_seconds);
    }

    /// Records one pipeline step.
    pub fn step(&self, tokens: u64, seconds: f64) {
        self.step_tokens.inc_by(tokens);
        self.step_seconds.observe(seconds);
    }

    /// Records one admission's prefix cache lookup: `queried` prompt tokens, `hit` of them
    /// cached, and `evicted` cached blocks evicted to make room.
    pub fn prefix_lookup(&self, queried: u64, hit: u64, evicted: u64) {
        self.prefix_queried.inc_by(queried);
        self.prefix_hits.inc_by(hit);
        self.prefix_evicted.inc_by(evicted);
    }

    /// Sets the number of running requests.
    pub fn set_running(&self, n: usize) {
        self.running.set(i64::try_from(n).unwrap_or(i64::MAX));
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

    /// Ensures that updates show up in the exposition with their names, labels and values.
    #[test]
    fn renders_what_was_recorded() {
        let m = Metrics::new();
        m.request_ended("stop");
        m.request_ended("stop");
        m.request_ended("invalid");
        m.usage(5, 16, 0.25);
        m.step(4, 0.01);
        m.set_running(3);
        m.prefix_lookup(40, 32, 3);
        let text = m.render();
        assert!(
            text.contains("tessera_requests_total{outcome=\"stop\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("tessera_requests_total{outcome=\"invalid\"} 1"),
            "{text}"
        );
        assert!(text.contains("tessera_generated_tokens_total 16"), "{text}");
        assert!(text.contains("tessera_prompt_tokens_total 5"), "{text}");
        assert!(
            text.contains("tessera_time_to_first_token_seconds_count 1"),
            "{text}"
        );
        assert!(text.contains("tessera_running_requests 3"), "{text}");
        assert!(
            text.contains("tessera_prefix_cache_queried_tokens_total 40"),
            "{text}"
        );
        assert!(
            text.contains("tessera_prefix_cache_hit_tokens_total 32"),
            "{text}"
        );
        assert!(
            text.contains("tessera_prefix_cache_evicted_blocks_total 3"),
            "{text}"
        );
    }
}
