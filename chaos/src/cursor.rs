//! herald's stream cursors, decoded so the checker can see which position each delivered event
//! has (the harness treats herald as a black box and does not link its crates).
//!
//! A cursor is `base64url(no padding)` of unsigned LEB128 varints: the epoch, the number of
//! pairs, then `(partition, last delivered seq)` pairs. A stream of one channel touches one
//! partition, so the cursor an event carries names exactly that event's position.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};

/// An event's position: `(partition, seq)`, `seq` contiguous per partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Position {
    /// The partition.
    pub partition: u16,
    /// The sequence number within the partition.
    pub seq: u64,
}

impl Position {
    /// Parses herald's `P-SEQ` text (publish replies, gap notices).
    pub fn parse(text: &str) -> Option<Position> {
        let (p, s) = text.split_once('-')?;
        Some(Position {
            partition: p.parse().ok()?,
            seq: s.parse().ok()?,
        })
    }
}

impl std::fmt::Display for Position {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.partition, self.seq)
    }
}

/// A decoded cursor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    /// The store's epoch.
    pub epoch: u64,
    /// `(partition, seq)` pairs, as encoded.
    pub positions: Vec<Position>,
}

impl Cursor {
    /// Decodes a cursor; `None` when it is malformed.
    pub fn decode(text: &str) -> Option<Cursor> {
        let bytes = URL_SAFE_NO_PAD.decode(text.trim().as_bytes()).ok()?;
        let mut rest = &bytes[..];
        let epoch = varint(&mut rest)?;
        let count = varint(&mut rest)?;
        if count > rest.len() as u64 {
            return None;
        }
        let mut positions = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let partition = u16::try_from(varint(&mut rest)?).ok()?;
            let seq = varint(&mut rest)?;
            positions.push(Position { partition, seq });
        }
        rest.is_empty().then_some(Cursor { epoch, positions })
    }

    /// The single position of a one-partition cursor (what every single-channel stream carries).
    pub fn single(&self) -> Option<Position> {
        match self.positions.as_slice() {
            [one] => Some(*one),
            _ => None,
        }
    }
}

fn varint(buf: &mut &[u8]) -> Option<u64> {
    let mut value: u64 = 0;
    for (i, &byte) in buf.iter().enumerate() {
        let shift = 7 * i as u32;
        if shift >= 64 {
            return None;
        }
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            *buf = &buf[i + 1..];
            return Some(value);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(epoch: u64, pairs: &[(u64, u64)]) -> String {
        let mut buf = Vec::new();
        let mut put = |mut v: u64| {
            while v >= 0x80 {
                buf.push((v as u8) | 0x80);
                v >>= 7;
            }
            buf.push(v as u8);
        };
        put(epoch);
        put(pairs.len() as u64);
        for &(p, s) in pairs {
            put(p);
            put(s);
        }
        URL_SAFE_NO_PAD.encode(&buf)
    }

    #[test]
    fn decodes_what_herald_encodes() {
        let text = encode(0xdead_beef_1234, &[(3, 300)]);
        let cursor = Cursor::decode(&text).unwrap();
        assert_eq!(cursor.epoch, 0xdead_beef_1234);
        assert_eq!(
            cursor.single(),
            Some(Position {
                partition: 3,
                seq: 300
            })
        );
        assert!(Cursor::decode("!!").is_none());
        assert!(Cursor::decode(&text[..text.len() - 2]).is_none());
    }

    #[test]
    fn parses_position_text() {
        assert_eq!(
            Position::parse("7-42"),
            Some(Position {
                partition: 7,
                seq: 42
            })
        );
        assert_eq!(Position::parse("x"), None);
    }
}
