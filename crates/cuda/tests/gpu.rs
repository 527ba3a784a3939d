//! Every kernel against the f64 reference, on a real device, over the engine's shape matrix
//! plus long decode contexts (32k and 128k keys). Prints each kernel's worst error (the GPU
//! check script collects these lines). Every test needs a device, so every test is ignored:
//! a machine without one reports them skipped; `scripts/gpu-check.sh` runs them.
#![cfg(feature = "cuda")]

mod common;

use common::{LSE_TOL, Rng, device, lse_err, max_abs};
use tessera_cuda::DType;
use tessera_cuda::plan::{DecodeParams, PrefillParams, PrefillPath};
use tessera_cuda::runtime::Device;
use tessera_cuda::runtime::attention::{
    DecodeScratch, DevOut, PagedKv, cast_to, decode_attention, merge_attention, prefill_attention,
    prefill_attention_with,
};
use tessera_cuda::runtime::elementwise::{
    RopeLayout, add, add_f32, bias, embed, rmsnorm, rmsnorm_f32in, rope, swiglu,
};
use tessera_kernels::attention::reference::attention_f64;
use tessera_kernels::attention::{AttnShape, KvView};

const HEAD_DIMS: [usize; 6] = [64, 80, 128, 59, 200, 256];
const RATIOS: [usize; 3] = [1, 3, 6];

fn round_all(dt: DType, xs: &[f32]) -> Vec<f32> {
    xs.iter().map(|&x| dt.round(x)).collect()
}

/// Runs one prefill case on the device through `path` and checks it; returns (out error, lse
/// error).
fn check_prefill(
    dev: &Device,
    path: PrefillPath,
    dt: DType,
    p: PrefillParams,
    seed: u64,
) -> (f64, f64) {
    let mut rng = Rng::new(seed);
    let q = round_all(dt, &rng.normals(p.batch * p.seq_q * p.n_heads * p.head_dim));
    let k = round_all(
        dt,
        &rng.normals(p.batch * p.seq_k * p.n_kv_heads * p.head_dim),
    );
    let v = round_all(
        dt,
        &rng.normals(p.batch * p.seq_k * p.n_kv_heads * p.head_dim),
    );
    let (qd, kd, vd) = (
        dev.upload(dt, &q).expect("q"),
        dev.upload(dt, &k).expect("k"),
        dev.upload(dt, &v).expect("v"),
    );
    let mut out = dev.zeros(dt, q.len()).expect("out");
    let mut lse = dev
        .zeros_raw::<f32>(p.batch * p.seq_q * p.n_heads)
        .expect("lse");
    prefill_attention_with(
        dev,
        path,
        &p,
        &qd,
        &kd,
        &vd,
        DevOut {
            out: &mut out,
            lse: &mut lse,
        },
    )
    .expect("prefill");
    let got = dev.download(&out).expect("download");
    let got_lse = dev.download_raw(&lse).expect("download");
    let shape = AttnShape {
        seq_q: p.seq_q,
        n_heads: p.n_heads,
        n_kv_heads: p.n_kv_heads,
        head_dim: p.head_dim,
    };
    let (qn, kn, ln) = (
        q.len() / p.batch,
        k.len() / p.batch,
        got_lse.len() / p.batch,
    );
    let (mut e_o, mut e_l) = (0.0f64, 0.0f64);
    for b in 0..p.batch {
        let kv = KvView::contiguous(&k[b * kn..][..kn], &v[b * kn..][..kn], p.seq_k);
        let r = attention_f64(&q[b * qn..][..qn], kv, shape, p.causal, p.scale);
        e_o = e_o.max(max_abs(&got[b * qn..][..qn], &r.out));
        e_l = e_l.max(lse_err(&got_lse[b * ln..][..ln], &r.lse));
    }
    assert!(
        e_o <= dt.tolerance() && e_l <= LSE_TOL,
        "prefill {path:?} {dt} {p:?}: out err {e_o:.2e}, lse err {e_l:.2e}"
    );
    (e_o, e_l)
}

fn prefill_params(
    seq_q: usize,
    seq_k: usize,
    n_heads: usize,
    n_kv: usize,
    hd: usize,
    causal: bool,
) -> PrefillParams {
    PrefillParams {
        batch: 1,
        seq_q,
        seq_k,
        n_heads,
        n_kv_heads: n_kv,
        head_dim: hd,
        causal,
        scale: 1.0 / (hd as f32).sqrt(),
    }
}

/// Ensures that prefill attention matches the reference through both kernel paths (tensor
/// cores for head dims 64/128, SIMT for all) for every head dim, GQA ratio, mask and
/// short/tile-edge length, both dtypes, with a batch of two, more queries than keys, and long
/// rows across tile edges.
#[test]
#[ignore = "needs a CUDA device: scripts/gpu-check.sh runs it"]
fn prefill_matches_reference() {
    let dev = device();
    for (dt, path) in DType::ALL
        .into_iter()
        .flat_map(|dt| [(dt, PrefillPath::Auto), (dt, PrefillPath::Simt)])
    {
        let (mut worst_o, mut worst_l) = (0.0f64, 0.0f64);
        let mut seed = 1;
        let mut run = |p: PrefillParams| {
            seed += 1;
            let (o, l) = check_prefill(&dev, path, dt, p, seed);
            worst_o = worst_o.max(o);
            worst_l = worst_l.max(l);
        };
        for len in [1, 3, 97, 128] {
            for hd in HEAD_DIMS {
                for ratio in RATIOS {
                    let n_kv = if ratio <= 3 { 2 } else { 1 };
                    for causal in [false, true] {
                        run(prefill_params(len, len, ratio * n_kv, n_kv, hd, causal));
                    }
                }
            }
        }
        for (n, len) in [217, 1023, 1025].into_iter().enumerate() {
            for causal in [false, true] {
                run(prefill_params(len, len, 1, 1, HEAD_DIMS[n % 4], causal));
            }
        }
        // Chunked prefill (fewer queries than keys), and more queries than keys (empty rows).
        for (sq, sk) in [(5, 300), (70, 3), (10, 4), (5, 0)] {
            run(prefill_params(sq, sk, 6, 2, 59, true));
            run(prefill_params(sq, sk, 6, 2, 128, true));
        }
        run(PrefillParams {
            batch: 2,
            ..prefill_params(130, 130, 6, 2, 128, true)
        });
        println!(
            "ERR kernel=prefill dtype={dt} out={worst_o:.3e} lse={worst_l:.3e} tol={:.1e}",
            dt.tolerance()
        );
    }
}

/// Runs one paged decode case; returns (out error, lse error).
fn check_decode(
    dev: &Device,
    dt: DType,
    p: DecodeParams,
    scratch: &mut DecodeScratch,
    seed: u64,
) -> (f64, f64) {
    let mut rng = Rng::new(seed);
    let row = p.n_kv_heads * p.head_dim;
    let q = round_all(dt, &rng.normals(p.seq_q * p.n_heads * p.head_dim));
    let k = round_all(dt, &rng.normals(p.num_blocks * p.block_size * row));
    let v = round_all(dt, &rng.normals(p.num_blocks * p.block_size * row));
    let table = rng.permutation(p.num_blocks);
    let (qd, kd, vd) = (
        dev.upload(dt, &q).expect("q"),
        dev.upload(dt, &k).expect("k"),
        dev.upload(dt, &v).expect("v"),
    );
    let mut out = dev.zeros(dt, q.len()).expect("out");
    let mut lse = dev.zeros_raw::<f32>(p.seq_q * p.n_heads).expect("lse");
    decode_attention(
        dev,
        &p,
        &qd,
        PagedKv {
            k_pool: &kd,
            v_pool: &vd,
            block_table: &table,
        },
        scratch,
        DevOut {
            out: &mut out,
            lse: &mut lse,
        },
    )
    .expect("decode");
    let got = dev.download(&out).expect("download");
    let got_lse = dev.download_raw(&lse).expect("download");
    let view = KvView {
        k: &k,
        v: &v,
        block_table: &table,
        block_size: p.block_size,
        len: p.len,
    };
    let shape = AttnShape {
        seq_q: p.seq_q,
        n_heads: p.n_heads,
        n_kv_heads: p.n_kv_heads,
        head_dim: p.head_dim,
    };
    let r = attention_f64(&q, view, shape, p.causal, p.scale);
    let (e_o, e_l) = (max_abs(&got, &r.out), lse_err(&got_lse, &r.lse));
    assert!(
        e_o <= dt.tolerance() && e_l <= LSE_TOL,
        "decode {dt} {p:?}: out err {e_o:.2e}, lse err {e_l:.2e}"
    );
    (e_o, e_l)
}

fn decode_params(
    seq_q: usize,
    len: usize,
    n_heads: usize,
    n_kv: usize,
    hd: usize,
    bs: usize,
    causal: bool,
) -> DecodeParams {
    DecodeParams {
        seq_q,
        n_heads,
        n_kv_heads: n_kv,
        head_dim: hd,
        len,
        block_size: bs,
        num_blocks: len.div_ceil(bs).max(1) + 2,
        causal,
        scale: 1.0 / (hd as f32).sqrt(),
    }
}

/// Ensures that split-KV paged decode matches the reference for one and a few query tokens,
/// every head dim and GQA ratio, several block sizes, empty contexts, and long contexts of 32k
/// and 128k keys (many splits merged by LSE).
#[test]
#[ignore = "needs a CUDA device: scripts/gpu-check.sh runs it"]
fn decode_matches_reference() {
    let dev = device();
    let mut scratch = DecodeScratch::default();
    for dt in DType::ALL {
        let (mut worst_o, mut worst_l) = (0.0f64, 0.0f64);
        let mut seed = 100;
        let mut run = |p: DecodeParams, scratch: &mut DecodeScratch| {
            seed += 1;
            let (o, l) = check_decode(&dev, dt, p, scratch, seed);
            worst_o = worst_o.max(o);
            worst_l = worst_l.max(l);
        };
        for hd in HEAD_DIMS {
            for ratio in RATIOS {
                for seq_q in [1, 5] {
                    for (len, bs) in [(1, 16), (20, 1), (300, 16), (1025, 16), (2048, 32)] {
                        run(
                            decode_params(seq_q, len, ratio * 2, 2, hd, bs, true),
                            &mut scratch,
                        );
                    }
                    run(
                        decode_params(seq_q, 1025, ratio, 1, hd, 16, false),
                        &mut scratch,
                    );
                }
            }
        }
        run(decode_params(1, 0, 9, 3, 64, 16, true), &mut scratch);
        run(decode_params(4, 2, 9, 3, 64, 16, true), &mut scratch);
        let mut long = (0.0f64, 0.0f64);
        for len in [32 * 1024, 128 * 1024] {
            seed += 1;
            let p = decode_params(1, len, 9, 3, 64, 16, true);
            let (o, l) = check_decode(&dev, dt, p, &mut scratch, seed);
            long = (long.0.max(o), long.1.max(l));
            let p = decode_params(1, len, 16, 2, 128, 16, true);
            let (o, l) = check_decode(&dev, dt, p, &mut scratch, seed);
            long = (long.0.max(o), long.1.max(l));
        }
        println!(
            "ERR kernel=decode dtype={dt} out={worst_o:.3e} lse={worst_l:.3e} tol={:.1e}",
            dt.tolerance()
        );
        println!(
            "ERR kernel=decode_32k_128k dtype={dt} out={:.3e} lse={:.3e} tol={:.1e}",
            long.0,
            long.1,
            dt.tolerance()
        );
    }
}

/// Ensures that merging the prefill results over two disjoint key halves (ring attention's
/// step) equals attention over all keys, including empty parts, and that the cast to 16 bits
/// rounds like the host.
#[test]
#[ignore = "needs a CUDA device: scripts/gpu-check.sh runs it"]
fn merge_matches_reference() {
    let dev = device();
    for dt in DType::ALL {
        let mut worst = (0.0f64, 0.0f64);
        for (sk_a, sk_b, hd) in [(100, 157, 64), (64, 0, 128), (0, 0, 80), (1, 300, 59)] {
            let (sq, nh, nkv) = (37, 6, 2);
            let mut rng = Rng::new((sk_a * 31 + sk_b) as u64);
            let q = round_all(dt, &rng.normals(sq * nh * hd));
            let k = round_all(dt, &rng.normals((sk_a + sk_b) * nkv * hd));
            let v = round_all(dt, &rng.normals((sk_a + sk_b) * nkv * hd));
            let qd = dev.upload(dt, &q).expect("q");
            let mut acc_o = dev.zeros_raw::<f32>(sq * nh * hd).expect("acc");
            let mut acc_lse = dev
                .upload_raw(&vec![f32::NEG_INFINITY; sq * nh])
                .expect("acc lse");
            let split = sk_a * nkv * hd;
            for (range, sk) in [(0..split, sk_a), (split..k.len(), sk_b)] {
                let p = prefill_params(sq, sk, nh, nkv, hd, false);
                let kd = dev.upload(dt, &k[range.clone()]).expect("k");
                let vd = dev.upload(dt, &v[range]).expect("v");
                let mut out = dev.zeros(dt, q.len()).expect("out");
                let mut lse = dev.zeros_raw::<f32>(sq * nh).expect("lse");
                prefill_attention(
                    &dev,
                    &p,
                    &qd,
                    &kd,
                    &vd,
                    DevOut {
                        out: &mut out,
                        lse: &mut lse,
                    },
                )
                .expect("part");
                merge_attention(&dev, &mut acc_o, &mut acc_lse, &out, &lse, hd).expect("merge");
            }
            let mut final_o = dev.zeros(dt, q.len()).expect("final");
            cast_to(&dev, &acc_o, &mut final_o).expect("cast");
            let got = dev.download(&final_o).expect("download");
            let acc = dev.download_raw(&acc_o).expect("download");
            let got_lse = dev.download_raw(&acc_lse).expect("download");
            let host_cast = round_all(dt, &acc);
            assert_eq!(got, host_cast, "device cast differs from host rounding");
            let shape = AttnShape {
                seq_q: sq,
                n_heads: nh,
                n_kv_heads: nkv,
                head_dim: hd,
            };
            let r = attention_f64(
                &q,
                KvView::contiguous(&k, &v, sk_a + sk_b),
                shape,
                false,
                1.0 / (hd as f32).sqrt(),
            );
            let (e_o, e_l) = (max_abs(&got, &r.out), lse_err(&got_lse, &r.lse));
            assert!(
                e_o <= dt.tolerance() && e_l <= LSE_TOL,
                "merge {dt} {sk_a}+{sk_b} hd {hd}: {e_o:.2e} {e_l:.2e}"
            );
            worst = (worst.0.max(e_o), worst.1.max(e_l));
        }
        println!(
            "ERR kernel=merge dtype={dt} out={:.3e} lse={:.3e} tol={:.1e}",
            worst.0,
            worst.1,
            dt.tolerance()
        );
    }
}

/// Ensures that RMSNorm, RoPE (both layouts, large global positions), SwiGLU, embedding gather
/// and residual add match f64 references — with the GPU stage's f32-residual RMSNorm and add
/// and its bias add — and that bad ids are refused before launch.
#[test]
#[ignore = "needs a CUDA device: scripts/gpu-check.sh runs it"]
fn elementwise_match_reference() {
    let dev = device();
    for dt in DType::ALL {
        let tol = dt.tolerance();
        let mut rng = Rng::new(7);
        // RMSNorm: (5, 576), eps 1e-5.
        let (rows, dim) = (5, 576);
        let x = round_all(dt, &rng.normals(rows * dim));
        let w = round_all(dt, &rng.normals(dim));
        let (xd, wd) = (
            dev.upload(dt, &x).expect("x"),
            dev.upload(dt, &w).expect("w"),
        );
        let mut out = dev.zeros(dt, x.len()).expect("out");
        rmsnorm(&dev, &xd, &wd, &mut out, dim, 1e-5).expect("rmsnorm");
        let got = dev.download(&out).expect("download");
        let mut want = vec![0.0f64; x.len()];
        for r in 0..rows {
            let row = &x[r * dim..][..dim];
            let ms = row.iter().map(|&a| a as f64 * a as f64).sum::<f64>() / dim as f64;
            let inv = 1.0 / (ms + 1e-5).sqrt();
            for d in 0..dim {
                want[r * dim + d] = row[d] as f64 * inv * w[d] as f64;
            }
        }
        // Outputs reach |x·w| of several units: compare relative to the value's magnitude.
        let e_norm = got
            .iter()
            .zip(&want)
            .map(|(&g, &w)| (g as f64 - w).abs() / w.abs().max(1.0))
            .fold(0.0, f64::max);
        assert!(e_norm <= tol, "rmsnorm {dt}: {e_norm:.2e}");

        // RoPE at global positions up to 131071.
        let (seq, nh, hd, theta) = (7, 3, 64, 100_000.0f32);
        let pos: Vec<i32> = vec![0, 1, 2, 17, 4095, 32_768, 131_071];
        let posd = dev.upload_raw(&pos).expect("pos");
        let mut e_rope = 0.0f64;
        for layout in [RopeLayout::Interleaved, RopeLayout::Neox] {
            let x = round_all(dt, &rng.normals(seq * nh * hd));
            let mut xd = dev.upload(dt, &x).expect("x");
            rope(&dev, &mut xd, &posd, nh, hd, theta, layout).expect("rope");
            let got = dev.download(&xd).expect("download");
            let mut want = vec![0.0f64; x.len()];
            for t in 0..seq {
                for h in 0..nh {
                    let base = (t * nh + h) * hd;
                    for p in 0..hd / 2 {
                        let ang = pos[t] as f64 * (theta as f64).powf(-2.0 * p as f64 / hd as f64);
                        let (i0, i1) = match layout {
                            RopeLayout::Interleaved => (2 * p, 2 * p + 1),
                            RopeLayout::Neox => (p, p + hd / 2),
                        };
                        let (a, b) = (x[base + i0] as f64, x[base + i1] as f64);
                        want[base + i0] = a * ang.cos() - b * ang.sin();
                        want[base + i1] = a * ang.sin() + b * ang.cos();
                    }
                }
            }
            e_rope = e_rope.max(max_abs(&got, &want));
        }
        assert!(e_rope <= tol, "rope {dt}: {e_rope:.2e}");

        // SwiGLU and add.
        let n = 3000;
        let g = round_all(dt, &rng.normals(n));
        let u = round_all(dt, &rng.normals(n));
        let (gd, ud) = (
            dev.upload(dt, &g).expect("g"),
            dev.upload(dt, &u).expect("u"),
        );
        let mut sd = dev.zeros(dt, n).expect("out");
        swiglu(&dev, &gd, &ud, &mut sd).expect("swiglu");
        let got = dev.download(&sd).expect("download");
        let want: Vec<f64> = g
            .iter()
            .zip(&u)
            .map(|(&a, &b)| a as f64 / (1.0 + (-(a as f64)).exp()) * b as f64)
            .collect();
        let e_swiglu = max_abs(&got, &want);
        assert!(e_swiglu <= tol, "swiglu {dt}: {e_swiglu:.2e}");
        let mut gd = gd;
        add(&dev, &mut gd, &ud).expect("add");
        let got = dev.download(&gd).expect("download");
        let want: Vec<f64> = g
            .iter()
            .zip(&u)
            .map(|(&a, &b)| a as f64 + b as f64)
            .collect();
        let e_add = max_abs(&got, &want);
        assert!(e_add <= tol, "add {dt}: {e_add:.2e}");

        // Embedding gather is a copy: exact.
        let (vocab, edim) = (50, 72);
        let table = round_all(dt, &rng.normals(vocab * edim));
        let td = dev.upload(dt, &table).expect("table");
        let ids = [3u32, 0, 49, 3];
        let mut ed = dev.zeros(dt, ids.len() * edim).expect("out");
        embed(&dev, &ids, &td, edim, &mut ed).expect("embed");
        let got = dev.download(&ed).expect("download");
        for (t, &id) in ids.iter().enumerate() {
            assert_eq!(
                &got[t * edim..][..edim],
                &table[id as usize * edim..][..edim]
            );
        }
        assert!(
            embed(&dev, &[50], &td, edim, &mut ed).is_err(),
            "id past vocab accepted"
        );
        let (e_norm32, e_add32, e_bias) = residual_kernels(&dev, dt, &mut rng);
        println!(
            "ERR kernel=elementwise dtype={dt} rmsnorm={e_norm:.3e} rope={e_rope:.3e} swiglu={e_swiglu:.3e} add={e_add:.3e} embed=0 rmsnorm_f32in={e_norm32:.3e} add_f32={e_add32:.3e} bias={e_bias:.3e} tol={tol:.1e}"
        );
    }
}

/// The GPU stage's f32-residual kernels against f64 references, for dtype `dt`: RMSNorm of f32
/// rows into `dt` (relative error), `x += y` into f32 (exact up to f32 rounding), and the
/// per-row bias add in `dt`. Returns their worst errors.
fn residual_kernels(dev: &Device, dt: DType, rng: &mut Rng) -> (f64, f64, f64) {
    let tol = dt.tolerance();
    let (rows, dim) = (6, 576);
    let x = rng
        .normals(rows * dim)
        .iter()
        .map(|v| v * 30.0)
        .collect::<Vec<f32>>();
    let w = rng.normals(dim);
    let (xd, wd) = (
        dev.upload_raw(&x).expect("x"),
        dev.upload_raw(&w).expect("w"),
    );
    let mut out = dev.zeros(dt, x.len()).expect("out");
    rmsnorm_f32in(dev, &xd, &wd, &mut out, dim, 1e-5).expect("rmsnorm_f32in");
    let got = dev.download(&out).expect("download");
    let mut e_norm = 0.0f64;
    for r in 0..rows {
        let row = &x[r * dim..][..dim];
        let ms = row
            .iter()
            .map(|&a| f64::from(a) * f64::from(a))
            .sum::<f64>()
            / dim as f64;
        let inv = 1.0 / (ms + 1e-5).sqrt();
        for d in 0..dim {
            let want = f64::from(row[d]) * inv * f64::from(w[d]);
            let e = (f64::from(got[r * dim + d]) - want).abs() / want.abs().max(1.0);
            e_norm = e_norm.max(e);
        }
    }
    assert!(e_norm <= tol, "rmsnorm_f32in {dt}: {e_norm:.2e}");
    let y = round_all(dt, &rng.normals(x.len()));
    let (mut xd, yd) = (xd, dev.upload(dt, &y).expect("y"));
    add_f32(dev, &mut xd, &yd).expect("add_f32");
    let got = dev.download_raw(&xd).expect("download");
    let want: Vec<f64> = x
        .iter()
        .zip(&y)
        .map(|(&a, &b)| f64::from(a) + f64::from(b))
        .collect();
    // f32 sums of values up to ~150: one f32 rounding, 1e-5 relative.
    let e_add = got
        .iter()
        .zip(&want)
        .map(|(&g, &w)| (f64::from(g) - w).abs() / w.abs().max(1.0))
        .fold(0.0, f64::max);
    assert!(e_add <= 1e-6, "add_f32 {dt}: {e_add:.2e}");
    let (n, width) = (5, 96);
    let v = round_all(dt, &rng.normals(n * width));
    let b = round_all(dt, &rng.normals(width));
    let (mut vd, bd) = (
        dev.upload(dt, &v).expect("v"),
        dev.upload(dt, &b).expect("b"),
    );
    bias(dev, &mut vd, &bd).expect("bias");
    let got = dev.download(&vd).expect("download");
    let want: Vec<f64> = (0..v.len())
        .map(|i| f64::from(v[i]) + f64::from(b[i % width]))
        .collect();
    let e_bias = max_abs(&got, &want);
    assert!(e_bias <= tol, "bias {dt}: {e_bias:.2e}");
    assert!(
        bias(dev, &mut vd, &dev.zeros(dt, 7).expect("b")).is_err(),
        "7 does not divide 480"
    );
    (e_norm, e_add, e_bias)
}

/// Ensures that launchers refuse buffers that do not match the parameters, naming the field,
/// before anything is launched.
#[test]
#[ignore = "needs a CUDA device: scripts/gpu-check.sh runs it"]
fn launchers_reject_mismatched_buffers() {
    let dev = device();
    let p = prefill_params(4, 4, 2, 1, 64, true);
    let q = dev.zeros(DType::F16, 4 * 2 * 64).expect("q");
    let k = dev.zeros(DType::F16, 4 * 64).expect("k");
    let v_bad = dev.zeros(DType::Bf16, 4 * 64).expect("v");
    let mut out = dev.zeros(DType::F16, 4 * 2 * 64).expect("out");
    let mut lse = dev.zeros_raw::<f32>(8).expect("lse");
    let err = prefill_attention(
        &dev,
        &p,
        &q,
        &k,
        &v_bad,
        DevOut {
            out: &mut out,
            lse: &mut lse,
        },
    )
    .expect_err("dtype");
    assert!(err.to_string().contains("`v`"), "{err}");
    let short = dev.zeros(DType::F16, 3).expect("short");
    let err = prefill_attention(
        &dev,
        &p,
        &short,
        &k,
        &k,
        DevOut {
            out: &mut out,
            lse: &mut lse,
        },
    )
    .expect_err("len");
    assert!(err.to_string().contains("`q`"), "{err}");
}
