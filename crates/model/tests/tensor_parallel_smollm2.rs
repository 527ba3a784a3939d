//! The real SmolLM2 as tensor-parallel groups (in-process, see `tp_group`): teacher-forced
//! logits against the whole model, in Q4_1 as published and widened to f32, and greedy picks
//! against llama.cpp's goldens. Why the Q4_1 bound is so much wider than the f32 one is in
//! `tensor_parallel.rs`'s module docs: the model amplifies a flipped 8-bit activation
//! rounding, and a reordered partial sum flips one now and then.

mod golden_support;
mod tp_group;

use golden_support::{GreedyFile, LogitsFile, argmax, golden};
use tessera_format::GgufWeights;
use tessera_model::llama::Llama;
use tessera_model::stage::TensorSlice;
use tessera_testkit::MemoryWeights;
use tp_group::{Piece, load, load_group, max_diff, rows_by_seq, run_group, slices, teacher_forced};

/// Largest |TP logit − whole logit| on SmolLM2 with its weights widened to f32, teacher-forced
/// on the golden prompts, TP=2. Measured: 3.1e-2.
const SMOLLM2_F32_BOUND: f32 = 0.1;

/// The same for SmolLM2 as published (Q4_1), TP=2 and TP=3. Measured: 1.75 and 1.91.
const SMOLLM2_BOUND: f32 = 3.0;

/// The real model, whole and as the TP=2 (KV heads 2+1, MLP columns 640+896, vocabulary
/// 20000+29152) and TP=3 (1+1+1; 480+608+448; 16384×3 uneven) groups of the tests below.
struct Smollm2 {
    whole: Llama,
    groups: Vec<(&'static str, Vec<Llama>)>,
}

impl Smollm2 {
    fn load() -> Option<Self> {
        let path = tessera_testkit::smollm2_gguf()?;
        let w = GgufWeights::open(&path).expect("open");
        let c = w.config().expect("config");
        let whole = load(&w, &c, TensorSlice::whole(&c)).expect("whole");
        let v = c.vocab_size;
        let tp2 = slices(&[0, 2, 3], &[0, 640, 1536], &[0, 20000, c.vocab_size]);
        let tp3 = slices(&[0, 1, 2, 3], &[0, 480, 1088, 1536], &[0, 16000, 33000, v]);
        let groups = vec![
            ("TP=2", load_group(&w, &c, &tp2)),
            ("TP=3", load_group(&w, &c, &tp3)),
        ];
        Some(Self { whole, groups })
    }
}

/// Ensures that SmolLM2's TP=2 and TP=3 groups give the whole model's teacher-forced logits
/// on the golden prompts (all 8 as one batch: a 4-token prefill chunk each, then one token per
/// step) within [`SMOLLM2_BOUND`].
#[test]
fn smollm2_groups_match_whole_model() {
    let Some(m) = Smollm2::load() else { return };
    let file: LogitsFile = golden("logits.json");
    let seqs: Vec<Vec<u32>> = file.cases.iter().map(|c| c.ids.clone()).collect();
    let script = teacher_forced(&seqs, 4);
    let want = run_group(std::slice::from_ref(&m.whole), &script);
    for (name, group) in &m.groups {
        let got = run_group(group, &script);
        let diff = max_diff(&got, &want);
        let rows: usize = got.iter().map(|l| l.len()).sum::<usize>() / m.whole.config().vocab_size;
        eprintln!("SmolLM2 {name}: max |Δlogit| {diff:.3e} over {rows} positions");
        assert!(diff <= SMOLLM2_BOUND, "{name}: max |Δlogit| {diff}");
    }
}

/// Ensures that SmolLM2 with its weights widened to f32 (so no product quantizes its input to
/// 8 bits) gives the whole model's teacher-forced logits on the golden prompts as a TP=2 group
/// within [`SMOLLM2_F32_BOUND`]: the slicing of the real model's shapes is right to f32 and
/// f16 rounding, whatever the Q4_1 groups' amplified flips.
#[test]
fn smollm2_f32_group_matches_whole_model() {
    let Some(path) = tessera_testkit::smollm2_gguf() else {
        return;
    };
    let gguf = GgufWeights::open(&path).expect("open");
    let c = gguf.config().expect("config");
    let w = MemoryWeights::widened(&gguf, &c).expect("widen");
    drop(gguf);
    let file: LogitsFile = golden("logits.json");
    let seqs: Vec<Vec<u32>> = file.cases.iter().map(|c| c.ids.clone()).collect();
    let script = teacher_forced(&seqs, 4);
    let whole = load(&w, &c, TensorSlice::whole(&c)).expect("whole");
    let want = run_group(std::slice::from_ref(&whole), &script);
    drop(whole);
    let group = load_group(
        &w,
        &c,
        &slices(&[0, 2, 3], &[0, 640, 1536], &[0, 20000, c.vocab_size]),
    );
    let diff = max_diff(&run_group(&group, &script), &want);
    eprintln!("SmolLM2 in f32, TP=2: max |Δlogit| {diff:.3e}");
    assert!(diff <= SMOLLM2_F32_BOUND, "max |Δlogit| {diff}");
}

/// Ensures that SmolLM2's TP groups pick llama.cpp's greedy token at every step of the golden
/// continuations whose llama.cpp margin exceeds twice [`SMOLLM2_BOUND`] (where no error within
/// the bound can swap the top two). The continuations are teacher-forced, so every step is
/// judged on llama.cpp's own prefix; a group whose picks all agree continues the prompt
/// exactly as llama.cpp did.
#[test]
fn smollm2_groups_greedy_match_llama_cpp() {
    let Some(m) = Smollm2::load() else { return };
    let file: GreedyFile = golden("greedy.json");
    let vocab = m.whole.config().vocab_size;
    let mut script: Vec<Vec<Piece>> = Vec::new();
    for (seq, case) in file.cases.iter().enumerate() {
        let feed = std::iter::once(case.prompt_ids.clone()).chain(
            case.tokens[..case.tokens.len() - 1]
                .iter()
                .map(|&t| vec![t]),
        );
        for (step, tokens) in feed.enumerate() {
            if script.len() == step {
                script.push(Vec::new());
            }
            script[step].push(Piece {
                seq,
                tokens,
                logits: true,
            });
        }
    }
    for (name, group) in &m.groups {
        let rows = rows_by_seq(&script, &run_group(group, &script), vocab);
        let (mut checked, mut identical) = (0, 0);
        let mut swaps: Vec<f32> = Vec::new();
        for (case, rows) in file.cases.iter().zip(&rows) {
            for (step, row) in rows.iter().enumerate() {
                let (ours, want, margin) =
                    (argmax(row), case.tokens[step], case.steps[step].margin);
                if margin > 2.0 * SMOLLM2_BOUND {
                    assert_eq!(ours, want, "{name} {:?} step {step}", case.prompt);
                    checked += 1;
                } else if ours != want {
                    swaps.push(margin);
                }
            }
            identical += usize::from(rows.iter().zip(&case.tokens).all(|(r, &t)| argmax(r) == t));
        }
        let widest = swaps.iter().copied().fold(0.0, f32::max);
        eprintln!(
            "SmolLM2 {name}: top-1 checked at {checked} steps; {} other steps differ from \
             llama.cpp (largest llama.cpp margin among them {widest:.2}); {identical} of {} \
             continuations identical in full",
            swaps.len(),
            file.cases.len()
        );
        assert!(
            checked >= 50,
            "the check must cover many steps, not {checked}"
        );
    }
}
