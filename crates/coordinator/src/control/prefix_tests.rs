//! Prefix index tests: hashing, lookups capped to leave a token to compute, least-recently
//! used leaf-first eviction, collisions, and (proptest) the index against a plain model of
//! cached prefixes under random acquire / release / insert / evict sequences.

use super::*;
use proptest::prelude::*;

/// `n` distinct tokens starting at `from`.
fn toks(from: u32, n: u32) -> Vec<u32> {
    (from..from + n).collect()
}

fn cat(a: &[u32], b: &[u32]) -> Vec<u32> {
    [a, b].concat()
}

/// Checks every structural invariant of the index; `held` are the chains acquired and not
/// released.
fn check(idx: &PrefixIndex, held: &[Vec<u64>]) {
    let mut children: HashMap<u64, u32> = HashMap::new();
    for (h, e) in &idx.entries {
        if let Some(p) = e.parent {
            assert!(idx.entries.contains_key(&p), "parent of {h:x} missing");
            *children.entry(p).or_default() += 1;
        }
        assert_eq!(e.tokens.len(), idx.block_size);
        assert_eq!(*h, block_hash(e.parent, &e.tokens));
    }
    for (h, e) in &idx.entries {
        assert_eq!(e.children, children.get(h).copied().unwrap_or(0), "{h:x}");
        let refs = held.iter().filter(|c| c.contains(h)).count() as u32;
        assert_eq!(e.refs, refs, "refs of {h:x}");
        assert_eq!(idx.lru.contains(&(e.last_used, *h)), e.evictable());
    }
    assert_eq!(
        idx.lru.len(),
        idx.entries.values().filter(|e| e.evictable()).count()
    );
    assert_eq!(
        idx.unreferenced,
        idx.entries.values().filter(|e| e.refs == 0).count()
    );
}

/// Ensures that a block hash depends on its tokens and on its parent, and on nothing else.
#[test]
fn hashes_chain_tokens_and_parent() {
    let a = block_hash(None, &[1, 2, 3]);
    assert_eq!(a, block_hash(None, &[1, 2, 3]));
    assert_ne!(a, block_hash(None, &[1, 2, 4]));
    assert_ne!(a, block_hash(Some(0), &[1, 2, 3]));
    assert_ne!(block_hash(Some(a), &[7]), block_hash(Some(a ^ 1), &[7]));
}

/// Ensures that lookups find the longest cached chain of whole blocks, stop at the first
/// different token, and leave at least one prompt token to compute.
#[test]
fn acquire_finds_the_longest_chain_and_leaves_a_token() {
    let mut idx = PrefixIndex::new(4);
    let prompt = toks(0, 12);
    let (first, hashes) = idx.insert(&prompt, 3).expect("all new");
    assert_eq!((first, hashes.len(), idx.len()), (0, 3, 3));
    assert_eq!(idx.insert(&prompt, 3), None, "nothing new the second time");
    assert_eq!(
        idx.acquire(&prompt),
        hashes[..2],
        "11 tokens may be cached: 2 blocks"
    );
    assert_eq!(idx.acquire(&toks(0, 13)), hashes, "13 tokens: all 3 blocks");
    let mut diverging = toks(0, 12);
    diverging[5] = 99;
    assert_eq!(idx.acquire(&diverging), hashes[..1]);
    assert_eq!(
        idx.acquire(&toks(0, 4)),
        Vec::<u64>::new(),
        "a one-block prompt"
    );
    assert_eq!(idx.acquire(&[]), Vec::<u64>::new());
    // Inserting a longer prompt adds only its new blocks, after the cached ones.
    let (first, more) = idx.insert(&toks(0, 21), 5).expect("two new");
    assert_eq!((first, more.len(), idx.len()), (3, 2, 5));
    check(
        &idx,
        &[hashes[..2].to_vec(), hashes.clone(), hashes[..1].to_vec()],
    );
}

/// Ensures that eviction takes the least recently used unreferenced leaf each time, so a
/// chain goes leaf first, and never touches blocks a running sequence holds.
#[test]
fn eviction_is_lru_leaf_first_and_spares_referenced_blocks() {
    let mut idx = PrefixIndex::new(2);
    let a = toks(0, 4);
    let b = toks(10, 4);
    let c = cat(&a[..2], &[50, 51]);
    let ha = idx.insert(&a, 2).expect("a").1;
    let hb = idx.insert(&b, 2).expect("b").1;
    let hc = idx.insert(&c, 2).expect("c").1;
    assert_eq!(hc.len(), 1, "c shares a's first block");
    // Use a again: its blocks become the most recent.
    let chain = idx.acquire(&cat(&a, &[1]));
    assert_eq!(chain, ha);
    idx.release(&chain);
    check(&idx, &[]);
    assert_eq!(idx.evict(1), [hb[1]], "b's leaf is the oldest leaf");
    assert_eq!(idx.evict(2), [hb[0], hc[0]], "then b's root, then c");
    assert_eq!(idx.evict(9), [ha[1], ha[0]], "a last, leaf first");
    assert!(idx.is_empty());

    // Referenced blocks stay; released ones become evictable again.
    let mut idx = PrefixIndex::new(2);
    let ha = idx.insert(&a, 2).expect("a").1;
    let hb = idx.insert(&b, 2).expect("b").1;
    let held = idx.acquire(&cat(&a, &[1]));
    assert_eq!((held.clone(), idx.evictable()), (ha.clone(), 2));
    check(&idx, std::slice::from_ref(&held));
    assert_eq!(idx.evict(9), [hb[1], hb[0]]);
    assert_eq!((idx.len(), idx.evictable()), (2, 0));
    assert_eq!(idx.evict(9), Vec::<u64>::new());
    idx.release(&held);
    assert_eq!(idx.evictable(), 2);
    assert_eq!(idx.evict(9), [ha[1], ha[0]]);
}

/// Ensures that a hash held by another prefix (a 64-bit collision) is a miss that stops both
/// lookup and insertion there, never a hit on the wrong K/V.
#[test]
fn a_collision_is_a_miss() {
    let mut idx = PrefixIndex::new(2);
    let prompt = toks(0, 6);
    // Plant an entry under the hash of the prompt's first block, with other tokens.
    let hash = block_hash(None, &prompt[..2]);
    idx.entries.insert(
        hash,
        Entry {
            parent: None,
            tokens: vec![8, 9].into_boxed_slice(),
            children: 0,
            refs: 0,
            last_used: 0,
        },
    );
    idx.lru.insert((0, hash));
    idx.unreferenced = 1;
    assert_eq!(idx.acquire(&prompt), Vec::<u64>::new());
    assert_eq!(idx.insert(&prompt, 3), None);
    assert_eq!(idx.len(), 1);
}

/// One operation on the index.
#[derive(Clone, Debug)]
enum Op {
    Acquire(Vec<u32>),
    Release(usize),
    Insert(Vec<u32>, usize),
    Evict(usize),
}

fn op() -> impl Strategy<Value = Op> {
    // Two token values and blocks of two: prompts share prefixes often.
    let prompt = || proptest::collection::vec(0u32..2, 0..9);
    prop_oneof![
        3 => prompt().prop_map(Op::Acquire),
        2 => any::<usize>().prop_map(Op::Release),
        3 => (prompt(), 0usize..5).prop_map(|(p, b)| Op::Insert(p, b)),
        2 => (0usize..4).prop_map(Op::Evict),
    ]
}

proptest! {
    /// Ensures that under random acquire / release / insert / evict sequences the index
    /// agrees with a plain model (the set of cached prefixes): lookups return exactly the
    /// longest cached chain (capped), insertions exactly the new blocks, eviction frees
    /// exactly min(n, unreferenced) blocks, none referenced and each a leaf, and every
    /// structural invariant holds after each step.
    #[test]
    fn index_matches_a_model_of_cached_prefixes(ops in proptest::collection::vec(op(), 1..80)) {
        let bs = 2;
        let mut idx = PrefixIndex::new(bs);
        // Cached prefixes (whole blocks) -> the hash of their last block.
        let mut cached: HashMap<Vec<u32>, u64> = HashMap::new();
        let mut held: Vec<Vec<u64>> = Vec::new();
        for op in ops {
            match op {
                Op::Acquire(p) => {
                    let cap = p.len().saturating_sub(1) / bs;
                    let want: Vec<u64> = (1..=cap)
                        .map_while(|i| cached.get(&p[..i * bs]).copied())
                        .collect();
                    let chain = idx.acquire(&p);
                    prop_assert_eq!(&chain, &want);
                    held.push(chain);
                }
                Op::Release(i) => {
                    if !held.is_empty() {
                        let chain = held.swap_remove(i % held.len());
                        idx.release(&chain);
                    }
                }
                Op::Insert(p, blocks) => {
                    let n = blocks.min(p.len() / bs);
                    let new: Vec<usize> = (1..=n).filter(|i| !cached.contains_key(&p[..i * bs])).collect();
                    let got = idx.insert(&p, blocks);
                    match got {
                        None => prop_assert!(new.is_empty()),
                        Some((first, hashes)) => {
                            prop_assert_eq!(first + 1, new[0]);
                            prop_assert_eq!(hashes.len(), new.len());
                            for (i, h) in new.into_iter().zip(hashes) {
                                cached.insert(p[..i * bs].to_vec(), h);
                            }
                        }
                    }
                }
                Op::Evict(n) => {
                    let before = idx.evictable();
                    let gone = idx.evict(n);
                    prop_assert_eq!(gone.len(), n.min(before));
                    for h in gone {
                        prop_assert!(held.iter().all(|c| !c.contains(&h)), "evicted a held block");
                        let prefix = cached.iter().find(|&(_, &v)| v == h).map(|(k, _)| k.clone());
                        let prefix = prefix.expect("evicted a cached block");
                        cached.remove(&prefix);
                        prop_assert!(
                            cached.keys().all(|k| !k.starts_with(&prefix)),
                            "evicted a block with cached descendants"
                        );
                    }
                }
            }
            prop_assert_eq!(idx.len(), cached.len());
            check(&idx, &held);
        }
    }
}
