//! TLS on the workers' peer port: the rustls configurations the ranks of a tensor-parallel
//! group or ring use on their direct links ([`PeerConfigs`], built once from a member's
//! checked PEMs), and who the other end of such a link is ([`peer_identity`]).
//!
//! The peer port is not gRPC: ranks exchange frames over their own non-blocking sockets (a
//! reduction is on the critical path of every layer), so the worker drives rustls itself
//! (tessera-worker's `group/secure.rs`) and takes these configurations from
//! [`crate::ClusterTls`]. Nothing older has to be spoken there, so they are narrower than the
//! cluster port's:
//! - TLS 1.3 only, with the ring provider (the one rcgen signs with);
//! - the server demands a client certificate of the cluster's CA, of any role: the worker
//!   refuses every role but `worker` after the handshake, by [`peer_identity`], so that the
//!   refusal can name who was refused;
//! - the client presents this member's certificate and accepts a server only under the name
//!   `worker.tessera.internal`, which only worker certificates carry;
//! - no session resumption: links live as long as their group, and a session ticket would be
//!   one more secret to keep for nothing.

use std::path::Path;
use std::sync::Arc;

use rcgen::KeyPair;
use rustls::client::Resumption;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls::{ClientConfig, CommonState, RootCertStore, ServerConfig};

use crate::error::TlsError;
use crate::identity::Identity;
use crate::verify;

/// The two sides of a member's peer links: accepting (server) and dialling (client).
#[derive(Clone)]
pub(crate) struct PeerConfigs {
    /// Accepting a rank's connection on the peer port.
    pub server: Arc<ServerConfig>,
    /// Dialling another rank's peer port.
    pub client: Arc<ClientConfig>,
}

impl PeerConfigs {
    /// Builds both configurations from a member's files, already checked by
    /// [`crate::MemberFiles::load`]: the CA certificate in `ca_pem` (read from `ca_path`), the
    /// member's certificate in `cert_pem` (from `cert_path`) and its `key` (from `key_path`).
    ///
    /// # Errors
    /// [`TlsError::Pem`] naming the file rustls does not accept.
    pub(crate) fn build(
        (ca_path, ca_pem): (&Path, &str),
        (cert_path, cert_pem): (&Path, &str),
        (key_path, key): (&Path, &KeyPair),
    ) -> Result<Self, TlsError> {
        let refused = |path: &Path, what: &str, e: &dyn std::fmt::Display| TlsError::Pem {
            path: path.to_owned(),
            reason: format!("{what}: {e}"),
        };
        let ca = CertificateDer::from(verify::one_cert(ca_path, ca_pem)?.contents);
        let cert = CertificateDer::from(verify::one_cert(cert_path, cert_pem)?.contents);
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let mut roots = RootCertStore::empty();
        roots
            .add(ca)
            .map_err(|e| refused(ca_path, "not a usable CA certificate", &e))?;
        let roots = Arc::new(roots);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::clone(&roots), Arc::clone(&provider))
                .build()
                .map_err(|e| refused(ca_path, "client verifier", &e))?;
        let mut server = ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| refused(cert_path, "TLS 1.3", &e))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(vec![cert.clone()], key.clone_key())
            .map_err(|e| refused(key_path, "server key", &e))?;
        server.send_tls13_tickets = 0;
        server.session_storage = Arc::new(NoServerSessionStorage {});

        let mut client = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| refused(cert_path, "TLS 1.3", &e))?
            .with_root_certificates(roots)
            .with_client_auth_cert(vec![cert], key)
            .map_err(|e| refused(key_path, "client key", &e))?;
        client.resumption = Resumption::disabled();
        Ok(Self {
            server: Arc::new(server),
            client: Arc::new(client),
        })
    }
}

/// The identity the other end of a completed peer-port handshake proved: the first
/// certificate it presented, which rustls has verified against the cluster's CA (the server
/// side demands one; the client side always gets the server's).
///
/// # Errors
/// [`TlsError::NoIdentity`] when the peer presented no certificate (the handshake is not
/// complete) or its certificate names no identity.
pub fn peer_identity(conn: &CommonState) -> Result<Identity, TlsError> {
    let leaf = conn
        .peer_certificates()
        .and_then(<[CertificateDer<'static>]>::first)
        .ok_or_else(|| TlsError::NoIdentity {
            reason: "the peer presented no certificate".into(),
        })?;
    Identity::from_der(leaf)
}
