//! Sending Raft messages to peers: the [`Transport`] seam, the per-peer queues every
//! implementation shares, and [`MemNetwork`], an in-memory network for tests with partitions,
//! message loss and delay.
//!
//! Raft tolerates lost, duplicated and reordered messages, so sending never blocks and never
//! fails: each peer has one sender task fed by a bounded queue, and a message that finds the
//! queue full (a slow or dead peer) is dropped. Raft retries on its own schedule.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use raft::eraftpb::Message;
use tokio::sync::mpsc;

use super::RaftHandle;

/// Sends Raft messages to peers. Called from the node's thread; must never block.
pub trait Transport: Send + Sync + 'static {
    /// Queues `msg` for node `msg.to`. Drops it when that peer's queue is full or the peer is
    /// unknown.
    fn send(&self, msg: Message);

    /// Learns (`Some`) or forgets (`None`) the address of peer `id`, from an applied
    /// membership change or a snapshot. Transports that need no addresses ignore it.
    fn set_peer(&self, id: u64, address: Option<&str>) {
        let _ = (id, address);
    }
}

/// Queue length per peer. At a 100 ms tick this covers seconds of heartbeats and appends.
pub(super) const PEER_QUEUE: usize = 1024;

/// One bounded queue and sender task per peer.
pub(super) struct PeerQueues {
    runtime: tokio::runtime::Handle,
    queues: Mutex<HashMap<u64, mpsc::Sender<Message>>>,
}

impl PeerQueues {
    /// Queues owned by tasks on the current runtime.
    ///
    /// # Panics
    /// Outside a Tokio runtime.
    pub(super) fn new() -> Self {
        PeerQueues {
            runtime: tokio::runtime::Handle::current(),
            queues: Mutex::new(HashMap::new()),
        }
    }

    /// Queues `msg` for `msg.to`, starting that peer's sender task (from `spawn`, which gets the
    /// queue's receiving end) on first use.
    pub(super) fn push<F, Fut>(&self, msg: Message, spawn: F)
    where
        F: FnOnce(mpsc::Receiver<Message>) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let to = msg.to;
        let mut queues = self.queues.lock().unwrap_or_else(PoisonError::into_inner);
        let tx = queues.entry(to).or_insert_with(|| {
            let (tx, rx) = mpsc::channel(PEER_QUEUE);
            self.runtime.spawn(spawn(rx));
            tx
        });
        match tx.try_send(msg) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::debug!(to, "raft peer queue full; message dropped");
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                // The sender task ended (runtime shutting down); start afresh next time.
                queues.remove(&to);
            }
        }
    }

    /// Drops peer `id`'s queue; its task ends once the queue is drained.
    pub(super) fn remove(&self, id: u64) {
        self.queues
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&id);
    }
}

/// Fault settings and membership of a [`MemNetwork`].
#[derive(Default)]
struct NetState {
    nodes: HashMap<u64, RaftHandle>,
    /// When set, messages only flow between nodes of the same group.
    groups: Option<Vec<HashSet<u64>>>,
    /// Probability in [0, 1] that a message is dropped.
    loss: f64,
    /// Each message is delayed uniformly in this range (zero: delivered at once).
    delay: (Duration, Duration),
    /// xorshift state for loss and delay, so a seeded run is reproducible up to scheduling.
    rng: u64,
    /// Messages delivered and dropped, for tests.
    delivered: u64,
    dropped: u64,
}

impl NetState {
    fn next_f64(&mut self) -> f64 {
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        (x >> 11) as f64 / (1u64 << 53) as f64
    }

    fn connected(&self, a: u64, b: u64) -> bool {
        match &self.groups {
            None => true,
            Some(groups) => groups.iter().any(|g| g.contains(&a) && g.contains(&b)),
        }
    }
}

/// An in-memory network of Raft nodes for tests: nodes register their handle, get a
/// [`MemTransport`], and the test cuts links, loses and delays messages at will.
#[derive(Clone)]
pub struct MemNetwork {
    state: Arc<Mutex<NetState>>,
}

impl MemNetwork {
    /// A fully connected, lossless, instant network; `seed` drives loss and delay.
    pub fn new(seed: u64) -> Self {
        let state = NetState {
            rng: seed | 1,
            ..NetState::default()
        };
        MemNetwork {
            state: Arc::new(Mutex::new(state)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, NetState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The transport for node `id`.
    ///
    /// # Panics
    /// Outside a Tokio runtime.
    pub fn transport(&self, id: u64) -> Arc<MemTransport> {
        Arc::new(MemTransport {
            id,
            net: self.clone(),
            queues: PeerQueues::new(),
        })
    }

    /// Delivers messages for `handle.id()` to it from now on.
    pub fn register(&self, handle: RaftHandle) {
        self.lock().nodes.insert(handle.id(), handle);
    }

    /// Stops delivering to node `id` (it crashed).
    pub fn unregister(&self, id: u64) {
        self.lock().nodes.remove(&id);
    }

    /// Splits the network: messages only flow within a group; nodes in no group are cut off.
    pub fn partition(&self, groups: &[&[u64]]) {
        self.lock().groups = Some(groups.iter().map(|g| g.iter().copied().collect()).collect());
    }

    /// Cuts node `id` off from every other node.
    pub fn isolate(&self, id: u64) {
        let mut s = self.lock();
        let others: HashSet<u64> = s.nodes.keys().copied().filter(|n| *n != id).collect();
        s.groups = Some(vec![HashSet::from([id]), others]);
    }

    /// Heals every partition.
    pub fn heal(&self) {
        self.lock().groups = None;
    }

    /// Drops each message with probability `p` (clamped to [0, 1]).
    pub fn set_loss(&self, p: f64) {
        self.lock().loss = p.clamp(0.0, 1.0);
    }

    /// Delays each message uniformly within `min..=max` (messages may overtake each other).
    pub fn set_delay(&self, min: Duration, max: Duration) {
        self.lock().delay = (min, max.max(min));
    }

    /// Messages delivered and dropped so far.
    pub fn counts(&self) -> (u64, u64) {
        let s = self.lock();
        (s.delivered, s.dropped)
    }

    /// Applies the faults to one message and delivers it (now or after its delay).
    fn deliver(&self, msg: Message) {
        let (target, delay) = {
            let mut s = self.lock();
            let lost = s.loss > 0.0 && s.next_f64() < s.loss;
            let target = match s.nodes.get(&msg.to) {
                Some(h) if !lost && s.connected(msg.from, msg.to) => h.clone(),
                _ => {
                    s.dropped += 1;
                    return;
                }
            };
            s.delivered += 1;
            let (min, max) = s.delay;
            let delay = min + (max - min).mul_f64(s.next_f64());
            (target, delay)
        };
        if delay.is_zero() {
            let _ = target.step(msg);
        } else {
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let _ = target.step(msg);
            });
        }
    }
}

/// Node `id`'s side of a [`MemNetwork`].
pub struct MemTransport {
    id: u64,
    net: MemNetwork,
    queues: PeerQueues,
}

impl Transport for MemTransport {
    fn send(&self, msg: Message) {
        debug_assert_eq!(msg.from, self.id, "messages leave from their own node");
        let net = self.net.clone();
        self.queues.push(msg, move |mut rx| async move {
            while let Some(m) = rx.recv().await {
                net.deliver(m);
            }
        });
    }

    fn set_peer(&self, id: u64, address: Option<&str>) {
        if address.is_none() {
            self.queues.remove(id);
        }
    }
}
