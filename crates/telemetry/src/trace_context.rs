//! W3C trace context across process boundaries: what joins a worker's spans to the
//! coordinator's trace of a request.
//!
//! Pipeline steps travel over long-lived gRPC streams that many requests share, so a step's
//! context cannot ride in the stream's metadata: it travels in the step message itself
//! (`StepRequest.trace_context`, a `traceparent`/`tracestate` map), and each stage re-injects
//! its own step span before forwarding. Unary calls carry it in gRPC metadata (the same
//! headers as HTTP).
//!
//! Injection and extraction go through OpenTelemetry's global propagator and the
//! `tracing-opentelemetry` layer. Until the binary installs both (only when an OTLP endpoint
//! is configured), injecting yields an empty map and extracting changes nothing.

use std::collections::HashMap;

use opentelemetry::propagation::{Extractor, Injector};
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// A propagation carrier as step messages hold it: header name → value.
pub type Carrier = HashMap<String, String>;

/// The trace context of `span` (`traceparent`, and `tracestate` when there is one); empty when
/// no propagator or OpenTelemetry layer is installed, or the span is disabled.
pub fn inject(span: &tracing::Span) -> Carrier {
    let mut carrier = Carrier::new();
    if span.is_disabled() {
        return carrier;
    }
    let cx = span.context();
    opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&cx, &mut carrier));
    carrier
}

/// Makes `span` a child of the remote span in `carrier` (for OpenTelemetry; the `tracing`
/// parent stays as it is). Nothing happens for an empty or malformed carrier, when no
/// OpenTelemetry layer is installed, or when `span` was already entered.
pub fn set_parent(span: &tracing::Span, carrier: &Carrier) {
    if carrier.is_empty() || span.is_disabled() {
        return;
    }
    let cx = opentelemetry::global::get_text_map_propagator(|p| p.extract(carrier));
    if let Err(e) = span.set_parent(cx) {
        tracing::debug!(error = %e, "remote trace context not applied");
    }
}

/// Writes the trace context of `span` into gRPC request metadata.
pub fn inject_metadata(span: &tracing::Span, metadata: &mut MetadataMap) {
    if span.is_disabled() {
        return;
    }
    let cx = span.context();
    opentelemetry::global::get_text_map_propagator(|p| {
        p.inject_context(&cx, &mut MetadataInjector(metadata));
    });
}

/// Makes `span` a child of the remote span whose context came in gRPC metadata (as
/// [`set_parent`]); a request without `traceparent` leaves it alone.
pub fn set_parent_from_metadata(span: &tracing::Span, metadata: &MetadataMap) {
    if span.is_disabled() || !metadata.contains_key("traceparent") {
        return;
    }
    let cx =
        opentelemetry::global::get_text_map_propagator(|p| p.extract(&MetadataExtractor(metadata)));
    if let Err(e) = span.set_parent(cx) {
        tracing::debug!(error = %e, "remote trace context not applied");
    }
}

/// gRPC metadata as an OpenTelemetry injector (ASCII values only, as W3C headers are).
struct MetadataInjector<'a>(&'a mut MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        // The propagator only writes valid header names and ASCII values; anything else is
        // dropped rather than sent malformed.
        if let (Ok(key), Ok(value)) = (
            MetadataKey::from_bytes(key.as_bytes()),
            MetadataValue::try_from(value.as_str()),
        ) {
            self.0.insert(key, value);
        }
    }
}

/// gRPC metadata as an OpenTelemetry extractor.
struct MetadataExtractor<'a>(&'a MetadataMap);

impl Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                tonic::metadata::KeyRef::Ascii(k) => Some(k.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
    use opentelemetry_sdk::propagation::TraceContextPropagator;
    use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};
    use tracing_subscriber::layer::SubscriberExt;

    /// A subscriber with the OpenTelemetry layer over an in-memory exporter.
    fn otel() -> (
        SdkTracerProvider,
        InMemorySpanExporter,
        impl tracing::Subscriber,
    ) {
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .build();
        let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("test"));
        (
            provider,
            exporter,
            tracing_subscriber::registry().with(layer),
        )
    }

    /// Ensures that a span whose parent came through a step carrier, and one through gRPC
    /// metadata, both join the sender's trace with the sender's span as parent.
    #[test]
    fn remote_parents_join_the_trace() {
        let (provider, exporter, subscriber) = otel();
        tracing::subscriber::with_default(subscriber, || {
            let sender = tracing::info_span!("sender");
            let carrier = inject(&sender);
            assert!(
                carrier
                    .get("traceparent")
                    .is_some_and(|v| v.starts_with("00-")),
                "{carrier:?}"
            );
            let mut metadata = MetadataMap::new();
            inject_metadata(&sender, &mut metadata);
            assert_eq!(
                metadata.get("traceparent").and_then(|v| v.to_str().ok()),
                carrier.get("traceparent").map(String::as_str)
            );
            let sender_cx = sender.context();
            let want = sender_cx.span().span_context().clone();
            drop(sender);

            let by_carrier = tracing::info_span!(parent: None, "by_carrier");
            set_parent(&by_carrier, &carrier);
            drop(by_carrier);
            let by_metadata = tracing::info_span!(parent: None, "by_metadata");
            set_parent_from_metadata(&by_metadata, &metadata);
            drop(by_metadata);
            let unrelated = tracing::info_span!(parent: None, "unrelated");
            set_parent(&unrelated, &Carrier::new());
            drop(unrelated);

            let spans = exporter.get_finished_spans().expect("finished spans");
            let find = |name: &str| {
                spans
                    .iter()
                    .find(|s| s.name == name)
                    .unwrap_or_else(|| panic!("no span {name} in {spans:?}"))
            };
            for name in ["by_carrier", "by_metadata"] {
                let s = find(name);
                assert_eq!(s.span_context.trace_id(), want.trace_id(), "{name}");
                assert_eq!(s.parent_span_id, want.span_id(), "{name}");
            }
            assert_ne!(find("unrelated").span_context.trace_id(), want.trace_id());
        });
        provider.shutdown().expect("shutdown");
    }

    /// Ensures that without an OpenTelemetry layer nothing is injected, so steps carry no
    /// trace context when tracing export is off.
    #[test]
    fn nothing_is_injected_without_a_layer() {
        let subscriber = tracing_subscriber::registry();
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("alone");
            assert!(inject(&span).is_empty());
            let mut metadata = MetadataMap::new();
            inject_metadata(&span, &mut metadata);
            assert!(metadata.is_empty());
        });
    }
}
