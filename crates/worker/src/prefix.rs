//! The worker's side of prefix caching: one [`PrefixStore`] per inbound stream, mirroring the
//! prefix index of the coordinator that drives that stream.
//!
//! The coordinator decides everything (what to keep, what to evict, which cached blocks a new
//! sequence starts from) and says so in band, in each step's `prefix_ops` and each
//! `SeqStart.cached_blocks`; every stage applies the same ops in the same order, so every
//! stage's store holds the same hashes. This module only carries them out, and treats any
//! disagreement (a block asked for and not held, a hash stored twice, a block not yet
//! computed) as a broken invariant: [`WorkerError::PrefixOutOfSync`], which fails the step
//! and with it the stream, instead of computing with the wrong K/V.
//!
//! Why per stream: a stream is one coordinator's view (a new leader opens its own, with an
//! empty index), and its store must die with it, as its sequences do, or its blocks would
//! stay held with no one left to evict them.

use std::collections::HashMap;

use tessera_model::kv_cache::{KvCacheError, PagedKvCache, PrefixStore, SeqKv};
use tessera_proto::cluster::v1 as pb;
use tessera_proto::cluster::v1::prefix_op::Op;

use crate::error::WorkerError;
use crate::seqs::{SeqTable, StreamId};

/// The prefix stores of one loaded shard, by inbound stream.
#[derive(Debug, Default)]
pub(crate) struct PrefixStores {
    by_stream: HashMap<StreamId, PrefixStore>,
}

fn out_of_sync(what: impl std::fmt::Display, e: &KvCacheError) -> WorkerError {
    WorkerError::PrefixOutOfSync(format!("{what}: {e}"))
}

impl PrefixStores {
    /// Blocks held by every stream's store (a block a live sequence shares counts here too).
    pub fn cached_blocks(&self) -> usize {
        self.by_stream.values().map(PrefixStore::len).sum()
    }

    /// Applies a step's prefix ops, in order, to `stream`'s store. Ops already applied stay
    /// applied when a later one fails; the step then fails and the stream (with its store)
    /// goes away.
    ///
    /// # Errors
    /// INVALID_ARGUMENT for an op with nothing set; [`WorkerError::PrefixOutOfSync`] when a
    /// retained sequence is not live on this stream, a retained block is not full and
    /// committed, a retained hash is already stored, or an evicted hash is not.
    pub fn apply(
        &mut self,
        stream: StreamId,
        ops: &[pb::PrefixOp],
        seqs: &mut SeqTable,
        cache: &PagedKvCache,
    ) -> Result<(), WorkerError> {
        for (i, op) in ops.iter().enumerate() {
            match &op.op {
                Some(Op::Retain(r)) => {
                    let entry = seqs
                        .get_mut(r.seq_id)
                        .filter(|e| e.stream == stream)
                        .ok_or_else(|| {
                            WorkerError::PrefixOutOfSync(format!(
                                "prefix_ops[{i}].retain: sequence {} is not live on this stream",
                                r.seq_id
                            ))
                        })?;
                    let store = self.by_stream.entry(stream).or_default();
                    for (j, &hash) in r.hashes.iter().enumerate() {
                        let index = r.first_block as usize + j;
                        let what = || format!("prefix_ops[{i}].retain of sequence {}", r.seq_id);
                        let block = cache
                            .share_block(&mut entry.kv, index)
                            .map_err(|e| out_of_sync(what(), &e))?;
                        store
                            .insert(hash, block)
                            .map_err(|e| out_of_sync(what(), &e))?;
                    }
                }
                Some(Op::Evict(hash)) => {
                    let missing = KvCacheError::PrefixMissing { hash: *hash };
                    self.by_stream
                        .get_mut(&stream)
                        .ok_or(missing)
                        .and_then(|s| s.evict(*hash))
                        .map_err(|e| out_of_sync(format!("prefix_ops[{i}].evict"), &e))?;
                }
                None => return Err(WorkerError::invalid(format!("prefix_ops[{i}].op"), "unset")),
            }
        }
        Ok(())
    }

    /// The KV of a new sequence of `stream`: empty, or sharing the cached blocks its start
    /// names (their shape already checked against the block size).
    ///
    /// # Errors
    /// [`WorkerError::PrefixOutOfSync`] naming the first cached block this stage's store does
    /// not hold.
    pub fn new_seq(
        &self,
        stream: StreamId,
        start: &pb::SeqStart,
        cache: &PagedKvCache,
        field: &str,
    ) -> Result<SeqKv, WorkerError> {
        if start.cached_blocks.is_empty() {
            return Ok(cache.new_seq());
        }
        let what = || format!("{field}.cached_blocks");
        let first = KvCacheError::PrefixMissing {
            hash: start.cached_blocks[0],
        };
        let store = self
            .by_stream
            .get(&stream)
            .ok_or_else(|| out_of_sync(what(), &first))?;
        let chain = store
            .chain(&start.cached_blocks)
            .map_err(|e| out_of_sync(what(), &e))?;
        cache
            .new_seq_with_prefix(&chain)
            .map_err(|e| out_of_sync(what(), &e))
    }

    /// Drops `stream`'s store (its blocks are freed unless a live sequence shares them).
    pub fn close_stream(&mut self, stream: StreamId) {
        self.by_stream.remove(&stream);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::seqs::SeqEntry;
    use tessera_model::kv_cache::KvCacheConfig;

    fn cache() -> PagedKvCache {
        PagedKvCache::new(KvCacheConfig {
            n_layers: 1,
            n_kv_heads: 1,
            head_dim: 4,
            block_size: 4,
            num_blocks: 16,
        })
        .expect("cache")
    }

    /// A live sequence of `stream` with `tokens` committed.
    fn live(c: &PagedKvCache, seqs: &mut SeqTable, id: u64, tokens: usize, stream: StreamId) {
        let mut kv = c.new_seq();
        c.reserve(&mut kv, tokens).expect("reserve");
        kv.commit(tokens);
        assert!(seqs.insert(
            id,
            SeqEntry {
                kv,
                sampler: None,
                stream,
                pos: tokens,
            }
        ));
    }

    fn retain(seq_id: u64, first_block: u32, hashes: &[u64]) -> pb::PrefixOp {
        pb::PrefixOp {
            op: Some(Op::Retain(pb::RetainBlocks {
                seq_id,
                first_block,
                hashes: hashes.to_vec(),
            })),
        }
    }

    fn evict(hash: u64) -> pb::PrefixOp {
        pb::PrefixOp {
            op: Some(Op::Evict(hash)),
        }
    }

    fn start(blocks: &[u64]) -> pb::SeqStart {
        pb::SeqStart {
            cached_tokens: blocks.len() as u32 * 4,
            cached_blocks: blocks.to_vec(),
            ..Default::default()
        }
    }

    /// Ensures that retained blocks outlive their sequence, a new sequence shares them in
    /// place, evicting drops only the store's reference, and closing the stream frees the rest.
    #[test]
    fn retain_share_evict_close() {
        let c = cache();
        let mut seqs = SeqTable::default();
        let mut stores = PrefixStores::default();
        live(&c, &mut seqs, 1, 10, 7);
        let ids = seqs.get_mut(1).expect("live").kv.block_table()[..2].to_vec();
        stores
            .apply(7, &[retain(1, 0, &[0xa, 0xb])], &mut seqs, &c)
            .expect("two full blocks");
        seqs.release(&[1]);
        assert_eq!((stores.cached_blocks(), c.free_blocks()), (2, 14));
        let kv = stores
            .new_seq(7, &start(&[0xa, 0xb]), &c, "seqs[0].start")
            .expect("held");
        assert_eq!((kv.len(), kv.block_table()), (8, &ids[..]));
        stores.apply(7, &[evict(0xa)], &mut seqs, &c).expect("held");
        assert_eq!((stores.cached_blocks(), c.free_blocks()), (1, 14));
        drop(kv);
        assert_eq!(c.free_blocks(), 15);
        stores.close_stream(7);
        assert_eq!((stores.cached_blocks(), c.free_blocks()), (0, 16));
    }

    /// Ensures that every disagreement with the coordinator's index fails as out of sync:
    /// missing blocks (also from another stream's store), a duplicate hash, a block not yet
    /// computed, a sequence of another stream; and an unset op as invalid.
    #[test]
    fn disagreements_are_out_of_sync() {
        let c = cache();
        let mut seqs = SeqTable::default();
        let mut stores = PrefixStores::default();
        live(&c, &mut seqs, 1, 6, 7);
        live(&c, &mut seqs, 2, 8, 8);
        stores
            .apply(7, &[retain(1, 0, &[1])], &mut seqs, &c)
            .expect("block 0 is full");
        let bad: Vec<(StreamId, pb::PrefixOp, &str)> = vec![
            (7, retain(1, 1, &[2]), "not full and committed"),
            (7, retain(1, 0, &[1]), "already has a block"),
            (7, retain(2, 0, &[3]), "not live on this stream"),
            (7, evict(9), "has no block"),
            (8, evict(1), "has no block"),
        ];
        for (stream, op, want) in bad {
            let e = stores.apply(stream, &[op], &mut seqs, &c).expect_err(want);
            assert!(
                matches!(&e, WorkerError::PrefixOutOfSync(m) if m.contains(want)),
                "{want}: {e}"
            );
        }
        for (stream, blocks) in [(7, vec![1, 5]), (8, vec![1])] {
            let e = stores
                .new_seq(stream, &start(&blocks), &c, "seqs[0].start")
                .expect_err("missing");
            assert!(matches!(e, WorkerError::PrefixOutOfSync(_)), "{e}");
        }
        let e = stores
            .apply(7, &[pb::PrefixOp { op: None }], &mut seqs, &c)
            .expect_err("unset");
        assert!(matches!(e, WorkerError::InvalidArgument { .. }), "{e}");
        assert_eq!(stores.cached_blocks(), 1);
    }
}
