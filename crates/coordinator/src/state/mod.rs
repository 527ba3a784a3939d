//! What the coordinator knows: the replicated cluster state and what is derived from it.
//!
//! - [`cluster_state`]: [`ClusterState`] and the [`Command`]s that change it, the Raft state
//!   machine's value;
//! - [`replica`]: this node's copy of it, applied from the Raft log;
//! - [`planner`]: the pure function from workers and model footprint to a shard plan;
//! - [`footprint`]: what each part of a model costs to hold;
//! - [`cluster`]: the shared context the services and control tasks hold (configuration,
//!   replica, Raft handle, worker liveness, serving plan).

pub(crate) mod cluster;
pub mod cluster_state;
pub mod footprint;
pub mod planner;
pub mod replica;

pub use cluster_state::{ClusterState, Command, StateError, WorkerRecord};
