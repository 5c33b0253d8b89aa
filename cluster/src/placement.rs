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

/// The voter swap that brings a full group's voters closer to `desired` (its placement):
/// `(out, into)`, the first voter not placed there (never `me`, its leader: the hand-back moves
/// leadership to a placed voter first) for the first placed node that is not a voter and is
/// `caught_up`. `None` when the voters are the placement, the group is not full, or no such
/// pair exists yet.
pub fn rebalance_swap(
    me: NodeId,
    desired: &[NodeId],
    voters: &BTreeSet<NodeId>,
    caught_up: impl Fn(NodeId) -> bool,
) -> Option<(NodeId, NodeId)> {
    if voters.len() != desired.len() {
        return None;
    }
    let into = desired
        .iter()
        .copied()
        .find(|d| !voters.contains(d) && caught_up(*d))?;
    let out = voters
        .iter()
        .copied()
        .find(|v| *v != me && !desired.contains(v))?;
    Some((out, into))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_joined_node_is_swapped_in_for_a_voter_outside_the_placement() {
        let all_caught_up = |_: NodeId| true;
        let voters = |v: &[NodeId]| v.iter().copied().collect::<BTreeSet<NodeId>>();
        // Node 4 joined a cluster of 1, 2, 3: partition 1's placement is 2, 3, 4.
        let desired = placement(1, &[1, 2, 3, 4]).0;
        assert_eq!(desired, [2, 3, 4]);
        assert_eq!(
            rebalance_swap(2, &desired, &voters(&[1, 2, 3]), all_caught_up),
            Some((1, 4))
        );
        // Not while node 4 lags, nor taking out the leader itself (the hand-back first moves
        // leadership to a placed voter, which then swaps).
        assert_eq!(
            rebalance_swap(2, &desired, &voters(&[1, 2, 3]), |n| n != 4),
            None
        );
        assert_eq!(
            rebalance_swap(1, &desired, &voters(&[1, 2, 3]), all_caught_up),
            None
        );
        // Nothing to do once the voters are the placement, or while the group is short.
        assert_eq!(
            rebalance_swap(2, &desired, &voters(&[2, 3, 4]), all_caught_up),
            None
        );
        assert_eq!(
            rebalance_swap(2, &desired, &voters(&[2, 3]), all_caught_up),
            None
        );
    }
}
