//! The tessera coordinator: the public gRPC API, request validation, the shard planner, the
//! cluster state, worker registry and liveness, and the continuous-batching scheduler.

pub mod config;
pub mod error;
pub mod footprint;
pub mod planner;
pub mod state;

pub use config::CoordinatorConfig;
pub use error::CoordinatorError;
