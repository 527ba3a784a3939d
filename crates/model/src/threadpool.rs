//! The compute thread pool every kernel runs on.
//!
//! Kernels split their work into independent tasks and call [`ThreadPool::for_each`]; the pool
//! is created once per engine, sized to the machine unless configured, so no thread is spawned
//! on the hot path.
//!
//! A decode step makes ~200 small parallel calls of a few tens of microseconds each, so the
//! fixed cost of one call matters more than anything else here. The pool therefore hands work
//! out through one atomic counter, the calling thread works too, and idle workers spin briefly
//! (a call usually follows within microseconds) before sleeping on a condition variable. With
//! rayon a call of eight empty tasks on two threads cost ~19 µs on the (shared, loaded) 2-core
//! development machine; with this pool it costs ~0.4 µs (`quant::bench`).
//!
//! Protocol: a call publishes its closure and task count, then stores `(epoch << 32) | 0` into
//! `next`. Workers claim a task index with a compare-exchange that also checks the epoch, so a
//! worker that woke late for an earlier call can never claim (or run) a task of a newer one,
//! and the closure, which lives on the caller's stack, is only called for claimed indices of the
//! current call, which the caller waits for before returning.

use crate::error::{ModelError, Result};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError, TryLockError};
use std::thread::JoinHandle;

/// Spin iterations an idle worker polls for new work before it goes to sleep (~tens of µs).
const SPIN_BEFORE_SLEEP: u32 = 1 << 14;

/// The task function of the current call: `*const &(dyn Fn(usize) + Sync)` behind a thin
/// pointer, so it fits an atomic.
type JobRef<'a> = &'a (dyn Fn(usize) + Sync);

/// State shared by the caller and the workers.
struct Shared {
    /// `(epoch << 32) | next task index` of the current call.
    next: AtomicU64,
    /// The current call's closure (a pointer to a `JobRef` on the caller's stack).
    job: AtomicPtr<()>,
    /// The current call's task count.
    n_tasks: AtomicUsize,
    /// Tasks of the current call that have finished.
    done: AtomicUsize,
    /// Whether a task of the current call panicked (re-raised on the calling thread).
    panicked: AtomicBool,
    /// Workers asleep (or about to sleep) on `wake`.
    sleepers: AtomicUsize,
    /// Set once, when the pool is dropped.
    shutdown: AtomicBool,
    lock: Mutex<()>,
    wake: Condvar,
}

impl Shared {
    /// Claims and runs tasks of the call with `epoch` until none are left.
    fn work(&self, epoch: u64) {
        loop {
            let cur = self.next.load(Ordering::Acquire);
            if cur >> 32 != epoch & 0xFFFF_FFFF {
                return;
            }
            let idx = (cur & 0xFFFF_FFFF) as usize;
            if idx >= self.n_tasks.load(Ordering::Acquire) {
                return;
            }
            if self
                .next
                .compare_exchange_weak(cur, cur + 1, Ordering::AcqRel, Ordering::Relaxed)
                .is_err()
            {
                continue;
            }
            let job = self.job.load(Ordering::Acquire) as *const JobRef<'_>;
            // SAFETY: task idx < n_tasks of the current epoch was claimed, so the caller is
            // still inside `for_each` waiting for it and the closure it points to is alive.
            let f = unsafe { &*job };
            if catch_unwind(AssertUnwindSafe(|| f(idx))).is_err() {
                self.panicked.store(true, Ordering::Relaxed);
            }
            self.done.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// A worker's life: wait for a new epoch, help with it, repeat until shutdown.
    fn worker_loop(&self) {
        let mut seen = self.next.load(Ordering::Acquire) >> 32;
        loop {
            let mut spins = 0u32;
            let epoch = loop {
                if self.shutdown.load(Ordering::Acquire) {
                    return;
                }
                let e = self.next.load(Ordering::Acquire) >> 32;
                if e != seen {
                    break e;
                }
                if spins < SPIN_BEFORE_SLEEP {
                    spins += 1;
                    std::hint::spin_loop();
                    continue;
                }
                // Register as a sleeper, then re-check under the lock: a caller that published
                // after our check sees `sleepers > 0` and notifies while we hold or wait on it.
                let guard = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
                self.sleepers.fetch_add(1, Ordering::SeqCst);
                let stale = self.next.load(Ordering::SeqCst) >> 32 == seen
                    && !self.shutdown.load(Ordering::SeqCst);
                let guard = if stale {
                    self.wake
                        .wait(guard)
                        .unwrap_or_else(PoisonError::into_inner)
                } else {
                    guard
                };
                self.sleepers.fetch_sub(1, Ordering::SeqCst);
                drop(guard);
                spins = 0;
            };
            seen = epoch;
            self.work(epoch);
        }
    }
}

/// A fixed set of compute threads.
///
/// Cloning is not offered on purpose: an engine owns one pool and lends `&ThreadPool` to its
/// kernels, so two engines never oversubscribe the cores by accident.
pub struct ThreadPool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    n_threads: usize,
    /// Held by the running call (each call owns the protocol state while it runs).
    call: Mutex<()>,
}

impl std::fmt::Debug for ThreadPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThreadPool")
            .field("n_threads", &self.n_threads)
            .finish()
    }
}

impl ThreadPool {
    /// A pool of `n_threads` compute threads (the caller of [`ThreadPool::for_each`] counts as
    /// one of them); `0` means one per available core.
    ///
    /// # Errors
    /// [`ModelError::ThreadPool`] when the operating system refuses to start the threads.
    pub fn new(n_threads: usize) -> Result<Self> {
        let n_threads = if n_threads == 0 {
            default_threads()
        } else {
            n_threads
        };
        let shared = Arc::new(Shared {
            next: AtomicU64::new(0),
            job: AtomicPtr::new(std::ptr::null_mut()),
            n_tasks: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            sleepers: AtomicUsize::new(0),
            shutdown: AtomicBool::new(false),
            lock: Mutex::new(()),
            wake: Condvar::new(),
        });
        let mut pool = Self {
            shared,
            workers: Vec::new(),
            n_threads,
            call: Mutex::new(()),
        };
        for i in 1..n_threads {
            let shared = Arc::clone(&pool.shared);
            let handle = std::thread::Builder::new()
                .name(format!("tessera-compute-{i}"))
                .spawn(move || shared.worker_loop())
                .map_err(|e| ModelError::ThreadPool(e.to_string()))?;
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
    /// done. Tasks must be independent; their order is unspecified.
    ///
    /// # Panics
    /// When a task panics: the panic is caught on the worker and re-raised here once every
    /// task has finished.
    pub fn for_each<F>(&self, n_tasks: usize, f: F)
    where
        F: Fn(usize) + Sync + Send,
    {
        match n_tasks {
            0 => return,
            1 => return f(0),
            _ if self.n_threads == 1 => return (0..n_tasks).for_each(f),
            _ => {}
        }
        assert!(
            n_tasks < 1 << 32,
            "for_each: {n_tasks} tasks exceeds the pool's 2^32 limit"
        );
        // A call from inside a task (nested) or from a second thread while one runs would wait
        // on workers that are busy with, or blocked behind, the running call: run it serially
        // on the calling thread instead.
        let _call = match self.call.try_lock() {
            Ok(g) => g,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => return (0..n_tasks).for_each(f),
        };
        let s = &*self.shared;
        let job: JobRef<'_> = &f;
        let epoch = (s.next.load(Ordering::Acquire) >> 32) + 1;
        s.done.store(0, Ordering::Relaxed);
        s.panicked.store(false, Ordering::Relaxed);
        s.n_tasks.store(n_tasks, Ordering::Relaxed);
        s.job
            .store(&job as *const JobRef<'_> as *mut (), Ordering::Relaxed);
        // Publishing the new epoch releases the stores above to every worker that sees it.
        s.next.store((epoch & 0xFFFF_FFFF) << 32, Ordering::SeqCst);
        if s.sleepers.load(Ordering::SeqCst) > 0 {
            let _guard = s.lock.lock().unwrap_or_else(PoisonError::into_inner);
            s.wake.notify_all();
        }
        s.work(epoch);
        let mut spins = 0u32;
        while s.done.load(Ordering::Acquire) < n_tasks {
            // The remaining tasks are running on workers; yield if they take long so a worker
            // sharing our core can finish.
            if spins < SPIN_BEFORE_SLEEP {
                spins += 1;
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        if s.panicked.load(Ordering::Relaxed) {
            panic!("a ThreadPool task panicked");
        }
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        {
            let _guard = self
                .shared
                .lock
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            self.shared.wake.notify_all();
        }
        for w in self.workers.drain(..) {
            // A worker never panics (tasks are caught), so a join error has nothing to report.
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
