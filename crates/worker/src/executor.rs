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

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use tessera_format::open_weights;
use tessera_hub::{self, ModelCache};
use tessera_kernels::ThreadPool;
use tessera_model::ModelError;
use tessera_model::kv_cache::{KvCacheConfig, PagedKvCache};
use tessera_model::layers::SeqStep;
use tessera_model::llama::{Llama, LoadSpec};
use tessera_model::stage::{
    LocalReduce, SeqSlice, StageCtx, StageInput, StageOutput, StageScratch,
};
use tessera_proto::cluster::v1 as pb;
use tessera_text::sampling::{Sampler, SamplingParams};

use crate::error::WorkerError;
use crate::hidden;
use crate::memory::resident_bytes;
use crate::prefix::PrefixStores;
use crate::seqs::{SeqEntry, SeqTable, StreamId};
use crate::shard::{ShardStats, ShardStatus, StepOutput};

/// Default tokens per KV block when `LoadShardRequest.block_size` is 0.
const DEFAULT_BLOCK_SIZE: usize = 16;

/// A loaded shard.
struct Loaded {
    epoch: u64,
    model: Llama,
    cache: PagedKvCache,
    /// The next stage's `host:port`; `None` on the last stage.
    next: Option<String>,
    seqs: SeqTable,
    /// Cached prompt-prefix blocks, one store per inbound stream.
    prefixes: PrefixStores,
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
    stats: std::sync::Arc<ShardStats>,
}

impl Executor {
    /// An executor with no shard loaded.
    pub fn new(
        pool: ThreadPool,
        cache_home: Option<ModelCache>,
        memory_bytes: u64,
        stats: std::sync::Arc<ShardStats>,
    ) -> Self {
        Self {
            loaded: None,
            streams: HashMap::new(),
            pool,
            scratch: Scratch::default(),
            cache_home,
            memory_bytes,
            stats,
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
            }));
    }

    /// Loads (or replaces) the shard. A request that fails validation leaves the previous
    /// shard in place; otherwise the previous shard and all its sequences are dropped before
    /// the new one loads.
    ///
    /// # Errors
    /// INVALID_ARGUMENT for a malformed request or a shard the model does not have; NOT_FOUND
    /// for an unknown model; RESOURCE_EXHAUSTED when weights and KV exceed declared memory.
    pub fn load(
        &mut self,
        req: pb::LoadShardRequest,
    ) -> Result<pb::LoadShardResponse, WorkerError> {
        let start = Instant::now();
        let shard = req
            .shard
            .ok_or_else(|| WorkerError::invalid("shard", "missing"))?;
        if req.model.is_empty() {
            return Err(WorkerError::invalid("model", "empty"));
        }
        if req.plan_epoch == 0 {
            return Err(WorkerError::invalid(
                "plan_epoch",
                "must be >= 1 (0 means none)",
            ));
        }
        if !shard.head && req.next_address.is_empty() {
            return Err(WorkerError::invalid(
                "next_address",
                "required on every stage but the last (shard.head = false)",
            ));
        }
        let (start_l, end_l) = (shard.layer_start as usize, shard.layer_end as usize);
        if start_l >= end_l {
            return Err(WorkerError::invalid(
                "shard.layer_start",
                format!("layer range {start_l}..{end_l} is empty"),
            ));
        }
        let cache_home = match &self.cache_home {
            Some(c) => c.clone(),
            None => {
                ModelCache::from_env().map_err(|e| WorkerError::ModelNotFound(e.to_string()))?
            }
        };
        let location = tessera_hub::resolve(&req.model, &cache_home)
            .map_err(|e| WorkerError::ModelNotFound(e.to_string()))?;
        let (store, cfg) = open_weights(&location).map_err(ModelError::from)?;
        if end_l > cfg.n_layers {
            return Err(WorkerError::invalid(
                "shard.layer_end",
                format!("{end_l} is past the model's {} layers", cfg.n_layers),
            ));
        }
        let block_size = match req.block_size {
            0 => DEFAULT_BLOCK_SIZE,
            b => b as usize,
        };
        let kv_tokens = match req.kv_tokens {
            0 => cfg.context_len,
            t => t as usize,
        };
        let num_blocks = kv_tokens.div_ceil(block_size);
        let kv_bytes = 2 * (end_l - start_l) * num_blocks * block_size * cfg.kv_dim() * 4;
        let span = tracing::info_span!(
            "load_shard",
            epoch = req.plan_epoch,
            model = %req.model,
            layers = ?(start_l..end_l),
            embed = shard.embed,
            head = shard.head
        );
        let _g = span.enter();
        // The request is sound: drop the old shard (and its sequences) before loading the
        // new one, so the two never sit in memory together.
        self.loaded = None;
        self.publish();
        let spec = LoadSpec::stage(&cfg, start_l..end_l, shard.embed, shard.head);
        let model = Llama::load(store.as_ref(), &cfg, spec, &mut |done, total| {
            tracing::debug!(done, total, "loading shard");
        })?;
        let weight_bytes = model.weight_bytes();
        if self.memory_bytes > 0 && (weight_bytes + kv_bytes) as u64 > self.memory_bytes {
            return Err(WorkerError::ResourceExhausted(format!(
                "shard needs {weight_bytes} bytes of weights and {kv_bytes} of KV cache; this \
                 worker declared {} bytes",
                self.memory_bytes
            )));
        }
        // The cache is indexed by global layer (as `Llama::step` writes it); the
        // pools of layers below `layer_start` are never touched, so the OS never backs them.
        let cache = PagedKvCache::new(KvCacheConfig {
            n_layers: end_l,
            n_kv_heads: cfg.n_kv_heads,
            head_dim: cfg.head_dim,
            block_size,
            num_blocks,
        })
        .map_err(|e| WorkerError::invalid("kv_tokens", e.to_string()))?;
        self.loaded = Some(Loaded {
            epoch: req.plan_epoch,
            model,
            cache,
            next: (!shard.head).then_some(req.next_address),
            seqs: SeqTable::default(),
            prefixes: PrefixStores::default(),
        });
        self.publish();
        let load_ms = start.elapsed().as_secs_f64() * 1e3;
        tracing::info!(weight_bytes, kv_bytes, load_ms, "shard loaded");
        Ok(pb::LoadShardResponse {
            weight_bytes: weight_bytes as u64,
            resident_bytes: resident_bytes(),
            load_ms,
        })
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
        req: pb::StepRequest,
    ) -> Result<StepOutput, WorkerError> {
        let out = self.step_inner(stream, req);
        self.publish();
        out
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
        let block_size = l.cache.config().block_size;
        l.prefixes
            .apply(stream, &req.prefix_ops, &mut l.seqs, &l.cache)?;
        l.seqs.release(&req.release);
        let cfg = l.model.config();
        let head = l.model.spec().head;
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
            let sampler = head.then(|| Sampler::new(params, &start.prompt));
            let field = format!("seqs[{i}].start");
            let entry = SeqEntry {
                kv: l.prefixes.new_seq(stream, start, &l.cache, &field)?,
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
        let result = run_batch(l, &req.seqs, &mut taken, sc, &self.pool, embed);
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
            }))
        }
    }
}

/// The stage step over one batch (sequences already taken out of the table, in batch order);
/// on the last stage, sampling for the sequences that sample. The next stage's hidden states
/// are left in `sc.stage.x`.
fn run_batch(
    l: &mut Loaded,
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
    let mut ctx = StageCtx {
        cache: &mut l.cache,
        pool,
        seq_slice: SeqSlice::WHOLE,
        reduce: &mut LocalReduce,
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

/// Checks a step against the live sequences before anything changes (but after its prefix
/// ops and releases); returns its token count.
fn check_step(
    req: &pb::StepRequest,
    seqs: &SeqTable,
    vocab: usize,
    context: usize,
    block_size: usize,
) -> Result<usize, WorkerError> {
    let mut seen = HashSet::with_capacity(req.seqs.len());
    let mut n = 0;
    for (i, s) in req.seqs.iter().enumerate() {
        if !seen.insert(s.seq_id) {
            return Err(WorkerError::invalid(
                format!("seqs[{i}].seq_id"),
                format!("sequence {} appears twice in the step", s.seq_id),
            ));
        }
        let live = seqs.contains(s.seq_id);
        match (&s.start, live) {
            (Some(_), true) => {
                return Err(WorkerError::invalid(
                    format!("seqs[{i}].start"),
                    format!("sequence {} is already live", s.seq_id),
                ));
            }
            (None, false) => {
                return Err(WorkerError::invalid(
                    format!("seqs[{i}].seq_id"),
                    format!(
                        "unknown sequence {} (a sequence's first step must carry start)",
                        s.seq_id
                    ),
                ));
            }
            _ => {}
        }
        if s.tokens.is_empty() {
            return Err(WorkerError::invalid(format!("seqs[{i}].tokens"), "empty"));
        }
        if let Some(t) = s.tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(WorkerError::invalid(
                format!("seqs[{i}].tokens"),
                format!("token id {t} is outside the vocabulary of {vocab}"),
            ));
        }
        let cached = s.start.as_ref().map_or(0, |st| st.cached_tokens as usize);
        if let Some(st) = &s.start
            && cached != st.cached_blocks.len() * block_size
        {
            return Err(WorkerError::invalid(
                format!("seqs[{i}].start.cached_tokens"),
                format!(
                    "{cached} is not the {} cached blocks of {block_size} tokens",
                    st.cached_blocks.len()
                ),
            ));
        }
        if s.tokens.len() + cached > context {
            return Err(WorkerError::invalid(
                format!("seqs[{i}].tokens"),
                format!(
                    "{} tokens after {cached} cached exceed the context of {context}",
                    s.tokens.len()
                ),
            ));
        }
        n += s.tokens.len();
    }
    Ok(n)
}

/// The engine's sampling parameters for a sequence, as the proto states them (unset fields
/// take the documented defaults; the seed is always the coordinator's).
pub(crate) fn sampling_params(start: &pb::SeqStart) -> SamplingParams {
    tessera_proto::wire::sampling_params(
        start.sampling,
        start.seed,
        start.logprobs,
        start.top_logprobs,
    )
}

/// An invalid sampling field of `seqs[i]`, named by its proto path.
fn sampling_error(i: usize, e: &tessera_text::sampling::SamplingError) -> WorkerError {
    let field = e.field_name();
    let path = match field {
        "logprobs" | "top_logprobs" => format!("seqs[{i}].start.{field}"),
        _ => format!("seqs[{i}].start.sampling.{field}"),
    };
    let tessera_text::sampling::SamplingError::InvalidField { reason, .. } = e;
    WorkerError::invalid(path, reason.clone())
}
