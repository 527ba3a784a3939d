//! A tessera worker: loads one shard of a model (a stage of the pipeline) and runs batched
//! steps for the coordinator, passing hidden states straight to the next stage.
//!
//! - [`serve`] / [`start`] ([`server`]): the process — Worker and health services, registration.
//! - `shard` / `executor`: the dedicated compute thread that owns the model, KV cache and
//!   sequences; [`ShardHandle`] is its cloneable front.
//! - `pipeline`: one inbound Pipeline stream and its outbound stream to the next stage, with
//!   up to [`MAX_IN_FLIGHT`] steps in flight on it.
//! - `group`: tensor-parallel groups — the peer port, the links between ranks, the reduction.
//! - `register`: registration and heartbeats.
//! - [`DeviceChoice`] / [`Backend`]: the device shards run on (`--device`), decided at start.
//! - [`Failpoint`]: faults a test arms (`--failpoint`), off in production.
//! - `metrics`: the Prometheus metrics served on `--metrics-listen`.
//! - [`hidden`]: hidden states on the wire.

#![forbid(unsafe_code)]

mod config;
mod device;
mod error;
mod executor;
mod failpoint;
#[doc(hidden)]
pub mod fuzz;
mod group;
pub mod hidden;
mod memory;
mod metrics;
mod model_paths;
mod parts;
mod pipeline;
mod prefix;
mod register;
mod seqs;
pub mod server;
mod service;
mod shard;

pub use config::{Capacity, WorkerConfig};
pub use device::{Backend, DeviceChoice};
pub use error::WorkerError;
pub use failpoint::Failpoint;
pub use memory::resident_bytes;
pub use model_paths::ModelPaths;
pub use pipeline::MAX_IN_FLIGHT;
pub use seqs::StreamId;
pub use server::{RunningWorker, serve, start};
pub use shard::{ShardHandle, ShardStatus};
