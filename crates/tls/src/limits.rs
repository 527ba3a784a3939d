//! Connection hygiene for every port: at most so many connections at once, and connections
//! that stay silent closed.
//!
//! An attacker does not need a certificate or an API key to open TCP connections and leave
//! them idle; unbounded, they use up the process's file descriptors and memory. A [`Gate`]
//! guards one listening port:
//!
//! 1. every accepted connection is registered, with the time of its last byte read or written;
//! 2. at [`Limits::max_connections`], a new connection takes the place of the one silent the
//!    longest — if that one has been silent for at least [`EVICT_AFTER`]; otherwise (every
//!    connection is busy) the new one is closed at once. So a flood of idle connections cannot
//!    lock out a client: each new connection pushes out an idle one, and busy ones are never
//!    pushed out;
//! 3. a connection silent for [`Limits::idle_timeout`] is closed. gRPC servers send HTTP/2
//!    pings well within it, so a live client (even one waiting on a long prefill) is never
//!    silent; a TCP connection that never speaks, or a dead peer, is.
//!
//! A closed connection reads as an error ([`io::ErrorKind::TimedOut`] when idle,
//! [`io::ErrorKind::ConnectionAborted`] when evicted), which the server treats as the
//! connection's end.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, Sleep};

/// How long the longest-silent connection must have been silent to be pushed out by a new one.
pub const EVICT_AFTER: Duration = Duration::from_secs(1);

/// How often a gRPC server behind a [`Gate`] pings its clients (HTTP/2 PING): well within the
/// default idle timeout (300 s), so a live client — even one waiting on a long prefill — is
/// never closed as silent. (An idle timeout set below it closes quiet gRPC clients too.)
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);

/// How long a pinged client has to answer before its connection is given up as dead.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// What one port accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Connections open at once.
    pub max_connections: usize,
    /// Silence (no byte either way) after which a connection is closed.
    pub idle_timeout: Duration,
}

impl Default for Limits {
    /// 2048 connections, closed after 300 s of silence.
    fn default() -> Self {
        Self {
            max_connections: 2048,
            idle_timeout: Duration::from_secs(300),
        }
    }
}

/// One registered connection, as the gate sees it.
struct Entry {
    state: Arc<ConnState>,
}

/// What a connection and its gate share.
struct ConnState {
    /// Milliseconds since the gate's epoch of the last byte moved.
    last: AtomicU64,
    /// Set by the gate to close the connection.
    evicted: AtomicBool,
    /// The task that last polled the connection, woken on eviction.
    waker: Mutex<Option<Waker>>,
}

struct Shared {
    limits: Limits,
    port: &'static str,
    epoch: Instant,
    next: AtomicU64,
    open: Mutex<HashMap<u64, Entry>>,
    refused: AtomicU64,
    evicted: AtomicU64,
}

impl Shared {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

/// The guard of one port (see the module docs); cheap to clone.
#[derive(Clone)]
pub struct Gate {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gate")
            .field("port", &self.shared.port)
            .field("limits", &self.shared.limits)
            .field("open", &self.open())
            .finish()
    }
}

/// Counters of a gate, for metrics and tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GateStats {
    /// Connections open now.
    pub open: usize,
    /// Connections closed at once because every slot was busy.
    pub refused: u64,
    /// Silent connections pushed out by new ones.
    pub evicted: u64,
}

impl Gate {
    /// A gate for the port named `port` (for logs).
    pub fn new(port: &'static str, limits: Limits) -> Self {
        Self {
            shared: Arc::new(Shared {
                limits: Limits {
                    max_connections: limits.max_connections.max(1),
                    ..limits
                },
                port,
                epoch: Instant::now(),
                next: AtomicU64::new(0),
                open: Mutex::new(HashMap::new()),
                refused: AtomicU64::new(0),
                evicted: AtomicU64::new(0),
            }),
        }
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.shared
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// The gate's counters.
    pub fn stats(&self) -> GateStats {
        GateStats {
            open: self.open(),
            refused: self.shared.refused.load(Ordering::Relaxed),
            evicted: self.shared.evicted.load(Ordering::Relaxed),
        }
    }

    /// Registers `io`, pushing out the longest-silent connection when the port is full;
    /// `None` (and `io` dropped, which closes it) when every connection is busy.
    pub fn admit<IO>(&self, io: IO) -> Option<Guarded<IO>> {
        let s = &self.shared;
        let now = s.now_ms();
        let mut open = s.open.lock().unwrap_or_else(PoisonError::into_inner);
        if open.len() >= s.limits.max_connections {
            let oldest = open
                .iter()
                .map(|(k, e)| (e.state.last.load(Ordering::Relaxed), *k))
                .min();
            let evict_after = u64::try_from(EVICT_AFTER.as_millis()).unwrap_or(u64::MAX);
            match oldest {
                Some((last, key)) if now.saturating_sub(last) >= evict_after => {
                    if let Some(e) = open.remove(&key) {
                        e.state.evicted.store(true, Ordering::Release);
                        if let Some(w) = e
                            .state
                            .waker
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .take()
                        {
                            w.wake();
                        }
                    }
                    let n = s.evicted.fetch_add(1, Ordering::Relaxed);
                    if n.is_power_of_two() {
                        tracing::warn!(
                            port = s.port,
                            evicted = n + 1,
                            max = s.limits.max_connections,
                            "connection limit reached: silent connections are being replaced"
                        );
                    }
                }
                _ => {
                    let n = s.refused.fetch_add(1, Ordering::Relaxed);
                    if n.is_power_of_two() {
                        tracing::warn!(
                            port = s.port,
                            refused = n + 1,
                            max = s.limits.max_connections,
                            "connection limit reached and every connection busy: new ones are closed"
                        );
                    }
                    return None;
                }
            }
        }
        let key = s.next.fetch_add(1, Ordering::Relaxed);
        let state = Arc::new(ConnState {
            last: AtomicU64::new(now),
            evicted: AtomicBool::new(false),
            waker: Mutex::new(None),
        });
        open.insert(
            key,
            Entry {
                state: Arc::clone(&state),
            },
        );
        drop(open);
        Some(Guarded {
            io,
            key,
            state,
            shared: Arc::clone(&self.shared),
            idle: Box::pin(tokio::time::sleep(s.limits.idle_timeout)),
        })
    }

    /// Accepts from `listener` until one is admitted (see [`Gate::admit`]); accept errors
    /// (out of file descriptors, a connection reset before it was accepted) are logged and
    /// retried after a short pause.
    pub async fn accept(&self, listener: &TcpListener) -> Guarded<TcpStream> {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    if let Some(g) = self.admit(stream) {
                        return g;
                    }
                }
                Err(e) => {
                    tracing::debug!(port = self.shared.port, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    }

    /// The admitted connections of `listener`, as a stream for tonic's `serve_with_incoming`.
    /// It never yields an error: tonic ends the whole server on an accept error other than a
    /// connection's own (out of file descriptors, say), and [`Gate::accept`] pauses and
    /// retries instead. Dropping the stream releases the listener.
    pub fn incoming(
        self,
        listener: TcpListener,
    ) -> impl tokio_stream::Stream<Item = io::Result<Guarded<TcpStream>>> + Send + 'static {
        futures_util::stream::unfold((self, listener), |(gate, listener)| async move {
            let io = gate.accept(&listener).await;
            Some((Ok(io), (gate, listener)))
        })
    }
}

/// A connection admitted by a [`Gate`]: the same I/O, closed when silent too long or pushed
/// out; unregistered when dropped.
pub struct Guarded<IO> {
    io: IO,
    key: u64,
    state: Arc<ConnState>,
    shared: Arc<Shared>,
    idle: Pin<Box<Sleep>>,
}

impl<IO> Guarded<IO> {
    /// The guarded I/O.
    pub fn get_ref(&self) -> &IO {
        &self.io
    }

    fn touch(&self) {
        self.state
            .last
            .store(self.shared.now_ms(), Ordering::Relaxed);
    }

    /// The error of a connection the gate pushed out, if it was.
    fn evicted(&self) -> Option<io::Error> {
        self.state.evicted.load(Ordering::Acquire).then(|| {
            io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "replaced by a new connection at the connection limit",
            )
        })
    }

    /// Whether a connection that cannot move bytes now must close: evicted, or silent past
    /// the idle timeout (the timer re-arms itself while bytes keep moving). Registers the task
    /// to be woken by either.
    fn closed(&mut self, cx: &mut Context<'_>) -> Option<io::Error> {
        if let Some(e) = self.evicted() {
            return Some(e);
        }
        {
            let mut w = self
                .state
                .waker
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if !w.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                *w = Some(cx.waker().clone());
            }
        }
        while self.idle.as_mut().poll(cx).is_ready() {
            let last = self.state.last.load(Ordering::Relaxed);
            let deadline =
                self.shared.epoch + Duration::from_millis(last) + self.shared.limits.idle_timeout;
            if deadline <= Instant::now() {
                return Some(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "closed after the idle timeout",
                ));
            }
            self.idle.as_mut().reset(deadline);
        }
        None
    }
}

impl<IO> Guarded<IO> {
    /// What a write's outcome means for the connection (both write paths): bytes written are
    /// activity; a write that waits registers the timers and may find the connection closed.
    /// The timer and the waker only matter while a write waits — this is the hot path.
    fn wrote(
        &mut self,
        cx: &mut Context<'_>,
        out: Poll<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        match out {
            Poll::Ready(Ok(n)) => {
                if n > 0 {
                    self.touch();
                }
                Poll::Ready(Ok(n))
            }
            Poll::Pending => match self.closed(cx) {
                Some(e) => Poll::Ready(Err(e)),
                None => Poll::Pending,
            },
            other => other,
        }
    }
}

impl<IO> Drop for Guarded<IO> {
    fn drop(&mut self) {
        self.shared
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.key);
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Guarded<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    self.touch();
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => match self.closed(cx) {
                Some(e) => Poll::Ready(Err(e)),
                None => Poll::Pending,
            },
            other => other,
        }
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Guarded<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        if let Some(e) = self.evicted() {
            return Poll::Ready(Err(e));
        }
        let out = Pin::new(&mut self.io).poll_write(cx, data);
        self.wrote(cx, out)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if let Some(e) = self.evicted() {
            return Poll::Ready(Err(e));
        }
        let out = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.wrote(cx, out)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

impl tonic::transport::server::Connected for Guarded<TcpStream> {
    // tonic reads a TLS peer's certificates from `TlsConnectInfo<TcpConnectInfo>`: the
    // guarded stream must present itself exactly as the plain one does.
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn pair(gate: &Gate, listener: &TcpListener) -> (TcpStream, Option<Guarded<TcpStream>>) {
        let addr = listener.local_addr().expect("addr");
        let client = TcpStream::connect(addr).await.expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        (client, gate.admit(server))
    }

    /// Ensures that at the limit a new connection replaces the one silent longest, that busy
    /// connections are never replaced (the new one is refused instead), and that a closed
    /// connection frees its slot.
    #[tokio::test(start_paused = true)]
    async fn a_full_port_replaces_its_most_silent_connection() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let gate = Gate::new(
            "test",
            Limits {
                max_connections: 2,
                idle_timeout: Duration::from_secs(3600),
            },
        );
        let (_c1, g1) = pair(&gate, &listener).await;
        let mut g1 = g1.expect("admitted");
        tokio::time::advance(Duration::from_secs(5)).await;
        let (mut c2, g2) = pair(&gate, &listener).await;
        let mut g2 = g2.expect("admitted");
        // Both busy just now: a third is refused.
        g1.touch();
        let (_c3, g3) = pair(&gate, &listener).await;
        assert!(g3.is_none());
        assert_eq!(gate.stats().refused, 1);
        // g2 has been silent longest once time passes and g1 speaks.
        tokio::time::advance(Duration::from_secs(2)).await;
        g1.write_all(b"x").await.expect("write");
        let (_c4, g4) = pair(&gate, &listener).await;
        assert!(g4.is_some());
        assert_eq!(gate.stats().evicted, 1);
        let mut buf = [0u8; 1];
        let err = g2.read(&mut buf).await.expect_err("evicted");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionAborted);
        drop(g2);
        c2.write_all(b"y").await.ok();
        assert_eq!(gate.open(), 2);
        drop(g4);
        assert_eq!(gate.open(), 1);
    }

    /// Ensures that a connection silent for the idle timeout is closed, and that one moving
    /// bytes is not.
    #[tokio::test(start_paused = true)]
    async fn silent_connections_close_after_the_idle_timeout() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let gate = Gate::new(
            "test",
            Limits {
                max_connections: 8,
                idle_timeout: Duration::from_secs(10),
            },
        );
        let (mut client, g) = pair(&gate, &listener).await;
        let mut g = g.expect("admitted");
        for _ in 0..5 {
            tokio::time::advance(Duration::from_secs(4)).await;
            client.write_all(b"ping").await.expect("write");
            let mut buf = [0u8; 4];
            g.read_exact(&mut buf).await.expect("alive while talking");
        }
        let mut buf = [0u8; 4];
        let err = g.read(&mut buf).await.expect_err("idle");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }
}
