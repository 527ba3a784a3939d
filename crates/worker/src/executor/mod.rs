//! The state a shard's executor thread owns: the loaded stage of the model, its paged KV
//! cache, the live sequences, the compute pool and scratch buffers — and the two things it
//! does with them, loading a shard and running a step.
//!
//! Only the executor thread touches this; the async side talks to it through
//! [`crate::shard::ShardHandle`]. The arithmetic is the engine's own: `Llama::step`, the one
//! stage-step function the engine also calls, over this stage's layers (from token ids on the
//! first stage, hidden states elsewhere; logits of the sampling rows on the last), then
//! `Sampler::sample` as `Engine::generate` does — so a pipeline equals one process.
//!
//! A step's prefix-cache ops ([`crate::prefix`]) run first, then its releases, then its
//! sequences; a new sequence whose start names cached blocks shares them and computes only
//! the tokens after them.
//!
//! Tensor parallelism ([`crate::group`]): on a stage served by several ranks, rank 0 hands
//! each step it receives to the other ranks before running it, and every rank runs the same
//! code on the same step — so the sequence tables, KV caches and prefix stores of all ranks
//! change in step — with the group as the stage's [`Reduce`]. A rank that fails a step tells
//! the others (abort) so none waits; rank 0's stream closing frees the step's sequences on
//! every rank. Streams created by rank 0's steps are kept under [`peer_stream`] ids, apart
//! from this worker's own inbound streams.

mod check;
mod encode;
mod load;
mod model;

use std::cell::RefCell;
use std::collections::HashMap;

use std::sync::Arc;

use tessera_hub::ModelCache;
use tessera_kernels::ThreadPool;
use tessera_model::kv_cache::PagedKvCache;
use tessera_model::layers::SeqStep;
use tessera_model::stage::{
    LocalReduce, Reduce, RingCtx, StageCtx, StageInput, StageOutput, StageScratch,
};
use tessera_proto::cluster::v1 as pb;
use tessera_text::sampling::Sampler;

use crate::device::Backend;
use crate::error::WorkerError;
use crate::group::{Control, ControlSink, Group, GroupReduce, GroupRing, PeerListener};
use crate::hidden;
use crate::prefix::PrefixStores;
use crate::seqs::{SeqEntry, SeqTable, StreamId};
use crate::shard::{ShardStats, ShardStatus, StepOutput};
pub(crate) use check::sampling_params;
use check::{check_step, sampling_error};

/// The bit that marks a stream created by rank 0 of this worker's group (its stream id in the
/// low bits); this worker's own inbound streams count up from 1 and never reach it.
const PEER_STREAM: StreamId = 1 << 63;

/// The local id of rank 0's stream `stream`.
fn peer_stream(stream: u64) -> StreamId {
    PEER_STREAM | stream
}

/// Whether `stream` is one of rank 0's.
fn is_peer_stream(stream: StreamId) -> bool {
    stream & PEER_STREAM != 0
}

/// Makes the sink a group's control events go to, for a group of plan epoch `epoch`.
pub(crate) type ControlFactory = Box<dyn Fn(u64) -> ControlSink + Send>;

/// Default tokens per KV block when `LoadShardRequest.block_size` is 0.
const DEFAULT_BLOCK_SIZE: usize = 16;

/// A loaded shard.
struct Loaded {
    epoch: u64,
    model: model::StageModel,
    cache: PagedKvCache,
    /// The next stage's `host:port`; `None` on the last stage.
    next: Option<String>,
    seqs: SeqTable,
    /// Cached prompt-prefix blocks, one store per inbound stream.
    prefixes: PrefixStores,
    /// Whether this rank samples (rank 0 of the last stage).
    samples: bool,
    /// The stage's tensor-parallel group; `None` for a stage of one worker.
    group: Option<Group>,
    /// Bytes of KV cache held.
    kv_bytes: u64,
    /// Median round-trip time to the group's peers, measured at load.
    link_rtt_us: Option<u32>,
}

/// Reused buffers, grown to the largest step seen.
#[derive(Default)]
struct Scratch {
    /// Hidden states received from the previous stage, (n, hidden).
    hidden: Vec<f32>,
    /// The stage step's buffers.
    stage: StageScratch,
}

/// The executor's state.
pub(crate) struct Executor {
    loaded: Option<Loaded>,
    /// The plan epoch each inbound stream was opened for (its first step's).
    streams: HashMap<StreamId, u64>,
    pool: ThreadPool,
    scratch: Scratch,
    cache_home: Option<ModelCache>,
    memory_bytes: u64,
    stats: Arc<ShardStats>,
    /// The peer port, where the ranks of this worker's groups dial it.
    peers: Option<Arc<PeerListener>>,
    /// Where a formed group's control events go.
    control: ControlFactory,
    /// The device shards run on.
    backend: Backend,
}

impl Executor {
    /// An executor with no shard loaded; `peers` and `control` serve tensor-parallel groups;
    /// shards run on `backend`.
    pub fn new(
        pool: ThreadPool,
        cache_home: Option<ModelCache>,
        memory_bytes: u64,
        stats: Arc<ShardStats>,
        peers: Option<Arc<PeerListener>>,
        control: ControlFactory,
        backend: Backend,
    ) -> Self {
        Self {
            loaded: None,
            streams: HashMap::new(),
            pool,
            scratch: Scratch::default(),
            cache_home,
            memory_bytes,
            stats,
            peers,
            control,
            backend,
        }
    }

    /// Publishes the numbers heartbeats and tests read without asking this thread.
    fn publish(&self) {
        self.stats
            .publish(self.loaded.as_ref().map(|l| ShardStatus {
                plan_epoch: l.epoch,
                weight_bytes: l.model.weight_bytes() as u64,
                free_kv_blocks: l.cache.free_blocks() as u64,
                total_kv_blocks: l.cache.config().num_blocks as u64,
                cached_kv_blocks: l.prefixes.cached_blocks() as u64,
                live_sequences: l.seqs.len() as u64,
                kv_bytes: l.kv_bytes,
                link_rtt_us: l.link_rtt_us.unwrap_or(0),
                tp_rank: l.group.as_ref().map_or(0, |g| g.rank() as u32),
                // Cumulative counters: ShardStats keeps its own.
                tp_steps: 0,
                tp_reduce_us: 0,
                peer_bytes_sent: 0,
            }));
    }

    /// Frees sequences (out of band); unknown ids are ignored.
    pub fn release(&mut self, ids: &[u64]) {
        if let Some(l) = &mut self.loaded {
            l.seqs.release(ids);
        }
        self.publish();
    }

    /// Forgets a closed inbound stream and frees every sequence it created and its prefix
    /// store.
    pub fn close_stream(&mut self, stream: StreamId) {
        self.streams.remove(&stream);
        if let Some(l) = &mut self.loaded {
            // Rank 0's stream ended: the other ranks free what it created too.
            if let Some(g) = l.group.as_mut().filter(|g| g.rank() == 0) {
                g.close_stream(stream);
            }
            l.prefixes.close_stream(stream);
            let n = l.seqs.close_stream(stream);
            if n > 0 {
                tracing::debug!(stream, freed = n, "stream closed");
            }
        }
        self.publish();
    }

    /// Runs one step of inbound stream `stream`.
    ///
    /// # Errors
    /// FAILED_PRECONDITION (no shard, or an epoch other than the loaded one), INVALID_ARGUMENT
    /// (the step), RESOURCE_EXHAUSTED (KV cache full).
    pub fn step(
        &mut self,
        stream: StreamId,
        mut req: pb::StepRequest,
    ) -> Result<StepOutput, WorkerError> {
        if let Some(g) = self.loaded.as_mut().and_then(|l| l.group.as_mut()) {
            if g.rank() != 0 {
                return Err(WorkerError::FailedPrecondition(format!(
                    "this worker is rank {} of a tensor-parallel group; steps go to its rank 0",
                    g.rank()
                )));
            }
            // The other ranks run the step too; a step refused here is refused there alike.
            if let Err(e) = g.broadcast_step(stream, &mut req) {
                g.abort(&e.to_string());
                return Err(e);
            }
        }
        let computes = !req.seqs.is_empty();
        let out = self.step_inner(stream, req);
        let out = self.after_group_step(out, computes);
        self.publish();
        out
    }

    /// The loaded model's hidden width (what one token's hidden states hold).
    pub(crate) fn hidden_width(&self) -> Option<usize> {
        self.loaded.as_ref().map(|l| l.model.config().hidden)
    }

    /// What the loaded shard holds: live sequences, free and total KV blocks, cached prefix
    /// blocks.
    pub(crate) fn occupancy(&self) -> Option<(usize, usize, usize, usize)> {
        self.loaded.as_ref().map(|l| {
            (
                l.seqs.len(),
                l.cache.free_blocks(),
                l.cache.config().num_blocks,
                l.prefixes.cached_blocks(),
            )
        })
    }

    /// What rank 0 of this worker's group asks (see [`crate::group::Link`]); events of a
    /// group other than the loaded one are stale and ignored.
    pub fn peer_control(&mut self, epoch: u64, control: Control) {
        let ours = self
            .loaded
            .as_ref()
            .and_then(|l| l.group.as_ref())
            .is_some_and(|g| g.epoch() == epoch && g.rank() != 0);
        if !ours {
            return;
        }
        match control {
            Control::Step {
                tag,
                stream,
                request,
            } => {
                let mut request = *request;
                let mut hidden = Ok(());
                if let Some(g) = self.loaded.as_mut().and_then(|l| l.group.as_mut()) {
                    g.begin_step(tag);
                    hidden = g.receive_hidden(&mut request.hidden);
                }
                let step_id = request.step_id;
                let computes = !request.seqs.is_empty();
                let out = match hidden {
                    Ok(()) => self.step_inner(peer_stream(stream), request),
                    Err(e) => Err(e),
                };
                if let Err(e) = self.after_group_step(out, computes) {
                    tracing::warn!(step_id, error = %e, "tensor-parallel step failed");
                }
                if let Some(g) = self.loaded.as_ref().and_then(|l| l.group.as_ref()) {
                    g.end_step();
                }
                self.publish();
            }
            Control::Close { stream } => self.close_stream(peer_stream(stream)),
            Control::Down { reason } => {
                tracing::info!(%reason, "tensor-parallel group ended; freeing its sequences");
                let streams: Vec<StreamId> = self
                    .streams
                    .keys()
                    .copied()
                    .filter(|s| is_peer_stream(*s))
                    .collect();
                for s in streams {
                    self.close_stream(s);
                }
            }
        }
    }

    /// Completes a step of a tensor-parallel rank: a failure is told to the other ranks, and
    /// a failed collective reports the peer's reason (UNAVAILABLE) rather than the model's;
    /// a step that `computes` counts its time in collectives.
    fn after_group_step(
        &mut self,
        out: Result<StepOutput, WorkerError>,
        computes: bool,
    ) -> Result<StepOutput, WorkerError> {
        let Some(g) = self.loaded.as_mut().and_then(|l| l.group.as_mut()) else {
            return out;
        };
        let spent = g.take_spent();
        self.stats.add_peer_bytes(g.take_written());
        if computes && out.is_ok() {
            self.stats.add_group_step(spent);
        }
        match out {
            Ok(o) => Ok(o),
            Err(e) => {
                let e = g.take_failure().unwrap_or(e);
                g.abort(&e.to_string());
                Err(e)
            }
        }
    }

    fn step_inner(
        &mut self,
        stream: StreamId,
        mut req: pb::StepRequest,
    ) -> Result<StepOutput, WorkerError> {
        let Some(l) = &mut self.loaded else {
            return Err(WorkerError::FailedPrecondition(
                "plan_epoch: no shard is loaded on this worker".into(),
            ));
        };
        let opened = *self.streams.entry(stream).or_insert(req.plan_epoch);
        if opened != l.epoch || req.plan_epoch != l.epoch {
            return Err(WorkerError::FailedPrecondition(format!(
                "plan_epoch: step for epoch {} on a stream opened for epoch {opened}; the loaded \
                 shard is epoch {}",
                req.plan_epoch, l.epoch
            )));
        }
        if let model::StageModel::Encoder(bert) = &mut l.model {
            return encode::encode_step(
                bert,
                l.next.as_deref(),
                req,
                &mut self.scratch,
                &self.pool,
            );
        }
        let block_size = l.cache.config().block_size;
        let ring = l.group.as_ref().is_some_and(Group::is_ring);
        if ring
            && (!req.prefix_ops.is_empty()
                || req
                    .seqs
                    .iter()
                    .any(|s| s.start.as_ref().is_some_and(|st| st.cached_tokens > 0)))
        {
            // A ring rank's cache holds part of each sequence; shared prefixes hold all of one.
            return Err(WorkerError::invalid(
                "prefix_ops",
                "prefix caching does not run on a context-parallel stage",
            ));
        }
        l.prefixes
            .apply(stream, &req.prefix_ops, &mut l.seqs, &l.cache)?;
        l.seqs.release(&req.release);
        let cfg = l.model.config();
        let samples = l.samples;
        let embed = l.model.spec().embed;
        let n_tokens = check_step(&req, &l.seqs, cfg.vocab_size, cfg.context_len, block_size)?;
        let (h, vocab) = (cfg.hidden, cfg.vocab_size);
        // Validate every new sequence's sampler before any state changes.
        let mut starts = Vec::new();
        for (i, s) in req.seqs.iter().enumerate() {
            if let Some(start) = &s.start {
                let params = sampling_params(start)
                    .validate(vocab)
                    .map_err(|e| sampling_error(i, &e))?;
                starts.push((i, params));
            }
        }
        let sc = &mut self.scratch;
        if embed {
            if !req.hidden.is_empty() {
                return Err(WorkerError::invalid(
                    "hidden",
                    "the first stage embeds token ids itself; send no hidden states",
                ));
            }
        } else {
            hidden::decode_into(&req.hidden, n_tokens, h, &mut sc.hidden)?;
        }
        for (i, params) in starts {
            let s = &req.seqs[i];
            let Some(start) = &s.start else {
                continue;
            };
            let sampler = samples.then(|| Sampler::resume(params, &start.prompt, &start.generated));
            let field = format!("seqs[{i}].start");
            let kv = l.prefixes.new_seq(stream, start, &l.cache, &field)?;
            let entry = SeqEntry {
                pos: kv.len(),
                kv,
                sampler,
                stream,
            };
            if !l.seqs.insert(s.seq_id, entry) {
                return Err(WorkerError::Executor("sequence table out of sync".into()));
            }
        }
        // Take the batch's sequences out so the model can borrow each mutably.
        let mut taken: Vec<(u64, SeqEntry)> = Vec::with_capacity(req.seqs.len());
        for s in &req.seqs {
            match l.seqs.take(s.seq_id) {
                Some(e) => taken.push((s.seq_id, e)),
                None => return Err(WorkerError::Executor("sequence table out of sync".into())),
            }
        }
        let Loaded {
            model,
            cache,
            group,
            ..
        } = &mut *l;
        let stage = Stage {
            model,
            cache,
            group: group.as_mut(),
        };
        let result = run_batch(stage, &req.seqs, &mut taken, sc, &self.pool, embed);
        if result.is_ok() {
            for (s, (_, e)) in req.seqs.iter().zip(taken.iter_mut()) {
                e.pos += s.tokens.len();
            }
        }
        for (id, e) in taken {
            l.seqs.restore(id, e);
        }
        let tokens = result?;
        if let Some(next) = &l.next {
            let mut bytes = std::mem::take(&mut req.hidden);
            bytes.clear();
            hidden::encode_into(&sc.stage.x, &mut bytes);
            req.hidden = bytes;
            Ok(StepOutput::Forward {
                next: next.clone(),
                request: req,
            })
        } else {
            Ok(StepOutput::Answer(pb::StepResponse {
                step_id: req.step_id,
                tokens,
                embeddings: Vec::new(),
            }))
        }
    }
}

/// What a step runs on: the loaded model, its cache and its group (none for a stage of one
/// worker), borrowed apart from the sequence table.
struct Stage<'a> {
    model: &'a mut model::StageModel,
    cache: &'a mut PagedKvCache,
    group: Option<&'a mut Group>,
}

/// The stage step over one batch (sequences already taken out of the table, in batch order);
/// on the last stage, sampling for the sequences that sample. The next stage's hidden states
/// are left in `sc.stage.x`.
fn run_batch(
    l: Stage<'_>,
    seqs: &[pb::SeqStep],
    taken: &mut [(u64, SeqEntry)],
    sc: &mut Scratch,
    pool: &ThreadPool,
    embed: bool,
) -> Result<Vec<pb::SampledToken>, WorkerError> {
    if seqs.is_empty() {
        sc.stage.x.clear();
        return Ok(Vec::new());
    }
    let starts: Vec<usize> = taken.iter().map(|(_, e)| e.pos).collect();
    let mut batch: Vec<SeqStep<'_>> = seqs
        .iter()
        .zip(taken.iter_mut())
        .map(|(s, (_, e))| SeqStep {
            tokens: &s.tokens,
            seq: &mut e.kv,
            logits: s.sample,
        })
        .collect();
    let input = if embed {
        StageInput::Tokens
    } else {
        StageInput::Hidden(&sc.hidden)
    };
    // The group is both the tensor-parallel reduction (within its row) and the ring (within
    // its column); the two views share it.
    let ringed = l.group.as_ref().is_some_and(|g| g.is_ring());
    let cell = l.group.map(RefCell::new);
    let mut local = LocalReduce;
    let (mut g_reduce, mut g_ring) = (
        cell.as_ref().map(GroupReduce),
        cell.as_ref().filter(|_| ringed).map(GroupRing),
    );
    let reduce: &mut dyn Reduce = match g_reduce.as_mut() {
        Some(r) => r,
        None => &mut local,
    };
    let mut ctx = StageCtx {
        cache: l.cache,
        pool,
        reduce,
        ring: g_ring.as_mut().map(|r| RingCtx {
            comm: r,
            starts: &starts,
        }),
    };
    let out = l.model.step(&mut batch, input, &mut ctx, &mut sc.stage)?;
    drop(batch);
    let StageOutput::Logits(logits) = out else {
        return Ok(Vec::new());
    };
    let vocab = l.model.config().vocab_size;
    let mut out = Vec::new();
    let mut rows = logits.chunks_exact_mut(vocab);
    for (s, (id, e)) in seqs.iter().zip(taken.iter_mut()) {
        if !s.sample {
            continue;
        }
        let (Some(sampler), Some(row)) = (e.sampler.as_mut(), rows.next()) else {
            return Err(WorkerError::Executor(format!(
                "sequence {id} has no sampler or no logits row"
            )));
        };
        let t = sampler.sample(row);
        out.push(tessera_proto::wire::sampled_token(*id, t));
    }
    Ok(out)
}
