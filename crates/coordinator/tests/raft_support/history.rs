//! A history of client operations on the replicated key-value store, and its linearizability
//! check with stateright's `LinearizabilityTester`.
//!
//! Clients record each operation's invocation before sending it and its outcome after it came
//! back, under one lock, so the order of the recorded events is a real-time order. Outcomes:
//! - `ok`: the operation took effect (or read) and returned this value;
//! - `fail`: it certainly had no effect (not the leader, dropped, a failed read): it is left
//!   out of the history, as Jepsen does with failed operations;
//! - `unknown`: it may or may not have taken effect (timed out, the node stopped): it stays
//!   pending forever, which stateright's tester allows to take effect at any point after its
//!   invocation or never. The client then continues as a new thread, since a tester thread
//!   can have only one operation in flight.
//!
//! Linearizability is local (Herlihy & Wing): a history is linearizable if and only if each
//! key's sub-history is, so each key gets its own tester, which keeps the search small.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use stateright::semantics::{ConsistencyTester, LinearizabilityTester, SequentialSpec};

/// An operation on one key.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    /// `set`: answers the previous value.
    Write(String),
    /// A linearizable read.
    Read,
    /// Compare-and-set (`None`: expects the key absent).
    Cas {
        expected: Option<String>,
        new: String,
    },
    /// A blind write that answers nothing (the cluster state's `SetModel`).
    Put(String),
    /// Raises a number to `n` if `n` is above it (absent: 0), answering whether it did (the
    /// cluster state's `SetPlan`, refused for an epoch that does not move forward).
    Advance(u64),
}

/// What an operation returned.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Ret {
    Written { prev: Option<String> },
    Value(Option<String>),
    Swapped(bool),
    Done,
}

/// The sequential specification of one key: a register with compare-and-set, whose write
/// answers the previous value; also a blind write, and a number only ever raised.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct KvRegister(pub Option<String>);

impl SequentialSpec for KvRegister {
    type Op = Op;
    type Ret = Ret;

    fn invoke(&mut self, op: &Op) -> Ret {
        match op {
            Op::Write(v) => Ret::Written {
                prev: self.0.replace(v.clone()),
            },
            Op::Read => Ret::Value(self.0.clone()),
            Op::Cas { expected, new } => {
                let swap = self.0 == *expected;
                if swap {
                    self.0 = Some(new.clone());
                }
                Ret::Swapped(swap)
            }
            Op::Put(v) => {
                self.0 = Some(v.clone());
                Ret::Done
            }
            Op::Advance(n) => {
                let current = self.0.as_deref().map_or(Some(0), |v| v.parse::<u64>().ok());
                let raise = current.is_some_and(|c| *n > c);
                if raise {
                    self.0 = Some(n.to_string());
                }
                Ret::Swapped(raise)
            }
        }
    }
}

#[derive(Debug, Clone)]
enum Event {
    Invoke {
        id: u64,
        thread: u64,
        key: String,
        op: Op,
    },
    Ok {
        id: u64,
        ret: Ret,
    },
    Fail {
        id: u64,
    },
    Unknown {
        id: u64,
    },
}

#[derive(Default)]
struct Log {
    events: Vec<Event>,
    next_id: u64,
    next_thread: u64,
    /// Each client's current tester thread.
    threads: BTreeMap<u64, u64>,
    /// The thread of each operation in flight.
    in_flight: BTreeMap<u64, (u64, u64)>,
}

/// The history of all clients; cloning shares it.
#[derive(Clone, Default)]
pub struct History(Arc<Mutex<Log>>);

/// What a checked history held.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Summary {
    pub ok: usize,
    pub failed: usize,
    pub unknown: usize,
    pub keys: usize,
}

impl History {
    fn log(&self) -> std::sync::MutexGuard<'_, Log> {
        self.0.lock().expect("history lock")
    }

    /// Records that `client` invokes `op` on `key`; returns the operation's id.
    pub fn invoke(&self, client: u64, key: &str, op: Op) -> u64 {
        let mut log = self.log();
        let id = log.next_id;
        log.next_id += 1;
        let thread = match log.threads.get(&client) {
            Some(t) => *t,
            None => {
                let t = log.next_thread;
                log.next_thread += 1;
                log.threads.insert(client, t);
                t
            }
        };
        assert!(
            log.in_flight.values().all(|(_, t)| *t != thread),
            "client {client} invoked twice at once"
        );
        log.in_flight.insert(id, (client, thread));
        log.events.push(Event::Invoke {
            id,
            thread,
            key: key.to_string(),
            op,
        });
        id
    }

    /// Records that operation `id` returned `ret`.
    pub fn ok(&self, id: u64, ret: Ret) {
        let mut log = self.log();
        log.in_flight.remove(&id);
        log.events.push(Event::Ok { id, ret });
    }

    /// Records that operation `id` certainly had no effect.
    pub fn fail(&self, id: u64) {
        let mut log = self.log();
        log.in_flight.remove(&id);
        log.events.push(Event::Fail { id });
    }

    /// Records that operation `id` may or may not have taken effect; its client continues as
    /// a new thread.
    pub fn unknown(&self, id: u64) {
        let mut log = self.log();
        if let Some((client, _)) = log.in_flight.remove(&id) {
            let t = log.next_thread;
            log.next_thread += 1;
            log.threads.insert(client, t);
        }
        log.events.push(Event::Unknown { id });
    }

    /// Checks the history (operations still in flight count as unknown).
    ///
    /// # Errors
    /// A description of the first key whose sub-history is not linearizable.
    pub fn check(&self) -> Result<Summary, String> {
        let events = self.log().events.clone();
        check_events(&events)
    }
}

fn check_events(events: &[Event]) -> Result<Summary, String> {
    let failed: BTreeSet<u64> = events
        .iter()
        .filter_map(|e| match e {
            Event::Fail { id } => Some(*id),
            _ => None,
        })
        .collect();
    let mut summary = Summary {
        failed: failed.len(),
        ..Summary::default()
    };
    let mut testers: BTreeMap<String, LinearizabilityTester<u64, KvRegister>> = BTreeMap::new();
    let mut ops: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut of_op: BTreeMap<u64, (u64, String)> = BTreeMap::new();
    for e in events {
        match e {
            Event::Invoke { id, .. } if failed.contains(id) => {}
            Event::Invoke {
                id,
                thread,
                key,
                op,
            } => {
                let tester = testers
                    .entry(key.clone())
                    .or_insert_with(|| LinearizabilityTester::new(KvRegister::default()));
                tester.on_invoke(*thread, op.clone())?;
                of_op.insert(*id, (*thread, key.clone()));
                ops.entry(key.clone())
                    .or_default()
                    .push(format!("t{thread} invokes {op:?}"));
            }
            Event::Ok { id, ret } => {
                let (thread, key) = of_op
                    .get(id)
                    .cloned()
                    .ok_or_else(|| format!("operation {id} returned without an invocation"))?;
                testers
                    .get_mut(&key)
                    .ok_or_else(|| format!("no tester for {key}"))?
                    .on_return(thread, ret.clone())?;
                ops.entry(key)
                    .or_default()
                    .push(format!("t{thread} -> {ret:?}"));
                summary.ok += 1;
            }
            Event::Fail { .. } | Event::Unknown { .. } => {}
        }
    }
    summary.unknown = of_op.len() - summary.ok;
    summary.keys = testers.len();
    for (key, tester) in &testers {
        if !tester.is_consistent() {
            let lines = &ops[key];
            let tail = &lines[lines.len().saturating_sub(40)..];
            return Err(format!(
                "the history of key {key:?} is not linearizable; its last events:\n{}",
                tail.join("\n")
            ));
        }
    }
    Ok(summary)
}
