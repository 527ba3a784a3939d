//! A coordinator whose Raft data is damaged, as a real process: truncated, zeroed, overwritten
//! with random bytes, or wiped while its peers remember its log. Each time the process exits
//! with a non-zero status and a message that names the damage and the way out — never a
//! half-alive process that answers health checks — and the other two keep serving. The wiped
//! member is then replaced as the README says (`remove-coordinator`, `--join` on an empty data
//! directory, `add-coordinator`), and the cluster is back to three healthy voters.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

use tessera_testkit::{RaftCluster, Tessera, TestRng, smollm2_arg as model, story};

fn tessera() -> Tessera {
    Tessera::new(env!("CARGO_BIN_EXE_tessera"))
}

/// The Raft database of a coordinator's data directory.
const DB: &str = "raft.redb";

/// How long a damaged coordinator may take to exit: start-up, an election timeout for the
/// leader's first message, and the grace it gives its servers.
const EXIT_WITHIN: Duration = Duration::from_secs(45);

/// How a data directory is damaged.
#[derive(Clone, Copy, Debug)]
enum Damage {
    /// The database file cut to half its length.
    Truncated,
    /// Every byte of the database file zero.
    Zeroed,
    /// Random bytes over everything after the first 4 KiB (redb's header): every data page.
    /// (4 KiB at one offset were not enough: where that offset falls depends on the run, and
    /// when it fell on free pages the database was intact — rightly opened and served, while
    /// the test waited for an exit.)
    RandomBytes,
    /// The directory removed (a lost disk): the node starts empty while its peers remember it.
    Wiped,
}

fn damage(dir: &Path, how: Damage) {
    let path = dir.join(DB);
    match how {
        Damage::Truncated => {
            let len = std::fs::metadata(&path).expect("db").len();
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .expect("test setup");
            f.set_len(len / 2).expect("test setup");
        }
        Damage::Zeroed => {
            let len = std::fs::metadata(&path).expect("db").len();
            std::fs::write(&path, vec![0u8; len as usize]).expect("test setup");
        }
        Damage::RandomBytes => {
            let len = std::fs::metadata(&path).expect("db").len();
            assert!(
                len > 8192,
                "a database of {len} bytes has no data pages to damage"
            );
            let mut rng = TestRng::new(7);
            let bytes: Vec<u8> = (4096..len).map(|_| rng.next_u64() as u8).collect();
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .expect("test setup");
            f.seek(SeekFrom::Start(4096)).expect("test setup");
            f.write_all(&bytes).expect("test setup");
        }
        Damage::Wiped => std::fs::remove_dir_all(dir).expect("test setup"),
    }
}

/// Waits for `child` to exit; returns its success and everything it wrote to stderr.
fn exit_of(mut child: Child, what: &str) -> (bool, String) {
    let mut stderr = child.stderr.take().expect("piped stderr");
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if start.elapsed() > EXIT_WITHIN {
            let _ = child.kill();
            let _ = child.wait();
            let log = reader.join().unwrap_or_default();
            let tail: String = log
                .chars()
                .rev()
                .take(3000)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            panic!(
                "{what}: the damaged coordinator was still running after {EXIT_WITHIN:?}: {tail}"
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    (status.success(), reader.join().unwrap_or_default())
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("test setup");
    for e in std::fs::read_dir(from).expect("test setup") {
        let e = e.expect("test setup");
        std::fs::copy(e.path(), to.join(e.file_name())).expect("test setup");
    }
}

/// Voters as coordinator `i` reports them ("ID=HOST:PORT" without learners).
fn voters(c: &RaftCluster, i: usize) -> Vec<String> {
    c.status(i).map_or_else(
        |_| Vec::new(),
        |s| {
            s.members
                .into_iter()
                .filter(|m| !m.ends_with("(learner)"))
                .collect()
        },
    )
}

/// Ensures that each kind of damage to a coordinator's data ends its process with a non-zero
/// exit and a clear message while the other two keep serving, and that the documented
/// replacement of a member whose disk was lost brings the cluster back to three voters.
#[test]
fn damaged_state_exits_and_a_lost_member_is_replaced() {
    let Some(model) = model() else { return };
    let mut c = RaftCluster::start(&tessera(), &model, "damaged", 1);
    c.wait_ready(0, Duration::from_secs(120));
    let backup = tessera_testkit::temp_dir("damaged-backup");
    for how in [
        Damage::Truncated,
        Damage::Zeroed,
        Damage::RandomBytes,
        Damage::Wiped,
    ] {
        c.kill_coordinator(2);
        let dir = c.data_dir(2);
        let saved = backup.path().join(format!("{how:?}"));
        copy_dir(&dir, &saved);
        damage(&dir, how);
        let child = tessera().start_piped(&c.coordinator_args(2, 1));
        let (ok, stderr) = exit_of(child, &format!("{how:?}"));
        assert!(!ok, "{how:?}: exited 0: {stderr}");
        assert!(
            stderr.contains("Replacing a coordinator"),
            "{how:?}: the message does not say what to do: {stderr}"
        );
        // The other two never stopped serving.
        assert_eq!(c.generate(0, story(4)).expect("nodes 1 and 2 serve"), 4);
        if !matches!(how, Damage::Wiped) {
            // From its intact copy the member rejoins as if it had only been down.
            std::fs::remove_dir_all(&dir).expect("test setup");
            copy_dir(&saved, &dir);
            c.start_coordinator(2, 1);
            c.wait_ready(2, Duration::from_secs(60));
        }
    }

    // The README's replacement: remove the lost member, start it empty with --join, add it.
    let endpoint = format!("http://{}", c.cluster_addrs[0]);
    let out = tessera().remove_coordinator(&endpoint, 3);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(c.data_dir(2));
    c.start_joining(2);
    let out = tessera().add_coordinator(&endpoint, 3, &c.cluster_addrs[2]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let start = Instant::now();
    while voters(&c, 2).len() != 3 || c.local_status(2).map_or(true, |s| s.leader.is_empty()) {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "not back to 3 voters: {:?}",
            c.status(0)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    for i in 0..3 {
        assert_eq!(c.generate(i, story(4)).expect("every member serves"), 4);
    }
}
