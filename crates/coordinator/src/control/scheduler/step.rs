//! One step of the scheduler: building it from the running sequences not in flight (one
//! micro-batch: decode tokens first, then prefill chunks, with the pending releases and
//! prefix ops), its span, and feeding the sampled tokens of its answer back to each
//! request's output stream — finishing, cancelling, or failing sequences as the answer says.
//! Sending it and waiting for the answer is [`super::link`]'s.

use std::time::Instant;

use tessera_proto::cluster::v1 as cpb;
use tessera_proto::v1 as pb;
use tessera_text::frontend::Frontend;
use tessera_text::sampling::{FinishReason, SampledToken};

use super::{Scheduler, Seq};

impl Scheduler {
    /// The next step: one micro-batch of the running sequences not in flight — one decode
    /// token per decoding sequence, then prefill chunks, within `max_batch_tokens` — carrying
    /// the pending releases and prefix ops. With one step in flight at most, the micro-batch
    /// is every such sequence (as a single batch); with `limit` > 1 it is at most
    /// `ceil(running / limit)` of them, decoders that waited longest first, so the running
    /// sequences spread over `limit` micro-batches. A step with no sequences still goes out
    /// when releases or prefix ops are pending (the workers apply them and answer with no
    /// tokens): the last requests to finish must not hold their KV until the next request
    /// comes. `None` when there is nothing to send.
    pub(super) fn build_step(&mut self) -> Option<cpb::StepRequest> {
        if let Some(step) = self.build_ring_prefill() {
            return Some(step);
        }
        let cfg = &self.cluster.cfg;
        let limit = self.link.as_ref().map_or(1, |l| l.limit);
        let mut budget = cfg.max_batch_tokens.max(1) as usize;
        let chunk = cfg.prefill_chunk.max(1) as usize;
        let mut room = if limit > 1 {
            self.running.len().div_ceil(limit)
        } else {
            usize::MAX
        };
        let step_id = self.next_step;
        let mut decoders: Vec<usize> = (0..self.running.len())
            .filter(|&i| self.running[i].in_step.is_none() && self.running[i].next.is_some())
            .collect();
        if limit > 1 {
            // Stable: equal waits keep their running order.
            decoders.sort_by_key(|&i| self.running[i].last_step);
        }
        let mut seqs = Vec::new();
        for i in decoders {
            if budget == 0 || room == 0 {
                break;
            }
            budget -= 1;
            room -= 1;
            let s = &mut self.running[i];
            s.in_step = Some(step_id);
            s.last_step = step_id;
            s.chunks.push(1);
            seqs.push(cpb::SeqStep {
                seq_id: s.id,
                tokens: s.next.into_iter().collect(),
                sample: true,
                start: None,
            });
        }
        for s in self
            .running
            .iter_mut()
            .filter(|s| s.in_step.is_none() && s.next.is_none() && s.kv.is_some())
        {
            // The prompt, then (after a migration) the generated tokens it replays.
            let input = s.input_len();
            let left = input - s.prefilled;
            if budget == 0 || room == 0 || left == 0 {
                continue;
            }
            let n = s.next_chunk(chunk, budget);
            if n == 0 {
                continue;
            }
            budget -= n;
            room -= 1;
            let tokens = s.input(s.prefilled, n);
            s.record_chunk(n);
            s.prefilled += n;
            let start = (!s.started).then(|| cpb::SeqStart {
                cached_tokens: (s.chain.len() * cfg.block_size.max(1) as usize) as u32,
                cached_blocks: s.chain.clone(),
                generated: s.generated[..s.resumed].to_vec(),
                ..s.req.seq_start()
            });
            s.started = true;
            s.stranded_since = None;
            s.in_step = Some(step_id);
            s.last_step = step_id;
            seqs.push(cpb::SeqStep {
                seq_id: s.id,
                tokens,
                sample: s.prefilled == input,
                start,
            });
        }
        if seqs.is_empty() && self.release.is_empty() && !self.kv.has_ops() {
            return None;
        }
        self.next_step += 1;
        Some(cpb::StepRequest {
            plan_epoch: self.link.as_ref().map_or(0, |l| l.epoch),
            step_id,
            seqs,
            hidden: Vec::new(),
            release: std::mem::take(&mut self.release),
            // Set when it is sent, from the step's span.
            trace_context: Default::default(),
            prefix_ops: self.kv.take_ops(),
            hidden_parts: 0,
        })
    }

    /// On a plan of context-parallel rings, a sequence that has not started goes alone, its
    /// whole prompt in one step: only such a step is split over the ring's ranks (every
    /// other step replicates its rows on every rank), so a long prompt's prefill is shared
    /// rather than repeated. The decoders wait that one step. `None` when the plan has no
    /// ring or no sequence waits to start.
    fn build_ring_prefill(&mut self) -> Option<cpb::StepRequest> {
        let link = self.link.as_ref().filter(|l| l.ring > 1)?;
        let epoch = link.epoch;
        let step_id = self.next_step;
        let s = self
            .running
            .iter_mut()
            .find(|s| s.in_step.is_none() && !s.started && s.kv.is_some())?;
        // A migrated sequence replays its generated tokens in the same step (see `migrate`).
        let input = s.input_len();
        let tokens = s.input(s.prefilled, input - s.prefilled);
        s.record_chunk(tokens.len());
        s.prefilled = input;
        s.started = true;
        s.stranded_since = None;
        s.in_step = Some(step_id);
        s.last_step = step_id;
        let seq = cpb::SeqStep {
            seq_id: s.id,
            tokens,
            sample: true,
            start: Some(cpb::SeqStart {
                generated: s.generated[..s.resumed].to_vec(),
                ..s.req.seq_start()
            }),
        };
        self.next_step += 1;
        Some(cpb::StepRequest {
            plan_epoch: epoch,
            step_id,
            seqs: vec![seq],
            hidden: Vec::new(),
            release: std::mem::take(&mut self.release),
            trace_context: Default::default(),
            prefix_ops: self.kv.take_ops(),
            hidden_parts: 0,
        })
    }

    /// The span of a step: a child of the `generate` span of the batch's first sequence,
    /// following from those of the others — so a request served alone
    /// gets one trace holding every step, and a batched step links every request it serves.
    pub(super) fn step_span(&self, step: &cpb::StepRequest) -> tracing::Span {
        // A step of releases alone serves no request: no span, and no trace context for the
        // workers (which then make none either).
        if step.seqs.is_empty() {
            return tracing::Span::none();
        }
        let tokens: usize = step.seqs.iter().map(|s| s.tokens.len()).sum();
        let mut spans = step
            .seqs
            .iter()
            .filter_map(|q| self.running.iter().find(|s| s.id == q.seq_id))
            .map(|s| &s.span);
        let first = spans.next();
        let span = tracing::info_span!(
            parent: first.and_then(tracing::Span::id),
            "step",
            step_id = step.step_id,
            seqs = step.seqs.len(),
            tokens,
            epoch = step.plan_epoch
        );
        for other in spans {
            span.follows_from(other);
        }
        span
    }

    /// Feeds sampled tokens to their sequences and streams the events.
    pub(super) fn absorb(&mut self, resp: cpb::StepResponse) {
        for t in resp.tokens {
            let Some(i) = self.running.iter().position(|s| s.id == t.seq_id) else {
                continue;
            };
            let s = &mut self.running[i];
            let now = Instant::now();
            s.first_token.get_or_insert(now);
            if let Some(last) = s.last_token.replace(now) {
                self.cluster.metrics.inter_token((now - last).as_secs_f64());
            }
            let token = SampledToken {
                id: t.id,
                logprob: t.logprob,
                top_logprobs: t.top_logprobs.iter().map(|l| (l.id, l.logprob)).collect(),
            };
            let (event, finished) = s.output.push(token);
            let mut token = pb::TokenEvent {
                id: event.token.id,
                text: event.text,
                logprob: event.token.logprob,
                top_logprobs: t.top_logprobs,
                ..Default::default()
            };
            if token.logprob.is_some() {
                name_tokens(&self.frontend, &mut token);
            }
            let sent = s
                .events
                .send(Ok(pb::GenerateEvent {
                    event: Some(pb::generate_event::Event::Token(token)),
                }))
                .is_ok();
            if let Some(reason) = finished {
                let s = self.running.swap_remove(i);
                self.finish(s, reason);
            } else if !sent {
                let s = self.running.swap_remove(i);
                s.span
                    .in_scope(|| tracing::info!("client went away; cancelling"));
                self.cluster.metrics.request_ended("cancelled");
                self.retire(s);
            } else {
                s.generated.push(t.id);
                s.next = Some(t.id);
            }
        }
    }

    /// Sends a sequence's Finished event and retires it.
    pub(super) fn finish(&mut self, mut s: Seq, reason: FinishReason) {
        let now = Instant::now();
        let received = s.req.received;
        let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
        let usage = pb::Usage {
            prompt_tokens: s.req.inner.prompt_ids.len() as u32,
            completion_tokens: s.output.generated(),
            time_to_first_token_ms: ms(s.first_token.unwrap_or(now) - received),
            total_ms: ms(now - received),
        };
        let (reason, outcome) = (tessera_proto::wire::finish_reason(reason), reason.as_str());
        self.cluster.metrics.request_ended(outcome);
        self.cluster.metrics.finished(
            u64::from(usage.prompt_tokens),
            u64::from(usage.completion_tokens),
            usage.time_to_first_token_ms / 1e3,
            usage.total_ms / 1e3,
        );
        s.span.in_scope(|| {
            tracing::info!(
                completion_tokens = usage.completion_tokens,
                ttft_ms = usage.time_to_first_token_ms,
                total_ms = usage.total_ms,
                "finished"
            );
        });
        let _ = s.events.send(Ok(pb::GenerateEvent {
            event: Some(pb::generate_event::Event::Finished(pb::Finished {
                request_id: s.req.request_id.clone(),
                reason: reason as i32,
                usage: Some(usage),
                text: s.output.flush(),
            })),
        }));
        self.retire(s);
    }
}

/// Fills in the text and bytes of a token event's sampled token and alternatives (what
/// logprobs show a client; the workers send ids only).
fn name_tokens(frontend: &Frontend, token: &mut pb::TokenEvent) {
    let tokenizer = frontend.tokenizer();
    let bytes = |id: u32| tokenizer.token_bytes(id).unwrap_or_default().to_vec();
    token.token_bytes = bytes(token.id);
    token.token_text = String::from_utf8_lossy(&token.token_bytes).into_owned();
    for alt in &mut token.top_logprobs {
        alt.bytes = bytes(alt.id);
        alt.text = String::from_utf8_lossy(&alt.bytes).into_owned();
    }
}
