//! Raft over the real gRPC transport on loopback: three nodes elect a leader and replicate;
//! the leader is killed and a new one serves; the killed node restarts from disk and catches
//! up; a malformed message is refused with INVALID_ARGUMENT.

mod raft_support;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use raft_support::{Kv, KvView, TempDir, temp_dir, test_config};
use tessera_coordinator::raft::{
    GrpcTransport, RaftHandle, RaftNode, RaftRole, RaftService, RedbStorage,
};
use tessera_proto::cluster::v1::RaftMessage;
use tessera_proto::cluster::v1::raft_client::RaftClient;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio_stream::wrappers::TcpListenerStream;

const T: Duration = Duration::from_secs(10);

/// One node: its handle, its server's stop signal and its state machine's view.
struct Node {
    handle: RaftHandle,
    stop: oneshot::Sender<()>,
    server: tokio::task::JoinHandle<()>,
    view: Arc<Mutex<KvView>>,
}

async fn start(
    id: u64,
    listener: TcpListener,
    dir: &TempDir,
    peers: &BTreeMap<u64, String>,
) -> Node {
    let storage = RedbStorage::open(dir.path().join(format!("node{id}"))).expect("open storage");
    let view = Arc::new(Mutex::new(KvView::default()));
    let transport = GrpcTransport::new(
        &peers[&id],
        peers.clone().into_iter().filter(|(p, _)| *p != id),
        tessera_tls::ClusterTls::insecure(),
    );
    let handle = RaftNode::start(
        test_config(id),
        storage,
        Kv(view.clone()),
        transport.clone(),
        Some(peers.clone()),
    )
    .expect("start node");
    let (stop, stopped) = oneshot::channel::<()>();
    let svc = RaftService::new(handle.clone(), transport).into_server();
    let server = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                let _ = stopped.await;
            })
            .await;
    });
    Node {
        handle,
        stop,
        server,
        view,
    }
}

async fn leader(nodes: &BTreeMap<u64, Node>) -> u64 {
    let deadline = Instant::now() + T;
    loop {
        let statuses: Vec<_> = nodes.values().map(|n| n.handle.status()).collect();
        if let Some(l) = statuses.iter().find(|s| s.role == RaftRole::Leader)
            && statuses
                .iter()
                .all(|s| s.leader == Some(l.id) && s.term == l.term)
        {
            return l.id;
        }
        assert!(Instant::now() < deadline, "no leader: {statuses:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn propose_all(h: &RaftHandle, prefix: &str, n: usize) {
    for i in 0..n {
        h.propose(format!("set {prefix}{i} {i}").into_bytes())
            .await
            .expect("propose");
    }
}

async fn wait_map(nodes: &BTreeMap<u64, Node>, len: usize) {
    let deadline = Instant::now() + T;
    loop {
        let maps: Vec<_> = nodes
            .values()
            .map(|n| n.view.lock().expect("kv").map.clone())
            .collect();
        if maps.iter().all(|m| m.len() == len) && maps.windows(2).all(|w| w[0] == w[1]) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "maps never converged to {len} keys"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Ensures that three nodes over gRPC elect and replicate, survive the leader's death with a
/// new leader, and that the dead node rejoins from its redb file and catches up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_cluster_fails_over_and_rejoins() {
    let dir = temp_dir("grpc");
    let mut listeners = BTreeMap::new();
    let mut peers = BTreeMap::new();
    for id in [1u64, 2, 3] {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        peers.insert(id, l.local_addr().expect("addr").to_string());
        listeners.insert(id, l);
    }
    let mut nodes = BTreeMap::new();
    for (id, l) in listeners {
        nodes.insert(id, start(id, l, &dir, &peers).await);
    }
    let first = leader(&nodes).await;
    propose_all(&nodes[&first].handle, "a", 20).await;
    wait_map(&nodes, 20).await;

    // Kill the leader: its server stops and its node releases the data directory.
    let killed_at = Instant::now();
    let dead = nodes.remove(&first).expect("leader node");
    let _ = dead.stop.send(());
    dead.handle.shutdown().await;
    let _ = dead.server.await;
    let second = leader(&nodes).await;
    assert_ne!(second, first);
    propose_all(&nodes[&second].handle, "b", 1).await;
    eprintln!(
        "failover: first commit on the new leader {:?} after the kill",
        killed_at.elapsed()
    );
    propose_all(&nodes[&second].handle, "c", 9).await;
    wait_map(&nodes, 30).await;

    // Restart the dead node on its old address, from its own file.
    let listener = TcpListener::bind(&peers[&first]).await.expect("rebind");
    nodes.insert(first, start(first, listener, &dir, &peers).await);
    wait_map(&nodes, 30).await;
    assert_eq!(
        leader(&nodes).await,
        second,
        "pre-vote: the rejoining node does not disrupt"
    );

    // A malformed message is refused with the field named.
    let mut client = RaftClient::connect(format!("http://{}", peers[&second]))
        .await
        .expect("connect");
    let err = client
        .send(RaftMessage {
            message: vec![0xff, 0xff, 0xff],
            from_address: String::new(),
        })
        .await
        .expect_err("garbage");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().starts_with("message"), "{}", err.message());

    for (_, n) in nodes {
        let _ = n.stop.send(());
        n.handle.shutdown().await;
        let _ = n.server.await;
    }
}
