//! Leadership hand-back: a partition's leadership returns to its preferred node (the first
//! voter of its [`crate::node::placement`]) once that node is back and caught up, so that
//! after a failover and a restart the leaders spread over the nodes again instead of staying
//! where the failovers put them (after a rolling restart, one node would lead every
//! partition and do the work of all of them).
//!
//! openraft 0.9 has no leadership transfer, and a voter refuses every vote while the lease of
//! the leader it last heard runs (`election_timeout_max`). So the leader makes itself silent:
//!
//! 1. It closes the partition's [`RoundGate`]: its proposer starts no round, and the round in
//!    flight finishes (publishes meanwhile wait in the proposer's queue: nothing is lost).
//! 2. It checks that the preferred node holds its whole log, turns its heartbeats off and asks
//!    that node to take over ([`crate::message::AppRequest::TakeOver`]).
//! 3. The preferred node waits until it has not heard the leader for the lease plus
//!    [`TAKEOVER_MARGIN`] (so the third voter's lease has run out too) and calls an election.
//!    It wins it: no log is longer than its own, and it asks before any other voter's timer
//!    fires (those wait the lease plus at least `election_timeout_min`).
//! 4. The old leader turns its heartbeats back on and opens the gate once it sees another
//!    leader, or after [`HANDOFF_LIMIT`] leases; then it simply goes on leading. Its queued
//!    publishes go to the new leader like any publish to a follower.
//!
//! A partition is unavailable for about a lease (~0.4 s) while it moves. A node moves one
//! partition at a time, and only to a node that has been caught up for [`READY_ROUNDS`]
//! placement rounds in a row, so a node that flaps gets nothing back.

use std::sync::Arc;
use std::time::Duration;

use herald_storage::raft::NodeId;

/// Held shared by a proposer for each round it proposes as leader; held exclusively by a
/// hand-back while the partition is silent.
pub(crate) type RoundGate = Arc<tokio::sync::RwLock<()>>;

/// How long after the lease the taking node waits before its election, so that the third
/// voter (which may have heard the leader a moment later) is past its lease too.
pub const TAKEOVER_MARGIN: Duration = Duration::from_millis(50);

/// A hand-back gives up after this many leases without a new leader.
pub const HANDOFF_LIMIT: u32 = 3;

/// Placement rounds (one a second) the preferred node must have been caught up in, in a row,
/// before it gets its partition back.
pub const READY_ROUNDS: u32 = 3;

/// Which partitions this node should hand back, from what it sees as their leader.
#[derive(Debug)]
pub struct HandBacks {
    /// Per group: placement rounds in a row in which the preferred node was ready.
    ready: Vec<u32>,
}

impl HandBacks {
    /// Tracking for `groups` groups.
    pub fn new(groups: usize) -> HandBacks {
        HandBacks {
            ready: vec![0; groups],
        }
    }

    /// Records one placement round's look at `group` (which this node leads): whether its
    /// preferred node is another voter holding the whole log. Returns that node once it has
    /// been so for [`READY_ROUNDS`] rounds in a row.
    pub fn observe(&mut self, group: usize, ready: Option<NodeId>) -> Option<NodeId> {
        let slot = self.ready.get_mut(group)?;
        match ready {
            Some(node) => {
                *slot = slot.saturating_add(1);
                (*slot >= READY_ROUNDS).then_some(node)
            }
            None => {
                *slot = 0;
                None
            }
        }
    }

    /// Starts over for `group` (after a hand-back was tried, or this node stopped leading it).
    pub fn reset(&mut self, group: usize) {
        if let Some(slot) = self.ready.get_mut(group) {
            *slot = 0;
        }
    }
}

/// The node `group` should be handed to, if any: its `preferred` node when that is not this
/// node (`me`), is one of the group's `voters`, and has replicated up to `last_log_index`
/// (`matched`: the leader's replication progress of that node).
pub fn hand_back_target(
    me: NodeId,
    preferred: Option<NodeId>,
    voters: &[NodeId],
    last_log_index: Option<u64>,
    matched: Option<u64>,
) -> Option<NodeId> {
    let preferred = preferred?;
    (preferred != me
        && voters.contains(&preferred)
        && matched >= last_log_index
        && matched.is_some())
    .then_some(preferred)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_caught_up_preferred_voter_other_than_the_leader() {
        let voters = [1, 2, 3];
        assert_eq!(
            hand_back_target(2, Some(1), &voters, Some(10), Some(10)),
            Some(1)
        );
        assert_eq!(
            hand_back_target(1, Some(1), &voters, Some(10), Some(10)),
            None,
            "leads it already"
        );
        assert_eq!(
            hand_back_target(2, Some(1), &voters, Some(10), Some(9)),
            None,
            "behind"
        );
        assert_eq!(
            hand_back_target(2, Some(1), &voters, Some(10), None),
            None,
            "unknown"
        );
        assert_eq!(
            hand_back_target(2, Some(4), &voters, Some(10), Some(10)),
            None,
            "a learner"
        );
        assert_eq!(hand_back_target(2, None, &voters, Some(10), Some(10)), None);
    }

    #[test]
    fn a_target_must_stay_ready_for_some_rounds_in_a_row() {
        let mut hand_backs = HandBacks::new(3);
        for _ in 1..READY_ROUNDS {
            assert_eq!(hand_backs.observe(1, Some(7)), None);
        }
        assert_eq!(
            hand_backs.observe(1, None),
            None,
            "a round behind starts over"
        );
        for _ in 1..READY_ROUNDS {
            assert_eq!(hand_backs.observe(1, Some(7)), None);
        }
        assert_eq!(hand_backs.observe(1, Some(7)), Some(7));
        hand_backs.reset(1);
        assert_eq!(hand_backs.observe(1, Some(7)), None);
        assert_eq!(hand_backs.observe(9, Some(7)), None, "no such group");
    }
}
