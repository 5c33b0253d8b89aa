//! Where a partition's Raft group lives: its placement over the members (three voters starting
//! at a different member per partition, the rest learners), and the voter swap that moves a full
//! group towards it after a join or a removal. `ClusterNode`'s placement round applies both.

use std::collections::BTreeSet;

use herald_storage::Partition;
use herald_storage::raft::NodeId;

/// The placement of a partition among `members` (sorted ids): up to three voters starting at
/// `partition mod n`, the rest learners.
pub fn placement(partition: Partition, members: &[NodeId]) -> (Vec<NodeId>, Vec<NodeId>) {
    let n = members.len();
    if n == 0 {
        return (Vec::new(), Vec::new());
    }
    let start = usize::from(partition) % n;
    let rotated: Vec<NodeId> = (0..n).map(|i| members[(start + i) % n]).collect();
    let voters = rotated.iter().take(3).copied().collect();
    let learners = rotated.iter().skip(3).copied().collect();
    (voters, learners)
}

/// The learners a group short of voters may promote, in id order (the caller takes as many as
/// it misses that pass the partition count check): those `caught_up` that are not `silent`. A
/// dead learner's match stays near the leader's last entry while the partition is idle, so
/// being caught up does not show it is alive; as a voter it would cost the group the live
/// learner promoted in its place.
pub fn promotion_candidates(
    learners: impl IntoIterator<Item = NodeId>,
    caught_up: impl Fn(NodeId) -> bool,
    silent: impl Fn(NodeId) -> bool,
) -> Vec<NodeId> {
    let mut candidates: Vec<NodeId> = learners
        .into_iter()
        .filter(|&id| caught_up(id) && !silent(id))
        .collect();
    candidates.sort_unstable();
    candidates.dedup();
    candidates
}

/// A voter swap that brings a full group's voters closer to its placement (see
/// [`rebalance_swap`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Swap {
    /// The voter that leaves the voters (it stays a learner).
    pub out: NodeId,
    /// The placed nodes that may take its place, in placement order: the caller takes the
    /// first that passes the partition count check, so that one that fails it does not hold
    /// up the others.
    pub into: Vec<NodeId>,
}

/// The voter swap that brings a full group's voters closer to `desired` (its placement): one
/// voter not placed there leaves (never `me`, its leader: the hand-back moves leadership to a
/// placed voter first; a `silent` one first, as it votes for nothing) for one of the placed
/// nodes that are not voters, are `caught_up` and are not `silent`. A silent node is never
/// swapped in: a dead one looks caught up while the partition is idle, and would take the
/// place of a live voter. So a swap never leaves the group fewer live voters. `None` when the
/// voters are the placement, the group is not full, or no such swap exists yet.
pub fn rebalance_swap(
    me: NodeId,
    desired: &[NodeId],
    voters: &BTreeSet<NodeId>,
    caught_up: impl Fn(NodeId) -> bool,
    silent: impl Fn(NodeId) -> bool,
) -> Option<Swap> {
    if voters.len() != desired.len() {
        return None;
    }
    let into: Vec<NodeId> = desired
        .iter()
        .copied()
        .filter(|&d| !voters.contains(&d) && caught_up(d) && !silent(d))
        .collect();
    if into.is_empty() {
        return None;
    }
    let outside = || {
        voters
            .iter()
            .copied()
            .filter(|v| *v != me && !desired.contains(v))
    };
    let out = outside()
        .find(|&v| silent(v))
        .or_else(|| outside().next())?;
    Some(Swap { out, into })
}

/// What a removal of `node` would cost a group whose voters are `voters`: the voters that are
/// `silent` among those left, when the group has a live majority now and the live ones left
/// would not be enough to commit the change that drops `node`. `None` when the group keeps
/// enough, has no live majority already (removing one of its dead voters makes nothing worse:
/// refusing would send the operator from one dead node to the other), or `node` does not vote
/// in it.
///
/// How many are enough depends on whether `node` takes part in that change. In the meta
/// group it does (the removal is that group's own joint change: `node` votes for the old
/// configuration), so the live voters left must be a majority of those left. A partition
/// group drops `node` only after the meta group removed it, and the members stop taking its
/// messages at once: the change needs a majority of all its `voters`, `node` counted and
/// missing. So a group of two voters can never drop one (its leader alone is no majority of
/// two), and two removals back to back can leave a group of three with one voter that takes
/// part.
pub fn removal_stalls(
    node: NodeId,
    voters: &BTreeSet<NodeId>,
    node_takes_part: bool,
    silent: impl Fn(NodeId) -> bool,
) -> Option<Vec<NodeId>> {
    if !voters.contains(&node) {
        return None;
    }
    let live_now = voters.iter().filter(|&&v| !silent(v)).count();
    if live_now < voters.len() / 2 + 1 {
        return None;
    }
    let left: Vec<NodeId> = voters.iter().copied().filter(|&v| v != node).collect();
    let quiet: Vec<NodeId> = left.iter().copied().filter(|&v| silent(v)).collect();
    let live = left.len() - quiet.len();
    let needed = if node_takes_part {
        left.len() / 2 + 1
    } else {
        voters.len() / 2 + 1
    };
    (!left.is_empty() && live < needed).then_some(quiet)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(v: &[NodeId]) -> BTreeSet<NodeId> {
        v.iter().copied().collect()
    }

    fn swap(out: NodeId, into: &[NodeId]) -> Option<Swap> {
        Some(Swap {
            out,
            into: into.to_vec(),
        })
    }

    #[test]
    fn a_joined_node_is_swapped_in_for_a_voter_outside_the_placement() {
        let all_caught_up = |_: NodeId| true;
        let none_silent = |_: NodeId| false;
        // Node 4 joined a cluster of 1, 2, 3: partition 1's placement is 2, 3, 4.
        let desired = placement(1, &[1, 2, 3, 4]).0;
        assert_eq!(desired, [2, 3, 4]);
        assert_eq!(
            rebalance_swap(2, &desired, &set(&[1, 2, 3]), all_caught_up, none_silent),
            swap(1, &[4])
        );
        // Not while node 4 lags, nor taking out the leader itself (the hand-back first moves
        // leadership to a placed voter, which then swaps).
        assert_eq!(
            rebalance_swap(2, &desired, &set(&[1, 2, 3]), |n| n != 4, none_silent),
            None
        );
        assert_eq!(
            rebalance_swap(1, &desired, &set(&[1, 2, 3]), all_caught_up, none_silent),
            None
        );
        // Nothing to do once the voters are the placement, or while the group is short.
        assert_eq!(
            rebalance_swap(2, &desired, &set(&[2, 3, 4]), all_caught_up, none_silent),
            None
        );
        assert_eq!(
            rebalance_swap(2, &desired, &set(&[2, 3]), all_caught_up, none_silent),
            None
        );
    }

    /// A dead node looks caught up while its partition is idle: it is never swapped in for a
    /// live voter, and a live placed node is offered after it (which the dead one used to
    /// hold up, round after round).
    #[test]
    fn a_silent_node_is_never_swapped_in() {
        let all_caught_up = |_: NodeId| true;
        // Partition 0 over 1, 3, 4, 5 (node 2 removed) is placed on 1, 3, 4; its voters are
        // 1, 3, 5 after node 5 was promoted for node 2.
        let desired = placement(0, &[1, 3, 4, 5]).0;
        assert_eq!(desired, [1, 3, 4]);
        assert_eq!(
            rebalance_swap(1, &desired, &set(&[1, 3, 5]), all_caught_up, |n| n == 4),
            None,
            "dead node 4 taking live node 5's vote"
        );
        // Two placed non-voters, the first dead: the live one is offered.
        let desired = [1, 2, 3];
        assert_eq!(
            rebalance_swap(1, &desired, &set(&[1, 4, 5]), all_caught_up, |n| n == 2),
            swap(4, &[3])
        );
        // Both alive: both offered, in placement order (the caller takes the first that
        // passes the partition count check).
        assert_eq!(
            rebalance_swap(1, &desired, &set(&[1, 4, 5]), all_caught_up, |_| false),
            swap(4, &[2, 3])
        );
        // A silent voter outside the placement goes first.
        assert_eq!(
            rebalance_swap(1, &desired, &set(&[1, 4, 5]), all_caught_up, |n| n == 5),
            swap(5, &[2, 3])
        );
        // ... but never the leader itself.
        assert_eq!(
            rebalance_swap(5, &desired, &set(&[1, 4, 5]), all_caught_up, |n| n == 5),
            swap(4, &[2, 3])
        );
    }

    #[test]
    fn a_silent_learner_is_not_a_promotion_candidate() {
        // Partition 0's learners 4 (dead, its match still recent) and 5: only 5, though 4 has
        // the lower id.
        let silent = |n: NodeId| n == 4;
        assert_eq!(promotion_candidates([5, 4], |_| true, silent), [5]);
        assert_eq!(promotion_candidates([4, 5, 6], |n| n != 5, silent), [6]);
        assert_eq!(promotion_candidates([6, 5], |_| true, |_| false), [5, 6]);
        assert!(promotion_candidates([4], |_| true, silent).is_empty());
    }

    /// Removing one of a group's three voters while another is dead leaves one live voter of
    /// two; removing the dead one, or any voter while the others live, keeps a majority.
    #[test]
    fn a_removal_that_leaves_a_group_no_live_majority_is_named() {
        let voters = set(&[1, 3, 4]);
        let four_dead = |n: NodeId| n == 4;
        assert_eq!(removal_stalls(1, &voters, true, four_dead), Some(vec![4]));
        assert_eq!(
            removal_stalls(4, &voters, true, four_dead),
            None,
            "the dead one"
        );
        assert_eq!(
            removal_stalls(2, &voters, true, four_dead),
            None,
            "not a voter"
        );
        assert_eq!(
            removal_stalls(1, &voters, true, |_| false),
            None,
            "all live"
        );
        // Five meta voters, one dead: four left, three live, a majority.
        assert_eq!(
            removal_stalls(1, &set(&[1, 2, 3, 4, 5]), true, |n| n == 5),
            None
        );
        assert_eq!(
            removal_stalls(1, &set(&[1, 2, 3, 4, 5]), true, |n| n >= 4),
            Some(vec![4, 5])
        );
        // The last voter of a group: nothing is left to stall.
        assert_eq!(removal_stalls(1, &set(&[1]), true, |_| false), None);
        // Two of three dead: the group commits nothing already, and removing either dead
        // voter (or the live one) makes nothing worse.
        let two_dead = |n: NodeId| n == 4 || n == 5;
        assert_eq!(removal_stalls(4, &set(&[1, 4, 5]), true, two_dead), None);
        assert_eq!(removal_stalls(5, &set(&[1, 4, 5]), true, two_dead), None);
        assert_eq!(removal_stalls(1, &set(&[1, 4, 5]), true, two_dead), None);
        assert_eq!(removal_stalls(1, &set(&[1, 4, 5]), false, two_dead), None);
    }

    /// A partition group drops a removed node with a majority of all its voters, the removed
    /// one missing: two voters can never drop one, and a voter removed before (still listed,
    /// no longer heard: `silent`) and a second removal leave one of three.
    #[test]
    fn a_partition_group_needs_a_majority_of_all_its_voters_to_drop_one() {
        let nobody = |_: NodeId| false;
        assert_eq!(removal_stalls(3, &set(&[1, 2, 3]), false, nobody), None);
        assert_eq!(
            removal_stalls(2, &set(&[1, 2]), false, nobody),
            Some(vec![])
        );
        assert_eq!(removal_stalls(2, &set(&[1, 2]), true, nobody), None, "meta");
        let five_removed = |n: NodeId| n == 5;
        assert_eq!(
            removal_stalls(4, &set(&[1, 4, 5]), false, five_removed),
            Some(vec![5])
        );
        assert_eq!(
            removal_stalls(3, &set(&[1, 2, 3, 4, 5]), false, five_removed),
            None
        );
    }
}
