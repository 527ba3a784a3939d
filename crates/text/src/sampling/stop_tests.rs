//! Tests of stop-condition validation and the stop checker.

use proptest::prelude::*;

use super::*;

fn cond(max_tokens: u32, stop: &[&str], ids: &[u32]) -> StopConditions {
    StopConditions {
        max_tokens,
        stop: stop.iter().map(|s| s.to_string()).collect(),
        stop_token_ids: ids.to_vec(),
        ignore_eos: false,
    }
}

fn checker(c: StopConditions) -> StopChecker {
    StopChecker::new(c.validate(100, 0, 1000).expect("valid conditions"))
}

/// Feeds `(id, eog, delta)` steps; returns the emitted text and the finish reason.
fn run(c: &mut StopChecker, steps: &[(u32, bool, &str)]) -> (String, Option<FinishReason>) {
    let mut out = String::new();
    let mut fin = None;
    for &(id, eog, d) in steps {
        let s = c.push(id, eog, d);
        out.push_str(&s.text);
        fin = s.finished;
    }
    (out, fin)
}

fn bad_field(c: StopConditions, vocab: usize, prompt: usize, ctx: usize) -> &'static str {
    c.validate(vocab, prompt, ctx)
        .map(|_| "<accepted>")
        .unwrap_or_else(|e| e.field_name())
}

/// Ensures that validation rejects each bad field by name and accepts the edges.
#[test]
fn validation_names_each_bad_field() {
    assert_eq!(bad_field(cond(0, &[], &[]), 10, 1, 100), "max_tokens");
    assert_eq!(bad_field(cond(100, &[], &[]), 10, 1, 100), "max_tokens");
    assert_eq!(bad_field(cond(99, &[], &[]), 10, 1, 100), "<accepted>");
    assert_eq!(bad_field(cond(5, &["a", ""], &[]), 10, 1, 100), "stop");
    let many: Vec<String> = (0..17).map(|i| i.to_string()).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    assert_eq!(bad_field(cond(5, &many, &[]), 10, 1, 100), "stop");
    assert_eq!(
        bad_field(cond(5, &many[..16], &[]), 10, 1, 100),
        "<accepted>"
    );
    assert_eq!(bad_field(cond(5, &[], &[10]), 10, 1, 100), "stop_token_ids");
    assert_eq!(bad_field(cond(5, &[], &[9]), 10, 1, 100), "<accepted>");
    let e = cond(200, &[], &[])
        .validate(10, 60, 100)
        .expect_err("too long");
    assert!(e.to_string().contains("at most 40"), "{e}");
}

/// Ensures that a stop string split across deltas is caught and neither it nor what follows it
/// is emitted.
#[test]
fn stop_string_split_across_deltas() {
    let mut c = checker(cond(100, &["STOP"], &[]));
    let (text, fin) = run(
        &mut c,
        &[(1, false, "hello S"), (2, false, "TO"), (3, false, "Pped")],
    );
    assert_eq!(text, "hello ");
    assert_eq!(fin, Some(FinishReason::Stop));
}

/// Ensures that a partial prefix is held back, then released when it does not complete.
#[test]
fn partial_prefix_held_then_released() {
    let mut c = checker(cond(100, &["</end>"], &[]));
    let s = c.push(1, false, "a </e");
    assert_eq!(
        s,
        StopStep {
            text: "a ".into(),
            finished: None
        }
    );
    let s = c.push(2, false, "n");
    assert_eq!(s.text, "");
    let s = c.push(3, false, "x!");
    assert_eq!(
        s,
        StopStep {
            text: "</enx!".into(),
            finished: None
        }
    );
    // Released at flush when the sequence is ended from outside.
    assert_eq!(c.push(4, false, "<").text, "");
    assert_eq!(c.flush(), "<");
}

/// Ensures that the earliest occurrence among several stop strings wins: a shorter one that
/// completes inside a held longer prefix cuts there, and a longer one that starts first wins.
#[test]
fn earliest_of_several_stop_strings() {
    let mut c = checker(cond(100, &["abcd", "bc"], &[]));
    let (text, fin) = run(&mut c, &[(1, false, "xab"), (2, false, "cx")]);
    assert_eq!((text.as_str(), fin), ("xa", Some(FinishReason::Stop)));
    let mut c = checker(cond(100, &["abcd", "bc"], &[]));
    let (text, fin) = run(&mut c, &[(1, false, "xab"), (2, false, "cd")]);
    assert_eq!((text.as_str(), fin), ("x", Some(FinishReason::Stop)));
}

/// Ensures that the checker stops at the first delta completing any stop string, even when a
/// longer stop string that started earlier could still have completed (found by proptest).
#[test]
fn stops_at_first_completed_stop_string() {
    let mut c = checker(cond(100, &["bab", "a"], &[]));
    let (text, fin) = run(&mut c, &[(1, false, " ba"), (2, false, "b")]);
    assert_eq!((text.as_str(), fin), (" b", Some(FinishReason::Stop)));
}

/// Ensures that a stop token id ends the sequence without its text, releasing held text.
#[test]
fn stop_token_id_finishes() {
    let mut c = checker(cond(100, &["##"], &[42]));
    let (text, fin) = run(&mut c, &[(1, false, "a#"), (42, false, "<x>")]);
    assert_eq!((text.as_str(), fin), ("a#", Some(FinishReason::Stop)));
    assert_eq!(
        c.push(5, false, "late"),
        StopStep {
            text: String::new(),
            finished: fin
        }
    );
    assert_eq!(c.flush(), "");
}

/// Ensures that max_tokens ends with Length and emits everything held.
#[test]
fn max_tokens_finishes_with_length() {
    let mut c = checker(cond(3, &["zz"], &[]));
    assert_eq!(c.push(1, false, "a").finished, None);
    assert_eq!(c.push(2, false, "b").finished, None);
    let s = c.push(3, false, "cz");
    assert_eq!(
        s,
        StopStep {
            text: "cz".into(),
            finished: Some(FinishReason::Length)
        }
    );
    assert_eq!(c.generated(), 3);
    assert_eq!(c.finished(), Some(FinishReason::Length));
}

/// Ensures that a stop string completed on the last allowed token reports Stop, not Length.
#[test]
fn stop_string_beats_length_on_same_token() {
    let mut c = checker(cond(2, &["ab"], &[]));
    let (text, fin) = run(&mut c, &[(1, false, "xa"), (2, false, "b")]);
    assert_eq!((text.as_str(), fin), ("x", Some(FinishReason::Stop)));
}

/// Ensures that end-of-generation stops unless ignore_eos is set.
#[test]
fn eog_stops_unless_ignored() {
    let mut c = checker(cond(10, &[], &[]));
    assert_eq!(
        run(&mut c, &[(1, false, "hi"), (0, true, "")]),
        ("hi".into(), Some(FinishReason::Stop))
    );
    let mut c = checker(StopConditions {
        ignore_eos: true,
        ..cond(2, &[], &[])
    });
    assert_eq!(
        run(&mut c, &[(0, true, "<e>"), (1, false, "x")]),
        ("<e>x".into(), Some(FinishReason::Length))
    );
}

/// Ensures that multi-byte text is held and cut on char boundaries.
#[test]
fn multibyte_text_is_cut_on_char_boundaries() {
    let mut c = checker(cond(100, &["€€"], &[]));
    let (text, fin) = run(
        &mut c,
        &[(1, false, "ä€"), (2, false, "ö"), (3, false, "€€x")],
    );
    assert_eq!((text.as_str(), fin), ("ä€ö", Some(FinishReason::Stop)));
}

/// Ensures that finish reasons serialize as OpenAI's "stop" and "length".
#[test]
fn finish_reason_serializes_like_openai() {
    assert_eq!(
        serde_json::to_string(&FinishReason::Stop).ok().as_deref(),
        Some("\"stop\"")
    );
    assert_eq!(
        serde_json::to_string(&FinishReason::Length).ok().as_deref(),
        Some("\"length\"")
    );
}

proptest! {
    /// Ensures that, however the text is split into deltas, the checker stops at the first delta
    /// that completes a stop string and emits exactly the text before the earliest-starting stop
    /// string complete by then (or all of the text, with flush, when none occurs).
    #[test]
    fn emitted_text_is_prefix_before_first_stop(
        text in "[ab c]{0,40}",
        stops in prop::collection::vec("[abc]{1,4}", 1..4),
        cuts in prop::collection::vec(0usize..41, 0..10),
    ) {
        let stop_refs: Vec<&str> = stops.iter().map(String::as_str).collect();
        let mut c = checker(cond(1000, &stop_refs, &[]));
        let mut cuts: Vec<usize> = cuts.into_iter().filter(|&x| x <= text.len()).collect();
        cuts.push(0);
        cuts.push(text.len());
        cuts.sort_unstable();
        cuts.dedup();
        let mut out = String::new();
        let mut fin = None;
        for w in cuts.windows(2) {
            let s = c.push(1, false, &text[w[0]..w[1]]);
            out.push_str(&s.text);
            if s.finished.is_some() { fin = s.finished; break; }
        }
        out.push_str(&c.flush());
        // Reference: the first delta end by which some stop string is complete, and the
        // earliest start among the stop strings complete by then.
        let first = cuts.iter().skip(1).find_map(|&end| {
            stops.iter().filter_map(|s| text[..end].find(s.as_str())).min()
        });
        match first {
            Some(at) => {
                prop_assert_eq!(&out, &text[..at]);
                prop_assert_eq!(fin, Some(FinishReason::Stop));
            }
            None => {
                prop_assert_eq!(&out, &text);
                prop_assert_eq!(fin, None);
            }
        }
    }
}
