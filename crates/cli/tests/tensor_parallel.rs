//! A real tensor-parallel cluster on loopback — `tessera coordinator --tp 2` and `tessera
//! worker` processes: the mesh as `tessera status` shows it, the weights each rank holds,
//! repeatable output, and `kill -9` of a rank mid-request. (Equivalence with one worker and
//! with llama.cpp, over the same sockets, is `crates/worker/tests/tensor_parallel.rs`.)

use std::process::Command;
use std::time::{Duration, Instant};

use tessera_proto::v1 as pb;
use tessera_testkit::{ProcessCluster, Tessera, ids_and_logprobs, smollm2_arg as model};

fn tessera() -> Tessera {
    Tessera::new(env!("CARGO_BIN_EXE_tessera"))
}

/// The plan's shards, in (stage, rank) order.
fn shards(s: &pb::ClusterStatusResponse) -> Vec<(pb::ShardAssignment, u64)> {
    let mut v: Vec<_> = s
        .workers
        .iter()
        .filter_map(|w| w.shard.map(|sh| (sh, w.weight_bytes)))
        .collect();
    v.sort_by_key(|(sh, _)| (sh.stage, sh.tp_rank));
    v
}

/// A long greedy request that keeps generating.
fn long(prompt: &str, max_tokens: u32) -> pb::GenerateRequest {
    let mut r = tessera_testkit::greedy_with_logprobs(prompt, max_tokens, 2);
    if let Some(stop) = r.stop.as_mut() {
        stop.ignore_eos = true;
    }
    r
}

/// Ensures that `--tp 2` over two workers forms one group of two ranks that split the KV heads,
/// MLP columns and vocabulary between them (in the status, and as `tessera status` prints it),
/// that each rank holds half the weights of one worker holding the whole model within 10%,
/// and that the same greedy request gives the same tokens and logprobs twice.
#[test]
fn two_ranks_split_the_model_and_repeat_their_output() {
    let Some(model) = model() else { return };
    let whole = {
        let c = ProcessCluster::start(&tessera(), &model, &[(1, "1GiB")]);
        let s = c.wait_ready(Duration::from_secs(60));
        shards(&s)[0].1
    };
    let c = ProcessCluster::start_with(
        &tessera(),
        &model,
        &[(1, "1GiB"), (1, "1GiB")],
        &["--tp", "2"],
    );
    let s = c.wait_ready(Duration::from_secs(60));
    let ranks = shards(&s);
    assert_eq!(ranks.len(), 2, "{s:#?}");
    for (r, (sh, bytes)) in ranks.iter().enumerate() {
        assert_eq!(
            (sh.stage, sh.tp_rank, sh.tp_ranks),
            (0, r as u32, 2),
            "{sh:?}"
        );
        assert_eq!((sh.layer_start, sh.layer_end), (0, 30));
        assert!(sh.embed && sh.head);
        let ratio = *bytes as f64 / (whole as f64 / 2.0);
        eprintln!("rank {r}: {bytes} weight bytes, {ratio:.3} × half of {whole}");
        assert!((0.9..=1.1).contains(&ratio), "rank {r}: {ratio}");
    }
    let (a, b) = (&ranks[0].0, &ranks[1].0);
    assert_eq!(
        (a.kv_head_start, a.kv_head_end, b.kv_head_end),
        (0, b.kv_head_start, 3)
    );
    assert_eq!((a.ffn_start, a.ffn_end, b.ffn_end), (0, b.ffn_start, 1536));
    assert_eq!(
        (a.vocab_start, a.vocab_end, b.vocab_end),
        (0, b.vocab_start, 49152)
    );

    let out = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(["status", "--endpoint", &c.endpoint])
        .output()
        .expect("tessera status");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("rank 0/2 kv-heads 0..") && text.contains("rank 1/2 kv-heads"),
        "{text}"
    );

    let first = c
        .generate(long("The history of the printing press", 24))
        .expect("generate");
    let again = c
        .generate(long("The history of the printing press", 24))
        .expect("generate");
    assert_eq!(first.len(), 24);
    assert_eq!(ids_and_logprobs(&first), ids_and_logprobs(&again));
}

/// Ensures that `kill -9` of a tensor-parallel rank costs its group's in-flight request
/// nothing: the cluster says why it cannot serve meanwhile (one worker is no group of two),
/// and once a worker joins, the request is migrated onto the new group and finishes with no
/// error and exactly the tokens and logprobs of a fault-free run. (The re-plan dials every
/// worker of a new plan first, so the dead rank, still registered, is dropped rather than
/// planned in — where its survivor would wait out the group's 30 s formation for it.)
#[test]
fn a_killed_rank_s_request_migrates_to_the_new_group() {
    let Some(model) = model() else { return };
    let mut c = ProcessCluster::start_with(
        &tessera(),
        &model,
        &[(1, "1GiB"), (1, "1GiB")],
        &["--tp", "2", "--ready-wait-ms", "90000"],
    );
    let epoch = c.wait_ready(Duration::from_secs(60)).plan_epoch;
    let req = || long("Tell me a long story about the sea", 40);
    let fault_free = ids_and_logprobs(&c.generate(req()).expect("fault-free run"));
    let (mut stream, mut got) = c.stream_begun(req(), 4);
    c.kill_worker(1);
    let killed = Instant::now();
    // One worker left: no group of two, and no plan serves.
    let deadline = Instant::now() + Duration::from_secs(10);
    while c.status().ready {
        assert!(Instant::now() < deadline, "still ready with one worker");
        std::thread::sleep(Duration::from_millis(100));
    }
    c.add_worker(1, "1GiB");
    let rest =
        c.rt.block_on(tessera_testkit::finish_stream(
            &mut stream,
            Duration::from_secs(120),
        ))
        .expect("the stream survives the rank's death");
    eprintln!(
        "the rank's death and a joiner delayed the stream by {:?} ({:?} after the kill)",
        rest.longest_gap,
        killed.elapsed()
    );
    got.extend(rest.tokens);
    assert_eq!(
        ids_and_logprobs(&got),
        fault_free,
        "the stream changed across the loss"
    );
    let s = c.wait_ready(Duration::from_secs(60));
    assert!(s.plan_epoch > epoch, "{s:#?}");
    assert_eq!(shards(&s).len(), 2, "{s:#?}");
    let out = c
        .generate(long("The history of the printing press", 8))
        .expect("serves again");
    assert_eq!(out.len(), 8);
}
