//! `tessera bench-failover` end to end, briefly: one leader kill and one worker kill, so the
//! benchmark whose figures the README quotes keeps running (it starts its own cluster, on mutual
//! TLS like every other).

use std::process::Stdio;
use std::time::Duration;

use tessera_testkit::{Tessera, smollm2_arg as model};

/// Ensures that `tessera bench-failover` runs a leader kill and a worker kill to the end and
/// prints both summaries: the leader's failover time, and the delay of a stream whose worker
/// was killed (which must not fail).
#[test]
fn bench_failover_measures_a_leader_and_a_worker_kill() {
    let Some(model) = model() else { return };
    let tessera = Tessera::new(env!("CARGO_BIN_EXE_tessera"));
    let child = tessera
        .command()
        .args(["bench-failover", "--model", &model])
        .args([
            "--kills",
            "1",
            "--workers",
            "2",
            "--worker-kills",
            "1",
            "--timeout",
            "60",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        // The cluster's logs: not needed, and a full pipe would stall it.
        .stderr(Stdio::null())
        .spawn()
        .expect("tessera bench-failover");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(Duration::from_secs(180)) {
        Ok(out) => out.expect("output"),
        Err(_) => {
            let _ = std::process::Command::new("kill")
                .args(["-9", &pid.to_string()])
                .status();
            panic!("bench-failover did not finish in 180 s");
        }
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}: {stdout}", out.status);
    assert!(
        stdout.contains("failover over 1 leader kills: p50"),
        "{stdout}"
    );
    assert!(
        stdout.contains("a killed worker's stream delayed over 1 kills: p50"),
        "{stdout}"
    );
}
