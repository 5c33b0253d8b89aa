//! Why a Raft group stopped on this node while the node runs, told by what failed.
//!
//! openraft records it in the group's metrics: `running_state` turns to its fatal error and
//! `state` to `Shutdown` when its core task ends. Its fatal errors are a storage error (the log
//! store or the state machine failed to read or write: a full disk, an I/O error), a panic, or
//! a stop; and a core task that panics ends without recording anything, which shows as its
//! metrics' sender gone. Only the first kind is a storage failure; the report says which.

use herald_storage::raft::{GroupId, NodeId, TypeConfig, group_partition};
use openraft::error::Fatal;
use openraft::{BasicNode, Raft, RaftMetrics, ServerState};

/// Why one of this node's Raft groups stopped (see [`crate::node::ClusterNode::failure`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupFailure {
    /// The group (0 = meta, p+1 = partition p).
    pub group: GroupId,
    /// Whether its storage failed (openraft's `Fatal::StorageError`); otherwise its Raft task
    /// panicked or stopped.
    pub storage: bool,
    /// openraft's error, or what the metrics show.
    pub cause: String,
}

impl GroupFailure {
    /// Why `raft` (group `group`) stopped, if it did.
    pub fn of(group: GroupId, raft: &Raft<TypeConfig>) -> Option<GroupFailure> {
        let metrics = raft.metrics();
        // The metrics' only sender is the group's core task: gone, the task has ended.
        let ended = metrics.has_changed().is_err();
        GroupFailure::from_metrics(group, &metrics.borrow(), ended)
    }

    /// Why a group whose latest metrics are `m` stopped, if it did; `ended`: its core task has
    /// ended (its metrics' sender is gone).
    pub fn from_metrics(
        group: GroupId,
        m: &RaftMetrics<NodeId, BasicNode>,
        ended: bool,
    ) -> Option<GroupFailure> {
        match &m.running_state {
            Err(fatal) => Some(GroupFailure::from_fatal(group, fatal)),
            Ok(()) if m.state == ServerState::Shutdown => Some(GroupFailure {
                group,
                storage: false,
                cause: "its Raft task stopped".into(),
            }),
            // A core task that ends normally or on an error records it first (above); one
            // that panicked could not.
            Ok(()) if ended => Some(GroupFailure {
                group,
                storage: false,
                cause: "its Raft task panicked".into(),
            }),
            Ok(()) => None,
        }
    }

    /// The failure openraft reports as `fatal` for `group`.
    pub fn from_fatal(group: GroupId, fatal: &Fatal<NodeId>) -> GroupFailure {
        let (storage, cause) = match fatal {
            Fatal::StorageError(error) => (true, error.to_string()),
            Fatal::Panicked => (false, "its Raft task panicked".to_string()),
            Fatal::Stopped => (false, "its Raft task stopped".to_string()),
        };
        GroupFailure {
            group,
            storage,
            cause,
        }
    }

    /// "partition p's group" or "the meta group".
    fn what(&self) -> String {
        match group_partition(self.group) {
            Some(partition) => format!("partition {partition}'s group"),
            None => "the meta group".to_string(),
        }
    }

    /// "partition p" or "the meta group".
    fn name(&self) -> String {
        match group_partition(self.group) {
            Some(partition) => format!("partition {partition}"),
            None => "the meta group".to_string(),
        }
    }
}

/// `storage failed: partition 2's group stopped on this node: <openraft's storage error>`, or
/// `raft group 3 (partition 2) stopped on this node: its Raft task panicked`.
impl std::fmt::Display for GroupFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.storage {
            write!(
                f,
                "storage failed: {} stopped on this node: {}",
                self.what(),
                self.cause
            )
        } else {
            write!(
                f,
                "raft group {} ({}) stopped on this node: {}",
                self.group,
                self.name(),
                self.cause
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::{AnyError, StorageError, StorageIOError};

    fn stopped(running_state: Result<(), Fatal<NodeId>>) -> RaftMetrics<NodeId, BasicNode> {
        let mut m = RaftMetrics::new_initial(1);
        m.state = ServerState::Shutdown;
        m.running_state = running_state;
        m
    }

    #[test]
    fn a_storage_error_is_a_storage_failure_and_anything_else_a_stopped_group() {
        let io = StorageError::from(StorageIOError::write_logs(AnyError::error(
            "storage failed: I/O error: No space left on device (os error 28)",
        )));
        let failure =
            GroupFailure::from_metrics(3, &stopped(Err(Fatal::StorageError(io))), true).unwrap();
        assert!(failure.storage);
        assert_eq!(
            failure.to_string(),
            "storage failed: partition 2's group stopped on this node: when Write Logs: storage failed: I/O error: No space left on device (os error 28)"
        );

        let failure = GroupFailure::from_metrics(3, &stopped(Err(Fatal::Panicked)), true).unwrap();
        assert!(!failure.storage);
        assert_eq!(
            failure.to_string(),
            "raft group 3 (partition 2) stopped on this node: its Raft task panicked"
        );
        let failure = GroupFailure::from_metrics(0, &stopped(Err(Fatal::Stopped)), true).unwrap();
        assert!(!failure.storage);
        assert_eq!(
            failure.to_string(),
            "raft group 0 (the meta group) stopped on this node: its Raft task stopped"
        );
        let failure = GroupFailure::from_metrics(2, &stopped(Ok(())), false).unwrap();
        assert!(!failure.storage);
        assert!(
            failure
                .to_string()
                .starts_with("raft group 2 (partition 1) stopped")
        );
    }

    #[test]
    fn a_core_task_gone_without_a_report_panicked_and_a_running_group_has_no_failure() {
        let running = RaftMetrics::<NodeId, BasicNode>::new_initial(1);
        assert_eq!(GroupFailure::from_metrics(1, &running, false), None);
        let failure = GroupFailure::from_metrics(1, &running, true).unwrap();
        assert!(!failure.storage);
        assert_eq!(failure.cause, "its Raft task panicked");
    }
}
