//! The coordinator's gRPC services: what arrives on its two ports.
//!
//! - [`api`]: `tessera.v1.Inference` (public port), validating each request once
//!   ([`validate`], [`embed`] for Embed) and handing it to the scheduler (the embedding
//!   scheduler on a cluster that serves an encoder);
//! - [`forward`]: `tessera.cluster.v1.Forward`, and the client a follower uses to hand calls to
//!   the leader; [`relay`]: a forwarded generate stream, resumed on the next leader when the
//!   leader dies;
//! - [`auth`]: API keys, checked on the public gRPC service and the HTTP API;
//! - [`registry`]: `tessera.cluster.v1.Coordination`, where workers register and heartbeat.
//!
//! Services only translate and delegate: scheduling, planning and liveness are control tasks
//! ([`crate::control`]); what they read and change is the replicated state ([`crate::state`]).

pub mod api;
pub mod auth;
pub mod embed;
pub(crate) mod forward;
pub(crate) mod registry;
pub(crate) mod relay;
pub mod validate;
