//! Start-up checks of certificate files, so that a misconfigured member fails when it starts
//! with a message naming the file — not at its first handshake, as a peer's opaque TLS alert.
//!
//! rustls verifies every chain again at every handshake; these checks only move the common
//! mistakes (the wrong CA, a key from another certificate, an expired certificate) to start-up.

use std::path::Path;

use rcgen::{KeyPair, PublicKeyData};
use x509_parser::pem::Pem;
use x509_parser::prelude::X509Certificate;

use crate::error::TlsError;
use crate::identity::Identity;

/// The single certificate in a PEM file's text.
pub(crate) fn one_cert(path: &Path, pem_text: &str) -> Result<Pem, TlsError> {
    let mut pems = Pem::iter_from_buffer(pem_text.as_bytes());
    let first = pems.next().ok_or_else(|| TlsError::Pem {
        path: path.to_owned(),
        reason: "holds no PEM block".into(),
    })?;
    let pem = first.map_err(|e| TlsError::Pem {
        path: path.to_owned(),
        reason: format!("not PEM: {e}"),
    })?;
    if pem.label != "CERTIFICATE" {
        return Err(TlsError::Pem {
            path: path.to_owned(),
            reason: format!("holds a {:?} block, not a CERTIFICATE", pem.label),
        });
    }
    Ok(pem)
}

fn parse<'a>(path: &Path, pem: &'a Pem) -> Result<X509Certificate<'a>, TlsError> {
    pem.parse_x509().map_err(|e| TlsError::Pem {
        path: path.to_owned(),
        reason: format!("not an X.509 certificate: {e}"),
    })
}

/// Checks that `key` is the private key of the certificate in `cert_pem`.
pub(crate) fn key_matches(path: &Path, cert_pem: &str, key: &KeyPair) -> Result<(), TlsError> {
    let pem = one_cert(path, cert_pem)?;
    let cert = parse(path, &pem)?;
    if cert.public_key().subject_public_key.data.as_ref() != key.der_bytes() {
        return Err(TlsError::Mismatch {
            path: path.to_owned(),
            reason: "the private key is not this certificate's".into(),
        });
    }
    Ok(())
}

/// Checks a member certificate against the CA and returns the identity it names: the CA is a
/// CA, the member certificate is signed by it and valid now, and names one identity.
pub(crate) fn member(
    ca_path: &Path,
    ca_pem: &str,
    cert_path: &Path,
    cert_pem: &str,
) -> Result<Identity, TlsError> {
    let ca_block = one_cert(ca_path, ca_pem)?;
    let ca = parse(ca_path, &ca_block)?;
    if !ca.is_ca() {
        return Err(TlsError::Mismatch {
            path: ca_path.to_owned(),
            reason: "is not a CA certificate".into(),
        });
    }
    let block = one_cert(cert_path, cert_pem)?;
    let cert = parse(cert_path, &block)?;
    cert.verify_signature(Some(ca.public_key()))
        .map_err(|_| TlsError::Mismatch {
            path: cert_path.to_owned(),
            reason: format!("was not issued by the CA in {}", ca_path.display()),
        })?;
    if !cert.validity().is_valid() {
        return Err(TlsError::Mismatch {
            path: cert_path.to_owned(),
            reason: format!(
                "is not valid now (valid from {} to {})",
                cert.validity().not_before,
                cert.validity().not_after
            ),
        });
    }
    Identity::from_cert(&cert).map_err(|e| TlsError::Mismatch {
        path: cert_path.to_owned(),
        reason: e.to_string(),
    })
}
