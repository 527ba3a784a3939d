//! What the `tessera` binary reports about itself: log lines on stderr, and — for the
//! coordinator and the worker, when an OTLP endpoint is configured — spans exported over
//! OTLP/gRPC to an OpenTelemetry collector.
//!
//! Logs are filtered by `TESSERA_LOG` (default `warn`) and coloured only when stderr is a
//! terminal and `NO_COLOR` is not set. Span export is off unless
//! `--otlp-endpoint` or the standard `OTEL_EXPORTER_OTLP_ENDPOINT` names a collector; when off,
//! no OpenTelemetry layer, propagator or exporter exists, so spans cost what they did before.
//! When on, spans at `info` and above (`TESSERA_OTEL_FILTER` overrides) go to a batch exporter
//! on its own thread; export failures are logged by the SDK and never reach serving.

use anyhow::{Context, Result};
use opentelemetry::KeyValue;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Which spans are exported by default. The exporter's own stack (tonic, h2, hyper, tower) is
/// left out so that exporting never produces spans to export.
const DEFAULT_OTEL_FILTER: &str = "info,h2=off,hyper=off,hyper_util=off,tonic=off,tower=off";

/// Where and as whom this process exports its spans.
#[derive(Clone, Debug)]
pub struct Export {
    /// The collector's OTLP/gRPC endpoint, e.g. `http://collector:4317` (`http://` is assumed
    /// when no scheme is given).
    pub endpoint: String,
    /// `service.name` unless `OTEL_SERVICE_NAME` says otherwise: `tessera-coordinator` or
    /// `tessera-worker`.
    pub service: &'static str,
    /// `service.instance.id`: which coordinator or worker this is.
    pub instance: String,
}

/// The installed telemetry; [`Telemetry::shutdown`] flushes spans still buffered.
#[derive(Debug)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

/// The log filter: `TESSERA_LOG`, default `warn`.
fn log_filter() -> EnvFilter {
    EnvFilter::try_from_env("TESSERA_LOG").unwrap_or_else(|_| EnvFilter::new("warn"))
}

/// Whether log lines get ANSI colours: only on a terminal, and never when `NO_COLOR` is set
/// to anything but "" (<https://no-color.org>). Log files, `docker logs` and a parent's pipe
/// (`tessera up`'s children inherit its stderr, a terminal or not) get plain text.
fn ansi() -> bool {
    use std::io::IsTerminal;
    let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
    !no_color && std::io::stderr().is_terminal()
}

/// Installs logging only (every command but the servers).
pub fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(log_filter())
        .with_writer(std::io::stderr)
        .with_ansi(ansi())
        .init();
}

/// Installs logging and, when `export` is given, OTLP span export with W3C trace-context
/// propagation.
///
/// Must run inside a Tokio runtime when exporting (the gRPC channel is built on it), and that
/// runtime must outlive [`Telemetry::shutdown`].
///
/// # Errors
/// When the endpoint is not a valid URI or the filter in `TESSERA_OTEL_FILTER` does not parse.
pub fn init(export: Option<Export>) -> Result<Telemetry> {
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(ansi())
        .with_filter(log_filter());
    let Some(export) = export else {
        tracing_subscriber::registry().with(fmt).init();
        return Ok(Telemetry { provider: None });
    };
    let endpoint = if export.endpoint.contains("://") {
        export.endpoint.clone()
    } else {
        format!("http://{}", export.endpoint)
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint.clone())
        .build()
        .with_context(|| format!("OTLP exporter for {endpoint}"))?;
    let mut resource = Resource::builder()
        .with_attribute(KeyValue::new(
            "service.instance.id",
            export.instance.clone(),
        ))
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")));
    // OTEL_SERVICE_NAME, read by the SDK's environment detector, wins over our default.
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name(export.service);
    }
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build();
    let filter = match std::env::var("TESSERA_OTEL_FILTER") {
        Ok(f) => EnvFilter::try_new(&f).with_context(|| format!("TESSERA_OTEL_FILTER={f}"))?,
        Err(_) => EnvFilter::new(DEFAULT_OTEL_FILTER),
    };
    let otel = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("tessera"))
        .with_filter(filter);
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    tracing_subscriber::registry().with(fmt).with(otel).init();
    tracing::info!(%endpoint, service = export.service, "exporting spans over OTLP");
    Ok(Telemetry {
        provider: Some(provider),
    })
}

impl Telemetry {
    /// Exports the spans still buffered and stops the exporter (a no-op when export is off).
    /// Failures are logged: losing spans must not turn a clean exit into an error.
    pub fn shutdown(self) {
        if let Some(provider) = self.provider
            && let Err(e) = provider.shutdown()
        {
            tracing::warn!(error = %e, "flushing spans at shutdown failed");
        }
    }
}
