//! Resolving a model spec (cache name, `.gguf` path, Hugging Face–style directory) to files,
//! and listing the cache.
//!
//! Resolution is cheap on purpose (existence and a magic-number check, no hashing): it runs on
//! every start. [`super::pull()`] and [`super::verify_sha256`] do the full check.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use tessera_format::ModelLocation;

use super::{ModelCache, Packaging, SourceError, known_model, known_names};

/// A model found in the cache.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CachedModel {
    /// Its cache name (the directory under `models/`).
    pub name: String,
    /// The GGUF file, or the HF-style directory.
    pub path: PathBuf,
    /// Total size of its files in bytes (for a directory, every file under it).
    pub bytes: u64,
}

const GGUF_MAGIC: &[u8; 4] = b"GGUF";

/// The index file of a sharded safetensors checkpoint.
const SHARD_INDEX: &str = "model.safetensors.index.json";

/// Resolves what a user typed to a model on disk: an existing path (a `.gguf` file, or a
/// directory holding an HF-style model or a single `.gguf`), else a cache name (pulled, or a
/// directory placed under `models/` by hand). A pulled directory model
/// ([`Packaging::ZippedDir`]) resolves like a directory given by path, usually to
/// [`ModelLocation::HfDir`] of `models/<name>`.
///
/// # Errors
/// - [`SourceError::NotPulled`] for a known model not yet pulled ("run `tessera model pull NAME`");
/// - [`SourceError::Incomplete`] for a file that is not GGUF or a directory missing
///   `config.json`, `tokenizer.json` or weights (naming what is missing);
/// - [`SourceError::Unknown`] otherwise, listing the known model names;
/// - [`SourceError::Io`] when a path exists but cannot be read.
pub fn resolve(spec: &str, cache: &ModelCache) -> Result<ModelLocation, SourceError> {
    let path = Path::new(spec);
    if path.exists() {
        return resolve_path(path);
    }
    if let Some(model) = known_model(spec) {
        let path = cache.model_path(model);
        match model.packaging {
            Packaging::File if path.is_file() => {
                check_gguf(&path)?;
                return Ok(ModelLocation::Gguf(path));
            }
            // A pull renames the directory into place whole, so one that exists is complete
            // unless changed since; the cheap file check below catches the usual damage.
            Packaging::ZippedDir if path.is_dir() => return resolve_path(&path),
            Packaging::File | Packaging::ZippedDir => {}
        }
        return Err(SourceError::NotPulled {
            name: model.name.to_owned(),
            path,
        });
    }
    // A plain name (no separators) may be a model placed under models/ by hand.
    if !spec.is_empty() && !spec.contains(['/', '\\']) && spec != "." && spec != ".." {
        let dir = cache.models_dir().join(spec);
        if dir.is_dir() {
            return resolve_path(&dir);
        }
    }
    Err(SourceError::Unknown {
        spec: spec.to_owned(),
        known: known_names(),
    })
}

/// Resolves an existing file or directory (checking that a directory has the files a model
/// needs, naming those it lacks).
pub(crate) fn resolve_path(path: &Path) -> Result<ModelLocation, SourceError> {
    if path.is_file() {
        check_gguf(path)?;
        return Ok(ModelLocation::Gguf(path.to_path_buf()));
    }
    let entries = dir_files(path)?;
    let has = |name: &str| {
        entries
            .iter()
            .any(|p| p.file_name().is_some_and(|n| n == name))
    };
    let with_ext = |ext: &str| {
        entries
            .iter()
            .filter(|p| p.extension().is_some_and(|e| e == ext))
            .cloned()
            .collect::<Vec<_>>()
    };
    let ggufs = with_ext("gguf");
    if !has("config.json") && ggufs.len() == 1 {
        check_gguf(&ggufs[0])?;
        return Ok(ModelLocation::Gguf(ggufs[0].clone()));
    }
    let mut missing = Vec::new();
    if !has("config.json") {
        missing.push("config.json");
    }
    if with_ext("safetensors").is_empty() {
        missing.push("*.safetensors weights");
    }
    if !has("tokenizer.json") {
        missing.push("tokenizer.json");
    }
    let mut missing: Vec<String> = missing.into_iter().map(str::to_owned).collect();
    if has(SHARD_INDEX) {
        missing.extend(missing_shards(&path.join(SHARD_INDEX))?);
    }
    if !missing.is_empty() {
        let mut what = format!("missing {}", missing.join(", "));
        if ggufs.len() > 1 {
            what.push_str(&format!(
                "; it holds {} .gguf files: name one of them directly",
                ggufs.len()
            ));
        } else {
            what.push_str(
                " (a model directory needs config.json, *.safetensors and tokenizer.json, \
                 or a single .gguf file)",
            );
        }
        return Err(SourceError::Incomplete {
            path: path.to_path_buf(),
            what,
        });
    }
    Ok(ModelLocation::HfDir(path.to_path_buf()))
}

/// The shard files named by a sharded checkpoint's index (`weight_map` values) that are absent.
fn missing_shards(index: &Path) -> Result<Vec<String>, SourceError> {
    let text = fs::read_to_string(index).map_err(SourceError::io("reading", index))?;
    let corrupt = |why: String| SourceError::Incomplete {
        path: index.to_path_buf(),
        what: format!("unreadable shard index: {why}"),
    };
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| corrupt(e.to_string()))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| corrupt("no `weight_map` object".to_owned()))?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut shards: Vec<&str> = map.values().filter_map(|v| v.as_str()).collect();
    shards.sort_unstable();
    shards.dedup();
    Ok(shards
        .into_iter()
        .filter(|s| !dir.join(s).is_file())
        .map(|s| format!("shard {s}"))
        .collect())
}

/// The regular files directly inside `dir`.
fn dir_files(dir: &Path) -> Result<Vec<PathBuf>, SourceError> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(SourceError::io("reading directory", dir))? {
        let entry = entry.map_err(SourceError::io("reading directory", dir))?;
        let p = entry.path();
        if p.is_file() {
            out.push(p);
        }
    }
    out.sort();
    Ok(out)
}

/// The total size of the regular files under `dir`, at any depth (a sentence-transformers
/// model keeps its pooling configuration in a subdirectory). Links are not followed.
fn tree_bytes(dir: &Path) -> Result<u64, SourceError> {
    let mut total = 0;
    for entry in fs::read_dir(dir).map_err(SourceError::io("reading directory", dir))? {
        let entry = entry.map_err(SourceError::io("reading directory", dir))?;
        let meta = entry
            .metadata()
            .map_err(SourceError::io("reading", &entry.path()))?;
        if meta.is_dir() {
            total += tree_bytes(&entry.path())?;
        } else if meta.is_file() {
            total += meta.len();
        }
    }
    Ok(total)
}

/// Checks that `path` starts with the GGUF magic.
fn check_gguf(path: &Path) -> Result<(), SourceError> {
    let mut magic = [0u8; 4];
    let mut f = fs::File::open(path).map_err(SourceError::io("opening", path))?;
    let read = f
        .read(&mut magic)
        .map_err(SourceError::io("reading", path))?;
    if read < 4 || &magic != GGUF_MAGIC {
        return Err(SourceError::Incomplete {
            path: path.to_path_buf(),
            what: "not a GGUF file (bad magic number); re-download it or pass the right file"
                .to_owned(),
        });
    }
    Ok(())
}

/// The directory holding the model `spec` names when `spec` is an existing path (the
/// directory itself for an HF-style model, the file's for a `.gguf`), resolved; `None` for a
/// cache name. What a worker must be allowed to load from (`tessera worker --model-dir`) to
/// serve a model given by path.
pub fn model_dir(spec: &str) -> Option<PathBuf> {
    let path = Path::new(spec);
    if !spec.contains(['/', '\\']) || !path.exists() {
        return None;
    }
    let dir = if path.is_dir() { path } else { path.parent()? };
    Some(dir.canonicalize().unwrap_or_else(|_| dir.to_owned()))
}

/// The models in the cache, by name: each `models/<name>/` holding a single `.gguf` or an
/// HF-style model. Incomplete directories and unpack leftovers (names starting with `.`, as a
/// directory model's temporary unpack directory does) are skipped.
///
/// # Errors
/// [`SourceError::Io`] when the cache directory exists but cannot be read.
pub fn list(cache: &ModelCache) -> Result<Vec<CachedModel>, SourceError> {
    let models = cache.models_dir();
    if !models.is_dir() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for entry in fs::read_dir(&models).map_err(SourceError::io("reading directory", &models))? {
        let entry = entry.map_err(SourceError::io("reading directory", &models))?;
        let dir = entry.path();
        let Some(name) = dir.file_name().and_then(|n| n.to_str()).map(str::to_owned) else {
            continue;
        };
        if name.starts_with('.') || !dir.is_dir() {
            continue;
        }
        let (path, bytes) = match resolve_path(&dir) {
            Ok(ModelLocation::Gguf(f)) => {
                let bytes = fs::metadata(&f)
                    .map_err(SourceError::io("reading", &f))?
                    .len();
                (f, bytes)
            }
            Ok(ModelLocation::HfDir(d)) => {
                let bytes = tree_bytes(&d)?;
                (d, bytes)
            }
            Err(_) => continue,
        };
        out.push(CachedModel { name, path, bytes });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::KNOWN_MODELS;
    use tempfile::TempDir;

    fn write(path: &Path, bytes: &[u8]) {
        fs::create_dir_all(path.parent().expect("has parent")).expect("mkdir");
        fs::write(path, bytes).expect("write");
    }

    fn hf_dir(dir: &Path, skip: &str) {
        for f in ["config.json", "model.safetensors", "tokenizer.json"] {
            if f != skip {
                write(&dir.join(f), b"{}");
            }
        }
    }

    /// Ensures that a model given as a path lives in its directory (a file's parent, an
    /// HF-style directory itself, resolved), and that a cache name or a missing path has none.
    #[test]
    fn a_model_path_has_a_directory_a_name_has_none() {
        let tmp = TempDir::new().expect("tmp");
        let root = tmp.path().canonicalize().expect("canonical");
        let file = root.join("m").join("model.gguf");
        write(&file, b"GGUF");
        let s = |p: &Path| p.to_string_lossy().into_owned();
        assert_eq!(model_dir(&s(&file)), Some(root.join("m")));
        assert_eq!(model_dir(&s(&root.join("m"))), Some(root.join("m")));
        assert_eq!(model_dir("smollm2-135m-instruct"), None);
        assert_eq!(model_dir(&s(&root.join("missing.gguf"))), None);
    }

    /// Ensures that a path to a GGUF file resolves to it, and a non-GGUF file is rejected.
    #[test]
    fn resolves_gguf_path_and_rejects_non_gguf() {
        let t = TempDir::with_prefix("tessera-res-gguf-").expect("temp dir");
        let f = t.path().join("m.gguf");
        write(&f, b"GGUF\x03\0\0\0rest");
        let cache = ModelCache::at(t.path().join("cache"));
        let spec = f.to_str().expect("utf-8 path");
        assert_eq!(
            resolve(spec, &cache).ok(),
            Some(ModelLocation::Gguf(f.clone()))
        );
        let bad = t.path().join("bad.gguf");
        write(&bad, b"GG");
        let e = resolve(bad.to_str().expect("utf-8"), &cache).expect_err("not gguf");
        assert!(e.to_string().contains("not a GGUF"), "{e}");
    }

    /// Ensures that an HF-style directory resolves, and one missing tokenizer.json (or weights)
    /// is rejected with an error naming the missing file.
    #[test]
    fn resolves_hf_dir_and_names_missing_files() {
        let t = TempDir::with_prefix("tessera-res-hf-").expect("temp dir");
        let cache = ModelCache::at(t.path().join("cache"));
        let good = t.path().join("good");
        hf_dir(&good, "");
        let spec = good.to_str().expect("utf-8");
        assert_eq!(
            resolve(spec, &cache).ok(),
            Some(ModelLocation::HfDir(good.clone()))
        );
        let bad = t.path().join("bad");
        hf_dir(&bad, "tokenizer.json");
        let e = resolve(bad.to_str().expect("utf-8"), &cache).expect_err("incomplete");
        let msg = e.to_string();
        assert!(msg.contains("missing tokenizer.json ("), "{msg}");
        let noweights = t.path().join("nw");
        hf_dir(&noweights, "model.safetensors");
        let e = resolve(noweights.to_str().expect("utf-8"), &cache).expect_err("incomplete");
        assert!(e.to_string().contains("safetensors"), "{e}");
    }

    /// Ensures that a sharded checkpoint whose index names an absent shard is reported naming
    /// that shard, and resolves once the shard is there.
    #[test]
    fn sharded_checkpoint_names_missing_shard() {
        let t = TempDir::with_prefix("tessera-res-shards-").expect("temp dir");
        let cache = ModelCache::at(t.path().join("cache"));
        let d = t.path().join("sharded");
        write(&d.join("config.json"), b"{}");
        write(&d.join("tokenizer.json"), b"{}");
        write(&d.join("model-00001-of-00002.safetensors"), b"x");
        let index = br#"{"metadata":{},"weight_map":{"a":"model-00001-of-00002.safetensors",
            "b":"model-00002-of-00002.safetensors"}}"#;
        write(&d.join(SHARD_INDEX), index);
        let spec = d.to_str().expect("utf-8");
        let e = resolve(spec, &cache).expect_err("a shard is missing");
        assert!(
            e.to_string()
                .contains("shard model-00002-of-00002.safetensors"),
            "{e}"
        );
        assert!(!e.to_string().contains("00001"), "{e}");
        write(&d.join("model-00002-of-00002.safetensors"), b"x");
        assert_eq!(resolve(spec, &cache).ok(), Some(ModelLocation::HfDir(d)));
    }

    /// Ensures that a known name resolves from the cache once present, and before that says to
    /// run `tessera model pull NAME`.
    #[test]
    fn known_name_resolves_from_cache_or_asks_to_pull() {
        let t = TempDir::with_prefix("tessera-res-known-").expect("temp dir");
        let cache = ModelCache::at(t.path().to_path_buf());
        let m = &KNOWN_MODELS[0];
        let e = resolve(m.name, &cache).expect_err("not pulled");
        assert!(matches!(e, SourceError::NotPulled { .. }), "{e:?}");
        assert!(
            e.to_string()
                .contains(&format!("run `tessera model pull {}`", m.name))
        );
        write(&cache.model_path(m), b"GGUF....");
        assert_eq!(
            resolve(m.name, &cache).ok(),
            Some(ModelLocation::Gguf(cache.model_path(m)))
        );
    }

    /// Ensures that a known directory model resolves to its cache directory once there, asks to
    /// be pulled before, and names what a damaged one lacks.
    #[test]
    fn known_dir_model_resolves_to_its_directory() {
        let t = TempDir::with_prefix("tessera-res-known-dir-").expect("temp dir");
        let cache = ModelCache::at(t.path().to_path_buf());
        let m = crate::known_model(crate::MINILM_MODEL).expect("minilm is known");
        let e = resolve(m.name, &cache).expect_err("not pulled");
        assert!(matches!(e, SourceError::NotPulled { .. }), "{e:?}");
        assert!(
            e.to_string()
                .contains("tessera model pull all-minilm-l6-v2"),
            "{e}"
        );
        let dir = cache.models_dir().join(m.name);
        hf_dir(&dir, "tokenizer.json");
        let e = resolve(m.name, &cache).expect_err("incomplete");
        assert!(e.to_string().contains("missing tokenizer.json"), "{e}");
        write(&dir.join("tokenizer.json"), b"{}");
        assert_eq!(
            resolve(m.name, &cache).ok(),
            Some(ModelLocation::HfDir(dir))
        );
    }

    /// Ensures that an unknown name errors listing the known names, and a hand-placed cache
    /// directory resolves by name.
    #[test]
    fn unknown_name_lists_known_and_hand_placed_dir_resolves() {
        let t = TempDir::with_prefix("tessera-res-unknown-").expect("temp dir");
        let cache = ModelCache::at(t.path().to_path_buf());
        let e = resolve("no-such-model", &cache).expect_err("unknown");
        assert!(matches!(e, SourceError::Unknown { .. }));
        for m in KNOWN_MODELS {
            assert!(e.to_string().contains(m.name), "{e}");
        }
        let mine = cache.models_dir().join("mine");
        hf_dir(&mine, "");
        assert_eq!(
            resolve("mine", &cache).ok(),
            Some(ModelLocation::HfDir(mine))
        );
    }

    /// Ensures that list finds GGUF and HF models with their sizes (files in subdirectories
    /// counted) and skips incomplete ones and unpack leftovers.
    #[test]
    fn list_reports_models_and_sizes() {
        let t = TempDir::with_prefix("tessera-res-list-").expect("temp dir");
        let cache = ModelCache::at(t.path().to_path_buf());
        assert_eq!(list(&cache).ok(), Some(Vec::new()));
        let m = &KNOWN_MODELS[0];
        write(&cache.model_path(m), b"GGUF12345678");
        hf_dir(&cache.models_dir().join("hf"), "");
        write(&cache.models_dir().join("hf/1_Pooling/config.json"), b"{}");
        hf_dir(&cache.models_dir().join("broken"), "config.json");
        hf_dir(&cache.models_dir().join(".hf.partial-1"), "");
        let got = list(&cache).expect("lists");
        let names: Vec<(&str, u64)> = got.iter().map(|c| (c.name.as_str(), c.bytes)).collect();
        assert_eq!(names, vec![("hf", 8), (m.name, 12)]);
    }
}
