//! Long-context rings on the real model, in release builds only (`scripts/ring-long.sh`): an
//! 8000-token prompt through rings of 2 and 4 (zigzag, one thread per rank) against the
//! single-process engine (two threads), then 32 decode steps teacher-forced with the engine's
//! greedy tokens. Ignored by `cargo test`: the three prefills of 8000 tokens take minutes in a
//! release build and far longer in a debug one. The ring's arithmetic at every size and
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
/// Largest |Δ logit| accepted between a ring and the engine at 8000 tokens. Measured: see the
/// stop note of the ring attention issue (the quick tests bound random models to 2e-2, and
/// this quantized model amplifies 8-bit rounding flips to ~1 in log-probability).
const BOUND: f32 = 4.0;

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

/// Ensures that rings of 2 and 4 give the engine's logits within [`BOUND`] at every sampled
/// position of an 8000-token prompt and 32 teacher-forced decode steps, and the engine's
/// greedy tokens through the first near-tie.
#[test]
#[ignore = "minutes in a release build: scripts/ring-long.sh"]
fn smollm2_8k_rings_match_the_engine() {
    let Some(path) = tessera_testkit::smollm2_gguf() else {
        return;
    };
    let w = GgufWeights::open(&path).expect("open");
    let cfg = w.config().expect("config");
    let model = Llama::load(&w, &cfg, LoadSpec::full(&cfg), &mut |_, _| {}).expect("load");
    // A long, varied prompt: the model's own vocabulary walked with a stride.
    let prompt: Vec<u32> = (0..PROMPT)
        .map(|i| ((i * 7919 + 13) % 20000 + 100) as u32)
        .collect();
    let started = std::time::Instant::now();
    let (want, greedy) = engine(&model, &prompt);
    eprintln!("engine: {:.1} s", started.elapsed().as_secs_f64());
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
        let mut same = 0;
        for (g, w) in got.iter().zip(&want) {
            let (ours, _) = argmax(g);
            let (theirs, margin) = argmax(w);
            assert_eq!(ours, theirs, "ring of {ranks}: position {same}");
            same += 1;
            if margin < NEAR_TIE {
                break;
            }
        }
        let kept: Vec<usize> = runs.iter().map(|r| r.kept[0]).collect();
        eprintln!(
            "ring of {ranks}: {secs:.1} s; max |Δ logit| {worst:.3} over {} positions; greedy \
             equal through position {same}; KV tokens per rank {kept:?}",
            got.len()
        );
        assert!(worst <= BOUND, "ring of {ranks}: {worst}");
    }
}
