//! API keys: who may call the public API. One [`ApiKeys`] set checks both doors — the gRPC
//! `authorization` metadata of `tessera.v1.Inference` ([`ApiKeys::interceptor`]) and the HTTP
//! `Authorization` header of the OpenAI API (`crate::openai`) — so a key works on either.
//!
//! Both take `Bearer <key>`. Health (gRPC `grpc.health.v1`, HTTP `/health` and `/ready`) and
//! server reflection stay open: probes and tools must reach them without a secret, and they
//! act on nothing. An empty set means no keys are required.
//!
//! Keys are kept only as SHA-256 digests and a presented key is compared against every digest
//! without an early exit, so neither memory nor response time tells an attacker how much of a
//! guess was right.

use std::sync::Arc;

use sha2::{Digest, Sha256};
use tonic::{Request, Status};

use crate::error::CoordinatorError;

/// The accepted API keys (as digests); cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct ApiKeys {
    digests: Arc<Vec<[u8; 32]>>,
}

/// Why a presented credential was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// No `authorization` was sent.
    Missing,
    /// It is not `Bearer <key>`, or the key is not one of ours.
    Wrong,
}

impl Refusal {
    /// The message a client gets (never echoing what it sent).
    pub fn message(self) -> &'static str {
        match self {
            Self::Missing => "this cluster requires an API key: send `authorization: Bearer <key>`",
            Self::Wrong => "the API key is not valid for this cluster",
        }
    }
}

impl ApiKeys {
    /// The set of `keys`; each is trimmed, and must be non-empty and printable ASCII without
    /// spaces (what an HTTP header and gRPC metadata can carry).
    ///
    /// # Errors
    /// INVALID_ARGUMENT on `api_keys` naming the key's position (never the key).
    pub fn new<S: AsRef<str>>(keys: &[S]) -> Result<Self, CoordinatorError> {
        let mut digests = Vec::with_capacity(keys.len());
        for (i, key) in keys.iter().enumerate() {
            let key = key.as_ref().trim();
            if key.is_empty() || !key.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(CoordinatorError::invalid(
                    "api_keys",
                    format!(
                        "key #{} must be non-empty printable ASCII without spaces",
                        i + 1
                    ),
                ));
            }
            digests.push(digest(key));
        }
        Ok(Self {
            digests: Arc::new(digests),
        })
    }

    /// Whether keys are required at all.
    pub fn enabled(&self) -> bool {
        !self.digests.is_empty()
    }

    /// Checks the value of an `authorization` header or metadata entry (`None` when absent).
    ///
    /// # Errors
    /// The [`Refusal`] when keys are required and this one does not pass.
    pub fn check(&self, authorization: Option<&[u8]>) -> Result<(), Refusal> {
        if !self.enabled() {
            return Ok(());
        }
        let value = authorization.ok_or(Refusal::Missing)?;
        let value = std::str::from_utf8(value)
            .map_err(|_| Refusal::Wrong)?
            .trim();
        // The scheme is case-insensitive (RFC 9110 §11.1).
        let key = match value.split_once(' ') {
            Some((scheme, key)) if scheme.eq_ignore_ascii_case("bearer") => key.trim(),
            _ => return Err(Refusal::Wrong),
        };
        let presented = digest(key);
        // Every digest is compared in full, whatever matched earlier.
        let mut found = false;
        for d in self.digests.iter() {
            found |= constant_time_eq(d, &presented);
        }
        if found { Ok(()) } else { Err(Refusal::Wrong) }
    }

    /// A tonic interceptor that lets through only calls with an accepted key (UNAUTHENTICATED
    /// otherwise); mount it on the services that act, not on health or reflection.
    pub fn interceptor(&self) -> impl tonic::service::Interceptor + Clone + use<> {
        let keys = self.clone();
        move |req: Request<()>| {
            let value = req.metadata().get("authorization").map(|v| v.as_bytes());
            match keys.check(value) {
                Ok(()) => Ok(req),
                Err(r) => Err(Status::unauthenticated(r.message())),
            }
        }
    }
}

fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// Equality of two digests that reads every byte whatever differs.
fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::service::Interceptor as _;

    /// Ensures that each credential gets the right verdict: absent, wrong scheme, wrong key,
    /// any of several keys, a lower-case scheme, and everything when no keys are set.
    #[test]
    fn checks_bearer_keys() {
        let keys = ApiKeys::new(&["alpha-1", " beta-2 "]).expect("valid keys");
        let table: [(Option<&str>, Result<(), Refusal>); 7] = [
            (None, Err(Refusal::Missing)),
            (Some("Bearer alpha-1"), Ok(())),
            (Some("bearer beta-2"), Ok(())),
            (Some("Bearer alpha-2"), Err(Refusal::Wrong)),
            (Some("Basic alpha-1"), Err(Refusal::Wrong)),
            (Some("alpha-1"), Err(Refusal::Wrong)),
            (Some("Bearer "), Err(Refusal::Wrong)),
        ];
        for (header, want) in table {
            assert_eq!(keys.check(header.map(str::as_bytes)), want, "{header:?}");
        }
        let open = ApiKeys::new::<&str>(&[]).expect("no keys");
        assert!(!open.enabled());
        assert_eq!(open.check(None), Ok(()));
    }

    /// Ensures that an unusable key is refused at startup, by position and without echoing it.
    #[test]
    fn refuses_unusable_keys() {
        for bad in ["", "   ", "has space", "tab\tkey", "ключ"] {
            let e = ApiKeys::new(&["ok", bad]).expect_err(bad).to_string();
            assert!(e.starts_with("api_keys: key #2"), "{e}");
            assert!(bad.trim().is_empty() || !e.contains(bad.trim()), "{e}");
        }
    }

    /// Ensures that the gRPC interceptor answers UNAUTHENTICATED without a valid key and lets
    /// a valid one through.
    #[test]
    fn interceptor_refuses_with_unauthenticated() {
        let mut intercept = ApiKeys::new(&["k1"]).expect("valid").interceptor();
        let status = intercept.call(Request::new(())).expect_err("no key");
        assert_eq!(status.code(), tonic::Code::Unauthenticated);
        let mut req = Request::new(());
        req.metadata_mut()
            .insert("authorization", "Bearer k1".parse().expect("ascii"));
        assert!(intercept.call(req).is_ok());
    }
}
