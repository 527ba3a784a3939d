//! `tessera up --prompt` and `tessera generate` take the same request flags (chat, sampling,
//! stop conditions, logprobs) with the same defaults, so one prompt gives one answer whichever
//! of them runs it. (`up` used to sample greedily and could not pass penalties, top-p or a
//! seed.)

use std::process::Output;

use tessera_testkit::{Tessera, smollm2_arg as model};

/// The `tessera` binary under test.
fn tessera() -> Tessera {
    Tessera::new(env!("CARGO_BIN_EXE_tessera"))
}

/// The flags of a generate request, each with a value where it takes one.
const REQUEST_FLAGS: [&str; 13] = [
    "--chat",
    "--system",
    "--temperature",
    "--top-k",
    "--top-p",
    "--min-p",
    "--repetition-penalty",
    "--frequency-penalty",
    "--presence-penalty",
    "--seed",
    "--max-tokens",
    "--stop",
    "--logprobs",
];

/// `tessera SUBCOMMAND -h`'s entry for `flag` (its line, and the next when clap moves the
/// help there), whitespace collapsed: column widths and wrapping differ between subcommands.
fn help_entry(subcommand: &str, flag: &str) -> String {
    let out = tessera().run(&[subcommand, "-h"]);
    assert!(out.status.success(), "{subcommand} -h");
    let help = String::from_utf8_lossy(&out.stdout).into_owned();
    let lines: Vec<&str> = help.lines().collect();
    let at = lines
        .iter()
        .position(|l| l.trim_start().starts_with(&format!("{flag} ")) || l.trim() == flag)
        .unwrap_or_else(|| panic!("`tessera {subcommand} -h` has no {flag}:\n{help}"));
    let mut entry = vec![lines[at]];
    entry.extend(
        lines[at + 1..]
            .iter()
            .take_while(|l| !l.trim_start().starts_with('-') && !l.trim().is_empty()),
    );
    entry
        .join(" ")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// Standard output of a run that must succeed.
fn stdout_of(out: Output, what: &str) -> String {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{what} failed: {err}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Ensures that `up` and `generate` list every request flag with the same help and default.
#[test]
fn up_and_generate_share_the_request_flags_and_defaults() {
    for flag in REQUEST_FLAGS {
        assert_eq!(
            help_entry("up", flag),
            help_entry("generate", flag),
            "{flag}"
        );
    }
    assert!(help_entry("up", "--temperature").contains("[default: 0.7]"));
}

/// Ensures that a request flag given to `up` without `--prompt` is refused (it would do
/// nothing), naming `--prompt`.
#[test]
fn up_refuses_request_flags_without_a_prompt() {
    let out = tessera().run(&["up", "--temperature", "0"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "accepted: {err}");
    assert!(err.contains("--prompt"), "{err}");
}

/// Ensures that `up --prompt` sends the same request as `generate`: with a seed and otherwise
/// default flags, and with explicit penalties and top-p, a one-worker local cluster answers
/// exactly what the embedded engine does.
#[test]
fn up_prompt_samples_like_generate() {
    let Some(model) = model() else {
        return;
    };
    let prompt = "Once upon a time";
    for flags in [
        vec!["--seed", "7", "--max-tokens", "12"],
        vec![
            "--seed",
            "11",
            "--max-tokens",
            "12",
            "--top-p",
            "0.8",
            "--repetition-penalty",
            "1.3",
            "--presence-penalty",
            "0.5",
            "--temperature",
            "1.2",
        ],
    ] {
        let mut embedded = vec![
            "generate",
            "--embedded",
            "--threads",
            "1",
            "--model",
            &model,
        ];
        embedded.extend(&flags);
        embedded.push(prompt);
        let want = stdout_of(tessera().run(&embedded), "generate --embedded");
        let mut up = vec![
            "up",
            "--listen",
            "127.0.0.1:0",
            "--coordinators",
            "1",
            "--workers",
            "1",
            "--threads-per-worker",
            "1",
            "--memory",
            "1GiB",
            "--model",
            &model,
            "--prompt",
            prompt,
        ];
        up.extend(&flags);
        let got = stdout_of(tessera().run(&up), "up --prompt");
        // `up` also forwards its children's start lines; the answer is what follows them.
        assert!(
            got.ends_with(&want),
            "{flags:?}: up answered\n{got}\nbut generate --embedded\n{want}"
        );
        assert!(want.trim().len() > 3, "{want:?}");
    }
}
