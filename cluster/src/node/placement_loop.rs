//! The placement loop: once a second, the leader of each group converges the group's
//! membership on the cluster's, hands a partition back to its preferred node, and ticks the
//! clocks of idle partitions; the meta leader also finishes a formation cut short.
//!
//! Placement: partition `p`'s voters are (at most) three members starting at `p mod n` in id
//! order, so leadership spreads over the nodes; every other member follows as a learner, so every
//! node applies every partition and can serve any resume from its own store. The leader of each
//! group converges it on that picture: it adds new members as learners, promotes learners while
//! the group has fewer than three voters, and drops nodes that left the cluster. A learner
//! becomes a voter (promoted or swapped in) only once it answered that it runs the cluster's
//! partition count, and only while it is not silent (`Peers::is_silent`): a dead learner's
//! match stays near the leader's last entry while its partition is idle, so being caught up
//! does not show it is alive, and as a voter it would take the place of a live one. So a
//! voter change never leaves a group fewer live voters: a swap takes out a silent voter
//! outside the placement first, and tries each placed node in turn (one that is dead or does
//! not answer the count check does not hold up the others).

use std::collections::BTreeSet;
use std::future::Future;
use std::time::Duration;

use herald_storage::raft::{Command, GroupId, META_GROUP, NodeId, group_partition};
use openraft::{BasicNode, ChangeMembers, ServerState};
use tokio::sync::mpsc;

use super::ClusterNode;
use crate::handoff::{self, HandBacks};
use crate::placement::{Swap, placement, promotion_candidates, rebalance_swap};

/// Placement rounds (one a second) between two clock ticks of idle partitions.
const CLOCK_TICK_ROUNDS: u64 = 60;

/// How long a round waits for one membership change of one group to commit. A change that
/// cannot commit (its group lacks a quorum) would otherwise hold up the placement of every
/// other group this node leads until that group recovers. The change stays submitted when
/// the round stops waiting (openraft goes on with it), and commits once the group can.
const MEMBERSHIP_CHANGE_PATIENCE: Duration = Duration::from_secs(10);

/// Waits for a membership change of `group` at most [`MEMBERSHIP_CHANGE_PATIENCE`]; `what`
/// names it in the logs. Returns whether it committed.
async fn bounded<T, E: std::fmt::Display>(
    group: usize,
    what: &'static str,
    change: impl Future<Output = Result<T, E>>,
) -> bool {
    match tokio::time::timeout(MEMBERSHIP_CHANGE_PATIENCE, change).await {
        Ok(Ok(_)) => true,
        Ok(Err(error)) => {
            tracing::debug!(group, %error, "{what} failed");
            false
        }
        Err(_) => {
            tracing::info!(
                group,
                "{what}: not committed within {} s (the group may lack a quorum); it stays submitted, and placement goes on with the other groups",
                MEMBERSHIP_CHANGE_PATIENCE.as_secs()
            );
            false
        }
    }
}

/// What the placement loop learnt of members' partition counts (see [`ClusterNode::may_vote`]).
#[derive(Debug, Default)]
struct CountChecks {
    /// Members that answered they run the cluster's partition count.
    same: BTreeSet<NodeId>,
    /// Members of another count, already logged.
    warned: BTreeSet<NodeId>,
    /// Members asked this round that did not answer the same count (no answer, another
    /// count): not asked again before the next round. A silent member used to be asked for
    /// every group short of it, each time waiting for the call's timeout, which held up the
    /// round's decisions for every other group.
    not_now: BTreeSet<NodeId>,
}

impl CountChecks {
    /// Starts a round: members that did not answer the same count may be asked again, and
    /// nodes that are no longer members are forgotten (one joined again may run another
    /// store).
    fn next_round(&mut self, members: &std::collections::BTreeMap<NodeId, String>) {
        self.not_now.clear();
        self.same.retain(|id| members.contains_key(id));
        self.warned.retain(|id| members.contains_key(id));
    }

    /// Whether member `node` may become a voter (see [`ClusterNode::may_vote`]): `compare`
    /// asks it how its partition count compares with the cluster's `ours` (as
    /// [`ClusterNode::compare_partition_count`] does), at most once per round, and never
    /// again once it answered the same.
    async fn may_vote<F>(&mut self, node: NodeId, ours: u16, compare: impl FnOnce() -> F) -> bool
    where
        F: Future<Output = Result<Option<&'static str>, String>>,
    {
        if self.same.contains(&node) {
            return true;
        }
        if self.not_now.contains(&node) {
            return false;
        }
        match compare().await {
            Ok(None) => {
                self.same.insert(node);
                true
            }
            Ok(Some(theirs)) => {
                if self.warned.insert(node) {
                    tracing::error!(
                        node,
                        "node {node} runs {theirs} partitions than the cluster ({ours}): it is not made a voter of any group (the count is fixed when a store is created); remove it (`herald cluster remove --node-id {node}`), start it with --partitions {ours} on an empty data directory, then join it"
                    );
                }
                self.not_now.insert(node);
                false
            }
            Err(_) => {
                self.not_now.insert(node);
                false
            }
        }
    }
}

impl ClusterNode {
    /// Whether member `node` may become a voter: only once it has answered that it runs the
    /// cluster's partition count (asked once per member, remembered in `checks`). A node of
    /// another count that got in (joined before it was up, or while it could not be asked)
    /// stopped its meta group on the cluster's `Init`, and as a voter would cost the groups
    /// their fault tolerance; one that does not answer now (or answers another count) is not
    /// asked again for another group this round, and is asked again next round.
    async fn may_vote(&self, node: NodeId, checks: &mut CountChecks) -> bool {
        checks
            .may_vote(node, self.inner.store.partitions(), || {
                self.compare_partition_count(node, Duration::from_secs(1))
            })
            .await
    }

    /// On each partition this node leads, commits an empty batch: it moves the partition's
    /// applied clock forward, so message ids of an idle partition leave the dedup window (the
    /// clock only advances through the log, which keeps dedup decisions identical on every
    /// member).
    fn tick_idle_partitions(&self) {
        for (group, raft) in self.inner.groups.iter().enumerate().skip(1) {
            if raft.metrics().borrow().current_leader != Some(self.inner.id) {
                continue;
            }
            // A partition being handed back stays silent.
            let Some(gate) = self.gate(group as GroupId).cloned() else {
                continue;
            };
            if gate.closing() {
                continue;
            }
            let raft = raft.clone();
            let clock = self.inner.clock.clone();
            tokio::spawn(async move {
                let Ok(_round) = gate.rounds.try_read() else {
                    return;
                };
                let tick = Command::Publish {
                    now_ms: clock.now_ms(),
                    publishes: Vec::new(),
                };
                if let Err(error) = raft.client_write(tick).await {
                    tracing::debug!(group, %error, "clock tick not committed");
                }
            });
        }
    }

    /// Every second: on each group this node leads, add missing members as learners, promote
    /// learners while voters are short, drop nodes that left; keep the allow-list current.
    pub(super) async fn placement_loop(&self) {
        let mut ticker = tokio::time::interval(Duration::from_secs(1));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut rounds: u64 = 0;
        let mut hand_backs = HandBacks::new(self.inner.groups.len());
        // How each hand-back ended: (group, whether the leadership moved).
        let (handed_tx, mut handed_rx) = mpsc::channel::<(usize, bool)>(4);
        // Rounds in a row in which this node led the meta group of a formed cluster while some
        // of its partition groups had no membership (see `finish_interrupted_formation`).
        let mut uninitialised_rounds: u32 = 0;
        // The membership's address of this node that was last warned about.
        let mut warned_address: Option<String> = None;
        let mut count_checks = CountChecks::default();
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = self.inner.shutdown.cancelled() => return,
            }
            uninitialised_rounds = self
                .finish_interrupted_formation(uninitialised_rounds)
                .await;
            while let Ok((group, moved)) = handed_rx.try_recv() {
                hand_backs.finished(group, moved);
            }
            hand_backs.next_round();
            rounds += 1;
            if rounds.is_multiple_of(CLOCK_TICK_ROUNDS) {
                self.tick_idle_partitions();
            }
            let members = self.members();
            if members.is_empty() {
                continue;
            }
            // The others dial the address the membership holds: a node restarted on another
            // one (without a remove and a join) is reachable one way only.
            if let Some(known) = members.get(&self.inner.id)
                && *known != self.inner.advertise
                && warned_address.as_ref() != Some(known)
            {
                tracing::warn!(
                    advertised = %self.inner.advertise,
                    known = %known,
                    "this node advertises another cluster address than the one the cluster knows it by, which the other members dial; to move it, remove it and join it again at the new address on an empty data directory (docs/deploy.md)"
                );
                warned_address = Some(known.clone());
            }
            count_checks.next_round(&members);
            {
                let mut allowed = self.inner.allowed.write();
                allowed.extend(members.keys().copied());
            }
            for (id, addr) in &members {
                self.inner.peers.set_addr(*id, addr.clone());
            }
            let ids: Vec<NodeId> = members.keys().copied().collect();
            for (group, raft) in self.inner.groups.iter().enumerate() {
                let m = raft.metrics().borrow().clone();
                if m.state != ServerState::Leader {
                    hand_backs.reset(group);
                    continue;
                }
                // Being handed back: no membership change meanwhile.
                if self
                    .gate(group as GroupId)
                    .is_some_and(|gate| gate.closing())
                {
                    continue;
                }
                let membership = m.membership_config.membership().clone();
                // A leader that removed itself leads until its next tick though the group no
                // longer lists it: no change may be asked of it then (see `handle_meta`).
                if !membership.nodes().any(|(id, _)| *id == self.inner.id) {
                    continue;
                }
                let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
                if let Some(partition) = group_partition(group as GroupId) {
                    // The first of its placed voters that votes already: while a joined node is
                    // not yet one (see `rebalance_swap`), leadership goes to a placed voter
                    // that is, which can then swap in the new one.
                    let desired = placement(partition, &ids).0;
                    let preferred = desired.iter().copied().find(|d| voters.contains(d));
                    let matched = preferred.and_then(|p| handoff::matched_index(&m, p));
                    // Two votes (this node's and the target's) make a quorum only in a plain
                    // group of at most three voters.
                    let plain = membership.get_joint_config().len() == 1 && voters.len() <= 3;
                    let target = handoff::hand_back_target(
                        self.inner.id,
                        preferred,
                        &voters.iter().copied().collect::<Vec<_>>(),
                        m.last_log_index,
                        matched,
                        // A member refused for its store takes no Raft message: no hand-back.
                        |id| {
                            self.inner.peers.is_silent(id) || self.inner.peer_stores.is_refused(id)
                        },
                    )
                    .filter(|_| plain);
                    let term = m.current_term;
                    if let Some(to) = hand_backs.observe(group, term, target) {
                        let hand_back = handoff::HandBack {
                            me: self.inner.id,
                            group: group as GroupId,
                            to,
                            term,
                            lease: Duration::from_millis(self.inner.raft_timings.election_max_ms),
                        };
                        let (raft, gate) = (raft.clone(), self.gate(group as GroupId).cloned());
                        let peers = self.inner.peers.clone();
                        let mut outcome = handoff::Outcome::new(group, handed_tx.clone());
                        tokio::spawn(async move {
                            let Some(gate) = gate else { return };
                            let started = tokio::time::Instant::now();
                            let attempt = hand_back.run(&raft, &gate, &peers).await;
                            let held_ms = started.elapsed().as_millis() as u64;
                            match &attempt {
                                handoff::Attempt::Moved(_) => tracing::info!(
                                    group,
                                    to,
                                    held_ms,
                                    "handed the partition back to its preferred node"
                                ),
                                handoff::Attempt::Refused(error) => tracing::info!(
                                    group,
                                    to,
                                    %error,
                                    "hand-back refused; this node goes on leading"
                                ),
                                handoff::Attempt::Failed(why) | handoff::Attempt::GaveUp(why) => {
                                    tracing::info!(
                                        group,
                                        to,
                                        held_ms,
                                        "hand-back: still the leader ({why}); this node goes on leading"
                                    )
                                }
                            }
                            outcome.record(attempt.moved());
                        });
                        continue;
                    }
                }
                let in_group: BTreeSet<NodeId> = membership.nodes().map(|(id, _)| *id).collect();
                let want_voters = if group == usize::from(META_GROUP) {
                    5
                } else {
                    3
                };
                // Members missing from the group join as learners.
                for id in ids.iter().filter(|id| !in_group.contains(id)) {
                    let node = BasicNode::new(members[id].clone());
                    bounded(
                        group,
                        "adding a learner",
                        raft.add_learner(*id, node, false),
                    )
                    .await;
                }
                // Nodes that left the cluster leave the group.
                let gone: BTreeSet<NodeId> = in_group
                    .iter()
                    .filter(|id| !members.contains_key(id))
                    .copied()
                    .collect();
                if group != usize::from(META_GROUP) && !gone.is_empty() {
                    let gone_voters: BTreeSet<NodeId> =
                        gone.intersection(&voters).copied().collect();
                    if !gone_voters.is_empty() && voters.len() > gone_voters.len() {
                        // This takes them out of the nodes too (`retain` false); learners that
                        // left wait for the next round. Never a second change now: if this
                        // node left (a removed leader learns of its removal from the meta
                        // group), it no longer belongs to the group, and openraft 0.9 would
                        // take the change from it and trip on it (see `handle_meta`).
                        bounded(
                            group,
                            "removing voters that left",
                            raft.change_membership(ChangeMembers::RemoveVoters(gone_voters), false),
                        )
                        .await;
                        continue;
                    }
                    bounded(
                        group,
                        "removing nodes that left",
                        raft.change_membership(ChangeMembers::RemoveNodes(gone.clone()), false),
                    )
                    .await;
                    continue;
                }
                let last = m.last_log_index.unwrap_or(0);
                // Only a node that has answered: one that never did (a wrong address, a node
                // that cannot start) has no match and must not become a voter.
                let caught_up = |id: NodeId| {
                    m.replication
                        .as_ref()
                        .and_then(|r| r.get(&id))
                        .is_some_and(|matched| {
                            matched.as_ref().is_some_and(|l| l.index + 100 >= last)
                        })
                };
                // Raft heartbeats go to learners too, so a live one is never silent.
                let silent = |id: NodeId| self.inner.peers.is_silent(id);
                // Promote caught-up learners that answer while voters are short.
                if voters.len() < want_voters.min(ids.len()) {
                    let learners = ids
                        .iter()
                        .copied()
                        .filter(|id| in_group.contains(id) && !voters.contains(id));
                    let candidates = promotion_candidates(learners, caught_up, silent);
                    let mut ready = BTreeSet::new();
                    for id in candidates {
                        if ready.len() < want_voters.min(ids.len()) - voters.len()
                            && self.may_vote(id, &mut count_checks).await
                        {
                            ready.insert(id);
                        }
                    }
                    if !ready.is_empty()
                        && bounded(
                            group,
                            "promoting learners",
                            raft.change_membership(ChangeMembers::AddVoterIds(ready.clone()), true),
                        )
                        .await
                    {
                        tracing::info!(group, voters = ?ready, "promoted learners to voters")
                    }
                    continue;
                }
                // A full partition group whose voters are not its placement (a node joined,
                // or learners were promoted after a removal): one voter swapped per round,
                // so that a joined node takes its share of voting and (by the hand-back)
                // leading.
                let Some(partition) = group_partition(group as GroupId) else {
                    continue;
                };
                if membership.get_joint_config().len() != 1 {
                    continue;
                }
                let desired = placement(partition, &ids).0;
                let Some(Swap { out, into }) =
                    rebalance_swap(self.inner.id, &desired, &voters, caught_up, silent)
                else {
                    continue;
                };
                // The first placed node that passes the count check: one that does not (yet)
                // must not hold up the others.
                let mut chosen = None;
                for id in into {
                    if self.may_vote(id, &mut count_checks).await {
                        chosen = Some(id);
                        break;
                    }
                }
                if let Some(into) = chosen {
                    let next: BTreeSet<NodeId> = voters
                        .iter()
                        .copied()
                        .filter(|&v| v != out)
                        .chain([into])
                        .collect();
                    if bounded(
                        group,
                        "moving a voter",
                        raft.change_membership(ChangeMembers::ReplaceAllVoters(next), true),
                    )
                    .await
                    {
                        tracing::info!(
                            group,
                            partition,
                            added = into,
                            removed = out,
                            "moved a voter to where the placement puts it (the removed one stays a learner)"
                        )
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::collections::BTreeMap;

    use super::*;

    /// A probe that counts its calls and answers `answer`.
    fn probe(
        calls: &Cell<u32>,
        answer: Result<Option<&'static str>, String>,
    ) -> impl FnOnce() -> std::future::Ready<Result<Option<&'static str>, String>> {
        move || {
            calls.set(calls.get() + 1);
            std::future::ready(answer)
        }
    }

    /// A membership change that cannot commit (its group lacks a quorum) holds the round for
    /// at most the patience, so the other groups' placement goes on.
    #[tokio::test(start_paused = true)]
    async fn a_change_that_never_commits_holds_the_round_for_the_patience_only() {
        let started = tokio::time::Instant::now();
        let never = std::future::pending::<Result<(), String>>();
        assert!(!bounded(3, "promoting learners", never).await);
        assert_eq!(started.elapsed(), MEMBERSHIP_CHANGE_PATIENCE);
        assert!(
            bounded(
                3,
                "promoting learners",
                std::future::ready(Ok::<_, String>(()))
            )
            .await
        );
        let refused = std::future::ready(Err::<(), _>("in progress".to_string()));
        assert!(!bounded(3, "promoting learners", refused).await);
    }

    fn members(ids: &[NodeId]) -> BTreeMap<NodeId, String> {
        ids.iter().map(|id| (*id, format!("n{id}:7000"))).collect()
    }

    #[tokio::test]
    async fn a_silent_member_is_asked_once_a_round_whatever_the_groups_short_of_it() {
        let mut checks = CountChecks::default();
        let calls = Cell::new(0);
        for round in 1..=3 {
            checks.next_round(&members(&[1, 2, 3]));
            // Eight groups would take node 3: one call (one timeout) for all of them.
            for _ in 0..8 {
                let unanswered = Err("node 3: timed out".to_string());
                assert!(!checks.may_vote(3, 8, probe(&calls, unanswered)).await);
            }
            assert_eq!(calls.get(), round, "calls after round {round}");
        }
        // Answering next round, it may vote, and is not asked again.
        checks.next_round(&members(&[1, 2, 3]));
        for _ in 0..8 {
            assert!(checks.may_vote(3, 8, probe(&calls, Ok(None))).await);
        }
        checks.next_round(&members(&[1, 2, 3]));
        assert!(checks.may_vote(3, 8, probe(&calls, Ok(None))).await);
        assert_eq!(calls.get(), 4);
    }

    #[tokio::test]
    async fn a_member_of_another_count_never_votes_and_is_asked_once_a_round() {
        let mut checks = CountChecks::default();
        let calls = Cell::new(0);
        for round in 1..=2 {
            checks.next_round(&members(&[1, 2, 3]));
            for _ in 0..4 {
                assert!(
                    !checks
                        .may_vote(3, 8, probe(&calls, Ok(Some("fewer"))))
                        .await
                );
            }
            assert_eq!(calls.get(), round);
        }
        assert!(checks.warned.contains(&3));
    }

    #[tokio::test]
    async fn a_member_that_left_is_asked_again_after_it_joins_again() {
        let mut checks = CountChecks::default();
        let calls = Cell::new(0);
        checks.next_round(&members(&[1, 2, 3]));
        assert!(checks.may_vote(3, 8, probe(&calls, Ok(None))).await);
        // Removed, then joined again on another store, of another count.
        checks.next_round(&members(&[1, 2]));
        checks.next_round(&members(&[1, 2, 3]));
        assert!(!checks.may_vote(3, 8, probe(&calls, Ok(Some("more")))).await);
        assert_eq!(calls.get(), 2);
    }
}
