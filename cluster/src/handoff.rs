//! Leadership hand-back: a partition's leadership returns to its preferred node (the first
//! voter of its [`crate::placement::placement`]) once that node is back and caught up, so that
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
//! vote and the taker's are a quorum), and only to a node that has been nearly caught up (and
//! not silent: a dead node's progress stays where it was on an idle partition) for as many
//! rounds in a row, so a node that flaps gets nothing. A node hands back one
//! partition at a time; after a hand-back that did not move the leadership, or one whose
//! partition came back within [`KEPT_ROUNDS`], that partition waits twice as long (up to
//! [`MAX_BACKOFF_ROUNDS`]) before the next try.
//!
//! While a hand-back runs, a node that forwarded a publish to the old leader and sees the new
//! one still waits for the old leader's answer (it is alive: see `proposer`), so even
//! publishes without message ids do not fail.
//!
//! This module holds the policy ([`HandBacks`], [`hand_back_target`]) and both sides of the
//! procedure (`HandBack::run` on the leader, `Taker::take_over` on the preferred node);
//! `node` runs the policy in its placement loop and answers `TakeOver`.
//!
//! A node shutting down (SIGTERM) hands over every partition it leads with the same procedure,
//! asking the group's other voters in turn ([`hand_over_order`], `hand_over`) until one takes
//! it or the time runs out: the voter asked first may refuse (it cannot yet reach a node that
//! has just restarted) where another can take over.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use herald_storage::raft::{GroupId, NodeId, TypeConfig};
use openraft::{BasicNode, Raft, RaftMetrics};
use tokio::sync::mpsc;

use crate::message::{AppRequest, AppResponse, ProposeError, decode, encode};
use crate::rpc::{Peers, Request, Response};

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

/// How far `node` has replicated, as a leader's metrics `m` see it.
pub(crate) fn matched_index(m: &RaftMetrics<NodeId, BasicNode>, node: NodeId) -> Option<u64> {
    m.replication
        .as_ref()?
        .get(&node)
        .cloned()
        .flatten()
        .map(|l| l.index)
}

/// One hand-back: `group`, which `me` leads in `term`, to `to` (steps 1, 2 and 4 above).
pub(crate) struct HandBack {
    pub me: NodeId,
    pub group: GroupId,
    pub to: NodeId,
    pub term: u64,
    /// The leader lease (the election timeout's maximum).
    pub lease: Duration,
}

impl HandBack {
    /// Closes `gate`, waits until `to` holds every entry, asks it to take over and waits until
    /// this node no longer leads (at most [`HANDOFF_LIMIT`] leases); then opens the gate again,
    /// whatever happened. Returns how it ended (the caller logs it).
    pub(crate) async fn run(
        &self,
        raft: &Raft<TypeConfig>,
        gate: &PartitionGate,
        peers: &Peers,
    ) -> Attempt {
        let HandBack {
            me,
            group,
            to,
            term,
            lease,
        } = *self;
        // Forwarded publishes are turned away from now on; no new round starts here, and the
        // one in flight finishes.
        let _closing = gate.start_closing();
        let Ok(_closed) = tokio::time::timeout(lease, gate.rounds.write()).await else {
            return Attempt::Failed("a publish round on this node did not finish in time".into());
        };
        let mut metrics = raft.metrics();
        let caught_up = tokio::time::timeout(
            lease,
            metrics.wait_for(|m| {
                m.current_leader == Some(me)
                    && m.current_term == term
                    && m.last_log_index.is_some()
                    && m.last_applied.map(|l| l.index) == m.last_log_index
                    && matched_index(m, to) == m.last_log_index
            }),
        )
        .await
        .map(|r| r.map(|m| m.last_log_index));
        let Ok(Ok(last_log_index)) = caught_up else {
            return Attempt::Failed(format!(
                "node {to} did not hold this node's whole log within {lease:?}"
            ));
        };
        let request = Request::App(encode(&AppRequest::TakeOver {
            group,
            last_log_index,
        }));
        // Only an explicit refusal means `to` will not call the election; after a lost answer
        // it may still, so the gate stays closed for the wait below either way.
        let (wait, answer) = match peers.call(to, &request, lease).await {
            Ok(Response::App(bytes)) => match decode::<AppResponse>(&bytes) {
                Ok(AppResponse::Done(Ok(()))) => (lease * HANDOFF_LIMIT, "it accepted".to_string()),
                Ok(AppResponse::Done(Err(error))) => return Attempt::Refused(error.to_string()),
                other => (lease, format!("unexpected answer {other:?}")),
            },
            Err(error) if error.not_sent() => {
                return Attempt::Failed(format!("the request was not delivered: {error}"));
            }
            Err(error) => (lease, error.to_string()),
            Ok(other) => (lease, format!("unexpected answer {other:?}")),
        };
        // Moved once another node leads (this node steps down as it grants the vote, and
        // knows no leader until the new one's first message).
        let moved = tokio::time::timeout(
            wait,
            metrics.wait_for(|m| m.current_leader.is_some_and(|l| l != me)),
        )
        .await
        .ok()
        .and_then(|r| r.ok())
        .and_then(|m| m.current_leader);
        match moved {
            Some(leader) => Attempt::Moved(leader),
            None => Attempt::Failed(format!(
                "asked node {to} ({answer}), but this node still led after {wait:?}"
            )),
        }
    }
}

/// How one attempt to hand a group over ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Attempt {
    /// Another node leads the group now (normally the one asked).
    Moved(NodeId),
    /// The node asked refused; its reason.
    Refused(String),
    /// The leadership did not move for another reason (the node did not catch up in time, the
    /// request did not reach it, the election it called did not end in time): what happened.
    Failed(String),
    /// Nothing more to try: this node no longer leads the group, and no other node is known to.
    GaveUp(String),
}

impl Attempt {
    /// Whether the leadership moved.
    pub(crate) fn moved(&self) -> bool {
        matches!(self, Attempt::Moved(_))
    }
}

/// How a shutting-down leader's hand-over of one group ended (see [`hand_over`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct HandOver {
    /// The node that leads the group now, if the leadership moved.
    pub took: Option<NodeId>,
    /// Attempts made.
    pub attempts: u32,
    /// Per node asked without success, in the order first asked: why it did not take over
    /// (its last attempt's reason).
    pub failed: Vec<(NodeId, String)>,
    /// Why the attempts stopped before the time ran out without a new leader, if they did.
    pub gave_up: Option<String>,
}

impl HandOver {
    fn record(&mut self, node: NodeId, why: String) {
        match self.failed.iter_mut().find(|(n, _)| *n == node) {
            Some(slot) => slot.1 = why,
            None => self.failed.push((node, why)),
        }
    }

    /// Why no voter took over, for the log: each voter asked and its last reason.
    pub(crate) fn why_not(&self) -> String {
        let mut parts: Vec<String> = self
            .failed
            .iter()
            .map(|(node, why)| format!("node {node}: {why}"))
            .collect();
        parts.extend(self.gave_up.clone());
        if parts.is_empty() {
            "no voter to ask".into()
        } else {
            parts.join("; ")
        }
    }
}

/// The order in which a leader that is shutting down asks its group's other `voters` to take
/// over: those that answered its ping (`reachable`) first, then the most caught up (`matched`:
/// the leader's replication progress of each); on a tie the higher id first, which keeps the
/// first choice of the earlier single-voter version when all answer and are caught up.
pub fn hand_over_order(
    me: NodeId,
    voters: &[NodeId],
    matched: impl Fn(NodeId) -> Option<u64>,
    reachable: impl Fn(NodeId) -> bool,
) -> Vec<NodeId> {
    let mut order: Vec<NodeId> = voters.iter().copied().filter(|&v| v != me).collect();
    order.sort_by_key(|&v| std::cmp::Reverse((reachable(v), matched(v), v)));
    order
}

/// Asks `candidates`, in turn, to take a group over (`attempt` asks one) until one does or an
/// attempt gives up; once every candidate has failed, waits `pause` and goes round again (a
/// voter that could not reach a just-restarted node a moment ago often can now). Stops at
/// `deadline` whatever happens (the attempt under way is dropped, which opens the gate).
pub(crate) async fn hand_over<F, Fut>(
    candidates: &[NodeId],
    deadline: tokio::time::Instant,
    pause: Duration,
    mut attempt: F,
) -> HandOver
where
    F: FnMut(NodeId) -> Fut,
    Fut: std::future::Future<Output = Attempt>,
{
    let mut outcome = HandOver::default();
    if candidates.is_empty() {
        return outcome;
    }
    loop {
        for &to in candidates {
            outcome.attempts += 1;
            let Ok(result) = tokio::time::timeout_at(deadline, attempt(to)).await else {
                // An earlier round's reason says more than this one's cut-off.
                if !outcome.failed.iter().any(|(n, _)| *n == to) {
                    outcome.record(to, "still under way when the time ran out".into());
                }
                return outcome;
            };
            match result {
                Attempt::Moved(node) => {
                    outcome.took = Some(node);
                    return outcome;
                }
                Attempt::Refused(why) => outcome.record(to, format!("refused: {why}")),
                Attempt::Failed(why) => outcome.record(to, why),
                Attempt::GaveUp(why) => {
                    outcome.gave_up = Some(why);
                    return outcome;
                }
            }
        }
        if tokio::time::Instant::now() + pause >= deadline {
            return outcome;
        }
        tokio::time::sleep(pause).await;
    }
}

/// The preferred node's side (step 3 above): what it needs of its node.
pub(crate) struct Taker<'a> {
    pub me: NodeId,
    pub raft: &'a Raft<TypeConfig>,
    pub peers: &'a Peers,
    /// How long each other voter may take to answer a ping.
    pub ping_deadline: Duration,
    /// The group's count of take-overs this node accepted (shown in the cluster status).
    pub takeovers: &'a AtomicU64,
}

impl Taker<'_> {
    /// The answer to [`AppRequest::TakeOver`] from `from`, the leader of `group`: accepted if
    /// this node is a voter that follows `from`, holds its whole log (applied) and reaches the
    /// group's other voters (else leading would cut them off); the election is then called at
    /// once (`from` grants its vote).
    pub(crate) async fn take_over(
        &self,
        from: NodeId,
        group: GroupId,
        last_log_index: Option<u64>,
    ) -> Result<(), ProposeError> {
        let refuse = |why: &str| {
            Err(ProposeError::Failed(format!(
                "node {} cannot take over group {group}: {why}",
                self.me
            )))
        };
        let m = self.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        if !membership.voter_ids().any(|v| v == self.me) {
            return refuse("not a voter");
        }
        if m.current_leader != Some(from) {
            return refuse("it follows another leader");
        }
        if m.last_log_index < last_log_index {
            return refuse("its log is behind");
        }
        let applied = m.last_applied.map_or(0, |l| l.index);
        if applied.saturating_add(READY_LAG) < m.last_log_index.unwrap_or(0) {
            return refuse("it is still applying its log");
        }
        let pings = membership
            .voter_ids()
            .filter(|&v| v != self.me && v != from)
            .map(|voter| async move {
                let request = Request::App(encode(&AppRequest::Ping));
                matches!(
                    self.peers.call(voter, &request, self.ping_deadline).await,
                    Ok(Response::App(_))
                )
            });
        if !futures::future::join_all(pings)
            .await
            .into_iter()
            .all(|up| up)
        {
            return refuse("it cannot reach every other voter");
        }
        self.takeovers.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            group,
            from,
            "taking over the partition its leader hands back"
        );
        let raft = self.raft.clone();
        tokio::spawn(async move {
            if let Err(error) = raft.trigger().elect().await {
                tracing::warn!(group, %error, "cannot call the election to take over");
            }
        });
        Ok(())
    }
}

/// How a hand-back ended, reported to the placement loop when dropped: also when the task
/// ends early or panics (as not moved), so that the loop never waits for it forever.
pub(crate) struct Outcome {
    group: usize,
    moved: bool,
    tx: mpsc::Sender<(usize, bool)>,
}

impl Outcome {
    /// The outcome of `group`'s hand-back, to be sent on `tx` (not moved unless set).
    pub(crate) fn new(group: usize, tx: mpsc::Sender<(usize, bool)>) -> Outcome {
        Outcome {
            group,
            moved: false,
            tx,
        }
    }
}

impl Outcome {
    /// Records whether the leadership moved. (A method, so that a task that calls it takes
    /// the whole outcome, and reports when it ends.)
    pub(crate) fn record(&mut self, moved: bool) {
        self.moved = moved;
    }
}

impl Drop for Outcome {
    fn drop(&mut self) {
        // The loop takes one outcome per hand-back and runs one at a time: never full.
        let _ = self.tx.try_send((self.group, self.moved));
    }
}

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
/// node (`me`), is one of the group's `voters`, has replicated up to `last_log_index` within
/// [`READY_LAG`] entries (`matched`: the leader's replication progress of that node), and is
/// not `silent` (`Peers::is_silent`). A dead node's match stays where it was while the
/// partition is idle, so without the last check a leader tried to hand an idle partition to
/// its dead preferred node again and again, each try closing the partition to publishes for
/// a few hundred milliseconds and holding up every other group's hand-back while it ran.
pub fn hand_back_target(
    me: NodeId,
    preferred: Option<NodeId>,
    voters: &[NodeId],
    last_log_index: Option<u64>,
    matched: Option<u64>,
    silent: impl Fn(NodeId) -> bool,
) -> Option<NodeId> {
    let preferred = preferred?;
    let caught_up =
        matched.is_some_and(|m| m.saturating_add(READY_LAG) >= last_log_index.unwrap_or(0));
    (preferred != me && voters.contains(&preferred) && caught_up && !silent(preferred))
        .then_some(preferred)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_nearly_caught_up_preferred_voter_other_than_the_leader() {
        let voters = [1, 2, 3];
        let target = |me, preferred, matched| {
            hand_back_target(me, preferred, &voters, Some(1_000), matched, |_| false)
        };
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
        // A dead preferred node still looks caught up while the partition is idle.
        let silent = |n: NodeId| n == 1;
        assert_eq!(
            hand_back_target(2, Some(1), &voters, Some(1_000), Some(1_000), silent),
            None,
            "silent"
        );
        assert_eq!(
            hand_back_target(1, Some(3), &voters, Some(1_000), Some(1_000), silent),
            Some(3)
        );
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

    #[tokio::test]
    async fn an_outcome_is_reported_when_its_task_ends_even_without_a_result() {
        let (tx, mut rx) = mpsc::channel(4);
        let mut outcome = Outcome::new(2, tx.clone());
        tokio::spawn(async move { outcome.record(true) })
            .await
            .unwrap();
        assert_eq!(rx.recv().await, Some((2, true)));
        let outcome = Outcome::new(3, tx);
        let task = tokio::spawn(async move {
            let _outcome = outcome;
            panic!("a hand-back that fails");
        });
        assert!(task.await.is_err());
        assert_eq!(
            rx.recv().await,
            Some((3, false)),
            "a panicked one counts as not moved"
        );
    }

    #[test]
    fn hand_over_order_prefers_reachable_then_caught_up_voters() {
        let matched = |v: NodeId| match v {
            1 => Some(5),
            2 => Some(90),
            3 => Some(100),
            4 => Some(100),
            _ => None,
        };
        let all = |_| true;
        assert_eq!(hand_over_order(1, &[1, 2, 3], matched, all), [3, 2]);
        assert_eq!(
            hand_over_order(1, &[1, 2, 3], matched, |v| v != 3),
            [2, 3],
            "a voter that did not answer the ping goes last"
        );
        assert_eq!(
            hand_over_order(1, &[1, 3, 4], matched, all),
            [4, 3],
            "a tie goes to the higher id, the earlier version's only choice"
        );
        assert_eq!(
            hand_over_order(2, &[1, 2, 5], matched, all),
            [1, 5],
            "never matched comes after matched"
        );
        assert_eq!(hand_over_order(1, &[1], matched, all), Vec::<NodeId>::new());
    }

    /// Runs [`hand_over`] over `candidates` with `answers` as the attempts' outcomes, in
    /// order (then `Failed`), and returns the outcome and the nodes asked.
    async fn run_hand_over(
        candidates: &[NodeId],
        limit: Duration,
        answers: Vec<Attempt>,
    ) -> (HandOver, Vec<NodeId>) {
        let answers = std::sync::Mutex::new(answers.into_iter());
        let asked = std::sync::Mutex::new(Vec::new());
        let deadline = tokio::time::Instant::now() + limit;
        let outcome = hand_over(candidates, deadline, Duration::from_millis(20), |to| {
            asked.lock().unwrap().push(to);
            let next = answers.lock().unwrap().next();
            async move { next.unwrap_or_else(|| Attempt::Failed("no".into())) }
        })
        .await;
        (outcome, asked.into_inner().unwrap())
    }

    #[tokio::test]
    async fn a_refused_hand_over_goes_to_the_next_voter() {
        let (outcome, asked) = run_hand_over(
            &[3, 2],
            Duration::from_secs(5),
            vec![
                Attempt::Refused(
                    "node 3 cannot take over group 1: it cannot reach every other voter".into(),
                ),
                Attempt::Moved(2),
            ],
        )
        .await;
        assert_eq!(asked, [3, 2]);
        assert_eq!(outcome.took, Some(2));
        assert_eq!(outcome.attempts, 2);
        assert_eq!(outcome.failed.len(), 1);
        assert!(
            outcome.failed[0].1.starts_with("refused: node 3 cannot"),
            "{outcome:?}"
        );
    }

    #[tokio::test]
    async fn every_voter_is_asked_again_while_time_remains() {
        let (outcome, asked) = run_hand_over(
            &[3, 2],
            Duration::from_secs(5),
            vec![
                Attempt::Refused("busy".into()),
                Attempt::Failed("not caught up".into()),
                Attempt::Moved(3),
            ],
        )
        .await;
        assert_eq!(asked, [3, 2, 3]);
        assert_eq!(outcome.took, Some(3));
    }

    #[tokio::test]
    async fn without_a_taker_it_says_why_each_voter_did_not_take_over() {
        let (outcome, asked) = run_hand_over(
            &[3, 2],
            Duration::from_millis(100),
            vec![Attempt::Refused(
                "node 3 cannot take over group 1: it cannot reach every other voter".into(),
            )],
        )
        .await;
        assert_eq!(outcome.took, None);
        assert!(asked.len() >= 2, "{asked:?}");
        let why = outcome.why_not();
        assert!(why.contains("node 3: "), "{why}");
        assert!(why.contains("node 2: no"), "{why}");
        // An attempt that gives up ends it at once.
        let (outcome, asked) = run_hand_over(
            &[3, 2],
            Duration::from_secs(5),
            vec![Attempt::GaveUp("this node no longer leads it".into())],
        )
        .await;
        assert_eq!(asked, [3]);
        assert_eq!(outcome.took, None);
        assert_eq!(outcome.why_not(), "this node no longer leads it");
        // And one still under way at the deadline is dropped there.
        let deadline = tokio::time::Instant::now() + Duration::from_millis(50);
        let outcome = hand_over(&[2], deadline, Duration::from_millis(10), |_| async {
            tokio::time::sleep(Duration::from_secs(60)).await;
            Attempt::Moved(2)
        })
        .await;
        assert_eq!(outcome.took, None);
        assert_eq!(
            outcome.why_not(),
            "node 2: still under way when the time ran out"
        );
        assert_eq!(
            run_hand_over(&[], Duration::from_secs(1), vec![])
                .await
                .0
                .attempts,
            0
        );
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
