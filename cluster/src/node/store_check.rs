//! Refusing to run a cluster node on the store of another cluster, before the node opens its
//! QUIC endpoint or dials anyone: a node that spoke first would show that cluster's members
//! another store under its node id, and they would log that a healthy member of theirs must
//! be removed and joined again.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use herald_storage::raft::{
    GroupStateMachine, META_GROUP, NodeId, RaftJournal, RaftLogStore, TypeConfig,
};
use herald_storage::{LiveNamespaces, OnCommit, Store};
use openraft::storage::StorageHelper;

use super::{ClusterConfig, ClusterError};

/// The meta group's members (node id -> cluster address) as the store holds them: the
/// membership its log and state machine end with, as Raft would load it.
async fn stored_members(
    journal: &Arc<RaftJournal>,
    namespaces: &Arc<LiveNamespaces>,
) -> Result<BTreeMap<NodeId, String>, ClusterError> {
    let mut log = RaftLogStore::new(journal.clone(), META_GROUP);
    let commit: OnCommit = Arc::new(|_: &[herald_storage::Event]| {});
    let mut sm = GroupStateMachine::new(journal.clone(), META_GROUP, namespaces.clone(), commit)?;
    let membership = StorageHelper::<TypeConfig, _, _>::new(&mut log, &mut sm)
        .get_membership()
        .await
        .map_err(|e| ClusterError::Raft(format!("reading the meta group's membership: {e}")))?;
    Ok(membership
        .effective()
        .membership()
        .nodes()
        .map(|(id, node)| (*id, node.addr.clone()))
        .collect())
}

/// Refuses ([`ClusterError::AnotherCluster`]) a formed store whose members are at none of the
/// addresses this node is configured with (its advertised address and its `--peers`), as
/// when `--data-dir` names another cluster's directory. Such a node would serve that
/// cluster's history as its own, and answer its own cluster's formation with another
/// cluster's log. Addresses that differ as written are compared once resolved (a host name
/// and its IP address are the same member); when some cannot be resolved, the node starts and
/// warns instead. A store with a member at one of these addresses passes: it is this
/// cluster's, whichever node's it is (the members judge that by its store id).
pub(super) async fn check_store_is_this_clusters(
    config: &ClusterConfig,
    store: &Store,
    journal: &Arc<RaftJournal>,
    namespaces: &Arc<LiveNamespaces>,
) -> Result<(), ClusterError> {
    if !store.cluster_initialized() {
        return Ok(());
    }
    let members = stored_members(journal, namespaces).await?;
    let ours: BTreeSet<&str> = config
        .peers
        .values()
        .chain([&config.advertise])
        .map(String::as_str)
        .collect();
    if members.is_empty() || members.values().any(|addr| ours.contains(addr.as_str())) {
        return Ok(());
    }
    let theirs: BTreeSet<&str> = members.values().map(String::as_str).collect();
    let (ours_resolved, theirs_resolved) = tokio::join!(resolve(&ours), resolve(&theirs));
    let listed = members
        .iter()
        .map(|(id, addr)| format!("{id} at {addr}"))
        .collect::<Vec<_>>()
        .join(", ");
    match (ours_resolved, theirs_resolved) {
        (Some(ours), Some(theirs)) if ours.is_disjoint(&theirs) => {
            Err(ClusterError::AnotherCluster {
                epoch: store.epoch().to_string(),
                members: listed,
                advertise: config.advertise.clone(),
            })
        }
        (Some(_), Some(_)) => Ok(()),
        _ => {
            tracing::warn!(
                members = %listed,
                "the store's cluster has no member at this node's address or at one of its --peers as written, and some of these addresses cannot be resolved to compare them: if this is another cluster's data directory, stop this node and start it on its own"
            );
            Ok(())
        }
    }
}

/// The socket addresses of `hosts` (`host:port`), or `None` if one of them cannot be resolved
/// within a second.
async fn resolve(hosts: &BTreeSet<&str>) -> Option<BTreeSet<SocketAddr>> {
    let mut all = BTreeSet::new();
    for host in hosts {
        let found = tokio::time::timeout(Duration::from_secs(1), tokio::net::lookup_host(*host))
            .await
            .ok()?
            .ok()?;
        all.extend(found);
    }
    Some(all)
}
