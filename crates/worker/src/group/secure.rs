//! The byte stream under the peer port's connections: the socket itself under
//! `--insecure-cluster`, or TLS 1.3 records on it (mutual TLS, the default), with the cluster's
//! certificates ([`PeerTls`], from `tessera_tls::ClusterTls`).
//!
//! A connection lives in two phases:
//! - **Blocking**, while it is new ([`PeerConn`]): the TLS handshake and the first frames (a
//!   [`super::frame::Frame::Hello`], or latency pings), every read and write bounded by one
//!   deadline, so a peer that trickles bytes holds a handshake thread no longer than the
//!   handshake timeout. Either side ends it knowing who the other end is ([`PeerConn::peer`],
//!   read from the certificate rustls verified against the cluster's CA); the listener and the
//!   dialler decide from that whether to go on.
//! - **Non-blocking**, once the connection is a link (`link.rs`): [`Transport`] moves bytes
//!   between the socket and the link's inbox without ever waiting — `read_tls`,
//!   `process_new_packets`, then the plaintext; plaintext into rustls, then `write_tls` until
//!   the socket would block. It lives in the link's inbox, under the lock the executor and the
//!   link's reader thread take turns on, so one TLS session is never driven by two threads.
//!
//! rustls can hold bytes that the socket's readiness does not show: plaintext decrypted and
//! not yet taken (the dialler's first frames may arrive with its Hello), and records
//! encrypted and not yet written. So [`Transport::fill`] always takes the decrypted plaintext
//! first, and a write is finished only when nothing is [`Transport::pending`], not when
//! rustls has taken the last plaintext byte.

use std::io::{self, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, Connection, ServerConfig, ServerConnection};
use tessera_tls::{ClusterTls, HANDSHAKE_TIMEOUT, Identity, Role};

/// Bytes read per `read` call into an inbox (a decode step's partial sums are 2.3 KB).
const READ_CHUNK: usize = 16 * 1024;

/// How this worker's peer port accepts and how it dials the other ranks.
#[derive(Clone)]
pub(crate) enum PeerTls {
    /// Plain TCP (`--insecure-cluster`): anyone who reaches the port is believed.
    Plain,
    /// TLS 1.3, both sides certified by the cluster's CA.
    Mutual {
        /// Accepting.
        server: Arc<ServerConfig>,
        /// Dialling.
        client: Arc<ClientConfig>,
    },
}

impl std::fmt::Debug for PeerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.is_mutual() {
            "PeerTls::Mutual"
        } else {
            "PeerTls::Plain"
        })
    }
}

impl PeerTls {
    /// The peer port's security for a member speaking the cluster protocol as `tls` says.
    pub(crate) fn new(tls: &ClusterTls) -> Self {
        match (tls.peer_server_config(), tls.peer_client_config()) {
            (Some(server), Some(client)) => Self::Mutual { server, client },
            _ => Self::Plain,
        }
    }

    /// Whether connections are mutual TLS (and so carry the peer's identity).
    pub(crate) fn is_mutual(&self) -> bool {
        matches!(self, Self::Mutual { .. })
    }

    /// The server side of an accepted connection: the handshake, done by `deadline`.
    ///
    /// # Errors
    /// The socket's failure, `TimedOut` past the deadline, `InvalidData` for a failed
    /// handshake (no certificate, another CA's, not TLS at all), `PermissionDenied` for a
    /// certificate that names no identity.
    pub(crate) fn accept(&self, sock: TcpStream, deadline: Instant) -> io::Result<PeerConn> {
        let tls = match self {
            Self::Plain => None,
            Self::Mutual { server, .. } => Some(Connection::from(
                ServerConnection::new(Arc::clone(server)).map_err(io::Error::other)?,
            )),
        };
        PeerConn::start(sock, tls, deadline)
    }

    /// Connects to the peer port at `addr`, retrying until `deadline` (the peer may still be
    /// starting), then runs the client side of the handshake within the handshake timeout
    /// (and `deadline`).
    ///
    /// # Errors
    /// The last connection error at the deadline; as [`PeerTls::connect`].
    pub(crate) fn dial(&self, addr: &str, deadline: Instant) -> io::Result<PeerConn> {
        let target: SocketAddr = addr
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| io::Error::new(ErrorKind::NotFound, format!("{addr}: no address")))?;
        let sock = loop {
            match TcpStream::connect_timeout(&target, Duration::from_secs(1)) {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        };
        self.connect(sock, deadline.min(Instant::now() + HANDSHAKE_TIMEOUT))
    }

    /// The client side of a connection to another worker's peer port: the handshake, done by
    /// `deadline`, accepting only a server certified as a worker.
    ///
    /// # Errors
    /// As [`PeerTls::accept`].
    pub(crate) fn connect(&self, sock: TcpStream, deadline: Instant) -> io::Result<PeerConn> {
        let tls = match self {
            Self::Plain => None,
            Self::Mutual { client, .. } => {
                // The name every worker certificate carries and no other role's does.
                let name = ServerName::try_from(Role::Worker.server_name())
                    .map_err(|e| io::Error::new(ErrorKind::InvalidInput, e))?;
                Some(Connection::from(
                    ClientConnection::new(Arc::clone(client), name).map_err(io::Error::other)?,
                ))
            }
        };
        PeerConn::start(sock, tls, deadline)
    }
}

/// A peer-port connection in its blocking phase: handshake done, reads and writes bounded
/// by a deadline.
pub(crate) struct PeerConn {
    sock: TcpStream,
    tls: Option<Box<Connection>>,
    /// Who the other end is (`None` in the clear).
    peer: Option<Identity>,
    deadline: Instant,
}

impl std::fmt::Debug for PeerConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerConn")
            .field("peer", &self.peer)
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

impl PeerConn {
    fn start(sock: TcpStream, tls: Option<Connection>, deadline: Instant) -> io::Result<Self> {
        // Every frame is on some rank's critical path: never wait to fill a segment.
        sock.set_nodelay(true)?;
        let mut conn = Self {
            sock,
            tls: tls.map(Box::new),
            peer: None,
            deadline,
        };
        if let Some(tls) = conn.tls.as_deref_mut() {
            let mut io = Bounded {
                sock: &conn.sock,
                deadline,
            };
            while tls.is_handshaking() {
                let (read, wrote) = tls.complete_io(&mut io)?;
                if read == 0 && wrote == 0 && tls.is_handshaking() {
                    return Err(ErrorKind::UnexpectedEof.into());
                }
            }
            let peer = tessera_tls::peer_identity(tls)
                .map_err(|e| io::Error::new(ErrorKind::PermissionDenied, e))?;
            conn.peer = Some(peer);
        }
        Ok(conn)
    }

    /// Who the other end is, as its verified certificate names it (`None` in the clear).
    pub(crate) fn peer(&self) -> Option<&Identity> {
        self.peer.as_ref()
    }

    /// Bounds the reads and writes from now on by `deadline` instead.
    pub(crate) fn set_deadline(&mut self, deadline: Instant) {
        self.deadline = deadline;
    }

    /// The socket (blocking, timeouts cleared) and what moves bytes on it, for a link.
    ///
    /// # Errors
    /// When the socket's timeouts cannot be cleared.
    pub(crate) fn into_parts(self) -> io::Result<(TcpStream, Transport)> {
        self.sock.set_read_timeout(None)?;
        self.sock.set_write_timeout(None)?;
        let transport = match self.tls {
            None => Transport::Plain,
            Some(tls) => Transport::Tls(tls),
        };
        Ok((self.sock, transport))
    }

    /// Runs `f` on the connection's plaintext stream (rustls over the bounded socket).
    fn stream<T>(&mut self, f: impl FnOnce(&mut dyn Duplex) -> T) -> T {
        let mut io = Bounded {
            sock: &self.sock,
            deadline: self.deadline,
        };
        match self.tls.as_deref_mut() {
            None => f(&mut io),
            Some(Connection::Client(c)) => f(&mut rustls::Stream::new(c, &mut io)),
            Some(Connection::Server(c)) => f(&mut rustls::Stream::new(c, &mut io)),
        }
    }
}

impl Read for PeerConn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.stream(|s| s.read(buf))
    }
}

impl Write for PeerConn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.stream(|s| s.write(buf))
    }

    fn flush(&mut self) -> io::Result<()> {
        self.stream(|s| s.flush())
    }
}

/// Read and write at once, for one `dyn` stream whichever side of TLS it is.
trait Duplex: Read + Write {}
impl<T: Read + Write> Duplex for T {}

/// A blocking socket whose every read and write must be done by `deadline`.
struct Bounded<'a> {
    sock: &'a TcpStream,
    deadline: Instant,
}

impl Bounded<'_> {
    /// The time left, as a socket timeout (never zero, which would mean none).
    fn left(&self) -> io::Result<std::time::Duration> {
        self.deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| io::Error::new(ErrorKind::TimedOut, "peer connection too slow"))
    }
}

impl Read for Bounded<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.sock.set_read_timeout(Some(self.left()?))?;
        (&mut &*self.sock).read(buf)
    }
}

impl Write for Bounded<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.sock.set_write_timeout(Some(self.left()?))?;
        (&mut &*self.sock).write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// What moves a link's bytes between its non-blocking socket and its inbox.
pub(crate) enum Transport {
    /// The socket carries the frames themselves.
    Plain,
    /// The socket carries TLS records.
    Tls(Box<Connection>),
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Plain => "Transport::Plain",
            Self::Tls(_) => "Transport::Tls",
        })
    }
}

impl Transport {
    /// Reads everything that has arrived into `buf`, without blocking; the byte count.
    ///
    /// # Errors
    /// The connection's end (when nothing more arrived: bytes before an end are returned
    /// first) or failure, TLS's included, as a sentence.
    pub(crate) fn fill(
        &mut self,
        sock: &mio::net::TcpStream,
        buf: &mut Vec<u8>,
    ) -> Result<usize, String> {
        match self {
            Self::Plain => fill_plain(sock, buf),
            Self::Tls(tls) => fill_tls(tls, sock, buf),
        }
    }

    /// Writes what the socket takes of `bytes[*sent..]` without blocking, advancing `sent`
    /// by the bytes the transport took; true when anything moved. Under TLS, bytes taken
    /// may still be [`Transport::pending`].
    ///
    /// # Errors
    /// A sentence when the connection is broken.
    pub(crate) fn write_some(
        &mut self,
        sock: &mio::net::TcpStream,
        bytes: &[u8],
        sent: &mut usize,
    ) -> Result<bool, String> {
        match self {
            Self::Plain => write_plain(sock, bytes, sent),
            Self::Tls(tls) => write_tls(tls, sock, bytes, sent),
        }
    }

    /// Whether bytes taken by [`Transport::write_some`] are still waiting for the socket.
    pub(crate) fn pending(&self) -> bool {
        match self {
            Self::Plain => false,
            Self::Tls(tls) => tls.wants_write(),
        }
    }
}

fn fill_plain(stream: &mio::net::TcpStream, buf: &mut Vec<u8>) -> Result<usize, String> {
    let mut total = 0;
    loop {
        let start = buf.len();
        buf.resize(start + READ_CHUNK, 0);
        let r = (&*stream).read(&mut buf[start..]);
        buf.truncate(start + *r.as_ref().unwrap_or(&0));
        match r {
            Ok(0) if total > 0 => return Ok(total),
            Ok(0) => return Err("connection closed".into()),
            Ok(n) => total += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(total),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("connection failed: {e}")),
        }
    }
}

fn fill_tls(
    tls: &mut Connection,
    stream: &mio::net::TcpStream,
    buf: &mut Vec<u8>,
) -> Result<usize, String> {
    let mut total = 0;
    loop {
        // The plaintext rustls holds first: the socket's readiness does not show it.
        loop {
            let start = buf.len();
            buf.resize(start + READ_CHUNK, 0);
            let r = tls.reader().read(&mut buf[start..]);
            buf.truncate(start + *r.as_ref().unwrap_or(&0));
            match r {
                Ok(n) if n > 0 => total += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                // The peer's close_notify (Ok(0)) or the TCP end without one: the end, once
                // everything before it is taken.
                Ok(_) => return ended(total),
                Err(e) if e.kind() == ErrorKind::UnexpectedEof => return ended(total),
                Err(e) => return Err(format!("connection failed: {e}")),
            }
        }
        match tls.read_tls(&mut &*stream) {
            // The TCP end: rustls notes it, and the reader above reports it.
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("connection failed: {e}")),
        }
        if let Err(e) = tls.process_new_packets() {
            // The alert that says why goes out if the socket takes it.
            let _ = tls.write_tls(&mut &*stream);
            return Err(format!("TLS failed: {e}"));
        }
    }
    // Reading can queue records of its own (a key update's answer): send them if the socket
    // takes them now; a broken connection shows on the next read.
    let _ = flush_tls(tls, stream);
    Ok(total)
}

/// The end of a connection, after the `total` bytes read before it.
fn ended(total: usize) -> Result<usize, String> {
    if total > 0 {
        Ok(total)
    } else {
        Err("connection closed".into())
    }
}

fn write_plain(
    stream: &mio::net::TcpStream,
    bytes: &[u8],
    sent: &mut usize,
) -> Result<bool, String> {
    let mut wrote = false;
    while *sent < bytes.len() {
        match (&*stream).write(&bytes[*sent..]) {
            Ok(0) => return Err("connection closed".into()),
            Ok(n) => {
                *sent += n;
                wrote = true;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("connection failed: {e}")),
        }
    }
    Ok(wrote)
}

fn write_tls(
    tls: &mut Connection,
    stream: &mio::net::TcpStream,
    bytes: &[u8],
    sent: &mut usize,
) -> Result<bool, String> {
    let mut wrote = false;
    loop {
        // Records already made go first, so rustls buffers at most one batch (its 64 KiB
        // limit) beyond what the socket holds.
        wrote |= flush_tls(tls, stream)?;
        if tls.wants_write() || *sent == bytes.len() {
            return Ok(wrote);
        }
        let n = tls
            .writer()
            .write(&bytes[*sent..])
            .map_err(|e| format!("connection failed: {e}"))?;
        if n == 0 {
            // rustls took nothing and has nothing to write: nothing more can move now.
            return Ok(wrote);
        }
        *sent += n;
        wrote = true;
    }
}

/// Writes the records rustls holds until the socket would block; true when any moved.
fn flush_tls(tls: &mut Connection, stream: &mio::net::TcpStream) -> Result<bool, String> {
    let mut moved = false;
    while tls.wants_write() {
        match tls.write_tls(&mut &*stream) {
            Ok(0) => return Err("connection closed".into()),
            Ok(_) => moved = true,
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("connection failed: {e}")),
        }
    }
    Ok(moved)
}
