//! A normal stop of a local cluster is quiet: `tessera up` (three coordinators, two workers)
//! stopped by Ctrl-C (SIGINT to its whole process group, as a terminal sends it) or by
//! SIGTERM to `up` alone (docker stop, systemd, kill) exits 0 and logs no warning or error,
//! and its log lines, written to a pipe, carry no ANSI colour codes. (Before it stops, it
//! answers on gRPC and on the OpenAI HTTP API it prints the base URL of.)

use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tessera_testkit::{START_TIMEOUT, Tessera, kill, smollm2_arg as model};

/// The `tessera` binary under test.
fn tessera() -> Tessera {
    Tessera::new(env!("CARGO_BIN_EXE_tessera"))
}

/// A running `tessera up`, in a process group of its own, with its endpoint and everything
/// it writes to stderr.
struct Up {
    child: Child,
    endpoint: String,
    /// The OpenAI API's base URL, `up`'s second stdout line.
    openai: String,
    stderr: mpsc::Receiver<String>,
}

impl Up {
    /// Starts `tessera up` serving `model` and waits until it prints its endpoint (ready).
    fn start(model: &str) -> Self {
        let mut child = tessera()
            .up(model)
            .args(["--workers", "2"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .expect("start tessera up");
        let mut err = child.stderr.take().expect("piped stderr");
        let (err_tx, stderr) = mpsc::channel();
        std::thread::spawn(move || {
            let mut all = String::new();
            let _ = err.read_to_string(&mut all);
            let _ = err_tx.send(all);
        });
        let out = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            // Read to the end: `up` forwards its children's stdout, which must not block.
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if line.starts_with("http://") {
                    let _ = tx.send(line.trim().to_owned());
                }
            }
        });
        let (Ok(endpoint), Ok(openai)) = (
            rx.recv_timeout(START_TIMEOUT * 2),
            rx.recv_timeout(START_TIMEOUT),
        ) else {
            kill(&mut child);
            panic!(
                "tessera up did not become ready: {}",
                stderr.recv().unwrap_or_default()
            );
        };
        Self {
            child,
            endpoint,
            openai,
            stderr,
        }
    }

    /// Sends `sig` (as kill(1) spells it) to `up` alone, or to its whole process group.
    fn signal(&self, sig: &str, group: bool) {
        let pid = self.child.id();
        let target = if group {
            format!("-{pid}")
        } else {
            pid.to_string()
        };
        let ok = Command::new("kill")
            .args([sig, "--", &target])
            .status()
            .expect("run kill")
            .success();
        assert!(ok, "kill {sig} {target}");
    }

    /// Waits (at most 30 s) for `up` to exit; returns whether it succeeded and its stderr.
    fn finish(mut self) -> (bool, String) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                break status;
            }
            if Instant::now() > deadline {
                kill(&mut self.child);
                panic!("tessera up did not stop within 30 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let stderr = self
            .stderr
            .recv_timeout(Duration::from_secs(10))
            .expect("stderr closed");
        (status.success(), stderr)
    }
}

/// Ensures that Ctrl-C and SIGTERM stop a local cluster that has served a request with exit
/// status 0, no WARN or ERROR line, and no ANSI escape in the piped log.
#[test]
fn a_normal_stop_is_quiet() {
    let Some(model) = model() else {
        return;
    };
    for (sig, group) in [("-INT", true), ("-TERM", false)] {
        let up = Up::start(&model);
        let out = tessera().run(&[
            "generate",
            "--endpoint",
            &up.endpoint,
            "--max-tokens",
            "4",
            "Hello",
        ]);
        assert!(
            out.status.success(),
            "generate: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // `up` serves the OpenAI API too, at the base URL it printed.
        let host = up
            .openai
            .strip_prefix("http://")
            .and_then(|u| u.strip_suffix("/v1"))
            .expect("http://HOST:PORT/v1");
        let body = serde_json::json!({"prompt": "Hello", "max_tokens": 2});
        let r = tessera_testkit::http::post_json(host, "/v1/completions", &[], &body);
        assert_eq!(r.status, 200, "{}", r.body);
        up.signal(sig, group);
        let (ok, stderr) = up.finish();
        let what = format!("kill {sig} (to the group: {group})");
        assert!(ok, "{what}: up failed:\n{stderr}");
        assert!(stderr.contains("stopping the cluster"), "{what}:\n{stderr}");
        assert!(
            !stderr.contains("WARN") && !stderr.contains("ERROR"),
            "{what}: a normal stop logged a warning or error:\n{stderr}"
        );
        assert!(
            !stderr.contains('\u{1b}'),
            "{what}: ANSI escapes in a piped log:\n{stderr}"
        );
    }
}
