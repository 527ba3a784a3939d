//! One module per subcommand, and what several of them share.

pub mod bench;
pub mod bench_cluster;
pub mod bench_embed;
pub mod bench_failover;
mod bench_ring;
mod bench_tp;
pub mod certs;
pub mod client;
pub mod cluster;
pub mod generate;
pub mod health;
pub mod model;
pub mod plan;
pub mod process;
pub mod request;
mod scale;
pub mod serve;
pub mod status;
pub mod up;

/// The async runtime for the commands that talk gRPC.
///
/// # Errors
/// When the runtime cannot start (no threads, no epoll).
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}
