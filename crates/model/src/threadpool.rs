//! The compute thread pool every kernel runs on.
//!
//! Kernels split their work into independent tasks and call [`ThreadPool::for_each`]; the pool
//! is created once per engine, sized to the machine unless configured, so no thread is spawned
//! on the hot path.

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
        f.debug_struct("ThreadPool").field("n_threads", &self.n_threads).finish()
    }
}

impl ThreadPool {
    /// A pool of `n_threads` compute threads; `0` means one per available core.
    ///
    /// # Errors
    /// [`ModelError::ThreadPool`] when the operating system refuses to start the threads.
    pub fn new(n_threads: usize) -> Result<Self> {
        let n_threads = if n_threads == 0 { default_threads() } else { n_threads };
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
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
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
}
