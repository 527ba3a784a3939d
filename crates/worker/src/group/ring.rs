//! The context-parallel ring over a group's links: the exchange the model's ring attention
//! calls ([`RingComm`]), among the ranks of one column of the group (the same `tp_rank`,
//! `cp_rank` 0, 1, …, P − 1).
//!
//! - A K/V block goes to the next rank of the ring as a [`Frame::Partial`] with point
//!   [`RING_BLOCK`]: [`RingComm::send_next`] encodes it and writes what the socket takes at
//!   once, without waiting; the model then computes on the block while the kernel's socket
//!   buffers carry it, and [`RingComm::recv_prev`] writes the rest while it reads the
//!   previous rank's block. Every rank reads its previous rank in that same exchange, so the
//!   ring never waits on itself however large the blocks are.
//! - Partial attention results and a split stage's rows are all-gathered with point
//!   [`RING_GATHER`]: every rank of the column sends to every other, as a reduction does.
//!
//! Both travel as partial chunks of at most `frame::CHUNK_VALUES` values (a 64k-token
//! prompt's block is many megabytes), taken as they arrive.
//!
//! Frames carry the step's tag and the layer, so a rank out of step fails the step (with
//! the peer named) instead of mixing data; a peer's silence fails it after the group's
//! timeout, as every collective here does.
//!
//! The model takes the tensor-parallel reduction and the ring as two objects, both of which
//! are this one group: [`GroupReduce`] and [`GroupRing`] share it through a `RefCell` (the
//! model never calls one from inside the other).

use std::cell::RefCell;
use std::time::Instant;

use tessera_model::ModelError;
use tessera_model::stage::{Reduce, ReducePoint, RingComm};

use super::frame::{Frame, encode_partial};
use super::{Group, describe};

/// The point code of a K/V block passed round the ring (past the reduction points').
const RING_BLOCK: u8 = 16;
/// The point code of an all-gather among the ring's ranks.
const RING_GATHER: u8 = 17;

/// The ring's side of a group: the block in flight.
#[derive(Debug, Default)]
pub(super) struct RingState {
    /// The encoded block handed to the next rank.
    out: Vec<u8>,
    /// Bytes of it on the wire.
    sent: usize,
    /// The layer of the block in flight, if one is.
    pending: Option<usize>,
}

impl Group {
    /// This rank's index in its ring.
    fn cp_rank(&self) -> usize {
        self.rank / self.tp
    }

    /// Ranks in this rank's ring.
    fn cp_ranks(&self) -> usize {
        self.ranks / self.tp
    }

    /// The group rank of ring rank `cp` in this rank's column.
    fn column_rank(&self, cp: usize) -> usize {
        cp * self.tp + self.rank % self.tp
    }

    /// The index in `links` of group rank `r` (not this rank).
    fn link_of(&self, r: usize) -> Result<usize, ModelError> {
        self.links
            .iter()
            .position(|l| l.rank == r)
            .ok_or_else(|| ModelError::Collective(format!("group rank {r} has no link")))
    }

    fn ring_send_next(&mut self, layer: usize, block: &[f32]) -> Result<(), ModelError> {
        if let Some(l) = self.ring.pending {
            return Err(self.fail(format!(
                "ring: a block of layer {l} is still in flight at layer {layer}"
            )));
        }
        let next = self.link_of(self.column_rank((self.cp_rank() + 1) % self.cp_ranks()))?;
        encode_partial(
            &mut self.ring.out,
            self.tag,
            layer as u32,
            RING_BLOCK,
            block,
        );
        self.ring.sent = 0;
        // What the socket takes now; the rest goes in `ring_recv_prev`.
        if let Err(e) = self.links[next].write_some(&self.ring.out, &mut self.ring.sent) {
            return Err(self.fail(e));
        }
        self.wire.written += self.ring.sent as u64;
        self.ring.pending = Some(layer);
        Ok(())
    }

    fn ring_recv_prev(&mut self, layer: usize, block: &mut Vec<f32>) -> Result<(), ModelError> {
        let p = self.cp_ranks();
        let next = self.link_of(self.column_rank((self.cp_rank() + 1) % p))?;
        let prev = self.link_of(self.column_rank((self.cp_rank() + p - 1) % p))?;
        let total = self.ring.out.len();
        let already = match self.ring.pending.take() {
            Some(_) => self.ring.sent,
            None => total,
        };
        let (tag, timeout) = (self.tag, self.timeout);
        let sent = |i| if i == next { already } else { total };
        if let Err(e) = self.wire.exchange_partials_from(
            &self.links,
            &self.ring.out,
            sent,
            |i| i == prev,
            (tag, layer as u32, RING_BLOCK),
            timeout,
        ) {
            return Err(self.fail(e));
        }
        match self.wire.got[prev].take() {
            Some(Frame::Partial {
                tag: t,
                layer: l,
                point: RING_BLOCK,
                data,
            }) if t == tag && l as usize == layer => {
                *block = data;
                Ok(())
            }
            other => {
                let msg = self.links[prev].named(&format!(
                    "expected the ring's K/V block of step {tag}, layer {layer}; got {}",
                    describe(other.as_ref())
                ));
                Err(self.fail(msg))
            }
        }
    }

    fn ring_all_gather(
        &mut self,
        layer: usize,
        local: &[f32],
        out: &mut Vec<f32>,
    ) -> Result<(), ModelError> {
        let (tag, timeout) = (self.tag, self.timeout);
        encode_partial(&mut self.out, tag, layer as u32, RING_GATHER, local);
        let column: Vec<bool> = self
            .links
            .iter()
            .map(|l| l.rank % self.tp == self.rank % self.tp)
            .collect();
        if let Err(e) = self.wire.exchange_partials(
            &self.links,
            &self.out,
            |i| column[i],
            |i| column[i],
            (tag, layer as u32, RING_GATHER),
            timeout,
        ) {
            return Err(self.fail(e));
        }
        out.clear();
        for cp in 0..self.cp_ranks() {
            let r = self.column_rank(cp);
            if r == self.rank {
                out.extend_from_slice(local);
                continue;
            }
            let i = self.link_of(r)?;
            match self.wire.got[i].take() {
                Some(Frame::Partial {
                    tag: t,
                    layer: l,
                    point: RING_GATHER,
                    data,
                }) if t == tag && l as usize == layer && data.len() == local.len() => {
                    out.extend_from_slice(&data);
                }
                other => {
                    let msg = self.links[i].named(&format!(
                        "expected the ring's gather of step {tag}, layer {layer} ({} values); \
                         got {}",
                        local.len(),
                        describe(other.as_ref())
                    ));
                    return Err(self.fail(msg));
                }
            }
        }
        Ok(())
    }

    /// Forgets a block left in flight by a failed step.
    pub(super) fn reset_ring(&mut self) {
        self.ring.pending = None;
    }
}

/// The group as the model's tensor-parallel reduction (a no-op for a row of one rank).
pub(crate) struct GroupReduce<'c, 'g>(pub &'c RefCell<&'g mut Group>);

/// The group as the model's context-parallel ring.
pub(crate) struct GroupRing<'c, 'g>(pub &'c RefCell<&'g mut Group>);

fn borrow<'c, 'g>(
    cell: &'c RefCell<&'g mut Group>,
) -> Result<std::cell::RefMut<'c, &'g mut Group>, ModelError> {
    cell.try_borrow_mut()
        .map_err(|_| ModelError::Collective("the group is in another collective".into()))
}

impl Reduce for GroupReduce<'_, '_> {
    fn reduce(
        &mut self,
        point: ReducePoint,
        layer: usize,
        x: &mut [f32],
    ) -> tessera_model::Result<()> {
        let mut g = borrow(self.0)?;
        if g.tp == 1 {
            return Ok(());
        }
        Reduce::reduce(&mut **g, point, layer, x)
    }

    fn gather_logits(
        &mut self,
        local: &[f32],
        m: usize,
        out: &mut Vec<f32>,
    ) -> tessera_model::Result<bool> {
        let mut g = borrow(self.0)?;
        Reduce::gather_logits(&mut **g, local, m, out)
    }
}

impl RingComm for GroupRing<'_, '_> {
    fn rank(&self) -> usize {
        self.0.borrow().cp_rank()
    }

    fn ranks(&self) -> usize {
        self.0.borrow().cp_ranks()
    }

    fn send_next(&mut self, layer: usize, block: &[f32]) -> tessera_model::Result<()> {
        let mut g = borrow(self.0)?;
        let started = Instant::now();
        let r = g.ring_send_next(layer, block);
        g.spent += started.elapsed();
        r
    }

    fn recv_prev(&mut self, layer: usize, block: &mut Vec<f32>) -> tessera_model::Result<()> {
        let mut g = borrow(self.0)?;
        let started = Instant::now();
        let r = g.ring_recv_prev(layer, block);
        g.spent += started.elapsed();
        r
    }

    fn all_gather(
        &mut self,
        layer: usize,
        local: &[f32],
        out: &mut Vec<f32>,
    ) -> tessera_model::Result<()> {
        let mut g = borrow(self.0)?;
        let started = Instant::now();
        let r = g.ring_all_gather(layer, local, out);
        g.spent += started.elapsed();
        r
    }
}
