//! The compute thread pool every kernel runs on.
//!
//! Kernels split their work into independent tasks and call [`ThreadPool::for_each`]; the pool
//! is created once per engine, sized to the machine unless configured, so no thread is spawned
//! on the hot path.
//!
//! A decode step makes a few hundred parallel calls of some tens of microseconds each, so the
//! fixed cost of a call decides decode speed as much as the kernels do: rayon's ~19 µs per call
//! was a quarter of a decode step. Here the calling thread works too, tasks are handed out by
//! one atomic counter, and idle workers spin briefly (the next call usually follows within
//! microseconds) before they sleep on a condition variable.
//!
//! Protocol, chosen to be easy to reason about rather than clever: every call *publishes* a new
//! epoch, and every worker *checks out* of every epoch before the caller returns, whether it
//! ran tasks or not. So a worker can never see a call's closure after that call returned (the
//! closure lives on the caller's stack), never miss an epoch (the next one is published only
//! after it checked out of this one), and never run a task of one call with another call's
//! counter. The price is that a call waits for a sleeping worker to wake up, even when the
//! caller did all the work; with decode's back-to-back calls workers are spinning, not asleep.

use std::any::Any;
use std::cell::{Cell, UnsafeCell};
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;

use crate::error::{KernelError, Result};

/// Spin iterations an idle worker polls for a new call before it sleeps (a `pause` is tens of
/// nanoseconds, so this is well under a millisecond).
const SPIN_BEFORE_SLEEP: u32 = 1 << 14;
/// Spin iterations the caller polls for workers to check out before it starts yielding its
/// core (which a preempted worker may need).
const SPIN_BEFORE_YIELD: u32 = 1 << 12;

/// A call's task function, its lifetime erased (see [`Shared::job`]).
type Job = &'static (dyn Fn(usize) + Sync);

thread_local! {
    /// Set on pool workers, and on a caller while its call runs: a `for_each` from such a thread
    /// (a task calling back into a pool) runs serially instead of waiting on busy workers.
    static IN_POOL: Cell<bool> = const { Cell::new(false) };
}

/// State shared by the caller and the workers.
struct Shared {
    /// Number of calls published so far; workers wait for it to move.
    epoch: AtomicU64,
    /// The current call's closure and task count. Written by the caller only while no worker is
    /// inside a call (all checked out of the previous epoch), read by workers only between
    /// seeing a new epoch and checking out of it.
    job: UnsafeCell<Option<(Job, usize)>>,
    /// Next task index of the current call.
    next: AtomicUsize,
    /// Workers that have not yet checked out of the current call.
    pending: AtomicUsize,
    /// The first panic of the current call's tasks, re-raised on the calling thread.
    panic: Mutex<Option<Box<dyn Any + Send>>>,
    /// Workers asleep (or about to sleep) on `wake`.
    sleepers: AtomicUsize,
    /// Set once, when the pool is dropped.
    shutdown: AtomicBool,
    lock: Mutex<()>,
    wake: Condvar,
}

// SAFETY: `job` is the only non-Sync field; the epoch protocol (module docs) orders every
// write of it before the epoch's publication (release) and every read after seeing it (acquire)
// and before the checkout (release) that the next write waits for (acquire).
unsafe impl Sync for Shared {}

impl Shared {
    /// Claims and runs tasks of the current call until none are left.
    fn run_tasks(&self, job: Job, n_tasks: usize) {
        loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            if i >= n_tasks {
                return;
            }
            if let Err(payload) = catch_unwind(AssertUnwindSafe(|| job(i))) {
                let mut first = self.panic.lock().unwrap_or_else(PoisonError::into_inner);
                first.get_or_insert(payload);
            }
        }
    }

    /// A worker's life: wait for the next epoch, help with it, check out, repeat.
    fn worker_loop(&self) {
        IN_POOL.with(|c| c.set(true));
        // Epochs start at 0 and the pool publishes nothing before its workers exist, so 0 is
        // the last epoch seen even if this thread starts after the first call was published.
        let mut seen = 0u64;
        loop {
            if !self.wait_for_epoch(seen) {
                return;
            }
            seen += 1;
            // SAFETY: epoch `seen` is published (acquire in wait_for_epoch) and we have not
            // checked out of it, so the caller neither rewrites nor drops the job meanwhile.
            if let Some((job, n)) = unsafe { *self.job.get() } {
                self.run_tasks(job, n);
            }
            self.pending.fetch_sub(1, Ordering::Release);
        }
    }

    /// Waits until an epoch after `seen` is published (true) or the pool shuts down (false).
    fn wait_for_epoch(&self, seen: u64) -> bool {
        let mut spins = 0u32;
        loop {
            if self.epoch.load(Ordering::Acquire) != seen {
                return true;
            }
            if self.shutdown.load(Ordering::Acquire) {
                return false;
            }
            if spins < SPIN_BEFORE_SLEEP {
                spins += 1;
                std::hint::spin_loop();
                continue;
            }
            // Register as a sleeper, then re-check under the lock: a caller that publishes after
            // this check sees `sleepers > 0` and notifies under the same lock, so the wake-up
            // cannot fall between the check and the wait.
            let guard = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
            self.sleepers.fetch_add(1, Ordering::SeqCst);
            let idle =
                self.epoch.load(Ordering::SeqCst) == seen && !self.shutdown.load(Ordering::SeqCst);
            let guard = if idle {
                self.wake
                    .wait(guard)
                    .unwrap_or_else(PoisonError::into_inner)
            } else {
                guard
            };
            self.sleepers.fetch_sub(1, Ordering::SeqCst);
            drop(guard);
            spins = 0;
        }
    }

    /// Wakes every sleeping worker.
    fn wake_all(&self) {
        let _guard = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
        self.wake.notify_all();
    }
}

/// A fixed set of compute threads.
///
/// Cloning is not offered on purpose: an engine owns one pool and lends `&ThreadPool` to its
/// kernels, so two engines never oversubscribe the cores by accident.
pub struct ThreadPool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    /// Serialises calls from different threads (each call owns the protocol state while it
    /// runs).
    call: Mutex<()>,
    n_threads: usize,
}

impl std::fmt::Debug for ThreadPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThreadPool")
            .field("n_threads", &self.n_threads)
            .finish()
    }
}

impl ThreadPool {
    /// A pool of `n_threads` compute threads, the caller of [`ThreadPool::for_each`] counting
    /// as one of them; `0` means one per available core.
    ///
    /// # Errors
    /// [`KernelError::ThreadPool`] when the operating system refuses to start the threads.
    pub fn new(n_threads: usize) -> Result<Self> {
        let n_threads = if n_threads == 0 {
            default_threads()
        } else {
            n_threads
        };
        let shared = Arc::new(Shared {
            epoch: AtomicU64::new(0),
            job: UnsafeCell::new(None),
            next: AtomicUsize::new(0),
            pending: AtomicUsize::new(0),
            panic: Mutex::new(None),
            sleepers: AtomicUsize::new(0),
            shutdown: AtomicBool::new(false),
            lock: Mutex::new(()),
            wake: Condvar::new(),
        });
        let mut pool = Self {
            shared,
            workers: Vec::new(),
            call: Mutex::new(()),
            n_threads,
        };
        for i in 1..n_threads {
            let shared = Arc::clone(&pool.shared);
            let handle = std::thread::Builder::new()
                .name(format!("tessera-compute-{i}"))
                .spawn(move || shared.worker_loop())
                .map_err(|e| KernelError::ThreadPool(e.to_string()))?;
            // On an early return `pool` is dropped, which stops the threads started so far.
            pool.workers.push(handle);
        }
        Ok(pool)
    }

    /// How many threads run tasks.
    pub fn n_threads(&self) -> usize {
        self.n_threads
    }

    /// Runs `f(i)` for every `i in 0..n_tasks`, spread over the pool, and returns when all are
    /// done. Tasks must be independent; their order is unspecified. A call from inside a task
    /// runs serially on that thread; calls from several threads take turns.
    ///
    /// # Panics
    /// When a task panics: the panic is caught, every other task still runs, and the first
    /// panic is re-raised here; the pool stays usable.
    pub fn for_each<F>(&self, n_tasks: usize, f: F)
    where
        F: Fn(usize) + Sync + Send,
    {
        match n_tasks {
            0 => return,
            1 => return f(0),
            _ if self.workers.is_empty() || IN_POOL.with(Cell::get) => {
                return (0..n_tasks).for_each(f);
            }
            _ => {}
        }
        let call = self.call.lock().unwrap_or_else(PoisonError::into_inner);
        let s = &*self.shared;
        let job: &(dyn Fn(usize) + Sync) = &f;
        // SAFETY: the erased lifetime is never observed past this call: workers read the job
        // only inside this epoch, which we wait for every worker to check out of, and we clear
        // it before returning.
        let job: Job = unsafe { std::mem::transmute::<&(dyn Fn(usize) + Sync), Job>(job) };
        // SAFETY: every worker checked out of the previous epoch (we waited for `pending` to
        // reach 0 with acquire), and no other caller runs (we hold `call`).
        unsafe { *s.job.get() = Some((job, n_tasks)) };
        s.next.store(0, Ordering::Relaxed);
        s.pending.store(self.workers.len(), Ordering::Relaxed);
        // Publishing the epoch releases the stores above to every worker that sees it.
        s.epoch.fetch_add(1, Ordering::SeqCst);
        if s.sleepers.load(Ordering::SeqCst) > 0 {
            s.wake_all();
        }
        IN_POOL.with(|c| c.set(true));
        s.run_tasks(job, n_tasks);
        IN_POOL.with(|c| c.set(false));
        let mut spins = 0u32;
        while s.pending.load(Ordering::Acquire) != 0 {
            // The remaining tasks run on workers; yield if they take long, so a worker that
            // shares our core can finish.
            if spins < SPIN_BEFORE_YIELD {
                spins += 1;
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        // SAFETY: every worker checked out (acquire above); nobody reads the job until the next
        // publication.
        unsafe { *s.job.get() = None };
        let panic = s
            .panic
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(payload) = panic {
            drop(call);
            resume_unwind(payload);
        }
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        self.shared.wake_all();
        for w in self.workers.drain(..) {
            // Tasks' panics are caught, so a worker never panics and a join error has nothing
            // to report.
            let _ = w.join();
        }
    }
}

/// One thread per core the process may use.
pub fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::panic::{AssertUnwindSafe, catch_unwind};
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Ensures that every task index runs exactly once, whatever the pool size.
    #[test]
    fn runs_each_task_once() {
        for threads in [1, 2, 3] {
            let pool = ThreadPool::new(threads).expect("pool");
            let hits: Vec<AtomicUsize> = (0..97).map(|_| AtomicUsize::new(0)).collect();
            pool.for_each(hits.len(), |i| {
                hits[i].fetch_add(1, Ordering::Relaxed);
            });
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
        }
    }

    /// Ensures that many back-to-back calls (the decode pattern), including after workers fell
    /// asleep, never lose, repeat or mix up tasks between calls.
    #[test]
    fn back_to_back_calls_stay_exact() {
        let pool = ThreadPool::new(3).expect("pool");
        for round in 0..3000usize {
            let n = 2 + round % 13;
            let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
            pool.for_each(n, |i| {
                hits[i].fetch_add(round + 1, Ordering::Relaxed);
            });
            assert!(
                hits.iter().all(|h| h.load(Ordering::Relaxed) == round + 1),
                "round {round}"
            );
            if round % 1000 == 999 {
                // Long enough for the workers to stop spinning and sleep.
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        }
    }

    /// Ensures that pools far outnumbering the cores (threads preempted mid-call, workers
    /// falling asleep and waking late) still run every task of every call exactly once.
    #[test]
    fn oversubscribed_pools_stay_exact() {
        std::thread::scope(|sc| {
            for p in 0..4usize {
                sc.spawn(move || {
                    let pool = ThreadPool::new(3).expect("pool");
                    for round in 0..1500usize {
                        let n = 2 + (round * 7 + p) % 17;
                        let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
                        pool.for_each(n, |i| {
                            hits[i].fetch_add(1, Ordering::Relaxed);
                        });
                        assert!(
                            hits.iter().all(|h| h.load(Ordering::Relaxed) == 1),
                            "pool {p} round {round}"
                        );
                        if round % 500 == 250 {
                            std::thread::sleep(std::time::Duration::from_millis(5));
                        }
                    }
                });
            }
        });
    }

    /// Ensures that a call made right after the pool starts, before its workers have run at
    /// all, completes (workers start from epoch 0 whatever they missed).
    #[test]
    fn first_call_does_not_wait_for_thread_start() {
        for _ in 0..50 {
            let pool = ThreadPool::new(4).expect("pool");
            let n = AtomicUsize::new(0);
            pool.for_each(9, |_| {
                n.fetch_add(1, Ordering::Relaxed);
            });
            assert_eq!(n.load(Ordering::Relaxed), 9);
        }
    }

    /// Ensures that two threads sharing one pool get correct, separate results.
    #[test]
    fn concurrent_callers_get_their_own_results() {
        let pool = ThreadPool::new(2).expect("pool");
        std::thread::scope(|sc| {
            for c in 0..2usize {
                let pool = &pool;
                sc.spawn(move || {
                    for _ in 0..500 {
                        let sum = AtomicUsize::new(0);
                        pool.for_each(10, |i| {
                            sum.fetch_add(i + c, Ordering::Relaxed);
                        });
                        assert_eq!(sum.load(Ordering::Relaxed), 45 + 10 * c);
                    }
                });
            }
        });
    }

    /// Ensures that a task may itself call `for_each` (it runs serially) without deadlock.
    #[test]
    fn nested_calls_run_inline() {
        let pool = ThreadPool::new(2).expect("pool");
        let sum = AtomicUsize::new(0);
        pool.for_each(4, |i| {
            pool.for_each(3, |j| {
                sum.fetch_add(10 * i + j, Ordering::Relaxed);
            });
        });
        assert_eq!(sum.load(Ordering::Relaxed), 3 * 10 * 6 + 4 * 3);
    }

    /// Ensures that a panicking task is reported to the caller, and the pool stays usable.
    #[test]
    fn task_panic_reaches_caller() {
        let pool = ThreadPool::new(2).expect("pool");
        let r = catch_unwind(AssertUnwindSafe(|| {
            pool.for_each(8, |i| assert!(i != 5, "task 5 fails"));
        }));
        assert!(r.is_err());
        let n = AtomicUsize::new(0);
        pool.for_each(8, |_| {
            n.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(n.load(Ordering::Relaxed), 8);
    }
}
