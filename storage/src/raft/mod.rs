//! The Raft side of the store: the types every herald Raft group shares, and (in submodules)
//! the sled-backed log storage and state machine that openraft drives, and the journal (one
//! write-ahead log for every group's Raft log) that makes appends durable.
//!
//! A cluster runs one *meta* group ([`META_GROUP`]: membership, the cluster's epoch and
//! partition count) and one group per partition ([`partition_group`]): the event logs. All of
//! them keep their Raft state in the node's one [`crate::Store`] (one sled tree, keys prefixed
//! with the group id), and every partition group's state machine calls the same
//! [`crate::Store::apply`] the single-node log calls.
//!
//! Entries carry the leader's clock (`now_ms`), so apply is deterministic on every member.

mod journal;
mod log_store;
mod snapshot_file;
mod state_machine;
mod support;

pub(crate) use journal::Done;
pub use journal::RaftJournal;
pub use log_store::RaftLogStore;
pub use state_machine::{GroupSnapshotBuilder, GroupStateMachine};

use serde::{Deserialize, Serialize};

use crate::event::{Epoch, Partition};
use crate::store::{Applied, Publish};

/// A Raft group id: [`META_GROUP`] or `1 + partition`.
pub type GroupId = u16;

/// A node id, as in certificates (`node-<id>.herald.cluster`) and `--node-id`.
pub type NodeId = u64;

/// The group that holds membership and the cluster's identity.
pub const META_GROUP: GroupId = 0;

/// The Raft group of `partition`.
pub const fn partition_group(partition: Partition) -> GroupId {
    partition + 1
}

/// The partition of a group, `None` for the meta group.
pub const fn group_partition(group: GroupId) -> Option<Partition> {
    if group == META_GROUP {
        None
    } else {
        Some(group - 1)
    }
}

openraft::declare_raft_types!(
    /// openraft's type configuration for every herald group.
    pub TypeConfig:
        D = Command,
        R = Reply,
        NodeId = NodeId,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = std::io::Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// What one application log entry asks the state machine to do.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Partition groups: a batch of publishes (one proposal round), stamped with the proposing
    /// leader's clock. Applied with [`crate::Store::apply`] in order.
    Publish {
        /// The leader's wall clock when it proposed the batch (Unix ms). Apply uses the larger of
        /// this and the partition's last applied clock, so time never runs backwards.
        now_ms: u64,
        /// The publishes, in the order they were accepted.
        publishes: Vec<Publish>,
    },
    /// Meta group: the cluster was created with this epoch and partition count. Applied once;
    /// a node whose store has another partition count refuses it.
    Init {
        /// The cluster's epoch: positions and cursors are only meaningful within it.
        epoch: Epoch,
        /// The partition count, fixed for the cluster's life.
        partitions: u16,
    },
    /// Meta group: the namespace config every member applies from now on (written when the
    /// cluster forms, from the forming node's file, and by `herald cluster namespaces --set`).
    /// Last, so that entries of the other variants decode as before.
    Namespaces {
        /// The config, resolved.
        spec: crate::namespace::NamespacesSpec,
    },
}

/// What applying one entry produced; exactly one per entry, blank and membership entries included.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    /// Blank, membership and meta entries.
    #[default]
    None,
    /// One [`Applied`] per publish of a [`Command::Publish`] batch, in order.
    Applied(Vec<Applied>),
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::raft::{AppendEntriesRequest, VoteRequest};
    use openraft::{BasicNode, Entry, EntryPayload, LogId, Membership, Vote};
    use std::collections::{BTreeMap, BTreeSet};

    fn roundtrip<T: Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug>(v: &T) {
        let config = bincode::config::standard();
        let bytes = bincode::serde::encode_to_vec(v, config).unwrap();
        let (back, used): (T, usize) = bincode::serde::decode_from_slice(&bytes, config).unwrap();
        assert_eq!(used, bytes.len());
        assert_eq!(&back, v);
    }

    /// openraft's serde types survive bincode 2 (no `skip_serializing_if` / untagged enums in
    /// what crosses the wire or the disk).
    #[test]
    fn openraft_types_roundtrip_through_bincode() {
        let log_id = LogId::new(openraft::CommittedLeaderId::new(3, 1), 7);
        let publish = Entry::<TypeConfig> {
            log_id,
            payload: EntryPayload::Normal(Command::Publish {
                now_ms: 5,
                publishes: vec![Publish::new("a", "b").with_id("m")],
            }),
        };
        roundtrip(&publish);
        let nodes: BTreeMap<NodeId, BasicNode> = (1..=3)
            .map(|i| (i, BasicNode::new(format!("127.0.0.1:{i}"))))
            .collect();
        let membership = Membership::new(vec![BTreeSet::from([1, 2])], nodes);
        let entry = Entry::<TypeConfig> {
            log_id,
            payload: EntryPayload::Membership(membership),
        };
        roundtrip(&entry);
        let vote = Vote::new_committed(3, 1);
        roundtrip(&vote);
        let req = AppendEntriesRequest::<TypeConfig> {
            vote,
            prev_log_id: Some(log_id),
            leader_commit: None,
            entries: vec![publish, entry],
        };
        let config = bincode::config::standard();
        let bytes = bincode::serde::encode_to_vec(&req, config).unwrap();
        let (back, _): (AppendEntriesRequest<TypeConfig>, usize) =
            bincode::serde::decode_from_slice(&bytes, config).unwrap();
        assert_eq!(back.entries.len(), 2);
        roundtrip(&VoteRequest::new(vote, Some(log_id)));
    }
}
