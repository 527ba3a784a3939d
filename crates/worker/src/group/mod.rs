//! Stage groups: the ranks that serve one pipeline stage together — tensor-parallel ranks
//! (slices of every layer) times context-parallel ranks (slices of every sequence, a ring) —
//! talking directly to each other (never through the coordinator).
//!
//! A group of `T × P` ranks is numbered `cp_rank · T + tp_rank`. The tensor-parallel
//! collectives ([`Reduce`]) run among the `T` ranks of one context-parallel row (same
//! `cp_rank`); the ring's ([`tessera_model::stage::RingComm`], `ring.rs`) among the `P` ranks of
//! one column (same `tp_rank`), which hold the same heads. Both share the group's full mesh of
//! links; each collective reads and writes only the links of its row or column.
//!
//! Protocol. Every worker listens on a peer port ([`PeerListener`]) besides its gRPC port.
//! When a plan makes it rank `r` of a group of `R` ranks, its `LoadShard` names every rank's
//! peer address; it dials each rank below it (a [`frame::Frame::Hello`] first) and waits for
//! each rank above it to dial in, so every pair of ranks shares one connection ([`Link`]).
//! Rank 0 alone is in the pipeline: it receives each step on its inbound Pipeline stream,
//! hands it to the other ranks ([`Group::broadcast_step`]; its hidden states follow the step
//! frame as a partial, [`Group::receive_hidden`]), and all ranks run the stage's layers in
//! lockstep. Partials longer than `frame::CHUNK_VALUES` values (4 MiB: a long prompt's
//! hidden states, partial sums, K/V blocks) travel as several frames taken as they arrive, so
//! no frame grows with the prompt. At each reduction point every rank sends its partial sums
//! to every other rank and adds the `R` partials in rank order 0, 1, …, R−1 — the same
//! additions in the same order on every rank, so every rank holds the same bits and a rerun
//! gives them again.
//! On the last stage each rank sends its vocabulary slice of the logits to rank 0, which
//! samples. Rank 0 forwards hidden states to the next stage; the others answer nobody.
//!
//! Failure semantics: a step fails on every rank, never hangs.
//! - A peer's process dies: its connection ends, and the waiting rank fails the step at once
//!   with UNAVAILABLE naming the peer.
//! - A peer stops answering (stopped, partitioned): the wait for its frame fails after
//!   [`PEER_TIMEOUT`], well inside two heartbeat timeouts of the coordinator.
//! - A rank fails a step itself (a full KV cache, a bad request): it sends an abort to every
//!   peer, so they fail the step at once instead of waiting out the timeout; frames left over
//!   from a failed step are skipped by step number.
//! - Rank 0's connection ends: the other ranks free every sequence of the group (the
//!   coordinator re-plans; the group never serves again).
//!
//! Security: under mutual TLS (the default) every connection between ranks is TLS 1.3 with
//! the cluster's certificates (`secure.rs`): the peer port admits only certified workers, a
//! Hello is taken only from the worker the plan gives the rank it claims
//! (`LoadShardRequest.group_names`, checked when the group forms), and a dialling rank
//! accepts only the worker the plan names as the rank it dials. Under `--insecure-cluster`
//! the links are plain TCP and every claim is believed.

mod exchange;
mod frame;
mod link;
mod listener;
mod ring;
mod secure;

use std::io::Write;
use std::time::{Duration, Instant};

use tessera_model::ModelError;
use tessera_model::stage::{Reduce, ReducePoint};
use tessera_proto::cluster::v1 as pb;

use crate::error::WorkerError;
use exchange::Wire;
pub(crate) use frame::{CHUNK_VALUES, Frame, MORE};
use frame::{append_partial_bytes, encode_logits, encode_partial};
pub(crate) use link::{Control, ControlSink, Link};
pub(crate) use listener::{PeerListener, probe_rtt};
pub(crate) use ring::{GroupReduce, GroupRing};
pub(crate) use secure::PeerTls;

/// How long a rank waits for a peer's frame inside a step. Ranks run the same layers in
/// lockstep, so a wait this long means a stopped or cut-off peer; it is kept under the
/// coordinator's default heartbeat timeout (2 s) doubled, so requests fail in the bound the
/// coordinator promises.
pub(crate) const PEER_TIMEOUT: Duration = Duration::from_secs(3);
/// How long forming a group may take (the other ranks receive their `LoadShard` at about the
/// same time, and dial before loading any weights).
pub(crate) const FORM_TIMEOUT: Duration = Duration::from_secs(30);
/// How long telling a peer of an abort or a closed stream may wait for the peer to take it
/// (best effort: a peer that does not is failing on its own).
const NOTICE_TIMEOUT: Duration = Duration::from_millis(200);

/// The point code of the step's hidden states, which rank 0 sends after each step frame.
const HIDDEN: u8 = 32;

/// The wire code of a reduction point.
pub(crate) fn point_code(p: ReducePoint) -> u8 {
    match p {
        ReducePoint::Embed => 0,
        ReducePoint::AttnOut => 1,
        ReducePoint::MlpDown => 2,
    }
}

/// This rank's side of a formed group.
#[derive(Debug)]
pub(crate) struct Group {
    epoch: u64,
    rank: usize,
    ranks: usize,
    /// Tensor-parallel ranks per context-parallel row.
    tp: usize,
    /// One link per other rank, in rank order.
    links: Vec<Link>,
    /// The links' poller and exchange state.
    wire: Wire,
    /// The current step's number (rank 0 counts; the others take it from the step frame).
    tag: u64,
    timeout: Duration,
    /// Encoding buffer.
    out: Vec<u8>,
    /// Received partial sums, by rank (this rank's slot unused).
    parts: Vec<Vec<f32>>,
    /// Their sum.
    sum: Vec<f32>,
    /// Why the last collective failed, for the step's error.
    failure: Option<String>,
    /// Time spent in collectives (sending, waiting, adding) since last taken.
    spent: Duration,
    /// The ring's buffers (`ring.rs`).
    ring: ring::RingState,
}

impl Group {
    /// Forms rank `rank` of the group whose ranks' peer addresses are `addrs` (rank order),
    /// held by the workers named `names` (rank order; needed under mutual TLS, ignored in the
    /// clear), `tp` tensor-parallel ranks per context-parallel row: dials the ranks below,
    /// waits for the ranks above. `control` receives rank 0's steps (ranks other than 0).
    ///
    /// # Errors
    /// [`WorkerError::InvalidArgument`] for a bad address list, or a name list that does not
    /// match it under mutual TLS; [`WorkerError::PeerUnreachable`] naming the rank that could
    /// not be reached, whose certificate is not its worker's, or that did not dial in within
    /// [`FORM_TIMEOUT`].
    pub(crate) fn form(
        epoch: u64,
        rank: usize,
        tp: usize,
        (addrs, names): (&[String], &[String]),
        listener: &PeerListener,
        control: Option<ControlSink>,
    ) -> Result<Self, WorkerError> {
        let ranks = addrs.len();
        if rank >= ranks || tp == 0 || !ranks.is_multiple_of(tp) {
            return Err(WorkerError::invalid(
                "shard.tp_rank",
                format!(
                    "rank {rank} of a group of {ranks} peer addresses, {tp} tensor-parallel \
                     ranks per ring rank"
                ),
            ));
        }
        // Under mutual TLS every link's certificate is checked against its rank's worker.
        check_names(listener.tls(), names, ranks)?;
        let holders = listener.tls().is_mutual().then_some(names);
        let holder = |r: usize| holders.map(|n| n[r].as_str());
        listener.forget_before(epoch);
        let deadline = Instant::now() + FORM_TIMEOUT;
        let mut links = Vec::with_capacity(ranks - 1);
        let io = |r: usize, e: std::io::Error| WorkerError::PeerUnreachable {
            peer: addrs[r].clone(),
            message: format!("tensor-parallel rank {r} ({}): {e}", addrs[r]),
        };
        for (j, addr) in addrs.iter().enumerate().take(rank) {
            let mut s = listener.tls().dial(addr, deadline).map_err(|e| io(j, e))?;
            if let (Some(want), Some(got)) = (holder(j), s.peer())
                && got.name() != want
            {
                return Err(WorkerError::PeerUnreachable {
                    peer: addr.clone(),
                    message: format!(
                        "tensor-parallel rank {j} ({addr}): its certificate names {got}, not \
                         worker {want}"
                    ),
                });
            }
            Frame::Hello {
                epoch,
                from: rank as u32,
                to: j as u32,
            }
            .write_to(&mut s)
            .and_then(|()| s.flush())
            .map_err(|e| io(j, e))?;
            let sink = (j == 0).then(|| control.clone()).flatten();
            links.push(Link::start(j, addr.clone(), s, sink).map_err(|e| io(j, e))?);
        }
        for (k, addr) in addrs.iter().enumerate().skip(rank + 1) {
            let s = listener
                .take(epoch, k as u32, rank as u32, holder(k), deadline)
                .ok_or_else(|| WorkerError::PeerUnreachable {
                    peer: addr.clone(),
                    message: format!(
                        "tensor-parallel rank {k} ({addr}) of epoch {epoch} did not connect \
                         within {} s",
                        FORM_TIMEOUT.as_secs()
                    ),
                })?;
            links.push(Link::start(k, addr.clone(), s, None).map_err(|e| io(k, e))?);
        }
        let wire = Wire::new(&mut links).map_err(|e| {
            WorkerError::Unavailable(format!("tensor-parallel group: cannot poll its links: {e}"))
        })?;
        Ok(Self {
            epoch,
            rank,
            ranks,
            tp,
            links,
            wire,
            tag: 0,
            timeout: PEER_TIMEOUT,
            out: Vec::new(),
            parts: vec![Vec::new(); ranks],
            sum: Vec::new(),
            failure: None,
            spent: Duration::ZERO,
            ring: ring::RingState::default(),
        })
    }

    /// Whether the group has more than one context-parallel rank (its stage runs a ring).
    pub(crate) fn is_ring(&self) -> bool {
        self.ranks > self.tp
    }

    /// Whether rank `r` is in this rank's tensor-parallel row (the same context-parallel
    /// rank; this rank included).
    fn same_row(&self, r: usize) -> bool {
        r / self.tp == self.rank / self.tp
    }

    /// This rank's index.
    pub(crate) fn rank(&self) -> usize {
        self.rank
    }

    /// The plan epoch the group was formed for.
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The other ranks' peer addresses.
    pub(crate) fn peer_addrs(&self) -> impl Iterator<Item = &str> {
        self.links.iter().map(|l| l.addr.as_str())
    }

    /// Rank 0: starts a new step and hands it to every other rank.
    ///
    /// # Errors
    /// UNAVAILABLE naming the rank that cannot be written to.
    pub(crate) fn broadcast_step(
        &mut self,
        stream: u64,
        req: &mut pb::StepRequest,
    ) -> Result<(), WorkerError> {
        self.tag += 1;
        self.failure = None;
        self.reset_ring();
        // The hidden states follow the step frame as partial chunks (see
        // [`Group::receive_hidden`]), so no frame grows with the prompt.
        let hidden = std::mem::take(&mut req.hidden);
        let frame = Frame::Step {
            tag: self.tag,
            stream,
            request: prost::Message::encode_to_vec(&*req),
        };
        req.hidden = hidden;
        frame.encode_into(&mut self.out);
        append_partial_bytes(&mut self.out, self.tag, 0, HIDDEN, &req.hidden);
        let (tag, timeout) = (self.tag, self.timeout);
        self.wire
            .exchange(&self.links, &self.out, |_| true, |_| false, tag, timeout)
            .map_err(WorkerError::Unavailable)
    }

    /// Another rank: starts step `tag`, as rank 0 numbered it.
    pub(crate) fn begin_step(&mut self, tag: u64) {
        self.tag = tag;
        self.failure = None;
        self.reset_ring();
    }

    /// Another rank, right after [`Group::begin_step`]: takes the step's hidden states, which
    /// rank 0 sends after the step frame as a partial at point [`HIDDEN`] (one empty frame
    /// when the step has none), into `hidden` as `StepRequest.hidden` carries them.
    ///
    /// # Errors
    /// UNAVAILABLE naming rank 0 when it fails, goes silent or sends anything else.
    pub(crate) fn receive_hidden(&mut self, hidden: &mut Vec<u8>) -> Result<(), WorkerError> {
        let (tag, timeout) = (self.tag, self.timeout);
        // Links are in rank order: rank 0's is the first.
        let got = self.wire.exchange_partials(
            &self.links,
            &[],
            |_| false,
            |i| i == 0,
            (tag, 0, HIDDEN),
            timeout,
        );
        if let Err(e) = got {
            self.failure = Some(e.clone());
            return Err(WorkerError::Unavailable(e));
        }
        match self.wire.got.first_mut().and_then(Option::take) {
            Some(Frame::Partial {
                tag: t,
                layer: 0,
                point: HIDDEN,
                data,
            }) if t == tag => {
                hidden.clear();
                crate::hidden::encode_into(&data, hidden);
                Ok(())
            }
            other => {
                let msg = self.links[0].named(&format!(
                    "expected the hidden states of step {tag}; got {}",
                    describe(other.as_ref())
                ));
                self.failure = Some(msg.clone());
                Err(WorkerError::Unavailable(msg))
            }
        }
    }

    /// Another rank: the step it began is over (done or failed, its abort sent); the link to
    /// rank 0 goes back to waiting for the next step.
    pub(crate) fn end_step(&self) {
        // Only that link has a reader thread to hand back to; links are in rank order.
        if self.rank != 0
            && let Some(to_rank0) = self.links.first()
        {
            to_rank0.end_step();
        }
    }

    /// Sends the frame in `self.out` to every peer, one at a time, best effort.
    fn notify_all(&mut self) {
        for i in 0..self.links.len() {
            let _ = self.wire.exchange(
                &self.links,
                &self.out,
                |j| j == i,
                |_| false,
                self.tag,
                NOTICE_TIMEOUT,
            );
        }
    }

    /// Tells every peer this rank failed the current step (best effort: a peer that is gone
    /// fails on its own).
    pub(crate) fn abort(&mut self, message: &str) {
        Frame::Abort {
            tag: self.tag,
            message: message.to_owned(),
        }
        .encode_into(&mut self.out);
        self.notify_all();
    }

    /// Rank 0: its inbound stream `stream` ended (best effort, as [`Group::abort`]).
    pub(crate) fn close_stream(&mut self, stream: u64) {
        Frame::Close { stream }.encode_into(&mut self.out);
        self.notify_all();
    }

    /// Time spent in collectives since the last call (what tensor parallelism costs a step
    /// beyond its share of the arithmetic, waiting for slower ranks included).
    pub(crate) fn take_spent(&mut self) -> Duration {
        std::mem::take(&mut self.spent)
    }

    /// Bytes written to the peers since the last call.
    pub(crate) fn take_written(&mut self) -> u64 {
        std::mem::take(&mut self.wire.written)
    }

    /// The reason the last collective failed, if one did in this step.
    pub(crate) fn take_failure(&mut self) -> Option<WorkerError> {
        self.failure.take().map(WorkerError::Unavailable)
    }

    fn fail(&mut self, msg: String) -> ModelError {
        self.failure = Some(msg.clone());
        ModelError::Collective(msg)
    }
}

impl Reduce for Group {
    fn reduce(
        &mut self,
        point: ReducePoint,
        layer: usize,
        x: &mut [f32],
    ) -> tessera_model::Result<()> {
        let started = Instant::now();
        let r = self.all_reduce(point, layer, x);
        self.spent += started.elapsed();
        r
    }

    fn gather_logits(
        &mut self,
        local: &[f32],
        m: usize,
        out: &mut Vec<f32>,
    ) -> tessera_model::Result<bool> {
        let started = Instant::now();
        let r = self.gather(local, m, out);
        self.spent += started.elapsed();
        r
    }
}

impl Group {
    /// [`Reduce::reduce`]: every rank sends its partial sums to every other rank, then adds
    /// all of them in rank order.
    fn all_reduce(
        &mut self,
        point: ReducePoint,
        layer: usize,
        x: &mut [f32],
    ) -> tessera_model::Result<()> {
        let code = point_code(point);
        encode_partial(&mut self.out, self.tag, layer as u32, code, x);
        let (tag, timeout) = (self.tag, self.timeout);
        let row: Vec<bool> = self.links.iter().map(|l| self.same_row(l.rank)).collect();
        if let Err(e) = self.wire.exchange_partials(
            &self.links,
            &self.out,
            |i| row[i],
            |i| row[i],
            (tag, layer as u32, code),
            timeout,
        ) {
            return Err(self.fail(e));
        }
        for i in (0..self.links.len()).filter(|&i| row[i]) {
            let r = self.links[i].rank;
            match self.wire.got[i].take() {
                Some(Frame::Partial {
                    tag: t,
                    layer: l,
                    point: p,
                    data,
                }) if t == tag && l as usize == layer && p == code && data.len() == x.len() => {
                    self.parts[r] = data;
                }
                other => {
                    let msg = self.links[i].named(&format!(
                        "expected partial sums of step {tag}, layer {layer}, {point:?} ({} \
                         values); got {}",
                        x.len(),
                        describe(other.as_ref())
                    ));
                    return Err(self.fail(msg));
                }
            }
        }
        // The row's sum, in rank order, identical on every rank of the row.
        let first = self.rank / self.tp * self.tp;
        self.sum.clear();
        if self.rank == first {
            self.sum.extend_from_slice(x);
        } else {
            self.sum.extend_from_slice(&self.parts[first]);
        }
        for r in first + 1..first + self.tp {
            let part: &[f32] = if r == self.rank { x } else { &self.parts[r] };
            for (s, p) in self.sum.iter_mut().zip(part) {
                *s += p;
            }
        }
        x.copy_from_slice(&self.sum);
        Ok(())
    }

    /// [`Reduce::gather_logits`]: the other ranks of the row send, its first rank assembles
    /// (only row 0 gathers: the ring's rank 0 holds the sampling rows).
    fn gather(
        &mut self,
        local: &[f32],
        m: usize,
        out: &mut Vec<f32>,
    ) -> tessera_model::Result<bool> {
        let (tag, timeout) = (self.tag, self.timeout);
        let first = self.rank / self.tp * self.tp;
        if self.rank != first {
            encode_logits(&mut self.out, tag, m as u32, local);
            let to = self.links.iter().position(|l| l.rank == first);
            if let Err(e) = self.wire.exchange(
                &self.links,
                &self.out,
                |i| Some(i) == to,
                |_| false,
                tag,
                timeout,
            ) {
                return Err(self.fail(e));
            }
            return Ok(false);
        }
        let row: Vec<bool> = self.links.iter().map(|l| self.same_row(l.rank)).collect();
        if let Err(e) = self
            .wire
            .exchange(&self.links, &[], |_| false, |i| row[i], tag, timeout)
        {
            return Err(self.fail(e));
        }
        for i in (0..self.links.len()).filter(|&i| row[i]) {
            let r = self.links[i].rank;
            match self.wire.got[i].take() {
                Some(Frame::Logits { tag: t, rows, data })
                    if t == tag && rows as usize == m && (m == 0 || data.len() % m == 0) =>
                {
                    self.parts[r] = data;
                }
                other => {
                    let msg = self.links[i].named(&format!(
                        "expected logits of step {tag} for {m} rows; got {}",
                        describe(other.as_ref())
                    ));
                    return Err(self.fail(msg));
                }
            }
        }
        out.clear();
        if m == 0 {
            return Ok(true);
        }
        let width = |v: &[f32]| v.len() / m;
        for row in 0..m {
            for r in first..first + self.tp {
                let part: &[f32] = if r == first { local } else { &self.parts[r] };
                let w = width(part);
                out.extend_from_slice(&part[row * w..(row + 1) * w]);
            }
        }
        Ok(true)
    }
}

fn describe(f: Option<&Frame>) -> String {
    let Some(f) = f else {
        return "nothing".into();
    };
    match f {
        Frame::Partial {
            tag,
            layer,
            point,
            data,
        } => format!(
            "partial sums of step {tag}, layer {layer}, point {point} ({} values)",
            data.len()
        ),
        Frame::Logits { tag, rows, data } => {
            format!(
                "logits of step {tag} for {rows} rows ({} values)",
                data.len()
            )
        }
        other => format!("{:?}", std::mem::discriminant(other)),
    }
}

/// Checks that `names` names the worker of each of a group's `ranks` ranks, which mutual TLS
/// needs to check every link's certificate (in the clear they are not used).
///
/// # Errors
/// [`WorkerError::InvalidArgument`] naming `group_names` when they are missing or too few.
pub(crate) fn check_names(
    tls: &PeerTls,
    names: &[String],
    ranks: usize,
) -> Result<(), WorkerError> {
    if tls.is_mutual() && (names.len() != ranks || names.iter().any(String::is_empty)) {
        return Err(WorkerError::invalid(
            "group_names",
            format!(
                "{} worker names for {ranks} ranks: under mutual TLS every rank's worker must \
                 be named",
                names.len()
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_attacks;
