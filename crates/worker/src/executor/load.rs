//! Loading a shard: checking the request, forming the tensor-parallel group when the stage
//! has several ranks, loading this rank's slice of the stage and sizing its KV cache.
//!
//! The group forms before any weight loads: every rank of a plan gets its `LoadShard` at about
//! the same time, and dialling first means a rank that cannot be reached fails the load in
//! seconds, not after minutes of loading.

use std::ops::Range;
use std::time::{Duration, Instant};

use tessera_format::{ModelConfig, open_weights};
use tessera_hub::{self, ModelCache};
use tessera_model::ModelError;
use tessera_model::kv_cache::KvCacheConfig;
use tessera_model::llama::LoadSpec;
use tessera_model::stage::TensorSlice;
use tessera_proto::cluster::v1 as pb;
use tessera_proto::v1::ShardAssignment;

use super::model::StageModel;
use super::{DEFAULT_BLOCK_SIZE, Executor, Loaded};
use crate::error::WorkerError;
use crate::group::{Group, PeerTls, check_names, probe_rtt};
use crate::memory::resident_bytes;
use crate::prefix::PrefixStores;
use crate::seqs::SeqTable;

/// Pings per peer when measuring the group's link latency.
const RTT_PROBES: usize = 5;

/// A `[start, end)` field pair of the assignment as a range of `0..whole`: both 0 means all.
fn range_field(
    field: &str,
    start: u32,
    end: u32,
    whole: usize,
) -> Result<Range<usize>, WorkerError> {
    let (start, end) = (start as usize, end as usize);
    if start == 0 && end == 0 {
        return Ok(0..whole);
    }
    if start >= end || end > whole {
        return Err(WorkerError::invalid(
            format!("shard.{field}_start"),
            format!("{start}..{end} is not a non-empty range within 0..{whole}"),
        ));
    }
    Ok(start..end)
}

/// The model slice a shard assignment names.
fn tensor_slice(shard: &ShardAssignment, cfg: &ModelConfig) -> Result<TensorSlice, WorkerError> {
    let ranks = shard.tp_ranks.max(1) as usize;
    let rank = shard.tp_rank as usize;
    if rank >= ranks {
        return Err(WorkerError::invalid(
            "shard.tp_rank",
            format!("rank {rank} of a group of {ranks}"),
        ));
    }
    let slice = TensorSlice {
        rank,
        ranks,
        kv_heads: range_field(
            "kv_head",
            shard.kv_head_start,
            shard.kv_head_end,
            cfg.n_kv_heads,
        )?,
        ffn: range_field("ffn", shard.ffn_start, shard.ffn_end, cfg.intermediate)?,
        vocab: range_field("vocab", shard.vocab_start, shard.vocab_end, cfg.vocab_size)?,
    };
    slice.check(cfg).map_err(|e| match e {
        ModelError::InvalidArgument { field, reason } => {
            WorkerError::invalid(format!("shard.{field}"), reason)
        }
        other => WorkerError::Model(other),
    })?;
    Ok(slice)
}

impl Executor {
    /// Loads (or replaces) the shard. A request that fails validation leaves the previous
    /// shard in place; otherwise the previous shard and all its sequences are dropped before
    /// the new one loads.
    ///
    /// # Errors
    /// INVALID_ARGUMENT for a malformed request or a shard the model does not have; NOT_FOUND
    /// for an unknown model; RESOURCE_EXHAUSTED when weights and KV exceed declared memory;
    /// UNAVAILABLE when a rank of its tensor-parallel group cannot be reached.
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
        let tp_ranks = shard.tp_ranks.max(1) as usize;
        let cp_ranks = shard.cp_ranks.max(1) as usize;
        if shard.cp_rank as usize >= cp_ranks {
            return Err(WorkerError::invalid(
                "shard.cp_rank",
                format!("rank {} of a ring of {cp_ranks}", shard.cp_rank),
            ));
        }
        let ranks = tp_ranks * cp_ranks;
        // This worker's index in its stage's group.
        let group_rank = shard.cp_rank as usize * tp_ranks + shard.tp_rank as usize;
        let in_pipeline = group_rank == 0;
        if in_pipeline && !shard.head && req.next_address.is_empty() {
            return Err(WorkerError::invalid(
                "next_address",
                "required on rank 0 of every stage but the last (shard.head = false)",
            ));
        }
        if ranks > 1 && req.group.len() != ranks {
            return Err(WorkerError::invalid(
                "group",
                format!(
                    "{} peer addresses for a group of {tp_ranks} tensor-parallel × \
                     {cp_ranks} context-parallel ranks",
                    req.group.len()
                ),
            ));
        }
        if ranks > 1
            && let Some(listener) = &self.peers
        {
            check_names(listener.tls(), &req.group_names, ranks)?;
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
        let slice = tensor_slice(&shard, &cfg)?;
        let block_size = match req.block_size {
            0 => DEFAULT_BLOCK_SIZE,
            b => b as usize,
        };
        let kv_tokens = match req.kv_tokens {
            0 => cfg.context_len,
            t => t as usize,
        };
        let num_blocks = kv_tokens.div_ceil(block_size);
        // Only this rank's KV heads are cached.
        let kv_heads = slice.kv_heads.len();
        // An encoder keeps no KV (its cache is a table without storage).
        let kv_bytes = if cfg.arch.is_encoder() {
            0
        } else {
            2 * (end_l - start_l) * num_blocks * block_size * kv_heads * cfg.head_dim * 4
        };
        let span = tracing::info_span!(
            "load_shard",
            epoch = req.plan_epoch,
            model = %req.model,
            layers = ?(start_l..end_l),
            embed = shard.embed,
            head = shard.head,
            tp_rank = slice.rank,
            tp_ranks = slice.ranks,
            cp_rank = shard.cp_rank,
            cp_ranks,
        );
        let _g = span.enter();
        // The request is sound: drop the old shard (its sequences and its group) before
        // loading the new one, so the two never sit in memory together.
        self.loaded = None;
        self.streams.retain(|s, _| !super::is_peer_stream(*s));
        self.publish();
        let group = if ranks > 1 {
            let listener = self.peers.as_ref().ok_or_else(|| {
                WorkerError::FailedPrecondition(
                    "tensor or context parallelism: this worker has no peer port".into(),
                )
            })?;
            let control = (group_rank > 0).then(|| (self.control)(req.plan_epoch));
            Some(Group::form(
                req.plan_epoch,
                group_rank,
                tp_ranks,
                (&req.group, &req.group_names),
                listener,
                control,
            )?)
        } else {
            None
        };
        let link_rtt = group
            .as_ref()
            .zip(self.peers.as_deref())
            .and_then(|(g, l)| measure_rtt(g, l.tls()));
        let spec = LoadSpec {
            tensor: slice,
            ..LoadSpec::stage(&cfg, start_l..end_l, shard.embed, shard.head)
        };
        // The cache is indexed by global layer (as the step writes it); the pools of layers
        // below `layer_start` are never touched, so the OS never backs them (a GPU stage's
        // cache holds no pools at all).
        let kv = KvCacheConfig {
            n_layers: end_l,
            n_kv_heads: kv_heads,
            head_dim: cfg.head_dim,
            block_size,
            num_blocks,
        };
        let (model, cache) =
            StageModel::load(&self.backend, ranks == 1, store.as_ref(), &cfg, spec, kv)?;
        let weight_bytes = model.weight_bytes();
        let backend = model.backend_name();
        if self.memory_bytes > 0 && (weight_bytes + kv_bytes) as u64 > self.memory_bytes {
            return Err(WorkerError::ResourceExhausted(format!(
                "shard needs {weight_bytes} bytes of weights and {kv_bytes} of KV cache; this \
                 worker declared {} bytes",
                self.memory_bytes
            )));
        }
        self.loaded = Some(Loaded {
            epoch: req.plan_epoch,
            model,
            cache,
            next: (in_pipeline && !shard.head).then_some(req.next_address),
            seqs: SeqTable::default(),
            prefixes: PrefixStores::default(),
            samples: in_pipeline && shard.head,
            group,
            kv_bytes: kv_bytes as u64,
            link_rtt_us: link_rtt.map(|d| d.as_micros().min(u128::from(u32::MAX)) as u32),
        });
        self.publish();
        let load_ms = start.elapsed().as_secs_f64() * 1e3;
        tracing::info!(
            weight_bytes,
            kv_bytes,
            load_ms,
            ?link_rtt,
            backend,
            "shard loaded"
        );
        Ok(pb::LoadShardResponse {
            weight_bytes: weight_bytes as u64,
            resident_bytes: resident_bytes(),
            load_ms,
        })
    }
}

/// The median round-trip time to the group's other ranks' peer ports (each the median of a
/// few pings); `None` when no peer answers.
fn measure_rtt(group: &Group, tls: &PeerTls) -> Option<Duration> {
    let mut rtts: Vec<Duration> = group
        .peer_addrs()
        .filter_map(|a| probe_rtt(a, RTT_PROBES, Duration::from_secs(1), tls).ok())
        .collect();
    rtts.sort();
    rtts.get(rtts.len() / 2).copied()
}
