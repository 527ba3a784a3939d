//! `tessera up` as a local simulator of failures: a child killed with `kill -9` (found by the
//! pid `up` prints) is restarted by `up` with the same arguments and the cluster serves again
//! — a worker, and a coordinator of a Raft group that comes back from its kept Raft data — and
//! `--data-dir` keeps a cluster across two runs of `up`.
//!
//! The tests take turns (each runs a whole cluster, and CI machines have few cores), and each
//! `up` is killed when its test ends, however it ends, which takes its children with it.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tessera_testkit::{START_TIMEOUT, Tessera, kill, scrape, smollm2_arg as model, temp_dir};

/// The `tessera` binary under test.
fn tessera() -> Tessera {
    Tessera::new(env!("CARGO_BIN_EXE_tessera"))
}

/// How long a line `up` prints around its endpoint (the ready line, the pids) may take to be
/// read from its stderr: the endpoint comes on stdout, read by another thread.
const PRINTED: Duration = Duration::from_secs(10);

/// One cluster at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// A running `tessera up` and every line it wrote to stderr so far.
struct Up {
    child: Child,
    /// The first coordinator's endpoint, `up`'s first stdout line.
    endpoint: String,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl Up {
    /// Starts `tessera up` on free loopback ports (one thread and 1 GiB per worker, its own
    /// certificate directory `certs`) with `extra` arguments, and waits until it is ready.
    fn start(model: &str, certs: &Path, extra: &[&str]) -> Self {
        let mut child = tessera()
            .up(model)
            .args(["--certs", &certs.to_string_lossy()])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start tessera up");
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let err = child.stderr.take().expect("piped stderr");
        let lines = Arc::clone(&stderr);
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                lines
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(line);
            }
        });
        let out = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            // Read to the end, so that `up` never blocks on a full pipe.
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut up = Self {
            child,
            endpoint: String::new(),
            stderr,
        };
        match rx.recv_timeout(START_TIMEOUT * 2) {
            Ok(endpoint) => up.endpoint = endpoint.trim().to_owned(),
            Err(_) => panic!("tessera up did not become ready:\n{}", up.log()),
        }
        up
    }

    /// Everything `up` wrote to stderr so far.
    fn log(&self) -> String {
        self.stderr
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .join("\n")
    }

    /// Waits (at most `timeout`) for a stderr line starting with `prefix` after the first
    /// `from` lines; returns it and the number of lines up to it.
    fn wait_line(&self, from: usize, prefix: &str, timeout: Duration) -> (String, usize) {
        let deadline = Instant::now() + timeout;
        loop {
            {
                let lines = self.stderr.lock().unwrap_or_else(PoisonError::into_inner);
                if let Some(i) = (from..lines.len()).find(|&i| lines[i].starts_with(prefix)) {
                    return (lines[i].clone(), i + 1);
                }
            }
            assert!(
                Instant::now() < deadline,
                "no line {prefix:?} within {timeout:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The pid `up` printed for `what` (`worker 0`, `coordinator 1`) when ready.
    fn pid(&self, what: &str) -> u32 {
        let (line, _) = self.wait_line(0, &format!("{what}: pid "), PRINTED);
        pid_after(&line, "pid ")
    }

    /// Asserts that `up` still runs.
    fn assert_running(&mut self) {
        let exited = self.child.try_wait().expect("wait");
        assert!(exited.is_none(), "up exited ({exited:?}):\n{}", self.log());
    }

    /// Stops `up` with SIGTERM and asserts that it exits 0 within 30 s.
    fn stop(mut self) {
        signal(self.child.id(), "-TERM");
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "up did not stop within 30 s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(status.success(), "up failed ({status}):\n{}", self.log());
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        // A test that failed half-way: `up` goes, and its children with it (their stdin
        // closes).
        kill(&mut self.child);
    }
}

/// The number after `key` in `line` (`worker 0: pid 1234, …`).
fn pid_after(line: &str, key: &str) -> u32 {
    line.split(key)
        .nth(1)
        .map(|rest| {
            rest.chars()
                .take_while(char::is_ascii_digit)
                .collect::<String>()
        })
        .and_then(|digits| digits.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {line:?}"))
}

/// Sends `sig` (as kill(1) spells it) to process `pid`.
fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .expect("run kill")
        .success();
    assert!(ok, "kill {sig} {pid}");
}

/// Generates a few tokens at `endpoint`, retrying (the cluster may be re-planning) until one
/// succeeds within `timeout`.
fn generate_until_served(up: &Up, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let out = tessera().run(&[
            "generate",
            "--endpoint",
            &up.endpoint,
            "--max-tokens",
            "4",
            "The capital of France is",
        ]);
        if out.status.success() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "generate failed for {timeout:?}: {}\nup's log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            up.log()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Ensures that a worker of a running `tessera up` killed with `kill -9` (by the pid `up`
/// printed) is restarted while `up` keeps running, that it serves its metrics on the same
/// address again, and that a generate request succeeds afterwards.
#[test]
fn killed_worker_is_restarted_and_the_cluster_serves() {
    let Some(model) = model() else { return };
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(PoisonError::into_inner);
    let certs = temp_dir("up-certs");
    let mut up = Up::start(
        &model,
        certs.path(),
        &[
            "--coordinators",
            "1",
            "--workers",
            "2",
            "--metrics-listen",
            "127.0.0.1:0",
        ],
    );
    let (line, _) = up.wait_line(0, "worker 0: pid ", PRINTED);
    let metrics = line
        .split("metrics http://")
        .nth(1)
        .and_then(|m| m.strip_suffix("/metrics"))
        .unwrap_or_else(|| panic!("no metrics address in {line:?}"))
        .to_owned();
    let pid = up.pid("worker 0");
    let (_, seen) = up.wait_line(0, "coordinator 1: pid ", PRINTED);

    signal(pid, "-9");
    let (exited, seen) = up.wait_line(seen, "worker 0 exited", Duration::from_secs(10));
    assert!(exited.contains("signal 9"), "{exited}");
    let (restarted, seen) = up.wait_line(seen, "worker 0 restarted: pid ", Duration::from_secs(10));
    assert_ne!(pid_after(&restarted, "pid "), pid, "{restarted}");
    up.wait_line(seen, "worker 0 is back", START_TIMEOUT);
    up.assert_running();
    assert!(scrape(&metrics).contains("200 OK"));
    generate_until_served(&up, Duration::from_secs(45));
    up.assert_running();
    up.stop();
}

/// The inode of a coordinator's Raft log file: the same after a restart when the data was
/// kept, not recreated.
fn raft_log_inode(dir: &Path) -> u64 {
    let file = dir.join("raft.redb");
    std::fs::metadata(&file)
        .unwrap_or_else(|e| panic!("{}: {e}", file.display()))
        .ino()
}

/// Ensures that a coordinator of a 3-coordinator `tessera up` killed with `kill -9` is
/// restarted on its kept Raft data (the same directory and log file, not new ones) as the same
/// member — its own replica names the three members and a leader — and that the cluster then
/// serves through it.
#[test]
fn killed_coordinator_comes_back_from_its_raft_data() {
    let Some(model) = model() else { return };
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(PoisonError::into_inner);
    let certs = temp_dir("up-certs");
    let data = temp_dir("up-data");
    let mut up = Up::start(
        &model,
        certs.path(),
        &[
            "--coordinators",
            "3",
            "--workers",
            "1",
            "--data-dir",
            &data.path().to_string_lossy(),
        ],
    );
    let raft_dir = data.path().join("coordinator-1");
    let inode = raft_log_inode(&raft_dir);
    // Gone if the directory were emptied or replaced (an inode number alone may be reused).
    let marker = raft_dir.join("kept-by-the-test");
    std::fs::write(&marker, "").expect("write a marker");
    let pid = up.pid("coordinator 1");
    let (_, seen) = up.wait_line(0, "worker 0: pid ", PRINTED);

    signal(pid, "-9");
    let (exited, seen) = up.wait_line(seen, "coordinator 1 exited", Duration::from_secs(10));
    assert!(exited.contains("signal 9"), "{exited}");
    let (_, seen) = up.wait_line(
        seen,
        "coordinator 1 restarted: pid ",
        Duration::from_secs(10),
    );
    up.wait_line(seen, "coordinator 1 is back", START_TIMEOUT);
    up.assert_running();
    assert!(marker.is_file(), "the Raft data directory was not kept");
    assert_eq!(
        raft_log_inode(&raft_dir),
        inode,
        "the Raft log was recreated"
    );
    // The printed endpoint is coordinator 1's: requests go through the restarted member.
    generate_until_served(&up, Duration::from_secs(45));
    let status = tessera().run(&["status", "--local", "--endpoint", &up.endpoint]);
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(status.status.success(), "{text}");
    let members = text
        .lines()
        .find_map(|l| l.split("members ").nth(1))
        .unwrap_or_else(|| panic!("no members in {text}"));
    assert_eq!(members.split(", ").count(), 3, "{text}");
    assert!(!text.contains("leader  "), "no leader known: {text}");
    up.assert_running();
    up.stop();
}

/// The plan epoch from `up`'s ready line.
fn ready_epoch(up: &Up) -> u64 {
    let (line, _) = up.wait_line(0, "tessera cluster ready", PRINTED);
    line.rsplit("plan epoch ")
        .next()
        .and_then(|e| e.trim().parse().ok())
        .unwrap_or_else(|| panic!("no plan epoch in {line:?}"))
}

/// Ensures that `tessera up --data-dir DIR` leaves DIR (its up.json and the coordinator's Raft
/// data) behind when it stops, and that a second run on DIR comes back on the same ports with
/// the same cluster state (its plan epoch continues) and serves.
#[test]
fn data_dir_keeps_the_cluster_across_runs() {
    let Some(model) = model() else { return };
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(PoisonError::into_inner);
    let certs = temp_dir("up-certs");
    let data = temp_dir("up-data");
    let dir = data.path().to_string_lossy().into_owned();
    let args = ["--coordinators", "1", "--workers", "1", "--data-dir", &dir];

    let first = Up::start(&model, certs.path(), &args);
    let endpoint = first.endpoint.clone();
    let epoch = ready_epoch(&first);
    first.stop();
    assert!(data.path().join("up.json").is_file());
    assert!(
        data.path()
            .join("coordinator-1")
            .join("raft.redb")
            .is_file()
    );

    let second = Up::start(&model, certs.path(), &args);
    second.wait_line(0, "reusing the cluster in", PRINTED);
    assert_eq!(
        second.endpoint, endpoint,
        "the ports in up.json were not reused"
    );
    let again = ready_epoch(&second);
    assert!(again > epoch, "the plan epoch went from {epoch} to {again}");
    generate_until_served(&second, Duration::from_secs(30));
    second.stop();
}
