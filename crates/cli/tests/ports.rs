//! A coordinator's two ports, as a real `tessera coordinator` process serves them: the public
//! port has the public API (`tessera.v1.Inference`), health and server reflection (v1 and
//! v1alpha), and reflection lists nothing else; the cluster protocol (Raft, worker
//! registration, forwarding) is only on the cluster port, which in turn serves none of the
//! public API. A forged Raft message sent to the public port is refused with UNIMPLEMENTED and
//! leaves the leader and its term alone.

use std::process::{Child, Command};
use std::time::{Duration, Instant};

use protobuf::Message as _;
use tessera_proto::cluster::v1 as cpb;
use tessera_proto::v1 as pb;
use tonic::Code;
use tonic::transport::Channel;
use tonic_reflection::pb::{v1 as refl, v1alpha as refl_alpha};

use tessera_testkit::{Tessera, kill, lazy_channel, python, runtime, smollm2_arg as model};

/// The `tessera` binary under test.
fn tessera() -> Tessera {
    Tessera::new(env!("CARGO_BIN_EXE_tessera"))
}

/// What reflection must list on the public port, sorted.
const PUBLIC_SERVICES: [&str; 4] = [
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
    "tessera.v1.Inference",
];

/// One coordinator on two free ports, with no workers; killed when dropped.
struct Coordinator {
    child: Child,
    public: String,
    cluster: String,
    rt: tokio::runtime::Runtime,
}

impl Coordinator {
    fn start(model: &str) -> Self {
        let (child, public, cluster) = tessera().spawn_lone_coordinator(model, &[]);
        Self {
            child,
            public,
            cluster,
            rt: runtime(),
        }
    }

    /// A lazily connected channel to `addr` (host:port), 10 s per call.
    fn channel(&self, addr: &str) -> Channel {
        let _in_runtime = self.rt.enter();
        lazy_channel(format!("http://{addr}"), Some(Duration::from_secs(10)))
    }

    /// A lazily connected channel to the cluster port, as a fellow coordinator's certificate
    /// presents it (the cluster port speaks mutual TLS only), 10 s per call.
    fn cluster_channel(&self) -> Channel {
        let _in_runtime = self.rt.enter();
        tessera_testkit::member_tls(&tessera_tls::Identity::coordinator(2))
            .endpoint(&self.cluster, tessera_tls::Role::Coordinator)
            .expect("endpoint")
            .timeout(Duration::from_secs(10))
            .connect_lazy()
    }

    /// This node's own view: (leader, term), once it has elected itself.
    fn leader_and_term(&self) -> (String, u64) {
        let start = Instant::now();
        loop {
            let mut c = pb::inference_client::InferenceClient::new(self.channel(&self.public));
            if let Ok(s) = self
                .rt
                .block_on(c.cluster_status(pb::ClusterStatusRequest { local: true }))
                .map(tonic::Response::into_inner)
                && !s.leader.is_empty()
            {
                return (s.leader, s.term);
            }
            assert!(start.elapsed() < Duration::from_secs(20), "no leader");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// grpc.health.v1 for the whole process ("") at `addr`.
    fn health(&self, addr: &str) -> Result<i32, tonic::Status> {
        let mut c = tonic_health::pb::health_client::HealthClient::new(self.channel(addr));
        self.rt
            .block_on(c.check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            }))
            .map(|r| r.into_inner().status)
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        kill(&mut self.child);
    }
}

/// One reflection v1 request, its one response.
async fn reflect_v1(
    ch: Channel,
    request: refl::server_reflection_request::MessageRequest,
) -> Result<refl::server_reflection_response::MessageResponse, tonic::Status> {
    let mut c = refl::server_reflection_client::ServerReflectionClient::new(ch);
    let req = refl::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(request),
    };
    let mut answers = c
        .server_reflection_info(tokio_stream::iter([req]))
        .await?
        .into_inner();
    let answer = answers.message().await?.expect("one answer");
    Ok(answer.message_response.expect("a response"))
}

/// The services reflection v1 lists, sorted.
async fn list_v1(ch: Channel) -> Result<Vec<String>, tonic::Status> {
    use refl::server_reflection_request::MessageRequest;
    use refl::server_reflection_response::MessageResponse;
    match reflect_v1(ch, MessageRequest::ListServices(String::new())).await? {
        MessageResponse::ListServicesResponse(l) => {
            let mut names: Vec<String> = l.service.into_iter().map(|s| s.name).collect();
            names.sort();
            Ok(names)
        }
        other => panic!("not a service list: {other:?}"),
    }
}

/// The services reflection v1alpha lists, sorted.
async fn list_v1alpha(ch: Channel) -> Result<Vec<String>, tonic::Status> {
    use refl_alpha::server_reflection_request::MessageRequest;
    use refl_alpha::server_reflection_response::MessageResponse;
    let mut c = refl_alpha::server_reflection_client::ServerReflectionClient::new(ch);
    let req = refl_alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = c
        .server_reflection_info(tokio_stream::iter([req]))
        .await?
        .into_inner();
    match answers.message().await?.and_then(|a| a.message_response) {
        Some(MessageResponse::ListServicesResponse(l)) => {
            let mut names: Vec<String> = l.service.into_iter().map(|s| s.name).collect();
            names.sort();
            Ok(names)
        }
        other => panic!("not a service list: {other:?}"),
    }
}

/// Ensures that server reflection on the public port, in both v1 and v1alpha, lists exactly
/// the public API, health and reflection, and knows no cluster symbol; that the cluster port
/// serves neither the public API nor reflection (UNIMPLEMENTED) but does serve health and
/// forwarding; and that both ports answer health.
#[test]
fn public_port_serves_only_the_public_api() {
    let Some(model) = model() else { return };
    let c = Coordinator::start(&model);
    // Elected (alone), so that its status names itself as member.
    c.leader_and_term();
    let public = c.channel(&c.public);
    let cluster = c.cluster_channel();

    assert_eq!(
        c.rt.block_on(list_v1(public.clone()))
            .expect("reflection v1"),
        PUBLIC_SERVICES
    );
    assert_eq!(
        c.rt.block_on(list_v1alpha(public.clone()))
            .expect("reflection v1alpha"),
        PUBLIC_SERVICES
    );
    {
        use refl::server_reflection_request::MessageRequest;
        use refl::server_reflection_response::MessageResponse;
        let symbol = |name: &str| {
            c.rt.block_on(reflect_v1(
                public.clone(),
                MessageRequest::FileContainingSymbol(name.to_owned()),
            ))
        };
        assert!(matches!(
            symbol("tessera.v1.Inference"),
            Ok(MessageResponse::FileDescriptorResponse(f)) if !f.file_descriptor_proto.is_empty()
        ));
        for hidden in [
            "tessera.cluster.v1.Raft",
            "tessera.cluster.v1.Coordination",
            "tessera.cluster.v1.Forward",
            "tessera.cluster.v1.RaftMessage",
        ] {
            // Not found: as an error message in the stream, or (tonic's way) as its status.
            match symbol(hidden) {
                Ok(MessageResponse::ErrorResponse(e)) => {
                    assert_eq!(e.error_code, Code::NotFound as i32, "{hidden}: {e:?}");
                }
                Err(s) => assert_eq!(s.code(), Code::NotFound, "{hidden}: {s:?}"),
                Ok(other) => panic!("{hidden} is visible on the public port: {other:?}"),
            }
        }
    }
    // The public API answers on the public port.
    let models =
        c.rt.block_on(
            pb::inference_client::InferenceClient::new(public.clone())
                .list_models(pb::ListModelsRequest::default()),
        )
        .expect("list models")
        .into_inner();
    assert_eq!(models.models.len(), 1);

    // The cluster port: no public API, no reflection; health and forwarding are there.
    let err =
        c.rt.block_on(
            pb::inference_client::InferenceClient::new(cluster.clone())
                .list_models(pb::ListModelsRequest::default()),
        )
        .expect_err("Inference on the cluster port");
    assert_eq!(err.code(), Code::Unimplemented, "{err:?}");
    let err =
        c.rt.block_on(list_v1(cluster.clone()))
            .expect_err("reflection on the cluster port");
    assert_eq!(err.code(), Code::Unimplemented, "{err:?}");
    let err =
        c.rt.block_on(list_v1alpha(cluster.clone()))
            .expect_err("reflection v1alpha on the cluster port");
    assert_eq!(err.code(), Code::Unimplemented, "{err:?}");
    let status =
        c.rt.block_on(
            cpb::forward_client::ForwardClient::new(cluster.clone())
                .cluster_status(pb::ClusterStatusRequest { local: true }),
        )
        .expect("Forward on the cluster port")
        .into_inner();
    assert_eq!(status.members.len(), 1, "{status:?}");
    assert!(
        status.members[0].ends_with(&c.cluster),
        "members are named by their cluster address: {status:?}"
    );
    let serving = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
    assert_eq!(c.health(&c.public).expect("public health"), serving);
    let mut health = tonic_health::pb::health_client::HealthClient::new(cluster.clone());
    let answer =
        c.rt.block_on(health.check(tonic_health::pb::HealthCheckRequest::default()))
            .expect("cluster health")
            .into_inner();
    assert_eq!(answer.status, serving);
    // Without a member certificate the cluster port completes no handshake.
    assert!(
        c.health(&c.cluster).is_err(),
        "plain-text health on the cluster port"
    );
}

/// Ensures that the cluster protocol sent to the public port — a forged Raft heartbeat and
/// vote request from a non-member with a far higher term, membership changes, worker
/// registration and heartbeats, forwarding — is refused with UNIMPLEMENTED, and that the leader
/// stays leader with its term unchanged; the same Raft service does answer on the cluster
/// port.
#[test]
fn cluster_calls_to_the_public_port_are_unimplemented() {
    let Some(model) = model() else { return };
    let c = Coordinator::start(&model);
    let (leader, term) = c.leader_and_term();
    assert!(leader.starts_with("1="), "{leader}");
    let public = c.channel(&c.public);

    let forged = |kind: raft::eraftpb::MessageType| {
        let mut m = raft::eraftpb::Message::default();
        m.set_msg_type(kind);
        m.from = 99;
        m.to = 1;
        m.term = term + 100;
        m.commit = 1_000_000;
        cpb::RaftMessage {
            message: m.write_to_bytes().expect("encode"),
            from_address: "127.0.0.1:9".into(),
        }
    };
    let mut refused = Vec::new();
    let mut raft_client = cpb::raft_client::RaftClient::new(public.clone());
    for kind in [
        raft::eraftpb::MessageType::MsgHeartbeat,
        raft::eraftpb::MessageType::MsgRequestVote,
        raft::eraftpb::MessageType::MsgAppend,
    ] {
        let r = c.rt.block_on(raft_client.send(forged(kind)));
        refused.push((format!("Raft/Send {kind:?}"), r.map(|_| ())));
    }
    let r = c.rt.block_on(raft_client.add_member(cpb::AddMemberRequest {
        id: 99,
        address: "127.0.0.1:9".into(),
    }));
    refused.push(("Raft/AddMember".into(), r.map(|_| ())));
    let r =
        c.rt.block_on(raft_client.remove_member(cpb::RemoveMemberRequest { id: 1 }));
    refused.push(("Raft/RemoveMember".into(), r.map(|_| ())));
    let mut coordination = cpb::coordination_client::CoordinationClient::new(public.clone());
    let r = c.rt.block_on(coordination.register(cpb::RegisterRequest {
        address: "127.0.0.1:9".into(),
        capacity: Some(pb::Capacity {
            memory_bytes: 1 << 30,
            threads: 1,
            devices: vec![],
        }),
        name: "forged".into(),
        peer_address: "127.0.0.1:9".into(),
    }));
    refused.push(("Coordination/Register".into(), r.map(|_| ())));
    let r = c.rt.block_on(coordination.heartbeat(cpb::HeartbeatRequest {
        worker_id: "w1".into(),
        ..Default::default()
    }));
    refused.push(("Coordination/Heartbeat".into(), r.map(|_| ())));
    let r = c.rt.block_on(
        cpb::forward_client::ForwardClient::new(public.clone())
            .cluster_status(pb::ClusterStatusRequest::default()),
    );
    refused.push(("Forward/ClusterStatus".into(), r.map(|_| ())));
    for (call, r) in &refused {
        match r {
            Err(s) => assert_eq!(s.code(), Code::Unimplemented, "{call}: {s:?}"),
            Ok(()) => panic!("{call} was accepted on the public port"),
        }
    }

    // Several election timeouts later, nothing moved.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(c.leader_and_term(), (leader, term));

    // The Raft service is on the cluster port: it decodes what it gets.
    let err =
        c.rt.block_on(cpb::raft_client::RaftClient::new(c.cluster_channel()).send(
            cpb::RaftMessage {
                message: vec![0xff, 0xff, 0xff],
                from_address: String::new(),
            },
        ))
        .expect_err("garbage");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    // No worker got in through the public port.
    let status =
        c.rt.block_on(
            pb::inference_client::InferenceClient::new(public)
                .cluster_status(pb::ClusterStatusRequest::default()),
        )
        .expect("status")
        .into_inner();
    assert!(status.workers.is_empty(), "{status:?}");
}

/// Ensures that a stock reflection client — grpcio-reflection's descriptor database, which
/// speaks reflection v1alpha — lists exactly the public services on the public port and
/// resolves `tessera.v1.Inference` from it (`examples/python/list_services.py`).
/// Needs TESSERA_PYTHON: a Python with the packages of examples/python/requirements.txt.
#[test]
fn stock_python_reflection_client_lists_the_public_services() {
    let Some(model) = model() else { return };
    let Some(python) = python() else { return };
    let c = Coordinator::start(&model);
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/python");
    let out = Command::new(&python)
        .args(["list_services.py", "--endpoint", &c.public])
        .current_dir(&dir)
        .output()
        .expect("run list_services.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let services: Vec<&str> = stdout
        .lines()
        .filter(|l| !l.starts_with("method "))
        .collect();
    assert_eq!(services, PUBLIC_SERVICES, "{stdout}");
    assert!(
        stdout.contains("method Generate tessera.v1.GenerateRequest tessera.v1.GenerateEvent"),
        "{stdout}"
    );
}
