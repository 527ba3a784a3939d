//! The peer port: where the other ranks of this worker's tensor-parallel groups dial it.
//!
//! An accept thread takes each connection; a short-lived handshake thread runs its TLS
//! handshake (`secure.rs`; none under `--insecure-cluster`), reads its first frame and files
//! it: a [`Frame::Hello`] parks the connection in an inbox keyed by (plan epoch, dialling
//! rank, dialled rank) until this worker's executor forms that group and takes it
//! ([`PeerListener::take`]); a [`Frame::Ping`] is answered with pongs until the prober hangs
//! up (latency probes). Anything else, a failed handshake, a dialler that has not finished
//! its handshake and first frame within [`HANDSHAKE_TIMEOUT`], or more handshakes at once
//! than [`MAX_HANDSHAKES`] closes the connection.
//!
//! Who may connect, under mutual TLS: a certificate of the cluster's CA is required by the
//! handshake, and only the `worker` role gets past it (a coordinator or operator certificate
//! is refused, named, before any frame is read), which is all a latency probe needs. A Hello
//! claims a rank; the executor knows which worker holds each rank only when it forms the
//! group, so [`PeerListener::take`] checks the claim then, against the certificate's name:
//! a connection whose certificate is not the rank's worker is closed and never becomes a
//! link. Several connections may claim one rank (one of them honest), so all are kept until
//! then.
//!
//! Parked connections of older epochs are dropped when a newer group is formed, and the
//! inbox holds at most [`MAX_PARKED`], so nothing accumulates.

use std::collections::HashMap;
use std::io::{ErrorKind, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use tessera_tls::Role;

use super::frame::Frame;
use super::secure::{PeerConn, PeerTls};
use crate::error::WorkerError;

/// How long a dialler may take to finish its TLS handshake and send its first frame (the
/// cluster port's handshake bound).
pub(crate) const HANDSHAKE_TIMEOUT: Duration = tessera_tls::HANDSHAKE_TIMEOUT;
/// Handshakes in progress at once; more are refused (closed) at once.
const MAX_HANDSHAKES: usize = 64;
/// Connections parked for groups not yet formed.
const MAX_PARKED: usize = 256;

/// Who a parked connection is: (epoch, from rank, to rank).
type Key = (u64, u32, u32);

/// Connections parked by who they claim to be (several may claim one rank: see the module
/// docs), and how many in all.
#[derive(Default)]
struct Parked {
    by_key: HashMap<Key, Vec<PeerConn>>,
    count: usize,
}

#[derive(Default)]
struct Inbox {
    parked: Mutex<Parked>,
    arrived: Condvar,
}

impl Inbox {
    fn lock(&self) -> std::sync::MutexGuard<'_, Parked> {
        // Every change is one insert or one removal: a panic elsewhere leaves it usable.
        self.parked
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The bound peer port and its accept thread; the thread stops when this is dropped.
pub(crate) struct PeerListener {
    addr: SocketAddr,
    inbox: Arc<Inbox>,
    stop: Arc<AtomicBool>,
    tls: PeerTls,
}

impl std::fmt::Debug for PeerListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerListener")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl PeerListener {
    /// Binds `addr` (port 0 picks a free port) and starts accepting, secured by `tls` (which
    /// the group's dialling side uses too: [`PeerListener::tls`]).
    ///
    /// # Errors
    /// [`WorkerError::Bind`] when the address cannot be bound; [`WorkerError::Executor`] when
    /// the accept thread cannot start.
    pub(crate) fn bind(addr: SocketAddr, tls: PeerTls) -> Result<Self, WorkerError> {
        let listener =
            TcpListener::bind(addr).map_err(|source| WorkerError::Bind { addr, source })?;
        let local = listener
            .local_addr()
            .map_err(|source| WorkerError::Bind { addr, source })?;
        let inbox = Arc::new(Inbox::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (inbox2, stop2, tls2) = (Arc::clone(&inbox), Arc::clone(&stop), tls.clone());
        std::thread::Builder::new()
            .name("tessera-peer-accept".into())
            .spawn(move || accept_loop(&listener, &inbox2, &stop2, &tls2))
            .map_err(|e| WorkerError::Executor(format!("peer accept thread: {e}")))?;
        Ok(Self {
            addr: local,
            inbox,
            stop,
            tls,
        })
    }

    /// How this port, and this worker's connections to other ranks' ports, are secured.
    pub(crate) fn tls(&self) -> &PeerTls {
        &self.tls
    }

    /// The bound address.
    pub(crate) fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Waits until `deadline` for rank `from` of epoch `epoch`'s group to dial rank `to`;
    /// `None` when it has not by then. With `holder` (mutual TLS), only a connection whose
    /// certificate names that worker is taken: the others claiming the rank are closed.
    pub(crate) fn take(
        &self,
        epoch: u64,
        from: u32,
        to: u32,
        holder: Option<&str>,
        deadline: Instant,
    ) -> Option<PeerConn> {
        let key = (epoch, from, to);
        let mut parked = self.inbox.lock();
        loop {
            if let Some(claims) = parked.by_key.remove(&key) {
                parked.count -= claims.len();
                let mut found = None;
                for conn in claims {
                    let honest = match (holder, conn.peer()) {
                        (None, _) => true,
                        (Some(name), Some(peer)) => peer.name() == name,
                        (Some(_), None) => false,
                    };
                    if found.is_none() && honest {
                        found = Some(conn);
                    } else {
                        tracing::warn!(
                            epoch, from, to, peer = ?conn.peer(), ?holder,
                            "peer connection claiming a rank its worker does not hold refused"
                        );
                    }
                }
                if found.is_some() {
                    return found;
                }
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            parked = self
                .inbox
                .arrived
                .wait_timeout(parked, left)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
    }

    /// Drops parked connections of epochs before `epoch` (their groups are gone).
    pub(crate) fn forget_before(&self, epoch: u64) {
        let mut parked = self.inbox.lock();
        parked.by_key.retain(|k, _| k.0 >= epoch);
        parked.count = parked.by_key.values().map(Vec::len).sum();
    }

    /// Connections parked now (tests).
    #[cfg(test)]
    pub(crate) fn parked(&self) -> usize {
        self.inbox.lock().count
    }
}

impl Drop for PeerListener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept so the thread sees the flag; failure means it is gone.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
    }
}

fn accept_loop(listener: &TcpListener, inbox: &Arc<Inbox>, stop: &AtomicBool, tls: &PeerTls) {
    let pending = Arc::new(AtomicUsize::new(0));
    for conn in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let Ok(conn) = conn else {
            // A connection reset before accept, or out of descriptors: keep serving.
            std::thread::sleep(Duration::from_millis(10));
            continue;
        };
        if pending.fetch_add(1, Ordering::SeqCst) >= MAX_HANDSHAKES {
            pending.fetch_sub(1, Ordering::SeqCst);
            continue;
        }
        let (inbox, pending2, tls) = (Arc::clone(inbox), Arc::clone(&pending), tls.clone());
        let spawned = std::thread::Builder::new()
            .name("tessera-peer-hello".into())
            .spawn(move || {
                handshake(conn, &inbox, &tls);
                pending2.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            pending.fetch_sub(1, Ordering::SeqCst);
        }
    }
    tracing::debug!("peer listener stopped");
}

/// Runs a connection's handshake, reads its first frame and files it.
fn handshake(conn: TcpStream, inbox: &Inbox, tls: &PeerTls) {
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    let mut conn = match tls.accept(conn, deadline) {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(error = %e, "peer handshake failed");
            return;
        }
    };
    if let Some(peer) = conn.peer().filter(|p| p.role() != Role::Worker) {
        tracing::warn!(%peer, "peer port connection refused: only workers may connect");
        return;
    }
    match Frame::read_from(&mut conn) {
        Ok(Frame::Hello { epoch, from, to }) => {
            let mut parked = inbox.lock();
            if parked.count >= MAX_PARKED {
                tracing::warn!(epoch, from, to, "too many parked peer connections; refused");
                return;
            }
            parked
                .by_key
                .entry((epoch, from, to))
                .or_default()
                .push(conn);
            parked.count += 1;
            inbox.arrived.notify_all();
        }
        Ok(Frame::Ping { nonce }) => answer_pings(conn, nonce),
        Ok(other) => {
            tracing::debug!(frame = ?std::mem::discriminant(&other), "peer connection opened with an unexpected frame");
        }
        Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut => {
            tracing::debug!("peer connection sent nothing; closed");
        }
        Err(e) => tracing::debug!(error = %e, "peer handshake failed"),
    }
}

/// Echoes pings until the prober hangs up or goes quiet for [`HANDSHAKE_TIMEOUT`].
fn answer_pings(mut conn: PeerConn, first: u64) {
    let mut nonce = first;
    loop {
        conn.set_deadline(Instant::now() + HANDSHAKE_TIMEOUT);
        if (Frame::Pong { nonce }).write_to(&mut conn).is_err() || conn.flush().is_err() {
            return;
        }
        match Frame::read_from(&mut conn) {
            Ok(Frame::Ping { nonce: n }) => nonce = n,
            _ => return,
        }
    }
}

/// Round-trip time to the peer port at `addr`, dialled as `tls` says: the median of `probes`
/// pings on one connection (after one unmeasured ping that warms it up).
///
/// # Errors
/// When the peer cannot be reached (or its handshake done) within `timeout` or answers
/// wrongly.
pub(crate) fn probe_rtt(
    addr: &str,
    probes: usize,
    timeout: Duration,
    tls: &PeerTls,
) -> std::io::Result<Duration> {
    let target = std::net::ToSocketAddrs::to_socket_addrs(addr)?
        .next()
        .ok_or_else(|| std::io::Error::new(ErrorKind::NotFound, format!("{addr}: no address")))?;
    let sock = TcpStream::connect_timeout(&target, timeout)?;
    let mut conn = tls.connect(sock, Instant::now() + timeout)?;
    let mut times = Vec::with_capacity(probes);
    for nonce in 0..=probes as u64 {
        conn.set_deadline(Instant::now() + timeout);
        let start = Instant::now();
        Frame::Ping { nonce }.write_to(&mut conn)?;
        conn.flush()?;
        match Frame::read_from(&mut conn)? {
            Frame::Pong { nonce: n } if n == nonce => {}
            _ => {
                return Err(std::io::Error::new(
                    ErrorKind::InvalidData,
                    "peer answered a ping wrongly",
                ));
            }
        }
        if nonce > 0 {
            times.push(start.elapsed());
        }
    }
    times.sort();
    Ok(times.get(times.len() / 2).copied().unwrap_or_default())
}
