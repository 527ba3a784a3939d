//! `tessera` processes for the multi-process tests: starting the binary and reading the
//! addresses it prints, running it to completion, and the argument lists of a lone
//! coordinator, a worker and the membership commands.
//!
//! The binary's path is the caller's: only the cli crate's tests know it
//! (`env!("CARGO_BIN_EXE_tessera")`), so they hand it to [`Tessera::new`].
//!
//! **Mutual TLS by default.** Every `coordinator`, `worker` and `cluster …` command the kit
//! starts speaks the cluster protocol as the product does: with a certificate from this test
//! process's own CA ([`certs_dir`]), issued on demand for the identity the arguments give
//! (`--id`, default 1; `--name`, which the kit adds to a worker that has none; the operator for
//! membership commands) and passed as `--certs`. A test that passes `--insecure-cluster`,
//! `--certs` or `--cluster-ca` itself chooses for itself.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock, PoisonError, mpsc};
use std::time::{Duration, Instant};

use tessera_tls::{Authority, Identity, Role};

/// How long a started process may take to print its "listening on" line, and a run to
/// completion ([`Tessera::run`]) to finish.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);

/// The `tessera` binary under test.
#[derive(Clone, Debug)]
pub struct Tessera {
    /// Path of the binary.
    pub bin: PathBuf,
}

/// What a started process printed: the address from its "listening on" line and, for a
/// coordinator, its cluster address (the "cluster on" line it prints before).
#[derive(Clone, Debug)]
pub struct Addresses {
    /// The "listening on" address: a coordinator's public API, a worker's Worker service.
    pub public: String,
    /// A coordinator's OpenAI-compatible HTTP API (the "http on" line), when it serves one.
    pub http: Option<String>,
    /// A coordinator's cluster port (Raft, worker registration); `None` for a worker.
    pub cluster: Option<String>,
}

impl Tessera {
    /// The binary at `bin` (in the cli crate's tests, `env!("CARGO_BIN_EXE_tessera")`).
    pub fn new(bin: impl Into<PathBuf>) -> Self {
        Self { bin: bin.into() }
    }

    /// A command running the binary, with nothing set but the program.
    pub fn command(&self) -> Command {
        Command::new(&self.bin)
    }

    /// `tessera up` serving `model` on free loopback ports, one compute thread and 1 GiB per
    /// worker: what the tests of `up` start from (more arguments go on the command).
    pub fn up(&self, model: &str) -> Command {
        let mut c = self.command();
        c.args([
            "up",
            "--listen",
            "127.0.0.1:0",
            "--threads-per-worker",
            "1",
            "--memory",
            "1GiB",
            // Tests compare with the CPU engine bit for bit: never a GPU, even where one is.
            "--device",
            "cpu",
            "--model",
            model,
        ]);
        c
    }

    /// Starts `tessera ARGS…` and returns it with the address from its "listening on" line (a
    /// coordinator's public address).
    ///
    /// # Panics
    /// When the process cannot start or does not listen within [`START_TIMEOUT`].
    pub fn spawn<S: AsRef<str>>(&self, args: &[S]) -> (Child, String) {
        let (child, addrs) = self.spawn_with_addresses(args);
        (child, addrs.public)
    }

    /// Starts `tessera coordinator ARGS…` (`args` starts with `coordinator`) and returns it
    /// with its public and cluster addresses.
    ///
    /// # Panics
    /// As [`Tessera::spawn`], or when the coordinator printed no cluster address.
    pub fn spawn_coordinator<S: AsRef<str>>(&self, args: &[S]) -> (Child, String, String) {
        let (child, addrs) = self.spawn_with_addresses(args);
        let cluster = addrs
            .cluster
            .expect("a coordinator prints its cluster address");
        (child, addrs.public, cluster)
    }

    /// Starts a coordinator on two free loopback ports:
    /// `coordinator --listen 127.0.0.1:0 --cluster-listen 127.0.0.1:0 --model MODEL EXTRA…
    /// --exit-on-stdin-eof`; returns it with its public and cluster addresses.
    ///
    /// # Panics
    /// As [`Tessera::spawn_coordinator`].
    pub fn spawn_lone_coordinator(&self, model: &str, extra: &[&str]) -> (Child, String, String) {
        let mut args = lone_coordinator_args(model);
        args.extend(strings(extra));
        args.push("--exit-on-stdin-eof".to_owned());
        self.spawn_coordinator(&args)
    }

    /// Starts a worker: `worker --coordinator COORDINATORS --threads THREADS --memory MEMORY
    /// [--name NAME] EXTRA… --exit-on-stdin-eof`, `coordinators` being a comma-separated list
    /// of cluster URLs. Returns it once it listens.
    ///
    /// # Panics
    /// As [`Tessera::spawn`].
    pub fn spawn_worker(
        &self,
        coordinators: &str,
        threads: u32,
        memory: &str,
        name: Option<&str>,
        extra: &[&str],
    ) -> Child {
        let threads = threads.to_string();
        let mut args = strings(&[
            "worker",
            "--coordinator",
            coordinators,
            "--threads",
            &threads,
            "--memory",
            memory,
            // As `up`: the CPU engine's arithmetic, even on a machine with a GPU.
            "--device",
            "cpu",
        ]);
        if let Some(name) = name {
            args.extend(strings(&["--name", name]));
        }
        args.extend(strings(extra));
        args.push("--exit-on-stdin-eof".to_owned());
        self.spawn(&args).0
    }

    /// Starts `tessera ARGS…` (stdin and stdout piped, stderr inherited) and returns it with
    /// the addresses it printed.
    ///
    /// # Panics
    /// When the process cannot start or does not listen within [`START_TIMEOUT`].
    pub fn spawn_with_addresses<S: AsRef<str>>(&self, args: &[S]) -> (Child, Addresses) {
        let args: Vec<&str> = args.iter().map(AsRef::as_ref).collect();
        let mut child = self.start(&args, Stdio::piped(), Stdio::inherit());
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let (mut sent, mut cluster, mut http) = (false, None, None);
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if !sent && let Some(addr) = line.split("cluster on ").nth(1) {
                    cluster = Some(addr.trim().to_owned());
                }
                if !sent && let Some(addr) = line.split("http on ").nth(1) {
                    http = Some(addr.trim().to_owned());
                }
                if !sent && let Some(addr) = line.split("listening on ").nth(1) {
                    let _ = tx.send(Addresses {
                        public: addr.trim().to_owned(),
                        cluster: cluster.take(),
                        http: http.take(),
                    });
                    sent = true;
                }
            }
        });
        let addrs = rx
            .recv_timeout(START_TIMEOUT)
            .unwrap_or_else(|_| panic!("`tessera {}` did not start listening", args.join(" ")));
        (child, addrs)
    }

    /// Runs `tessera ARGS…` to completion (stdin closed, at most [`START_TIMEOUT`]) and returns
    /// its output.
    ///
    /// # Panics
    /// When it cannot start or does not finish in time (it is killed first).
    pub fn run<S: AsRef<str>>(&self, args: &[S]) -> Output {
        let args: Vec<&str> = args.iter().map(AsRef::as_ref).collect();
        let mut child = self.start(&args, Stdio::null(), Stdio::piped());
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if child.try_wait().expect("wait").is_some() {
                return child.wait_with_output().expect("output");
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("`tessera {}` did not finish", args.join(" "));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts `tessera ARGS…` with stdin, stdout and stderr piped, the cluster protocol's
    /// certificate added as for every command of the kit, and returns it at once (for a
    /// process expected to fail).
    ///
    /// # Panics
    /// When it cannot start.
    pub fn start_piped<S: AsRef<str>>(&self, args: &[S]) -> Child {
        let args: Vec<&str> = args.iter().map(AsRef::as_ref).collect();
        self.start(&args, Stdio::piped(), Stdio::piped())
    }

    /// Starts `tessera ARGS…` with its stdout piped (and the cluster protocol's certificate,
    /// see the module docs).
    fn start(&self, args: &[&str], stdin: Stdio, stderr: Stdio) -> Child {
        let mut args: Vec<String> = strings(args);
        args.extend(default_cluster_tls(&args));
        self.command()
            .args(&args)
            .stdin(stdin)
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("start tessera")
    }

    /// `tessera cluster add-coordinator --endpoint ENDPOINT --id ID --address ADDRESS`, run
    /// with [`Tessera::run`]; whether it succeeded is the caller's to check.
    ///
    /// # Panics
    /// As [`Tessera::run`].
    pub fn add_coordinator(&self, endpoint: &str, id: u64, address: &str) -> Output {
        let id = id.to_string();
        self.run(&[
            "cluster",
            "add-coordinator",
            "--endpoint",
            endpoint,
            "--id",
            &id,
            "--address",
            address,
        ])
    }

    /// `tessera cluster remove-coordinator --endpoint ENDPOINT --id ID`, run with
    /// [`Tessera::run`]; whether it succeeded is the caller's to check.
    ///
    /// # Panics
    /// As [`Tessera::run`].
    pub fn remove_coordinator(&self, endpoint: &str, id: u64) -> Output {
        let id = id.to_string();
        self.run(&[
            "cluster",
            "remove-coordinator",
            "--endpoint",
            endpoint,
            "--id",
            &id,
        ])
    }
}

/// `coordinator --listen 127.0.0.1:0 --cluster-listen 127.0.0.1:0 --model MODEL`: a
/// coordinator of `model` on two free loopback ports, founding a cluster of its own.
pub fn lone_coordinator_args(model: &str) -> Vec<String> {
    strings(&[
        "coordinator",
        "--listen",
        "127.0.0.1:0",
        "--cluster-listen",
        "127.0.0.1:0",
        "--model",
        model,
    ])
}

/// The arguments of Raft member `id` of the multi-process Raft tests, short of how it joins
/// (`--peers` or `--join`): `coordinator --listen LISTEN --cluster-listen CLUSTER_LISTEN --id ID
/// --data-dir DATA_DIR --model MODEL`, heartbeats every 250 ms, a 3 s heartbeat timeout, 2048
/// KV tokens, and `--exit-on-stdin-eof`.
pub fn member_args(
    listen: &str,
    cluster_listen: &str,
    id: u64,
    data_dir: &Path,
    model: &str,
) -> Vec<String> {
    strings(&[
        "coordinator",
        "--listen",
        listen,
        "--cluster-listen",
        cluster_listen,
        "--id",
        &id.to_string(),
        "--data-dir",
        &data_dir.to_string_lossy(),
        "--model",
        model,
        "--heartbeat-ms",
        "250",
        "--heartbeat-timeout-ms",
        "3000",
        "--kv-tokens",
        "2048",
        "--exit-on-stdin-eof",
    ])
}

/// This test process's certificate directory: its own CA (made on first use, under the system
/// temp dir, named by the process id so that test binaries running at once never share one)
/// and every certificate issued so far.
///
/// # Panics
/// When the CA cannot be created.
pub fn certs_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("tessera-test-certs-{}", std::process::id()));
        Authority::open_or_create(&dir).expect("create the test CA");
        dir
    })
}

/// `--certs DIR` for `identity`, whose certificate is issued into [`certs_dir`] if missing.
///
/// # Panics
/// When it cannot be issued.
pub fn certs_args(identity: &Identity) -> Vec<String> {
    // One issuer at a time: tests run on several threads and share the directory.
    static ISSUE: Mutex<()> = Mutex::new(());
    let _one = ISSUE.lock().unwrap_or_else(PoisonError::into_inner);
    let dir = certs_dir();
    Authority::load(dir)
        .and_then(|ca| ca.issue_into(dir, identity))
        .unwrap_or_else(|e| panic!("issuing a test certificate for {identity}: {e}"));
    vec!["--certs".to_owned(), dir.to_string_lossy().into_owned()]
}

/// The cluster credentials of `identity` from this test process's CA, as a test client
/// presents them (issued if missing).
///
/// # Panics
/// When they cannot be issued or loaded.
pub fn member_tls(identity: &Identity) -> tessera_tls::ClusterTls {
    certs_args(identity);
    let files = tessera_tls::MemberFiles::in_dir(certs_dir(), identity);
    tessera_tls::ClusterTls::mutual(files.load().expect("load a test certificate"))
}

/// What [`Tessera`]'s commands get added for the cluster protocol: `--certs` for the process's
/// identity (and a `--name` for a worker without one), unless the arguments choose already.
fn default_cluster_tls(args: &[String]) -> Vec<String> {
    let chosen = ["--insecure-cluster", "--certs", "--cluster-ca"];
    if args.iter().any(|a| chosen.contains(&a.as_str())) {
        return Vec::new();
    }
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    match args.first().map(String::as_str) {
        Some("coordinator") => {
            let id = value("--id").and_then(|v| v.parse().ok()).unwrap_or(1);
            certs_args(&Identity::coordinator(id))
        }
        Some("worker") => {
            static NEXT: AtomicU32 = AtomicU32::new(0);
            match value("--name") {
                Some(name) => certs_args(
                    &Identity::new(Role::Worker, &name)
                        .unwrap_or_else(|e| panic!("worker --name {name:?}: {e}")),
                ),
                None => {
                    let name = format!("tk-{}", NEXT.fetch_add(1, Ordering::Relaxed));
                    let mut a =
                        certs_args(&Identity::new(Role::Worker, &name).expect("a valid name"));
                    a.extend(["--name".to_owned(), name]);
                    a
                }
            }
        }
        Some("cluster") => {
            certs_args(&Identity::new(Role::Admin, "operator").expect("a valid name"))
        }
        _ => Vec::new(),
    }
}

/// Owned strings from string slices, for process arguments.
pub fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| (*s).to_owned()).collect()
}

/// `kill -9` of `child`, then reaps it; errors (it is gone already) are ignored.
pub fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Sends signal `sig` (as kill(1) spells it, e.g. `-STOP`) to `child`.
///
/// # Panics
/// When kill(1) cannot run or fails.
pub fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .expect("run kill")
        .success();
    assert!(ok, "kill {sig} failed");
}

/// A fresh directory for a test's data, `tessera-NAME-…` under the system temp dir; removed
/// (with everything in it) when dropped.
///
/// # Panics
/// When it cannot be created.
pub fn temp_dir(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("tessera-{name}-"))
        .tempdir()
        .expect("create a temp dir")
}

/// `$TESSERA_PYTHON`: a Python with the packages of `examples/python/requirements.txt`, for
/// the tests of the Python examples; `None` (the caller skips, with a message) when unset.
///
/// # Panics
/// When it is unset and `CI` is set: CI must never skip those tests.
pub fn python() -> Option<String> {
    let Ok(python) = std::env::var("TESSERA_PYTHON") else {
        let in_ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false");
        assert!(
            !in_ci,
            "TESSERA_PYTHON is unset in CI: run the tests with scripts/test.sh"
        );
        eprintln!("skipped: set TESSERA_PYTHON to a Python with examples/python/requirements.txt");
        return None;
    };
    Some(python)
}

/// `examples/python`, with its gRPC stubs generated by `python` (its `generate_stubs.py`), so
/// `client.py` can run.
///
/// # Panics
/// When the stubs cannot be generated.
pub fn python_examples(python: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/python");
    let out = Command::new(python)
        .arg("generate_stubs.py")
        .current_dir(&dir)
        .output()
        .expect("run generate_stubs.py");
    assert!(
        out.status.success(),
        "generate_stubs.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    dir
}
