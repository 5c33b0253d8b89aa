//! The proposer: one task per partition on every node, turning concurrent publishes into one
//! Raft entry per proposal round and getting it to the partition's leader.
//!
//! Publishes queue on a bounded channel. The task takes everything queued (up to the batch
//! limits) as ONE batch; on the leader it proposes the batch as one `client_write` (openraft 0.9
//! writes and flushes one entry per call, so batching is ours to do), elsewhere it forwards the
//! batch over QUIC to the leader, whose own proposer merges it with its local publishes. While
//! one round is in flight the next batch collects. A leader whose last round carried a
//! several-publish batch from a forwarder waits a little (at most half a round, 5 ms) for that
//! forwarder's next batch before it proposes (see `gather`).
//!
//! Retries: a batch that was certainly not proposed (no leader yet, `NotLeader`, peer
//! unreachable, log truncated) is retried until the publish timeout. A batch whose outcome is
//! unknown (sent, then the connection died or time ran out) is retried only when every publish in
//! it carries a message id, which makes the retry commit at most once; otherwise the publishers
//! get [`ProposeError::Unknown`]. A batch whose every attempt was certainly not committed gets,
//! at the deadline, [`ProposeError::NotCommitted`] (or [`ProposeError::NoLeader`]): clients may
//! retry it without a message id.

use std::sync::Arc;
use std::time::{Duration, Instant};

use herald_storage::raft::{Command, Reply, TypeConfig, partition_group};
use herald_storage::{Applied, Partition, Publish};
use openraft::Raft;
use openraft::error::{ClientWriteError, RaftError};
use tokio::sync::{mpsc, oneshot};

use crate::NodeId;
use crate::clock::ClusterClock;
use crate::failover::LeaderContact;
use crate::failure::GroupFailure;
use crate::handoff::PartitionGate;
use crate::message::{AppRequest, AppResponse, ProposeError, decode, encode};
use crate::rpc::{Peers, Request, Response, RpcError, SILENT_AFTER};

/// Batch limits and the publish deadline.
#[derive(Clone, Debug)]
pub struct ProposerOptions {
    /// Requests that may wait per partition; default 16,384.
    pub queue_capacity: usize,
    /// A batch stops growing at this many publishes; default 10,000.
    pub max_batch_publishes: usize,
    /// A batch stops growing at this many bytes; default 8 MiB.
    pub max_batch_bytes: usize,
    /// How long a publish may take before it fails (no leader, no quorum); default 5 s.
    pub publish_timeout: Duration,
}

impl Default for ProposerOptions {
    fn default() -> Self {
        ProposerOptions {
            queue_capacity: 16_384,
            max_batch_publishes: 10_000,
            max_batch_bytes: 8 << 20,
            publish_timeout: Duration::from_secs(5),
        }
    }
}

/// The outcome of a proposal, one [`Applied`] per publish.
pub type ProposeResult = Result<Vec<Applied>, ProposeError>;

/// One request in a proposer's queue.
pub(crate) struct ProposeRequest {
    pub publishes: Vec<Publish>,
    /// The node that forwarded it (`None`: from this node's own clients). A forwarded request
    /// is never forwarded again: it is answered `NotLeader` instead, unless it was relayed.
    pub origin: Option<NodeId>,
    /// Sent by `origin` to be passed on to the leader (see [`relay_peers`]): this node may
    /// forward it once, as an ordinary forward that goes no further.
    pub relayed: bool,
    pub reply: oneshot::Sender<ProposeResult>,
}

impl ProposeRequest {
    fn bytes(&self) -> usize {
        self.publishes.iter().map(Publish::size).sum()
    }

    fn forwarded(&self) -> bool {
        self.origin.is_some()
    }
}

/// The longest a leader's round waits for the next batch of a busy forwarder.
const GATHER_MAX: Duration = Duration::from_millis(5);

/// What a proposer needs of its node.
pub(crate) struct ProposerContext {
    pub id: NodeId,
    pub partition: Partition,
    pub raft: Raft<TypeConfig>,
    pub peers: Arc<Peers>,
    pub options: ProposerOptions,
    /// Held for each round proposed here as leader; a hand-back closes it.
    pub gate: Arc<PartitionGate>,
    /// When this node last heard each group's leader: tells a dead old leader from a live one.
    pub contact: Arc<LeaderContact>,
    /// The cluster's time, which the entries proposed here carry.
    pub clock: Arc<ClusterClock>,
    /// This node's reachability (`node/reachability.rs`): once every other member is silent,
    /// nothing can commit here, so publishes fail at once instead of at the deadline.
    pub reach: tokio::sync::watch::Receiver<crate::node::Reach>,
    /// The leader lease (the election timeout's maximum).
    pub lease: Duration,
    /// Where relaying starts looking for a member that reaches the leader.
    pub relay_turn: std::sync::atomic::AtomicUsize,
    /// The member that last said it hears this partition's leader, and when.
    pub relay_via: parking_lot::Mutex<Option<(NodeId, Instant)>>,
}

/// How long a member's "I hear the leader" is trusted before it is asked again.
const RELAY_TRUST: Duration = Duration::from_secs(1);

/// Runs the proposer of one partition until its queue closes.
pub(crate) async fn run(ctx: ProposerContext, mut rx: mpsc::Receiver<ProposeRequest>) {
    let mut carry: Option<ProposeRequest> = None;
    // How many requests the last round carried, how long it took, and the busy forwarders in it.
    let mut last_requests = 0usize;
    let mut last_round = Duration::ZERO;
    let mut expected: Vec<NodeId> = Vec::new();
    loop {
        let first = match carry.take() {
            Some(r) => r,
            None => match rx.recv().await {
                Some(r) => {
                    // Woken by one request after a round that batched several: let the tasks
                    // that are ready to queue theirs (other connections, forwarded batches) run
                    // first, so they share this round. Measured (docs/benchmarks.md): 15-20%
                    // more publishes per entry and acks/s at 12x32 and 48x32; when rounds carry
                    // one request (one publisher per partition) the extra hop only costs.
                    if last_requests > 1 {
                        tokio::task::yield_now().await;
                    }
                    r
                }
                None => break,
            },
        };
        let mut count = first.publishes.len();
        let mut bytes = first.bytes();
        let mut batch = vec![first];
        while count < ctx.options.max_batch_publishes && bytes < ctx.options.max_batch_bytes {
            match rx.try_recv() {
                Ok(r) => {
                    if count + r.publishes.len() > ctx.options.max_batch_publishes
                        || bytes + r.bytes() > ctx.options.max_batch_bytes
                    {
                        carry = Some(r);
                        break;
                    }
                    count += r.publishes.len();
                    bytes += r.bytes();
                    batch.push(r);
                }
                Err(_) => break,
            }
        }
        if !expected.is_empty() && ctx.is_leader() {
            let wait = (last_round / 2).min(GATHER_MAX);
            gather(&ctx, &mut rx, &mut batch, &mut carry, &expected, wait).await;
        }
        last_requests = batch.len();
        // Forwarders that sent several publishes at once have more queued behind them by the
        // time this round answers: the next round waits a little for their next batch.
        expected.clear();
        expected.extend(
            batch
                .iter()
                .filter(|r| r.publishes.len() > 1)
                .filter_map(|r| r.origin),
        );
        expected.sort_unstable();
        expected.dedup();
        let started = Instant::now();
        ctx.propose(batch).await;
        last_round = started.elapsed();
    }
    tracing::debug!(partition = ctx.partition, "proposer stopped");
}

/// On the leader, holds a round until every busy forwarder of the last round (`expected`) has
/// a request in `batch`, for at most `wait`, adding what arrives meanwhile (within the batch
/// limits; the first request past them is left in `carry`).
///
/// A forwarder keeps one batch in flight per partition and collects the next meanwhile; it can
/// send that batch only after the leader's round answered the previous one. Without waiting,
/// the leader's next round has already started with its local publishes by then, so each
/// forwarder's batches join every other round, and every round is a Raft entry with its fixed
/// cost on every member.
async fn gather(
    ctx: &ProposerContext,
    rx: &mut mpsc::Receiver<ProposeRequest>,
    batch: &mut Vec<ProposeRequest>,
    carry: &mut Option<ProposeRequest>,
    expected: &[NodeId],
    wait: Duration,
) {
    let mut count: usize = batch.iter().map(|r| r.publishes.len()).sum();
    let mut bytes: usize = batch.iter().map(ProposeRequest::bytes).sum();
    let mut missing: Vec<NodeId> = expected
        .iter()
        .copied()
        .filter(|node| !batch.iter().any(|r| r.origin == Some(*node)))
        .collect();
    let deadline = tokio::time::Instant::now() + wait;
    while carry.is_none()
        && !missing.is_empty()
        && count < ctx.options.max_batch_publishes
        && bytes < ctx.options.max_batch_bytes
    {
        let Ok(Some(r)) = tokio::time::timeout_at(deadline, rx.recv()).await else {
            return;
        };
        if count + r.publishes.len() > ctx.options.max_batch_publishes
            || bytes + r.bytes() > ctx.options.max_batch_bytes
        {
            *carry = Some(r);
            return;
        }
        if let Some(origin) = r.origin {
            missing.retain(|node| *node != origin);
        }
        count += r.publishes.len();
        bytes += r.bytes();
        batch.push(r);
    }
}

/// Answers every request of a batch from one result covering all their publishes, in order.
fn distribute(batch: Vec<ProposeRequest>, result: ProposeResult) {
    match result {
        Ok(applied) => {
            let mut rest = applied.into_iter();
            for r in batch {
                let mine: Vec<Applied> = rest.by_ref().take(r.publishes.len()).collect();
                let _ = r.reply.send(Ok(mine));
            }
        }
        Err(error) => {
            for r in batch {
                let _ = r.reply.send(Err(error.clone()));
            }
        }
    }
}

/// Answers forwarded requests with `error` and keeps the local ones.
fn reject_forwarded(batch: Vec<ProposeRequest>, error: &ProposeError) -> Vec<ProposeRequest> {
    reject(batch, ProposeRequest::forwarded, error)
}

/// Answers the requests `which` selects with `error` and keeps the others.
fn reject(
    batch: Vec<ProposeRequest>,
    which: impl Fn(&ProposeRequest) -> bool,
    error: &ProposeError,
) -> Vec<ProposeRequest> {
    let (rejected, kept): (Vec<_>, Vec<_>) = batch.into_iter().partition(|r| which(r));
    distribute(rejected, Err(error.clone()));
    kept
}

/// How a round ended.
enum Round {
    Done(ProposeResult),
    /// Certainly not committed: try again (after a short pause).
    Retry,
    /// Maybe committed: retry only if every publish has a message id.
    Unknown(String),
}

impl ProposerContext {
    fn is_leader(&self) -> bool {
        self.raft.metrics().borrow().current_leader == Some(self.id)
    }

    /// Runs one round, cut short (its outcome unknown: it may have gone out) if this node
    /// loses every other member meanwhile ([`ProposerContext::reach`]).
    async fn unless_isolated(&self, round: impl std::future::Future<Output = Round>) -> Round {
        let mut reach = self.reach.clone();
        tokio::select! {
            biased;
            round = round => round,
            // (Err: the node is stopping; the round goes on.)
            Ok(reach) = reach.wait_for(|r| r.isolated || r.removed) => Round::Unknown(if reach.removed {
                "this node was removed from the cluster while the publish was in flight".to_string()
            } else if reach.refused {
                "this node came to refuse every other member that answers it while the publish was in flight (a data directory lost, replaced or gone back in time: see `herald cluster status`)".to_string()
            } else {
                format!(
                    "this node lost its quorum while the publish was in flight: no other member has answered it for {SILENT_AFTER:?}"
                )
            }),
        }
    }

    async fn propose(&self, mut batch: Vec<ProposeRequest>) {
        let deadline = Instant::now() + self.options.publish_timeout;
        let group = partition_group(self.partition);
        let mut pause = Duration::from_millis(10);
        // Why an earlier round's outcome is unknown: once a round may have committed, the
        // batch can never be reported as "nothing was committed".
        let mut unknown: Option<String> = None;
        loop {
            if batch.is_empty() {
                return;
            }
            // Removed from the cluster, or cut off from every other member: no round can
            // commit here, so say so now rather than at the deadline; "not committed" only if
            // no earlier round went out.
            let reach = *self.reach.borrow();
            if reach.removed || reach.isolated {
                let cut_off = if reach.removed {
                    format!(
                        "this node was removed from the cluster, so partition {} cannot commit here; publish to another node",
                        self.partition
                    )
                } else if reach.refused {
                    format!(
                        "this node can commit with no other member: it refuses the store of those that answer it (a data directory lost, replaced or gone back in time: `herald cluster status` says why), so partition {} cannot commit here; publish to another node",
                        self.partition
                    )
                } else {
                    format!(
                        "this node lost its quorum: no other member of the cluster has answered it for {SILENT_AFTER:?}, so partition {} cannot commit here; publish to another node",
                        self.partition
                    )
                };
                let error = match unknown {
                    None => ProposeError::NotCommitted(cut_off),
                    Some(why) => ProposeError::Unknown(format!(
                        "{cut_off}; an earlier attempt may have committed ({why})"
                    )),
                };
                return distribute(batch, Err(error));
            }
            let leader = self.raft.metrics().borrow().current_leader;
            let remaining = deadline.saturating_duration_since(Instant::now());
            // Held from proposing a round here until its publishers have their answers, so
            // that a hand-back starts only after them.
            let mut round_guard = None;
            let round = match leader {
                Some(leader) if leader == self.id => {
                    // A hand-back in progress holds the gate: forwarded publishes go back to
                    // their nodes (not proposed: they retry); this node's own wait for it,
                    // then are proposed here or, once another node leads, sent there. (Past
                    // the deadline, the check below answers the batch.)
                    if self.gate.closing() {
                        batch = reject_forwarded(
                            batch,
                            &ProposeError::NotLeader {
                                group,
                                leader: None,
                            },
                        );
                        if batch.is_empty() {
                            return;
                        }
                    }
                    match tokio::time::timeout(remaining, self.gate.rounds.read()).await {
                        Ok(_) if !self.is_leader() => continue,
                        Ok(guard) => {
                            round_guard = Some(guard);
                            let remaining = deadline.saturating_duration_since(Instant::now());
                            self.unless_isolated(self.write_locally(&batch, remaining))
                                .await
                        }
                        Err(_) => Round::Retry,
                    }
                }
                Some(leader) => {
                    // A leader this node cannot reach (not heard for a lease, its link
                    // closed, or dials fail) is reached through another member; relayed
                    // requests are passed on only over a link that works, else their origin
                    // tries another member.
                    let direct = self.contact.silence(usize::from(group)) < self.lease
                        && !self.peers.is_unreachable(leader);
                    batch = reject(
                        batch,
                        |r| !may_pass_on(r, leader, direct),
                        &ProposeError::NotLeader {
                            group,
                            leader: Some(leader),
                        },
                    );
                    if batch.is_empty() {
                        return;
                    }
                    if direct {
                        self.unless_isolated(self.forward(leader, &batch, remaining))
                            .await
                    } else {
                        self.unless_isolated(self.relay(Some(leader), &batch, remaining))
                            .await
                    }
                }
                None => {
                    batch = reject_forwarded(
                        batch,
                        &ProposeError::NotLeader {
                            group,
                            leader: None,
                        },
                    );
                    if batch.is_empty() {
                        return;
                    }
                    // An election usually ends within a lease. A node that still knows no
                    // leader after that may be the one cut off from it (openraft 0.9 has no
                    // pre-vote: such a node calls elections nobody grants, and knows no
                    // leader meanwhile): another member may reach the leader.
                    if self.contact.silence(usize::from(group)) < self.lease * 3 {
                        self.wait_for_leader(remaining.min(self.lease)).await;
                        if self.raft.metrics().borrow().current_leader.is_some() {
                            continue;
                        }
                    }
                    let remaining = deadline.saturating_duration_since(Instant::now());
                    self.unless_isolated(self.relay(None, &batch, remaining))
                        .await
                }
            };
            match round {
                Round::Done(result) => return distribute(batch, result),
                Round::Retry => {}
                Round::Unknown(why) => {
                    let all_have_ids = batch
                        .iter()
                        .all(|r| r.publishes.iter().all(|p| p.message_id.is_some()));
                    if !all_have_ids {
                        return distribute(batch, Err(ProposeError::Unknown(why)));
                    }
                    tracing::debug!(partition = self.partition, %why, "retrying a batch with message ids");
                    unknown = Some(why);
                }
            }
            if Instant::now() >= deadline {
                let error = match (leader, unknown) {
                    (_, Some(why)) => ProposeError::Unknown(format!(
                        "partition {} did not confirm within {:?}; an earlier attempt may have committed ({why})",
                        self.partition, self.options.publish_timeout
                    )),
                    // Every round was refused or never sent: nothing can commit later.
                    (Some(leader), None) if leader == self.id => {
                        ProposeError::NotCommitted(format!(
                            "partition {} could not commit within {:?}: this node, its leader, \
                             was handing it over or losing its leadership",
                            self.partition, self.options.publish_timeout
                        ))
                    }
                    (Some(leader), None) => ProposeError::NotCommitted(format!(
                        "partition {} could not commit within {:?}: its leader (node {leader}) \
                         was unreachable or handing over; this node may be cut off from the majority",
                        self.partition, self.options.publish_timeout
                    )),
                    (None, None) => ProposeError::NoLeader {
                        partition: self.partition,
                    },
                };
                return distribute(batch, Err(error));
            }
            drop(round_guard);
            tokio::time::sleep(pause.min(deadline.saturating_duration_since(Instant::now()))).await;
            pause = (pause * 2).min(Duration::from_millis(200));
        }
    }

    async fn write_locally(&self, batch: &[ProposeRequest], remaining: Duration) -> Round {
        // A group that stopped here (a storage failure, a panic) keeps its last metrics, this
        // node as leader among them: nothing can be appended, say so at once.
        let group = partition_group(self.partition);
        if let Some(failure) = GroupFailure::of(group, &self.raft) {
            return Round::Done(Err(ProposeError::NotCommitted(if failure.storage {
                format!(
                    "partition {}'s group stopped on this node (a storage failure); restart the node",
                    self.partition
                )
            } else {
                format!("{failure}; restart the node")
            })));
        }
        // A leader that has just started (a rolling restart hands it partitions within a
        // second) proposes once its clock has been compared with the members': the entry's
        // clock moves the partition's for good (`crate::clock`). Milliseconds, at most the
        // first round's 1 s call timeout; at once ever after.
        if !self.clock.measured()
            && tokio::time::timeout(remaining, self.clock.wait_first_round())
                .await
                .is_err()
        {
            return Round::Done(Err(ProposeError::NotCommitted(format!(
                "partition {} could not commit within {:?}: this node, its leader, has not \
                 compared its clock with the other members' yet",
                self.partition, self.options.publish_timeout
            ))));
        }
        let command = Command::Publish {
            now_ms: self.clock.now_ms(),
            publishes: all_publishes(batch),
        };
        match tokio::time::timeout(remaining, self.raft.client_write(command)).await {
            Ok(Ok(response)) => match response.data {
                Reply::Applied(applied) => Round::Done(Ok(applied)),
                Reply::None => Round::Done(Err(ProposeError::Failed(
                    "the state machine returned no result for a publish batch".into(),
                ))),
            },
            // Not the leader (any more), or the entry was truncated: not committed.
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_)))) => Round::Retry,
            // The group stopped here (its log failed to write: a full disk; or it panicked).
            // The entry may have reached the followers before, and commit under the next
            // leader.
            Ok(Err(RaftError::Fatal(fatal))) => {
                let failure = GroupFailure::from_fatal(partition_group(self.partition), &fatal);
                Round::Unknown(if failure.storage {
                    format!(
                        "partition {}'s group stopped on this node: {fatal}",
                        self.partition
                    )
                } else {
                    failure.to_string()
                })
            }
            Ok(Err(error)) => Round::Done(Err(ProposeError::Failed(error.to_string()))),
            Err(_) => Round::Unknown(format!(
                "no commit within {:?}; this node may have lost its quorum",
                self.options.publish_timeout
            )),
        }
    }

    async fn forward(
        &self,
        leader: NodeId,
        batch: &[ProposeRequest],
        remaining: Duration,
    ) -> Round {
        let request = AppRequest::Publish {
            partition: self.partition,
            publishes: all_publishes(batch),
        };
        // The leader has its own deadline; give its answer a moment beyond ours.
        let timeout = remaining + Duration::from_millis(500);
        let request = Request::App(encode(&request));
        let call = self.peers.call(leader, &request, timeout);
        tokio::pin!(call);
        // A leader that dies does not answer, and its connection is declared lost only after
        // the idle timeout (seconds). So once this node sees another leader (or none), the call
        // is abandoned if the old leader has been silent for a lease (dead, or cut off): its
        // outcome is unknown, so the batch is retried if every publish carries a message id
        // (the new leader's dedup then answers for one that did commit). An old leader heard
        // recently is alive (it stepped down, or handed the partition over) and answers: with
        // the outcome, or "not the leader", which is retried even without message ids. It gets
        // a lease for that.
        let mut metrics = self.raft.metrics();
        let leader_changed = async move {
            let _ = metrics.wait_for(|m| m.current_leader != Some(leader)).await;
        };
        // A leader cut off both ways (`partition-bridge` in the chaos suite) neither answers
        // nor is replaced (the other voter still hears it), and the call would wait for the
        // connection's idle timeout (3 s). So the call is given up once the leader has
        // answered nothing for `SILENT_AFTER` and sent nothing for a lease: its outcome is
        // unknown, retried (through another member by then) if every publish has a message
        // id. A live leader that is slow to commit still sends heartbeats, and keeps the call.
        let group = partition_group(self.partition);
        let cut_off = async {
            tokio::time::sleep(SILENT_AFTER).await;
            loop {
                if self
                    .peers
                    .unanswered_for(leader)
                    .is_some_and(|d| d >= SILENT_AFTER)
                    && self.contact.silence(usize::from(group)) >= self.lease
                {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        };
        let answer = tokio::select! {
            biased;
            answer = &mut call => answer,
            () = cut_off => {
                return Round::Unknown(format!(
                    "node {leader}, partition {}'s leader, has answered nothing for {SILENT_AFTER:?} and sent nothing for {:?}: the link to it seems cut",
                    self.partition, self.lease
                ));
            }
            _ = leader_changed => {
                let alive = self.contact.silence(usize::from(group)) < self.lease;
                let grace = if alive { self.lease } else { Duration::ZERO };
                match tokio::time::timeout(grace, &mut call).await {
                    Ok(answer) => answer,
                    Err(_) => {
                        return Round::Unknown(format!(
                            "node {leader} stopped leading partition {} before it answered",
                            self.partition
                        ));
                    }
                }
            }
        };
        round_of(answer, leader, Hop::Forward)
    }

    /// Sends the batch to another member to pass on to the partition's leader: for a node
    /// that cannot reach the leader (`leader`, or none known) while others can. The member
    /// proposes it if it leads, forwards it once if it reaches the leader, and otherwise answers
    /// "not the leader" (certainly not proposed), and the next round tries the next member.
    async fn relay(
        &self,
        leader: Option<NodeId>,
        batch: &[ProposeRequest],
        remaining: Duration,
    ) -> Round {
        let members: Vec<NodeId> = {
            let metrics = self.raft.metrics();
            let metrics = metrics.borrow();
            metrics
                .membership_config
                .membership()
                .nodes()
                .map(|(id, _)| *id)
                .collect()
        };
        let candidates = relay_peers(&members, self.id, leader, |id| {
            self.peers.is_unreachable(id)
        });
        let Some(via) = self.relay_member(&candidates).await else {
            return Round::Retry;
        };
        let request = AppRequest::Relay {
            partition: self.partition,
            publishes: all_publishes(batch),
        };
        let timeout = remaining + Duration::from_millis(500);
        let request = Request::App(encode(&request));
        let call = self.peers.call(via, &request, timeout);
        tokio::pin!(call);
        // This node may be elected (or handed the partition) while the member passes the batch
        // on; from then on publishes forwarded here wait for this proposer, and the member
        // itself may be forwarding its own publishes here, holding the relayed batch in its
        // queue behind them: each waits for the other until the call times out. So once this
        // node leads, the member gets a lease to answer (it turns a batch relayed by the
        // leader away at once), then the batch's outcome is unknown: retried here if every
        // publish carries a message id.
        let mut metrics = self.raft.metrics();
        let me = self.id;
        let became_leader = async move {
            let _ = metrics.wait_for(|m| m.current_leader == Some(me)).await;
        };
        let answer = tokio::select! {
            biased;
            answer = &mut call => answer,
            _ = became_leader => match tokio::time::timeout(self.lease, &mut call).await {
                Ok(answer) => answer,
                Err(_) => {
                    return Round::Unknown(format!(
                        "this node became partition {}'s leader while node {via} relayed the publish, which did not answer within {:?}",
                        self.partition, self.lease
                    ));
                }
            },
        };
        round_of(answer, via, Hop::Relay)
    }

    /// A member among `candidates` that hears the partition's leader: the one that said so
    /// last (within [`RELAY_TRUST`]), or the first to say so when asked (the failover probe).
    /// Asking first keeps a dead or cut-off member from turning a certain failure into an
    /// unknown outcome: nothing is sent until a member is known to pass it on.
    async fn relay_member(&self, candidates: &[NodeId]) -> Option<NodeId> {
        if let Some((via, at)) = *self.relay_via.lock()
            && at.elapsed() < RELAY_TRUST
            && candidates.contains(&via)
        {
            return Some(via);
        }
        let group = partition_group(self.partition);
        let request = Request::App(encode(&AppRequest::Probe { group }));
        let start = self
            .relay_turn
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        for i in 0..candidates.len() {
            let via = candidates[(start + i) % candidates.len()];
            let Ok(Response::App(bytes)) = self.peers.call(via, &request, self.lease).await else {
                continue;
            };
            if let Ok(AppResponse::Probe(Some(probe))) = decode::<AppResponse>(&bytes)
                && Duration::from_millis(probe.silent_ms) < self.lease
            {
                *self.relay_via.lock() = Some((via, Instant::now()));
                return Some(via);
            }
        }
        None
    }

    async fn wait_for_leader(&self, remaining: Duration) {
        let mut metrics = self.raft.metrics();
        let _ =
            tokio::time::timeout(remaining, metrics.wait_for(|m| m.current_leader.is_some())).await;
    }
}

/// The publishes of every request in `batch`, in order.
fn all_publishes(batch: &[ProposeRequest]) -> Vec<Publish> {
    batch
        .iter()
        .flat_map(|r| r.publishes.iter().cloned())
        .collect()
}

/// How a batch was sent to another node.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Hop {
    /// To the leader.
    Forward,
    /// To a member, to pass on to the leader (see [`ProposerContext::relay`]).
    Relay,
}

/// How a round that sent the batch to node `to` ended, from its answer. A member asked to
/// relay that answers anything but an outcome (a node older than relaying cannot decode the
/// request, one shutting down) proposed nothing: the round is retried.
fn round_of(answer: Result<Response, RpcError>, to: NodeId, hop: Hop) -> Round {
    let not_an_answer = |what: String| match hop {
        Hop::Forward => Round::Done(Err(ProposeError::Failed(what))),
        Hop::Relay => Round::Retry,
    };
    match answer {
        Ok(Response::App(bytes)) => match decode::<AppResponse>(&bytes) {
            Ok(AppResponse::Published(Ok(applied))) => Round::Done(Ok(applied)),
            Ok(AppResponse::Published(Err(
                ProposeError::NotLeader { .. }
                | ProposeError::NoLeader { .. }
                | ProposeError::NotCommitted(_)
                | ProposeError::NotFormed,
            ))) => Round::Retry,
            Ok(AppResponse::Published(Err(ProposeError::Closed))) if hop == Hop::Relay => {
                Round::Retry
            }
            Ok(AppResponse::Published(Err(ProposeError::Unknown(why)))) => Round::Unknown(why),
            Ok(AppResponse::Published(Err(error))) => Round::Done(Err(error)),
            Ok(other) => not_an_answer(format!("node {to} answered a publish with {other:?}")),
            Err(error) => not_an_answer(error),
        },
        Ok(other) => not_an_answer(format!("node {to} answered a publish with {other:?}")),
        Err(error @ RpcError::TooLarge { .. }) => {
            Round::Done(Err(ProposeError::Failed(error.to_string())))
        }
        Err(error) if error.not_sent() => Round::Retry,
        Err(error) => Round::Unknown(match hop {
            Hop::Forward => format!("forwarding to node {to} failed: {error}"),
            Hop::Relay => format!("relaying through node {to} failed: {error}"),
        }),
    }
}

/// Whether `request`, which reached this node, may be sent on to the partition's `leader`
/// (`direct`: over a link that works). This node's own clients' requests may; a forwarded one
/// goes no further unless it was relayed, and a relayed one goes only over a working link and
/// never back to the node that relayed it. That node became the leader after sending it (a
/// node just restarted relays until it first hears the leader, and is often handed a
/// partition moments later): its proposer is still waiting for this answer, so the request
/// would queue behind that very wait until a timeout or a hand-back broke the cycle (seconds
/// without a commit in rolling restarts). Answered "not the leader" instead, it is proposed
/// there at once.
fn may_pass_on(request: &ProposeRequest, leader: NodeId, direct: bool) -> bool {
    match request.origin {
        None => true,
        Some(origin) => request.relayed && direct && origin != leader,
    }
}

/// The members a batch may be relayed through: every member but this node, the leader it
/// cannot reach and those it cannot reach either, in id order.
fn relay_peers(
    members: &[NodeId],
    me: NodeId,
    leader: Option<NodeId>,
    unreachable: impl Fn(NodeId) -> bool,
) -> Vec<NodeId> {
    let mut peers: Vec<NodeId> = members
        .iter()
        .copied()
        .filter(|id| *id != me && Some(*id) != leader && !unreachable(*id))
        .collect();
    peers.sort_unstable();
    peers.dedup();
    peers
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_is_relayed_through_reachable_members_only() {
        let members = [3, 1, 2, 4];
        assert_eq!(relay_peers(&members, 2, Some(1), |_| false), vec![3, 4]);
        assert_eq!(relay_peers(&members, 2, Some(1), |id| id == 3), vec![4]);
        assert_eq!(relay_peers(&members, 2, None, |_| false), vec![1, 3, 4]);
        assert!(relay_peers(&[1, 2], 2, Some(1), |_| false).is_empty());
    }

    #[test]
    fn a_relayed_batch_is_never_sent_back_to_the_node_that_relayed_it() {
        let request = |origin: Option<NodeId>, relayed: bool| ProposeRequest {
            publishes: Vec::new(),
            origin,
            relayed,
            reply: oneshot::channel().0,
        };
        // This node's own clients' publishes go to the leader, over any link.
        assert!(may_pass_on(&request(None, false), 1, true));
        assert!(may_pass_on(&request(None, false), 1, false));
        // A forwarded one goes no further.
        assert!(!may_pass_on(&request(Some(2), false), 1, true));
        // A relayed one goes on once, over a link that works...
        assert!(may_pass_on(&request(Some(2), true), 1, true));
        assert!(!may_pass_on(&request(Some(2), true), 1, false));
        // ...but not back to the node that relayed it, now the leader itself.
        assert!(!may_pass_on(&request(Some(1), true), 1, true));
    }
}
