//! The naive f64 attention every kernel is judged against.
//!
//! Public so the worker's sharding tests and the CUDA kernels' tests use the same reference.
//! It materialises each score row, works in f64 throughout and follows the definitions of
//! [`flash_attention`](super::flash_attention) literally; speed is not a goal.

use super::{AttnShape, KvView};

/// Output and log-sum-exp of naive attention, in f64.
#[derive(Clone, Debug, PartialEq)]
pub struct Reference {
    /// `(seq_q, n_heads, head_dim)`.
    pub out: Vec<f64>,
    /// `(seq_q, n_heads)`; `-inf` for a row with no visible key.
    pub lse: Vec<f64>,
}

/// Naive attention with the same contract as [`flash_attention`](super::flash_attention):
/// bottom-right causal alignment, GQA head mapping, keys read through `kv`'s block table, a row
/// with no visible key gives output 0 and lse `-inf`.
///
/// # Panics
/// On the same shape inconsistencies as `flash_attention` (wrong `q` length, `n_heads` not a
/// multiple of `n_kv_heads`, a view that does not cover `kv.len` tokens).
pub fn attention_f64(
    q: &[f32],
    kv: KvView<'_>,
    shape: AttnShape,
    causal: bool,
    scale: f32,
) -> Reference {
    let AttnShape {
        seq_q,
        n_heads,
        n_kv_heads,
        head_dim,
    } = shape;
    assert!(
        n_kv_heads > 0 && n_heads % n_kv_heads == 0,
        "reference: n_heads must be a multiple of n_kv_heads"
    );
    assert_eq!(
        q.len(),
        seq_q * n_heads * head_dim,
        "reference: q is not (seq_q, n_heads, head_dim)"
    );
    kv.validate(n_kv_heads, head_dim);
    let group = n_heads / n_kv_heads;
    let mut out = vec![0.0f64; q.len()];
    let mut lse = vec![f64::NEG_INFINITY; seq_q * n_heads];
    let mut scores = Vec::with_capacity(kv.len);
    for i in 0..seq_q {
        let visible = if causal {
            shape.causal_limit(i, kv.len)
        } else {
            kv.len
        };
        for h in 0..n_heads {
            // q_row: (head_dim,)
            let q_row = &q[(i * n_heads + h) * head_dim..][..head_dim];
            let kvh = h / group;
            scores.clear();
            for j in 0..visible {
                let k_row = &kv.k[kv.offset(j, kvh, n_kv_heads, head_dim)..][..head_dim];
                let dot: f64 = q_row
                    .iter()
                    .zip(k_row)
                    .map(|(&a, &b)| a as f64 * b as f64)
                    .sum();
                scores.push(dot * scale as f64);
            }
            if scores.is_empty() {
                continue;
            }
            let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let sum: f64 = scores.iter().map(|s| (s - max).exp()).sum();
            let o = &mut out[(i * n_heads + h) * head_dim..][..head_dim];
            for (j, s) in scores.iter().enumerate() {
                let p = (s - max).exp() / sum;
                let v_row = &kv.v[kv.offset(j, kvh, n_kv_heads, head_dim)..][..head_dim];
                for (a, &b) in o.iter_mut().zip(v_row) {
                    *a += p * b as f64;
                }
            }
            lse[i * n_heads + h] = max + sum.ln();
        }
    }
    Reference { out, lse }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ensures that the reference itself is right on a case worked by hand: one query, two
    /// keys, causal hiding the second key from the first of two query rows.
    #[test]
    fn hand_worked_case() {
        // q: (2, 1, 1), k/v: (2, 1, 1)
        let q = [1.0f32, 2.0];
        let k = [0.5f32, -1.0];
        let v = [10.0f32, 20.0];
        let shape = AttnShape {
            seq_q: 2,
            n_heads: 1,
            n_kv_heads: 1,
            head_dim: 1,
        };
        let r = attention_f64(&q, KvView::contiguous(&k, &v, 2), shape, true, 1.0);
        // Row 0 sees key 0 only.
        assert_eq!(r.out[0], 10.0);
        assert!((r.lse[0] - 0.5).abs() < 1e-12);
        // Row 1 sees both: scores 1.0 and -2.0.
        let (e0, e1) = (1.0f64.exp(), (-2.0f64).exp());
        assert!((r.out[1] - (10.0 * e0 + 20.0 * e1) / (e0 + e1)).abs() < 1e-12);
        assert!((r.lse[1] - (e0 + e1).ln()).abs() < 1e-12);
    }
}
