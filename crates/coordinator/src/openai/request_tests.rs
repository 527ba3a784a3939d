use serde_json::json;
use tessera_proto::v1 as pb;

use super::*;

const MODEL: &str = "smollm2-135m-instruct";

fn chat_of(v: serde_json::Value) -> Result<ValidCompletion, ApiError> {
    chat(&Body::parse(v.to_string().as_bytes())?, MODEL)
}

fn completions_of(v: serde_json::Value) -> Result<ValidCompletion, ApiError> {
    completions(&Body::parse(v.to_string().as_bytes())?, MODEL)
}

/// Ensures that a full chat body becomes one request per choice with every field carried
/// over in the proto's terms, seeds spread over the choices.
#[test]
fn chat_body_maps_to_generate_requests() {
    let v = chat_of(json!({
        "model": MODEL,
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]}
        ],
        "temperature": 0.5, "top_p": 0.9, "n": 2, "seed": 7, "stop": "\n",
        "max_completion_tokens": 12, "max_tokens": 99, "presence_penalty": 0.5,
        "logprobs": true, "top_logprobs": 3, "stream": true,
        "stream_options": {"include_usage": true}, "user": "ignored", "top_k": 40
    }))
    .expect("valid");
    assert!(v.stream && v.include_usage);
    assert_eq!(v.logprobs, Some(3));
    assert_eq!(v.choices.len(), 2);
    let r = &v.choices[1];
    let Some(pb::generate_request::Prompt::Chat(c)) = &r.prompt else {
        panic!("chat prompt expected");
    };
    assert_eq!(c.messages[1].content, "Hi there");
    let s = r.sampling.expect("sampling");
    assert_eq!(
        (s.temperature, s.top_p, s.top_k, s.seed),
        (Some(0.5), Some(0.9), 40, Some(8))
    );
    assert_eq!(s.presence_penalty, 0.5);
    let stop = r.stop.clone().expect("stop");
    assert_eq!(stop.max_tokens, Some(12), "max_completion_tokens wins");
    assert_eq!(stop.stop, vec!["\n".to_owned()]);
    assert!(r.logprobs && r.top_logprobs == 3);
    assert_eq!(v.choices[0].sampling.and_then(|s| s.seed), Some(7));
}

/// Ensures that each bad chat field is refused with 400 naming it in OpenAI's spelling, and
/// another model with 404.
#[test]
fn chat_errors_name_the_field() {
    let base = || json!({"messages": [{"role": "user", "content": "hi"}]});
    let with = |k: &str, val: serde_json::Value| {
        let mut b = base();
        b[k] = val;
        b
    };
    let table = [
        (json!({}), "messages"),
        (json!({"messages": []}), "messages"),
        (json!({"messages": [{"content": "x"}]}), "messages[0].role"),
        (
            json!({"messages": [{"role": "user"}]}),
            "messages[0].content",
        ),
        (
            json!({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
            "messages[0].content[0].type",
        ),
        (with("temperature", json!(2.5)), "temperature"),
        (with("temperature", json!("hot")), "temperature"),
        (with("n", json!(0)), "n"),
        (with("n", json!(17)), "n"),
        (with("max_tokens", json!(-1)), "max_tokens"),
        (with("stop", json!([1])), "stop[0]"),
        (with("tools", json!([{"type": "function"}])), "tools"),
        (with("logit_bias", json!({"50256": -100})), "logit_bias"),
        (
            with("response_format", json!({"type": "json_object"})),
            "response_format",
        ),
        (with("top_logprobs", json!(2)), "top_logprobs"),
        (
            with("stream_options", json!({"include_usage": true})),
            "stream_options",
        ),
        (with("seed", json!(1.5)), "seed"),
    ];
    for (body, param) in table {
        let e = chat_of(body.clone()).expect_err(&body.to_string());
        assert_eq!(e.status.as_u16(), 400, "{body}");
        assert_eq!(e.param.as_deref(), Some(param), "{body}: {}", e.message);
        assert!(
            e.message.starts_with(&format!("{param}: ")),
            "{}",
            e.message
        );
    }
    let e = chat_of(with("model", json!("gpt-4o"))).expect_err("other model");
    assert_eq!((e.status.as_u16(), e.code), (404, Some("model_not_found")));
    // A 20 KB name is not echoed whole.
    let e = chat_of(with("model", json!("m".repeat(20_000)))).expect_err("long model");
    assert_eq!(e.status.as_u16(), 404);
    assert!(e.message.len() < 300, "{} bytes", e.message.len());
    assert_eq!(
        Body::parse(b"[1]").err().and_then(|e| e.param),
        Some("body".into())
    );
    assert_eq!(
        Body::parse(b"{").err().and_then(|e| e.param),
        Some("body".into())
    );
}

/// Ensures that nulls count as absent and that `tool_choice: "none"` and a text response
/// format are accepted, as SDKs send them.
#[test]
fn chat_accepts_what_sdks_send_by_default() {
    let v = chat_of(json!({
        "messages": [{"role": "user", "content": "hi"}],
        "temperature": null, "tools": [], "tool_choice": "none",
        "response_format": {"type": "text"}, "logprobs": false, "top_logprobs": 0
    }))
    .expect("valid");
    assert_eq!(v.choices.len(), 1);
    assert_eq!(v.logprobs, None);
    assert_eq!(v.choices[0].stop.as_ref().and_then(|s| s.max_tokens), None);
}

/// Ensures that completions take one or several text prompts (prompt-major choices), default
/// to 16 tokens, read `logprobs` as an integer, and refuse token-id prompts and `echo`.
#[test]
fn completions_body_maps_and_refuses() {
    let v = completions_of(json!({"prompt": ["a", "b"], "n": 2, "logprobs": 2})).expect("valid");
    assert_eq!(v.choices.len(), 4);
    let texts: Vec<_> = v
        .choices
        .iter()
        .map(|r| match &r.prompt {
            Some(pb::generate_request::Prompt::Text(t)) => t.clone(),
            _ => String::new(),
        })
        .collect();
    assert_eq!(texts, ["a", "a", "b", "b"]);
    assert_eq!(v.logprobs, Some(2));
    assert_eq!(
        v.choices[0].stop.as_ref().and_then(|s| s.max_tokens),
        Some(COMPLETIONS_DEFAULT_MAX_TOKENS)
    );
    for (body, param) in [
        (json!({}), "prompt"),
        (json!({"prompt": [1, 2]}), "prompt[0]"),
        (json!({"prompt": "x", "echo": true}), "echo"),
        (json!({"prompt": "x", "logprobs": 6}), "logprobs"),
        (json!({"prompt": "x", "best_of": 3}), "best_of"),
        (json!({"prompt": vec!["x"; 9], "n": 2}), "prompt"),
    ] {
        let e = completions_of(body.clone()).expect_err(&body.to_string());
        assert_eq!(e.param.as_deref(), Some(param), "{body}: {}", e.message);
    }
}

/// Ensures that `resume` gives each choice its tokens and keeps the response's id, that
/// `return_token_ids` is carried, and that a bad `resume` is refused naming its field.
#[test]
fn resume_carries_each_choice_s_tokens() {
    let v = completions_of(json!({
        "prompt": ["a", "b"], "n": 2, "seed": 5, "stream": true, "return_token_ids": true,
        "resume": {"id": "cmpl-00ab", "token_ids": [[1, 2], [], [3], [4, 5, 6]]}
    }))
    .expect("valid");
    assert!(v.token_ids);
    assert_eq!(v.seed, Some(5));
    assert_eq!(v.resume_id.as_deref(), Some("cmpl-00ab"));
    let tokens: Vec<Vec<u32>> = v
        .choices
        .iter()
        .map(|c| c.resume.clone().map(|r| r.tokens).unwrap_or_default())
        .collect();
    assert_eq!(tokens, vec![vec![1, 2], vec![], vec![3], vec![4, 5, 6]]);
    let fresh = chat_of(json!({"messages": [{"role": "user", "content": "hi"}]})).expect("valid");
    assert!(!fresh.token_ids && fresh.resume_id.is_none() && fresh.seed.is_none());
    assert!(fresh.choices[0].resume.is_none());

    let chat_resume = |resume: serde_json::Value, seed: Option<u64>| {
        let mut b = json!({"messages": [{"role": "user", "content": "hi"}], "resume": resume});
        if let Some(s) = seed {
            b["seed"] = json!(s);
        }
        chat_of(b)
    };
    let ok = chat_resume(json!({"id": "chatcmpl-1f", "token_ids": [[7]]}), Some(1));
    assert_eq!(
        ok.expect("valid").choices[0]
            .resume
            .clone()
            .map(|r| r.tokens),
        Some(vec![7])
    );
    let table = [
        (
            json!({"id": "chatcmpl-1f", "token_ids": [[7]]}),
            None,
            "seed",
        ),
        (json!("chatcmpl-1f"), Some(1), "resume"),
        (json!({"token_ids": [[7]]}), Some(1), "resume.id"),
        // Another endpoint's id, an id with other characters, an empty one.
        (
            json!({"id": "cmpl-1f", "token_ids": [[7]]}),
            Some(1),
            "resume.id",
        ),
        (
            json!({"id": "chatcmpl-1f/../x", "token_ids": [[7]]}),
            Some(1),
            "resume.id",
        ),
        (
            json!({"id": "chatcmpl-", "token_ids": [[7]]}),
            Some(1),
            "resume.id",
        ),
        (json!({"id": "chatcmpl-1f"}), Some(1), "resume.token_ids"),
        (
            json!({"id": "chatcmpl-1f", "token_ids": [[7], [8]]}),
            Some(1),
            "resume.token_ids",
        ),
        (
            json!({"id": "chatcmpl-1f", "token_ids": [7]}),
            Some(1),
            "resume.token_ids[0]",
        ),
        (
            json!({"id": "chatcmpl-1f", "token_ids": [[-1]]}),
            Some(1),
            "resume.token_ids[0]",
        ),
    ];
    for (resume, seed, param) in table {
        let e = chat_resume(resume.clone(), seed).expect_err(&resume.to_string());
        assert_eq!(e.status.as_u16(), 400, "{resume}");
        assert_eq!(e.param.as_deref(), Some(param), "{resume}: {}", e.message);
    }
}
