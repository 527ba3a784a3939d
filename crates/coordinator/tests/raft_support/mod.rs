//! Shared harness for the Raft tests: a small key-value state machine that records what it
//! applies, and an in-process cluster of Raft nodes on redb files over a `MemNetwork`.

#![allow(dead_code, missing_docs)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tessera_coordinator::raft::{
    ApplyError, MemNetwork, RaftConfig, RaftError, RaftHandle, RaftNode, RaftRole, RedbStorage,
    StateMachine,
};

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

/// A key-value store: command `set <key> <value>` answers the previous value; `fail` is
/// refused.
pub struct Kv(pub Arc<Mutex<KvView>>);

impl StateMachine for Kv {
    fn apply(&mut self, index: u64, data: &[u8]) -> Result<Vec<u8>, ApplyError> {
        let mut v = self.0.lock().expect("kv lock");
        if let Some(prev) = v.record.insert(index, data.to_vec())
            && prev != data
        {
            v.conflicts
                .push(format!("index {index}: {prev:?} then {data:?}"));
        }
        v.applied = index;
        let text = std::str::from_utf8(data).map_err(|e| ApplyError(e.to_string()))?;
        let mut parts = text.splitn(3, ' ');
        match (parts.next(), parts.next(), parts.next()) {
            (Some("set"), Some(k), Some(val)) => {
                let prev = v.map.insert(k.to_string(), val.to_string());
                Ok(prev.unwrap_or_default().into_bytes())
            }
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

/// A directory under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let p = std::env::temp_dir().join(format!(
            "tessera-raft-{name}-{}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
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
    pub views: BTreeMap<u64, Arc<Mutex<KvView>>>,
    pub snapshot_interval: u64,
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
            dir: TempDir::new(name),
            handles: BTreeMap::new(),
            views: BTreeMap::new(),
            snapshot_interval: 1000,
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
            RedbStorage::open(self.dir.0.join(format!("node{id}"))).expect("open storage");
        let view = self.views.entry(id).or_default().clone();
        {
            // The state machine restarts empty; the node restores it from disk.
            let mut v = view.lock().expect("kv lock");
            v.map.clear();
            v.applied = 0;
        }
        let mut config = test_config(id);
        config.snapshot_interval = self.snapshot_interval;
        let handle = RaftNode::start(config, storage, Kv(view), self.net.transport(id), bootstrap)
            .expect("start node");
        self.net.register(handle.clone());
        self.handles.insert(id, handle);
    }

    /// Stops node `id` as a crash would: it gets no more messages, its thread ends and its
    /// file is closed.
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
                .filter(|s| s.role == RaftRole::Leader)
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
        self.wait_applied(ids, target, timeout).await;
        let deadline = Instant::now() + timeout;
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

    pub async fn shutdown(mut self) {
        for id in self.handles.keys().copied().collect::<Vec<_>>() {
            self.crash(id).await;
        }
    }
}
