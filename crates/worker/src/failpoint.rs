//! Failpoints: faults a test arms in a worker process to show that the cluster survives them.
//! Only the hidden `--failpoint` flag of `tessera worker` arms one; without it (always in
//! production) every check is a test of `None`.
//!
//! `wedge-at-step=N` stops the executor thread for good when it is handed its N-th step that
//! carries tokens (counted from 1, this process's steps of every stream), before computing it —
//! as a deadlock in a kernel or a hung device would. Everything else stays up: the gRPC server,
//! the heartbeats (which report the step's growing `step_busy_ms`) and the metrics. That is
//! the failure a heartbeat alone cannot see; the coordinator's step timeout must find it, drop
//! this worker and migrate its requests, and the worker must not register again while its
//! executor does not answer (see `register.rs`).

use std::str::FromStr;

/// A fault to inject.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failpoint {
    /// Wedge the executor on its N-th step with tokens (N ≥ 1).
    WedgeAtStep(u64),
}

impl FromStr for Failpoint {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("failpoint {s:?}: expected wedge-at-step=N with N ≥ 1");
        let (name, value) = s.split_once('=').ok_or_else(bad)?;
        match name {
            "wedge-at-step" => match value.parse::<u64>() {
                Ok(n) if n >= 1 => Ok(Self::WedgeAtStep(n)),
                _ => Err(bad()),
            },
            _ => Err(bad()),
        }
    }
}

/// The executor thread's view of its failpoint: counts the steps and says when to wedge.
#[derive(Debug, Default)]
pub(crate) struct Armed {
    point: Option<Failpoint>,
    steps: u64,
}

impl Armed {
    pub(crate) fn new(point: Option<Failpoint>) -> Self {
        Self { point, steps: 0 }
    }

    /// Counts a step carrying `tokens`; wedges the calling thread for good when it is the
    /// armed one. Returns otherwise.
    pub(crate) fn on_step(&mut self, tokens: usize) {
        let Some(Failpoint::WedgeAtStep(n)) = self.point else {
            return;
        };
        if tokens == 0 {
            return;
        }
        self.steps += 1;
        if self.steps == n {
            tracing::error!(
                step = n,
                "failpoint wedge-at-step: the executor stops here for good"
            );
            // Parked, not ended: the thread and whatever it holds stay, as in a deadlock.
            // `park` may wake spuriously, hence the loop.
            loop {
                std::thread::park();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ensures that the flag's values parse, and that malformed ones are refused with a message
    /// naming the expected form.
    #[test]
    fn parses_the_flag() {
        assert_eq!(
            "wedge-at-step=7".parse::<Failpoint>(),
            Ok(Failpoint::WedgeAtStep(7))
        );
        for bad in [
            "wedge-at-step=0",
            "wedge-at-step=x",
            "wedge-at-step",
            "crash=1",
            "",
        ] {
            let e = bad.parse::<Failpoint>().expect_err(bad);
            assert!(e.contains("wedge-at-step=N"), "{e}");
        }
    }

    /// Ensures that steps of releases alone are not counted and that an unarmed failpoint
    /// never wedges.
    #[test]
    fn counts_only_steps_with_tokens() {
        let mut none = Armed::new(None);
        for _ in 0..100 {
            none.on_step(5);
        }
        let mut armed = Armed::new(Some(Failpoint::WedgeAtStep(3)));
        armed.on_step(0);
        armed.on_step(4);
        armed.on_step(0);
        armed.on_step(1);
        assert_eq!(armed.steps, 2);
    }
}
