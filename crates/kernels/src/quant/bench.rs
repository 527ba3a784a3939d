//! Hand-run micro benchmark of the quantized products (an `#[ignore]`d test):
//! `cargo test --release -p tessera-kernels --lib quant::bench -- --ignored --nocapture`.
//!
//! Prints time, GFLOP/s and weight GB/s per product shape, per thread count and ISA, next to a
//! measured streaming-read bandwidth (the roofline for matrix-vector products whose weights do
//! not fit in cache), and a synthetic SmolLM2 decode step (all its linear layers, no attention).

use super::tests::normal;
use super::{QMatrix, QScratch, QType};
use crate::ThreadPool;
use crate::isa::{self, Isa};
use std::time::{Duration, Instant};

/// Mean seconds per call of `f`, after a warm-up, over at least `min` of wall time.
fn time(min: Duration, mut f: impl FnMut()) -> f64 {
    f();
    let (start, mut n) = (Instant::now(), 0u32);
    while start.elapsed() < min || n < 3 {
        f();
        n += 1;
    }
    start.elapsed().as_secs_f64() / n as f64
}

/// Streaming read bandwidth in GB/s over a buffer far larger than the caches, on `threads`.
fn read_bandwidth(pool: &ThreadPool) -> f64 {
    let buf: Vec<u64> = (0..(256usize << 20) / 8).map(|i| i as u64).collect();
    let chunk = buf.len().div_ceil(pool.n_threads());
    let sink = std::sync::atomic::AtomicU64::new(0);
    let secs = time(Duration::from_millis(600), || {
        pool.for_each(pool.n_threads(), |i| {
            let part = &buf[i * chunk..buf.len().min((i + 1) * chunk)];
            // Four independent lanes so the add chain is not the bottleneck.
            let mut acc = [0u64; 4];
            for c in part.chunks_exact(4) {
                for k in 0..4 {
                    acc[k] = acc[k].wrapping_add(c[k]);
                }
            }
            sink.fetch_add(
                acc.iter().fold(0, |a, &b| a ^ b),
                std::sync::atomic::Ordering::Relaxed,
            );
        })
    });
    std::hint::black_box(sink.into_inner());
    (buf.len() * 8) as f64 / secs / 1e9
}

/// The fastest single call of `f` (wall time, seconds) over about `min` of calls: on a shared
/// machine the fastest call is the one least disturbed by other processes.
fn fastest(min: Duration, mut f: impl FnMut()) -> f64 {
    f();
    let (start, mut best) = (Instant::now(), f64::INFINITY);
    while start.elapsed() < min {
        let t = Instant::now();
        f();
        best = best.min(t.elapsed().as_secs_f64());
    }
    best
}

/// Ensures nothing (a benchmark); prints the float product figures: an encoder's f32 linear
/// layers (m = 640 tokens; 1536×384 and 384×1536) and decode steps (m = 1) before the float
/// kernels ("before": the old AVX2 `dot` per pair, see [`legacy`]) and after, per ISA and
/// thread count, in one run:
/// `cargo test --release -p tessera-kernels --lib quant::bench::bench_f32 -- --ignored
/// --nocapture`.
#[test]
#[ignore = "benchmark: run by hand with --release --ignored --nocapture"]
fn bench_f32_prefill() {
    let best = isa::isa();
    if best < Isa::Avx2 {
        return;
    }
    println!("ISA detected: {}", best.name());
    // The encoder's prefill shapes, then decode steps (m = 1, the in-place kernel) including a
    // weight matrix larger than the caches.
    let shapes = [
        (1536, 384, 640),
        (384, 1536, 640),
        (1536, 384, 1),
        (384, 1536, 1),
        (8192, 2048, 1),
    ];
    for threads in [1, 2] {
        let pool = ThreadPool::new(threads).expect("pool");
        for (rows, cols, m) in shapes {
            let w = QMatrix::quantize(QType::F32, rows, cols, &normal(rows * cols, 1)).expect("w");
            let x = normal(m * cols, 2);
            let mut y = vec![0.0; m * rows];
            let mut s = QScratch::new();
            let gflops = |secs: f64| 2.0 * (rows * cols * m) as f64 / secs / 1e9;
            let window = Duration::from_millis(if m == 1 { 500 } else { 1500 });
            #[cfg(target_arch = "x86_64")]
            let before = fastest(window, || legacy::matmul(&w, &x, m, &mut y, &pool));
            #[cfg(not(target_arch = "x86_64"))]
            let before = f64::NAN;
            let mut line = format!(
                "f32 {rows:4}x{cols:<4} m={m:<3} threads={threads}: before {:6.1} GFLOP/s",
                gflops(before)
            );
            for isa in [Isa::Avx2, best] {
                let after = fastest(window, || {
                    w.matmul_isa(isa, &x, m, &mut y, &mut s, &pool).expect("mm");
                });
                line += &format!(
                    " | {} {:6.1} GFLOP/s x{:.2}",
                    isa.name(),
                    gflops(after),
                    before / after
                );
            }
            println!("{line}");
        }
    }
}

/// The float product as it was before the packed kernels, kept only so the benchmark measures
/// before and after in one run: the old AVX2 `dot_f32` (two eight-lane accumulators over
/// alternating groups of eight, folded and reduced by `hsum8`, then an unfused tail) once per
/// (row, token) pair, tasks split over rows as `run` splits them.
#[cfg(target_arch = "x86_64")]
mod legacy {
    use super::super::QMatrix;
    use super::super::dot_avx2::hsum;
    use crate::ThreadPool;
    use std::arch::x86_64::*;

    /// The old `dot_f32`.
    ///
    /// # Safety
    /// AVX2 and FMA are available; `w` holds `x.len()` f32.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_f32(w: &[u8], x: &[f32]) -> f32 {
        let n = x.len();
        let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut i = 0;
        while i + 16 <= n {
            // SAFETY: elements i..i + 16 are inside w and x.
            unsafe {
                let p = w.as_ptr().add(4 * i).cast::<f32>();
                acc0 =
                    _mm256_fmadd_ps(_mm256_loadu_ps(p), _mm256_loadu_ps(x.as_ptr().add(i)), acc0);
                let (q, xq) = (p.add(8), x.as_ptr().add(i + 8));
                acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(q), _mm256_loadu_ps(xq), acc1);
            }
            i += 16;
        }
        let mut sum = hsum(_mm256_add_ps(acc0, acc1));
        for j in i..n {
            let c = &w[4 * j..4 * j + 4];
            sum += f32::from_le_bytes([c[0], c[1], c[2], c[3]]) * x[j];
        }
        sum
    }

    /// The output, shared by tasks that write disjoint rows.
    struct Out(*mut f32);
    // SAFETY: every task writes only its own rows' elements.
    unsafe impl Sync for Out {}

    /// `y = x · Wᵀ` the old way (see the module docs).
    pub(super) fn matmul(w: &QMatrix, x: &[f32], m: usize, y: &mut [f32], pool: &ThreadPool) {
        let (rows, cols) = (w.rows(), w.cols());
        assert!(x.len() == m * cols && y.len() == m * rows && crate::isa::avx2());
        let n_tasks = (pool.n_threads() * 4).min(rows.div_ceil(4)).max(1);
        let per = rows.div_ceil(n_tasks);
        let tile = (256 * 1024 / w.row_bytes()).clamp(4, per.max(4));
        let out = Out(y.as_mut_ptr());
        pool.for_each(n_tasks, |i| {
            let out = &out;
            let end = rows.min((i + 1) * per);
            for r0 in (i * per..end).step_by(tile) {
                for t in 0..m {
                    for r in r0..end.min(r0 + tile) {
                        // SAFETY: AVX2 is available (asserted); the row holds `cols` f32; (t, r)
                        // is inside y and written by this task only.
                        unsafe {
                            let v = dot_f32(w.row(r), &x[t * cols..(t + 1) * cols]);
                            out.0.add(t * rows + r).write(v);
                        }
                    }
                }
            }
        });
    }
}

/// Ensures nothing (a benchmark); prints figures for the report.
#[test]
#[ignore = "benchmark: run by hand with --release --ignored --nocapture"]
fn bench() {
    let best = isa::isa();
    let isas: Vec<Isa> = [Isa::Scalar, Isa::Avx2, best]
        .into_iter()
        .filter(|&i| i <= best)
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    println!("ISA detected: {}", best.name());
    let shapes = [
        ("q4_1 576x1536 matvec", QType::Q4_1, 576, 1536, 1),
        ("q4_1 1536x576 matvec", QType::Q4_1, 1536, 576, 1),
        ("q4_1 576x576 matvec", QType::Q4_1, 576, 576, 1),
        ("q8_0 49152x576 matvec", QType::Q8_0, 49152, 576, 1),
        ("q4_1 1536x576 m=512", QType::Q4_1, 1536, 576, 512),
        ("q4_1 576x1536 m=512", QType::Q4_1, 576, 1536, 512),
    ];
    for threads in [1, 2] {
        let pool = ThreadPool::new(threads).expect("pool");
        println!(
            "--- {threads} thread(s); streaming read {:.1} GB/s",
            read_bandwidth(&pool)
        );
        // The fixed cost a decode step pays ~210 times: one parallel call of 8 empty tasks.
        let noop = time(Duration::from_millis(300), || {
            pool.for_each(8, |i| {
                std::hint::black_box(i);
            })
        });
        println!("pool.for_each(8 empty tasks): {:.2} us/call", noop * 1e6);
        for &(label, q, rows, cols, m) in &shapes {
            let w = QMatrix::quantize(q, rows, cols, &normal(rows * cols, 1)).expect("w");
            let x = normal(m * cols, 2);
            let mut y = vec![0.0; m * rows];
            let mut s = QScratch::new();
            for &isa in &isas {
                if isa == Isa::Scalar && m > 1 {
                    continue; // minutes of scalar prefill say nothing new
                }
                let secs = time(Duration::from_millis(400), || {
                    w.matmul_isa(isa, &x, m, &mut y, &mut s, &pool).expect("mm");
                });
                let flops = 2.0 * (rows * cols * m) as f64;
                println!(
                    "{label:24} {:10} {:9.1} us  {:7.1} GFLOP/s  {:6.1} GB/s weights",
                    isa.name(),
                    secs * 1e6,
                    flops / secs / 1e9,
                    w.nbytes() as f64 / secs / 1e9
                );
            }
        }
        // SmolLM2-135M's linear layers for one decoded token: per layer q, k, v, o, gate, up,
        // down; then the tied Q8_0 output head.
        let layer = [
            (576, 576),
            (192, 576),
            (192, 576),
            (576, 576),
            (1536, 576),
            (1536, 576),
            (576, 1536),
        ];
        // Thirty distinct layers (66 MB of Q4_1), so weights stream from memory as in a real
        // decode step instead of staying in the last-level cache.
        let mats: Vec<QMatrix> = (0..30)
            .flat_map(|l| layer.iter().map(move |&(r, c)| (l, r, c)))
            .map(|(l, r, c)| {
                QMatrix::quantize(QType::Q4_1, r, c, &normal(r * c, 3 + l)).expect("w")
            })
            .collect();
        let head = QMatrix::quantize(QType::Q8_0, 49152, 576, &normal(49152 * 576, 4)).expect("w");
        // Layers against the head at decode batch sizes: past one sequence a product costs
        // its multiply-adds, not its bytes (the planner balances pipeline stages so).
        for m in [1usize, 4, 8] {
            let x = normal(1536 * m, 5);
            let mut y = vec![0.0; 49152 * m];
            let mut ybig = vec![0.0; 1536 * m];
            let mut s = QScratch::new();
            let layers = time(Duration::from_millis(1500), || {
                for w in &mats {
                    let (r, c) = (w.rows(), w.cols());
                    w.matmul(&x[..c * m], m, &mut ybig[..r * m], &mut s, &pool)
                        .expect("mm");
                }
            });
            let heads = time(Duration::from_millis(1500), || {
                head.matmul(&x[..576 * m], m, &mut y, &mut s, &pool)
                    .expect("mm");
            });
            println!(
                "SmolLM2 m={m}: 30 layers {:8.3} ms, Q8_0 head {:8.3} ms = {:.2} layers",
                layers * 1e3,
                heads * 1e3,
                heads / (layers / 30.0)
            );
        }
        for m in [1usize, 512] {
            let x = normal(1536 * m, 5);
            let mut y = vec![0.0; 49152];
            let mut ybig = vec![0.0; 1536 * m];
            let mut s = QScratch::new();
            let secs = time(
                Duration::from_millis(if m == 1 { 1000 } else { 3000 }),
                || {
                    for w in &mats {
                        let (r, c) = (w.rows(), w.cols());
                        w.matmul(&x[..c * m], m, &mut ybig[..r * m], &mut s, &pool)
                            .expect("mm");
                    }
                    // Prefill only needs the last token's logits.
                    head.matmul(&x[..576], 1, &mut y, &mut s, &pool)
                        .expect("mm");
                },
            );
            println!(
                "SmolLM2 linear layers, m={m:3}: {:8.2} ms/step = {:7.1} tok/s (matmuls only)",
                secs * 1e3,
                m as f64 / secs
            );
        }
    }
}
