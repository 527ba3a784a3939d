//! Unit tests of rings in the mesh: ring sets, the per-rank KV share, `Auto`'s choice and
//! the refusals.

use tessera_format::{Arch, ModelConfig, QType, RopeLayout};

use super::mesh_tests::smollm2;
use super::*;

/// SmolLM2's layer shape with only two layers: a pipeline can use at most two workers.
fn two_layers() -> ModelFootprint {
    let cfg = ModelConfig {
        arch: Arch::Llama,
        n_layers: 2,
        hidden: 576,
        intermediate: 1536,
        n_heads: 9,
        n_kv_heads: 3,
        head_dim: 64,
        vocab_size: 49152,
        context_len: 65536,
        rope_theta: 100_000.0,
        rope_layout: RopeLayout::Interleaved,
        rms_eps: 1e-5,
        qkv_bias: false,
    };
    ModelFootprint::from_shape(&cfg, QType::Q4_1, QType::Q8_0, true).expect("shape")
}

const MIB: u64 = 1 << 20;

fn worker(id: &str, memory_bytes: u64) -> WorkerCapacity {
    WorkerCapacity {
        id: id.into(),
        memory_bytes,
        threads: 1,
        link_rtt_us: 0,
        device_bytes_s: 0,
    }
}

fn policy(kv_tokens: u32, tp: TpPolicy, cp: CpPolicy) -> PlanPolicy {
    PlanPolicy {
        kv_tokens,
        tp,
        cp,
        block_size: 16,
    }
}

/// Ensures that a rank's KV share covers `⌈n / P⌉ + 2` tokens of a sequence of `n` in whole
/// blocks with one to spare, and that a ring of one holds everything.
#[test]
fn rank_share_covers_the_zigzag_round_off() {
    assert_eq!(rank_kv_tokens(8192, 1, 16), 8192);
    assert_eq!(rank_kv_tokens(8192, 2, 16), (257 + 1) * 16);
    assert_eq!(rank_kv_tokens(65536, 4, 16), (1025 + 1) * 16);
    for (total, p) in [(100, 3), (7, 4), (1, 2)] {
        let share = rank_kv_tokens(total, p, 16);
        assert!(share >= total.div_ceil(p) + 2 && share.is_multiple_of(16));
    }
}

/// Ensures that rings of 2 over four workers give a two-stage pipeline of rings: each ring
/// set (workers in id order) holds its stage with cp ranks 0 and 1, the same layers and
/// weights on both, about half the KV bytes of a plan without rings, and the plan sorted by
/// (stage, cp_rank, tp_rank); and that TP = 2 × rings of 2 over four workers orders its one
/// group cp-major.
#[test]
fn rings_replicate_their_set_and_halve_the_kv() {
    let m = smollm2();
    let ws: Vec<_> = ["a", "b", "c", "d"]
        .iter()
        .map(|id| worker(id, 300 * MIB))
        .collect();
    let ring = plan(
        &m,
        &ws,
        &policy(8192, TpPolicy::Fixed(1), CpPolicy::Fixed(2)),
    )
    .expect("ring");
    let flat = plan(
        &m,
        &ws[..2],
        &policy(8192, TpPolicy::Fixed(1), CpPolicy::Fixed(1)),
    )
    .expect("pipeline");
    assert_eq!(ring.stages.len(), 4);
    let ids: Vec<(&str, u32, u32)> = ring
        .stages
        .iter()
        .map(|s| (s.worker_id.as_str(), s.stage, s.cp_rank))
        .collect();
    assert_eq!(ids, [("a", 0, 0), ("b", 0, 1), ("c", 1, 0), ("d", 1, 1)]);
    for pair in ring.stages.chunks(2) {
        assert_eq!(pair[0].layers, pair[1].layers);
        assert_eq!(pair[0].weight_bytes, pair[1].weight_bytes);
        assert!(pair.iter().all(|s| s.cp_ranks == 2 && s.tp_ranks == 1));
        let same = flat
            .stages
            .iter()
            .find(|s| s.layers == pair[0].layers)
            .expect("the same layer split as without rings");
        let ratio = pair[0].kv_bytes as f64 / (same.kv_bytes as f64 / 2.0);
        assert!((1.0..1.02).contains(&ratio), "{ratio}");
    }
    let mesh = plan(&m, &ws, &policy(0, TpPolicy::Fixed(2), CpPolicy::Fixed(2))).expect("tp x cp");
    let order: Vec<(&str, u32, u32)> = mesh
        .stages
        .iter()
        .map(|s| (s.worker_id.as_str(), s.cp_rank, s.tp_rank))
        .collect();
    // Ring sets {a, b} and {c, d} are the tensor-parallel ranks 0 and 1.
    assert_eq!(order, [("a", 0, 0), ("c", 0, 1), ("b", 1, 0), ("d", 1, 1)]);
}

/// Ensures that `Auto` keeps a plan without rings whenever one fits — a pipeline splits the
/// KV cache by layers first (SmolLM2's 8192 tokens over two 400 MiB workers, which one alone
/// cannot hold) — and takes a ring when a pipeline cannot use enough workers: a two-layer
/// model's 65536-token KV cache over four workers that hold one layer with half of its KV
/// but not all of it gives two stages of rings of two. Says why when no ring size fits, and
/// refuses a ring larger than the workers naming context parallelism.
#[test]
fn auto_rings_only_when_the_kv_does_not_fit() {
    let m = smollm2();
    let small = [worker("a", 400 * MIB), worker("b", 400 * MIB)];
    let whole = plan(
        &m,
        &small[..1],
        &policy(8192, TpPolicy::Fixed(1), CpPolicy::Fixed(1)),
    );
    assert!(matches!(whole, Err(PlanError::DoesNotFit(_))), "{whole:?}");
    let p = plan(
        &m,
        &small,
        &policy(8192, TpPolicy::Fixed(1), CpPolicy::Auto),
    )
    .expect("fits");
    assert!(
        p.stages.iter().all(|s| s.cp_ranks == 1) && p.n_stages() == 2,
        "{p:?}"
    );
    let two = two_layers();
    // One layer's KV for 65536 tokens: 65536 × 3 heads × 64 × 2 × 4 bytes = 96 MiB.
    let ws: Vec<_> = ["a", "b", "c", "d"]
        .iter()
        .map(|id| worker(id, 120 * MIB))
        .collect();
    let flat = plan(
        &two,
        &ws,
        &policy(65536, TpPolicy::Fixed(1), CpPolicy::Fixed(1)),
    );
    assert!(matches!(flat, Err(PlanError::DoesNotFit(_))), "{flat:?}");
    let p = plan(
        &two,
        &ws,
        &policy(65536, TpPolicy::Fixed(1), CpPolicy::Auto),
    )
    .expect("rings");
    assert_eq!((p.stages.len(), p.n_stages()), (4, 2), "{p:?}");
    assert!(p.stages.iter().all(|s| s.cp_ranks == 2));
    let tiny = [worker("a", 50 * MIB), worker("b", 50 * MIB)];
    let e = plan(&m, &tiny, &policy(8192, TpPolicy::Fixed(1), CpPolicy::Auto)).expect_err("no fit");
    assert!(matches!(e, PlanError::DoesNotFit(_)), "{e}");
    let e = plan(
        &m,
        &small,
        &policy(8192, TpPolicy::Fixed(1), CpPolicy::Fixed(3)),
    )
    .expect_err("three ranks, two workers");
    assert!(
        matches!(&e, PlanError::ContextParallel(why) if why.contains("ring of 3")),
        "{e}"
    );
}

/// Ensures that `AutoFrom(n)` rings by length: with a KV budget of at least `n` tokens per
/// sequence, two workers that could each hold the whole cache form a ring of two (each rank
/// about half of it) where `Auto` plans a pipeline; under `n` it plans as `Auto`; and one
/// worker alone plans without a ring.
#[test]
fn auto_from_rings_long_contexts_by_policy() {
    let m = smollm2();
    let big = [worker("a", 2048 * MIB), worker("b", 2048 * MIB)];
    let auto = plan(&m, &big, &policy(16384, TpPolicy::Fixed(1), CpPolicy::Auto)).expect("fits");
    assert!(auto.stages.iter().all(|s| s.cp_ranks == 1), "{auto:?}");
    let long = plan(
        &m,
        &big,
        &policy(16384, TpPolicy::Fixed(1), CpPolicy::AutoFrom(16384)),
    )
    .expect("rings");
    assert_eq!((long.stages.len(), long.n_stages()), (2, 1), "{long:?}");
    assert!(long.stages.iter().all(|s| s.cp_ranks == 2), "{long:?}");
    let per_token = m.kv_bytes_per_token_layer * m.n_layers() as u64;
    for s in &long.stages {
        assert_eq!(s.layers, 0..30, "{s:?}");
        assert_eq!(
            s.kv_bytes,
            per_token * u64::from(rank_kv_tokens(16384, 2, 16)),
            "{s:?}"
        );
    }
    let short = plan(
        &m,
        &big,
        &policy(8192, TpPolicy::Fixed(1), CpPolicy::AutoFrom(16384)),
    )
    .expect("fits");
    assert_eq!(
        short,
        plan(&m, &big, &policy(8192, TpPolicy::Fixed(1), CpPolicy::Auto)).expect("fits")
    );
    let alone = plan(
        &m,
        &big[..1],
        &policy(16384, TpPolicy::Fixed(1), CpPolicy::AutoFrom(1024)),
    )
    .expect("fits one worker");
    assert!(alone.stages.iter().all(|s| s.cp_ranks == 1), "{alone:?}");
}
