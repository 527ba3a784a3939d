//! The official `openai` Python client (a pinned release, from examples/python/requirements.txt)
//! against a three-coordinator cluster of `tessera` processes, through a follower: chat and
//! completions, streamed and not, give the gRPC API's greedy text.

use std::process::Command;
use std::time::Duration;

use tessera_proto::v1 as pb;
use tessera_testkit::{RaftCluster, Tessera, collect_finished, greedy, python, smollm2_arg};

/// The `tessera` binary under test.
fn tessera() -> Tessera {
    Tessera::new(env!("CARGO_BIN_EXE_tessera"))
}

const QUESTION: &str = "What is the capital of France?";
const PROMPT: &str = "The capital of France is";
const MAX_TOKENS: u32 = 12;

/// The gRPC API's greedy text for `req` on coordinator `i`, held-back tail included, and its
/// usage.
fn grpc_text(c: &RaftCluster, i: usize, req: pb::GenerateRequest) -> (String, pb::Usage) {
    let mut client = c.client(i);
    let got =
        c.rt.block_on(collect_finished(
            &mut client,
            req,
            Some(Duration::from_secs(60)),
        ))
        .expect("gRPC generate");
    let mut text: String = got.tokens.iter().map(|t| t.text.as_str()).collect();
    text.push_str(&got.finished.text);
    (text, got.finished.usage.expect("usage"))
}

/// Ensures that the official `openai` client, through a follower of a three-coordinator
/// cluster, gets the same text as the gRPC API for greedy chat and completion requests,
/// streamed and not, with OpenAI's usage and finish reasons, and that it reads the
/// server's errors as the right exception with the field named.
#[test]
fn openai_python_client_through_a_follower() {
    let Some(model) = smollm2_arg() else { return };
    let Some(python) = python() else { return };
    let c = RaftCluster::start(&tessera(), &model, "openai", 1);
    let (_, leader) = c.wait_ready(0, Duration::from_secs(180));
    let follower = (leader + 1) % 3;
    let chat = pb::GenerateRequest {
        prompt: Some(pb::generate_request::Prompt::Chat(pb::ChatMessages {
            messages: vec![pb::ChatMessage {
                role: "user".into(),
                content: QUESTION.into(),
            }],
        })),
        ..greedy("", MAX_TOKENS)
    };
    let (want_chat, usage) = grpc_text(&c, leader, chat);
    let (want_text, _) = grpc_text(&c, leader, greedy(PROMPT, MAX_TOKENS));
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/openai_client.py");
    let base_url = format!("http://{}/v1", c.http_addrs[follower]);
    let out = Command::new(&python)
        .arg(&script)
        .args([base_url.as_str(), "none", model.as_str()])
        .output()
        .expect("run the openai client");
    assert!(
        out.status.success(),
        "openai client failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("the script prints JSON");
    assert_eq!(got["chat"], want_chat.as_str(), "{got}");
    assert_eq!(got["chat_stream"], want_chat.as_str(), "{got}");
    assert_eq!(got["completion"], want_text.as_str(), "{got}");
    assert_eq!(got["completion_stream"], want_text.as_str(), "{got}");
    let done = if usage.completion_tokens == MAX_TOKENS {
        "length"
    } else {
        "stop"
    };
    assert_eq!(got["chat_finish"], done, "{got}");
    assert_eq!(got["chat_stream_finish"], done, "{got}");
    let total = usage.prompt_tokens + usage.completion_tokens;
    assert_eq!(
        got["chat_usage"],
        serde_json::json!([usage.prompt_tokens, usage.completion_tokens, total]),
        "{got}"
    );
    assert_eq!(
        got["chat_stream_usage"],
        serde_json::json!([usage.prompt_tokens, usage.completion_tokens]),
        "{got}"
    );
    assert_eq!(got["models"], serde_json::json!([model]), "{got}");
    assert_eq!(got["bad_temperature"], "temperature", "{got}");
}
