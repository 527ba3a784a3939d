//! The log-sum-exp merge of partial attention results over disjoint key sets.
//!
//! Attention over a key set `A ∪ B` (disjoint) is a convex combination of the attention over `A`
//! and over `B`, weighted by each part's share of the softmax mass, which the log-sum-exp of the
//! scores carries. This is what makes flash-decoding (key splits on one machine), ring attention
//! and context-parallel decode (key slices on several) exact up to rounding.

/// Merges one partial result into an accumulator, row by row, in place.
///
/// `acc_o`/`part_o` hold rows of `head_dim` values with one log-sum-exp each in
/// `acc_lse`/`part_lse` (any layout whose rows line up, e.g. `(seq_q, n_heads, head_dim)` with
/// `(seq_q, n_heads)`). With `m = max(lseA, lseB)`:
/// `lse = m + ln_1p(exp(min - m))`, `o = exp(lseA - lse)·oA + exp(lseB - lse)·oB`.
/// An empty part is `(0, -inf)`: merging it leaves the other side unchanged (bit for bit), and
/// two empties stay `(0, -inf)` rather than NaN.
///
/// # Panics
/// When `head_dim == 0`, or the four slices disagree on the number of rows
/// (`acc_o.len() != acc_lse.len() * head_dim`, or the part's lengths differ from the acc's).
pub fn merge_into(
    acc_o: &mut [f32],
    acc_lse: &mut [f32],
    part_o: &[f32],
    part_lse: &[f32],
    head_dim: usize,
) {
    assert!(head_dim > 0, "merge_into: head_dim must be at least 1");
    assert_eq!(
        acc_o.len(),
        acc_lse.len() * head_dim,
        "merge_into: acc_o is not (rows, head_dim) for acc_lse's rows"
    );
    assert_eq!(
        part_o.len(),
        acc_o.len(),
        "merge_into: part_o and acc_o differ in length"
    );
    assert_eq!(
        part_lse.len(),
        acc_lse.len(),
        "merge_into: part_lse and acc_lse differ in length"
    );
    let rows = acc_o.chunks_exact_mut(head_dim).zip(acc_lse.iter_mut());
    for ((ao, al), (po, &pl)) in rows.zip(part_o.chunks_exact(head_dim).zip(part_lse)) {
        merge_row(ao, al, po, pl);
    }
}

/// Merges one row; see [`merge_into`].
#[inline]
fn merge_row(acc_o: &mut [f32], acc_lse: &mut f32, part_o: &[f32], part_lse: f32) {
    if part_lse == f32::NEG_INFINITY {
        // Nothing to add; also covers empty + empty, where the general formula is -inf - -inf.
        return;
    }
    if *acc_lse == f32::NEG_INFINITY {
        acc_o.copy_from_slice(part_o);
        *acc_lse = part_lse;
        return;
    }
    let (hi, lo) = if *acc_lse >= part_lse {
        (*acc_lse, part_lse)
    } else {
        (part_lse, *acc_lse)
    };
    let lse = hi + (lo - hi).exp().ln_1p();
    let wa = (*acc_lse - lse).exp();
    let wb = (part_lse - lse).exp();
    for (a, &b) in acc_o.iter_mut().zip(part_o) {
        *a = wa * *a + wb * b;
    }
    *acc_lse = lse;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ensures that two empty parts merge to (0, -inf) with no NaN.
    #[test]
    fn empty_plus_empty_is_empty() {
        let mut o = [0.0f32; 4];
        let mut lse = [f32::NEG_INFINITY];
        merge_into(&mut o, &mut lse, &[0.0; 4], &[f32::NEG_INFINITY], 4);
        assert_eq!(o, [0.0; 4]);
        assert_eq!(lse, [f32::NEG_INFINITY]);
    }

    /// Ensures that merging with an empty part, on either side, returns the other part exactly.
    #[test]
    fn empty_is_identity() {
        let part = [1.5f32, -2.0, 0.25];
        let mut o = [0.0f32; 3];
        let mut lse = [f32::NEG_INFINITY];
        merge_into(&mut o, &mut lse, &part, &[0.7], 3);
        assert_eq!((o, lse), (part, [0.7]));
        merge_into(&mut o, &mut lse, &[0.0; 3], &[f32::NEG_INFINITY], 3);
        assert_eq!((o, lse), (part, [0.7]));
    }

    /// Ensures that two single-key parts merge to the softmax-weighted mean of their values and
    /// the log of the summed exponentials, computed by hand.
    #[test]
    fn two_keys_by_hand() {
        // Part A: one key with score 1.0 and value [2, 0]; part B: score 3.0, value [0, 4].
        let mut o = [2.0f32, 0.0];
        let mut lse = [1.0f32];
        merge_into(&mut o, &mut lse, &[0.0, 4.0], &[3.0], 2);
        let (ea, eb) = (1.0f64.exp(), 3.0f64.exp());
        let want = [2.0 * ea / (ea + eb), 4.0 * eb / (ea + eb)];
        assert!((lse[0] as f64 - (ea + eb).ln()).abs() < 1e-6);
        for (a, b) in o.iter().zip(want) {
            assert!((*a as f64 - b).abs() < 1e-6, "{a} vs {b}");
        }
    }

    /// Ensures that mismatched row counts are refused.
    #[test]
    #[should_panic(expected = "part_lse")]
    fn mismatched_rows_panic() {
        let mut o = [0.0f32; 4];
        let mut lse = [0.0f32; 2];
        merge_into(&mut o, &mut lse, &[0.0; 4], &[0.0; 1], 2);
    }
}
