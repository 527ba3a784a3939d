//! End to end in one process: a coordinator and three real workers (their `start`) serving
//! the real SmolLM2 model over gRPC on loopback, against the single-process engine.

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::time::{Duration, Instant};

mod common;

use common::{Coordinator, WAIT, wait_ready};
use tessera_coordinator::CoordinatorConfig;
use tessera_coordinator::footprint::ModelFootprint;
use tessera_format::open_weights;
use tessera_hub::ModelLocation;
use tessera_model::engine::{Engine, EngineOptions, GenerateRequest, Prompt};
use tessera_proto::v1 as pb;
use tessera_proto::v1::inference_client::InferenceClient;
use tessera_testkit::{PROMPTS, collect_finished, greedy_with_logprobs};
use tessera_text::sampling::{FinishReason, SamplingParams, StopConditions};
use tonic::transport::Channel;

const THREADS: u32 = 2;
const KV_TOKENS: u32 = 1024;
const MAX_TOKENS: u32 = 16;
const HEARTBEAT: Duration = Duration::from_millis(200);
const HEARTBEAT_TIMEOUT: Duration = Duration::from_millis(1000);

/// What one generate stream produced.
#[derive(Debug, PartialEq)]
struct Output {
    ids: Vec<u32>,
    logprobs: Vec<Option<f32>>,
    text: String,
    finish: Option<FinishReason>,
}

fn reference(engine: &mut Engine, prompt: &str) -> Output {
    let req = GenerateRequest {
        prompt: Prompt::Text(prompt.into()),
        sampling: SamplingParams {
            logprobs: true,
            ..SamplingParams::greedy()
        },
        stop: StopConditions {
            max_tokens: MAX_TOKENS,
            stop: vec![],
            stop_token_ids: vec![],
            ignore_eos: false,
        },
    };
    let valid = engine.validate(&req).expect("valid");
    let out = engine
        .generate(&valid, &mut |_| ControlFlow::Continue(()))
        .expect("generate");
    Output {
        ids: out.tokens.iter().map(|t| t.id).collect(),
        logprobs: out.tokens.iter().map(|t| t.logprob).collect(),
        text: out.text,
        finish: out.finish_reason,
    }
}

/// A greedy request for [`MAX_TOKENS`] with logprobs.
fn request(prompt: &str) -> pb::GenerateRequest {
    greedy_with_logprobs(prompt, MAX_TOKENS, 0)
}

/// Runs one generate request to its end, each event within [`WAIT`]; the error status if it
/// failed.
async fn generate(
    client: &mut InferenceClient<Channel>,
    prompt: &str,
) -> Result<Output, tonic::Status> {
    let got = collect_finished(client, request(prompt), Some(WAIT)).await?;
    let f = got.finished;
    let usage = f.usage.expect("usage");
    assert_eq!(usage.completion_tokens as usize, got.tokens.len());
    assert!(usage.time_to_first_token_ms > 0.0);
    let mut text: String = got.tokens.iter().map(|t| t.text.as_str()).collect();
    text.push_str(&f.text);
    Ok(Output {
        ids: got.tokens.iter().map(|t| t.id).collect(),
        logprobs: got.tokens.iter().map(|t| t.logprob).collect(),
        text,
        finish: match f.reason() {
            pb::FinishReason::Stop => Some(FinishReason::Stop),
            pb::FinishReason::Length => Some(FinishReason::Length),
            pb::FinishReason::Unspecified => None,
        },
    })
}

/// Ensures that a coordinator with three uneven workers streams greedy outputs and logprobs
/// identical to the engine, alone and 8 at once, and that losing a worker mid-generation
/// costs the stream nothing: it is migrated to the survivors and finishes with exactly the
/// tokens and logprobs of a fault-free run, and the survivors serve the same outputs.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_equals_engine_and_survives_a_lost_worker() {
    let Some(path) = tessera_testkit::smollm2_gguf() else {
        return;
    };
    let location = ModelLocation::Gguf(path.clone());
    let (store, cfg) = open_weights(&location).expect("weights");
    let fp = ModelFootprint::from_store(store.as_ref(), &cfg).expect("footprint");
    drop(store);
    let kv_layer = fp.kv_bytes_per_token_layer * u64::from(KV_TOKENS);
    // The small worker fits the embedding and 6 layers (or more layers elsewhere); the others
    // have no limit.
    let small = fp.embed_bytes + 6 * (fp.layer_bytes[0] + kv_layer) + kv_layer / 2;

    let mut engine = Engine::load(
        &location,
        EngineOptions {
            threads: THREADS as usize,
            kv_tokens: Some(KV_TOKENS as usize),
            ..EngineOptions::default()
        },
        &mut |_, _| {},
    )
    .expect("engine");
    let want: Vec<Output> = PROMPTS.iter().map(|p| reference(&mut engine, p)).collect();
    drop(engine);

    let coord = Coordinator::start(CoordinatorConfig {
        model: PathBuf::from(&path).display().to_string(),
        heartbeat_interval: HEARTBEAT,
        heartbeat_timeout: HEARTBEAT_TIMEOUT,
        min_workers: 3,
        kv_tokens: KV_TOKENS,
        ready_wait: WAIT,
        ..CoordinatorConfig::default()
    })
    .await;
    let mut workers = vec![
        coord.start_worker(small, THREADS, "small").await,
        coord.start_worker(0, THREADS, "b").await,
        coord.start_worker(0, THREADS, "c").await,
    ];
    let mut client = coord.client().await;
    let s = wait_ready(&mut client, 3).await;
    let mut ranges: Vec<_> = s
        .workers
        .iter()
        .filter_map(|w| w.shard.map(|sh| (sh.stage, sh.layer_start, sh.layer_end)))
        .collect();
    ranges.sort();
    eprintln!("plan: {ranges:?}");
    let capped = s
        .workers
        .iter()
        .find(|w| w.capacity.as_ref().is_some_and(|c| c.memory_bytes == small))
        .and_then(|w| w.shard)
        .expect("the small worker has a shard");
    let (a, b) = (capped.layer_start as usize, capped.layer_end as usize);
    let needs = fp.layer_bytes[a..b].iter().sum::<u64>()
        + kv_layer * (b - a) as u64
        + if capped.embed { fp.embed_bytes } else { 0 }
        + if capped.head { fp.head_bytes } else { 0 };
    assert!(
        needs <= small,
        "memory caps the small worker: {ranges:?} {capped:?}"
    );
    // Where it registered first it is stage 0 and the embedding leaves room for 6 layers; in
    // another stage it may hold more, and only the memory bound above applies.
    if capped.embed {
        assert!(
            b - a <= 7,
            "the small worker holds fewer layers: {ranges:?}"
        );
    }

    for (p, w) in PROMPTS.iter().zip(&want) {
        let got = generate(&mut client, p).await.expect("generate");
        assert_eq!(&got, w, "prompt {p:?}");
    }

    // 8 at once, batched into shared steps.
    let t = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..8 {
        let mut c = client.clone();
        tasks.push(tokio::spawn(async move {
            generate(&mut c, PROMPTS[i % PROMPTS.len()]).await
        }));
    }
    for (i, task) in tasks.into_iter().enumerate() {
        let got = task.await.expect("task").expect("generate");
        assert_eq!(got, want[i % PROMPTS.len()], "concurrent request {i}");
    }
    eprintln!(
        "8 concurrent requests of {MAX_TOKENS} tokens: {:?}",
        t.elapsed()
    );

    // Lose the middle worker while a long request runs.
    let long_request = || {
        let mut req = request(PROMPTS[3]);
        req.stop = Some(pb::StopConditions {
            max_tokens: Some(120),
            ignore_eos: true,
            ..Default::default()
        });
        req
    };
    let mut c = client.clone();
    let long = tokio::spawn(async move {
        let mut stream = c
            .generate(long_request())
            .await
            .expect("generate")
            .into_inner();
        let mut tokens = Vec::new();
        loop {
            match tokio::time::timeout(WAIT, stream.message())
                .await
                .expect("in time")
            {
                Ok(Some(pb::GenerateEvent {
                    event: Some(pb::generate_event::Event::Token(t)),
                })) => tokens.push((t.id, t.logprob)),
                Ok(Some(pb::GenerateEvent {
                    event: Some(pb::generate_event::Event::Finished(_)),
                })) => return (tokens, None, Instant::now()),
                Ok(_) => {
                    return (
                        tokens,
                        Some(tonic::Status::internal("unfinished")),
                        Instant::now(),
                    );
                }
                Err(s) => return (tokens, Some(s), Instant::now()),
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let victim = workers.remove(1);
    let killed = Instant::now();
    victim.shutdown().await.expect("shutdown");
    let (tokens, err, ended) = long.await.expect("task");
    assert!(err.is_none(), "the stream failed across the loss: {err:?}");
    eprintln!(
        "lost worker: the stream finished {:?} after it",
        ended.duration_since(killed)
    );
    let free = collect_finished(&mut client, long_request(), Some(WAIT))
        .await
        .expect("fault-free run");
    let free: Vec<_> = free.tokens.iter().map(|t| (t.id, t.logprob)).collect();
    assert_eq!(tokens, free, "the stream changed across the loss");

    let s = wait_ready(&mut client, 2).await;
    assert_eq!(s.workers.len(), 2);
    let got = generate(&mut client, PROMPTS[0])
        .await
        .expect("generate after the loss");
    assert_eq!(got, want[0]);

    coord.stop(workers).await;
}

/// Forwards every connection to `listen` (a free loopback address) to `target`, from now on:
/// how the test makes a worker's advertised address reachable after the fact.
async fn forward(listen: &str, target: String) -> tokio::task::JoinHandle<()> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .expect("bind the advertised address");
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            let target = target.clone();
            tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    })
}

/// Ensures that a worker that registers but that the coordinator cannot reach (its advertised
/// address answers nothing: a partition one way, a wrong or stale address) is held back, not
/// dropped and re-planned at every heartbeat: it stays registered under the same id, the
/// serving plan keeps its epoch and serves, and once the address answers the worker is
/// planned in.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_the_leader_cannot_reach_is_held_back_until_it_can() {
    let Some(path) = tessera_testkit::smollm2_gguf() else {
        return;
    };
    let coord = Coordinator::start(CoordinatorConfig {
        model: PathBuf::from(&path).display().to_string(),
        heartbeat_interval: HEARTBEAT,
        heartbeat_timeout: HEARTBEAT_TIMEOUT,
        kv_tokens: KV_TOKENS,
        ready_wait: WAIT,
        ..CoordinatorConfig::default()
    })
    .await;
    let first = coord.start_worker(0, THREADS, "first").await;
    let mut client = coord.client().await;
    let before = wait_ready(&mut client, 1).await;
    let want = generate(&mut client, PROMPTS[0])
        .await
        .expect("one worker serves");

    // The second worker listens on one address and advertises another, where nothing answers.
    let (listen, advertised) = (tessera_testkit::free_addr(), tessera_testkit::free_addr());
    let second = coord
        .start_worker_at(&listen, Some(advertised.clone()), 0, THREADS, "second")
        .await;
    let observer = client.clone();
    let status = || {
        let mut c = observer.clone();
        async move {
            c.cluster_status(pb::ClusterStatusRequest::default())
                .await
                .expect("status")
                .into_inner()
        }
    };
    let deadline = Instant::now() + WAIT;
    let registered = loop {
        let s = status().await;
        if let Some(w) = s.workers.iter().find(|w| w.address == advertised) {
            break w.worker_id.clone();
        }
        assert!(
            Instant::now() < deadline,
            "the second worker never registered: {s:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // Several heartbeats and backoffs later: same id, no shard, the same plan serving.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let held = status().await;
    let w = held
        .workers
        .iter()
        .find(|w| w.address == advertised)
        .expect("still registered");
    assert_eq!(
        w.worker_id, registered,
        "dropped and registered again: {held:#?}"
    );
    assert!(
        w.shard.is_none(),
        "planned in though unreachable: {held:#?}"
    );
    assert_eq!(
        held.plan_epoch, before.plan_epoch,
        "the plan was churned: {held:#?}"
    );
    assert!(held.ready, "{held:#?}");
    assert_eq!(
        generate(&mut client, PROMPTS[0])
            .await
            .expect("still serves"),
        want
    );

    // The address answers: the worker is dialled again after its backoff and planned in.
    let forwarder = forward(&advertised, listen.clone()).await;
    let deadline = Instant::now() + Duration::from_secs(40);
    let joined = loop {
        let s = status().await;
        if s.ready && s.workers.iter().all(|w| w.shard.is_some()) && s.workers.len() == 2 {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the reachable worker was never planned in: {s:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(joined.plan_epoch > held.plan_epoch, "{joined:#?}");
    assert_eq!(
        generate(&mut client, PROMPTS[0])
            .await
            .expect("two workers serve"),
        want
    );
    coord.stop(vec![first, second]).await;
    forwarder.abort();
}
