//! Validation of generate requests against the real model's tokenizer: every bad input the
//! issue lists fails with INVALID_ARGUMENT naming the field's proto path, and defaults are
//! filled in as the proto documents.

use std::time::Instant;

use tessera_coordinator::validate::{DEFAULT_MAX_TOKENS, Validator};
use tessera_hub::ModelLocation;
use tessera_proto::v1 as pb;
use tessera_text::frontend::Frontend;

const MODEL: &str = "smollm2-135m-instruct";

fn validator(context: usize) -> Option<Validator> {
    let path = tessera_testkit::smollm2_gguf()?;
    let frontend = Frontend::open(&ModelLocation::Gguf(path)).expect("frontend");
    Some(Validator::new(frontend, MODEL, context))
}

fn text(t: &str) -> pb::GenerateRequest {
    pb::GenerateRequest {
        prompt: Some(pb::generate_request::Prompt::Text(t.into())),
        ..Default::default()
    }
}

fn rejected(v: &Validator, req: pb::GenerateRequest) -> String {
    let e = v
        .validate(req, Instant::now())
        .expect_err("must be rejected");
    let s = tonic::Status::from(e);
    assert_eq!(s.code(), tonic::Code::InvalidArgument, "{s:?}");
    s.message().to_owned()
}

/// Ensures that each bad input of the issue is rejected naming its field.
#[test]
fn bad_inputs_name_their_field() {
    let Some(v) = validator(8192) else { return };
    let sampling = |s: pb::SamplingParams| pb::GenerateRequest {
        sampling: Some(s),
        ..text("Hello")
    };
    let stop = |m: u32| pb::GenerateRequest {
        stop: Some(pb::StopConditions {
            max_tokens: Some(m),
            ..Default::default()
        }),
        ..text("Hello")
    };
    let cases: Vec<(pb::GenerateRequest, &str)> = vec![
        (text(""), "prompt: "),
        (pb::GenerateRequest::default(), "prompt: "),
        (
            sampling(pb::SamplingParams {
                temperature: Some(-0.5),
                ..Default::default()
            }),
            "sampling.temperature: ",
        ),
        (
            sampling(pb::SamplingParams {
                top_p: Some(1.5),
                ..Default::default()
            }),
            "sampling.top_p: ",
        ),
        (
            sampling(pb::SamplingParams {
                presence_penalty: 3.0,
                ..Default::default()
            }),
            "sampling.presence_penalty: ",
        ),
        (stop(0), "stop.max_tokens: "),
        (stop(9000), "stop.max_tokens: "),
        (
            pb::GenerateRequest {
                model: "gpt-5".into(),
                ..text("Hello")
            },
            "model: unknown model `gpt-5`",
        ),
        (
            pb::GenerateRequest {
                top_logprobs: 21,
                logprobs: true,
                ..text("Hello")
            },
            "top_logprobs: ",
        ),
        (
            pb::GenerateRequest {
                stop: Some(pb::StopConditions {
                    stop: vec![String::new()],
                    ..Default::default()
                }),
                ..text("Hello")
            },
            "stop.stop: ",
        ),
    ];
    for (req, want) in cases {
        let msg = rejected(&v, req.clone());
        assert!(
            msg.starts_with(want),
            "{req:?}: got {msg:?}, want prefix {want:?}"
        );
    }
}

/// Ensures that a prompt longer than the serving context is rejected on `prompt`.
#[test]
fn prompt_longer_than_context() {
    let Some(v) = validator(32) else { return };
    let long = "one two three four five six seven eight nine ten ".repeat(8);
    let msg = rejected(&v, text(&long));
    assert!(msg.starts_with("prompt: "), "{msg}");
    assert!(msg.contains("the context holds 32"), "{msg}");
}

/// Ensures that defaults follow the proto: temperature, top_p and repetition 1, a seed drawn,
/// max_tokens 256 capped so the prompt fits, and the default model accepted by name or empty.
#[test]
fn defaults_are_filled_in() {
    let Some(v) = validator(64) else { return };
    let ok = v
        .validate(text("Hello there"), Instant::now())
        .expect("valid");
    let p = ok.inner.sampling.params();
    assert_eq!(
        (p.temperature, p.top_p, p.repetition_penalty),
        (1.0, 1.0, 1.0)
    );
    assert_eq!(p.seed, Some(ok.seed));
    let prompt = ok.inner.prompt_ids.len();
    assert_eq!(ok.inner.stop.conditions().max_tokens as usize, 64 - prompt);
    assert_eq!(ok.max_len(), 64);
    assert!(!ok.request_id.is_empty());
    let big = validator(8192).expect("model present");
    let named = pb::GenerateRequest {
        model: MODEL.into(),
        request_id: "r1".into(),
        sampling: Some(pb::SamplingParams {
            seed: Some(7),
            ..Default::default()
        }),
        ..text("Hello there")
    };
    let ok = big.validate(named, Instant::now()).expect("valid");
    assert_eq!(ok.inner.stop.conditions().max_tokens, DEFAULT_MAX_TOKENS);
    assert_eq!((ok.seed, ok.request_id.as_str()), (7, "r1"));
    let start = ok.seq_start();
    assert_eq!(start.seed, 7);
    assert_eq!(start.prompt, ok.inner.prompt_ids);
    let chat = pb::GenerateRequest {
        prompt: Some(pb::generate_request::Prompt::Chat(pb::ChatMessages {
            messages: vec![pb::ChatMessage {
                role: "user".into(),
                content: "Hi".into(),
            }],
        })),
        ..Default::default()
    };
    let ok = big.validate(chat, Instant::now()).expect("chat is valid");
    assert!(ok.inner.prompt_ids.len() > 3);
}
