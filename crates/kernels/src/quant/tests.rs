//! Tests of the quantized formats and products against f64 references.
//!
//! Tolerance of a quantized product: activations are quantized per block with step
//! `d = amax_block / 127`, so each differs from the input by at most `d / 2`, and the product by
//! at most `E = Σ_blocks (amax_b / 254) · Σ_{i∈b} |w_i|` (weights taken as dequantized, so
//! weight quantization error is not part of it). Integer block sums are exact; the f32 scaling
//! and summation of `nb` block terms adds at most about `(nb + 8) · 2⁻²³ · Σ|w x|`. Float
//! weights (f32/f16/bf16, exact after widening) only carry the summation term.

use super::act::{BlockQ8, quantize_q8_scalar};
use super::{QMatrix, QScratch, QType};
use crate::ThreadPool;
use crate::error::KernelError;
use crate::isa::{self, Isa};
use proptest::prelude::*;

/// Deterministic N(0, 1) samples (splitmix64 + Box-Muller), so failures reproduce.
pub(crate) fn normal(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(1);
    let mut next = || {
        s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    };
    (0..n)
        .map(|_| {
            let (u1, u2) = (next().max(1e-300), next());
            ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
        })
        .collect()
}

/// The activation block length the product quantizes with (0 for float weights).
fn act_block(q: QType) -> usize {
    match q {
        QType::Q4_0 | QType::Q4_1 | QType::Q8_0 => 32,
        QType::Q4K | QType::Q5K | QType::Q6K => 256,
        _ => 0,
    }
}

/// Checks `y` (m, rows) against the f64 product of the dequantized weights with `x`, within
/// the bound derived in the module docs.
fn check_product(w: &QMatrix, x: &[f32], m: usize, y: &[f32]) {
    let (rows, cols) = (w.rows(), w.cols());
    let wd = w.dequantize();
    let ab = act_block(w.qtype());
    let nb = cols.checked_div(ab).unwrap_or(cols);
    for t in 0..m {
        let xt = &x[t * cols..(t + 1) * cols];
        for r in 0..rows {
            let wr = &wd[r * cols..(r + 1) * cols];
            let exact: f64 = wr.iter().zip(xt).map(|(&a, &b)| a as f64 * b as f64).sum();
            let abs: f64 = wr
                .iter()
                .zip(xt)
                .map(|(&a, &b)| (a as f64 * b as f64).abs())
                .sum();
            let mut bound = (nb as f64 + 8.0) * f32::EPSILON as f64 * abs * 1.5;
            if ab > 0 {
                for (wb, xb) in wr.chunks_exact(ab).zip(xt.chunks_exact(ab)) {
                    let amax = xb.iter().fold(0.0f64, |a, &v| a.max(v.abs() as f64));
                    let wsum: f64 = wb.iter().map(|v| v.abs() as f64).sum();
                    bound += amax / 254.0 * wsum * (1.0 + 1e-5);
                }
            }
            let got = y[t * rows + r] as f64;
            assert!(
                (got - exact).abs() <= bound + 1e-30,
                "{} token {t} row {r}: got {got}, exact {exact}, bound {bound}",
                w.qtype()
            );
        }
    }
}

/// A column count valid for `q`, `k` blocks long (floats get an odd count).
fn cols_for(q: QType, k: usize) -> usize {
    if q.is_quantized() {
        q.block_size() * k
    } else {
        32 * k + 5
    }
}

/// Ensures that every format's product, at every ISA this CPU has, is within the activation
/// quantization bound of the f64 reference, for decode and prefill sizes and odd row counts.
#[test]
fn matmul_matches_reference_all_formats() {
    let pool = ThreadPool::new(2).expect("pool");
    let mut scratch = QScratch::new();
    for (qi, q) in QType::ALL.into_iter().enumerate() {
        let (rows, cols) = (13, cols_for(q, if q.block_size() == 256 { 2 } else { 5 }));
        let w = QMatrix::quantize(q, rows, cols, &normal(rows * cols, qi as u64)).expect("w");
        for m in [1, 3, 8, 33] {
            let x = normal(m * cols, 100 + m as u64);
            for isa in Isa::ALL.into_iter().filter(|&i| i <= isa::detected()) {
                let mut y = vec![f32::NAN; m * rows];
                w.matmul_isa(isa, &x, m, &mut y, &mut scratch, &pool)
                    .expect("matmul");
                check_product(&w, &x, m, &y);
            }
        }
    }
}

/// Ensures that every ISA this CPU has computes bit-identical products to the scalar path, for
/// every format, decode and prefill sizes (the `_x4` micro-kernel and its odd tail tokens), odd
/// block counts (the AVX-512 kernels' lone last block) and a product split over parallel tasks.
///
/// Bitwise, not within a tolerance: the served tokens must not depend on the machine's CPU, and
/// greedy decoding turns any last-bit difference at a near-tie into a different continuation.
#[test]
fn every_isa_is_bit_identical_to_scalar() {
    let pool = ThreadPool::new(2).expect("pool");
    let mut scratch = QScratch::new();
    for (qi, q) in QType::ALL.into_iter().enumerate() {
        for (rows, k) in [
            (301, if q.block_size() == 256 { 3 } else { 9 }),
            (7, 1),
            (5, 4),
        ] {
            let cols = cols_for(q, k);
            let seed = 7 + qi as u64 + 100 * k as u64;
            let w = QMatrix::quantize(q, rows, cols, &normal(rows * cols, seed)).expect("w");
            for m in [1, 4, 6, 9] {
                // Large activations and exact zero blocks as well as ordinary ones.
                let mut x: Vec<f32> = normal(m * cols, seed ^ 9)
                    .iter()
                    .enumerate()
                    .map(|(i, v)| v * (1 + i % 5) as f32 * 3.0)
                    .collect();
                x[..cols.min(32)].fill(0.0);
                let mut reference = vec![0.0; m * rows];
                w.matmul_isa(Isa::Scalar, &x, m, &mut reference, &mut scratch, &pool)
                    .expect("mm");
                for isa in Isa::ALL
                    .into_iter()
                    .filter(|&i| i > Isa::Scalar && i <= isa::detected())
                {
                    let mut y = vec![0.0; m * rows];
                    w.matmul_isa(isa, &x, m, &mut y, &mut scratch, &pool)
                        .expect("mm");
                    for (i, (a, b)) in y.iter().zip(&reference).enumerate() {
                        assert_eq!(
                            a.to_bits(),
                            b.to_bits(),
                            "{q} {} rows {rows} cols {cols} m {m} [{}, {}]: {a} vs scalar {b}",
                            isa.name(),
                            i / rows,
                            i % rows
                        );
                    }
                }
            }
        }
    }
}

/// Ensures that quantize → dequantize stays within each format's expected error: half a step
/// (one step where the format clamps one side) for the 32-blocks, and RMS bounds for K formats.
#[test]
fn round_trip_error_per_format() {
    let (rows, cols) = (16, 512);
    let x = normal(rows * cols, 42);
    let rms = (x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32).sqrt();
    for q in QType::ALL {
        let w = QMatrix::quantize(q, rows, cols, &x).expect("quantize");
        let y = w.dequantize();
        let err_rms = (x
            .iter()
            .zip(&y)
            .map(|(a, b)| (a - b) * (a - b))
            .sum::<f32>()
            / x.len() as f32)
            .sqrt();
        // Expected RMS: step / sqrt(12) with step ≈ range / levels; bounds leave ~1.5x margin.
        let rel = match q {
            QType::F32 => 0.0,
            QType::F16 => 1e-3,
            QType::BF16 => 5e-3,
            QType::Q8_0 => 0.01,
            QType::Q6K => 0.03,
            QType::Q5K => 0.06,
            QType::Q4_0 | QType::Q4_1 | QType::Q4K => 0.12,
        };
        assert!(
            err_rms <= rel * rms,
            "{q}: rms error {err_rms} vs data rms {rms}"
        );
        if matches!(q, QType::Q4_0 | QType::Q4_1 | QType::Q8_0) {
            let levels = match q {
                QType::Q8_0 => 254.0,
                _ => 15.0,
            };
            for (xb, yb) in x.chunks_exact(32).zip(y.chunks_exact(32)) {
                let lo = xb.iter().copied().fold(f32::INFINITY, f32::min);
                let hi = xb.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let amax = lo.abs().max(hi.abs());
                let step = if q == QType::Q4_1 {
                    (hi - lo) / levels
                } else {
                    2.0 * amax / levels
                };
                // Q4_0 maps the signed extreme to -8, so the other side may clamp by one step.
                let allowed = if q == QType::Q4_0 {
                    step * 1.2
                } else {
                    step * 0.5 * 1.01
                };
                for (a, b) in xb.iter().zip(yb) {
                    assert!((a - b).abs() <= allowed + amax * 2e-3, "{q}: {a} -> {b}");
                }
            }
        }
    }
}

/// Ensures that an all-zero matrix quantizes to exact zeros (no NaN from a zero scale).
#[test]
fn zero_blocks_stay_zero() {
    for q in QType::ALL {
        let cols = cols_for(q, 1);
        let w = QMatrix::quantize(q, 2, cols, &vec![0.0; 2 * cols]).expect("quantize");
        assert!(w.dequantize().iter().all(|&v| v == 0.0), "{q}");
    }
}

/// Ensures that our dequantization reads candle's (ggml's) bytes exactly as candle does, which
/// pins the block layouts byte for byte.
#[test]
fn dequantize_matches_candle() {
    use candle_core::quantized::QTensor;
    use candle_core::{Device, Tensor};
    let (rows, cols) = (4, 512);
    let x = normal(rows * cols, 5);
    let t = Tensor::from_vec(x, (rows, cols), &Device::Cpu).expect("tensor");
    for q in QType::ALL {
        let qt = QTensor::quantize(&t, q.to_ggml()).expect("candle quantize");
        let bytes = qt.data().expect("bytes").into_owned();
        let ours = QMatrix::from_bytes(q, rows, cols, bytes)
            .expect("from_bytes")
            .dequantize();
        let theirs: Vec<f32> = qt
            .dequantize(&Device::Cpu)
            .and_then(|d| d.flatten_all())
            .and_then(|d| d.to_vec1())
            .expect("candle dequantize");
        assert_eq!(ours, theirs, "{q}");
    }
}

/// Ensures that malformed shapes and buffers are typed errors naming the field.
#[test]
fn rejects_bad_shapes() {
    let field = |r: crate::Result<QMatrix>| match r {
        Err(KernelError::InvalidArgument { field, .. }) => field,
        other => panic!("expected InvalidArgument, got {other:?}"),
    };
    let q = QType::Q4_1;
    assert_eq!(field(QMatrix::from_bytes(q, 2, 64, vec![0; 79])), "bytes");
    assert_eq!(field(QMatrix::from_bytes(q, 2, 64, vec![0; 81])), "bytes");
    assert_eq!(field(QMatrix::from_bytes(q, 2, 48, vec![0; 60])), "cols");
    assert_eq!(field(QMatrix::from_bytes(q, 2, 0, vec![])), "cols");
    assert!(QMatrix::from_bytes(q, 2, 64, vec![0; 80]).is_ok());
    assert_eq!(field(QMatrix::quantize(q, 2, 64, &[0.0; 127])), "data");
    let mut nan = vec![0.0; 128];
    nan[77] = f32::NAN;
    assert_eq!(field(QMatrix::quantize(q, 2, 64, &nan)), "data");
    let w = QMatrix::quantize(q, 3, 64, &normal(192, 1)).expect("w");
    assert_eq!(field(w.slice_rows(2..4)), "range");
    assert_eq!(field(w.slice_rows(1..1)), "range");
    assert_eq!(field(w.slice_cols(32..32)), "range");
    assert_eq!(field(w.slice_cols(32..96)), "range");
    assert_eq!(field(w.slice_cols(16..64)), "cols");
    assert_eq!(field(w.slice_cols(0..48)), "cols");
    let mut out = vec![0.0; 64];
    assert!(matches!(
        w.dequantize_row(3, &mut out),
        Err(KernelError::InvalidArgument { field: "row", .. })
    ));
    assert!(matches!(
        w.dequantize_row(0, &mut out[..63]),
        Err(KernelError::InvalidArgument { field: "out", .. })
    ));
    let (pool, mut s) = (ThreadPool::new(1).expect("pool"), QScratch::new());
    let mut y = vec![0.0; 6];
    let e = w.matmul(&[0.0; 127], 2, &mut y, &mut s, &pool);
    assert!(matches!(
        e,
        Err(KernelError::InvalidArgument { field: "x", .. })
    ));
    let e = w.matmul(&[0.0; 128], 2, &mut y[..5], &mut s, &pool);
    assert!(matches!(
        e,
        Err(KernelError::InvalidArgument { field: "y", .. })
    ));
}

/// Ensures that row slices hold exactly the parent's rows and multiply like them.
#[test]
fn slice_rows_matches_parent() {
    let pool = ThreadPool::new(2).expect("pool");
    let mut s = QScratch::new();
    let (rows, cols) = (9, 96);
    let w = QMatrix::quantize(QType::Q4_1, rows, cols, &normal(rows * cols, 3)).expect("w");
    let part = w.slice_rows(3..7).expect("slice");
    assert_eq!(
        (part.rows(), part.cols(), part.nbytes()),
        (4, cols, 4 * w.row_bytes())
    );
    assert_eq!(part.dequantize(), w.dequantize()[3 * cols..7 * cols]);
    let x = normal(2 * cols, 4);
    let (mut full, mut sub) = (vec![0.0; 2 * rows], vec![0.0; 2 * 4]);
    w.matmul(&x, 2, &mut full, &mut s, &pool).expect("mm");
    part.matmul(&x, 2, &mut sub, &mut s, &pool).expect("mm");
    for t in 0..2 {
        assert_eq!(sub[t * 4..t * 4 + 4], full[t * rows + 3..t * rows + 7]);
    }
}

/// Ensures that column slices hold exactly the parent's columns, and that the products over
/// a split of the columns add up to the whole product up to f32 summation order only: the
/// activation blocks line up with the weight blocks, so no quantization error enters (a
/// misaligned split would move each output by the ~1e-2 activation quantization error).
#[test]
fn slice_cols_are_partial_sums() {
    let pool = ThreadPool::new(2).expect("pool");
    let mut s = QScratch::new();
    let (rows, m) = (7, 3);
    for (q, cuts) in [
        (QType::Q4_1, vec![0, 32, 96, 128]),
        (QType::Q8_0, vec![0, 64, 128]),
        (QType::Q4K, vec![0, 256, 768]),
        (QType::Q6K, vec![0, 512, 768]),
        (QType::F32, vec![0, 5, 64, 69]),
        (QType::F16, vec![0, 33, 40]),
    ] {
        let cols = *cuts.last().expect("cuts");
        let w = QMatrix::quantize(q, rows, cols, &normal(rows * cols, 21)).expect("w");
        let wd = w.dequantize();
        let x = normal(m * cols, 22);
        let mut full = vec![0.0; m * rows];
        w.matmul(&x, m, &mut full, &mut s, &pool).expect("mm");
        let mut sum = vec![0.0f32; m * rows];
        for c in cuts.windows(2) {
            let part = w.slice_cols(c[0]..c[1]).expect("slice");
            let n = c[1] - c[0];
            assert_eq!((part.rows(), part.cols()), (rows, n), "{q}");
            assert_eq!(part.nbytes(), rows * q.row_bytes(n), "{q}");
            let pd = part.dequantize();
            for r in 0..rows {
                assert_eq!(
                    pd[r * n..(r + 1) * n],
                    wd[r * cols + c[0]..r * cols + c[1]],
                    "{q} row {r}"
                );
            }
            let xs: Vec<f32> = x
                .chunks_exact(cols)
                .flat_map(|t| t[c[0]..c[1]].to_vec())
                .collect();
            let mut y = vec![0.0; m * rows];
            part.matmul(&xs, m, &mut y, &mut s, &pool).expect("mm");
            check_product(&part, &xs, m, &y);
            sum.iter_mut().zip(&y).for_each(|(a, b)| *a += b);
        }
        let ab = act_block(q).max(1);
        for t in 0..m {
            for r in 0..rows {
                let abs: f64 = (0..cols)
                    .map(|k| (f64::from(wd[r * cols + k]) * f64::from(x[t * cols + k])).abs())
                    .sum();
                // Two f32 summations of `cols / ab + parts` terms each, over quantized
                // activations whose magnitudes are within 1% of the inputs'.
                let terms = (cols / ab + cuts.len() + 8) as f64;
                let bound = 2.0 * terms * f64::from(f32::EPSILON) * abs * 1.01;
                let (a, b) = (sum[t * rows + r], full[t * rows + r]);
                assert!(
                    f64::from((a - b).abs()) <= bound,
                    "{q} token {t} row {r}: parts {a}, whole {b}, bound {bound}"
                );
            }
        }
    }
}

/// Ensures that a warm decode step reuses the scratch buffers instead of reallocating them.
#[test]
fn warm_scratch_does_not_grow() {
    let pool = ThreadPool::new(2).expect("pool");
    let mut s = QScratch::new();
    let w = QMatrix::quantize(QType::Q4_1, 64, 576, &normal(64 * 576, 8)).expect("w");
    let mut y = vec![0.0; 64];
    w.matmul(&normal(576, 1), 1, &mut y, &mut s, &pool)
        .expect("mm");
    let cap = s.capacity_bytes();
    for seed in 0..4 {
        w.matmul(&normal(576, seed), 1, &mut y, &mut s, &pool)
            .expect("mm");
        assert_eq!(s.capacity_bytes(), cap);
    }
    assert!(cap >= 18 * size_of::<BlockQ8>());
}

/// Ensures that the AVX2 activation quantizer is the one a real product uses and that its
/// blocks reproduce the scalar quantizer's on model-like data.
#[test]
fn activation_quantizers_agree_on_normal_data() {
    let x = normal(576, 77);
    let mut a = vec![BlockQ8::ZERO; 18];
    let mut b = vec![BlockQ8::ZERO; 18];
    quantize_q8_scalar(&x, &mut a);
    super::act::quantize_q8(&x, &mut b);
    for (p, q) in a.iter().zip(&b) {
        assert_eq!((p.d, p.s, p.qs), (q.d, q.s, q.qs));
    }
}

/// Ensures that real SmolLM2 tensors (Q4_1 and the Q8_0 embedding) load byte-exactly: our
/// dequantization equals candle's, and a product over them is within the reference bound.
#[test]
fn real_model_tensors() {
    use candle_core::Device;
    use candle_core::quantized::gguf_file;
    let Some(path) = tessera_testkit::smollm2_gguf() else {
        return;
    };
    let mut f = std::fs::File::open(&path).expect("open model");
    let content = gguf_file::Content::read(&mut f).expect("gguf");
    let pool = ThreadPool::new(2).expect("pool");
    let mut s = QScratch::new();
    for name in [
        "blk.0.ffn_down.weight",
        "blk.3.attn_k.weight",
        "token_embd.weight",
    ] {
        let qt = content.tensor(&mut f, name, &Device::Cpu).expect("tensor");
        let (rows, cols) = qt.shape().dims2().expect("2-D");
        let q = QType::from_ggml(qt.dtype()).expect("supported");
        let w = QMatrix::from_bytes(q, rows, cols, qt.data().expect("data").into_owned())
            .expect("from_bytes");
        // The embedding is large: check a slice of it to keep the test fast.
        let w = if rows > 4096 {
            w.slice_rows(1000..1400).expect("slice")
        } else {
            w
        };
        let theirs: Vec<f32> = qt
            .dequantize(&Device::Cpu)
            .and_then(|d| d.flatten_all())
            .and_then(|d| d.to_vec1())
            .expect("dequantize");
        let off = if rows > 4096 { 1000 * cols } else { 0 };
        assert_eq!(w.dequantize(), theirs[off..off + w.rows() * cols], "{name}");
        let x = normal(3 * cols, 11);
        let mut y = vec![0.0; 3 * w.rows()];
        w.matmul(&x, 3, &mut y, &mut s, &pool).expect("matmul");
        check_product(&w, &x, 3, &y);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    /// Ensures that random shapes, formats and token counts stay within the reference bound.
    #[test]
    fn random_shapes_within_bound(
        qi in 0usize..QType::ALL.len(),
        rows in 1usize..24,
        k in 1usize..4,
        m in 1usize..10,
        threads in 1usize..4,
        seed in 0u64..1000,
    ) {
        let q = QType::ALL[qi];
        let cols = cols_for(q, k);
        let w = QMatrix::quantize(q, rows, cols, &normal(rows * cols, seed)).expect("w");
        let x = normal(m * cols, seed + 1);
        let pool = ThreadPool::new(threads).expect("pool");
        let mut y = vec![f32::NAN; m * rows];
        w.matmul(&x, m, &mut y, &mut QScratch::new(), &pool).expect("matmul");
        check_product(&w, &x, m, &y);
    }
}
