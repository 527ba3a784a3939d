//! Request migration: what the scheduler does with its running sequences when their plan
//! loses a worker, so that a client's stream survives the loss with the tokens a fault-free
//! run gives.
//!
//! When the pipeline stream breaks, or the serving plan goes away under it, every sequence
//! the stream held — on the steps in flight or between them — loses its state on every
//! worker (KV, prefix stores, the last stage's sampler). The scheduler still holds what
//! defines the sequence: its validated request (prompt, sampling parameters and seed) and
//! every token it streamed. A migrated sequence:
//!
//! 1. keeps its place in `running`, its client stream and its output stream (detokenizer
//!    and stop checker);
//! 2. forgets what the workers held: not started, nothing prefilled, no step in flight — and
//!    gives back its KV reservation. The new plan's workers start empty, so sequences that
//!    shared cached prefix blocks each need their own copies now: together they may not fit.
//!    Once the new plan's stream is open, `admit` reserves each one's blocks again
//!    ([`KvBudget::readmit`](super::super::kv_budget::KvBudget::readmit)), oldest first and
//!    before any queued request; one that does not fit waits, joining no step, until
//!    finished ones make room;
//! 3. with its reservation, is prefilled again with `prompt ++ generated` (its
//!    *input*, see [`Seq::input`]) in the first run's own chunks, its SeqStart naming the
//!    generated tokens so that the last stage's sampler resumes after them
//!    ([`tessera_text::sampling::Sampler::resume`]: penalties count them, the seeded
//!    generator skips the draws they took), and its first sample is the token that follows.
//!
//! Why the tokens are the fault-free ones: a token depends on the logits of its position and
//! on the sampler's state. The sampler's state is restored exactly (above). The logits are the
//! same bits when every row is computed the way the first run computed it. Rows do not
//! depend on what else is in a step (each matmul row is computed alone; batching tests hold
//! that), but attention's summation order depends on the chunk a row came in: a one-row step
//! (decode) sums in `ggml_vec_dot_f16`'s order, a chunk of two or more rows in tinyBLAS's, and
//! a chunk reaching `LONG_ATTENTION_KEYS` (1024, the model crate's) keys runs the tiled kernel — so a prompt prefilled
//! in one chunk is not bit-equal to one prefilled token by token. Hence the replay resends the
//! first run's own chunks ([`Seq::chunks`], recorded as they went out): the prompt in the
//! chunks it was prefilled in, and every generated token alone, as decode fed it
//! ([`Seq::next_chunk`]). The one chunk not recorded as it went is the cached prefix a
//! sequence started from: its rows were computed by the sequence that cached them, in chunks
//! of two or more rows unless that sequence hit a one-row chunk there (a prompt cut by the
//! step budget), and are replayed as one chunk (split where a step's budget demands, never
//! into one-row pieces). A request resumed on another coordinator has no recorded chunks: its
//! prompt is prefilled as any prompt is, which gives the first run's bits unless that run cut
//! the prompt differently around a one-row chunk or the long-keys switch. On a
//! context-parallel ring, prefill is ring attention and decode distributed flash-decoding, so a
//! replay there agrees with the first run within the ring's measured bounds, not bit for bit.
//!
//! Cost: replaying `k` generated tokens takes `k` steps (each carries the other sequences'
//! work too), the price of bit-exact decode rows with today's kernels.
//!
//! Bounds: a sequence that lost [`MAX_MIGRATIONS`] plans ends with UNAVAILABLE (a request
//! that kills the workers it runs on must not take every new plan down with it), and one that
//! waits longer than `ready_wait` for a new plan ends with UNAVAILABLE, as a queued request
//! does.

use std::time::Instant;

use tessera_proto::status::final_unavailable;

use super::{Scheduler, Seq, unavailable};

/// The most plans one sequence may lose; the next loss ends it with UNAVAILABLE.
pub(crate) const MAX_MIGRATIONS: u32 = 3;

impl Seq {
    /// Tokens its KV must hold before it samples: the prompt, then the generated tokens it
    /// replays after a migration.
    pub(super) fn input_len(&self) -> usize {
        self.req.inner.prompt_ids.len() + self.resumed
    }

    /// Its input tokens `[from, from + n)`: the prompt, then `generated[..resumed]`.
    pub(super) fn input(&self, from: usize, n: usize) -> Vec<u32> {
        self.req
            .inner
            .prompt_ids
            .iter()
            .chain(&self.generated[..self.resumed])
            .skip(from)
            .take(n)
            .copied()
            .collect()
    }

    /// Records that its next `n` input tokens go out in one step, unless that step replays the
    /// first run (whose chunks are recorded already).
    pub(super) fn record_chunk(&mut self, n: usize) {
        let recorded: usize = self.chunks.iter().map(|&c| c as usize).sum();
        if self.prefilled >= recorded {
            self.chunks.push(n as u32);
        }
    }

    /// How many input tokens its next prefill step takes, given `chunk` (the longest prefill
    /// chunk) and `budget` (tokens left in the step); 0 when it should wait for another step.
    ///
    /// Within what the first run sent ([`Self::chunks`]), the rest of that run's chunk at
    /// `prefilled` — split when the budget is short (the cached-prefix chunk, or a busy step),
    /// never into one-row pieces, which attention would sum in decode order. Past it, prompt
    /// tokens in ordinary chunks that stop at the prompt's end, and generated tokens one per
    /// step (see the module docs).
    pub(super) fn next_chunk(&self, chunk: usize, budget: usize) -> usize {
        let allowed = chunk.min(budget);
        let input = self.input_len();
        let mut end = 0;
        for &c in &self.chunks {
            end += c as usize;
            if end > self.prefilled {
                break;
            }
        }
        if end > self.prefilled {
            let rest = (end - self.prefilled).min(input - self.prefilled);
            if rest <= allowed {
                return rest;
            }
            // A piece of a multi-row chunk: at least two rows, and not leaving one behind.
            let piece = if rest - allowed == 1 {
                allowed - 1
            } else {
                allowed
            };
            return if piece >= 2 { piece } else { 0 };
        }
        let prompt = self.req.inner.prompt_ids.len();
        if self.prefilled >= prompt {
            return usize::from(self.prefilled < input && allowed > 0);
        }
        allowed.min(prompt - self.prefilled)
    }
}

impl Scheduler {
    /// Migrates every running sequence off a plan whose stream is gone (see the module docs);
    /// `why` says what was lost. Sequences past [`MAX_MIGRATIONS`] end with UNAVAILABLE.
    pub(super) fn migrate_running(&mut self, why: &str) {
        // The stream that held them is gone, and with it their state on every worker: their
        // KV, the stream's prefix stores, and the releases and prefix ops meant for it.
        self.release.clear();
        self.kv.reset_prefix();
        let now = Instant::now();
        let mut i = 0;
        while i < self.running.len() {
            let s = &mut self.running[i];
            s.migrations += 1;
            if s.migrations > MAX_MIGRATIONS {
                let s = self.running.swap_remove(i);
                let msg = format!("{why}; the request lost {MAX_MIGRATIONS} plans, giving up");
                s.span
                    .in_scope(|| tracing::warn!(error = %msg, "request failed"));
                self.cluster.metrics.request_ended("unavailable");
                let _ = s.events.send(Err(final_unavailable(msg)));
                continue;
            }
            // Its cached blocks went with the stream's index, and its reservation goes now:
            // `admit` reserves all its blocks again, oldest sequence first, before it replays.
            s.chain.clear();
            s.kv = None;
            s.started = false;
            s.prefilled = 0;
            s.in_step = None;
            s.next = None;
            s.resumed = s.generated.len();
            s.stranded_since = Some(now);
            let replay = s.input_len();
            s.span.in_scope(|| {
                tracing::warn!(
                    error = why,
                    generated = s.resumed,
                    migration = s.migrations,
                    "plan lost; migrating"
                );
            });
            self.cluster.metrics.migrated(replay as u64);
            i += 1;
        }
        self.publish_load();
    }

    /// On a coordinator that no longer leads: ends every running and queued request at once
    /// with a resumable UNAVAILABLE (not marked final). The new leader serves them — a
    /// follower relaying one resumes it there, a client resumes it itself — so none waits
    /// here for a plan this node will not serve.
    pub(super) fn abdicate(&mut self) {
        let msg = "this coordinator stopped leading; resume the request on the new leader";
        for s in std::mem::take(&mut self.running) {
            s.span
                .in_scope(|| tracing::warn!(error = msg, "request handed over"));
            self.cluster.metrics.request_ended("unavailable");
            let _ = s.events.send(Err(unavailable(msg)));
        }
        for q in self.queue.drain(..) {
            let _ = q.events.send(Err(unavailable(msg)));
        }
        // Their stream went with the plan; nothing is left to release on it.
        self.release.clear();
        self.kv.reset_prefix();
        self.publish_load();
    }

    /// Ends migrated sequences whose client left, and (when no plan serves) those that have
    /// waited longer than `ready_wait` for one.
    pub(super) fn expire_stranded(&mut self, serving: bool) {
        let wait = self.cluster.cfg.ready_wait;
        let now = Instant::now();
        let mut i = 0;
        while i < self.running.len() {
            let s = &self.running[i];
            let Some(since) = s.stranded_since else {
                i += 1;
                continue;
            };
            if s.events.is_closed() {
                let s = self.running.swap_remove(i);
                s.span
                    .in_scope(|| tracing::info!("client went away; cancelling"));
                self.cluster.metrics.request_ended("cancelled");
                self.retire(s);
            } else if !serving && now.duration_since(since) >= wait {
                let s = self.running.swap_remove(i);
                let why = self
                    .cluster
                    .replan
                    .failure()
                    .unwrap_or_else(|| format!("waited {wait:?} for enough workers"));
                let msg = format!("its plan lost a worker and no new plan served: {why}");
                s.span
                    .in_scope(|| tracing::warn!(error = %msg, "request failed"));
                self.cluster.metrics.request_ended("unavailable");
                let _ = s.events.send(Err(final_unavailable(msg)));
                self.retire(s);
            } else {
                i += 1;
            }
        }
    }
}
