//! Unit tests and proptests of the mesh: group splits, refusals, `Fixed(1)` against the
//! planner as it was, `Auto`, and the invariants of every plan.

use proptest::prelude::*;
use tessera_format::{Arch, ModelConfig, QType, RopeLayout};

use super::split::apportion;
use super::*;

/// SmolLM2-135M's shape: 30 layers, 9 query / 3 KV heads of 64, MLP 1536, vocab 49152 (the
/// cost model's tests use it too).
pub(super) fn smollm2() -> ModelFootprint {
    let cfg = ModelConfig {
        arch: Arch::Llama,
        n_layers: 30,
        hidden: 576,
        intermediate: 1536,
        n_heads: 9,
        n_kv_heads: 3,
        head_dim: 64,
        vocab_size: 49152,
        context_len: 8192,
        rope_theta: 100_000.0,
        rope_layout: RopeLayout::Interleaved,
        rms_eps: 1e-5,
        qkv_bias: false,
    };
    // As the GGUF the project serves: Q4_1 layers, Q8_0 tied embedding.
    ModelFootprint::from_shape(&cfg, QType::Q4_1, QType::Q8_0, true).expect("smollm2 shape")
}

fn worker(id: &str, memory_bytes: u64, threads: u32) -> WorkerCapacity {
    WorkerCapacity {
        id: id.into(),
        memory_bytes,
        threads,
        link_rtt_us: 0,
        device_bytes_s: 0,
    }
}

fn policy(kv_tokens: u32, tp: TpPolicy) -> PlanPolicy {
    PlanPolicy {
        kv_tokens,
        tp,
        cp: CpPolicy::Fixed(1),
        block_size: 0,
    }
}

const GIB: u64 = 1 << 30;

/// Ensures that SmolLM2's 3 KV heads split 2+1 over ranks of 4 and 2 threads, its MLP
/// columns and vocabulary rows 2:1 too, on 32-column Q4_1 blocks, and that every rank of the
/// first stage embeds and every rank of the last holds the head.
#[test]
fn uneven_split_follows_threads() {
    let m = smollm2();
    let ws = [worker("a", GIB, 4), worker("b", GIB, 2)];
    let p = plan(&m, &ws, &policy(0, TpPolicy::Fixed(2))).expect("plan");
    assert_eq!(p.n_stages(), 1);
    let g: Vec<_> = p.group(0).collect();
    assert_eq!(g.len(), 2);
    assert_eq!((g[0].kv_heads.clone(), g[1].kv_heads.clone()), (0..2, 2..3));
    assert_eq!((g[0].ffn.clone(), g[1].ffn.clone()), (0..1024, 1024..1536));
    assert_eq!(
        (g[0].vocab.clone(), g[1].vocab.clone()),
        (0..32768, 32768..49152)
    );
    assert!(g.iter().all(|r| r.embed && r.head && r.tp_ranks == 2));
    assert_eq!((g[0].tp_rank, g[1].tp_rank), (0, 1));
    // The faster rank holds more: two thirds of the heads, columns and rows.
    assert!(g[0].weight_bytes > g[1].weight_bytes);
    // Both ranks together hold the model once, but for the norms every rank keeps whole
    // (2 per layer and the final one, f32) and rounding up.
    let norms = (30 * 2 * 576 * 4 + 576 * 4) as u64;
    let sum = g[0].weight_bytes + g[1].weight_bytes;
    assert!(
        sum >= m.weight_bytes() + norms && sum <= m.weight_bytes() + norms + 8,
        "{sum}"
    );
}

/// Ensures that pipeline stages are balanced by arithmetic: SmolLM2's Q8_0 head counts as its
/// parameters (8 layers' worth of Q4_1 bytes), not its bytes (13.8 layers), so two equal
/// workers split 19 / 11 layers; an unknown shape falls back to the head's bytes.
#[test]
fn stages_balance_the_head_by_its_parameters() {
    let m = smollm2();
    let layer = m.layer_bytes[0] as f64;
    let by_bytes = m.head_bytes as f64 / layer;
    let by_work = m.head_work_bytes() as f64 / layer;
    assert!((13.0..14.5).contains(&by_bytes), "{by_bytes}");
    assert!((7.8..8.2).contains(&by_work), "{by_work}");
    let ws = [worker("a", GIB, 1), worker("b", GIB, 1)];
    let p = plan(&m, &ws, &policy(0, TpPolicy::Fixed(1))).expect("plan");
    let layers: Vec<_> = p.stages.iter().map(|s| s.layers.clone()).collect();
    assert_eq!(layers, vec![0..19, 19..30]);
    let unknown = ModelFootprint {
        n_kv_heads: 0,
        ..m.clone()
    };
    assert_eq!(unknown.head_work_bytes(), unknown.head_bytes);
}

/// Ensures that the apportionment is proportional, at least one unit each, and complete.
#[test]
fn apportion_is_proportional() {
    assert_eq!(apportion(3, &[4, 2]), Some(vec![2, 1]));
    assert_eq!(
        apportion(3, &[2, 2]),
        Some(vec![2, 1]),
        "ties go to the lower rank"
    );
    assert_eq!(apportion(48, &[4, 2]), Some(vec![32, 16]));
    assert_eq!(
        apportion(4, &[100, 1, 1]),
        Some(vec![2, 1, 1]),
        "a minimum of one"
    );
    assert_eq!(
        apportion(10, &[0, 0]),
        Some(vec![5, 5]),
        "0 threads read as 1"
    );
    assert_eq!(apportion(1, &[1, 1]), None);
}

/// Ensures that every refusal names its reason: fewer workers than a group, more ranks
/// than KV heads, unaligned blocks, a footprint without its shape, a group of 0, and memory.
#[test]
fn refusals_name_the_reason() {
    let m = smollm2();
    let ws = |n: usize| -> Vec<WorkerCapacity> {
        (0..n).map(|i| worker(&format!("w{i}"), GIB, 2)).collect()
    };
    let refused = |m: &ModelFootprint, n: usize, k: u32| match plan(
        m,
        &ws(n),
        &policy(0, TpPolicy::Fixed(k)),
    ) {
        Err(PlanError::TensorParallel(why)) => why,
        other => panic!("expected a refusal, got {other:?}"),
    };
    assert!(refused(&m, 1, 2).contains("only 1 worker(s)"));
    // Three workers in groups of two: one group, the third worker waits.
    let p = plan(&m, &ws(3), &policy(0, TpPolicy::Fixed(2))).expect("one group of two");
    assert!(
        p.stages
            .iter()
            .all(|s| s.tp_ranks == 2 && s.worker_id != "w2"),
        "{p:?}"
    );
    let why = refused(&m, 4, 4);
    assert!(
        why.contains("the model has 3") && why.contains("not replicated"),
        "{why}"
    );
    let mut kquant = m.clone();
    kquant.attn_out_block = 256;
    let why = refused(&kquant, 2, 2);
    assert!(
        why.contains("256-column blocks") && why.contains("every 4 KV heads"),
        "{why}"
    );
    let mut narrow = m.clone();
    narrow.ffn_down_block = 1024;
    narrow.intermediate = 1024;
    assert!(refused(&narrow, 2, 2).contains("1 blocks of 1024"));
    let old = ModelFootprint {
        layer_bytes: vec![10; 4],
        ..ModelFootprint::default()
    };
    assert!(refused(&old, 2, 2).contains("does not give its head counts"));
    assert!(refused(&m, 2, 0).contains("at least one rank"));
    let small: Vec<_> = (0..2)
        .map(|i| worker(&format!("w{i}"), 1 << 20, 2))
        .collect();
    let e = plan(&m, &small, &policy(0, TpPolicy::Fixed(2))).expect_err("1 MiB each");
    assert!(
        matches!(&e, PlanError::DoesNotFit(s) if s.contains("groups of 2 offer")),
        "{e}"
    );
}

/// Ensures that a memory-poor group takes fewer layers and that the KV cache is split with
/// the heads (a rank of 2 of 3 KV heads holds two thirds of each layer's cache).
#[test]
fn memory_shapes_the_mesh() {
    let m = smollm2();
    let kv = 1024;
    let ws = [
        worker("a", 30 << 20, 2),
        worker("b", 30 << 20, 2),
        worker("c", GIB, 2),
        worker("d", GIB, 2),
    ];
    let p = plan(&m, &ws, &policy(kv, TpPolicy::Fixed(2))).expect("plan");
    assert_eq!(p.n_stages(), 2);
    let first: Vec<_> = p.group(0).collect();
    assert!(first[0].layers.len() < 15, "{:?}", first[0].layers);
    let per_layer = m.kv_bytes_per_token_layer * u64::from(kv);
    assert_eq!(
        first[0].kv_bytes,
        per_layer * 2 / 3 * first[0].layers.len() as u64
    );
    assert_eq!(
        first[1].kv_bytes,
        per_layer / 3 * first[1].layers.len() as u64
    );
    for s in &p.stages {
        let w = ws.iter().find(|w| w.id == s.worker_id).expect("w");
        assert!(s.weight_bytes + s.kv_bytes <= w.memory_bytes);
    }
}

/// Ensures that `Auto` is deterministic, never predicts worse than pipeline-only or any fixed
/// size it could use, and takes tensor parallelism where pipeline stages run out: 512
/// workers for a model of 80 layers.
#[test]
fn auto_takes_the_best_predicted_size() {
    let cfg = ModelConfig {
        arch: Arch::Llama,
        n_layers: 80,
        hidden: 8192,
        intermediate: 28672,
        n_heads: 64,
        n_kv_heads: 8,
        head_dim: 128,
        vocab_size: 128_256,
        context_len: 8192,
        rope_theta: 500_000.0,
        rope_layout: RopeLayout::Interleaved,
        rms_eps: 1e-5,
        qkv_bias: false,
    };
    let m = ModelFootprint::from_shape(&cfg, QType::Q4K, QType::Q6K, false).expect("70B");
    let ws: Vec<_> = (0..512)
        .map(|i| worker(&format!("w{i:03}"), 16 * GIB, 4))
        .collect();
    let c = CostInputs::default();
    let auto = plan(&m, &ws, &policy(4096, TpPolicy::Auto)).expect("auto");
    assert_eq!(
        plan(&m, &ws, &policy(4096, TpPolicy::Auto)),
        Ok(auto.clone())
    );
    let score = |p: &Plan| {
        predict(p, &m, &ws, &c)
            .expect("known workers")
            .aggregate_tok_s
    };
    let pipeline = plan(&m, &ws, &policy(4096, TpPolicy::Fixed(1))).expect("pipeline");
    assert!(score(&auto) >= score(&pipeline));
    for k in [2, 4, 8] {
        let fixed = plan(&m, &ws, &policy(4096, TpPolicy::Fixed(k))).expect("fixed");
        assert!(score(&auto) >= score(&fixed) * (1.0 - 1e-12), "k = {k}");
    }
    assert!(auto.stages[0].tp_ranks > 1, "{}", auto.stages[0].tp_ranks);
}

/// Ensures that `Fixed(1)` is the planner as it was, on SmolLM2's real footprint.
#[test]
fn fixed_one_keeps_todays_plan_for_smollm2() {
    let m = smollm2();
    let ws = [
        worker("a", 40 << 20, 2),
        worker("b", GIB, 4),
        worker("c", GIB, 1),
    ];
    let pol = policy(2048, TpPolicy::Fixed(1));
    assert_eq!(
        old_fields(&plan(&m, &ws, &pol)),
        old_fields(&super::legacy_oracle::plan(&m, &ws, &pol))
    );
}

/// Ensures that plans, policies and capacities serialized before tensor parallelism (the
/// Raft log holds them as JSON) still read: a group of one holding everything, `Fixed(1)`,
/// an unmeasured RTT; and that the cost model reads such a plan as whole.
#[test]
fn old_serialized_values_read() {
    let old = r#"{"stages":[{"worker_id":"w1","stage":0,"tp_rank":0,"cp_rank":0,
        "layers":{"start":0,"end":30},"embed":true,"head":true,"weight_bytes":5,"kv_bytes":6}]}"#;
    let p: Plan = serde_json::from_str(old).expect("old plan");
    let s = &p.stages[0];
    assert_eq!(
        (s.tp_ranks, s.kv_heads.clone(), s.vocab.clone()),
        (0, 0..0, 0..0)
    );
    assert_eq!((p.n_stages(), p.group(0).count()), (1, 1));
    let pol: PlanPolicy = serde_json::from_str(r#"{"kv_tokens":7}"#).expect("old policy");
    assert_eq!(pol, policy(7, TpPolicy::Fixed(1)));
    let w: WorkerCapacity =
        serde_json::from_str(r#"{"id":"w1","memory_bytes":9,"threads":2}"#).expect("old worker");
    assert_eq!(w.link_rtt_us, 0);
    let m = smollm2();
    let ws = [worker("w1", GIB, 2)];
    let new = plan(&m, &ws, &policy(0, TpPolicy::Fixed(1))).expect("plan");
    let c = CostInputs::default();
    assert_eq!(predict(&p, &m, &ws, &c), predict(&new, &m, &ws, &c));
    assert_eq!(
        serde_json::from_str::<Plan>(&serde_json::to_string(&new).expect("json")).expect("read"),
        new
    );
}

type OldFields = Result<Vec<(String, u32, u32, Range<u32>, bool, bool, u64, u64)>, PlanError>;

/// A plan's fields as they were before tensor parallelism.
fn old_fields(p: &Result<Plan, PlanError>) -> OldFields {
    p.clone().map(|p| {
        p.stages
            .into_iter()
            .map(|s| {
                (
                    s.worker_id,
                    s.stage,
                    s.tp_rank,
                    s.layers,
                    s.embed,
                    s.head,
                    s.weight_bytes,
                    s.kv_bytes,
                )
            })
            .collect()
    })
}

/// A random footprint a split can handle: heads, widths, blocks and per-layer bytes.
fn arb_model() -> impl Strategy<Value = ModelFootprint> {
    (
        (
            1u32..7,
            1u32..4,
            prop::sample::select(vec![8u32, 16, 32, 64]),
        ),
        (
            prop::sample::select(vec![1u32, 32, 256]),
            1u32..40,
            1u32..400,
        ),
        prop::collection::vec((1u64..300, 1u64..300, 0u64..20), 1..14),
        (0u64..600, any::<bool>(), 0u64..4),
    )
        .prop_map(
            |((n_kv, group, head_dim), (block, blocks, vocab), layers, (embed, tied, kv))| {
                let hidden = 64;
                let attn: Vec<u64> = layers.iter().map(|l| l.0).collect();
                let ffn: Vec<u64> = layers.iter().map(|l| l.1).collect();
                let embed = embed + u64::from(vocab);
                ModelFootprint {
                    layer_bytes: layers.iter().map(|l| l.0 + l.1 + l.2).collect(),
                    embed_bytes: embed,
                    head_bytes: embed + 4 * u64::from(hidden),
                    tied,
                    kv_bytes_per_token_layer: kv * u64::from(n_kv),
                    n_heads: n_kv * group,
                    n_kv_heads: n_kv,
                    head_dim,
                    hidden,
                    intermediate: block * blocks,
                    vocab,
                    attn_bytes: attn,
                    ffn_bytes: ffn,
                    attn_out_block: block,
                    ffn_down_block: block,
                }
            },
        )
}

fn arb_workers() -> impl Strategy<Value = Vec<WorkerCapacity>> {
    prop::collection::vec((0u64..20_000, 0u32..9), 1..13).prop_map(|ws| {
        ws.into_iter()
            .enumerate()
            .map(|(i, (m, t))| worker(&format!("w{i}"), m, t))
            .collect()
    })
}

fn arb_tp() -> impl Strategy<Value = TpPolicy> {
    prop_oneof![
        3 => (2u32..5).prop_map(TpPolicy::Fixed),
        1 => Just(TpPolicy::Fixed(1)),
        2 => Just(TpPolicy::Auto),
    ]
}

/// `ws` less its last workers down to a multiple of a fixed group size (when it has one
/// group at least), so that most cases plan groups rather than stop at the divisibility
/// refusal, which `refusals_name_the_reason` covers.
fn fit_count(mut ws: Vec<WorkerCapacity>, tp: TpPolicy) -> Vec<WorkerCapacity> {
    if let TpPolicy::Fixed(k) = tp {
        let keep = ws.len() / k as usize * k as usize;
        if keep > 0 {
            ws.truncate(keep);
        }
    }
    ws
}

/// Checks that `parts` (in rank order) tile `[0, len)` exactly, none empty.
fn tiles(parts: &[Range<u32>], len: u32) -> bool {
    parts.iter().all(|r| r.start < r.end)
        && parts.first().is_some_and(|r| r.start == 0)
        && parts.last().is_some_and(|r| r.end == len)
        && parts.windows(2).all(|w| w[0].end == w[1].start)
}

proptest! {
    // Cheap cases, and only some plan groups (sizes above the KV heads, unaligned blocks and
    // short memory are refused): many of them.
    #![proptest_config(ProptestConfig::with_cases(2048))]

    /// Ensures that every mesh covers every layer once across stages and every KV head, MLP
    /// column and vocabulary row once within each stage, on block boundaries, with each rank
    /// within its memory, workers used once, sorted by (stage, rank), deterministically.
    #[test]
    fn meshes_are_sound(m in arb_model(), ws in arb_workers(), tp in arb_tp(), kv_tokens in 0u32..20) {
        let ws = fit_count(ws, tp);
        let pol = policy(kv_tokens, tp);
        let Ok(p) = plan(&m, &ws, &pol) else { return Ok(()); };
        prop_assert_eq!(plan(&m, &ws, &pol), Ok(p.clone()));
        let per_kv = m.n_heads / m.n_kv_heads * m.head_dim;
        let mut next_layer = 0;
        let mut seen = std::collections::BTreeSet::new();
        for s in 0..p.n_stages() {
            let g: Vec<_> = p.group(s).collect();
            let k = g.len() as u32;
            prop_assert!(k >= 1);
            if let TpPolicy::Fixed(f) = tp { prop_assert_eq!(k, f); }
            for (r, part) in g.iter().enumerate() {
                prop_assert_eq!(part.tp_rank, r as u32);
                prop_assert_eq!(part.tp_ranks, k);
                prop_assert_eq!(&part.layers, &g[0].layers);
                prop_assert_eq!(part.embed, s == 0);
                prop_assert_eq!(part.head, s + 1 == p.n_stages());
                prop_assert!(seen.insert(part.worker_id.clone()), "a worker used twice");
                let w = ws.iter().find(|w| w.id == part.worker_id).expect("known worker");
                prop_assert!(part.weight_bytes + part.kv_bytes <= w.memory_bytes);
                prop_assert!((part.kv_heads.start * per_kv).is_multiple_of(m.attn_out_block));
                prop_assert!(part.ffn.start.is_multiple_of(m.ffn_down_block));
            }
            let cols = |f: fn(&PlanStage) -> Range<u32>| g.iter().map(|p| f(p)).collect::<Vec<_>>();
            prop_assert!(tiles(&cols(|p| p.kv_heads.clone()), m.n_kv_heads));
            prop_assert!(tiles(&cols(|p| p.ffn.clone()), m.intermediate));
            prop_assert!(tiles(&cols(|p| p.vocab.clone()), m.vocab));
            prop_assert_eq!(g[0].layers.start, next_layer);
            prop_assert!(g[0].layers.end > next_layer);
            next_layer = g[0].layers.end;
        }
        prop_assert_eq!(next_layer as usize, m.n_layers());
        let keys: Vec<_> = p.stages.iter().map(|s| (s.stage, s.tp_rank)).collect();
        prop_assert!(keys.windows(2).all(|w| w[0] < w[1]));
    }
}

proptest! {

    /// Ensures that `Fixed(1)` gives exactly the plan (or the error) the planner gave before
    /// tensor parallelism, on footprints with and without the new fields.
    #[test]
    fn fixed_one_equals_the_old_planner(m in arb_model(), ws in arb_workers(), kv_tokens in 0u32..20, bare in any::<bool>()) {
        let m = if bare {
            ModelFootprint {
                layer_bytes: m.layer_bytes,
                embed_bytes: m.embed_bytes,
                head_bytes: m.head_bytes,
                tied: m.tied,
                kv_bytes_per_token_layer: m.kv_bytes_per_token_layer,
                ..ModelFootprint::default()
            }
        } else {
            m
        };
        let pol = policy(kv_tokens, TpPolicy::Fixed(1));
        prop_assert_eq!(old_fields(&plan(&m, &ws, &pol)), old_fields(&super::legacy_oracle::plan(&m, &ws, &pol)));
    }

    /// Ensures that the apportionment hands out every unit, at least one each, more to a
    /// rank with more weight (never fewer), within one unit of its quota but for the
    /// minimum of one (and the units that minimum takes from the others).
    #[test]
    fn apportion_is_sound(units in 1u64..2000, weights in prop::collection::vec(0u64..50, 1..9)) {
        let Some(n) = apportion(units, &weights) else {
            prop_assert!(units < weights.len() as u64);
            return Ok(());
        };
        prop_assert_eq!(n.iter().sum::<u64>(), units);
        prop_assert!(n.iter().all(|&c| c >= 1));
        let w: Vec<u64> = weights.iter().map(|&w| w.max(1)).collect();
        let total: u64 = w.iter().sum();
        let quota = |i: usize| units as f64 * w[i] as f64 / total as f64;
        // Units the minimum of one hands to ranks whose quota is under one, which the others
        // give up (4 units over weights 1, 1, 6: quotas 0.5, 0.5, 3 → 1, 1, 2).
        let lift: f64 = (0..n.len()).map(|j| (1.0 - quota(j)).max(0.0)).sum();
        for i in 0..n.len() {
            for j in 0..n.len() {
                if w[i] > w[j] { prop_assert!(n[i] >= n[j], "{n:?} for {w:?}"); }
            }
            let quota = quota(i);
            prop_assert!(n[i] as f64 - quota < 1.0 + n.len() as f64 || n[i] == 1);
            prop_assert!(quota - (n[i] as f64) < 1.0 + lift, "{n:?} for {w:?}");
        }
    }
}
