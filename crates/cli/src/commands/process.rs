//! The life of a server process (`tessera coordinator`, `tessera worker`): the flags every one
//! takes ([`ProcessArgs`]), what stops it ([`shutdown_signal`]: Ctrl-C, SIGTERM, or the end of
//! its standard input under `tessera up`) and its telemetry (logging, OTLP span export,
//! flushed before the process exits).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Result;
use clap::Args;

use crate::telemetry::{self, Export};

/// The flags every server process (`tessera coordinator`, `tessera worker`) takes.
#[derive(Args, Debug, Clone)]
pub struct ProcessArgs {
    /// Serve Prometheus metrics on this address (`GET /metrics`; port 0: any free port,
    /// printed as "tessera <coordinator|worker> metrics on ADDR").
    #[arg(long)]
    pub metrics_listen: Option<SocketAddr>,
    /// Export spans over OTLP/gRPC to this OpenTelemetry collector, e.g. http://collector:4317
    /// (default: $OTEL_EXPORTER_OTLP_ENDPOINT; unset: no export).
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// Exit when standard input closes (used by `tessera up`).
    #[arg(long, hide = true)]
    pub exit_on_stdin_eof: bool,
    /// The cluster protocol's certificates (or `--insecure-cluster`).
    #[command(flatten)]
    pub cluster_tls: super::certs::ClusterTlsArgs,
    /// Connections each port holds at once. At the limit a new connection replaces the one
    /// silent longest (if it has been silent a second), else it is closed.
    #[arg(long, default_value_t = 2048, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,
    /// Seconds of silence (no byte either way) after which a connection is closed. gRPC
    /// clients are pinged every 30 s, so only dead or never-speaking ones go silent; an HTTP
    /// request that sends and receives nothing for this long (a long non-streamed completion)
    /// is cut too: stream long completions.
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(5..))]
    pub idle_timeout_s: u64,
}

impl ProcessArgs {
    /// The connection limits every port of this process applies.
    pub(crate) fn connections(&self) -> tessera_tls::Limits {
        tessera_tls::Limits {
            max_connections: self.max_connections as usize,
            idle_timeout: Duration::from_secs(self.idle_timeout_s),
        }
    }

    /// Runs `server` with logging and, when an endpoint is set, span export as `service` /
    /// `instance`, until it returns or the process is told to stop.
    pub(crate) fn serve<F>(
        &self,
        service: &'static str,
        instance: String,
        server: impl FnOnce(std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>) -> F,
    ) -> Result<()>
    where
        F: std::future::Future<Output = Result<()>>,
    {
        let export = otlp_endpoint(&self.otlp_endpoint).map(|endpoint| Export {
            endpoint,
            service,
            instance,
        });
        let shutdown = Box::pin(shutdown_signal(self.exit_on_stdin_eof));
        with_telemetry(export, server(shutdown))
    }
}

/// Resolves when the process is asked to stop: Ctrl-C, SIGTERM, or (optionally) EOF on stdin.
pub(crate) async fn shutdown_signal(stdin_eof: bool) {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    let eof = async {
        if stdin_eof {
            use tokio::io::AsyncReadExt;
            let mut buf = [0u8; 64];
            let mut stdin = tokio::io::stdin();
            // Anything read is ignored; only the end of the stream (or a pipe that cannot be
            // read any more) matters. An interrupted read is not the end: a process stopped
            // and continued (SIGSTOP, SIGCONT) must not take it for its parent leaving.
            loop {
                match stdin.read(&mut buf).await {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "stdin cannot be read; taking it as closed");
                        break;
                    }
                }
            }
        } else {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
        () = eof => {},
    }
}

/// The OTLP endpoint to export to: none when unset or empty (compose files set the variable to
/// an empty value to mean "off").
pub(crate) fn otlp_endpoint(flag: &Option<String>) -> Option<String> {
    flag.as_deref()
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(str::to_owned)
}

/// Runs a server future on a fresh runtime with logging and (optionally) span export
/// installed, and flushes the exporter after it ends, while the runtime still runs.
fn with_telemetry(
    export: Option<Export>,
    server: impl std::future::Future<Output = Result<()>>,
) -> Result<()> {
    let rt = super::runtime()?;
    let telemetry = {
        let _in_runtime = rt.enter();
        telemetry::init(export)?
    };
    let result = rt.block_on(server);
    telemetry.shutdown();
    // Not a plain drop, which waits for every blocking task: the stdin watcher of
    // --exit-on-stdin-eof blocks in read(2) until its parent closes the pipe, and a server
    // that stopped by itself (a failed Raft node) must exit now, not when the parent does.
    rt.shutdown_timeout(Duration::from_secs(2));
    result
}

#[cfg(test)]
mod tests {
    /// Ensures that an unset, empty or blank OTLP endpoint means no export, and a set one is
    /// used as given (trimmed).
    #[test]
    fn empty_otlp_endpoint_means_off() {
        use super::otlp_endpoint;
        assert_eq!(otlp_endpoint(&None), None);
        assert_eq!(otlp_endpoint(&Some(String::new())), None);
        assert_eq!(otlp_endpoint(&Some("  ".into())), None);
        assert_eq!(
            otlp_endpoint(&Some(" http://c:4317 ".into())).as_deref(),
            Some("http://c:4317")
        );
    }
}
