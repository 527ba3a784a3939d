//! The `tessera` binary: the cluster's processes (coordinator, worker, a whole local cluster),
//! its clients (generate, status), model management and benchmarks.
//!
//! Subcommands live in `commands/`, one file each; this file only parses arguments, sets up
//! logging and dispatches.

#![forbid(unsafe_code)]

mod commands;
mod progress;
mod telemetry;

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
    /// Start a local cluster (a coordinator and workers as child processes).
    Up(commands::up::UpArgs),
    /// Run a coordinator: the public API (--listen), the cluster protocol (--cluster-listen),
    /// the planner and the scheduler.
    Coordinator(commands::serve::CoordinatorArgs),
    /// Run a worker: holds one shard of the model and executes pipeline steps.
    Worker(commands::serve::WorkerArgs),
    /// Generate text from a cluster (or the embedded engine), streaming it as it is produced.
    Generate(commands::generate::GenerateArgs),
    /// Plan a described cluster and predict its decode speed (`--simulate CLUSTER.yaml`).
    Plan(commands::plan::PlanArgs),
    /// Show a cluster's workers, plan and memory.
    Status(commands::status::StatusArgs),
    /// Change the replicated coordinators' membership (dials a coordinator's cluster port).
    #[command(subcommand)]
    Cluster(commands::cluster::ClusterCommand),
    /// Create the cluster's CA and member certificates (mutual TLS on the cluster protocol).
    Certs(commands::certs::CertsArgs),
    /// Check a process's grpc.health.v1 status (exit 0 when SERVING), for container probes.
    Health(commands::health::HealthArgs),
    /// Measure leader failover: kill -9 the Raft leader repeatedly, time kill -> first answer.
    BenchFailover(commands::bench_failover::BenchFailoverArgs),
    /// Measure decode and prefill speed side by side with llama.cpp.
    Bench(commands::bench::BenchArgs),
    /// Measure what pipeline sharding costs: 1, 2, 3 workers against the embedded engine.
    BenchCluster(commands::bench_cluster::BenchClusterArgs),
    /// Measure sentence-embedding throughput side by side with sentence-transformers.
    BenchEmbed(commands::bench_embed::BenchEmbedArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // The servers install their own telemetry (span export needs their runtime).
    if !matches!(cli.command, Command::Coordinator(_) | Command::Worker(_)) {
        telemetry::init_logging();
    }
    let result = match cli.command {
        Command::Model(cmd) => commands::model::run(cmd),
        Command::Up(args) => commands::up::run(args),
        Command::Certs(args) => commands::certs::run(&args),
        Command::Coordinator(args) => commands::serve::run_coordinator(args),
        Command::Worker(args) => commands::serve::run_worker(args),
        Command::Generate(args) => commands::generate::run(args),
        Command::Plan(args) => commands::plan::run(args),
        Command::Status(args) => {
            commands::runtime().and_then(|rt| rt.block_on(commands::status::run(args)))
        }
        Command::Cluster(cmd) => {
            commands::runtime().and_then(|rt| rt.block_on(commands::cluster::run(cmd)))
        }
        Command::Health(args) => {
            commands::runtime().and_then(|rt| rt.block_on(commands::health::run(args)))
        }
        Command::Bench(args) => commands::bench::run(args),
        Command::BenchCluster(args) => commands::bench_cluster::run(args),
        Command::BenchFailover(args) => commands::bench_failover::run(args),
        Command::BenchEmbed(args) => commands::bench_embed::run(&args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
