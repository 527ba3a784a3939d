//! What the multi-process tests share: finding the real model, starting `tessera` processes
//! and reading the addresses they listen on, and picking free loopback ports.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// The SmolLM2 GGUF as a string argument, or `None` (the caller skips) when it is absent.
pub fn model() -> Option<String> {
    let path = tessera_testkit::smollm2_gguf()?;
    Some(path.to_string_lossy().into_owned())
}

/// Starts `tessera ARGS…` and returns it with the address from its "listening on" line (a
/// coordinator's public address).
///
/// # Panics
/// When the process cannot start or does not listen within 60 s.
pub fn spawn<S: AsRef<str>>(args: &[S]) -> (Child, String) {
    let (child, addrs) = spawn_with_addresses(args);
    (child, addrs.public)
}

/// What a started process printed: the address from its "listening on" line and, for a
/// coordinator, its cluster address (the "cluster on" line it prints before).
#[derive(Clone, Debug)]
#[allow(dead_code, reason = "not every test binary reads the cluster address")]
pub struct Addresses {
    /// The "listening on" address: a coordinator's public API, a worker's Worker service.
    pub public: String,
    /// A coordinator's cluster port (Raft, worker registration); `None` for a worker.
    pub cluster: Option<String>,
}

/// Starts `tessera coordinator ARGS…` and returns it with its (public, cluster) addresses.
///
/// # Panics
/// As [`spawn`], or when the coordinator printed no cluster address.
#[allow(
    dead_code,
    reason = "not every test binary starts coordinators this way"
)]
pub fn spawn_coordinator<S: AsRef<str>>(args: &[S]) -> (Child, String, String) {
    let (child, addrs) = spawn_with_addresses(args);
    let cluster = addrs
        .cluster
        .expect("a coordinator prints its cluster address");
    (child, addrs.public, cluster)
}

/// Starts `tessera ARGS…` and returns it with the addresses it printed.
///
/// # Panics
/// When the process cannot start or does not listen within 60 s.
pub fn spawn_with_addresses<S: AsRef<str>>(args: &[S]) -> (Child, Addresses) {
    let args: Vec<&str> = args.iter().map(AsRef::as_ref).collect();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(&args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start tessera");
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let (mut sent, mut cluster) = (false, None);
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if !sent && let Some(addr) = line.split("cluster on ").nth(1) {
                cluster = Some(addr.trim().to_owned());
            }
            if !sent && let Some(addr) = line.split("listening on ").nth(1) {
                let _ = tx.send(Addresses {
                    public: addr.trim().to_owned(),
                    cluster: cluster.take(),
                });
                sent = true;
            }
        }
    });
    let addrs = rx
        .recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|_| panic!("`tessera {}` did not start listening", args.join(" ")));
    (child, addrs)
}

/// A loopback port free at the time of the call.
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind :0");
    l.local_addr().expect("local addr").port()
}

/// `GET /metrics` from `addr` (`host:port`) over a plain TCP connection: the whole response.
///
/// # Panics
/// When the endpoint does not answer `200 OK` within 10 s.
#[allow(dead_code, reason = "used by the cluster and observability tests only")]
pub fn scrape(addr: &str) -> String {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(addr).expect("connect to the metrics endpoint");
    c.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    c.write_all(b"GET /metrics HTTP/1.1\r\nHost: tessera\r\n\r\n")
        .expect("send the scrape");
    let mut out = String::new();
    c.read_to_string(&mut out).expect("read the scrape");
    assert!(out.starts_with("HTTP/1.1 200 OK"), "{out}");
    out
}

// Only the Raft test binaries use these; the others would warn about unused items.
#[allow(dead_code, reason = "used by the Raft test binaries only")]
pub mod proxy;
#[allow(dead_code, reason = "used by the Raft test binaries only")]
pub mod raft;
