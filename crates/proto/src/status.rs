//! How a client reads a stream that broke because its server died.
//!
//! A server that is killed mid-stream sends no status: the HTTP/2 connection just breaks, and
//! tonic reports that as `UNKNOWN` with the transport's error ("h2 protocol error: …"). To the
//! caller it means the same as a server that could not be reached at all — retry elsewhere —
//! so tessera's clients (the CLI, and followers relaying a leader's stream) turn it into
//! `UNAVAILABLE`, the code the API promises for a lost node.
//!
//! Also: which broken generate streams a client may resume elsewhere ([`resumable`]): a torn
//! connection, or an `UNAVAILABLE` that does not say it is final ([`final_unavailable`]: the
//! cluster cannot serve the request at all, and a retry would only wait again).
//!
//! Also: how a worker that could not reach a tensor-parallel peer says which peer
//! ([`unreachable_peer`]), so the coordinator drops that peer and not the worker that answered.

use tonic::{Code, Status};

/// Status metadata key naming the peer (its peer-port address) a worker could not reach while
/// forming its tensor-parallel group.
pub const UNREACHABLE_PEER_KEY: &str = "tessera-unreachable-peer";

/// `UNAVAILABLE` with `message`, naming `peer` as the unreachable one in the metadata.
pub fn peer_unreachable(peer: &str, message: String) -> Status {
    let mut s = Status::unavailable(message);
    // An address that is not valid metadata (never, for host:port) is only left unnamed.
    if let Ok(v) = peer.parse() {
        s.metadata_mut().insert(UNREACHABLE_PEER_KEY, v);
    }
    s
}

/// The peer a worker's status says it could not reach, if it says one.
pub fn unreachable_peer(status: &Status) -> Option<&str> {
    status.metadata().get(UNREACHABLE_PEER_KEY)?.to_str().ok()
}

/// Status metadata key marking an `UNAVAILABLE` that resuming elsewhere would not cure.
pub const FINAL_KEY: &str = "tessera-final";

/// Response header naming a generate request's id (what a resumed request sends again).
pub const REQUEST_ID_HEADER: &str = "x-request-id";
/// Response header naming the seed a generate request samples with (what a resumed request
/// sends as its `sampling.seed`).
pub const SEED_HEADER: &str = "x-tessera-seed";

/// Pins `request` to the request id and seed its first response named in `headers`
/// ([`REQUEST_ID_HEADER`], [`SEED_HEADER`]), where the request did not set them, so that
/// resuming it continues that very request.
pub fn pin_to_response(
    request: &mut crate::v1::GenerateRequest,
    headers: &tonic::metadata::MetadataMap,
) {
    let read = |key| headers.get(key).and_then(|v| v.to_str().ok());
    if request.request_id.is_empty()
        && let Some(id) = read(REQUEST_ID_HEADER)
    {
        request.request_id = id.to_owned();
    }
    let sampling = request.sampling.get_or_insert_with(Default::default);
    if sampling.seed.is_none() {
        sampling.seed = read(SEED_HEADER).and_then(|s| s.parse().ok());
    }
}

/// `UNAVAILABLE` with `message` that a client should not resume elsewhere: no plan serves the
/// model, or the request itself keeps losing its workers.
pub fn final_unavailable(message: String) -> Status {
    let mut s = Status::unavailable(message);
    s.metadata_mut()
        .insert(FINAL_KEY, tonic::metadata::MetadataValue::from_static("1"));
    s
}

/// Whether a generate stream that broke with `status` may be resumed on another coordinator
/// (a `Resume` of the tokens received): its connection was torn (`UNKNOWN`, see
/// [`lost_peer`], or `CANCELLED` — what the transport reports when the connection under a
/// stream is dropped; tessera servers never send it, and tessera's clients cancel nothing they
/// would resume), or its coordinator said `UNAVAILABLE` without marking it final (it died, or
/// stopped leading).
pub fn resumable(status: &Status) -> bool {
    match status.code() {
        Code::Unknown | Code::Cancelled => true,
        Code::Unavailable => status.metadata().get(FINAL_KEY).is_none(),
        _ => false,
    }
}

/// `status`, with a connection torn mid-stream reported as `UNAVAILABLE` naming `peer`.
///
/// Only `UNKNOWN` is rewritten: tessera servers answer with mapped codes, never `UNKNOWN`, so an
/// `UNKNOWN` can only come from the client library's transport.
pub fn lost_peer(status: Status, peer: &str) -> Status {
    if status.code() == Code::Unknown {
        Status::unavailable(format!("{peer} was lost mid-stream: {}", status.message()))
    } else {
        status
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ensures that the unreachable peer survives into the status and is read back, and that
    /// a status without one names none.
    #[test]
    fn unreachable_peer_round_trips() {
        let s = peer_unreachable("127.0.0.1:4100", "rank 1 did not connect".into());
        assert_eq!(s.code(), Code::Unavailable);
        assert_eq!(unreachable_peer(&s), Some("127.0.0.1:4100"));
        assert_eq!(unreachable_peer(&Status::unavailable("x")), None);
    }

    /// Ensures that torn connections and plain UNAVAILABLE are resumable, and that a final
    /// UNAVAILABLE and every other code are not.
    #[test]
    fn resumable_statuses() {
        assert!(resumable(&Status::unknown("h2 protocol error")));
        assert!(resumable(&Status::cancelled("operation was canceled")));
        assert!(resumable(&Status::unavailable(
            "the leader stopped leading"
        )));
        assert!(!resumable(&final_unavailable(
            "no plan serves the model".into()
        )));
        for code in [
            Code::InvalidArgument,
            Code::DeadlineExceeded,
            Code::ResourceExhausted,
        ] {
            assert!(!resumable(&Status::new(code, "x")), "{code:?}");
        }
    }

    /// Ensures that only UNKNOWN (the torn-connection code) becomes UNAVAILABLE, and that a
    /// server's own codes pass through untouched.
    #[test]
    fn only_unknown_becomes_unavailable() {
        let torn = lost_peer(
            Status::unknown("h2 protocol error: error reading a body from connection"),
            "the coordinator",
        );
        assert_eq!(torn.code(), Code::Unavailable);
        assert!(
            torn.message()
                .starts_with("the coordinator was lost mid-stream: h2")
        );
        for code in [Code::InvalidArgument, Code::Unavailable, Code::Cancelled] {
            let s = lost_peer(Status::new(code, "as sent"), "x");
            assert_eq!((s.code(), s.message()), (code, "as sent"));
        }
    }
}
