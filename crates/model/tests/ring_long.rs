//! Long-context rings on the real model, in release builds only (`scripts/ring-long.sh`):
//! 8000-token prompts (prose, and a token walk) through rings of 2 and 4 (zigzag, one thread
//! per rank) against the single-process engine (two threads), then 32 decode steps
//! teacher-forced with the engine's greedy tokens. Ignored by `cargo test`: the six prefills
//! of 8000 tokens take minutes in a release build and far longer in a debug one. The ring's arithmetic at every size and
//! layout is covered quickly by `ring_attention.rs` and the kernel tests.
//!
//! What it reports: the largest |Δ logit| over the 33 sampled positions, and how far the
//! ring's own greedy tokens equal the engine's — through the first position where the
//! engine's top-1/top-2 margin is under 0.1 (a near-tie a reordered sum may flip).

mod ring_group;
mod tp_group;

use ring_group::run_ring;
use tessera_format::GgufWeights;
use tessera_kernels::ThreadPool;
use tessera_model::kv_cache::{KvCacheConfig, PagedKvCache};
use tessera_model::layers::SeqStep;
use tessera_model::llama::{Llama, LoadSpec};
use tessera_model::stage::StageScratch;
use tp_group::Piece;

/// Prompt tokens.
const PROMPT: usize = 8000;
/// Decode steps after the prompt.
const DECODE: usize = 32;
/// A top-1/top-2 margin under this may flip with a reordered sum.
const NEAR_TIE: f32 = 0.1;
/// Largest |Δ logit| accepted between a ring and the engine at 8000 tokens: about twice the
/// largest measured (prose 1.05 / 0.89, token walk 0.86 / 0.96 for rings of 2 / 4). The ring
/// attends with the flash kernel merged over blocks, the engine with one pass over every key;
/// the quick tests bound random f32 models to 2e-2, and this model, whose activations are
/// rounded to 8 bits before each quantized matmul (as llama.cpp does), turns the f32
/// reordering into rounding flips worth ~1 in a logit. Measured at the stop notes.
const BOUND: f32 = 2.0;

fn argmax(row: &[f32]) -> (usize, f32) {
    let mut best = (0, f32::NEG_INFINITY, f32::NEG_INFINITY);
    for (i, &v) in row.iter().enumerate() {
        if v > best.1 {
            best = (i, v, best.1);
        } else if v > best.2 {
            best.2 = v;
        }
    }
    (best.0, best.1 - best.2)
}

/// The engine's logits at the prompt's last position and after each greedy token.
fn engine(model: &Llama, prompt: &[u32]) -> (Vec<Vec<f32>>, Vec<u32>) {
    let cfg = model.config();
    let mut cache = PagedKvCache::new(KvCacheConfig {
        n_layers: cfg.n_layers,
        n_kv_heads: cfg.n_kv_heads,
        head_dim: cfg.head_dim,
        block_size: 16,
        num_blocks: (PROMPT + DECODE).div_ceil(16) + 1,
    })
    .expect("cache");
    let pool = ThreadPool::new(2).expect("pool");
    let mut scratch = StageScratch::default();
    let mut seq = cache.new_seq();
    let (mut rows, mut greedy) = (Vec::new(), Vec::new());
    let mut next = prompt.to_vec();
    for _ in 0..=DECODE {
        let mut batch = [SeqStep {
            tokens: &next,
            seq: &mut seq,
            logits: true,
        }];
        let row = model
            .forward(&mut batch, &mut cache, &mut scratch, &pool)
            .expect("forward")
            .to_vec();
        let t = argmax(&row).0 as u32;
        rows.push(row);
        greedy.push(t);
        next = vec![t];
    }
    (rows, greedy)
}

/// The prompts: English prose (this repository's architecture document, tokenized, its first
/// [`PROMPT`] tokens — it changes as the project does) and a walk through the vocabulary with
/// a stride (no language at all: the model's predictions are flat, near-ties everywhere).
fn prompts(w: &GgufWeights) -> [(&'static str, Vec<u32>); 2] {
    let tok = tessera_text::tokenizer::Tokenizer::from_gguf(w.content()).expect("tokenizer");
    let doc = include_str!("../../../docs/ARCHITECTURE.md");
    let mut prose = tok.encode(doc, false, false).expect("encodes");
    assert!(prose.len() >= PROMPT, "{} tokens of prose", prose.len());
    prose.truncate(PROMPT);
    let walk = (0..PROMPT)
        .map(|i| ((i * 7919 + 13) % 20000 + 100) as u32)
        .collect();
    [("prose", prose), ("token walk", walk)]
}

/// Ensures that rings of 2 and 4 give the engine's logits within [`BOUND`] at every sampled
/// position of an 8000-token prompt and 32 teacher-forced decode steps, for both prompts, and
/// on the prose the engine's greedy tokens up to its first near-tie (where either of the two
/// tokens is accepted). On the token walk the agreement is reported, not asserted: its
/// margins are small everywhere, and a token whose margin is below the measured logit
/// deviation may flip, which is what the bound allows.
#[test]
#[ignore = "minutes in a release build: scripts/ring-long.sh"]
fn smollm2_8k_rings_match_the_engine() {
    let Some(path) = tessera_testkit::smollm2_gguf() else {
        return;
    };
    let w = GgufWeights::open(&path).expect("open");
    let cfg = w.config().expect("config");
    let model = Llama::load(&w, &cfg, LoadSpec::full(&cfg), &mut |_, _| {}).expect("load");
    for (name, prompt) in prompts(&w) {
        let started = std::time::Instant::now();
        let (want, greedy) = engine(&model, &prompt);
        eprintln!("{name}: engine {:.1} s", started.elapsed().as_secs_f64());
        let mut script = vec![vec![Piece {
            seq: 0,
            tokens: prompt.clone(),
            logits: true,
        }]];
        for &t in &greedy[..DECODE] {
            script.push(vec![Piece {
                seq: 0,
                tokens: vec![t],
                logits: true,
            }]);
        }
        for ranks in [2, 4] {
            let started = std::time::Instant::now();
            let runs = run_ring(&vec![&model; ranks], &script, 1, 16);
            let secs = started.elapsed().as_secs_f64();
            let got: Vec<Vec<f32>> = runs[0]
                .logits
                .iter()
                .map(|l| l.clone().expect("rank 0 samples"))
                .collect();
            let worst = tp_group::max_diff(&got, &want);
            // Positions equal before the first near-tie, and whether that one is equal too.
            let mut same = 0;
            let mut first_tie = None;
            let mut differs = None;
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                let (ours, _) = argmax(g);
                let (theirs, margin) = argmax(w);
                if ours != theirs {
                    differs = Some((i, margin, w[theirs] - w[ours], g[ours] - g[theirs]));
                }
                if margin < NEAR_TIE {
                    // The first near-tie ends the comparison, flipped or not: the sequences
                    // may part there.
                    first_tie = Some(i);
                }
                if ours != theirs || margin < NEAR_TIE {
                    break;
                }
                same += 1;
            }
            let kept: Vec<usize> = runs.iter().map(|r| r.kept[0]).collect();
            eprintln!(
                "{name}, ring of {ranks}: {secs:.1} s; max |Δ logit| {worst:.3} over {} \
                 positions; greedy equal at {same} positions (first near-tie: {first_tie:?}; \
                 first difference (position, engine margin, engine lead, ring lead): \
                 {differs:?}); KV tokens per rank {kept:?}",
                got.len()
            );
            assert!(worst <= BOUND, "{name}, ring of {ranks}: {worst}");
            if name == "prose" {
                // Equal before the first near-tie; at it, either token.
                assert!(
                    differs.is_none_or(|(i, ..)| Some(i) == first_tie),
                    "{name}, ring of {ranks}: greedy differs before the first near-tie: \
                     {differs:?}"
                );
            }
        }
    }
}
