//! Writes to a group through its leader, the meta group's above all: a join or a removal
//! (checked on the meta leader: the address, a changed address, the partition count), the
//! namespace config, the cluster's `Init`. Any node may be asked: it passes the write on to the
//! leader it knows, and retries while there is none. A removal that would leave a group
//! without a live quorum is found here too (`removal_stalls`), for the HTTP handler to refuse.

use std::collections::BTreeSet;
use std::time::Duration;

use herald_storage::raft::{Command, GroupId, META_GROUP, NodeId, group_partition};
use openraft::error::{ChangeMembershipError, ClientWriteError, RaftError};
use openraft::{BasicNode, ChangeMembers};

use super::{ClusterNode, raft_error};
use crate::message::{AppRequest, AppResponse, ProposeError};

/// How long a join asks a node that does not answer for its partition count before it joins
/// it unchecked (then checked before it becomes a voter). A call on the connection to a node
/// that restarted since (as after a refused join: wiped, started with the right count) took
/// 3 s to fail before the next one reached the new process.
const JOIN_PROBE_PATIENCE: Duration = Duration::from_secs(6);

/// How long a join or removal waits for a membership change already under way in the meta
/// group (the placement round promoting the node joined just before, say) before it fails.
const CHANGE_IN_PROGRESS_PATIENCE: Duration = Duration::from_secs(5);

/// How long a join of a node removed a moment ago waits for it to have left every partition
/// group (each partition's leader takes a removed node out of its group on its own, one
/// group per second at most).
const LEAVE_PATIENCE: Duration = Duration::from_secs(30);

/// How long a node that passes a join or removal on to the meta leader waits for its answer:
/// the leader's own waits ([`LEAVE_PATIENCE`], [`JOIN_PROBE_PATIENCE`],
/// [`CHANGE_IN_PROGRESS_PATIENCE`]) and a commit, within the CLI's 60 s for a change.
const META_REQUEST_LIMIT: Duration = Duration::from_secs(48);

/// Runs the membership change `change` makes, again every 100 ms while openraft refuses it
/// because another change is under way (for at most [`CHANGE_IN_PROGRESS_PATIENCE`]): two
/// joins back to back used to fail the second with "the cluster is already undergoing a
/// configuration change", as the first one's promotion was still committing.
async fn after_change_in_progress<F, Fut, R>(
    mut change: F,
) -> Result<(), RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<
            Output = Result<R, RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>>,
        >,
{
    let deadline = tokio::time::Instant::now() + CHANGE_IN_PROGRESS_PATIENCE;
    loop {
        match change().await {
            Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(
                ChangeMembershipError::InProgress(_),
            ))) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => return other.map(|_| ()),
        }
    }
}

impl ClusterNode {
    /// Why removing `node` now would stop groups from committing, if it would: the groups
    /// (the meta group and partitions) whose voters left would have no majority that takes
    /// part, as this node sees them (see [`crate::placement::removal_stalls`]), in a sentence
    /// saying what to do instead. A voter that does not answer takes no part, nor does one
    /// already removed that a partition group still lists (its leader takes it out within
    /// seconds; the members no longer take its messages). `herald cluster remove` refuses
    /// such a removal unless forced.
    pub fn removal_stalls(&self, node: NodeId) -> Option<String> {
        let members = self.members();
        let mut stalled: Vec<String> = Vec::new();
        let mut silent_voters: BTreeSet<NodeId> = BTreeSet::new();
        let mut removed_voters: BTreeSet<NodeId> = BTreeSet::new();
        let mut pairs = false;
        for (group, raft) in self.inner.groups.iter().enumerate() {
            let voters: BTreeSet<NodeId> = raft
                .metrics()
                .borrow()
                .membership_config
                .membership()
                .voter_ids()
                .collect();
            let meta = group == usize::from(META_GROUP);
            let removed = |id: NodeId| !meta && !members.is_empty() && !members.contains_key(&id);
            let silent =
                |id: NodeId| id != self.inner.id && (self.inner.peers.is_silent(id) || removed(id));
            if let Some(quiet) = crate::placement::removal_stalls(node, &voters, meta, silent) {
                stalled.push(match group_partition(group as GroupId) {
                    Some(partition) => format!("partition {partition}"),
                    None => "the meta group".to_string(),
                });
                pairs |= quiet.is_empty();
                for id in quiet {
                    if removed(id) {
                        removed_voters.insert(id);
                    } else {
                        silent_voters.insert(id);
                    }
                }
            }
        }
        if stalled.is_empty() {
            return None;
        }
        let names = |ids: &BTreeSet<NodeId>| {
            ids.iter()
                .map(|id| format!("node {id}"))
                .collect::<Vec<_>>()
                .join(" and ")
        };
        let groups = stalled.join(", ");
        if !removed_voters.is_empty() {
            let gone = names(&removed_voters);
            return Some(format!(
                "removing node {node} now would leave {groups} without a quorum: {gone} was removed a moment ago and these partitions still count it as a voter until their leaders take it out (within seconds), while the members no longer take its messages, so nothing would commit there again. Wait until `herald cluster status` no longer lists {gone} among any partition's voters, then remove node {node}; --force removes node {node} anyway"
            ));
        }
        if !silent_voters.is_empty() {
            let down = names(&silent_voters);
            return Some(format!(
                "removing node {node} now would leave {groups} without a quorum while {down} does not answer: the members stop taking node {node}'s messages at once, so nothing would commit there (not even the removal's own change) until {down} is back. Bring {down} back first, or remove {down} first; --force removes node {node} anyway"
            ));
        }
        debug_assert!(pairs);
        if members.len() > 2 {
            return Some(format!(
                "removing node {node} now would leave {groups} without a quorum: node {node} is one of their two voters for now (a node was removed or joined a moment ago; their leaders make a third member a voter within seconds), and a group of two cannot drop one once the members stop taking its messages. Retry once `herald cluster status` shows three voters for every partition; --force removes node {node} anyway"
            ));
        }
        Some(format!(
            "removing node {node} would leave {groups} without a quorum: node {node} is one of their two voters, and a group of two cannot drop one once the members stop taking its messages (its other voter alone is no majority of two), so nothing would commit there again. A cluster cannot shrink below two members: to go down to one node, start a new single node and move the clients to it; --force removes node {node} anyway"
        ))
    }

    pub(super) async fn meta_request(&self, request: AppRequest) -> Result<(), ProposeError> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let leader = self.inner.groups[usize::from(META_GROUP)]
                .metrics()
                .borrow()
                .current_leader;
            let result = match leader {
                Some(l) if l == self.inner.id => self.handle_meta(request.clone()).await,
                // The leader's own waits (for a removed node to leave the partitions, for
                // the joined node's answer, for a change under way) and then some.
                Some(l) => match self.call_within(l, &request, META_REQUEST_LIMIT).await {
                    Ok(AppResponse::Done(r)) => r,
                    Ok(other) => Err(ProposeError::Failed(format!("unexpected answer {other:?}"))),
                    Err(e) => Err(e),
                },
                None => Err(ProposeError::NotLeader {
                    group: META_GROUP,
                    leader: None,
                }),
            };
            match result {
                Err(ProposeError::NotLeader { .. }) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                other => return other,
            }
        }
    }

    /// Join/Remove on the meta leader.
    pub(super) async fn handle_meta(&self, request: AppRequest) -> Result<(), ProposeError> {
        let meta = &self.inner.groups[usize::from(META_GROUP)];
        // A leader that removed itself goes on leading until its next tick (about 110 ms),
        // though the group no longer lists it; a change asked of it then trips openraft's
        // `is_leader` assertion. The caller retries and finds the new leader.
        let listed = meta
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .nodes()
            .any(|(id, _)| *id == self.inner.id);
        if !listed {
            return Err(ProposeError::NotLeader {
                group: META_GROUP,
                leader: None,
            });
        }
        let result = match request {
            AppRequest::Join { node, addr } => {
                if let Some(problem) = crate::rpc::address_problem(&addr) {
                    return Err(ProposeError::Failed(format!(
                        "cannot join node {node} at {addr:?}: {problem}"
                    )));
                }
                if let Some(known) = self.members().get(&node)
                    && *known != addr
                {
                    return Err(ProposeError::Failed(format!(
                        "node {node} is already a member, at {known}; to change its address, remove it (`herald cluster remove --node-id {node}`) and join it again at the new one"
                    )));
                }
                if !self.members().contains_key(&node)
                    && let Err(still) = self.until_left_partitions(node).await
                {
                    return Err(ProposeError::Failed(format!(
                        "node {node} has not left partitions {still} since its removal (each partition's leader takes it out of its group; a partition without a leader cannot): nothing was changed; join it again once `herald cluster status` no longer lists it in their voters"
                    )));
                }
                self.inner.allowed.write().insert(node);
                self.inner.peers.set_addr(node, addr.clone());
                // A node already up on a store of another partition count could never apply
                // the cluster's Init: refused now rather than voting and leading partitions
                // it cannot serve. A call that fails tells nothing (a connection to a node
                // that restarted is found dead by the first), so it is asked again for a
                // while. (One not up yet is checked before it becomes a voter.)
                let deadline = tokio::time::Instant::now() + JOIN_PROBE_PATIENCE;
                let compared = loop {
                    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                    match self
                        .compare_partition_count(node, left.max(Duration::from_millis(200)))
                        .await
                    {
                        Err(_) if tokio::time::Instant::now() < deadline => {
                            // It refused this node as a member of a cluster it formed without
                            // it: another cluster, which it would never leave for this one.
                            if let Some(refusal) = self.of_another_cluster(node) {
                                return Err(ProposeError::Failed(refusal));
                            }
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                        other => break other,
                    }
                };
                if let Some(refusal) = self.of_another_cluster(node) {
                    return Err(ProposeError::Failed(refusal));
                }
                match compared {
                    Ok(Some(theirs)) => {
                        return Err(ProposeError::Failed(format!(
                            "node {node} runs {theirs} partitions than the cluster ({}): the count is fixed when a store is created; start it with --partitions {} on an empty data directory, then join it",
                            self.inner.store.partitions(),
                            self.inner.store.partitions()
                        )));
                    }
                    Ok(None) => {}
                    Err(reason) => tracing::info!(
                        node,
                        %reason,
                        "joining node {node}, which does not answer: it becomes a voter only once it answers, with the cluster's partition count"
                    ),
                }
                let node_info = BasicNode::new(addr);
                after_change_in_progress(|| meta.add_learner(node, node_info.clone(), true)).await
            }
            AppRequest::Remove { node } => {
                let m = meta.metrics().borrow().clone();
                let membership = m.membership_config.membership();
                let is_voter = membership.voter_ids().any(|v| v == node);
                let known = membership.nodes().any(|(id, _)| *id == node);
                if !known {
                    return Err(ProposeError::Failed(format!("node {node} is not a member")));
                }
                // One membership change, never two: a voter's removal (`retain` false) takes
                // it out of the nodes too. When the voter removed is this leader, openraft 0.9
                // keeps it leading until its next tick (so that the followers learn of the
                // commit) though the group no longer lists it, and a second change asked of it
                // meanwhile is accepted, then trips a debug assertion that panics the group's
                // task (a release build appends it as a leader outside the group).
                let change = if is_voter {
                    ChangeMembers::RemoveVoters(BTreeSet::from([node]))
                } else {
                    ChangeMembers::RemoveNodes(BTreeSet::from([node]))
                };
                after_change_in_progress(|| meta.change_membership(change.clone(), false))
                    .await
                    .map_err(raft_error)?;
                // The partitions' leaders take the node out of their groups now; answered once
                // they have (at most LEAVE_PATIENCE), so that a removal run right after this
                // one does not find a group that still counts this node (and would refuse it,
                // see `removal_stalls`). Not when this leader removed itself: it hears no
                // group's change any more.
                if node != self.inner.id
                    && let Err(still) = self.until_partitions_whole(node).await
                {
                    tracing::warn!(
                        "node {node} was removed, but after {} s {still} (each partition's leader takes a removed node out of its group and makes another member a voter; a partition without a leader cannot): remove no other node until `herald cluster status` shows it done",
                        LEAVE_PATIENCE.as_secs()
                    );
                }
                return Ok(());
            }
            _ => return Err(ProposeError::Failed("not a meta request".into())),
        };
        result.map_err(raft_error)
    }

    /// Why `node` cannot be joined, if it refused this node's dial as a non-member of a
    /// cluster it formed under another epoch: it runs on the store of another cluster (formed
    /// alone, say, started with itself as its only peer), and would stay a member that never
    /// answers. Joined anyway, it was listed as unreachable for good, and the warning blamed
    /// its address.
    fn of_another_cluster(&self, node: NodeId) -> Option<String> {
        let formed = self.inner.peers.formed_without_this_node(node)?;
        let ours = self.epoch().to_string();
        (!formed.contains(&ours)).then(|| {
            format!(
                "node {node} is a member of another cluster ({formed}), not of this one (epoch {ours}): nothing was changed. To join it to this cluster, stop it and start it on an empty data directory with this cluster's --peers, then join it"
            )
        })
    }

    /// Waits (at most [`LEAVE_PATIENCE`]) until `node`, no member of the cluster, is in no
    /// partition group either. A node removed a moment ago is taken out of each partition
    /// group by that partition's leader, after the meta group's removal; joined again before
    /// that, it would stay a voter of those groups with the progress its old store had made,
    /// though it may come back on an empty data directory (the documented way back after a
    /// lost disk): the leaders then sent it entries that do not follow from what it holds,
    /// and its groups stopped on a log with a hole in it, for good. Joined once it has left
    /// them, it comes back to each group as a new learner and catches up from a snapshot.
    /// Returns the partitions it is still in at the deadline.
    async fn until_left_partitions(&self, node: NodeId) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + LEAVE_PATIENCE;
        loop {
            let still: Vec<String> = self
                .inner
                .groups
                .iter()
                .enumerate()
                .filter(|(_, raft)| {
                    raft.metrics()
                        .borrow()
                        .membership_config
                        .membership()
                        .nodes()
                        .any(|(id, _)| *id == node)
                })
                .filter_map(|(group, _)| group_partition(group as GroupId))
                .map(|partition| partition.to_string())
                .collect();
            if still.is_empty() {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(still.join(", "));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// After `node`'s removal: waits (at most [`LEAVE_PATIENCE`]) until it is in no partition
    /// group and every partition group has as many voters as placement gives it (three, or
    /// every member when fewer): the state a next removal needs (see [`Self::removal_stalls`]).
    /// Returns what is still missing at the deadline.
    async fn until_partitions_whole(&self, node: NodeId) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + LEAVE_PATIENCE;
        loop {
            let wanted = self.members().len().clamp(1, 3);
            let mut listing = Vec::new();
            let mut short = Vec::new();
            for (group, raft) in self.inner.groups.iter().enumerate() {
                let Some(partition) = group_partition(group as GroupId) else {
                    continue;
                };
                let metrics = raft.metrics();
                let metrics = metrics.borrow();
                let membership = metrics.membership_config.membership();
                if membership.nodes().any(|(id, _)| *id == node) {
                    listing.push(partition.to_string());
                } else if membership.voter_ids().count() < wanted {
                    short.push(partition.to_string());
                }
            }
            if listing.is_empty() && short.is_empty() {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                let mut missing = Vec::new();
                if !listing.is_empty() {
                    missing.push(format!("partitions {} still list it", listing.join(", ")));
                }
                if !short.is_empty() {
                    missing.push(format!(
                        "partitions {} have fewer than {wanted} voters",
                        short.join(", ")
                    ));
                }
                return Err(missing.join(" and "));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Writes `command` to `group` through its leader (this node or over RPC).
    pub(super) async fn write_via_leader(
        &self,
        group: GroupId,
        command: Command,
    ) -> Result<(), ProposeError> {
        let raft = &self.inner.groups[usize::from(group)];
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let mut metrics = raft.metrics();
            let _ = tokio::time::timeout(
                Duration::from_secs(5),
                metrics.wait_for(|m| m.current_leader.is_some()),
            )
            .await;
            let leader = raft.metrics().borrow().current_leader;
            let result = match leader {
                Some(l) if l == self.inner.id => raft
                    .client_write(command.clone())
                    .await
                    .map(|_| ())
                    .map_err(raft_error),
                Some(l) => match self
                    .call(
                        l,
                        &AppRequest::Write {
                            group,
                            command: command.clone(),
                        },
                    )
                    .await
                {
                    Ok(AppResponse::Done(r)) => r,
                    Ok(other) => Err(ProposeError::Failed(format!("unexpected answer {other:?}"))),
                    Err(e) => Err(e),
                },
                None => Err(ProposeError::NotLeader {
                    group,
                    leader: None,
                }),
            };
            match result {
                Err(_) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                other => return other,
            }
        }
    }
}
