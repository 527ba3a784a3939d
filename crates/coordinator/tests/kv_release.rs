//! No request leaves KV behind: in one process, a coordinator and two real workers (two
//! pipeline stages) serving the real SmolLM2 model, requests ending every way a request can
//! end (length, stop string, cancelled before and after the first token, refused), one after
//! another and at once; then every worker's live sequences and KV blocks in use are 0.
//!
//! This is the test the KV leak of issue 12 lacked: the scheduler put each finished request's
//! release on the next step, and when no next step came (the cluster went idle) the release
//! was dropped with an empty step, so every request that finished last stayed live on every
//! worker.

use std::path::PathBuf;
use std::time::Duration;

mod common;
mod two_stages;

use common::WAIT;
use tessera_coordinator::CoordinatorConfig;
use tessera_proto::v1 as pb;
use tessera_proto::v1::inference_client::InferenceClient;
use tessera_testkit::greedy_exact;
use tonic::transport::Channel;
use two_stages::{TwoStages, settle};

const KV_TOKENS: u32 = 1024;
/// How long the workers get to free what the last requests held.
const SETTLE: Duration = Duration::from_secs(10);

const PROMPT: &str = "The capital of France is";

/// How a request is to end.
#[derive(Clone, Copy, Debug)]
enum Ending {
    /// At `max_tokens`.
    Length,
    /// At a stop string (a space: greedy text has one within a few tokens).
    Stop,
    /// The client drops the stream right after sending.
    CancelEarly,
    /// The client drops the stream after the first token.
    CancelAfterFirst,
    /// Refused by validation (a negative temperature).
    Refused,
}

const ENDINGS: [Ending; 5] = [
    Ending::Length,
    Ending::Stop,
    Ending::CancelEarly,
    Ending::CancelAfterFirst,
    Ending::Refused,
];

/// Runs one request to the ending it is meant to have, and checks that it had it.
async fn run(client: &mut InferenceClient<Channel>, ending: Ending) {
    let mut req = greedy_exact(PROMPT, 12);
    match ending {
        Ending::Stop => {
            if let Some(stop) = req.stop.as_mut() {
                stop.max_tokens = Some(64);
                stop.stop = vec![" ".into()];
            }
        }
        Ending::Refused => {
            req.sampling = Some(pb::SamplingParams {
                temperature: Some(-1.0),
                ..Default::default()
            });
        }
        _ => {}
    }
    let started = client.generate(req).await;
    if let Ending::Refused = ending {
        let err = started.expect_err("a negative temperature is refused");
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
        return;
    }
    let mut stream = started.expect("generate").into_inner();
    if let Ending::CancelEarly = ending {
        return;
    }
    let mut tokens = 0;
    loop {
        let ev = tokio::time::timeout(WAIT, stream.message())
            .await
            .expect("an event in time")
            .expect("no error")
            .expect("a Finished event before the stream ends");
        match ev.event.expect("event") {
            pb::generate_event::Event::Token(_) => {
                tokens += 1;
                if let Ending::CancelAfterFirst = ending {
                    return;
                }
            }
            pb::generate_event::Event::Finished(f) => {
                let want = match ending {
                    Ending::Stop => pb::FinishReason::Stop,
                    _ => pb::FinishReason::Length,
                };
                assert_eq!(f.reason(), want, "{ending:?} after {tokens} tokens");
                return;
            }
        }
    }
}

/// Ensures that after requests of every ending, sequential and concurrent, every worker's
/// live sequences and KV blocks in use return to 0 within a few seconds of the last one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_ending_frees_its_kv_on_every_worker() {
    let Some(path) = tessera_testkit::smollm2_gguf() else {
        return;
    };
    let TwoStages {
        coord,
        workers,
        mut client,
    } = two_stages::start(CoordinatorConfig {
        model: PathBuf::from(&path).display().to_string(),
        heartbeat_interval: Duration::from_millis(200),
        heartbeat_timeout: Duration::from_secs(2),
        kv_tokens: KV_TOKENS,
        ready_wait: WAIT,
        ..CoordinatorConfig::default()
    })
    .await;

    // Sequential: each ending alone, twice over, so the last request of each round finishes
    // with nothing behind it.
    for _ in 0..2 {
        for ending in ENDINGS {
            run(&mut client, ending).await;
        }
    }
    // Concurrent: every ending at once, batched into shared steps.
    let mut tasks = Vec::new();
    for i in 0..10 {
        let mut c = client.clone();
        tasks.push(tokio::spawn(async move {
            run(&mut c, ENDINGS[i % ENDINGS.len()]).await;
        }));
    }
    for t in tasks {
        t.await.expect("request task");
    }

    // Every block is free again: the prefix cache (on by default) caches none of these
    // prompts, which are shorter than one block.
    let status = settle(&workers, SETTLE).await;
    assert!(status.iter().all(|s| s.cached_kv_blocks == 0), "{status:?}");
    // Nothing was lost on the way: one more request is served normally.
    run(&mut client, Ending::Length).await;

    coord.stop(workers).await;
}
