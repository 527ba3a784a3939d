//! The prefix index: which full prompt blocks the workers hold cached, how many running
//! sequences use each, and which to evict first (least recently used, leaves first).
//!
//! The scheduler owns one index per pipeline stream (per plan epoch and leader) and is the
//! only one deciding: every worker's prefix store mirrors this index because the scheduler
//! sends each insertion and eviction to every stage in band (`StepRequest.prefix_ops`). This
//! module is pure bookkeeping — no I/O, no wire types — so it can be tested on its own.
//!
//! Blocks form chains: a block's hash covers its `block_size` token ids *and* its parent's
//! hash ([`block_hash`]), so a hash names a whole prefix and equal hashes mean equal prefixes
//! at equal positions. Each entry also keeps its tokens and parent, and a lookup compares
//! them, so even a 64-bit hash collision is a miss, never a wrong hit.
//!
//! Invariants (checked by the tests): an entry's parent is in the index (chains are closed
//! under prefixes); a running sequence holds a reference on every block of its chain, so a
//! referenced block's ancestors are referenced too; only unreferenced leaves are evicted, so
//! eviction never breaks a chain and every unreferenced entry is evictable eventually.

use std::collections::{BTreeSet, HashMap};

use sha2::{Digest, Sha256};

/// The hash of a full block of `tokens` following the block hashed `parent` (`None` for a
/// prompt's first block): SHA-256 over a domain tag, the parent and the token ids (all
/// little-endian), truncated to 64 bits. Deterministic across processes and versions.
pub fn block_hash(parent: Option<u64>, tokens: &[u32]) -> u64 {
    let mut h = Sha256::new();
    h.update(b"tessera.prefix.v1");
    match parent {
        Some(p) => {
            h.update([1]);
            h.update(p.to_le_bytes());
        }
        None => h.update([0]),
    }
    for t in tokens {
        h.update(t.to_le_bytes());
    }
    let digest = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_le_bytes(first)
}

/// One cached block.
#[derive(Debug)]
struct Entry {
    parent: Option<u64>,
    tokens: Box<[u32]>,
    /// Cached blocks whose parent this is.
    children: u32,
    /// Running sequences whose chain holds this block.
    refs: u32,
    /// The index's clock when it was last acquired, released or inserted.
    last_used: u64,
}

impl Entry {
    fn evictable(&self) -> bool {
        self.refs == 0 && self.children == 0
    }
}

/// The cached blocks of one pipeline stream.
#[derive(Debug)]
pub struct PrefixIndex {
    block_size: usize,
    entries: HashMap<u64, Entry>,
    /// The evictable entries (unreferenced leaves) by `(last_used, hash)`: LRU order.
    lru: BTreeSet<(u64, u64)>,
    /// Entries with no reference (each evictable now or once its descendants go).
    unreferenced: usize,
    clock: u64,
}

/// How one block of a prompt stands in the index.
enum Lookup {
    /// Cached with these very tokens after this very parent.
    Hit,
    /// Not cached.
    Miss,
    /// Another prefix has this hash (a 64-bit collision): neither usable nor insertable.
    Collision,
}

impl PrefixIndex {
    /// An empty index for blocks of `block_size` tokens (at least 1).
    pub fn new(block_size: usize) -> Self {
        Self {
            block_size: block_size.max(1),
            entries: HashMap::new(),
            lru: BTreeSet::new(),
            unreferenced: 0,
            clock: 0,
        }
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Blocks cached (each holds one KV block on every worker).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Cached blocks no running sequence uses: how many [`PrefixIndex::evict`] can free.
    pub fn evictable(&self) -> usize {
        self.unreferenced
    }

    /// Drops every entry (a new pipeline stream starts with empty stores).
    pub fn clear(&mut self) {
        self.entries.clear();
        self.lru.clear();
        self.unreferenced = 0;
    }

    /// The hashes of `prompt`'s first `blocks` full blocks (fewer when the prompt is shorter),
    /// each with how it stands in the index.
    fn walk<'a>(
        &'a self,
        prompt: &'a [u32],
        blocks: usize,
    ) -> impl Iterator<Item = (u64, Option<u64>, &'a [u32], Lookup)> + 'a {
        let mut parent = None;
        prompt
            .chunks_exact(self.block_size)
            .take(blocks)
            .map(move |tokens| {
                let hash = block_hash(parent, tokens);
                let lookup = match self.entries.get(&hash) {
                    Some(e) if e.parent == parent && *e.tokens == *tokens => Lookup::Hit,
                    Some(_) => Lookup::Collision,
                    None => Lookup::Miss,
                };
                let at = (hash, parent, tokens, lookup);
                parent = Some(hash);
                at
            })
    }

    /// Changes entry `hash` with `f`, keeping the LRU set and the unreferenced count in step.
    fn update(&mut self, hash: u64, f: impl FnOnce(&mut Entry)) {
        let Some(e) = self.entries.get_mut(&hash) else {
            return;
        };
        let (was_free, was_evictable) = (e.refs == 0, e.evictable());
        if was_evictable {
            self.lru.remove(&(e.last_used, hash));
        }
        f(e);
        if e.evictable() {
            self.lru.insert((e.last_used, hash));
        }
        match (was_free, e.refs == 0) {
            (true, false) => self.unreferenced -= 1,
            (false, true) => self.unreferenced += 1,
            _ => {}
        }
    }

    /// The longest chain of cached blocks `prompt` starts with, leaving at least one prompt
    /// token to compute (the last prompt token's logits are what the first sample needs):
    /// at most `(prompt.len() - 1) / block_size` blocks. Each block of the chain gains a
    /// reference (not evictable until [`PrefixIndex::release`]) and counts as used now.
    pub fn acquire(&mut self, prompt: &[u32]) -> Vec<u64> {
        let cap = prompt.len().saturating_sub(1) / self.block_size;
        let chain: Vec<u64> = self
            .walk(prompt, cap)
            .take_while(|(.., l)| matches!(l, Lookup::Hit))
            .map(|(h, ..)| h)
            .collect();
        self.clock += 1;
        let now = self.clock;
        for &h in &chain {
            self.update(h, |e| {
                e.refs += 1;
                e.last_used = now;
            });
        }
        chain
    }

    /// Gives up the references [`PrefixIndex::acquire`] took for `chain`; its blocks count
    /// as used now.
    pub fn release(&mut self, chain: &[u64]) {
        self.clock += 1;
        let now = self.clock;
        for &h in chain {
            self.update(h, |e| {
                e.refs = e.refs.saturating_sub(1);
                e.last_used = now;
            });
        }
    }

    /// Caches `prompt`'s first `blocks` full blocks (whose K/V a sequence has computed) that
    /// are not cached yet; returns `(first block index, their hashes)` for the workers'
    /// retain op, or `None` when there is nothing new. The new blocks are unreferenced and
    /// count as used now; a hash collision stops the insertion there.
    pub fn insert(&mut self, prompt: &[u32], blocks: usize) -> Option<(usize, Vec<u64>)> {
        let mut first = None;
        let mut fresh = Vec::new();
        let mut missing = Vec::new();
        for (i, (hash, parent, tokens, lookup)) in self.walk(prompt, blocks).enumerate() {
            match lookup {
                Lookup::Hit if first.is_none() => fresh.push(hash),
                // A cached block after a missing one cannot exist (chains are prefix-closed):
                // the walk's hashes depend on their parents, so it is a collision in effect.
                Lookup::Hit | Lookup::Collision => break,
                Lookup::Miss => {
                    first.get_or_insert(i);
                    missing.push((hash, parent, tokens.to_vec().into_boxed_slice()));
                }
            }
        }
        self.clock += 1;
        let now = self.clock;
        for h in fresh {
            self.update(h, |e| e.last_used = now);
        }
        let first = first?;
        let mut hashes = Vec::with_capacity(missing.len());
        for (hash, parent, tokens) in missing {
            if let Some(p) = parent {
                self.update(p, |e| e.children += 1);
            }
            self.entries.insert(
                hash,
                Entry {
                    parent,
                    tokens,
                    children: 0,
                    refs: 0,
                    last_used: now,
                },
            );
            self.lru.insert((now, hash));
            self.unreferenced += 1;
            hashes.push(hash);
        }
        Some((first, hashes))
    }

    /// Evicts up to `n` unreferenced blocks, least recently used first and always a leaf (a
    /// block no cached block follows), so chains stay whole; returns their hashes in eviction
    /// order. Referenced blocks are never evicted.
    pub fn evict(&mut self, n: usize) -> Vec<u64> {
        let mut out = Vec::with_capacity(n.min(self.unreferenced));
        while out.len() < n {
            let Some((_, hash)) = self.lru.pop_first() else {
                break;
            };
            let Some(e) = self.entries.remove(&hash) else {
                continue;
            };
            self.unreferenced -= 1;
            if let Some(p) = e.parent {
                self.update(p, |pe| pe.children -= 1);
            }
            out.push(hash);
        }
        out
    }
}

#[cfg(test)]
#[path = "prefix_tests.rs"]
mod tests;
