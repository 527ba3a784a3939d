//! The two Prometheus exposition formats, and the choice between them per scrape.
//!
//! Our processes render their metrics as OpenMetrics text (what the `prometheus-client` crate
//! writes). A scraper that asks for OpenMetrics (`Accept: application/openmetrics-text`, as
//! Prometheus itself does) gets that body with its own content type. Every other client —
//! `curl`, the classic `prometheus_client` text parser, older Prometheus servers, most
//! dashboards' exporters — gets the classic text format (version 0.0.4), converted here,
//! because an OpenMetrics body read by a classic parser loses its types: a counter family
//! `x` has samples named `x_total`, which a classic parser does not match to `# TYPE x
//! counter`, so it sees them as untyped.
//!
//! The conversion (as Prometheus's own `expfmt` does it): counter families are named after
//! their `_total` samples; `info` families become gauges named `<name>_info`; `unknown`
//! becomes `untyped`; `# UNIT` and `# EOF` lines, counters' `_created` samples and exemplars
//! are dropped (the classic format has none of them).

use std::collections::HashMap;

/// Content type of an OpenMetrics body.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Content type of a classic text-format body.
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Whether a request's `Accept` header value asks for OpenMetrics.
pub fn wants_openmetrics(accept: Option<&str>) -> bool {
    accept.is_some_and(|a| {
        a.split(',')
            .any(|part| part.trim().starts_with("application/openmetrics-text"))
    })
}

/// The body and content type to answer a scrape with, from an OpenMetrics rendering.
pub fn negotiate(openmetrics: String, accept: Option<&str>) -> (String, &'static str) {
    if wants_openmetrics(accept) {
        (openmetrics, OPENMETRICS)
    } else {
        (to_prometheus_text(&openmetrics), PROMETHEUS_TEXT)
    }
}

/// How a family's lines are rewritten.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Counter,
    Info,
    Other,
}

/// Converts an OpenMetrics text body to the classic text format (see the module docs).
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let mut kinds: HashMap<&str, Kind> = HashMap::new();
    for line in openmetrics.lines() {
        if let Some((name, ty)) = line
            .strip_prefix("# TYPE ")
            .and_then(|rest| rest.split_once(' '))
        {
            let kind = match ty.trim() {
                "counter" => Kind::Counter,
                "info" => Kind::Info,
                _ => Kind::Other,
            };
            kinds.insert(name, kind);
        }
    }
    let renamed = |name: &str| match kinds.get(name) {
        Some(Kind::Counter) => format!("{name}_total"),
        Some(Kind::Info) => format!("{name}_info"),
        _ => name.to_owned(),
    };
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some((name, help)) = line
            .strip_prefix("# HELP ")
            .and_then(|rest| rest.split_once(' '))
        {
            out.push_str(&format!("# HELP {} {help}\n", renamed(name)));
            continue;
        }
        if let Some((name, ty)) = line
            .strip_prefix("# TYPE ")
            .and_then(|rest| rest.split_once(' '))
        {
            let ty = match ty.trim() {
                "info" => "gauge",
                "unknown" => "untyped",
                // gaugehistogram and stateset have no classic type.
                "counter" | "gauge" | "histogram" | "summary" => ty.trim(),
                _ => "untyped",
            };
            out.push_str(&format!("# TYPE {} {ty}\n", renamed(name)));
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let name = &line[..name_end];
        if let Some(base) = name.strip_suffix("_created")
            && kinds.get(base) == Some(&Kind::Counter)
        {
            continue;
        }
        out.push_str(without_exemplar(line));
        out.push('\n');
    }
    out
}

/// A sample line without its exemplar (` # {labels} value [timestamp]` after the value).
fn without_exemplar(line: &str) -> &str {
    // The label set may hold " # " inside quoted values: look only after it.
    let mut after_labels = 0;
    if let Some(open) = line.find('{') {
        let (mut quoted, mut escaped) = (false, false);
        for (i, c) in line[open..].char_indices() {
            match c {
                _ if escaped => escaped = false,
                '\\' if quoted => escaped = true,
                '"' => quoted = !quoted,
                '}' if !quoted => {
                    after_labels = open + i + 1;
                    break;
                }
                _ => {}
            }
        }
    }
    match line[after_labels..].find(" # ") {
        Some(at) => &line[..after_labels + at],
        None => line,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::encoding::text::encode;
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::family::Family;
    use prometheus_client::metrics::gauge::Gauge;
    use prometheus_client::metrics::histogram::Histogram;
    use prometheus_client::metrics::info::Info;
    use prometheus_client::registry::{Registry, Unit};

    /// An OpenMetrics body as our processes render it: a labelled counter, a counter with a
    /// unit, a gauge, a histogram and an info family.
    fn rendered() -> String {
        let mut r = Registry::with_prefix("tessera");
        let requests = Family::<Vec<(&'static str, &'static str)>, Counter>::default();
        requests.get_or_create(&vec![("outcome", "stop")]).inc_by(3);
        r.register("requests", "Requests by outcome", requests);
        let bytes = Counter::<u64>::default();
        bytes.inc_by(7);
        r.register_with_unit("sent", "Bytes sent", Unit::Bytes, bytes);
        let g = Gauge::<i64>::default();
        g.set(2);
        r.register("running_requests", "Requests generating now", g);
        let h = Histogram::new([0.1, 1.0]);
        h.observe(0.5);
        r.register("step_seconds", "Step latency", h);
        r.register("build", "Build", Info::new(vec![("version", "0.1.0")]));
        let mut s = String::new();
        encode(&mut s, &r).expect("encode");
        s
    }

    /// Ensures that every family of an OpenMetrics body comes out typed under the name its
    /// samples carry, with nothing the classic format lacks.
    #[test]
    fn classic_text_names_families_after_their_samples() {
        let om = rendered();
        assert!(om.contains("# TYPE tessera_requests counter"), "{om}");
        let text = to_prometheus_text(&om);
        for want in [
            "# HELP tessera_requests_total Requests by outcome.",
            "# TYPE tessera_requests_total counter",
            "tessera_requests_total{outcome=\"stop\"} 3",
            "# TYPE tessera_sent_bytes_total counter",
            "tessera_sent_bytes_total 7",
            "# TYPE tessera_running_requests gauge",
            "tessera_running_requests 2",
            "# TYPE tessera_step_seconds histogram",
            "tessera_step_seconds_bucket{le=\"1.0\"} 1",
            "tessera_step_seconds_count 1",
            "# TYPE tessera_build_info gauge",
            "tessera_build_info{version=\"0.1.0\"} 1",
        ] {
            assert!(
                text.lines().any(|l| l == want),
                "missing {want:?} in\n{text}"
            );
        }
        assert!(!text.contains("# EOF"), "{text}");
        assert!(!text.contains("# UNIT"), "{text}");
        // Every sample belongs to a typed family: its name, less a histogram suffix, has a
        // TYPE line.
        let typed: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split(' ').next())
            .collect();
        for sample in text.lines().filter(|l| !l.starts_with('#')) {
            let name = &sample[..sample.find(['{', ' ']).expect("a value")];
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .filter(|b| typed.contains(b))
                .unwrap_or(name);
            assert!(typed.contains(&base), "{name} is untyped in\n{text}");
        }
    }

    /// Ensures that exemplars and `_created` samples are dropped, and that a label value
    /// holding " # " is kept whole.
    #[test]
    fn exemplars_and_created_are_dropped() {
        let om = "# TYPE a counter\na_total{x=\"p # q\"} 1 # {trace_id=\"abc\"} 1.0\n\
                  a_created 1.7e9\n# TYPE b unknown\nb 2\n# EOF\n";
        assert_eq!(
            to_prometheus_text(om),
            "# TYPE a_total counter\na_total{x=\"p # q\"} 1\n# TYPE b untyped\nb 2\n"
        );
    }

    /// Ensures that only a scraper asking for OpenMetrics gets it.
    #[test]
    fn negotiation_follows_the_accept_header() {
        let prom = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;\
                    version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert!(wants_openmetrics(Some(prom)));
        assert!(!wants_openmetrics(Some("*/*")));
        assert!(!wants_openmetrics(Some("text/plain")));
        assert!(!wants_openmetrics(None));
        let (body, ty) = negotiate("# TYPE a counter\na_total 1\n# EOF\n".into(), None);
        assert_eq!(ty, PROMETHEUS_TEXT);
        assert_eq!(body, "# TYPE a_total counter\na_total 1\n");
        let (body, ty) = negotiate("# EOF\n".into(), Some(prom));
        assert_eq!((body.as_str(), ty), ("# EOF\n", OPENMETRICS));
    }
}
