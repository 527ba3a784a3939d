//! The per-sequence sampler: logits in, one token id (and optional logprobs) out.
//!
//! Processing order, as llama.cpp's default chain (minus the processors we do not offer):
//!
//! 1. **penalties** on the logits: repetition (HF/CTRL, over prompt + generated), then frequency
//!    and presence (OpenAI, over generated tokens only);
//! 2. **top-k**: keep the `k` largest logits;
//! 3. **top-p**: keep the shortest most-likely prefix whose softmax mass (temperature 1, over the
//!    tokens still kept) reaches `p`;
//! 4. **min-p**: keep tokens whose probability is at least `min_p` times the largest;
//! 5. **temperature**: divide the kept logits by `T`;
//! 6. **draw** from their softmax with the seeded [`Rng`].
//!
//! Temperature 0 is greedy: argmax of the penalized logits, ties to the lowest id (every
//! truncation keeps the argmax, so steps 2–4 cannot change it).
//!
//! Determinism: for a given seed and logits the result depends only on this file. The kept set
//! is listed either in id order (no truncation, or min-p alone) or sorted by (logit descending,
//! id ascending), a total order, so the unstable selection used to find it cannot leak its
//! internal order into the draw.
//!
//! Allocation: scratch buffers live in the [`Sampler`] and are sized on the first call; later
//! calls do not allocate, except the returned `top_logprobs` vector when asked for, and the rare
//! amortized growth of the list of distinct seen tokens.

use std::cmp::Ordering;

use super::params::ValidSamplingParams;
use super::rng::Rng;

/// One sampled token.
#[derive(Clone, Debug, PartialEq)]
pub struct SampledToken {
    /// The chosen token id.
    pub id: u32,
    /// Its log-probability under the raw logits (log-softmax before penalties and temperature,
    /// as OpenAI reports it); `Some` only when `logprobs` was asked for.
    pub logprob: Option<f32>,
    /// The `top_logprobs` most likely tokens under the raw logits with their log-probabilities,
    /// most likely first (ties to the lowest id); empty when not asked for.
    pub top_logprobs: Vec<(u32, f32)>,
}

/// Bit of [`Sampler::seen`] marking a token present in prompt or output (for the repetition
/// penalty); the low bits count how often it was generated (frequency/presence penalties).
const SEEN_BIT: u32 = 1 << 31;
const COUNT_MASK: u32 = SEEN_BIT - 1;

/// The first top-p window; it grows ×4 until it holds the nucleus. Most nuclei of a peaked LM
/// distribution fit in a few hundred tokens, so this avoids sorting the whole vocabulary.
const TOP_P_FIRST_WINDOW: usize = 64;

/// Up to this many ids, top-k and top-p windows use a heap scan ([`top_m_sorted`]); beyond it,
/// selection (`select_nth_unstable_by`) over the whole candidate list is cheaper.
const HEAP_SCAN_MAX: usize = 1024;

/// Samples one sequence's tokens; holds its penalty state, RNG and scratch buffers.
#[derive(Clone, Debug)]
pub struct Sampler {
    params: ValidSamplingParams,
    rng: Rng,
    seed: u64,
    /// Per token id: [`SEEN_BIT`] | generated count. Empty when no penalty is active.
    seen: Vec<u32>,
    /// The distinct ids with a nonzero `seen` entry, so penalties cost O(distinct) per step.
    touched: Vec<u32>,
    /// Candidate ids (scratch).
    idx: Vec<u32>,
    /// Candidate weights (scratch).
    weights: Vec<f64>,
    /// Heap scan results for top-k / top-p windows (scratch).
    heap: Vec<u32>,
    /// A copy of the raw logits when logprobs are asked for (scratch).
    raw: Vec<f32>,
}

impl Sampler {
    /// A sampler for one sequence whose prompt is `prompt` (counted by the repetition penalty;
    /// ids outside the vocabulary are ignored).
    ///
    /// The seed is `params.seed`, or a fresh one from [`Rng::entropy_seed`]; see [`Self::seed`].
    pub fn new(params: ValidSamplingParams, prompt: &[u32]) -> Self {
        let seed = params.params.seed.unwrap_or_else(Rng::entropy_seed);
        let p = &params.params;
        let penalties =
            p.repetition_penalty != 1.0 || p.frequency_penalty != 0.0 || p.presence_penalty != 0.0;
        let mut s = Self {
            rng: Rng::seed_from_u64(seed),
            seed,
            seen: Vec::new(),
            touched: Vec::new(),
            idx: Vec::new(),
            weights: Vec::new(),
            heap: Vec::new(),
            raw: Vec::new(),
            params,
        };
        if penalties {
            let vocab = s.params.vocab_size;
            s.seen = vec![0; vocab];
            s.touched.reserve(prompt.len().min(vocab) + 256);
            for &t in prompt {
                s.mark_seen(t);
            }
        }
        s
    }

    /// A sampler that continues a sequence after `generated`, the tokens it already produced
    /// elsewhere (on a worker that died, before the coordinator replayed the sequence here):
    /// the same state [`Self::new`] reaches after sampling exactly those tokens — the penalties
    /// count them, and the generator is where those samples left it. That rests on one
    /// invariant of [`Self::sample`]: with temperature > 0 every sample takes exactly one
    /// number from the generator (the degenerate fallback to argmax included), and greedy
    /// samples take none.
    pub fn resume(params: ValidSamplingParams, prompt: &[u32], generated: &[u32]) -> Self {
        let mut s = Self::new(params, prompt);
        let draws = s.params.params.temperature != 0.0;
        for &id in generated {
            s.record(id);
            if draws {
                s.rng.next_f64();
            }
        }
        s
    }

    /// The seed this sampler's draws come from (the request's, or the one drawn for it).
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Picks the next token from raw `logits` (length = the vocabulary size validated for; the
    /// slice is used as scratch and left modified) and records it for the penalties.
    ///
    /// # Panics
    /// If `logits.len()` differs from the validated vocabulary size (a caller bug, not user input).
    pub fn sample(&mut self, logits: &mut [f32]) -> SampledToken {
        assert_eq!(
            logits.len(),
            self.params.vocab_size,
            "logits length must equal the validated vocabulary size"
        );
        let (want_lp, n_top) = (self.params.params.logprobs, self.params.params.top_logprobs);
        if want_lp || n_top > 0 {
            self.raw.clear();
            self.raw.extend_from_slice(logits);
        }
        self.apply_penalties(logits);
        let id = if self.params.params.temperature == 0.0 {
            argmax(logits)
        } else {
            self.sample_random(logits)
        };
        self.record(id);

        let mut out = SampledToken {
            id,
            logprob: None,
            top_logprobs: Vec::new(),
        };
        if want_lp || n_top > 0 {
            let lse = log_sum_exp(&self.raw);
            if want_lp {
                out.logprob = Some((f64::from(self.raw[id as usize]) - lse) as f32);
            }
            if n_top > 0 {
                out.top_logprobs = top_n(&self.raw, n_top as usize);
                for (_, l) in &mut out.top_logprobs {
                    *l = (f64::from(*l) - lse) as f32;
                }
            }
        }
        out
    }

    /// Marks `id` as seen (prompt or output) for the repetition penalty.
    fn mark_seen(&mut self, id: u32) {
        if let Some(e) = self.seen.get_mut(id as usize) {
            if *e == 0 {
                self.touched.push(id);
            }
            *e |= SEEN_BIT;
        }
    }

    /// Records a generated token.
    fn record(&mut self, id: u32) {
        if self.seen.is_empty() {
            return;
        }
        self.mark_seen(id);
        if let Some(e) = self.seen.get_mut(id as usize) {
            let count = (*e & COUNT_MASK).saturating_add(1).min(COUNT_MASK);
            *e = SEEN_BIT | count;
        }
    }

    /// Penalties, in llama.cpp's order: repetition first, then frequency and presence.
    fn apply_penalties(&self, logits: &mut [f32]) {
        let p = &self.params.params;
        for &t in &self.touched {
            let e = self.seen[t as usize];
            let l = &mut logits[t as usize];
            if e & SEEN_BIT != 0 && p.repetition_penalty != 1.0 {
                // CTRL: push the logit towards "less likely" whatever its sign.
                if *l > 0.0 {
                    *l /= p.repetition_penalty;
                } else {
                    *l *= p.repetition_penalty;
                }
            }
            let count = e & COUNT_MASK;
            if count > 0 {
                *l -= count as f32 * p.frequency_penalty + p.presence_penalty;
            }
        }
    }

    /// Steps 2–6 of the chain on penalized logits; returns the drawn id.
    fn sample_random(&mut self, logits: &[f32]) -> u32 {
        let n = self.truncate(logits);
        self.draw(logits, n)
    }

    /// Steps 2–4 (top-k, top-p, min-p): leaves the kept ids in `self.idx[..n]` and returns `n`
    /// (at least 1). The kept ids are in id order when nothing sorted them, otherwise by
    /// (logit descending, id ascending).
    fn truncate(&mut self, logits: &[f32]) -> usize {
        let p = &self.params.params;
        let vocab = logits.len();
        let idx = &mut self.idx;
        idx.clear();
        idx.extend(0..vocab as u32);
        let by_logit_desc = |a: &u32, b: &u32| -> Ordering {
            logits[*b as usize]
                .total_cmp(&logits[*a as usize])
                .then(a.cmp(b))
        };
        let mut n = vocab;
        let mut sorted = false;

        // 2. top-k.
        let k = p.top_k as usize;
        if k > 0 && k < n {
            if k <= HEAP_SCAN_MAX {
                top_m_sorted(logits, k, &mut self.heap);
                idx[..k].copy_from_slice(&self.heap);
            } else {
                idx.select_nth_unstable_by(k - 1, by_logit_desc);
                idx[..k].sort_unstable_by(by_logit_desc);
            }
            n = k;
            sorted = true;
        }

        // 3. top-p, over the softmax (temperature 1) of the tokens still kept.
        if p.top_p < 1.0 && n > 1 {
            let max = idx[..n]
                .iter()
                .map(|&t| logits[t as usize])
                .fold(f32::NEG_INFINITY, f32::max);
            let z: f64 = idx[..n]
                .iter()
                .map(|&t| f64::from((logits[t as usize] - max).exp()))
                .sum();
            let target = f64::from(p.top_p) * z;
            let mut window = if sorted { n } else { TOP_P_FIRST_WINDOW.min(n) };
            loop {
                // While `idx` is still the whole vocabulary in id order, small windows come from
                // a heap scan into `self.heap`; larger ones sort a selected prefix of `idx`.
                let from_heap = !sorted && window <= HEAP_SCAN_MAX && n == vocab;
                if from_heap {
                    top_m_sorted(logits, window, &mut self.heap);
                } else if !sorted {
                    if window < n {
                        idx[..n].select_nth_unstable_by(window - 1, by_logit_desc);
                    }
                    idx[..window].sort_unstable_by(by_logit_desc);
                }
                let ranked: &[u32] = if from_heap {
                    &self.heap
                } else {
                    &idx[..window]
                };
                let mut cum = 0.0f64;
                let mut cut = None;
                for (i, &t) in ranked.iter().enumerate() {
                    cum += f64::from((logits[t as usize] - max).exp());
                    if cum >= target {
                        cut = Some(i + 1);
                        break;
                    }
                }
                if let Some(c) = cut {
                    if from_heap {
                        idx[..c].copy_from_slice(&self.heap[..c]);
                    }
                    n = c;
                    break;
                }
                if window == n {
                    if from_heap {
                        idx[..n].copy_from_slice(&self.heap);
                    }
                    // Rounding kept the sum just below p: keep everything.
                    break;
                }
                window = (window * 4).min(n);
            }
            sorted = true;
        }

        // 4. min-p: p_i >= min_p * p_max  <=>  l_i - l_max >= ln(min_p).
        if p.min_p > 0.0 && n > 1 {
            let max = if sorted {
                logits[idx[0] as usize]
            } else {
                idx[..n]
                    .iter()
                    .map(|&t| logits[t as usize])
                    .fold(f32::NEG_INFINITY, f32::max)
            };
            let floor = p.min_p.ln();
            let keep = |t: u32| logits[t as usize] - max >= floor;
            if sorted {
                n = idx[..n].iter().take_while(|&&t| keep(t)).count().max(1);
            } else {
                let mut w = 0;
                for r in 0..n {
                    let t = idx[r];
                    if keep(t) {
                        idx[w] = t;
                        w += 1;
                    }
                }
                n = w.max(1);
            }
        }
        n
    }

    /// Steps 5–6: temperature, then a draw from the softmax of `self.idx[..n]`.
    fn draw(&mut self, logits: &[f32], n: usize) -> u32 {
        let p = &self.params.params;
        let idx = &self.idx;
        // f32 exp (each weight to ~1e-7 relative) is plenty for a draw and much cheaper than
        // f64 over a whole vocabulary; the running sums stay f64.
        // Drawn first, whatever follows: every sample with temperature > 0 takes exactly one
        // number, so a resumed sampler (`resume`) can replay the generator by count alone.
        let u01 = self.rng.next_f64();
        let inv_t = 1.0 / p.temperature;
        let max = idx[..n]
            .iter()
            .map(|&t| logits[t as usize])
            .fold(f32::NEG_INFINITY, f32::max);
        let weights = &mut self.weights;
        weights.clear();
        let mut total = 0.0f64;
        for &t in &idx[..n] {
            let w = f64::from(((logits[t as usize] - max) * inv_t).exp());
            // NaN logits (a broken model) get no mass rather than poisoning the sum.
            let w = if w.is_nan() { 0.0 } else { w };
            total += w;
            weights.push(w);
        }
        if !(total > 0.0 && total.is_finite()) {
            return argmax(logits);
        }
        let u = u01 * total;
        let mut cum = 0.0f64;
        let mut last_positive = idx[0];
        for (i, &w) in weights.iter().enumerate() {
            if w > 0.0 {
                last_positive = idx[i];
                cum += w;
                if u < cum {
                    return idx[i];
                }
            }
        }
        // u rounded up to the total: the last token with mass.
        last_positive
    }
}

/// Leaves in `heap` the `m` ids of `logits` ranked first by (logit descending, id ascending;
/// `total_cmp` order), sorted in that order. One pass with a size-`m` heap whose root is the
/// worst kept id: most ids lose a single comparison against the root, which makes this several
/// times faster than `select_nth_unstable_by` over the whole vocabulary for small `m`.
fn top_m_sorted(logits: &[f32], m: usize, heap: &mut Vec<u32>) {
    // Less = `a` ranks before `b`.
    let rank = |a: u32, b: u32| {
        logits[b as usize]
            .total_cmp(&logits[a as usize])
            .then(a.cmp(&b))
    };
    let worse = |a: u32, b: u32| rank(a, b) == Ordering::Greater;
    heap.clear();
    if m == 0 {
        return;
    }
    for (t, &v) in logits.iter().enumerate() {
        let t = t as u32;
        if heap.len() < m {
            heap.push(t);
            let mut i = heap.len() - 1;
            while i > 0 {
                let parent = (i - 1) / 2;
                if !worse(heap[i], heap[parent]) {
                    break;
                }
                heap.swap(i, parent);
                i = parent;
            }
        } else if v.total_cmp(&logits[heap[0] as usize]).is_gt() {
            // Ids are scanned in increasing order, so a tie with the root ranks after it and
            // only a strictly larger logit gets in.
            heap[0] = t;
            let mut i = 0;
            loop {
                let (l, r) = (2 * i + 1, 2 * i + 2);
                let mut w = i;
                if l < m && worse(heap[l], heap[w]) {
                    w = l;
                }
                if r < m && worse(heap[r], heap[w]) {
                    w = r;
                }
                if w == i {
                    break;
                }
                heap.swap(i, w);
                i = w;
            }
        }
    }
    heap.sort_unstable_by(|&a, &b| rank(a, b));
}

/// The index of the largest value, ties to the lowest index; NaN never wins.
fn argmax(xs: &[f32]) -> u32 {
    let mut best = 0usize;
    let mut best_v = f32::NEG_INFINITY;
    let mut found = false;
    for (i, &v) in xs.iter().enumerate() {
        if v > best_v || (!found && !v.is_nan()) {
            best = i;
            best_v = v;
            found = true;
        }
    }
    best as u32
}

/// `ln Σ exp(x)` in f64, stable for large logits.
fn log_sum_exp(xs: &[f32]) -> f64 {
    let max = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return f64::from(max);
    }
    let s: f64 = xs.iter().map(|&x| f64::from((x - max).exp())).sum();
    f64::from(max) + s.ln()
}

/// The `n` largest values (value descending, ties to the lowest id), by one pass keeping a small
/// sorted list (`n` is at most 20, so insertion beats a heap).
fn top_n(xs: &[f32], n: usize) -> Vec<(u32, f32)> {
    let mut top: Vec<(u32, f32)> = Vec::with_capacity(n + 1);
    for (i, &v) in xs.iter().enumerate() {
        if v.is_nan() {
            continue;
        }
        if top.len() == n && top.last().is_some_and(|&(_, lv)| v <= lv) {
            continue;
        }
        // Insert after every entry >= v, so earlier (lower) ids win ties.
        let pos = top.partition_point(|&(_, tv)| tv >= v);
        top.insert(pos, (i as u32, v));
        top.truncate(n);
    }
    top
}

#[cfg(test)]
#[path = "sampler_tests.rs"]
mod tests;
