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
