//! The OpenAI-compatible HTTP API end to end, in one process: a coordinator (HTTP port, API
//! keys) and a real worker serving SmolLM2. What the HTTP API answers is held against what the
//! gRPC API answers for the same request; keys, limits and the bounded queue are checked on
//! both doors.

use std::time::{Duration, Instant};

mod common;

use common::{Coordinator, wait_ready};
use serde_json::{Value, json};
use tessera_coordinator::CoordinatorConfig;
use tessera_coordinator::validate::Limits;
use tessera_proto::v1 as pb;
use tessera_proto::v1::inference_client::InferenceClient;
use tessera_testkit::http::{self, HttpResponse};
use tessera_testkit::{greedy, greedy_with_logprobs};
use tonic::transport::Channel;

const KEY: &str = "sk-test-0123";
const BEARER: &str = "Bearer sk-test-0123";
const MAX_TOKENS: u32 = 12;

/// The real model's path, or `None` (the test returns; the kit panics instead under CI).
fn model() -> Option<String> {
    tessera_testkit::smollm2_arg()
}

/// `request` with the API key in its metadata.
fn keyed<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut()
        .insert("authorization", BEARER.parse().expect("ascii"));
    r
}

/// The gRPC API's text (tokens' text plus the held-back tail), tokens and usage for `req`.
async fn grpc(
    client: &mut InferenceClient<Channel>,
    req: pb::GenerateRequest,
) -> (String, Vec<pb::TokenEvent>, pb::Finished) {
    let mut stream = client.generate(req).await.expect("generate").into_inner();
    let (mut text, mut tokens) = (String::new(), Vec::new());
    while let Some(ev) = stream.message().await.expect("event") {
        match ev.event {
            Some(pb::generate_event::Event::Token(t)) => {
                text.push_str(&t.text);
                tokens.push(t);
            }
            Some(pb::generate_event::Event::Finished(f)) => {
                text.push_str(&f.text);
                return (text, tokens, f);
            }
            None => {}
        }
    }
    panic!("stream ended without Finished");
}

/// A chat request of one user message, as gRPC.
fn chat_grpc(content: &str, max_tokens: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        prompt: Some(pb::generate_request::Prompt::Chat(pb::ChatMessages {
            messages: vec![pb::ChatMessage {
                role: "user".into(),
                content: content.into(),
            }],
        })),
        ..greedy("", max_tokens)
    }
}

/// Runs a blocking HTTP call off the runtime.
async fn call<F: FnOnce() -> HttpResponse + Send + 'static>(f: F) -> HttpResponse {
    tokio::task::spawn_blocking(f).await.expect("http task")
}

async fn post(
    addr: &str,
    path: &'static str,
    auth: Option<&'static str>,
    body: Value,
) -> HttpResponse {
    let addr = addr.to_owned();
    call(move || {
        let headers: Vec<(&str, &str)> = auth.map(|a| ("Authorization", a)).into_iter().collect();
        http::post_json(&addr, path, &headers, &body)
    })
    .await
}

async fn get(addr: &str, path: &'static str, auth: Option<&'static str>) -> HttpResponse {
    let addr = addr.to_owned();
    call(move || {
        let headers: Vec<(&str, &str)> = auth.map(|a| ("Authorization", a)).into_iter().collect();
        http::get(&addr, path, &headers)
    })
    .await
}

/// The concatenated text of a stream's chunks (chat deltas or completion texts), checking
/// that it ends with `[DONE]` and every other event is a chunk of `object`.
fn stream_text(r: &HttpResponse, object: &str) -> (String, Vec<Value>) {
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(
        r.header("content-type")
            .is_some_and(|c| c.starts_with("text/event-stream")),
        "{:?}",
        r.headers
    );
    let events = r.events();
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{events:?}"
    );
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).expect("chunk JSON"))
        .collect();
    let mut text = String::new();
    for c in &chunks {
        assert_eq!(c["object"], object, "{c}");
        for choice in c["choices"].as_array().expect("choices") {
            let piece = choice["delta"]["content"]
                .as_str()
                .or(choice["text"].as_str());
            text.push_str(piece.unwrap_or(""));
        }
    }
    (text, chunks)
}

/// Ensures that API keys guard both doors — `/v1` answers 401 with OpenAI's
/// `invalid_api_key` and gRPC UNAUTHENTICATED without a valid key, for generation and status
/// alike — while HTTP `/health` and `/ready` and gRPC health stay open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_guard_both_doors_but_not_health() {
    let Some(model) = model() else { return };
    let c = Coordinator::start(CoordinatorConfig {
        model: model.clone(),
        api_keys: vec!["other-key".into(), KEY.into()],
        ..CoordinatorConfig::default()
    })
    .await;
    let h = c.http_addr.clone();
    assert_eq!(get(&h, "/health", None).await.status, 200);
    // No worker: not ready, and saying why, without a key.
    let not_ready = get(&h, "/ready", None).await;
    assert_eq!(not_ready.status, 503, "{}", not_ready.body);
    assert!(not_ready.json()["reason"].is_string(), "{}", not_ready.body);
    for auth in [
        None,
        Some("Bearer nope"),
        Some("sk-test-0123"),
        Some("Basic sk-test-0123"),
    ] {
        let r = get(&h, "/v1/models", auth).await;
        assert_eq!(r.status, 401, "{auth:?}: {}", r.body);
        assert_eq!(r.json()["error"]["code"], "invalid_api_key");
        let r = post(&h, "/v1/completions", auth, json!({"prompt": "x"})).await;
        assert_eq!(r.status, 401, "{auth:?}: {}", r.body);
    }
    let models = get(&h, "/v1/models", Some(BEARER)).await;
    assert_eq!(models.status, 200, "{}", models.body);
    assert_eq!(models.json()["data"][0]["id"], model.as_str());

    let mut client = c.client().await;
    let refused = client.generate(greedy("Hi", 2)).await.expect_err("no key");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    let refused = client
        .cluster_status(pb::ClusterStatusRequest::default())
        .await
        .expect_err("no key");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    let status = client
        .cluster_status(keyed(pb::ClusterStatusRequest::default()))
        .await
        .expect("status with the key");
    assert!(!status.into_inner().ready);
    let channel = Channel::from_shared(format!("http://{}", c.addr))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    let health = tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("gRPC health needs no key");
    assert_eq!(
        health.into_inner().status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    drop(client);
    c.stop(Vec::new()).await;
}

/// Ensures that chat and completions, streamed and whole, give the gRPC API's greedy text
/// with OpenAI's shapes (usage, finish reasons, `[DONE]`, `n` choices, logprobs with token
/// text as gRPC now also gives them), that a stream resumed from its token ids, id and seed
/// continues exactly, and that bad requests get OpenAI error bodies naming the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_api_matches_grpc() {
    let Some(model) = model() else { return };
    let c = Coordinator::start(CoordinatorConfig {
        model: model.clone(),
        kv_tokens: 2048,
        ..CoordinatorConfig::default()
    })
    .await;
    let h = c.http_addr.clone();
    let worker = c.start_worker(0, 1, "w0").await;
    let mut client = c.client().await;
    wait_ready(&mut client, 1).await;
    let ready = get(&h, "/ready", None).await;
    assert_eq!(ready.status, 200, "{}", ready.body);
    assert_eq!(get(&h, "/v1/models/other", None).await.status, 404);
    // The coordinator leads: its listing is confirmed current (ReadIndex).
    let models = get(&h, "/v1/models", None).await;
    assert_eq!(models.json()["data"][0]["ready"], true, "{}", models.body);
    assert_eq!(
        models.header("x-tessera-linearizable"),
        Some("true"),
        "{:?}",
        models.headers
    );

    // Chat, whole and streamed, against gRPC.
    let question = "What is the capital of France?";
    let (want, want_tokens, finished) = grpc(&mut client, chat_grpc(question, MAX_TOKENS)).await;
    assert!(!want.is_empty());
    let body = json!({"model": model, "messages": [{"role": "user", "content": question}],
        "temperature": 0, "max_tokens": MAX_TOKENS});
    let r = post(&h, "/v1/chat/completions", None, body.clone()).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["content"], want.as_str());
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    let usage = finished.usage.expect("usage");
    assert_eq!(v["usage"]["prompt_tokens"], usage.prompt_tokens);
    assert_eq!(v["usage"]["completion_tokens"], want_tokens.len());
    let reason = if want_tokens.len() as u32 == MAX_TOKENS {
        "length"
    } else {
        "stop"
    };
    assert_eq!(v["choices"][0]["finish_reason"], reason);

    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let r = post(&h, "/v1/chat/completions", None, streamed).await;
    let (text, chunks) = stream_text(&r, "chat.completion.chunk");
    assert_eq!(text, want);
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let last = chunks.last().expect("usage chunk");
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"]["completion_tokens"], want_tokens.len());
    let finish = &chunks[chunks.len() - 2]["choices"][0];
    assert_eq!(finish["finish_reason"], reason);

    // Completions, whole with n = 2 and streamed, against gRPC.
    let prompt = "The capital of France is";
    let (want, want_tokens, finished) = grpc(&mut client, greedy(prompt, MAX_TOKENS)).await;
    let body = json!({"prompt": prompt, "temperature": 0, "max_tokens": MAX_TOKENS, "n": 2});
    let r = post(&h, "/v1/completions", None, body).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(v["object"], "text_completion");
    for i in 0..2 {
        assert_eq!(v["choices"][i]["index"], i);
        assert_eq!(v["choices"][i]["text"], want.as_str());
    }
    // The prompt counts once, the completions of both choices.
    let prompt_tokens = finished.usage.expect("usage").prompt_tokens;
    assert_eq!(v["usage"]["prompt_tokens"], prompt_tokens);
    assert_eq!(v["usage"]["completion_tokens"], 2 * want_tokens.len());
    let body =
        json!({"prompt": prompt, "temperature": 0, "max_tokens": MAX_TOKENS, "stream": true});
    let (text, _) = stream_text(
        &post(&h, "/v1/completions", None, body).await,
        "text_completion",
    );
    assert_eq!(text, want);

    // Resumption (what a client does when the coordinator it streams from dies): a sampled,
    // unseeded stream with token ids; the same body again with the seed and id the first
    // response named and its first ids gives exactly the rest of the tokens and text.
    let body = json!({"prompt": prompt, "temperature": 0.8, "max_tokens": MAX_TOKENS,
        "ignore_eos": true, "stream": true, "return_token_ids": true});
    let r = post(&h, "/v1/completions", None, body.clone()).await;
    let id = r.header("x-request-id").expect("id header").to_owned();
    let seed: u64 = r
        .header("x-tessera-seed")
        .expect("seed header")
        .parse()
        .expect("a seed");
    let (text, chunks) = stream_text(&r, "text_completion");
    let token_ids = |chunks: &[Value]| -> Vec<(u64, String)> {
        chunks
            .iter()
            .filter(|c| c["id"] == id.as_str())
            .flat_map(|c| {
                let ids = c["choices"][0]["token_ids"].as_array().cloned();
                let text = c["choices"][0]["text"].as_str().unwrap_or("").to_owned();
                let ids: Vec<u64> = ids
                    .expect("token_ids")
                    .iter()
                    .filter_map(Value::as_u64)
                    .collect();
                // A chunk carries one token, or none (the finishing one, with held-back text).
                assert!(ids.len() <= 1, "{c}");
                ids.into_iter().map(move |i| (i, text.clone()))
            })
            .collect()
    };
    let all = token_ids(&chunks);
    assert_eq!(all.len(), MAX_TOKENS as usize, "{chunks:?}");
    let k = 5;
    let have: Vec<u64> = all[..k].iter().map(|(i, _)| *i).collect();
    let had: String = all[..k].iter().map(|(_, t)| t.as_str()).collect();
    let mut resumed = body.clone();
    resumed["seed"] = json!(seed);
    resumed["resume"] = json!({"id": id, "token_ids": [have]});
    let r = post(&h, "/v1/completions", None, resumed).await;
    assert_eq!(r.header("x-request-id"), Some(id.as_str()));
    let (rest_text, rest) = stream_text(&r, "text_completion");
    let rest_ids: Vec<u64> = token_ids(&rest).into_iter().map(|(i, _)| i).collect();
    let all_ids: Vec<u64> = all.iter().map(|(i, _)| *i).collect();
    assert_eq!(
        [have, rest_ids].concat(),
        all_ids,
        "the resumed tokens differ"
    );
    assert_eq!(had + &rest_text, text, "the resumed text differs");

    // Logprobs with token text, equal to gRPC's.
    let (_, lp_tokens, _) = grpc(&mut client, greedy_with_logprobs(prompt, 4, 2)).await;
    let body = json!({"prompt": prompt, "temperature": 0, "max_tokens": 4, "logprobs": 2});
    let v = post(&h, "/v1/completions", None, body).await.json();
    let lp = &v["choices"][0]["logprobs"];
    assert_eq!(
        lp["tokens"].as_array().map(Vec::len),
        Some(lp_tokens.len()),
        "{v}"
    );
    for (i, t) in lp_tokens.iter().enumerate() {
        assert!(!t.token_text.is_empty(), "gRPC gives token text: {t:?}");
        assert_eq!(lp["tokens"][i], t.token_text.as_str());
        assert_eq!(t.top_logprobs.len(), 2);
        assert!(t.top_logprobs.iter().all(|a| !a.bytes.is_empty()));
        let got = lp["token_logprobs"][i].as_f64().expect("logprob");
        assert!((got - f64::from(t.logprob.expect("logprob"))).abs() < 1e-6);
        assert_eq!(lp["top_logprobs"][i].as_object().map(|o| o.len()), Some(2));
    }
    let body = json!({"messages": [{"role": "user", "content": question}], "temperature": 0,
        "max_tokens": 3, "logprobs": true, "top_logprobs": 2});
    let v = post(&h, "/v1/chat/completions", None, body).await.json();
    let content = v["choices"][0]["logprobs"]["content"]
        .as_array()
        .expect("content")
        .clone();
    assert_eq!(content.len(), 3, "{v}");
    for entry in content {
        assert!(
            entry["token"].is_string() && entry["bytes"].is_array(),
            "{entry}"
        );
        assert_eq!(
            entry["top_logprobs"].as_array().map(Vec::len),
            Some(2),
            "{entry}"
        );
    }

    // Bad requests: OpenAI error bodies naming the field.
    let bad = [
        (
            json!({"messages": [{"role": "user", "content": "x"}], "temperature": 5}),
            400,
            "temperature",
        ),
        (
            json!({"messages": [{"role": "user", "content": "x"}], "top_p": 0}),
            400,
            "top_p",
        ),
        (
            json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 100000}),
            400,
            "max_tokens",
        ),
        (
            json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]}),
            404,
            "model",
        ),
        (json!({"messages": "x"}), 400, "messages"),
    ];
    for (body, status, param) in bad {
        let r = post(&h, "/v1/chat/completions", None, body.clone()).await;
        assert_eq!(r.status, status, "{body}: {}", r.body);
        assert_eq!(r.json()["error"]["param"], param, "{body}: {}", r.body);
    }
    let r = get(&h, "/v2/nothing", None).await;
    assert_eq!(
        (r.status, r.json()["error"]["code"].clone()),
        (404, json!("unknown_url"))
    );
    drop(client);
    c.stop(vec![worker]).await;
}

/// Ensures that with no plan serving, a full queue refuses with RESOURCE_EXHAUSTED / 429 and a
/// retry hint, that an abandoned request gives its place back, and that an oversized prompt
/// is refused by size on both APIs, before tokenization.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_and_oversized_prompts_are_refused() {
    let Some(model) = model() else { return };
    let c = Coordinator::start(CoordinatorConfig {
        model,
        max_queued: 1,
        limits: Limits {
            max_prompt_bytes: 1000,
            max_messages: 4,
        },
        ready_wait: Duration::from_secs(60),
        ..CoordinatorConfig::default()
    })
    .await;
    let h = c.http_addr.clone();
    let mut client = c.client().await;
    // No worker: the first request waits in the queue.
    let waiting = client.generate(greedy("Hello", 4)).await.expect("queued");
    let full = client
        .generate(greedy("Hello", 4))
        .await
        .expect_err("queue full");
    assert_eq!(full.code(), tonic::Code::ResourceExhausted, "{full:?}");
    assert_eq!(
        full.metadata()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("1")
    );
    let r = post(
        &h,
        "/v1/chat/completions",
        None,
        json!({"messages": [{"role": "user", "content": "Hello"}]}),
    )
    .await;
    assert_eq!(r.status, 429, "{}", r.body);
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_eq!(r.json()["error"]["type"], "rate_limit_error");
    // The client that waited goes away: its place frees up.
    drop(waiting);
    let deadline = Instant::now() + Duration::from_secs(10);
    let _second = loop {
        match client.generate(greedy("Hello", 4)).await {
            Ok(s) => break s,
            Err(e) if e.code() == tonic::Code::ResourceExhausted && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("the abandoned request's place was not freed: {e:?}"),
        }
    };

    // Too big: refused by size, naming the field.
    let long = "x".repeat(1001);
    let e = client
        .generate(greedy(&long, 4))
        .await
        .expect_err("too long");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(
        e.message().starts_with("prompt: 1001 bytes"),
        "{}",
        e.message()
    );
    let r = post(&h, "/v1/completions", None, json!({"prompt": long})).await;
    assert_eq!(
        (r.status, r.json()["error"]["param"].clone()),
        (400, json!("prompt")),
        "{}",
        r.body
    );
    let five = vec![json!({"role": "user", "content": "x"}); 5];
    let r = post(&h, "/v1/chat/completions", None, json!({"messages": five})).await;
    assert_eq!(
        (r.status, r.json()["error"]["param"].clone()),
        (400, json!("messages")),
        "{}",
        r.body
    );
    let huge = json!({"prompt": "y".repeat(200_000)});
    let r = post(&h, "/v1/completions", None, huge).await;
    assert_eq!(r.status, 413, "{}", r.body);
    drop(client);
    drop(_second);
    c.stop(Vec::new()).await;
}

/// Ensures that gRPC deadlines are honoured on the server: a request that waits past its
/// deadline gives its queue place back (the next is admitted to the queue of one), and a
/// generation that runs past it ends with DEADLINE_EXCEEDED at about the deadline, not when
/// it would have finished.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_deadlines_are_honoured() {
    let Some(model) = model() else { return };
    let c = Coordinator::start(CoordinatorConfig {
        model,
        max_queued: 1,
        ready_wait: Duration::from_secs(60),
        ..CoordinatorConfig::default()
    })
    .await;
    let mut client = c.client().await;
    let run = |mut client: InferenceClient<Channel>,
               req: pb::GenerateRequest,
               deadline: Duration| async move {
        let mut req = tonic::Request::new(req);
        req.set_timeout(deadline);
        let started = Instant::now();
        let mut stream = client.generate(req).await?.into_inner();
        while stream.message().await?.is_some() {}
        Ok::<_, tonic::Status>(started.elapsed())
    };
    // No worker: it waits in the queue until its deadline. (Before any response headers the
    // client's own timer may end the call first: tonic reports that as CANCELLED "Timeout
    // expired".)
    let started = Instant::now();
    let e = run(
        client.clone(),
        greedy("Hello", 4),
        Duration::from_millis(500),
    )
    .await
    .expect_err("cannot finish");
    assert!(
        matches!(
            e.code(),
            tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
        ),
        "{e:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    // Its place in the queue of one is given back.
    let deadline = Instant::now() + Duration::from_secs(5);
    let waiting = loop {
        match client.generate(greedy("Hello", 4)).await {
            Ok(s) => break s,
            Err(e) if e.code() == tonic::Code::ResourceExhausted && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("the expired request kept its place: {e:?}"),
        }
    };
    drop(waiting);

    // A generation far longer than its deadline ends at the deadline, by the server.
    let worker = c.start_worker(0, 1, "w0").await;
    wait_ready(&mut client, 1).await;
    let e = run(
        client.clone(),
        tessera_testkit::story(2000),
        Duration::from_secs(2),
    )
    .await
    .expect_err("cannot finish 2000 tokens in 2 s");
    assert_eq!(e.code(), tonic::Code::DeadlineExceeded, "{e:?}");
    drop(client);
    c.stop(vec![worker]).await;
}
