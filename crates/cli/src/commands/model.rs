//! `tessera model pull|list`: the local model cache.

use anyhow::Result;
use clap::Subcommand;
use tessera_hub::{KNOWN_MODELS, ModelCache};

use crate::progress::Bar;

/// Model cache commands.
#[derive(Subcommand, Debug)]
pub enum ModelCommand {
    /// Download a known model into the cache (idempotent).
    Pull {
        /// The model's name, e.g. smollm2-135m-instruct or all-minilm-l6-v2 (`tessera model
        /// list` shows them all).
        name: String,
    },
    /// List pulled models and the names that can be pulled.
    List,
}

/// Runs a model command.
pub fn run(cmd: ModelCommand) -> Result<()> {
    let cache = ModelCache::from_env()?;
    match cmd {
        ModelCommand::Pull { name } => {
            let path = tessera_hub::pull(&name, &cache, &Bar::new())?;
            println!("{name}: {}", path.display());
        }
        ModelCommand::List => {
            let pulled = tessera_hub::list(&cache)?;
            println!("cache: {}", cache.root().display());
            for m in &pulled {
                println!(
                    "{:<28} {:>8.1} MiB  {}",
                    m.name,
                    m.bytes as f64 / (1 << 20) as f64,
                    m.path.display()
                );
            }
            for k in KNOWN_MODELS
                .iter()
                .filter(|k| !pulled.iter().any(|m| m.name == k.name))
            {
                println!(
                    "{:<28} (not pulled: `tessera model pull {}`)",
                    k.name, k.name
                );
            }
        }
    }
    Ok(())
}

/// Resolves `--model`, pulling a known model first when it is missing, so one command takes a
/// fresh machine to an answer.
pub fn resolve_or_pull(spec: &str) -> Result<tessera_hub::ModelLocation> {
    let cache = ModelCache::from_env()?;
    match tessera_hub::resolve(spec, &cache) {
        Ok(loc) => Ok(loc),
        Err(e) if KNOWN_MODELS.iter().any(|k| k.name == spec) => {
            eprintln!("{spec} is not in the cache ({e}); pulling it");
            tessera_hub::pull(spec, &cache, &Bar::new())?;
            Ok(tessera_hub::resolve(spec, &cache)?)
        }
        Err(e) => Err(e.into()),
    }
}
