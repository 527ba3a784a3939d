//! Generated code for the `tessera.v1` protos (`proto/tessera/v1`): messages, clients and
//! servers for the public `Inference` API and the `Coordination` / `Worker` services, and how
//! clients read a stream torn by a dead server ([`status`]).

#![forbid(unsafe_code)]

/// `tessera.v1`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("tessera.v1");
}

pub mod status;
pub mod wire;

/// The encoded file descriptor set of every tessera proto, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("tessera_descriptor");
