//! Fast failover: when a group's leader goes silent, its surviving voters agree on the best
//! candidate and start its election as soon as the old leader's lease has run out.
//!
//! openraft 0.9 leaves failure detection to timers: a follower calls an election after the
//! leader lease (the election timeout's upper bound) plus its own random election timeout
//! (fixed for the process's life) since it last heard from the leader. With two survivors that
//! is 500-700 ms with herald's default timers when the first candidate wins, and about 1.4 s
//! when it does not: a candidate with a shorter log is refused, and openraft then holds back
//! its next attempt by twice the election maximum (`benchmarks.md`, failover). Under a steady
//! publish stream the survivors' logs often differ by the last entry, so half the kills took
//! the slow path.
//!
//! This module removes both waits without touching Raft's rules (an election triggered here is
//! an ordinary openraft election; every vote is still decided by openraft):
//!
//! - Every node notes when it last accepted AppendEntries for each group ([`LeaderContact`]).
//! - On each group, the *coordinator* (the lowest-id voter other than the leader it follows)
//!   watches that silence. Once it exceeds the lease plus one heartbeat (the other voters'
//!   leases have expired too, so they can vote), it asks the other voters for their silence and
//!   their last log id ([`Probe`]). If any of them still hears from the leader, the leader is
//!   alive and only the coordinator's link is bad: nothing happens. Otherwise it picks the voter
//!   with the greatest log (ties: lowest id), which every other voter will grant, and has it
//!   call an election at once.
//! - **Pre-vote.** openraft 0.9 has none: a follower whose timer fires calls an election with a
//!   higher term even when only its own link to the leader is cut, keeps calling them (about
//!   three a second) while nobody grants them, and the first message it then exchanges with
//!   the leader makes the leader step down for an election nobody needed. So openraft's timer
//!   elections are off while a leader is heard; a voter that has not heard one for the lease
//!   plus a heartbeat asks the other voters (the leader included) the same probe, and turns its
//!   timers on only if a quorum answered and none hears a leader. A node cut off from the
//!   leader alone, from everyone, or restarting while the others carry on, calls no election.
//! - If the coordinator's pick goes wrong (a probe times out, the pick loses anyway), the
//!   timers that pre-vote turned on elect someone as before: this only makes the common case
//!   fast.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use herald_storage::raft::NodeId;
use openraft::LogId;
use serde::{Deserialize, Serialize};

/// When this node last accepted AppendEntries (a heartbeat or entries) for each group.
#[derive(Debug)]
pub struct LeaderContact {
    start: Instant,
    /// Milliseconds since `start` of the last accepted AppendEntries, per group.
    heard: Vec<AtomicU64>,
}

impl LeaderContact {
    /// A table for `groups` groups; every group counts as heard from now (a node that just
    /// started gives its leader the full lease before suspecting it).
    pub fn new(groups: usize) -> LeaderContact {
        LeaderContact {
            start: Instant::now(),
            heard: (0..groups).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Notes that `group`'s leader was heard from just now.
    pub fn heard(&self, group: usize) {
        if let Some(slot) = self.heard.get(group) {
            slot.fetch_max(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
        }
    }

    /// How long `group`'s leader has been silent.
    pub fn silence(&self, group: usize) -> Duration {
        let heard = self
            .heard
            .get(group)
            .map_or(0, |slot| slot.load(Ordering::Relaxed));
        self.start
            .elapsed()
            .saturating_sub(Duration::from_millis(heard))
    }
}

/// A voter's answer to a probe: the coordinator's, pre-vote's, or a relaying node's.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Probe {
    /// How long the voter has not heard from the group's leader, in milliseconds.
    pub silent_ms: u64,
    /// The voter's last log id: an election is won only by a candidate whose log is at least
    /// every granting voter's.
    pub last_log: Option<LogId<NodeId>>,
}

/// The coordinator's decision, from its own probe and the other voters' answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// The leader is still heard by someone (or too few voters answered): do nothing.
    Wait,
    /// Have this voter call an election now.
    Elect(NodeId),
}

/// Picks the voter that should call the election: none if any answer shows the leader alive
/// (silent for less than `lease`) or fewer than `quorum` voters answered; otherwise the one
/// with the greatest last log id, the lowest id among equals.
pub fn decide(answers: &[(NodeId, Probe)], lease: Duration, quorum: usize) -> Decision {
    if answers.len() < quorum {
        return Decision::Wait;
    }
    if answers
        .iter()
        .any(|(_, probe)| Duration::from_millis(probe.silent_ms) < lease)
    {
        return Decision::Wait;
    }
    answers
        .iter()
        .max_by(|(a_id, a), (b_id, b)| a.last_log.cmp(&b.last_log).then(b_id.cmp(a_id)))
        .map_or(Decision::Wait, |(id, _)| Decision::Elect(*id))
}

/// herald's pre-vote on a group, from the voters' probe answers (this node's own included).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PreVote {
    /// Turn openraft's timer elections on: a quorum answered and none hears a leader.
    pub elect: bool,
    /// Some voter still hears a leader (silent for less than the lease).
    pub heard: bool,
}

/// Decides herald's pre-vote (see the module doc): elections only when at least `quorum`
/// voters answered and none has heard a leader within `lease`.
pub fn pre_vote(answers: &[(NodeId, Probe)], lease: Duration, quorum: usize) -> PreVote {
    let heard = answers
        .iter()
        .any(|(_, probe)| Duration::from_millis(probe.silent_ms) < lease);
    PreVote {
        elect: !heard && answers.len() >= quorum,
        heard,
    }
}

/// The coordinator of a group among `voters` when `leader` goes silent: the lowest-id voter
/// that is not the leader.
pub fn coordinator(voters: &[NodeId], leader: NodeId) -> Option<NodeId> {
    voters.iter().copied().filter(|v| *v != leader).min()
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::CommittedLeaderId;

    fn log(term: u64, node: NodeId, index: u64) -> Option<LogId<NodeId>> {
        Some(LogId::new(CommittedLeaderId::new(term, node), index))
    }

    fn probe(silent_ms: u64, last_log: Option<LogId<NodeId>>) -> Probe {
        Probe {
            silent_ms,
            last_log,
        }
    }

    const LEASE: Duration = Duration::from_millis(350);

    #[test]
    fn the_voter_with_the_longest_log_is_picked() {
        let answers = [
            (2, probe(500, log(3, 1, 41))),
            (3, probe(480, log(3, 1, 42))),
        ];
        assert_eq!(decide(&answers, LEASE, 2), Decision::Elect(3));
    }

    #[test]
    fn a_later_term_beats_a_longer_log_and_ties_go_to_the_lowest_id() {
        let answers = [
            (2, probe(500, log(3, 1, 90))),
            (3, probe(500, log(4, 2, 12))),
        ];
        assert_eq!(decide(&answers, LEASE, 2), Decision::Elect(3));
        let tie = [(3, probe(500, log(3, 1, 7))), (2, probe(500, log(3, 1, 7)))];
        assert_eq!(decide(&tie, LEASE, 2), Decision::Elect(2));
    }

    #[test]
    fn nothing_happens_while_a_voter_still_hears_the_leader() {
        let answers = [
            (2, probe(900, log(3, 1, 41))),
            (3, probe(120, log(3, 1, 41))),
        ];
        assert_eq!(decide(&answers, LEASE, 2), Decision::Wait);
    }

    #[test]
    fn nothing_happens_without_a_quorum_of_answers() {
        let answers = [(2, probe(900, log(3, 1, 41)))];
        assert_eq!(decide(&answers, LEASE, 2), Decision::Wait);
    }

    #[test]
    fn pre_vote_elects_only_when_a_quorum_answers_and_nobody_hears_a_leader() {
        let silent = [(1, probe(900, None)), (2, probe(800, None))];
        assert!(pre_vote(&silent, LEASE, 2).elect);
        // Cut off from the leader alone: another voter still hears it.
        let bridged = [(2, probe(900, None)), (3, probe(40, None))];
        let decision = pre_vote(&bridged, LEASE, 2);
        assert!(!decision.elect && decision.heard);
        // Cut off from everyone: only its own answer.
        let alone = [(2, probe(900, None))];
        let decision = pre_vote(&alone, LEASE, 2);
        assert!(!decision.elect && !decision.heard);
    }

    #[test]
    fn the_coordinator_is_the_lowest_voter_but_the_leader() {
        assert_eq!(coordinator(&[1, 2, 3], 1), Some(2));
        assert_eq!(coordinator(&[1, 2, 3], 2), Some(1));
        assert_eq!(coordinator(&[4], 4), None);
    }

    #[test]
    fn silence_grows_until_the_leader_is_heard() {
        let contact = LeaderContact::new(2);
        std::thread::sleep(Duration::from_millis(30));
        assert!(contact.silence(1) >= Duration::from_millis(30));
        contact.heard(1);
        assert!(contact.silence(1) < Duration::from_millis(30));
        assert!(contact.silence(0) >= Duration::from_millis(30));
        // An unknown group is simply always silent; it never panics.
        assert!(contact.silence(9) >= Duration::from_millis(30));
    }
}
