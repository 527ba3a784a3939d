//! What the multi-process tests share: finding the real model, starting `tessera` processes
//! and reading the address they listen on, and picking free loopback ports.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// The SmolLM2 GGUF as a string argument, or `None` (the caller skips) when it is absent.
pub fn model() -> Option<String> {
    let path = tessera_testkit::smollm2_gguf()?;
    Some(path.to_string_lossy().into_owned())
}

/// Starts `tessera ARGS…` and returns it with the address from its "listening on" line.
///
/// # Panics
/// When the process cannot start or does not listen within 60 s.
pub fn spawn<S: AsRef<str>>(args: &[S]) -> (Child, String) {
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
        let mut sent = false;
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if !sent && let Some(addr) = line.split("listening on ").nth(1) {
                let _ = tx.send(addr.trim().to_owned());
                sent = true;
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|_| panic!("`tessera {}` did not start listening", args.join(" ")));
    (child, addr)
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
