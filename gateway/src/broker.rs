//! The broker: where a publish goes, whichever protocol it came in by.
//!
//! A channel of a durable namespace goes through the log: the publish is batched with others
//! into one apply + flush (group commit), and only then is it handed to the hub and
//! acknowledged. A channel of a non-durable namespace goes straight to the hub, like Redis
//! pub/sub: no history, no position, no guarantee.
//!
//! The broker also keeps each partition's *committed* watermark: the highest sequence number
//! that is flushed and handed to the hub. A stream resuming from a cursor replays history up
//! to the watermark it read after subscribing, and takes everything above it live, so the
//! hand-over has neither a gap nor a duplicate (see `stream`).

use crate::hub::glob::Glob;
use crate::hub::{Hub, Kind, Reservation, Wakes};
use crate::reconnect::{Reconnect, ReconnectWatch};
use bytes::Bytes;
use herald_cluster::interest::{InterestKind, TransientEvent};
use herald_cluster::message::ProposeError;
use herald_cluster::node::{ClusterConfig, ClusterNode, LocalHooks};
use herald_cluster::proposer::ProposeResult;
use herald_storage::{
    Applied, Epoch, Event, LiveNamespaces, LocalLog, Namespaces, OnCommit, Partition, Pending,
    Position, Publish, StorageError, Store, StoreOptions,
};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, oneshot, watch};

/// The outcome of an acknowledged publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    /// The event's place in the history; `None` for non-durable namespaces.
    pub position: Option<Position>,
    /// True when the message id was already committed: nothing new was written and `position`
    /// is the original event's.
    pub duplicate: bool,
    /// Local receivers of the message (for durable events, counted at acknowledgement; 0 for
    /// a duplicate, which delivers nothing).
    pub receivers: usize,
}

/// A publish that was accepted and may still be waiting for its commit.
#[derive(Debug)]
pub enum Ticket {
    /// Already delivered (non-durable namespace).
    Done(Published),
    /// Queued in the log; [`Broker::wait`] resolves once it is committed.
    Queued {
        pending: Commit,
        channel: Bytes,
        /// When the publish was handed to the log: the commit latency counts from here (on
        /// a single node a lone publish is synced before `enqueue` returns).
        since: Instant,
    },
}

/// A durable publish waiting for its commit: in the node's own log, or in the cluster.
#[derive(Debug)]
pub enum Commit {
    /// Single node: resolves after the group-commit flush.
    Local(Pending),
    /// Cluster: resolves after the partition's quorum commit (and local apply on the leader).
    Cluster(oneshot::Receiver<ProposeResult>),
}

impl Commit {
    async fn wait(self) -> Result<Applied, StorageError> {
        match self {
            Commit::Local(pending) => pending.wait().await,
            Commit::Cluster(rx) => {
                let mut applied = rx
                    .await
                    .map_err(|_| StorageError::Closed)?
                    .map_err(cluster_error)?;
                applied
                    .pop()
                    .ok_or_else(|| StorageError::Internal("the cluster returned no result".into()))
            }
        }
    }
}

/// A cluster failure as the protocols report it.
fn cluster_error(error: ProposeError) -> StorageError {
    match error {
        ProposeError::Closed => StorageError::Closed,
        other => StorageError::Unavailable(other.to_string()),
    }
}

/// Where durable publishes are committed.
enum Log {
    Local(LocalLog),
    Cluster(ClusterNode),
}

/// A pass of expiry is followed by a pause of at least this many times its duration (see
/// [`Broker::spawn_expiry`]).
pub const EXPIRY_PAUSE_FACTOR: u32 = 4;

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct BrokerStats {
    /// Durable publishes acknowledged.
    pub durable_published: AtomicU64,
    /// Non-durable publishes delivered.
    pub transient_published: AtomicU64,
    /// Publishes answered from the dedup table.
    pub duplicates: AtomicU64,
    /// Publishes that failed in storage.
    pub failed: AtomicU64,
}

/// Routes publishes to the log or the hub and serves history.
pub struct Broker {
    hub: Arc<Hub>,
    store: Arc<Store>,
    log: Log,
    /// The namespace config in force (this node's file, or the cluster's).
    namespaces: Arc<LiveNamespaces>,
    committed: Arc<Vec<AtomicU64>>,
    delivered: Arc<Delivered>,
    /// Per partition, the highest seq this node acknowledged to a client. In a cluster a
    /// publish this node forwarded is acknowledged once the partition's leader has applied
    /// it, before this node has: reads wait for it ([`Broker::caught_up`]).
    acked: Vec<AtomicU64>,
    stats: Arc<BrokerStats>,
    connections: Arc<OnceLock<ConnectionCounter>>,
    /// When streams must end and their clients reconnect (quorum lost, history skipped).
    reconnect: Reconnect,
}

/// How long a read waits at most for this node to apply the events it acknowledged (see
/// [`Broker::caught_up`]): a follower learns of a commit with the leader's next message,
/// within milliseconds; one that stays behind longer (cut off, catching up) reads what it has
/// rather than hold the client.
pub const CAUGHT_UP_WAIT: Duration = Duration::from_secs(2);

/// How long a subscription waits at most, on a cluster node back from a restart or a silence,
/// for the node to apply the backlog its partitions' leaders had committed (see
/// [`Broker::announce`]). Past it the subscription starts anyway (the node's `/ready` has said
/// 503 all along, so a load balancer sends no one here), with a warning.
pub const CATCH_UP_PATIENCE: Duration = Duration::from_secs(10);

/// How often [`Broker::caught_up`] looks at the store again while it waits: the events it
/// waits for may arrive in a snapshot from the leader, which the delivery marks do not see.
const CAUGHT_UP_POLL: Duration = Duration::from_millis(50);

/// Counts this node's open client connections per protocol (`resp`, `sse`, `websocket`).
pub type ConnectionCounter = Box<dyn Fn() -> BTreeMap<String, u64> + Send + Sync>;

/// Whether glob `pattern` matches `channel` (Redis `PSUBSCRIBE` rules).
fn glob_matches(pattern: &[u8], channel: &[u8]) -> bool {
    Glob::new(pattern).matches(channel)
}

impl Broker {
    /// Opens the store in `dir` and starts the single-node log. Must run inside a Tokio runtime.
    pub fn open(
        hub: Arc<Hub>,
        dir: &Path,
        options: StoreOptions,
        namespaces: Namespaces,
    ) -> Result<Arc<Broker>, StorageError> {
        let store = Arc::new(Store::open(dir, options)?);
        if store.cluster_initialized() {
            return Err(StorageError::ClusterMember {
                dir: dir.to_path_buf(),
                epoch: store.epoch().to_string(),
            });
        }
        let namespaces = LiveNamespaces::new(namespaces);
        let committed = committed_marks(&store);
        let delivered = Delivered::new(&store);
        // On one node seqs reach on_commit without holes: nobody watches this.
        let skips = Arc::new(watch::channel(0u64).0);
        let on_commit = deliver_on_commit(&hub, &committed, &skips, &delivered);
        let log = Log::Local(LocalLog::start(
            store.clone(),
            namespaces.local().clone(),
            on_commit,
        )?);
        Ok(Arc::new(Broker {
            acked: acked_marks(&store),
            hub,
            store,
            log,
            namespaces,
            committed,
            delivered,
            stats: Arc::default(),
            connections: Arc::default(),
            reconnect: Reconnect::never(),
        }))
    }

    /// Opens the store in `dir` and joins (or forms) the cluster `config` describes: durable
    /// publishes then commit through the partition Raft groups. Must run inside a Tokio runtime.
    pub async fn open_cluster(
        hub: Arc<Hub>,
        dir: &Path,
        options: StoreOptions,
        namespaces: Namespaces,
        config: ClusterConfig,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> Result<Arc<Broker>, herald_cluster::node::ClusterError> {
        let store = Arc::new(Store::open(dir, options)?);
        let namespaces = LiveNamespaces::new(namespaces);
        let committed = committed_marks(&store);
        let delivered = Delivered::new(&store);
        let skips = Arc::new(watch::channel(0u64).0);
        let on_commit = deliver_on_commit(&hub, &committed, &skips, &delivered);
        let connections: Arc<OnceLock<ConnectionCounter>> = Arc::default();
        let hooks = LocalHooks {
            interest: {
                let hub = hub.clone();
                let connections = connections.clone();
                Arc::new(move || {
                    let mut interest = hub.interest();
                    if let Some(count) = connections.get() {
                        interest.connections = count();
                    }
                    interest
                })
            },
            deliver: {
                let hub = hub.clone();
                Arc::new(move |event: &TransientEvent| {
                    let mut wakes = Wakes::default();
                    match event.kind {
                        InterestKind::Channel => {
                            hub.publish_batched(&event.channel, &event.payload, &mut wakes)
                        }
                        InterestKind::Shard => {
                            hub.spublish(&event.channel, &event.payload, &mut wakes)
                        }
                    };
                })
            },
        };
        let node = ClusterNode::start(
            config,
            store.clone(),
            namespaces.clone(),
            on_commit,
            hooks,
            shutdown,
        )
        .await?;
        let reconnect =
            Reconnect::watch_cluster(node.clone(), store.clone(), committed.clone(), skips);
        Ok(Arc::new(Broker {
            acked: acked_marks(&store),
            hub,
            store,
            log: Log::Cluster(node),
            namespaces,
            committed,
            delivered,
            stats: Arc::default(),
            connections,
            reconnect,
        }))
    }

    /// The cluster node, when this node runs in a cluster.
    pub fn cluster(&self) -> Option<&ClusterNode> {
        match &self.log {
            Log::Cluster(node) => Some(node),
            Log::Local(_) => None,
        }
    }

    /// To call before a subscription to `names` is added to the hub and confirmed: in a
    /// cluster, when some of them are new to this node (its first subscriber of a channel,
    /// pattern or shard channel), reserves them and waits until every reachable member has
    /// acknowledged the interest (see [`ClusterNode::sync_interest`]), so that any publish
    /// started after the confirmation, on any node, reaches the subscriber and counts it, as
    /// in Redis. Keep the returned reservation until the subscription is in the hub. On a
    /// single node, or when this node holds every name already, returns at once.
    ///
    /// First, on a node still applying the backlog of a restart or a silence
    /// ([`ClusterNode::wait_caught_up`]), waits until it has (at most [`CATCH_UP_PATIENCE`]):
    /// the old events it applies meanwhile would otherwise reach the new subscription as live
    /// ones.
    pub async fn announce(&self, kind: Kind, names: &[Bytes]) -> Option<Reservation> {
        let Log::Cluster(node) = &self.log else {
            return None;
        };
        if let Some(behind) = node.wait_caught_up(CATCH_UP_PATIENCE).await {
            tracing::warn!(
                ?kind,
                names = names.len(),
                "a subscription starts while this node is still {behind}: it may get events published before it as live ones"
            );
        }
        let reservation = self.hub.reserve(kind, names)?;
        if !node.sync_interest().await {
            tracing::debug!(
                ?kind,
                names = names.len(),
                "a subscription is confirmed before every member acknowledged its interest"
            );
        }
        Some(reservation)
    }

    /// Why this node cannot store new events, if it cannot: a write to its store failed (a full
    /// disk), or, in a cluster, one of its Raft groups stopped (its storage failed, or its Raft
    /// task panicked or stopped). Only a restart recovers it; in a cluster the other nodes
    /// carry on.
    pub fn failure(&self) -> Option<Failure> {
        if self.store.is_broken() {
            let cause = self.store.broken_by().unwrap_or_default();
            return Some(Failure {
                storage: true,
                message: format!(
                    "storage failed: a write to the store failed ({cause}); restart the node to recover from its write-ahead log"
                ),
            });
        }
        match &self.log {
            Log::Local(_) => None,
            Log::Cluster(node) => node.failure().map(|failure| Failure {
                storage: failure.storage,
                message: format!("{failure}; restart the node (the other nodes carry on)"),
            }),
        }
    }

    /// Whether durable publishes can commit right now: always on a single node; in a cluster,
    /// once it is formed and while this node is on the majority side.
    pub fn is_ready(&self) -> bool {
        self.unready().is_none()
    }

    /// Why durable publishes cannot commit on this node right now (what `/ready` says), or
    /// `None` when they can (see [`Self::is_ready`]).
    ///
    /// Partitions that commit nowhere this node reaches (their voters down, say) do not make
    /// it unready while the others commit here ([`Self::degraded`]): it serves its clients as
    /// well as any member could.
    pub fn unready(&self) -> Option<String> {
        match &self.log {
            Log::Local(_) => None,
            Log::Cluster(node) => {
                if let Some(problem) = node.node_problem().or_else(|| node.majority_problem()) {
                    return Some(problem);
                }
                let problem = node.quorum_problem()?;
                self.reconnect.degraded().is_none().then_some(problem)
            }
        }
    }

    /// Why some partitions cannot commit, on a node that is otherwise sound and where no
    /// member it reaches commits them either (the reconnect watcher's last verdict, see
    /// `ClusterNode::availability`); `None` when every partition commits here, or the node is
    /// unready ([`Self::unready`]).
    pub fn degraded(&self) -> Option<String> {
        match &self.log {
            Log::Local(_) => None,
            Log::Cluster(node) => {
                if node.node_problem().is_some() || !node.reaches_majority() {
                    return None;
                }
                node.quorum_problem()?;
                self.reconnect.degraded()
            }
        }
    }
}

/// Why a node cannot store new events (see [`Broker::failure`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    /// Its storage failed (a write to the store, or a Raft group's log or state machine: a
    /// full disk, an I/O error); otherwise a Raft group stopped for another reason (its Raft
    /// task panicked or stopped).
    pub storage: bool,
    /// What failed and what to do: `storage failed: ...`, or `raft group N (...) stopped on
    /// this node: ...`, then `; restart the node ...`.
    pub message: String,
}

impl Failure {
    /// The status in a phrase, as `/api/realtime/stats` gives it: `storage failed` or
    /// `raft group stopped`.
    pub fn status(&self) -> &'static str {
        if self.storage {
            "storage failed"
        } else {
            "raft group stopped"
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// No acknowledgement yet, per partition.
fn acked_marks(store: &Store) -> Vec<AtomicU64> {
    (0..store.partitions()).map(|_| AtomicU64::new(0)).collect()
}

/// Each partition's committed watermark, starting from what the store holds.
fn committed_marks(store: &Store) -> Arc<Vec<AtomicU64>> {
    Arc::new(
        (0..store.partitions())
            .map(|p| AtomicU64::new(store.latest_seq(p)))
            .collect(),
    )
}

/// Each partition's highest sequence number handed to local subscribers, and a wake-up for
/// publishers waiting on it.
///
/// On one node a durable publish is acknowledged only once its event is in the local
/// subscribers' queues, as Redis does: a client that sees `PUBLISH` return and then talks to a
/// subscriber on the same server finds the message already there.
struct Delivered {
    marks: Vec<AtomicU64>,
    changed: Notify,
}

impl Delivered {
    fn new(store: &Store) -> Arc<Delivered> {
        Arc::new(Delivered {
            marks: (0..store.partitions())
                .map(|p| AtomicU64::new(store.latest_seq(p)))
                .collect(),
            changed: Notify::new(),
        })
    }

    /// Records that `events` reached the hub and wakes the waiting publishers.
    fn advance(&self, events: &[Event]) {
        for event in events {
            self.marks[event.position.partition as usize]
                .fetch_max(event.position.seq, Ordering::SeqCst);
        }
        self.changed.notify_waiters();
    }

    /// Waits until the event at `position` has reached the hub.
    async fn wait_for(&self, position: Position) {
        let mark = &self.marks[position.partition as usize];
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if mark.load(Ordering::SeqCst) >= position.seq {
                return;
            }
            changed.await;
        }
    }
}

/// The longest message id a publish may carry. Ids are kept (with their channel) in the dedup
/// table for the whole dedup window, so an unbounded one costs every node memory and disk for
/// nothing a UUID or a hash would not do; the RESP and HTTP publish commands refuse longer
/// ones.
pub const MAX_MESSAGE_ID_BYTES: usize = 1024;

/// The longest channel name herald's own interfaces take: an SSE stream, a WebSocket
/// subscription, `HSUBSCRIBE`, and a publish over HTTP or `HPUBLISH`, or a `PUBLISH` to a
/// durable namespace (whose history only those streams can read). Every name a node's clients
/// hold is sent to the other nodes of a cluster (interest) and kept per stream, and a durable
/// event's channel is stored with it. Redis's own `SUBSCRIBE`, `PSUBSCRIBE`, `SPUBLISH` and
/// non-durable `PUBLISH` take any name, as in Redis.
pub const MAX_CHANNEL_NAME_BYTES: usize = 1024;

/// Why a publish to `channel` is refused for its name, if it is: empty, or longer than
/// [`MAX_CHANNEL_NAME_BYTES`]. No stream (SSE, WebSocket, `HSUBSCRIBE`) takes such a name, so
/// nothing published under it could be read.
pub fn check_publish_channel(channel: &[u8]) -> Result<(), String> {
    if channel.is_empty() {
        return Err("empty channel name".to_string());
    }
    if channel.len() > MAX_CHANNEL_NAME_BYTES {
        return Err(format!(
            "channel name of {} bytes: the limit is {MAX_CHANNEL_NAME_BYTES}",
            channel.len()
        ));
    }
    Ok(())
}

/// Committed batches that may wait for the delivery thread before commits wait for it.
const DELIVERY_QUEUE: usize = 1024;

/// A committed batch whose delivery costs at most this much work (events, patterns matched,
/// receivers: [`Hub::fan_out_at_most`]) is delivered on the commit path when the delivery
/// thread has nothing queued: handing it over would cost two thread wake-ups (the delivery
/// thread's, then the publisher's, which waits for its event's delivery), more than the
/// fan-out itself.
const INLINE_FAN_OUT: usize = 256;

/// What the log calls with committed events: raise the watermarks, then queue the events for
/// the delivery thread, which fans them out to local subscribers in commit order.
///
/// Fan-out to many subscribers takes time (one event to 20,000 streams is tens of
/// milliseconds); done on the commit path it would hold back the next commit and every
/// publisher's acknowledgement. Handing it to one thread keeps the order and frees the commit
/// path; the bounded queue makes a fan-out that cannot keep up slow commits down instead of
/// growing memory. The hand-over from history to live stays exact: a stream compares each live
/// event with the watermark it read after subscribing, and the watermark is raised here, before
/// the event is queued.
///
/// An event whose seq is not the one after its partition's last means the events in between
/// never came through here (a snapshot install moved the partition past them): open streams
/// missed them. `skips` is raised then, BEFORE the event goes to the hub, so every open stream
/// is told to reconnect before it could send anything past the hole (see [`crate::reconnect`]).
///
/// Small fan-outs ([`INLINE_FAN_OUT`]) are delivered on the commit path itself when nothing
/// waits for the delivery thread: every batch handed to it earlier is delivered by then, so
/// the order holds.
fn deliver_on_commit(
    hub: &Arc<Hub>,
    committed: &Arc<Vec<AtomicU64>>,
    skips: &Arc<watch::Sender<u64>>,
    delivered: &Arc<Delivered>,
) -> OnCommit {
    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<Event>>(DELIVERY_QUEUE);
    // Batches handed to the delivery thread and not yet delivered.
    let in_flight = Arc::new(AtomicUsize::new(0));
    let delivery_hub = hub.clone();
    let thread_delivered = delivered.clone();
    let thread_in_flight = in_flight.clone();
    let spawned = std::thread::Builder::new()
        .name("herald-deliver".into())
        .spawn(move || {
            // Ends when every sender (the log's or state machines' `on_commit`) is dropped.
            while let Ok(events) = rx.recv() {
                let mut wakes = Wakes::default();
                delivery_hub.deliver_events(&events, &mut wakes);
                wakes.wake_all();
                thread_delivered.advance(&events);
                thread_in_flight.fetch_sub(1, Ordering::AcqRel);
            }
        });
    let tx = match spawned {
        Ok(_) => Some(tx),
        Err(error) => {
            tracing::error!(%error, "cannot start the delivery thread; delivering on the commit path");
            None
        }
    };
    let hub = hub.clone();
    let committed = committed.clone();
    let skips = skips.clone();
    let delivered = delivered.clone();
    Arc::new(move |events: &[Event]| {
        for event in events {
            let (partition, seq) = (event.position.partition, event.position.seq);
            let before = committed[usize::from(partition)].fetch_max(seq, Ordering::SeqCst);
            if seq > before.saturating_add(1) {
                // What catching up from a snapshot does (a node just joined, or one too far
                // behind for the log): no fault, so not a WARN (a healthy join logs none).
                tracing::info!(
                    partition,
                    after = before,
                    next = seq,
                    "live delivery skipped events (caught up from a snapshot): streams resume from their cursors"
                );
                skips.send_modify(|n| *n += 1);
            }
        }
        // Calls for one partition never overlap (its log or state machine makes them in
        // commit order), so seeing nothing in flight means its earlier batches are delivered.
        let inline =
            in_flight.load(Ordering::Acquire) == 0 && hub.fan_out_at_most(events, INLINE_FAN_OUT);
        let queued = !inline
            && tx.as_ref().is_some_and(|tx| {
                in_flight.fetch_add(1, Ordering::AcqRel);
                let sent = tx.send(events.to_vec()).is_ok();
                if !sent {
                    in_flight.fetch_sub(1, Ordering::AcqRel);
                }
                sent
            });
        if !queued {
            let mut wakes = Wakes::default();
            hub.deliver_events(events, &mut wakes);
            wakes.wake_all();
            delivered.advance(events);
        }
    })
}

impl Broker {
    /// The local hub.
    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    /// The history store.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// The namespace configuration in force: the cluster's once its meta group holds one,
    /// else this node's file's.
    pub fn namespaces(&self) -> Arc<Namespaces> {
        self.namespaces.current()
    }

    /// The epoch cursors must carry.
    pub fn epoch(&self) -> Epoch {
        self.store.epoch()
    }

    /// Counters.
    pub fn stats(&self) -> &BrokerStats {
        &self.stats
    }

    /// What a stream watches to learn that its client must reconnect (see [`crate::reconnect`]).
    /// Take it when the stream starts, before reading history.
    pub fn reconnect_watch(&self) -> ReconnectWatch {
        self.reconnect.watch()
    }

    /// Whether publishes to `channel` are durable (and kept in history).
    pub fn is_durable(&self, channel: &[u8]) -> bool {
        self.namespaces.with(|ns| ns.for_channel(channel).durable)
    }

    /// The partition of `channel`.
    pub fn partition_of(&self, channel: &[u8]) -> Partition {
        self.store.partition_of(channel)
    }

    /// The highest sequence number of `partition` that is flushed and delivered to the hub.
    ///
    /// In a cluster, apply runs only on committed entries, so what the store holds is the
    /// watermark (this also covers a partition that jumped ahead by a snapshot install).
    pub fn committed_seq(&self, partition: Partition) -> u64 {
        match &self.log {
            Log::Local(_) => self.committed[partition as usize].load(Ordering::SeqCst),
            Log::Cluster(_) => self.store.latest_seq(partition),
        }
    }

    /// Accepts a publish: a durable one is queued in the log (waiting only if the log's queue
    /// is full), a non-durable one is delivered at once, its receivers woken via `wakes`.
    pub async fn enqueue(
        &self,
        channel: Bytes,
        payload: Bytes,
        message_id: Option<Bytes>,
        wakes: &mut Wakes,
    ) -> Result<Ticket, StorageError> {
        if !self.is_durable(&channel) {
            let receivers = self.hub.publish_batched(&channel, &payload, wakes)
                + self.send_to_peers(InterestKind::Channel, &channel, &payload);
            self.stats
                .transient_published
                .fetch_add(1, Ordering::Relaxed);
            return Ok(Ticket::Done(Published {
                position: None,
                duplicate: false,
                receivers,
            }));
        }
        let publish = Publish {
            channel: channel.clone(),
            payload,
            message_id,
        };
        let since = Instant::now();
        let pending = match &self.log {
            Log::Local(log) => Commit::Local(log.enqueue(publish).await?),
            Log::Cluster(node) => {
                let partition = self.store.partition_of(&channel);
                Commit::Cluster(
                    node.enqueue(partition, vec![publish])
                        .await
                        .map_err(cluster_error)?,
                )
            }
        };
        Ok(Ticket::Queued {
            pending,
            channel,
            since,
        })
    }

    /// [`Broker::enqueue`] for several publishes, in order, a ticket (or the error that
    /// refused it) each. On a single node the durable ones are ONE request to the log, so they
    /// share a batch and its sync, as Redis's AOF covers every command of one read with one
    /// `fsync`; queued one by one, the log would commit the first alone while the others arrive.
    pub async fn enqueue_many(
        &self,
        publishes: Vec<Publish>,
        wakes: &mut Wakes,
    ) -> Vec<Result<Ticket, StorageError>> {
        let mut tickets: Vec<Option<Result<Ticket, StorageError>>> = Vec::new();
        let mut durable = Vec::new();
        for publish in publishes {
            if matches!(self.log, Log::Local(_)) && self.is_durable(&publish.channel) {
                durable.push((tickets.len(), publish));
                tickets.push(None);
            } else {
                let Publish {
                    channel,
                    payload,
                    message_id,
                } = publish;
                tickets.push(Some(
                    self.enqueue(channel, payload, message_id, wakes).await,
                ));
            }
        }
        if let (Log::Local(log), false) = (&self.log, durable.is_empty()) {
            let (slots, publishes): (Vec<usize>, Vec<Publish>) = durable.into_iter().unzip();
            let channels: Vec<Bytes> = publishes.iter().map(|p| p.channel.clone()).collect();
            let since = Instant::now();
            match log.enqueue_many(publishes).await {
                Ok(pending) => {
                    for ((slot, pending), channel) in slots.into_iter().zip(pending).zip(channels) {
                        tickets[slot] = Some(Ok(Ticket::Queued {
                            pending: Commit::Local(pending),
                            channel,
                            since,
                        }));
                    }
                }
                Err(error) => {
                    for slot in slots {
                        tickets[slot] = Some(Err(error.clone()));
                    }
                }
            }
        }
        tickets
            .into_iter()
            .map(|t| t.expect("every publish has its ticket"))
            .collect()
    }

    /// Sends a non-durable event to the peers with interest in it; returns their receivers.
    fn send_to_peers(&self, kind: InterestKind, channel: &Bytes, payload: &Bytes) -> usize {
        let Log::Cluster(node) = &self.log else {
            return 0;
        };
        let table = node.interest();
        let mut receivers = 0;
        for (peer, n) in table.interested(kind, channel, &glob_matches) {
            receivers += n;
            table.send(
                peer,
                TransientEvent {
                    kind,
                    channel: channel.clone(),
                    payload: payload.clone(),
                },
            );
        }
        receivers
    }

    /// Subscribers of `channel` on other nodes (0 on a single node).
    fn remote_receivers(&self, channel: &[u8]) -> usize {
        match &self.log {
            Log::Cluster(node) => node
                .interest()
                .interested(InterestKind::Channel, channel, &glob_matches)
                .iter()
                .map(|(_, n)| n)
                .sum(),
            Log::Local(_) => 0,
        }
    }

    /// `SPUBLISH`: shard channels are never durable; delivered here and to interested peers.
    pub fn spublish(&self, channel: &Bytes, payload: &Bytes, wakes: &mut Wakes) -> usize {
        self.hub.spublish(channel, payload, wakes)
            + self.send_to_peers(InterestKind::Shard, channel, payload)
    }

    /// Lets the cluster report this node's connection counts (set once by the HTTP layer).
    pub fn set_connection_counter(&self, counter: ConnectionCounter) {
        let _ = self.connections.set(counter);
    }

    /// Channels (or shard channels) with subscribers anywhere in the cluster, optionally
    /// filtered by a glob (`PUBSUB CHANNELS`).
    pub fn active_names(&self, kind: Kind, filter: Option<&Glob>) -> Vec<Bytes> {
        let mut names: BTreeSet<Bytes> = self.hub.active_names(kind, filter).into_iter().collect();
        if let Log::Cluster(node) = &self.log {
            node.interest().for_each(|_, interest| {
                let map = match kind {
                    Kind::Shard => &interest.shards,
                    Kind::Pattern => &interest.patterns,
                    Kind::Channel => &interest.channels,
                };
                names.extend(
                    map.keys()
                        .filter(|n| filter.is_none_or(|g| g.matches(n)))
                        .cloned(),
                );
                None::<()>
            });
        }
        names.into_iter().collect()
    }

    /// Channel subscriptions anywhere in the cluster (this node's alone when single): the
    /// stats' `totalSubscriptions`, counted like `activeChannels`.
    pub fn total_channel_subscriptions(&self) -> usize {
        let (_, mut total) = self.hub.channel_totals();
        if let Log::Cluster(node) = &self.log {
            node.interest().for_each(|_, interest| {
                total += interest
                    .channels
                    .values()
                    .map(|&n| n as usize)
                    .sum::<usize>();
                None::<()>
            });
        }
        total
    }

    /// Subscribers of each name anywhere in the cluster (`PUBSUB NUMSUB`).
    pub fn subscriber_counts(&self, kind: Kind, names: &[Bytes]) -> Vec<usize> {
        let mut counts = self.hub.subscriber_counts(kind, names);
        if let Log::Cluster(node) = &self.log {
            node.interest().for_each(|_, interest| {
                let map = match kind {
                    Kind::Shard => &interest.shards,
                    _ => &interest.channels,
                };
                for (count, name) in counts.iter_mut().zip(names) {
                    *count += map.get(name).copied().unwrap_or(0) as usize;
                }
                None::<()>
            });
        }
        counts
    }

    /// Distinct patterns subscribed anywhere in the cluster (`PUBSUB NUMPAT`).
    pub fn pattern_count(&self) -> usize {
        match &self.log {
            Log::Local(_) => self.hub.pattern_count(),
            Log::Cluster(_) => self.active_names(Kind::Pattern, None).len(),
        }
    }

    /// Open connections per protocol summed over the cluster's nodes (this one included), and
    /// the number of nodes counted; `None` on a single node.
    pub fn cluster_connections(&self) -> Option<(usize, BTreeMap<String, u64>)> {
        let Log::Cluster(node) = &self.log else {
            return None;
        };
        let mut totals = self.connections.get().map(|c| c()).unwrap_or_default();
        let mut nodes = 1;
        node.interest().for_each(|_, interest| {
            nodes += 1;
            for (protocol, n) in &interest.connections {
                *totals.entry(protocol.clone()).or_default() += n;
            }
            None::<()>
        });
        Some((nodes, totals))
    }

    /// Publishes and waits for the acknowledgement.
    pub async fn publish(
        &self,
        channel: Bytes,
        payload: Bytes,
        message_id: Option<Bytes>,
    ) -> Result<Published, StorageError> {
        let ticket = self
            .enqueue(channel, payload, message_id, &mut Wakes::default())
            .await?;
        self.wait(ticket).await
    }

    /// Waits for a ticket's acknowledgement.
    pub async fn wait(&self, ticket: Ticket) -> Result<Published, StorageError> {
        match ticket {
            Ticket::Done(published) => Ok(published),
            Ticket::Queued {
                pending,
                channel,
                since,
            } => {
                let applied = pending.wait().await;
                let applied = match applied {
                    Ok(applied) => applied,
                    Err(error) => {
                        self.stats.failed.fetch_add(1, Ordering::Relaxed);
                        return Err(error);
                    }
                };
                metrics::histogram!("herald_publish_commit_seconds")
                    .record(since.elapsed().as_secs_f64());
                if let (Log::Local(_), Applied::New(event)) = (&self.log, &applied) {
                    self.delivered.wait_for(event.position).await;
                }
                let position = match &applied {
                    Applied::New(event) => event.position,
                    Applied::Duplicate(position) => *position,
                };
                // Read only by `caught_up`, which a single node skips (it answers after
                // applying).
                if let (Log::Cluster(_), Some(mark)) =
                    (&self.log, self.acked.get(usize::from(position.partition)))
                {
                    mark.fetch_max(position.seq, Ordering::Relaxed);
                }
                Ok(match applied {
                    Applied::New(event) => {
                        self.stats.durable_published.fetch_add(1, Ordering::Relaxed);
                        Published {
                            position: Some(event.position),
                            duplicate: false,
                            receivers: self.hub.receiver_count(&channel)
                                + self.remote_receivers(&channel),
                        }
                    }
                    Applied::Duplicate(position) => {
                        self.stats.duplicates.fetch_add(1, Ordering::Relaxed);
                        // Nothing was delivered this time (the original was, when it committed).
                        Published {
                            position: Some(position),
                            duplicate: true,
                            receivers: 0,
                        }
                    }
                })
            }
        }
    }

    /// Waits until this node has applied every event it acknowledged in `partitions` (at most
    /// [`CAUGHT_UP_WAIT`]), so that a read after an acknowledged publish on this node sees it:
    /// a client that publishes and then reads history or resumes a stream here gets its own
    /// event. Returns at once on a single node and on a partition's leader, which answer only
    /// after applying; a forwarding follower applies on the leader's next message. `false`:
    /// still behind at the deadline (cut off, catching up, its store refused by the members):
    /// a one-off read then says so rather than answer without the client's own event; a
    /// stream goes on (the event comes when applied, or the stream is sent elsewhere).
    pub async fn caught_up(&self, partitions: impl IntoIterator<Item = Partition>) -> bool {
        if matches!(self.log, Log::Local(_)) {
            return true;
        }
        let deadline = tokio::time::Instant::now() + CAUGHT_UP_WAIT;
        for partition in partitions {
            let Some(mark) = self.acked.get(usize::from(partition)) else {
                continue;
            };
            let target = mark.load(Ordering::Relaxed);
            // A snapshot installed from the leader moves the store but not the delivered
            // marks, so the store is looked at again every `CAUGHT_UP_POLL`.
            while self.store.latest_seq(partition) < target {
                let now = tokio::time::Instant::now();
                if now >= deadline {
                    return false;
                }
                let applied = self.delivered.wait_for(Position::new(partition, target));
                let until = deadline.min(now + CAUGHT_UP_POLL);
                if tokio::time::timeout_at(until, applied).await.is_ok() {
                    break;
                }
            }
        }
        true
    }

    /// Commits what is queued and stops accepting durable publishes (shutdown).
    pub async fn close(&self) {
        match &self.log {
            Log::Local(log) => log.close().await,
            Log::Cluster(node) => node.shutdown().await,
        }
        if let Err(error) = self.store.flush().await {
            tracing::error!(%error, "final flush of the store failed");
        }
    }

    /// Deletes expired history and dedup records every `every`, until `shutdown`. A pass
    /// visits every channel with history, so with very many channels (a million per-job
    /// channels under a day's TTL) it takes seconds of CPU: the next pass then starts
    /// [`EXPIRY_PAUSE_FACTOR`] times the last one's duration after it ended, if that is
    /// longer than `every`, so that expiry takes at most a fifth of a core. Reads never
    /// return an expired event meanwhile (they check each event's deadline), so only the
    /// disk space is freed later.
    pub fn spawn_expiry(
        self: &Arc<Self>,
        every: Duration,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        let broker = self.clone();
        tokio::spawn(async move {
            let mut pause = every;
            loop {
                tokio::select! {
                    () = tokio::time::sleep(pause) => {}
                    () = shutdown.cancelled() => return,
                }
                let worker = broker.clone();
                let started = tokio::time::Instant::now();
                let result = tokio::task::spawn_blocking(move || {
                    worker
                        .store
                        .expire(&worker.namespaces.current(), worker.store.now_ms())
                })
                .await;
                pause = every
                    .saturating_sub(started.elapsed())
                    .max(started.elapsed() * EXPIRY_PAUSE_FACTOR);
                match result {
                    Ok(Ok(0)) => {}
                    Ok(Ok(removed)) => {
                        tracing::debug!(removed, "expired history and dedup records")
                    }
                    Ok(Err(error)) => tracing::warn!(%error, "expiring history failed"),
                    Err(error) => tracing::warn!(%error, "the expiry task failed"),
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::outbox::Outbox;
    use crate::hub::{Format, Subscriber};
    use crate::resp::frame::Protocol;

    fn event(channel: &'static str, partition: u16, seq: u64) -> Event {
        Event {
            position: Position { partition, seq },
            channel: Bytes::from_static(channel.as_bytes()),
            payload: Bytes::from(seq.to_string()),
            message_id: None,
            timestamp_ms: 0,
        }
    }

    /// A small commit is delivered on the commit path only when the delivery thread has
    /// nothing left: a subscriber of a wide channel and a narrow one sees commit order.
    #[tokio::test]
    async fn a_small_commit_waits_for_a_wide_fan_out_in_progress() {
        let hub = Arc::new(Hub::default());
        let subscribe = |id, channels: &[&'static str]| {
            let subscriber = Arc::new(Subscriber::new(
                id,
                Arc::new(Outbox::new()),
                Format::resp(Protocol::Resp2),
            ));
            let names: Vec<Bytes> = channels
                .iter()
                .map(|c| Bytes::from_static(c.as_bytes()))
                .collect();
            let replies = names.iter().map(|_| Bytes::new()).collect();
            hub.subscribe(Kind::Channel, &subscriber, &names, replies);
            subscriber
        };
        let watcher = subscribe(0, &["wide", "narrow"]);
        let _crowd: Vec<_> = (1..=100).map(|id| subscribe(id, &["wide"])).collect();
        let committed = Arc::new((0..2).map(|_| AtomicU64::new(0)).collect::<Vec<_>>());
        let delivered = Arc::new(Delivered {
            marks: (0..2).map(|_| AtomicU64::new(0)).collect(),
            changed: Notify::new(),
        });
        let skips = Arc::new(watch::channel(0).0);
        let on_commit = deliver_on_commit(&hub, &committed, &skips, &delivered);

        let wide: Vec<Event> = (1..=2_000).map(|seq| event("wide", 0, seq)).collect();
        on_commit(&wide);
        on_commit(&[event("narrow", 1, 1)]);
        tokio::time::timeout(Duration::from_secs(30), async {
            delivered
                .wait_for(Position {
                    partition: 0,
                    seq: 2_000,
                })
                .await;
            delivered
                .wait_for(Position {
                    partition: 1,
                    seq: 1,
                })
                .await;
        })
        .await
        .unwrap();

        let mut out = bytes::BytesMut::new();
        watcher.outbox().next_batch(&mut out, usize::MAX).await;
        let text = String::from_utf8(out.to_vec()).unwrap();
        let channels: Vec<&str> = text
            .split("\r\n")
            .filter(|line| *line == "wide" || *line == "narrow")
            .collect();
        assert_eq!(channels.len(), 2_001);
        assert_eq!(
            channels.last(),
            Some(&"narrow"),
            "the narrow event overtook the wide ones"
        );
    }
}
