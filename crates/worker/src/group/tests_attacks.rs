//! Attacks on the TLS peer port, in process on loopback: clients that must not get a link —
//! plain TCP, another CA's worker, a coordinator's certificate, a worker claiming a rank it does
//! not hold — and a dialled port served by the wrong worker.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use tessera_tls::{Authority, ClusterTls, Identity, MemberFiles};

use super::frame::Frame;
use super::secure::{PeerConn, PeerTls};
use super::tests::{Mode, listeners, name, tls_of, worker};
use super::{Group, probe_rtt};

/// Dials the peer port at `addr` as `identity` (TLS as `mode` says) and sends a Hello of
/// rank `from` of epoch `epoch`'s group to rank `to`.
pub(super) fn hello(
    addr: &str,
    mode: Mode,
    identity: &Identity,
    (epoch, from, to): (u64, u32, u32),
) -> PeerConn {
    hello_with(addr, &tls_of(mode, identity), (epoch, from, to))
}

/// [`hello`] with a given security.
fn hello_with(addr: &str, tls: &PeerTls, (epoch, from, to): (u64, u32, u32)) -> PeerConn {
    let deadline = Instant::now() + Duration::from_secs(5);
    let sock = TcpStream::connect(addr).expect("on loopback");
    let mut conn = tls.connect(sock, deadline).expect("handshake");
    Frame::Hello { epoch, from, to }
        .write_to(&mut conn)
        .and_then(|()| conn.flush())
        .expect("on loopback");
    conn
}

/// Whether the other end closes `conn` within 3 s (an end or an error, TLS alerts included,
/// not silence).
fn closed(conn: &mut impl Read) -> bool {
    let mut buf = [0u8; 256];
    let until = Instant::now() + Duration::from_secs(3);
    loop {
        match conn.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) if Instant::now() < until => {}
            Ok(_) => return false,
            Err(e) => {
                return !matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                );
            }
        }
    }
}

/// Asserts that `listener` holds no connection and hands none out for rank 1 of epoch 1.
fn assert_nothing_parked(listener: &super::PeerListener) {
    assert_eq!(listener.parked(), 0);
    assert!(
        listener
            .take(1, 1, 0, None, Instant::now() + Duration::from_millis(200))
            .is_none()
    );
}

/// Ensures that a client speaking plain TCP to a TLS peer port — a valid Hello, as the
/// protocol was before TLS — is closed without anything parked for it.
#[test]
fn plain_hello_to_a_tls_port_is_refused() {
    let (ls, addrs) = listeners(1, Mode::Mutual);
    let mut s = TcpStream::connect(&addrs[0]).expect("on loopback");
    s.set_read_timeout(Some(Duration::from_secs(3)))
        .expect("on loopback");
    Frame::Hello {
        epoch: 1,
        from: 1,
        to: 0,
    }
    .write_to(&mut s)
    .expect("on loopback");
    assert!(closed(&mut s), "the port closes a plain client");
    assert_nothing_parked(&ls[0]);
}

/// Ensures that a worker certified by another CA is refused by the TLS peer port: its Hello
/// is never parked and its connection is closed.
#[test]
fn another_cas_worker_is_refused() {
    let (ls, addrs) = listeners(1, Mode::Mutual);
    let dir = tempfile::tempdir().expect("a temporary directory");
    let (other, _) = Authority::open_or_create(dir.path()).expect("another CA");
    other
        .issue_into(dir.path(), &worker("w1"))
        .expect("a certificate");
    let files = MemberFiles::in_dir(dir.path(), &worker("w1"));
    let stranger = PeerTls::new(&ClusterTls::mutual(files.load().expect("its files")));
    // TLS 1.3: the client's side of the handshake ends before the server has checked its
    // certificate, so the refusal shows as the connection's end.
    let sock = TcpStream::connect(&addrs[0]).expect("on loopback");
    let refused = match stranger.connect(sock, Instant::now() + Duration::from_secs(5)) {
        Err(_) => true,
        Ok(mut conn) => {
            let _ = Frame::Hello {
                epoch: 1,
                from: 1,
                to: 0,
            }
            .write_to(&mut conn)
            .and_then(|()| conn.flush());
            closed(&mut conn)
        }
    };
    assert!(refused);
    assert_nothing_parked(&ls[0]);
}

/// Ensures that a certified coordinator is refused on the peer port — its Hello is never
/// parked, its connection closed — and gets no answer to a latency probe either.
#[test]
fn coordinator_certificate_is_refused_on_the_peer_port() {
    let (ls, addrs) = listeners(1, Mode::Mutual);
    let coordinator = tls_of(Mode::Mutual, &Identity::coordinator(1));
    let mut conn = hello_with(&addrs[0], &coordinator, (1, 1, 0));
    assert!(closed(&mut conn), "the port closes a coordinator");
    assert_eq!(ls[0].parked(), 0);
    assert!(probe_rtt(&addrs[0], 1, Duration::from_secs(2), &coordinator).is_err());
}

/// Ensures that a certified worker claiming a rank another worker holds is refused when the
/// group forms (its connection closed, never a link), while the rank's own worker, claiming
/// the same rank later, is taken.
#[test]
fn worker_claiming_a_rank_it_does_not_hold_is_refused() {
    let (ls, addrs) = listeners(1, Mode::Mutual);
    let mut rogue = hello(&addrs[0], Mode::Mutual, &worker("w9"), (4, 1, 0));
    // Alone, the claim is not taken for rank 1, held by w1.
    assert!(
        ls[0]
            .take(
                4,
                1,
                0,
                Some("w1"),
                Instant::now() + Duration::from_millis(300)
            )
            .is_none()
    );
    assert!(closed(&mut rogue), "the claim's connection is closed");
    // Both claim the rank: the holder's connection is the one taken.
    let mut rogue = hello(&addrs[0], Mode::Mutual, &worker("w9"), (4, 1, 0));
    let _honest = hello(&addrs[0], Mode::Mutual, &worker("w1"), (4, 1, 0));
    let until = Instant::now() + Duration::from_secs(5);
    while ls[0].parked() < 2 && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(10));
    }
    let got = ls[0]
        .take(4, 1, 0, Some("w1"), Instant::now() + Duration::from_secs(2))
        .expect("the holder's connection");
    assert_eq!(got.peer(), Some(&worker("w1")));
    assert!(closed(&mut rogue));
    assert_eq!(ls[0].parked(), 0);
}

/// Ensures that a dialling rank refuses a peer port whose certificate is not the worker the
/// plan names for that rank, with UNAVAILABLE naming both.
#[test]
fn dialler_refuses_a_rank_held_by_another_worker() {
    // Rank 0's port is served by w0's certificate; the plan says w5 holds rank 0.
    let (ls, addrs) = listeners(2, Mode::Mutual);
    let err = Group::form(7, 1, 2, (&addrs, &["w5".to_owned(), name(1)]), &ls[1], None)
        .expect_err("refused");
    assert_eq!(err.code(), tonic::Code::Unavailable);
    let msg = err.to_string();
    assert!(msg.contains("w0") && msg.contains("w5"), "{msg}");
}

/// Ensures that under mutual TLS a group without its ranks' worker names is refused before
/// anything is dialled (nothing to check the links' certificates against).
#[test]
fn mutual_tls_requires_the_ranks_names() {
    let (ls, addrs) = listeners(2, Mode::Mutual);
    let err = Group::form(7, 1, 2, (&addrs, &[]), &ls[1], None).expect_err("refused");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.to_string().contains("group_names"), "{err}");
}
