//! openraft's network for one Raft group, over the shared [`Peers`] pool.
//!
//! Every group on a node builds its own [`GroupNetworkFactory`] (the group id travels with
//! each request) around the node's one `Arc<Peers>`, so all groups share one QUIC connection
//! per peer.
//!
//! Errors map to what openraft expects: a peer that cannot be reached (or does not run the
//! group yet) is [`RPCError::Unreachable`], so openraft backs off; no response in time is
//! [`RPCError::Timeout`]; a failure after sending is [`RPCError::Network`]; the remote Raft's
//! own error is [`RPCError::RemoteError`]. An AppendEntries too large for one frame is
//! [`RPCError::PayloadTooLarge`], so openraft sends fewer entries.
//!
//! An AppendEntries that only tells a follower a newer commit index waits [`COMMIT_LINGER`]
//! for the next AppendEntries with entries to carry it instead (see
//! [`GroupNetwork::append_entries`]).

use crate::rpc::{Peers, Request, Response, RpcError};
use herald_storage::raft::{GroupId, NodeId, TypeConfig};
use openraft::BasicNode;
use openraft::error::{
    InstallSnapshotError, NetworkError, PayloadTooLarge, RPCError, RaftError, RemoteError, Timeout,
    Unreachable,
};
use openraft::network::{Backoff, RPCOption, RPCTypes, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{LogId, Vote};
use std::sync::Arc;

/// The longest openraft's replication to a peer sleeps between attempts once the peer was
/// unreachable. The sleep is not cut short when the peer comes back: with the pool's 2 s, the
/// leaders of a node restarted after `kill -9` reached it 0.2-2.4 s after it was ready
/// (chaos `kill`, 14 restarts), and meanwhile it heard no leader and relayed its publishes
/// (or held them: one restart held a partition's publishes for 2 s). An attempt while the
/// pool is still backing off its dials fails at once without dialing ([`Peers::call`]), so a
/// dead peer costs each group it follows in about four cheap attempts a second.
const REPLICATION_BACKOFF_MAX: Duration = Duration::from_millis(250);
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::time::Instant;

/// The most bytes of entries one AppendEntries carries (always at least one entry). openraft
/// 0.9 gives an AppendEntries the heartbeat interval (75 ms by default) to be answered, and
/// sends up to `max_payload_entries` (300) entries at once: a follower catching up on big
/// events (300 x 64 KiB = 19 MiB per request) never got an answer back in time, retried the
/// same request forever, and the leader's other traffic suffered with it. 1 MiB is written and
/// synced by a follower well within the interval.
pub const APPEND_BUDGET_BYTES: usize = 1 << 20;

/// How long an AppendEntries that only advances the follower's commit index is held back, so
/// that the next AppendEntries with entries carries the index instead (Raft's own way).
///
/// openraft 0.9 sends every follower such a request on each commit, and the next entries wait
/// for its answer: on a busy partition they were half of all node-to-node calls, and each
/// delayed the next round by a round trip. Held back, openraft is answered at once as the
/// follower would answer (it accepted everything up to the same entry from the same leader);
/// the request itself is sent when the time is up and no other request went to the follower
/// meanwhile. A follower thus learns a commit at most this late when a partition falls idle,
/// and on time while it is busy.
pub const COMMIT_LINGER: Duration = Duration::from_millis(2);

/// A commit-only AppendEntries is held back only while the follower's last answer is this
/// recent: openraft reads the leader's quorum acknowledgements from the answers, and this
/// bounds how old the one taken from a held-back request can be.
const COMMIT_LINGER_FRESH: Duration = Duration::from_millis(50);

/// How many of `entries`, from the first, fit in `budget` bytes (at least one, if any).
fn entries_within(entries: &[openraft::Entry<TypeConfig>], budget: usize) -> usize {
    let mut bytes = 0;
    for (i, entry) in entries.iter().enumerate() {
        bytes += entry_bytes(entry);
        if bytes > budget && i > 0 {
            return i;
        }
    }
    entries.len()
}

/// About how many bytes `entry` takes on the wire.
fn entry_bytes(entry: &openraft::Entry<TypeConfig>) -> usize {
    const OVERHEAD: usize = 64;
    match &entry.payload {
        openraft::EntryPayload::Normal(herald_storage::raft::Command::Publish {
            publishes,
            ..
        }) => OVERHEAD + publishes.iter().map(|p| p.size() + OVERHEAD).sum::<usize>(),
        _ => OVERHEAD * 4,
    }
}

/// The elections this node called in one group: each term it asked votes for counts once.
/// `herald cluster status` shows it; an operator (or a test) tells from it which node keeps
/// disturbing a group. A group whose only voter is this node elects without asking anyone,
/// so counts none.
#[derive(Debug, Default)]
pub struct Elections {
    last_term: AtomicU64,
    called: AtomicU64,
}

impl Elections {
    /// How many elections this node called since it started.
    pub fn called(&self) -> u64 {
        self.called.load(Ordering::Relaxed)
    }

    /// Notes a vote request for `term` (one per peer per election).
    fn asked_for(&self, term: u64) {
        if self.last_term.fetch_max(term, Ordering::Relaxed) < term {
            self.called.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Builds the per-peer clients of one Raft group (pass it to `openraft::Raft::new`).
#[derive(Clone)]
pub struct GroupNetworkFactory {
    peers: Arc<Peers>,
    group: GroupId,
    elections: Arc<Elections>,
}

impl GroupNetworkFactory {
    /// The network of `group`, calling through the node's shared `peers`.
    pub fn new(peers: Arc<Peers>, group: GroupId) -> Self {
        GroupNetworkFactory {
            peers,
            group,
            elections: Arc::default(),
        }
    }

    /// The count of elections this node calls in the group.
    pub fn elections(&self) -> Arc<Elections> {
        self.elections.clone()
    }
}

impl RaftNetworkFactory<TypeConfig> for GroupNetworkFactory {
    type Network = GroupNetwork;

    /// Records `node.addr` as the peer's address (a `host:port`; host names resolve at each
    /// dial) and returns a client; connecting happens on the first RPC.
    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> GroupNetwork {
        self.peers.set_addr(target, node.addr.as_str());
        GroupNetwork {
            peers: self.peers.clone(),
            group: self.group,
            target,
            node: node.clone(),
            elections: self.elections.clone(),
            accepted: None,
            sends: Arc::default(),
        }
    }
}

/// One group's client to one peer.
pub struct GroupNetwork {
    peers: Arc<Peers>,
    group: GroupId,
    target: NodeId,
    node: BasicNode,
    elections: Arc<Elections>,
    /// What the follower last accepted in full, while nothing failed since.
    accepted: Option<Accepted>,
    /// Counts AppendEntries sent or held back: a held-back one goes out only if it is still
    /// the latest when its time is up.
    sends: Arc<AtomicU64>,
}

/// A follower's last full success.
struct Accepted {
    /// The leader's vote the request carried.
    vote: Vote<NodeId>,
    /// The follower's log matches the leader's up to here.
    matched: Option<LogId<NodeId>>,
    /// The commit index the request told it.
    commit: Option<LogId<NodeId>>,
    /// When the answer came.
    at: Instant,
}

/// openraft's error for a remote `E`.
type NetError<E> = RPCError<NodeId, BasicNode, E>;

impl GroupNetwork {
    /// Calls the peer. The connection wait is bounded by `soft_ttl` so that a peer still being
    /// dialed comes back as `Unreachable` before openraft cancels the call at `hard_ttl`.
    async fn call(&self, request: Request, option: &RPCOption) -> Result<Response, RpcError> {
        self.peers
            .call_with(self.target, &request, option.soft_ttl(), option.hard_ttl())
            .await
    }

    /// Whether `rpc` only tells the follower a newer commit index, and its answer is known: the
    /// follower just accepted everything up to the same entry from the same leader.
    fn commit_can_wait(&self, rpc: &AppendEntriesRequest<TypeConfig>) -> bool {
        let Some(accepted) = &self.accepted else {
            return false;
        };
        rpc.entries.is_empty()
            && rpc.vote == accepted.vote
            && rpc.prev_log_id == accepted.matched
            && rpc.leader_commit > accepted.commit
            && accepted.at.elapsed() < COMMIT_LINGER_FRESH
    }

    /// Sends `rpc` after [`COMMIT_LINGER`] unless another AppendEntries (`generation` counts
    /// them) goes to the follower first. Its answer is not needed: an empty request from the
    /// same leader only moves the follower's commit index forward, to no more than it has
    /// accepted from that leader, whenever it arrives.
    fn send_later(
        &self,
        rpc: AppendEntriesRequest<TypeConfig>,
        generation: u64,
        option: &RPCOption,
    ) {
        let (peers, sends, target) = (self.peers.clone(), self.sends.clone(), self.target);
        let (connect_wait, timeout) = (option.soft_ttl(), option.hard_ttl());
        let request = Request::AppendEntries {
            group: self.group,
            rpc,
        };
        tokio::spawn(async move {
            tokio::time::sleep(COMMIT_LINGER).await;
            if sends.load(Ordering::Relaxed) == generation {
                let _ = peers
                    .call_with(target, &request, connect_wait, timeout)
                    .await;
            }
        });
    }

    fn rpc_error<E: std::error::Error>(&self, error: RpcError, action: RPCTypes) -> NetError<E> {
        match error {
            RpcError::Unreachable { .. } | RpcError::TooLarge { .. } => {
                RPCError::Unreachable(Unreachable::new(&error))
            }
            RpcError::Timeout { timeout, .. } => RPCError::Timeout(Timeout {
                action,
                id: self.peers.local_id(),
                target: self.target,
                timeout,
            }),
            RpcError::Failed { .. } => RPCError::Network(NetworkError::new(&error)),
        }
    }

    fn remote<E: std::error::Error>(&self, error: E) -> NetError<E> {
        RPCError::RemoteError(RemoteError::new_with_node(
            self.target,
            self.node.clone(),
            error,
        ))
    }

    /// A response that does not answer the request.
    fn unexpected<E: std::error::Error>(&self, response: Response) -> NetError<E> {
        match response {
            Response::NoSuchGroup(group) => {
                RPCError::Unreachable(Unreachable::new(&RpcError::Unreachable {
                    peer: self.target,
                    reason: format!("node runs no Raft group {group}"),
                }))
            }
            Response::Error(reason) => RPCError::Network(NetworkError::new(&RpcError::Failed {
                peer: self.target,
                reason: format!("refused by the peer: {reason}"),
            })),
            other => RPCError::Network(NetworkError::new(&RpcError::Failed {
                peer: self.target,
                reason: format!("unexpected response: {}", variant(&other)),
            })),
        }
    }
}

fn variant(response: &Response) -> &'static str {
    match response {
        Response::AppendEntries(_) => "AppendEntries",
        Response::Vote(_) => "Vote",
        Response::InstallSnapshot(_) => "InstallSnapshot",
        Response::App(_) => "App",
        Response::NoSuchGroup(_) => "NoSuchGroup",
        Response::Error(_) => "Error",
        Response::StoreId(_) => "StoreId",
        Response::Identity(_) => "Identity",
    }
}

impl RaftNetwork<TypeConfig> for GroupNetwork {
    async fn append_entries(
        &mut self,
        mut rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, NetError<RaftError<NodeId>>> {
        let generation = self.sends.fetch_add(1, Ordering::Relaxed) + 1;
        if self.commit_can_wait(&rpc) {
            self.send_later(rpc, generation, &option);
            return Ok(AppendEntriesResponse::Success);
        }
        // Entries past the byte budget stay for the next request; the follower's success then
        // covers those sent (a partial success, which openraft continues from at once).
        let within = entries_within(&rpc.entries, APPEND_BUDGET_BYTES);
        let sent_up_to = (within < rpc.entries.len()).then(|| rpc.entries[within - 1].log_id);
        rpc.entries.truncate(within);
        let entries = rpc.entries.len() as u64;
        let vote = rpc.vote;
        let matched = rpc.entries.last().map(|e| e.log_id).or(rpc.prev_log_id);
        let commit = rpc.leader_commit;
        self.accepted = None;
        let request = Request::AppendEntries {
            group: self.group,
            rpc,
        };
        let response = match self.call(request, &option).await {
            Ok(response) => response,
            // Nothing was sent: ask openraft for fewer entries per request.
            Err(RpcError::TooLarge { .. }) if entries > 1 => {
                return Err(RPCError::PayloadTooLarge(
                    PayloadTooLarge::new_entries_hint(entries / 2),
                ));
            }
            Err(error) => return Err(self.rpc_error(error, RPCTypes::AppendEntries)),
        };
        match response {
            Response::AppendEntries(Ok(AppendEntriesResponse::Success)) if sent_up_to.is_some() => {
                Ok(AppendEntriesResponse::PartialSuccess(sent_up_to))
            }
            Response::AppendEntries(Ok(AppendEntriesResponse::Success)) => {
                self.accepted = Some(Accepted {
                    vote,
                    matched,
                    commit,
                    at: Instant::now(),
                });
                Ok(AppendEntriesResponse::Success)
            }
            Response::AppendEntries(Ok(response)) => Ok(response),
            Response::AppendEntries(Err(error)) => Err(self.remote(error)),
            other => Err(self.unexpected(other)),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, NetError<RaftError<NodeId, InstallSnapshotError>>>
    {
        let request = Request::InstallSnapshot {
            group: self.group,
            rpc,
        };
        let response = self
            .call(request, &option)
            .await
            .map_err(|error| self.rpc_error(error, RPCTypes::InstallSnapshot))?;
        match response {
            Response::InstallSnapshot(Ok(response)) => Ok(response),
            Response::InstallSnapshot(Err(error)) => Err(self.remote(error)),
            other => Err(self.unexpected(other)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, NetError<RaftError<NodeId>>> {
        self.elections.asked_for(rpc.vote.leader_id.term);
        let request = Request::Vote {
            group: self.group,
            rpc,
        };
        let response = self
            .call(request, &option)
            .await
            .map_err(|error| self.rpc_error(error, RPCTypes::Vote))?;
        match response {
            Response::Vote(Ok(response)) => Ok(response),
            Response::Vote(Err(error)) => Err(self.remote(error)),
            other => Err(self.unexpected(other)),
        }
    }

    /// The pool's dial backoff schedule (50 ms doubling), capped at
    /// `REPLICATION_BACKOFF_MAX`.
    fn backoff(&self) -> Backoff {
        let options = self.peers.options();
        let max = options.backoff_max.min(REPLICATION_BACKOFF_MAX);
        Backoff::new(std::iter::successors(
            Some(options.backoff_initial),
            move |delay| Some((*delay * 2).min(max)),
        ))
    }
}

#[cfg(test)]
mod budget_tests {
    use super::*;
    use bytes::Bytes;
    use herald_storage::Publish;
    use herald_storage::raft::Command;
    use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId};

    fn entry(index: u64, payload_bytes: usize) -> Entry<TypeConfig> {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(Command::Publish {
                now_ms: 0,
                publishes: vec![Publish {
                    channel: Bytes::from_static(b"c"),
                    payload: Bytes::from(vec![0u8; payload_bytes]),
                    message_id: None,
                }],
            }),
        }
    }

    #[test]
    fn an_append_carries_entries_up_to_the_budget_and_at_least_one() {
        let entries: Vec<_> = (0..300).map(|i| entry(i, 64 << 10)).collect();
        let within = entries_within(&entries, APPEND_BUDGET_BYTES);
        assert_eq!(within, 15, "15 x 64 KiB (and overhead) fit in 1 MiB");
        let huge = vec![entry(0, 4 << 20), entry(1, 10)];
        assert_eq!(entries_within(&huge, APPEND_BUDGET_BYTES), 1);
        let small: Vec<_> = (0..300).map(|i| entry(i, 64)).collect();
        assert_eq!(entries_within(&small, APPEND_BUDGET_BYTES), 300);
        assert_eq!(entries_within(&[], APPEND_BUDGET_BYTES), 0);
    }
}
