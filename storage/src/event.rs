//! The event and its position: what a durable publish becomes once it is applied.
//!
//! An event's [`Position`] is `(partition, seq)`. The channel decides the partition
//! ([`partition_of`]); the partition's next sequence number is assigned at apply time, so `seq` is
//! contiguous per partition, never reused, and the same on every node that applies the same log.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// A partition number, `0..partitions`. Each partition has its own sequence space (and, in a
/// cluster, its own Raft group).
pub type Partition = u16;

/// Where an event sits in the history: its partition and its sequence number in that partition.
///
/// `seq` starts at 1 in every partition (0 means "nothing yet" wherever a seq is reported) and is
/// contiguous: every seq of a partition belongs to exactly one event, whatever its channel.
/// Ordering is by partition, then seq; only positions of one partition are comparable in time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Position {
    /// The partition the event's channel hashes to.
    pub partition: Partition,
    /// The event's sequence number in its partition (1-based).
    pub seq: u64,
}

impl Position {
    /// A position from its parts.
    pub const fn new(partition: Partition, seq: u64) -> Self {
        Position { partition, seq }
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.partition, self.seq)
    }
}

/// The identity of one store's (later: one cluster's) sequence spaces, chosen at random when the
/// store is created. Positions and cursors only mean something within their epoch: a cursor from
/// another epoch is treated as unknown.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Epoch(pub u64);

impl Epoch {
    /// A fresh random, non-zero epoch (seeded by the OS through std's hasher keys, mixed with the
    /// clock and the process id, so no extra dependency is needed for it).
    pub fn random() -> Self {
        use std::collections::hash_map::RandomState;
        use std::hash::{BuildHasher, Hasher};
        let mut h = RandomState::new().build_hasher();
        h.write_u128(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0),
        );
        h.write_u32(std::process::id());
        let v = h.finish();
        Epoch(if v == 0 { 1 } else { v })
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// One applied, durable event: what the hub delivers and what history replays.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Where the event sits in its partition.
    pub position: Position,
    /// The channel it was published to (binary-safe, as in Redis).
    pub channel: Bytes,
    /// The published payload, untouched.
    pub payload: Bytes,
    /// The publisher's message id, if it gave one (used for dedup).
    pub message_id: Option<Bytes>,
    /// Milliseconds since the Unix epoch at apply time (the `now_ms` the batch was applied with).
    pub timestamp_ms: u64,
}

/// The partition a channel belongs to: `xxh3_64(channel) % partitions`.
///
/// This mapping is part of the on-disk and on-wire contract and must never change: xxh3 with
/// seed 0 (the `xxhash-rust` crate's `xxh3_64`) is a fixed, platform-independent function, and the
/// partition count is fixed when a store (cluster) is created. `partitions` must be non-zero.
pub fn partition_of(channel: &[u8], partitions: u16) -> Partition {
    debug_assert!(partitions > 0, "partition count must be non-zero");
    let n = u64::from(partitions.max(1));
    (xxhash_rust::xxh3::xxh3_64(channel) % n) as Partition
}

/// Milliseconds since the Unix epoch from the system clock: the `now_ms` callers pass to apply
/// and the clock reads use for TTL when no explicit time is given.
pub fn unix_now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_of_is_stable() {
        // These values pin the mapping: if this test fails, existing data would move partitions.
        let p = partition_of(b"job_progress:job_1", 16);
        assert_eq!(
            p,
            (xxhash_rust::xxh3::xxh3_64(b"job_progress:job_1") % 16) as u16
        );
        assert_eq!(partition_of(b"", 16), (0x2D06800538D394C2u64 % 16) as u16);
        assert_eq!(partition_of(b"anything", 1), 0);
        for c in [&b"a"[..], b"b", b"chan:1", b"\x00\xff"] {
            assert!(partition_of(c, 7) < 7);
            assert_eq!(partition_of(c, 7), partition_of(c, 7));
        }
    }

    #[test]
    fn partitions_spread() {
        let mut seen = [0u32; 16];
        for i in 0..1600 {
            seen[partition_of(format!("ch:{i}").as_bytes(), 16) as usize] += 1;
        }
        assert!(seen.iter().all(|&n| n > 50), "{seen:?}");
    }

    #[test]
    fn epoch_is_random_and_non_zero() {
        let a = Epoch::random();
        let b = Epoch::random();
        assert_ne!(a.0, 0);
        assert_ne!(a, b);
        assert_eq!(format!("{}", Epoch(255)), "00000000000000ff");
    }

    #[test]
    fn position_orders_by_partition_then_seq() {
        assert!(Position::new(0, 9) < Position::new(1, 1));
        assert!(Position::new(1, 1) < Position::new(1, 2));
        assert_eq!(Position::new(3, 42).to_string(), "3-42");
    }
}
