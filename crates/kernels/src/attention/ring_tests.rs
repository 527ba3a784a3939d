//! Ring attention against the f64 reference: every ring size 1–8, both layouts, sequences
//! shorter than the chunk count (ranks holding nothing, query chunks with no visible key from a
//! rank: the `(0, −inf)` part), GQA.

use super::*;
use crate::attention::reference::{Reference, attention_f64};
use crate::attention::tests::Normal;

/// DESIGN.md's fp32 tolerance, for output and lse alike (as the flash kernel's tests). The
/// ring adds one merge per visible block pair; on N(0,1) data the worst difference measured
/// over these cases is 9.3e-7 (printed by `ring_prefill_matches_reference`, `--nocapture`).
const TOL: f64 = 1e-5;

fn shape(len: usize) -> AttnShape {
    AttnShape {
        seq_q: len,
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 16,
    }
}

/// Ensures that the layouts partition the sequence: every position on exactly one rank, chunks
/// in order, zigzag rank r holding chunks r and 2P−1−r, and `owner` agreeing with `chunks`.
#[test]
fn layouts_partition_the_sequence() {
    for layout in [RingLayout::Contiguous, RingLayout::Zigzag] {
        for ranks in 1..=8 {
            for len in [0, 1, 3, 7, 16, 33, 100] {
                let mut seen = vec![0u32; len];
                for r in 0..ranks {
                    let cs = layout.chunks(len, ranks, r);
                    assert!(cs.windows(2).all(|w| w[0].end <= w[1].start), "{cs:?}");
                    for c in cs {
                        for p in c {
                            seen[p] += 1;
                            assert_eq!(layout.owner(len, ranks, p), r);
                        }
                    }
                }
                assert!(seen.iter().all(|&n| n == 1), "{layout:?} {ranks} {len}");
            }
        }
    }
    assert_eq!(RingLayout::Zigzag.chunks(16, 4, 1), vec![2..4, 12..14]);
    assert_eq!(RingLayout::Zigzag.chunks(16, 4, 3), vec![6..8, 8..10]);
    // 3 positions over 8 chunks: rank 3 holds nothing.
    assert!(RingLayout::Zigzag.chunks(3, 4, 3).is_empty());
}

fn max_diff(got_o: &[f32], got_lse: &[f32], want: &Reference) -> f64 {
    let mut worst = 0.0f64;
    for (g, w) in got_lse.iter().zip(&want.lse) {
        if w.is_infinite() {
            assert!(g.is_infinite() && *g < 0.0, "lse {g} vs {w}");
        } else {
            worst = worst.max((f64::from(*g) - w).abs());
        }
    }
    for (g, w) in got_o.iter().zip(&want.out) {
        assert!(!g.is_nan(), "NaN output");
        worst = worst.max((f64::from(*g) - w).abs());
    }
    worst
}

/// Runs `ring` for every ring size 1–8 and both layouts into fresh `(rows, head_dim)` buffers
/// and checks each result against `want` within [`TOL`]; the worst difference.
fn every_ring(
    rows: usize,
    head_dim: usize,
    want: &Reference,
    ring: impl Fn(RingLayout, usize, AttnOut<'_>),
) -> f64 {
    let mut worst = 0.0f64;
    for layout in [RingLayout::Contiguous, RingLayout::Zigzag] {
        for ranks in 1..=8 {
            let mut out = vec![f32::NAN; rows * head_dim];
            let mut lse = vec![f32::NAN; rows];
            ring(
                layout,
                ranks,
                AttnOut {
                    out: &mut out,
                    lse: &mut lse,
                },
            );
            let d = max_diff(&out, &lse, want);
            assert!(d <= TOL, "{layout:?} ring of {ranks}, {rows} rows: {d}");
            worst = worst.max(d);
        }
    }
    worst
}

/// Ensures that causal ring attention over every ring size 1–8 and both layouts matches the
/// f64 reference within the fp32 tolerance, on sequences long and short (shorter than the
/// chunk count: ranks that hold no positions, and blocks no query can see).
#[test]
fn ring_prefill_matches_reference() {
    let pool = ThreadPool::new(2).expect("pool");
    let mut worst = 0.0f64;
    for (seed, len) in [1usize, 5, 9, 64, 131].into_iter().enumerate() {
        let s = shape(len);
        let mut rng = Normal(seed as u64 + 11);
        let q = rng.vec(len * s.n_heads * s.head_dim);
        let k = rng.vec(len * s.n_kv_heads * s.head_dim);
        let v = rng.vec(len * s.n_kv_heads * s.head_dim);
        let scale = 1.0 / (s.head_dim as f32).sqrt();
        let want = attention_f64(&q, KvView::contiguous(&k, &v, len), s, true, scale);
        let d = every_ring(len * s.n_heads, s.head_dim, &want, |layout, ranks, o| {
            ring_attention(&q, &k, &v, s, scale, Ring { layout, ranks }, o, &pool);
        });
        worst = worst.max(d);
    }
    println!("ring prefill: worst |Δ| vs f64 = {worst:.2e}");
}

/// Ensures that distributed flash-decoding (each rank over its chunks, merged by LSE) matches
/// the f64 reference for every ring size and layout, including rings with more chunks than
/// cached positions (ranks contributing the empty part).
#[test]
fn ring_decode_matches_reference() {
    let pool = ThreadPool::new(2).expect("pool");
    for (seed, len) in [1usize, 3, 50, 257].into_iter().enumerate() {
        let s = shape(1);
        let mut rng = Normal(seed as u64 + 101);
        let q = rng.vec(s.n_heads * s.head_dim);
        let k = rng.vec(len * s.n_kv_heads * s.head_dim);
        let v = rng.vec(len * s.n_kv_heads * s.head_dim);
        let scale = 1.0 / (s.head_dim as f32).sqrt();
        // The newest position sees every cached key: causal bottom-right with one row.
        let want = attention_f64(&q, KvView::contiguous(&k, &v, len), s, true, scale);
        every_ring(s.n_heads, s.head_dim, &want, |layout, ranks, o| {
            ring_decode(&q, &k, &v, len, s, scale, Ring { layout, ranks }, o, &pool);
        });
    }
}
