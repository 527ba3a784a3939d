//! Keeping `tessera up`'s children running: a coordinator or worker that exits, crashes or is
//! killed is started again with the same arguments (same ports, name and Raft data directory),
//! after a backoff that grows while it keeps failing, so that `up` behaves like a small
//! cluster under an orchestrator and is a place to try failures (`kill -9`, `kill -STOP`) by
//! hand. A stopped (`SIGSTOP`) child has not exited: it is left alone, and the cluster sees a
//! silent member until it is continued.
//!
//! Optionally ([`Chaos`]) the supervisor itself kills a random child now and then.

use std::collections::hash_map::RandomState;
use std::convert::Infallible;
use std::hash::{BuildHasher, Hasher};
use std::net::SocketAddr;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Child;
use tokio::time::Instant;

use super::child::{forward, spawn};

/// How long a child waits before it is started again: 0.5 s after its first failure, doubling
/// with each failure up to 10 s, and back to 0.5 s once a run has lasted 30 s (a child that
/// dies now and then is restarted at once; one that cannot start does not spin).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Backoff {
    next: Duration,
}

impl Backoff {
    /// The first delay.
    pub const FIRST: Duration = Duration::from_millis(500);
    /// The longest delay.
    pub const MAX: Duration = Duration::from_secs(10);
    /// A run at least this long was a success: the next delay starts again at [`Self::FIRST`].
    pub const HEALTHY: Duration = Duration::from_secs(30);

    /// A backoff at its first delay.
    pub fn new() -> Self {
        Self { next: Self::FIRST }
    }

    /// The delay before the next start of a child that ran for `ran` (zero: it did not start).
    pub fn after_exit(&mut self, ran: Duration) -> Duration {
        if ran >= Self::HEALTHY {
            self.next = Self::FIRST;
        }
        let delay = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        delay
    }
}

/// One child of the cluster under supervision.
pub(crate) struct Member {
    /// How logs name it: `coordinator 1`, `worker 0`.
    pub what: String,
    /// Its `tessera` arguments, the same at every start.
    args: Vec<String>,
    /// Where it serves Prometheus metrics, when it does.
    pub metrics: Option<SocketAddr>,
    /// The running process; `None` while it waits to be started again.
    child: Option<Child>,
    /// When the running process was started.
    started: Instant,
    /// When to start it again, while it is down.
    restart_at: Option<Instant>,
    backoff: Backoff,
    /// Where the addresses it listens on after a restart are added.
    addresses: Option<Addresses>,
}

/// Every address the cluster's workers have listened on in this run, restarts included: what
/// tells this run's workers from those an earlier run's kept state still names.
pub(crate) type Addresses = Arc<Mutex<Vec<String>>>;

impl Member {
    /// A child started (and listening) with `args`; with `addresses`, the addresses it
    /// listens on after restarts are added there.
    pub fn new(
        what: String,
        args: Vec<String>,
        metrics: Option<SocketAddr>,
        child: Child,
        addresses: Option<Addresses>,
    ) -> Self {
        Self {
            what,
            args,
            metrics,
            child: Some(child),
            started: Instant::now(),
            restart_at: None,
            backoff: Backoff::new(),
            addresses,
        }
    }

    /// Its process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    /// Notes an exit and schedules the restart, or starts it again when that is due.
    fn check(&mut self, now: Instant) {
        if let Some(child) = &mut self.child {
            // An error here (the process cannot be waited for) is not an exit: look again
            // next time.
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                let delay = self.backoff.after_exit(now - self.started);
                eprintln!(
                    "{} exited ({}); restarting in {:.1}s",
                    self.what,
                    describe(status),
                    delay.as_secs_f64()
                );
                self.restart_at = Some(now + delay);
            }
            return;
        }
        if self.restart_at.is_some_and(|at| now >= at) {
            self.restart(now);
        }
    }

    /// Starts the child again with its arguments; a failure to start is retried after the
    /// next backoff.
    fn restart(&mut self, now: Instant) {
        match spawn(&self.args) {
            Ok(mut child) => {
                let pid = child.id().unwrap_or_default();
                eprintln!("{} restarted: pid {pid}", self.what);
                if let Some(stdout) = child.stdout.take() {
                    tokio::spawn(announce(self.what.clone(), stdout, self.addresses.clone()));
                }
                self.child = Some(child);
                self.started = now;
                self.restart_at = None;
            }
            Err(e) => {
                let delay = self.backoff.after_exit(Duration::ZERO);
                eprintln!(
                    "{} did not start: {e:#}; retrying in {:.1}s",
                    self.what,
                    delay.as_secs_f64()
                );
                self.restart_at = Some(now + delay);
            }
        }
    }

    /// Kills the child (`SIGKILL`), as a crash would; the supervisor then restarts it.
    fn kill(&mut self) -> Option<u32> {
        let child = self.child.as_mut()?;
        let pid = child.id();
        child.start_kill().ok()?;
        pid
    }

    /// Closes the child's stdin, its signal to stop (it was started with
    /// `--exit-on-stdin-eof`); nothing when it is not running.
    pub fn ask_to_stop(&mut self) {
        if let Some(child) = &mut self.child {
            drop(child.stdin.take());
        }
    }

    /// Waits up to `grace` for the child to exit, then kills it.
    pub async fn stop(&mut self, grace: Duration) {
        self.restart_at = None;
        if let Some(child) = &mut self.child
            && tokio::time::timeout(grace, child.wait()).await.is_err()
        {
            let _ = child.kill().await;
        }
        self.child = None;
    }
}

/// Reads a restarted child's stdout: its start lines are not repeated (the ports it was given
/// are the same as before), its "listening on" line is reported as the child being back (and
/// the address added to `addresses`), and what follows is forwarded as for a first start.
async fn announce(what: String, stdout: tokio::process::ChildStdout, addresses: Option<Addresses>) {
    let mut lines = BufReader::new(stdout).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if let Some(addr) = line.split("listening on ").nth(1) {
            eprintln!("{what} is back: {}", line.trim());
            if let Some(a) = &addresses {
                a.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(addr.trim().to_owned());
            }
            forward(lines).await;
            return;
        }
    }
}

/// An exit status as the restart log line spells it: `signal 9`, `exit code 1`.
fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(sig)) => format!("signal {sig}"),
        (None, None) => status.to_string(),
    }
}

/// `--chaos-interval`: every `every`, one running child, picked at random, is killed with
/// `SIGKILL`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Chaos {
    /// The time between kills.
    pub every: Duration,
}

/// A random number from the standard library's per-process random hash keys (no dependency
/// for a pick that needs no quality).
fn random(salt: u64) -> u64 {
    let mut h = RandomState::new().build_hasher();
    h.write_u64(salt);
    h.finish()
}

/// Supervises `members` until the future is dropped: every 200 ms each child is checked for
/// an exit and restarted when due; with `chaos`, a random child is killed at every interval.
pub(crate) async fn supervise(members: &mut [Member], chaos: Option<Chaos>) -> Infallible {
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut next_kill = chaos.map(|c| Instant::now() + c.every);
    let mut kills = 0u64;
    loop {
        tick.tick().await;
        let now = Instant::now();
        for m in members.iter_mut() {
            m.check(now);
        }
        if let (Some(c), Some(at)) = (chaos, next_kill)
            && now >= at
        {
            next_kill = Some(now + c.every);
            kills += 1;
            let running: Vec<usize> = (0..members.len())
                .filter(|&i| members[i].pid().is_some())
                .collect();
            if running.is_empty() {
                continue;
            }
            // The pick only has to be unpredictable, not uniform to the last bit.
            let i = running[(random(kills) % running.len() as u64) as usize];
            if let Some(pid) = members[i].kill() {
                eprintln!("chaos: killed {} (pid {pid})", members[i].what);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ensures that the backoff doubles from 0.5 s to at most 10 s while a child keeps
    /// failing, and starts again at 0.5 s after a run of 30 s.
    #[test]
    fn backoff_doubles_to_a_cap_and_resets_after_a_long_run() {
        let mut b = Backoff::new();
        let short = Duration::from_secs(1);
        let delays: Vec<f64> = (0..7).map(|_| b.after_exit(short).as_secs_f64()).collect();
        assert_eq!(delays, [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]);
        assert_eq!(b.after_exit(Backoff::HEALTHY), Backoff::FIRST);
        assert_eq!(b.after_exit(Duration::ZERO), Duration::from_secs(1));
    }

    /// Ensures that exits read as the restart log spells them.
    #[test]
    fn exit_statuses_are_described() {
        assert_eq!(describe(ExitStatus::from_raw(9)), "signal 9");
        assert_eq!(describe(ExitStatus::from_raw(1 << 8)), "exit code 1");
    }
}
