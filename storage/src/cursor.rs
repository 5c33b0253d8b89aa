//! Cursors: the last delivered `seq` per partition of one stream, in a short URL-safe form.
//!
//! A cursor is what the SSE `id:` field carries (so `Last-Event-ID` is a full cursor), what
//! WebSocket clients send to resume, and what RESP extensions accept. It is opaque to clients.
//!
//! ## Wire form
//!
//! `base64url(no padding)` of a byte string of unsigned LEB128 varints:
//!
//! ```text
//! epoch  count  (partition seq){count}
//! ```
//!
//! with the pairs in ascending partition order. A random epoch takes 10 bytes, so a cursor for
//! one partition is 15-17 bytes, 20-23 characters. [`Cursor::decode`] accepts pairs in any order
//! and non-minimal varints, but rejects anything else with a one-line [`CursorError`]; it never
//! panics and never allocates more than the input can describe.

use std::collections::BTreeMap;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use crate::event::{Epoch, Partition, Position};

/// The longest cursor string [`Cursor::decode`] looks at: enough for every one of 65,536
/// partitions with a 10-byte seq, so no valid cursor is ever refused for its size.
pub const MAX_CURSOR_LEN: usize = 1_200_000;

/// The last delivered `seq` for each partition a stream touches, within one [`Epoch`].
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Cursor {
    /// The epoch the positions belong to; a cursor from another epoch is unknown.
    pub epoch: Epoch,
    positions: BTreeMap<Partition, u64>,
}

/// Why a cursor string was rejected. `Display` is a one-line reason fit for a client.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CursorError {
    /// The string was empty.
    #[error("cursor is empty")]
    Empty,
    /// The string was longer than [`MAX_CURSOR_LEN`].
    #[error("cursor is too long")]
    TooLong,
    /// The string was not base64url without padding.
    #[error("cursor is not base64url")]
    NotBase64,
    /// The bytes ended inside a number or before the announced pairs.
    #[error("cursor is truncated")]
    Truncated,
    /// Bytes were left after the announced pairs.
    #[error("cursor has trailing bytes")]
    TrailingBytes,
    /// A number did not fit in 64 bits.
    #[error("cursor has a number out of range")]
    NumberOutOfRange,
    /// A partition number was above 65535.
    #[error("cursor names partition {0}, above 65535")]
    PartitionOutOfRange(u64),
    /// The same partition appeared twice.
    #[error("cursor repeats partition {0}")]
    RepeatedPartition(Partition),
}

impl Cursor {
    /// An empty cursor of `epoch`: nothing delivered yet on any partition.
    pub fn new(epoch: Epoch) -> Self {
        Cursor {
            epoch,
            positions: BTreeMap::new(),
        }
    }

    /// The last delivered seq of partition `p`, if the cursor has one.
    pub fn get(&self, p: Partition) -> Option<u64> {
        self.positions.get(&p).copied()
    }

    /// Records that `pos` was delivered: partition `pos.partition` moves to `max(current, seq)`,
    /// so replaying an old event never moves a cursor back.
    pub fn advance(&mut self, pos: Position) {
        let e = self.positions.entry(pos.partition).or_insert(pos.seq);
        if *e < pos.seq {
            *e = pos.seq;
        }
    }

    /// The recorded positions, in ascending partition order.
    pub fn positions(&self) -> impl Iterator<Item = Position> + '_ {
        self.positions
            .iter()
            .map(|(&partition, &seq)| Position { partition, seq })
    }

    /// How many partitions the cursor records.
    pub fn len(&self) -> usize {
        self.positions.len()
    }

    /// Whether the cursor records no partition.
    pub fn is_empty(&self) -> bool {
        self.positions.is_empty()
    }

    /// The wire form (see the module docs): URL-safe, no padding, deterministic.
    pub fn encode(&self) -> String {
        let mut buf = Vec::with_capacity(12 + self.positions.len() * 8);
        put_varint(&mut buf, self.epoch.0);
        put_varint(&mut buf, self.positions.len() as u64);
        for (&p, &seq) in &self.positions {
            put_varint(&mut buf, u64::from(p));
            put_varint(&mut buf, seq);
        }
        URL_SAFE_NO_PAD.encode(&buf)
    }

    /// Parses the wire form. Rejects malformed input with a [`CursorError`]; never panics.
    pub fn decode(s: &str) -> Result<Cursor, CursorError> {
        if s.is_empty() {
            return Err(CursorError::Empty);
        }
        if s.len() > MAX_CURSOR_LEN {
            return Err(CursorError::TooLong);
        }
        let bytes = URL_SAFE_NO_PAD
            .decode(s.as_bytes())
            .map_err(|_| CursorError::NotBase64)?;
        let mut r = Reader { buf: &bytes };
        let epoch = Epoch(r.varint()?);
        let count = r.varint()?;
        // Every pair takes at least two bytes: a count beyond that is a truncated cursor, and
        // checking it first keeps a hostile count from driving the loop.
        if count > (r.buf.len() / 2) as u64 {
            return Err(CursorError::Truncated);
        }
        let mut positions = BTreeMap::new();
        for _ in 0..count {
            let p = r.varint()?;
            let seq = r.varint()?;
            let p = Partition::try_from(p).map_err(|_| CursorError::PartitionOutOfRange(p))?;
            if positions.insert(p, seq).is_some() {
                return Err(CursorError::RepeatedPartition(p));
            }
        }
        if !r.buf.is_empty() {
            return Err(CursorError::TrailingBytes);
        }
        Ok(Cursor { epoch, positions })
    }
}

impl std::fmt::Display for Cursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.encode())
    }
}

impl std::str::FromStr for Cursor {
    type Err = CursorError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Cursor::decode(s)
    }
}

fn put_varint(buf: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        buf.push((v as u8) | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl Reader<'_> {
    fn varint(&mut self) -> Result<u64, CursorError> {
        let mut v: u64 = 0;
        for (i, &b) in self.buf.iter().enumerate() {
            let shift = 7 * i as u32;
            let bits = u64::from(b & 0x7f);
            // The 10th byte may only carry the top bit of a u64; an 11th never fits.
            if shift >= 64 || (shift == 63 && bits > 1) {
                return Err(CursorError::NumberOutOfRange);
            }
            v |= bits << shift;
            if b & 0x80 == 0 {
                self.buf = &self.buf[i + 1..];
                return Ok(v);
            }
        }
        Err(CursorError::Truncated)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn raw(bytes: &[u8]) -> String {
        URL_SAFE_NO_PAD.encode(bytes)
    }

    #[test]
    fn advance_takes_the_max() {
        let mut c = Cursor::new(Epoch(7));
        assert_eq!(c.get(3), None);
        c.advance(Position::new(3, 10));
        c.advance(Position::new(3, 4));
        c.advance(Position::new(1, 2));
        assert_eq!(c.get(3), Some(10));
        assert_eq!(c.get(1), Some(2));
        assert_eq!(
            c.positions().collect::<Vec<_>>(),
            vec![Position::new(1, 2), Position::new(3, 10)]
        );
        assert_eq!(c.len(), 2);
    }

    #[test]
    fn one_partition_cursor_is_short_and_url_safe() {
        let mut c = Cursor::new(Epoch(u64::MAX));
        c.advance(Position::new(15, 1_000_000));
        let s = c.encode();
        assert!(s.len() <= 23, "{s} is {} chars", s.len());
        assert!(
            s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        );
        assert_eq!(Cursor::decode(&s).unwrap(), c);
        assert_eq!(s.parse::<Cursor>().unwrap(), c);
        assert_eq!(c.to_string(), s);
    }

    #[test]
    fn errors_are_one_line_reasons() {
        let cases: Vec<(String, &str)> = vec![
            (String::new(), "cursor is empty"),
            ("a+b/".into(), "cursor is not base64url"),
            ("abc=".into(), "cursor is not base64url"),
            ("A".into(), "cursor is not base64url"),
            (raw(&[0x81]), "cursor is truncated"),
            (raw(&[1]), "cursor is truncated"),
            (raw(&[1, 2, 0]), "cursor is truncated"),
            (raw(&[1, 1, 3, 5, 9]), "cursor has trailing bytes"),
            (raw(&[1, 2, 3, 5, 3, 6]), "cursor repeats partition 3"),
            (
                raw(&[1, 1, 0x80, 0x80, 0x04, 1]),
                "cursor names partition 65536, above 65535",
            ),
            (raw(&[0xff; 11]), "cursor has a number out of range"),
            (
                raw(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02]),
                "cursor has a number out of range",
            ),
        ];
        for (input, want) in cases {
            let err = Cursor::decode(&input).unwrap_err();
            assert_eq!(err.to_string(), want, "input {input:?}");
        }
        let max = raw(&[
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01, 0,
        ]);
        assert_eq!(Cursor::decode(&max).unwrap().epoch, Epoch(u64::MAX));
    }

    #[test]
    fn decode_accepts_any_pair_order() {
        let c = Cursor::decode(&raw(&[9, 2, 5, 1, 2, 7])).unwrap();
        assert_eq!(c.epoch, Epoch(9));
        assert_eq!(c.get(5), Some(1));
        assert_eq!(c.get(2), Some(7));
    }

    fn arb_cursor() -> impl Strategy<Value = Cursor> {
        (
            any::<u64>(),
            proptest::collection::btree_map(any::<u16>(), any::<u64>(), 0..20),
        )
            .prop_map(|(e, positions)| Cursor {
                epoch: Epoch(e),
                positions,
            })
    }

    proptest! {
        #[test]
        fn round_trip(c in arb_cursor()) {
            let s = c.encode();
            prop_assert_eq!(Cursor::decode(&s).unwrap(), c);
        }

        #[test]
        fn garbage_strings_never_panic(s in ".{0,80}") {
            let _ = Cursor::decode(&s);
        }

        #[test]
        fn garbage_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..64)) {
            if let Ok(c) = Cursor::decode(&raw(&b)) {
                // Whatever decodes re-encodes to something that decodes to the same cursor.
                prop_assert_eq!(Cursor::decode(&c.encode()).unwrap(), c);
            }
        }
    }
}
