//! The peer port's rustls configurations ([`ClusterTls::peer_server_config`],
//! [`ClusterTls::peer_client_config`]) in real handshakes on 127.0.0.1, blocking, one thread
//! per side: who gets through, and what [`peer_identity`] reads from each side.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use rustls::{ClientConnection, ServerConnection};
use tessera_tls::{Authority, ClusterTls, Identity, MemberFiles, Role, peer_identity};

fn member(dir: &Path, ca: &Authority, id: &Identity) -> ClusterTls {
    ca.issue_into(dir, id).expect("issue");
    ClusterTls::mutual(MemberFiles::in_dir(dir, id).load().expect("load"))
}

fn worker(name: &str) -> Identity {
    Identity::new(Role::Worker, name).expect("a valid name")
}

/// One handshake between `client` and `server` over loopback, then one byte each way; the
/// identity each side read from the other, or the first side's error.
fn handshake(client: &ClusterTls, server: &ClusterTls) -> Result<(Identity, Identity), String> {
    let listener = TcpListener::bind("127.0.0.1:0").expect("on loopback");
    let addr = listener.local_addr().expect("bound");
    let config = server.peer_server_config().expect("mutual");
    let served = std::thread::spawn(move || -> Result<Identity, String> {
        let (mut sock, _) = listener.accept().map_err(|e| e.to_string())?;
        sock.set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(|e| e.to_string())?;
        let mut conn = ServerConnection::new(config).map_err(|e| e.to_string())?;
        let mut stream = rustls::Stream::new(&mut conn, &mut sock);
        let mut byte = [0u8];
        stream.read_exact(&mut byte).map_err(|e| e.to_string())?;
        stream.write_all(&byte).map_err(|e| e.to_string())?;
        peer_identity(&conn).map_err(|e| e.to_string())
    });
    let dialled = (|| -> Result<Identity, String> {
        let mut sock = TcpStream::connect(addr).map_err(|e| e.to_string())?;
        sock.set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(|e| e.to_string())?;
        let name = ServerName::try_from(Role::Worker.server_name()).map_err(|e| e.to_string())?;
        let config: Arc<_> = client.peer_client_config().expect("mutual");
        let mut conn = ClientConnection::new(config, name).map_err(|e| e.to_string())?;
        let mut stream = rustls::Stream::new(&mut conn, &mut sock);
        stream.write_all(&[7]).map_err(|e| e.to_string())?;
        let mut byte = [0u8];
        stream.read_exact(&mut byte).map_err(|e| e.to_string())?;
        peer_identity(&conn).map_err(|e| e.to_string())
    })();
    let served = served.join().expect("server thread");
    Ok((dialled?, served?))
}

/// Ensures that two workers of one CA get through the peer port's handshake and each reads the
/// other's identity from the verified certificate.
#[test]
fn workers_of_one_ca_read_each_other() {
    let dir = tempfile::tempdir().expect("valid");
    let (ca, _) = Authority::open_or_create(dir.path()).expect("valid");
    let (a, b) = (
        member(dir.path(), &ca, &worker("w0")),
        member(dir.path(), &ca, &worker("w1")),
    );
    let (server_seen, client_seen) = handshake(&a, &b).expect("handshake");
    assert_eq!(server_seen, worker("w1"));
    assert_eq!(client_seen, worker("w0"));
}

/// Ensures that a coordinator's certificate gets through the handshake as a client (the CA
/// signed it) but names the coordinator role, which the worker then refuses, and that a
/// dialling worker refuses a coordinator serving the peer port (its certificate does not name
/// `worker.tessera.internal`).
#[test]
fn roles_are_visible_and_servers_must_be_workers() {
    let dir = tempfile::tempdir().expect("valid");
    let (ca, _) = Authority::open_or_create(dir.path()).expect("valid");
    let w = member(dir.path(), &ca, &worker("w0"));
    let c = member(dir.path(), &ca, &Identity::coordinator(1));
    let (_, client_seen) = handshake(&c, &w).expect("the handshake itself succeeds");
    assert_eq!(client_seen.role(), Role::Coordinator);
    let err = handshake(&w, &c).expect_err("a coordinator is not a peer-port server");
    assert!(err.contains("certificate"), "{err}");
}

/// Ensures that a worker certified by another CA does not get through, in either direction.
#[test]
fn another_ca_is_refused() {
    let (ours, theirs) = (
        tempfile::tempdir().expect("valid"),
        tempfile::tempdir().expect("valid"),
    );
    let (ca, _) = Authority::open_or_create(ours.path()).expect("valid");
    let (other, _) = Authority::open_or_create(theirs.path()).expect("valid");
    let w = member(ours.path(), &ca, &worker("w0"));
    let stranger = member(theirs.path(), &other, &worker("w1"));
    let err = handshake(&stranger, &w).expect_err("another CA's client");
    assert!(!err.is_empty());
    handshake(&w, &stranger).expect_err("another CA's server");
}

/// Ensures that insecure mode has no peer-port configuration (the worker then speaks plain
/// TCP).
#[test]
fn insecure_has_no_peer_configuration() {
    let tls = ClusterTls::insecure();
    assert!(tls.peer_server_config().is_none() && tls.peer_client_config().is_none());
}
