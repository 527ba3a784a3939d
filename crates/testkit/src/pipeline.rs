//! The coordinator's side of a worker's `Pipeline` stream, for tests that drive workers
//! directly: a [`Driver`] that numbers steps and waits for each answer, and [`Seq`]uences
//! scheduled the way the coordinator's scheduler does (chunked prefill, then one token per
//! step, joining the batch at a chosen step and released in-band once done).

use std::time::Duration;

use tessera_proto::cluster::v1 as pb;
use tessera_proto::cluster::v1::worker_client::WorkerClient;
use tessera_text::sampling::{SampledToken, SamplingParams};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Status, Streaming};

/// Prompt tokens per prefill step of a [`Seq`].
pub const CHUNK: usize = 512;

/// One open `Pipeline` stream to a stage: what a coordinator's scheduler holds.
pub struct Driver {
    tx: mpsc::Sender<pb::StepRequest>,
    /// The stage's answers; read directly to watch the stream end.
    pub rx: Streaming<pb::StepResponse>,
    /// The id the next [`Driver::step`] gets (ids start at 1).
    pub next_step: u64,
    /// The plan epoch every [`Driver::step`] claims.
    pub epoch: u64,
    /// Bound on opening the stream and on each step's answer.
    timeout: Duration,
}

impl Driver {
    /// Opens a `Pipeline` stream through `client`, for plan `epoch`; opening and each later
    /// step are bounded by `timeout`.
    ///
    /// # Panics
    /// When the stream does not open in time, or the worker refuses it.
    pub async fn open(client: &mut WorkerClient<Channel>, epoch: u64, timeout: Duration) -> Self {
        let (tx, rx) = mpsc::channel(4);
        let stream = tokio::time::timeout(timeout, client.pipeline(ReceiverStream::new(rx)))
            .await
            .expect("open in time")
            .expect("open pipeline")
            .into_inner();
        Self {
            tx,
            rx: stream,
            next_step: 1,
            epoch,
            timeout,
        }
    }

    /// Sends the next step (its id, this driver's epoch, no hidden states) with `seqs` and
    /// `release`, and returns its answer.
    ///
    /// # Errors
    /// As [`Driver::step_raw`].
    ///
    /// # Panics
    /// As [`Driver::step_raw`].
    pub async fn step(
        &mut self,
        seqs: Vec<pb::SeqStep>,
        release: Vec<u64>,
    ) -> Result<pb::StepResponse, Status> {
        self.step_raw(pb::StepRequest {
            plan_epoch: self.epoch,
            step_id: self.next_step,
            seqs,
            hidden: Vec::new(),
            release,
            trace_context: Default::default(),
            prefix_ops: Vec::new(),
            hidden_parts: 0,
        })
        .await
    }

    /// Sends the next step (as [`Driver::step`]) without waiting for its answer, so that
    /// several are in flight; returns its id. Read the answers, in order, with
    /// [`Driver::answer`].
    ///
    /// # Errors
    /// UNAVAILABLE when the stream is closed.
    pub async fn send(&mut self, seqs: Vec<pb::SeqStep>, release: Vec<u64>) -> Result<u64, Status> {
        let id = self.next_step;
        self.next_step += 1;
        self.tx
            .send(pb::StepRequest {
                plan_epoch: self.epoch,
                step_id: id,
                seqs,
                hidden: Vec::new(),
                release,
                trace_context: Default::default(),
                prefix_ops: Vec::new(),
                hidden_parts: 0,
            })
            .await
            .map_err(|_| Status::unavailable("stream closed"))?;
        Ok(id)
    }

    /// The next answer on the stream (of the oldest step in flight).
    ///
    /// # Errors
    /// The stage's status, or UNAVAILABLE when the stream ended.
    ///
    /// # Panics
    /// When no answer comes within the driver's timeout.
    pub async fn answer(&mut self) -> Result<pb::StepResponse, Status> {
        tokio::time::timeout(self.timeout, self.rx.message())
            .await
            .expect("step answered in time")?
            .ok_or_else(|| Status::unavailable("stream ended"))
    }

    /// Sends `req` as it is and returns its answer; the next step id moves on by one.
    ///
    /// # Errors
    /// The stage's status, or UNAVAILABLE when the stream is closed or ended.
    ///
    /// # Panics
    /// When the answer does not come within the driver's timeout, or answers another step.
    pub async fn step_raw(&mut self, req: pb::StepRequest) -> Result<pb::StepResponse, Status> {
        let id = req.step_id;
        self.next_step += 1;
        self.tx
            .send(req)
            .await
            .map_err(|_| Status::unavailable("stream closed"))?;
        let r = tokio::time::timeout(self.timeout, self.rx.message())
            .await
            .expect("step answered in time")?
            .ok_or_else(|| Status::unavailable("stream ended"))?;
        assert_eq!(r.step_id, id);
        Ok(r)
    }
}

/// The `start` of a sequence with `prompt` and `sampling`, as the coordinator sends it.
pub fn seq_start(prompt: &[u32], sampling: &SamplingParams) -> pb::SeqStart {
    pb::SeqStart {
        sampling: Some(tessera_proto::v1::SamplingParams {
            temperature: Some(sampling.temperature),
            top_k: sampling.top_k,
            top_p: Some(sampling.top_p),
            min_p: sampling.min_p,
            repetition_penalty: Some(sampling.repetition_penalty),
            frequency_penalty: sampling.frequency_penalty,
            presence_penalty: sampling.presence_penalty,
            seed: None,
        }),
        logprobs: sampling.logprobs,
        top_logprobs: sampling.top_logprobs,
        seed: sampling.seed.unwrap_or(0),
        prompt: prompt.to_vec(),
        cached_tokens: 0,
        cached_blocks: Vec::new(),
        generated: Vec::new(),
    }
}

/// A token of a step's answer as the engine reports it.
pub fn to_sampled(t: &pb::SampledToken) -> SampledToken {
    SampledToken {
        id: t.id,
        logprob: t.logprob,
        top_logprobs: t.top_logprobs.iter().map(|l| (l.id, l.logprob)).collect(),
    }
}

/// One sequence as the driver schedules it.
#[derive(Clone, Debug)]
pub struct Seq {
    /// Its id on the stream.
    pub id: u64,
    /// Its prompt's token ids.
    pub prompt: Vec<u32>,
    /// How it samples.
    pub sampling: SamplingParams,
    /// Tokens to generate (the engine's count).
    pub want: usize,
    /// The driver step at which it joins.
    pub join: usize,
    /// Prompt tokens per prefill step ([`CHUNK`] unless a test wants longer steps).
    pub chunk: usize,
    /// Prompt tokens sent so far.
    pub prefilled: usize,
    /// Tokens it got so far.
    pub out: Vec<SampledToken>,
    /// The trailing tokens of `prompt` that a previous plan generated (a migrated or resumed
    /// sequence): its start names them, so the sampler resumes after them. Empty for a new
    /// sequence.
    pub generated: Vec<u32>,
    /// How many of `generated` go in one step: 1 (as decode fed them) unless a test shows
    /// what else would happen.
    pub generated_chunk: usize,
}

impl Seq {
    /// Sequence `id` resuming `reference` (the engine's prompt ids and tokens) after its first
    /// `k` tokens, as the coordinator replays a migrated sequence: its prompt is the reference
    /// prompt (in chunks) followed by them (one per step), and it wants the rest.
    pub fn resumed(
        id: u64,
        reference: &(Vec<u32>, Vec<SampledToken>),
        sampling: &SamplingParams,
        k: usize,
    ) -> Self {
        let generated: Vec<u32> = reference.1[..k].iter().map(|t| t.id).collect();
        Self {
            id,
            prompt: reference.0.iter().chain(&generated).copied().collect(),
            sampling: sampling.clone(),
            want: reference.1.len() - k,
            join: 0,
            chunk: CHUNK,
            prefilled: 0,
            out: Vec::new(),
            generated,
            generated_chunk: 1,
        }
    }
}

impl Seq {
    /// Its part of step `step`: a prefill chunk of at most `chunk` tokens (the first with
    /// its start, the last sampling), then its last token; `None` while it waits to join or
    /// once it has `want` tokens.
    pub fn next(&mut self, step: usize) -> Option<pb::SeqStep> {
        if step < self.join || self.out.len() >= self.want {
            return None;
        }
        if self.prefilled < self.prompt.len() {
            // A replayed sequence's generated tokens go one per step, as decode fed them.
            let base = self.prompt.len() - self.generated.len();
            let end = if self.prefilled < base {
                (self.prefilled + self.chunk).min(base)
            } else {
                (self.prefilled + self.generated_chunk.max(1)).min(self.prompt.len())
            };
            let s = pb::SeqStep {
                seq_id: self.id,
                tokens: self.prompt[self.prefilled..end].to_vec(),
                sample: end == self.prompt.len(),
                start: (self.prefilled == 0).then(|| {
                    let prompt = &self.prompt[..self.prompt.len() - self.generated.len()];
                    pb::SeqStart {
                        generated: self.generated.clone(),
                        ..seq_start(prompt, &self.sampling)
                    }
                }),
            };
            self.prefilled = end;
            return Some(s);
        }
        let last = self.out.last().map(|t| t.id)?;
        Some(pb::SeqStep {
            seq_id: self.id,
            tokens: vec![last],
            sample: true,
            start: None,
        })
    }
}

/// Sequences `100 + i` for reference `i`, the engine's `(prompt ids, tokens)`: each with its
/// prompt, sampling and join step, wanting as many tokens as the engine produced.
pub fn seqs_for(
    refs: &[(Vec<u32>, Vec<SampledToken>)],
    sampling: &[SamplingParams],
    joins: &[usize],
) -> Vec<Seq> {
    refs.iter()
        .zip(sampling)
        .zip(joins)
        .enumerate()
        .map(|(i, (((prompt, out), sampling), &join))| Seq {
            id: 100 + i as u64,
            prompt: prompt.clone(),
            sampling: sampling.clone(),
            want: out.len(),
            join,
            chunk: CHUNK,
            prefilled: 0,
            out: Vec::new(),
            generated: Vec::new(),
            generated_chunk: 1,
        })
        .collect()
}

/// Runs `seqs` to completion in shared steps, releasing each in-band on the step after it
/// finishes (and in a last, empty step for the ones that finished last).
///
/// # Panics
/// When a step fails, or answers for a sequence not in `seqs`.
pub async fn drive(d: &mut Driver, seqs: &mut [Seq]) {
    let mut release = Vec::new();
    for step in 0.. {
        let batch: Vec<pb::SeqStep> = seqs.iter_mut().filter_map(|s| s.next(step)).collect();
        if batch.is_empty() && seqs.iter().all(|s| s.out.len() >= s.want) {
            break;
        }
        let r = d
            .step(batch, std::mem::take(&mut release))
            .await
            .expect("step");
        for t in &r.tokens {
            let s = seqs
                .iter_mut()
                .find(|s| s.id == t.seq_id)
                .expect("known seq");
            s.out.push(to_sampled(t));
            if s.out.len() == s.want {
                release.push(s.id);
            }
        }
    }
    if !release.is_empty() {
        d.step(Vec::new(), release).await.expect("release step");
    }
}
