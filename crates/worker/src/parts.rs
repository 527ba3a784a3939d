//! Hidden states in parts on a pipeline stream: a step whose hidden states are longer than
//! [`PART_BYTES`] goes to the next stage as several `StepRequest` messages — the first with
//! the step and the first part (`hidden_parts` = how many), then one message per further part
//! (only `step_id` and `hidden` set) — so no gRPC message grows with the prompt (an 8k-token
//! prompt's states at width 576 are 18 MB; a 64k one of a wide model would pass any limit).
//!
//! The sender splits in the outbound stream itself ([`Parts`]), so the queue that feeds it
//! still holds one entry per step (its bound counts steps, as before). The receiver
//! ([`Assembler`]) joins the parts before the step runs and checks that they belong to it;
//! it keeps a half-assembled step in itself, not in the future that reads, so the pipeline's
//! `select!` may drop that future between messages without losing a part.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use tessera_proto::cluster::v1 as pb;
use tokio_stream::{Stream, StreamExt};
use tonic::Status;

/// Bytes of hidden states per message (a million f32 values).
pub(crate) const PART_BYTES: usize = 4 << 20;

/// The most parts one step may announce (16 GiB of hidden states at [`PART_BYTES`]), so a
/// malformed count cannot make the receiver wait for or hold more than that.
const MAX_PARTS: u32 = 4096;

/// `req` as the messages that carry it: itself when its hidden states fit one part.
pub(crate) fn split(mut req: pb::StepRequest, part: usize) -> Vec<pb::StepRequest> {
    if req.hidden.len() <= part {
        req.hidden_parts = 0;
        return vec![req];
    }
    let hidden = std::mem::take(&mut req.hidden);
    let mut chunks = hidden.chunks(part);
    let n = chunks.len();
    req.hidden = chunks.next().map(<[u8]>::to_vec).unwrap_or_default();
    req.hidden_parts = u32::try_from(n).unwrap_or(u32::MAX);
    let step_id = req.step_id;
    let mut out = Vec::with_capacity(n);
    out.push(req);
    out.extend(chunks.map(|c| pb::StepRequest {
        step_id,
        hidden: c.to_vec(),
        ..Default::default()
    }));
    out
}

/// A stream of steps as the messages that carry them ([`split`] at [`PART_BYTES`]).
pub(crate) struct Parts<S> {
    steps: S,
    queued: VecDeque<pb::StepRequest>,
}

impl<S> Parts<S> {
    /// The messages of `steps`.
    pub(crate) fn new(steps: S) -> Self {
        Self {
            steps,
            queued: VecDeque::new(),
        }
    }
}

impl<S: Stream<Item = pb::StepRequest> + Unpin> Stream for Parts<S> {
    type Item = pb::StepRequest;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if let Some(m) = self.queued.pop_front() {
            return Poll::Ready(Some(m));
        }
        match Pin::new(&mut self.steps).poll_next(cx) {
            Poll::Ready(Some(step)) => {
                self.queued = split(step, PART_BYTES).into();
                Poll::Ready(self.queued.pop_front())
            }
            other => other,
        }
    }
}

/// Why [`Assembler::next`] has no step.
#[derive(Debug)]
pub(crate) enum Inbound {
    /// The stream failed (the caller is gone).
    Stream(Status),
    /// The caller sent a step's parts wrongly.
    Parts(Status),
}

/// Joins the parts of each step read from an inbound stream.
#[derive(Debug, Default)]
pub(crate) struct Assembler {
    /// The step being assembled and how many parts it still awaits.
    pending: Option<(pb::StepRequest, u32)>,
}

impl Assembler {
    /// The next whole step of `inbound`; `None` when the stream ends between steps.
    /// Cancel-safe: what was read stays here for the next call.
    ///
    /// # Errors
    /// [`Inbound::Stream`]: the stream's own error; [`Inbound::Parts`]: INVALID_ARGUMENT
    /// naming `hidden_parts` when a part count is out of range, a message other than the
    /// step's next part arrives, or the stream ends in the middle of a step.
    pub(crate) async fn next<S>(
        &mut self,
        inbound: &mut S,
    ) -> Result<Option<pb::StepRequest>, Inbound>
    where
        S: Stream<Item = Result<pb::StepRequest, Status>> + Unpin,
    {
        loop {
            let msg = inbound.next().await.transpose().map_err(Inbound::Stream)?;
            let Some((mut step, left)) = self.pending.take() else {
                let Some(step) = msg else {
                    return Ok(None);
                };
                if step.hidden_parts > MAX_PARTS {
                    return Err(invalid(format!(
                        "step {} announces {} parts; at most {MAX_PARTS}",
                        step.step_id, step.hidden_parts
                    )));
                }
                if step.hidden_parts <= 1 {
                    return Ok(Some(step));
                }
                let left = step.hidden_parts - 1;
                self.pending = Some((step, left));
                continue;
            };
            let Some(part) = msg else {
                return Err(invalid(format!(
                    "the stream ended with {left} parts of step {} still to come",
                    step.step_id
                )));
            };
            let lone = part.seqs.is_empty()
                && part.release.is_empty()
                && part.prefix_ops.is_empty()
                && part.hidden_parts == 0;
            if part.step_id != step.step_id || !lone {
                return Err(invalid(format!(
                    "expected part {} of step {}'s hidden states; got a message of step {}{}",
                    step.hidden_parts - left + 1,
                    step.step_id,
                    part.step_id,
                    if lone { "" } else { " with other fields set" }
                )));
            }
            step.hidden.extend_from_slice(&part.hidden);
            if left == 1 {
                return Ok(Some(step));
            }
            self.pending = Some((step, left - 1));
        }
    }
}

fn invalid(reason: String) -> Inbound {
    Inbound::Parts(Status::invalid_argument(format!("hidden_parts: {reason}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn step(id: u64, hidden: Vec<u8>) -> pb::StepRequest {
        pb::StepRequest {
            plan_epoch: 3,
            step_id: id,
            seqs: vec![pb::SeqStep {
                seq_id: id,
                tokens: vec![1, 2],
                ..Default::default()
            }],
            hidden,
            ..Default::default()
        }
    }

    async fn assemble(msgs: Vec<pb::StepRequest>) -> Result<Vec<pb::StepRequest>, Inbound> {
        let mut inbound = tokio_stream::iter(msgs.into_iter().map(Ok));
        let mut a = Assembler::default();
        let mut out = Vec::new();
        while let Some(s) = a.next(&mut inbound).await? {
            out.push(s);
        }
        Ok(out)
    }

    fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(f)
    }

    /// Ensures that a step longer than a part becomes messages of at most a part each, only
    /// the first carrying the step, and a short step stays one message.
    #[test]
    fn long_steps_split_into_bounded_parts() {
        let msgs = split(step(5, vec![7; 10]), 4);
        assert_eq!(msgs.len(), 3);
        assert_eq!(msgs[0].hidden_parts, 3);
        assert_eq!(msgs[0].seqs.len(), 1);
        assert!(
            msgs[1..]
                .iter()
                .all(|m| m.seqs.is_empty() && m.step_id == 5)
        );
        let sizes: Vec<usize> = msgs.iter().map(|m| m.hidden.len()).collect();
        assert_eq!(sizes, vec![4, 4, 2]);
        let one = split(step(6, vec![1; 4]), 4);
        assert_eq!((one.len(), one[0].hidden_parts), (1, 0));
    }

    /// Ensures that a part of another step, a part with the step's fields, a count above the
    /// bound and a stream ending mid-step are refused naming `hidden_parts`.
    #[test]
    fn broken_parts_are_refused() {
        let mut other = split(step(1, vec![0; 8]), 4);
        other[1].step_id = 2;
        let mut fields = split(step(1, vec![0; 8]), 4);
        fields[1].release = vec![9];
        let mut cut = split(step(1, vec![0; 12]), 4);
        cut.pop();
        let mut huge = step(1, vec![]);
        huge.hidden_parts = MAX_PARTS + 1;
        for msgs in [other, fields, cut, vec![huge]] {
            let Err(Inbound::Parts(e)) = block_on(assemble(msgs)) else {
                panic!("refused as malformed parts");
            };
            assert_eq!(e.code(), tonic::Code::InvalidArgument);
            assert!(e.message().starts_with("hidden_parts:"), "{}", e.message());
        }
    }

    /// Ensures that the assembler keeps a half-joined step when the future reading it is
    /// dropped between parts (as `select!` does), and the step comes out whole later.
    #[test]
    fn a_dropped_read_loses_no_part() {
        block_on(async {
            let (tx, rx) = tokio::sync::mpsc::channel(8);
            let mut inbound = tokio_stream::wrappers::ReceiverStream::new(rx);
            let mut a = Assembler::default();
            let parts = split(step(4, (0..9).collect()), 4);
            tx.send(Ok(parts[0].clone())).await.expect("sent");
            tx.send(Ok(parts[1].clone())).await.expect("sent");
            let early =
                tokio::time::timeout(std::time::Duration::from_millis(20), a.next(&mut inbound));
            assert!(early.await.is_err(), "the step is not whole yet");
            tx.send(Ok(parts[2].clone())).await.expect("sent");
            let got = a.next(&mut inbound).await.expect("ok").expect("a step");
            assert_eq!(got.hidden, (0..9).collect::<Vec<u8>>());
            assert_eq!(got.seqs.len(), 1);
        });
    }

    proptest! {
        /// Ensures that any sequence of steps, split at any part size, is joined back into
        /// exactly those steps, and no message's hidden states exceed the part size.
        #[test]
        fn split_then_assemble_is_identity(
            lens in proptest::collection::vec(0usize..40, 0..6),
            part in 1usize..12,
        ) {
            let steps: Vec<pb::StepRequest> = lens
                .iter()
                .enumerate()
                .map(|(i, &n)| step(i as u64, (0..n).map(|b| (b * 7 + i) as u8).collect()))
                .collect();
            let msgs: Vec<pb::StepRequest> =
                steps.iter().cloned().flat_map(|s| split(s, part)).collect();
            prop_assert!(msgs.iter().all(|m| m.hidden.len() <= part));
            let mut back = block_on(assemble(msgs)).expect("assembles");
            for s in &mut back {
                s.hidden_parts = 0;
            }
            prop_assert_eq!(back, steps);
        }
    }
}
