//! The model's forward pass against a naive f64 Llama, and its batched and pipelined forms
//! against the plain one, on small deterministic random models.

use tessera_format::QType;
use tessera_format::{Arch, ModelConfig, RopeLayout};
use tessera_kernels::ThreadPool;
use tessera_kernels::ggml_math::round_f16;
use tessera_model::kv_cache::{KvCacheConfig, PagedKvCache};
use tessera_model::layers::SeqStep;
use tessera_model::llama::{Llama, LoadSpec};
use tessera_model::stage::{LocalReduce, StageCtx, StageInput, StageOutput, StageScratch};
use tessera_model::weights::{TensorKey as K, WeightStore, WeightStoreExt};
use tessera_testkit::MemoryWeights;

fn cfg(
    arch: Arch,
    rope_layout: RopeLayout,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
) -> ModelConfig {
    ModelConfig {
        arch,
        n_layers: 3,
        hidden: 64,
        intermediate: 96,
        n_heads,
        n_kv_heads,
        head_dim,
        vocab_size: 101,
        context_len: 128,
        rope_theta: 10_000.0,
        rope_layout,
        rms_eps: 1e-5,
        qkv_bias: arch == Arch::Qwen2,
    }
}

fn cache_for(cfg: &ModelConfig, block_size: usize) -> PagedKvCache {
    PagedKvCache::new(KvCacheConfig {
        n_layers: cfg.n_layers,
        n_kv_heads: cfg.n_kv_heads,
        head_dim: cfg.head_dim,
        block_size,
        num_blocks: 64,
    })
    .expect("cache")
}

/// `x` rounded to f16 (through f32, as the engine's f32 values are).
fn f16(x: f64) -> f64 {
    f64::from(round_f16(x as f32))
}

/// A direct f64 transcription of the Llama forward pass over a whole token sequence,
/// returning the logits at every position; attention rounds to f16 where the engine's
/// contract does.
fn reference_logits(w: &MemoryWeights, c: &ModelConfig, tokens: &[u32]) -> Vec<Vec<f64>> {
    let get = |key, rows, cols| -> Vec<f64> {
        w.matrix(key, rows, cols)
            .expect("tensor")
            .dequantize()
            .into_iter()
            .map(f64::from)
            .collect()
    };
    let (h, d, n) = (c.hidden, c.head_dim, tokens.len());
    let linear = |x: &[f64], wt: &[f64], rows: usize, cols: usize| -> Vec<f64> {
        x.chunks(cols)
            .flat_map(|xr| {
                (0..rows).map(move |r| (0..cols).map(|k| xr[k] * wt[r * cols + k]).sum::<f64>())
            })
            .collect()
    };
    let rms = |x: &[f64], g: &[f64]| -> Vec<f64> {
        x.chunks(h)
            .flat_map(|r| {
                let s =
                    (r.iter().map(|v| v * v).sum::<f64>() / h as f64 + f64::from(c.rms_eps)).sqrt();
                r.iter()
                    .zip(g)
                    .map(move |(v, g)| v / s * g)
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    let rope = |x: &mut [f64], heads: usize| {
        for t in 0..n {
            for hh in 0..heads {
                let v = &mut x[(t * heads + hh) * d..(t * heads + hh + 1) * d];
                for i in 0..d / 2 {
                    let a = t as f64 * f64::from(c.rope_theta).powf(-2.0 * i as f64 / d as f64);
                    let (p, q) = match c.rope_layout {
                        RopeLayout::Interleaved => (2 * i, 2 * i + 1),
                        RopeLayout::Half => (i, i + d / 2),
                    };
                    let (xp, xq) = (v[p], v[q]);
                    v[p] = xp * a.cos() - xq * a.sin();
                    v[q] = xp * a.sin() + xq * a.cos();
                }
            }
        }
    };
    let embed = get(K::TokenEmbd, c.vocab_size, h);
    let mut x: Vec<f64> = tokens
        .iter()
        .flat_map(|&t| embed[t as usize * h..(t as usize + 1) * h].to_vec())
        .collect();
    for l in 0..c.n_layers {
        let xn = rms(&x, &get(K::AttnNorm(l), 1, h));
        let mut q = linear(&xn, &get(K::AttnQ(l), c.q_dim(), h), c.q_dim(), h);
        let mut k = linear(&xn, &get(K::AttnK(l), c.kv_dim(), h), c.kv_dim(), h);
        let mut v = linear(&xn, &get(K::AttnV(l), c.kv_dim(), h), c.kv_dim(), h);
        if c.qkv_bias {
            for (buf, key, width) in [
                (&mut q, K::AttnQBias(l), c.q_dim()),
                (&mut k, K::AttnKBias(l), c.kv_dim()),
                (&mut v, K::AttnVBias(l), c.kv_dim()),
            ] {
                let b = get(key, 1, width);
                buf.iter_mut()
                    .enumerate()
                    .for_each(|(i, val)| *val += b[i % width]);
            }
        }
        rope(&mut q, c.n_heads);
        rope(&mut k, c.n_kv_heads);
        // The engine's attention contract (llama.cpp's): Q, K, V and the probabilities are
        // rounded to f16; everything else stays exact.
        for val in q.iter_mut().chain(k.iter_mut()).chain(v.iter_mut()) {
            *val = f16(*val);
        }
        let mut ctx = vec![0.0; n * c.q_dim()];
        for t in 0..n {
            for hh in 0..c.n_heads {
                let kvh = hh / c.gqa_ratio();
                let qv = &q[(t * c.n_heads + hh) * d..][..d];
                let scores: Vec<f64> = (0..=t)
                    .map(|j| {
                        qv.iter()
                            .zip(&k[(j * c.n_kv_heads + kvh) * d..][..d])
                            .map(|(a, b)| a * b)
                            .sum::<f64>()
                            / (d as f64).sqrt()
                    })
                    .collect();
                let m = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = scores.iter().map(|s| (s - m).exp()).sum();
                for (j, s) in scores.iter().enumerate() {
                    let p = f16((s - m).exp() / z);
                    for i in 0..d {
                        ctx[(t * c.n_heads + hh) * d + i] +=
                            p * v[(j * c.n_kv_heads + kvh) * d + i];
                    }
                }
            }
        }
        let o = linear(&ctx, &get(K::AttnOutput(l), h, c.q_dim()), h, c.q_dim());
        x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
        let xn = rms(&x, &get(K::FfnNorm(l), 1, h));
        let g = linear(
            &xn,
            &get(K::FfnGate(l), c.intermediate, h),
            c.intermediate,
            h,
        );
        let u = linear(&xn, &get(K::FfnUp(l), c.intermediate, h), c.intermediate, h);
        let act: Vec<f64> = g
            .iter()
            .zip(&u)
            .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
            .collect();
        let down = linear(
            &act,
            &get(K::FfnDown(l), h, c.intermediate),
            h,
            c.intermediate,
        );
        x.iter_mut().zip(&down).for_each(|(a, b)| *a += b);
    }
    let xn = rms(&x, &get(K::OutputNorm, 1, h));
    let out_key = if w.contains(K::Output) {
        K::Output
    } else {
        K::TokenEmbd
    };
    let logits = linear(&xn, &get(out_key, c.vocab_size, h), c.vocab_size, h);
    logits.chunks(c.vocab_size).map(<[f64]>::to_vec).collect()
}

/// Runs `tokens` as a prefill of `prefill` tokens then one decode step per remaining token,
/// returning the logits after the prefill and after each decode step.
fn run_engine(
    model: &Llama,
    cache: &mut PagedKvCache,
    tokens: &[u32],
    prefill: usize,
    pool: &ThreadPool,
) -> Vec<Vec<f32>> {
    let mut seq = cache.new_seq();
    let mut scratch = StageScratch::default();
    let mut out = Vec::new();
    let mut step = |toks: &[u32], seq: &mut _, cache: &mut PagedKvCache| {
        let mut batch = [SeqStep {
            tokens: toks,
            seq,
            logits: true,
        }];
        model
            .forward(&mut batch, cache, &mut scratch, pool)
            .expect("forward")
            .to_vec()
    };
    out.push(step(&tokens[..prefill], &mut seq, cache));
    for t in prefill..tokens.len() {
        out.push(step(&tokens[t..=t], &mut seq, cache));
    }
    out
}

fn max_abs_diff(a: &[f32], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (f64::from(*x) - y).abs())
        .fold(0.0, f64::max)
}

/// Logit tolerance against the f64 reference with f32 weights. The reference rounds Q, K, V
/// and P to f16 as the engine does, but a value within f32 rounding of an f16 rounding
/// boundary may round the other way there: one element off by one f16 ulp (2^-11 relative),
/// which moves logits by up to ~3e-4 here (measured maximum 2.9e-4; without such flips the
/// error is f32 rounding, ~1e-5).
const F16_FLIP_TOL: f64 = 1e-3;

/// Ensures that the f32 forward pass (prefill then decode through the paged cache) matches the
/// f64 reference for both RoPE layouts, GQA ratios 1, 2 and 4, and QKV bias.
#[test]
fn forward_matches_f64_reference() {
    let pool = ThreadPool::new(2).expect("pool");
    let cases = [
        cfg(Arch::Llama, RopeLayout::Interleaved, 4, 2, 16),
        cfg(Arch::Llama, RopeLayout::Half, 4, 4, 16),
        cfg(Arch::Qwen2, RopeLayout::Half, 4, 1, 16),
        cfg(Arch::Llama, RopeLayout::Interleaved, 2, 2, 40),
    ];
    let tokens: Vec<u32> = (0..11).map(|i| (i * 37 + 5) % 101).collect();
    let mut worst = 0.0f64;
    for (i, c) in cases.iter().enumerate() {
        let w = MemoryWeights::random(c, QType::F32, i % 2 == 0, 7 + i as u64).expect("weights");
        let model = Llama::load(&w, c, LoadSpec::full(c), &mut |_, _| {}).expect("load");
        let mut cache = cache_for(c, 4);
        let ours = run_engine(&model, &mut cache, &tokens, 6, &pool);
        let want = reference_logits(&w, c, &tokens);
        for (step, logits) in ours.iter().enumerate() {
            let pos = 5 + step;
            let err = max_abs_diff(logits, &want[pos]);
            worst = worst.max(err);
            assert!(
                err < F16_FLIP_TOL,
                "case {i} position {pos}: max |Δlogit| {err}"
            );
        }
        assert_eq!(
            cache.free_blocks(),
            64,
            "the sequence's blocks return on drop"
        );
    }
    eprintln!("max |Δlogit| against the f64 reference: {worst:.2e}");
}

/// Ensures that quantized weights track the same reference within the error their 8-bit
/// activation quantization allows (relative L2 error of the logits under 3%).
#[test]
fn quantized_forward_tracks_reference() {
    let pool = ThreadPool::new(2).expect("pool");
    let tokens: Vec<u32> = (0..9).map(|i| (i * 13 + 2) % 101).collect();
    let mut c = cfg(Arch::Llama, RopeLayout::Interleaved, 4, 2, 64);
    c.hidden = 256;
    c.intermediate = 512;
    for qtype in [
        QType::Q4_0,
        QType::Q4_1,
        QType::Q8_0,
        QType::Q4K,
        QType::Q5K,
        QType::Q6K,
        QType::F16,
    ] {
        let w = MemoryWeights::random(&c, qtype, true, 3).expect("weights");
        let model = Llama::load(&w, &c, LoadSpec::full(&c), &mut |_, _| {}).expect("load");
        let mut cache = cache_for(&c, 16);
        let ours = run_engine(&model, &mut cache, &tokens, 9, &pool);
        let want = &reference_logits(&w, &c, &tokens)[8];
        let num: f64 = ours[0]
            .iter()
            .zip(want)
            .map(|(a, b)| (f64::from(*a) - b).powi(2))
            .sum();
        let den: f64 = want.iter().map(|b| b * b).sum();
        let rel = (num / den).sqrt();
        assert!(rel < 3e-2, "{qtype:?}: relative error {rel}");
    }
}

/// Ensures that sequences batched into shared steps get bit-identical logits to each run alone.
#[test]
fn batched_steps_equal_solo_runs() {
    let pool = ThreadPool::new(2).expect("pool");
    let c = cfg(Arch::Llama, RopeLayout::Interleaved, 4, 2, 16);
    let w = MemoryWeights::random(&c, QType::Q4_1, true, 11).expect("weights");
    let model = Llama::load(&w, &c, LoadSpec::full(&c), &mut |_, _| {}).expect("load");
    let prompts: [Vec<u32>; 3] = [vec![1, 2, 3, 4, 5], vec![9], vec![40, 41, 42]];
    let decode: [u32; 4] = [7, 8, 9, 10];
    let solo: Vec<Vec<Vec<f32>>> = prompts
        .iter()
        .map(|p| {
            let mut cache = cache_for(&c, 4);
            let all: Vec<u32> = p.iter().chain(&decode).copied().collect();
            run_engine(&model, &mut cache, &all, p.len(), &pool)
        })
        .collect();
    let mut cache = cache_for(&c, 4);
    let mut seqs: Vec<_> = prompts.iter().map(|_| cache.new_seq()).collect();
    let mut scratch = StageScratch::default();
    let vocab = c.vocab_size;
    for step in 0..=decode.len() {
        let toks: Vec<Vec<u32>> = prompts
            .iter()
            .map(|p| {
                if step == 0 {
                    p.clone()
                } else {
                    vec![decode[step - 1]]
                }
            })
            .collect();
        let mut batch: Vec<SeqStep<'_>> = toks
            .iter()
            .zip(seqs.iter_mut())
            .map(|(t, seq)| SeqStep {
                tokens: t,
                seq,
                logits: true,
            })
            .collect();
        let logits = model
            .forward(&mut batch, &mut cache, &mut scratch, &pool)
            .expect("forward");
        for (i, s) in solo.iter().enumerate() {
            assert_eq!(
                &logits[i * vocab..(i + 1) * vocab],
                s[step].as_slice(),
                "seq {i} step {step}"
            );
        }
    }
}

/// Ensures that a model split into pipeline stages computes bit-identical logits to the
/// whole model.
#[test]
fn pipeline_stages_equal_whole_model() {
    let pool = ThreadPool::new(2).expect("pool");
    let c = cfg(Arch::Llama, RopeLayout::Interleaved, 4, 2, 16);
    let w = MemoryWeights::random(&c, QType::Q4_1, true, 5).expect("weights");
    let whole = Llama::load(&w, &c, LoadSpec::full(&c), &mut |_, _| {}).expect("load");
    let first = Llama::load(
        &w,
        &c,
        LoadSpec::stage(&c, 0..1, true, false),
        &mut |_, _| {},
    )
    .expect("stage 0");
    let last = Llama::load(
        &w,
        &c,
        LoadSpec::stage(&c, 1..3, false, true),
        &mut |_, _| {},
    )
    .expect("stage 1");
    assert!(
        first.weight_bytes() + last.weight_bytes() > whole.weight_bytes(),
        "the tied head is loaded twice"
    );
    let tokens: Vec<u32> = vec![3, 1, 4, 1, 5, 9, 2, 6];
    let mut cache = cache_for(&c, 4);
    let want = run_engine(&whole, &mut cache, &tokens, 5, &pool);

    let (mut c0, mut c1) = (cache_for(&c, 4), cache_for(&c, 4));
    let (mut s0, mut s1) = (c0.new_seq(), c1.new_seq());
    let (mut sc0, mut sc1) = (StageScratch::default(), StageScratch::default());
    let mut reduce = LocalReduce;
    let steps: Vec<&[u32]> = std::iter::once(&tokens[..5])
        .chain(tokens[5..].chunks(1))
        .collect();
    for (i, toks) in steps.into_iter().enumerate() {
        // Stage 0 embeds the tokens; stage 1 takes its hidden states, as a pipeline does.
        let mut ctx0 = StageCtx {
            cache: &mut c0,
            pool: &pool,
            reduce: &mut reduce,
            ring: None,
        };
        let mut b0 = [SeqStep {
            tokens: toks,
            seq: &mut s0,
            logits: false,
        }];
        let StageOutput::Hidden(x) = first
            .step(&mut b0, StageInput::Tokens, &mut ctx0, &mut sc0)
            .expect("stage 0")
        else {
            panic!("stage 0 has no head")
        };
        let mut ctx1 = StageCtx {
            cache: &mut c1,
            pool: &pool,
            reduce: &mut reduce,
            ring: None,
        };
        let mut b1 = [SeqStep {
            tokens: toks,
            seq: &mut s1,
            logits: true,
        }];
        let StageOutput::Logits(logits) = last
            .step(&mut b1, StageInput::Hidden(x), &mut ctx1, &mut sc1)
            .expect("stage 1")
        else {
            panic!("stage 1 holds the head")
        };
        assert_eq!(logits, want[i], "step {i}");
    }
}

/// Ensures that bad batches are rejected before any state changes.
#[test]
fn rejects_bad_batches_without_side_effects() {
    let pool = ThreadPool::new(1).expect("pool");
    let c = cfg(Arch::Llama, RopeLayout::Interleaved, 4, 2, 16);
    let w = MemoryWeights::random(&c, QType::F32, true, 1).expect("weights");
    let model = Llama::load(&w, &c, LoadSpec::full(&c), &mut |_, _| {}).expect("load");
    let mut cache = cache_for(&c, 4);
    let mut seq = cache.new_seq();
    let mut scratch = StageScratch::default();
    for (tokens, field) in [
        (vec![], "tokens"),
        (vec![5, 101], "tokens"),
        (vec![1; 129], "tokens"),
    ] {
        let mut batch = [SeqStep {
            tokens: &tokens,
            seq: &mut seq,
            logits: true,
        }];
        let err = model
            .forward(&mut batch, &mut cache, &mut scratch, &pool)
            .expect_err("must fail");
        assert!(err.to_string().contains(field), "{err}");
    }
    assert_eq!(seq.len(), 0);
    assert_eq!(cache.free_blocks(), 64);
}
