//! Where a forward pass spends its time, by kind of operation.
//!
//! `tessera bench --profile` answers "what is left to make faster" with wall-clock time per
//! operation (projections, attention, norms, …) summed over a prefill and over a decode run.
//! The forward pass marks each operation with [`scope`]; while profiling is off (always, outside
//! the benchmark) a scope costs one relaxed atomic load, so the marks stay in the hot path.
//!
//! Times are wall-clock on the calling thread: an operation the thread pool runs in parallel
//! counts once, for as long as the caller waited for it, so the rows add up to the step's time.
//! Counters are process-wide; profile one engine at a time.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The operations a forward pass is broken into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Token embedding lookup.
    Embed,
    /// RMSNorm before attention, before the MLP, and the final one.
    Norm,
    /// Q, K and V projections (activation quantization included).
    QkvProj,
    /// RoPE, f16 rounding of K/V and the write into the paged cache.
    RopeKv,
    /// The attention kernel.
    Attention,
    /// Attention output projection.
    OutProj,
    /// MLP gate and up projections.
    GateUp,
    /// SiLU(gate) · up.
    Swiglu,
    /// MLP down projection.
    Down,
    /// Residual additions.
    Residual,
    /// Output head (logits).
    Head,
    /// Sampling, stop checks and detokenization.
    Sample,
}

impl Op {
    /// Every operation, in forward-pass order.
    pub const ALL: [Op; 12] = [
        Op::Embed,
        Op::Norm,
        Op::QkvProj,
        Op::RopeKv,
        Op::Attention,
        Op::OutProj,
        Op::GateUp,
        Op::Swiglu,
        Op::Down,
        Op::Residual,
        Op::Head,
        Op::Sample,
    ];

    /// A short name for tables.
    pub fn name(self) -> &'static str {
        match self {
            Op::Embed => "embed",
            Op::Norm => "rmsnorm",
            Op::QkvProj => "q/k/v proj",
            Op::RopeKv => "rope + kv write",
            Op::Attention => "attention",
            Op::OutProj => "out proj",
            Op::GateUp => "gate/up proj",
            Op::Swiglu => "swiglu",
            Op::Down => "down proj",
            Op::Residual => "residual add",
            Op::Head => "output head",
            Op::Sample => "sampling",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

const N: usize = Op::ALL.len();
static ENABLED: AtomicBool = AtomicBool::new(false);
static NANOS: [AtomicU64; N] = [const { AtomicU64::new(0) }; N];
static CALLS: [AtomicU64; N] = [const { AtomicU64::new(0) }; N];

/// Turns time collection on or off (off by default).
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Zeroes every counter.
pub fn reset() {
    for (n, c) in NANOS.iter().zip(&CALLS) {
        n.store(0, Ordering::Relaxed);
        c.store(0, Ordering::Relaxed);
    }
}

/// Marks an operation: the time until the returned guard drops is added to `op`'s counter
/// while profiling is on.
#[inline]
#[must_use = "the operation is timed until the guard drops"]
pub fn scope(op: Op) -> Scope {
    Scope(
        ENABLED
            .load(Ordering::Relaxed)
            .then(|| (op, Instant::now())),
    )
}

/// Guard returned by [`scope`].
pub struct Scope(Option<(Op, Instant)>);

impl Drop for Scope {
    fn drop(&mut self) {
        if let Some((op, start)) = self.0 {
            let nanos = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
            NANOS[op.index()].fetch_add(nanos, Ordering::Relaxed);
            CALLS[op.index()].fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The counters at one moment, against the wall time they were collected over.
#[derive(Debug, Clone)]
pub struct Profile {
    /// Time and number of calls per operation, in [`Op::ALL`] order.
    pub ops: Vec<(Op, Duration, u64)>,
    /// Wall time of the measured run; what the operations do not cover shows as "other".
    pub wall: Duration,
}

/// Reads the counters; `wall` is the measured run's wall time.
pub fn snapshot(wall: Duration) -> Profile {
    let ops = Op::ALL
        .iter()
        .map(|&op| {
            let i = op.index();
            (
                op,
                Duration::from_nanos(NANOS[i].load(Ordering::Relaxed)),
                CALLS[i].load(Ordering::Relaxed),
            )
        })
        .collect();
    Profile { ops, wall }
}

impl Profile {
    /// Time not covered by any marked operation (scheduling, bookkeeping, the caller).
    pub fn other(&self) -> Duration {
        let covered: Duration = self.ops.iter().map(|(_, d, _)| *d).sum();
        self.wall.saturating_sub(covered)
    }
}

impl fmt::Display for Profile {
    /// One line per operation, largest first: milliseconds, share of the wall time, calls.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let wall = self.wall.as_secs_f64().max(f64::MIN_POSITIVE);
        let mut rows: Vec<(&str, Duration, Option<u64>)> = self
            .ops
            .iter()
            .filter(|(_, _, calls)| *calls > 0)
            .map(|(op, d, calls)| (op.name(), *d, Some(*calls)))
            .collect();
        rows.sort_by_key(|r| std::cmp::Reverse(r.1));
        rows.push(("other", self.other(), None));
        for (name, d, calls) in rows {
            let ms = d.as_secs_f64() * 1e3;
            let share = 100.0 * d.as_secs_f64() / wall;
            match calls {
                Some(c) => writeln!(f, "  {name:<16} {ms:>9.2} ms {share:>5.1}%  {c:>7} calls")?,
                None => writeln!(f, "  {name:<16} {ms:>9.2} ms {share:>5.1}%")?,
            }
        }
        write!(f, "  {:<16} {:>9.2} ms", "total", wall * 1e3)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ensures that scopes count only while profiling is on, and that "other" is the wall time
    /// the marked operations leave uncovered.
    #[test]
    fn scopes_count_only_when_enabled() {
        // The counters are global and other tests may run forward passes meanwhile, so the
        // checks while enabled are lower bounds.
        set_enabled(false);
        reset();
        drop(scope(Op::Swiglu));
        let p = snapshot(Duration::from_millis(5));
        assert!(p.ops.iter().all(|(_, d, c)| *c == 0 && d.is_zero()));
        assert_eq!(p.other(), Duration::from_millis(5));

        set_enabled(true);
        {
            let _s = scope(Op::Swiglu);
            std::thread::sleep(Duration::from_millis(2));
        }
        set_enabled(false);
        let p = snapshot(Duration::from_secs(1));
        let (_, d, c) = p.ops[Op::Swiglu.index()];
        assert!(c >= 1);
        assert!(d >= Duration::from_millis(2), "{d:?}");
        assert!(p.other() <= Duration::from_secs(1) - d);
        let table = p.to_string();
        assert!(
            table.contains("swiglu") && table.contains("other"),
            "{table}"
        );
        reset();
    }
}
