//! Overload: a three-coordinator cluster of `tessera` processes flooded with invalid 4 MB
//! prompts from eight clients while a normal client keeps generating. Every flood request is
//! refused quickly by size (before tokenization, before forwarding), no normal request fails,
//! and the Raft term does not move: request load cannot starve the Raft loop.
//!
//! CI runs it for 10 s; `TESSERA_OVERLOAD_SECS=30` gives the figure.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tessera_testkit::{RaftCluster, Tessera, count_tokens, greedy, smollm2_arg};

/// The `tessera` binary under test.
fn tessera() -> Tessera {
    Tessera::new(env!("CARGO_BIN_EXE_tessera"))
}

/// Flooding clients.
const FLOODERS: usize = 8;
/// Bytes of each flood prompt: over the default limit (1 MiB), under gRPC's message limit.
const FLOOD_BYTES: usize = 4_000_000;
/// The slowest refusal accepted: a refusal is a length check, not a tokenization.
const REFUSED_WITHIN: Duration = Duration::from_secs(5);

/// Ensures that eight clients sending 4 MB prompts for the whole run are each refused with
/// INVALID_ARGUMENT well within seconds, that a normal client meanwhile completes every
/// request, and that the Raft term is unchanged at the end.
#[test]
fn invalid_floods_leave_raft_and_normal_requests_alone() {
    let Some(model) = smollm2_arg() else { return };
    let secs: u64 = std::env::var("TESSERA_OVERLOAD_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let c = RaftCluster::start(&tessera(), &model, "overload", 1);
    let (status, leader) = c.wait_ready(0, Duration::from_secs(180));
    let term = status.term;
    let until = Instant::now() + Duration::from_secs(secs);
    let stop = Arc::new(AtomicBool::new(false));
    let refused = Arc::new(AtomicU64::new(0));
    let slowest_ms = Arc::new(AtomicU64::new(0));
    let flood: Arc<str> = "x".repeat(FLOOD_BYTES).into();
    let mut flooders = Vec::new();
    for i in 0..FLOODERS {
        // Half at the leader, the rest at the followers (which refuse before forwarding).
        let target = if i % 2 == 0 {
            leader
        } else {
            (leader + 1 + i / 2) % 3
        };
        let mut client = c.client(target);
        let (stop, refused, slowest, flood) = (
            Arc::clone(&stop),
            Arc::clone(&refused),
            Arc::clone(&slowest_ms),
            Arc::clone(&flood),
        );
        flooders.push(c.rt.spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                let sent = Instant::now();
                let e = client
                    .generate(greedy(&flood, 4))
                    .await
                    .expect_err("a 4 MB prompt is refused");
                assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
                assert!(
                    e.message().starts_with("prompt: 4000000 bytes"),
                    "{}",
                    e.message()
                );
                let ms = sent.elapsed().as_millis() as u64;
                slowest.fetch_max(ms, Ordering::SeqCst);
                refused.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }
    // The normal client, on the leader, one request after another.
    let (mut ok, mut failed) = (0u32, Vec::new());
    let mut client = c.client(leader);
    while Instant::now() < until {
        match c.rt.block_on(count_tokens(
            &mut client,
            greedy("The capital of France is", 8),
        )) {
            Ok(_) => ok += 1,
            Err(e) => failed.push(e),
        }
    }
    stop.store(true, Ordering::SeqCst);
    for f in flooders {
        c.rt.block_on(f).expect("flooder");
    }
    let after = c.status(leader).expect("status after the flood");
    let slowest = Duration::from_millis(slowest_ms.load(Ordering::SeqCst));
    eprintln!(
        "overload {secs}s: {} refused (slowest {slowest:?}), {ok} normal requests ok, {} failed, term {term} -> {}",
        refused.load(Ordering::SeqCst),
        failed.len(),
        after.term
    );
    assert!(failed.is_empty(), "normal requests failed: {failed:?}");
    assert!(ok > 0, "no normal request completed");
    assert!(
        refused.load(Ordering::SeqCst) >= FLOODERS as u64,
        "the flood never ran"
    );
    assert!(slowest < REFUSED_WITHIN, "a refusal took {slowest:?}");
    assert_eq!(
        after.term, term,
        "the Raft term moved under load: {after:?}"
    );
    let leader_now: Option<usize> = c.leader_index(&after);
    assert_eq!(leader_now, Some(leader), "the leader changed under load");
}
