//! Linearizability of the replicated state: concurrent clients write and read (ReadIndex on
//! any node, leader or follower) while a seeded schedule partitions, loses and delays messages
//! and crashes and restarts nodes, some of them at failpoints; stateright's linearizability
//! tester then checks the recorded history. Two state machines: the toy key-value store
//! (`set`, which answers the previous value, and compare-and-set) and the coordinator's real
//! cluster state (`SetModel`, a blind write; `SetPlan`, whose epoch only moves forward).
//! Hand-written histories, and reads of a deposed leader's local state without ReadIndex,
//! show that the check rejects what it must.

mod raft_support;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};

use raft_support::history::{History, Op, Ret, Summary};
use raft_support::{Cluster, KvView, Machine};
use tessera_coordinator::raft::{FailPoint, RaftError, RaftHandle, RaftRole};
use tessera_coordinator::state::Command;
use tokio::sync::Mutex;

const T: Duration = Duration::from_secs(20);

/// The keys clients use on each machine.
fn keys(machine: Machine) -> &'static [&'static str] {
    match machine {
        Machine::Kv => &["x", "y", "z"],
        Machine::Cluster => &["model", "epoch"],
    }
}

/// xorshift, so that a seed fixes every choice of the clients and the fault schedule.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// How a client's operation ended.
enum Outcome {
    Ok(Ret),
    /// Certainly without effect.
    Fail,
    /// Maybe with effect.
    Unknown,
}

type View = Arc<StdMutex<KvView>>;

/// The running leader with the highest term: its handle and its state machine's view.
fn leader_endpoint(c: &Cluster) -> Option<(RaftHandle, View)> {
    let leader = c
        .handles
        .values()
        .map(RaftHandle::status)
        .filter(|s| s.running && s.role == RaftRole::Leader)
        .max_by_key(|s| s.term)?;
    Some((c.handles[&leader.id].clone(), c.views[&leader.id].clone()))
}

/// Every running node: its handle and its state machine's view.
fn running(c: &Cluster) -> Vec<(RaftHandle, View)> {
    c.handles
        .iter()
        .filter(|(_, h)| h.status().running)
        .map(|(id, h)| (h.clone(), c.views[id].clone()))
        .collect()
}

/// A write's or CAS's result: definite failures had no effect; anything else may have.
fn classify(r: Result<Vec<u8>, RaftError>, ret: impl FnOnce(Vec<u8>) -> Ret) -> Outcome {
    match r {
        Ok(bytes) => Outcome::Ok(ret(bytes)),
        // The cluster state refuses a plan epoch that does not move forward: an answer.
        Err(RaftError::Rejected(why)) if why.0.contains("is stale") => {
            Outcome::Ok(Ret::Swapped(false))
        }
        Err(
            RaftError::NotLeader { .. }
            | RaftError::Dropped(_)
            | RaftError::Overloaded(_)
            | RaftError::Rejected(_),
        ) => Outcome::Fail,
        // Timeout, OutcomeUnknown, Stopped (the node may have died after committing).
        Err(_) => Outcome::Unknown,
    }
}

/// Runs `op` on `key` through node `h` whose state is `view` (the leader, for a write).
async fn execute(machine: Machine, h: &RaftHandle, view: &View, key: &str, op: &Op) -> Outcome {
    match op {
        // A read is linearizable once ReadIndex confirmed it, on the leader or a follower;
        // reading the view before returning keeps the value within the operation's interval.
        Op::Read => match h.read_index().await {
            Ok(_) => Outcome::Ok(Ret::Value(
                view.lock().expect("kv lock").map.get(key).cloned(),
            )),
            // A read has no effect, so any failure leaves it out of the history.
            Err(_) => Outcome::Fail,
        },
        Op::Write(v) => classify(
            h.propose(format!("set {key} {v}").into_bytes()).await,
            |prev| Ret::Written {
                prev: (!prev.is_empty()).then(|| String::from_utf8_lossy(&prev).into_owned()),
            },
        ),
        Op::Cas { expected, new } => {
            let expected = expected.as_deref().unwrap_or("-");
            classify(
                h.propose(format!("cas {key} {expected} {new}").into_bytes())
                    .await,
                |r| Ret::Swapped(r == b"1"),
            )
        }
        Op::Put(v) => classify(h.propose(machine.set(key, v).into_bytes()).await, |_| {
            Ret::Done
        }),
        Op::Advance(epoch) => {
            let cmd = Command::SetPlan {
                epoch: *epoch,
                plan: None,
            };
            let bytes = serde_json::to_vec(&cmd).expect("encode SetPlan");
            classify(h.propose(bytes).await, |_| Ret::Swapped(true))
        }
    }
}

/// A random operation of `machine` on `key`, given the value last read there.
fn random_op(machine: Machine, rng: &mut Rng, key: &str, seen: Option<&str>, value: String) -> Op {
    match (machine, rng.below(10)) {
        (Machine::Kv, 0..=3) => Op::Write(value),
        (Machine::Kv, 4..=7) | (Machine::Cluster, 5..) => Op::Read,
        (Machine::Kv, _) => Op::Cas {
            expected: seen.map(str::to_string),
            new: value,
        },
        (Machine::Cluster, _) if key == "epoch" => {
            // Often the epoch just read, or one above it: concurrent raises race.
            let base = seen.and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            Op::Advance(base + rng.below(3))
        }
        (Machine::Cluster, _) => Op::Put(value),
    }
}

/// One client: random operations, one at a time: writes through whichever node leads, reads
/// through any running node.
async fn client(
    cluster: Arc<Mutex<Cluster>>,
    history: History,
    id: u64,
    seed: u64,
    stop: Arc<AtomicBool>,
) {
    let mut rng = Rng::new(seed ^ (id << 32));
    let mut seen: BTreeMap<&str, Option<String>> = BTreeMap::new();
    let mut n = 0;
    let machine = cluster.lock().await.machine;
    let keys = keys(machine);
    while !stop.load(Ordering::Relaxed) {
        let (leader, nodes) = {
            let c = cluster.lock().await;
            (leader_endpoint(&c), running(&c))
        };
        let Some(leader) = leader else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let key = keys[rng.below(keys.len() as u64) as usize];
        n += 1;
        let value = format!("c{id}n{n}");
        let last = seen.get(key).cloned().flatten();
        let op = random_op(machine, &mut rng, key, last.as_deref(), value);
        let (h, view) = match op {
            Op::Read if !nodes.is_empty() => nodes[rng.below(nodes.len() as u64) as usize].clone(),
            _ => leader,
        };
        let op_id = history.invoke(id, key, op.clone());
        match execute(machine, &h, &view, key, &op).await {
            Outcome::Ok(ret) => {
                if let Ret::Value(v) = &ret {
                    seen.insert(key, v.clone());
                }
                history.ok(op_id, ret);
            }
            Outcome::Fail => {
                history.fail(op_id);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Outcome::Unknown => history.unknown(op_id),
        }
    }
}

/// Checks `history` on a thread of its own: the tester's search recurses once per operation.
fn check(history: &History) -> Result<Summary, String> {
    let history = history.clone();
    std::thread::Builder::new()
        .stack_size(256 << 20)
        .spawn(move || history.check())
        .map_err(|e| e.to_string())?
        .join()
        .map_err(|_| "the checker panicked".to_string())?
}

/// One seeded run: faults for `rounds` steps of 200 ms under three clients, then recovery,
/// final reads of every key, and the checks.
async fn run(seed: u64, rounds: u32, machine: Machine) {
    let ids = [1u64, 2, 3];
    let mut c = Cluster::empty(&format!("linear-{machine:?}-{seed}"), seed);
    c.machine = machine;
    c.snapshot_interval = 6;
    let peers: BTreeMap<u64, String> = ids.map(|i| (i, format!("mem:{i}"))).into();
    for id in ids {
        c.start(id, Some(peers.clone()));
    }
    c.leader(T).await;
    let cluster = Arc::new(Mutex::new(c));
    let history = History::default();
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (1..=3)
        .map(|id| {
            tokio::spawn(client(
                cluster.clone(),
                history.clone(),
                id,
                seed,
                stop.clone(),
            ))
        })
        .collect();

    let mut rng = Rng::new(seed);
    let mut down: Vec<u64> = Vec::new();
    let (mut crashes, mut armed) = (0, 0);
    for round in 0..rounds {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut c = cluster.lock().await;
        // Nodes that crashed at a failpoint stay down until a restart step.
        for id in c.stopped() {
            c.crash(id).await;
            down.push(id);
        }
        let node = ids[rng.below(3) as usize];
        let action = if round % 5 == 2 { 5 } else { rng.below(7) };
        match action {
            0 => c.net.isolate(node),
            1 => c.net.heal(),
            2 => c.net.set_loss(rng.below(20) as f64 / 100.0),
            3 => c
                .net
                .set_delay(Duration::ZERO, Duration::from_millis(rng.below(20))),
            4 if down.is_empty() => {
                c.crash(node).await;
                down.push(node);
                crashes += 1;
            }
            5 if !down.contains(&node) => {
                // The first one at a point every node passes at each applied batch, so that at
                // least one fires in every run (a snapshot point may never be reached: seen in
                // CI); the rest anywhere.
                let point = if armed == 0 {
                    FailPoint::AppliedBeforeAdvance
                } else {
                    FailPoint::ALL[rng.below(FailPoint::ALL.len() as u64) as usize]
                };
                c.failpoints[&node].arm(point, rng.below(3) as u32);
                armed += 1;
            }
            _ => {
                if let Some(id) = down.pop() {
                    c.start(id, None);
                }
            }
        }
    }

    let fired: Vec<(u64, FailPoint)> = {
        let mut c = cluster.lock().await;
        c.net.heal();
        c.net.set_loss(0.0);
        c.net.set_delay(Duration::ZERO, Duration::ZERO);
        for f in c.failpoints.values() {
            f.disarm();
        }
        for id in c.stopped() {
            c.crash(id).await;
            down.push(id);
        }
        for id in down.drain(..) {
            c.start(id, None);
        }
        c.leader(T).await;
        c.failpoints
            .iter()
            .flat_map(|(id, f)| f.fired().into_iter().map(move |p| (*id, p)))
            .collect()
    };
    stop.store(true, Ordering::Relaxed);
    for task in clients {
        task.await.expect("client task");
    }
    // Final reads pin down what every maybe-applied write did.
    let c = cluster.lock().await;
    let deadline = Instant::now() + T;
    for key in keys(machine) {
        loop {
            let (h, view) = leader_endpoint(&c).expect("a leader after recovery");
            let id = history.invoke(100, key, Op::Read);
            match execute(machine, &h, &view, key, &Op::Read).await {
                Outcome::Ok(ret) => {
                    history.ok(id, ret);
                    break;
                }
                _ => history.fail(id),
            }
            assert!(Instant::now() < deadline, "final read of {key}");
        }
    }
    c.assert_converged(&ids, T).await;
    c.assert_no_divergence();
    let summary = check(&history).unwrap_or_else(|e| panic!("{machine:?} seed {seed}: {e}"));
    eprintln!(
        "{machine:?} seed {seed}: {summary:?}; {crashes} crashes, {armed} failpoints armed, \
         fired: {fired:?}"
    );
    assert!(
        summary.ok >= 20,
        "seed {seed}: too few operations: {summary:?}"
    );
    assert!(!fired.is_empty(), "seed {seed}: no failpoint fired");
    drop(c);
    match Arc::try_unwrap(cluster) {
        Ok(c) => c.into_inner().shutdown().await,
        Err(_) => panic!("the clients still hold the cluster"),
    }
}

/// The seeds to run: `RAFT_LINEAR_SEEDS` (comma-separated) or three fixed ones.
fn seeds() -> Vec<u64> {
    std::env::var("RAFT_LINEAR_SEEDS")
        .ok()
        .map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .filter(|v: &Vec<u64>| !v.is_empty())
        .unwrap_or_else(|| vec![1, 2, 3])
}

/// Ensures that, for several seeds, the history of writes, compare-and-sets and ReadIndex
/// reads under partitions, loss, delay, crashes and failpoint crashes is linearizable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn linearizable_under_faults() {
    for seed in seeds() {
        run(seed, 25, Machine::Kv).await;
    }
}

/// Ensures the same of the coordinator's real cluster state: blind writes of the served model,
/// plan epochs raised concurrently (a stale one refused), ReadIndex reads on any node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_state_linearizable_under_faults() {
    for seed in seeds() {
        run(seed, 25, Machine::Cluster).await;
    }
}

/// Asserts that `who` (node `h`) cannot confirm a read: it knows no leader it can reach, or
/// no quorum answers it.
async fn assert_read_refused(h: &RaftHandle, who: &str) {
    let err = h.read_index().await.expect_err(who);
    assert!(
        matches!(err, RaftError::NotLeader { .. } | RaftError::Timeout(_)),
        "{who}: {err}"
    );
}

/// Ensures that a follower's ReadIndex read reflects every write that completed before it,
/// though the follower may not have applied it yet, and that a follower cut off from the
/// leader refuses to read (its local state is stale) rather than answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follower_reads_are_linearizable() {
    let c = Cluster::new("linear-follower", &[1, 2, 3], 9);
    let leader = c.leader(T).await;
    let follower = [1, 2, 3]
        .into_iter()
        .find(|i| *i != leader)
        .expect("a follower");
    let (h, _) = leader_endpoint(&c).expect("a leader");
    let f = c.handles[&follower].clone();
    for n in 0..20 {
        let value = format!("v{n}");
        h.propose(format!("set x {value}").into_bytes())
            .await
            .expect("write");
        f.read_index().await.expect("a follower's read");
        assert_eq!(c.view(follower).map.get("x"), Some(&value), "read {n}");
    }
    c.net.isolate(follower);
    h.propose(b"set x cut".to_vec())
        .await
        .expect("the majority writes");
    assert_read_refused(&f, "a cut-off follower").await;
    assert_eq!(
        c.view(follower).map.get("x").map(String::as_str),
        Some("v19")
    );
    c.net.heal();
    let deadline = Instant::now() + T;
    while f.read_index().await.is_err() {
        assert!(Instant::now() < deadline, "the healed follower never reads");
    }
    assert_eq!(
        c.view(follower).map.get("x").map(String::as_str),
        Some("cut")
    );
    c.shutdown().await;
}

/// Ensures that reading a deposed leader's local state without ReadIndex yields a stale read
/// that the checker rejects, while ReadIndex on that node refuses to answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_read_on_deposed_leader_is_caught() {
    let c = Cluster::new("linear-stale", &[1, 2, 3], 7);
    let old = c.leader(T).await;
    let history = History::default();
    let write = |client: u64, value: &str| {
        let history = history.clone();
        let (h, _) = leader_endpoint(&c).expect("a leader");
        let value = value.to_string();
        async move {
            let id = history.invoke(client, "x", Op::Write(value.clone()));
            let prev = h
                .propose(format!("set x {value}").into_bytes())
                .await
                .expect("write");
            let prev = (!prev.is_empty()).then(|| String::from_utf8_lossy(&prev).into_owned());
            history.ok(id, Ret::Written { prev });
        }
    };
    write(1, "v1").await;
    c.net.isolate(old);
    let rest: Vec<u64> = [1, 2, 3].into_iter().filter(|i| *i != old).collect();
    c.leader_among(&rest, T).await;
    write(2, "v2").await;

    assert_read_refused(&c.handles[&old], "a deposed leader").await;
    // The broken variant: the old leader's local state, read without ReadIndex.
    let id = history.invoke(3, "x", Op::Read);
    let local = c.view(old).map.get("x").cloned();
    assert_eq!(local.as_deref(), Some("v1"), "the isolated node missed v2");
    history.ok(id, Ret::Value(local));
    let err = check(&history).expect_err("a stale read must be rejected");
    assert!(err.contains("\"x\""), "{err}");
    c.shutdown().await;
}

/// Builds a history from `(client, op, ret)` steps in real-time order; `None` returns stay
/// pending (unknown).
fn sequential(steps: &[(u64, Op, Option<Ret>)]) -> History {
    let h = History::default();
    for (client, op, ret) in steps {
        let id = h.invoke(*client, "k", op.clone());
        match ret {
            Some(r) => h.ok(id, r.clone()),
            None => h.unknown(id),
        }
    }
    h
}

fn w(v: &str) -> Op {
    Op::Write(v.to_string())
}

fn written(prev: Option<&str>) -> Option<Ret> {
    Some(Ret::Written {
        prev: prev.map(str::to_string),
    })
}

fn read(v: Option<&str>) -> Option<Ret> {
    Some(Ret::Value(v.map(str::to_string)))
}

/// Ensures that the checker rejects a stale read and a lost write, and accepts the same
/// histories with the right values (so the rejection is about the values).
#[test]
fn checker_rejects_stale_read_and_lost_write() {
    let good = sequential(&[
        (1, w("a"), written(None)),
        (2, w("b"), written(Some("a"))),
        (3, Op::Read, read(Some("b"))),
    ]);
    assert_eq!(check(&good).expect("linearizable").ok, 3);
    let stale = sequential(&[
        (1, w("a"), written(None)),
        (2, w("b"), written(Some("a"))),
        (3, Op::Read, read(Some("a"))),
    ]);
    assert!(check(&stale).is_err(), "stale read accepted");
    let lost = sequential(&[(1, w("a"), written(None)), (2, Op::Read, read(None))]);
    assert!(check(&lost).is_err(), "lost write accepted");
}

/// Ensures that an operation of unknown outcome may take effect or not, but not both: a
/// value once read cannot disappear.
#[test]
fn checker_treats_unknown_ops_as_pending() {
    let applied_later = sequential(&[
        (1, w("a"), None),
        (2, Op::Read, read(None)),
        (2, Op::Read, read(Some("a"))),
    ]);
    let summary = check(&applied_later).expect("may apply late");
    assert_eq!((summary.ok, summary.unknown), (2, 1));
    let never = sequential(&[(1, w("a"), None), (2, Op::Read, read(None))]);
    check(&never).expect("may never apply");
    let flicker = sequential(&[
        (1, w("a"), None),
        (2, Op::Read, read(Some("a"))),
        (2, Op::Read, read(None)),
    ]);
    assert!(check(&flicker).is_err(), "a write cannot be undone");
    // The client of an unknown operation continues as a new thread.
    let after = sequential(&[
        (1, w("a"), None),
        (1, w("b"), written(Some("a"))),
        (2, Op::Read, read(Some("b"))),
    ]);
    check(&after).expect("continues after an unknown op");
}

/// Ensures that compare-and-set is checked: of two swaps from the same expected (absent)
/// value, only one can succeed.
#[test]
fn checker_checks_compare_and_set() {
    let cas = |new: &str| Op::Cas {
        expected: None,
        new: new.to_string(),
    };
    let ok = sequential(&[
        (1, cas("a"), Some(Ret::Swapped(true))),
        (2, cas("b"), Some(Ret::Swapped(false))),
        (3, Op::Read, read(Some("a"))),
    ]);
    check(&ok).expect("one swap wins");
    let both = sequential(&[
        (1, cas("a"), Some(Ret::Swapped(true))),
        (2, cas("b"), Some(Ret::Swapped(true))),
    ]);
    assert!(check(&both).is_err(), "both swaps from absent accepted");
}
