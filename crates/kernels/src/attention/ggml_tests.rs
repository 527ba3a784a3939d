//! Tests of the llama.cpp-order attention kernel ([`ggml_attention`]) and its dot products
//! against f64 references.
//!
//! Tolerance: DESIGN.md's "fp16 in / fp32 accumulate" 2e-3, absolute, on the output. The
//! reference runs on the f16 values the kernel sees (K and V are f16 by contract, Q is rounded
//! by the kernel), so what remains is the f16 rounding of the probabilities — at most
//! `2^-11 · Σ p |v| ≤ 2^-11 · max |v|`, about 2e-3 for N(0,1) values — and f32 accumulation.
//! The log-sum-exp involves no f16 step after the scores: DESIGN.md's 1e-5.

use super::ggml::{dot_tiled, dot_vec, ggml_attention};
use super::reference::attention_f64;
use super::tests::{Normal, Problem};
use super::{AttnOut, AttnShape, AttnSpec, KvView};
use crate::ThreadPool;
use crate::ggml_math::{round_f16, round_f16_in_place};

/// Output tolerance (fp16 in, fp32 accumulate).
const OUT_TOL: f64 = 2e-3;
/// Log-sum-exp tolerance (fp32).
const LSE_TOL: f64 = 1e-5;

/// A problem whose K/V (contiguous and paged copies) hold f16 values, as the cache does.
fn f16_problem(shape: AttnShape, len: usize, block_size: Option<usize>, seed: u64) -> Problem {
    let mut p = Problem::new(shape, len, block_size, seed);
    round_f16_in_place(&mut p.k);
    round_f16_in_place(&mut p.v);
    if let Some(pg) = &mut p.paged {
        round_f16_in_place(&mut pg.k);
        round_f16_in_place(&mut pg.v);
    }
    p
}

fn run(p: &Problem, view: KvView<'_>, causal: bool, pool: &ThreadPool) -> (Vec<f32>, Vec<f32>) {
    let mut out = vec![f32::NAN; p.q.len()];
    let mut lse = vec![f32::NAN; p.shape.seq_q * p.shape.n_heads];
    ggml_attention(
        &p.q,
        view,
        AttnSpec {
            shape: p.shape,
            causal,
            scale: p.scale(),
        },
        AttnOut {
            out: &mut out,
            lse: &mut lse,
        },
        pool,
    );
    (out, lse)
}

fn shape(seq_q: usize, n_heads: usize, n_kv_heads: usize, head_dim: usize) -> AttnShape {
    AttnShape {
        seq_q,
        n_heads,
        n_kv_heads,
        head_dim,
    }
}

/// Ensures that the kernel matches the f64 reference (on f16 Q/K/V) within the fp16 tolerance
/// for decode and prefill shapes, head dims that do and do not fill a 32-wide step, GQA, both
/// masks and paged views.
#[test]
fn matches_f64_reference_on_f16_inputs() {
    let pool = ThreadPool::new(2).expect("pool");
    let cases = [
        // (seq_q, heads, kv heads, head dim, keys, block size)
        (1, 9, 3, 64, 37, None),
        (1, 9, 3, 64, 300, Some(16)),
        (1, 4, 4, 40, 129, None), // tail past the last 32-step, summed in f64
        (7, 8, 2, 64, 50, Some(16)),
        (5, 6, 3, 36, 5, None), // prefill whose KQ falls back to the decode order
        (3, 2, 1, 10, 20, Some(4)), // prefill whose KQV falls back too
        (33, 4, 2, 64, 33, Some(8)),
    ];
    for (i, &(sq, h, kvh, hd, len, bs)) in cases.iter().enumerate() {
        let p = f16_problem(shape(sq, h, kvh, hd), len, bs, 100 + i as u64);
        let q16: Vec<f32> = p.q.iter().map(|&v| round_f16(v)).collect();
        for causal in [false, true] {
            let want = attention_f64(&q16, p.contiguous(), p.shape, causal, p.scale());
            let (out, lse) = run(&p, p.view(), causal, &pool);
            for (a, b) in out.iter().zip(&want.out) {
                assert!(
                    (f64::from(*a) - b).abs() <= OUT_TOL,
                    "case {i} causal {causal}: {a} vs {b}"
                );
            }
            for (a, b) in lse.iter().zip(&want.lse) {
                assert!(
                    (f64::from(*a) - b).abs() <= LSE_TOL,
                    "case {i} causal {causal}: lse {a} vs {b}"
                );
            }
        }
    }
}

/// Ensures that rows that see no key (causal, more queries than keys) give 0 and `-inf`, and
/// the others still match the reference.
#[test]
fn rows_without_keys_are_zero() {
    let pool = ThreadPool::new(2).expect("pool");
    let p = f16_problem(shape(4, 2, 1, 16), 2, None, 7);
    let (out, lse) = run(&p, p.view(), true, &pool);
    let q16: Vec<f32> = p.q.iter().map(|&v| round_f16(v)).collect();
    let want = attention_f64(&q16, p.contiguous(), p.shape, true, p.scale());
    // Query rows 0 and 1 (two heads each, 16 values per head) see no key.
    assert!(out[..4 * 16].iter().all(|&v| v == 0.0));
    for (a, b) in lse.iter().zip(&want.lse) {
        if b.is_infinite() {
            assert_eq!(*a, f32::NEG_INFINITY);
        } else {
            assert!((f64::from(*a) - b).abs() <= LSE_TOL);
        }
    }
}

/// Ensures that the result does not depend on the pool size or on the paging of the cache,
/// bit for bit (a pipeline stage must reproduce the engine exactly).
#[test]
fn bit_identical_across_pools_and_layouts() {
    let (p1, p3) = (
        ThreadPool::new(1).expect("pool"),
        ThreadPool::new(3).expect("pool"),
    );
    for (sq, len) in [(1, 70), (6, 70)] {
        let p = f16_problem(shape(sq, 6, 2, 64), len, Some(16), 11);
        let a = run(&p, p.view(), true, &p1);
        let b = run(&p, p.view(), true, &p3);
        let c = run(&p, p.contiguous(), true, &p3);
        assert_eq!(a, b);
        assert_eq!(a, c);
    }
}

/// Ensures that both dot-product orders are within the f32 summation bound
/// `n · 2^-24 · Σ|x y|` of the exact sum (products of f16 values are exact in f32), for
/// lengths with and without a tail.
#[test]
fn dot_orders_match_exact_sums() {
    let mut rng = Normal(5);
    for n in [8, 32, 64, 72, 256, 264] {
        let x: Vec<f32> = rng.vec(n).into_iter().map(round_f16).collect();
        let y: Vec<f32> = rng.vec(n).into_iter().map(round_f16).collect();
        let exact: f64 = x
            .iter()
            .zip(&y)
            .map(|(a, b)| f64::from(*a) * f64::from(*b))
            .sum();
        let mag: f64 = x
            .iter()
            .zip(&y)
            .map(|(a, b)| (f64::from(*a) * f64::from(*b)).abs())
            .sum();
        let bound = n as f64 * f64::from(f32::EPSILON) / 2.0 * mag + 1e-30;
        let v = f64::from(dot_vec(&x, &y));
        let t = f64::from(dot_tiled(&x, &y));
        assert!((v - exact).abs() <= bound, "vec n={n}: {v} vs {exact}");
        assert!((t - exact).abs() <= bound, "tiled n={n}: {t} vs {exact}");
    }
}

/// Ensures that the decode order's reduction pairs accumulators (0, 2) and (1, 3) before
/// adding them, as `GGML_F32x8_REDUCE` does: with 2^24 in accumulator 0, -2^24 in
/// accumulator 2 and 1 in accumulator 1, that order gives exactly 1 where a sequential sum of
/// the accumulators would lose the 1.
#[test]
fn decode_reduction_pairs_like_ggml() {
    let mut x = vec![0.0f32; 32];
    let y = vec![1.0f32; 32];
    x[0] = 16_777_216.0; // accumulator 0, lane 0
    x[8] = 1.0; // accumulator 1, lane 0
    x[16] = -16_777_216.0; // accumulator 2, lane 0
    assert_eq!(dot_vec(&x, &y), 1.0);
    // The prefill order puts elements 0, 8 and 16 in one lane, summed in sequence: the 1 is
    // absorbed by 2^24 (ties to even) before -2^24 cancels it.
    assert_eq!(dot_tiled(&x, &y), 0.0);
}

/// Ensures that the AVX2 inner loops (`ggml_simd`) compute exactly the portable loops' bits:
/// scores in both summation orders (four-key groups and their tail, head dims with and without
/// a tail past 32, a paged view), the decode dot product, and the scaled f16 rounding of P.
#[cfg(target_arch = "x86_64")]
#[test]
fn simd_loops_are_bit_identical_to_portable() {
    use super::ggml_simd;
    if !crate::isa::avx2() {
        eprintln!("skipping: this CPU lacks AVX2/FMA/F16C");
        return;
    }
    let mut rng = Normal(11);
    for hd in [8, 24, 64, 72, 128] {
        let (n_kv_heads, block_size, len) = (3usize, 5usize, 23usize);
        let blocks = len.div_ceil(block_size);
        let pool_len = (blocks + 2) * block_size * n_kv_heads * hd;
        let k: Vec<f32> = rng.vec(pool_len).into_iter().map(round_f16).collect();
        let v = vec![0.0f32; pool_len];
        // Blocks out of order, as a paged cache hands them out.
        let table: Vec<u32> = (0..blocks as u32).rev().map(|b| b + 1).collect();
        let kv = KvView {
            k: &k,
            v: &v,
            block_table: &table,
            block_size,
            len,
        };
        let q: Vec<f32> = rng.vec(hd).into_iter().map(round_f16).collect();
        for kvh in 0..n_kv_heads {
            for tiled in [false, true].into_iter().filter(|t| !t || hd % 8 == 0) {
                let mut fast = vec![f32::NAN; len];
                // SAFETY: features detected above; tiled only for hd % 8 == 0; keys in view.
                unsafe { ggml_simd::scores(&kv, kvh, n_kv_heads, &q, 0.125, tiled, &mut fast) };
                for (t, f) in fast.iter().enumerate() {
                    let off = kv.offset(t, kvh, n_kv_heads, hd);
                    let key = &k[off..off + hd];
                    let d = if tiled {
                        dot_tiled(key, &q)
                    } else {
                        dot_vec(key, &q)
                    };
                    assert_eq!(
                        f.to_bits(),
                        (d * 0.125).to_bits(),
                        "hd {hd} key {t} tiled {tiled}"
                    );
                }
            }
        }
        let y: Vec<f32> = rng.vec(hd).into_iter().map(round_f16).collect();
        // SAFETY: features detected above.
        let fast = unsafe { ggml_simd::dot_vec(&q, &y) };
        assert_eq!(fast.to_bits(), dot_vec(&q, &y).to_bits(), "dot_vec hd {hd}");
    }
    let p: Vec<f32> = rng.vec(37).into_iter().map(f32::abs).collect();
    let mut fast = p.clone();
    // SAFETY: features detected above.
    unsafe { ggml_simd::scale_round_f16(&mut fast, 0.37) };
    for (f, x) in fast.iter().zip(&p) {
        assert_eq!(f.to_bits(), round_f16(x * 0.37).to_bits());
    }
}
