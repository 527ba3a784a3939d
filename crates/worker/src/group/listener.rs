//! The peer port: where the other ranks of this worker's tensor-parallel groups dial it.
//!
//! An accept thread takes each connection, reads its first frame on a short-lived handshake
//! thread and files it: a [`Frame::Hello`] parks the connection in an inbox keyed by
//! (plan epoch, dialling rank, dialled rank) until this worker's executor forms that group and
//! takes it ([`PeerListener::take`]); a [`Frame::Ping`] is answered with pongs until the
//! prober hangs up (latency probes). Anything else, a silent dialler (handshake timeout), or
//! more handshakes at once than [`MAX_HANDSHAKES`] closes the connection.
//!
//! Parked connections of older epochs are dropped when a newer group is formed, and the
//! inbox holds at most [`MAX_PARKED`], so nothing accumulates.

use std::collections::HashMap;
use std::io::ErrorKind;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::frame::Frame;
use crate::error::WorkerError;

/// How long a dialler may take to send its first frame.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Handshakes in progress at once; more are refused (closed) at once.
const MAX_HANDSHAKES: usize = 64;
/// Connections parked for groups not yet formed.
const MAX_PARKED: usize = 256;

/// Who a parked connection is: (epoch, from rank, to rank).
type Key = (u64, u32, u32);

#[derive(Default)]
struct Inbox {
    parked: Mutex<HashMap<Key, TcpStream>>,
    arrived: Condvar,
}

/// The bound peer port and its accept thread; the thread stops when this is dropped.
pub(crate) struct PeerListener {
    addr: SocketAddr,
    inbox: Arc<Inbox>,
    stop: Arc<AtomicBool>,
}

impl std::fmt::Debug for PeerListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerListener")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl PeerListener {
    /// Binds `addr` (port 0 picks a free port) and starts accepting.
    ///
    /// # Errors
    /// [`WorkerError::Bind`] when the address cannot be bound; [`WorkerError::Executor`] when
    /// the accept thread cannot start.
    pub(crate) fn bind(addr: SocketAddr) -> Result<Self, WorkerError> {
        let listener =
            TcpListener::bind(addr).map_err(|source| WorkerError::Bind { addr, source })?;
        let local = listener
            .local_addr()
            .map_err(|source| WorkerError::Bind { addr, source })?;
        let inbox = Arc::new(Inbox::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (inbox2, stop2) = (Arc::clone(&inbox), Arc::clone(&stop));
        std::thread::Builder::new()
            .name("tessera-peer-accept".into())
            .spawn(move || accept_loop(&listener, &inbox2, &stop2))
            .map_err(|e| WorkerError::Executor(format!("peer accept thread: {e}")))?;
        Ok(Self {
            addr: local,
            inbox,
            stop,
        })
    }

    /// The bound address.
    pub(crate) fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Waits until `deadline` for rank `from` of epoch `epoch`'s group to dial rank `to`;
    /// `None` when it has not by then.
    pub(crate) fn take(
        &self,
        epoch: u64,
        from: u32,
        to: u32,
        deadline: Instant,
    ) -> Option<TcpStream> {
        let mut parked = self
            .inbox
            .parked
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        loop {
            if let Some(s) = parked.remove(&(epoch, from, to)) {
                return Some(s);
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
        self.inbox
            .parked
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .retain(|k, _| k.0 >= epoch);
    }
}

impl Drop for PeerListener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept so the thread sees the flag; failure means it is gone.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
    }
}

fn accept_loop(listener: &TcpListener, inbox: &Arc<Inbox>, stop: &AtomicBool) {
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
        let (inbox, pending2) = (Arc::clone(inbox), Arc::clone(&pending));
        let spawned = std::thread::Builder::new()
            .name("tessera-peer-hello".into())
            .spawn(move || {
                handshake(conn, &inbox);
                pending2.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            pending.fetch_sub(1, Ordering::SeqCst);
        }
    }
    tracing::debug!("peer listener stopped");
}

/// Reads a connection's first frame and files it.
fn handshake(mut conn: TcpStream, inbox: &Inbox) {
    let _ = conn.set_nodelay(true);
    if conn.set_read_timeout(Some(HANDSHAKE_TIMEOUT)).is_err() {
        return;
    }
    match Frame::read_from(&mut conn) {
        Ok(Frame::Hello { epoch, from, to }) => {
            if conn.set_read_timeout(None).is_err() {
                return;
            }
            let mut parked = inbox
                .parked
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if parked.len() >= MAX_PARKED {
                tracing::warn!(epoch, from, to, "too many parked peer connections; refused");
                return;
            }
            parked.insert((epoch, from, to), conn);
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

/// Echoes pings until the prober hangs up or goes quiet.
fn answer_pings(mut conn: TcpStream, first: u64) {
    let mut nonce = first;
    loop {
        if (Frame::Pong { nonce }).write_to(&mut conn).is_err() {
            return;
        }
        match Frame::read_from(&mut conn) {
            Ok(Frame::Ping { nonce: n }) => nonce = n,
            _ => return,
        }
    }
}

/// Round-trip time to the peer port at `addr`: the median of `probes` pings on one
/// connection (after one unmeasured ping that warms it up).
///
/// # Errors
/// When the peer cannot be reached within `timeout` or answers wrongly.
pub(crate) fn probe_rtt(addr: &str, probes: usize, timeout: Duration) -> std::io::Result<Duration> {
    let target = std::net::ToSocketAddrs::to_socket_addrs(addr)?
        .next()
        .ok_or_else(|| std::io::Error::new(ErrorKind::NotFound, format!("{addr}: no address")))?;
    let mut conn = TcpStream::connect_timeout(&target, timeout)?;
    conn.set_nodelay(true)?;
    conn.set_read_timeout(Some(timeout))?;
    let mut times = Vec::with_capacity(probes);
    for nonce in 0..=probes as u64 {
        let start = Instant::now();
        Frame::Ping { nonce }.write_to(&mut conn)?;
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
