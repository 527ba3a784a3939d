//! An in-process context-parallel ring: one thread per rank, each with its own [`Llama`],
//! [`PagedKvCache`] and compute pool, running the same script of batched steps and exchanging
//! K/V blocks and partial results over channels, as ring ranks on different workers do over
//! their peer links. Rank 0 returns the logits; the test judges them against the whole model
//! ([`crate::tp_group::run_group`] with one rank).

// Each test crate that includes this module uses a different part of it.
#![allow(dead_code)]

use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::time::Duration;

use tessera_kernels::ThreadPool;
use tessera_model::kv_cache::{KvCacheConfig, PagedKvCache, SeqKv};
use tessera_model::layers::SeqStep;
use tessera_model::llama::Llama;
use tessera_model::stage::{
    LocalReduce, RingComm, RingCtx, StageCtx, StageInput, StageOutput, StageScratch,
};
use tessera_model::{ModelError, Result};

use crate::tp_group::Piece;

/// How long a rank waits for a neighbour before it declares the ring broken (a bug: every
/// rank makes the same calls).
const TIMEOUT: Duration = Duration::from_secs(120);

/// What one rank's run left behind.
#[derive(Debug)]
pub struct RankRun {
    /// Logits per step (rank 0), `None` where the rank delivered nothing.
    pub logits: Vec<Option<Vec<f32>>>,
    /// Hidden states per step (a stage without the head).
    pub hidden: Vec<Option<Vec<f32>>>,
    /// Tokens of every sequence this rank's cache holds at the end, by sequence.
    pub kept: Vec<usize>,
}

/// Runs `script` on a ring of `models.len()` ranks (each the whole model) with `threads`
/// compute threads per rank and KV blocks of `block_size` tokens; returns every rank's run.
///
/// # Panics
/// When a rank fails or panics.
pub fn run_ring(
    models: &[&Llama],
    script: &[Vec<Piece>],
    threads: usize,
    block_size: usize,
) -> Vec<RankRun> {
    run_ring_stage(models, script, None, threads, block_size)
}

/// [`run_ring`] for one pipeline stage: from token ids when `input` is `None`, else from
/// `input[step]` (the previous stage's whole hidden states).
///
/// # Panics
/// When a rank fails or panics.
pub fn run_ring_stage(
    models: &[&Llama],
    script: &[Vec<Piece>],
    input: Option<&[Vec<f32>]>,
    threads: usize,
    block_size: usize,
) -> Vec<RankRun> {
    let ranks = models.len();
    let mut links = mesh(ranks);
    std::thread::scope(|s| {
        let handles: Vec<_> = models
            .iter()
            .zip(links.drain(..))
            .enumerate()
            .map(|(rank, (model, link))| {
                s.spawn(move || {
                    let mut comm = link.into_comm(rank, ranks);
                    run_rank(model, script, input, &mut comm, threads, block_size)
                })
            })
            .collect();
        handles
            .into_iter()
            .enumerate()
            .map(|(rank, h)| {
                h.join()
                    .expect("a rank panicked")
                    .unwrap_or_else(|e| panic!("rank {rank}: {e}"))
            })
            .collect()
    })
}

/// One rank's run of the script with its own cache, pool and scratch.
fn run_rank(
    model: &Llama,
    script: &[Vec<Piece>],
    input: Option<&[Vec<f32>]>,
    comm: &mut ChannelRing,
    threads: usize,
    block_size: usize,
) -> Result<RankRun> {
    let cfg = model.config();
    let n_seqs = script
        .iter()
        .flatten()
        .map(|p| p.seq + 1)
        .max()
        .unwrap_or(0);
    let tokens: usize = script.iter().flatten().map(|p| p.tokens.len()).sum();
    // Room for the whole script on every rank: what a rank keeps is checked, not bounded here.
    let mut cache = PagedKvCache::new(KvCacheConfig {
        n_layers: cfg.n_layers,
        n_kv_heads: model.kv_heads_held(),
        head_dim: cfg.head_dim,
        block_size,
        num_blocks: tokens / block_size + n_seqs + 1,
    })?;
    let mut seqs: Vec<Option<SeqKv>> = (0..n_seqs).map(|_| Some(cache.new_seq())).collect();
    let mut lens = vec![0usize; n_seqs];
    let pool = ThreadPool::new(threads)?;
    let mut scratch = StageScratch::default();
    let (mut logits, mut hidden) = (Vec::new(), Vec::new());
    for (i, step) in script.iter().enumerate() {
        let stage_input = match input {
            Some(h) => StageInput::Hidden(&h[i]),
            None => StageInput::Tokens,
        };
        let starts: Vec<usize> = step.iter().map(|p| lens[p.seq]).collect();
        let mut taken: Vec<SeqKv> = step
            .iter()
            .map(|p| {
                seqs[p.seq]
                    .take()
                    .expect("a sequence appears once per step")
            })
            .collect();
        let mut batch: Vec<SeqStep<'_>> = step
            .iter()
            .zip(taken.iter_mut())
            .map(|(p, seq)| SeqStep {
                tokens: &p.tokens,
                seq,
                logits: p.logits,
            })
            .collect();
        let mut ctx = StageCtx {
            cache: &mut cache,
            pool: &pool,
            reduce: &mut LocalReduce,
            ring: Some(RingCtx {
                comm: &mut *comm,
                starts: &starts,
            }),
        };
        let (l, h) = match model.step(&mut batch, stage_input, &mut ctx, &mut scratch)? {
            StageOutput::Logits(l) => (Some(l.to_vec()), None),
            StageOutput::Hidden(h) => (None, Some(h.to_vec())),
            StageOutput::Delivered => (None, None),
        };
        drop(batch);
        for (p, seq) in step.iter().zip(taken) {
            lens[p.seq] += p.tokens.len();
            seqs[p.seq] = Some(seq);
        }
        logits.push(l);
        hidden.push(h);
    }
    let kept = seqs
        .iter()
        .map(|s| s.as_ref().map_or(0, SeqKv::len))
        .collect();
    Ok(RankRun {
        logits,
        hidden,
        kept,
    })
}

/// What travels between two ranks.
#[derive(Debug)]
struct Msg {
    gather: bool,
    layer: usize,
    data: Vec<f32>,
}

/// One rank's ends of the full mesh: a sender to and a receiver from every rank.
struct Link {
    to: Vec<Sender<Msg>>,
    from: Vec<Receiver<Msg>>,
}

impl Link {
    fn into_comm(self, rank: usize, ranks: usize) -> ChannelRing {
        ChannelRing {
            rank,
            ranks,
            link: self,
        }
    }
}

/// Channels between every ordered pair of ranks (a rank's channel to itself is unused).
fn mesh(ranks: usize) -> Vec<Link> {
    let mut to: Vec<Vec<Sender<Msg>>> = (0..ranks).map(|_| Vec::new()).collect();
    let mut from: Vec<Vec<Option<Receiver<Msg>>>> = (0..ranks)
        .map(|_| (0..ranks).map(|_| None).collect())
        .collect();
    for (a, senders) in to.iter_mut().enumerate() {
        for row in from.iter_mut() {
            let (tx, rx) = channel();
            senders.push(tx);
            row[a] = Some(rx);
        }
    }
    to.into_iter()
        .zip(from)
        .map(|(to, from)| Link {
            to,
            from: from.into_iter().map(|r| r.expect("every pair")).collect(),
        })
        .collect()
}

/// A rank's [`RingComm`] over the mesh: per-pair channels keep order, so calls match by order.
struct ChannelRing {
    rank: usize,
    ranks: usize,
    link: Link,
}

impl ChannelRing {
    fn broken(&self, why: String) -> ModelError {
        ModelError::InvalidArgument {
            field: "ring",
            reason: format!("rank {}: {why}", self.rank),
        }
    }

    fn send(&self, to: usize, msg: Msg) -> Result<()> {
        self.link.to[to]
            .send(msg)
            .map_err(|_| self.broken(format!("rank {to} is gone")))
    }

    fn recv(&self, from: usize, gather: bool, layer: usize) -> Result<Vec<f32>> {
        let msg = self.link.from[from]
            .recv_timeout(TIMEOUT)
            .map_err(|e| match e {
                RecvTimeoutError::Timeout => self.broken(format!("rank {from} is silent")),
                RecvTimeoutError::Disconnected => self.broken(format!("rank {from} is gone")),
            })?;
        if (msg.gather, msg.layer) != (gather, layer) {
            return Err(self.broken(format!(
                "rank {from} sent (gather {}, layer {}) where (gather {gather}, layer {layer}) \
                 was due",
                msg.gather, msg.layer
            )));
        }
        Ok(msg.data)
    }
}

impl RingComm for ChannelRing {
    fn rank(&self) -> usize {
        self.rank
    }

    fn ranks(&self) -> usize {
        self.ranks
    }

    fn send_next(&mut self, layer: usize, block: &[f32]) -> Result<()> {
        let msg = Msg {
            gather: false,
            layer,
            data: block.to_vec(),
        };
        self.send((self.rank + 1) % self.ranks, msg)
    }

    fn recv_prev(&mut self, layer: usize, block: &mut Vec<f32>) -> Result<()> {
        *block = self.recv((self.rank + self.ranks - 1) % self.ranks, false, layer)?;
        Ok(())
    }

    fn all_gather(&mut self, layer: usize, local: &[f32], out: &mut Vec<f32>) -> Result<()> {
        for to in (0..self.ranks).filter(|&r| r != self.rank) {
            let msg = Msg {
                gather: true,
                layer,
                data: local.to_vec(),
            };
            self.send(to, msg)?;
        }
        out.clear();
        for from in 0..self.ranks {
            if from == self.rank {
                out.extend_from_slice(local);
            } else {
                out.extend(self.recv(from, true, layer)?);
            }
        }
        Ok(())
    }
}
