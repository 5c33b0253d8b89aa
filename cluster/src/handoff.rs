//! Leadership hand-back: a partition's leadership returns to its preferred node (the first
//! voter of its [`crate::node::placement`]) once that node is back and caught up, so that
//! after a failover and a restart the leaders spread over the nodes again instead of staying
//! where the failovers put them (after a rolling restart, one node would lead every
//! partition and do the work of all of them).
//!
//! openraft 0.9 has no leadership transfer, but its rules make one easy to build: a voter
//! refuses votes while the lease of the leader it follows runs, yet a *leader* grants a
//! higher-term vote to any candidate whose log is at least as long as its own once it has led
//! for a lease (its own vote's timestamp is set when it is elected and never refreshed), and
//! steps down. With the leader's vote, the candidate has a quorum of two. So:
//!
//! 1. The leader closes the partition's [`PartitionGate`]: its proposer starts no round, the
//!    round in flight finishes, and publishes other nodes forward to it are turned away at
//!    once as "not the leader" (retried, as certainly not proposed). Its own clients'
//!    publishes wait in the proposer's queue: nothing is lost.
//! 2. It waits until the preferred node holds its whole log, everything applied, and asks it
//!    to take over ([`crate::message::AppRequest::TakeOver`]).
//! 3. The preferred node checks it is a voter that follows this leader, holds as much log
//!    (applied) and reaches the group's other voters (a ping each: leading while cut off from
//!    them would leave them without a leader), answers, and calls an election at once. The
//!    leader grants it; the node wins.
//! 4. The leader opens the gate once it sees it no longer leads (at most [`HANDOFF_LIMIT`]
//!    leases; an explicit refusal opens it at once). Its queued publishes then go to the new
//!    leader like any publish to a follower.
//!
//! Only a leader that has led for [`READY_ROUNDS`] placement rounds in one term (seconds,
//! more than a lease) hands back, only in a plain group of at most three voters (where its
//! vote and the taker's are a quorum), and only to a node that has been nearly caught up for
//! as many rounds in a row, so a node that flaps gets nothing. A node hands back one
//! partition at a time; after a hand-back that did not move the leadership, or one whose
//! partition came back within [`KEPT_ROUNDS`], that partition waits twice as long (up to
//! [`MAX_BACKOFF_ROUNDS`]) before the next try.
//!
//! While a hand-back runs, a node that forwarded a publish to the old leader and sees the new
//! one still waits for the old leader's answer (it is alive: see `proposer`), so even
//! publishes without message ids do not fail.

use std::sync::atomic::{AtomicBool, Ordering};

use herald_storage::raft::NodeId;

/// A partition's gate on this node: held shared by its proposer for each round it proposes as
/// leader, exclusively by a hand-back, which also sets `closing` for its whole duration.
#[derive(Debug, Default)]
pub struct PartitionGate {
    /// Rounds hold it shared, a hand-back exclusively.
    pub(crate) rounds: tokio::sync::RwLock<()>,
    closing: AtomicBool,
}

impl PartitionGate {
    /// Whether a hand-back of the partition is under way here: forwarded publishes are turned
    /// away meanwhile.
    pub fn closing(&self) -> bool {
        self.closing.load(Ordering::Acquire)
    }

    /// Marks a hand-back under way until the returned guard drops.
    pub(crate) fn start_closing(&self) -> Closing<'_> {
        self.closing.store(true, Ordering::Release);
        Closing(self)
    }
}

/// See [`PartitionGate::start_closing`].
pub(crate) struct Closing<'a>(&'a PartitionGate);

impl Drop for Closing<'_> {
    fn drop(&mut self) {
        self.0.closing.store(false, Ordering::Release);
    }
}

/// A hand-back gives up waiting for another leader after this many leases.
pub const HANDOFF_LIMIT: u32 = 3;

/// Placement rounds (one a second) the preferred node must have been nearly caught up in, in
/// a row (and this node the leader), before it gets its partition back.
pub const READY_ROUNDS: u32 = 3;

/// The most placement rounds a partition waits between two failed hand-backs.
pub const MAX_BACKOFF_ROUNDS: u32 = 300;

/// A partition this node leads again within this many rounds of handing it back counts as a
/// failed hand-back (the node that took it could not keep it), for the backoff.
pub const KEPT_ROUNDS: u64 = 60;

/// "Nearly caught up": the preferred node is at most this many entries behind. (The hand-back
/// itself waits, with the gate closed, until it holds every entry; under steady load the
/// leader always has a few entries not acknowledged yet.)
pub const READY_LAG: u64 = 100;

/// Which partitions this node should hand back, from what it sees as their leader.
#[derive(Debug)]
pub struct HandBacks {
    /// Per group: placement rounds in a row, all in one term, in which the preferred node was
    /// ready.
    ready: Vec<u32>,
    /// Per group: the term of those rounds.
    term: Vec<u64>,
    /// Per group: rounds needed (grows after failed hand-backs).
    needed: Vec<u32>,
    /// Per group: the round of its last successful hand-back, while it may still count as
    /// failed (see [`KEPT_ROUNDS`]).
    handed_at: Vec<Option<u64>>,
    /// Placement rounds seen.
    round: u64,
    /// The group being handed back now, if any.
    running: Option<usize>,
}

impl HandBacks {
    /// Tracking for `groups` groups.
    pub fn new(groups: usize) -> HandBacks {
        HandBacks {
            ready: vec![0; groups],
            term: vec![0; groups],
            needed: vec![READY_ROUNDS; groups],
            handed_at: vec![None; groups],
            round: 0,
            running: None,
        }
    }

    /// Starts a placement round.
    pub fn next_round(&mut self) {
        self.round += 1;
    }

    /// Records one placement round's look at `group`, which this node leads in `term`: the
    /// node it would hand `group` to, if any (see [`hand_back_target`]). Returns that node
    /// once it has been ready for long enough in this term (so this node has led for more
    /// than a lease) and no other hand-back runs; the caller then starts the hand-back and
    /// reports with [`HandBacks::finished`].
    pub fn observe(&mut self, group: usize, term: u64, ready: Option<NodeId>) -> Option<NodeId> {
        if group >= self.ready.len() {
            return None;
        }
        if let Some(at) = self.handed_at[group].take()
            && self.round.saturating_sub(at) < KEPT_ROUNDS
        {
            // Handed back, and leading it again already: the other node could not keep it.
            self.needed[group] = self.needed[group].saturating_mul(2).min(MAX_BACKOFF_ROUNDS);
        }
        if self.term[group] != term {
            self.term[group] = term;
            self.ready[group] = 0;
        }
        let slot = &mut self.ready[group];
        let Some(node) = ready else {
            *slot = 0;
            return None;
        };
        *slot = slot.saturating_add(1);
        if *slot < self.needed[group] || self.running.is_some() {
            return None;
        }
        *slot = 0;
        self.running = Some(group);
        Some(node)
    }

    /// Starts over for `group` (this node does not lead it); a backoff ends once the
    /// hand-back it follows is past [`KEPT_ROUNDS`].
    pub fn reset(&mut self, group: usize) {
        if let Some(slot) = self.ready.get_mut(group) {
            *slot = 0;
            if self.handed_at[group].is_none_or(|at| self.round.saturating_sub(at) >= KEPT_ROUNDS) {
                self.handed_at[group] = None;
                self.needed[group] = READY_ROUNDS;
            }
        }
    }

    /// The hand-back of `group` ended: `moved` if the leadership left this node. A failed one
    /// doubles the rounds the group waits before the next.
    pub fn finished(&mut self, group: usize, moved: bool) {
        if self.running == Some(group) {
            self.running = None;
        }
        if let Some(needed) = self.needed.get_mut(group) {
            if moved {
                self.handed_at[group] = Some(self.round);
            } else {
                *needed = needed.saturating_mul(2).min(MAX_BACKOFF_ROUNDS);
            }
        }
    }
}

/// The node `group` should be handed to, if any: its `preferred` node when that is not this
/// node (`me`), is one of the group's `voters`, and has replicated up to `last_log_index`
/// within [`READY_LAG`] entries (`matched`: the leader's replication progress of that node).
pub fn hand_back_target(
    me: NodeId,
    preferred: Option<NodeId>,
    voters: &[NodeId],
    last_log_index: Option<u64>,
    matched: Option<u64>,
) -> Option<NodeId> {
    let preferred = preferred?;
    let caught_up =
        matched.is_some_and(|m| m.saturating_add(READY_LAG) >= last_log_index.unwrap_or(0));
    (preferred != me && voters.contains(&preferred) && caught_up).then_some(preferred)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_nearly_caught_up_preferred_voter_other_than_the_leader() {
        let voters = [1, 2, 3];
        let target =
            |me, preferred, matched| hand_back_target(me, preferred, &voters, Some(1_000), matched);
        assert_eq!(target(2, Some(1), Some(1_000)), Some(1));
        assert_eq!(
            target(2, Some(1), Some(900)),
            Some(1),
            "a few entries in flight"
        );
        assert_eq!(target(2, Some(1), Some(899)), None, "behind");
        assert_eq!(target(2, Some(1), None), None, "unknown");
        assert_eq!(target(1, Some(1), Some(1_000)), None, "leads it already");
        assert_eq!(target(2, Some(4), Some(1_000)), None, "a learner");
        assert_eq!(target(2, None, Some(1_000)), None);
    }

    /// One placement round in which `group` (led in `term`) has `ready` as its target.
    fn round(h: &mut HandBacks, group: usize, term: u64, ready: Option<NodeId>) -> Option<NodeId> {
        h.next_round();
        h.observe(group, term, ready)
    }

    #[test]
    fn one_at_a_time_after_enough_rounds_in_one_term_with_backoff_after_failures() {
        let mut h = HandBacks::new(3);
        for _ in 1..READY_ROUNDS {
            assert_eq!(round(&mut h, 1, 5, Some(7)), None);
        }
        assert_eq!(
            round(&mut h, 1, 5, None),
            None,
            "a round behind starts over"
        );
        for _ in 1..READY_ROUNDS {
            assert_eq!(round(&mut h, 1, 5, Some(7)), None);
        }
        assert_eq!(round(&mut h, 1, 6, Some(7)), None, "a new term starts over");
        for _ in 2..READY_ROUNDS {
            assert_eq!(round(&mut h, 1, 6, Some(7)), None);
            assert_eq!(h.observe(2, 6, Some(8)), None);
        }
        assert_eq!(round(&mut h, 1, 6, Some(7)), Some(7));
        assert_eq!(h.observe(2, 6, Some(8)), None, "one at a time");
        h.finished(1, false);
        assert_eq!(round(&mut h, 2, 6, Some(8)), Some(8));
        h.finished(2, true);
        // Group 1 failed once: it now needs twice the rounds.
        for _ in 1..2 * READY_ROUNDS {
            assert_eq!(round(&mut h, 1, 6, Some(7)), None);
        }
        assert_eq!(round(&mut h, 1, 6, Some(7)), Some(7));
        assert_eq!(h.observe(9, 6, Some(7)), None, "no such group");
    }

    #[test]
    fn a_partition_back_soon_after_its_hand_back_counts_as_failed_and_backoff_ends() {
        let mut h = HandBacks::new(2);
        for _ in 1..READY_ROUNDS {
            round(&mut h, 1, 1, Some(7));
        }
        assert_eq!(round(&mut h, 1, 1, Some(7)), Some(7));
        h.finished(1, true);
        // The other node loses it at once; this node leads it again.
        h.next_round();
        h.reset(1);
        for _ in 1..2 * READY_ROUNDS {
            assert_eq!(round(&mut h, 1, 3, Some(7)), None);
        }
        assert_eq!(
            round(&mut h, 1, 3, Some(7)),
            Some(7),
            "after twice the rounds"
        );
        h.finished(1, false);
        assert_eq!(h.needed[1], 4 * READY_ROUNDS);
        // Once this node no longer leads the group (and no hand-back is recent), the backoff
        // is over.
        h.next_round();
        h.reset(1);
        assert_eq!(h.needed[1], READY_ROUNDS);
    }

    #[test]
    fn backoff_is_bounded() {
        let mut h = HandBacks::new(1);
        for _ in 0..20 {
            h.finished(0, false);
        }
        assert_eq!(h.needed[0], MAX_BACKOFF_ROUNDS);
    }
}
