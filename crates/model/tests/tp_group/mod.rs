//! An in-process tensor-parallel group: one thread per rank, each with its own [`Llama`]
//! slice, [`PagedKvCache`] and compute pool, running the same script of batched steps and
//! completing partial sums through shared memory, in rank order, as a worker group does over
//! its peer links. A group of one runs the model with [`LocalReduce`], exactly as the engine
//! does, so it is the reference the sliced groups are judged against. A pipeline of groups
//! runs one stage's group over the whole script, then the next one's over its hidden states.

// Each test crate that includes this module uses a different part of it.
#![allow(dead_code)]

use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tessera_format::{ModelConfig, WeightStore};
use tessera_kernels::ThreadPool;
use tessera_model::kv_cache::{KvCacheConfig, PagedKvCache, SeqKv};
use tessera_model::layers::SeqStep;
use tessera_model::llama::{Llama, LoadSpec};
use tessera_model::stage::{
    LocalReduce, Reduce, ReducePoint, StageCtx, StageInput, StageOutput, StageScratch, TensorSlice,
};
use tessera_model::{ModelError, Result};

/// How long a rank waits for the others before it declares the group broken (a bug: every
/// rank makes the same calls).
const RENDEZVOUS_TIMEOUT: Duration = Duration::from_secs(120);

/// One sequence's part of a step.
#[derive(Clone, Debug)]
pub struct Piece {
    /// Which sequence of the script.
    pub seq: usize,
    /// Its new tokens.
    pub tokens: Vec<u32>,
    /// Whether it samples (wants logits of its last token).
    pub logits: bool,
}

/// Teacher forcing: step 0 feeds each sequence its first `chunk` tokens in one prefill, every
/// later step one more token of each sequence that has any left; logits at every step.
pub fn teacher_forced(seqs: &[Vec<u32>], chunk: usize) -> Vec<Vec<Piece>> {
    let longest = seqs.iter().map(Vec::len).max().unwrap_or(0);
    (chunk..=longest)
        .map(|end| {
            seqs.iter()
                .enumerate()
                .filter(|(_, s)| end <= s.len())
                .map(|(seq, s)| Piece {
                    seq,
                    tokens: if end == chunk {
                        s[..chunk].to_vec()
                    } else {
                        vec![s[end - 1]]
                    },
                    logits: true,
                })
                .collect()
        })
        .collect()
}

/// Each sequence's logits rows, in step order, out of a run's per-step logits `(m, vocab)`.
pub fn rows_by_seq(script: &[Vec<Piece>], out: &[Vec<f32>], vocab: usize) -> Vec<Vec<Vec<f32>>> {
    let n_seqs = script
        .iter()
        .flatten()
        .map(|p| p.seq + 1)
        .max()
        .unwrap_or(0);
    let mut rows = vec![Vec::new(); n_seqs];
    for (step, logits) in script.iter().zip(out) {
        let mut it = logits.chunks_exact(vocab);
        for p in step.iter().filter(|p| p.logits) {
            rows[p.seq].push(it.next().expect("a row per sampling sequence").to_vec());
        }
        assert!(it.next().is_none(), "more rows than sampling sequences");
    }
    rows
}

/// The group whose rank r holds KV heads `kv[r]..kv[r+1]`, MLP columns `ffn[r]..ffn[r+1]`
/// and vocabulary rows `vocab[r]..vocab[r+1]`.
pub fn slices(kv: &[usize], ffn: &[usize], vocab: &[usize]) -> Vec<TensorSlice> {
    let ranks = kv.len() - 1;
    (0..ranks)
        .map(|rank| TensorSlice {
            rank,
            ranks,
            kv_heads: kv[rank]..kv[rank + 1],
            ffn: ffn[rank]..ffn[rank + 1],
            vocab: vocab[rank]..vocab[rank + 1],
        })
        .collect()
}

/// Loads the whole model's layers, embedding and head cut to `tensor`.
///
/// # Errors
/// As [`Llama::load`].
pub fn load(
    w: &dyn WeightStore,
    c: &ModelConfig,
    tensor: TensorSlice,
) -> tessera_model::Result<Llama> {
    let spec = LoadSpec {
        tensor,
        ..LoadSpec::full(c)
    };
    Llama::load(w, c, spec, &mut |_, _| {})
}

/// Loads every slice of `group`.
///
/// # Panics
/// When one fails to load.
pub fn load_group(w: &dyn WeightStore, c: &ModelConfig, group: &[TensorSlice]) -> Vec<Llama> {
    group
        .iter()
        .map(|s| load(w, c, s.clone()).unwrap_or_else(|e| panic!("{s:?}: {e}")))
        .collect()
}

/// Largest |a − b| over two runs' per-step outputs.
///
/// # Panics
/// When their shapes differ.
pub fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            assert_eq!(x.len(), y.len());
            x.iter()
                .zip(y)
                .map(|(p, q)| (p - q).abs())
                .fold(0.0, f32::max)
        })
        .fold(0.0, f32::max)
}

/// Runs `script` on the group of `models` (rank r = `models[r]`), which hold the whole model's
/// layers; returns rank 0's logits at each step (`(m, vocab)`, empty when none samples).
///
/// # Panics
/// As [`run_stage`]; also when the models lack the embedding or the head.
pub fn run_group(models: &[Llama], script: &[Vec<Piece>]) -> Vec<Vec<f32>> {
    run_stage(models, script, None)
        .into_iter()
        .map(|o| match o {
            Out::Logits(l) => l,
            Out::Hidden(_) => panic!("the group's models must hold the head"),
        })
        .collect()
}

/// What a stage's group produced at one step.
#[derive(Clone, Debug, PartialEq)]
pub enum Out {
    /// Rank 0's logits, `(m, vocab)`.
    Logits(Vec<f32>),
    /// The hidden states for the next stage, `(n, hidden)`, the same on every rank.
    Hidden(Vec<f32>),
}

/// Runs `script` on the group of `models`, one pipeline stage: from token ids when `hidden`
/// is `None`, else from `hidden[step]` (the previous stage's [`Out::Hidden`]).
///
/// # Panics
/// When a rank fails or panics; when rank 0 does not return logits on the last stage or
/// another rank does; when the ranks of another stage disagree on the hidden states.
pub fn run_stage(models: &[Llama], script: &[Vec<Piece>], hidden: Option<&[Out]>) -> Vec<Out> {
    let ranks = models.len();
    let group = Arc::new(Group::new(ranks));
    let results: Vec<Result<Vec<Option<Out>>>> = std::thread::scope(|s| {
        let handles: Vec<_> = models
            .iter()
            .enumerate()
            .map(|(rank, model)| {
                let group = Arc::clone(&group);
                s.spawn(move || {
                    let mut guard = AbandonOnExit(Some(&group.rendezvous));
                    let r = if ranks == 1 {
                        run_rank(model, script, hidden, &mut LocalReduce)
                    } else {
                        run_rank(
                            model,
                            script,
                            hidden,
                            &mut GroupReduce {
                                rank,
                                group: &group,
                            },
                        )
                    };
                    if r.is_ok() {
                        guard.0 = None;
                    }
                    r
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a rank panicked"))
            .collect()
    });
    let mut results = results
        .into_iter()
        .enumerate()
        .map(|(rank, r)| r.unwrap_or_else(|e| panic!("rank {rank}: {e}")));
    let rank0: Vec<Out> = results
        .next()
        .expect("rank 0")
        .into_iter()
        .map(|l| l.expect("rank 0 gets the logits"))
        .collect();
    for (rank, steps) in results.enumerate() {
        for (step, (mine, first)) in steps.iter().zip(&rank0).enumerate() {
            match (mine, first) {
                (None, Out::Logits(_)) => {}
                (Some(Out::Hidden(h)), Out::Hidden(h0)) => {
                    assert!(
                        h == h0,
                        "rank {} step {step}: other hidden states",
                        rank + 1
                    );
                }
                _ => panic!(
                    "rank {} step {step}: {mine:?} where rank 0 has {first:?}",
                    rank + 1
                ),
            }
        }
    }
    rank0
}

/// One rank's run of the script with its own cache, pool and scratch.
fn run_rank(
    model: &Llama,
    script: &[Vec<Piece>],
    hidden: Option<&[Out]>,
    reduce: &mut dyn Reduce,
) -> Result<Vec<Option<Out>>> {
    let cfg = model.config();
    let block_size = 8;
    let n_seqs = script
        .iter()
        .flatten()
        .map(|p| p.seq + 1)
        .max()
        .unwrap_or(0);
    let tokens: usize = script.iter().flatten().map(|p| p.tokens.len()).sum();
    let mut cache = PagedKvCache::new(KvCacheConfig {
        n_layers: cfg.n_layers,
        n_kv_heads: model.kv_heads_held(),
        head_dim: cfg.head_dim,
        block_size,
        num_blocks: tokens / block_size + n_seqs + 1,
    })?;
    let mut seqs: Vec<Option<SeqKv>> = (0..n_seqs).map(|_| Some(cache.new_seq())).collect();
    let pool = ThreadPool::new(1)?;
    let mut scratch = StageScratch::default();
    let mut out = Vec::with_capacity(script.len());
    for (i, step) in script.iter().enumerate() {
        let input = match hidden.map(|h| &h[i]) {
            None => StageInput::Tokens,
            Some(Out::Hidden(h)) => StageInput::Hidden(h),
            Some(Out::Logits(_)) => {
                return Err(ModelError::InvalidArgument {
                    field: "script",
                    reason: "a stage after the last one".into(),
                });
            }
        };
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
            reduce: &mut *reduce,
            ring: None,
        };
        let got = match model.step(&mut batch, input, &mut ctx, &mut scratch)? {
            StageOutput::Logits(l) => Some(Out::Logits(l.to_vec())),
            StageOutput::Hidden(h) => Some(Out::Hidden(h.to_vec())),
            StageOutput::Delivered => None,
        };
        drop(batch);
        for (p, seq) in step.iter().zip(taken) {
            seqs[p.seq] = Some(seq);
        }
        out.push(got);
    }
    Ok(out)
}

/// What the ranks share: one slot per rank and the rendezvous between exchanges.
struct Group {
    slots: Mutex<Vec<(Option<Call>, Vec<f32>)>>,
    rendezvous: Rendezvous,
}

impl Group {
    fn new(ranks: usize) -> Self {
        Self {
            slots: Mutex::new(vec![(None, Vec::new()); ranks]),
            rendezvous: Rendezvous::new(ranks),
        }
    }
}

/// Which collective call a rank is in, so mismatched calls fail instead of mixing data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Call {
    Reduce(ReducePoint, usize),
    Gather(usize),
}

/// A rank's [`Reduce`] over the shared slots: publish, meet, read everyone's, meet again (so
/// no slot is overwritten before every rank has read it).
struct GroupReduce<'g> {
    rank: usize,
    group: &'g Group,
}

impl GroupReduce<'_> {
    fn exchange(&mut self, call: Call, data: &[f32]) -> Result<Vec<Vec<f32>>> {
        lock(&self.group.slots)[self.rank] = (Some(call), data.to_vec());
        self.group.rendezvous.wait()?;
        let all = lock(&self.group.slots).clone();
        self.group.rendezvous.wait()?;
        if let Some((other, _)) = all.iter().find(|(c, _)| *c != Some(call)) {
            return Err(ModelError::InvalidArgument {
                field: "reduce",
                reason: format!("rank {} is in {call:?}, another in {other:?}", self.rank),
            });
        }
        Ok(all.into_iter().map(|(_, d)| d).collect())
    }
}

impl Reduce for GroupReduce<'_> {
    fn reduce(&mut self, point: ReducePoint, layer: usize, x: &mut [f32]) -> Result<()> {
        let all = self.exchange(Call::Reduce(point, layer), x)?;
        if all.iter().any(|d| d.len() != x.len()) {
            return Err(ModelError::InvalidArgument {
                field: "reduce",
                reason: format!("ranks disagree on the length at {point:?} of layer {layer}"),
            });
        }
        // Rank order, whatever this rank is: ((x0 + x1) + x2) + …
        x.copy_from_slice(&all[0]);
        for d in &all[1..] {
            x.iter_mut().zip(d).for_each(|(a, b)| *a += b);
        }
        Ok(())
    }

    fn gather_logits(&mut self, local: &[f32], m: usize, out: &mut Vec<f32>) -> Result<bool> {
        let all = self.exchange(Call::Gather(m), local)?;
        if self.rank != 0 {
            return Ok(false);
        }
        out.clear();
        for row in 0..m {
            for d in &all {
                let w = d.len() / m;
                out.extend_from_slice(&d[row * w..(row + 1) * w]);
            }
        }
        Ok(true)
    }
}

/// A reusable barrier that a failing rank can break, so the others fail instead of waiting
/// forever (`std::sync::Barrier` cannot be broken).
struct Rendezvous {
    ranks: usize,
    /// (ranks arrived, generation, broken)
    state: Mutex<(usize, u64, bool)>,
    cv: Condvar,
}

impl Rendezvous {
    fn new(ranks: usize) -> Self {
        Self {
            ranks,
            state: Mutex::new((0, 0, false)),
            cv: Condvar::new(),
        }
    }

    fn wait(&self) -> Result<()> {
        let broken = || ModelError::InvalidArgument {
            field: "reduce",
            reason: "another rank of the group failed".into(),
        };
        let mut st = lock(&self.state);
        if st.2 {
            return Err(broken());
        }
        st.0 += 1;
        if st.0 == self.ranks {
            (st.0, st.1) = (0, st.1 + 1);
            self.cv.notify_all();
            return Ok(());
        }
        let generation = st.1;
        while st.1 == generation {
            if st.2 {
                return Err(broken());
            }
            let (next, timeout) = self
                .cv
                .wait_timeout(st, RENDEZVOUS_TIMEOUT)
                .unwrap_or_else(PoisonError::into_inner);
            st = next;
            if timeout.timed_out() && st.1 == generation {
                st.2 = true;
                self.cv.notify_all();
                return Err(broken());
            }
        }
        Ok(())
    }

    fn abandon(&self) {
        lock(&self.state).2 = true;
        self.cv.notify_all();
    }
}

/// Breaks the rendezvous when a rank leaves early (an error or a panic), unless disarmed.
struct AbandonOnExit<'a>(Option<&'a Rendezvous>);

impl Drop for AbandonOnExit<'_> {
    fn drop(&mut self) {
        if let Some(r) = self.0 {
            r.abandon();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
