//! Entry points for the fuzz targets (`fuzz/`, `crates/fuzz`) into what a worker decodes from
//! other processes and keeps private: the pipeline streams of steps (hidden states in parts,
//! sequences, releases, prefix-cache ops) that a previous stage sends, and the frames of the
//! tensor-parallel group protocol.
//!
//! Each function takes arbitrary bytes and must neither panic nor leak: a [`Stage`] checks
//! after every input that closing its streams gave back every KV block. Not part of the API:
//! hidden from the docs and free to change with the targets.

use std::collections::BTreeMap;
use std::future::Future as _;
use std::io::Cursor;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use prost::Message as _;
use tessera_kernels::ThreadPool;
use tessera_proto::cluster::v1 as pb;
use tessera_proto::v1 as public;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::Status;

use crate::error::WorkerError;
use crate::executor::Executor;
use crate::group::{CHUNK_VALUES, Frame, MORE};
use crate::parts::Assembler;
use crate::seqs::StreamId;
use crate::shard::{ShardStats, StepOutput};

/// Inbound streams an input may open (its records name one by a byte, modulo this).
const STREAMS: u8 = 4;

/// One stream as the pipeline reads it: the messages received so far and the assembler that
/// joins their parts.
struct Inbound {
    tx: mpsc::UnboundedSender<Result<pb::StepRequest, Status>>,
    rx: UnboundedReceiverStream<Result<pb::StepRequest, Status>>,
    parts: Assembler,
}

/// A loaded pipeline stage receiving hidden states, driven as the pipeline drives it.
pub struct Stage {
    exec: Executor,
    hidden: usize,
    steps: Steps,
}

/// What one input's steps came to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Steps {
    /// Steps the stage ran.
    pub ran: usize,
    /// Steps it refused (each ends its stream).
    pub refused: usize,
}

impl std::fmt::Debug for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stage").finish_non_exhaustive()
    }
}

impl Stage {
    /// Loads layers `layers` of `model` (a name or path the model cache resolves) with
    /// `kv_tokens` tokens of KV cache, on one compute thread, as plan epoch 1: the last stage
    /// (samples) when `head`, otherwise a middle stage whose output would go to an address
    /// that is never dialed (the executor only names it).
    ///
    /// # Errors
    /// As the worker's `LoadShard`.
    pub fn load(
        model: &str,
        layers: std::ops::Range<u32>,
        head: bool,
        kv_tokens: u32,
    ) -> Result<Self, WorkerError> {
        let pool = ThreadPool::new(1).map_err(|e| WorkerError::Executor(e.to_string()))?;
        let mut exec = Executor::new(
            pool,
            None,
            0,
            std::sync::Arc::new(ShardStats::default()),
            None,
            Box::new(|_| std::sync::Arc::new(|_| {})),
            crate::Backend::Cpu,
        );
        exec.load(pb::LoadShardRequest {
            model: model.to_owned(),
            plan_epoch: 1,
            shard: Some(public::ShardAssignment {
                layer_start: layers.start,
                layer_end: layers.end,
                embed: false,
                head,
                ..Default::default()
            }),
            next_address: if head {
                String::new()
            } else {
                "127.0.0.1:9".into()
            },
            kv_tokens,
            ..Default::default()
        })?;
        let hidden = exec.hidden_width().unwrap_or(0);
        Ok(Self {
            exec,
            hidden,
            steps: Steps::default(),
        })
    }

    /// Runs one input: records `[stream: u8][kind: u8][len: u16 LE][payload]`, where kind 0
    /// is a `StepRequest` message (protobuf) on that inbound stream, 1 an out-of-band release
    /// of the payload's u64 LE sequence ids, and anything else the stream's end. A stream
    /// whose step fails ends, as the pipeline ends it; every stream ends with the input.
    ///
    /// Returns how many steps ran and how many were refused.
    ///
    /// # Panics
    /// When the stage keeps a sequence or a KV block after all its streams closed, or a step
    /// forwards hidden states of the wrong size.
    pub fn run(&mut self, data: &[u8]) -> Steps {
        let mut open: BTreeMap<StreamId, Option<Inbound>> = BTreeMap::new();
        let mut rest = data;
        while let [stream, kind, l0, l1, tail @ ..] = rest {
            let len = usize::from(u16::from_le_bytes([*l0, *l1])).min(tail.len());
            let (payload, next) = tail.split_at(len);
            rest = next;
            let stream = StreamId::from(stream % STREAMS) + 1;
            let slot = open.entry(stream).or_insert_with(|| {
                let (tx, rx) = mpsc::unbounded_channel();
                Some(Inbound {
                    tx,
                    rx: UnboundedReceiverStream::new(rx),
                    parts: Assembler::default(),
                })
            });
            let ended = match (kind, slot.as_mut()) {
                // An ended stream receives nothing more (its caller saw the error).
                (_, None) => false,
                (0, Some(inbound)) => match pb::StepRequest::decode(payload) {
                    Ok(msg) => self.receive(stream, inbound, msg),
                    // tonic refuses an undecodable message before the pipeline sees it.
                    Err(_) => true,
                },
                (1, Some(_)) => {
                    let ids: Vec<u64> = payload
                        .chunks_exact(8)
                        .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                        .collect();
                    self.exec.release(&ids);
                    false
                }
                (_, Some(_)) => true,
            };
            if ended {
                *slot = None;
                self.exec.close_stream(stream);
            }
        }
        for stream in open.keys() {
            self.exec.close_stream(*stream);
        }
        let (live, free, total, cached) = self.exec.occupancy().unwrap_or_default();
        assert_eq!(live, 0, "sequences outlive their streams");
        assert_eq!(cached, 0, "prefix blocks outlive their streams");
        assert_eq!(free, total, "KV blocks leak after every stream closed");
        std::mem::take(&mut self.steps)
    }

    /// Hands one message to a stream's assembler and runs the step it completes (counting it);
    /// whether the stream ends (a malformed part or a failed step).
    fn receive(&mut self, stream: StreamId, inbound: &mut Inbound, msg: pb::StepRequest) -> bool {
        if inbound.tx.send(Ok(msg)).is_err() {
            return true;
        }
        // The assembler keeps a half-assembled step in itself, so a poll that finds no more
        // messages (Pending) loses nothing: the pipeline's select drops it the same way.
        let next = {
            let fut = pin!(inbound.parts.next(&mut inbound.rx));
            fut.poll(&mut Context::from_waker(Waker::noop()))
        };
        match next {
            Poll::Pending | Poll::Ready(Ok(None)) => false,
            Poll::Ready(Err(_)) => true,
            Poll::Ready(Ok(Some(step))) => {
                let rows: usize = step.seqs.iter().map(|s| s.tokens.len()).sum();
                let out = self.exec.step(stream, step);
                if out.is_ok() {
                    self.steps.ran += 1;
                } else {
                    self.steps.refused += 1;
                }
                match out {
                    Ok(StepOutput::Forward { request, .. }) => {
                        assert_eq!(
                            request.hidden.len(),
                            rows * self.hidden * 4,
                            "a step forwards one row of hidden states per token"
                        );
                        false
                    }
                    Ok(StepOutput::Answer(_)) => false,
                    Err(_) => true,
                }
            }
        }
    }
}

/// A byte stream of group frames as a peer's link reads it: each whole frame is parsed (what
/// the link does) and read again through [`Frame::read_from`] (what the handshake does); the
/// two agree, and a frame re-encodes to the bytes read — except an abort message that was not
/// UTF-8 (it is read lossily) and a partial that is one chunk of a longer one (only the
/// exchange splits and joins chunks; [`Frame`] encodes a whole partial).
///
/// # Panics
/// When the two readers disagree or a frame does not re-encode to its bytes.
pub fn group_frames(data: &[u8]) {
    let mut at = 0;
    let mut out = Vec::new();
    while let Ok(Some((frame, used))) = Frame::parse(&data[at..]) {
        let whole = &data[at..at + used];
        let read = Frame::read_from(&mut Cursor::new(whole));
        // Debug text: f32 payloads hold NaNs, which never equal themselves.
        assert_eq!(
            read.as_ref().map(|f| format!("{f:?}")).ok(),
            Some(format!("{frame:?}")),
            "both readers agree"
        );
        let canonical = match &frame {
            Frame::Abort { .. } => std::str::from_utf8(&whole[13..]).is_ok(),
            Frame::Partial { point, data, .. } => point & MORE == 0 && data.len() <= CHUNK_VALUES,
            _ => true,
        };
        if canonical {
            frame.encode_into(&mut out);
            assert_eq!(out, whole, "a frame re-encodes to the bytes it came from");
        }
        at += used;
    }
}
