//! What the targets share: SmolLM2's frontend (tokenizer, template, configuration) and a
//! validator over it, built once per process, and a scratch directory per input for the
//! targets that read files.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use tessera_coordinator::validate::Validator;
use tessera_format::ModelLocation;
use tessera_text::Frontend;

/// The served model's name, as clients give it.
pub(crate) const MODEL: &str = "smollm2-135m-instruct";

/// SmolLM2's GGUF.
///
/// # Panics
/// When the model is not in the cache: the targets need it, and skipping them would hide
/// that nothing ran.
pub(crate) fn smollm2() -> PathBuf {
    tessera_testkit::smollm2_gguf().unwrap_or_else(|| {
        panic!(
            "the fuzz targets need SmolLM2: run `tessera model pull smollm2-135m-instruct` \
             (or set TESSERA_MODEL_GGUF)"
        )
    })
}

/// SmolLM2's frontend, read once.
pub(crate) fn frontend() -> &'static Frontend {
    static FRONTEND: OnceLock<Frontend> = OnceLock::new();
    FRONTEND.get_or_init(|| {
        Frontend::open(&ModelLocation::Gguf(smollm2())).expect("SmolLM2's frontend loads")
    })
}

/// The coordinator's validator over SmolLM2 with its full context.
pub(crate) fn validator() -> &'static Validator {
    static VALIDATOR: OnceLock<Validator> = OnceLock::new();
    VALIDATOR.get_or_init(|| {
        let f = frontend().clone();
        let context = f.config().context_len;
        Validator::new(f, MODEL, context)
    })
}

/// A directory that exists for one input: created empty, removed on drop (so a fuzzing
/// process leaves nothing behind however many inputs it runs).
pub(crate) struct Scratch(PathBuf);

impl Scratch {
    /// An empty directory for this process.
    ///
    /// # Panics
    /// When the temporary directory is not writable.
    pub(crate) fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("tessera-fuzz-{}", std::process::id()));
        // A previous input's directory is gone unless it panicked; start clean either way.
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("the temporary directory is writable");
        Self(dir)
    }

    /// The directory.
    pub(crate) fn path(&self) -> &Path {
        &self.0
    }

    /// Writes `bytes` to `name` inside it and returns its path.
    ///
    /// # Panics
    /// When the file cannot be written.
    pub(crate) fn write(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, bytes).expect("the scratch file is written");
        p
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
