//! Hidden states on the wire: rows of f32 in little-endian byte order, as `StepRequest.hidden`
//! carries them between stages. The round trip is exact (bit for bit), which is what keeps a
//! pipeline's arithmetic identical to one process.

use crate::error::WorkerError;

/// Appends `values` to `out` as little-endian f32 bytes.
pub fn encode_into(values: &[f32], out: &mut Vec<u8>) {
    out.reserve(values.len() * 4);
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
}

/// `values` as little-endian f32 bytes.
pub fn encode(values: &[f32]) -> Vec<u8> {
    let mut out = Vec::new();
    encode_into(values, &mut out);
    out
}

/// Decodes `bytes` holding `rows` rows of `width` f32 values into `out` (replacing its
/// contents).
///
/// # Errors
/// [`WorkerError::InvalidArgument`] on field `hidden` when the length is not exactly
/// `rows * width * 4` bytes.
pub fn decode_into(
    bytes: &[u8],
    rows: usize,
    width: usize,
    out: &mut Vec<f32>,
) -> Result<(), WorkerError> {
    let want = rows.checked_mul(width).and_then(|n| n.checked_mul(4));
    if want != Some(bytes.len()) {
        return Err(WorkerError::invalid(
            "hidden",
            format!(
                "{} bytes for {rows} tokens of width {width}; expected {} (f32 little-endian)",
                bytes.len(),
                rows.saturating_mul(width).saturating_mul(4)
            ),
        ));
    }
    out.clear();
    out.extend(
        bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Ensures that special values (signed zero, infinities, NaN payloads, subnormals) survive
    /// the round trip bit for bit.
    #[test]
    fn special_values_round_trip_exactly() {
        let values = [
            0.0f32,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::from_bits(0x7fc0_1234),
            f32::MIN_POSITIVE / 8.0,
            f32::MAX,
            -1.5,
        ];
        let bytes = encode(&values);
        assert_eq!(bytes.len(), values.len() * 4);
        assert_eq!(&bytes[8..12], &f32::INFINITY.to_le_bytes());
        let mut back = Vec::new();
        decode_into(&bytes, 2, 4, &mut back).expect("decode");
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&back), bits(&values));
    }

    /// Ensures that a length that does not match rows × width is rejected, naming `hidden`.
    #[test]
    fn wrong_length_is_rejected() {
        let bytes = encode(&[1.0; 6]);
        let mut out = vec![7.0];
        for (rows, width) in [(2, 4), (1, 5), (0, 6), (usize::MAX, 2)] {
            let err = decode_into(&bytes, rows, width, &mut out).expect_err("must fail");
            assert!(err.to_string().starts_with("hidden:"), "{err}");
        }
        assert!(decode_into(&bytes[..23], 2, 3, &mut out).is_err());
        assert_eq!(out, vec![7.0], "a failed decode leaves the buffer alone");
        decode_into(&[], 0, 576, &mut out).expect("empty is zero rows");
        assert!(out.is_empty());
    }

    proptest! {
        /// Ensures that any f32 bit pattern round-trips exactly.
        #[test]
        fn any_bits_round_trip(bits in proptest::collection::vec(any::<u32>(), 0..64)) {
            let values: Vec<f32> = bits.iter().map(|&b| f32::from_bits(b)).collect();
            let mut back = Vec::new();
            decode_into(&encode(&values), values.len(), 1, &mut back).expect("decode");
            let got: Vec<u32> = back.iter().map(|f| f.to_bits()).collect();
            prop_assert_eq!(got, bits);
        }
    }
}
