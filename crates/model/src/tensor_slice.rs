//! Tensor-parallel slices: which part of every layer a rank holds ([`TensorSlice`]), which
//! boundaries the stored formats allow ([`TensorAlignment`]), and how whole weights are cut
//! down to a slice when a stage loads.
//!
//! A rank holds a range of KV heads with the query heads of their GQA groups (rows of
//! `wq`/`wk`/`wv`, columns of `wo`), a range of MLP intermediate columns (rows of gate/up,
//! columns of down) and a range of the vocabulary (rows of the embedding and the output head).
//! Row cuts are free; a column cut must fall on a block boundary of the matrix's format (a
//! quantized block cannot be split), which is what [`TensorAlignment`] describes. Norms are
//! replicated. A whole slice (a group of one) is never copied: the cuts hand the loaded matrix
//! through unchanged, so a whole model is bit-for-bit what it was before slices existed.

use std::ops::Range;

use tessera_format::ModelConfig;
use tessera_kernels::quant::QMatrix;

use crate::error::{ModelError, Result};

/// The part of each layer a tensor-parallel rank holds, fixed when the stage loads
/// ([`crate::llama::LoadSpec::tensor`]). The ranks of a group hold disjoint ranges that cover
/// every head, column and vocabulary row; a rank can only check its own slice
/// ([`TensorSlice::check`]), the planner checks the group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorSlice {
    /// This rank's index in its group.
    pub rank: usize,
    /// Ranks in the group.
    pub ranks: usize,
    /// The KV heads held; their query heads (GQA groups) go with them.
    pub kv_heads: Range<usize>,
    /// The MLP intermediate columns held.
    pub ffn: Range<usize>,
    /// The embedding and output-head rows (vocabulary ids) held.
    pub vocab: Range<usize>,
}

impl TensorSlice {
    /// Rank 0 of a group of one: every head, column and vocabulary row.
    pub fn whole(cfg: &ModelConfig) -> Self {
        Self {
            rank: 0,
            ranks: 1,
            kv_heads: 0..cfg.n_kv_heads,
            ffn: 0..cfg.intermediate,
            vocab: 0..cfg.vocab_size,
        }
    }

    /// Whether this is a group of one (which [`TensorSlice::check`] only passes when it holds
    /// everything).
    pub fn is_whole(&self) -> bool {
        self.ranks == 1
    }

    /// Checks that the slice fits `cfg`: `rank < ranks`, every range non-empty and within the
    /// model, and a group of one holding everything (it has nobody to add the rest). Block
    /// alignment depends on the stored formats and is checked when the weights load.
    ///
    /// # Errors
    /// [`ModelError::InvalidArgument`] naming `tensor.rank`, `tensor.kv_heads`, `tensor.ffn` or
    /// `tensor.vocab`.
    pub fn check(&self, cfg: &ModelConfig) -> Result<()> {
        if self.rank >= self.ranks {
            return Err(ModelError::InvalidArgument {
                field: "tensor.rank",
                reason: format!("rank {} of a group of {}", self.rank, self.ranks),
            });
        }
        let ranges = [
            (
                "tensor.kv_heads",
                &self.kv_heads,
                cfg.n_kv_heads,
                "KV heads",
            ),
            ("tensor.ffn", &self.ffn, cfg.intermediate, "MLP columns"),
            (
                "tensor.vocab",
                &self.vocab,
                cfg.vocab_size,
                "vocabulary rows",
            ),
        ];
        for (field, r, total, what) in ranges {
            if r.start >= r.end || r.end > total {
                return Err(ModelError::InvalidArgument {
                    field,
                    reason: format!(
                        "{r:?} is not a non-empty range within the model's {total} {what}"
                    ),
                });
            }
            if self.ranks == 1 && *r != (0..total) {
                return Err(ModelError::InvalidArgument {
                    field,
                    reason: format!("a group of one rank must hold all {total} {what}, not {r:?}"),
                });
            }
        }
        Ok(())
    }

    /// The query heads that go with [`TensorSlice::kv_heads`]: their GQA groups.
    pub fn q_heads(&self, cfg: &ModelConfig) -> Range<usize> {
        let g = cfg.gqa_ratio();
        self.kv_heads.start * g..self.kv_heads.end * g
    }

    /// Every rank's slice of a group of `ranks`, each range split as evenly as `align`
    /// allows (parts differ by at most one unit).
    ///
    /// # Errors
    /// [`ModelError::InvalidArgument`] naming `tensor.ranks` when a range has fewer aligned
    /// units than there are ranks.
    pub fn balanced(cfg: &ModelConfig, ranks: usize, align: &TensorAlignment) -> Result<Vec<Self>> {
        let kv = split(cfg.n_kv_heads, align.kv_heads, ranks, "KV heads")?;
        let ffn = split(cfg.intermediate, align.ffn, ranks, "MLP columns")?;
        let vocab = split(cfg.vocab_size, 1, ranks, "vocabulary rows")?;
        Ok((0..ranks)
            .map(|rank| Self {
                rank,
                ranks,
                kv_heads: kv[rank].clone(),
                ffn: ffn[rank].clone(),
                vocab: vocab[rank].clone(),
            })
            .collect())
    }
}

/// `total` cut into `ranks` ranges whose inner boundaries are multiples of `unit`.
fn split(total: usize, unit: usize, ranks: usize, what: &str) -> Result<Vec<Range<usize>>> {
    let units = total.div_ceil(unit);
    if ranks == 0 || units < ranks {
        return Err(ModelError::InvalidArgument {
            field: "tensor.ranks",
            reason: format!("{total} {what} in units of {unit} cannot be split over {ranks} ranks"),
        });
    }
    let (base, extra) = (units / ranks, units % ranks);
    let mut start = 0;
    Ok((0..ranks)
        .map(|r| {
            // The larger parts go last, where the final unit may be cut short by `total`.
            let end = (start + base + usize::from(r >= ranks - extra)) * unit;
            let range = start * unit..end.min(total);
            start = end / unit;
            range
        })
        .collect())
}

/// The granularity of valid slice boundaries for a model: every boundary of
/// [`TensorSlice::kv_heads`] must be a multiple of `kv_heads` and every boundary of
/// [`TensorSlice::ffn`] a multiple of `ffn` (the end of a range may also be the total).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TensorAlignment {
    /// KV heads per unit.
    pub kv_heads: usize,
    /// MLP columns per unit.
    pub ffn: usize,
}

/// The alignment a planner must respect for `cfg` stored with blocks of `block` elements
/// (the largest [`tessera_format::QType::block_size`] among the model's attention-output and
/// MLP down projections: 32 for Q4_0/Q4_1/Q8_0, 256 for the K-quants, 1 for floats). A KV-head
/// boundary `b` cuts `wo` at column `b · gqa_ratio · head_dim`, an ffn boundary cuts `down` at
/// that column.
pub fn tensor_alignment(cfg: &ModelConfig, block: usize) -> TensorAlignment {
    let block = block.max(1);
    let per_kv_head = cfg.gqa_ratio() * cfg.head_dim;
    TensorAlignment {
        kv_heads: block / gcd(block, per_kv_head),
        ffn: block,
    }
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// Rows `rows` of `m`; `m` itself, uncopied, when that is all of it.
pub(crate) fn cut_rows(m: QMatrix, rows: &Range<usize>) -> Result<QMatrix> {
    if *rows == (0..m.rows()) {
        return Ok(m);
    }
    Ok(m.slice_rows(rows.clone())?)
}

/// Columns `cols` of `m`; `m` itself, uncopied, when that is all of it.
///
/// # Errors
/// [`ModelError::InvalidArgument`] naming `field` (the slice range that put the cut there) when
/// a cut splits a block of `m`'s format; `why` says which matrix and how the cut falls.
pub(crate) fn cut_cols(
    m: QMatrix,
    cols: &Range<usize>,
    field: &'static str,
    why: impl FnOnce() -> String,
) -> Result<QMatrix> {
    if *cols == (0..m.cols()) {
        return Ok(m);
    }
    let bs = m.qtype().block_size();
    if !cols.start.is_multiple_of(bs) || !cols.end.is_multiple_of(bs) {
        return Err(ModelError::InvalidArgument {
            field,
            reason: format!(
                "{}: columns {cols:?} split {}'s blocks of {bs}; slice boundaries must fall on \
                 multiples of {bs} columns",
                why(),
                m.qtype()
            ),
        });
    }
    Ok(m.slice_cols(cols.clone())?)
}

/// Elements `r` of `v`; `v` itself when that is all of it.
pub(crate) fn cut_vec(v: Vec<f32>, r: &Range<usize>) -> Vec<f32> {
    if *r == (0..v.len()) {
        v
    } else {
        v[r.clone()].to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use tessera_format::{Arch, RopeLayout};

    fn cfg(n_heads: usize, n_kv_heads: usize, head_dim: usize) -> ModelConfig {
        ModelConfig {
            arch: Arch::Llama,
            n_layers: 2,
            hidden: 64,
            intermediate: 1536,
            n_heads,
            n_kv_heads,
            head_dim,
            vocab_size: 49152,
            context_len: 64,
            rope_theta: 10_000.0,
            rope_layout: RopeLayout::Interleaved,
            rms_eps: 1e-5,
            qkv_bias: false,
        }
    }

    /// Ensures that SmolLM2's shape gives the alignments the load checks enforce: any KV-head
    /// boundary under Q4_1 (a KV head's 3 query heads are 192 columns), every fourth under
    /// the K-quants (3 · 64 · 4 = 768 = 3 blocks of 256).
    #[test]
    fn alignment_of_smollm2_shapes() {
        let c = cfg(9, 3, 64);
        assert_eq!(
            tensor_alignment(&c, 32),
            TensorAlignment {
                kv_heads: 1,
                ffn: 32
            }
        );
        assert_eq!(
            tensor_alignment(&c, 256),
            TensorAlignment {
                kv_heads: 4,
                ffn: 256
            }
        );
        assert_eq!(
            tensor_alignment(&c, 1),
            TensorAlignment {
                kv_heads: 1,
                ffn: 1
            }
        );
    }

    /// Ensures that each bad field is named: rank past the group, empty and out-of-range
    /// ranges, and a group of one that does not hold everything.
    #[test]
    fn check_names_the_bad_field() {
        let c = cfg(9, 3, 64);
        let ok = TensorSlice {
            rank: 1,
            ranks: 2,
            kv_heads: 2..3,
            ffn: 768..1536,
            vocab: 100..49152,
        };
        assert!(ok.check(&c).is_ok());
        assert_eq!(ok.q_heads(&c), 6..9);
        let field = |s: TensorSlice| s.check(&c).expect_err("bad slice").field();
        assert_eq!(
            field(TensorSlice {
                rank: 2,
                ..ok.clone()
            }),
            Some("tensor.rank")
        );
        assert_eq!(
            field(TensorSlice {
                kv_heads: 1..1,
                ..ok.clone()
            }),
            Some("tensor.kv_heads")
        );
        assert_eq!(
            field(TensorSlice {
                kv_heads: 2..4,
                ..ok.clone()
            }),
            Some("tensor.kv_heads")
        );
        assert_eq!(
            field(TensorSlice {
                ffn: 0..1537,
                ..ok.clone()
            }),
            Some("tensor.ffn")
        );
        assert_eq!(
            field(TensorSlice {
                vocab: std::ops::Range { start: 5, end: 4 },
                ..ok.clone()
            }),
            Some("tensor.vocab")
        );
        let one = TensorSlice {
            rank: 0,
            ranks: 1,
            ..ok
        };
        assert_eq!(field(one), Some("tensor.kv_heads"));
        assert!(TensorSlice::whole(&c).check(&c).is_ok());
        assert!(TensorSlice::whole(&c).is_whole());
    }

    /// Ensures that a whole range hands the matrix (and vector) through without a copy, that
    /// a partial one copies the named rows or columns, and that a column cut through a block
    /// names the slice field and the block size.
    #[test]
    fn cuts_copy_only_slices() {
        use tessera_format::QType;
        let data: Vec<f32> = (0..4 * 64).map(|i| i as f32 / 7.0).collect();
        let m = QMatrix::quantize(QType::Q4_1, 4, 64, &data).expect("matrix");
        let at = m.as_bytes().as_ptr();
        let m = cut_rows(m, &(0..4)).expect("rows");
        let m = cut_cols(m, &(0..64), "tensor.ffn", String::new).expect("cols");
        assert_eq!(m.as_bytes().as_ptr(), at, "a whole cut is no copy");
        let rows = cut_rows(m.clone(), &(1..3)).expect("rows");
        assert_eq!(rows.dequantize(), m.dequantize()[64..192]);
        let cols = cut_cols(m.clone(), &(32..64), "tensor.ffn", String::new).expect("cols");
        assert_eq!((cols.rows(), cols.cols()), (4, 32));
        let e = cut_cols(m, &(16..64), "tensor.ffn", || "down".into()).expect_err("split block");
        assert_eq!(e.field(), Some("tensor.ffn"));
        assert!(e.to_string().contains("32"), "{e}");
        let v = vec![1.0, 2.0, 3.0];
        let at = v.as_ptr();
        let kept = cut_vec(v, &(0..3));
        assert_eq!(kept.as_ptr(), at);
        assert_eq!(cut_vec(vec![1.0, 2.0, 3.0], &(1..2)), [2.0]);
    }

    proptest! {
        /// Ensures that balanced slices partition every range in rank order, pass their
        /// checks, put every inner boundary on the alignment, and differ in size by at most
        /// one unit.
        #[test]
        fn balanced_slices_partition(kv in 1usize..9, g in 1usize..4, ranks in 1usize..5, block in 0usize..3) {
            let c = cfg(kv * g, kv, 64);
            let align = tensor_alignment(&c, [1, 32, 256][block]);
            let Ok(slices) = TensorSlice::balanced(&c, ranks, &align) else {
                prop_assert!(c.n_kv_heads.div_ceil(align.kv_heads) < ranks);
                return Ok(());
            };
            prop_assert_eq!(slices.len(), ranks);
            for (r, s) in slices.iter().enumerate() {
                prop_assert!(s.check(&c).is_ok());
                prop_assert_eq!(s.rank, r);
                prop_assert!(s.kv_heads.start % align.kv_heads == 0);
                prop_assert!(s.ffn.start % align.ffn == 0);
            }
            let lens: Vec<usize> = slices.iter().map(|s| s.kv_heads.len()).collect();
            let spread = lens.iter().max().unwrap_or(&0) - lens.iter().min().unwrap_or(&0);
            prop_assert!(spread <= align.kv_heads, "{lens:?}");
            for (field, total) in [(0, c.n_kv_heads), (1, c.intermediate), (2, c.vocab_size)] {
                let get = |s: &TensorSlice| [&s.kv_heads, &s.ffn, &s.vocab][field].clone();
                prop_assert_eq!(get(&slices[0]).start, 0);
                prop_assert_eq!(get(&slices[ranks - 1]).end, total);
                for w in slices.windows(2) {
                    prop_assert_eq!(get(&w[0]).end, get(&w[1]).start);
                }
            }
        }
    }
}
