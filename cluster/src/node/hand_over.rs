//! The hand-over at shutdown: before it stops, a node gives every partition it leads to
//! another voter (the hand-back procedure of [`crate::handoff`]), so that a rolling restart
//! moves leadership in milliseconds instead of a failover per partition.

use std::collections::BTreeSet;
use std::time::Duration;

use herald_storage::Partition;
use herald_storage::raft::{GroupId, NodeId, partition_group};
use openraft::ServerState;

use super::ClusterNode;
use crate::handoff;
use crate::message::{AppRequest, encode};
use crate::rpc::{Request, Response};

impl ClusterNode {
    /// Hands every partition group this node leads to another voter (the hand-back procedure
    /// of [`crate::handoff`], all partitions at once), by `deadline`. Each group's other
    /// voters are asked in turn ([`handoff::hand_over_order`]: those that answer a ping, then
    /// the most caught up), and again while time remains: a voter refuses when it cannot
    /// reach the group's third voter (one restarted a moment ago, say), and another may not
    /// need to. A partition no voter takes (led for less than a lease, no voter caught up or
    /// able to lead) fails over as after a crash. Each outcome is logged.
    pub(super) async fn hand_over_partitions(&self, deadline: tokio::time::Instant) {
        let me = self.inner.id;
        let lease = Duration::from_millis(self.inner.raft_timings.election_max_ms);
        let led: Vec<(Partition, GroupId)> = (0..self.inner.gates.len())
            .map(|partition| partition as Partition)
            .map(|partition| (partition, partition_group(partition)))
            .filter(|&(_, group)| {
                let m = self.inner.groups[usize::from(group)].metrics();
                let m = m.borrow();
                m.current_leader == Some(me) && m.state == ServerState::Leader
            })
            .collect();
        if led.is_empty() {
            return;
        }
        // Which other voters answer at all (one ping each): they are asked first.
        let mut others = BTreeSet::new();
        for &(_, group) in &led {
            let m = self.inner.groups[usize::from(group)].metrics();
            others.extend(
                m.borrow()
                    .membership_config
                    .membership()
                    .voter_ids()
                    .filter(|&v| v != me),
            );
        }
        let ping_deadline = Duration::from_millis(self.inner.raft_timings.heartbeat_ms);
        let pings = others.into_iter().map(|voter| async move {
            let request = Request::App(encode(&AppRequest::Ping));
            let answered = matches!(
                self.inner.peers.call(voter, &request, ping_deadline).await,
                Ok(Response::App(_))
            );
            (voter, answered)
        });
        let reachable: BTreeSet<NodeId> = futures::future::join_all(pings)
            .await
            .into_iter()
            .filter_map(|(voter, answered)| answered.then_some(voter))
            .collect();
        let runs = led.into_iter().map(|(partition, group)| {
            let reachable = &reachable;
            async move {
                let raft = &self.inner.groups[usize::from(group)];
                let gate = &self.inner.gates[usize::from(partition)];
                let peers = &self.inner.peers;
                let m = raft.metrics().borrow().clone();
                let voters: Vec<NodeId> = m.membership_config.membership().voter_ids().collect();
                // The procedure needs the leader's vote and the taker's to be a quorum.
                if voters.len() > 3 {
                    tracing::info!(
                        group,
                        partition,
                        "shutting down: partition {partition} is not handed over (more than three voters); it fails over once this node stops"
                    );
                    return;
                }
                let candidates = handoff::hand_over_order(
                    me,
                    &voters,
                    |v| handoff::matched_index(&m, v),
                    |v| reachable.contains(&v),
                );
                if candidates.is_empty() {
                    tracing::info!(
                        group,
                        partition,
                        "shutting down: partition {partition} has no other voter to hand it to"
                    );
                    return;
                }
                let started = tokio::time::Instant::now();
                let outcome = handoff::hand_over(&candidates, deadline, lease, |to| async move {
                    let m = raft.metrics().borrow().clone();
                    if m.current_leader != Some(me) || m.state != ServerState::Leader {
                        // An earlier attempt's election (whose answer was lost) or a failover
                        // moved it: whoever leads now has it.
                        let mut metrics = raft.metrics();
                        let leader = tokio::time::timeout(
                            lease,
                            metrics.wait_for(|m| m.current_leader.is_some()),
                        )
                        .await
                        .ok()
                        .and_then(|r| r.ok())
                        .and_then(|m| m.current_leader);
                        return match leader {
                            Some(leader) if leader != me => handoff::Attempt::Moved(leader),
                            _ => handoff::Attempt::GaveUp(
                                "this node no longer leads it, and no other node does yet".into(),
                            ),
                        };
                    }
                    let hand_over = handoff::HandBack {
                        me,
                        group,
                        to,
                        term: m.current_term,
                        lease,
                    };
                    hand_over.run(raft, gate, peers).await
                })
                .await;
                let held_ms = started.elapsed().as_millis() as u64;
                match outcome.took {
                    Some(node) if outcome.failed.is_empty() => tracing::info!(
                        group,
                        partition,
                        node,
                        held_ms,
                        "shutting down: node {node} took over partition {partition}"
                    ),
                    Some(node) => tracing::info!(
                        group,
                        partition,
                        node,
                        attempts = outcome.attempts,
                        held_ms,
                        "shutting down: node {node} took over partition {partition}, after {}",
                        outcome.why_not()
                    ),
                    None => tracing::info!(
                        group,
                        partition,
                        attempts = outcome.attempts,
                        held_ms,
                        "shutting down: no voter took over partition {partition} ({}); it fails over once this node stops",
                        outcome.why_not()
                    ),
                }
            }
        });
        futures::future::join_all(runs).await;
    }
}
