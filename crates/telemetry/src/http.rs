//! The `/metrics` endpoint: a minimal HTTP/1.1 responder on its own port that answers
//! `GET /metrics` with whatever the process renders at scrape time, in the exposition format
//! the scraper asks for ([`crate::exposition`]).
//!
//! A scrape is one GET, so a web framework would add dependencies and nothing else. Both the
//! coordinator and the worker serve their metrics through this one implementation.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::exposition::negotiate;

/// Largest request head read; a scrape's is a few hundred bytes.
const MAX_HEAD: usize = 4096;
/// How long a client may take to send its request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// Scrapes answered at once; more connections are closed at once (a scraper sends a handful,
/// an attacker thousands, none of which may exhaust the process's file descriptors).
const MAX_CONNECTIONS: usize = 64;

/// Binds the metrics endpoint and prints `tessera <role> metrics on <addr>` on stdout (port 0
/// picks a free port; scripts and tests read the line to learn it).
///
/// # Errors
/// When the address cannot be bound.
pub async fn bind(addr: SocketAddr, role: &str) -> std::io::Result<TcpListener> {
    let listener = TcpListener::bind(addr).await?;
    println!("tessera {role} metrics on {}", listener.local_addr()?);
    Ok(listener)
}

/// Serves `GET /metrics` on `listener` until the task is aborted, answering with `render()`
/// (called once per scrape); other paths get 404.
pub async fn serve<R>(listener: TcpListener, render: R)
where
    R: Fn() -> String + Send + Sync + 'static,
{
    let render = Arc::new(render);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok((conn, peer)) = listener.accept().await else {
            // Out of descriptors or a connection reset before it was accepted: pause, retry.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            tracing::debug!(%peer, "metrics endpoint busy: connection closed");
            continue;
        };
        let render = Arc::clone(&render);
        tokio::spawn(async move {
            let _slot = slot;
            if let Err(e) = answer(conn, render.as_ref()).await {
                tracing::debug!(%peer, error = %e, "metrics scrape failed");
            }
        });
    }
}

/// Reads one request head from `conn` and answers it.
async fn answer(
    mut conn: TcpStream,
    render: &(dyn Fn() -> String + Send + Sync),
) -> std::io::Result<()> {
    let mut buf = vec![0u8; MAX_HEAD];
    let mut len = 0;
    // Read the request head (a scrape has no body); give up on slow or huge requests.
    let head = tokio::time::timeout(HEAD_TIMEOUT, async {
        while len < buf.len() {
            match conn.read(&mut buf[len..]).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => len += n,
            }
            if buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
                return true;
            }
        }
        false
    })
    .await;
    if !matches!(head, Ok(true)) {
        return Ok(());
    }
    let head = String::from_utf8_lossy(&buf[..len]);
    let ok = head.starts_with("GET /metrics ");
    let (status, (body, content_type)) = if ok {
        ("200 OK", negotiate(render(), header(&head, "accept")))
    } else {
        (
            "404 Not Found",
            (
                "only GET /metrics is served here\n".to_owned(),
                "text/plain; charset=utf-8",
            ),
        )
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(response.as_bytes()).await
}

/// The value of header `name` (case-insensitive) in a request head, when present.
fn header<'h>(head: &'h str, name: &str) -> Option<&'h str> {
    head.split("\r\n").skip(1).find_map(|line| {
        let (k, v) = line.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// Sends `GET path` to `addr` and returns the whole response.
    async fn get(addr: SocketAddr, path: &str) -> String {
        get_accepting(addr, path, "*/*").await
    }

    /// Sends `GET path` with `Accept: accept` to `addr` and returns the whole response.
    async fn get_accepting(addr: SocketAddr, path: &str, accept: &str) -> String {
        let mut c = TcpStream::connect(addr).await.expect("connect");
        let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\naccept: {accept}\r\n\r\n");
        c.write_all(req.as_bytes()).await.expect("write");
        let mut out = String::new();
        c.read_to_string(&mut out).await.expect("read");
        out
    }

    /// Ensures that a real HTTP GET gets what the renderer returns at that moment, with a
    /// correct Content-Length, and that other paths get 404.
    #[tokio::test]
    async fn serves_the_rendering_of_each_scrape() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let scrapes = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&scrapes);
        let task = tokio::spawn(serve(listener, move || {
            let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
            format!("# TYPE scrapes counter\nscrapes_total {n}\n# EOF\n")
        }));
        let first = get(addr, "/metrics").await;
        assert!(first.starts_with("HTTP/1.1 200 OK\r\n"), "{first}");
        assert!(
            first.contains("Content-Type: text/plain; version=0.0.4; charset=utf-8\r\n"),
            "{first}"
        );
        let body = "# TYPE scrapes_total counter\nscrapes_total 1\n";
        assert!(
            first.contains(&format!("Content-Length: {}\r\n", body.len())),
            "{first}"
        );
        assert!(first.ends_with(&format!("\r\n\r\n{body}")), "{first}");
        let second = get_accepting(addr, "/metrics", "application/openmetrics-text").await;
        assert!(
            second.contains("Content-Type: application/openmetrics-text; version=1.0.0"),
            "{second}"
        );
        assert!(second.ends_with("scrapes_total 2\n# EOF\n"), "{second}");
        let other = get(addr, "/").await;
        assert!(other.starts_with("HTTP/1.1 404"), "{other}");
        assert_eq!(scrapes.load(Ordering::SeqCst), 2, "a 404 renders nothing");
        task.abort();
    }

    /// Ensures that a client that never finishes its request head does not block others.
    #[tokio::test]
    async fn a_stalled_client_does_not_block_scrapes() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let task = tokio::spawn(serve(listener, || "# TYPE up gauge\nup 1\n".to_owned()));
        let mut stalled = TcpStream::connect(addr).await.expect("connect");
        stalled.write_all(b"GET /metr").await.expect("write");
        let ok = tokio::time::timeout(Duration::from_secs(2), get(addr, "/metrics"))
            .await
            .expect("answered while another client stalls");
        assert!(ok.ends_with("up 1\n"), "{ok}");
        task.abort();
    }
}
