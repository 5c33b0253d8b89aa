//! The node's side of fast failover and pre-vote: the loop that watches how long each group's
//! leader has been silent, the probes of the other voters, turning openraft's timer elections
//! on and off, and calling (or asking the best candidate to call) an election. The decisions
//! themselves are pure functions in [`crate::failover`]; this module does the talking.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use herald_storage::raft::{GroupId, NodeId, RaftLogStore};
use openraft::ServerState;

use super::ClusterNode;
use crate::failover::{self, Decision, PreVote, Probe};
use crate::message::{AppRequest, AppResponse, decode, encode};
use crate::rpc::{Request, Response};

impl ClusterNode {
    /// Fast failover and pre-vote (see [`failover`]): on every group whose failover
    /// coordinator this node is, once the leader has been silent for the lease plus a
    /// heartbeat, probes the other voters and has the one with the longest log call an
    /// election at once; and on every group it votes in, keeps openraft's timer elections off
    /// unless a quorum of voters confirms that nobody hears a leader.
    pub(super) async fn failover_loop(&self) {
        let timings = self.inner.raft_timings;
        let tick = Duration::from_millis((timings.heartbeat_ms / 2).max(10));
        let lease = Duration::from_millis(timings.election_max_ms);
        let suspect_after = lease + Duration::from_millis(timings.heartbeat_ms);
        // One attempt per group per lease: a failed one is left to openraft's timers.
        let mut last_attempt: Vec<Option<tokio::time::Instant>> =
            vec![None; self.inner.groups.len()];
        // The same for the pre-vote probes, and whether each group's timer elections are on.
        let mut last_check: Vec<Option<tokio::time::Instant>> = vec![None; self.inner.groups.len()];
        let elections_on: Arc<Vec<AtomicBool>> = Arc::new(
            (0..self.inner.groups.len())
                .map(|_| AtomicBool::new(false))
                .collect(),
        );
        let mut ticker = tokio::time::interval(tick);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = self.inner.shutdown.cancelled() => return,
            }
            let contact = &self.inner.contact;
            for (group, raft) in self.inner.groups.iter().enumerate() {
                let silence = contact.silence(group);
                if silence < lease {
                    // A leader is heard: no election is needed, so none may start by timer.
                    if elections_on[group].swap(false, Ordering::Relaxed) {
                        raft.runtime_config().elect(false);
                    }
                } else if silence >= suspect_after
                    && last_check[group].is_none_or(|at| at.elapsed() >= lease)
                {
                    last_check[group] = Some(tokio::time::Instant::now());
                    let node = self.clone();
                    let elections_on = elections_on.clone();
                    tokio::spawn(async move {
                        node.pre_vote(group as GroupId, &elections_on[group]).await
                    });
                }
                if !timings.fast_failover {
                    continue;
                }
                // Cheap checks first: most ticks end here, without touching the metrics.
                if contact.silence(group) < suspect_after
                    || last_attempt[group].is_some_and(|at| at.elapsed() < lease)
                {
                    continue;
                }
                let (leader, voters) = {
                    let m = raft.metrics();
                    let m = m.borrow();
                    if m.state != ServerState::Follower {
                        continue;
                    }
                    let Some(leader) = m.current_leader else {
                        continue;
                    };
                    let voters: Vec<NodeId> =
                        m.membership_config.membership().voter_ids().collect();
                    (leader, voters)
                };
                if leader == self.inner.id
                    || failover::coordinator(&voters, leader) != Some(self.inner.id)
                {
                    continue;
                }
                last_attempt[group] = Some(tokio::time::Instant::now());
                let node = self.clone();
                let group = group as GroupId;
                tokio::spawn(async move { node.coordinate_failover(group, leader, voters).await });
            }
        }
    }

    /// herald's pre-vote for `group` (openraft 0.9 has none): asks the other voters whether
    /// they hear a leader, and turns openraft's timer elections on only if a quorum answered
    /// and none does. A node cut off from the leader alone (or from everyone) thus calls no
    /// elections: each would raise its term, and the first message it then exchanged with the
    /// leader would make it step down, after the heal, for an election nobody needed.
    async fn pre_vote(&self, group: GroupId, elections_on: &AtomicBool) {
        let Some(raft) = self.inner.groups.get(usize::from(group)) else {
            return;
        };
        let voters: Vec<NodeId> = {
            let m = raft.metrics();
            let m = m.borrow();
            if m.state == ServerState::Leader {
                return;
            }
            m.membership_config.membership().voter_ids().collect()
        };
        if !voters.contains(&self.inner.id) {
            return;
        }
        let lease = Duration::from_millis(self.inner.raft_timings.election_max_ms);
        let answers = self.probe_voters(group, &voters, None, lease).await;
        let quorum = voters.len() / 2 + 1;
        let PreVote { elect, heard } = failover::pre_vote(&answers, lease, quorum);
        // Heard from the leader meanwhile: the loop has the last word.
        if self.inner.contact.silence(usize::from(group)) < lease {
            return;
        }
        if elections_on.swap(elect, Ordering::Relaxed) != elect {
            raft.runtime_config().elect(elect);
            if elect {
                tracing::debug!(
                    group,
                    ?answers,
                    "pre-vote: no voter hears a leader, elections on"
                );
            } else {
                tracing::debug!(
                    group,
                    ?answers,
                    "pre-vote: this node hears no leader, but {}; it calls no election",
                    if heard {
                        "another voter does (a link of this node is cut)"
                    } else {
                        "too few voters answered (this node is cut off)"
                    }
                );
            }
        }
    }

    /// The probes of `voters` but `except` about `group`, this node's own included, each
    /// waited for at most `deadline`.
    pub(super) async fn probe_voters(
        &self,
        group: GroupId,
        voters: &[NodeId],
        except: Option<NodeId>,
        deadline: Duration,
    ) -> Vec<(NodeId, Probe)> {
        let not_member = std::sync::atomic::AtomicUsize::new(0);
        let probes = voters
            .iter()
            .copied()
            .filter(|v| Some(*v) != except)
            .map(|voter| {
                let node = self.clone();
                let not_member = &not_member;
                async move {
                    let probe = if voter == node.inner.id {
                        node.probe(group).await
                    } else {
                        let request = Request::App(encode(&AppRequest::Probe { group }));
                        match node.inner.peers.call(voter, &request, deadline).await {
                            Ok(Response::App(bytes)) => match decode::<AppResponse>(&bytes) {
                                Ok(AppResponse::Probe(probe)) => probe,
                                Ok(AppResponse::NotMember) => {
                                    not_member.fetch_add(1, Ordering::Relaxed);
                                    None
                                }
                                _ => None,
                            },
                            _ => None,
                        }
                    };
                    probe.map(|probe| (voter, probe))
                }
            });
        let answers: Vec<(NodeId, Probe)> = futures::future::join_all(probes)
            .await
            .into_iter()
            .flatten()
            .collect();
        // A member that has not applied a join yet may answer so to a new node: only a
        // quorum of the voters counts.
        if not_member.load(Ordering::Relaxed) > voters.len() / 2 {
            if !self.removed_now() {
                tracing::warn!(
                    group,
                    "the cluster's members say this node is not a member (it was removed): it commits nothing; stop it and delete its data directory, or join it again"
                );
            }
            self.told_not_member();
        }
        answers
    }

    /// Probes `voters` (but the silent `leader`) about `group` and has the best candidate call
    /// an election, unless someone still hears the leader.
    async fn coordinate_failover(&self, group: GroupId, leader: NodeId, voters: Vec<NodeId>) {
        let timings = self.inner.raft_timings;
        let lease = Duration::from_millis(timings.election_max_ms);
        let deadline = Duration::from_millis(timings.heartbeat_ms * 2);
        let answers = self
            .probe_voters(group, &voters, Some(leader), deadline)
            .await;
        let quorum = voters.len() / 2 + 1;
        let Decision::Elect(candidate) = failover::decide(&answers, lease, quorum) else {
            tracing::debug!(
                group,
                leader,
                ?answers,
                "failover: the leader is still heard"
            );
            return;
        };
        tracing::info!(
            group,
            leader,
            candidate,
            ?answers,
            "failover: the leader is silent, calling an election"
        );
        if candidate == self.inner.id {
            self.elect_if_leader_silent(group).await;
        } else {
            let request = Request::App(encode(&AppRequest::Elect { group }));
            if let Err(error) = self.inner.peers.call(candidate, &request, deadline).await {
                tracing::debug!(group, candidate, %error, "failover: election request not delivered");
            }
        }
    }

    /// This node's answer to a failover probe for `group` (also asked before a publish is
    /// relayed through this node).
    pub(super) async fn probe(&self, group: GroupId) -> Option<Probe> {
        let raft = self.inner.groups.get(usize::from(group))?;
        // A leader answers for itself by how long ago a quorum acknowledged it: one whose
        // followers no longer take its messages (cut off, or refused) must not keep the others
        // from electing a new leader.
        let quorum_ack = {
            let m = raft.metrics();
            let m = m.borrow();
            (m.current_leader == Some(self.inner.id))
                .then(|| m.millis_since_quorum_ack.unwrap_or(u64::MAX))
        };
        let silent_ms = match quorum_ack {
            Some(ms) => ms,
            None => self.inner.contact.silence(usize::from(group)).as_millis() as u64,
        };
        let mut log = RaftLogStore::new(self.inner.journal.clone(), group);
        let last_log = openraft::storage::RaftLogStorage::get_log_state(&mut log)
            .await
            .ok()?
            .last_log_id;
        Some(Probe {
            silent_ms,
            last_log,
        })
    }

    /// Calls an election in `group` if this node has not heard its leader for a lease (it may
    /// have heard a new one since the coordinator decided).
    pub(super) async fn elect_if_leader_silent(&self, group: GroupId) {
        let Some(raft) = self.inner.groups.get(usize::from(group)) else {
            return;
        };
        let lease = Duration::from_millis(self.inner.raft_timings.election_max_ms);
        if self.inner.contact.silence(usize::from(group)) < lease
            || raft.metrics().borrow().state == ServerState::Leader
        {
            return;
        }
        if let Err(error) = raft.trigger().elect().await {
            tracing::warn!(group, %error, "failover: cannot call an election");
        }
    }
}
