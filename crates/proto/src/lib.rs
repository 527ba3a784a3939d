//! Generated code for tessera's protos (`proto/`), in two packages served on two ports: the
//! public API [`v1`] (`tessera.v1.Inference`) and the cluster protocol [`cluster::v1`]
//! (`Coordination`, `Worker`, `Raft`, `Forward`); and how clients read a stream torn by a dead
//! server ([`status`]).

#![forbid(unsafe_code)]

/// `tessera.v1`: the public API, what clients call on a coordinator's public port.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("tessera.v1");
}

/// The cluster protocol, spoken between coordinators and workers on the cluster port.
pub mod cluster {
    /// `tessera.cluster.v1`. Messages shared with the public API (`Capacity`,
    /// `ShardAssignment`, `SamplingParams`, `TokenLogprob`, and the request and response types
    /// of `Forward`) are the [`crate::v1`] types.
    #[allow(missing_docs, clippy::all, clippy::pedantic)]
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/cluster/tessera.cluster.v1.rs"));
    }
}

pub mod status;
pub mod wire;

/// The encoded file descriptor set of the public API (`inference.proto` alone): what server
/// reflection on the public port serves.
pub const PUBLIC_FILE_DESCRIPTOR_SET: &[u8] =
    tonic::include_file_descriptor_set!("tessera_public_descriptor");

/// The encoded file descriptor set of the cluster protocol (with the public file it imports).
/// The cluster port serves no reflection; this is for tests and tools that need the schema.
pub const CLUSTER_FILE_DESCRIPTOR_SET: &[u8] =
    tonic::include_file_descriptor_set!("tessera_cluster_descriptor");
