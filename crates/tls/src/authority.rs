//! The cluster's certificate authority and the certificate directory `tessera certs` fills.
//!
//! A directory holds `ca.pem` (the CA certificate every member trusts), `ca.key` (its private
//! key: keep it off the nodes where you can) and, per member, `<role>-<name>.pem` and
//! `<role>-<name>.key` ([`Identity::file_stem`]). Keys are written readable by their owner
//! only. Issuing into a directory keeps what is already valid there: a member's files are
//! rewritten only when missing or not issued by this CA for this identity, so running
//! `tessera certs` again to add a worker leaves the others' certificates alone.
//!
//! Keys are ECDSA P-256 (fast handshakes, small certificates); the CA is valid for ten years,
//! members for two (a start-of-validity a day back tolerates clock skew between machines).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use time::{Duration, OffsetDateTime};

use crate::error::TlsError;
use crate::identity::{DOMAIN, Identity};
use crate::verify;

/// The CA certificate's file name in a certificate directory.
pub const CA_CERT: &str = "ca.pem";
/// The CA key's file name in a certificate directory.
pub const CA_KEY: &str = "ca.key";

/// A cluster CA that can issue member certificates.
pub struct Authority {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority").finish_non_exhaustive()
    }
}

/// A member certificate and its private key, PEM-encoded.
#[derive(Clone)]
pub struct Issued {
    /// The certificate.
    pub cert_pem: String,
    /// The private key (PKCS#8).
    pub key_pem: String,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued").finish_non_exhaustive()
    }
}

impl Authority {
    /// A new CA with a fresh key.
    ///
    /// # Errors
    /// [`TlsError::Issue`] when key generation or signing fails.
    pub fn generate() -> Result<Self, TlsError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("tessera cluster CA ({DOMAIN})"));
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::days(1);
        params.not_after = now + Duration::days(3650);
        let cert = params.self_signed(&key)?;
        Ok(Self {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// The CA in `dir` (`ca.pem`, `ca.key`).
    ///
    /// # Errors
    /// [`TlsError::Io`] / [`TlsError::Pem`] when either file is missing or unreadable;
    /// [`TlsError::Mismatch`] when the key is not the certificate's.
    pub fn load(dir: &Path) -> Result<Self, TlsError> {
        let cert_path = dir.join(CA_CERT);
        let key_path = dir.join(CA_KEY);
        let cert_pem = read(&cert_path)?;
        let key_pem = read(&key_path)?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| TlsError::Pem {
            path: key_path.clone(),
            reason: format!("not a private key: {e}"),
        })?;
        verify::key_matches(&cert_path, &cert_pem, &key)?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key).map_err(|e| TlsError::Pem {
            path: cert_path,
            reason: format!("not a CA certificate: {e}"),
        })?;
        Ok(Self { cert_pem, issuer })
    }

    /// The CA in `dir`, created (with the directory) when `dir` has none.
    ///
    /// # Errors
    /// As [`Authority::load`], and [`TlsError::Io`] when the files cannot be written.
    pub fn open_or_create(dir: &Path) -> Result<(Self, bool), TlsError> {
        if dir.join(CA_CERT).exists() || dir.join(CA_KEY).exists() {
            return Ok((Self::load(dir)?, false));
        }
        fs::create_dir_all(dir).map_err(|source| TlsError::Io {
            path: dir.to_owned(),
            source,
        })?;
        let ca = Self::generate()?;
        write(&dir.join(CA_KEY), &ca.issuer.key().serialize_pem(), true)?;
        write(&dir.join(CA_CERT), &ca.cert_pem, false)?;
        Ok((ca, true))
    }

    /// The CA certificate (PEM).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// A certificate for `identity`, with a fresh key, valid for two years.
    ///
    /// # Errors
    /// [`TlsError::Issue`] when key generation or signing fails.
    pub fn issue(&self, identity: &Identity) -> Result<Issued, TlsError> {
        let params =
            CertificateParams::new(vec![identity.dns_name(), identity.role().server_name()])?;
        // Every member is a server (its port) and a client (it dials peers).
        self.sign(
            params,
            identity.dns_name(),
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        )
    }

    /// A server certificate for the public API, for `names` (host names or IP addresses), with
    /// a fresh key, valid for two years. It names no cluster identity: it cannot be used on
    /// the cluster protocol.
    ///
    /// # Errors
    /// [`TlsError::Issue`] when a name is not a valid DNS name or IP address, or signing fails.
    pub fn issue_public(&self, names: &[String]) -> Result<Issued, TlsError> {
        let params = CertificateParams::new(names.to_vec())?;
        let common = names.first().cloned().unwrap_or_default();
        self.sign(params, common, vec![ExtendedKeyUsagePurpose::ServerAuth])
    }

    /// Completes `params` as an end-entity certificate (`common` name, `usages`, valid from a
    /// day ago for two years) and signs it, with a fresh key.
    fn sign(
        &self,
        mut params: CertificateParams,
        common: String,
        usages: Vec<ExtendedKeyUsagePurpose>,
    ) -> Result<Issued, TlsError> {
        let key = KeyPair::generate()?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common);
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = usages;
        params.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::days(1);
        params.not_after = now + Duration::days(730);
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Writes the public API's certificate for `names` into `dir` as `public.pem` /
    /// `public.key` (replacing any); returns the certificate's path.
    ///
    /// # Errors
    /// As [`Authority::issue_public`], and [`TlsError::Io`].
    pub fn issue_public_into(&self, dir: &Path, names: &[String]) -> Result<PathBuf, TlsError> {
        let issued = self.issue_public(names)?;
        let (cert, key) = (dir.join("public.pem"), dir.join("public.key"));
        write(&key, &issued.key_pem, true)?;
        write(&cert, &issued.cert_pem, false)?;
        Ok(cert)
    }

    /// Writes a certificate for `identity` into `dir` unless a valid one issued by this CA is
    /// there; returns the certificate's path and whether it was written.
    ///
    /// # Errors
    /// [`TlsError::Issue`] or [`TlsError::Io`].
    pub fn issue_into(&self, dir: &Path, identity: &Identity) -> Result<(PathBuf, bool), TlsError> {
        let (cert_path, key_path) = member_files(dir, identity);
        if cert_path.exists() && key_path.exists() {
            let kept = crate::MemberFiles {
                ca: dir.join(CA_CERT),
                cert: cert_path.clone(),
                key: key_path.clone(),
            }
            .load()
            .is_ok_and(|m| m.identity() == identity);
            if kept {
                return Ok((cert_path, false));
            }
        }
        let issued = self.issue(identity)?;
        write(&key_path, &issued.key_pem, true)?;
        write(&cert_path, &issued.cert_pem, false)?;
        Ok((cert_path, true))
    }
}

/// The certificate and key files of `identity` in a certificate directory.
pub fn member_files(dir: &Path, identity: &Identity) -> (PathBuf, PathBuf) {
    let stem = identity.file_stem();
    (
        dir.join(format!("{stem}.pem")),
        dir.join(format!("{stem}.key")),
    )
}

pub(crate) fn read(path: &Path) -> Result<String, TlsError> {
    fs::read_to_string(path).map_err(|source| TlsError::Io {
        path: path.to_owned(),
        source,
    })
}

/// Writes `text` to `path` (replacing it), readable by the owner only when `secret`.
fn write(path: &Path, text: &str, secret: bool) -> Result<(), TlsError> {
    let io = |source| TlsError::Io {
        path: path.to_owned(),
        source,
    };
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(if secret { 0o600 } else { 0o644 });
    }
    let mut file = options.open(path).map_err(io)?;
    #[cfg(unix)]
    if secret {
        // `mode` applies only to a file it creates; one that was there keeps its bits.
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(fs::Permissions::from_mode(0o600))
            .map_err(io)?;
    }
    file.write_all(text.as_bytes()).map_err(io)?;
    file.sync_all().map_err(io)
}
