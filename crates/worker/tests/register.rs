//! `serve` against a small real Coordination server: registration while the coordinator
//! comes up late, heartbeats with the shard's numbers, re-registration when the coordinator
//! forgets the worker, health, and shutdown (leaving the cluster first).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tessera_proto::cluster::v1 as pb;
use tessera_proto::cluster::v1::coordination_server::{Coordination, CoordinationServer};
use tessera_proto::cluster::v1::worker_client::WorkerClient;
use tessera_worker::{Capacity, WorkerConfig};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};

/// What the coordinator saw.
#[derive(Debug)]
enum Seen {
    Register(pb::RegisterRequest),
    Heartbeat(pb::HeartbeatRequest),
    Leave(pb::LeaveRequest),
}

/// A coordinator that assigns ids `w1`, `w2`, … and reports every call.
#[derive(Clone)]
struct Coordinator {
    seen: mpsc::UnboundedSender<Seen>,
    next_id: Arc<AtomicU64>,
    /// Answer `known = false` to the next heartbeat.
    forget: Arc<AtomicBool>,
}

#[tonic::async_trait]
impl Coordination for Coordinator {
    async fn register(
        &self,
        r: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let _ = self.seen.send(Seen::Register(r.into_inner()));
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        Ok(Response::new(pb::RegisterResponse {
            worker_id: format!("w{n}"),
            heartbeat_interval_ms: 50,
            leader: String::new(),
        }))
    }

    async fn heartbeat(
        &self,
        r: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let _ = self.seen.send(Seen::Heartbeat(r.into_inner()));
        let known = !self.forget.swap(false, Ordering::Relaxed);
        Ok(Response::new(pb::HeartbeatResponse {
            known,
            leader: String::new(),
        }))
    }

    async fn leave(
        &self,
        r: Request<pb::LeaveRequest>,
    ) -> Result<Response<pb::LeaveResponse>, Status> {
        let _ = self.seen.send(Seen::Leave(r.into_inner()));
        Ok(Response::new(pb::LeaveResponse {
            leader: String::new(),
        }))
    }
}

async fn next(rx: &mut mpsc::UnboundedReceiver<Seen>) -> Seen {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("the coordinator hears from the worker in time")
        .expect("channel open")
}

/// The next heartbeat, skipping none: the caller expects one.
async fn heartbeat(rx: &mut mpsc::UnboundedReceiver<Seen>) -> pb::HeartbeatRequest {
    match next(rx).await {
        Seen::Heartbeat(h) => h,
        other => panic!("expected a heartbeat, got {other:?}"),
    }
}

/// Ensures that a worker started before its coordinator serves at once, registers once the
/// coordinator appears, heartbeats with its RSS, weight bytes and plan epoch, registers again
/// when a heartbeat answers `known = false`, and stops when asked, leaving the cluster first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registers_heartbeats_and_reregisters() {
    // A free port for the coordinator, closed until the worker has tried a few times.
    let coord_addr: SocketAddr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let cfg = WorkerConfig {
        listen: "127.0.0.1:0".parse().expect("addr"),
        advertise: None,
        coordinator: format!("http://{coord_addr}"),
        capacity: Capacity {
            memory_bytes: 8 << 30,
            threads: 1,
            devices: vec![tessera_proto::v1::Device {
                id: "cuda:0".into(),
                name: "declared for the test".into(),
                memory_bytes: 8 << 30,
                bandwidth_bytes_s: 1 << 40,
            }],
        },
        name: "reg-test".into(),
        model_home: None,
        metrics_listen: None,
        peer_listen: None,
        cluster_tls: tessera_tls::ClusterTls::insecure(),
        health_listen: None,
        connections: tessera_tls::Limits::default(),
        model_paths: tessera_worker::ModelPaths::any(),
        failpoint: None,
        // Bit-for-bit comparisons with the CPU engine: never a GPU.
        backend: tessera_worker::Backend::Cpu,
    };
    let worker = tokio::spawn(tessera_worker::serve(cfg, async {
        let _ = stop_rx.await;
    }));
    tokio::time::sleep(Duration::from_millis(400)).await;

    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    let forget = Arc::new(AtomicBool::new(false));
    let coordinator = Coordinator {
        seen: seen_tx,
        next_id: Arc::new(AtomicU64::new(1)),
        forget: Arc::clone(&forget),
    };
    let listener = tokio::net::TcpListener::bind(coord_addr)
        .await
        .expect("rebind the coordinator port");
    let (coord_stop_tx, coord_stop_rx) = oneshot::channel::<()>();
    let coord = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(CoordinationServer::new(coordinator))
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                let _ = coord_stop_rx.await;
            }),
    );

    let Seen::Register(reg) = next(&mut seen).await else {
        panic!("the first call must be Register");
    };
    assert_eq!(reg.name, "reg-test");
    let cap = reg.capacity.clone().expect("capacity");
    assert_eq!((cap.memory_bytes, cap.threads), (8 << 30, 1));
    let ids: Vec<&str> = cap.devices.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(ids, ["cuda:0"]);
    assert_eq!(cap.devices[0].bandwidth_bytes_s, 1 << 40);
    let h = heartbeat(&mut seen).await;
    assert_eq!(h.worker_id, "w1");
    assert!(h.resident_bytes > 1 << 20, "{h:?}");
    assert_eq!((h.plan_epoch, h.weight_bytes), (0, 0));

    // The Worker service and health answer on the registered address.
    let url = format!("http://{}", reg.address);
    let ch = tonic::transport::Channel::from_shared(url)
        .expect("url")
        .connect()
        .await
        .expect("connect to the worker");
    let mut health = tonic_health::pb::health_client::HealthClient::new(ch.clone());
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "tessera.cluster.v1.Worker".into(),
        })
        .await
        .expect("health")
        .into_inner()
        .status;
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    let mut client = WorkerClient::new(ch);
    client
        .release(pb::ReleaseRequest { seq_ids: vec![1] })
        .await
        .expect("release with no shard");

    // With the real model, heartbeats carry the loaded shard's epoch and weight bytes.
    if let Some(model) = tessera_testkit::smollm2_gguf() {
        let r = client
            .load_shard(pb::LoadShardRequest {
                plan_epoch: 3,
                model: model.display().to_string(),
                shard: Some(tessera_proto::v1::ShardAssignment {
                    layer_start: 0,
                    layer_end: 30,
                    embed: true,
                    head: true,
                    ..Default::default()
                }),
                next_address: String::new(),
                kv_tokens: 256,
                block_size: 16,
                group: Vec::new(),
                upstream: String::new(),
                group_names: Vec::new(),
            })
            .await
            .expect("load")
            .into_inner();
        loop {
            let h = heartbeat(&mut seen).await;
            if h.plan_epoch == 3 {
                assert_eq!(h.weight_bytes, r.weight_bytes);
                break;
            }
        }
    }

    forget.store(true, Ordering::Relaxed);
    loop {
        match next(&mut seen).await {
            Seen::Heartbeat(h) => assert_eq!(h.worker_id, "w1"),
            Seen::Register(again) => {
                assert_eq!(again.address, reg.address);
                break;
            }
            Seen::Leave(l) => panic!("left while running: {l:?}"),
        }
    }
    assert_eq!(heartbeat(&mut seen).await.worker_id, "w2");

    // Stopping, it leaves the cluster under its current id first.
    let _ = stop_tx.send(());
    loop {
        match next(&mut seen).await {
            Seen::Heartbeat(h) => assert_eq!(h.worker_id, "w2"),
            Seen::Leave(l) => {
                assert_eq!(l.worker_id, "w2");
                break;
            }
            Seen::Register(r) => panic!("registered again while stopping: {r:?}"),
        }
    }
    tokio::time::timeout(Duration::from_secs(10), worker)
        .await
        .expect("serve returns after shutdown")
        .expect("join")
        .expect("clean shutdown");
    let _ = coord_stop_tx.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), coord).await;
}
