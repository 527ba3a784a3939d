//! Who a cluster certificate names: a [`Role`] and a name, written into the certificate as DNS
//! subject-alternative names under [`DOMAIN`] and read back from a peer's certificate.
//!
//! A node certificate carries two names:
//! - `<name>.<role>.tessera.internal` — its identity (`1.coordinator.tessera.internal` is Raft
//!   node 1, `w0.worker.tessera.internal` the worker named `w0`);
//! - `<role>.tessera.internal` — what a client checks as the server name when it dials a peer of
//!   that role, since peers are dialed by address and their host names are not known in advance.
//!
//! `.internal` is reserved for private use (ICANN, 2024): these names never resolve, so a public
//! CA can never issue one and a certificate of ours can never be mistaken for a web server's.
//!
//! A peer's identity is trusted only after rustls has verified its chain against the cluster's
//! CA; [`Identity::from_der`] only reads what the verified certificate says.

use std::fmt;

use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::error::TlsError;

/// The suffix of every name in a cluster certificate.
pub const DOMAIN: &str = "tessera.internal";

/// The longest name a node may have: one DNS label.
const MAX_NAME: usize = 63;

/// What a certified member may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// A coordinator (Raft member); its name is its Raft node id.
    Coordinator,
    /// A worker; its name is the name it registers under.
    Worker,
    /// An operator's tool: membership changes (`tessera cluster add-coordinator` …), nothing
    /// else.
    Admin,
}

impl Role {
    /// Every role, for parsing.
    pub const ALL: [Role; 3] = [Role::Coordinator, Role::Worker, Role::Admin];

    /// The role's label in names and file names.
    pub fn label(self) -> &'static str {
        match self {
            Role::Coordinator => "coordinator",
            Role::Worker => "worker",
            Role::Admin => "admin",
        }
    }

    /// The server name a client expects when it dials a peer of this role.
    pub fn server_name(self) -> String {
        format!("{}.{DOMAIN}", self.label())
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// A member of the cluster as its certificate names it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    role: Role,
    name: String,
}

impl Identity {
    /// `role` named `name`.
    ///
    /// # Errors
    /// [`TlsError::BadName`] unless `name` is one DNS label (1–63 of `a-z`, `0-9`, `-`, not
    /// starting or ending with `-`) and, for a coordinator, a Raft node id (a positive integer
    /// without leading zeros).
    pub fn new(role: Role, name: &str) -> Result<Self, TlsError> {
        check_label(name)?;
        if role == Role::Coordinator {
            let id: u64 = name.parse().map_err(|_| TlsError::BadName {
                name: shorten(name),
                reason: "a coordinator's name is its Raft node id (a positive integer)",
            })?;
            if id == 0 || id.to_string() != name {
                return Err(TlsError::BadName {
                    name: shorten(name),
                    reason: "a coordinator's name is its Raft node id (a positive integer)",
                });
            }
        }
        Ok(Self {
            role,
            name: name.to_owned(),
        })
    }

    /// Raft node `id`.
    ///
    /// # Panics
    /// When `id` is 0 (Raft ids start at 1).
    pub fn coordinator(id: u64) -> Self {
        assert!(id > 0, "raft node ids start at 1");
        Self {
            role: Role::Coordinator,
            name: id.to_string(),
        }
    }

    /// The role.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The name (a Raft id for coordinators).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The Raft node id, for a coordinator.
    pub fn coordinator_id(&self) -> Option<u64> {
        (self.role == Role::Coordinator)
            .then(|| self.name.parse().ok())
            .flatten()
    }

    /// The DNS name that carries this identity in a certificate.
    pub fn dns_name(&self) -> String {
        format!("{}.{}.{DOMAIN}", self.name, self.role.label())
    }

    /// The stem of this identity's files in a certificate directory: `coordinator-1`,
    /// `worker-w0`, `admin-ops`.
    pub fn file_stem(&self) -> String {
        format!("{}-{}", self.role.label(), self.name)
    }

    /// The identity a DER certificate names.
    ///
    /// # Errors
    /// [`TlsError::NoIdentity`] when it does not parse as X.509 or names no identity (or more
    /// than one).
    pub fn from_der(der: &[u8]) -> Result<Self, TlsError> {
        let (_, cert) = X509Certificate::from_der(der).map_err(|e| TlsError::NoIdentity {
            reason: format!("not an X.509 certificate: {e}"),
        })?;
        Self::from_cert(&cert)
    }

    pub(crate) fn from_cert(cert: &X509Certificate<'_>) -> Result<Self, TlsError> {
        let san = cert
            .subject_alternative_name()
            .map_err(|e| TlsError::NoIdentity {
                reason: format!("unreadable subject alternative names: {e}"),
            })?
            .ok_or_else(|| TlsError::NoIdentity {
                reason: "the certificate has no subject alternative names".into(),
            })?;
        let mut found = None;
        for name in &san.value.general_names {
            let GeneralName::DNSName(dns) = name else {
                continue;
            };
            let Some(id) = Self::from_dns_name(dns) else {
                continue;
            };
            if found.replace(id).is_some() {
                return Err(TlsError::NoIdentity {
                    reason: "the certificate names more than one identity".into(),
                });
            }
        }
        found.ok_or_else(|| TlsError::NoIdentity {
            reason: format!("no name of the form <name>.<role>.{DOMAIN}"),
        })
    }

    /// Reads `<name>.<role>.tessera.internal`; `None` for any other name.
    fn from_dns_name(dns: &str) -> Option<Self> {
        let rest = dns.strip_suffix(DOMAIN)?.strip_suffix('.')?;
        let (name, role) = rest.rsplit_once('.')?;
        let role = Role::ALL.into_iter().find(|r| r.label() == role)?;
        Self::new(role, name).ok()
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.role, self.name)
    }
}

/// A name as an error may show it: at most 64 characters, so that no error echoes unbounded
/// input.
pub(crate) fn shorten(name: &str) -> String {
    let mut s: String = name.chars().take(MAX_NAME + 1).collect();
    if s.len() < name.len() {
        s.push('…');
    }
    s
}

fn check_label(name: &str) -> Result<(), TlsError> {
    let bad = |reason| {
        Err(TlsError::BadName {
            name: shorten(name),
            reason,
        })
    };
    if name.is_empty() || name.len() > MAX_NAME {
        return bad("a name is 1 to 63 characters");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return bad("a name holds only a-z, 0-9 and '-'");
    }
    if name.starts_with('-') || name.ends_with('-') {
        return bad("a name does not start or end with '-'");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ensures that names outside one DNS label, and coordinators not named by a Raft id, are
    /// refused, and that a refusal never echoes more than 64 characters of the name.
    #[test]
    fn names_are_one_dns_label() {
        for (role, name) in [
            (Role::Worker, ""),
            (Role::Worker, "W0"),
            (Role::Worker, "w.0"),
            (Role::Worker, "-w0"),
            (Role::Worker, "w0-"),
            (Role::Worker, "w_0"),
            (Role::Coordinator, "0"),
            (Role::Coordinator, "01"),
            (Role::Coordinator, "one"),
            (Role::Coordinator, "18446744073709551616"),
        ] {
            assert!(Identity::new(role, name).is_err(), "{role} {name:?}");
        }
        let long = "a".repeat(10_000);
        let err = Identity::new(Role::Worker, &long)
            .expect_err("refused")
            .to_string();
        assert!(err.len() < 200, "{err}");
        assert_eq!(
            Identity::new(Role::Worker, &"a".repeat(63))
                .expect("valid")
                .name()
                .len(),
            63
        );
        assert_eq!(
            Identity::new(Role::Coordinator, "12")
                .expect("valid")
                .coordinator_id(),
            Some(12)
        );
        assert_eq!(
            Identity::new(Role::Worker, "12")
                .expect("valid")
                .coordinator_id(),
            None
        );
    }

    /// Ensures that an identity survives its DNS name, and that names of other shapes (another
    /// domain, an unknown role, extra labels) carry none.
    #[test]
    fn dns_names_round_trip() {
        for id in [
            Identity::coordinator(3),
            Identity::new(Role::Worker, "gpu-node-7").expect("valid"),
            Identity::new(Role::Admin, "ops").expect("valid"),
        ] {
            assert_eq!(Identity::from_dns_name(&id.dns_name()), Some(id.clone()));
        }
        for dns in [
            "w0.worker.tessera.example",
            "w0.client.tessera.internal",
            "worker.tessera.internal",
            "a.w0.worker.tessera.internal",
            "w0.worker.tessera.internal.",
            "0.coordinator.tessera.internal",
            "w0.workertessera.internal",
        ] {
            assert_eq!(Identity::from_dns_name(dns), None, "{dns}");
        }
    }
}
