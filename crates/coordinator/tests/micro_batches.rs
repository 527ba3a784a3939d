//! Overlapped pipeline stages: in one process, a coordinator and two real workers (two
//! pipeline stages) serving the real SmolLM2 model, with the running requests split into
//! micro-batches whose steps are in flight at once (the default: as many as stages), against
//! the same cluster with one step in flight (`max_inflight_steps = 1`) and against the
//! single-process engine. Then a stage dies with steps in flight.

use std::ops::ControlFlow;
use std::path::Path;
use std::time::{Duration, Instant};

mod common;
mod two_stages;

use common::WAIT;
use tessera_coordinator::CoordinatorConfig;
use tessera_hub::ModelLocation;
use tessera_model::engine::{Engine, EngineOptions, GenerateRequest, Prompt};
use tessera_proto::v1 as pb;
use tessera_testkit::{PROMPTS, collect_finished, greedy_with_logprobs};
use tessera_text::sampling::{SamplingParams, StopConditions};
use tessera_worker::RunningWorker;
use two_stages::{TwoStages, idle, settle};

const KV_TOKENS: u32 = 1024;
/// Concurrent greedy streams.
const STREAMS: usize = 8;
const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long the workers get to free what the last requests held.
const SETTLE: Duration = Duration::from_secs(10);

/// Stream `i`'s prompt and length: the four prompts twice, at different lengths, so the
/// micro-batches change as requests finish.
fn case(i: usize) -> (&'static str, u32) {
    (PROMPTS[i % PROMPTS.len()], 12 + 3 * i as u32)
}

/// Token ids and logprobs of a greedy run.
type Tokens = Vec<(u32, Option<f32>)>;

/// The engine's answer to every case, with the workers' one compute thread (flash-decoding
/// splits keys by thread count: equal threads give equal bits).
fn reference(model: &Path) -> Vec<Tokens> {
    let mut engine = Engine::load(
        &ModelLocation::Gguf(model.to_path_buf()),
        EngineOptions {
            threads: 1,
            kv_tokens: Some(KV_TOKENS as usize),
            ..EngineOptions::default()
        },
        &mut |_, _| {},
    )
    .expect("engine");
    (0..STREAMS)
        .map(|i| {
            let (prompt, max_tokens) = case(i);
            let req = GenerateRequest {
                prompt: Prompt::Text(prompt.into()),
                sampling: SamplingParams {
                    logprobs: true,
                    ..SamplingParams::greedy()
                },
                stop: StopConditions {
                    max_tokens,
                    stop: Vec::new(),
                    stop_token_ids: Vec::new(),
                    ignore_eos: false,
                },
            };
            let valid = engine.validate(&req).expect("valid");
            let out = engine
                .generate(&valid, &mut |_| ControlFlow::Continue(()))
                .expect("generate");
            out.tokens.iter().map(|t| (t.id, t.logprob)).collect()
        })
        .collect()
}

/// A two-stage cluster with `max_inflight_steps` (0: the default, one per stage).
async fn start(model: &Path, max_inflight_steps: u32) -> TwoStages {
    two_stages::start(CoordinatorConfig {
        model: model.display().to_string(),
        heartbeat_interval: Duration::from_millis(200),
        heartbeat_timeout: HEARTBEAT_TIMEOUT,
        kv_tokens: KV_TOKENS,
        ready_wait: WAIT,
        max_inflight_steps,
        ..CoordinatorConfig::default()
    })
    .await
}

/// Runs the [`STREAMS`] cases at once; their tokens.
async fn run_all(c: &TwoStages) -> Vec<Tokens> {
    let tasks: Vec<_> = (0..STREAMS)
        .map(|i| {
            let mut client = c.client.clone();
            let (prompt, max_tokens) = case(i);
            tokio::spawn(async move {
                let req = greedy_with_logprobs(prompt, max_tokens, 0);
                collect_finished(&mut client, req, Some(WAIT)).await
            })
        })
        .collect();
    let mut out = Vec::new();
    for (i, t) in tasks.into_iter().enumerate() {
        let got = t
            .await
            .expect("task")
            .unwrap_or_else(|s| panic!("{i}: {s:?}"));
        out.push(got.tokens.iter().map(|t| (t.id, t.logprob)).collect());
    }
    out
}

/// Steps with tokens each worker has computed so far (its `tessera_worker_steps_total`).
fn steps(workers: &[RunningWorker]) -> Vec<u64> {
    workers
        .iter()
        .map(|w| {
            let text = w.shard().metrics_text();
            text.lines()
                .find_map(|l| l.strip_prefix("tessera_worker_steps_total "))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or_else(|| panic!("no step count in {text}"))
        })
        .collect()
}

/// Ensures that with two stages and 8 concurrent greedy streams, micro-batched steps in
/// flight at once give token ids and logprobs identical to one step in flight and to the
/// single-process engine, in about twice the steps (the micro-batches), and that afterwards
/// every worker holds no sequence and no KV but cached prefix blocks.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn micro_batches_equal_one_step_in_flight_and_the_engine() {
    let Some(model) = tessera_testkit::smollm2_gguf() else {
        return;
    };
    let want = reference(&model);
    let mut figures = Vec::new();
    for inflight in [1, 0] {
        let c = start(&model, inflight).await;
        let before = steps(&c.workers);
        let t = Instant::now();
        let got = run_all(&c).await;
        let elapsed = t.elapsed();
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g, w, "stream {i} with max_inflight_steps {inflight}");
        }
        let after = steps(&c.workers);
        settle(&c.workers, SETTLE).await;
        // Both stages compute every step.
        assert_eq!(after[0] - before[0], after[1] - before[1]);
        figures.push((after[0] - before[0], elapsed));
        c.coord.stop(c.workers).await;
    }
    eprintln!("steps and time, one in flight then two: {figures:?}");
    let (serial, overlapped) = (figures[0].0, figures[1].0);
    assert!(
        overlapped * 2 >= serial * 3,
        "two micro-batches take more steps: {serial} vs {overlapped}"
    );
}

/// Ensures that when a stage dies with micro-batches in flight, every running request is
/// migrated to the plan on the surviving worker and finishes with no error and exactly the
/// tokens and logprobs of a fault-free run, and that the survivor then holds no sequence.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stage_dying_migrates_every_micro_batch() {
    let Some(model) = tessera_testkit::smollm2_gguf() else {
        return;
    };
    let TwoStages {
        coord,
        mut workers,
        client,
    } = start(&model, 0).await;
    let (first_tokens, firsts) = tokio::sync::mpsc::unbounded_channel::<()>();
    let tasks: Vec<_> = (0..STREAMS)
        .map(|i| {
            let mut c = client.clone();
            let first = first_tokens.clone();
            tokio::spawn(async move {
                // Long enough to be running when the stage dies, short enough that all 8 fit
                // the KV cache at once (7 blocks each).
                let mut req = greedy_with_logprobs(PROMPTS[i % PROMPTS.len()], 80, 0);
                if let Some(stop) = req.stop.as_mut() {
                    stop.ignore_eos = true;
                }
                let mut stream = c.generate(req).await.expect("generate").into_inner();
                let mut tokens = Vec::new();
                loop {
                    let ev = tokio::time::timeout(WAIT, stream.message()).await;
                    match ev.expect("an event in time") {
                        Ok(Some(pb::GenerateEvent {
                            event: Some(pb::generate_event::Event::Token(t)),
                        })) => {
                            tokens.push((t.id, t.logprob));
                            if tokens.len() == 1 {
                                let _ = first.send(());
                            }
                        }
                        Ok(Some(pb::GenerateEvent {
                            event: Some(pb::generate_event::Event::Finished(_)),
                        })) => return Ok(tokens),
                        Ok(_) => return Err(format!("ended unfinished after {}", tokens.len())),
                        Err(s) => return Err(format!("{s:?} after {} tokens", tokens.len())),
                    }
                }
            })
        })
        .collect();
    drop(first_tokens);
    // Every stream is decoding (its micro-batch cycling) before the stage goes.
    let mut firsts = firsts;
    for _ in 0..STREAMS {
        tokio::time::timeout(WAIT, firsts.recv())
            .await
            .expect("first tokens in time");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let victim = workers.pop().expect("two workers");
    let killed = Instant::now();
    victim.shutdown().await.expect("shutdown");
    let mut faulted = Vec::new();
    for (i, t) in tasks.into_iter().enumerate() {
        let tokens = t
            .await
            .expect("task")
            .unwrap_or_else(|e| panic!("stream {i} failed across the loss: {e}"));
        faulted.push(tokens);
    }
    eprintln!(
        "every stream finished {:?} after the loss",
        killed.elapsed()
    );
    for (i, tokens) in faulted.iter().enumerate() {
        let mut c = client.clone();
        let mut req = greedy_with_logprobs(PROMPTS[i % PROMPTS.len()], 80, 0);
        if let Some(stop) = req.stop.as_mut() {
            stop.ignore_eos = true;
        }
        let free = collect_finished(&mut c, req, Some(WAIT))
            .await
            .expect("fault-free run");
        let free: Tokens = free.tokens.iter().map(|t| (t.id, t.logprob)).collect();
        assert_eq!(tokens, &free, "stream {i} changed across the loss");
    }
    // Every request has finished: the survivor holds no sequence.
    let deadline = Instant::now() + SETTLE;
    while !idle(&workers[0].shard().status()) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let s = workers[0].shard().status();
    assert!(idle(&s), "{s:?}");
    coord.stop(workers).await;
}
