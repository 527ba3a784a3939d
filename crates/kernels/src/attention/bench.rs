//! Hand-run micro benchmark of long-prefill attention (an `#[ignore]`d test):
//! `cargo test --release -p tessera-kernels --lib attention::bench -- --ignored --nocapture`.
//!
//! Times one prefill chunk's attention over a long KV cache — SmolLM2's heads (9 query, 3 KV,
//! 64 values), a chunk of 512 new rows after `L − 512` cached keys — with the llama.cpp-order
//! kernel the engine runs ([`ggml_attention`]) and the tiled flash kernel
//! ([`flash_attention`]), on 1 and 2 threads, and the largest difference between their
//! outputs.

use std::time::{Duration, Instant};

use super::{AttnOut, AttnShape, AttnSpec, KvView, flash_attention, ggml_attention};
use crate::ThreadPool;
use crate::ggml_math::round_f16;

/// Mean seconds per call of `f`, after a warm-up, over at least `min` of wall time.
fn time(min: Duration, mut f: impl FnMut()) -> f64 {
    f();
    let (start, mut n) = (Instant::now(), 0u32);
    while start.elapsed() < min || n < 2 {
        f();
        n += 1;
    }
    start.elapsed().as_secs_f64() / n as f64
}

/// Ensures nothing (a benchmark); prints figures for the report.
#[test]
#[ignore = "benchmark: run by hand with --release --ignored --nocapture"]
fn bench() {
    let (nh, nkv, d, chunk) = (9, 3, 64, 512);
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut rnd = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    };
    println!(
        "{:>6} {:>7} {:>12} {:>12} {:>10} {:>16} {:>12}",
        "keys", "threads", "ggml ms", "flash ms", "ggml/flash", "flash paged ms", "max |diff|"
    );
    for len in [512, 2048, 4096, 7400] {
        let k: Vec<f32> = (0..len * nkv * d).map(|_| round_f16(rnd())).collect();
        let v: Vec<f32> = (0..len * nkv * d).map(|_| round_f16(rnd())).collect();
        let q: Vec<f32> = (0..chunk * nh * d).map(|_| rnd() * 2.0).collect();
        let spec = AttnSpec {
            shape: AttnShape {
                seq_q: chunk,
                n_heads: nh,
                n_kv_heads: nkv,
                head_dim: d,
            },
            causal: true,
            scale: 1.0 / (d as f32).sqrt(),
        };
        let kv = KvView::contiguous(&k, &v, len);
        // The engine's cache: 16-token blocks (tiles end at block boundaries).
        let table: Vec<u32> = (0..len.div_ceil(16) as u32).collect();
        let (mut kp, mut vp) = (k.clone(), v.clone());
        kp.resize(table.len() * 16 * nkv * d, 0.0);
        vp.resize(table.len() * 16 * nkv * d, 0.0);
        let paged = KvView {
            k: &kp,
            v: &vp,
            block_table: &table,
            block_size: 16,
            len,
        };
        for threads in [1, 2] {
            let pool = ThreadPool::new(threads).expect("pool");
            let (mut a, mut la) = (vec![0.0; q.len()], vec![0.0; chunk * nh]);
            let (mut b, mut lb) = (vec![0.0; q.len()], vec![0.0; chunk * nh]);
            let min = Duration::from_millis(800);
            let g = time(min, || {
                let o = AttnOut {
                    out: &mut a,
                    lse: &mut la,
                };
                ggml_attention(&q, kv, spec, o, &pool);
            });
            let f = time(min, || {
                let o = AttnOut {
                    out: &mut b,
                    lse: &mut lb,
                };
                flash_attention(&q, kv, spec, o, &pool);
            });
            let fp = time(min, || {
                let o = AttnOut {
                    out: &mut b,
                    lse: &mut lb,
                };
                flash_attention(&q, paged, spec, o, &pool);
            });
            let diff = a
                .iter()
                .zip(&b)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0f32, f32::max);
            println!(
                "{len:>6} {threads:>7} {:>12.2} {:>12.2} {:>9.2}x {:>16.2} {diff:>12.2e}",
                g * 1e3,
                f * 1e3,
                g / f,
                fp * 1e3
            );
        }
    }
}
