//! The scheduler's account of each worker's KV cache: the blocks reserved for running
//! sequences, the blocks the prefix cache holds, and the prefix-cache operations the workers
//! must apply on the next step.
//!
//! Every worker of a plan gets the same `kv_tokens`, so one account stands for them all. A
//! sequence reserves its prompt plus `max_tokens`, in whole blocks, less the cached blocks it
//! starts from; on a plan of context-parallel rings ([`KvBudget::set_ring`]) the account is a
//! ring rank's: each sequence reserves the blocks of its share on one rank (at most
//! `⌈n / P⌉ + 2` tokens), against a rank's capacity, and prefix caching is off. The prefix
//! index's blocks count too, referenced or not. When a request does not fit, unreferenced
//! cached blocks are evicted (least recently used, leaves first) — the evict ops go out
//! before (in the same step as, or earlier than) the first step of the sequence that needed
//! the room, and workers apply a step's prefix ops before its sequences.
//!
//! A migrated sequence ([`KvBudget::readmit`]) reserves all its blocks again: the new plan's
//! workers start with empty caches, so sequences that shared cached prefix blocks on the old
//! plan each need their own copies now, and may no longer all fit at once.
//!
//! Ordering contract with the workers (see worker.proto): [`KvBudget::take_ops`] hands over
//! the ops in the order they were decided; the scheduler puts them on the next step, whose
//! `release` list must include the sequences this account retired since the last step (a
//! retain op reads a sequence's blocks, so it must reach a stage before its release).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tessera_proto::cluster::v1 as cpb;
use tessera_proto::cluster::v1::prefix_op::Op;

use super::prefix::PrefixIndex;

/// KV tokens reserved for one sequence; given back on drop.
#[derive(Debug)]
pub(crate) struct KvReservation {
    pool: Arc<AtomicU64>,
    tokens: u64,
}

impl Drop for KvReservation {
    fn drop(&mut self) {
        self.pool.fetch_sub(self.tokens, Ordering::SeqCst);
    }
}

/// What an admitted sequence holds.
#[derive(Debug)]
pub(crate) struct Admission {
    /// Its own KV reservation (the blocks after the cached ones).
    pub reservation: KvReservation,
    /// The cached blocks it starts from (referenced in the index until it retires).
    pub chain: Vec<u64>,
    /// The prompt tokens those blocks hold.
    pub cached_tokens: usize,
    /// Cached blocks evicted to make room for it.
    pub evicted: usize,
}

/// One stream's KV account.
#[derive(Debug)]
pub(crate) struct KvBudget {
    /// Tokens per worker (per ring rank on a ring).
    capacity: u64,
    /// Ranks in the plan's rings (1: no ring).
    ranks: u64,
    /// Whether prefix caching was asked for (it runs only without a ring).
    prefix_wanted: bool,
    block: u64,
    /// Tokens reserved by running sequences (shared with their reservations).
    reserved: Arc<AtomicU64>,
    /// `None` when prefix caching is off.
    prefix: Option<PrefixIndex>,
    /// Prefix ops decided since the last step, in order.
    ops: Vec<cpb::PrefixOp>,
}

impl KvBudget {
    /// An empty account of `capacity` tokens per worker in blocks of `block_size`, with or
    /// without a prefix cache.
    pub fn new(capacity: u32, block_size: u32, prefix_cache: bool) -> Self {
        let block = u64::from(block_size.max(1));
        Self {
            capacity: u64::from(capacity),
            ranks: 1,
            prefix_wanted: prefix_cache,
            block,
            reserved: Arc::new(AtomicU64::new(0)),
            prefix: prefix_cache.then(|| PrefixIndex::new(block as usize)),
            ops: Vec::new(),
        }
    }

    /// Accounts for a plan whose stages are rings of `ranks` (1: none), each rank holding
    /// `capacity` tokens: reservations count one rank's share of each sequence, and the
    /// prefix cache is off on a ring (a ring rank's cache holds part of each sequence).
    /// Reservations already made keep their tokens.
    pub fn set_ring(&mut self, ranks: u32, capacity: u32) {
        self.ranks = u64::from(ranks.max(1));
        self.capacity = u64::from(capacity);
        if self.ranks > 1 {
            self.prefix = None;
        } else if self.prefix_wanted && self.prefix.is_none() {
            self.prefix = Some(PrefixIndex::new(self.block as usize));
        }
    }

    /// Tokens each worker (each ring rank) holds.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Whether prefix caching is on.
    pub fn prefix_cache(&self) -> bool {
        self.prefix.is_some()
    }

    /// Blocks the prefix cache holds on each worker.
    pub fn cached_blocks(&self) -> usize {
        self.prefix.as_ref().map_or(0, PrefixIndex::len)
    }

    /// Tokens in use on each worker: reservations plus cached blocks.
    pub fn used_tokens(&self) -> u64 {
        self.reserved.load(Ordering::SeqCst) + self.cached_blocks() as u64 * self.block
    }

    /// Admits a sequence of `prompt` that may grow to `max_len` tokens when its blocks fit,
    /// after evicting unreferenced cached blocks if that makes them fit; `None` (and nothing
    /// changed) otherwise.
    pub fn admit(&mut self, prompt: &[u32], max_len: usize) -> Option<Admission> {
        let chain = self
            .prefix
            .as_mut()
            .map(|p| p.acquire(prompt))
            .unwrap_or_default();
        let need = self.blocks_for(max_len).saturating_sub(chain.len() as u64) * self.block;
        let Some(evicted) = self.make_room(need) else {
            if let Some(p) = self.prefix.as_mut() {
                p.release(&chain);
            }
            return None;
        };
        let cached_tokens = chain.len() * self.block as usize;
        Some(Admission {
            reservation: self.reserve_tokens(need),
            chain,
            cached_tokens,
            evicted,
        })
    }

    /// Reserves every block of a migrated sequence that may grow to `max_len` tokens, with no
    /// prefix lookup (see the scheduler's `migrate`: its replay recomputes its whole input, in
    /// its first run's chunks), after evicting unreferenced cached blocks if that makes them
    /// fit; `None` (and nothing changed) otherwise.
    pub fn readmit(&mut self, max_len: usize) -> Option<KvReservation> {
        let need = self.blocks_for(max_len) * self.block;
        self.make_room(need)?;
        Some(self.reserve_tokens(need))
    }

    /// Blocks a sequence of up to `max_len` tokens holds on each worker: all of them, or on a
    /// ring one rank's share — at most ⌈n / P⌉ + 2 tokens of a sequence of n (see the
    /// planner's `rank_kv_tokens`).
    fn blocks_for(&self, max_len: usize) -> u64 {
        let share = if self.ranks > 1 {
            (max_len as u64).div_ceil(self.ranks) + 2
        } else {
            max_len as u64
        };
        share.div_ceil(self.block)
    }

    /// Makes room for `need` more tokens: `Some(blocks evicted)` once they fit (evict ops
    /// queued for the next step), `None` with nothing changed when even evicting every
    /// unreferenced cached block would not make them fit.
    fn make_room(&mut self, need: u64) -> Option<usize> {
        let used = self.used_tokens();
        if used + need <= self.capacity {
            return Some(0);
        }
        let short = (used + need - self.capacity).div_ceil(self.block);
        let index = self
            .prefix
            .as_mut()
            .filter(|p| p.evictable() as u64 >= short)?;
        let hashes = index.evict(short as usize);
        let evicted = hashes.len();
        self.ops.extend(hashes.into_iter().map(|h| cpb::PrefixOp {
            op: Some(Op::Evict(h)),
        }));
        Some(evicted)
    }

    /// A reservation of `tokens` (already known to fit).
    fn reserve_tokens(&self, tokens: u64) -> KvReservation {
        self.reserved.fetch_add(tokens, Ordering::SeqCst);
        KvReservation {
            pool: Arc::clone(&self.reserved),
            tokens,
        }
    }

    /// Ends sequence `seq_id` of `prompt`, which started from `chain` and whose K/V covers
    /// its first `computed` tokens: gives up its references, and caches its full prompt
    /// blocks that are computed and not cached yet (a retain op for the workers). Call it
    /// before the sequence's reservation drops and its release goes out, so the retained
    /// blocks move from the reservation to the index within one step. `started`: whether its
    /// first step went out (a sequence never started has no blocks to retain).
    pub fn retire(
        &mut self,
        seq_id: u64,
        prompt: &[u32],
        chain: &[u64],
        computed: usize,
        started: bool,
    ) {
        let Some(index) = self.prefix.as_mut() else {
            return;
        };
        index.release(chain);
        if !started {
            return;
        }
        let blocks = computed.min(prompt.len()) / index.block_size();
        if let Some((first, hashes)) = index.insert(prompt, blocks) {
            self.ops.push(cpb::PrefixOp {
                op: Some(Op::Retain(cpb::RetainBlocks {
                    seq_id,
                    first_block: first as u32,
                    hashes,
                })),
            });
        }
    }

    /// The prefix ops decided since the last call, in order, for the next step.
    pub fn take_ops(&mut self) -> Vec<cpb::PrefixOp> {
        std::mem::take(&mut self.ops)
    }

    /// Whether prefix ops wait for a step.
    pub fn has_ops(&self) -> bool {
        !self.ops.is_empty()
    }

    /// Forgets the prefix cache and pending ops: the stream they belonged to is gone, and its
    /// stores with it on every worker. Reservations stay with their sequences.
    pub fn reset_prefix(&mut self) {
        if let Some(p) = self.prefix.as_mut() {
            p.clear();
        }
        self.ops.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn evicts(ops: &[cpb::PrefixOp]) -> Vec<u64> {
        ops.iter()
            .filter_map(|o| match o.op {
                Some(Op::Evict(h)) => Some(h),
                _ => None,
            })
            .collect()
    }

    /// Ensures that a finished sequence's prompt blocks move from its reservation to the
    /// prefix cache (a retain op), that the next sequence with that prompt reserves only the
    /// blocks after them, and that with the cache off nothing is cached or sent.
    #[test]
    fn retire_caches_and_admit_reuses() {
        let prompt: Vec<u32> = (0..10).collect();
        let mut kv = KvBudget::new(64, 4, true);
        let a = kv.admit(&prompt, 14).expect("fits");
        assert_eq!((a.cached_tokens, kv.used_tokens()), (0, 16));
        kv.retire(1, &prompt, &a.chain, 10, true);
        drop(a);
        assert_eq!((kv.cached_blocks(), kv.used_tokens()), (2, 8));
        let ops = kv.take_ops();
        assert!(matches!(
            &ops[..],
            [cpb::PrefixOp { op: Some(Op::Retain(r)) }]
                if r.seq_id == 1 && r.first_block == 0 && r.hashes.len() == 2
        ));
        let b = kv.admit(&prompt, 14).expect("fits");
        assert_eq!(
            (b.cached_tokens, b.chain.len(), kv.used_tokens()),
            (8, 2, 16)
        );
        kv.retire(2, &prompt, &b.chain, 10, true);
        assert!(!kv.has_ops(), "nothing new to retain");

        let mut off = KvBudget::new(64, 4, false);
        let a = off.admit(&prompt, 14).expect("fits");
        off.retire(1, &prompt, &a.chain, 10, true);
        drop(a);
        assert_eq!(
            (off.cached_blocks(), off.used_tokens(), off.has_ops()),
            (0, 0, false)
        );
        assert_eq!(off.admit(&prompt, 14).map(|a| a.cached_tokens), Some(0));
    }

    /// Ensures that admission evicts just enough unreferenced cached blocks (least recently
    /// used first, leaf first) when that makes a request fit, and evicts nothing (changing
    /// nothing) when even that would not make it fit.
    #[test]
    fn admission_evicts_only_what_it_needs() {
        let mut kv = KvBudget::new(32, 4, true);
        let p1: Vec<u32> = (0..8).collect();
        let p2: Vec<u32> = (100..108).collect();
        let mut retained = Vec::new();
        for (id, p) in [(1, &p1), (2, &p2)] {
            let a = kv.admit(p, 8).expect("fits");
            kv.retire(id, p, &a.chain, 8, true);
            match &kv.take_ops()[..] {
                [
                    cpb::PrefixOp {
                        op: Some(Op::Retain(r)),
                    },
                ] => retained.push(r.hashes.clone()),
                other => panic!("one retain op expected: {other:?}"),
            }
        }
        assert_eq!((kv.cached_blocks(), kv.used_tokens()), (4, 16));
        // 24 tokens more: 16 are free, so two blocks must go: p1's, the oldest, leaf first.
        let big: Vec<u32> = (200..224).collect();
        let a = kv.admit(&big, 24).expect("fits after evicting two blocks");
        assert_eq!(evicts(&kv.take_ops()), [retained[0][1], retained[0][0]]);
        assert_eq!(kv.used_tokens(), 32);
        // Too little is evictable for another 16: refused, nothing changes.
        assert!(kv.admit(&(300..316).collect::<Vec<_>>(), 16).is_none());
        assert_eq!((kv.cached_blocks(), kv.has_ops()), (2, false));
        drop(a);
        assert_eq!(kv.used_tokens(), 8);
        kv.reset_prefix();
        assert_eq!((kv.cached_blocks(), kv.used_tokens()), (0, 0));
    }

    /// Ensures that a migrated sequence reserves all its blocks — none taken from the prefix
    /// index, even when its prompt is cached — evicting unreferenced cached blocks when that
    /// makes them fit, and is refused (nothing changed) when it cannot fit.
    #[test]
    fn readmission_reserves_every_block() {
        let mut kv = KvBudget::new(32, 4, true);
        let prompt: Vec<u32> = (0..8).collect();
        let a = kv.admit(&prompt, 8).expect("fits");
        kv.retire(1, &prompt, &a.chain, 8, true);
        drop(a);
        kv.take_ops();
        assert_eq!((kv.cached_blocks(), kv.used_tokens()), (2, 8));
        // The cached prompt is not looked up: its 12 tokens take 3 blocks of its own.
        let r = kv.readmit(12).expect("fits");
        assert_eq!((kv.used_tokens(), kv.has_ops()), (20, false));
        // 16 more do not fit the 12 free: one cached block goes.
        let r2 = kv.readmit(16).expect("fits after evicting");
        assert_eq!(evicts(&kv.take_ops()).len(), 1);
        assert_eq!((kv.cached_blocks(), kv.used_tokens()), (1, 32));
        // One block left to evict, two needed: refused, nothing changed.
        assert!(kv.readmit(8).is_none());
        assert_eq!(
            (kv.cached_blocks(), kv.used_tokens(), kv.has_ops()),
            (1, 32, false)
        );
        drop((r, r2));
        assert_eq!(kv.used_tokens(), 4);
    }
}
