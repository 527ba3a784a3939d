//! `up.json`: the coordinators' ports, kept in the data directory beside their Raft data.
//!
//! Raft stores every member's cluster address in its log and snapshots, so coordinators that
//! come back from kept data must listen where that data says they are: a rerun of `tessera up
//! --data-dir DIR` reads the ports from `DIR/up.json` instead of choosing them again. The file
//! is written before the coordinators first start, so a run that dies while starting leaves
//! data and ports that agree.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// The file's name inside the data directory.
pub(crate) const FILE: &str = "up.json";

/// What a cluster's data directory pins down.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Pinned {
    /// The model the cluster serves (its Raft state names it).
    pub model: String,
    /// Coordinator `i + 1`'s ports.
    pub coordinators: Vec<CoordinatorPorts>,
}

/// The ports of one coordinator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct CoordinatorPorts {
    /// The public API (gRPC).
    pub public: SocketAddr,
    /// The cluster protocol: what Raft peers and workers dial, and what the Raft data stores.
    pub cluster: SocketAddr,
    /// The OpenAI-compatible HTTP API, when served.
    pub http: Option<SocketAddr>,
}

/// The path of `dir`'s `up.json`.
pub(crate) fn path(dir: &Path) -> PathBuf {
    dir.join(FILE)
}

/// `dir`'s `up.json`; `None` when there is none (a first run).
///
/// # Errors
/// When it exists but cannot be read or parsed.
pub(crate) fn load(dir: &Path) -> Result<Option<Pinned>> {
    let file = path(dir);
    let text = match std::fs::read_to_string(&file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", file.display())),
    };
    serde_json::from_str(&text)
        .map(Some)
        .with_context(|| format!("parsing {}", file.display()))
}

/// Writes `pinned` as `dir`'s `up.json` (creating `dir`), whole or not at all.
///
/// # Errors
/// When the directory or the file cannot be written.
pub(crate) fn save(dir: &Path, pinned: &Pinned) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let file = path(dir);
    let tmp = dir.join(format!("{FILE}.tmp"));
    let text = serde_json::to_string_pretty(pinned).context("encoding up.json")?;
    std::fs::write(&tmp, text + "\n").with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &file).with_context(|| format!("writing {}", file.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ensures that what is saved loads back the same, and that a directory without the file
    /// is a first run.
    #[test]
    fn saved_ports_load_back() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("tessera-pinned-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(load(&dir)?, None);
        let pinned = Pinned {
            model: "m".into(),
            coordinators: vec![CoordinatorPorts {
                public: "127.0.0.1:1".parse()?,
                cluster: "127.0.0.1:2".parse()?,
                http: None,
            }],
        };
        save(&dir, &pinned)?;
        let back = load(&dir);
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(back?, Some(pinned));
        Ok(())
    }
}
