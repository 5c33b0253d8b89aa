//! The node layer's own requests between nodes, carried as `App` RPCs (bincode) beside the
//! Raft RPCs: forwarded publishes, meta writes, group initialisation, health probes, failover.

use std::collections::BTreeMap;

use bytes::Bytes;
use herald_storage::raft::{Command, GroupId, NodeId};
use herald_storage::{Applied, Partition, Publish};
use serde::{Deserialize, Serialize};

use crate::failover::Probe;
use crate::interest::{Interest, TransientEvent};

/// A request from one node's cluster layer to another's.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum AppRequest {
    /// "Are you there?": answered with [`AppResponse::Pong`]; used to wait for peers at bootstrap.
    Ping,
    /// A batch of publishes for `partition`, sent to the node believed to lead it. The receiver
    /// proposes it if it leads the partition, else answers [`ProposeError::NotLeader`] (it never
    /// forwards again, so a stale leader view cannot make a loop).
    Publish {
        /// The partition all publishes hash to.
        partition: Partition,
        /// The publishes, in order.
        publishes: Vec<Publish>,
    },
    /// Write `command` to `group` (the receiver must lead it): meta writes such as `Init`.
    Write {
        /// The group to write to.
        group: GroupId,
        /// The command.
        command: Command,
    },
    /// Initialise `group` with these voters (node id -> cluster address); sent at bootstrap to
    /// the group's first voter, which then adds `learners`.
    InitGroup {
        /// The group.
        group: GroupId,
        /// Its initial voters.
        voters: BTreeMap<NodeId, String>,
        /// Members that should follow it as learners.
        learners: BTreeMap<NodeId, String>,
    },
    /// Add a node to the cluster (sent to the meta leader): it becomes a meta member and, via
    /// the partition leaders, a learner or voter of every partition group.
    Join {
        /// The new node.
        node: NodeId,
        /// Its cluster address (`host:port`).
        addr: String,
    },
    /// Remove a node from the cluster (sent to the meta leader).
    Remove {
        /// The node to remove.
        node: NodeId,
    },
    /// The sender's current interest (pushed on change and every few seconds).
    Interest(Interest),
    /// Non-durable events for the receiver's local subscribers (never forwarded further).
    Transient {
        /// The events, in publish order.
        events: Vec<TransientEvent>,
    },
    /// From a group's failover coordinator: how long since you heard the group's leader, and
    /// your last log id? Answered with [`AppResponse::Probe`] (see `failover`).
    Probe {
        /// The group.
        group: GroupId,
    },
    /// From a group's failover coordinator: call an election in `group` now (ignored unless
    /// the receiver is a voter that has not heard the leader for a lease).
    Elect {
        /// The group.
        group: GroupId,
    },
    /// From a group's leader handing it back (see `handoff`): take over `group`, whose log
    /// ends at `last_log_index`. The receiver checks it can (a voter following the sender,
    /// with that much log, reaching the other voters), answers, and calls an election at once.
    TakeOver {
        /// The group.
        group: GroupId,
        /// The last index of the leader's log (its gate is closed: it does not grow).
        last_log_index: Option<u64>,
    },
    /// A batch of publishes for `partition` from a node that cannot reach its leader: the
    /// receiver proposes it if it leads, or forwards it once (as [`AppRequest::Publish`]) to
    /// a leader it reaches, or answers [`ProposeError::NotLeader`]. Last, so that older nodes
    /// decode the variants before it.
    Relay {
        /// The partition all publishes hash to.
        partition: Partition,
        /// The publishes, in order.
        publishes: Vec<Publish>,
    },
    /// "What does your clock read?" (answered [`AppResponse::Clock`]): how members measure
    /// each other's clocks ([`crate::clock`]). Last, so that older nodes decode the variants
    /// before it (they answer an error, and are not measured).
    Clock,
    /// "Is your cluster formed?" (answered [`AppResponse::Formation`]): asked of its peers by
    /// a node not formed before `herald cluster init` or a bootstrap forms anything, so that a
    /// node started after its cluster formed does not form one of its own. Last, so that
    /// older nodes decode the variants before it. Answered `Formation` only, as nodes that
    /// ask it know no other answer.
    Formation,
    /// [`AppRequest::Formation`], from a node that also understands
    /// [`AppResponse::FormationMember`]: the answering node says so when its formed cluster
    /// counts the asker as a member. Last, so that older nodes decode the variants before it
    /// (they answer an error, and are asked `Formation` instead).
    FormedWithMe,
    /// "Which build do you run?" (answered [`AppResponse::Build`]): asked by the clock loop,
    /// for `herald cluster status`. Last, so that older nodes decode the variants before it
    /// (they answer an error: a build from before 2026-12-07).
    Build,
    /// "How far has your Raft journal got?" (answered [`AppResponse::Journal`]): asked by the
    /// clock loop, so that a member's data directory going back in time is told apart (see
    /// [`crate::peer_stores`]), with the asker's own store id and journal (`None` before its
    /// journal is open), so that the answer says whether its store is refused. Last, like
    /// `Build`.
    Journal(Option<crate::rpc::Identity>),
}

/// Why a proposal was not committed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum ProposeError {
    /// This node does not lead the group; `leader` is who it believes does.
    #[error("not the leader of group {group} (leader: {leader:?})")]
    NotLeader {
        /// The group.
        group: GroupId,
        /// The leader this node knows of, if any.
        leader: Option<NodeId>,
    },
    /// No leader could be reached before the deadline: the node may be on the minority side of
    /// a partition, or an election is taking too long. Nothing was committed.
    #[error("partition {partition} has no reachable leader (no quorum?); nothing was committed")]
    NoLeader {
        /// The partition.
        partition: Partition,
    },
    /// The proposal was sent but its outcome is unknown (timeout or connection lost after
    /// sending): it may or may not commit. Retrying with the same message id is safe.
    #[error(
        "the outcome of the publish is unknown ({0}); retry with the same message id, or one if it had none (messageId over HTTP, HPUBLISH channel payload ID id over RESP), so that it commits once"
    )]
    Unknown(String),
    /// The cluster has not been formed yet (bootstrap still waiting for peers).
    #[error("the cluster is not formed yet")]
    NotFormed,
    /// The node is shutting down.
    #[error("the node is shutting down")]
    Closed,
    /// Anything else (storage failure, bad request).
    #[error("{0}")]
    Failed(String),
    /// The deadline passed while every attempt was certainly not committed (the leader this
    /// node knows could not be reached, refused the batch as no longer leading, or was
    /// handing the partition over): a retry, with or without a message id, cannot duplicate
    /// it. Last, so that older nodes still decode the variants before it.
    #[error("{0}; nothing was committed, retry")]
    NotCommitted(String),
}

/// The answer to an [`AppRequest`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum AppResponse {
    /// Answer to [`AppRequest::Ping`].
    Pong,
    /// Answer to [`AppRequest::Publish`]: one [`Applied`] per publish.
    Published(Result<Vec<Applied>, ProposeError>),
    /// Answer to [`AppRequest::Probe`]; `None` when the receiver does not run the group.
    Probe(Option<Probe>),
    /// Answer to the other requests.
    Done(Result<(), ProposeError>),
    /// Answer to [`AppRequest::Probe`] from a node the receiver's membership does not hold
    /// (it was removed): the sender learns it is no longer a member. Last, so that older
    /// nodes decode the variants before it.
    NotMember,
    /// Answer to [`AppRequest::Clock`]: the answering node's wall clock, unix ms.
    Clock(u64),
    /// Answer to [`AppRequest::Formation`]: `Some("epoch E; members 1 at host:port, ...")`
    /// once the answering node's cluster is formed, else `None`.
    Formation(Option<String>),
    /// Answer to [`AppRequest::FormedWithMe`] from a node whose formed cluster counts the
    /// asker among its members (`epoch E; members ...`): the asker was named at formation or joined,
    /// and has not caught up yet, so it is to wait, neither form nor be joined. Last, so that
    /// older nodes decode the variants before it.
    FormationMember(String),
    /// Answer to [`AppRequest::Build`]: `0.1.0 (commit ...)`. Last, so that older nodes
    /// decode the variants before it.
    Build(String),
    /// Answer to [`AppRequest::Journal`]. Last, like the request.
    Journal {
        /// The node's store id and journal (`None` before its journal is open).
        identity: Option<crate::rpc::Identity>,
        /// The members it refuses as gone back in time, each with the store id it refuses.
        went_back: Vec<(NodeId, u64)>,
        /// Why it refuses the asker's store (`node N: ...`), if it does: a refused node
        /// learns here when it is heard again (removed and joined again), not only at a dial.
        refuses_you: Option<String>,
    },
}

const CONFIG: bincode::config::Configuration = bincode::config::standard();

/// Encodes a message for an `App` RPC.
pub fn encode<T: Serialize>(message: &T) -> Bytes {
    // Encoding plain serde data into a Vec cannot fail.
    Bytes::from(bincode::serde::encode_to_vec(message, CONFIG).unwrap_or_default())
}

/// Decodes a message of an `App` RPC.
pub fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    bincode::serde::decode_from_slice(bytes, CONFIG)
        .map(|(v, _)| v)
        .map_err(|e| format!("malformed cluster message: {e}"))
}
