//! A real cluster on loopback — `tessera coordinator` and `tessera worker` processes — against
//! the single-process engine: identical outputs through a 3-stage pipeline, batching of
//! concurrent requests, `kill -9` of a worker, bad input, and the Python client.

use std::process::{Child, Command};
use std::time::{Duration, Instant};

use tessera_hub::ModelLocation;
use tessera_model::engine::{Engine, EngineOptions, GenerateRequest, Prompt};
use tessera_proto::v1 as pb;
use tessera_proto::v1::generate_event::Event;
use tessera_proto::v1::inference_client::InferenceClient;
use tessera_text::sampling::{SamplingParams, StopConditions};
use tonic::transport::Channel;

mod support;
use support::{free_port, model, scrape, spawn, spawn_coordinator};

/// Heartbeat timeout the test clusters run with: a dead worker must end streams within twice this.
const HEARTBEAT_TIMEOUT_MS: u64 = 1000;
/// KV capacity per worker: enough for the tests, small enough that memory plans stay modest.
const KV_TOKENS: u32 = 2048;

/// A coordinator and workers, killed when dropped.
struct Cluster {
    coordinator: Child,
    workers: Vec<Option<Child>>,
    endpoint: String,
    /// host:port of the coordinator's Prometheus endpoint.
    metrics: String,
    rt: tokio::runtime::Runtime,
}

impl Cluster {
    /// Starts a coordinator and one worker per `(threads, memory)`, and waits for a plan.
    fn start(model: &str, workers: &[(u32, &str)]) -> Self {
        let n = workers.len().to_string();
        let hb = HEARTBEAT_TIMEOUT_MS.to_string();
        let kv = KV_TOKENS.to_string();
        let metrics = format!("127.0.0.1:{}", free_port());
        let (coordinator, addr, cluster_addr) = spawn_coordinator(&[
            "coordinator",
            "--metrics-listen",
            &metrics,
            "--listen",
            "127.0.0.1:0",
            "--cluster-listen",
            "127.0.0.1:0",
            "--model",
            model,
            "--min-workers",
            &n,
            "--heartbeat-ms",
            "250",
            "--heartbeat-timeout-ms",
            &hb,
            "--kv-tokens",
            &kv,
            "--exit-on-stdin-eof",
        ]);
        let endpoint = format!("http://{addr}");
        let cluster_endpoint = format!("http://{cluster_addr}");
        let workers = workers
            .iter()
            .enumerate()
            .map(|(i, (threads, memory))| {
                let threads = threads.to_string();
                let name = format!("w{i}");
                let (child, _) = spawn(&[
                    "worker",
                    "--coordinator",
                    &cluster_endpoint,
                    "--threads",
                    &threads,
                    "--memory",
                    memory,
                    "--name",
                    &name,
                    "--exit-on-stdin-eof",
                ]);
                Some(child)
            })
            .collect();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let cluster = Self {
            coordinator,
            workers,
            endpoint,
            metrics,
            rt,
        };
        cluster.wait_ready(Duration::from_secs(60));
        cluster
    }

    fn client(&self) -> InferenceClient<Channel> {
        self.rt.block_on(async {
            InferenceClient::connect(self.endpoint.clone())
                .await
                .expect("connect to the coordinator")
        })
    }

    fn status(&self) -> pb::ClusterStatusResponse {
        let mut c = self.client();
        self.rt
            .block_on(c.cluster_status(pb::ClusterStatusRequest::default()))
            .expect("cluster status")
            .into_inner()
    }

    fn wait_ready(&self, timeout: Duration) -> pb::ClusterStatusResponse {
        let start = Instant::now();
        loop {
            let s = self.status();
            if s.ready {
                return s;
            }
            assert!(start.elapsed() < timeout, "cluster not ready: {s:#?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs one request to the end: its tokens (with logprobs) or its error status.
    fn generate(&self, req: pb::GenerateRequest) -> Result<Vec<pb::TokenEvent>, tonic::Status> {
        let mut c = self.client();
        self.rt.block_on(collect(&mut c, req))
    }

    /// Reads a generate stream to its error, which must come within 30 s.
    fn stream_error(&self, stream: &mut tonic::Streaming<pb::GenerateEvent>) -> tonic::Status {
        self.rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(30), async {
                loop {
                    match stream.message().await {
                        Ok(Some(_)) => {}
                        Ok(None) => panic!("stream ended without an error"),
                        Err(e) => return e,
                    }
                }
            })
            .await
            .expect("the stream hangs instead of failing")
        })
    }

    /// `kill -9` of worker `i`; returns when the process is gone.
    fn kill_worker(&mut self, i: usize) {
        let mut w = self.workers[i].take().expect("worker still running");
        w.kill().expect("kill -9");
        let _ = w.wait();
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for w in self.workers.iter_mut().flatten() {
            let _ = w.kill();
            let _ = w.wait();
        }
        let _ = self.coordinator.kill();
        let _ = self.coordinator.wait();
    }
}

async fn collect(
    c: &mut InferenceClient<Channel>,
    req: pb::GenerateRequest,
) -> Result<Vec<pb::TokenEvent>, tonic::Status> {
    let mut stream = c.generate(req).await?.into_inner();
    let mut out = Vec::new();
    while let Some(ev) = stream.message().await? {
        match ev.event {
            Some(Event::Token(t)) => out.push(t),
            Some(Event::Finished(_)) => return Ok(out),
            None => {}
        }
    }
    Err(tonic::Status::internal(
        "stream ended without a Finished event",
    ))
}

/// A greedy request with logprobs.
fn greedy(prompt: &str, max_tokens: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        prompt: Some(pb::generate_request::Prompt::Text(prompt.into())),
        sampling: Some(pb::SamplingParams {
            temperature: Some(0.0),
            ..Default::default()
        }),
        stop: Some(pb::StopConditions {
            max_tokens: Some(max_tokens),
            ..Default::default()
        }),
        logprobs: true,
        top_logprobs: 2,
        ..Default::default()
    }
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

fn ids_and_logprobs(events: &[pb::TokenEvent]) -> Vec<(u32, f32)> {
    events
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
/// shows each worker holding a different share of the layers and of the memory.
#[test]
fn pipeline_matches_the_single_process_engine() {
    let Some(model) = model() else {
        eprintln!("skipped: set TESSERA_MODEL_GGUF to the SmolLM2 GGUF");
        return;
    };
    let cluster = Cluster::start(&model, &UNEVEN);
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

    let out = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(["status", "--endpoint", &cluster.endpoint])
        .output()
        .expect("tessera status");
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && table.contains("stage 2"), "{table}");

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
    let Some(model) = model() else {
        eprintln!("skipped: set TESSERA_MODEL_GGUF to the SmolLM2 GGUF");
        return;
    };
    let cluster = Cluster::start(&model, &[(1, "1GiB"), (1, "1GiB")]);
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

/// Ensures that `kill -9` of a worker mid-generation ends the stream with UNAVAILABLE within
/// two heartbeat timeouts, and that the next request succeeds on the remaining workers with
/// the same output as before.
#[test]
fn killed_worker_fails_fast_and_the_cluster_replans() {
    let Some(model) = model() else {
        eprintln!("skipped: set TESSERA_MODEL_GGUF to the SmolLM2 GGUF");
        return;
    };
    let mut cluster = Cluster::start(&model, &[(1, "1GiB"), (1, "1GiB"), (1, "1GiB")]);
    let prompt = PROMPTS[2];
    let before = ids_and_logprobs(&cluster.generate(greedy(prompt, 12)).expect("before"));
    let epoch = cluster.status().plan_epoch;

    let mut c = cluster.client();
    let mut stream = cluster
        .rt
        .block_on(c.generate(greedy(prompt, 1000)))
        .expect("start")
        .into_inner();
    for _ in 0..3 {
        cluster
            .rt
            .block_on(stream.message())
            .expect("tokens before the kill")
            .expect("stream open");
    }
    cluster.kill_worker(1);
    let killed = Instant::now();
    let err = cluster.stream_error(&mut stream);
    let waited = killed.elapsed();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(
        waited <= Duration::from_millis(2 * HEARTBEAT_TIMEOUT_MS),
        "stream ended {waited:?} after the kill"
    );
    let after = cluster
        .generate(greedy(prompt, 12))
        .expect("after the kill");
    assert_eq!(ids_and_logprobs(&after), before);
    let status = cluster.status();
    assert_eq!(status.workers.len(), 2, "{status:#?}");
    assert!(status.plan_epoch > epoch);
}

/// Ensures that every kind of bad request is INVALID_ARGUMENT naming its field, and that the
/// cluster keeps serving afterwards.
#[test]
fn bad_input_names_the_field() {
    let Some(model) = model() else {
        eprintln!("skipped: set TESSERA_MODEL_GGUF to the SmolLM2 GGUF");
        return;
    };
    let cluster = Cluster::start(&model, &[(2, "1GiB")]);
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
    }
    let ok = cluster.generate(greedy("Hello", 4)).expect("still serving");
    assert_eq!(ok.len(), 4);

    // The Prometheus endpoint counted all of it.
    let text = scrape(&cluster.metrics);
    assert!(
        text.contains("tessera_requests_total{outcome=\"invalid\"} 9"),
        "{text}"
    );
    assert!(
        text.contains("tessera_requests_total{outcome=\"length\"} 1"),
        "{text}"
    );
    assert!(text.contains("tessera_generated_tokens_total 4"), "{text}");
}

/// Ensures that the Python client generated from the protos with grpcio-tools streams an answer.
/// Needs TESSERA_PYTHON: a Python with the packages of examples/python/requirements.txt.
#[test]
fn python_client_streams_an_answer() {
    let Some(model) = model() else {
        eprintln!("skipped: set TESSERA_MODEL_GGUF to the SmolLM2 GGUF");
        return;
    };
    let Ok(python) = std::env::var("TESSERA_PYTHON") else {
        let in_ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false");
        assert!(
            !in_ci,
            "TESSERA_PYTHON is unset in CI: run the tests with scripts/test.sh"
        );
        eprintln!("skipped: set TESSERA_PYTHON to a Python with examples/python/requirements.txt");
        return;
    };
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/python");
    let gen_stubs = Command::new(&python)
        .arg("generate_stubs.py")
        .current_dir(&dir)
        .output()
        .expect("run generate_stubs.py");
    assert!(
        gen_stubs.status.success(),
        "{}",
        String::from_utf8_lossy(&gen_stubs.stderr)
    );
    let cluster = Cluster::start(&model, &[(2, "1GiB")]);
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
    let Some(model) = model() else {
        eprintln!("skipped: set TESSERA_MODEL_GGUF to the SmolLM2 GGUF");
        return;
    };
    let out = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args([
            "up",
            "--workers",
            "2",
            "--listen",
            "127.0.0.1:0",
            "--threads-per-worker",
            "1",
            "--memory",
            "1GiB",
            "--model",
            &model,
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

/// Sends a signal to a worker process with kill(1).
fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .expect("run kill")
        .success();
    assert!(ok, "kill {sig} failed");
}

/// Ensures that a worker that goes silent without closing its connections (SIGSTOP: a hung
/// host or a cut network) ends in-flight streams with UNAVAILABLE within two heartbeat
/// timeouts, that the remaining workers then serve the same output, and that the worker, once
/// it speaks again, registers anew and is used by the next plan.
#[test]
fn silent_worker_is_dropped_then_rejoins() {
    let Some(model) = model() else {
        eprintln!("skipped: set TESSERA_MODEL_GGUF to the SmolLM2 GGUF");
        return;
    };
    let cluster = Cluster::start(&model, &[(1, "1GiB"), (1, "1GiB"), (1, "1GiB")]);
    let prompt = PROMPTS[0];
    let before = ids_and_logprobs(&cluster.generate(greedy(prompt, 12)).expect("before"));

    let mut c = cluster.client();
    let mut stream = cluster
        .rt
        .block_on(c.generate(greedy(prompt, 1000)))
        .expect("start")
        .into_inner();
    for _ in 0..3 {
        cluster
            .rt
            .block_on(stream.message())
            .expect("tokens before the stop")
            .expect("stream open");
    }
    let victim = cluster.workers[1].as_ref().expect("running");
    signal(victim, "-STOP");
    let stopped = Instant::now();
    let err = cluster.stream_error(&mut stream);
    let waited = stopped.elapsed();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(
        waited <= Duration::from_millis(2 * HEARTBEAT_TIMEOUT_MS),
        "stream ended {waited:?} after the worker went silent"
    );
    let after = cluster
        .generate(greedy(prompt, 12))
        .expect("after the stop");
    assert_eq!(ids_and_logprobs(&after), before);
    assert_eq!(cluster.status().workers.len(), 2);

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
