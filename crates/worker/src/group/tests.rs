//! Groups of real ranks on loopback, one thread per rank. Every group test runs twice: in
//! the clear (`--insecure-cluster`) and under mutual TLS, rank r holding the certificate of
//! worker `w<r>` from the test run's CA. The attacks on the TLS peer port are in
//! `tests_attacks.rs`, on these helpers.

use std::sync::mpsc;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use tessera_tls::{ClusterTls, Identity, Role};

use super::tests_attacks::hello;
use super::*;

/// How a test's ranks talk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Mode {
    Plain,
    Mutual,
}

/// Both modes, for every group test.
pub(super) const MODES: [Mode; 2] = [Mode::Plain, Mode::Mutual];

/// The peer-port security of a member with `identity` (certified by the test run's CA).
pub(super) fn tls_of(mode: Mode, identity: &Identity) -> PeerTls {
    match mode {
        Mode::Plain => PeerTls::new(&ClusterTls::insecure()),
        Mode::Mutual => PeerTls::new(&tessera_testkit::member_tls(identity)),
    }
}

/// The identity of worker `name`.
pub(super) fn worker(name: &str) -> Identity {
    Identity::new(Role::Worker, name).expect("a valid name")
}

/// The name of the worker holding rank `r` in these tests.
pub(super) fn name(r: usize) -> String {
    format!("w{r}")
}

/// Binds `n` peer listeners on loopback, rank r's as worker `w<r>`.
pub(super) fn listeners(n: usize, mode: Mode) -> (Vec<PeerListener>, Vec<String>) {
    let ls: Vec<PeerListener> = (0..n)
        .map(|r| {
            PeerListener::bind(
                "127.0.0.1:0".parse().expect("on loopback"),
                tls_of(mode, &worker(&name(r))),
            )
            .expect("bind")
        })
        .collect();
    let addrs = ls.iter().map(|l| l.local_addr().to_string()).collect();
    (ls, addrs)
}

/// The ranks of a group, rank r > 0's control events, and the listeners (kept open).
type Formed = (Vec<Group>, Vec<mpsc::Receiver<Control>>, Vec<PeerListener>);

/// Forms a tensor-parallel group of `n` ranks concurrently; rank r > 0's control events go
/// to `controls[r]`.
fn form_all(epoch: u64, n: usize, mode: Mode) -> Formed {
    form_grid(epoch, n, n, mode)
}

/// Forms a group of `n` ranks in rows of `tp` (`n / tp` ring ranks per column).
fn form_grid(epoch: u64, n: usize, tp: usize, mode: Mode) -> Formed {
    let (ls, addrs) = listeners(n, mode);
    let names: Vec<String> = (0..n).map(name).collect();
    let mut rxs = Vec::new();
    let mut handles = Vec::new();
    let ls = Arc::new(ls);
    for r in 0..n {
        let (tx, rx) = mpsc::channel::<Control>();
        rxs.push(rx);
        let tx = std::sync::Mutex::new(tx);
        let sink: ControlSink = Arc::new(move |c| {
            let _ = tx.lock().expect("on loopback").send(c);
        });
        let (ls, addrs, names) = (Arc::clone(&ls), addrs.clone(), names.clone());
        handles.push(std::thread::spawn(move || {
            Group::form(
                epoch,
                r,
                tp,
                (&addrs, &names),
                &ls[r],
                (r > 0).then_some(sink),
            )
            .expect("forms")
        }));
    }
    let groups = handles
        .into_iter()
        .map(|h| h.join().expect("on loopback"))
        .collect();
    let ls = Arc::try_unwrap(ls).map_err(|_| ()).expect("listeners back");
    (groups, rxs, ls)
}

/// Runs `f` on every rank's group in its own thread and returns the results in rank order.
fn on_all<T: Send + 'static>(
    groups: Vec<Group>,
    f: impl Fn(&mut Group) -> T + Send + Sync + 'static,
) -> Vec<(Group, T)> {
    let f = Arc::new(f);
    let handles: Vec<_> = groups
        .into_iter()
        .map(|mut g| {
            let f = Arc::clone(&f);
            std::thread::spawn(move || {
                let t = f(&mut g);
                (g, t)
            })
        })
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().expect("on loopback"))
        .collect()
}

/// Ensures that every rank of a 3-rank group ends a reduction with the same bits: the
/// partials added in rank order, whatever rank computes it.
#[test]
fn reduce_sums_in_rank_order_on_every_rank() {
    for mode in MODES {
        let (groups, _rx, _ls) = form_all(1, 3, mode);
        // Values whose sum depends on the order of addition in f32.
        let parts = [
            vec![1e8f32, 1.0, -3.5],
            vec![1.0, 1e-8, 2.25],
            vec![-1e8, 3.0, 1.0],
        ];
        let want: Vec<f32> = (0..3)
            .map(|i| (parts[0][i] + parts[1][i]) + parts[2][i])
            .collect();
        let parts = Arc::new(parts);
        let out = on_all(groups, move |g| {
            g.begin_step(1);
            let mut x = parts[g.rank()].clone();
            g.reduce(ReducePoint::AttnOut, 4, &mut x).expect("reduces");
            x
        });
        for (g, x) in &out {
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(x), bits(&want), "rank {}", g.rank());
        }
    }
}

/// Ensures that ranks exchanging partial sums far larger than socket buffers (a long prefill)
/// all finish — each keeps reading while its writes wait — with the rank-order sum.
#[test]
fn large_partials_do_not_deadlock() {
    for mode in MODES {
        let (groups, _rx, _ls) = form_all(8, 3, mode);
        let n = 3 << 20; // 12 MiB of f32 per rank
        let out = on_all(groups, move |g| {
            g.begin_step(1);
            let mut x = vec![(g.rank() + 1) as f32; n];
            g.reduce(ReducePoint::MlpDown, 0, &mut x).expect("reduces");
            // A second, small exchange right behind it on the same links.
            let mut y = vec![g.rank() as f32; 3];
            g.reduce(ReducePoint::AttnOut, 1, &mut y).expect("reduces");
            (x.iter().all(|&v| v == 6.0), y)
        });
        for (g, (all_six, y)) in &out {
            assert!(*all_six, "rank {}", g.rank());
            assert_eq!(y, &vec![3.0; 3], "rank {}", g.rank());
        }
    }
}

/// Ensures that a step's hidden states several chunks long (a long prompt entering a later
/// stage) reach every other rank bit for bit after the step frame, and that a step with none
/// delivers an empty state.
#[test]
fn long_hidden_states_follow_the_step_frame() {
    for mode in MODES {
        let (mut groups, rx, _ls) = form_all(4, 3, mode);
        let values: Vec<f32> = (0..2 * frame::CHUNK_VALUES + 5)
            .map(|i| f32::from_bits(0x3f80_0000 ^ (i as u32).wrapping_mul(2_654_435_761)))
            .collect();
        let want = crate::hidden::encode(&values);
        let mut req = pb::StepRequest {
            plan_epoch: 4,
            step_id: 1,
            hidden: want.clone(),
            ..Default::default()
        };
        let mut r0 = groups.remove(0);
        let sender = std::thread::spawn(move || {
            r0.broadcast_step(1, &mut req).expect("sent");
            assert_eq!(req.hidden.len(), 4 * values.len(), "rank 0 keeps its copy");
            r0.broadcast_step(1, &mut pb::StepRequest::default())
                .expect("sent");
            r0
        });
        // Step by step, every rank: rank 0's broadcast ends when all of them have read it.
        for expect_empty in [false, true] {
            for (g, rx) in groups.iter_mut().zip(&rx[1..]) {
                let Control::Step { tag, request, .. } =
                    rx.recv_timeout(Duration::from_secs(10)).expect("step")
                else {
                    panic!("a step");
                };
                assert!(request.hidden.is_empty(), "the frame leaves the states out");
                g.begin_step(tag);
                let mut hidden = vec![1, 2, 3];
                g.receive_hidden(&mut hidden).expect("hidden");
                if expect_empty {
                    assert!(hidden.is_empty());
                } else {
                    assert!(hidden == want, "rank {}: hidden states differ", g.rank());
                }
                g.end_step();
            }
        }
        sender.join().expect("rank 0");
    }
}

/// Ensures that ring blocks and all-gathers several chunks long, of a different length on
/// every rank for the blocks, go round a ring of 3 (blocks far larger than socket buffers:
/// every rank sends before it reads) and arrive whole and in order.
#[test]
fn long_ring_blocks_go_round() {
    for mode in MODES {
        use tessera_model::stage::RingComm;
        let (groups, _rx, _ls) = form_grid(5, 3, 1, mode);
        let len = |r: usize| frame::CHUNK_VALUES + 7 * r + 3;
        let block =
            move |r: usize| -> Vec<f32> { (0..len(r)).map(|i| (i * 3 + r) as f32).collect() };
        let out = on_all(groups, move |g| {
            g.begin_step(1);
            let r = g.rank();
            let cell = std::cell::RefCell::new(g);
            let mut ring = ring::GroupRing(&cell);
            let mut got = Vec::new();
            ring.send_next(0, &block(r)).expect("sends");
            ring.recv_prev(0, &mut got).expect("receives");
            let local = vec![r as f32; frame::CHUNK_VALUES + 1];
            let mut all = Vec::new();
            ring.all_gather(0, &local, &mut all).expect("gathers");
            (got, all)
        });
        for (g, (got, all)) in &out {
            let r = g.rank();
            assert!(
                *got == block((r + 2) % 3),
                "rank {r}: the previous rank's block"
            );
            let n = frame::CHUNK_VALUES + 1;
            for q in 0..3 {
                assert!(
                    all[q * n..(q + 1) * n].iter().all(|&v| v == q as f32),
                    "rank {r}"
                );
            }
            assert_eq!(all.len(), 3 * n);
        }
    }
}

/// Ensures that a step frame rank 0 sends while another rank is still inside its previous
/// step waits in the link and reaches the executor once that step ends, in order with the
/// stream's close.
#[test]
fn next_step_waits_for_the_current_one() {
    for mode in MODES {
        let (mut groups, rx, _ls) = form_all(9, 2, mode);
        let req = |id| pb::StepRequest {
            plan_epoch: 9,
            step_id: id,
            ..Default::default()
        };
        groups[0].broadcast_step(1, &mut req(1)).expect("sent");
        let Control::Step { tag, .. } = rx[1].recv_timeout(Duration::from_secs(5)).expect("step")
        else {
            panic!("a step first");
        };
        groups[1].begin_step(tag);
        groups[1].receive_hidden(&mut Vec::new()).expect("hidden");
        // Rank 0 finishes step 1 first and sends step 2 and a close behind its last partial.
        let mut r0 = groups.remove(0);
        let mut r1 = groups.remove(0);
        let h = std::thread::spawn(move || {
            let mut x = vec![1.0f32; 4];
            r0.reduce(ReducePoint::AttnOut, 0, &mut x).expect("reduces");
            r0.broadcast_step(1, &mut req(2)).expect("sent");
            r0.close_stream(1);
            r0
        });
        std::thread::sleep(Duration::from_millis(100));
        let mut x = vec![2.0f32; 4];
        r1.reduce(ReducePoint::AttnOut, 0, &mut x).expect("reduces");
        assert_eq!(x, vec![3.0; 4]);
        let _r0 = h.join().expect("rank 0");
        std::thread::sleep(Duration::from_millis(100));
        assert!(rx[1].try_recv().is_err(), "nothing before the step ends");
        r1.end_step();
        match rx[1].recv_timeout(Duration::from_secs(5)).expect("step 2") {
            Control::Step { tag, request, .. } => assert_eq!((tag, request.step_id), (2, 2)),
            other => panic!("{other:?}"),
        }
        r1.end_step();
        assert!(matches!(
            rx[1].recv_timeout(Duration::from_secs(5)).expect("close"),
            Control::Close { stream: 1 }
        ));
    }
}

/// Ensures that rank 0 receives every rank's vocabulary slice assembled row by row in rank
/// order, and the other ranks report that they did not sample.
#[test]
fn logits_gather_on_rank_zero() {
    for mode in MODES {
        let (groups, _rx, _ls) = form_all(2, 3, mode);
        // Two rows; widths 2, 1, 3.
        let out = on_all(groups, |g| {
            g.begin_step(7);
            let local: Vec<f32> = match g.rank() {
                0 => vec![0.0, 1.0, 10.0, 11.0],
                1 => vec![2.0, 12.0],
                _ => vec![3.0, 4.0, 5.0, 13.0, 14.0, 15.0],
            };
            let mut full = Vec::new();
            let sampled = g.gather_logits(&local, 2, &mut full).expect("gathers");
            (sampled, full)
        });
        assert_eq!(
            out[0].1,
            (
                true,
                vec![
                    0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 10.0, 11.0, 12.0, 13.0, 14.0, 15.0
                ]
            )
        );
        assert_eq!(out[1].1, (false, Vec::new()));
        assert_eq!(out[2].1, (false, Vec::new()));
    }
}

/// Ensures that rank 0's step reaches the other ranks' executors with its step number and
/// stream, decoded, and that closing the stream is delivered too, once the step has ended.
#[test]
fn steps_reach_the_other_ranks() {
    for mode in MODES {
        let (mut groups, rx, _ls) = form_all(3, 2, mode);
        let mut req = pb::StepRequest {
            plan_epoch: 3,
            step_id: 42,
            ..Default::default()
        };
        groups[0].broadcast_step(9, &mut req).expect("sent");
        groups[0].close_stream(9);
        match rx[1].recv_timeout(Duration::from_secs(5)).expect("step") {
            Control::Step {
                tag,
                stream,
                request,
            } => {
                assert_eq!((tag, stream, request.step_id), (1, 9, 42));
            }
            other => panic!("{other:?}"),
        }
        // The link is rank 1's executor's until its step ends; then the reader delivers the rest.
        assert!(rx[1].recv_timeout(Duration::from_millis(200)).is_err());
        groups[1].end_step();
        assert!(matches!(
            rx[1].recv_timeout(Duration::from_secs(5)).expect("close"),
            Control::Close { stream: 9 }
        ));
    }
}

/// Ensures that a rank whose peer's process is gone fails its reduction at once with
/// UNAVAILABLE naming the peer, and the other ranks learn that rank 0 is gone.
#[test]
fn dead_peer_fails_the_step_at_once() {
    for mode in MODES {
        let (mut groups, rx, _ls) = form_all(4, 2, mode);
        let rank1 = groups.pop().expect("rank 1");
        drop(groups.pop()); // rank 0 dies
        assert!(matches!(
            rx[1].recv_timeout(Duration::from_secs(5)).expect("down"),
            Control::Down { .. }
        ));
        let mut g = rank1;
        g.begin_step(1);
        let started = Instant::now();
        let mut x = vec![1.0f32; 4];
        let err = g
            .reduce(ReducePoint::MlpDown, 0, &mut x)
            .expect_err("fails");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
        let e = g.take_failure().expect("recorded");
        assert_eq!(e.code(), tonic::Code::Unavailable);
        assert!(e.to_string().contains("stage group rank 0"), "{e} / {err}");
    }
}

/// Ensures that a peer that stays silent fails the wait after the timeout, not never.
#[test]
fn silent_peer_times_out() {
    for mode in MODES {
        let (mut groups, _rx, _ls) = form_all(5, 2, mode);
        let mut g = groups.remove(0);
        g.timeout = Duration::from_millis(300);
        g.begin_step(1);
        let started = Instant::now();
        let mut x = vec![0.0f32; 2];
        g.reduce(ReducePoint::AttnOut, 1, &mut x)
            .expect_err("times out");
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(300) && took < Duration::from_secs(3),
            "{took:?}"
        );
        assert!(
            g.take_failure()
                .expect("on loopback")
                .to_string()
                .contains("sent nothing")
        );
        drop(groups);
    }
}

/// Ensures that an abort from a rank that failed the step ends the others' wait at once with
/// its reason, and that frames of a failed step do not leak into the next one.
#[test]
fn abort_propagates_and_stale_frames_are_skipped() {
    for mode in MODES {
        let (groups, _rx, _ls) = form_all(6, 2, mode);
        let barrier = Arc::new(Barrier::new(2));
        let b = Arc::clone(&barrier);
        let out = on_all(groups, move |g| {
            g.begin_step(1);
            let first = if g.rank() == 1 {
                // Rank 1 fails step 1 before its first reduction.
                g.abort("KV cache is full");
                None
            } else {
                // Rank 0 has sent its step-1 partial (which rank 1 never reads) and waits.
                let mut x = vec![1.0f32];
                Some(
                    g.reduce(ReducePoint::MlpDown, 0, &mut x)
                        .map_err(|e| e.to_string()),
                )
            };
            b.wait();
            g.begin_step(2);
            let mut x = vec![if g.rank() == 0 { 1.0f32 } else { 2.0 }];
            g.reduce(ReducePoint::AttnOut, 3, &mut x)
                .expect("step 2 reduces");
            (first, x[0])
        });
        let (first, sum0) = &out[0].1;
        let first = first.clone().expect("rank 0 result");
        let err = first.expect_err("rank 0 fails step 1");
        assert!(err.contains("KV cache is full"), "{err}");
        assert_eq!(*sum0, 3.0);
        assert_eq!(out[1].1.1, 3.0);
    }
}

/// Ensures that a rank that never dials in makes group formation fail with UNAVAILABLE
/// naming it, and that a connection of another epoch is not taken for it.
#[test]
fn missing_rank_fails_formation_naming_it() {
    for mode in MODES {
        let (ls, addrs) = listeners(2, mode);
        // Rank 1 of epoch 1 dials, but rank 0 forms epoch 2.
        let _s = hello(&addrs[0], mode, &worker("w1"), (1, 1, 0));
        // In the clear there is no certificate to check a claim against.
        let holder = (mode == Mode::Mutual).then_some("w1");
        let got = ls[0].take(
            2,
            1,
            0,
            Some("w1"),
            Instant::now() + Duration::from_millis(300),
        );
        assert!(got.is_none(), "{mode:?}");
        let got = ls[0].take(1, 1, 0, holder, Instant::now() + Duration::from_secs(2));
        assert!(got.is_some(), "{mode:?}");
    }
}

/// Ensures that the peer port answers latency probes, in the clear and from a certified
/// worker under TLS.
#[test]
fn rtt_probe_measures_the_peer_port() {
    for mode in MODES {
        let (_ls, addrs) = listeners(1, mode);
        let tls = tls_of(mode, &worker("w1"));
        let rtt = probe_rtt(&addrs[0], 5, Duration::from_secs(2), &tls).expect("answers");
        assert!(rtt < Duration::from_millis(500), "{mode:?}: {rtt:?}");
    }
}
