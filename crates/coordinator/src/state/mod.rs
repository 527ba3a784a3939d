//! What the coordinator knows: the replicated cluster state and what is derived from it.
//!
//! - [`cluster_state`]: [`ClusterState`] and the [`Command`]s that change it, the Raft state
//!   machine's value;
//! - [`replica`]: this node's copy of it, applied from the Raft log;
//! - [`planner`]: the pure function from workers and model footprint to a shard plan;
//! - [`footprint`]: what each part of a model costs to hold;
//! - [`cluster`]: the shared context the services and control tasks hold (configuration,
//!   replica and Raft handle, serving plan), with the node-local parts beside it:
//!   [`liveness`] (what the leader heard from each worker) and [`signals`] (the scheduler's
//!   load, the plan controller's wake-up).

pub(crate) mod cluster;
pub mod cluster_state;
pub mod footprint;
pub(crate) mod liveness;
pub mod planner;
pub mod replica;
pub(crate) mod signals;

pub use cluster_state::{ClusterState, Command, DeviceRecord, StateError, WorkerRecord};
