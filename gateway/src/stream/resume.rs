//! When a resume cursor cannot be served without a gap, and why: the one rule that SSE,
//! WebSocket and `HSUBSCRIBE` (through [`EventStream`](super::EventStream)) and `HISTORY`
//! follow, so that they tell a client the same thing for the same cursor.
//!
//! In order, for one channel's partition:
//!
//! 1. a cursor of another epoch (another store) names nothing this store can match: `epoch`,
//!    and the history is read from the oldest retained event;
//! 2. on a single node, a cursor past what the node committed names events it no longer has
//!    (events reach clients only after commit, so its data directory was restored from an
//!    older copy, and the positions past its head are being given to other events): `ahead`,
//!    read like another epoch's. A cluster node may be behind the node the cursor came from,
//!    so there it is no gap;
//! 3. otherwise the history is read after the cursor's seq for the partition (0 when the
//!    cursor does not name it), and events after it have left retention when that seq is below
//!    the channel's retention floor: `retention`. The floor, not the oldest retained seq, is
//!    the test: seqs are per partition and shared by many channels, so `oldest > seq + 1`
//!    does not prove a loss.

use super::Gap;
use bytes::Bytes;
use herald_storage::{Cursor, Epoch, Partition, Position};
use std::fmt;

/// Why a resume cannot give everything after the client's cursor (the `reason` of a gap
/// notice, in every protocol).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GapReason {
    /// Events after the cursor have left retention.
    Retention,
    /// The cursor is from another store (another epoch): nothing it names can be matched.
    Epoch,
    /// A single node was asked to resume after events it never committed: its data directory
    /// was probably restored from an older copy.
    Ahead,
}

impl GapReason {
    /// The reason as clients see it: `retention`, `epoch` or `ahead`.
    pub fn as_str(self) -> &'static str {
        match self {
            GapReason::Retention => "retention",
            GapReason::Epoch => "epoch",
            GapReason::Ahead => "ahead",
        }
    }
}

impl fmt::Display for GapReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a gap notice says beyond the channel and the oldest retained position: what the client
/// asked for and why it cannot have all of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GapCause {
    /// The position after which the client asked to resume (`None` for another epoch's
    /// cursor, which names nothing here).
    pub requested: Option<Position>,
    /// Why.
    pub reason: GapReason,
}

impl GapCause {
    /// The notice for `channel`, whose oldest retained event is at `oldest`.
    pub fn notice(self, channel: Bytes, oldest: Option<Position>) -> Gap {
        Gap {
            channel,
            requested: self.requested,
            oldest,
            reason: self.reason,
        }
    }
}

/// Where a resume from a cursor starts in one partition, and whether it is served with a gap
/// (see the module docs for the rules). Decided in two steps because callers read the
/// retention floor at different times: [`Resume::new`] before reading history (it says where
/// to read from), [`Resume::gap`] with the floor (a stream reads it at open and its replay
/// reports later drops; `HISTORY` reads it after its read, so that drops during it are told).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resume {
    partition: Partition,
    /// The cursor's seq for the partition (0 when it does not name it).
    seq: u64,
    /// `Epoch` or `Ahead`: the cursor cannot be matched, history is read from the start.
    unmatched: Option<GapReason>,
}

impl Resume {
    /// Resuming `cursor` in `partition` on a node whose store has `epoch`, that has committed
    /// `partition` up to seq `committed`; `single_node` is false for a cluster node.
    pub fn new(
        cursor: &Cursor,
        partition: Partition,
        epoch: Epoch,
        committed: u64,
        single_node: bool,
    ) -> Resume {
        let seq = cursor.get(partition).unwrap_or(0);
        let unmatched = if cursor.epoch != epoch {
            Some(GapReason::Epoch)
        } else if single_node && seq > committed {
            Some(GapReason::Ahead)
        } else {
            None
        };
        Resume {
            partition,
            seq,
            unmatched,
        }
    }

    /// Read the partition's history after this seq; `None`: from the oldest retained event
    /// (the cursor cannot be matched here).
    pub fn after(&self) -> Option<u64> {
        match self.unmatched {
            Some(_) => None,
            None => Some(self.seq),
        }
    }

    /// The gap to tell the client first, if any. `retention_floor` is the channel's
    /// [`Store::retention_floor`](herald_storage::Store::retention_floor); it only matters
    /// when [`Resume::after`] is `Some`, so a caller may skip reading it (and pass 0) otherwise.
    pub fn gap(&self, retention_floor: u64) -> Option<GapCause> {
        let requested = Position {
            partition: self.partition,
            seq: self.seq,
        };
        match self.unmatched {
            Some(GapReason::Epoch) => Some(GapCause {
                requested: None,
                reason: GapReason::Epoch,
            }),
            Some(reason) => Some(GapCause {
                requested: Some(requested),
                reason,
            }),
            None if self.seq < retention_floor => Some(GapCause {
                requested: Some(requested),
                reason: GapReason::Retention,
            }),
            None => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HERE: Epoch = Epoch(7);

    fn cursor(epoch: Epoch, positions: &[(Partition, u64)]) -> Cursor {
        let mut cursor = Cursor::new(epoch);
        for &(partition, seq) in positions {
            cursor.advance(Position { partition, seq });
        }
        cursor
    }

    fn at(partition: Partition, seq: u64) -> Option<Position> {
        Some(Position { partition, seq })
    }

    /// A cursor of this store, within what is committed and retained: read after it, no gap.
    #[test]
    fn a_cursor_within_retention_has_no_gap() {
        let c = cursor(HERE, &[(2, 10)]);
        for single_node in [true, false] {
            let resume = Resume::new(&c, 2, HERE, 10, single_node);
            assert_eq!(resume.after(), Some(10));
            assert_eq!(resume.gap(0), None);
            // The floor at the cursor: the client had the last event retention dropped.
            assert_eq!(resume.gap(10), None);
        }
    }

    /// Below the retention floor: read after the cursor (what is retained), told first.
    #[test]
    fn a_cursor_below_the_retention_floor_is_a_retention_gap() {
        let c = cursor(HERE, &[(2, 10)]);
        let resume = Resume::new(&c, 2, HERE, 50, true);
        assert_eq!(resume.after(), Some(10));
        assert_eq!(
            resume.gap(11),
            Some(GapCause {
                requested: at(2, 10),
                reason: GapReason::Retention
            })
        );
        // A cursor that does not name the partition asks for all of it, from seq 0.
        let resume = Resume::new(&cursor(HERE, &[(5, 3)]), 2, HERE, 50, false);
        assert_eq!(resume.after(), Some(0));
        assert_eq!(
            resume.gap(1),
            Some(GapCause {
                requested: at(2, 0),
                reason: GapReason::Retention
            })
        );
        assert_eq!(resume.gap(0), None);
    }

    /// Another store's cursor: nothing requested can be named, everything retained is read,
    /// whatever its seqs and the floor, on a single node or in a cluster.
    #[test]
    fn a_cursor_of_another_epoch_is_an_epoch_gap() {
        let c = cursor(Epoch(8), &[(2, 1_000)]);
        for single_node in [true, false] {
            let resume = Resume::new(&c, 2, HERE, 10, single_node);
            assert_eq!(resume.after(), None);
            let want = Some(GapCause {
                requested: None,
                reason: GapReason::Epoch,
            });
            assert_eq!(resume.gap(0), want);
            assert_eq!(resume.gap(5_000), want);
        }
    }

    /// Past what a single node committed: an `ahead` gap, read from the start (the floor does
    /// not turn it into `retention`). A cluster node may just be behind: no gap there.
    #[test]
    fn a_cursor_ahead_of_a_single_node_is_an_ahead_gap() {
        let c = cursor(HERE, &[(2, 11)]);
        let resume = Resume::new(&c, 2, HERE, 10, true);
        assert_eq!(resume.after(), None);
        let want = Some(GapCause {
            requested: at(2, 11),
            reason: GapReason::Ahead,
        });
        assert_eq!(resume.gap(0), want);
        assert_eq!(resume.gap(20), want);

        let clustered = Resume::new(&c, 2, HERE, 10, false);
        assert_eq!(clustered.after(), Some(11));
        assert_eq!(clustered.gap(0), None);
        // Only the partition asked about counts: the cursor is not ahead in partition 3.
        let other = Resume::new(&cursor(HERE, &[(2, 11), (3, 4)]), 3, HERE, 4, true);
        assert_eq!(other.after(), Some(4));
        assert_eq!(other.gap(0), None);
    }

    /// The reasons' texts are part of every protocol's gap notice.
    #[test]
    fn reasons_read_as_clients_see_them() {
        assert_eq!(GapReason::Retention.to_string(), "retention");
        assert_eq!(GapReason::Epoch.to_string(), "epoch");
        assert_eq!(GapReason::Ahead.as_str(), "ahead");
    }
}
