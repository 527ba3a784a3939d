//! The `tessera` binary end to end: generation with the real model and argument errors.

use std::path::Path;
use std::process::{Command, Output};

fn tessera() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tessera"))
}

/// `tessera generate --embedded --model MODEL ARGS… PROMPT`.
fn generate(model: &Path, args: &[&str], prompt: &str) -> Output {
    tessera()
        .args(["generate", "--embedded", "--model"])
        .arg(model)
        .args(args)
        .arg(prompt)
        .output()
        .expect("run tessera")
}

/// Standard output of a run that must succeed, and its standard error.
fn succeeded(out: Output) -> (String, String) {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{err}");
    (String::from_utf8_lossy(&out.stdout).into_owned(), err)
}

/// Ensures that greedy generation with the real model streams the same, non-empty text twice
/// and reports its statistics (what the text says is the goldens' business).
#[test]
fn greedy_generation_is_deterministic() {
    let Some(model) = tessera_testkit::smollm2_gguf() else {
        return;
    };
    let args = [
        "--chat",
        "--temperature",
        "0",
        "--max-tokens",
        "12",
        "--threads",
        "2",
    ];
    let run = || succeeded(generate(&model, &args, "What is the capital of France?"));
    let (a, stats) = run();
    let (b, _) = run();
    assert_eq!(a, b);
    assert!(a.trim().len() > 3, "{a:?}");
    assert!(
        stats.contains("prompt tokens") && stats.contains("tok/s"),
        "{stats}"
    );
}

/// Ensures that the same seed gives the same sampled text.
#[test]
fn seeded_sampling_is_reproducible() {
    let Some(model) = tessera_testkit::smollm2_gguf() else {
        return;
    };
    let run = |seed: &str| {
        let args = [
            "--temperature",
            "1.0",
            "--seed",
            seed,
            "--max-tokens",
            "16",
            "--threads",
            "2",
        ];
        succeeded(generate(&model, &args, "Once upon a time")).0
    };
    assert_eq!(run("42"), run("42"));
}

/// Ensures that invalid sampling options fail with a message naming the option, not a panic.
#[test]
fn invalid_options_name_the_field() {
    let Some(model) = tessera_testkit::smollm2_gguf() else {
        return;
    };
    for (flag, value, field) in [
        ("--temperature", "-1", "temperature"),
        ("--top-p", "1.5", "top_p"),
        ("--max-tokens", "0", "max_tokens"),
    ] {
        let out = generate(&model, &[flag, value], "hello");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{flag} {value} was accepted");
        assert!(
            err.contains(field) && !err.contains("panicked"),
            "{flag}: {err}"
        );
    }
}

/// Ensures that a missing model file gets an error that says what to do.
#[test]
fn missing_model_is_a_clear_error() {
    let out = tessera()
        .args([
            "generate",
            "--embedded",
            "--model",
            "/nonexistent/model.gguf",
            "hi",
        ])
        .output()
        .expect("run tessera");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("/nonexistent/model.gguf") && !err.contains("panicked"),
        "{err}"
    );
}
