//! Shared harness for the Raft tests: an in-process cluster of Raft nodes on redb files over a
//! `MemNetwork`, each node with its own failpoints, replicating either a small key-value state
//! machine ([`Kv`]) or the coordinator's real cluster state ([`Projected`] over
//! `ReplicaMachine`), both recording what they apply and showing the test a key-value view.
//! `history` records client operations and checks them for linearizability.

#![allow(dead_code, missing_docs)]

pub mod history;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use tessera_testkit::TempDir;

use tessera_coordinator::raft::{
    ApplyError, Failpoints, MemNetwork, RaftConfig, RaftError, RaftHandle, RaftNode, RaftRole,
    RedbStorage, StateMachine,
};
use tessera_coordinator::replica::{Replica, ReplicaMachine};
use tessera_coordinator::state::{ClusterState, Command};

/// Which state machine the nodes replicate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Machine {
    /// The toy key-value store [`Kv`].
    Kv,
    /// The coordinator's cluster state, seen through [`Projected`].
    Cluster,
}

impl Machine {
    /// The command that sets `key` to `value`: `set` on [`Kv`]; on the cluster state, key
    /// `model` is the served model (`SetModel`) and any other key a worker registered under
    /// that id (`RegisterWorker`, refused if the id is taken).
    pub fn set(self, key: &str, value: &str) -> String {
        match self {
            Machine::Kv => format!("set {key} {value}"),
            Machine::Cluster if key == "model" => json(&Command::SetModel {
                model: value.to_string(),
            }),
            Machine::Cluster => json(&Command::RegisterWorker {
                id: key.to_string(),
                // Unique: a registration replaces any worker at the same address.
                address: format!("{key}.{value}:1"),
                name: value.to_string(),
                memory_bytes: 1 << 30,
                threads: 1,
                devices: Vec::new(),
                peer_address: String::new(),
            }),
        }
    }
}

fn json(cmd: &Command) -> String {
    serde_json::to_string(cmd).expect("encode command")
}

/// The key-value view of a cluster state: `model`, `epoch` (the plan epoch, once above 0),
/// and each worker id with its name.
pub fn project(st: &ClusterState) -> BTreeMap<String, String> {
    let mut map: BTreeMap<String, String> = st
        .workers()
        .map(|w| (w.id.clone(), w.name.clone()))
        .collect();
    if !st.model().is_empty() {
        map.insert("model".into(), st.model().to_owned());
    }
    if st.plan_epoch() > 0 {
        map.insert("epoch".into(), st.plan_epoch().to_string());
    }
    map
}

/// Records entry `index` in `v`, noting a re-application that differs from the first.
fn record(v: &mut KvView, index: u64, data: &[u8]) {
    if let Some(prev) = v.record.insert(index, data.to_vec())
        && prev != data
    {
        v.conflicts
            .push(format!("index {index}: {prev:?} then {data:?}"));
    }
    v.applied = index;
}

/// The coordinator's real state machine, recording what it applies and projecting its state
/// into the view after every apply and restore. Its snapshots are the real ones, prefixed with
/// the applied index (8 bytes) so the view knows where a restore put it.
pub struct Projected {
    inner: ReplicaMachine,
    view: Arc<Mutex<KvView>>,
}

impl Projected {
    pub fn new(view: Arc<Mutex<KvView>>) -> Self {
        Self {
            inner: ReplicaMachine(Replica::new("")),
            view,
        }
    }
}

impl StateMachine for Projected {
    fn apply(&mut self, index: u64, data: &[u8]) -> Result<Vec<u8>, ApplyError> {
        let r = self.inner.apply(index, data);
        let mut v = self.view.lock().expect("view lock");
        record(&mut v, index, data);
        v.map = self.inner.0.with(project);
        r
    }

    fn snapshot(&self) -> Vec<u8> {
        let applied = self.view.lock().expect("view lock").applied;
        let mut data = applied.to_le_bytes().to_vec();
        data.extend(self.inner.snapshot());
        data
    }

    fn restore(&mut self, data: &[u8]) -> Result<(), ApplyError> {
        let (applied, state) = data
            .split_first_chunk::<8>()
            .ok_or_else(|| ApplyError("snapshot without its index".into()))?;
        self.inner.restore(state)?;
        let mut v = self.view.lock().expect("view lock");
        let applied = u64::from_le_bytes(*applied);
        v.applied = applied;
        v.restored.push(applied);
        v.map = self.inner.0.with(project);
        Ok(())
    }
}

/// What a node's state machine shows the test; survives the node's restarts.
#[derive(Default)]
pub struct KvView {
    pub map: BTreeMap<String, String>,
    pub applied: u64,
    /// Every entry ever applied on this node, by index.
    pub record: BTreeMap<u64, Vec<u8>>,
    /// Re-applications (after a restart) that differed from the first application.
    pub conflicts: Vec<String>,
    /// Indexes of the snapshots restored.
    pub restored: Vec<u64>,
}

/// A key-value store: command `set <key> <value>` answers the previous value;
/// `cas <key> <expected> <new>` sets `new` if the value is `expected` (`-`: absent) and answers
/// `1`, else answers `0`; anything else is refused.
pub struct Kv(pub Arc<Mutex<KvView>>);

impl StateMachine for Kv {
    fn apply(&mut self, index: u64, data: &[u8]) -> Result<Vec<u8>, ApplyError> {
        let mut v = self.0.lock().expect("kv lock");
        record(&mut v, index, data);
        let text = std::str::from_utf8(data).map_err(|e| ApplyError(e.to_string()))?;
        let (op, rest) = text.split_once(' ').unwrap_or((text, ""));
        match (op, rest.splitn(2, ' ').collect::<Vec<_>>().as_slice()) {
            ("set", [k, val]) => {
                let prev = v.map.insert(k.to_string(), val.to_string());
                Ok(prev.unwrap_or_default().into_bytes())
            }
            ("cas", [k, args]) => match args.split_once(' ') {
                Some((expected, new)) => {
                    let current = v.map.get(*k).map_or("-", String::as_str);
                    if current == expected {
                        v.map.insert(k.to_string(), new.to_string());
                        Ok(b"1".to_vec())
                    } else {
                        Ok(b"0".to_vec())
                    }
                }
                None => Err(ApplyError(format!("bad cas {text:?}"))),
            },
            _ => Err(ApplyError(format!("unknown command {text:?}"))),
        }
    }

    fn snapshot(&self) -> Vec<u8> {
        let v = self.0.lock().expect("kv lock");
        serde_json::to_vec(&(v.applied, &v.map)).expect("encode kv")
    }

    fn restore(&mut self, data: &[u8]) -> Result<(), ApplyError> {
        let (applied, map): (u64, BTreeMap<String, String>) =
            serde_json::from_slice(data).map_err(|e| ApplyError(e.to_string()))?;
        let mut v = self.0.lock().expect("kv lock");
        v.map = map;
        v.applied = applied;
        v.restored.push(applied);
        Ok(())
    }
}

/// A directory for node data under the system temp dir, removed on drop.
pub fn temp_dir(name: &str) -> TempDir {
    tessera_testkit::temp_dir(&format!("raft-{name}"))
}

/// Fast timing for tests: 20 ms ticks, so an election takes 200-400 ms.
pub fn test_config(id: u64) -> RaftConfig {
    let mut c = RaftConfig::new(id);
    c.tick_interval = Duration::from_millis(20);
    c.proposal_timeout = Duration::from_secs(2);
    c
}

/// An in-process cluster.
pub struct Cluster {
    pub net: MemNetwork,
    pub dir: TempDir,
    pub handles: BTreeMap<u64, RaftHandle>,
    /// Each node's state machine view, replaced at every start (so the view of a crashed
    /// incarnation is frozen, and a read through its handle never sees the next one's state).
    pub views: BTreeMap<u64, Arc<Mutex<KvView>>>,
    /// Each node's failpoints, kept across restarts.
    pub failpoints: BTreeMap<u64, Failpoints>,
    pub snapshot_interval: u64,
    /// What the nodes replicate (set before the first start).
    pub machine: Machine,
}

impl Cluster {
    /// An empty cluster (no node started).
    pub fn empty(name: &str, seed: u64) -> Self {
        // RUST_LOG=raft=debug shows raft-rs's own log.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        Cluster {
            net: MemNetwork::new(seed),
            dir: temp_dir(name),
            handles: BTreeMap::new(),
            views: BTreeMap::new(),
            failpoints: BTreeMap::new(),
            snapshot_interval: 1000,
            machine: Machine::Kv,
        }
    }

    /// Starts voters `ids`, bootstrapped together.
    pub fn new(name: &str, ids: &[u64], seed: u64) -> Self {
        let mut c = Cluster::empty(name, seed);
        let peers: BTreeMap<u64, String> = ids.iter().map(|i| (*i, format!("mem:{i}"))).collect();
        for id in ids {
            c.start(*id, Some(peers.clone()));
        }
        c
    }

    /// Starts (or restarts) node `id` on its data directory.
    pub fn start(&mut self, id: u64, bootstrap: Option<BTreeMap<u64, String>>) {
        let storage =
            RedbStorage::open(self.dir.path().join(format!("node{id}"))).expect("open storage");
        // The state machine restarts empty (the node restores it from disk); what it applied
        // before is kept, to compare re-applications.
        let view = match self.views.get(&id) {
            Some(old) => {
                let old = old.lock().expect("kv lock");
                KvView {
                    record: old.record.clone(),
                    conflicts: old.conflicts.clone(),
                    restored: old.restored.clone(),
                    ..KvView::default()
                }
            }
            None => KvView::default(),
        };
        let view = Arc::new(Mutex::new(view));
        self.views.insert(id, view.clone());
        let mut config = test_config(id);
        config.snapshot_interval = self.snapshot_interval;
        config.failpoints = Some(self.failpoints.entry(id).or_default().clone());
        let transport = self.net.transport(id);
        let handle = match self.machine {
            Machine::Kv => RaftNode::start(config, storage, Kv(view), transport, bootstrap),
            Machine::Cluster => {
                RaftNode::start(config, storage, Projected::new(view), transport, bootstrap)
            }
        }
        .expect("start node");
        self.net.register(handle.clone());
        self.handles.insert(id, handle);
    }

    /// Stops node `id` as a crash would: it gets no more messages, its thread ends and its
    /// file is closed. Also cleans up after a node that crashed at a failpoint by itself.
    pub async fn crash(&mut self, id: u64) {
        self.net.unregister(id);
        if let Some(h) = self.handles.remove(&id) {
            h.shutdown().await;
        }
    }

    /// The current leader among the running nodes once exactly one claims the highest term,
    /// waiting up to `timeout`.
    pub async fn leader(&self, timeout: Duration) -> u64 {
        self.leader_among(&self.handles.keys().copied().collect::<Vec<_>>(), timeout)
            .await
    }

    pub async fn leader_among(&self, ids: &[u64], timeout: Duration) -> u64 {
        let deadline = Instant::now() + timeout;
        loop {
            let leaders: Vec<(u64, u64)> = ids
                .iter()
                .filter_map(|i| self.handles.get(i))
                .map(|h| h.status())
                .filter(|s| s.role == RaftRole::Leader)
                .map(|s| (s.term, s.id))
                .collect();
            if let Some(&(term, id)) = leaders.iter().max() {
                let followers_agree = ids
                    .iter()
                    .filter_map(|i| self.handles.get(i))
                    .filter(|h| h.id() != id)
                    .all(|h| h.status().leader == Some(id) && h.status().term == term);
                if followers_agree {
                    return id;
                }
            }
            assert!(
                Instant::now() < deadline,
                "no leader among {ids:?} within {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Proposes through whichever node leads, retrying until `timeout`.
    pub async fn propose(&self, cmd: &str, timeout: Duration) -> Result<Vec<u8>, RaftError> {
        let deadline = Instant::now() + timeout;
        loop {
            let leader = self
                .handles
                .values()
                .map(|h| h.status())
                .filter(|s| s.running && s.role == RaftRole::Leader)
                .max_by_key(|s| s.term)
                .map(|s| s.id);
            let r = match leader.and_then(|l| self.handles.get(&l)) {
                Some(h) => h.propose(cmd.as_bytes().to_vec()).await,
                None => Err(RaftError::NotLeader { leader: None }),
            };
            match r {
                Ok(v) => return Ok(v),
                Err(e @ RaftError::Rejected(_)) => return Err(e),
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }

    /// Waits until every node in `ids` has applied at least `index`.
    pub async fn wait_applied(&self, ids: &[u64], index: u64, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !ids.iter().all(|i| self.view(*i).applied >= index) {
            let got: Vec<u64> = ids.iter().map(|i| self.view(*i).applied).collect();
            assert!(
                Instant::now() < deadline,
                "nodes {ids:?} applied {got:?}, want {index}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// A copy of node `id`'s map, applied index and restores.
    pub fn view(&self, id: u64) -> KvView {
        let v = self.views[&id].lock().expect("kv lock");
        KvView {
            map: v.map.clone(),
            applied: v.applied,
            record: v.record.clone(),
            conflicts: v.conflicts.clone(),
            restored: v.restored.clone(),
        }
    }

    /// Asserts that no two nodes ever applied different commands at the same index, and that
    /// no node re-applied an index differently.
    pub fn assert_no_divergence(&self) {
        let mut first: BTreeMap<u64, (u64, Vec<u8>)> = BTreeMap::new();
        for (id, view) in &self.views {
            let v = view.lock().expect("kv lock");
            assert!(
                v.conflicts.is_empty(),
                "node {id} re-applied differently: {:?}",
                v.conflicts
            );
            for (index, data) in &v.record {
                match first.get(index) {
                    Some((other, d)) => assert_eq!(
                        d, data,
                        "nodes {other} and {id} applied different commands at {index}"
                    ),
                    None => {
                        first.insert(*index, (*id, data.clone()));
                    }
                }
            }
        }
    }

    /// Asserts that nodes `ids` have the same applied index and map.
    pub async fn assert_converged(&self, ids: &[u64], timeout: Duration) {
        let target = ids
            .iter()
            .map(|i| self.handles[i].status().commit)
            .max()
            .unwrap_or(0);
        // Raft's applied index, not the state machine's: a leader elected after the last
        // command commits an empty entry that never reaches the state machine, so the view's
        // index can stay one short of `target` for good (seen under CI load: applied 2013 on
        // every node, commit 2014).
        let deadline = Instant::now() + timeout;
        let raft_applied = |i: &u64| self.handles[i].status().applied;
        while !ids.iter().all(|i| raft_applied(i) >= target) {
            let got: Vec<u64> = ids.iter().map(raft_applied).collect();
            assert!(
                Instant::now() < deadline,
                "nodes {ids:?} applied {got:?} (Raft), want {target}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        loop {
            let maps: Vec<_> = ids.iter().map(|i| self.view(*i).map).collect();
            if maps.windows(2).all(|w| w[0] == w[1]) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "maps of {ids:?} differ: {maps:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Nodes whose loop stopped by itself (a failpoint fired) and are not yet cleaned up.
    pub fn stopped(&self) -> Vec<u64> {
        self.handles
            .iter()
            .filter(|(_, h)| !h.status().running)
            .map(|(id, _)| *id)
            .collect()
    }

    pub async fn shutdown(mut self) {
        for id in self.handles.keys().copied().collect::<Vec<_>>() {
            self.crash(id).await;
        }
    }
}
