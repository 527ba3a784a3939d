//! Connection hygiene against a real coordinator: 20,000 TCP connections opened to its ports
//! and left silent (from two helper processes, since one process here may hold at most 20,000
//! descriptors) leave it serving — health answers, a generation completes — with its open
//! descriptors and memory bounded by the connection limit, not by the attacker.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tessera_testkit::{ProcessCluster, Tessera, smollm2_arg as model, story};

fn tessera() -> Tessera {
    Tessera::new(env!("CARGO_BIN_EXE_tessera"))
}

/// Opens N connections to HOST:PORT, prints how many succeeded, and holds them (silent) until
/// its stdin closes.
const HOLDER: &str = r#"
import socket, sys
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
held = []
for _ in range(n):
    s = socket.socket()
    s.settimeout(5)
    try:
        s.connect((host, port))
    except OSError:
        break
    held.append(s)
print(len(held), flush=True)
sys.stdin.read()
"#;

/// A helper process holding `n` silent connections to `addr`; returns it once they are open,
/// with how many opened.
fn hold(addr: &str, n: usize) -> (Child, usize) {
    let (host, port) = addr.rsplit_once(':').expect("host:port");
    let mut child = Command::new("python3")
        .args(["-c", HOLDER, host, port, &n.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("the count");
    (child, line.trim().parse().expect("a count"))
}

fn proc_field(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("field")
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count)
}

/// Ensures that 20,000 silent connections to a coordinator's public and cluster ports leave it
/// serving, with its descriptors and memory bounded by the connection limit.
#[test]
fn twenty_thousand_idle_connections_leave_the_coordinator_serving() {
    let Some(model) = model() else { return };
    let c = ProcessCluster::start_with(
        &tessera(),
        &model,
        &[(1, "1GiB")],
        &["--max-connections", "1024"],
    );
    let pid = c.coordinator_pid();
    assert_eq!(c.generate(story(4)).expect("serves").len(), 4);
    let rss_before = proc_field(pid, "VmRSS:");
    let public = c.endpoint.trim_start_matches("http://").to_owned();
    let cluster = c
        .cluster_endpoint()
        .trim_start_matches("http://")
        .to_owned();
    let (mut a, opened_a) = hold(&public, 10_000);
    let (mut b, opened_b) = hold(&cluster, 10_000);
    assert_eq!(
        opened_a + opened_b,
        20_000,
        "the attack could not open its connections"
    );
    std::thread::sleep(Duration::from_secs(2));
    // Still serving: a fresh client gets in (pushing out a silent connection) and is answered.
    let health = tessera().run(&["health", "--endpoint", &c.endpoint]);
    assert!(
        health.status.success(),
        "{}",
        String::from_utf8_lossy(&health.stderr)
    );
    assert_eq!(c.generate(story(4)).expect("serves under attack").len(), 4);
    let fds = open_fds(pid);
    let rss_after = proc_field(pid, "VmRSS:");
    eprintln!("coordinator: {fds} descriptors, VmRSS {rss_before} -> {rss_after} kB");
    assert!(fds < 2 * 1024 + 200, "{fds} descriptors open");
    assert!(
        rss_after < rss_before + 200 * 1024,
        "VmRSS grew from {rss_before} to {rss_after} kB"
    );
    for h in [&mut a, &mut b] {
        drop(h.stdin.take());
        let _ = h.wait();
    }
}
