//! What this node answers other nodes: the [`Handler`] the RPC server dispatches to (which
//! Raft traffic a group takes, when its leader was last heard) and the node layer's own
//! requests ([`AppRequest`]): forwarded and relayed publishes, interest, non-durable events,
//! meta and group writes, group initialisation, failover probes and elections, hand-backs.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use herald_storage::raft::{GroupId, META_GROUP, NodeId, TypeConfig, partition_group};
use herald_storage::{Partition, Publish};
use openraft::error::{InitializeError, RaftError};
use openraft::{BasicNode, Raft};

use super::{ClusterNode, raft_error};
use crate::handoff;
use crate::message::{AppRequest, AppResponse, ProposeError, decode, encode};
use crate::rpc::Handler;

impl ClusterNode {
    /// Publishes another node sent for `partition`: to propose here as its leader, or, when
    /// `relayed`, to pass on to the leader if this node reaches it.
    async fn handle_forwarded(
        &self,
        from: NodeId,
        partition: Partition,
        publishes: Vec<Publish>,
        relayed: bool,
    ) -> AppResponse {
        if !self.is_member(from) {
            tracing::warn!(
                from,
                "refused publishes forwarded by a node that is not a member"
            );
            return AppResponse::Published(Err(ProposeError::Failed(format!(
                "node {from} is not a member of this cluster (removed?): its publishes are refused; join it again"
            ))));
        }
        // A hand-back of the partition is under way here: not proposed, so the
        // sender retries (and finds the new leader) whether or not it has ids.
        if self
            .inner
            .gates
            .get(usize::from(partition))
            .is_some_and(|gate| gate.closing())
        {
            return AppResponse::Published(Err(ProposeError::NotLeader {
                group: partition_group(partition),
                leader: None,
            }));
        }
        let rx = match self
            .enqueue_as(partition, publishes, Some(from), relayed)
            .await
        {
            Ok(rx) => rx,
            Err(error) => return AppResponse::Published(Err(error)),
        };
        AppResponse::Published(match rx.await {
            // Said as `NoLeader` (also "not committed", retried by the forwarder, which
            // answers its client at its own deadline): a node older than
            // `NotCommitted` could not decode it during a rolling upgrade.
            Ok(Err(ProposeError::NotCommitted(_))) => Err(ProposeError::NoLeader { partition }),
            Ok(result) => result,
            Err(_) => Err(ProposeError::Closed),
        })
    }

    pub(super) async fn handle_app(&self, from: NodeId, request: AppRequest) -> AppResponse {
        match request {
            AppRequest::Ping => AppResponse::Pong,
            AppRequest::Clock => AppResponse::Clock(herald_storage::unix_now_ms()),
            AppRequest::Formation => AppResponse::Formation(self.formation_note()),
            AppRequest::Build => AppResponse::Build(self.inner.build.clone()),
            AppRequest::Journal(asker) => {
                let stores = &self.inner.peer_stores;
                AppResponse::Journal {
                    identity: stores.identity(),
                    went_back: stores.went_back_members(),
                    refuses_you: asker
                        .filter(|asker| stores.refused_store(from, asker.store))
                        .map(|_| format!("node {from}: {}", stores.refusal(from))),
                }
            }
            // A member on a store that is not the one it was a member with (wiped) is not
            // told it catches up: the members refuse its Raft messages (see
            // `crate::peer_stores`), so it would not.
            AppRequest::FormedWithMe => match self.formation_note() {
                Some(note) if self.is_member(from) && !self.inner.peer_stores.is_refused(from) => {
                    AppResponse::FormationMember(note)
                }
                note => AppResponse::Formation(note),
            },
            AppRequest::Interest(interest) => {
                self.inner.interest.update(from, interest);
                AppResponse::Done(Ok(()))
            }
            AppRequest::Transient { events } => {
                let received = &self.inner.interest.relayed.received;
                received.fetch_add(events.len() as u64, Ordering::Relaxed);
                for event in &events {
                    (self.inner.hooks.deliver)(event);
                }
                AppResponse::Done(Ok(()))
            }
            AppRequest::Publish {
                partition,
                publishes,
            } => {
                self.handle_forwarded(from, partition, publishes, false)
                    .await
            }
            AppRequest::Relay {
                partition,
                publishes,
            } => {
                self.handle_forwarded(from, partition, publishes, true)
                    .await
            }
            AppRequest::Write { group, command } => {
                let Some(raft) = self.inner.groups.get(usize::from(group)) else {
                    return AppResponse::Done(Err(ProposeError::Failed(format!(
                        "no group {group}"
                    ))));
                };
                AppResponse::Done(
                    raft.client_write(command)
                        .await
                        .map(|_| ())
                        .map_err(raft_error),
                )
            }
            AppRequest::InitGroup {
                group,
                voters,
                learners,
            } => {
                let Some(raft) = self.inner.groups.get(usize::from(group)).cloned() else {
                    return AppResponse::Done(Err(ProposeError::Failed(format!(
                        "no group {group}"
                    ))));
                };
                for (id, addr) in voters.iter().chain(learners.iter()) {
                    self.inner.peers.set_addr(*id, addr.clone());
                }
                let nodes: BTreeMap<NodeId, BasicNode> = voters
                    .iter()
                    .map(|(id, addr)| (*id, BasicNode::new(addr.clone())))
                    .collect();
                // Asked only when it is not (a second init, a formation finished): openraft
                // logs an ERROR for an initialize it refuses.
                if matches!(raft.is_initialized().await, Ok(true)) {
                    return AppResponse::Done(Ok(()));
                }
                match raft.initialize(nodes).await {
                    Ok(()) | Err(RaftError::APIError(InitializeError::NotAllowed(_))) => {}
                    Err(error) => {
                        return AppResponse::Done(Err(ProposeError::Failed(format!(
                            "initialising group {group}: {error}"
                        ))));
                    }
                }
                tracing::debug!(group, from, "initialised a partition group");
                AppResponse::Done(Ok(()))
            }
            AppRequest::Probe { .. } if !self.is_member(from) => AppResponse::NotMember,
            AppRequest::Probe { group } => AppResponse::Probe(self.probe(group).await),
            AppRequest::Elect { group } => {
                self.elect_if_leader_silent(group).await;
                AppResponse::Done(Ok(()))
            }
            AppRequest::TakeOver {
                group,
                last_log_index,
            } => {
                let Some(raft) = self.inner.groups.get(usize::from(group)) else {
                    return AppResponse::Done(Err(ProposeError::Failed(format!(
                        "no group {group}"
                    ))));
                };
                let taker = handoff::Taker {
                    me: self.inner.id,
                    raft,
                    peers: &self.inner.peers,
                    ping_deadline: Duration::from_millis(self.inner.raft_timings.heartbeat_ms),
                    takeovers: &self.inner.takeovers[usize::from(group)],
                };
                AppResponse::Done(taker.take_over(from, group, last_log_index).await)
            }
            request @ (AppRequest::Join { .. } | AppRequest::Remove { .. }) => {
                let meta = &self.inner.groups[usize::from(META_GROUP)];
                if meta.metrics().borrow().current_leader != Some(self.inner.id) {
                    return AppResponse::Done(Err(ProposeError::NotLeader {
                        group: META_GROUP,
                        leader: meta.metrics().borrow().current_leader,
                    }));
                }
                AppResponse::Done(self.handle_meta(request).await)
            }
        }
    }
}

impl Handler for ClusterNode {
    fn store_ids(&self) -> Option<&dyn crate::rpc::StoreIds> {
        Some(self.inner.peer_stores.as_ref())
    }

    fn raft(&self, group: GroupId) -> Option<Raft<TypeConfig>> {
        let raft = self.inner.groups.get(usize::from(group))?;
        // A group whose Raft task stopped here (a full disk, say) takes no more messages: each
        // one made openraft log an ERROR (80 a second on a full disk, burying the one that
        // says why); its leaders now find it unreachable and back off.
        if crate::failure::GroupFailure::of(group, raft).is_some() {
            return None;
        }
        Some(raft.clone())
    }

    fn accepts_vote(&self, from: NodeId, group: GroupId) -> bool {
        let Some(raft) = self.inner.groups.get(usize::from(group)) else {
            return false;
        };
        if !self.accepts_leader(from, group) {
            return false;
        }
        let metrics = raft.metrics().borrow().clone();
        let membership = metrics.membership_config.membership();
        // A group not initialised here yet hears anyone (it is being formed or joined).
        let empty = membership.nodes().next().is_none();
        let member = membership.nodes().any(|(id, _)| *id == from);
        if !empty && !member {
            tracing::debug!(from, group, "refused a vote from a node outside the group");
        }
        empty || member
    }

    fn accepts_leader(&self, from: NodeId, group: GroupId) -> bool {
        if group == META_GROUP {
            return true;
        }
        // A partition group hears only members of the cluster (the meta group's nodes); before
        // this node knows the membership (formation, a join) it hears anyone.
        let metrics = self.inner.groups[usize::from(META_GROUP)].metrics();
        let metrics = metrics.borrow();
        let membership = metrics.membership_config.membership();
        let known = membership.nodes().next().is_some();
        let member = membership.nodes().any(|(id, _)| *id == from);
        if known && !member {
            tracing::debug!(
                from,
                group,
                "refused Raft traffic from a node that is not a member of the cluster"
            );
        }
        !known || member
    }

    fn heard_from_leader(&self, group: GroupId, leader_commit: Option<u64>) {
        self.inner.contact.heard(usize::from(group));
        self.inner.catch_up.heard(usize::from(group), leader_commit);
    }

    fn app(&self, from: NodeId, request: Bytes) -> BoxFuture<'static, Bytes> {
        let node = self.clone();
        Box::pin(async move {
            let response = match decode::<AppRequest>(&request) {
                Ok(request) => node.handle_app(from, request).await,
                Err(error) => AppResponse::Done(Err(ProposeError::Failed(error))),
            };
            encode(&response)
        })
    }
}
