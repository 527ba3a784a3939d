//! The cluster's certificates and TLS.
//!
//! The cluster protocol (Raft, worker registration, shard loading, steps) is for certified
//! members only: every coordinator and worker holds a certificate from the cluster's CA that
//! names its role and name ([`Identity`]), presents it on every connection it opens and demands
//! one on every connection it accepts ([`ClusterTls`]). What each role may call is decided by
//! the services from the identity [`ClusterTls::authorize`] returns.
//!
//! - [`identity`](Identity): roles, names, and how a certificate carries them;
//! - [`Authority`]: the CA, issuing member certificates into a directory (`tessera certs`);
//! - [`MemberFiles`] → [`Member`]: a member's files, checked at start-up;
//! - [`ClusterTls`]: server configuration, endpoints to peers, authorization, and the rustls
//!   configurations of the workers' peer port (whose connections' identity
//!   [`peer_identity`] reads);
//! - [`ServerIdentity`]: TLS on the public API (gRPC and HTTP);
//! - [`Gate`]: connection hygiene on every port (a connection limit that pushes out the most
//!   silent connection, an idle timeout).

mod authority;
mod cluster;
mod error;
mod identity;
mod limits;
mod peer;
mod public;
mod verify;

pub use authority::{Authority, CA_CERT, CA_KEY, Issued, member_files};
pub use cluster::{ClusterTls, HANDSHAKE_TIMEOUT, Member, MemberFiles};
pub use error::TlsError;
pub use identity::{DOMAIN, Identity, Role};
pub use limits::{
    EVICT_AFTER, Gate, GateStats, Guarded, KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT, Limits,
};
pub use peer::peer_identity;
pub use public::ServerIdentity;
