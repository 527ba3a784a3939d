//! The crate's one error type. Every variant but one happens at start-up or in `tessera certs`
//! (reading, checking or issuing certificates); refusing a peer at run time is a
//! `tonic::Status` ([`crate::ClusterTls::authorize`]), except on the workers' peer port, where
//! [`crate::peer_identity`] reports a certificate naming no identity as
//! [`TlsError::NoIdentity`].

use std::path::PathBuf;

/// Why certificates could not be read, checked or issued.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A file is not the PEM it should be (certificate or private key).
    #[error("{}: {reason}", path.display())]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A certificate names no usable identity.
    #[error("the certificate names no tessera identity: {reason}")]
    NoIdentity {
        /// What is wrong.
        reason: String,
    },
    /// A name is not one a cluster certificate can carry.
    #[error("name {name:?}: {reason}")]
    BadName {
        /// The name (shortened).
        name: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// A node certificate does not chain to the cluster's CA, or its key is not the
    /// certificate's.
    #[error("{}: {reason}", path.display())]
    Mismatch {
        /// The certificate file.
        path: PathBuf,
        /// What does not match.
        reason: String,
    },
    /// Generating a key or signing a certificate failed.
    #[error("issuing a certificate: {0}")]
    Issue(#[from] rcgen::Error),
    /// A certificate directory does not hold what was asked for.
    #[error("{}: {reason}", dir.display())]
    Directory {
        /// The directory.
        dir: PathBuf,
        /// What is missing.
        reason: String,
    },
}
