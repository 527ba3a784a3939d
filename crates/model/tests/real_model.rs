//! The engine on the real SmolLM2 model: configuration, generation, stop conditions, and the
//! KV cache returning every block.

use std::ops::ControlFlow;

use tessera_format::{Arch, RopeLayout};
use tessera_hub::ModelLocation;
use tessera_model::engine::{Engine, EngineOptions, GenerateRequest, Prompt};
use tessera_text::sampling::{FinishReason, SamplingParams, StopConditions};
use tessera_text::tokenizer::ChatMessage;

fn engine() -> Option<Engine> {
    let path = tessera_testkit::smollm2_gguf()?;
    let opts = EngineOptions {
        threads: 2,
        kv_tokens: Some(2048),
        ..EngineOptions::default()
    };
    Some(Engine::load(&ModelLocation::Gguf(path), opts, &mut |_, _| {}).expect("load SmolLM2"))
}

fn request(prompt: Prompt, max_tokens: u32, stop: Vec<String>) -> GenerateRequest {
    GenerateRequest {
        prompt,
        sampling: SamplingParams::greedy(),
        stop: StopConditions {
            max_tokens,
            stop,
            stop_token_ids: Vec::new(),
            ignore_eos: false,
        },
    }
}

/// Ensures that SmolLM2's metadata is read as the model card describes it.
#[test]
fn reads_smollm2_config() {
    let Some(engine) = engine() else { return };
    let c = engine.config();
    assert_eq!(c.arch, Arch::Llama);
    assert_eq!((c.n_layers, c.hidden, c.intermediate), (30, 576, 1536));
    assert_eq!(
        (c.n_heads, c.n_kv_heads, c.head_dim, c.vocab_size),
        (9, 3, 64, 49152)
    );
    assert_eq!(c.rope_layout, RopeLayout::Interleaved);
    assert!((c.rope_theta - 100_000.0).abs() < 1e-3);
    assert!(!c.qkv_bias);
}

/// Ensures that a chat answer ends at the end-of-turn token, streams exactly the text it
/// returns, and that a stop string cuts the text before it.
#[test]
fn chat_generation_and_stop_strings() {
    let Some(mut engine) = engine() else { return };
    let chat = Prompt::Chat(vec![ChatMessage {
        role: "user".into(),
        content: "What is the capital of France? Answer in one word.".into(),
    }]);
    let valid = engine
        .validate(&request(chat.clone(), 64, vec![]))
        .expect("valid");
    let mut streamed = String::new();
    let out = engine
        .generate(&valid, &mut |ev| {
            streamed.push_str(&ev.text);
            ControlFlow::Continue(())
        })
        .expect("generate");
    assert_eq!(out.finish_reason, Some(FinishReason::Stop), "{out:?}");
    assert_eq!(streamed, out.text);
    assert!(out.text.contains("Paris"), "{}", out.text);
    assert!(!out.text.contains("<|im_end|>"));

    let valid = engine
        .validate(&request(chat, 64, vec!["aris".into()]))
        .expect("valid");
    let out = engine
        .generate(&valid, &mut |_| ControlFlow::Continue(()))
        .expect("generate");
    assert_eq!(out.finish_reason, Some(FinishReason::Stop));
    assert!(
        out.text.ends_with('P') && !out.text.contains("aris"),
        "{:?}",
        out.text
    );
}

/// Ensures that max_tokens ends generation with `length` and cancelling from the callback
/// stops at once.
#[test]
fn length_limit_and_cancellation() {
    let Some(mut engine) = engine() else { return };
    let valid = engine
        .validate(&request(
            Prompt::Text("The numbers from one to fifty are one, two,".into()),
            5,
            vec![],
        ))
        .expect("valid");
    let out = engine
        .generate(&valid, &mut |_| ControlFlow::Continue(()))
        .expect("generate");
    assert_eq!(
        (out.finish_reason, out.tokens.len()),
        (Some(FinishReason::Length), 5)
    );
    let mut seen = 0;
    let out = engine
        .generate(&valid, &mut |_| {
            seen += 1;
            if seen == 2 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })
        .expect("generate");
    assert_eq!((out.finish_reason, out.tokens.len()), (None, 2));
}

/// Ensures that prompts past the context and empty prompts are rejected naming the field.
#[test]
fn rejects_bad_prompts() {
    let Some(engine) = engine() else { return };
    let long = "word ".repeat(4000);
    for (prompt, field) in [(String::new(), "prompt"), (long, "prompt")] {
        let err = engine
            .validate(&request(Prompt::Text(prompt), 8, vec![]))
            .expect_err("invalid");
        assert!(err.to_string().contains(field), "{err}");
    }
}
