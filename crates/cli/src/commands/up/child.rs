//! One `tessera` child process of a local cluster: starting it so that it dies with its
//! parent, and reading the addresses it prints as it starts.

use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// Starts `tessera ARGS…` as a child that dies with this process: its standard input is a pipe
/// this process holds (the child, started with `--exit-on-stdin-eof`, exits when it closes),
/// and it is killed when its handle is dropped.
pub(crate) fn spawn(args: &[String]) -> Result<Child> {
    let exe = std::env::current_exe().context("locating the tessera binary")?;
    Command::new(exe)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting `tessera {}`", args.join(" ")))
}

/// Reads a child's stdout until its "listening on ADDR" line, then keeps draining it.
pub(crate) async fn listening_address(child: &mut Child, what: &str) -> Result<String> {
    Ok(start_lines(child, what).await?.public)
}

/// What a coordinator printed as it started.
pub(crate) struct CoordinatorAddrs {
    /// Its public API.
    pub public: String,
    /// Its cluster port.
    pub cluster: String,
    /// Its HTTP API, when it serves one.
    pub http: Option<String>,
}

/// A coordinator's addresses from its start lines.
pub(crate) async fn coordinator_addresses(
    child: &mut Child,
    what: &str,
) -> Result<CoordinatorAddrs> {
    let lines = start_lines(child, what).await?;
    let cluster = lines
        .cluster
        .with_context(|| format!("{what} printed no cluster address"))?;
    Ok(CoordinatorAddrs {
        public: lines.public,
        cluster,
        http: lines.http,
    })
}

/// The addresses a child printed before it was up.
struct StartLines {
    public: String,
    cluster: Option<String>,
    http: Option<String>,
}

/// Reads a child's stdout until its "listening on ADDR" line, noting the "cluster on ADDR" and
/// "http on ADDR" lines before it (coordinators print them first), then keeps draining it.
async fn start_lines(child: &mut Child, what: &str) -> Result<StartLines> {
    let stdout = child
        .stdout
        .take()
        .with_context(|| format!("{what} has no stdout"))?;
    let mut lines = BufReader::new(stdout).lines();
    let read = async {
        let (mut cluster, mut http) = (None, None);
        while let Some(line) = lines.next_line().await? {
            if let Some(addr) = line.split("cluster on ").nth(1) {
                cluster = Some(addr.trim().to_owned());
            }
            if let Some(addr) = line.split("http on ").nth(1) {
                http = Some(addr.trim().to_owned());
            }
            if let Some(addr) = line.split("listening on ").nth(1) {
                return Ok::<_, std::io::Error>(Some(StartLines {
                    public: addr.trim().to_owned(),
                    cluster,
                    http,
                }));
            }
        }
        Ok(None)
    };
    let addrs = tokio::time::timeout(Duration::from_secs(120), read)
        .await
        .with_context(|| format!("{what} did not start listening within 120 s"))??
        .with_context(|| format!("{what} exited before listening (see its log above)"))?;
    tokio::spawn(forward(lines));
    Ok(addrs)
}

/// Copies what a child prints after its start lines (a coordinator's "metrics on ADDR") to
/// stderr: this process's stdout is for scripts, whose first line is the endpoint.
pub(super) async fn forward(mut lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>) {
    while let Ok(Some(line)) = lines.next_line().await {
        eprintln!("{line}");
    }
}
