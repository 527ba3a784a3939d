//! Tests of the float-weight path (`matmul_float` and its kernels): every kernel gives every
//! (row, token) pair exactly the portable `dot`'s bits, at every shape, ISA and thread count,
//! and the products are within the serial-summation bound of an f64 reference.
//!
//! Error bound of a float product (weights exact after widening, so only summation rounds):
//! one serial chain of `n` fused multiply-adds rounds `n` times, so with `u = 2⁻²⁴` the result
//! is within `n · u · Σ|w x|` of the exact sum (first order; the typical error is near
//! `√n · u · Σ|w x|`).

use super::tests::normal;
use super::{QMatrix, QScratch, QType};
use crate::ThreadPool;
use crate::isa::{self, Isa};

/// The float formats.
const FLOATS: [QType; 3] = [QType::F32, QType::F16, QType::BF16];

/// Every ISA this CPU has that runs SIMD float kernels.
fn simd_isas() -> Vec<Isa> {
    Isa::ALL
        .into_iter()
        .filter(|&i| i >= Isa::Avx2 && i <= isa::detected())
        .collect()
}

/// Activations with a spread of magnitudes and an exact-zero stretch.
fn activations(m: usize, cols: usize, seed: u64) -> Vec<f32> {
    let mut x: Vec<f32> = normal(m * cols, seed)
        .iter()
        .enumerate()
        .map(|(i, v)| v * (1 + i % 7) as f32)
        .collect();
    x[..cols.min(20)].fill(0.0);
    x
}

/// Asserts `y` equals `reference` bit for bit, naming the first differing (token, row).
fn assert_bits(y: &[f32], reference: &[f32], rows: usize, what: &str) {
    for (i, (a, b)) in y.iter().zip(reference).enumerate() {
        assert_eq!(
            a.to_bits(),
            b.to_bits(),
            "{what} [token {}, row {}]: {a} vs {b}",
            i / rows,
            i % rows
        );
    }
}

/// Ensures that packing transposes rows into panels exactly (f16/bf16 widened exactly), with
/// zero rows past the given ones, for every panel height and for lengths around the 8- and
/// 16-element blocks.
#[test]
fn pack_transposes_exactly() {
    #[cfg(target_arch = "x86_64")]
    {
        use super::matmul_float::{BF16, F16, F32};
        use super::{float_avx2 as v2, float_avx512 as v5};
        type Pack = unsafe fn(&[&[u8]], usize, &mut [f32]);
        for (qi, q) in FLOATS.into_iter().enumerate() {
            for k in [1, 7, 8, 9, 16, 17, 40] {
                let w = QMatrix::quantize(q, 32, k, &normal(32 * k, 3 + k as u64)).expect("w");
                let wd = w.dequantize();
                let mut packs: Vec<(usize, Pack)> = Vec::new();
                if isa::detected() >= Isa::Avx2 {
                    packs.push((
                        v2::PANEL,
                        [v2::pack::<F32>, v2::pack::<F16>, v2::pack::<BF16>][qi],
                    ));
                }
                if isa::detected() >= Isa::Avx512 {
                    packs.push((
                        v5::PANEL,
                        [v5::pack::<F32>, v5::pack::<F16>, v5::pack::<BF16>][qi],
                    ));
                }
                for (panel, pack) in packs {
                    for n in 1..=panel {
                        let rows: Vec<&[u8]> = (0..n).map(|r| w.row(r)).collect();
                        let mut out = vec![f32::NAN; panel * k];
                        // SAFETY: the ISA is detected; n ≤ panel rows of k elements; out holds
                        // panel · k values.
                        unsafe { pack(&rows, k, &mut out) };
                        for kk in 0..k {
                            for j in 0..panel {
                                let want = if j < n { wd[j * k + kk] } else { 0.0 };
                                let got = out[kk * panel + j];
                                assert_eq!(got.to_bits(), want.to_bits(), "{q} k {k} n {n}");
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Ensures that the SIMD float kernels give every pair the portable `dot`'s bits, for every
/// float format and every ISA this CPU has, at odd shapes: token counts that leave partial
/// token groups (decode's single token included), row counts that leave partial panels and
/// partial tasks, column counts below and between the vector widths, and 1–3 threads. The
/// portable `_x4`/`_r4` kernels (the scalar ISA) must give the same bits too.
#[test]
fn simd_float_kernels_equal_portable_dot() {
    let mut scratch = QScratch::new();
    for threads in [1, 2, 3] {
        let pool = ThreadPool::new(threads).expect("pool");
        for (qi, q) in FLOATS.into_iter().enumerate() {
            for (rows, cols) in [(301, 71), (6, 5), (9, 16), (47, 387), (33, 1), (40, 24)] {
                let seed = 31 * qi as u64 + cols as u64;
                let w = QMatrix::quantize(q, rows, cols, &normal(rows * cols, seed)).expect("w");
                for m in [1, 3, 5, 9, 15, 16, 17, 29, 40] {
                    let x = activations(m, cols, seed + m as u64);
                    let mut pairs = vec![0.0; m * rows];
                    w.matmul_pairs(Isa::Scalar, &x, m, &mut pairs, &pool)
                        .expect("mm");
                    for isa in std::iter::once(Isa::Scalar).chain(simd_isas()) {
                        let mut y = vec![f32::NAN; m * rows];
                        w.matmul_isa(isa, &x, m, &mut y, &mut scratch, &pool)
                            .expect("mm");
                        let what = format!("{q} {} {rows}x{cols} m {m} t {threads}", isa.name());
                        assert_bits(&y, &pairs, rows, &what);
                    }
                }
            }
        }
    }
}

/// Ensures that products whose tasks span several packed row blocks still give every pair the
/// portable `dot`'s bits, for a decode step and a prefill.
#[test]
fn row_blocks_are_bit_identical_to_pairs() {
    let pool = ThreadPool::new(2).expect("pool");
    let (rows, cols) = (301, 1031);
    let w = QMatrix::quantize(QType::F32, rows, cols, &normal(rows * cols, 5)).expect("w");
    for m in [2, 40] {
        let x = activations(m, cols, 6);
        let mut pairs = vec![0.0; m * rows];
        w.matmul_pairs(Isa::Scalar, &x, m, &mut pairs, &pool)
            .expect("mm");
        for isa in simd_isas() {
            let mut y = vec![0.0; m * rows];
            w.matmul_isa(isa, &x, m, &mut y, &mut QScratch::new(), &pool)
                .expect("mm");
            assert_bits(&y, &pairs, rows, &format!("{} m {m}", isa.name()));
        }
    }
}

/// Ensures that the float products are within the serial-summation bound of the f64 product
/// (module docs) at the encoder's shapes and odd ones, at every ISA and format, and
/// reports the largest error measured in units of `u · Σ|w x|` (`--nocapture`).
#[test]
fn float_products_match_f64_reference() {
    let pool = ThreadPool::new(2).expect("pool");
    for q in FLOATS {
        for (rows, cols, m) in [(48, 384, 20), (24, 1536, 17), (11, 101, 13), (40, 384, 3)] {
            let w = QMatrix::quantize(q, rows, cols, &normal(rows * cols, 8)).expect("w");
            let wd = w.dequantize();
            let x = activations(m, cols, 9);
            let mut worst = 0.0f64;
            for isa in Isa::ALL.into_iter().filter(|&i| i <= isa::detected()) {
                let mut y = vec![0.0; m * rows];
                w.matmul_isa(isa, &x, m, &mut y, &mut QScratch::new(), &pool)
                    .expect("mm");
                let u = f64::from(f32::EPSILON) / 2.0;
                for t in 0..m {
                    for r in 0..rows {
                        let (wr, xt) =
                            (&wd[r * cols..(r + 1) * cols], &x[t * cols..(t + 1) * cols]);
                        let terms = wr
                            .iter()
                            .zip(xt)
                            .map(|(&a, &b)| f64::from(a) * f64::from(b));
                        let exact: f64 = terms.clone().sum();
                        let abs: f64 = terms.map(f64::abs).sum::<f64>().max(f64::MIN_POSITIVE);
                        let err = (f64::from(y[t * rows + r]) - exact).abs() / (u * abs);
                        assert!(err <= cols as f64, "{q} {} ({t}, {r}): {err} u", isa.name());
                        worst = worst.max(err);
                    }
                }
            }
            println!("{q} {rows}x{cols} m {m}: max error {worst:.2} u·Σ|wx| (bound {cols})");
        }
    }
}
