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
//! - **Every other member silent** ([`ClusterNode::isolated`]): the proposers refuse publishes
//!   before their round goes out ("nothing was committed") and end a round in flight as
//!   "outcome unknown", instead of waiting out the publish timeout. A node that reaches a
//!   minority is not isolated: it may still relay through it.

use std::time::Duration;

use super::ClusterNode;

/// How often the reachability verdicts are refreshed.
const REACH_CHECK: Duration = Duration::from_millis(100);

/// This node's reachability, as the last two checks agreed on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reach {
    /// A majority of the members (this node included) is not silent.
    pub majority: bool,
    /// Every other member is silent.
    pub isolated: bool,
}

impl Default for Reach {
    fn default() -> Self {
        Reach {
            majority: true,
            isolated: false,
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

    /// The verdicts from this moment's view alone.
    fn reach_now(&self) -> Reach {
        if !self.is_formed() {
            return Reach::default();
        }
        let members = self.members();
        let peers = &self.inner.peers;
        let others: Vec<bool> = members
            .keys()
            .filter(|&&id| id != self.inner.id)
            .map(|&id| peers.is_silent(id))
            .collect();
        let answering = 1 + others.iter().filter(|silent| !**silent).count();
        Reach {
            majority: 2 * answering > members.len(),
            isolated: !others.is_empty() && others.iter().all(|silent| *silent),
        }
    }

    /// Refreshes the verdicts every [`REACH_CHECK`]; a verdict of trouble stands only once two
    /// checks in a row find it, and clears at the first check that does not.
    pub(super) async fn reachability_loop(&self) {
        let mut ticker = tokio::time::interval(REACH_CHECK);
        let mut last = Reach::default();
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                () = self.inner.shutdown.cancelled() => break,
            }
            let now = self.reach_now();
            let judged = Reach {
                majority: now.majority || last.majority,
                isolated: now.isolated && last.isolated,
            };
            last = now;
            self.inner.reach.send_if_modified(|was| {
                let changed = *was != judged;
                *was = judged;
                changed
            });
        }
    }
}
