//! A real context-parallel cluster on loopback — `tessera coordinator --cp …` and `tessera
//! worker` processes: the rings as `tessera status` shows them, each rank's share of the KV
//! cache, a ring chosen because the KV cache fits no single worker, and the greedy output of
//! one worker through its first near-tie. (Equivalence over the peer sockets for every
//! position of the golden prompts is `crates/worker/tests/tensor_parallel.rs`.)

use std::process::Command;
use std::time::{Duration, Instant};

use tessera_proto::v1 as pb;
use tessera_testkit::{ProcessCluster, Tessera, smollm2_arg as model};

fn tessera() -> Tessera {
    Tessera::new(env!("CARGO_BIN_EXE_tessera"))
}

/// The workers' shards and KV bytes, in (stage, cp_rank, tp_rank) order.
fn shards(s: &pb::ClusterStatusResponse) -> Vec<(pb::ShardAssignment, u64)> {
    let mut v: Vec<_> = s
        .workers
        .iter()
        .filter_map(|w| w.shard.map(|sh| (sh, w.kv_bytes)))
        .collect();
    v.sort_by_key(|(sh, _)| (sh.stage, sh.cp_rank, sh.tp_rank));
    v
}

/// The shards of a ready cluster once every worker has reported its KV bytes (they come with
/// the heartbeat after the load).
fn loaded(c: &ProcessCluster, s: &pb::ClusterStatusResponse) -> Vec<(pb::ShardAssignment, u64)> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut ranks = shards(s);
    while ranks.iter().any(|(_, kv)| *kv == 0) {
        assert!(
            Instant::now() < deadline,
            "KV bytes never reported: {ranks:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
        ranks = shards(&c.status());
    }
    ranks
}

/// A greedy request with the top-2 log-probabilities, generating past EOS.
fn greedy(prompt: &str, max_tokens: u32) -> pb::GenerateRequest {
    let mut r = tessera_testkit::greedy_with_logprobs(prompt, max_tokens, 2);
    if let Some(stop) = r.stop.as_mut() {
        stop.ignore_eos = true;
    }
    r
}

/// KV bytes per token of SmolLM2: 30 layers × 3 KV heads × 64 values × K and V × 4 bytes.
const PER_TOKEN: u64 = 30 * 3 * 64 * 2 * 4;

/// The margin under which a reordered sum may swap the greedy token (see the issue's
/// equivalence criterion).
const NEAR_TIE: f32 = 0.1;

/// Asserts that `ring` generated `one`'s tokens up to and including the first position
/// where `one`'s top-1/top-2 margin is under [`NEAR_TIE`]; returns how many were compared.
fn same_until_near_tie(one: &[pb::TokenEvent], ring: &[pb::TokenEvent]) -> usize {
    for (i, (a, b)) in one.iter().zip(ring).enumerate() {
        assert_eq!(a.id, b.id, "position {i}: one worker {a:?}, ring {b:?}");
        let margin = match a.top_logprobs.as_slice() {
            [t1, t2, ..] => t1.logprob - t2.logprob,
            _ => f32::INFINITY,
        };
        if margin < NEAR_TIE {
            return i + 1;
        }
    }
    one.len().min(ring.len())
}

/// Ensures that `--cp 2` over two workers forms one stage served by a ring of two (in the
/// status, and as `tessera status` prints it), each rank with the whole model's layers and
/// about half of the KV cache, and that a 32-token greedy continuation equals one
/// worker's through its first near-tie.
#[test]
fn a_ring_of_two_splits_the_kv_and_generates_what_one_worker_does() {
    let Some(model) = model() else { return };
    let prompt = "Write a short story about a lighthouse keeper who finds a message in a bottle.";
    let one = {
        let c = ProcessCluster::start(&tessera(), &model, &[(1, "1GiB")]);
        c.wait_ready(Duration::from_secs(60));
        c.generate(greedy(prompt, 32)).expect("generate")
    };
    let c = ProcessCluster::start_with(
        &tessera(),
        &model,
        &[(1, "1GiB"), (1, "1GiB")],
        &["--cp", "2"],
    );
    let s = c.wait_ready(Duration::from_secs(60));
    let ranks = loaded(&c, &s);
    assert_eq!(ranks.len(), 2, "{s:#?}");
    for (r, (sh, kv)) in ranks.iter().enumerate() {
        assert_eq!(
            (sh.stage, sh.cp_rank, sh.cp_ranks, sh.tp_ranks),
            (0, r as u32, 2, 1),
            "{sh:?}"
        );
        assert!(sh.embed && sh.head && (sh.layer_start, sh.layer_end) == (0, 30));
        // The test kit's clusters hold 2048 tokens; a rank its share (see the next test).
        assert_eq!(kv / PER_TOKEN, 1056, "rank {r}");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(["status", "--endpoint", &c.endpoint])
        .output()
        .expect("tessera status");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("ring 0/2") && text.contains("ring 1/2"),
        "{text}"
    );
    let ring = c.generate(greedy(prompt, 32)).expect("generate");
    assert_eq!(ring.len(), 32);
    let compared = same_until_near_tie(&one, &ring);
    eprintln!("one worker's tokens through position {compared} of 32");
}

/// Ensures that each rank of a ring of two over the test kit's 2048-token KV cache holds
/// the KV cache of 1056 tokens (its share of a 2048-token sequence, with the zigzag round-off
/// and a spare block), that the cluster serves a prompt of over 1100 tokens — a sequence
/// longer than either rank's cache — and continues it, and that a prompt longer than the
/// ring's whole context is refused with INVALID_ARGUMENT naming the limit, no rank having
/// sent a byte for it.
#[test]
fn a_ring_holds_a_sequence_longer_than_any_ranks_cache() {
    let Some(model) = model() else { return };
    let c = ProcessCluster::start_with(
        &tessera(),
        &model,
        &[(1, "1GiB"), (1, "1GiB")],
        &["--cp", "2"],
    );
    let s = c.wait_ready(Duration::from_secs(60));
    let ranks = loaded(&c, &s);
    assert_eq!(ranks.len(), 2, "{s:#?}");
    for (sh, kv) in &ranks {
        assert_eq!(
            (sh.cp_ranks, sh.layer_start, sh.layer_end),
            (2, 0, 30),
            "{sh:?}"
        );
        assert_eq!(kv / PER_TOKEN, 1056, "{sh:?}");
    }
    let prompt = "The history of the printing press. ".repeat(170);
    let out = c.generate(greedy(&prompt, 8)).expect("serves");
    assert_eq!(out.len(), 8);
    // A prompt longer than the whole ring's context is refused before any rank works on it
    // (peer bytes come with heartbeats, every 250 ms: let the last request's settle first).
    let sent = |s: &pb::ClusterStatusResponse| -> u64 {
        s.workers.iter().map(|w| w.peer_bytes_sent).sum()
    };
    std::thread::sleep(Duration::from_millis(600));
    let before = sent(&c.status());
    let too_long = "The history of the printing press. ".repeat(340);
    let e = c.generate(greedy(&too_long, 8)).expect_err("refused");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(
        e.message().contains("prompt") && e.message().contains("the context holds 2048"),
        "{}",
        e.message()
    );
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(sent(&c.status()), before, "no rank worked on it");
}
