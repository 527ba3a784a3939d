//! Prefix sharing tests: blocks shared between sequences and a [`PrefixStore`] are read in
//! place, stay read-only, and go back to the free list exactly when their last owner lets go
//! (proptest over random operation sequences: no block leaked, double-freed or owned while
//! free).

use super::*;
use proptest::prelude::*;
use std::collections::{HashMap, HashSet};

fn cache(block_size: usize, num_blocks: usize) -> PagedKvCache {
    PagedKvCache::new(KvCacheConfig {
        n_layers: 2,
        n_kv_heads: 1,
        head_dim: 2,
        block_size,
        num_blocks,
    })
    .expect("cache")
}

/// Writes `n` tokens of position-dependent data (salted) into both layers of `seq`.
fn fill(cache: &mut PagedKvCache, seq: &mut SeqKv, n: usize, salt: f32) {
    cache.reserve(seq, n).expect("reserve");
    let row = cache.config().token_floats();
    for layer in 0..2 {
        let k: Vec<f32> = (0..n * row)
            .map(|i| salt + (layer * 1000 + seq.len() * row + i) as f32)
            .collect();
        let v: Vec<f32> = k.iter().map(|x| -x).collect();
        cache.write(layer, seq, &k, &v);
    }
    seq.commit(n);
}

/// The K values of `layer` over the first `len` tokens of `seq`, in token order.
fn keys(cache: &PagedKvCache, layer: usize, seq: &SeqKv, len: usize) -> Vec<f32> {
    let view = cache.view(layer, seq, len);
    let row = cache.config().token_floats();
    (0..len)
        .flat_map(|t| {
            let off = view.offset(t, 0, 1, 2);
            view.k[off..off + row].to_vec()
        })
        .collect()
}

/// Ensures that a sequence started from stored blocks reads the K/V its first owner wrote, in
/// place (same block ids, no copy), writes only into fresh blocks after them, and that a
/// shared block is freed only when its last owner (store entry or sequence) lets go.
#[test]
fn shared_prefix_is_read_in_place_and_freed_by_its_last_owner() {
    let mut c = cache(4, 8);
    let mut a = c.new_seq();
    fill(&mut c, &mut a, 10, 0.0);
    let a_keys = keys(&c, 0, &a, 8);
    let mut store = PrefixStore::new();
    for (i, hash) in [11u64, 12].into_iter().enumerate() {
        let block = c.share_block(&mut a, i).expect("full block");
        store.insert(hash, block).expect("new hash");
    }
    assert_eq!(a.shared_blocks(), 2);
    let prefix_ids = a.block_table()[..2].to_vec();
    assert_eq!(c.free_blocks(), 5);
    drop(a);
    assert_eq!(c.free_blocks(), 6, "the store keeps the two shared blocks");

    let mut b = c
        .new_seq_with_prefix(&store.chain(&[11, 12]).expect("chain"))
        .expect("same cache");
    assert_eq!((b.len(), b.block_table()), (8, &prefix_ids[..]));
    assert_eq!(
        prefix_ids.iter().map(|&id| c.refs(id)).collect::<Vec<_>>(),
        [2, 2]
    );
    assert_eq!(keys(&c, 0, &b, 8), a_keys, "read in place");
    fill(&mut c, &mut b, 3, 500.0);
    assert_eq!(b.block_table().len(), 3);
    assert!(!prefix_ids.contains(&b.block_table()[2]), "a fresh block");
    let other = c
        .new_seq_with_prefix(&store.chain(&[11, 12]).expect("chain"))
        .expect("same cache");
    assert_eq!(
        keys(&c, 0, &other, 8),
        a_keys,
        "b's writes left the prefix alone"
    );
    drop(other);

    store.evict(11).expect("held");
    assert_eq!(c.refs(prefix_ids[0]), 1, "b still holds it");
    assert_eq!(c.free_blocks(), 5);
    drop(b);
    assert_eq!(c.free_blocks(), 7, "only the block still stored is held");
    store.clear();
    assert_eq!(c.free_blocks(), 8);
}

/// Ensures that a write into a shared block (here after truncating into one) panics instead
/// of changing K/V other owners read.
#[test]
#[should_panic(expected = "shared block")]
fn writing_into_a_shared_block_panics() {
    let mut c = cache(4, 8);
    let mut a = c.new_seq();
    fill(&mut c, &mut a, 8, 0.0);
    let block = c.share_block(&mut a, 1).expect("full block");
    a.truncate(6);
    assert_eq!(a.shared_blocks(), 2);
    fill(&mut c, &mut a, 1, 9.0);
    drop(block);
}

/// Ensures that sharing a partial or uncommitted block, a duplicate or missing hash, and a
/// block of another cache are refused without changing any reference count.
#[test]
fn refusals_change_nothing() {
    let mut c = cache(4, 8);
    let mut a = c.new_seq();
    fill(&mut c, &mut a, 6, 0.0);
    c.reserve(&mut a, 2).expect("reserve");
    assert_eq!(
        c.share_block(&mut a, 1).expect_err("6 of 8 committed"),
        KvCacheError::NotShareable { index: 1, len: 6 }
    );
    assert_eq!(
        c.share_block(&mut a, 7).expect_err("past the table"),
        KvCacheError::NotShareable { index: 7, len: 6 }
    );
    let id = a.block_table()[0];
    let mut store = PrefixStore::new();
    store
        .insert(1, c.share_block(&mut a, 0).expect("full"))
        .expect("new");
    assert_eq!(
        store.insert(1, c.share_block(&mut a, 0).expect("full")),
        Err(KvCacheError::PrefixDuplicate { hash: 1 })
    );
    assert_eq!(c.refs(id), 2, "the refused reference was given up");
    assert_eq!(store.evict(2), Err(KvCacheError::PrefixMissing { hash: 2 }));
    assert_eq!(
        store.chain(&[1, 3]).map(|v| v.len()),
        Err(KvCacheError::PrefixMissing { hash: 3 })
    );
    let other = cache(4, 8);
    assert_eq!(
        other
            .new_seq_with_prefix(&store.chain(&[1]).expect("held"))
            .map(|s| s.len()),
        Err(KvCacheError::ForeignSequence)
    );
    let mut foreign = other.new_seq();
    assert_eq!(
        c.share_block(&mut foreign, 0).map(|b| b.id()),
        Err(KvCacheError::ForeignSequence)
    );
    assert_eq!((c.refs(id), other.free_blocks()), (2, 8));
}

/// One step of the sharing state machine.
#[derive(Clone, Debug)]
enum Op {
    New,
    /// Start a sequence from up to this many stored blocks (in hash order).
    FromPrefix(usize),
    Reserve(usize, usize),
    Commit(usize, usize),
    Truncate(usize, usize),
    Drop(usize),
    /// Share block (index) of a sequence into the store under a hash.
    Share(usize, usize, u64),
    Evict(u64),
    /// Clone a stored reference and hold it outside the store.
    CloneRef(u64),
    DropRef(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => Just(Op::New),
        2 => (0usize..5).prop_map(Op::FromPrefix),
        4 => (any::<usize>(), 0usize..20).prop_map(|(s, n)| Op::Reserve(s, n)),
        3 => (any::<usize>(), 0usize..20).prop_map(|(s, n)| Op::Commit(s, n)),
        1 => (any::<usize>(), 0usize..30).prop_map(|(s, n)| Op::Truncate(s, n)),
        2 => any::<usize>().prop_map(Op::Drop),
        3 => (any::<usize>(), 0usize..8, 0u64..12).prop_map(|(s, i, h)| Op::Share(s, i, h)),
        2 => (0u64..12).prop_map(Op::Evict),
        1 => (0u64..12).prop_map(Op::CloneRef),
        1 => any::<usize>().prop_map(Op::DropRef),
    ]
}

proptest! {
    /// Ensures that under random sequences of new, prefix-started, reserved, committed,
    /// truncated and dropped sequences, blocks shared into a store, evicted, and references
    /// cloned and dropped, every block's reference count equals its owners (table entries,
    /// store entries, loose references), a block is free exactly when it has none, and
    /// dropping everything frees every block.
    #[test]
    fn reference_counts_match_owners(
        num_blocks in 1usize..20,
        block_size in 1usize..5,
        ops in proptest::collection::vec(op(), 1..100),
    ) {
        let c = PagedKvCache::new(KvCacheConfig {
            n_layers: 1, n_kv_heads: 1, head_dim: 1, block_size, num_blocks,
        }).expect("cache");
        let mut seqs: Vec<SeqKv> = Vec::new();
        let mut store = PrefixStore::new();
        let mut stored: HashMap<u64, u32> = HashMap::new();
        let mut loose: Vec<BlockRef> = Vec::new();
        for op in ops {
            let pick = |s: usize, n: usize| (n > 0).then(|| s % n);
            match op {
                Op::New => seqs.push(c.new_seq()),
                Op::FromPrefix(k) => {
                    let mut hashes: Vec<u64> = stored.keys().copied().collect();
                    hashes.sort_unstable();
                    hashes.truncate(k);
                    let chain = store.chain(&hashes).expect("held");
                    let seq = c.new_seq_with_prefix(&chain).expect("same cache");
                    prop_assert_eq!(seq.len(), hashes.len() * block_size);
                    prop_assert_eq!(seq.shared_blocks(), hashes.len());
                    seqs.push(seq);
                }
                Op::Reserve(s, n) => if let Some(i) = pick(s, seqs.len()) {
                    let free = c.free_blocks();
                    if c.reserve(&mut seqs[i], n).is_err() {
                        prop_assert_eq!(c.free_blocks(), free);
                    }
                },
                Op::Commit(s, n) => if let Some(i) = pick(s, seqs.len()) {
                    let n = n.min(seqs[i].capacity() - seqs[i].len());
                    seqs[i].commit(n);
                },
                Op::Truncate(s, len) => if let Some(i) = pick(s, seqs.len()) {
                    seqs[i].truncate(len);
                },
                Op::Drop(s) => if let Some(i) = pick(s, seqs.len()) {
                    seqs.swap_remove(i);
                },
                Op::Share(s, idx, hash) => if let Some(i) = pick(s, seqs.len()) {
                    let full = (idx + 1) * block_size <= seqs[i].len();
                    match c.share_block(&mut seqs[i], idx) {
                        Ok(block) => {
                            prop_assert!(full);
                            let id = block.id();
                            let fresh = !stored.contains_key(&hash);
                            prop_assert_eq!(store.insert(hash, block).is_ok(), fresh);
                            if fresh {
                                stored.insert(hash, id);
                            }
                        }
                        Err(e) => prop_assert!(!full, "{e}"),
                    }
                },
                Op::Evict(hash) => {
                    prop_assert_eq!(store.evict(hash).is_ok(), stored.remove(&hash).is_some());
                }
                Op::CloneRef(hash) => if let Ok(chain) = store.chain(&[hash]) {
                    loose.push(chain[0].clone());
                },
                Op::DropRef(s) => if let Some(i) = pick(s, loose.len()) {
                    loose.swap_remove(i);
                },
            }
            let mut owners = vec![0u32; num_blocks];
            let held = seqs.iter().flat_map(|s| s.block_table().iter().copied())
                .chain(stored.values().copied())
                .chain(loose.iter().map(BlockRef::id));
            for id in held {
                owners[id as usize] += 1;
            }
            let free = c.free_ids();
            let free_set: HashSet<u32> = free.iter().copied().collect();
            prop_assert_eq!(free_set.len(), free.len(), "a block is free twice");
            for (id, &n) in owners.iter().enumerate() {
                prop_assert_eq!(c.refs(id as u32), n, "block {}", id);
                prop_assert_eq!(free_set.contains(&(id as u32)), n == 0, "block {}", id);
            }
            prop_assert_eq!(store.len(), stored.len());
            for s in &seqs {
                prop_assert!(s.shared_blocks() <= s.block_table().len());
            }
        }
        drop(seqs);
        drop(loose);
        store.clear();
        prop_assert_eq!(c.free_blocks(), num_blocks);
    }
}
