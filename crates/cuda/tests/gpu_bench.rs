//! Benchmarks run by `scripts/gpu-check.sh` (ignored by default: `--ignored` runs them).
//!
//! Prints one `BENCH key=value ...` line per measurement so the script can set them beside
//! PyTorch's SDPA on the same shapes: prefill at batch 4, 16 heads, 4096 tokens, head dim 128,
//! causal and not; decode of one token at a 32k context.
#![cfg(feature = "cuda")]

mod common;

use std::time::Instant;

use common::{Rng, device_or_skip};
use tessera_cuda::DType;
use tessera_cuda::plan::{DecodeParams, PrefillParams, PrefillPath};
use tessera_cuda::runtime::Device;
use tessera_cuda::runtime::attention::{
    DecodeScratch, DevOut, PagedKv, decode_attention, prefill_attention_with,
};

/// Mean seconds per call of `f` after `warmup` calls, synchronising around the timed loop.
fn time(dev: &Device, warmup: usize, iters: usize, mut f: impl FnMut()) -> f64 {
    for _ in 0..warmup {
        f();
    }
    dev.synchronize().expect("sync");
    let t = Instant::now();
    for _ in 0..iters {
        f();
    }
    dev.synchronize().expect("sync");
    t.elapsed().as_secs_f64() / iters as f64
}

/// Measures prefill attention throughput at batch 4, 16 heads, 4096 tokens, head dim 128.
#[test]
#[ignore = "benchmark: run by scripts/gpu-check.sh"]
fn bench_prefill() {
    let Some(dev) = device_or_skip("bench_prefill") else {
        return;
    };
    let (b, h, s, d) = (4, 16, 4096, 128);
    let mut rng = Rng::new(42);
    let n = b * s * h * d;
    for dt in DType::ALL {
        let q = dev.upload(dt, &rng.normals(n)).expect("q");
        let k = dev.upload(dt, &rng.normals(n)).expect("k");
        let v = dev.upload(dt, &rng.normals(n)).expect("v");
        let mut out = dev.zeros(dt, n).expect("out");
        let mut lse = dev.zeros_raw::<f32>(b * s * h).expect("lse");
        for (causal, path) in [false, true]
            .into_iter()
            .flat_map(|c| [(c, PrefillPath::Auto), (c, PrefillPath::Simt)])
        {
            let p = PrefillParams {
                batch: b,
                seq_q: s,
                seq_k: s,
                n_heads: h,
                n_kv_heads: h,
                head_dim: d,
                causal,
                scale: 1.0 / (d as f32).sqrt(),
            };
            let secs = time(&dev, 2, 5, || {
                prefill_attention_with(
                    &dev,
                    path,
                    &p,
                    &q,
                    &k,
                    &v,
                    DevOut {
                        out: &mut out,
                        lse: &mut lse,
                    },
                )
                .expect("prefill")
            });
            let kernel = match path {
                PrefillPath::Auto => "prefill",
                PrefillPath::Simt => "prefill_simt",
            };
            println!(
                "BENCH kernel={kernel} dtype={dt} causal={} batch={b} heads={h} seq={s} head_dim={d} ms={:.3} tflops={:.2}",
                u8::from(causal),
                secs * 1e3,
                p.flops() / secs / 1e12
            );
        }
    }
}

/// Measures decode latency of one query token over a 32k context (32 query heads, 8 KV heads,
/// head dim 128, paged in blocks of 16).
#[test]
#[ignore = "benchmark: run by scripts/gpu-check.sh"]
fn bench_decode() {
    let Some(dev) = device_or_skip("bench_decode") else {
        return;
    };
    let (h, hkv, d, len, bs) = (32, 8, 128, 32 * 1024, 16);
    let mut rng = Rng::new(43);
    let num_blocks = len / bs;
    let pool = num_blocks * bs * hkv * d;
    let table = rng.permutation(num_blocks);
    let mut scratch = DecodeScratch::default();
    for dt in DType::ALL {
        let q = dev.upload(dt, &rng.normals(h * d)).expect("q");
        let k = dev.upload(dt, &rng.normals(pool)).expect("k");
        let v = dev.upload(dt, &rng.normals(pool)).expect("v");
        let mut out = dev.zeros(dt, h * d).expect("out");
        let mut lse = dev.zeros_raw::<f32>(h).expect("lse");
        let p = DecodeParams {
            seq_q: 1,
            n_heads: h,
            n_kv_heads: hkv,
            head_dim: d,
            len,
            block_size: bs,
            num_blocks,
            causal: true,
            scale: 1.0 / (d as f32).sqrt(),
        };
        let secs = time(&dev, 3, 20, || {
            decode_attention(
                &dev,
                &p,
                &q,
                PagedKv {
                    k_pool: &k,
                    v_pool: &v,
                    block_table: &table,
                },
                &mut scratch,
                DevOut {
                    out: &mut out,
                    lse: &mut lse,
                },
            )
            .expect("decode")
        });
        let bytes = 2.0 * pool as f64 * 2.0;
        println!(
            "BENCH kernel=decode dtype={dt} heads={h} kv_heads={hkv} head_dim={d} context={len} us={:.1} gbps={:.0} splits={}",
            secs * 1e6,
            bytes / secs / 1e9,
            p.plan(dev.n_sms()).expect("plan").split.n_splits
        );
    }
}
