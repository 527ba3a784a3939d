//! The shard handle: a cloneable front for the dedicated OS thread that owns the loaded stage
//! of the model and runs every step ([`crate::executor`]).
//!
//! Tokio threads never compute: they send a command over a channel and await a one-shot
//! reply. What heartbeats, metrics and tests need (epoch, weight bytes, free KV blocks) is
//! published in atomics after every command, so reading it never waits behind a running step.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::Instant;

use tessera_hub::ModelCache;
use tessera_kernels::ThreadPool;
use tessera_proto::cluster::v1 as pb;
use tokio::sync::oneshot;

use crate::error::WorkerError;
use crate::executor::Executor;
use crate::group::{Control, ControlSink, PeerListener};
use crate::metrics::WorkerMetrics;
use crate::seqs::StreamId;

/// What a step produced on this stage.
#[derive(Debug)]
pub(crate) enum StepOutput {
    /// Not the last stage: this request (hidden states replaced by this stage's output) goes
    /// to `next`.
    Forward {
        /// The next stage's `host:port`.
        next: String,
        /// The step to send it.
        request: pb::StepRequest,
    },
    /// The last stage: the sampled tokens.
    Answer(pb::StepResponse),
}

/// A request to the executor thread.
enum Command {
    Load(
        Box<pb::LoadShardRequest>,
        oneshot::Sender<Result<pb::LoadShardResponse, WorkerError>>,
    ),
    Step(
        StreamId,
        Box<pb::StepRequest>,
        tracing::Span,
        oneshot::Sender<Result<StepOutput, WorkerError>>,
    ),
    Release(Vec<u64>, oneshot::Sender<()>),
    /// Answers at once: the executor takes commands again.
    Ping(oneshot::Sender<()>),
    CloseStream(StreamId),
    /// From rank 0 of the tensor-parallel group of plan epoch `.0`.
    Peer(u64, Control),
    /// The last handle is gone: stop the thread.
    Stop,
}

/// Stops the executor thread when the last [`ShardHandle`] drops. The thread cannot rely on
/// its channel closing: the shard's own group reader threads hold senders too.
#[derive(Debug)]
struct StopOnDrop(mpsc::Sender<Command>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        // An executor that already stopped needs no telling.
        let _ = self.0.send(Command::Stop);
    }
}

/// The shard's state as last published by the executor.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShardStatus {
    /// Plan epoch of the loaded shard; 0 when none is loaded.
    pub plan_epoch: u64,
    /// Bytes of model weights held.
    pub weight_bytes: u64,
    /// KV cache blocks not held by any sequence.
    pub free_kv_blocks: u64,
    /// KV cache blocks in all.
    pub total_kv_blocks: u64,
    /// KV cache blocks held by the prefix cache (cached prompt prefixes; a block a live
    /// sequence shares counts here too). With no live sequence, exactly the blocks in use.
    pub cached_kv_blocks: u64,
    /// Sequences live on this stage.
    pub live_sequences: u64,
    /// Bytes of KV cache the shard holds.
    pub kv_bytes: u64,
    /// Median round-trip time to the tensor-parallel group's peers, in µs (0 = none).
    pub link_rtt_us: u32,
    /// This worker's rank in its stage's tensor-parallel group.
    pub tp_rank: u32,
    /// Steps computed as a rank of a tensor-parallel group, since the process started.
    pub tp_steps: u64,
    /// Microseconds those steps spent in the group's reductions and logits gathers.
    pub tp_reduce_us: u64,
    /// Bytes written to the stage group's peers since the process started.
    pub peer_bytes_sent: u64,
}

impl ShardStatus {
    /// Bytes of the KV cache in use: its blocks not free, at the cache's bytes per block.
    pub fn kv_used_bytes(&self) -> u64 {
        let used = self.total_kv_blocks.saturating_sub(self.free_kv_blocks);
        match self.kv_bytes.checked_div(self.total_kv_blocks) {
            Some(per_block) => used * per_block,
            None => 0,
        }
    }
}

/// Atomics the executor writes after every command.
#[derive(Debug, Default)]
pub(crate) struct ShardStats {
    plan_epoch: AtomicU64,
    weight_bytes: AtomicU64,
    free_kv_blocks: AtomicU64,
    total_kv_blocks: AtomicU64,
    cached_kv_blocks: AtomicU64,
    live_sequences: AtomicU64,
    kv_bytes: AtomicU64,
    link_rtt_us: AtomicU64,
    tp_rank: AtomicU64,
    /// Cumulative, added to by [`ShardStats::add_group_step`]; `publish` leaves them alone.
    tp_steps: AtomicU64,
    tp_reduce_us: AtomicU64,
    peer_bytes_sent: AtomicU64,
    /// When the step being computed began, in µs after [`ShardStats::origin`] plus one; 0
    /// between steps. Written by the executor thread around each step with tokens.
    step_began_us: AtomicU64,
    /// The clock `step_began_us` counts from.
    origin: OnceInstant,
}

/// An `Instant` fixed at creation (a `Default` for [`ShardStats`]).
#[derive(Debug)]
struct OnceInstant(Instant);

impl Default for OnceInstant {
    fn default() -> Self {
        Self(Instant::now())
    }
}

impl ShardStats {
    /// Records the loaded shard's state, or nothing loaded (all zero).
    pub fn publish(&self, v: Option<ShardStatus>) {
        let v = v.unwrap_or_default();
        self.plan_epoch.store(v.plan_epoch, Ordering::Relaxed);
        self.weight_bytes.store(v.weight_bytes, Ordering::Relaxed);
        self.free_kv_blocks
            .store(v.free_kv_blocks, Ordering::Relaxed);
        self.total_kv_blocks
            .store(v.total_kv_blocks, Ordering::Relaxed);
        self.cached_kv_blocks
            .store(v.cached_kv_blocks, Ordering::Relaxed);
        self.kv_bytes.store(v.kv_bytes, Ordering::Relaxed);
        self.link_rtt_us
            .store(u64::from(v.link_rtt_us), Ordering::Relaxed);
        self.tp_rank.store(u64::from(v.tp_rank), Ordering::Relaxed);
        // Last, with Release: a reader that sees it sees the rest of this publication.
        self.live_sequences
            .store(v.live_sequences, Ordering::Release);
    }

    fn read(&self) -> ShardStatus {
        let live_sequences = self.live_sequences.load(Ordering::Acquire);
        ShardStatus {
            plan_epoch: self.plan_epoch.load(Ordering::Relaxed),
            weight_bytes: self.weight_bytes.load(Ordering::Relaxed),
            free_kv_blocks: self.free_kv_blocks.load(Ordering::Relaxed),
            total_kv_blocks: self.total_kv_blocks.load(Ordering::Relaxed),
            cached_kv_blocks: self.cached_kv_blocks.load(Ordering::Relaxed),
            live_sequences,
            kv_bytes: self.kv_bytes.load(Ordering::Relaxed),
            link_rtt_us: self.link_rtt_us.load(Ordering::Relaxed) as u32,
            tp_rank: self.tp_rank.load(Ordering::Relaxed) as u32,
            tp_steps: self.tp_steps.load(Ordering::Relaxed),
            tp_reduce_us: self.tp_reduce_us.load(Ordering::Relaxed),
            peer_bytes_sent: self.peer_bytes_sent.load(Ordering::Relaxed),
        }
    }

    /// Microseconds since [`ShardStats::origin`].
    fn now_us(&self) -> u64 {
        u64::try_from(self.origin.0.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    /// Marks a step with tokens begun (`true`) or ended.
    fn step_busy(&self, busy: bool) {
        let v = if busy {
            self.now_us().saturating_add(1)
        } else {
            0
        };
        self.step_began_us.store(v, Ordering::Relaxed);
    }

    /// How long the executor has been computing its current step, in ms (0 between steps).
    pub fn step_busy_ms(&self) -> u64 {
        match self.step_began_us.load(Ordering::Relaxed) {
            0 => 0,
            began => self.now_us().saturating_sub(began - 1) / 1000,
        }
    }

    /// Counts `bytes` written to the group's peers.
    pub fn add_peer_bytes(&self, bytes: u64) {
        self.peer_bytes_sent.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Counts one step computed in a tensor-parallel group that spent `spent` in collectives.
    pub fn add_group_step(&self, spent: std::time::Duration) {
        self.tp_steps.fetch_add(1, Ordering::Relaxed);
        self.tp_reduce_us.fetch_add(
            u64::try_from(spent.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }
}

/// What the executor thread does around every step, pipeline or tensor-parallel peer: marks
/// it busy for the heartbeats' `step_busy_ms`, passes the failpoint, and counts a step with
/// tokens that succeeded in the metrics (a step of releases alone is bookkeeping, not model
/// work, and is neither timed nor counted: the coordinator does not count it either).
struct StepRunner {
    stats: Arc<ShardStats>,
    metrics: Arc<WorkerMetrics>,
    armed: crate::failpoint::Armed,
}

impl StepRunner {
    /// Runs `step`, which carries `tokens` tokens; `succeeded` says whether its output counts.
    fn run<T>(
        &mut self,
        tokens: usize,
        step: impl FnOnce() -> T,
        succeeded: impl FnOnce(&T) -> bool,
    ) -> T {
        let started = Instant::now();
        self.stats.step_busy(tokens > 0);
        self.armed.on_step(tokens);
        let out = step();
        self.stats.step_busy(false);
        if tokens > 0 && succeeded(&out) {
            self.metrics
                .step(tokens as u64, started.elapsed().as_secs_f64());
        }
        out
    }
}

/// A cloneable handle to the shard executor thread. The thread ends when the last handle is
/// dropped.
#[derive(Clone, Debug)]
pub struct ShardHandle {
    tx: mpsc::Sender<Command>,
    _stop: Arc<StopOnDrop>,
    stats: Arc<ShardStats>,
    metrics: Arc<WorkerMetrics>,
    next_stream: Arc<AtomicU64>,
    /// Streams from [`ShardHandle::new_stream`] not yet closed.
    open_streams: Arc<AtomicUsize>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Load(..) => "Load",
            Self::Step(..) => "Step",
            Self::Release(..) => "Release",
            Self::Ping(..) => "Ping",
            Self::CloseStream(..) => "CloseStream",
            Self::Peer(..) => "Peer",
            Self::Stop => "Stop",
        })
    }
}

impl ShardHandle {
    /// Starts the executor thread with `threads` compute threads (0 = one per core), its
    /// shards on `backend`.
    ///
    /// # Errors
    /// [`WorkerError::Executor`] when the thread or its compute pool cannot start.
    pub(crate) fn spawn(
        threads: usize,
        cache_home: Option<ModelCache>,
        memory_bytes: u64,
        peers: Option<Arc<PeerListener>>,
        failpoint: Option<crate::Failpoint>,
        backend: crate::Backend,
    ) -> Result<Self, WorkerError> {
        let pool = ThreadPool::new(threads).map_err(|e| WorkerError::Executor(e.to_string()))?;
        let stats = Arc::new(ShardStats::default());
        let metrics = Arc::new(WorkerMetrics::new(&backend));
        let (tx, rx) = mpsc::channel();
        // A group's reader threads queue rank 0's steps behind every other command, so the
        // executor stays the one place that touches the shard.
        let peer_tx = std::sync::Mutex::new(tx.clone());
        let control = Box::new(move |epoch: u64| -> ControlSink {
            let tx = peer_tx
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone();
            let tx = std::sync::Mutex::new(tx);
            Arc::new(move |c| {
                // The executor stopped: the worker is going away, nothing to deliver to.
                let _ = tx
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .send(Command::Peer(epoch, c));
            })
        });
        let mut runner = StepRunner {
            stats: Arc::clone(&stats),
            metrics: Arc::clone(&metrics),
            armed: crate::failpoint::Armed::new(failpoint),
        };
        let mut exec = Executor::new(
            pool,
            cache_home,
            memory_bytes,
            Arc::clone(&stats),
            peers,
            control,
            backend,
        );
        std::thread::Builder::new()
            .name("tessera-shard".into())
            .spawn(move || {
                while let Ok(cmd) = rx.recv() {
                    // A dropped reply means the caller gave up (its stream ended); the work
                    // is done either way.
                    match cmd {
                        Command::Load(req, reply) => {
                            let _ = reply.send(exec.load(*req));
                        }
                        Command::Step(stream, req, span, reply) => {
                            let _in_span = span.enter();
                            let tokens: usize = req.seqs.iter().map(|s| s.tokens.len()).sum();
                            let out = runner.run(tokens, || exec.step(stream, *req), Result::is_ok);
                            let _ = reply.send(out);
                        }
                        Command::Release(ids, reply) => {
                            exec.release(&ids);
                            let _ = reply.send(());
                        }
                        Command::Ping(reply) => {
                            let _ = reply.send(());
                        }
                        Command::CloseStream(stream) => exec.close_stream(stream),
                        Command::Stop => break,
                        Command::Peer(epoch, control) => {
                            let tokens = match &control {
                                Control::Step { request, .. } => {
                                    request.seqs.iter().map(|s| s.tokens.len()).sum()
                                }
                                _ => 0,
                            };
                            runner.run(tokens, || exec.peer_control(epoch, control), |()| true);
                        }
                    }
                }
                tracing::debug!("shard executor stopped");
            })
            .map_err(|e| WorkerError::Executor(e.to_string()))?;
        Ok(Self {
            _stop: Arc::new(StopOnDrop(tx.clone())),
            tx,
            stats,
            metrics,
            next_stream: Arc::new(AtomicU64::new(1)),
            open_streams: Arc::new(AtomicUsize::new(0)),
        })
    }

    fn send(&self, cmd: Command) -> Result<(), WorkerError> {
        self.tx
            .send(cmd)
            .map_err(|_| WorkerError::Executor("the executor thread has stopped".into()))
    }

    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, WorkerError> {
        let (tx, rx) = oneshot::channel();
        self.send(make(tx))?;
        rx.await
            .map_err(|_| WorkerError::Executor("the executor thread stopped mid-command".into()))
    }

    /// How long the executor has been on its current step, in ms (0 between steps); never
    /// waits.
    pub fn step_busy_ms(&self) -> u64 {
        self.stats.step_busy_ms()
    }

    /// Resolves once the executor has taken a command: it is not stuck in a step.
    ///
    /// # Errors
    /// [`WorkerError::Executor`] when the executor has stopped.
    pub(crate) async fn ping(&self) -> Result<(), WorkerError> {
        self.ask(Command::Ping).await
    }

    /// The shard's state as last published (never waits for a running step).
    pub fn status(&self) -> ShardStatus {
        self.stats.read()
    }

    /// Loads (or replaces) the shard.
    ///
    /// # Errors
    /// As the `LoadShard` RPC: INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED.
    pub(crate) async fn load(
        &self,
        req: pb::LoadShardRequest,
    ) -> Result<pb::LoadShardResponse, WorkerError> {
        self.ask(|tx| Command::Load(Box::new(req), tx)).await?
    }

    /// A fresh id for an inbound stream.
    pub(crate) fn new_stream(&self) -> StreamId {
        self.open_streams.fetch_add(1, Ordering::SeqCst);
        self.next_stream.fetch_add(1, Ordering::Relaxed)
    }

    /// Inbound pipeline streams open now (a drain waits for 0).
    pub fn open_streams(&self) -> usize {
        self.open_streams.load(Ordering::SeqCst)
    }

    /// The Prometheus text exposition of this worker's metrics, as of now.
    pub fn metrics_text(&self) -> String {
        self.metrics
            .render(self.status(), crate::memory::resident_bytes())
    }

    /// Runs one step of `stream`; the executor computes it inside a `compute` span, a child
    /// of the current one (none for a step of releases alone, which computes nothing).
    ///
    /// # Errors
    /// As the executor's step.
    pub(crate) async fn step(
        &self,
        stream: StreamId,
        req: pb::StepRequest,
    ) -> Result<StepOutput, WorkerError> {
        let span = if req.seqs.is_empty() {
            tracing::Span::none()
        } else {
            tracing::info_span!("compute")
        };
        self.ask(|tx| Command::Step(stream, Box::new(req), span, tx))
            .await?
    }

    /// Frees sequences on this stage.
    ///
    /// # Errors
    /// [`WorkerError::Executor`] when the executor has stopped.
    pub(crate) async fn release(&self, ids: Vec<u64>) -> Result<(), WorkerError> {
        self.ask(|tx| Command::Release(ids, tx)).await
    }

    /// Frees every sequence `stream` created; does not wait.
    pub(crate) fn close_stream(&self, stream: StreamId) {
        self.open_streams.fetch_sub(1, Ordering::SeqCst);
        // An executor that stopped has freed everything already.
        let _ = self.send(Command::CloseStream(stream));
    }
}
