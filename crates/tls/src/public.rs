//! TLS on the public API (`--tls-cert` / `--tls-key`): one server certificate, from any CA the
//! clients trust, for both the gRPC port (through tonic) and the HTTP port (through
//! tokio-rustls, which tonic uses too). Clients are not asked for certificates: the public API
//! authenticates them by API key.

use std::path::Path;
use std::sync::Arc;

use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tonic::transport::{Identity as TlsIdentity, ServerTlsConfig};

use crate::authority::read;
use crate::cluster::HANDSHAKE_TIMEOUT;
use crate::error::TlsError;

/// A server certificate (with its chain) and key, checked when loaded; cheap to clone.
#[derive(Clone)]
pub struct ServerIdentity {
    cert_pem: Arc<str>,
    key_pem: Arc<str>,
    rustls: Arc<rustls::ServerConfig>,
}

impl std::fmt::Debug for ServerIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerIdentity").finish_non_exhaustive()
    }
}

impl ServerIdentity {
    /// Reads the certificate chain (leaf first) and the private key.
    ///
    /// # Errors
    /// [`TlsError::Io`] / [`TlsError::Pem`] naming the file, or [`TlsError::Mismatch`] when
    /// the key is not the certificate's.
    pub fn load(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let cert_pem = read(cert)?;
        let key_pem = read(key)?;
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(cert_pem.as_bytes())
                .collect::<Result<_, _>>()
                .map_err(|e| TlsError::Pem {
                    path: cert.to_owned(),
                    reason: format!("not a PEM certificate chain: {e}"),
                })?;
        if chain.is_empty() {
            return Err(TlsError::Pem {
                path: cert.to_owned(),
                reason: "holds no certificate".into(),
            });
        }
        let private =
            PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| TlsError::Pem {
                path: key.to_owned(),
                reason: format!("not a PEM private key: {e}"),
            })?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Mismatch {
                path: cert.to_owned(),
                reason: format!("TLS configuration: {e}"),
            })?
            .with_no_client_auth()
            .with_single_cert(chain, private)
            .map_err(|e| TlsError::Mismatch {
                path: cert.to_owned(),
                reason: format!("does not go with the key in {}: {e}", key.display()),
            })?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self {
            cert_pem: cert_pem.into(),
            key_pem: key_pem.into(),
            rustls: Arc::new(config),
        })
    }

    /// The gRPC server's TLS (no client certificates; handshakes bounded).
    pub fn grpc(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(TlsIdentity::from_pem(&*self.cert_pem, &*self.key_pem))
            .timeout(HANDSHAKE_TIMEOUT)
    }

    /// An acceptor for the HTTP port (HTTP/1.1 by ALPN).
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(Arc::clone(&self.rustls))
    }
}
