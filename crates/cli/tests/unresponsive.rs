//! The client commands against a port that accepts TCP connections and never answers (a
//! stopped process, a proxy with nothing behind it, the wrong service), and against one that
//! refuses them: each fails within seconds with an error naming the address, never hangs.

use std::net::TcpListener;
use std::process::Output;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tessera_testkit::{Tessera, free_addr};

/// The `tessera` binary under test.
fn tessera() -> Tessera {
    Tessera::new(env!("CARGO_BIN_EXE_tessera"))
}

/// A loopback port that accepts every connection and holds it open without a byte in
/// return, until dropped.
struct Silent {
    addr: String,
    stop: Arc<AtomicBool>,
}

impl Silent {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("address").to_string();
        let stop = Arc::new(AtomicBool::new(false));
        let held = Arc::new(Mutex::new(Vec::new()));
        let flag = Arc::clone(&stop);
        std::thread::spawn(move || {
            while !flag.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((conn, _)) => held.lock().expect("held").push(conn),
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Self { addr, stop }
    }
}

impl Drop for Silent {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Runs `tessera ARGS…`, which must fail within `within`; returns its stderr.
fn fails_within(args: &[&str], within: Duration) -> String {
    let start = Instant::now();
    let out: Output = tessera().run(args);
    let took = start.elapsed();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "`tessera {}` succeeded",
        args.join(" ")
    );
    assert!(
        took < within,
        "`tessera {}` took {took:?}: {err}",
        args.join(" ")
    );
    assert!(!err.contains("panicked"), "{err}");
    err
}

/// The client commands, each aimed at `addr`.
fn commands(addr: &str) -> Vec<Vec<&str>> {
    vec![
        vec!["generate", "--endpoint", addr, "--max-tokens", "4", "Hello"],
        vec!["status", "--endpoint", addr],
        vec!["health", "--endpoint", addr],
        vec![
            "cluster",
            "remove-coordinator",
            "--endpoint",
            addr,
            "--id",
            "2",
        ],
    ]
}

/// Ensures that every client command fails within a few seconds, naming the address and
/// saying that it did not answer, when the port accepts the connection and never answers
/// (it used to hang until the peer gave up).
#[test]
fn a_port_that_never_answers_fails_fast_and_says_where() {
    let silent = Silent::start();
    for args in commands(&silent.addr) {
        let err = fails_within(&args, Duration::from_secs(10));
        assert!(
            err.contains(&silent.addr) && err.contains("did not answer"),
            "`tessera {}`: {err}",
            args.join(" ")
        );
    }
}

/// Ensures that every client command fails at once, naming the address, when nothing
/// listens there.
#[test]
fn a_refused_connection_fails_fast_and_says_where() {
    // Free a moment ago, so nothing listens there (another process could take it: rare).
    let addr = free_addr();
    for args in commands(&addr) {
        let err = fails_within(&args, Duration::from_secs(10));
        assert!(err.contains(&addr), "`tessera {}`: {err}", args.join(" "));
    }
}
