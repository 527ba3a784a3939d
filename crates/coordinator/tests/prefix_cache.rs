//! Prefix caching end to end: in one process, a coordinator and two real workers (two
//! pipeline stages, so every prefix op must reach a stage behind the first) serving the real
//! SmolLM2 model, the same requests run with the prefix cache off and on — sequential ones,
//! concurrent ones, and enough distinct long prefixes to force evictions under a small KV
//! cache. Greedy outputs (token ids, text, logprobs and top alternatives) must be identical;
//! the hit counters must move by what the index promises; and once idle, each worker holds
//! no sequence, its blocks in use are exactly its cached blocks, and both stages cache the
//! same number of blocks (their stores mirror one index). Then a stage dies under requests
//! that share cached blocks: migrated, each needs its own copy, and they must wait their
//! turn on the survivor rather than overrun its cache.

use std::time::{Duration, Instant};

mod common;
mod two_stages;

use common::WAIT;
use tessera_coordinator::CoordinatorConfig;
use tessera_proto::v1 as pb;
use tessera_proto::v1::inference_client::InferenceClient;
use tessera_testkit::{collect_finished, free_addr, greedy_with_logprobs, sample, scrape};
use tessera_worker::ShardStatus;
use tokio::sync::Mutex;
use tonic::transport::Channel;
use two_stages::{TwoStages, settle};

/// Small enough that the five ~300-token prefixes used below do not all fit: admission has to
/// evict.
const KV_TOKENS: u32 = 1024;
const BLOCK: u64 = 16;
const MAX_TOKENS: u32 = 6;
/// How long the workers get to settle after the last request.
const SETTLE: Duration = Duration::from_secs(10);

/// A long, distinct system text for prefix `name` (about 300 tokens).
fn prefix(name: &str) -> String {
    let mut s = format!("<|im_start|>system\nYou are {name}, a careful assistant. ");
    for i in 0..12 {
        s.push_str(&format!(
            "Rule {i} of {name}: answer briefly, cite the rule number, and never repeat rule {i}. "
        ));
    }
    s.push_str("<|im_end|>\n");
    s
}

/// The tests share the machine's cores with nothing else: each runs a whole cluster, and
/// one starved of CPU would miss heartbeats.
static ONE_AT_A_TIME: Mutex<()> = Mutex::const_new(());

/// A chat turn after `prefix`.
fn turn(prefix: &str, question: &str) -> pb::GenerateRequest {
    turn_of(prefix, question, MAX_TOKENS)
}

/// A chat turn after `prefix` that generates exactly `max_tokens` tokens.
fn turn_of(prefix: &str, question: &str, max_tokens: u32) -> pb::GenerateRequest {
    let text = format!("{prefix}<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n");
    let mut req = greedy_with_logprobs(&text, max_tokens, 2);
    if let Some(stop) = req.stop.as_mut() {
        stop.ignore_eos = true;
    }
    req
}

/// What one configuration produced.
struct Run {
    /// Each request's tokens, in submission order.
    outputs: Vec<Vec<pb::TokenEvent>>,
    /// The coordinator's metrics after every request.
    metrics: String,
    /// The hit tokens of the exact repeat (first request sent again).
    repeat_hit: f64,
    /// That repeat's prompt tokens.
    repeat_prompt: u64,
    /// Prompt tokens of every request.
    prompt_tokens: u64,
    /// Every worker's state once idle.
    idle: Vec<ShardStatus>,
}

async fn one(
    client: &mut InferenceClient<Channel>,
    req: pb::GenerateRequest,
) -> (Vec<pb::TokenEvent>, u64) {
    let c = collect_finished(client, req, Some(WAIT))
        .await
        .expect("request succeeds");
    assert_eq!(c.tokens.len(), MAX_TOKENS as usize);
    let prompt = c.finished.usage.map_or(0, |u| u64::from(u.prompt_tokens));
    (c.tokens, prompt)
}

async fn metrics(addr: &str) -> String {
    let addr = addr.to_owned();
    tokio::task::spawn_blocking(move || scrape(&addr))
        .await
        .expect("scrape")
}

/// Runs every request on a fresh cluster with the prefix cache `on` or off.
async fn run(path: &std::path::Path, on: bool) -> Run {
    let metrics_addr = free_addr();
    let TwoStages {
        coord,
        workers,
        mut client,
    } = two_stages::start(CoordinatorConfig {
        model: path.display().to_string(),
        heartbeat_interval: Duration::from_millis(200),
        heartbeat_timeout: Duration::from_secs(2),
        kv_tokens: KV_TOKENS,
        block_size: BLOCK as u32,
        ready_wait: WAIT,
        prefix_cache: on,
        metrics_listen: Some(metrics_addr.parse().expect("addr")),
        ..CoordinatorConfig::default()
    })
    .await;
    let (p, q, r) = (prefix("Ada"), prefix("Brook"), prefix("Cyd"));
    let mut outputs = Vec::new();
    let mut prompt_tokens = 0;

    // Sequential: a first turn, another question on the same prefix, the first again.
    for req in [turn(&p, "What is two plus two?"), turn(&p, "Name a color.")] {
        let (out, n) = one(&mut client, req).await;
        outputs.push(out);
        prompt_tokens += n;
    }
    let before = sample(
        &metrics(&metrics_addr).await,
        "tessera_prefix_cache_hit_tokens_total",
    );
    let (out, repeat_prompt) = one(&mut client, turn(&p, "What is two plus two?")).await;
    let repeat_hit = sample(
        &metrics(&metrics_addr).await,
        "tessera_prefix_cache_hit_tokens_total",
    ) - before;
    outputs.push(out);
    prompt_tokens += repeat_prompt;

    // Concurrent: hits on a cached prefix and misses on new ones, batched into shared steps.
    let reqs = vec![
        turn(&p, "Name a fruit."),
        turn(&q, "What is two plus two?"),
        turn(&p, "Name a color."),
        turn(&q, "Name a city."),
        turn(&r, "Name a river."),
        turn(&p, "Count to three."),
    ];
    let tasks: Vec<_> = reqs
        .into_iter()
        .map(|req| {
            let mut c = client.clone();
            tokio::spawn(async move { one(&mut c, req).await })
        })
        .collect();
    for t in tasks {
        let (out, n) = t.await.expect("request task");
        outputs.push(out);
        prompt_tokens += n;
    }
    // Sequential again, cycling five prefixes through a cache too small for all of them:
    // their distinct full blocks alone exceed the KV capacity, so however the concurrent
    // requests above were batched, caching them all takes evictions.
    let (d, e) = (prefix("Dee"), prefix("Eve"));
    for req in [
        turn(&r, "Name a mountain."),
        turn(&d, "Name a tree."),
        turn(&q, "Name a city."),
        turn(&e, "Name a bird."),
        turn(&p, "Name a fruit."),
        turn(&r, "Name a river."),
    ] {
        let (out, n) = one(&mut client, req).await;
        outputs.push(out);
        prompt_tokens += n;
    }
    let idle = settle(&workers, SETTLE).await;
    let metrics = metrics(&metrics_addr).await;
    // Nothing was lost on the way: one more request is served normally.
    outputs.push(one(&mut client, turn(&q, "Say hello.")).await.0);
    coord.stop(workers).await;
    Run {
        outputs,
        metrics,
        repeat_hit,
        repeat_prompt,
        prompt_tokens,
        idle,
    }
}

/// Ensures that greedy outputs (ids, text, logprobs, top alternatives) are identical with the
/// prefix cache on and off — for sequential and concurrent requests sharing long prefixes,
/// and through evictions — that the hit counters count exactly what the index found, and
/// that an idle cluster holds only cached blocks, the same number on both stages, within
/// the KV capacity.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn outputs_are_identical_with_the_prefix_cache_on_and_off() {
    let Some(path) = tessera_testkit::smollm2_gguf() else {
        return;
    };
    let _one = ONE_AT_A_TIME.lock().await;
    let off = run(&path, false).await;
    let on = run(&path, true).await;
    assert_eq!(off.outputs.len(), on.outputs.len());
    for (i, (a, b)) in off.outputs.iter().zip(&on.outputs).enumerate() {
        assert_eq!(a, b, "request {i} differs with the prefix cache on");
    }
    assert_eq!(off.prompt_tokens, on.prompt_tokens);

    // Off: nothing looked up, nothing cached.
    assert_eq!(
        sample(&off.metrics, "tessera_prefix_cache_queried_tokens_total"),
        0.0
    );
    assert!(
        off.idle.iter().all(|s| s.cached_kv_blocks == 0),
        "{:?}",
        off.idle
    );

    // On: every admitted prompt was looked up; the exact repeat found all its blocks but the
    // one holding its last token (at least one token is always computed).
    let queried = sample(&on.metrics, "tessera_prefix_cache_queried_tokens_total");
    assert_eq!(queried, on.prompt_tokens as f64);
    let want_repeat = (on.repeat_prompt - 1) / BLOCK * BLOCK;
    // Each of the five prefixes' prompts is as long (within a few tokens): their distinct
    // full blocks are more than the cache holds.
    assert!(
        5 * (want_repeat / BLOCK - 1) > u64::from(KV_TOKENS) / BLOCK,
        "the prefixes must outgrow the cache: {want_repeat} tokens each"
    );
    assert_eq!(on.repeat_hit, want_repeat as f64);
    let hits = sample(&on.metrics, "tessera_prefix_cache_hit_tokens_total");
    assert!(
        hits > on.repeat_hit && hits < queried,
        "hits {hits} of {queried}"
    );
    assert!(
        sample(&on.metrics, "tessera_prefix_cache_evicted_blocks_total") > 0.0,
        "five prefixes do not fit {KV_TOKENS} tokens: something was evicted"
    );
    let cached: Vec<u64> = on.idle.iter().map(|s| s.cached_kv_blocks).collect();
    assert!(
        cached[0] > 0 && cached.iter().all(|&c| c == cached[0]),
        "{:?}",
        on.idle
    );
    assert!(cached[0] <= u64::from(KV_TOKENS) / BLOCK, "{:?}", on.idle);
}

/// Tokens each of the migrated requests generates: long enough to be decoding when the stage
/// dies, and to make each request's blocks (prompt and tokens) outgrow a quarter of the cache.
const MIGRATED_TOKENS: u32 = 40;

/// Ensures that requests sharing cached prefix blocks survive a stage's death: migrated to
/// the survivor, where each needs its own copy of those blocks and together they outgrow its
/// cache, they take their turns (the first ones replay, the others wait for their room) and
/// every one finishes with exactly the tokens and logprobs of a fault-free run — none fails
/// with a full cache — and the survivor then holds nothing but cached blocks.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_sharing_cached_blocks_take_turns_after_a_migration() {
    let Some(path) = tessera_testkit::smollm2_gguf() else {
        return;
    };
    let _one = ONE_AT_A_TIME.lock().await;
    let metrics_addr = free_addr();
    let TwoStages {
        coord,
        mut workers,
        mut client,
    } = two_stages::start(CoordinatorConfig {
        model: path.display().to_string(),
        heartbeat_interval: Duration::from_millis(200),
        heartbeat_timeout: Duration::from_secs(1),
        kv_tokens: KV_TOKENS,
        block_size: BLOCK as u32,
        ready_wait: WAIT,
        prefix_cache: true,
        metrics_listen: Some(metrics_addr.parse().expect("addr")),
        ..CoordinatorConfig::default()
    })
    .await;
    let p = prefix("Ada");
    // The prefix goes into the cache.
    let (_, prompt) = one(&mut client, turn(&p, "What is two plus two?")).await;
    let questions = [
        "Name a fruit.",
        "Name a color.",
        "Count to three.",
        "Name a city.",
    ];
    let (first_tokens, mut firsts) = tokio::sync::mpsc::unbounded_channel::<()>();
    let tasks: Vec<_> = questions
        .iter()
        .map(|q| {
            let mut c = client.clone();
            let first = first_tokens.clone();
            let req = turn_of(&p, q, MIGRATED_TOKENS);
            tokio::spawn(async move {
                let mut stream = c.generate(req).await?.into_inner();
                let mut tokens = Vec::new();
                loop {
                    let ev = tokio::time::timeout(WAIT, stream.message())
                        .await
                        .map_err(|_| tonic::Status::deadline_exceeded("no event in time"))?;
                    match ev?.and_then(|e| e.event) {
                        Some(pb::generate_event::Event::Token(t)) => {
                            tokens.push(t);
                            if tokens.len() == 1 {
                                let _ = first.send(());
                            }
                        }
                        Some(pb::generate_event::Event::Finished(_)) => return Ok(tokens),
                        None => return Err(tonic::Status::internal("ended unfinished")),
                    }
                }
            })
        })
        .collect();
    drop(first_tokens);
    for _ in &questions {
        tokio::time::timeout(WAIT, firsts.recv())
            .await
            .expect("first tokens in time");
    }
    // Together, with their own copies of the prefix (their prompts are about as long as the
    // first one), they do not fit one cache.
    let blocks = (prompt + u64::from(MIGRATED_TOKENS)).div_ceil(BLOCK);
    assert!(
        questions.len() as u64 * (blocks - 1) > u64::from(KV_TOKENS) / BLOCK,
        "{} requests of {blocks} blocks fit {KV_TOKENS} tokens",
        questions.len()
    );
    let victim = workers.pop().expect("two workers");
    let killed = Instant::now();
    victim.shutdown().await.expect("shutdown");
    let mut faulted = Vec::new();
    for (q, t) in questions.iter().zip(tasks) {
        let tokens = t
            .await
            .expect("task")
            .unwrap_or_else(|e| panic!("{q:?} failed across the loss: {e:?}"));
        faulted.push(tokens);
    }
    eprintln!(
        "every request finished {:?} after the loss",
        killed.elapsed()
    );
    let migrations = sample(
        &metrics(&metrics_addr).await,
        "tessera_request_migrations_total",
    );
    assert!(
        migrations >= questions.len() as f64,
        "{migrations} migrations"
    );
    for (q, tokens) in questions.iter().zip(&faulted) {
        let free = collect_finished(&mut client, turn_of(&p, q, MIGRATED_TOKENS), Some(WAIT))
            .await
            .expect("fault-free run");
        assert_eq!(tokens, &free.tokens, "{q:?} changed across the loss");
    }
    settle(&workers, SETTLE).await;
    coord.stop(workers).await;
}
