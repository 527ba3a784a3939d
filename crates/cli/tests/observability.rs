//! Observability of a real cluster on loopback: spans exported over OTLP/gRPC to a receiver
//! running in this test (the generated `TraceService` of `opentelemetry-proto` on our tonic)
//! form one trace per request across the coordinator and every pipeline stage; the workers'
//! Prometheus endpoints agree with the coordinator's; a collector that is down costs nothing
//! but log lines.

use std::collections::BTreeMap;
use std::process::Child;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{KeyValue, any_value};
use tessera_proto::v1 as pb;
use tessera_proto::v1::inference_client::InferenceClient;
use tessera_testkit::{
    Tessera, count_tokens, free_addr, free_port, greedy, python, runtime, sample, scrape,
    smollm2_arg as model,
};

/// Feeds a scrape's body (the classic 0.0.4 text a plain GET gets) to the official Python
/// client's classic parser and checks that it types every family: none comes out "unknown",
/// and the coordinator's and workers' families are there as the kinds they are.
fn classic_parser_types_every_family(response: &str) {
    assert!(
        response.contains("Content-Type: text/plain; version=0.0.4"),
        "{response}"
    );
    let Some(python) = python() else { return };
    let (_, body) = response.split_once("\r\n\r\n").expect("HTTP body");
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/parse_metrics.py");
    let mut child = std::process::Command::new(python)
        .arg(script)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run the parser");
    std::io::Write::write_all(&mut child.stdin.take().expect("stdin"), body.as_bytes())
        .expect("feed the parser");
    let out = child.wait_with_output().expect("parser output");
    assert!(out.status.success(), "the classic parser refused:\n{body}");
    let families: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let families = families.as_object().expect("families");
    assert!(!families.is_empty(), "{body}");
    for (name, f) in families {
        assert_ne!(f["type"], "unknown", "{name} untyped in\n{body}");
    }
    let want: &[(&str, &str)] = if families.contains_key("tessera_worker_steps") {
        &[
            ("tessera_worker_steps", "counter"),
            ("tessera_worker_step_seconds", "histogram"),
        ]
    } else {
        &[
            ("tessera_requests", "counter"),
            ("tessera_time_to_first_token_seconds", "histogram"),
            ("tessera_num_requests_waiting", "gauge"),
            ("tessera_raft_term", "gauge"),
        ]
    };
    for (name, kind) in want {
        assert_eq!(
            families.get(*name).map(|f| f["type"].clone()),
            Some((*kind).into()),
            "{name}: {families:?}"
        );
    }
}

/// The `tessera` binary under test.
fn tessera() -> Tessera {
    Tessera::new(env!("CARGO_BIN_EXE_tessera"))
}

/// A span as received, with the resource attributes that say which process sent it.
#[derive(Clone, Debug)]
struct Received {
    service: String,
    instance: String,
    name: String,
    trace_id: Vec<u8>,
    span_id: Vec<u8>,
    parent_span_id: Vec<u8>,
    attributes: Vec<KeyValue>,
}

/// The OTLP trace receiver: keeps every span exported to it.
#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<Received>>>,
}

/// The string value of attribute `key`, if present.
fn string_attr(attrs: &[KeyValue], key: &str) -> Option<String> {
    attrs
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref()?.value.as_ref())
        .and_then(|v| match v {
            any_value::Value::StringValue(s) => Some(s.clone()),
            _ => None,
        })
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut got = Vec::new();
        for rs in request.into_inner().resource_spans {
            let attrs = rs.resource.map(|r| r.attributes).unwrap_or_default();
            let service = string_attr(&attrs, "service.name").unwrap_or_default();
            let instance = string_attr(&attrs, "service.instance.id").unwrap_or_default();
            for span in rs.scope_spans.into_iter().flat_map(|s| s.spans) {
                got.push(Received {
                    service: service.clone(),
                    instance: instance.clone(),
                    name: span.name,
                    trace_id: span.trace_id,
                    span_id: span.span_id,
                    parent_span_id: span.parent_span_id,
                    attributes: span.attributes,
                });
            }
        }
        self.spans
            .lock()
            .map_err(|_| tonic::Status::internal("poisoned"))?
            .extend(got);
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// Starts the receiver on a free loopback port; returns its address.
fn start_receiver(rt: &tokio::runtime::Runtime, receiver: Receiver) -> String {
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the OTLP receiver");
        let addr = listener.local_addr().expect("receiver address");
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(receiver))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        addr.to_string()
    })
}

/// Starts a coordinator and `workers` workers (1 GiB, one thread each), all exporting spans
/// to `otlp`, each serving metrics; returns the processes (coordinator first), the endpoint
/// and the metrics addresses (coordinator first).
fn start_cluster(model: &str, workers: usize, otlp: &str) -> (Vec<Child>, String, Vec<String>) {
    let tessera = tessera();
    let metrics: Vec<String> = (0..=workers).map(|_| free_addr()).collect();
    let n = workers.to_string();
    let (coordinator, addr, cluster_addr) = tessera.spawn_lone_coordinator(
        model,
        &[
            "--min-workers",
            &n,
            "--heartbeat-ms",
            "250",
            "--kv-tokens",
            "2048",
            "--metrics-listen",
            &metrics[0],
            "--otlp-endpoint",
            otlp,
        ],
    );
    let endpoint = format!("http://{addr}");
    let cluster_endpoint = format!("http://{cluster_addr}");
    let mut children = vec![coordinator];
    for (i, m) in metrics.iter().enumerate().skip(1) {
        let name = format!("w{i}");
        let extra = ["--metrics-listen", m, "--otlp-endpoint", otlp];
        children.push(tessera.spawn_worker(&cluster_endpoint, 1, "1GiB", Some(&name), &extra));
    }
    (children, endpoint, metrics)
}

/// Waits until the cluster serves; returns its status.
fn wait_ready(rt: &tokio::runtime::Runtime, endpoint: &str) -> pb::ClusterStatusResponse {
    let start = Instant::now();
    rt.block_on(async {
        let mut c = InferenceClient::connect(endpoint.to_owned())
            .await
            .expect("connect to the coordinator");
        loop {
            let s = c
                .cluster_status(pb::ClusterStatusRequest::default())
                .await
                .expect("cluster status")
                .into_inner();
            if s.ready {
                return s;
            }
            assert!(
                start.elapsed() < Duration::from_secs(90),
                "not ready: {s:#?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
}

/// Runs a greedy request with id `request_id` to its end; returns the tokens generated.
fn generate(
    rt: &tokio::runtime::Runtime,
    endpoint: &str,
    request_id: &str,
    max_tokens: u32,
) -> usize {
    rt.block_on(async {
        let mut c = InferenceClient::connect(endpoint.to_owned())
            .await
            .expect("connect to the coordinator");
        let req = pb::GenerateRequest {
            request_id: request_id.into(),
            ..greedy("The capital of France", max_tokens)
        };
        count_tokens(&mut c, req).await.expect("generate")
    })
}

/// Closes every process's stdin (their signal to stop) and waits for each to exit with
/// success within 30 s.
fn stop_cleanly(children: Vec<Child>) {
    for mut c in children {
        drop(c.stdin.take());
        let start = Instant::now();
        let status = loop {
            if let Some(s) = c.try_wait().expect("wait for a process") {
                break s;
            }
            if start.elapsed() > Duration::from_secs(30) {
                let _ = c.kill();
                panic!("a process did not stop within 30 s of its stdin closing");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(status.success(), "a process exited with {status}");
    }
}

/// Ensures that a request through a two-stage pipeline is one trace at the collector — its
/// `generate` span (with the request id), the coordinator's step spans under it, and each
/// stage's step and compute spans chained under those — flushed when the processes stop,
/// and that each worker's metrics count exactly the steps and tokens the coordinator sent.
#[test]
fn a_request_is_one_trace_across_coordinator_and_workers() {
    let Some(model) = model() else { return };
    let rt = runtime();
    let receiver = Receiver::default();
    let otlp = format!("http://{}", start_receiver(&rt, receiver.clone()));
    let (children, endpoint, metrics) = start_cluster(&model, 2, &otlp);
    let status = wait_ready(&rt, &endpoint);
    let stages: Vec<u32> = status
        .workers
        .iter()
        .filter_map(|w| w.shard.map(|s| s.stage))
        .collect();
    assert_eq!(stages.len(), 2, "two stages: {status:#?}");
    const MAX_TOKENS: u32 = 5;
    assert_eq!(generate(&rt, &endpoint, "otel-req-1", MAX_TOKENS), 5);

    // Metrics: the classic Prometheus parser types every family, on every process.
    for m in &metrics {
        classic_parser_types_every_family(&scrape(m));
    }
    // Every stage computed every step the coordinator sent, nothing more.
    let coordinator = scrape(&metrics[0]);
    let steps = sample(&coordinator, "tessera_step_seconds_count");
    let tokens = sample(&coordinator, "tessera_step_tokens_total");
    assert!(steps >= f64::from(MAX_TOKENS), "{coordinator}");
    for m in &metrics[1..] {
        let text = scrape(m);
        assert_eq!(sample(&text, "tessera_worker_steps_total"), steps, "{text}");
        assert_eq!(
            sample(&text, "tessera_worker_step_tokens_total"),
            tokens,
            "{text}"
        );
        assert_eq!(
            sample(&text, "tessera_worker_step_seconds_count"),
            steps,
            "{text}"
        );
        assert!(sample(&text, "tessera_worker_weight_bytes") > 1e6, "{text}");
        assert!(
            sample(&text, "tessera_worker_resident_bytes") > 1e7,
            "{text}"
        );
        assert!(
            sample(&text, "tessera_worker_kv_blocks_total") > 0.0,
            "{text}"
        );
        // The finished sequence is freed by a step of releases right after it ends: within a
        // moment no sequence is live and no KV block is held.
        let start = Instant::now();
        loop {
            let text = scrape(m);
            let live = sample(&text, "tessera_worker_active_sequences");
            let used = sample(&text, "tessera_worker_kv_blocks_used");
            if live == 0.0 && used == 0.0 {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "still held: {text}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    // Spans: flushed at shutdown, so the whole trace is there once the processes exit.
    stop_cleanly(children);
    let spans = receiver.spans.lock().expect("spans").clone();
    let generate = spans
        .iter()
        .find(|s| {
            s.name == "generate"
                && string_attr(&s.attributes, "request_id").as_deref() == Some("otel-req-1")
        })
        .unwrap_or_else(|| panic!("no generate span with the request id in {spans:#?}"));
    assert_eq!(generate.service, "tessera-coordinator");
    assert_eq!(generate.instance, "coordinator-1");
    let trace: Vec<&Received> = spans
        .iter()
        .filter(|s| s.trace_id == generate.trace_id)
        .collect();
    let by_id: BTreeMap<&[u8], &Received> =
        trace.iter().map(|s| (s.span_id.as_slice(), *s)).collect();
    let parent = |s: &Received| by_id.get(s.parent_span_id.as_slice()).copied();
    let coordinator_steps: Vec<&Received> = trace
        .iter()
        .copied()
        .filter(|s| s.name == "step" && s.service == "tessera-coordinator")
        .collect();
    assert_eq!(coordinator_steps.len() as f64, steps, "{trace:#?}");
    assert!(
        coordinator_steps
            .iter()
            .all(|s| s.parent_span_id == generate.span_id),
        "coordinator steps are children of generate"
    );
    // Stage 0's steps hang under the coordinator's, stage 1's under stage 0's.
    let worker_steps = |parent_service: &str| -> BTreeMap<String, usize> {
        let mut per_instance = BTreeMap::new();
        for s in trace
            .iter()
            .filter(|s| s.name == "step" && s.service == "tessera-worker")
        {
            if parent(s).is_some_and(|p| p.name == "step" && p.service == parent_service) {
                *per_instance.entry(s.instance.clone()).or_insert(0) += 1;
            }
        }
        per_instance
    };
    let stage0 = worker_steps("tessera-coordinator");
    let stage1 = worker_steps("tessera-worker");
    assert_eq!(stage0.len(), 1, "one stage-0 worker: {stage0:?}");
    assert_eq!(stage1.len(), 1, "one stage-1 worker: {stage1:?}");
    assert_ne!(stage0.keys().next(), stage1.keys().next());
    for n in stage0.values().chain(stage1.values()) {
        assert_eq!(*n as f64, steps, "every step on every stage: {trace:#?}");
    }
    let computes = trace
        .iter()
        .filter(|s| s.name == "compute" && s.service == "tessera-worker")
        .filter(|s| parent(s).is_some_and(|p| p.name == "step" && p.instance == s.instance))
        .count();
    assert_eq!(
        computes as f64,
        2.0 * steps,
        "a compute span per step per stage"
    );
    // The step of releases that freed the finished request is bookkeeping: it is no trace of
    // its own anywhere (every step and compute span belongs to the request's trace).
    let strays: Vec<&Received> = spans
        .iter()
        .filter(|s| matches!(s.name.as_str(), "step" | "compute"))
        .filter(|s| s.trace_id != generate.trace_id)
        .collect();
    assert!(
        strays.is_empty(),
        "step spans outside any request: {strays:#?}"
    );
}

/// Ensures that a collector that is down changes nothing for clients: requests are served
/// and the processes still exit cleanly (export failures are only logged).
#[test]
fn an_unreachable_collector_does_not_break_serving() {
    let Some(model) = model() else { return };
    let rt = runtime();
    // A port nobody listens on.
    let otlp = format!("http://127.0.0.1:{}", free_port());
    let (children, endpoint, metrics) = start_cluster(&model, 1, &otlp);
    wait_ready(&rt, &endpoint);
    assert_eq!(generate(&rt, &endpoint, "no-collector", 3), 3);
    assert_eq!(generate(&rt, &endpoint, "no-collector-2", 3), 3);
    let text = scrape(&metrics[1]);
    assert!(sample(&text, "tessera_worker_steps_total") >= 6.0, "{text}");
    stop_cleanly(children);
}
