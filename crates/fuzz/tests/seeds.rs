//! The seed corpora reach deep into their targets: a seed that a target refuses at its first
//! check would leave the fuzzer to rediscover the input format by itself.

use std::time::Instant;

use prost::Message as _;
use tessera_format::{ModelLocation, open_weights};
use tessera_text::Frontend;

fn seed(target: &str, name: &str) -> Vec<u8> {
    tessera_fuzz::seeds::seeds()
        .into_iter()
        .find(|(t, n, _)| *t == target && n == name)
        .map(|(_, _, b)| b)
        .unwrap_or_else(|| panic!("no seed {target}/{name}"))
}

/// Ensures that the GGUF seed is a whole model: it opens, its configuration and tokenizer
/// load, and the tokenizer applies its merges.
#[test]
fn gguf_seed_is_a_loadable_model() {
    let dir = tempfile_dir();
    let path = dir.join("m.gguf");
    std::fs::write(&path, seed("gguf", "tiny-llama.gguf")).expect("write");
    let loc = ModelLocation::Gguf(path);
    let (store, cfg) = open_weights(&loc).expect("opens");
    assert_eq!((cfg.n_layers, cfg.hidden), (1, 32));
    assert!(store.contains(tessera_format::TensorKey::FfnDown(0)));
    let f = Frontend::open(&loc).expect("frontend");
    let ids = f.tokenizer().encode(" the", false, false).expect("encodes");
    assert_eq!(ids.len(), 1, "merged into one token: {ids:?}");
    std::fs::remove_dir_all(dir).expect("clean up");
}

/// Ensures that the safetensors seed is a whole checkpoint directory that opens with its
/// tokenizer.
#[test]
fn safetensors_seed_is_a_loadable_checkpoint() {
    let data = seed("safetensors", "tiny-llama-dir");
    let dir = tempfile_dir();
    let mut rest = data.as_slice();
    for name in ["config.json", "tokenizer.json"] {
        let n = usize::from(u16::from_le_bytes([rest[0], rest[1]]));
        std::fs::write(dir.join(name), &rest[2..2 + n]).expect("write");
        rest = &rest[2 + n..];
    }
    std::fs::write(dir.join("model.safetensors"), rest).expect("write");
    let loc = ModelLocation::HfDir(dir.clone());
    let (store, cfg) = open_weights(&loc).expect("opens");
    assert_eq!(cfg.hidden, 32);
    assert!(store.contains(tessera_format::TensorKey::AttnQ(0)));
    Frontend::open(&loc).expect("frontend");
    std::fs::remove_dir_all(dir).expect("clean up");
}

/// Ensures that every stage seed's steps all run (prefill, decode, parts joined), on the
/// middle and the last stage.
#[test]
fn stage_seeds_run_every_step() {
    for name in ["stream-0", "stream-1", "stream-2"] {
        let steps = tessera_fuzz::stage_steps(&seed("stage", name));
        assert!(steps.ran > 0 && steps.refused == 0, "{name}: {steps:?}");
    }
}

/// Ensures that the first two request seeds pass validation and the third is refused, so the
/// fuzzer starts on both sides of it.
#[test]
fn request_seeds_span_accept_and_refuse() {
    let gguf = tessera_testkit::smollm2_gguf().expect("SmolLM2 (the fuzz targets need it)");
    let f = Frontend::open(&ModelLocation::Gguf(gguf)).expect("frontend");
    let v = tessera_coordinator::validate::Validator::new(f, "smollm2-135m-instruct", 8192);
    let ok: Vec<bool> = (0..3)
        .map(|i| {
            let r = tessera_proto::v1::GenerateRequest::decode(
                seed("generate_request", &format!("request-{i}")).as_slice(),
            )
            .expect("decodes");
            v.validate(r, Instant::now()).is_ok()
        })
        .collect();
    assert_eq!(ok, [true, true, false]);
}

fn tempfile_dir() -> std::path::PathBuf {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    let d = std::env::temp_dir().join(format!(
        "tessera-fuzz-seeds-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}
