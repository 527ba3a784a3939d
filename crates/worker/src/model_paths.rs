//! Which models `LoadShard` may open: a name from the model store (a known model, or a
//! directory placed under `models/` by hand), or a path inside the model store or one of the
//! directories the operator allowed (`tessera worker --model-dir`). Nothing else — not
//! `/etc/shadow`, not `models/../../etc` — and the refusal is the same whether the path exists
//! or not, so it tells a caller nothing about the worker's filesystem.
//!
//! A path is judged by where it really leads: `..` components are refused outright, and an
//! existing path is resolved (symbolic links included) before it is compared with the allowed
//! directories, themselves resolved.

use std::path::{Component, Path, PathBuf};

use crate::error::WorkerError;

/// The directories models may be opened from; `None` in [`ModelPaths::any`] mode.
#[derive(Clone, Debug)]
pub struct ModelPaths {
    allowed: Option<Vec<PathBuf>>,
}

impl ModelPaths {
    /// Models from these directories only (the model store's `models/` and any others).
    pub fn within(dirs: impl IntoIterator<Item = PathBuf>) -> Self {
        let allowed = dirs
            .into_iter()
            // An allowed directory that does not exist yet allows nothing until it does;
            // compared resolved when it exists.
            .map(|d| d.canonicalize().unwrap_or(d))
            .collect();
        Self {
            allowed: Some(allowed),
        }
    }

    /// Any path (in-process workers of tests and embedders, who choose their own paths).
    pub fn any() -> Self {
        Self { allowed: None }
    }

    /// Checks `model` (a `LoadShardRequest.model`).
    ///
    /// # Errors
    /// INVALID_ARGUMENT naming `model` when it is a path outside the allowed directories; the
    /// message does not depend on whether the path exists.
    pub fn check(&self, model: &str) -> Result<(), WorkerError> {
        let Some(allowed) = &self.allowed else {
            return Ok(());
        };
        // A plain name resolves inside the model store (a known model or models/<name>).
        if !model.contains(['/', '\\']) && model != "." && model != ".." {
            return Ok(());
        }
        let path = Path::new(model);
        let refused = || {
            WorkerError::invalid(
                "model",
                "a path outside the model store and the worker's --model-dir directories: \
                 name a model of the store, or start the worker with --model-dir",
            )
        };
        if !path.is_absolute() || path.components().any(|c| c == Component::ParentDir) {
            return Err(refused());
        }
        // A missing path is judged by its text (and will fail to load, inside or not).
        let real = path.canonicalize().unwrap_or_else(|_| path.to_owned());
        if allowed.iter().any(|dir| real.starts_with(dir)) {
            Ok(())
        } else {
            Err(refused())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ensures that names pass, paths inside an allowed directory pass, and everything else —
    /// outside paths, `..` escapes, relative paths, symbolic links out — is refused with one
    /// message whether or not the path exists.
    #[test]
    fn only_the_model_store_and_allowed_directories_are_opened() {
        let store = tempfile::tempdir().expect("tempdir");
        let outside = tempfile::tempdir().expect("tempdir");
        let inside_file = store.path().join("m.gguf");
        std::fs::write(&inside_file, b"x").expect("write");
        let outside_file = outside.path().join("secret");
        std::fs::write(&outside_file, b"x").expect("write");
        let paths = ModelPaths::within([store.path().to_owned()]);
        let s = |p: &Path| p.to_string_lossy().into_owned();
        for ok in [
            "smollm2-135m-instruct".to_owned(),
            "my-model".to_owned(),
            s(&inside_file),
            s(&store.path().join("not-yet.gguf")),
        ] {
            assert!(paths.check(&ok).is_ok(), "{ok}");
        }
        let escape = format!("{}/../{}", s(store.path()), "x");
        let message = |m: &str| paths.check(m).expect_err(m).to_string();
        let reference = message(&s(&outside_file));
        for bad in [
            "/etc/shadow".to_owned(),
            "/nonexistent/model.gguf".to_owned(),
            escape,
            "models/m.gguf".to_owned(),
            "..".to_owned(),
        ] {
            assert_eq!(message(&bad), reference, "{bad}");
        }
        assert!(reference.starts_with("model: "), "{reference}");
        #[cfg(unix)]
        {
            let link = store.path().join("link");
            std::os::unix::fs::symlink(&outside_file, &link).expect("symlink");
            assert_eq!(message(&s(&link)), reference, "a link out of the store");
        }
        assert!(ModelPaths::any().check("/etc/shadow").is_ok());
    }
}
