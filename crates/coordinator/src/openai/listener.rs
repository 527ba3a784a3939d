//! The HTTP API's listener: connections admitted through the port's [`Gate`] (the connection
//! limit and idle timeout every port has), then, with `--tls-cert`, a TLS handshake — each in
//! a task of its own and bounded in time, so a client that stalls its handshake holds up no
//! other connection.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use tessera_tls::{Gate, Guarded, HANDSHAKE_TIMEOUT, ServerIdentity};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// Connections ready for HTTP, waiting for the server to take them.
const READY: usize = 64;

/// See the module docs. Dropping it stops accepting (and releases the port).
pub(crate) struct HttpListener {
    ready: mpsc::Receiver<(HttpIo, SocketAddr)>,
    local: SocketAddr,
    accepting: tokio::task::JoinHandle<()>,
}

impl Drop for HttpListener {
    fn drop(&mut self) {
        self.accepting.abort();
    }
}

impl HttpListener {
    /// Accepts on `listener` through `gate`, with TLS when `tls` is given.
    pub(crate) fn new(
        listener: TcpListener,
        gate: Gate,
        tls: Option<ServerIdentity>,
    ) -> io::Result<Self> {
        let local = listener.local_addr()?;
        let (tx, ready) = mpsc::channel(READY);
        let acceptor = tls.map(|t| t.acceptor());
        let accepting = tokio::spawn(async move {
            loop {
                let io = gate.accept(&listener).await;
                let addr = io.get_ref().peer_addr().unwrap_or(local);
                let Some(acceptor) = acceptor.clone() else {
                    if tx.send((HttpIo::Plain(io), addr)).await.is_err() {
                        return;
                    }
                    continue;
                };
                let tx = tx.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(io)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send((HttpIo::Tls(Box::new(tls)), addr)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%addr, error = %e, "HTTPS handshake failed"),
                        Err(_) => tracing::debug!(%addr, "HTTPS handshake timed out"),
                    }
                });
            }
        });
        Ok(Self {
            ready,
            local,
            accepting,
        })
    }
}

impl axum::serve::Listener for HttpListener {
    type Io = HttpIo;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(conn) => conn,
            // The accepting task only ends when this listener is dropped.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local)
    }
}

/// One HTTP connection, in the clear or over TLS.
pub(crate) enum HttpIo {
    /// `--http-listen` without `--tls-cert`.
    Plain(Guarded<TcpStream>),
    /// With `--tls-cert` (boxed: the TLS state is large).
    Tls(Box<tokio_rustls::server::TlsStream<Guarded<TcpStream>>>),
}

impl AsyncRead for HttpIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(io) => Pin::new(io).poll_read(cx, buf),
            Self::Tls(io) => Pin::new(io.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for HttpIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(io) => Pin::new(io).poll_write(cx, data),
            Self::Tls(io) => Pin::new(io.as_mut()).poll_write(cx, data),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(io) => Pin::new(io).poll_flush(cx),
            Self::Tls(io) => Pin::new(io.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(io) => Pin::new(io).poll_shutdown(cx),
            Self::Tls(io) => Pin::new(io.as_mut()).poll_shutdown(cx),
        }
    }
}
