//! Reachability: whether this node still reaches the other members, judged from its own calls
//! to them, a second after a cut rather than at the Raft timers' verdicts.
//!
//! A member is *silent* when it cannot be dialed or has left every call of this node
//! unanswered for [`crate::rpc::SILENT_AFTER`] ([`crate::rpc::Peers::is_silent`]; Raft
//! heartbeats make a call every 75 ms). Two verdicts follow, refreshed every [`REACH_CHECK`]
//! and each taken only when two checks in a row find it: a node that was itself stopped
//! (SIGSTOP, a VM pause) sees every call it made before as a second unanswered until the first
//! answers come in, milliseconds after it resumes.
//!
//! - **A majority silent** ([`ClusterNode::reaches_majority`] false): nothing can commit with
//!   this node and its live delivery has stopped; it is not ready, and the gateway tells its
//!   streaming clients to move. A failover elsewhere never looks like that: the node still
//!   reaches the others.
//! - **Removed** ([`Reach::removed`]): the node knows it is no longer a member
//!   ([`ClusterNode::is_removed`]); the proposers refuse publishes at once, saying so, and the
//!   gateway tells its streaming clients why they must move. Taken at the first check.
//! - **Every other member silent** ([`ClusterNode::isolated`]): the proposers refuse publishes
//!   before their round goes out ("nothing was committed") and end a round in flight as
//!   "outcome unknown", instead of waiting out the publish timeout. A node that reaches a
//!   minority is not isolated: it may still relay through it.
//!
//! A member whose store this node refuses (its data directory lost, replaced or gone back in
//! time: [`crate::peer_stores`]) counts as silent in both verdicts, though it answers: no Raft
//! message goes to it or is taken from it, so nothing commits with it. [`Reach::refused`] says
//! that one is, so that `/ready` and the refused publishes name the refusal rather than a
//! silence.
//!
//! A member this node has no call for (it leads no group the member follows, and no publish
//! goes its way) would show its silence only at the next call, up to a second later (the
//! clock round): in the chaos `partition-asym` scenario such a node took 2.7 s instead of
//! 1.25 s to refuse publishes. So once one member has left a call unanswered for
//! [`PROBE_AFTER`], every other member not called within that time is pinged, and each
//! verdict is ready a second after the cut whatever the traffic.

use std::collections::BTreeMap;
use std::time::Duration;

use herald_storage::raft::NodeId;

use super::ClusterNode;
use crate::message::{AppRequest, encode};
use crate::rpc::{Request, SILENT_AFTER};

/// How often the reachability verdicts are refreshed.
const REACH_CHECK: Duration = Duration::from_millis(100);

/// A member that has left a call unanswered this long makes this node ping the members it
/// has not called within this time (see the module doc). Raft heartbeats go every 75 ms, so
/// a live member answering them is never pinged.
const PROBE_AFTER: Duration = Duration::from_millis(250);

/// This node's reachability, as the last two checks agreed on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reach {
    /// A majority of the members (this node included) is not silent.
    pub majority: bool,
    /// Every other member is silent.
    pub isolated: bool,
    /// This node knows it was removed from the cluster ([`ClusterNode::is_removed`]).
    pub removed: bool,
    /// This node refuses the store of another member (see the module doc), which so counts
    /// as silent.
    pub refused: bool,
}

impl Default for Reach {
    fn default() -> Self {
        Reach {
            majority: true,
            isolated: false,
            removed: false,
            refused: false,
        }
    }
}

impl ClusterNode {
    /// Whether this node reaches a majority of the cluster's members (see the module doc).
    /// Always true before the cluster is formed.
    pub fn reaches_majority(&self) -> bool {
        self.inner.reach.borrow().majority
    }

    /// Whether every other member is silent to this node (see the module doc).
    pub fn isolated(&self) -> bool {
        self.inner.reach.borrow().isolated
    }

    /// Once a member has left a call unanswered for [`PROBE_AFTER`], pings each other member
    /// this node has not called within that time (one ping at a time per member), so that
    /// its silence shows too.
    fn probe_quiet_members(&self, probes: &mut BTreeMap<NodeId, tokio::task::JoinHandle<()>>) {
        probes.retain(|_, probe| !probe.is_finished());
        if !self.is_formed() {
            return;
        }
        let peers = &self.inner.peers;
        let others: Vec<NodeId> = self
            .members()
            .into_keys()
            .filter(|&id| id != self.inner.id)
            .collect();
        let suspect = others
            .iter()
            .any(|&id| peers.unanswered_for(id).is_some_and(|d| d >= PROBE_AFTER));
        if !suspect {
            return;
        }
        for id in others {
            if probes.contains_key(&id)
                || peers.is_unreachable(id)
                || peers.called_within(id, PROBE_AFTER)
            {
                continue;
            }
            let peers = peers.clone();
            probes.insert(
                id,
                tokio::spawn(async move {
                    let ping = Request::App(encode(&AppRequest::Ping));
                    let _ = peers.call(id, &ping, SILENT_AFTER * 2).await;
                }),
            );
        }
    }

    /// The other `members` whose store this node refuses (see the module doc).
    fn refused_members(&self, members: &BTreeMap<NodeId, String>) -> Vec<NodeId> {
        members
            .keys()
            .copied()
            .filter(|&id| id != self.inner.id && self.inner.peer_stores.refuses(id))
            .collect()
    }

    /// Why this node reaches no majority when that is (also) for members whose store it
    /// refuses, naming them: `None` when it refuses none, or reaches a majority.
    pub fn refused_members_note(&self) -> Option<String> {
        let reach = *self.inner.reach.borrow();
        if reach.majority || !reach.refused {
            return None;
        }
        let refused = self.refused_members(&self.members());
        let names: Vec<String> = refused.iter().map(|id| format!("node {id}")).collect();
        (!names.is_empty()).then(|| {
            format!(
                "no quorum: this node refuses {} (a data directory lost, replaced or gone back in time: `herald cluster status` says why; remove each and join it again), so it reaches no majority of the cluster's members",
                names.join(", ")
            )
        })
    }

    /// The verdicts from this moment's view alone.
    fn reach_now(&self) -> Reach {
        if !self.is_formed() {
            return Reach::default();
        }
        let members = self.members();
        let peers = &self.inner.peers;
        let refused: Vec<NodeId> = self.refused_members(&members);
        let others: Vec<bool> = members
            .keys()
            .filter(|&&id| id != self.inner.id)
            .map(|&id| peers.is_silent(id) || refused.contains(&id))
            .collect();
        let answering = 1 + others.iter().filter(|silent| !**silent).count();
        Reach {
            majority: 2 * answering > members.len(),
            isolated: !others.is_empty() && others.iter().all(|silent| *silent),
            removed: self.removed_now(),
            refused: !refused.is_empty(),
        }
    }

    /// Refreshes the verdicts every [`REACH_CHECK`]; a verdict of trouble stands only once two
    /// checks in a row find it, and clears at the first check that does not.
    pub(super) async fn reachability_loop(&self) {
        let mut ticker = tokio::time::interval(REACH_CHECK);
        let mut last = Reach::default();
        let mut probes: BTreeMap<NodeId, tokio::task::JoinHandle<()>> = BTreeMap::new();
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                () = self.inner.shutdown.cancelled() => break,
            }
            self.probe_quiet_members(&mut probes);
            let now = self.reach_now();
            let judged = Reach {
                majority: now.majority || last.majority,
                isolated: now.isolated && last.isolated,
                // A verdict of the membership (or of a quorum of voters), not of silences.
                removed: now.removed,
                refused: now.refused,
            };
            last = now;
            self.inner.reach.send_if_modified(|was| {
                if was.removed && !judged.removed {
                    tracing::info!(
                        "this node is a member of the cluster again (joined): it commits publishes and serves its clients"
                    );
                }
                let changed = *was != judged;
                *was = judged;
                changed
            });
        }
    }
}
