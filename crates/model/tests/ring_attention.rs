//! Context parallelism against the whole model: in-process rings (one thread per rank, see
//! `ring_group`) of random-weight models, over scripts of fresh prefills (split: K/V blocks
//! round the ring), decode steps and later prefill chunks (replicated: partials all-gathered),
//! alone and mixed in one batch.
//!
//! # The error bound
//! A ring rank computes its rows' projections, RoPE and MLP exactly as the whole model does
//! (a row's product does not depend on the other rows). What differs is attention: the ring
//! runs the flash kernel (f32 Q and probabilities, online softmax) over key subsets merged by
//! log-sum-exp, where the engine runs llama.cpp's order (Q and probabilities rounded to f16,
//! one softmax per row). So the first sampling step already differs by the f16 rounding of
//! Q and P (~1e-3 relative), and later steps carry it on through the f16 K/V and 8-bit
//! activation roundings. The difference hardly depends on the ring size (rings of 2, 3 and 4
//! agree with each other ten times closer than with the engine), so it is the kernel's, not
//! the ring's. Measured maxima: see the bounds below; every run gives the same bits, and a
//! pipeline of rings gives the single ring's bits.

mod ring_group;
mod tp_group;

use ring_group::{RankRun, run_ring, run_ring_stage};
use tessera_format::{Arch, ModelConfig, QType, RopeLayout};
use tessera_model::llama::{Llama, LoadSpec};
use tessera_model::stage::TensorSlice;
use tessera_testkit::MemoryWeights;
use tp_group::{Piece, load, max_diff, run_group, teacher_forced};

/// Largest |ring logit − whole logit| with f32 weights. Measured: 9.3e-3 (rings of 2–4;
/// 2.7e-3 at the first step after a 300-token split prefill, rings of 2–8).
const F32_BOUND: f32 = 2e-2;

/// The same with Q4_1 weights. Measured: 0.48 (one flipped 8-bit activation rounding, the
/// same for every ring size).
const Q4_1_BOUND: f32 = 1.0;

/// Largest |logit| difference between rings of different sizes, f32 weights: what the ring's
/// own merge order changes, without the kernel difference to the engine. Measured: 7.3e-4
/// (f16 K/V roundings flipped by the merge order, carried through the decode steps).
const ACROSS_RINGS_F32: f32 = 2e-3;

fn cfg(n_heads: usize, n_kv_heads: usize, head_dim: usize, context_len: usize) -> ModelConfig {
    ModelConfig {
        arch: Arch::Llama,
        n_layers: 3,
        hidden: 64,
        intermediate: 160,
        n_heads,
        n_kv_heads,
        head_dim,
        vocab_size: 101,
        context_len,
        rope_theta: 10_000.0,
        rope_layout: RopeLayout::Interleaved,
        rms_eps: 1e-5,
        qkv_bias: false,
    }
}

fn tokens(seq: usize, len: usize, vocab: usize) -> Vec<u32> {
    (0..len)
        .map(|j| ((j * 31 + seq * 17 + 3) % vocab) as u32)
        .collect()
}

/// Three sequences: fresh prefills in one step (split), a step of later chunks where one
/// sequence is new but too short to split (so the batch replicates), then decode steps.
fn script(vocab: usize) -> Vec<Vec<Piece>> {
    let t: Vec<Vec<u32>> = (0..3).map(|s| tokens(s, 80, vocab)).collect();
    let piece = |seq: usize, r: std::ops::Range<usize>| Piece {
        seq,
        tokens: t[seq][r].to_vec(),
        logits: true,
    };
    let mut script = vec![
        vec![piece(0, 0..37), piece(1, 0..20)],
        vec![piece(0, 37..45), piece(2, 0..5), piece(1, 20..21)],
    ];
    for i in 0..8 {
        script.push(vec![
            piece(0, 45 + i..46 + i),
            piece(1, 21 + i..22 + i),
            piece(2, 5 + i..6 + i),
        ]);
    }
    script
}

/// Rank 0's logits, every step.
fn rank0(runs: &[RankRun]) -> Vec<Vec<f32>> {
    runs[0]
        .logits
        .iter()
        .map(|l| l.clone().expect("rank 0 samples"))
        .collect()
}

/// Ensures that rings of 2, 3 and 4 ranks of random-weight models (GQA 9/3 and 8/4, f32 and
/// Q4_1) give the whole model's logits within the measured bounds at every step of a script
/// of split prefills, a mixed replicated step and decode steps; that only rank 0 returns
/// logits; that each rank keeps the K/V of its share of every sequence (every token on exactly
/// one rank, no rank more than a share plus one step's round-off); and that a second run gives
/// the same bits.
#[test]
fn rings_match_whole_model() {
    let cases = [
        (cfg(9, 3, 32, 128), QType::F32),
        (cfg(9, 3, 32, 128), QType::Q4_1),
        (cfg(8, 4, 16, 128), QType::F32),
    ];
    let (mut worst_f32, mut worst_q) = (0.0f32, 0.0f32);
    for (i, (c, qtype)) in cases.iter().enumerate() {
        let w = MemoryWeights::random(c, *qtype, true, 70 + i as u64).expect("weights");
        let whole = load(&w, c, TensorSlice::whole(c)).expect("whole");
        let script = script(c.vocab_size);
        let want = run_group(std::slice::from_ref(&whole), &script);
        let totals: Vec<usize> = (0..3)
            .map(|s| {
                script
                    .iter()
                    .flatten()
                    .filter(|p| p.seq == s)
                    .map(|p| p.tokens.len())
                    .sum()
            })
            .collect();
        let mut ring2 = None;
        for ranks in 2..=4 {
            let models: Vec<&Llama> = (0..ranks).map(|_| &whole).collect();
            let runs = run_ring(&models, &script, 1, 4);
            for (r, run) in runs.iter().enumerate().skip(1) {
                assert!(
                    run.logits.iter().all(Option::is_none),
                    "case {i}, ring {ranks}: rank {r} returned logits"
                );
            }
            let got = rank0(&runs);
            assert_eq!(
                rank0(&run_ring(&models, &script, 1, 4)),
                got,
                "case {i}, ring {ranks}: same bits again"
            );
            for (s, &total) in totals.iter().enumerate() {
                let kept: Vec<usize> = runs.iter().map(|r| r.kept[s]).collect();
                assert_eq!(kept.iter().sum::<usize>(), total, "sequence {s}: {kept:?}");
                let share = total.div_ceil(ranks);
                assert!(
                    kept.iter().all(|&k| k <= share + 2),
                    "case {i}, ring {ranks}, sequence {s}: kept {kept:?} of {total}"
                );
            }
            let diff = max_diff(&got, &want);
            let across = max_diff(&got, ring2.get_or_insert_with(|| got.clone()));
            eprintln!(
                "case {i} ({qtype}, ring of {ranks}): max |Δlogit| {diff:.3e} vs whole, \
                 {across:.3e} vs the ring of 2"
            );
            if *qtype == QType::F32 {
                assert!(
                    across <= ACROSS_RINGS_F32,
                    "case {i}, ring {ranks}: {across}"
                );
            }
            if *qtype == QType::F32 {
                worst_f32 = worst_f32.max(diff);
            } else {
                worst_q = worst_q.max(diff);
            }
        }
    }
    eprintln!("max |Δlogit| ring vs whole: f32 {worst_f32:.3e}, Q4_1 {worst_q:.3e}");
    assert!(worst_f32 <= F32_BOUND, "f32: {worst_f32} over {F32_BOUND}");
    assert!(worst_q <= Q4_1_BOUND, "Q4_1: {worst_q} over {Q4_1_BOUND}");
}

/// Ensures that a long fresh prefill split over rings of 2 to 8 ranks (every rank holding two
/// zigzag chunks, the first of them attending only to itself and earlier chunks) matches the
/// whole model at its first sampling step, where no decode step has yet compounded anything.
#[test]
fn long_split_prefill_matches() {
    let c = cfg(9, 3, 32, 512);
    let w = MemoryWeights::random(&c, QType::F32, true, 91).expect("weights");
    let whole = load(&w, &c, TensorSlice::whole(&c)).expect("whole");
    let seqs = vec![tokens(0, 400, c.vocab_size), tokens(1, 301, c.vocab_size)];
    let script = teacher_forced(&seqs, 300);
    let script = &script[..3];
    let want = run_group(std::slice::from_ref(&whole), script);
    for ranks in [2, 3, 5, 8] {
        let models: Vec<&Llama> = (0..ranks).map(|_| &whole).collect();
        let got = rank0(&run_ring(&models, script, 2, 16));
        let diff = max_diff(&got, &want);
        eprintln!("ring of {ranks}: 300-token split prefill, max |Δlogit| {diff:.3e}");
        assert!(diff <= F32_BOUND, "ring of {ranks}: {diff}");
    }
}

/// Ensures that a pipeline of rings (layer 0 with the embedding on a ring of 2 or 3, layers
/// 1–2 with the head on a ring of the same size) hands every rank the same whole-step hidden
/// states and gives the single ring's logits bit for bit: a stage boundary changes no
/// arithmetic.
#[test]
fn pipeline_of_rings_equals_one_ring() {
    let c = cfg(9, 3, 32, 128);
    let w = MemoryWeights::random(&c, QType::F32, true, 77).expect("weights");
    let load_spec = |spec: LoadSpec| Llama::load(&w, &c, spec, &mut |_, _| {}).expect("load");
    let whole = load_spec(LoadSpec::full(&c));
    let first = load_spec(LoadSpec::stage(&c, 0..1, true, false));
    let second = load_spec(LoadSpec::stage(&c, 1..3, false, true));
    let script = script(c.vocab_size);
    for ranks in 2..=3 {
        let one = rank0(&run_ring(&vec![&whole; ranks], &script, 1, 4));
        let stage0 = run_ring_stage(&vec![&first; ranks], &script, None, 1, 4);
        let hidden: Vec<Vec<f32>> = stage0[0]
            .hidden
            .iter()
            .map(|h| h.clone().expect("stage 0 hands on hidden states"))
            .collect();
        for (r, run) in stage0.iter().enumerate() {
            let theirs: Vec<Vec<f32>> = run.hidden.iter().flatten().cloned().collect();
            assert_eq!(theirs, hidden, "ring of {ranks}: rank {r}'s hidden states");
        }
        let stage1 = run_ring_stage(&vec![&second; ranks], &script, Some(&hidden), 1, 4);
        assert_eq!(rank0(&stage1), one, "ring of {ranks}");
    }
}
