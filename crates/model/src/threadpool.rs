//! The compute thread pool every kernel runs on.
//!
//! Kernels split their work into independent tasks and call [`ThreadPool::for_each`]; the pool
//! is created once per engine, sized to the machine unless configured, so no thread is spawned
//! on the hot path.
//!
//! It is rayon underneath. A custom spin-then-sleep pool measured ~0.4 µs per call against
//! rayon's ~19 µs (a decode step makes ~200 calls), but its stress test lost or repeated a task
//! under heavy preemption, so it was withdrawn until that race is found: correctness first.

use crate::error::{ModelError, Result};

/// A fixed set of compute threads.
///
/// Cloning is not offered on purpose: an engine owns one pool and lends `&ThreadPool` to its
/// kernels, so two engines never oversubscribe the cores by accident.
pub struct ThreadPool {
    inner: rayon::ThreadPool,
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
    /// A pool of `n_threads` compute threads; `0` means one per available core.
    ///
    /// # Errors
    /// [`ModelError::ThreadPool`] when the operating system refuses to start the threads.
    pub fn new(n_threads: usize) -> Result<Self> {
        let n_threads = if n_threads == 0 {
            default_threads()
        } else {
            n_threads
        };
        let inner = rayon::ThreadPoolBuilder::new()
            .num_threads(n_threads)
            .thread_name(|i| format!("tessera-compute-{i}"))
            .build()
            .map_err(|e| ModelError::ThreadPool(e.to_string()))?;
        Ok(Self { inner, n_threads })
    }

    /// How many threads run tasks.
    pub fn n_threads(&self) -> usize {
        self.n_threads
    }

    /// Runs `f(i)` for every `i in 0..n_tasks`, spread over the pool, and returns when all are
    /// done. Tasks must be independent; their order is unspecified.
    pub fn for_each<F>(&self, n_tasks: usize, f: F)
    where
        F: Fn(usize) + Sync + Send,
    {
        match n_tasks {
            0 => {}
            1 => f(0),
            _ if self.n_threads == 1 => (0..n_tasks).for_each(f),
            _ => self.inner.install(|| {
                use rayon::prelude::*;
                (0..n_tasks).into_par_iter().with_max_len(1).for_each(f);
            }),
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
