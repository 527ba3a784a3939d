//! Rotary position embeddings, in both dimension layouts.

use tessera_format::RopeLayout;

/// Precomputed rotation tables for every position up to the context length.
///
/// Positions are global token positions: a sequence split over ring ranks or pipeline chunks
/// rotates each token by its position in the whole sequence, never by its index in a chunk.
#[derive(Clone, Debug)]
pub struct Rope {
    layout: RopeLayout,
    head_dim: usize,
    max_pos: usize,
    /// cos and sin, (max_pos, head_dim / 2).
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl Rope {
    /// Tables for positions `0..max_pos` with base frequency `theta`, computed as llama.cpp's
    /// `ggml_rope_cache_init` does: the angle of pair `i` at position `p` is
    /// `p · s^i` with `s = theta^(-2/head_dim)`, formed in f32 by repeated multiplication, and
    /// its cosine and sine are taken in f32. That drifts from the exact angle by a few ulp per
    /// step, but it is what the golden model computes, and its rounding decides near-ties.
    ///
    /// # Panics
    /// When `head_dim` is odd.
    pub fn new(layout: RopeLayout, head_dim: usize, theta: f32, max_pos: usize) -> Self {
        assert!(
            head_dim.is_multiple_of(2),
            "rope needs an even head dim, got {head_dim}"
        );
        let half = head_dim / 2;
        let mut cos = Vec::with_capacity(max_pos * half);
        let mut sin = Vec::with_capacity(max_pos * half);
        let theta_scale = theta.powf(-2.0 / head_dim as f32);
        for pos in 0..max_pos {
            let mut angle = pos as f32;
            for _ in 0..half {
                cos.push(angle.cos());
                sin.push(angle.sin());
                angle *= theta_scale;
            }
        }
        Self {
            layout,
            head_dim,
            max_pos,
            cos,
            sin,
        }
    }

    /// The largest position + 1 this table covers.
    pub fn max_positions(&self) -> usize {
        self.max_pos
    }

    /// Rotates every head of every token in place.
    ///
    /// `x` is (n_tokens, n_heads, head_dim) and `positions[t]` is token t's global position.
    ///
    /// # Panics
    /// When shapes disagree or a position is past the table.
    pub fn forward(&self, x: &mut [f32], positions: &[usize]) {
        let d = self.head_dim;
        let half = d / 2;
        let n_tokens = positions.len();
        assert!(
            n_tokens > 0 && x.len().is_multiple_of(n_tokens * d),
            "rope: ragged input"
        );
        let row = x.len() / n_tokens; // n_heads * head_dim
        for (t, &pos) in positions.iter().enumerate() {
            assert!(
                pos < self.max_pos,
                "rope: position {pos} past table of {}",
                self.max_pos
            );
            let cos = &self.cos[pos * half..(pos + 1) * half];
            let sin = &self.sin[pos * half..(pos + 1) * half];
            for head in x[t * row..(t + 1) * row].chunks_exact_mut(d) {
                match self.layout {
                    RopeLayout::Interleaved => {
                        for (i, pair) in head.chunks_exact_mut(2).enumerate() {
                            let (a, b) = (pair[0], pair[1]);
                            (pair[0], pair[1]) = rotate(a, b, cos[i], sin[i]);
                        }
                    }
                    RopeLayout::Half => {
                        let (lo, hi) = head.split_at_mut(half);
                        for i in 0..half {
                            let (a, b) = (lo[i], hi[i]);
                            (lo[i], hi[i]) = rotate(a, b, cos[i], sin[i]);
                        }
                    }
                }
            }
        }
    }
}

/// `(a cos − b sin, a sin + b cos)` as ggml's `rotate_pairs` computes it when compiled with
/// fused multiply-adds (GCC contracts the first product of each expression into the add).
#[inline(always)]
fn rotate(a: f32, b: f32, cos: f32, sin: f32) -> (f32, f32) {
    (a.mul_add(cos, -(b * sin)), a.mul_add(sin, b * cos))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The rotation in f64, by the angles llama.cpp forms (f32 repeated multiplication: the
    /// table's contract) — only the trigonometry and the rotation are exact.
    fn reference(layout: RopeLayout, x: &[f64], pos: usize, theta: f32) -> Vec<f64> {
        let d = x.len();
        let mut out = x.to_vec();
        let scale = theta.powf(-2.0 / d as f32);
        let mut angle = pos as f32;
        for i in 0..d / 2 {
            let a = f64::from(angle);
            angle *= scale;
            let (p, q) = match layout {
                RopeLayout::Interleaved => (2 * i, 2 * i + 1),
                RopeLayout::Half => (i, i + d / 2),
            };
            out[p] = x[p] * a.cos() - x[q] * a.sin();
            out[q] = x[p] * a.sin() + x[q] * a.cos();
        }
        out
    }

    /// Ensures that both layouts rotate the right pairs by the right angles.
    #[test]
    fn both_layouts_match_reference() {
        for layout in [RopeLayout::Interleaved, RopeLayout::Half] {
            let (d, heads) = (16, 3);
            let rope = Rope::new(layout, d, 10_000.0, 300);
            let positions = [0usize, 1, 7, 299];
            let mut x: Vec<f32> = (0..positions.len() * heads * d)
                .map(|i| ((i * 7919) % 13) as f32 - 6.0)
                .collect();
            let orig = x.clone();
            rope.forward(&mut x, &positions);
            for (t, &pos) in positions.iter().enumerate() {
                for h in 0..heads {
                    let off = (t * heads + h) * d;
                    let src: Vec<f64> = orig[off..off + d].iter().map(|&v| f64::from(v)).collect();
                    let want = reference(layout, &src, pos, 10_000.0);
                    for i in 0..d {
                        assert!((f64::from(x[off + i]) - want[i]).abs() < 1e-5, "{layout:?}");
                    }
                }
            }
        }
    }

    /// Ensures that llama.cpp's f32 angles stay within 1e-6 (relative) of the exact angles
    /// `pos · theta^(-2i/d)`, so the table is still the rotation it claims to be.
    #[test]
    fn ggml_angles_track_exact_angles() {
        let (d, theta, max_pos) = (64, 100_000.0f32, 2048);
        let rope = Rope::new(RopeLayout::Interleaved, d, theta, max_pos);
        for pos in [1usize, 7, 300, 2047] {
            for i in 0..d / 2 {
                let exact = pos as f64 * f64::from(theta).powf(-2.0 * i as f64 / d as f64);
                let (c, s) = (rope.cos[pos * d / 2 + i], rope.sin[pos * d / 2 + i]);
                let got = f64::from(s).atan2(f64::from(c));
                let want = exact.sin().atan2(exact.cos());
                let diff = (got - want)
                    .abs()
                    .min(2.0 * std::f64::consts::PI - (got - want).abs());
                assert!(diff <= 1e-6 * exact.max(1.0), "pos {pos} pair {i}: {diff}");
            }
        }
    }

    /// Ensures that position 0 is the identity and rotation preserves each pair's norm.
    #[test]
    fn identity_at_zero_and_norm_preserving() {
        let rope = Rope::new(RopeLayout::Interleaved, 8, 100_000.0, 64);
        let mut x: Vec<f32> = (0..8).map(|i| i as f32 - 3.5).collect();
        let orig = x.clone();
        rope.forward(&mut x, &[0]);
        assert_eq!(x, orig);
        rope.forward(&mut x, &[63]);
        let n0: f32 = orig.iter().map(|v| v * v).sum();
        let n1: f32 = x.iter().map(|v| v * v).sum();
        assert!((n0 - n1).abs() < 1e-4);
    }
}
