//! Step timeouts: how long the oldest step in flight may go unanswered, and which worker is
//! to blame when it does.
//!
//! A worker can fail while its heartbeats go on: its executor stuck in a step (a deadlock, a
//! hung device) answers nothing, and the heartbeat task, which never waits for the executor,
//! keeps it looking alive. Only the pipeline sees it: the step is never answered, and without
//! a bound the whole batch would wait forever. So the oldest step in flight has a deadline,
//! from the time it was sent:
//!
//! ```text
//! timeout(step) = max(2 × heartbeat_timeout, SLACK × expected(step))
//! ```
//!
//! `expected` comes from the steps answered so far ([`StepClock`]): an exponential moving
//! average of the answer time of steps of about the same size (token counts in powers of two,
//! since a decode step of 8 tokens and a prefill chunk of 512 cost very different times), or,
//! for a size not seen yet, the most expensive per-token rate seen times its tokens (generous,
//! never tight). Until any step was answered, [`COLD`] — a first step also pays for warm-up
//! (page faults on the weights, a group's first exchange). For the usual decode step the floor
//! rules, so a wedged worker is noticed within two heartbeat timeouts.
//!
//! When the deadline passes the scheduler asks the heartbeats who is wedged ([`wedged`]):
//! every worker reports how long its executor has been on its current step (`step_busy_ms`).
//! A worker of the plan that had been on one step for at least half the wait is wedged and is
//! dropped — its removal committed before the plan controller re-plans, so the next plan leaves
//! it out — and the running requests migrate (see `migrate`). The worker registers again only
//! once its executor answers. When nobody qualifies (a stage's link stalled, not its executor)
//! the stream is given up all the same and the next plan tries again with the same workers;
//! a request survives up to `MAX_MIGRATIONS` such losses.

use std::collections::HashMap;
use std::time::Duration;

use crate::state::cluster::{Cluster, Seen};

/// How many times the expected time a step may take before it counts as lost.
const SLACK: f64 = 8.0;
/// The weight of the newest step in the moving averages.
const SMOOTHING: f64 = 0.2;
/// The timeout before any step has been answered.
pub(crate) const COLD: Duration = Duration::from_secs(60);
/// Size classes: tokens 1, 2–3, 4–7, …, ≥ 2^(CLASSES-1).
const CLASSES: usize = 16;

/// What the answered steps say about how long a step takes.
#[derive(Debug, Default)]
pub(crate) struct StepClock {
    /// Per size class: the moving average of answer seconds, once a step of it was answered.
    secs: [Option<f64>; CLASSES],
    /// The highest seconds per token of any class: the extrapolation for unseen sizes.
    worst_rate: Option<f64>,
}

/// The size class of a step of `tokens` tokens (a step of releases alone counts as 1).
fn class(tokens: usize) -> usize {
    (tokens.max(1).ilog2() as usize).min(CLASSES - 1)
}

impl StepClock {
    /// Records a step of `tokens` tokens answered `secs` after it was sent.
    pub(crate) fn observe(&mut self, tokens: usize, secs: f64) {
        if tokens == 0 || !secs.is_finite() || secs < 0.0 {
            return;
        }
        let slot = &mut self.secs[class(tokens)];
        let avg = match *slot {
            None => secs,
            Some(old) => old + SMOOTHING * (secs - old),
        };
        *slot = Some(avg);
        let rate = avg / tokens as f64;
        self.worst_rate = Some(self.worst_rate.map_or(rate, |w| w.max(rate)));
    }

    /// How long a step of `tokens` tokens may go unanswered, never less than `floor`.
    pub(crate) fn timeout(&self, tokens: usize, floor: Duration) -> Duration {
        let expected = match (self.secs[class(tokens)], self.worst_rate) {
            (Some(secs), _) => secs,
            (None, Some(rate)) => rate * tokens.max(1) as f64,
            (None, None) => return floor.max(COLD),
        };
        // Capped: a wild average must not make the deadline unrepresentable.
        floor.max(Duration::from_secs_f64((SLACK * expected).min(3600.0)))
    }
}

/// The workers among `plan_workers` that the heartbeats in `seen` show wedged after a step
/// went unanswered for `waited`: each on one step for at least half that long (and at least
/// `min_busy`, so a short timeout cannot blame an ordinary step).
fn wedged(
    plan_workers: &[String],
    seen: &HashMap<String, Seen>,
    waited: Duration,
    min_busy: Duration,
) -> Vec<(String, u64)> {
    let bound = (waited / 2).max(min_busy);
    plan_workers
        .iter()
        .filter_map(|id| {
            let busy = seen.get(id)?.step_busy_ms;
            (Duration::from_millis(busy) >= bound).then(|| (id.clone(), busy))
        })
        .collect()
}

/// Drops the workers of `plan_workers` that the heartbeats show wedged after step `step_id`
/// went unanswered for `waited` ([`wedged`]), each removal committed (bounded by the heartbeat
/// timeout: without a quorum it may never complete, and the stream is given up either way);
/// returns the text that names them for the lost stream's reason (empty when none).
pub(crate) async fn drop_wedged(
    cluster: &Cluster,
    plan_workers: &[String],
    step_id: u64,
    waited: Duration,
) -> String {
    let cfg = &cluster.cfg;
    let wedged = wedged(
        plan_workers,
        &cluster.liveness.snapshot(),
        waited,
        cfg.heartbeat_interval,
    );
    cluster.metrics.step_timed_out(wedged.len() as u64);
    for (id, busy_ms) in &wedged {
        tracing::error!(worker = %id, busy_ms, step = step_id,
            "worker wedged: its executor stays on one step while it heartbeats; dropping it");
        if tokio::time::timeout(cfg.heartbeat_timeout, cluster.drop_worker(id))
            .await
            .is_err()
        {
            tracing::warn!(worker = %id, "dropping the wedged worker did not commit in time");
        }
    }
    if wedged.is_empty() {
        String::new()
    } else {
        let ids: Vec<&str> = wedged.iter().map(|(id, _)| id.as_str()).collect();
        format!("; dropped wedged worker(s) {}", ids.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    const FLOOR: Duration = Duration::from_secs(2);

    /// Ensures that the timeout is COLD before any answer, the floor for ordinary measured
    /// steps, SLACK times the average for slow ones of a measured size, and extrapolated at
    /// the worst per-token rate for sizes not seen yet.
    #[test]
    fn timeout_follows_the_measured_steps() {
        let mut c = StepClock::default();
        assert_eq!(c.timeout(1, FLOOR), COLD);
        // Decode steps of 4 tokens, 20 ms each: the floor rules.
        for _ in 0..10 {
            c.observe(4, 0.020);
        }
        assert_eq!(c.timeout(4, FLOOR), FLOOR);
        assert_eq!(c.timeout(5, FLOOR), FLOOR, "same class as 4");
        // An unseen size: 5 ms per token (the worst rate) times 1024 tokens, times SLACK.
        let t = c.timeout(1024, FLOOR).as_secs_f64();
        assert!((t - SLACK * 0.005 * 1024.0).abs() < 1e-6, "{t}");
        // Prefill chunks of 512 tokens at 1.5 s: their own class, SLACK × 1.5 s.
        c.observe(512, 1.5);
        let t = c.timeout(512, FLOOR).as_secs_f64();
        assert!((t - SLACK * 1.5).abs() < 1e-6, "{t}");
        // The average moves by SMOOTHING toward each new answer.
        c.observe(512, 2.5);
        let t = c.timeout(600, FLOOR).as_secs_f64();
        assert!((t - SLACK * (1.5 + SMOOTHING * 1.0)).abs() < 1e-6, "{t}");
        // Steps of releases alone and nonsense are not measured.
        c.observe(0, 100.0);
        c.observe(4, f64::NAN);
        c.observe(4, -1.0);
        assert_eq!(c.timeout(4, FLOOR), FLOOR);
        // A step of releases alone: the class of 1 token, not seen, so the worst rate × 1.
        assert_eq!(c.timeout(0, FLOOR), FLOOR);
    }

    /// Ensures that only workers of the plan on one step for half the wait (and at least the
    /// minimum) are blamed, with what they reported.
    #[test]
    fn blames_the_worker_stuck_on_its_step() {
        let now = Instant::now();
        let busy = |ms| Seen {
            step_busy_ms: ms,
            ..Seen::at(now)
        };
        let seen: HashMap<String, Seen> = [
            ("w0".to_owned(), busy(0)),
            ("w1".to_owned(), busy(1900)),
            ("w2".to_owned(), busy(300)),
            ("w9".to_owned(), busy(9000)),
        ]
        .into();
        let plan: Vec<String> = ["w0", "w1", "w2", "w3"].map(str::to_owned).into();
        let got = wedged(
            &plan,
            &seen,
            Duration::from_secs(2),
            Duration::from_millis(500),
        );
        assert_eq!(
            got,
            vec![("w1".to_owned(), 1900)],
            "w9 is not in the plan, w3 unheard"
        );
        // A short wait cannot blame a step shorter than the minimum.
        let got = wedged(
            &plan,
            &seen,
            Duration::from_millis(400),
            Duration::from_millis(500),
        );
        assert_eq!(got, vec![("w1".to_owned(), 1900)]);
        let got = wedged(
            &plan,
            &seen,
            Duration::from_secs(10),
            Duration::from_millis(500),
        );
        assert!(got.is_empty(), "{got:?}");
    }
}
