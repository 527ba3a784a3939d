//! NCCL collectives for tensor parallelism (all-reduce) and ring attention (send/recv).
//!
//! A communicator is bootstrapped from a [`UniqueId`] made by one rank and carried to the others
//! out of band as 128 bytes (the coordinator sends them over gRPC). Each communicator runs on a
//! stream of its own, so communication overlaps compute on the device's compute stream; the
//! buffers' cudarc events order a collective after the kernels that wrote its input and before
//! the kernels that read its output.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream};
use cudarc::nccl::{Comm, Id, ReduceOp};

use crate::error::{CudaError, Result};

use super::device::{Device, Tensor16, drv};
use super::libs::probe_nccl;

/// Bytes of an NCCL unique id.
pub const UNIQUE_ID_BYTES: usize = 128;

fn nccl(op: &'static str) -> impl FnOnce(cudarc::nccl::result::NcclError) -> CudaError {
    move |e| CudaError::Nccl {
        op,
        message: format!("{:?}", e.0),
    }
}

/// The id every rank of one communicator is created with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UniqueId([u8; UNIQUE_ID_BYTES]);

impl UniqueId {
    /// A fresh id (made once, by one rank, then shared).
    ///
    /// # Errors
    /// [`CudaError::NoNccl`] without `libnccl`; [`CudaError::Nccl`] when NCCL fails.
    pub fn new() -> Result<Self> {
        probe_nccl()?;
        let id = Id::new().map_err(nccl("ncclGetUniqueId"))?;
        let mut bytes = [0u8; UNIQUE_ID_BYTES];
        for (b, &c) in bytes.iter_mut().zip(id.internal().iter()) {
            *b = c as u8;
        }
        Ok(Self(bytes))
    }

    /// The id as bytes, to carry to the other ranks.
    pub fn to_bytes(&self) -> [u8; UNIQUE_ID_BYTES] {
        self.0
    }

    /// An id received from another rank.
    ///
    /// # Errors
    /// [`CudaError::InvalidArgument`] (`unique_id`) when `bytes` is not 128 bytes long.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let arr: [u8; UNIQUE_ID_BYTES] = bytes.try_into().map_err(|_| {
            CudaError::invalid(
                "unique_id",
                format!("{} bytes, expected {UNIQUE_ID_BYTES}", bytes.len()),
            )
        })?;
        Ok(Self(arr))
    }

    fn to_nccl(self) -> Id {
        let mut internal = [0 as std::ffi::c_char; UNIQUE_ID_BYTES];
        for (c, &b) in internal.iter_mut().zip(self.0.iter()) {
            *c = b as std::ffi::c_char;
        }
        Id::uninit(internal)
    }
}

/// One rank of an NCCL communicator, with its own stream.
#[derive(Debug)]
pub struct Communicator {
    comm: Comm,
    stream: Arc<CudaStream>,
}

impl Communicator {
    /// Joins the communicator `id` as `rank` of `world_size` on `dev`. Blocks until every rank
    /// has joined.
    ///
    /// # Errors
    /// [`CudaError::InvalidArgument`] for `world_size == 0` or `rank >= world_size`;
    /// [`CudaError::NoNccl`]; [`CudaError::Nccl`] / [`CudaError::Driver`] on failure.
    pub fn new(dev: &Device, id: UniqueId, rank: usize, world_size: usize) -> Result<Self> {
        if world_size == 0 || world_size > i32::MAX as usize {
            return Err(CudaError::invalid(
                "world_size",
                format!("{world_size} is out of range"),
            ));
        }
        if rank >= world_size {
            return Err(CudaError::invalid(
                "rank",
                format!("{rank} is not below world_size {world_size}"),
            ));
        }
        probe_nccl()?;
        let stream = dev.context().new_stream().map_err(drv("cuStreamCreate"))?;
        let comm = Comm::from_rank(stream.clone(), rank, world_size, id.to_nccl())
            .map_err(nccl("ncclCommInitRank"))?;
        Ok(Self { comm, stream })
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    /// Ranks in the communicator.
    pub fn world_size(&self) -> usize {
        self.comm.world_size()
    }

    /// The communication stream.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Sums `buf` across all ranks, in place (tensor-parallel partial sums).
    ///
    /// # Errors
    /// [`CudaError::Nccl`] on failure.
    pub fn all_reduce_sum(&self, buf: &mut CudaSlice<f32>) -> Result<()> {
        self.comm
            .all_reduce_in_place(buf, &ReduceOp::Sum)
            .map_err(nccl("ncclAllReduce"))?;
        Ok(())
    }

    /// Sends `buf` to `peer` (pairs with the peer's [`Communicator::recv`] of equal length).
    ///
    /// # Errors
    /// [`CudaError::InvalidArgument`] (`peer`) past the world; [`CudaError::Nccl`] on failure.
    pub fn send(&self, buf: &CudaSlice<f32>, peer: usize) -> Result<()> {
        let peer = self.peer(peer)?;
        self.comm.send(buf, peer).map_err(nccl("ncclSend"))
    }

    /// Receives into `buf` from `peer`.
    ///
    /// # Errors
    /// As [`Communicator::send`].
    pub fn recv(&self, buf: &mut CudaSlice<f32>, peer: usize) -> Result<()> {
        let peer = self.peer(peer)?;
        self.comm.recv(buf, peer).map_err(nccl("ncclRecv"))?;
        Ok(())
    }

    /// Sends a 16-bit tensor (K/V blocks around the ring) as raw bytes.
    ///
    /// # Errors
    /// As [`Communicator::send`].
    pub fn send_tensor(&self, t: &Tensor16, peer: usize) -> Result<()> {
        let peer = self.peer(peer)?;
        // SAFETY: reinterpreting u16 words as twice as many bytes covers exactly the buffer.
        let bytes = unsafe { t.data.transmute::<u8>(t.len() * 2) }
            .ok_or_else(|| CudaError::invalid("t", "cannot view as bytes"))?;
        self.comm.send(&bytes, peer).map_err(nccl("ncclSend"))
    }

    /// Receives a 16-bit tensor sent with [`Communicator::send_tensor`].
    ///
    /// # Errors
    /// As [`Communicator::send`].
    pub fn recv_tensor(&self, t: &mut Tensor16, peer: usize) -> Result<()> {
        let peer = self.peer(peer)?;
        let n = t.len() * 2;
        // SAFETY: as in `send_tensor`; any byte pattern is a valid u16.
        let mut bytes = unsafe { t.data.transmute_mut::<u8>(n) }
            .ok_or_else(|| CudaError::invalid("t", "cannot view as bytes"))?;
        self.comm.recv(&mut bytes, peer).map_err(nccl("ncclRecv"))?;
        Ok(())
    }

    /// Runs `f` (sends and receives) as one NCCL group, so a ring step's send to the next rank
    /// and receive from the previous one cannot deadlock.
    ///
    /// # Errors
    /// [`CudaError::Nccl`] from the group calls, or `f`'s error.
    pub fn group<R>(&self, f: impl FnOnce(&Self) -> Result<R>) -> Result<R> {
        cudarc::nccl::group_start().map_err(nccl("ncclGroupStart"))?;
        let r = f(self);
        let end = cudarc::nccl::group_end().map_err(nccl("ncclGroupEnd"));
        let r = r?;
        end?;
        Ok(r)
    }

    /// Waits for all communication queued on this communicator's stream.
    ///
    /// # Errors
    /// [`CudaError::Driver`] on failure.
    pub fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(drv("cuStreamSynchronize"))
    }

    fn peer(&self, peer: usize) -> Result<i32> {
        if peer < self.world_size() {
            Ok(peer as i32)
        } else {
            Err(CudaError::invalid(
                "peer",
                format!("{peer} is not below world_size {}", self.world_size()),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ensures that unique ids survive the byte round trip used to carry them over gRPC, and
    /// that a wrong length is a typed error naming the field.
    #[test]
    fn unique_id_bytes_round_trip() {
        let mut raw = [0u8; UNIQUE_ID_BYTES];
        for (i, b) in raw.iter_mut().enumerate() {
            *b = (i * 37 % 256) as u8;
        }
        let id = UniqueId::from_bytes(&raw).expect("128 bytes");
        assert_eq!(id.to_bytes(), raw);
        let back = id.to_nccl();
        assert!(back.internal().iter().zip(raw).all(|(&c, b)| c as u8 == b));
        match UniqueId::from_bytes(&raw[..127]) {
            Err(CudaError::InvalidArgument { field, .. }) => assert_eq!(field, "unique_id"),
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }
}
