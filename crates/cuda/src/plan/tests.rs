//! Tests of the launch planning.

use super::*;
use proptest::prelude::*;

fn prefill(seq_q: usize, n_heads: usize, n_kv_heads: usize, head_dim: usize) -> PrefillParams {
    PrefillParams {
        batch: 1,
        seq_q,
        seq_k: seq_q,
        n_heads,
        n_kv_heads,
        head_dim,
        causal: true,
        scale: 0.125,
    }
}

fn decode(seq_q: usize, len: usize) -> DecodeParams {
    DecodeParams {
        seq_q,
        n_heads: 9,
        n_kv_heads: 3,
        head_dim: 64,
        len,
        block_size: 16,
        num_blocks: 1 << 20,
        causal: true,
        scale: 0.125,
    }
}

fn field(e: CudaError) -> &'static str {
    match e {
        CudaError::InvalidArgument { field, .. } => field,
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
}

/// Ensures that head dims map to the smallest variant that holds them and out-of-range ones
/// are typed errors naming `head_dim`.
#[test]
fn head_dim_classes() {
    assert_eq!(HeadDimClass::for_head_dim(1).ok(), Some(HeadDimClass::D64));
    assert_eq!(HeadDimClass::for_head_dim(64).ok(), Some(HeadDimClass::D64));
    assert_eq!(
        HeadDimClass::for_head_dim(65).ok(),
        Some(HeadDimClass::D128)
    );
    assert_eq!(
        HeadDimClass::for_head_dim(128).ok(),
        Some(HeadDimClass::D128)
    );
    assert_eq!(
        HeadDimClass::for_head_dim(129).ok(),
        Some(HeadDimClass::D256)
    );
    assert_eq!(
        HeadDimClass::for_head_dim(256).ok(),
        Some(HeadDimClass::D256)
    );
    for bad in [0, 257, 1000] {
        assert_eq!(
            field(HeadDimClass::for_head_dim(bad).expect_err("bad")),
            "head_dim"
        );
    }
}

/// Ensures that every head dim's attention blocks (prefill and decode) fit the default 48 KiB
/// of shared memory, so no launch needs an opt-in attribute, and that the formula matches a
/// hand count for head dim 128 (32 f32 query rows, K rows of 65 words, V rows of 128 halves).
#[test]
fn shared_memory_fits_default_limit() {
    for hd in 1..=MAX_HEAD_DIM {
        let class = HeadDimClass::for_head_dim(hd).expect("class");
        for rpw in [class.prefill_rows_per_warp(), class.decode_rows_per_warp()] {
            let bytes = attn_smem_bytes(hd, WARPS as usize * rpw) + ATTN_STATIC_SMEM;
            assert!(
                bytes <= DEFAULT_SMEM_LIMIT,
                "hd {hd} rpw {rpw}: {bytes} bytes"
            );
        }
    }
    assert_eq!(
        attn_smem_bytes(128, 32),
        32 * 128 * 4 + 32 * 130 * 2 + 32 * 128 * 2
    );
    // Odd head dims pad to even; a K row stride is always an odd number of 32-bit words.
    assert_eq!(attn_smem_bytes(59, 1), 60 * 4 + 32 * 62 * 2 + 32 * 60 * 2);
}

/// Ensures that the tensor-core path is chosen exactly for head dims 64/128 on sm_80+ under
/// `Auto`, covers every row with 64-row blocks, and fits the default shared memory.
#[test]
fn tensor_core_path_selection() {
    for hd in [1, 59, 63, 64, 65, 80, 127, 128, 129, 256] {
        let p = prefill(100, 4, 2, hd);
        p.geometry().expect("valid");
        let tc = p.tc_geometry(PrefillPath::Auto, 90);
        assert_eq!(tc.is_some(), hd == 64 || hd == 128, "hd {hd}");
        assert!(p.tc_geometry(PrefillPath::Simt, 90).is_none());
        assert!(p.tc_geometry(PrefillPath::Auto, 75).is_none());
        if let Some(g) = tc {
            assert_eq!(g.grid, (2, 4, 1));
            assert!(g.smem_bytes as usize <= DEFAULT_SMEM_LIMIT);
        }
    }
    assert_eq!(tc_smem_bytes(128), 2 * 64 * 136 * 2);
}

/// Ensures that the prefill grid covers every query row of every head and batch exactly once.
#[test]
fn prefill_grid_covers_rows() {
    let p = PrefillParams {
        batch: 4,
        ..prefill(4096, 16, 16, 128)
    };
    let (class, g) = p.geometry().expect("geometry");
    assert_eq!(class, HeadDimClass::D128);
    assert_eq!(g.grid, (4096 / 32, 16, 4));
    assert_eq!(g.block, (128, 1, 1));
    let (_, g) = prefill(33, 9, 3, 200).geometry().expect("geometry");
    // d256 variant: 4 warps x 2 rows = 8 rows per block.
    assert_eq!(g.grid, (5, 9, 1));
}

/// Ensures that invalid prefill parameters are typed errors naming the offending field.
#[test]
fn prefill_rejects_bad_params() {
    let ok = prefill(8, 6, 2, 64);
    let cases: [(PrefillParams, &str); 7] = [
        (PrefillParams { batch: 0, ..ok }, "batch"),
        (PrefillParams { seq_q: 0, ..ok }, "seq_q"),
        (
            PrefillParams {
                n_kv_heads: 0,
                ..ok
            },
            "n_kv_heads",
        ),
        (PrefillParams { n_heads: 5, ..ok }, "n_heads"),
        (
            PrefillParams {
                head_dim: 300,
                ..ok
            },
            "head_dim",
        ),
        (
            PrefillParams {
                scale: f32::NAN,
                ..ok
            },
            "scale",
        ),
        (
            PrefillParams {
                batch: 70_000,
                ..ok
            },
            "batch",
        ),
    ];
    for (p, want) in cases {
        assert_eq!(field(p.geometry().expect_err("invalid")), want, "{p:?}");
    }
}

/// Ensures that the FLOP count is 4·sq·sk·h·d without a mask and counts exactly the visible
/// pairs with one (square causal: n(n+1)/2 pairs; more queries than keys: empty rows add 0).
#[test]
fn prefill_flops() {
    let p = PrefillParams {
        causal: false,
        ..prefill(10, 2, 1, 8)
    };
    assert_eq!(p.flops(), 4.0 * 100.0 * 16.0);
    assert_eq!(prefill(10, 2, 1, 8).flops(), 4.0 * 55.0 * 16.0);
    let wide = PrefillParams {
        seq_k: 3,
        ..prefill(5, 1, 1, 1)
    };
    // Rows 0,1 see nothing; rows 2,3,4 see 1,2,3 keys.
    assert_eq!(wide.flops(), 4.0 * 6.0);
}

/// Ensures that short contexts are not split and long ones are split into tile-aligned ranges
/// no shorter than the minimum, enough to fill the device.
#[test]
fn split_plan_examples() {
    assert_eq!(SplitPlan::new(100, 3, 132).n_splits, 1);
    let p = SplitPlan::new(32_768, 3, 132);
    assert_eq!(p.keys_per_split % TILE_KEYS, 0);
    assert!(p.keys_per_split >= MIN_KEYS_PER_SPLIT);
    assert!(
        p.n_splits * 3 >= DECODE_BLOCKS_PER_SM * 132 || p.keys_per_split == MIN_KEYS_PER_SPLIT,
        "{p:?} does not fill 132 SMs"
    );
    let empty = SplitPlan::new(0, 3, 132);
    assert_eq!((empty.n_splits, empty.range(0, 0)), (1, 0..0));
}

proptest! {
    /// Ensures that the splits partition the keys: consecutive, disjoint, none empty (for a
    /// non-empty context), covering 0..len, tile-aligned starts.
    #[test]
    fn splits_partition_keys(len in 0usize..300_000, base in 1usize..64, sms in 1usize..200) {
        let p = SplitPlan::new(len, base, sms);
        prop_assert!(p.n_splits >= 1);
        prop_assert_eq!(p.keys_per_split % TILE_KEYS, 0);
        let mut next = 0;
        for s in 0..p.n_splits {
            let r = p.range(s, len);
            prop_assert_eq!(r.start, next);
            prop_assert_eq!(r.start % TILE_KEYS, 0);
            prop_assert!(len == 0 || !r.is_empty(), "split {} of {:?} empty", s, p);
            next = r.end;
        }
        prop_assert_eq!(next, len);
        if p.n_splits > 1 {
            prop_assert!(p.keys_per_split >= MIN_KEYS_PER_SPLIT);
        }
    }

    /// Ensures that the decode grid has one block row per KV head and enough row chunks for
    /// every (query, group head) pair.
    #[test]
    fn decode_grid_covers_rows(seq_q in 1usize..20, len in 0usize..100_000) {
        let plan = decode(seq_q, len).plan(132).expect("plan");
        prop_assert_eq!(plan.attend.grid.1, 3);
        let rows_per_block = WARPS as usize * plan.class.decode_rows_per_warp();
        prop_assert!(plan.attend.grid.2 as usize * rows_per_block >= seq_q * 3);
        prop_assert_eq!(plan.attend.grid.0 as usize, plan.split.n_splits);
        prop_assert!(plan.combine.grid.0 as usize * 4 >= seq_q * 9);
    }
}

/// Ensures that invalid decode parameters are typed errors naming the field.
#[test]
fn decode_rejects_bad_params() {
    let ok = decode(1, 100);
    let cases: [(DecodeParams, &str); 5] = [
        (DecodeParams { seq_q: 0, ..ok }, "seq_q"),
        (
            DecodeParams {
                block_size: 0,
                ..ok
            },
            "block_size",
        ),
        (DecodeParams { n_heads: 10, ..ok }, "n_heads"),
        (DecodeParams { head_dim: 0, ..ok }, "head_dim"),
        (
            DecodeParams {
                scale: f32::INFINITY,
                ..ok
            },
            "scale",
        ),
    ];
    for (p, want) in cases {
        assert_eq!(field(p.plan(132).expect_err("invalid")), want, "{p:?}");
    }
}

/// Ensures that block tables are checked for length and for entries past the pool, and that a
/// table exactly covering the tokens (last block partial) is accepted.
#[test]
fn block_table_validation() {
    assert!(validate_block_table(&[3, 0, 2], 16, 40, 4).is_ok());
    assert!(validate_block_table(&[], 16, 0, 0).is_ok());
    // Entries past what `len` needs are not read, so they may be anything.
    assert!(validate_block_table(&[1, 99], 16, 16, 2).is_ok());
    let short = validate_block_table(&[3, 0], 16, 40, 4).expect_err("short");
    assert!(short.to_string().contains("need 3"), "{short}");
    let past = validate_block_table(&[3, 4, 0], 16, 40, 4).expect_err("past pool");
    assert!(past.to_string().contains("entry 1 names block 4"), "{past}");
    assert_eq!(
        field(validate_block_table(&[0], 0, 1, 1).expect_err("bs")),
        "block_size"
    );
}

/// Ensures that elementwise launches use at least one block and cap the grid.
#[test]
fn elementwise_grid() {
    assert_eq!(elementwise_geometry(0).grid.0, 1);
    assert_eq!(elementwise_geometry(257).grid.0, 2);
    assert_eq!(elementwise_geometry(1 << 40).grid.0, 65_535);
}
