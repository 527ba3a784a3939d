//! Frames of the tensor-parallel group protocol, on a plain byte stream.
//!
//! A frame is `len: u32 LE` (the bytes after it), `kind: u8`, then the kind's fields, all
//! little-endian. f32 payloads use the encoding of hidden states between stages
//! (`crate::hidden`), bit-exact: the reduction's determinism depends on it. A length above [`MAX_FRAME_BYTES`] or a frame whose fields do not fill it exactly is refused
//! before anything is allocated for it, so a peer cannot make this process allocate at will.

use std::io::{self, Read, Write};

use crate::hidden;

/// Largest frame accepted: a sanity bound, not a size anything approaches — partials travel in
/// chunks of [`CHUNK_VALUES`] values and a step frame leaves its hidden states out; the
/// largest frames left are a big batch's logits slices and step requests (token ids).
pub(crate) const MAX_FRAME_BYTES: usize = 1 << 30;

const HELLO: u8 = 1;
const STEP: u8 = 2;
const CLOSE: u8 = 3;
const PARTIAL: u8 = 4;
const LOGITS: u8 = 5;
const ABORT: u8 = 6;
const PING: u8 = 7;
const PONG: u8 = 8;

/// One message between group members.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Frame {
    /// The first frame of a connection: rank `from` of the group of plan epoch `epoch` dials
    /// rank `to`.
    Hello {
        /// Plan epoch of the group.
        epoch: u64,
        /// The dialling rank.
        from: u32,
        /// The rank it means to reach.
        to: u32,
    },
    /// Rank 0 hands a step to the other ranks: the `StepRequest` it received, encoded.
    Step {
        /// The group's step number (every frame of the step carries it).
        tag: u64,
        /// Rank 0's inbound stream the step belongs to.
        stream: u64,
        /// The encoded `StepRequest`.
        request: Vec<u8>,
    },
    /// Rank 0's inbound stream ended: free what it created.
    Close {
        /// The stream.
        stream: u64,
    },
    /// A rank's partial sum at one reduction point.
    Partial {
        /// The step.
        tag: u64,
        /// Global layer.
        layer: u32,
        /// Reduction point (see [`super::point_code`]).
        point: u8,
        /// The values, (n, hidden).
        data: Vec<f32>,
    },
    /// A rank's vocabulary slice of the logits, for rank 0.
    Logits {
        /// The step.
        tag: u64,
        /// Rows (sampling sequences).
        rows: u32,
        /// (rows, vocab slice) values.
        data: Vec<f32>,
    },
    /// The sender failed the step; nobody should wait for its frames.
    Abort {
        /// The step.
        tag: u64,
        /// Why.
        message: String,
    },
    /// A latency probe.
    Ping {
        /// Echoed back.
        nonce: u64,
    },
    /// The answer to [`Frame::Ping`].
    Pong {
        /// The ping's nonce.
        nonce: u64,
    },
}

/// Appends the frame header for a body of `body` bytes of kind `kind`.
fn header(out: &mut Vec<u8>, kind: u8, body: usize) {
    // The length counts the kind byte; callers keep bodies under MAX_FRAME_BYTES.
    out.extend_from_slice(&((body + 1) as u32).to_le_bytes());
    out.push(kind);
}

/// Values in one [`Frame::Partial`]: a longer partial (a long prompt's hidden states, a ring's
/// K/V block) travels as several frames of at most this many values (4 MiB), so no frame
/// grows with the prompt and nothing near [`MAX_FRAME_BYTES`] is ever sent.
pub(crate) const CHUNK_VALUES: usize = 1 << 20;

/// Set in a partial's point on every chunk but the last of one partial.
pub(crate) const MORE: u8 = 0x80;

/// Encodes `data` as [`Frame::Partial`] chunks of at most `chunk` values, back to back, into
/// `out` (cleared first): one frame when it fits (an empty partial too), otherwise every
/// frame but the last has [`MORE`] set in its point. The receiver appends the chunks in order
/// (`Wire::exchange_partials`).
pub(crate) fn encode_partial(out: &mut Vec<u8>, tag: u64, layer: u32, point: u8, data: &[f32]) {
    encode_partial_chunks(out, tag, layer, point, data, CHUNK_VALUES);
}

/// [`encode_partial`] with a chosen chunk size (tests use small ones).
pub(crate) fn encode_partial_chunks(
    out: &mut Vec<u8>,
    tag: u64,
    layer: u32,
    point: u8,
    data: &[f32],
    chunk: usize,
) {
    out.clear();
    push_chunks(out, tag, layer, point, data.len(), chunk, |out, r| {
        hidden::encode_into(&data[r], out);
    });
}

/// Appends f32 values already in their little-endian bytes (a `StepRequest.hidden`) to `out`
/// as [`Frame::Partial`] chunks of at most [`CHUNK_VALUES`] values, as [`encode_partial`]
/// would encode them.
pub(crate) fn append_partial_bytes(out: &mut Vec<u8>, tag: u64, layer: u32, point: u8, le: &[u8]) {
    debug_assert!(le.len().is_multiple_of(4));
    push_chunks(
        out,
        tag,
        layer,
        point,
        le.len() / 4,
        CHUNK_VALUES,
        |out, r| {
            out.extend_from_slice(&le[r.start * 4..r.end * 4]);
        },
    );
}

/// Appends the chunk frames of a partial of `n` values; `payload` appends the bytes of the
/// values in a range.
fn push_chunks(
    out: &mut Vec<u8>,
    tag: u64,
    layer: u32,
    point: u8,
    n: usize,
    chunk: usize,
    mut payload: impl FnMut(&mut Vec<u8>, std::ops::Range<usize>),
) {
    debug_assert!(point & MORE == 0 && chunk > 0);
    let mut at = 0;
    loop {
        let end = n.min(at + chunk);
        let point = if end < n { point | MORE } else { point };
        header(out, PARTIAL, 8 + 4 + 1 + (end - at) * 4);
        out.extend_from_slice(&tag.to_le_bytes());
        out.extend_from_slice(&layer.to_le_bytes());
        out.push(point);
        payload(out, at..end);
        if end == n {
            return;
        }
        at = end;
    }
}

/// Encodes a [`Frame::Logits`] from a borrowed slice into `out` (cleared first).
pub(crate) fn encode_logits(out: &mut Vec<u8>, tag: u64, rows: u32, data: &[f32]) {
    out.clear();
    header(out, LOGITS, 8 + 4 + data.len() * 4);
    out.extend_from_slice(&tag.to_le_bytes());
    out.extend_from_slice(&rows.to_le_bytes());
    hidden::encode_into(data, out);
}

impl Frame {
    /// The frame's bytes, header included, into `out` (cleared first).
    pub(crate) fn encode_into(&self, out: &mut Vec<u8>) {
        out.clear();
        match self {
            Self::Hello { epoch, from, to } => {
                header(out, HELLO, 16);
                out.extend_from_slice(&epoch.to_le_bytes());
                out.extend_from_slice(&from.to_le_bytes());
                out.extend_from_slice(&to.to_le_bytes());
            }
            Self::Step {
                tag,
                stream,
                request,
            } => {
                header(out, STEP, 16 + request.len());
                out.extend_from_slice(&tag.to_le_bytes());
                out.extend_from_slice(&stream.to_le_bytes());
                out.extend_from_slice(request);
            }
            Self::Close { stream } => {
                header(out, CLOSE, 8);
                out.extend_from_slice(&stream.to_le_bytes());
            }
            Self::Partial {
                tag,
                layer,
                point,
                data,
            } => encode_partial(out, *tag, *layer, *point, data),
            Self::Logits { tag, rows, data } => encode_logits(out, *tag, *rows, data),
            Self::Abort { tag, message } => {
                header(out, ABORT, 8 + message.len());
                out.extend_from_slice(&tag.to_le_bytes());
                out.extend_from_slice(message.as_bytes());
            }
            Self::Ping { nonce } => {
                header(out, PING, 8);
                out.extend_from_slice(&nonce.to_le_bytes());
            }
            Self::Pong { nonce } => {
                header(out, PONG, 8);
                out.extend_from_slice(&nonce.to_le_bytes());
            }
        }
    }

    /// Writes the frame to `w`.
    pub(crate) fn write_to(&self, w: &mut impl Write) -> io::Result<()> {
        let mut out = Vec::new();
        self.encode_into(&mut out);
        w.write_all(&out)
    }

    /// Reads one frame from `r`.
    ///
    /// # Errors
    /// The stream's error or end (`UnexpectedEof`), or `InvalidData` for a frame that is
    /// too long, of an unknown kind, or whose fields do not fill it exactly.
    pub(crate) fn read_from(r: &mut impl Read) -> io::Result<Self> {
        let mut len = [0u8; 4];
        r.read_exact(&mut len)?;
        let len = u32::from_le_bytes(len) as usize;
        if len == 0 || len > MAX_FRAME_BYTES {
            return Err(invalid(format!("frame of {len} bytes")));
        }
        let mut body = vec![0u8; len];
        r.read_exact(&mut body)?;
        Self::decode(&body)
    }

    /// Parses the whole frame at the start of `buf`, if it has all arrived: the frame and the
    /// number of bytes it took, or `None` while `buf` holds only part of one.
    ///
    /// # Errors
    /// `InvalidData` as for [`Frame::read_from`] (a bad length is refused as soon as the
    /// header is in, before the body arrives).
    pub(crate) fn parse(buf: &[u8]) -> io::Result<Option<(Self, usize)>> {
        let Some(head) = buf.get(..4) else {
            return Ok(None);
        };
        let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
        if len == 0 || len > MAX_FRAME_BYTES {
            return Err(invalid(format!("frame of {len} bytes")));
        }
        let Some(body) = buf.get(4..4 + len) else {
            return Ok(None);
        };
        Ok(Some((Self::decode(body)?, 4 + len)))
    }

    /// Decodes a frame body (kind byte first).
    fn decode(body: &[u8]) -> io::Result<Self> {
        let mut c = Cursor { b: &body[1..] };
        let frame = match body[0] {
            HELLO => Self::Hello {
                epoch: c.u64()?,
                from: c.u32()?,
                to: c.u32()?,
            },
            STEP => Self::Step {
                tag: c.u64()?,
                stream: c.u64()?,
                request: c.rest().to_vec(),
            },
            CLOSE => Self::Close { stream: c.u64()? },
            PARTIAL => Self::Partial {
                tag: c.u64()?,
                layer: c.u32()?,
                point: c.u8()?,
                data: c.f32s()?,
            },
            LOGITS => Self::Logits {
                tag: c.u64()?,
                rows: c.u32()?,
                data: c.f32s()?,
            },
            ABORT => Self::Abort {
                tag: c.u64()?,
                message: String::from_utf8_lossy(c.rest()).into_owned(),
            },
            PING => Self::Ping { nonce: c.u64()? },
            PONG => Self::Pong { nonce: c.u64()? },
            k => return Err(invalid(format!("unknown frame kind {k}"))),
        };
        if !c.b.is_empty() {
            return Err(invalid(format!(
                "{} bytes left over in a frame of kind {}",
                c.b.len(),
                body[0]
            )));
        }
        Ok(frame)
    }
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// Reads fields off a frame body.
struct Cursor<'a> {
    b: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> io::Result<&'a [u8]> {
        if self.b.len() < n {
            return Err(invalid("frame ends inside a field".into()));
        }
        let (head, tail) = self.b.split_at(n);
        self.b = tail;
        Ok(head)
    }

    fn u8(&mut self) -> io::Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> io::Result<u32> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> io::Result<u64> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }

    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.b)
    }

    fn f32s(&mut self) -> io::Result<Vec<f32>> {
        let rest = self.rest();
        if !rest.len().is_multiple_of(4) {
            return Err(invalid(
                "f32 payload is not a whole number of values".into(),
            ));
        }
        Ok(rest
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn round_trip(f: &Frame) -> Frame {
        let mut out = Vec::new();
        f.encode_into(&mut out);
        Frame::read_from(&mut out.as_slice()).expect("decodes")
    }

    /// Ensures that every kind of frame survives encoding and decoding unchanged, f32 bits
    /// included.
    #[test]
    fn every_kind_round_trips() {
        let frames = [
            Frame::Hello {
                epoch: 7,
                from: 2,
                to: 0,
            },
            Frame::Step {
                tag: 9,
                stream: 3,
                request: vec![1, 2, 3],
            },
            Frame::Close { stream: 4 },
            Frame::Partial {
                tag: 1,
                layer: 29,
                point: 2,
                data: vec![-0.0, f32::INFINITY, 1e-42, 3.5],
            },
            Frame::Logits {
                tag: 5,
                rows: 1,
                data: vec![1.0, -2.0],
            },
            Frame::Abort {
                tag: 6,
                message: "KV cache is full".into(),
            },
            Frame::Ping { nonce: 11 },
            Frame::Pong { nonce: 11 },
        ];
        for f in &frames {
            let back = round_trip(f);
            match (f, &back) {
                (Frame::Partial { data: a, .. }, Frame::Partial { data: b, .. }) => {
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(a), bits(b));
                }
                _ => assert_eq!(f, &back),
            }
        }
    }

    /// Ensures that a length beyond the bound, an unknown kind, a short field and left-over
    /// bytes are refused as invalid data.
    #[test]
    fn malformed_frames_are_refused() {
        let huge = ((MAX_FRAME_BYTES + 1) as u32).to_le_bytes();
        let cases: Vec<Vec<u8>> = vec![
            huge.to_vec(),
            vec![0, 0, 0, 0],
            vec![1, 0, 0, 0, 99],
            vec![3, 0, 0, 0, CLOSE, 1, 2],
            vec![10, 0, 0, 0, CLOSE, 1, 2, 3, 4, 5, 6, 7, 8, 9],
            vec![6, 0, 0, 0, LOGITS, 0, 0, 0, 0, 0],
        ];
        for bytes in cases {
            let err = Frame::read_from(&mut bytes.as_slice()).expect_err("refused");
            assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{bytes:?}: {err}");
        }
    }

    /// Ensures that a stream cut inside a frame reads as its end, not as a frame.
    #[test]
    fn truncated_stream_is_an_eof() {
        let mut out = Vec::new();
        Frame::Ping { nonce: 1 }.encode_into(&mut out);
        out.pop();
        let err = Frame::read_from(&mut out.as_slice()).expect_err("cut");
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    /// Ensures that parsing a buffer finds nothing in a partial frame, the frame and its
    /// length once whole, and refuses a bad length from the header alone.
    #[test]
    fn parse_waits_for_whole_frames() {
        let mut out = Vec::new();
        Frame::Close { stream: 5 }.encode_into(&mut out);
        let n = out.len();
        out.extend_from_slice(&[9, 9]);
        for cut in 0..n {
            assert!(
                Frame::parse(&out[..cut]).expect("partial").is_none(),
                "{cut}"
            );
        }
        let (f, used) = Frame::parse(&out).expect("whole").expect("a frame");
        assert_eq!((f, used), (Frame::Close { stream: 5 }, n));
        let huge = ((MAX_FRAME_BYTES + 1) as u32).to_le_bytes();
        assert!(Frame::parse(&huge).is_err());
    }

    /// Ensures that a partial longer than a chunk becomes frames of at most the chunk size,
    /// every one but the last marked [`MORE`], whose values in order are the partial's; that
    /// an empty partial is one frame; and that the bytes form of a hidden state encodes the
    /// same frames as its values.
    #[test]
    fn long_partials_travel_in_bounded_chunks() {
        let data: Vec<f32> = (0..10).map(|i| i as f32 * 0.5 - 1.0).collect();
        for chunk in [1, 3, 4, 10, 11] {
            let mut out = Vec::new();
            encode_partial_chunks(&mut out, 7, 2, 16, &data, chunk);
            let mut rest = out.as_slice();
            let mut got = Vec::new();
            let mut points = Vec::new();
            while let Some((f, used)) = Frame::parse(rest).expect("parses") {
                rest = &rest[used..];
                let Frame::Partial {
                    tag: 7,
                    layer: 2,
                    point,
                    data,
                } = f
                else {
                    panic!("not a partial of step 7, layer 2: {f:?}");
                };
                assert!(data.len() <= chunk);
                got.extend(data);
                points.push(point);
            }
            assert!(rest.is_empty());
            assert_eq!(got, data, "chunk {chunk}");
            let frames = data.len().div_ceil(chunk);
            assert_eq!(points.len(), frames, "chunk {chunk}");
            assert_eq!(points.last(), Some(&16));
            assert!(points[..frames - 1].iter().all(|&p| p == 16 | MORE));
        }
        let mut out = Vec::new();
        encode_partial(&mut out, 1, 0, 2, &[]);
        let (f, used) = Frame::parse(&out).expect("parses").expect("a frame");
        assert_eq!(used, out.len());
        assert!(matches!(f, Frame::Partial { point: 2, ref data, .. } if data.is_empty()));
        let mut values = Vec::new();
        encode_partial(&mut values, 3, 0, 32, &data);
        let mut bytes = Vec::new();
        append_partial_bytes(&mut bytes, 3, 0, 32, &hidden::encode(&data));
        assert_eq!(values, bytes);
    }

    proptest! {
        /// Ensures that arbitrary bytes never panic the decoder.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = Frame::read_from(&mut bytes.as_slice());
        }

        /// Ensures that partial sums round-trip bit for bit.
        #[test]
        fn partials_round_trip(bits in proptest::collection::vec(any::<u32>(), 0..64)) {
            let data: Vec<f32> = bits.iter().map(|&b| f32::from_bits(b)).collect();
            let mut out = Vec::new();
            encode_partial(&mut out, 3, 4, 1, &data);
            let Frame::Partial { data: back, .. } = Frame::read_from(&mut out.as_slice()).expect("decodes")
            else { panic!("kind") };
            prop_assert_eq!(back.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), bits);
        }
    }
}
