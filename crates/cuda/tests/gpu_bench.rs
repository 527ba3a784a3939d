//! Benchmarks run by `scripts/gpu-check.sh` (ignored by default: `--ignored` runs them).
//!
//! Prints one `BENCH key=value ...` line per measurement so the script can set them beside
//! PyTorch's SDPA on the same shapes — the matrix: head dim 64 and 128, sequence (or
//! context) 4k and 16k, 16 query heads, bf16 and f16; prefill causal on the tensor-core path
//! and the SIMT one, decode of one token over a paged cache (4 KV heads). With
//! `TESSERA_BENCH_DUMP=DIR` each case also writes its inputs and our output there (raw
//! little-endian 16-bit words, token order) so the script measures the error of ours against
//! SDPA and an f64 reference on the very same data.
#![cfg(feature = "cuda")]

mod common;

use std::path::PathBuf;
use std::time::Instant;

use common::{Rng, device};
use tessera_cuda::DType;
use tessera_cuda::plan::{DecodeParams, PrefillParams, PrefillPath};
use tessera_cuda::runtime::Device;
use tessera_cuda::runtime::attention::{
    DecodeScratch, DevOut, PagedKv, decode_attention, prefill_attention_with,
};

/// (head dim, tokens) of every case.
const SHAPES: [(usize, usize); 4] = [(64, 4096), (128, 4096), (64, 16384), (128, 16384)];
/// Query heads.
const HEADS: usize = 16;

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

/// Where to dump a case's tensors, if asked.
fn dump_dir() -> Option<PathBuf> {
    let dir = PathBuf::from(std::env::var_os("TESSERA_BENCH_DUMP")?);
    std::fs::create_dir_all(&dir).expect("dump dir");
    Some(dir)
}

/// Writes `words` as little-endian u16 to `dir/name.bin`.
fn dump(dir: &std::path::Path, name: &str, words: &[u16]) {
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    std::fs::write(dir.join(format!("{name}.bin")), bytes).expect("dump");
}

/// Measures causal prefill attention over [`SHAPES`] (batch 1, [`HEADS`] heads), on the
/// automatic path (tensor cores on sm_80+) and the SIMT one.
#[test]
#[ignore = "benchmark: run by scripts/gpu-check.sh"]
fn bench_prefill() {
    let dev = device();
    let dir = dump_dir();
    let mut rng = Rng::new(42);
    for (d, s) in SHAPES {
        let n = s * HEADS * d;
        for dt in DType::ALL {
            let words = |rng: &mut Rng| dt.encode(&rng.normals(n));
            let (qw, kw, vw) = (words(&mut rng), words(&mut rng), words(&mut rng));
            let up = |w: &[u16]| dev.upload(dt, &dt.decode(w)).expect("upload");
            let (q, k, v) = (up(&qw), up(&kw), up(&vw));
            let mut out = dev.zeros(dt, n).expect("out");
            let mut lse = dev.zeros_raw::<f32>(s * HEADS).expect("lse");
            let p = PrefillParams {
                batch: 1,
                seq_q: s,
                seq_k: s,
                n_heads: HEADS,
                n_kv_heads: HEADS,
                head_dim: d,
                causal: true,
                scale: 1.0 / (d as f32).sqrt(),
            };
            for path in [PrefillPath::Auto, PrefillPath::Simt] {
                let mut run = || {
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
                };
                let secs = time(&dev, 2, 5, &mut run);
                let kernel = match path {
                    PrefillPath::Auto => "prefill",
                    PrefillPath::Simt => "prefill_simt",
                };
                let name = format!("{kernel}_{dt}_d{d}_s{s}");
                if let Some(dir) = &dir {
                    dump(dir, &format!("{name}_q"), &qw);
                    dump(dir, &format!("{name}_k"), &kw);
                    dump(dir, &format!("{name}_v"), &vw);
                    let o = dev.download(&out).expect("out");
                    dump(dir, &format!("{name}_out"), &dt.encode(&o));
                }
                println!(
                    "BENCH kernel={kernel} dtype={dt} causal=1 batch=1 heads={HEADS} seq={s} head_dim={d} ms={:.3} tflops={:.2} dump={name}",
                    secs * 1e3,
                    p.flops() / secs / 1e12
                );
            }
        }
    }
}

/// Measures decode latency of one query token over contexts of [`SHAPES`] ([`HEADS`] query
/// heads, 4 KV heads, paged in blocks of 16 through a shuffled block table).
#[test]
#[ignore = "benchmark: run by scripts/gpu-check.sh"]
fn bench_decode() {
    let dev = device();
    let dir = dump_dir();
    let (hkv, bs) = (4, 16);
    let mut rng = Rng::new(43);
    let mut scratch = DecodeScratch::default();
    for (d, len) in SHAPES {
        let num_blocks = len / bs;
        let pool = num_blocks * bs * hkv * d;
        let table = rng.permutation(num_blocks);
        for dt in DType::ALL {
            let qw = dt.encode(&rng.normals(HEADS * d));
            let (kw, vw) = (dt.encode(&rng.normals(pool)), dt.encode(&rng.normals(pool)));
            let up = |w: &[u16]| dev.upload(dt, &dt.decode(w)).expect("upload");
            let (q, k, v) = (up(&qw), up(&kw), up(&vw));
            let mut out = dev.zeros(dt, HEADS * d).expect("out");
            let mut lse = dev.zeros_raw::<f32>(HEADS).expect("lse");
            let p = DecodeParams {
                seq_q: 1,
                n_heads: HEADS,
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
            let name = format!("decode_{dt}_d{d}_s{len}");
            if let Some(dir) = &dir {
                // K/V in token order: block `table[t / bs]` holds token t.
                let row = hkv * d;
                let order = |pool: &[u16]| -> Vec<u16> {
                    (0..len)
                        .flat_map(|t| {
                            let at = (table[t / bs] as usize * bs + t % bs) * row;
                            pool[at..at + row].iter().copied()
                        })
                        .collect()
                };
                dump(dir, &format!("{name}_q"), &qw);
                dump(dir, &format!("{name}_k"), &order(&kw));
                dump(dir, &format!("{name}_v"), &order(&vw));
                let o = dev.download(&out).expect("out");
                dump(dir, &format!("{name}_out"), &dt.encode(&o));
            }
            let bytes = 2.0 * pool as f64 * 2.0;
            println!(
                "BENCH kernel=decode dtype={dt} heads={HEADS} kv_heads={hkv} head_dim={d} context={len} us={:.1} gbps={:.0} splits={} dump={name}",
                secs * 1e6,
                bytes / secs / 1e9,
                p.plan(dev.n_sms()).expect("plan").split.n_splits
            );
        }
    }
}
