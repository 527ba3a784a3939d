//! A client process read as it runs: a test starts `tessera generate` or a Python example,
//! waits until it has printed part of its answer (so it is mid-stream), breaks something,
//! and then compares the whole output with a fault-free run's.

use std::time::Duration;

/// A client process whose stdout is read on a thread as it comes, so a test can wait for its
/// first output (the client is then mid-answer).
pub struct StreamingChild {
    child: std::process::Child,
    first: std::sync::mpsc::Receiver<()>,
    out: std::thread::JoinHandle<Vec<u8>>,
}

impl StreamingChild {
    /// Spawns `cmd` with stdout and stderr piped.
    ///
    /// # Panics
    /// When it cannot be spawned.
    pub fn spawn(mut cmd: std::process::Command) -> Self {
        use std::io::Read as _;
        let mut child = cmd
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn a client");
        let mut stdout = child.stdout.take().expect("stdout");
        let (tx, first) = std::sync::mpsc::channel();
        let out = std::thread::spawn(move || {
            let (mut all, mut buf) = (Vec::new(), [0u8; 256]);
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                all.extend_from_slice(&buf[..n]);
                let _ = tx.send(());
            }
            all
        });
        Self { child, first, out }
    }

    /// Waits (up to a minute) until the client printed something.
    ///
    /// # Panics
    /// When it printed nothing in that time.
    pub fn wait_first(&self, what: &str) {
        self.first
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("{what} printed nothing: {e}"));
    }

    /// Waits for the exit: success, stdout, stderr.
    ///
    /// # Panics
    /// When the process cannot be waited for.
    pub fn finish(self) -> (bool, String, String) {
        let out = self.child.wait_with_output().expect("a client's exit");
        let stdout = self.out.join().expect("stdout reader");
        (
            out.status.success(),
            String::from_utf8_lossy(&stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

/// The number of tokens a client said it had when it first resumed (`resuming after N
/// tokens`), if it resumed: what the CLI and the Python examples print when they resume.
pub fn resumed_after(stderr: &str) -> Option<usize> {
    let rest = stderr.split("resuming after ").nth(1)?;
    rest.split_whitespace().next()?.parse().ok()
}
