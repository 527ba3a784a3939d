//! Clusters no plan can serve — workers that lack the memory for the model, a tensor-parallel
//! group larger than the model's KV heads: the coordinator says so once, not at every planning
//! attempt, and a request that no plan serves fails with UNAVAILABLE and the planner's reason.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tessera_testkit::{START_TIMEOUT, Tessera, kill, smollm2_arg as model, temp_dir};

/// The `tessera` binary under test.
fn tessera() -> Tessera {
    Tessera::new(env!("CARGO_BIN_EXE_tessera"))
}

/// What the planner says when the model does not fit.
const DOES_NOT_FIT: &str = "the model does not fit";

/// Ensures that a worker too small for the model gets one "does not fit" log line however
/// often the coordinator re-plans (every 100 ms here), and that a request waiting for a plan
/// fails after `--ready-wait-ms` with UNAVAILABLE and the planner's reason (the bytes needed
/// and offered), not a bare "no plan serves the model".
#[test]
fn does_not_fit_is_logged_once_and_told_to_the_client() {
    let Some(model) = model() else {
        return;
    };
    refused_once(&model, &[], "20MiB", DOES_NOT_FIT, "bytes");
}

/// Ensures that `--tp 4` on a model with 3 KV heads is refused with the reason (KV heads are
/// not replicated), logged once, and told to a client.
#[test]
fn a_group_larger_than_the_kv_heads_is_refused_once() {
    let Some(model) = model() else {
        return;
    };
    refused_once(
        &model,
        &["--tp", "4"],
        "1GiB",
        "tensor parallelism refused",
        "not replicated",
    );
}

/// Starts a coordinator with `extra` arguments and one worker of `memory`, waits for the
/// planning failure `refusal` in its log, checks that a request fails with UNAVAILABLE naming
/// `refusal` and `detail`, and that the failure was logged once.
fn refused_once(model: &str, extra: &[&str], memory: &str, refusal: &str, detail: &str) {
    let dir = temp_dir("no-plan");
    let log_path = dir.path().join("coordinator.log");
    let log = File::create(&log_path).expect("create the log");
    let mut coordinator = tessera()
        .command()
        .args([
            "coordinator",
            "--listen",
            "127.0.0.1:0",
            "--cluster-listen",
            "127.0.0.1:0",
            "--model",
            model,
            "--heartbeat-ms",
            "100",
            "--ready-wait-ms",
            "2000",
            "--exit-on-stdin-eof",
        ])
        .args(tessera_testkit::certs_args(
            &tessera_tls::Identity::coordinator(1),
        ))
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .expect("start the coordinator");
    // Its start lines name its ports; the rest of its stdout is drained, never left to block.
    let stdout = coordinator.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut cluster = None;
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(a) = line.split("cluster on ").nth(1) {
                cluster = Some(a.trim().to_owned());
            }
            if let Some(a) = line.split("listening on ").nth(1) {
                let _ = tx.send((a.trim().to_owned(), cluster.take()));
            }
        }
    });
    let Ok((public, Some(cluster))) = rx.recv_timeout(START_TIMEOUT) else {
        kill(&mut coordinator);
        panic!(
            "the coordinator did not start:\n{}",
            std::fs::read_to_string(&log_path).unwrap_or_default()
        );
    };
    let mut worker =
        tessera().spawn_worker(&format!("http://{cluster}"), 1, memory, Some("small"), &[]);
    let read_log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let start = Instant::now();
    while !read_log().contains(refusal) {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no planning failure logged:\n{}",
            read_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    let asked = Instant::now();
    let out = tessera().run(&["generate", "--endpoint", &public, "Hello"]);
    let took = asked.elapsed();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "generate succeeded: {err}");
    assert!(
        err.contains("Unavailable")
            && err.contains(&format!("no plan serves the model: {refusal}"))
            && err.contains(detail),
        "{err}"
    );
    assert!(
        took < Duration::from_secs(15),
        "failed after {took:?}: {err}"
    );

    // Dozens of planning attempts later, the reason has not changed: still one line.
    std::thread::sleep(Duration::from_secs(1));
    kill(&mut worker);
    kill(&mut coordinator);
    let log = read_log();
    assert_eq!(
        log.matches(refusal).count(),
        1,
        "the same planning failure was logged more than once:\n{log}"
    );
}
