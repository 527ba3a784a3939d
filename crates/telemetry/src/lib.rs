//! Observability plumbing that the coordinator and the worker share.
//!
//! - [`http`]: the plain-HTTP `GET /metrics` endpoint each process serves its Prometheus text
//!   exposition on (`--metrics-listen`), in the format the scraper asks for
//!   ([`exposition`]: OpenMetrics, or the classic text format).
//! - [`trace_context`]: W3C trace context (`traceparent`, `tracestate`) carried across process
//!   boundaries — in pipeline step messages and in gRPC metadata — so the spans of one request
//!   on the coordinator and on every stage form one trace.
//!
//! Exporting spans (the OpenTelemetry SDK and the OTLP exporter) is the binary's business: this
//! crate only needs the OpenTelemetry API, and everything here does nothing until the binary
//! installs an exporter and a propagator.

#![forbid(unsafe_code)]

pub mod exposition;
pub mod http;
pub mod trace_context;
