//! Steps pipelined through one stage: a real worker holding the first layers of the real
//! SmolLM2 model as stage 0, driven over its Pipeline stream with several steps in flight,
//! in front of a scripted next stage.
//!
//! The next stage is this test's own `Worker` server rather than a second real worker: what
//! is checked here is what stage 0 does while answers are *withheld* (it must read ahead and
//! forward several steps before the first answer comes, and stop at its bound), answered out
//! of turn, or cut off — states a real next stage never holds long enough, or at all, to be
//! observed. Real stages behind real stages are `pipeline.rs`'s and the coordinator's tests.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use tessera_proto::cluster::v1 as pb;
use tessera_proto::cluster::v1::worker_client::WorkerClient;
use tessera_proto::cluster::v1::worker_server::{Worker, WorkerServer};
use tessera_testkit::{Driver, seq_start};
use tessera_text::sampling::SamplingParams;
use tessera_worker::{Capacity, MAX_IN_FLIGHT, RunningWorker, WorkerConfig};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::transport::{Channel, Server};
use tonic::{Code, Request, Response, Status, Streaming};

/// Bound on anything these tests wait for.
const WAIT: Duration = Duration::from_secs(60);
/// Steps in flight in these tests.
const K: usize = 4;

/// The answers a scripted next stage sends up one stream.
type AnswerTx = mpsc::Sender<Result<pb::StepResponse, Status>>;

/// A next stage whose Pipeline streams the test drives by hand.
struct Scripted {
    streams: mpsc::UnboundedSender<(Streaming<pb::StepRequest>, AnswerTx)>,
}

#[tonic::async_trait]
impl Worker for Scripted {
    async fn load_shard(
        &self,
        _: Request<pb::LoadShardRequest>,
    ) -> Result<Response<pb::LoadShardResponse>, Status> {
        Err(Status::unimplemented("scripted stage"))
    }

    type PipelineStream = ReceiverStream<Result<pb::StepResponse, Status>>;

    async fn pipeline(
        &self,
        request: Request<Streaming<pb::StepRequest>>,
    ) -> Result<Response<Self::PipelineStream>, Status> {
        let (tx, rx) = mpsc::channel(64);
        let _ = self.streams.send((request.into_inner(), tx));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn release(
        &self,
        _: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::ReleaseResponse>, Status> {
        Err(Status::unimplemented("scripted stage"))
    }
}

/// Stage 0 (a real worker) in front of a scripted next stage.
struct Rig {
    worker: RunningWorker,
    streams: mpsc::UnboundedReceiver<(Streaming<pb::StepRequest>, AnswerTx)>,
    server: tokio::task::JoinHandle<()>,
}

impl Rig {
    async fn start(model: PathBuf) -> Self {
        let (tx, streams) = mpsc::unbounded_channel();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let next = listener.local_addr().expect("addr").to_string();
        let server = tokio::spawn(async move {
            let _ = Server::builder()
                .add_service(WorkerServer::new(Scripted { streams: tx }))
                .serve_with_incoming(TcpListenerStream::new(listener))
                .await;
        });
        let worker = tessera_worker::start(WorkerConfig {
            listen: "127.0.0.1:0".parse().expect("addr"),
            advertise: None,
            coordinator: "http://127.0.0.1:1".into(),
            capacity: Capacity {
                memory_bytes: 0,
                threads: 1,
                devices: Vec::new(),
            },
            name: "stage0".into(),
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
        })
        .await
        .expect("start worker");
        let rig = Self {
            worker,
            streams,
            server,
        };
        let req = pb::LoadShardRequest {
            plan_epoch: 1,
            model: model.display().to_string(),
            shard: Some(tessera_proto::v1::ShardAssignment {
                stage: 0,
                tp_rank: 0,
                cp_rank: 0,
                layer_start: 0,
                layer_end: 4,
                embed: true,
                head: false,
                ..Default::default()
            }),
            next_address: next,
            kv_tokens: 1024,
            block_size: 16,
            group: Vec::new(),
            upstream: String::new(),
            group_names: Vec::new(),
        };
        tokio::time::timeout(WAIT, rig.client().await.load_shard(req))
            .await
            .expect("load in time")
            .expect("load shard");
        rig
    }

    async fn client(&self) -> WorkerClient<Channel> {
        let url = format!("http://{}", self.worker.local_addr());
        WorkerClient::new(
            Channel::from_shared(url)
                .expect("url")
                .connect()
                .await
                .expect("connect"),
        )
    }

    /// A stream into stage 0, and the stream stage 0 opens to the next stage once the first
    /// step is sent (which this sends: a step of releases alone).
    async fn open(&mut self) -> (Driver, Next) {
        let mut d = Driver::open(&mut self.client().await, 1, WAIT).await;
        d.send(Vec::new(), Vec::new()).await.expect("send");
        let (inbound, answers) = tokio::time::timeout(WAIT, self.streams.recv())
            .await
            .expect("stage 0 opens its outbound stream")
            .expect("server running");
        let mut next = Next { inbound, answers };
        let first = next.step().await;
        next.answer(&first).await;
        assert_eq!(d.answer().await.expect("answer").step_id, first.step_id);
        (d, next)
    }

    /// Live sequences on stage 0 once they have settled (at most [`WAIT`]).
    async fn settle_live(&self, live: u64) -> u64 {
        let deadline = Instant::now() + WAIT;
        loop {
            let n = self.worker.shard().status().live_sequences;
            if n == live || Instant::now() > deadline {
                return n;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn stop(self) {
        self.worker.shutdown().await.expect("shutdown");
        self.server.abort();
    }
}

/// The scripted next stage's end of one stream.
struct Next {
    inbound: Streaming<pb::StepRequest>,
    answers: AnswerTx,
}

impl Next {
    /// The next step stage 0 forwards.
    async fn step(&mut self) -> pb::StepRequest {
        self.try_step(WAIT)
            .await
            .expect("stage 0 forwards a step in time")
    }

    /// The next step stage 0 forwards within `within`, if any.
    async fn try_step(&mut self, within: Duration) -> Option<pb::StepRequest> {
        tokio::time::timeout(within, self.inbound.message())
            .await
            .ok()
            .map(|m| m.expect("stream ok").expect("a step"))
    }

    /// Answers `step`: token `1000 + seq_id` for each sequence that samples.
    async fn answer(&self, step: &pb::StepRequest) {
        self.answer_as(step, step.step_id).await;
    }

    /// Answers `step` under the id `step_id`.
    async fn answer_as(&self, step: &pb::StepRequest, step_id: u64) {
        let tokens = step
            .seqs
            .iter()
            .filter(|s| s.sample)
            .map(|s| pb::SampledToken {
                seq_id: s.seq_id,
                id: 1000 + s.seq_id as u32,
                logprob: None,
                top_logprobs: Vec::new(),
            })
            .collect();
        self.answers
            .send(Ok(pb::StepResponse {
                step_id,
                tokens,
                embeddings: Vec::new(),
            }))
            .await
            .expect("stage 0 reads answers");
    }
}

/// A new sequence `id` with a short prompt of its own, sampling.
fn new_seq(id: u64) -> pb::SeqStep {
    let prompt = vec![1, 2, 3, 10 + id as u32];
    pb::SeqStep {
        seq_id: id,
        tokens: prompt.clone(),
        sample: true,
        start: Some(seq_start(&prompt, &SamplingParams::greedy())),
    }
}

/// Ensures that stage 0 takes its next steps while the next stage has not answered (K steps
/// reach the next stage before it answers any), hands each its own hidden states, and relays
/// the answers up in step order — over a second round of decode steps too — and that closing
/// the stream frees its sequences.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_reads_ahead_and_relays_answers_in_order() {
    let Some(model) = tessera_testkit::smollm2_gguf() else {
        return;
    };
    let mut rig = Rig::start(model).await;
    let (mut d, mut next) = rig.open().await;
    let mut sent = Vec::new();
    for i in 0..K as u64 {
        sent.push(d.send(vec![new_seq(i)], Vec::new()).await.expect("send"));
    }
    // All K forwarded before any answer: a stage that awaited each answer would stop at one.
    let mut forwarded = Vec::new();
    for _ in 0..K {
        forwarded.push(next.step().await);
    }
    let ids: Vec<u64> = forwarded.iter().map(|s| s.step_id).collect();
    assert_eq!(ids, sent, "forwarded in order");
    let sizes: Vec<usize> = forwarded.iter().map(|s| s.hidden.len()).collect();
    assert!(
        sizes.iter().all(|&n| n > 0 && n == sizes[0]),
        "4 tokens of hidden states each: {sizes:?}"
    );
    assert_ne!(forwarded[0].hidden, forwarded[1].hidden, "each its own");
    for s in &forwarded {
        next.answer(s).await;
    }
    for (i, &id) in sent.iter().enumerate() {
        let r = d.answer().await.expect("answer");
        assert_eq!(r.step_id, id);
        assert_eq!(r.tokens.len(), 1);
        assert_eq!(
            (r.tokens[0].seq_id, r.tokens[0].id),
            (i as u64, 1000 + i as u32)
        );
    }
    assert_eq!(rig.worker.shard().status().live_sequences, K as u64);
    // A round of decode steps, answered one by one as they arrive while the others are in
    // flight.
    let mut sent = Vec::new();
    for i in 0..K as u64 {
        let decode = pb::SeqStep {
            seq_id: i,
            tokens: vec![1000 + i as u32],
            sample: true,
            start: None,
        };
        sent.push(d.send(vec![decode], Vec::new()).await.expect("send"));
    }
    for &id in &sent {
        let s = next.step().await;
        assert_eq!(s.step_id, id);
        next.answer(&s).await;
        assert_eq!(d.answer().await.expect("answer").step_id, id);
    }
    drop(d);
    assert_eq!(rig.settle_live(0).await, 0, "closing the stream frees them");
    rig.stop().await;
}

/// Ensures that a stage holds at most MAX_IN_FLIGHT unanswered steps of a stream (it stops
/// reading the stream there, bounding its memory) and takes the next one as soon as an
/// answer frees a place, every answer still coming back in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steps_in_flight_are_bounded() {
    let Some(model) = tessera_testkit::smollm2_gguf() else {
        return;
    };
    let mut rig = Rig::start(model).await;
    let (mut d, mut next) = rig.open().await;
    let total = MAX_IN_FLIGHT + 3;
    let mut sent = Vec::new();
    for _ in 0..total {
        sent.push(d.send(Vec::new(), Vec::new()).await.expect("send"));
    }
    let mut forwarded = Vec::new();
    for _ in 0..MAX_IN_FLIGHT {
        forwarded.push(next.step().await);
    }
    assert!(
        next.try_step(Duration::from_millis(300)).await.is_none(),
        "no step beyond the bound"
    );
    next.answer(&forwarded[0]).await;
    forwarded.push(next.step().await);
    for s in &forwarded[1..] {
        next.answer(s).await;
    }
    for _ in forwarded.len()..total {
        let s = next.step().await;
        next.answer(&s).await;
    }
    for &id in &sent {
        assert_eq!(d.answer().await.expect("answer").step_id, id);
    }
    rig.stop().await;
}

/// Ensures that when the next stage ends its stream with steps in flight, the first answer
/// already given goes up and the stream then ends UNAVAILABLE within 2 s (every other step
/// in flight failing with it), freeing the stream's sequences; and that an answer for
/// another step than the oldest in flight ends a stream with INTERNAL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steps_in_flight_fail_with_the_next_stage() {
    let Some(model) = tessera_testkit::smollm2_gguf() else {
        return;
    };
    let mut rig = Rig::start(model).await;
    let (mut d, mut next) = rig.open().await;
    let mut forwarded = Vec::new();
    for i in 0..K as u64 {
        d.send(vec![new_seq(i)], Vec::new()).await.expect("send");
        forwarded.push(next.step().await);
    }
    assert_eq!(rig.worker.shard().status().live_sequences, K as u64);
    next.answer(&forwarded[0]).await;
    assert_eq!(
        d.answer().await.expect("first answer").step_id,
        forwarded[0].step_id
    );
    let t0 = Instant::now();
    drop(next);
    let err = tokio::time::timeout(Duration::from_secs(2), d.answer())
        .await
        .expect("the stream ends within 2 s")
        .expect_err("the steps in flight fail");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    eprintln!("failed after {:?}: {}", t0.elapsed(), err.message());
    assert_eq!(rig.settle_live(0).await, 0, "the failed stream frees them");

    let (mut d, mut next) = rig.open().await;
    for i in 0..2 {
        d.send(vec![new_seq(10 + i)], Vec::new())
            .await
            .expect("send");
    }
    let (a, b) = (next.step().await, next.step().await);
    next.answer_as(&b, b.step_id).await;
    let err = d.answer().await.expect_err("answered out of turn");
    assert_eq!(err.code(), Code::Internal, "{err:?}");
    assert!(
        err.message().contains(&format!(
            "answered step {} for step {}",
            b.step_id, a.step_id
        )),
        "{err:?}"
    );
    assert_eq!(rig.settle_live(0).await, 0);
    rig.stop().await;
}
