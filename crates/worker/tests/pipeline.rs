//! Three in-process workers holding uneven layer ranges of the real SmolLM2 model, driven
//! over stage 0's Pipeline stream exactly as a coordinator drives them, against the
//! single-process engine.

mod support;

use std::ops::ControlFlow;
use std::path::Path;
use std::time::{Duration, Instant};

use support::{BLOCK_SIZE, Cluster, ENGINE_THREADS, KV_TOKENS, model};
use tessera_hub::ModelLocation;
use tessera_model::engine::{Engine, EngineOptions, GenerateRequest, Prompt};
use tessera_proto::cluster::v1 as pb;
use tessera_testkit::{CHUNK, PROMPTS, drive, seq_start, seqs_for, to_sampled};
use tessera_text::sampling::{SampledToken, SamplingParams, StopConditions};
use tonic::Code;

/// The engine's prompt ids and answer for each (prompt, sampling, max tokens).
fn reference(
    model: &Path,
    cases: &[(String, SamplingParams, u32)],
) -> Vec<(Vec<u32>, Vec<SampledToken>)> {
    reference_chunked(model, cases, EngineOptions::default().prefill_chunk)
}

/// [`reference`] with the engine prefilling `prefill_chunk` tokens per step.
fn reference_chunked(
    model: &Path,
    cases: &[(String, SamplingParams, u32)],
    prefill_chunk: usize,
) -> Vec<(Vec<u32>, Vec<SampledToken>)> {
    let opts = EngineOptions {
        threads: ENGINE_THREADS as usize,
        kv_tokens: Some(KV_TOKENS as usize),
        prefill_chunk,
        ..EngineOptions::default()
    };
    let mut engine = Engine::load(
        &ModelLocation::Gguf(model.to_path_buf()),
        opts,
        &mut |_, _| {},
    )
    .expect("engine");
    cases
        .iter()
        .map(|(text, sampling, max)| {
            let req = GenerateRequest {
                prompt: Prompt::Text(text.clone()),
                sampling: sampling.clone(),
                stop: StopConditions {
                    max_tokens: *max,
                    stop: Vec::new(),
                    stop_token_ids: Vec::new(),
                    ignore_eos: true,
                },
            };
            let valid = engine.validate(&req).expect("valid");
            let out = engine
                .generate(&valid, &mut |_| ControlFlow::Continue(()))
                .expect("generate");
            (valid.prompt_ids, out.tokens)
        })
        .collect()
}

fn greedy() -> SamplingParams {
    SamplingParams {
        logprobs: true,
        top_logprobs: 3,
        seed: Some(0),
        ..SamplingParams::greedy()
    }
}

fn prompts() -> Vec<String> {
    let mut p: Vec<String> = PROMPTS.iter().map(|s| (*s).to_owned()).collect();
    // Longer than one prefill chunk, so chunked prefill crosses the pipeline too.
    p.push("The quick brown fox jumps over the lazy dog. ".repeat(60));
    p
}

/// Ensures that greedy token ids, logprobs and top logprobs from a 3-stage pipeline with
/// uneven layer ranges are bit-identical to the single-process engine, one sequence at a
/// time (including a prompt prefilled in two chunks), and that releasing each sequence
/// in-band frees it on every stage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greedy_pipeline_equals_engine() {
    let Some(model) = model() else { return };
    let texts = prompts();
    let cases: Vec<_> = texts.iter().map(|t| (t.clone(), greedy(), 16)).collect();
    let refs = reference(&model, &cases);
    assert!(refs[4].0.len() > CHUNK, "the long prompt spans two chunks");
    let cluster = Cluster::start(model).await;
    let total: Vec<u64> = cluster
        .wait_live(0)
        .await
        .iter()
        .map(|s| s.total_kv_blocks)
        .collect();
    let mut d = cluster.open(0, 1).await;
    for (i, r) in refs.iter().enumerate() {
        let mut seqs = seqs_for(std::slice::from_ref(r), &[greedy()], &[0]);
        seqs[0].id = i as u64;
        drive(&mut d, &mut seqs).await;
        assert_eq!(
            seqs[0].out, r.1,
            "prompt {i}: pipeline differs from the engine"
        );
        assert!(
            r.1.iter()
                .all(|t| t.logprob.is_some() && t.top_logprobs.len() == 3)
        );
        // The release rode the last step: every stage is back to an empty cache.
        for (w, s) in cluster.workers.iter().zip(&total) {
            let st = w.shard().status();
            assert_eq!(
                (st.live_sequences, st.free_kv_blocks),
                (0, *s),
                "prompt {i}: {st:?}"
            );
        }
    }
}

/// Ensures that a prompt prefilled in one step whose hidden states exceed a pipeline
/// message's part (about 2,000 tokens × 576 values × 4 bytes: 4.6 MB, two parts of 4 MiB)
/// crosses every stage and gives the engine's greedy tokens and log-probabilities bit for
/// bit when the engine prefills it in one step too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_steps_cross_the_stages_in_parts() {
    let Some(model) = model() else { return };
    let text = "The quick brown fox jumps over the lazy dog. ".repeat(200);
    let refs = reference_chunked(&model, &[(text, greedy(), 4)], KV_TOKENS as usize);
    let n = refs[0].0.len();
    assert!(
        n * 576 * 4 > 4 << 20 && n < KV_TOKENS as usize,
        "{n} tokens"
    );
    let cluster = Cluster::start(model).await;
    let mut d = cluster.open(0, 1).await;
    let mut seqs = seqs_for(&refs, &[greedy()], &[0]);
    seqs[0].chunk = n;
    drive(&mut d, &mut seqs).await;
    assert_eq!(
        seqs[0].out, refs[0].1,
        "the pipeline differs from the engine"
    );
}

/// Ensures that four sequences with seeded random sampling and penalties, joining the batch
/// at different steps (so prefill chunks and decode tokens share steps), each produce exactly
/// their solo engine output; and that an in-band release frees the sequence on every stage
/// while the others keep running, and closing the stream frees the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_sequences_equal_their_solo_runs() {
    let Some(model) = model() else { return };
    let texts = prompts();
    let sampling: Vec<SamplingParams> = (0..4)
        .map(|i| SamplingParams {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            repetition_penalty: 1.1,
            presence_penalty: 0.2,
            seed: Some(1234 + i),
            logprobs: true,
            ..SamplingParams::default()
        })
        .collect();
    let idx = [0usize, 4, 2, 3];
    let cases: Vec<_> = idx
        .iter()
        .zip(&sampling)
        .map(|(&i, s)| (texts[i].clone(), s.clone(), 12 + 2 * i as u32))
        .collect();
    let refs = reference(&model, &cases);
    let cluster = Cluster::start(model).await;
    let total = cluster.wait_live(0).await[1].total_kv_blocks;
    let mut d = cluster.open(0, 1).await;
    let mut seqs = seqs_for(&refs, &sampling, &[0, 1, 1, 5]);
    drive(&mut d, &mut seqs).await;
    for (s, r) in seqs.iter().zip(&refs) {
        assert_eq!(s.out, r.1, "seq {} differs from its solo run", s.id);
    }
    let st = cluster.wait_live(0).await;
    assert!(st.iter().all(|s| s.live_sequences == 0), "{st:?}");

    // Two live sequences; release one in-band while the other decodes.
    let mut seqs = seqs_for(&refs[..2], &sampling[..2], &[0, 0]);
    for s in &mut seqs {
        s.want = usize::MAX;
    }
    for step in 0..3 {
        let batch: Vec<_> = seqs.iter_mut().filter_map(|s| s.next(step)).collect();
        let r = d.step(batch, Vec::new()).await.expect("step");
        for t in &r.tokens {
            let s = seqs.iter_mut().find(|s| s.id == t.seq_id).expect("seq");
            s.out.push(to_sampled(t));
        }
    }
    let both: Vec<_> = cluster.workers.iter().map(|w| w.shard().status()).collect();
    assert!(both.iter().all(|s| s.live_sequences == 2), "{both:?}");
    let batch = seqs[1].next(3).into_iter().collect();
    d.step(batch, vec![seqs[0].id]).await.expect("release step");
    let blocks_of = |tokens: usize| (tokens as u64).div_ceil(u64::from(BLOCK_SIZE));
    let still = seqs[1].prompt.len() + seqs[1].out.len();
    for w in &cluster.workers {
        let s = w.shard().status();
        assert_eq!(s.live_sequences, 1, "{s:?}");
        assert_eq!(s.free_kv_blocks, total - blocks_of(still), "{s:?}");
    }
    drop(d);
    let st = cluster.wait_live(0).await;
    assert!(
        st.iter()
            .all(|s| s.live_sequences == 0 && s.free_kv_blocks == s.total_kv_blocks),
        "{st:?}"
    );
}

/// Ensures that a sequence replayed the way the coordinator migrates one — its prompt in the
/// engine's chunk, then the first `k` tokens it generated one per step, its start naming those
/// tokens — continues with exactly the engine's remaining tokens and logprobs, for seeded
/// random sampling with penalties (the sampler's generator and penalty counts resume where
/// they were), at several cuts, whatever the prompt's chunks (a multi-row chunk's rows sum
/// alike); and that generated tokens replayed several per step do not (attention sums a
/// multi-row chunk in another order than decode), which is why the coordinator replays them
/// one per step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_sequences_continue_exactly() {
    let Some(model) = model() else { return };
    let texts = prompts();
    let sampling: Vec<SamplingParams> = (0..2)
        .map(|i| SamplingParams {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            repetition_penalty: 1.1,
            frequency_penalty: 0.3,
            seed: Some(77 + i),
            logprobs: true,
            top_logprobs: 2,
            ..SamplingParams::default()
        })
        .collect();
    let cases: Vec<_> = [1usize, 3]
        .iter()
        .zip(&sampling)
        .map(|(&i, s)| (texts[i].clone(), s.clone(), 16))
        .collect();
    let refs = reference(&model, &cases);
    let cluster = Cluster::start(model).await;
    let mut d = cluster.open(0, 1).await;
    let mut id = 500;
    for (r, s) in refs.iter().zip(&sampling) {
        for (k, chunk) in [(1, CHUNK), (3, 3), (8, CHUNK), (15, 2)] {
            id += 1;
            let mut seq = tessera_testkit::Seq::resumed(id, r, s, k);
            seq.chunk = chunk;
            drive(&mut d, std::slice::from_mut(&mut seq)).await;
            assert_eq!(
                seq.out,
                r.1[k..],
                "resumed after {k} tokens (prompt chunks of {chunk})"
            );
        }
    }
    let mut differs = false;
    for (r, s) in refs.iter().zip(&sampling) {
        id += 1;
        let mut seq = tessera_testkit::Seq::resumed(id, r, s, 8);
        seq.generated_chunk = 8;
        drive(&mut d, std::slice::from_mut(&mut seq)).await;
        differs |= seq.out != r.1[8..];
    }
    assert!(
        differs,
        "generated tokens replayed in one chunk came out bit for bit"
    );
}

/// Ensures that shutting down the last stage mid-stream ends stage 0's stream with
/// UNAVAILABLE within 2 s without the caller sending anything, and that a new stream then
/// fails fast with UNAVAILABLE too (the next stage's next stage is gone), never hanging.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_last_stage_ends_the_stream_unavailable() {
    let Some(model) = model() else { return };
    let texts = prompts();
    let cluster = Cluster::start(model.clone()).await;
    let ids = reference(&model, &[(texts[0].clone(), greedy(), 1)])
        .remove(0)
        .0;
    let mut d = cluster.open(0, 1).await;
    let mut seqs = seqs_for(&[(ids, Vec::new())], &[greedy()], &[0]);
    seqs[0].want = usize::MAX;
    for step in 0..4 {
        let batch = seqs[0].next(step).into_iter().collect();
        let r = d.step(batch, Vec::new()).await.expect("step");
        seqs[0].out.push(to_sampled(&r.tokens[0]));
    }
    let Cluster { mut workers, .. } = cluster;
    let last = workers.pop().expect("three workers");
    let t0 = Instant::now();
    let stopping = tokio::spawn(last.shutdown());
    let got = tokio::time::timeout(Duration::from_secs(2), d.rx.message())
        .await
        .expect("stage 0's stream must end within 2 s");
    let err = got.expect_err("the stream ends with a status");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    eprintln!("stream ended after {:?}: {}", t0.elapsed(), err.message());
    tokio::time::timeout(Duration::from_secs(10), stopping)
        .await
        .expect("shutdown in time")
        .expect("join")
        .expect("clean shutdown");

    let cluster = Cluster { workers, model };
    let mut d = cluster.open(0, 1).await;
    let t0 = Instant::now();
    let batch = seqs_for(&[(vec![1, 2, 3], Vec::new())], &[greedy()], &[0])[0]
        .next(0)
        .into_iter()
        .collect();
    let err = tokio::time::timeout(Duration::from_secs(2), d.step(batch, Vec::new()))
        .await
        .expect("answered within 2 s")
        .expect_err("no last stage");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    eprintln!(
        "new stream failed after {:?}: {}",
        t0.elapsed(),
        err.message()
    );
    for w in cluster.workers {
        w.shutdown().await.expect("shutdown");
    }
}

/// Ensures that bad steps and bad loads are rejected with INVALID_ARGUMENT (or
/// FAILED_PRECONDITION / NOT_FOUND / INTERNAL for a cached block the stage lacks, where the
/// contract says so) naming the field, and that the workers keep serving correct answers
/// afterwards, including after a reload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_rejected_and_workers_keep_serving() {
    let Some(model) = model() else { return };
    let texts = prompts();
    let refs = reference(&model, &[(texts[0].clone(), greedy(), 6)]);
    let cluster = Cluster::start(model).await;
    let ok_start = |id| pb::SeqStep {
        seq_id: id,
        tokens: refs[0].0.clone(),
        sample: true,
        start: Some(seq_start(&refs[0].0, &greedy())),
    };
    let mut bad_top_p = ok_start(1);
    if let Some(s) = bad_top_p.start.as_mut().and_then(|s| s.sampling.as_mut()) {
        s.top_p = Some(1.5);
    }
    let mut bad_token = ok_start(1);
    bad_token.tokens.push(1_000_000);
    let mut empty = ok_start(1);
    empty.tokens.clear();
    let unknown = pb::SeqStep {
        seq_id: 77,
        tokens: vec![1],
        sample: true,
        start: None,
    };
    let cases: Vec<(Vec<pb::SeqStep>, &str)> = vec![
        (vec![unknown], "seqs[0].seq_id"),
        (vec![bad_top_p], "seqs[0].start.sampling.top_p"),
        (vec![ok_start(3), bad_token], "seqs[1].tokens"),
        (vec![empty], "seqs[0].tokens"),
        (vec![ok_start(4), ok_start(4)], "seqs[1].seq_id"),
    ];
    for (seqs, field) in cases {
        let mut d = cluster.open(0, 1).await;
        let err = d.step(seqs, Vec::new()).await.expect_err("bad step");
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(err.message().starts_with(field), "{field}: {err:?}");
    }
    // Hidden states of the wrong size into stage 1.
    let mut d = cluster.open(1, 1).await;
    let err = d
        .step_raw(pb::StepRequest {
            plan_epoch: 1,
            step_id: 1,
            seqs: vec![ok_start(5)],
            hidden: vec![0; 12],
            release: Vec::new(),
            trace_context: Default::default(),
            prefix_ops: Vec::new(),
            hidden_parts: 0,
        })
        .await
        .expect_err("short hidden");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().starts_with("hidden"), "{err:?}");
    // A step for another epoch.
    let mut d = cluster.open(0, 9).await;
    let err = d
        .step(vec![ok_start(6)], Vec::new())
        .await
        .expect_err("epoch");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    // Cached blocks: a count that is not whole blocks is invalid; a block this stage's prefix
    // store does not hold means it no longer mirrors the coordinator's index, which fails
    // the step as INTERNAL rather than computing without that K/V.
    let cached = |id, tokens: u32, blocks: Vec<u64>| {
        let mut s = ok_start(id);
        if let Some(st) = s.start.as_mut() {
            st.cached_tokens = tokens;
            st.cached_blocks = blocks;
        }
        s
    };
    let mut d = cluster.open(0, 1).await;
    let err = d
        .step(vec![cached(10, 15, vec![42])], Vec::new())
        .await
        .expect_err("15 tokens are not one block");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().starts_with("seqs[0].start.cached_tokens"),
        "{err:?}"
    );
    let mut d = cluster.open(0, 1).await;
    let err = d
        .step(vec![cached(11, BLOCK_SIZE, vec![42])], Vec::new())
        .await
        .expect_err("block 42 is not cached");
    assert_eq!(err.code(), Code::Internal, "{err:?}");
    assert!(
        err.message().contains("prefix cache out of sync"),
        "{err:?}"
    );
    // Bad loads: a layer past the model, an unknown model.
    let mut c = cluster.client(2).await;
    let mut req = cluster.load_request(2, 5);
    if let Some(s) = req.shard.as_mut() {
        s.layer_end = 31;
    }
    let err = c.load_shard(req).await.expect_err("bad shard");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().starts_with("shard.layer_end"), "{err:?}");
    let mut req = cluster.load_request(2, 5);
    req.model = "no-such-model".into();
    let err = c.load_shard(req).await.expect_err("unknown model");
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    // Reload epoch 2 everywhere: old streams are refused, new ones answer correctly.
    let mut old = cluster.open(0, 1).await;
    cluster.load(2).await;
    let err = old
        .step(vec![ok_start(8)], Vec::new())
        .await
        .expect_err("old epoch");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let mut d = cluster.open(0, 2).await;
    let mut seqs = seqs_for(&refs, &[greedy()], &[0]);
    drive(&mut d, &mut seqs).await;
    assert_eq!(seqs[0].out, refs[0].1);
    // Out-of-band Release is accepted (the sequence is gone already).
    c.release(pb::ReleaseRequest { seq_ids: vec![100] })
        .await
        .expect("release");
}
