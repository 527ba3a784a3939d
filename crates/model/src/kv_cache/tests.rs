//! Paged KV cache tests: configuration, the allocator's ownership invariants (proptest),
//! write/view round trips through the block table, and attention over a paged view.

use super::*;
use proptest::prelude::*;
use std::collections::HashSet;
use tessera_kernels::ThreadPool;
use tessera_kernels::attention::{
    AttnOut, AttnShape, AttnSpec, flash_attention, reference::attention_f64,
};

fn cfg(block_size: usize, num_blocks: usize) -> KvCacheConfig {
    KvCacheConfig {
        n_layers: 2,
        n_kv_heads: 3,
        head_dim: 5,
        block_size,
        num_blocks,
    }
}

/// Distinct, position-dependent values so any misplaced token shows.
fn token_data(layer: usize, from: usize, n: usize, row: usize, salt: f32) -> Vec<f32> {
    (0..n * row)
        .map(|i| salt + (layer * 100_000 + (from + i / row) * 100 + i % row) as f32)
        .collect()
}

/// Ensures that each zero field and an oversized pool are rejected naming the field.
#[test]
fn invalid_configs_name_the_field() {
    let base = cfg(16, 8);
    let cases: [(&str, KvCacheConfig); 6] = [
        (
            "n_layers",
            KvCacheConfig {
                n_layers: 0,
                ..base.clone()
            },
        ),
        (
            "n_kv_heads",
            KvCacheConfig {
                n_kv_heads: 0,
                ..base.clone()
            },
        ),
        (
            "head_dim",
            KvCacheConfig {
                head_dim: 0,
                ..base.clone()
            },
        ),
        (
            "block_size",
            KvCacheConfig {
                block_size: 0,
                ..base.clone()
            },
        ),
        (
            "num_blocks",
            KvCacheConfig {
                num_blocks: 0,
                ..base.clone()
            },
        ),
        (
            "num_blocks",
            KvCacheConfig {
                num_blocks: usize::MAX / 4,
                ..base.clone()
            },
        ),
    ];
    for (field, c) in cases {
        match PagedKvCache::new(c) {
            Err(KvCacheError::InvalidConfig { field: f, .. }) => assert_eq!(f, field),
            other => panic!("{field}: expected InvalidConfig, got {other:?}"),
        }
    }
    assert_eq!(
        PagedKvCache::new(base.clone()).expect("valid").config(),
        &base
    );
}

/// Ensures that reserve takes a block only when crossing a block boundary, commit and truncate
/// move the length, truncate returns surplus blocks and drop returns the rest.
#[test]
fn reserve_commit_truncate_drop() {
    let cache = PagedKvCache::new(cfg(4, 5)).expect("cache");
    let mut seq = cache.new_seq();
    assert!(seq.is_empty() && seq.block_table().is_empty());
    cache.reserve(&mut seq, 3).expect("reserve");
    assert_eq!((seq.block_table().len(), cache.free_blocks()), (1, 4));
    seq.commit(3);
    cache.reserve(&mut seq, 1).expect("fits in the same block");
    assert_eq!(cache.free_blocks(), 4);
    seq.commit(1);
    cache
        .reserve(&mut seq, 1)
        .expect("crosses into a second block");
    assert_eq!((seq.block_table().len(), cache.free_blocks()), (2, 3));
    seq.commit(1);
    assert_eq!((seq.len(), seq.capacity()), (5, 8));
    seq.truncate(9);
    assert_eq!(seq.len(), 5, "truncate past the end is a no-op");
    seq.truncate(4);
    assert_eq!(
        (seq.len(), seq.block_table().len(), cache.free_blocks()),
        (4, 1, 4)
    );
    assert_eq!(cache.blocks_for(9), 3);
    drop(seq);
    assert_eq!(cache.free_blocks(), 5);
}

/// Ensures that a reservation larger than the free blocks fails without changing anything.
#[test]
fn out_of_blocks_changes_nothing() {
    let cache = PagedKvCache::new(cfg(4, 3)).expect("cache");
    let mut a = cache.new_seq();
    cache.reserve(&mut a, 6).expect("two blocks");
    let before = a.block_table().to_vec();
    let err = cache
        .reserve(&mut a, 13)
        .expect_err("13 tokens need 4 blocks: 2 more, 1 free");
    assert_eq!(err, KvCacheError::OutOfBlocks { needed: 2, free: 1 });
    assert_eq!(
        (a.block_table(), a.len(), cache.free_blocks()),
        (&before[..], 0, 1)
    );
    assert!(matches!(
        cache.reserve(&mut a, usize::MAX),
        Err(KvCacheError::OutOfBlocks { .. })
    ));
}

/// Ensures that committing more than was reserved is refused.
#[test]
#[should_panic(expected = "exceed the reserved")]
fn commit_past_reservation_panics() {
    let cache = PagedKvCache::new(cfg(4, 3)).expect("cache");
    let mut seq = cache.new_seq();
    cache.reserve(&mut seq, 2).expect("reserve");
    seq.commit(5);
}

/// Ensures that a sequence cannot be used with a cache that did not create it.
#[test]
fn foreign_sequence_is_refused() {
    let (a, b) = (
        PagedKvCache::new(cfg(4, 3)).expect("a"),
        PagedKvCache::new(cfg(4, 3)).expect("b"),
    );
    let mut seq = a.new_seq();
    assert_eq!(b.reserve(&mut seq, 1), Err(KvCacheError::ForeignSequence));
    assert_eq!(b.free_blocks(), 3);
}

/// Ensures that tokens written in uneven chunks across block boundaries, interleaved between
/// two sequences and two layers, read back through the block table at their positions.
#[test]
fn write_then_view_round_trip() {
    let c = cfg(4, 16);
    let row = c.token_floats();
    let mut cache = PagedKvCache::new(c).expect("cache");
    let mut seqs = [cache.new_seq(), cache.new_seq()];
    for chunk in [3, 1, 6, 1, 4] {
        for (s, seq) in seqs.iter_mut().enumerate() {
            cache.reserve(seq, chunk).expect("reserve");
            for layer in 0..2 {
                let salt = s as f32 * 0.5;
                let k = token_data(layer, seq.len(), chunk, row, salt);
                let v: Vec<f32> = k.iter().map(|x| -x).collect();
                cache.write(layer, seq, &k, &v);
            }
            seq.commit(chunk);
        }
    }
    // The two sequences' blocks interleave in the pool, so this exercises the table.
    assert_ne!(seqs[0].block_table(), &[0, 1, 2, 3][..]);
    for (s, seq) in seqs.iter().enumerate() {
        for layer in 0..2 {
            let view = cache.view(layer, seq, seq.len());
            let want = token_data(layer, 0, seq.len(), row, s as f32 * 0.5);
            for t in 0..seq.len() {
                let off = view.offset(t, 0, 3, 5);
                assert_eq!(
                    &view.k[off..off + row],
                    &want[t * row..(t + 1) * row],
                    "seq {s} layer {layer} token {t}"
                );
                let neg: Vec<f32> = want[t * row..(t + 1) * row].iter().map(|x| -x).collect();
                assert_eq!(&view.v[off..off + row], &neg[..]);
            }
        }
    }
}

/// Ensures that attention over the cache's paged view equals attention over the same K/V
/// laid out contiguously, and the f64 reference.
#[test]
fn attention_over_paged_view() {
    let c = KvCacheConfig {
        n_layers: 1,
        n_kv_heads: 3,
        head_dim: 64,
        block_size: 16,
        num_blocks: 40,
    };
    let row = c.token_floats();
    let mut cache = PagedKvCache::new(c).expect("cache");
    let mut other = cache.new_seq();
    let mut seq = cache.new_seq();
    let wave = |i: usize| ((i as f32) * 0.37).sin() * 1.3 + ((i % 7) as f32) * 0.1;
    let (mut k_all, mut v_all) = (Vec::new(), Vec::new());
    // Prefill 45 tokens, then decode 5 one at a time, with another sequence taking blocks in
    // between so the table is not the identity.
    for (step, n) in [45usize, 1, 1, 1, 1, 1].into_iter().enumerate() {
        cache.reserve(&mut other, 16).expect("other");
        other.commit(16);
        cache.reserve(&mut seq, n).expect("seq");
        let base = k_all.len();
        let k: Vec<f32> = (0..n * row).map(|i| wave(base + i + step)).collect();
        let v: Vec<f32> = (0..n * row).map(|i| wave(3 * (base + i) + 11)).collect();
        cache.write(0, &seq, &k, &v);
        k_all.extend_from_slice(&k);
        v_all.extend_from_slice(&v);
        seq.commit(n);
    }
    let len = seq.len();
    let shape = AttnShape {
        seq_q: 2,
        n_heads: 9,
        n_kv_heads: 3,
        head_dim: 64,
    };
    let q: Vec<f32> = (0..2 * 9 * 64).map(|i| wave(7 * i + 5)).collect();
    let pool = ThreadPool::new(2).expect("pool");
    let run = |view| {
        let (mut out, mut lse) = (vec![0.0; q.len()], vec![0.0; 18]);
        let spec = AttnSpec {
            shape,
            causal: true,
            scale: 0.125,
        };
        let o = AttnOut {
            out: &mut out,
            lse: &mut lse,
        };
        flash_attention(&q, view, spec, o, &pool);
        (out, lse)
    };
    let contiguous = tessera_kernels::attention::KvView::contiguous(&k_all, &v_all, len);
    let (paged, flat) = (run(cache.view(0, &seq, len)), run(contiguous));
    let want = attention_f64(&q, contiguous, shape, true, 0.125);
    for (a, (b, w)) in paged.0.iter().zip(flat.0.iter().zip(&want.out)) {
        assert!(
            (a - b).abs() <= 2e-6 && (*a as f64 - w).abs() <= 1e-5,
            "{a} {b} {w}"
        );
    }
    for (a, w) in paged.1.iter().zip(&want.lse) {
        assert!((*a as f64 - w).abs() <= 1e-5);
    }
}

/// One step of the allocator state machine.
#[derive(Clone, Debug)]
enum Op {
    New,
    Reserve(usize, usize),
    Commit(usize, usize),
    Truncate(usize, usize),
    Drop(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        1 => Just(Op::New),
        4 => (any::<usize>(), 0usize..40).prop_map(|(s, n)| Op::Reserve(s, n)),
        2 => (any::<usize>(), 0usize..40).prop_map(|(s, n)| Op::Commit(s, n)),
        1 => (any::<usize>(), 0usize..60).prop_map(|(s, n)| Op::Truncate(s, n)),
        1 => any::<usize>().prop_map(Op::Drop),
    ]
}

proptest! {
    /// Ensures that under random reserve/commit/truncate/drop sequences no block is owned
    /// twice, owned plus free blocks always equal the pool, and OutOfBlocks changes nothing.
    #[test]
    fn allocator_invariants(num_blocks in 1usize..24, block_size in 1usize..6, ops in proptest::collection::vec(op(), 1..80)) {
        let cache = PagedKvCache::new(KvCacheConfig { n_layers: 1, n_kv_heads: 1, head_dim: 1, block_size, num_blocks }).expect("cache");
        let mut seqs: Vec<SeqKv> = Vec::new();
        for op in ops {
            match op {
                Op::New => seqs.push(cache.new_seq()),
                Op::Reserve(s, n) if !seqs.is_empty() => {
                    let i = s % seqs.len();
                    let (table, free) = (seqs[i].block_table().to_vec(), cache.free_blocks());
                    match cache.reserve(&mut seqs[i], n) {
                        Ok(()) => prop_assert!(seqs[i].capacity() >= seqs[i].len() + n),
                        Err(KvCacheError::OutOfBlocks { .. }) => {
                            prop_assert_eq!(seqs[i].block_table(), &table[..]);
                            prop_assert_eq!(cache.free_blocks(), free);
                        }
                        Err(e) => prop_assert!(false, "unexpected {e}"),
                    }
                }
                Op::Commit(s, n) if !seqs.is_empty() => {
                    let i = s % seqs.len();
                    let n = n.min(seqs[i].capacity() - seqs[i].len());
                    seqs[i].commit(n);
                }
                Op::Truncate(s, len) if !seqs.is_empty() => {
                    let i = s % seqs.len();
                    seqs[i].truncate(len);
                    prop_assert!(seqs[i].capacity() >= seqs[i].len());
                }
                Op::Drop(s) if !seqs.is_empty() => {
                    seqs.swap_remove(s % seqs.len());
                }
                _ => {}
            }
            let owned: Vec<u32> = seqs.iter().flat_map(|s| s.block_table().to_vec()).collect();
            let free = cache.free_ids();
            let unique: HashSet<u32> = owned.iter().chain(&free).copied().collect();
            prop_assert_eq!(unique.len(), owned.len() + free.len(), "a block is owned twice or owned and free");
            prop_assert!(unique.iter().all(|&b| (b as usize) < num_blocks));
            prop_assert_eq!(owned.len() + cache.free_blocks(), num_blocks);
        }
        drop(seqs);
        prop_assert_eq!(cache.free_blocks(), num_blocks);
    }
}
