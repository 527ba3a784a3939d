//! [`ClusterTls`]: how one member speaks the cluster protocol — mutual TLS with its own
//! certificate (the default), or in the clear behind `--insecure-cluster`.
//!
//! Three uses, one value:
//! - **serving**: [`ClusterTls::server_tls`] is the tonic server configuration that demands a
//!   client certificate from the cluster's CA (a handshake without one fails before any gRPC
//!   byte is read) and bounds the handshake's time;
//! - **dialing**: [`ClusterTls::endpoint`] turns a peer's address into an endpoint that presents
//!   this member's certificate and accepts only a server certified for the expected role;
//! - **the workers' peer port**: [`ClusterTls::peer_server_config`] and
//!   [`ClusterTls::peer_client_config`] are the rustls configurations of the direct links
//!   between the ranks of a stage group, which are not gRPC (`crate::peer`);
//! - **authorizing**: [`ClusterTls::authorize`] reads the verified identity of the caller of a
//!   request and checks its role. Each service states which roles may call which method; what
//!   an identity may do beyond its role (a Raft sender's id, a worker's heartbeats, a pipeline's
//!   upstream) the service checks against the identity returned.
//!
//! In insecure mode nothing is encrypted and `authorize` returns no identity: every caller is
//! admitted, as before mutual TLS existed. It exists for debugging and must be asked for.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rcgen::KeyPair;
use tonic::transport::{
    Certificate, ClientTlsConfig, Endpoint, Identity as TlsIdentity, ServerTlsConfig,
};
use tonic::{Request, Status};

use crate::authority::{CA_CERT, member_files, read};
use crate::error::TlsError;
use crate::identity::{Identity, Role};
use crate::peer::PeerConfigs;
use crate::verify;

/// How long a TLS handshake may take on either side; a peer that opens a connection and sends
/// nothing holds a slot no longer than this.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// The three files a member needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberFiles {
    /// The cluster CA's certificate.
    pub ca: PathBuf,
    /// This member's certificate.
    pub cert: PathBuf,
    /// This member's private key.
    pub key: PathBuf,
}

impl MemberFiles {
    /// The files of `identity` in a certificate directory made by `tessera certs`.
    pub fn in_dir(dir: &Path, identity: &Identity) -> Self {
        let (cert, key) = member_files(dir, identity);
        Self {
            ca: dir.join(CA_CERT),
            cert,
            key,
        }
    }

    /// Reads and checks the files: the certificate chains to the CA, is valid now, names an
    /// identity, and the key is its own.
    ///
    /// # Errors
    /// The [`TlsError`] naming the file at fault.
    pub fn load(&self) -> Result<Member, TlsError> {
        let ca_pem = read(&self.ca)?;
        let cert_pem = read(&self.cert)?;
        let key_pem = read(&self.key)?;
        let identity = verify::member(&self.ca, &ca_pem, &self.cert, &cert_pem)?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| TlsError::Pem {
            path: self.key.clone(),
            reason: format!("not a private key: {e}"),
        })?;
        verify::key_matches(&self.cert, &cert_pem, &key)?;
        let peer = PeerConfigs::build(
            (&self.ca, &ca_pem),
            (&self.cert, &cert_pem),
            (&self.key, &key),
        )?;
        Ok(Member {
            identity,
            ca_pem,
            cert_pem,
            key_pem,
            peer,
        })
    }
}

/// A member's checked credentials.
#[derive(Clone)]
pub struct Member {
    identity: Identity,
    ca_pem: String,
    cert_pem: String,
    key_pem: String,
    /// The peer port's configurations, built once here rather than per connection.
    peer: PeerConfigs,
}

impl std::fmt::Debug for Member {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Member")
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

impl Member {
    /// Who this member is.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }
}

/// How this member speaks the cluster protocol; cheap to clone.
#[derive(Clone, Debug)]
pub struct ClusterTls {
    member: Option<Arc<Member>>,
}

impl ClusterTls {
    /// Mutual TLS as `member`.
    pub fn mutual(member: Member) -> Self {
        Self {
            member: Some(Arc::new(member)),
        }
    }

    /// No TLS and no checks (`--insecure-cluster`).
    pub fn insecure() -> Self {
        Self { member: None }
    }

    /// Whether this is mutual TLS.
    pub fn is_mutual(&self) -> bool {
        self.member.is_some()
    }

    /// This member's identity (`None` when insecure).
    pub fn identity(&self) -> Option<&Identity> {
        self.member.as_deref().map(Member::identity)
    }

    /// The server side: this member's certificate, client certificates required from the CA,
    /// handshakes bounded by [`HANDSHAKE_TIMEOUT`]; `None` when insecure.
    pub fn server_tls(&self) -> Option<ServerTlsConfig> {
        let m = self.member.as_deref()?;
        Some(
            ServerTlsConfig::new()
                .identity(TlsIdentity::from_pem(&m.cert_pem, &m.key_pem))
                .client_ca_root(Certificate::from_pem(&m.ca_pem))
                .timeout(HANDSHAKE_TIMEOUT),
        )
    }

    /// The workers' peer port, accepting: TLS 1.3 with this member's certificate, a client
    /// certificate of the cluster's CA required (`crate::peer`); `None` when insecure. The
    /// caller checks the client's role with [`crate::peer_identity`].
    pub fn peer_server_config(&self) -> Option<Arc<rustls::ServerConfig>> {
        self.member.as_deref().map(|m| Arc::clone(&m.peer.server))
    }

    /// The workers' peer port, dialling: TLS 1.3 presenting this member's certificate, for a
    /// server certified as [`Role::Worker`] (the server name is
    /// `Role::Worker.server_name()`, as [`ClusterTls::endpoint`] checks for gRPC); `None` when
    /// insecure.
    pub fn peer_client_config(&self) -> Option<Arc<rustls::ClientConfig>> {
        self.member.as_deref().map(|m| Arc::clone(&m.peer.client))
    }

    /// An endpoint to the peer at `address` (`host:port`, or a URL whose scheme is replaced),
    /// which must hold a certificate for `peer`'s role.
    ///
    /// # Errors
    /// INVALID_ARGUMENT naming `address` when it is not a valid URI.
    pub fn endpoint(&self, address: &str, peer: Role) -> Result<Endpoint, Status> {
        let authority = address.split_once("://").map_or(address, |(_, rest)| rest);
        let scheme = if self.is_mutual() { "https" } else { "http" };
        let endpoint = Endpoint::from_shared(format!("{scheme}://{authority}")).map_err(|e| {
            Status::invalid_argument(format!(
                "address {:?}: {e}",
                crate::identity::shorten(address)
            ))
        })?;
        let Some(m) = self.member.as_deref() else {
            return Ok(endpoint);
        };
        endpoint
            .tls_config(
                ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(&m.ca_pem))
                    .identity(TlsIdentity::from_pem(&m.cert_pem, &m.key_pem))
                    .domain_name(peer.server_name())
                    .timeout(HANDSHAKE_TIMEOUT),
            )
            .map_err(|e| Status::internal(format!("TLS configuration: {e}")))
    }

    /// The verified identity of `request`'s caller, if its role is one of `allowed`.
    /// Insecure mode admits every caller and returns `None`.
    ///
    /// # Errors
    /// UNAUTHENTICATED when the caller presented no certificate naming an identity (which the
    /// handshake already prevents); PERMISSION_DENIED naming the caller's role and the roles
    /// allowed, when its role is not one of them.
    pub fn authorize<T>(
        &self,
        request: &Request<T>,
        allowed: &[Role],
    ) -> Result<Option<Identity>, Status> {
        if self.member.is_none() {
            return Ok(None);
        }
        let certs = request.peer_certs().ok_or_else(|| {
            Status::unauthenticated("the cluster protocol requires a member certificate")
        })?;
        let leaf = certs.first().ok_or_else(|| {
            Status::unauthenticated("the cluster protocol requires a member certificate")
        })?;
        let identity = Identity::from_der(leaf)
            .map_err(|e| Status::unauthenticated(format!("member certificate: {e}")))?;
        if !allowed.contains(&identity.role()) {
            let allowed: Vec<&str> = allowed.iter().map(|r| r.label()).collect();
            return Err(Status::permission_denied(format!(
                "{identity} may not call this (only: {})",
                allowed.join(", ")
            )));
        }
        Ok(Some(identity))
    }
}
