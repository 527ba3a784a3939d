//! A real cluster on loopback — `tessera coordinator` and `tessera worker` processes — against
//! the single-process engine: identical outputs through a 3-stage pipeline, batching of
//! concurrent requests, requests migrated across `kill -9` or SIGSTOP of a worker, bad
//! input, and the Python client.

use std::process::Command;
use std::time::{Duration, Instant};

use tessera_hub::ModelLocation;
use tessera_model::engine::{Engine, EngineOptions, GenerateRequest, Prompt};
use tessera_proto::v1 as pb;
use tessera_proto::v1::inference_client::InferenceClient;
use tessera_testkit::{
    KV_TOKENS, ProcessCluster, Tessera, collect, finish_stream, ids_and_logprobs, python, sample,
    scrape, seeded_exact, signal, smollm2_arg as model,
};
use tessera_text::sampling::{SamplingParams, StopConditions};

/// The `tessera` binary under test.
fn tessera() -> Tessera {
    Tessera::new(env!("CARGO_BIN_EXE_tessera"))
}

/// Starts a cluster of `tessera` processes: a coordinator and a worker per `(threads, memory)`.
fn start_cluster(model: &str, workers: &[(u32, &str)]) -> ProcessCluster {
    ProcessCluster::start(&tessera(), model, workers)
}

/// A greedy request with logprobs and two alternatives per token.
fn greedy(prompt: &str, max_tokens: u32) -> pb::GenerateRequest {
    tessera_testkit::greedy_with_logprobs(prompt, max_tokens, 2)
}

/// The single-process engine's tokens and logprobs for the same greedy request.
fn engine_reference(engine: &mut Engine, prompt: &str, max_tokens: u32) -> Vec<(u32, f32)> {
    let req = engine
        .validate(&GenerateRequest {
            prompt: Prompt::Text(prompt.into()),
            sampling: SamplingParams {
                temperature: 0.0,
                logprobs: true,
                top_logprobs: 2,
                ..SamplingParams::default()
            },
            stop: StopConditions {
                max_tokens,
                stop: vec![],
                stop_token_ids: vec![],
                ignore_eos: false,
            },
        })
        .expect("valid request");
    let out = engine
        .generate(&req, &mut |_| std::ops::ControlFlow::Continue(()))
        .expect("generate");
    out.tokens
        .iter()
        .map(|t| (t.id, t.logprob.expect("logprob asked for")))
        .collect()
}

fn engine(model: &str) -> Engine {
    Engine::load(
        &ModelLocation::Gguf(model.into()),
        EngineOptions {
            threads: 2,
            kv_tokens: Some(KV_TOKENS as usize),
            ..EngineOptions::default()
        },
        &mut |_, _| {},
    )
    .expect("load the engine")
}

const PROMPTS: [&str; 4] = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a land far away,",
    "<|im_start|>user\nName three colours.<|im_end|>\n<|im_start|>assistant\n",
];

/// Uneven workers. SmolLM2 with 2048 KV tokens needs about 210 MiB over several stages
/// (embedding and tied head ~28 MiB each, ~5.1 MiB per layer with its KV): these fit it together
/// but no two of them do, so the plan has three stages whatever order they register in.
const UNEVEN: [(u32, &str); 3] = [(1, "60MiB"), (1, "80MiB"), (1, "100MiB")];

/// Ensures that a 3-stage pipeline over workers of uneven capacity produces greedy tokens and
/// per-token logprobs bit-identical to the single-process engine, and that `tessera status`
/// shows each worker holding a different share of the layers and of the memory (and exits 0
/// when its reader has gone).
#[test]
fn pipeline_matches_the_single_process_engine() {
    let Some(model) = model() else { return };
    let cluster = start_cluster(&model, &UNEVEN);
    let status = cluster.status();
    let mut shards: Vec<_> = status
        .workers
        .iter()
        .map(|w| w.shard.expect("every worker has a shard"))
        .collect();
    shards.sort_by_key(|s| s.stage);
    assert_eq!(shards.len(), 3, "{status:#?}");
    assert_eq!(shards[0].layer_start, 0);
    assert!(
        shards
            .windows(2)
            .all(|w| w[0].layer_end == w[1].layer_start)
    );
    assert!(shards[0].embed && shards[2].head);
    let sizes: Vec<u32> = shards.iter().map(|s| s.layer_end - s.layer_start).collect();
    assert!(
        !(sizes[0] == sizes[1] && sizes[1] == sizes[2]),
        "uneven capacities, uneven split: {sizes:?}"
    );
    // Weight bytes arrive with each worker's first heartbeat after its load.
    let start = Instant::now();
    loop {
        let weights: Vec<u64> = cluster
            .status()
            .workers
            .iter()
            .map(|w| w.weight_bytes)
            .collect();
        if weights.iter().all(|&b| b > 0) {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "{weights:?}");
        std::thread::sleep(Duration::from_millis(100));
    }

    let out = tessera()
        .command()
        .args(["status", "--endpoint", &cluster.endpoint])
        .output()
        .expect("tessera status");
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && table.contains("stage 2"), "{table}");
    // A reader that has gone (`tessera status | head -1`) is not a crash: stdout's read end
    // is closed before the table is written, and the command still exits 0 without a panic.
    let mut child = tessera()
        .command()
        .args(["status", "--endpoint", &cluster.endpoint])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("tessera status");
    drop(child.stdout.take());
    let out = child.wait_with_output().expect("tessera status ends");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && !err.contains("panicked"), "{err}");

    let mut engine = engine(&model);
    for prompt in PROMPTS {
        let expected = engine_reference(&mut engine, prompt, 24);
        let got = cluster.generate(greedy(prompt, 24)).expect("generate");
        assert_eq!(ids_and_logprobs(&got), expected, "prompt {prompt:?}");
    }
}

/// Ensures that 8 concurrent streaming requests are served together (the coordinator reports
/// several running at once) and each produces exactly what it produces alone.
#[test]
fn concurrent_requests_are_batched_and_unchanged() {
    let Some(model) = model() else { return };
    let cluster = start_cluster(&model, &[(1, "1GiB"), (1, "1GiB")]);
    let prompts: Vec<String> = (0..8)
        .map(|i| format!("{} Item number {i}:", PROMPTS[i % PROMPTS.len()]))
        .collect();
    let alone: Vec<_> = prompts
        .iter()
        .map(|p| ids_and_logprobs(&cluster.generate(greedy(p, 16)).expect("alone")))
        .collect();
    let mut peak = 0;
    let together = cluster.rt.block_on(async {
        let mut tasks = Vec::new();
        for p in &prompts {
            let mut c = InferenceClient::connect(cluster.endpoint.clone())
                .await
                .expect("connect");
            let req = greedy(p, 16);
            tasks.push(tokio::spawn(async move { collect(&mut c, req).await }));
        }
        let mut probe = InferenceClient::connect(cluster.endpoint.clone())
            .await
            .expect("connect");
        while !tasks.iter().all(tokio::task::JoinHandle::is_finished) {
            if let Ok(s) = probe
                .cluster_status(pb::ClusterStatusRequest::default())
                .await
            {
                peak = peak.max(s.into_inner().running_requests);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.expect("join").expect("generate"));
        }
        out
    });
    for (i, (a, t)) in alone.iter().zip(&together).enumerate() {
        assert_eq!(&ids_and_logprobs(t), a, "request {i} changed when batched");
    }
    assert!(peak >= 2, "requests never ran together (peak {peak})");
}

/// The requests in flight when a worker is lost: a greedy one and a seeded temperature-0.8
/// one, both with logprobs (any change in the logits shows) and exactly 40 tokens.
fn survivors() -> [pb::GenerateRequest; 2] {
    let mut plain = greedy(PROMPTS[2], 40);
    if let Some(stop) = plain.stop.as_mut() {
        stop.ignore_eos = true;
    }
    [plain, seeded_exact(PROMPTS[3], 40, 2)]
}

/// The fault-free answers of [`survivors`], as token ids and logprobs.
fn fault_free(cluster: &ProcessCluster) -> Vec<Vec<(u32, f32)>> {
    survivors()
        .into_iter()
        .map(|r| ids_and_logprobs(&cluster.generate(r).expect("fault-free run")))
        .collect()
}

/// Starts [`survivors`], applies `lose` (which loses a worker) once both streams have produced
/// tokens, and asserts that both streams go on with no error and give exactly `fault_free`.
/// Returns the longest time a stream waited for a token across the loss.
fn survive(
    cluster: &mut ProcessCluster,
    fault_free: &[Vec<(u32, f32)>],
    lose: impl FnOnce(&mut ProcessCluster),
) -> Duration {
    let mut streams: Vec<_> = survivors()
        .into_iter()
        .map(|r| cluster.stream_begun(r, 3))
        .collect();
    lose(cluster);
    let mut delay = Duration::ZERO;
    for (i, (stream, first)) in streams.iter_mut().enumerate() {
        let rest = cluster
            .rt
            .block_on(finish_stream(stream, Duration::from_secs(120)))
            .unwrap_or_else(|e| panic!("stream {i} failed across the loss: {e:?}"));
        delay = delay.max(rest.longest_gap);
        first.extend(rest.tokens);
        assert_eq!(
            ids_and_logprobs(first),
            fault_free[i],
            "stream {i} changed across the loss"
        );
    }
    delay
}

/// [`survive`] after a fault-free run of the same requests on `cluster`.
fn streams_survive(
    cluster: &mut ProcessCluster,
    lose: impl FnOnce(&mut ProcessCluster),
) -> Duration {
    let fault_free = fault_free(cluster);
    survive(cluster, &fault_free, lose)
}

/// Ensures that `kill -9` of a worker mid-generation costs its clients nothing: a greedy and
/// a seeded temperature-0.8 stream in flight are migrated to the plan on the surviving
/// workers and finish with no error and exactly the fault-free tokens and logprobs; and that
/// a worker joining while streams run is adopted at once (a new plan under load), its
/// streams migrated onto it just as unchanged; and that a worker stopped with SIGTERM drains
/// — leaves the cluster, its streams migrate unchanged, and it exits cleanly.
#[test]
fn killed_worker_s_requests_migrate_with_identical_tokens() {
    let Some(model) = model() else { return };
    let mut cluster = start_cluster(&model, &[(1, "1GiB"), (1, "1GiB"), (1, "1GiB")]);
    let epoch = cluster.status().plan_epoch;
    let delay = streams_survive(&mut cluster, |c| c.kill_worker(1));
    eprintln!("the kill delayed the streams by at most {delay:?}");
    let status = cluster.status();
    assert_eq!(status.workers.len(), 2, "{status:#?}");
    assert!(status.plan_epoch > epoch);
    let epoch = status.plan_epoch;
    let delay = streams_survive(&mut cluster, |c| {
        c.add_worker(1, "1GiB");
    });
    eprintln!("adopting a joiner delayed the streams by at most {delay:?}");
    let status = cluster.status();
    assert_eq!(status.workers.len(), 3, "{status:#?}");
    assert!(
        status.plan_epoch > epoch && status.workers.iter().all(|w| w.shard.is_some()),
        "the joiner was not adopted: {status:#?}"
    );
    // A worker stopped on purpose (SIGTERM: a pod deleted, a node drained) drains: it leaves
    // the cluster, the coordinator re-plans without it at once, its streams migrate unchanged,
    // and it exits cleanly once the coordinator has closed them.
    let mut exited = Duration::ZERO;
    let delay = streams_survive(&mut cluster, |c| {
        exited = c.stop_worker(2, Duration::from_secs(30));
    });
    eprintln!(
        "a drained worker exited {exited:?} after SIGTERM; its streams waited at most {delay:?}"
    );
    let status = cluster.status();
    assert_eq!(status.workers.len(), 2, "{status:#?}");
    let metrics = scrape(&cluster.metrics);
    assert!(
        metrics.contains("tessera_request_migrations_total{model_name="),
        "{metrics}"
    );
    assert_eq!(
        sample(&metrics, "tessera_workers_left_total"),
        1.0,
        "{metrics}"
    );
}

/// Ensures that a worker whose executor wedges mid-stream while its heartbeats go on (the
/// `wedge-at-step` failpoint: a deadlock, a hung device) is found by the step timeout — its
/// heartbeats show it stuck on the step — and dropped, that the streams it held up migrate to
/// the other workers with exactly the fault-free tokens and logprobs, and that it does not
/// register again while its executor stays stuck.
#[test]
fn wedged_worker_is_found_by_the_step_timeout() {
    let Some(model) = model() else { return };
    let mut cluster = start_cluster(&model, &[(1, "1GiB"), (1, "1GiB")]);
    let fault_free = fault_free(&cluster);
    // The third worker wedges on its 20th step: the streams below take about 40 steps, so it
    // happens mid-stream however they are batched.
    cluster.add_worker_with(1, "1GiB", &["--failpoint", "wedge-at-step=20"]);
    let start = Instant::now();
    while !cluster
        .status()
        .workers
        .iter()
        .filter(|w| w.shard.is_some())
        .count()
        .eq(&3)
    {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the third worker was not adopted"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    cluster.wait_ready(Duration::from_secs(60));
    // Nothing to do: the worker wedges by itself.
    let delay = survive(&mut cluster, &fault_free, |_| {});
    eprintln!("the wedged worker delayed the streams by at most {delay:?}");
    let metrics = scrape(&cluster.metrics);
    assert_eq!(
        sample(&metrics, "tessera_wedged_workers_dropped_total"),
        1.0,
        "{metrics}"
    );
    // Stuck for good: heartbeating still, it is told it is unknown, and does not register.
    std::thread::sleep(Duration::from_secs(3));
    let status = cluster.status();
    assert_eq!(status.workers.len(), 2, "{status:#?}");
    assert!(status.ready, "{status:#?}");
}

/// Ensures that every kind of bad request is INVALID_ARGUMENT naming its field, and that the
/// cluster keeps serving afterwards.
#[test]
fn bad_input_names_the_field() {
    let Some(model) = model() else { return };
    let cluster = start_cluster(&model, &[(2, "1GiB")]);
    let with = |f: &dyn Fn(&mut pb::GenerateRequest)| {
        let mut r = greedy("Hello", 4);
        f(&mut r);
        r
    };
    let long_prompt = "word ".repeat(KV_TOKENS as usize + 10);
    let cases: Vec<(&str, pb::GenerateRequest)> = vec![
        (
            "prompt",
            with(&|r| r.prompt = Some(pb::generate_request::Prompt::Text(String::new()))),
        ),
        ("prompt", with(&|r| r.prompt = None)),
        (
            "sampling.temperature",
            with(&|r| r.sampling.as_mut().expect("set").temperature = Some(-1.0)),
        ),
        (
            "sampling.top_p",
            with(&|r| r.sampling.as_mut().expect("set").top_p = Some(1.5)),
        ),
        (
            "stop.max_tokens",
            with(&|r| r.stop.as_mut().expect("set").max_tokens = Some(0)),
        ),
        (
            "stop.max_tokens",
            with(&|r| r.stop.as_mut().expect("set").max_tokens = Some(KV_TOKENS + 1)),
        ),
        ("model", with(&|r| r.model = "no-such-model".into())),
        // An attacker's 20 KB name is not echoed whole (it would not fit an HTTP/2 header).
        ("model", with(&|r| r.model = "m".repeat(20_000))),
        (
            "prompt",
            with(&|r| r.prompt = Some(pb::generate_request::Prompt::Text(long_prompt.clone()))),
        ),
        ("top_logprobs", with(&|r| r.top_logprobs = 50)),
    ];
    for (field, req) in cases {
        let err = cluster
            .generate(req)
            .expect_err(&format!("a bad {field} must be refused"));
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{field}: {err:?}");
        assert!(
            err.message().starts_with(field),
            "the message for a bad {field} must name it: {:?}",
            err.message()
        );
        assert!(
            err.message().len() < 1200,
            "{field}: {} bytes",
            err.message().len()
        );
    }
    let ok = cluster.generate(greedy("Hello", 4)).expect("still serving");
    assert_eq!(ok.len(), 4);

    // The Prometheus endpoint counted all of it.
    let text = scrape(&cluster.metrics);
    let labels = format!("model_name=\"{model}\"");
    for want in [
        format!("tessera_requests_total{{{labels},outcome=\"invalid\"}} 10"),
        format!("tessera_requests_total{{{labels},outcome=\"length\"}} 1"),
        format!("tessera_generated_tokens_total{{{labels}}} 4"),
    ] {
        assert!(text.contains(&want), "{want} missing from\n{text}");
    }
}

/// Ensures that the Python client generated from the protos with grpcio-tools streams an answer.
/// Needs TESSERA_PYTHON: a Python with the packages of examples/python/requirements.txt.
#[test]
fn python_client_streams_an_answer() {
    let Some(model) = model() else { return };
    let Some(python) = python() else { return };
    let dir = tessera_testkit::python_examples(&python);
    let cluster = start_cluster(&model, &[(2, "1GiB")]);
    let addr = cluster.endpoint.trim_start_matches("http://").to_owned();
    let expected: String = cluster
        .generate(greedy(PROMPTS[0], 12))
        .expect("rust client")
        .iter()
        .map(|t| t.text.as_str())
        .collect();
    let out = Command::new(&python)
        .args([
            "client.py",
            "--endpoint",
            &addr,
            "--max-tokens",
            "12",
            PROMPTS[0],
        ])
        .current_dir(&dir)
        .output()
        .expect("run client.py");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("finish=FINISH_REASON_"), "{stderr}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim_end(),
        expected.trim_end()
    );
}

/// Ensures that the README's main command — `tessera up` with a prompt — starts a local
/// cluster, answers, and shuts the cluster down.
#[test]
fn up_answers_a_prompt_and_stops() {
    let Some(model) = model() else { return };
    let out = tessera()
        .up(&model)
        .args([
            "--workers",
            "2",
            "--max-tokens",
            "8",
            "--prompt",
            "The capital of France is",
        ])
        .output()
        .expect("tessera up");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("tessera cluster ready"), "{stderr}");
    assert!(stderr.contains("8 generated"), "{stderr}");
    assert!(!String::from_utf8_lossy(&out.stdout).trim().is_empty());
}

/// Ensures that a worker that goes silent without closing its connections (SIGSTOP: a hung
/// host or a cut network) is dropped by the liveness monitor and its streams migrate to the
/// remaining workers with exactly the fault-free output, and that the worker, once it speaks
/// again, registers anew and is used by the next plan.
#[test]
fn silent_worker_is_dropped_then_rejoins() {
    let Some(model) = model() else { return };
    let mut cluster = start_cluster(&model, &[(1, "1GiB"), (1, "1GiB"), (1, "1GiB")]);
    let prompt = PROMPTS[0];
    let before = ids_and_logprobs(&cluster.generate(greedy(prompt, 12)).expect("before"));
    let delay = streams_survive(&mut cluster, |c| {
        signal(c.workers[1].as_ref().expect("running"), "-STOP");
    });
    eprintln!("the silent worker delayed the streams by at most {delay:?}");
    assert_eq!(cluster.status().workers.len(), 2);
    let victim = cluster.workers[1].as_ref().expect("running");
    signal(victim, "-CONT");
    let start = Instant::now();
    loop {
        let s = cluster.status();
        if s.ready && s.workers.len() == 3 && s.workers.iter().all(|w| w.shard.is_some()) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the worker did not rejoin the plan: {s:#?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let rejoined = cluster
        .generate(greedy(prompt, 12))
        .expect("after the rejoin");
    assert_eq!(ids_and_logprobs(&rejoined), before);
}
