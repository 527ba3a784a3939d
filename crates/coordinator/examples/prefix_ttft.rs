//! Time to first token with a shared ~1,000-token chat system prompt, prefix cache off and
//! on: the figure behind prefix caching (issue 12, item 4). Not a test (nothing is asserted
//! about time); run it by hand, in release:
//!
//! ```sh
//! cargo run --release -p tessera-coordinator --example prefix_ttft
//! ```
//!
//! For each setting it starts an in-process coordinator and one worker (all cores) serving
//! the real SmolLM2 model, warms it up with an unrelated prompt, then sends chat requests
//! that share one long system message and differ in the user's question, one after another,
//! and prints each one's time to first token as the coordinator measured it (from receipt to
//! the first sampled token) and as the client saw it.
//!
//! Measured on a 2-core machine shared with other builds (release, 1,026 prompt tokens):
//! with the cache off every request takes ~2.8–2.9 s to its first token; with it on, the
//! first takes ~2.9 s and the next ones 73–88 ms (33–39× faster): only the tokens after the
//! last shared block are prefilled.

use std::path::PathBuf;
use std::time::{Duration, Instant};

#[path = "../tests/common/mod.rs"]
mod common;

use common::{Coordinator, WAIT, wait_ready};
use tessera_coordinator::CoordinatorConfig;
use tessera_proto::v1 as pb;

/// A system message of about 1,000 tokens.
fn system_prompt() -> String {
    let mut s = String::from(
        "You are the support assistant of a small bicycle shop. Follow these house rules.\n",
    );
    let topics = [
        "opening hours",
        "repairs",
        "returns",
        "rentals",
        "warranty",
        "payments",
        "deliveries",
        "spare parts",
        "safety checks",
        "children's bikes",
        "electric bikes",
        "tyres",
        "brakes",
        "gears",
        "lights",
        "locks",
        "helmets",
        "saddles",
        "wheels",
        "chains",
        "frames",
        "pedals",
        "bells",
        "baskets",
        "mudguards",
        "racks",
        "trailers",
    ];
    for (i, t) in topics.iter().enumerate() {
        s.push_str(&format!(
            "Rule {}: when a customer asks about {t}, answer in two short sentences, mention \
             the shop's policy on {t} only when asked, and never promise a date.\n",
            i + 1
        ));
    }
    s
}

fn chat(system: &str, question: &str) -> pb::GenerateRequest {
    let msg = |role: &str, content: &str| pb::ChatMessage {
        role: role.into(),
        content: content.into(),
    };
    pb::GenerateRequest {
        prompt: Some(pb::generate_request::Prompt::Chat(pb::ChatMessages {
            messages: vec![msg("system", system), msg("user", question)],
        })),
        sampling: Some(pb::SamplingParams {
            temperature: Some(0.0),
            ..Default::default()
        }),
        stop: Some(pb::StopConditions {
            max_tokens: Some(4),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Sends `req`; returns (prompt tokens, server TTFT ms, client TTFT ms).
async fn ttft(
    client: &mut pb::inference_client::InferenceClient<tonic::transport::Channel>,
    req: pb::GenerateRequest,
) -> (u32, f64, f64) {
    let sent = Instant::now();
    let mut stream = client.generate(req).await.expect("generate").into_inner();
    let mut first = None;
    loop {
        let ev = tokio::time::timeout(WAIT, stream.message())
            .await
            .expect("event in time")
            .expect("no error")
            .expect("a Finished event");
        match ev.event {
            Some(pb::generate_event::Event::Token(_)) => {
                first.get_or_insert_with(|| sent.elapsed());
            }
            Some(pb::generate_event::Event::Finished(f)) => {
                let u = f.usage.expect("usage");
                let client_ms = first.unwrap_or_default().as_secs_f64() * 1e3;
                return (u.prompt_tokens, u.time_to_first_token_ms, client_ms);
            }
            None => {}
        }
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let Some(path) = tessera_testkit::smollm2_gguf() else {
        eprintln!("the real model is needed: tessera model pull smollm2-135m-instruct");
        std::process::exit(2);
    };
    let system = system_prompt();
    let questions = [
        "Do you repair electric bikes?",
        "How much is a rental for a day?",
        "Can I return a helmet?",
        "Which lights do you sell?",
    ];
    for on in [false, true] {
        let coord = Coordinator::start(CoordinatorConfig {
            model: PathBuf::from(&path).display().to_string(),
            heartbeat_interval: Duration::from_millis(200),
            heartbeat_timeout: Duration::from_secs(2),
            min_workers: 1,
            kv_tokens: 8192,
            ready_wait: WAIT,
            prefix_cache: on,
            ..CoordinatorConfig::default()
        })
        .await;
        let workers = vec![coord.start_worker(0, 0, "w").await];
        let mut client = coord.client().await;
        wait_ready(&mut client, 1).await;
        // Warm up (pages in the weights, starts the pool) on a prompt sharing nothing.
        ttft(&mut client, chat("Be brief.", "Hi")).await;
        println!("prefix cache {}:", if on { "on" } else { "off" });
        let mut first_ms = 0.0;
        for (i, q) in questions.iter().enumerate() {
            let (tokens, server, client_ms) = ttft(&mut client, chat(&system, q)).await;
            if i == 0 {
                first_ms = server;
            }
            println!(
                "  request {}: {tokens} prompt tokens, TTFT {server:.1} ms (client {client_ms:.1} \
                 ms), {:.1}x faster than the first",
                i + 1,
                first_ms / server
            );
        }
        coord.stop(workers).await;
    }
}
