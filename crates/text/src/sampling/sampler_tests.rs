//! Tests of the sampler: each processor on a hand-computed example, the chain order, greedy,
//! seeding, the empirical distribution, and (proptest) that truncation is never violated.

use proptest::prelude::*;

use super::*;
use crate::sampling::params::SamplingParams;

fn sampler(p: SamplingParams, vocab: usize, prompt: &[u32]) -> Sampler {
    Sampler::new(p.validate(vocab).expect("valid params"), prompt)
}

fn seeded(p: SamplingParams) -> SamplingParams {
    SamplingParams {
        seed: Some(1234),
        ..p
    }
}

/// Logits whose softmax is exactly `probs`.
fn logits_of(probs: &[f64]) -> Vec<f32> {
    probs.iter().map(|p| p.ln() as f32).collect()
}

/// Ensures that greedy returns the argmax and breaks ties towards the lowest id.
#[test]
fn greedy_is_argmax_lowest_id_on_ties() {
    let mut s = sampler(SamplingParams::greedy(), 5, &[]);
    assert_eq!(s.sample(&mut [0.1, 3.0, 2.0, 3.0, -1.0]).id, 1);
    assert_eq!(s.sample(&mut [0.1, -3.0, 2.0, 3.0, 7.0]).id, 4);
    assert_eq!(s.sample(&mut [f32::NAN, 1.0, 1.0, 0.0, 0.0]).id, 1);
}

/// Ensures that repetition, frequency and presence penalties match a hand computation:
/// repetition over prompt + output, frequency/presence over output only.
#[test]
fn penalties_match_hand_computation() {
    let p = SamplingParams {
        repetition_penalty: 2.0,
        frequency_penalty: 0.5,
        presence_penalty: 0.25,
        ..SamplingParams::greedy()
    };
    let mut s = sampler(p, 5, &[0, 1]);
    s.record(3);
    s.record(3);
    s.record(4);
    let mut logits = [2.0f32, -1.0, 0.5, 3.0, 1.0];
    s.apply_penalties(&mut logits);
    // t0: 2/2; t1: -1*2; t2 untouched; t3: 3/2 - (2*0.5 + 0.25); t4: 1/2 - (0.5 + 0.25).
    assert_eq!(logits, [1.0, -2.0, 0.5, 0.25, -0.25]);
}

/// Ensures that penalties steer greedy decoding away from a repeated token.
#[test]
fn penalties_change_greedy_choice() {
    let p = SamplingParams {
        presence_penalty: 1.0,
        ..SamplingParams::greedy()
    };
    let mut s = sampler(p, 3, &[]);
    assert_eq!(s.sample(&mut [1.0, 1.5, 0.0]).id, 1);
    // 1.5 - 1.0 < 1.0: token 0 now wins.
    assert_eq!(s.sample(&mut [1.0, 1.5, 0.0]).id, 0);
}

/// Ensures that top-k keeps the k largest logits, sorted, ties to the lowest id.
#[test]
fn top_k_keeps_k_largest() {
    let logits = [0.1f32, 3.0, 2.0, 3.0, -1.0];
    let mut s = sampler(
        SamplingParams {
            top_k: 2,
            ..SamplingParams::default()
        },
        5,
        &[],
    );
    let n = s.truncate(&logits);
    assert_eq!(&s.idx[..n], &[1, 3]);
    let mut s = sampler(
        SamplingParams {
            top_k: 3,
            ..SamplingParams::default()
        },
        5,
        &[],
    );
    let n = s.truncate(&logits);
    assert_eq!(&s.idx[..n], &[1, 3, 2]);
}

/// Ensures that top-p keeps the shortest most-likely prefix reaching p.
#[test]
fn top_p_keeps_shortest_prefix_reaching_p() {
    // ids 0..5 with probabilities 0.1, 0.5, 0.05, 0.2, 0.15.
    let logits = logits_of(&[0.1, 0.5, 0.05, 0.2, 0.15]);
    let mut s = sampler(
        SamplingParams {
            top_p: 0.75,
            ..SamplingParams::default()
        },
        5,
        &[],
    );
    let n = s.truncate(&logits);
    assert_eq!(&s.idx[..n], &[1, 3, 4]); // 0.5 + 0.2 + 0.15 = 0.85 >= 0.75
    let mut s = sampler(
        SamplingParams {
            top_p: 0.45,
            ..SamplingParams::default()
        },
        5,
        &[],
    );
    let n = s.truncate(&logits);
    assert_eq!(&s.idx[..n], &[1]);
}

/// Ensures that top-p finds a nucleus larger than its first window (uniform over 1000 tokens,
/// p = 0.5 keeps exactly the 500 lowest ids).
#[test]
fn top_p_grows_window_beyond_first() {
    let logits = vec![0.0f32; 1000];
    let mut s = sampler(
        SamplingParams {
            top_p: 0.5,
            ..SamplingParams::default()
        },
        1000,
        &[],
    );
    let n = s.truncate(&logits);
    assert_eq!(n, 500);
    assert!(s.idx[..n].iter().enumerate().all(|(i, &t)| t == i as u32));
}

/// Ensures that min-p keeps tokens with p >= min_p * p_max, in id order.
#[test]
fn min_p_keeps_tokens_above_scaled_max() {
    let logits = logits_of(&[0.1, 0.5, 0.05, 0.2, 0.15]);
    // floor 0.25 * 0.5 = 0.125: keeps 0.5, 0.2, 0.15.
    let mut s = sampler(
        SamplingParams {
            min_p: 0.25,
            ..SamplingParams::default()
        },
        5,
        &[],
    );
    let n = s.truncate(&logits);
    assert_eq!(&s.idx[..n], &[1, 3, 4]);
    let mut s = sampler(
        SamplingParams {
            min_p: 1.0,
            ..SamplingParams::default()
        },
        5,
        &[],
    );
    let n = s.truncate(&logits);
    assert_eq!(&s.idx[..n], &[1]);
}

/// Ensures that top-p runs after top-k, renormalised over the k survivors (llama.cpp order):
/// with probabilities 0.4/0.3/0.2/0.1, k = 2 and p = 0.5 keep one token (0.4/0.7 >= 0.5),
/// where top-p over the full distribution would keep two.
#[test]
fn chain_order_top_k_then_top_p() {
    let logits = logits_of(&[0.4, 0.3, 0.2, 0.1]);
    let p = SamplingParams {
        top_k: 2,
        top_p: 0.5,
        ..SamplingParams::default()
    };
    let mut s = sampler(p, 4, &[]);
    let n = s.truncate(&logits);
    assert_eq!(&s.idx[..n], &[0]);
}

/// Pearson's chi-square statistic of observed counts against expected probabilities.
fn chi_square(counts: &[u64], probs: &[f64]) -> f64 {
    let total: u64 = counts.iter().sum();
    counts
        .iter()
        .zip(probs)
        .map(|(&c, &p)| {
            let e = p * total as f64;
            (c as f64 - e).powi(2) / e
        })
        .sum()
}

fn softmax_f64(logits: &[f32], temperature: f64) -> Vec<f64> {
    let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let e: Vec<f64> = logits
        .iter()
        .map(|&l| ((l as f64 - m) / temperature).exp())
        .collect();
    let z: f64 = e.iter().sum();
    e.iter().map(|x| x / z).collect()
}

fn histogram(p: SamplingParams, logits: &[f32], draws: usize) -> Vec<u64> {
    let mut s = sampler(p, logits.len(), &[]);
    let mut counts = vec![0u64; logits.len()];
    let mut buf = logits.to_vec();
    for _ in 0..draws {
        buf.copy_from_slice(logits);
        counts[s.sample(&mut buf).id as usize] += 1;
    }
    counts
}

/// Ensures that 20000 draws at temperature 1 follow the softmax (chi-square, 7 degrees of
/// freedom, below the 99.9% quantile 24.32; fixed seed so the test is deterministic).
#[test]
fn empirical_distribution_matches_softmax() {
    let logits = [0.0f32, 0.5, 1.0, -0.5, 2.0, -1.0, 0.3, 1.5];
    let counts = histogram(seeded(SamplingParams::default()), &logits, 20_000);
    let chi2 = chi_square(&counts, &softmax_f64(&logits, 1.0));
    assert!(chi2 < 24.32, "chi2 {chi2}, counts {counts:?}");
}

/// Ensures that temperature scales the logits: at T = 0.5 the softmax of (0, ln 2) is 1/5, 4/5
/// (chi-square, 1 degree of freedom, below the 99.9% quantile 10.83).
#[test]
fn temperature_sharpens_distribution() {
    let logits = [0.0f32, std::f32::consts::LN_2];
    let p = seeded(SamplingParams {
        temperature: 0.5,
        ..SamplingParams::default()
    });
    let counts = histogram(p, &logits, 20_000);
    let chi2 = chi_square(&counts, &[0.2, 0.8]);
    assert!(chi2 < 10.83, "chi2 {chi2}, counts {counts:?}");
}

fn sequence(seed: u64, n: usize) -> Vec<u32> {
    let p = SamplingParams {
        seed: Some(seed),
        ..SamplingParams::default()
    };
    let mut s = sampler(p, 50, &[]);
    (0..n).map(|_| s.sample(&mut [0.0f32; 50]).id).collect()
}

/// Ensures that the same seed replays the same tokens and a different seed does not.
#[test]
fn same_seed_same_sequence_different_seed_differs() {
    assert_eq!(sequence(7, 32), sequence(7, 32));
    assert_ne!(sequence(7, 32), sequence(8, 32));
    let s = sampler(seeded(SamplingParams::default()), 3, &[]);
    assert_eq!(s.seed(), 1234);
}

/// Ensures that logprobs are the log-softmax of the raw logits (before penalties), and that
/// top_logprobs lists the most likely raw tokens first.
#[test]
fn logprobs_are_raw_log_softmax() {
    let p = SamplingParams {
        logprobs: true,
        top_logprobs: 2,
        repetition_penalty: 100.0,
        ..SamplingParams::greedy()
    };
    // Token 2 is in the prompt and penalised to 0.03, so greedy picks token 1.
    let mut s = sampler(p, 3, &[2]);
    let t = s.sample(&mut [1.0, 2.0, 3.0]);
    let lse = (1f64.exp() + 2f64.exp() + 3f64.exp()).ln();
    assert_eq!(t.id, 1);
    let lp = t.logprob.expect("logprob asked for");
    assert!((lp as f64 - (2.0 - lse)).abs() < 1e-6, "{lp}");
    assert_eq!(t.top_logprobs.len(), 2);
    assert_eq!(t.top_logprobs[0].0, 2);
    assert_eq!(t.top_logprobs[1].0, 1);
    assert!((t.top_logprobs[0].1 as f64 - (3.0 - lse)).abs() < 1e-6);
    let plain = sampler(SamplingParams::greedy(), 3, &[]).sample(&mut [1.0, 2.0, 3.0]);
    assert_eq!((plain.logprob, plain.top_logprobs.len()), (None, 0));
}

/// Ensures that after the first call the scratch buffers are reused, not reallocated.
#[test]
fn no_reallocation_after_first_call() {
    let p = seeded(SamplingParams {
        top_k: 40,
        top_p: 0.9,
        min_p: 0.05,
        repetition_penalty: 1.1,
        logprobs: true,
        ..SamplingParams::default()
    });
    let vocab = 4096;
    let mut s = sampler(p, vocab, &[1, 2, 3]);
    let logits: Vec<f32> = (0..vocab)
        .map(|i| ((i * 7919) % 1000) as f32 / 100.0)
        .collect();
    let mut buf = logits.clone();
    s.sample(&mut buf);
    let ptrs = (
        s.idx.as_ptr(),
        s.weights.as_ptr(),
        s.raw.as_ptr(),
        s.touched.as_ptr(),
        s.heap.as_ptr(),
    );
    for _ in 0..50 {
        buf.copy_from_slice(&logits);
        s.sample(&mut buf);
    }
    assert_eq!(
        ptrs,
        (
            s.idx.as_ptr(),
            s.weights.as_ptr(),
            s.raw.as_ptr(),
            s.touched.as_ptr(),
            s.heap.as_ptr()
        )
    );
}

/// The kept set by a naive full sort, with the same arithmetic as the sampler.
fn naive_kept(logits: &[f32], top_k: usize, top_p: f32, min_p: f32) -> Vec<u32> {
    let mut ids: Vec<u32> = (0..logits.len() as u32).collect();
    ids.sort_by(|&a, &b| {
        logits[b as usize]
            .total_cmp(&logits[a as usize])
            .then(a.cmp(&b))
    });
    if top_k > 0 {
        ids.truncate(top_k);
    }
    if top_p < 1.0 {
        let max = logits[ids[0] as usize];
        let z: f64 = ids
            .iter()
            .map(|&t| f64::from((logits[t as usize] - max).exp()))
            .sum();
        let mut cum = 0.0;
        let mut cut = ids.len();
        for (i, &t) in ids.iter().enumerate() {
            cum += f64::from((logits[t as usize] - max).exp());
            if cum >= f64::from(top_p) * z {
                cut = i + 1;
                break;
            }
        }
        ids.truncate(cut);
    }
    if min_p > 0.0 {
        let max = logits[ids[0] as usize];
        let keep = ids
            .iter()
            .take_while(|&&t| logits[t as usize] - max >= min_p.ln())
            .count();
        ids.truncate(keep.max(1));
    }
    ids
}

proptest! {
    /// Ensures that top-k, top-p and min-p never let an excluded token through, and that the
    /// kept set equals a naive full-sort reference.
    #[test]
    fn truncation_never_returns_excluded_token(
        logits in prop::collection::vec(-10.0f32..10.0, 2..300),
        top_k in 0u32..12,
        top_p in prop_oneof![Just(1.0f32), 0.01f32..1.0],
        min_p in prop_oneof![Just(0.0f32), 0.0f32..1.0],
        temperature in 0.05f32..3.0,
        seed in any::<u64>(),
    ) {
        let p = SamplingParams { top_k, top_p, min_p, temperature, seed: Some(seed),
            ..SamplingParams::default() };
        let kept = naive_kept(&logits, top_k as usize, top_p, min_p);
        let mut s = sampler(p, logits.len(), &[]);
        let n = s.truncate(&logits);
        let mut got = s.idx[..n].to_vec();
        got.sort_unstable();
        let mut want = kept.clone();
        want.sort_unstable();
        prop_assert_eq!(got, want);
        for _ in 0..8 {
            let mut buf = logits.clone();
            let id = s.sample(&mut buf).id;
            prop_assert!(kept.contains(&id), "{} not in {:?}", id, kept);
        }
    }

    /// Ensures that a sampler resumed after the first `k` tokens of a sequence (a sequence
    /// migrated to another worker) draws exactly the tokens the uninterrupted sampler draws
    /// after them — with penalties on, for greedy and random sampling, and through steps whose
    /// logits are all NaN (the degenerate argmax fallback still takes its one draw).
    #[test]
    fn resumed_sampler_continues_the_sequence(
        steps in prop::collection::vec(
            prop_oneof![
                9 => prop::collection::vec(-4.0f32..4.0, 40),
                1 => Just(vec![f32::NAN; 40]),
            ],
            2..24,
        ),
        cut in 0usize..24,
        temperature in prop_oneof![Just(0.0f32), 0.3f32..1.5],
        repetition_penalty in prop_oneof![Just(1.0f32), 1.0f32..1.5],
        frequency_penalty in prop_oneof![Just(0.0f32), 0.0f32..1.0],
        top_k in 0u32..10,
        seed in any::<u64>(),
    ) {
        let p = SamplingParams { temperature, repetition_penalty, frequency_penalty, top_k,
            seed: Some(seed), ..SamplingParams::default() };
        let prompt = [3u32, 5, 5, 39];
        let mut whole = sampler(p.clone(), 40, &prompt);
        let ids: Vec<u32> = steps.iter().map(|l| whole.sample(&mut l.clone()).id).collect();
        let cut = cut.min(ids.len());
        let mut resumed = Sampler::resume(p.validate(40).expect("valid"), &prompt, &ids[..cut]);
        let rest: Vec<u32> = steps[cut..].iter().map(|l| resumed.sample(&mut l.clone()).id).collect();
        prop_assert_eq!(&rest[..], &ids[cut..]);
    }

    /// Ensures that greedy decoding equals a naive argmax (first maximum).
    #[test]
    fn greedy_equals_naive_argmax(logits in prop::collection::vec(-5.0f32..5.0, 1..200)) {
        let mut best = 0;
        for (i, &l) in logits.iter().enumerate() {
            if l > logits[best] { best = i; }
        }
        let mut s = sampler(SamplingParams::greedy(), logits.len(), &[]);
        prop_assert_eq!(s.sample(&mut logits.clone()).id as usize, best);
    }

    /// Ensures that the heap scan returns the first m ids of a full sort, in order.
    #[test]
    fn top_m_heap_scan_matches_full_sort(
        logits in prop::collection::vec(prop_oneof![Just(1.0f32), -3.0f32..3.0], 1..400),
        m in 0usize..64,
    ) {
        let mut all: Vec<u32> = (0..logits.len() as u32).collect();
        all.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]).then(a.cmp(&b)));
        all.truncate(m);
        let mut heap = Vec::new();
        top_m_sorted(&logits, m.min(logits.len()), &mut heap);
        prop_assert_eq!(heap, all);
    }

    /// Ensures that top_n equals the first n of a full sort (value descending, id ascending).
    #[test]
    fn top_n_matches_full_sort(
        logits in prop::collection::vec(prop_oneof![Just(0.5f32), -3.0f32..3.0], 1..100),
        n in 1usize..21,
    ) {
        let mut all: Vec<(u32, f32)> = logits.iter().enumerate().map(|(i, &l)| (i as u32, l)).collect();
        all.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        all.truncate(n);
        prop_assert_eq!(top_n(&logits, n), all);
    }
}

/// Ensures that sampling a 49152-token vocabulary stays cheap next to a forward pass; prints
/// the time per call for common settings (run by hand with `--ignored --nocapture`).
#[test]
#[ignore = "timing report, not a check of behaviour"]
fn timing_report_for_real_vocab() {
    let vocab = 49_152;
    let mut rng = crate::sampling::Rng::seed_from_u64(3);
    // Roughly LM-shaped logits: a sum of uniforms, scaled, with a few strong candidates.
    let mut logits: Vec<f32> = (0..vocab)
        .map(|_| ((0..4).map(|_| rng.next_f64()).sum::<f64>() * 3.0) as f32)
        .collect();
    for i in 0..8 {
        logits[i * 1000] += 12.0;
    }
    let configs = [
        ("greedy", SamplingParams::greedy()),
        ("temperature 1", SamplingParams::default()),
        (
            "top_k 40",
            SamplingParams {
                top_k: 40,
                ..SamplingParams::default()
            },
        ),
        (
            "top_p 0.95",
            SamplingParams {
                top_p: 0.95,
                ..SamplingParams::default()
            },
        ),
        (
            "min_p 0.05",
            SamplingParams {
                min_p: 0.05,
                ..SamplingParams::default()
            },
        ),
        (
            "k40 p0.95 minp0.05 rep1.1 logprobs5",
            SamplingParams {
                top_k: 40,
                top_p: 0.95,
                min_p: 0.05,
                repetition_penalty: 1.1,
                logprobs: true,
                top_logprobs: 5,
                ..SamplingParams::default()
            },
        ),
    ];
    for (label, p) in configs {
        let mut s = sampler(seeded(p), vocab, &[1, 2, 3]);
        let mut buf = logits.clone();
        let iters = 200;
        let start = std::time::Instant::now();
        for _ in 0..iters {
            buf.copy_from_slice(&logits);
            s.sample(&mut buf);
        }
        let us = start.elapsed().as_secs_f64() * 1e6 / iters as f64;
        println!("{label:<40} {us:8.1} us/token");
    }
}
