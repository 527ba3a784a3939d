//! How a client reads a stream that broke because its server died.
//!
//! A server that is killed mid-stream sends no status: the HTTP/2 connection just breaks, and
//! tonic reports that as `UNKNOWN` with the transport's error ("h2 protocol error: …"). To the
//! caller it means the same as a server that could not be reached at all — retry elsewhere —
//! so tessera's clients (the CLI, and followers relaying a leader's stream) turn it into
//! `UNAVAILABLE`, the code the API promises for a lost node.

use tonic::{Code, Status};

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
