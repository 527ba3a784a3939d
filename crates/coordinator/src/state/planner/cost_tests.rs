//! Unit tests of the cost model: its calibration, its formula on a hand-checked case, and
//! that its predictions move the right way with threads and latency.

use super::mesh_tests::smollm2;
use super::*;

fn workers(threads: &[u32], rtt_us: u32) -> Vec<WorkerCapacity> {
    threads
        .iter()
        .enumerate()
        .map(|(i, &t)| WorkerCapacity {
            id: format!("w{i}"),
            memory_bytes: 1 << 30,
            threads: t,
            link_rtt_us: rtt_us,
            device_bytes_s: 0,
        })
        .collect()
}

fn predicted(
    m: &ModelFootprint,
    ws: &[WorkerCapacity],
    tp: TpPolicy,
    c: &CostInputs,
) -> Prediction {
    let p = plan_with(
        m,
        ws,
        &PlanPolicy {
            kv_tokens: 0,
            tp,
            cp: CpPolicy::Fixed(1),
            block_size: 0,
        },
        c,
    )
    .expect("plan");
    predict(&p, m, ws, c).expect("known workers")
}

/// Ensures that the default inputs predict what they were measured from: SmolLM2-135M Q4_1
/// on one worker of 2 threads decodes at 105–110 tok/s, and its footprint streams the ~96 MB
/// per token the README's profile names.
#[test]
fn defaults_reproduce_the_measurement() {
    let m = smollm2();
    let streamed = m.weight_bytes() - 30 * 2 * 576 * 4 - 576 * 4;
    assert!((96_000_000..97_000_000).contains(&streamed), "{streamed}");
    let p = predicted(
        &m,
        &workers(&[2], 0),
        TpPolicy::Fixed(1),
        &CostInputs::default(),
    );
    assert!(
        (105.0..110.0).contains(&p.single_stream_tok_s),
        "{}",
        p.single_stream_tok_s
    );
    assert_eq!(p.single_stream_tok_s, p.aggregate_tok_s);
}

/// Ensures that a group of two on one stage costs what the formula says: the slower rank's
/// streaming, 2 reductions per layer and one after the embedding, and the logits gather.
#[test]
fn formula_on_a_group_of_two() {
    let m = smollm2();
    let c = CostInputs {
        bytes_per_thread_s: 1e9,
        link_latency_us: 100.0,
        bandwidth_gbps: 1.0,
        device_efficiency: 0.6,
    };
    let ws = workers(&[2, 2], 0);
    let plan = plan_with(
        &m,
        &ws,
        &PlanPolicy {
            kv_tokens: 0,
            tp: TpPolicy::Fixed(2),
            cp: CpPolicy::Fixed(1),
            block_size: 0,
        },
        &c,
    )
    .expect("plan");
    let p = predict(&plan, &m, &ws, &c).expect("known workers");
    let g: Vec<_> = plan.group(0).collect();
    // Rank 0 holds 2 of 3 heads and fewer MLP columns to make up for it: the ranks stream
    // about the same, and the slower one sets the stage's compute time.
    let norms = 30 * 2 * 576 * 4 + 576 * 4;
    let streamed = g[0].weight_bytes.max(g[1].weight_bytes);
    let (lo, hi) = (
        g[0].weight_bytes.min(g[1].weight_bytes) as f64,
        streamed as f64,
    );
    assert!(streamed > norms && hi / lo < 1.02, "{g:?}");
    let compute = streamed as f64 / 2e9;
    let reduce = 61.0 * (100e-6 + 576.0 * 4.0 * 8.0 / 1e9);
    // Equal threads: rank 0 holds half the vocabulary, the other half comes to it.
    let gather = 100e-6 + 24576.0 * 4.0 * 8.0 / 1e9;
    let s = p.stages[0];
    assert!((s.compute_s - compute).abs() < 1e-12, "{s:?}");
    assert!((s.reduce_s - reduce).abs() < 1e-12, "{s:?}");
    assert!((s.gather_s - gather).abs() < 1e-12, "{s:?}");
    assert_eq!(s.hop_s, 0.0);
    assert!((p.single_stream_tok_s - 1.0 / (compute + reduce + gather)).abs() < 1e-9);
}

/// Ensures that the single stream pays every hop and the aggregate only the slowest stage.
#[test]
fn hops_cost_the_single_stream_only() {
    let m = smollm2();
    let c = CostInputs::default();
    let ws = workers(&[2, 2], 400);
    let p = predicted(&m, &ws, TpPolicy::Fixed(1), &c);
    assert_eq!(p.stages.len(), 2);
    let hop = 200e-6 + 576.0 * 4.0 * 8.0 / 10e9;
    assert!((p.stages[0].hop_s - hop).abs() < 1e-15);
    let busy: f64 = p.stages.iter().map(StageCost::busy_s).sum();
    assert!((1.0 / p.single_stream_tok_s - busy - hop).abs() < 1e-12);
    let slowest = p.stages.iter().map(StageCost::busy_s).fold(0.0, f64::max);
    assert!((1.0 / p.aggregate_tok_s - slowest).abs() < 1e-12);
    assert!(p.aggregate_tok_s > p.single_stream_tok_s);
}

/// Ensures that predictions rise with threads and fall with latency, for pipelines and
/// groups alike (the plan held fixed, so only the model moves).
#[test]
fn predictions_are_monotonic() {
    let m = smollm2();
    let c = CostInputs::default();
    for tp in [TpPolicy::Fixed(1), TpPolicy::Fixed(3)] {
        let ws = workers(&[2, 2, 2], 0);
        let plan = plan_with(
            &m,
            &ws,
            &PlanPolicy {
                kv_tokens: 0,
                tp,
                cp: CpPolicy::Fixed(1),
                block_size: 0,
            },
            &c,
        )
        .expect("plan");
        let at = |ws: &[WorkerCapacity], c: &CostInputs| predict(&plan, &m, ws, c).expect("p");
        let base = at(&ws, &c);
        for w in 0..3 {
            let mut more = ws.clone();
            more[w].threads = 4;
            let p = at(&more, &c);
            // A group waits for its slowest rank: equal ranks gain nothing from one faster.
            if tp == TpPolicy::Fixed(1) {
                assert!(p.single_stream_tok_s > base.single_stream_tok_s, "w{w}");
            }
            assert!(
                p.single_stream_tok_s >= base.single_stream_tok_s,
                "{tp:?} w{w}"
            );
            assert!(p.aggregate_tok_s >= base.aggregate_tok_s, "{tp:?} w{w}");
        }
        let mut last = base.single_stream_tok_s;
        for us in [50.0, 100.0, 1000.0] {
            let slower = CostInputs {
                link_latency_us: us,
                ..c
            };
            let p = at(&ws, &slower);
            assert!(p.single_stream_tok_s < last, "{tp:?} {us} µs");
            last = p.single_stream_tok_s;
        }
        // A measured RTT replaces the default latency: 2000 µs round trip, 1000 one way.
        let far = workers(&[2, 2, 2], 2000);
        assert!(at(&far, &c).single_stream_tok_s < base.single_stream_tok_s);
    }
}

/// Ensures that a plan naming a worker the prediction is not given predicts nothing.
#[test]
fn unknown_workers_predict_nothing() {
    let m = smollm2();
    let c = CostInputs::default();
    let ws = workers(&[2], 0);
    let plan = plan_with(
        &m,
        &ws,
        &PlanPolicy {
            kv_tokens: 0,
            tp: TpPolicy::Fixed(1),
            cp: CpPolicy::Fixed(1),
            block_size: 0,
        },
        &c,
    )
    .expect("plan");
    assert_eq!(predict(&plan, &m, &workers(&[2, 2], 0)[1..], &c), None);
}
