//! The cluster node: this node's Raft groups (meta + one per partition), its RPC server, its
//! proposers, bootstrap by `--bootstrap-expect`, and the placement loop that keeps every
//! partition group's membership in line with the cluster's.
//!
//! This file holds [`ClusterNode`] itself: its configuration, starting it (groups, proposers,
//! the RPC server and the tasks below), its public API (publishing, quorum and failure,
//! status, join/remove, shutdown) and the few helpers its submodules share. Every other
//! concern is a submodule with an `impl ClusterNode` block of its own:
//!
//! - `formation`: bootstrap by `--bootstrap-expect`, forming the cluster, finishing a
//!   formation cut short.
//! - `placement_loop`: the once-a-second round that converges each group's membership on the
//!   cluster's (placement, hand-backs, voter swaps) and ticks idle partitions' clocks.
//! - `elections`: the node's side of fast failover and pre-vote.
//! - `interest_loop`: pushing this node's interest to the other members.
//! - `handler`: what this node answers other nodes (the RPC [`Handler`](crate::rpc::Handler)
//!   and the node layer's own requests).
//! - `meta`: writes through the meta group's leader (join, remove, namespaces, `Init`).
//! - `hand_over`: handing the partitions this node leads to other voters at shutdown.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use herald_storage::raft::{
    Command, GroupId, GroupStateMachine, META_GROUP, NodeId, RaftJournal, RaftLogStore, TypeConfig,
    group_partition, partition_group,
};
use herald_storage::{Epoch, LiveNamespaces, Namespaces, OnCommit, Partition, Publish, Store};
use openraft::error::RaftError;
use openraft::{Raft, ServerState};
use parking_lot::RwLock;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::catch_up::{CatchUp, CatchingUp, Lag};
use crate::clock::ClusterClock;
use crate::failover::LeaderContact;
use crate::failure::GroupFailure;
use crate::handoff::PartitionGate;
use crate::identity::NodeIdentity;
use crate::interest::{INTEREST_SYNC_LIMIT, Interest, InterestSync, InterestTable, TransientEvent};
use crate::message::{AppRequest, AppResponse, ProposeError, decode, encode};
use crate::network::{Elections, GroupNetworkFactory};
use crate::peer_stores::PeerStores;
use crate::proposer::{self, ProposeRequest, ProposeResult, ProposerContext, ProposerOptions};
use crate::rpc::{self, Peers, Request, Response};
use crate::transport::{Transport, TransportOptions};

mod clock_loop;
mod elections;
mod formation;
mod hand_over;
mod handler;
mod interest_loop;
mod meta;
mod placement_loop;
mod reachability;
mod store_check;

pub use reachability::Reach;

/// How a node joins (or forms) a cluster.
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    /// This node's id; its certificate must name it.
    pub node_id: NodeId,
    /// The UDP address the QUIC endpoint binds.
    pub bind: SocketAddr,
    /// The `host:port` other nodes reach this node at (default: `bind`).
    pub advertise: String,
    /// The static peer list (`id -> host:port`), this node included or not.
    pub peers: BTreeMap<NodeId, String>,
    /// Form the cluster once this many nodes (this one included) are up; 0 = never bootstrap
    /// (wait for `herald cluster init` or to be joined).
    pub bootstrap_expect: usize,
    /// Directory with `ca.pem` and this node's `node-<id>.pem` / `.key`.
    pub tls_dir: PathBuf,
    /// Raft timings.
    pub raft: RaftTimings,
    /// Batching and publish deadline.
    pub proposer: ProposerOptions,
    /// This node's build (`0.1.0 (commit ...)`), as the members' `herald cluster status`
    /// shows it: which nodes a rolling upgrade has reached.
    pub build: String,
    /// Forget, at start, what this node recorded of its peers' Raft journals (see
    /// [`crate::peer_stores`]): after a whole cluster is restored from backups.
    pub forget_peer_journals: bool,
}

/// Raft timers, in milliseconds. openraft uses the heartbeat interval as the AppendEntries
/// timeout, so it must exceed a follower's fsync plus the payload's transfer time.
#[derive(Clone, Copy, Debug)]
pub struct RaftTimings {
    /// Leader heartbeat interval; default 75 ms.
    pub heartbeat_ms: u64,
    /// Election timeout range; default 250-350 ms. openraft 0.9 lets a follower call an
    /// election only after the leader lease (= the upper bound) plus a random timeout from this
    /// range, so a dead leader is replaced after 500-700 ms plus one vote and one commit: under
    /// a second.
    pub election_min_ms: u64,
    /// Upper end of the election timeout range.
    pub election_max_ms: u64,
    /// A group snapshots after this many entries and keeps the last tenth of them in its log;
    /// default 20,000 (tests lower it to make a member catch up from a snapshot).
    pub snapshot_logs: u64,
    /// Whether the surviving voters start an election as soon as a silent leader's lease
    /// runs out (see [`crate::failover`]); default on. Off, only openraft's timers elect.
    pub fast_failover: bool,
}

impl Default for RaftTimings {
    fn default() -> Self {
        RaftTimings {
            heartbeat_ms: 75,
            election_min_ms: 250,
            election_max_ms: 350,
            snapshot_logs: 20_000,
            fast_failover: true,
        }
    }
}

/// What the cluster layer needs from the node's local hub.
#[derive(Clone)]
pub struct LocalHooks {
    /// This node's current interest (subscriptions and connection counts).
    pub interest: Arc<dyn Fn() -> Interest + Send + Sync>,
    /// Delivers a non-durable event from another node to local subscribers.
    pub deliver: Arc<dyn Fn(&TransientEvent) + Send + Sync>,
}

impl Default for LocalHooks {
    fn default() -> Self {
        LocalHooks {
            interest: Arc::new(Interest::default),
            deliver: Arc::new(|_| {}),
        }
    }
}

/// The largest event (channel, payload and message id) a cluster commits: half a node-to-node
/// message ([`crate::rpc::MAX_FRAME`]), so that the Raft entry carrying it always fits one
/// AppendEntries. A larger one could never be replicated, and its partition would stall.
pub const MAX_PUBLISH_BYTES: usize = crate::rpc::MAX_FRAME / 2;

/// How long a shutting-down node spends handing its partitions over before it stops.
const HAND_OVER_LIMIT: Duration = Duration::from_secs(3);

/// How much of the cluster a node can serve ([`ClusterNode::availability`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Availability {
    /// Every group commits here.
    Whole,
    /// Some partitions commit nowhere this node reaches (their voters are down, or cut off
    /// from every member it reaches); the others commit here. Its clients are served as well
    /// here as anywhere: they are not sent away, and `/ready` says 200 with the problem (in a
    /// 5-node cluster split 2|3, every node of the majority side used to send every stream
    /// away, and answer 503, though it committed most partitions). The text says which.
    Degraded(String),
    /// This node cannot serve what other members could: not formed, refused, cut off from
    /// the meta group or from most members, no partition commits here, or a partition that
    /// does not commit here commits on a member it reaches. The text says why.
    Down(String),
}

/// How long after its start a node counts a partition whose leader it has not heard yet as
/// one it is catching up on (see [`ClusterNode::catching_up`]).
const UNHEARD_LIMIT: Duration = Duration::from_secs(10);

/// How long [`ClusterNode::wait_caught_up`] goes on waiting while no majority answers this
/// node: a process resumed from a pause reaches none until its calls are answered again.
const CUT_OFF_PATIENCE: Duration = Duration::from_millis(1500);

/// How often [`ClusterNode::wait_caught_up`] looks again.
const CATCH_UP_POLL: Duration = Duration::from_millis(20);

/// How long a "not a member" answer counts (see [`ClusterNode::is_removed`]): a removed node
/// keeps probing while it hears no leader, so the answer is renewed; a node joined again stops
/// getting it, and stops counting it at once when the meta group's leader replicates to it.
const NOT_MEMBER_MEMORY: Duration = Duration::from_secs(10);

/// Whether a quorum's "not a member" answer, `told` ago, still makes this node removed, its
/// meta group's leader silent for `meta_silence`: for [`NOT_MEMBER_MEMORY`], unless a meta
/// leader replicated to it since, which says it is a member again (joined).
fn not_member_answer_counts(told: Duration, meta_silence: Duration) -> bool {
    told < NOT_MEMBER_MEMORY && meta_silence >= told
}

/// Why the cluster layer could not start.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// Certificates could not be loaded.
    #[error(transparent)]
    Identity(#[from] crate::identity::IdentityError),
    /// The QUIC endpoint could not be opened.
    #[error(transparent)]
    Transport(#[from] crate::transport::TransportError),
    /// openraft refused the configuration or failed to start a group.
    #[error("raft: {0}")]
    Raft(String),
    /// The store failed.
    #[error(transparent)]
    Storage(#[from] herald_storage::StorageError),
    /// The configuration makes no sense.
    #[error("{0}")]
    Config(String),
    /// The store belongs to another cluster: none of its members is at this node's address
    /// or among its `--peers` (its data directory is another cluster's). Found before the node
    /// opens its endpoint, so that cluster never hears of it.
    #[error(
        "the store holds another cluster (cluster epoch {epoch}, members {members}): none of its members is at this node's address ({advertise}) or among its --peers"
    )]
    AnotherCluster {
        /// The store's cluster epoch.
        epoch: String,
        /// Its members, `id at address`, comma-separated.
        members: String,
        /// This node's advertised cluster address.
        advertise: String,
    },
}

struct Inner {
    id: NodeId,
    advertise: String,
    store: Arc<Store>,
    /// The write-ahead log of every group's Raft log (closed at shutdown, after the groups).
    journal: Arc<RaftJournal>,
    groups: Vec<Raft<TypeConfig>>,
    /// The elections this node called, per group (index = group id).
    elections: Vec<Arc<Elections>>,
    proposers: Vec<mpsc::Sender<ProposeRequest>>,
    peers: Arc<Peers>,
    /// Which store each member runs on (see [`crate::peer_stores`]).
    peer_stores: Arc<PeerStores>,
    transport: Arc<Transport>,
    static_peers: BTreeMap<NodeId, String>,
    /// `--bootstrap-expect` (0: formed by hand).
    bootstrap_expect: usize,
    /// Node ids allowed to connect: the static peers and every member the meta group knows.
    allowed: Arc<RwLock<BTreeSet<NodeId>>>,
    /// A task of this node is writing the cluster's `Init` (see `formation`).
    forming: std::sync::atomic::AtomicBool,
    shutdown: CancellationToken,
    interest: Arc<InterestTable>,
    /// Interest pushes asked for by subscriptions, and the wait for them.
    interest_sync: InterestSync,
    hooks: LocalHooks,
    /// When each group's leader was last heard from (failover detection).
    contact: Arc<LeaderContact>,
    /// What each partition's leader had committed when this node (re)joined it, and whether
    /// this node has applied that far (see [`crate::catch_up`]).
    catch_up: CatchUp,
    /// The members' clock offsets: what this node's proposals take as the time.
    clock: Arc<ClusterClock>,
    /// This node's build ([`ClusterConfig::build`]).
    build: String,
    /// Each member's build, as it last told it (the clock loop asks).
    builds: parking_lot::Mutex<BTreeMap<NodeId, String>>,
    /// What a peer said, when the formation asked, of the cluster it formed without this node
    /// (`epoch E; members ...; node N says so`): this node is left out until it is joined.
    formed_elsewhere: parking_lot::Mutex<Option<String>>,
    /// How many members answer this node, as the reachability loop last judged it
    /// (`node/reachability.rs`); the proposers watch it.
    reach: watch::Sender<Reach>,
    raft_timings: RaftTimings,
    /// Per partition: held by its proposer's rounds here, exclusively by a hand-back.
    gates: Vec<Arc<PartitionGate>>,
    /// Per group: elections this node called because the leader handed it the group.
    takeovers: Vec<AtomicU64>,
    /// The namespace config in force; the meta group sets the cluster's.
    namespaces: Arc<LiveNamespaces>,
    /// When a quorum of the voters probed last answered that this node is not a member (it
    /// was removed, and the removal never reached it: see [`ClusterNode::is_removed`]).
    told_not_member: parking_lot::Mutex<Option<std::time::Instant>>,
}

/// This node's part of the cluster; cheap to clone.
#[derive(Clone)]
pub struct ClusterNode {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ClusterNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterNode")
            .field("id", &self.inner.id)
            .finish_non_exhaustive()
    }
}

impl ClusterNode {
    /// Starts the groups, the RPC server, the proposers and (with `bootstrap_expect`) cluster
    /// formation. `on_commit` receives every partition's committed events on this node, in
    /// commit order per partition. Must run inside a Tokio runtime.
    pub async fn start(
        config: ClusterConfig,
        store: Arc<Store>,
        namespaces: Arc<LiveNamespaces>,
        on_commit: OnCommit,
        hooks: LocalHooks,
        shutdown: CancellationToken,
    ) -> Result<ClusterNode, ClusterError> {
        let id = config.node_id;
        if config.bootstrap_expect > 0 {
            let mut all: BTreeSet<NodeId> = config.peers.keys().copied().collect();
            all.insert(id);
            if all.len() < config.bootstrap_expect {
                return Err(ClusterError::Config(format!(
                    "--bootstrap-expect {} but --peers names only {} node(s) (this one included)",
                    config.bootstrap_expect,
                    all.len()
                )));
            }
        }
        // Before anything speaks for this node: a store of another node's refuses it, and so
        // does one of another cluster (before the endpoint opens: see `store_check`).
        store.claim_node_id(id)?;
        let journal = RaftJournal::of(&store)?;
        store_check::check_store_is_this_clusters(&config, &store, &journal, &namespaces).await?;
        let identity = NodeIdentity::load(&config.tls_dir, id)?;
        let allowed: BTreeSet<NodeId> = config.peers.keys().copied().collect();
        let allowed = Arc::new(RwLock::new(allowed));
        let filter = {
            let allowed = allowed.clone();
            Arc::new(move |peer: NodeId| allowed.read().contains(&peer))
        };
        let transport = Arc::new(Transport::bind(
            config.bind,
            identity,
            &TransportOptions::default(),
            filter,
        )?);
        let peers = Peers::new(transport.clone());
        if config.forget_peer_journals {
            let forgot = store.forget_peer_progress()?;
            tracing::warn!(
                forgot,
                "forgot how far the members' Raft journals had got (--forget-peer-journals): a member restored from an older backup is heard again"
            );
        }
        let peer_stores = PeerStores::new(store.clone());
        peers.set_store_ids(peer_stores.clone());
        for (&peer, addr) in &config.peers {
            peers.set_addr(peer, addr.clone());
        }

        let raft_config = Arc::new(
            openraft::Config {
                cluster_name: "herald".into(),
                heartbeat_interval: config.raft.heartbeat_ms,
                election_timeout_min: config.raft.election_min_ms,
                election_timeout_max: config.raft.election_max_ms,
                install_snapshot_timeout: 10_000,
                snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(config.raft.snapshot_logs),
                max_in_snapshot_log_to_keep: config.raft.snapshot_logs / 10,
                ..Default::default()
            }
            .validate()
            .map_err(|e| ClusterError::Raft(e.to_string()))?,
        );

        let partitions = store.partitions();
        let mut groups = Vec::with_capacity(usize::from(partitions) + 1);
        let mut elections = Vec::with_capacity(usize::from(partitions) + 1);
        for group in 0..=partitions {
            let log = RaftLogStore::new(journal.clone(), group);
            let commit: OnCommit = if group == META_GROUP {
                Arc::new(|_: &[herald_storage::Event]| {})
            } else {
                on_commit.clone()
            };
            let sm = GroupStateMachine::new(journal.clone(), group, namespaces.clone(), commit)?;
            let network = GroupNetworkFactory::new(peers.clone(), group);
            elections.push(network.elections());
            let raft = Raft::new(id, raft_config.clone(), network, log, sm)
                .await
                .map_err(|e| ClusterError::Raft(format!("group {group}: {e}")))?;
            // Timer elections start once this node has heard a leader (see `failover`).
            raft.runtime_config().elect(false);
            groups.push(raft);
        }

        if let Some(meta) = groups.first() {
            peer_stores.watch(meta.clone());
        }
        // A restarted node lets the members it already knows connect.
        if let Some(meta) = groups.first() {
            let m = meta.metrics().borrow().clone();
            allowed
                .write()
                .extend(m.membership_config.membership().nodes().map(|(id, _)| *id));
        }

        let mut proposers = Vec::with_capacity(usize::from(partitions));
        let mut receivers = Vec::with_capacity(usize::from(partitions));
        for _ in 0..partitions {
            let (tx, rx) = mpsc::channel(config.proposer.queue_capacity.max(1));
            proposers.push(tx);
            receivers.push(rx);
        }
        let node = ClusterNode {
            inner: Arc::new(Inner {
                id,
                advertise: config.advertise.clone(),
                store,
                journal,
                groups,
                elections,
                proposers,
                peers: peers.clone(),
                peer_stores,
                transport: transport.clone(),
                static_peers: config.peers.clone(),
                bootstrap_expect: config.bootstrap_expect,
                allowed,
                forming: std::sync::atomic::AtomicBool::new(false),
                shutdown: shutdown.clone(),
                interest: InterestTable::new(id, peers.clone()),
                interest_sync: InterestSync::default(),
                hooks,
                contact: Arc::new(LeaderContact::new(usize::from(partitions) + 1)),
                catch_up: CatchUp::new(
                    usize::from(partitions) + 1,
                    Duration::from_millis(config.raft.election_max_ms * 2),
                ),
                clock: Arc::default(),
                build: config.build.clone(),
                builds: parking_lot::Mutex::default(),
                formed_elsewhere: parking_lot::Mutex::default(),
                reach: watch::Sender::new(Reach::default()),
                raft_timings: config.raft,
                gates: (0..partitions).map(|_| Arc::default()).collect(),
                takeovers: (0..=partitions).map(|_| AtomicU64::new(0)).collect(),
                namespaces,
                told_not_member: parking_lot::Mutex::new(None),
            }),
        };
        for (partition, rx) in receivers.into_iter().enumerate() {
            let partition = partition as Partition;
            let ctx = ProposerContext {
                relay_turn: Default::default(),
                relay_via: Default::default(),
                id,
                partition,
                raft: node.inner.groups[usize::from(partition_group(partition))].clone(),
                peers: peers.clone(),
                options: config.proposer.clone(),
                gate: node.inner.gates[usize::from(partition)].clone(),
                contact: node.inner.contact.clone(),
                clock: node.inner.clock.clone(),
                reach: node.inner.reach.subscribe(),
                lease: Duration::from_millis(config.raft.election_max_ms),
            };
            tokio::spawn(proposer::run(ctx, rx));
        }
        {
            let inner = Arc::downgrade(&node.inner);
            transport.set_refusal_note(Arc::new(move || {
                ClusterNode {
                    inner: inner.upgrade()?,
                }
                .formation_note()
            }));
        }
        rpc::serve(
            transport,
            Arc::new(node.clone()),
            node.inner.peers.clone(),
            shutdown.clone(),
        );
        if config.bootstrap_expect > 0 {
            let node = node.clone();
            let expect = config.bootstrap_expect;
            tokio::spawn(async move { node.bootstrap(expect).await });
        }
        {
            let node = node.clone();
            tokio::spawn(async move { node.placement_loop().await });
        }
        {
            // The members the non-durable publishes go to while their interest is unknown,
            // known from the start: the interest loop records them only at its first push,
            // and a publish before it (a node just restarted, its clients back at once) went
            // to no other node.
            let mut members: BTreeSet<NodeId> = node.members().into_keys().collect();
            members.extend(node.inner.static_peers.keys().copied());
            node.inner.interest.set_members(members);
            let node = node.clone();
            tokio::spawn(async move { node.interest_loop().await });
        }
        {
            let node = node.clone();
            tokio::spawn(async move { node.clock_loop().await });
        }
        {
            let node = node.clone();
            tokio::spawn(async move { node.pause_detector().await });
        }
        {
            let node = node.clone();
            tokio::spawn(async move { node.reachability_loop().await });
        }
        {
            let node = node.clone();
            tokio::spawn(async move { node.failover_loop().await });
        }
        tracing::info!(node = id, bind = %config.bind, advertise = %config.advertise, groups = partitions + 1, "cluster node started");
        Ok(node)
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.inner.id
    }

    /// The other nodes' interest, and the way to send them non-durable events.
    pub fn interest(&self) -> &Arc<InterestTable> {
        &self.inner.interest
    }

    /// Pushes this node's interest to the other members now, and waits until the push that
    /// includes every subscription registered before this call has been acknowledged by every
    /// reachable member (at most [`INTEREST_SYNC_LIMIT`]; a member found unreachable does not
    /// hold it up). A subscription is confirmed after this, so that a publish started on any
    /// node after the confirmation counts the subscriber and, for a non-durable channel, is
    /// sent to this node. Concurrent callers share one push. Returns false when it gave up.
    pub async fn sync_interest(&self) -> bool {
        self.inner.interest_sync.wait(INTEREST_SYNC_LIMIT).await
    }

    /// The interest pushes' counters (for `/metrics`).
    pub fn interest_sync(&self) -> &InterestSync {
        &self.inner.interest_sync
    }

    /// Whether the cluster exists (its epoch is applied here): until then durable publishes
    /// fail with [`ProposeError::NotFormed`] and the node is not ready.
    pub fn is_formed(&self) -> bool {
        self.inner.store.cluster_initialized()
    }

    /// The cluster's epoch (the store's, once formed).
    pub fn epoch(&self) -> Epoch {
        self.inner.store.epoch()
    }

    /// Queues publishes (all of one partition) with that partition's proposer and returns the
    /// receiver of their outcome; waits only while the queue is full.
    pub async fn enqueue(
        &self,
        partition: Partition,
        publishes: Vec<Publish>,
    ) -> Result<oneshot::Receiver<ProposeResult>, ProposeError> {
        self.enqueue_as(partition, publishes, None, false).await
    }

    async fn enqueue_as(
        &self,
        partition: Partition,
        publishes: Vec<Publish>,
        origin: Option<NodeId>,
        relayed: bool,
    ) -> Result<oneshot::Receiver<ProposeResult>, ProposeError> {
        if !self.is_formed() {
            // Left out of a cluster that exists: the publisher is told why, not "not formed".
            return Err(match self.left_out() {
                Some(why) => ProposeError::Failed(format!("{why}; nothing was committed")),
                None => ProposeError::NotFormed,
            });
        }
        if let Some(big) = publishes.iter().find(|p| p.size() > MAX_PUBLISH_BYTES) {
            return Err(ProposeError::Failed(format!(
                "an event of {} bytes is over a cluster's limit of {MAX_PUBLISH_BYTES} bytes per event (a Raft entry must fit in one node-to-node message); nothing was committed",
                big.size()
            )));
        }
        let sender = self
            .inner
            .proposers
            .get(usize::from(partition))
            .ok_or_else(|| ProposeError::Failed(format!("no partition {partition}")))?;
        let (reply, rx) = oneshot::channel();
        sender
            .send(ProposeRequest {
                publishes,
                origin,
                relayed,
                reply,
            })
            .await
            .map_err(|_| ProposeError::Closed)?;
        Ok(rx)
    }

    /// Whether this node can currently commit: every partition group has a leader it has heard
    /// from (or leads with a recent quorum acknowledgement). A node cut off on the minority side
    /// loses this within an election timeout; its streaming clients should move.
    pub fn has_quorum(&self) -> bool {
        self.quorum_problem().is_none()
    }

    /// Why this node, not formed, is out of a cluster that exists: its store is refused
    /// ([`Self::store_refused`]), or a peer refused its dial as a non-member of the cluster it
    /// formed (`--bootstrap-expect` met without this node, or it was never joined). `None`
    /// when no peer said so: the cluster may simply not be formed yet.
    fn left_out(&self) -> Option<String> {
        if let Some(refusal) = self.store_refused() {
            return Some(refusal);
        }
        // A peer that let this node connect said so to the formation (it names this node in
        // its own --peers); one that refused the connection said so in its refusal.
        let said = self.inner.formed_elsewhere.lock().clone().or_else(|| {
            self.inner.static_peers.keys().find_map(|&peer| {
                let formed = self.inner.peers.formed_without_this_node(peer)?;
                Some(format!("{formed}; node {peer} says so"))
            })
        })?;
        Some(format!(
            "the cluster was formed without this node ({said}): add it with `herald cluster join --node-id {id} --addr {addr}` through a member",
            id = self.inner.id,
            addr = self.inner.advertise,
        ))
    }

    /// Whether members refuse this node's store (its data directory lost, replaced or gone back
    /// in time, see [`crate::peer_stores`]), as they last answered it: `refused by the cluster:
    /// node N refuses it (...)`.
    pub fn store_refused(&self) -> Option<String> {
        let refusal = self.inner.peers.refused_by().into_iter().min()?;
        Some(format!("refused by the cluster: {refusal}"))
    }

    /// Whether this node is still applying a backlog its partitions' leaders had committed
    /// when it started or came back from a silence (see [`crate::catch_up`]): the first such
    /// partition and how far behind it is. `None` once every partition caught up, and on a
    /// node that is not formed or was removed (nothing reaches it: other reasons say so).
    pub fn catching_up(&self) -> Option<CatchingUp> {
        if !self.is_formed() || self.is_removed() {
            return None;
        }
        let me = self.inner.id;
        self.inner
            .groups
            .iter()
            .enumerate()
            .find_map(|(group, raft)| {
                let partition = group_partition(group as GroupId)?;
                if self.inner.catch_up.is_synced(group) {
                    return None;
                }
                let m = raft.metrics();
                let m = m.borrow();
                // A group this node is no member of yet (it is being added) has nothing to
                // catch up with here.
                let membership = m.membership_config.membership();
                if !membership.nodes().any(|(id, _)| *id == me) {
                    return None;
                }
                let applied = m.last_applied.map_or(0, |id| id.index + 1);
                let leads = m.state == ServerState::Leader;
                let leader = m.current_leader;
                drop(m);
                let behind = match self.inner.catch_up.lag(group, applied, leads) {
                    Lag::Synced => return None,
                    // A partition no leader spoke for since the start: catching up for a
                    // while; past that it has no leader to catch up with (its voters are
                    // down, say), which `/ready` says as such, and a subscription does not
                    // wait for it.
                    Lag::Unheard if self.inner.catch_up.unheard_for(group) >= UNHEARD_LIMIT => {
                        return None;
                    }
                    Lag::Unheard => None,
                    Lag::Behind(entries) => Some(entries),
                };
                Some(CatchingUp {
                    partition,
                    leader,
                    behind,
                })
            })
    }

    /// Ticks the catch-up table's pause detector every [`crate::catch_up::TICK`] until the
    /// node stops (see [`CatchUp::tick`]).
    async fn pause_detector(&self) {
        let mut ticker = tokio::time::interval(crate::catch_up::TICK);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = self.inner.shutdown.cancelled() => return,
            }
            if let Some(gap) = self.inner.catch_up.tick() {
                tracing::info!(
                    gap_ms = gap.as_millis() as u64,
                    "this node went {} ms without running (paused, or starved): it catches up with its leaders before new subscriptions start",
                    gap.as_millis()
                );
            }
        }
    }

    /// Waits until [`Self::catching_up`] is `None`, at most `limit`; returns what is still
    /// behind then. A subscription calls it before it starts, so that the backlog of a node
    /// back from a restart or a silence is not delivered to it as live events. Returns at once
    /// when nothing is behind (the common case: one atomic read per partition), and when no
    /// majority of the members answers this node.
    pub async fn wait_caught_up(&self, limit: Duration) -> Option<CatchingUp> {
        let started = tokio::time::Instant::now();
        let deadline = started + limit;
        loop {
            // The pause detector has not ticked lately: the process may just have been
            // resumed (this subscription waited in a socket's backlog meanwhile), and the
            // detector not run yet to make every group catch up again. Looked at again
            // once it has.
            let behind = self.catching_up();
            if behind.is_none() && self.inner.catch_up.ticking() {
                return None;
            }
            // No majority answers this node (for longer than a process just resumed takes
            // to hear from them again): there is nobody to catch up from (and its streams
            // are sent elsewhere for that), so subscriptions are not held up for it.
            let cut_off = !self.reaches_majority() && started.elapsed() >= CUT_OFF_PATIENCE;
            if tokio::time::Instant::now() >= deadline
                || self.inner.shutdown.is_cancelled()
                || cut_off
            {
                // Only what is really behind: a detector that has not ticked names nothing.
                return behind;
            }
            tokio::time::sleep(CATCH_UP_POLL).await;
        }
    }

    /// Why this node cannot commit right now (see [`Self::has_quorum`]), in words for an
    /// operator: not formed yet, a group without a leader, a leader no majority answers, a
    /// leader this node has not heard from. `None` when every group can commit here.
    pub fn quorum_problem(&self) -> Option<String> {
        self.node_problem().or_else(|| {
            self.partition_problems()
                .into_iter()
                .next()
                .map(|(_, problem)| problem)
        })
    }

    /// The part of [`Self::quorum_problem`] that concerns the whole node: its store refused,
    /// not formed, members it refuses, or the meta group unable to commit here.
    pub fn node_problem(&self) -> Option<String> {
        // Its store is refused: it takes no part in Raft with those members, whatever its
        // groups show for now (a node back on an empty store is not formed either: this says
        // why).
        if let Some(refusal) = self.store_refused() {
            return Some(refusal);
        }
        if !self.is_formed() {
            return Some(self.left_out().unwrap_or_else(|| {
                "not formed yet: waiting for the nodes of --bootstrap-expect to meet, or for \
                 `herald cluster init` (first node) or `herald cluster join` (the others)"
                    .to_string()
            }));
        }
        // Members it refuses answer, but nothing commits with them: said before the groups'
        // symptoms of it (no leader, a leader no majority answers).
        if let Some(refused) = self.refused_members_note() {
            return Some(refused);
        }
        self.group_problem(usize::from(META_GROUP))
    }

    /// The partitions that cannot commit here, each with why (as [`Self::quorum_problem`] says it).
    /// Named only when something is wrong: this runs on each readiness look (`/ready`,
    /// `/metrics`, the streams' quorum watch).
    pub fn partition_problems(&self) -> Vec<(GroupId, String)> {
        (0..self.inner.groups.len())
            .filter(|&group| group != usize::from(META_GROUP))
            .filter_map(|group| Some((group as GroupId, self.group_problem(group)?)))
            .collect()
    }

    /// Why `group` cannot commit here, if it cannot: no leader, a leader (this node) no
    /// majority of whose voters answers, or a leader this node has not heard from for two
    /// leases (with herald's pre-vote a follower cut off from its leader keeps following: it
    /// calls no election nobody would grant).
    fn group_problem(&self, group: usize) -> Option<String> {
        let raft = self.inner.groups.get(group)?;
        let silent = Duration::from_millis(self.inner.raft_timings.election_max_ms * 2);
        let what = || match group_partition(group as GroupId) {
            None => "the meta group".to_string(),
            Some(partition) => format!("partition {partition}"),
        };
        let m = raft.metrics();
        let m = m.borrow();
        match (m.state, m.current_leader) {
            (ServerState::Leader, _) => match m.millis_since_quorum_ack {
                Some(ms) if ms < 2_000 => None,
                Some(ms) => Some(format!(
                    "no quorum: this node leads {}, but no majority of its voters has answered \
                     for {ms} ms",
                    what()
                )),
                None => Some(format!(
                    "no quorum: this node leads {}, but no majority of its voters has answered \
                     yet",
                    what()
                )),
            },
            (_, None) => Some(format!(
                "no quorum: {} has no leader (an election is under way, or too few of its \
                 voters are reachable)",
                what()
            )),
            (_, Some(leader)) => {
                let silence = self.inner.contact.silence(group);
                (silence >= silent).then(|| {
                    format!(
                        "no quorum: this node has not heard from node {leader}, the leader of \
                         {}, for {} ms",
                        what(),
                        silence.as_millis()
                    )
                })
            }
        }
    }

    /// Why this node reaches no majority of the cluster's members, if it does not (see
    /// [`Self::reaches_majority`]).
    pub fn majority_problem(&self) -> Option<String> {
        (!self.reaches_majority()).then(|| {
            "no quorum: this node reaches no majority of the cluster's members (a network \
             split, or most of them down)"
                .to_string()
        })
    }

    /// What this node can serve, for the decision to send its streaming clients elsewhere
    /// and for `/ready` (see [`Availability`]). When some partitions cannot commit here but
    /// the node is otherwise sound, the members it reaches are asked (at most `wait` each)
    /// whether they commit those partitions: if one does, this node is worse off than it
    /// ([`Availability::Down`]); if none does, the partitions are out for everyone it could
    /// send clients to ([`Availability::Degraded`]).
    pub async fn availability(&self, wait: Duration) -> Availability {
        if let Some(problem) = self.node_problem().or_else(|| self.majority_problem()) {
            return Availability::Down(problem);
        }
        let problems = self.partition_problems();
        let Some((_, first)) = problems.first() else {
            return Availability::Whole;
        };
        if problems.len() + 1 >= self.inner.groups.len() {
            // No partition commits here.
            return Availability::Down(first.clone());
        }
        // Asked about every such partition at once: the answer is wanted within `wait`.
        let elsewhere = futures::future::join_all(
            problems
                .iter()
                .map(|(group, _)| self.committed_elsewhere(*group, wait)),
        )
        .await;
        if let Some((_, problem)) = problems
            .iter()
            .zip(elsewhere)
            .find_map(|(problem, elsewhere)| elsewhere.then_some(problem))
        {
            return Availability::Down(format!(
                "{problem}, while members this node reaches commit it"
            ));
        }
        let others = problems.len() - 1;
        Availability::Degraded(if others == 0 {
            first.clone()
        } else {
            format!(
                "{first} (and {others} other partition{})",
                if others == 1 { "" } else { "s" }
            )
        })
    }

    /// Whether a member this node reaches commits `group` (it leads it with a quorum, or
    /// hears its leader): then this node's clients are better served there. Each member but
    /// this one is asked (a failover probe, at most `wait`); members that do not answer count
    /// for nothing. Asked only while the group cannot commit here.
    ///
    /// Never where this node leads the group: the members it reaches hear *it* (it goes on
    /// sending to them while its other voters are down), which the probe's answer does not
    /// tell apart from hearing another leader; and a leader cut off from the members that
    /// elected another one reaches no majority of the cluster, which says so first.
    pub async fn committed_elsewhere(&self, group: GroupId, wait: Duration) -> bool {
        let leads = self
            .inner
            .groups
            .get(usize::from(group))
            .is_some_and(|raft| raft.metrics().borrow().state == ServerState::Leader);
        if leads {
            return false;
        }
        let lease = Duration::from_millis(self.inner.raft_timings.election_max_ms);
        let me = self.inner.id;
        let asks = self
            .members()
            .into_keys()
            .filter(|&peer| peer != me && !self.inner.peers.is_silent(peer))
            .map(|peer| async move {
                let request = Request::App(encode(&AppRequest::Probe { group }));
                match self.inner.peers.call(peer, &request, wait).await {
                    Ok(Response::App(bytes)) => matches!(
                        decode::<AppResponse>(&bytes),
                        Ok(AppResponse::Probe(Some(probe)))
                            if Duration::from_millis(probe.silent_ms) < lease
                    ),
                    _ => false,
                }
            });
        futures::future::join_all(asks)
            .await
            .into_iter()
            .any(|heard| heard)
    }

    /// Why this node can no longer take part in a group, if it cannot: a group whose Raft
    /// stopped on a fatal error while the node runs: its log or state machine failed (a full
    /// disk, an I/O error: [`GroupFailure::storage`]), or its Raft task panicked or stopped.
    /// Such a group neither commits nor applies here until the node restarts; its peers carry
    /// on without this node. The first such group, by id.
    pub fn failure(&self) -> Option<GroupFailure> {
        if self.inner.shutdown.is_cancelled() {
            return None;
        }
        self.inner
            .groups
            .iter()
            .enumerate()
            .find_map(|(group, raft)| GroupFailure::of(group as GroupId, raft))
    }

    /// Resolves once the node is shutting down.
    pub async fn stopped(&self) {
        self.inner.shutdown.cancelled().await
    }

    /// Stops the groups and the endpoint, after handing the partitions this node leads to
    /// other voters (at most `HAND_OVER_LIMIT`): a rolling restart then moves leadership
    /// in milliseconds instead of leaving each partition without a leader for a failover.
    pub async fn shutdown(&self) {
        // A removed node leads nothing the members still hear: nothing to hand over (it spent
        // its 3 s trying, and logged that no voter took partitions it no longer belonged to).
        if self.is_formed() && !self.is_removed() {
            // The hand-over keeps to its deadline; the timeout is a backstop, so that no
            // attempt stuck past it can hold the shutdown up.
            let deadline = tokio::time::Instant::now() + HAND_OVER_LIMIT;
            let backstop = HAND_OVER_LIMIT + Duration::from_secs(1);
            if tokio::time::timeout(backstop, self.hand_over_partitions(deadline))
                .await
                .is_err()
            {
                tracing::warn!(
                    "shutting down: the partition hand-over overran its limit; stopping anyway"
                );
            }
        }
        self.inner.shutdown.cancel();
        for raft in &self.inner.groups {
            let _ = raft.shutdown().await;
        }
        // The groups are stopped: sync the journal, checkpoint, and delete it.
        let journal = self.inner.journal.clone();
        let _ = tokio::task::spawn_blocking(move || journal.close()).await;
        self.inner.transport.shutdown().await;
    }

    /// Members, roles, leaders and positions of every group, as `herald cluster status` shows.
    pub fn status(&self) -> ClusterStatus {
        let groups = self
            .inner
            .groups
            .iter()
            .enumerate()
            .map(|(group, raft)| {
                let m = raft.metrics().borrow().clone();
                let membership = m.membership_config.membership();
                let matched: BTreeMap<NodeId, Option<u64>> = m
                    .replication
                    .as_ref()
                    .map(|r| {
                        r.iter()
                            .map(|(id, log)| (*id, log.as_ref().map(|l| l.index)))
                            .collect()
                    })
                    .unwrap_or_default();
                let last = m.last_log_index.unwrap_or(0);
                GroupStatus {
                    group: group as GroupId,
                    partition: group_partition(group as GroupId),
                    role: format!("{:?}", m.state).to_lowercase(),
                    leader: m.current_leader,
                    term: m.current_term,
                    last_log_index: m.last_log_index,
                    applied_index: m.last_applied.map(|l| l.index),
                    snapshot_index: m.snapshot.map(|l| l.index),
                    purged_index: m.purged.map(|l| l.index),
                    elections_called: self.inner.elections[group].called(),
                    takeovers: self.inner.takeovers[group].load(Ordering::Relaxed),
                    voters: membership.voter_ids().collect(),
                    learners: membership.learner_ids().collect(),
                    lag: matched
                        .into_iter()
                        .map(|(id, index)| (id, last.saturating_sub(index.unwrap_or(0))))
                        .collect(),
                }
            })
            .collect();
        ClusterStatus {
            node: self.inner.id,
            advertise: self.inner.advertise.clone(),
            peers: self.inner.static_peers.clone(),
            bootstrap_expect: self.inner.bootstrap_expect,
            formed: self.is_formed(),
            epoch: self.is_formed().then(|| self.epoch().to_string()),
            members: self.members(),
            links: self.links(),
            clock_correction_ms: self.inner.clock.correction_ms(),
            build: self.inner.build.clone(),
            journal: self.inner.store.journal_progress(),
            groups,
            left_out: (!self.is_formed()).then(|| self.left_out()).flatten(),
            removed: self.is_removed(),
        }
    }

    /// The link to each peer, a peer refused for its store shown as `refused`: it may be
    /// connected, but no Raft message goes to it or is taken from it.
    fn links(&self) -> BTreeMap<NodeId, crate::rpc::PeerLink> {
        let mut links = self.inner.peers.links();
        let offsets = self.inner.clock.offsets();
        let builds = self.inner.builds.lock().clone();
        for (peer, link) in links.iter_mut() {
            link.clock_offset_ms = offsets.get(peer).copied();
            link.build = builds.get(peer).cloned();
            link.journal = self
                .inner
                .peer_stores
                .journal_seen(*peer)
                .map(|seen| seen.durable);
            if self.inner.peer_stores.is_refused(*peer) {
                link.state = "refused";
                link.last_error = Some(self.inner.peer_stores.refusal(*peer));
            }
        }
        links
    }

    /// The cluster's members (`id -> address`) as the meta group knows them.
    pub fn members(&self) -> BTreeMap<NodeId, String> {
        let m = self.inner.groups[usize::from(META_GROUP)]
            .metrics()
            .borrow()
            .clone();
        m.membership_config
            .membership()
            .nodes()
            .map(|(id, node)| (*id, node.addr.clone()))
            .collect()
    }

    /// Whether this node was removed from the cluster it formed with: the membership it
    /// knows lists other members but not this one, or (as the members stop replicating to a
    /// node once its removal commits, it rarely learns of it itself) a quorum of the voters it
    /// probed while hearing no leader answered, within `NOT_MEMBER_MEMORY`, that it is not a
    /// member. It then commits nothing; its clients are moved elsewhere like a node without
    /// quorum, and `/ready` says why. As the reachability loop last judged it (every 100 ms),
    /// so that `/ready`, the clients told to move and the publishes refused agree.
    pub fn is_removed(&self) -> bool {
        self.inner.reach.borrow().removed
    }

    /// [`Self::is_removed`] from this moment's view.
    fn removed_now(&self) -> bool {
        self.is_formed()
            && (!self.is_member(self.id())
                || self.inner.told_not_member.lock().is_some_and(|at| {
                    not_member_answer_counts(
                        at.elapsed(),
                        self.inner.contact.silence(usize::from(META_GROUP)),
                    )
                }))
    }

    /// Records that a quorum of the voters probed answered that this node is not a member.
    fn told_not_member(&self) {
        *self.inner.told_not_member.lock() = Some(std::time::Instant::now());
    }

    /// Whether `node` is a member of the cluster as this node knows it (before the cluster is
    /// formed, every node counts).
    fn is_member(&self, node: NodeId) -> bool {
        let members = self.members();
        members.is_empty() || members.contains_key(&node)
    }

    /// The namespace config in force on this node (the cluster's, once it holds one).
    pub fn namespaces(&self) -> &Arc<LiveNamespaces> {
        &self.inner.namespaces
    }

    /// Makes `namespaces` the cluster's namespace config: written to the meta group, so every
    /// member applies it from its next publish batch on (and a member that was down, once it
    /// catches up). Returns once the meta group committed it.
    pub async fn set_namespaces(&self, namespaces: &Namespaces) -> Result<(), ProposeError> {
        let spec = namespaces.to_spec();
        self.write_via_leader(META_GROUP, Command::Namespaces { spec })
            .await
    }

    /// Asks the meta leader to add `node` at `addr` to the cluster.
    pub async fn join(&self, node: NodeId, addr: String) -> Result<(), ProposeError> {
        self.meta_request(AppRequest::Join { node, addr }).await
    }

    /// Asks the meta leader to remove `node` from the cluster.
    pub async fn remove(&self, node: NodeId) -> Result<(), ProposeError> {
        self.meta_request(AppRequest::Remove { node }).await
    }

    /// Forms a cluster of this node and `peers` now (hand operation), without waiting for
    /// a bootstrap count. On a cluster already formed it changes nothing and says so
    /// ([`InitError::AlreadyFormed`]; when this node is not formed but one of its `--peers`
    /// is, [`InitError::FormedCatchingUp`] if that cluster counts this node as a member and
    /// [`InitError::FormedWithoutThisNode`] if not), unless partitions were left uncreated there (a
    /// formation cut short, or an init while their voters were down): it creates those that
    /// no member has a log for, over the current members, and fails without a change when a
    /// member does not answer.
    pub async fn init(&self) -> Result<(), InitError> {
        if self.is_formed() {
            let missing = self.partitions_without_membership();
            if !missing.is_empty() && !self.create_uncreated_partitions(missing).await?.is_empty() {
                return Ok(());
            }
            let members = self.members_text();
            tracing::info!(
                epoch = %self.epoch(),
                "`herald cluster init` asked of a formed cluster: nothing to do"
            );
            return Err(InitError::AlreadyFormed {
                epoch: self.epoch().to_string(),
                members,
            });
        }
        // This node's peers may have formed a cluster without it (it came later): forming
        // here would start a meta group of its own that calls elections on them.
        if let Some(elsewhere) = self.formed_without_this_node().await {
            let via = elsewhere.via;
            if elsewhere.member {
                tracing::info!(
                    via,
                    "`herald cluster init` asked of a member that has not caught up with the formed cluster yet: nothing was changed"
                );
                return Err(InitError::FormedCatchingUp {
                    formed: elsewhere.described(),
                    node: self.inner.id,
                });
            }
            tracing::warn!(
                via,
                "`herald cluster init` asked of a node that is not a member of the cluster its peers formed: nothing was changed"
            );
            return Err(InitError::FormedWithoutThisNode {
                formed: elsewhere.described(),
                node: self.inner.id,
                addr: self.inner.advertise.clone(),
            });
        }
        let mut members = self.inner.static_peers.clone();
        members.insert(self.inner.id, self.inner.advertise.clone());
        Ok(self.form(members).await?)
    }

    /// The members as `1 at host:port, 2 at host:port`, as the "already formed" answers
    /// name them.
    fn members_text(&self) -> String {
        self.members()
            .iter()
            .map(|(id, addr)| format!("{id} at {addr}"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// What this node tells a node that asks whether its cluster is formed: `epoch E; members
    /// 1 at host:port, ...` once it is, else `None`.
    fn formation_note(&self) -> Option<String> {
        if !self.is_formed() {
            return None;
        }
        let members = self.members_text();
        Some(format!("epoch {}; members {members}", self.epoch()))
    }

    async fn call(
        &self,
        target: NodeId,
        request: &AppRequest,
    ) -> Result<AppResponse, ProposeError> {
        self.call_within(target, request, Duration::from_secs(10))
            .await
    }

    /// [`Self::call`] that gives up after `timeout`.
    async fn call_within(
        &self,
        target: NodeId,
        request: &AppRequest,
        timeout: Duration,
    ) -> Result<AppResponse, ProposeError> {
        match self
            .inner
            .peers
            .call(target, &Request::App(encode(request)), timeout)
            .await
        {
            Ok(Response::App(bytes)) => decode(&bytes).map_err(ProposeError::Failed),
            Ok(other) => Err(ProposeError::Failed(format!(
                "node {target} answered {other:?}"
            ))),
            Err(error) => Err(ProposeError::Failed(format!("node {target}: {error}"))),
        }
    }

    /// The gate of `group`'s partition (`None` for the meta group).
    fn gate(&self, group: GroupId) -> Option<&Arc<PartitionGate>> {
        self.inner.gates.get(usize::from(group_partition(group)?))
    }
}

/// Whether `raft`'s group was created on this node: its membership names a node.
pub(crate) fn has_membership(raft: &Raft<TypeConfig>) -> bool {
    raft.metrics()
        .borrow()
        .membership_config
        .membership()
        .nodes()
        .next()
        .is_some()
}

fn raft_error<E: std::error::Error>(error: RaftError<NodeId, E>) -> ProposeError {
    match error {
        RaftError::APIError(e) => ProposeError::Failed(e.to_string()),
        RaftError::Fatal(e) => ProposeError::Failed(e.to_string()),
    }
}

/// Why `herald cluster init` formed nothing.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// The cluster is formed already, every partition included: the init changed nothing.
    #[error(
        "the cluster is already formed (epoch {epoch}; members {members}): nothing was changed. `herald cluster status` shows it; `herald cluster join` adds a node"
    )]
    AlreadyFormed {
        /// The cluster's epoch.
        epoch: String,
        /// Its members, `id at address`, comma-separated.
        members: String,
    },
    /// This node is not formed, but one of its `--peers` is a member of a formed cluster
    /// that counts this node among its members (named at formation, or joined) and this node
    /// has not caught up yet: the init changed nothing; the node catches up on its own.
    #[error(
        "the cluster is already formed ({formed}), and this node ({node}) is one of its members that has not caught up yet: nothing was changed. It catches up from the members on its own; `herald cluster status` shows when"
    )]
    FormedCatchingUp {
        /// What the peer said of the cluster (`epoch E; members ...`), and which peer.
        formed: String,
        /// This node.
        node: NodeId,
    },
    /// This node is not formed, but one of its `--peers` is a member of a formed cluster
    /// this node is not a member of (it was started after the cluster formed): the init
    /// changed nothing; the node is to be joined instead.
    #[error(
        "the cluster is already formed ({formed}): nothing was changed, and this node ({node}) is not one of its members. Add it with `herald cluster join --node-id {node} --addr {addr}` through a member"
    )]
    FormedWithoutThisNode {
        /// What the peer said of the cluster (`epoch E; members ...`), and which peer.
        formed: String,
        /// This node.
        node: NodeId,
        /// Its cluster address.
        addr: String,
    },
    /// Forming failed.
    #[error(transparent)]
    Failed(#[from] ProposeError),
}

/// What `herald cluster status` shows.
#[derive(Clone, Debug, Serialize)]
pub struct ClusterStatus {
    /// This node.
    pub node: NodeId,
    /// The address this node gives the others (`--advertise-addr`, else its `--peers` entry).
    pub advertise: String,
    /// The peers this node was started with (`--peers`, this node left out): before the
    /// cluster is formed, the nodes it expects to form it with.
    pub peers: BTreeMap<NodeId, String>,
    /// `--bootstrap-expect` (0: the cluster is formed by `herald cluster init`).
    pub bootstrap_expect: usize,
    /// Whether the cluster is formed (epoch applied here).
    pub formed: bool,
    /// The cluster epoch, once formed.
    pub epoch: Option<String>,
    /// Members and their cluster addresses.
    pub members: BTreeMap<NodeId, String>,
    /// This node's link to each peer it has an address for.
    pub links: BTreeMap<NodeId, crate::rpc::PeerLink>,
    /// What this node adds to its clock to get the majority's, ms ([`crate::clock`]); 0
    /// when its clock agrees.
    pub clock_correction_ms: i64,
    /// This node's build (`0.1.0 (commit ...)`); each peer's is in its link.
    pub build: String,
    /// How far this node's Raft journal has got (see [`crate::peer_stores`]); each peer's,
    /// as this node last saw it, is in its link.
    pub journal: Option<herald_storage::JournalProgress>,
    /// Every group as this node sees it.
    pub groups: Vec<GroupStatus>,
    /// Why this node, not formed, is out of a cluster that exists (its store refused, or
    /// the cluster formed without it), and how to get it in; `None` otherwise.
    pub left_out: Option<String>,
    /// This node knows it was removed from the cluster ([`ClusterNode::is_removed`]): the
    /// members and groups shown are what it last knew.
    pub removed: bool,
}

/// One group as this node sees it.
#[derive(Clone, Debug, Serialize)]
pub struct GroupStatus {
    /// Group id (0 = meta).
    pub group: GroupId,
    /// The partition, for partition groups.
    pub partition: Option<Partition>,
    /// This node's role: leader, follower, candidate, learner.
    pub role: String,
    /// The leader this node knows of.
    pub leader: Option<NodeId>,
    /// Current term.
    pub term: u64,
    /// Last log index written here.
    pub last_log_index: Option<u64>,
    /// Last log index applied here.
    pub applied_index: Option<u64>,
    /// Last log index covered by this node's current snapshot of the group.
    pub snapshot_index: Option<u64>,
    /// Last log index dropped from this node's log (after a snapshot): a member behind it
    /// catches up from a snapshot.
    pub purged_index: Option<u64>,
    /// Elections this node called in the group since it started (one per term it asked votes
    /// for): a node that keeps calling them disturbs the group.
    pub elections_called: u64,
    /// Of those, the elections the group's leader asked for, handing the group back to this
    /// node (see `handoff`).
    pub takeovers: u64,
    /// Voters.
    pub voters: Vec<NodeId>,
    /// Learners.
    pub learners: Vec<NodeId>,
    /// On the leader: how many entries each follower is behind.
    pub lag: BTreeMap<NodeId, u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_not_member_answer_counts_until_it_expires_or_a_meta_leader_replicates_again() {
        let s = Duration::from_secs;
        // Told 1 s ago, no meta leader heard since (silent for 5 s): removed.
        assert!(not_member_answer_counts(s(1), s(5)));
        // Joined again: the meta leader replicated 200 ms ago, after the answer.
        assert!(!not_member_answer_counts(s(1), Duration::from_millis(200)));
        // Expired, whatever the leader did.
        assert!(!not_member_answer_counts(NOT_MEMBER_MEMORY, s(60)));
    }
}
