//! The `tessera` binary: model management, embedded generation and benchmarks.
//!
//! Subcommands live in `commands/`, one file each; this file only parses arguments, sets up
//! logging and dispatches.

mod commands;
mod progress;

use clap::{Parser, Subcommand};

/// tessera — distributed inference for transformer language models.
#[derive(Parser, Debug)]
#[command(name = "tessera", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Manage the model cache.
    #[command(subcommand)]
    Model(commands::model::ModelCommand),
    /// Generate text with the embedded engine, streaming it as it is produced.
    Generate(commands::generate::GenerateArgs),
    /// Measure decode and prefill speed side by side with llama.cpp.
    Bench(commands::bench::BenchArgs),
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TESSERA_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Model(cmd) => commands::model::run(cmd),
        Command::Generate(args) => commands::generate::run(args),
        Command::Bench(args) => commands::bench::run(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
