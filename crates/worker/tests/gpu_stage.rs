//! A worker whose shard runs the GPU stage step, in a pipeline with CPU workers, driven over
//! gRPC as a coordinator drives it. Without a GPU the stage runs on the emulated device (each
//! device operation computed on the CPU to its kernel's contract), so what is checked is the
//! worker around the GPU step — loading on the device backend, the block-table-only KV cache,
//! hidden states in and out, releases — against the same three stages run in process.

mod support;

use std::path::Path;

use support::{BLOCK_SIZE, Cluster, ENGINE_THREADS, KV_TOKENS, STAGES, model};
use tessera_cuda::DType;
use tessera_cuda::stage::{GpuStage, HostOps};
use tessera_format::GgufWeights;
use tessera_kernels::ThreadPool;
use tessera_model::kv_cache::{KvCacheConfig, PagedKvCache};
use tessera_model::layers::SeqStep;
use tessera_model::llama::{Llama, LoadSpec};
use tessera_model::stage::{LocalReduce, StageCtx, StageInput, StageOutput, StageScratch};
use tessera_testkit::{argmax, drive, seqs_for};
use tessera_text::sampling::{SampledToken, SamplingParams};
use tessera_worker::Backend;

/// Token ids of two prompts (from `tests/golden/greedy.json`): 13 tokens (the paged kernel's
/// path for its prefill) and 37 (the prefill kernel's).
const PROMPTS: [&[u32]; 2] = [
    &[
        6403, 1980, 253, 655, 28, 281, 253, 1165, 6560, 411, 260, 3426, 28,
    ],
    &[
        1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411,
        407, 19712, 8182, 2, 198, 1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1,
        520, 9531, 198,
    ],
];
const NEW_TOKENS: usize = 12;

/// The greedy ids of each prompt through the three stages in process — CPU, GPU step over
/// host operations, CPU — one step per prompt then one per token, as the driver sends them.
fn in_process(model: &Path) -> Vec<Vec<u32>> {
    let w = GgufWeights::open(model).expect("open");
    let c = w.config().expect("config");
    let kv = |layers: usize| KvCacheConfig {
        n_layers: layers,
        n_kv_heads: c.n_kv_heads,
        head_dim: c.head_dim,
        block_size: BLOCK_SIZE as usize,
        num_blocks: (KV_TOKENS / BLOCK_SIZE) as usize,
    };
    let [(a0, a1), (b0, b1), (c0, c1)] = STAGES.map(|(s, e)| (s as usize, e as usize));
    let spec = |s, e| LoadSpec::stage(&c, s..e, s == 0, e == c.n_layers);
    let first = Llama::load(&w, &c, spec(a0, a1), &mut |_, _| {}).expect("stage 0");
    let mut gpu = GpuStage::load(
        HostOps::new(DType::F16),
        &w,
        &c,
        spec(b0, b1),
        &kv(b1),
        &mut |_, _| {},
    )
    .expect("stage 1");
    let last = Llama::load(&w, &c, spec(c0, c1), &mut |_, _| {}).expect("stage 2");
    let pool = ThreadPool::new(ENGINE_THREADS as usize).expect("pool");
    let mut out = Vec::new();
    for prompt in PROMPTS {
        let (mut k0, k1, mut k2) = (
            PagedKvCache::new(kv(a1)).expect("kv"),
            PagedKvCache::without_storage(kv(b1)).expect("kv"),
            PagedKvCache::new(kv(c1)).expect("kv"),
        );
        let (mut s0, mut s1, mut s2) = (k0.new_seq(), k1.new_seq(), k2.new_seq());
        let mut sc = [
            StageScratch::default(),
            StageScratch::default(),
            StageScratch::default(),
        ];
        let mut feed = prompt.to_vec();
        let mut ids = Vec::new();
        for _ in 0..NEW_TOKENS {
            let mut b = [SeqStep {
                tokens: &feed,
                seq: &mut s0,
                logits: true,
            }];
            let mut ctx = StageCtx {
                cache: &mut k0,
                pool: &pool,
                ring: None,
                reduce: &mut LocalReduce,
            };
            let h0 = match first.step(&mut b, StageInput::Tokens, &mut ctx, &mut sc[0]) {
                Ok(StageOutput::Hidden(h)) => h.to_vec(),
                other => panic!("stage 0: {other:?}"),
            };
            let mut b = [SeqStep {
                tokens: &feed,
                seq: &mut s1,
                logits: true,
            }];
            let h1 = match gpu.step(&mut b, StageInput::Hidden(&h0), &k1, &mut sc[1]) {
                Ok(StageOutput::Hidden(h)) => h.to_vec(),
                other => panic!("stage 1: {other:?}"),
            };
            let mut b = [SeqStep {
                tokens: &feed,
                seq: &mut s2,
                logits: true,
            }];
            let mut ctx = StageCtx {
                cache: &mut k2,
                pool: &pool,
                ring: None,
                reduce: &mut LocalReduce,
            };
            let t = match last.step(&mut b, StageInput::Hidden(&h1), &mut ctx, &mut sc[2]) {
                Ok(StageOutput::Logits(l)) => argmax(l),
                other => panic!("stage 2: {other:?}"),
            };
            ids.push(t);
            feed = vec![t];
        }
        out.push(ids);
    }
    out
}

/// Ensures that a pipeline whose middle worker runs the GPU stage step (emulated device) gives
/// the in-process pipeline's greedy tokens exactly, one prompt after another on one stream,
/// and that each released sequence's KV blocks come back on every stage — the device
/// worker's block-table-only cache included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gpu_stage_worker_serves_in_a_cpu_pipeline() {
    let Some(model) = model() else { return };
    let want = in_process(&model);
    let cluster = Cluster::start_on(model, [Backend::Cpu, Backend::Emulated, Backend::Cpu]).await;
    let total: Vec<u64> = cluster
        .wait_live(0)
        .await
        .iter()
        .map(|s| s.total_kv_blocks)
        .collect();
    let mut d = cluster.open(0, 1).await;
    let greedy = SamplingParams::greedy();
    for (i, (prompt, ids)) in PROMPTS.iter().zip(&want).enumerate() {
        let reference: Vec<SampledToken> = ids
            .iter()
            .map(|&id| SampledToken {
                id,
                logprob: None,
                top_logprobs: Vec::new(),
            })
            .collect();
        let mut seqs = seqs_for(
            &[(prompt.to_vec(), reference)],
            std::slice::from_ref(&greedy),
            &[0],
        );
        seqs[0].id = i as u64;
        drive(&mut d, &mut seqs).await;
        let got: Vec<u32> = seqs[0].out.iter().map(|t| t.id).collect();
        assert_eq!(
            &got, ids,
            "prompt {i}: the worker pipeline differs from the in-process one"
        );
        for (w, t) in cluster.workers.iter().zip(&total) {
            let st = w.shard().status();
            assert_eq!(
                (st.live_sequences, st.free_kv_blocks),
                (0, *t),
                "prompt {i}: {st:?}"
            );
        }
    }
}
