//! Unit tests and proptests of the planner.

use proptest::prelude::*;

use super::*;

fn model(layers: Vec<u64>, embed: u64, head: u64, tied: bool, kv: u64) -> ModelFootprint {
    ModelFootprint {
        layer_bytes: layers,
        embed_bytes: embed,
        head_bytes: head,
        tied,
        kv_bytes_per_token_layer: kv,
        ..ModelFootprint::default()
    }
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

fn ranges(p: &Plan) -> Vec<(String, Range<u32>)> {
    p.stages
        .iter()
        .map(|s| (s.worker_id.clone(), s.layers.clone()))
        .collect()
}

const NO_KV: PlanPolicy = PlanPolicy {
    kv_tokens: 0,
    tp: TpPolicy::Fixed(1),
    cp: CpPolicy::Fixed(1),
    block_size: 0,
};

fn with_kv(kv_tokens: u32) -> PlanPolicy {
    PlanPolicy {
        kv_tokens,
        tp: TpPolicy::Fixed(1),
        cp: CpPolicy::Fixed(1),
        block_size: 0,
    }
}

/// Ensures that equal workers split equal layers evenly, embedding first and head last.
#[test]
fn equal_workers_split_evenly_without_head_cost() {
    let m = model(vec![10; 30], 0, 0, false, 0);
    let ws = [
        worker("a", 1000, 2),
        worker("b", 1000, 2),
        worker("c", 1000, 2),
    ];
    let p = plan(&m, &ws, &NO_KV).expect("plan");
    assert_eq!(
        ranges(&p),
        vec![
            ("a".into(), 0..10),
            ("b".into(), 10..20),
            ("c".into(), 20..30)
        ]
    );
    assert!(p.stages[0].embed && !p.stages[0].head);
    assert!(p.stages[2].head && !p.stages[2].embed);
    assert!(p.stages.iter().all(|s| s.tp_rank == 0 && s.cp_rank == 0));
    assert_eq!(
        p.stages.iter().map(|s| s.stage).collect::<Vec<_>>(),
        [0, 1, 2]
    );
}

/// Ensures that a faster worker gets more layers and the head's cost shrinks the last stage.
#[test]
fn speed_and_head_shape_the_split() {
    let m = model(vec![10; 30], 0, 0, false, 0);
    let ws = [worker("fast", 1000, 4), worker("slow", 1000, 1)];
    let p = plan(&m, &ws, &NO_KV).expect("plan");
    assert_eq!(
        ranges(&p),
        vec![("fast".into(), 0..24), ("slow".into(), 24..30)]
    );
    let heavy_head = model(vec![10; 30], 50, 100, false, 0);
    let ws = [worker("a", 1000, 1), worker("b", 1000, 1)];
    let p = plan(&heavy_head, &ws, &NO_KV).expect("plan");
    // (layers·10 + 100 on the last) balanced: 20 layers first (200), 10 + head last (200).
    assert_eq!(ranges(&p), vec![("a".into(), 0..20), ("b".into(), 20..30)]);
    assert_eq!(p.stages[0].weight_bytes, 250);
    assert_eq!(p.stages[1].weight_bytes, 200);
}

/// Ensures that memory caps a fast worker's share and the KV cache is counted per layer.
#[test]
fn memory_caps_the_share() {
    let m = model(vec![10; 30], 5, 5, false, 1);
    let policy = with_kv(10);
    // Each layer costs 20 with its KV; "big" fits 5 layers (5 + 100 = 105 > 104 → 4).
    let ws = [worker("big", 104, 16), worker("rest", 10_000, 1)];
    let p = plan(&m, &ws, &policy).expect("plan");
    assert_eq!(
        ranges(&p),
        vec![("big".into(), 0..4), ("rest".into(), 4..30)]
    );
    assert_eq!(p.stages[0].kv_bytes, 4 * 10);
    assert!(p.stages.iter().all(|s| {
        s.weight_bytes + s.kv_bytes
            <= ws
                .iter()
                .find(|w| w.id == s.worker_id)
                .expect("w")
                .memory_bytes
    }));
}

/// Ensures that a worker that would not speed anything up is left out.
#[test]
fn useless_worker_is_left_out() {
    let m = model(vec![10; 4], 0, 0, false, 0);
    let ws = [worker("a", 1000, 64), worker("tiny", 1000, 1)];
    let p = plan(&m, &ws, &NO_KV).expect("plan");
    assert_eq!(ranges(&p), vec![("a".into(), 0..4)]);
    assert!(p.stages[0].embed && p.stages[0].head);
}

/// Ensures that a tied head shares the embedding's bytes on a single stage.
#[test]
fn tied_single_stage_counts_embedding_once() {
    let m = model(vec![10; 2], 100, 104, true, 0);
    let p = plan(&m, &[worker("a", 124, 1)], &NO_KV).expect("fits once shared");
    assert_eq!(p.stages[0].weight_bytes, 124);
    let e = plan(&m, &[worker("a", 123, 1)], &NO_KV).expect_err("one byte short");
    assert!(matches!(e, PlanError::DoesNotFit(_)));
}

/// Ensures that impossible plans are rejected naming what does not fit.
#[test]
fn impossible_plans_name_the_part() {
    let m = model(vec![10; 4], 50, 60, false, 1);
    let kv = with_kv(5);
    let e = plan(&m, &[worker("a", 100, 1), worker("b", 50, 1)], &kv).expect_err("too small");
    assert!(e.to_string().contains("offer 150 bytes in all"), "{e}");
    let e = plan(
        &m,
        &[
            worker("a", 60, 1),
            worker("b", 60, 1),
            worker("c", 60, 1),
            worker("d", 60, 1),
        ],
        &kv,
    )
    .expect_err("embedding too big");
    assert!(e.to_string().contains("first stage"), "{e}");
    let m2 = model(vec![10, 100, 10], 0, 0, false, 0);
    let e = plan(
        &m2,
        &[worker("a", 60, 1), worker("b", 60, 1), worker("c", 60, 1)],
        &NO_KV,
    )
    .expect_err("layer too big");
    assert!(e.to_string().contains("layer 1"), "{e}");
    assert_eq!(plan(&m, &[], &kv), Err(PlanError::NoWorkers));
    assert_eq!(
        plan(&model(vec![], 1, 1, false, 0), &[worker("a", 9, 1)], &kv),
        Err(PlanError::NoLayers)
    );
}

fn arb_case() -> impl Strategy<Value = (ModelFootprint, Vec<WorkerCapacity>, PlanPolicy)> {
    (
        prop::collection::vec(1u64..200, 1..40),
        0u64..500,
        0u64..500,
        any::<bool>(),
        0u64..4,
        prop::collection::vec((0u64..4000, 0u32..9), 1..7),
        0u32..20,
    )
        .prop_map(|(layers, embed, head, tied, kv, ws, kv_tokens)| {
            let head = if tied { embed + head } else { head };
            let workers = ws
                .into_iter()
                .enumerate()
                .map(|(i, (m, t))| worker(&format!("w{i}"), m, t))
                .collect();
            (
                model(layers, embed, head, tied, kv),
                workers,
                with_kv(kv_tokens),
            )
        })
}

proptest! {
    /// Ensures that every plan covers each layer exactly once, in order, on distinct workers in
    /// their given order, within each worker's memory, and is deterministic.
    #[test]
    fn plans_are_sound((m, ws, policy) in arb_case()) {
        match plan(&m, &ws, &policy) {
            Ok(p) => {
                prop_assert!(!p.stages.is_empty());
                let mut next = 0u32;
                let mut last_worker = None;
                for (i, s) in p.stages.iter().enumerate() {
                    prop_assert_eq!(s.stage as usize, i);
                    prop_assert_eq!(s.layers.start, next);
                    prop_assert!(s.layers.end > s.layers.start);
                    next = s.layers.end;
                    let w = ws.iter().position(|w| w.id == s.worker_id).expect("known worker");
                    prop_assert!(last_worker.is_none_or(|l| w > l), "workers in order, once each");
                    last_worker = Some(w);
                    prop_assert!(s.weight_bytes + s.kv_bytes <= ws[w].memory_bytes);
                    prop_assert_eq!(s.embed, i == 0);
                    prop_assert_eq!(s.head, i + 1 == p.stages.len());
                }
                prop_assert_eq!(next as usize, m.n_layers());
                prop_assert_eq!(plan(&m, &ws, &policy), Ok(p));
            }
            Err(e) => {
                prop_assert!(matches!(e, PlanError::DoesNotFit(_)));
                // Nothing fits on one worker either.
                let single = m.weight_bytes() + m.kv_bytes_per_token_layer
                    * u64::from(policy.kv_tokens) * m.n_layers() as u64;
                prop_assert!(ws.iter().all(|w| w.memory_bytes < single));
            }
        }
    }

    /// Ensures that a worker able to hold the whole model always yields a plan.
    #[test]
    fn a_big_enough_worker_always_plans((m, mut ws, policy) in arb_case()) {
        let need = m.weight_bytes()
            + m.kv_bytes_per_token_layer * u64::from(policy.kv_tokens) * m.n_layers() as u64;
        ws.push(worker("big", need, 1));
        prop_assert!(plan(&m, &ws, &policy).is_ok());
    }
}

/// A GPU worker: `memory_bytes` of device memory and `gbs` GB/s of peak bandwidth.
fn gpu(id: &str, memory_bytes: u64, gbs: u64) -> WorkerCapacity {
    WorkerCapacity {
        device_bytes_s: gbs * 1_000_000_000,
        ..worker(id, memory_bytes, 1)
    }
}

/// Ensures that a worker's speed is its threads on the CPU and, with devices, the threads
/// that stream weights as fast as their bandwidth at the cost model's efficiency.
#[test]
fn device_speed_is_bandwidth_in_threads() {
    let c = CostInputs::default();
    assert_eq!(worker("cpu", 1, 8).speed(&c), 8);
    assert_eq!(worker("cpu0", 1, 0).speed(&c), 1, "0 threads reads as 1");
    // 4.8 TB/s × 0.6 / 5.2 GB/s per thread ≈ 553.8 threads.
    assert_eq!(gpu("h200", 1, 4800).speed(&c), 554);
    // A device slower than one thread still counts as one.
    assert_eq!(gpu("tiny", 1, 0).speed(&c), 1);
    let mut tiny = gpu("tiny", 1, 0);
    tiny.device_bytes_s = 1;
    assert_eq!(tiny.speed(&c), 1);
}

/// Ensures that in a mixed cluster the GPU worker takes the layers its memory holds — as many
/// as fit, since it streams them a hundred times faster — and CPU workers serve the rest in
/// proportion to their threads; with room for the whole model it serves it alone.
#[test]
fn mixed_cluster_gives_the_gpu_what_its_memory_holds() {
    let m = model(vec![10; 30], 0, 0, false, 0);
    // Device memory for 20 layers; the CPU workers could each hold everything.
    let ws = [
        gpu("g", 200, 3350),
        worker("c1", 1000, 4),
        worker("c2", 1000, 4),
    ];
    let p = plan(&m, &ws, &NO_KV).expect("plan");
    assert_eq!(
        ranges(&p),
        vec![
            ("g".into(), 0..20),
            ("c1".into(), 20..25),
            ("c2".into(), 25..30)
        ]
    );
    // Room for the whole model on the device: one stage.
    let ws = [gpu("g", 300, 3350), worker("c1", 1000, 4)];
    let p = plan(&m, &ws, &NO_KV).expect("plan");
    assert_eq!(ranges(&p), vec![("g".into(), 0..30)]);
    // The same cluster with the GPU declared as a CPU worker of one thread: the CPU worker
    // takes the larger part instead — the device's speed is what moved the layers.
    let ws = [worker("g", 300, 1), worker("c1", 1000, 4)];
    let p = plan(&m, &ws, &NO_KV).expect("plan");
    let gpu_layers = p.stages[0].layers.len();
    assert!(gpu_layers < 15, "slow g got {gpu_layers} layers");
}

/// Ensures that a GPU and CPU workers in one tensor-parallel group split heads, MLP columns
/// and vocabulary by speed: the device's rank holds the larger share.
#[test]
fn mixed_group_splits_by_speed() {
    let m = super::mesh_tests::smollm2();
    let policy = PlanPolicy {
        kv_tokens: 0,
        tp: TpPolicy::Fixed(2),
        cp: CpPolicy::Fixed(1),
        block_size: 0,
    };
    let ws = [gpu("g", u64::MAX, 1000), worker("c", u64::MAX, 2)];
    let p = plan(&m, &ws, &policy).expect("plan");
    let share = |id: &str| {
        let s = p.stage_of(id).expect("planned");
        (s.ffn.len(), s.vocab.len())
    };
    let (g, c) = (share("g"), share("c"));
    assert!(g.0 > c.0 && g.1 > c.1, "gpu {g:?} vs cpu {c:?}");
}
