//! The in-process cluster the pipeline tests drive: three workers holding uneven layer ranges
//! of SmolLM2, loaded for a plan epoch, not registered anywhere.
#![allow(dead_code)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use tessera_proto::cluster::v1 as pb;
use tessera_proto::cluster::v1::worker_client::WorkerClient;
use tessera_testkit::Driver;
use tessera_worker::{Backend, Capacity, RunningWorker, WorkerConfig};
use tonic::transport::Channel;

/// The layer ranges of the three stages.
pub const STAGES: [(u32, u32); 3] = [(0, 7), (7, 20), (20, 30)];
pub const KV_TOKENS: u32 = 4096;
pub const BLOCK_SIZE: u32 = 16;
/// Compute threads of the reference engine and of every stage.
pub const ENGINE_THREADS: u32 = 2;
/// Bound on any single RPC or step in these tests.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(120);

pub fn model() -> Option<PathBuf> {
    tessera_testkit::smollm2_gguf()
}

/// Three workers with the model loaded at `epoch`, none registered (the coordinator URL
/// points at a port nobody listens on).
pub struct Cluster {
    pub workers: Vec<RunningWorker>,
    pub model: PathBuf,
}

impl Cluster {
    /// Every stage on the CPU: bit-for-bit comparisons with the CPU engine.
    pub async fn start(model: PathBuf) -> Self {
        Self::start_on(model, [Backend::Cpu, Backend::Cpu, Backend::Cpu]).await
    }

    /// Stage `i` on `backends[i]`.
    pub async fn start_on(model: PathBuf, backends: [Backend; 3]) -> Self {
        let mut workers = Vec::new();
        for (i, backend) in backends.into_iter().enumerate() {
            let cfg = WorkerConfig {
                listen: "127.0.0.1:0".parse().expect("addr"),
                advertise: None,
                coordinator: "http://127.0.0.1:1".into(),
                capacity: Capacity {
                    memory_bytes: 0,
                    // The engine's count: flash-decoding splits keys by thread count, so
                    // stages must match the reference's threads for bitwise equality.
                    threads: ENGINE_THREADS,
                    devices: Vec::new(),
                },
                name: format!("w{i}"),
                model_home: None,
                metrics_listen: None,
                peer_listen: None,
                cluster_tls: tessera_tls::ClusterTls::insecure(),
                health_listen: None,
                connections: tessera_tls::Limits::default(),
                model_paths: tessera_worker::ModelPaths::any(),
                failpoint: None,
                backend,
            };
            workers.push(tessera_worker::start(cfg).await.expect("start worker"));
        }
        let c = Self { workers, model };
        c.load(1).await;
        c
    }

    pub fn addr(&self, i: usize) -> String {
        self.workers[i].local_addr().to_string()
    }

    pub async fn client(&self, i: usize) -> WorkerClient<Channel> {
        let url = format!("http://{}", self.addr(i));
        let ch = tokio::time::timeout(
            STEP_TIMEOUT,
            Channel::from_shared(url).expect("url").connect(),
        )
        .await
        .expect("connect in time")
        .expect("connect");
        WorkerClient::new(ch)
    }

    pub fn load_request(&self, i: usize, epoch: u64) -> pb::LoadShardRequest {
        let (start, end) = STAGES[i];
        pb::LoadShardRequest {
            plan_epoch: epoch,
            model: self.model.display().to_string(),
            shard: Some(tessera_proto::v1::ShardAssignment {
                stage: i as u32,
                tp_rank: 0,
                cp_rank: 0,
                layer_start: start,
                layer_end: end,
                embed: i == 0,
                head: i + 1 == STAGES.len(),
                ..Default::default()
            }),
            next_address: if i + 1 < STAGES.len() {
                self.addr(i + 1)
            } else {
                String::new()
            },
            kv_tokens: KV_TOKENS,
            block_size: BLOCK_SIZE,
            group: Vec::new(),
            upstream: String::new(),
            group_names: Vec::new(),
        }
    }

    pub async fn load(&self, epoch: u64) {
        for i in 0..STAGES.len() {
            let req = self.load_request(i, epoch);
            let mut c = self.client(i).await;
            let r = tokio::time::timeout(STEP_TIMEOUT, c.load_shard(req))
                .await
                .expect("load in time")
                .expect("load shard")
                .into_inner();
            assert!(r.weight_bytes > 0 && r.resident_bytes > 0, "{r:?}");
        }
    }

    /// A Pipeline stream to stage `i` for plan `epoch`.
    pub async fn open(&self, i: usize, epoch: u64) -> Driver {
        Driver::open(&mut self.client(i).await, epoch, STEP_TIMEOUT).await
    }

    /// Blocks and sequences of every stage, once all have settled to `live` sequences.
    pub async fn wait_live(&self, live: u64) -> Vec<tessera_worker::ShardStatus> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let s: Vec<_> = self.workers.iter().map(|w| w.shard().status()).collect();
            if s.iter().all(|s| s.live_sequences == live) || Instant::now() > deadline {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
