//! Interest exchange: which channels and patterns each node's clients hold.
//!
//! Every node pushes its [`Interest`] to the other members when it changes (checked every
//! 300 ms) and at least every 3 s; entries not refreshed for 10 s are dropped, so a dead node's
//! subscribers stop counting. A subscription that adds interest does not wait for the next
//! check: the gateway asks for a push at once ([`InterestSync`]) and confirms the subscription
//! only once every reachable member has acknowledged it, so that a publish started anywhere
//! after the confirmation reaches the subscriber and counts it. The table answers `PUBSUB CHANNELS / NUMSUB / NUMPAT` and the stats
//! for the whole cluster, and tells a non-durable publish which peers to send the event to:
//! only nodes with interest in its channel get it, and members whose interest this node does
//! not know yet (it has just started): they may have subscribers. A peer that connects is sent
//! this node's interest at once, so that a restarted node learns everyone's within a round trip.
//!
//! Non-durable events travel through a bounded queue per peer, drained in batches of up to
//! 1,000 events per RPC. A full queue drops (non-durable means at most once); [`RelayCounts`]
//! counts what was queued, acknowledged, dropped, lost with a failed call and received.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use herald_storage::raft::NodeId;
use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, mpsc, watch};

use crate::message::{AppRequest, encode};
use crate::rpc::{Peers, Request};

/// How long a node's pushed interest stays valid without a refresh.
pub const INTEREST_TTL: Duration = Duration::from_secs(10);
/// How long a subscription's confirmation waits at most for the other members to acknowledge
/// the interest it adds: a member that does not answer must not hold subscribes up for long
/// (an unreachable one fails at once; this bounds a slow or silently dead one).
pub const INTEREST_SYNC_LIMIT: Duration = Duration::from_secs(1);
/// How long a push waits for a member that did not answer the previous one (within
/// [`INTEREST_SYNC_LIMIT`], or at all): a node killed without a goodbye is found unreachable
/// only at its connection's idle timeout (seconds), and until then every subscription that
/// adds interest would wait the whole limit for it. It is still sent every push, and waited
/// for in full again once it answers.
pub const INTEREST_SILENT_PEER_WAIT: Duration = Duration::from_millis(50);
/// A push stops waiting for a member that has left every call unanswered this long
/// ([`Peers::unanswered_for`]), before [`INTEREST_SYNC_LIMIT`]: the clients of a node that
/// just died reconnect to the others at once, and their subscribes would otherwise wait the
/// whole limit for the dead node on the first push after its death. A live member answers
/// within its round trip, and Raft heartbeats (every 75 ms) keep showing that it does, so
/// this only cuts the wait for one that stopped answering everyone; it is above the leader
/// lease (350 ms) that herald's failover already counts as a member's silence.
pub const INTEREST_PEER_SILENCE: Duration = Duration::from_millis(400);
/// The least time between the starts of two pushes when subscribes asked for the second while
/// the first was under way: in a reconnect storm of clients on distinct channels, each push
/// (the node's whole interest) then serves every subscribe that arrived meanwhile, instead of
/// pushes going out back to back for as long as the storm lasts.
pub const INTEREST_PUSH_SPACING: Duration = Duration::from_millis(20);
/// Events that may wait for one peer before new ones are dropped.
const TRANSIENT_QUEUE: usize = 16_384;
/// Events per transient RPC.
const TRANSIENT_BATCH: usize = 1_000;

/// The subscription kinds that travel between nodes (as in the hub).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum InterestKind {
    /// `SUBSCRIBE` channels (and SSE / WebSocket streams).
    Channel,
    /// `SSUBSCRIBE` shard channels.
    Shard,
}

/// What one node's clients are subscribed to, with subscriber counts.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interest {
    /// Channel -> subscribers.
    pub channels: BTreeMap<Bytes, u32>,
    /// Pattern -> subscribers.
    pub patterns: BTreeMap<Bytes, u32>,
    /// Shard channel -> subscribers.
    pub shards: BTreeMap<Bytes, u32>,
    /// Open client connections per protocol (`resp`, `sse`, `websocket`).
    pub connections: BTreeMap<String, u64>,
}

/// One non-durable event on its way to a peer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TransientEvent {
    /// Channel or shard channel.
    pub kind: InterestKind,
    /// Its name.
    pub channel: Bytes,
    /// The payload.
    pub payload: Bytes,
}

/// The other nodes' interest, and the queues that carry non-durable events to them.
pub struct InterestTable {
    id: NodeId,
    peers: Arc<Peers>,
    remote: RwLock<HashMap<NodeId, (Interest, Instant)>>,
    /// The other members, as the last push went to them (see [`InterestTable::set_members`]).
    members: RwLock<Vec<NodeId>>,
    queues: Mutex<HashMap<NodeId, mpsc::Sender<TransientEvent>>>,
    /// What became of non-durable events on their way between nodes.
    pub relayed: Arc<RelayCounts>,
}

/// Counts of non-durable events between nodes, for `/metrics`: an operator sees how much
/// traffic interest saves or costs, and every event a peer did not get.
#[derive(Debug, Default)]
pub struct RelayCounts {
    /// Events queued for a peer with interest (one per peer the event goes to).
    pub queued: AtomicU64,
    /// Events a peer acknowledged.
    pub sent: AtomicU64,
    /// Events dropped because the peer's queue was full (it takes them slower than they come).
    pub dropped: AtomicU64,
    /// Events whose call to the peer failed (unreachable, timed out): the peer may not have
    /// them.
    pub failed: AtomicU64,
    /// Events received from peers for this node's subscribers.
    pub received: AtomicU64,
}

impl std::fmt::Debug for InterestTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InterestTable")
            .field("nodes", &self.remote.read().len())
            .finish_non_exhaustive()
    }
}

impl InterestTable {
    /// An empty table for node `id`.
    pub fn new(id: NodeId, peers: Arc<Peers>) -> Arc<InterestTable> {
        Arc::new(InterestTable {
            id,
            peers,
            remote: RwLock::default(),
            members: RwLock::default(),
            queues: Mutex::default(),
            relayed: Arc::default(),
        })
    }

    /// Records `node`'s pushed interest.
    pub fn update(&self, node: NodeId, interest: Interest) {
        if node != self.id {
            self.remote.write().insert(node, (interest, Instant::now()));
        }
    }

    /// Forgets `node` (it left the cluster).
    pub fn forget(&self, node: NodeId) {
        self.remote.write().remove(&node);
        self.queues.lock().remove(&node);
    }

    /// Calls `f` with every other node's current interest: pushed within [`INTEREST_TTL`], by a
    /// node this one can still reach (a node that died stops counting as soon as its connection
    /// is found dead, not 10 s later: PUBSUB NUMSUB and receiver counts drop its subscribers).
    pub fn for_each<T>(&self, f: impl FnMut(NodeId, &Interest) -> Option<T>) -> Vec<T> {
        self.each_current(&self.remote.read(), f)
    }

    /// [`Self::for_each`] over `remote`, the table as read under a lock the caller holds.
    fn each_current<T>(
        &self,
        remote: &HashMap<NodeId, (Interest, Instant)>,
        mut f: impl FnMut(NodeId, &Interest) -> Option<T>,
    ) -> Vec<T> {
        let now = Instant::now();
        remote
            .iter()
            .filter(|(id, (_, at))| {
                now.saturating_duration_since(*at) < INTEREST_TTL
                    && !self.peers.is_unreachable(**id)
            })
            .filter_map(|(id, (interest, _))| f(*id, interest))
            .collect()
    }

    /// Records the other members (those the interest loop pushes to), so that a member whose
    /// interest this node does not know is not taken for one without subscribers.
    pub fn set_members(&self, members: impl IntoIterator<Item = NodeId>) {
        let members: Vec<NodeId> = members.into_iter().filter(|id| *id != self.id).collect();
        if *self.members.read() != members {
            *self.members.write() = members;
        }
    }

    /// Peers with interest in `channel` (exact subscribers, or for channels a pattern that
    /// `matches(pattern, channel)`), with how many subscribers each has for it; and, with 0
    /// subscribers counted, every reachable member whose interest this node has never
    /// received. A node that has just started knows no one's interest until the others push
    /// theirs (at once when it connects, and every 3 s): its non-durable publishes meanwhile
    /// went to no other node, and their subscribers missed them. Sent to such a member, an
    /// event reaches its subscribers if it has any; only the count undercounts. (A member
    /// whose pushes stopped coming is not sent everything: its last interest expires.)
    pub fn interested(
        &self,
        kind: InterestKind,
        channel: &[u8],
        matches: &dyn Fn(&[u8], &[u8]) -> bool,
    ) -> Vec<(NodeId, usize)> {
        // One read of the table for both: a member's first push landing between two reads
        // would count it neither as known nor as unknown.
        let remote = self.remote.read();
        let mut interested = self.each_current(&remote, |id, interest| {
            let n = match kind {
                InterestKind::Shard => interest.shards.get(channel).copied().unwrap_or(0) as usize,
                InterestKind::Channel => {
                    interest.channels.get(channel).copied().unwrap_or(0) as usize
                        + interest
                            .patterns
                            .iter()
                            .filter(|(p, _)| matches(p, channel))
                            .map(|(_, n)| *n as usize)
                            .sum::<usize>()
                }
            };
            (n > 0).then_some((id, n))
        });
        interested.extend(
            self.members
                .read()
                .iter()
                .filter(|id| !remote.contains_key(id) && !self.peers.is_unreachable(**id))
                .map(|id| (*id, 0)),
        );
        interested
    }

    /// Queues a non-durable event for `peer`; drops it (and counts) when the queue is full.
    pub fn send(&self, peer: NodeId, event: TransientEvent) {
        let sender = {
            let mut queues = self.queues.lock();
            queues
                .entry(peer)
                .or_insert_with(|| {
                    let (tx, rx) = mpsc::channel(TRANSIENT_QUEUE);
                    tokio::spawn(drain(self.peers.clone(), peer, rx, self.relayed.clone()));
                    tx
                })
                .clone()
        };
        let counter = match sender.try_send(event) {
            Ok(()) => &self.relayed.queued,
            Err(_) => &self.relayed.dropped,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Pushes asked for now (by a subscription that adds interest) rather than at the next
/// periodic check, and the wait for them.
///
/// Pushes are numbered as they start. A waiter needs the first push that starts after it
/// asked: that push reads this node's interest after the caller registered its subscription
/// (or reserved it, see the gateway's hub), so once every reachable member has acknowledged
/// it, they all know. Waiters that arrive while a push is being prepared or sent share the
/// next one.
#[derive(Debug)]
pub struct InterestSync {
    wake: Notify,
    /// Number of the last push started.
    started: AtomicU64,
    /// Highest push number a waiter needs.
    wanted: AtomicU64,
    /// Number of the last push completed (every call answered, failed or timed out).
    done: watch::Sender<u64>,
    /// Pushes asked for by waiters (counted when the wait starts).
    pub requests: AtomicU64,
    /// Waits that gave up at [`INTEREST_SYNC_LIMIT`].
    pub timeouts: AtomicU64,
    /// Pushes sent (periodic or asked for).
    pub pushes: AtomicU64,
}

impl Default for InterestSync {
    fn default() -> Self {
        InterestSync {
            wake: Notify::new(),
            started: AtomicU64::new(0),
            wanted: AtomicU64::new(0),
            done: watch::Sender::new(0),
            requests: AtomicU64::new(0),
            timeouts: AtomicU64::new(0),
            pushes: AtomicU64::new(0),
        }
    }
}

impl InterestSync {
    /// Asks for a push and waits until one that started after this call has completed, at
    /// most `limit`. Returns whether it did (false: timed out).
    pub async fn wait(&self, limit: Duration) -> bool {
        let mut done = self.done.subscribe();
        // SeqCst: the caller's subscription (made before this call) is seen by whatever push
        // takes a number above the one read here.
        let target = self.started.load(Ordering::SeqCst) + 1;
        self.wanted.fetch_max(target, Ordering::SeqCst);
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.wake.notify_one();
        let reached = tokio::time::timeout(limit, done.wait_for(|n| *n >= target)).await;
        let ok = matches!(reached, Ok(Ok(_)));
        if !ok {
            self.timeouts.fetch_add(1, Ordering::Relaxed);
        }
        ok
    }

    /// Resolves when a waiter asked for a push (may be spurious: check [`Self::wanted`]).
    pub async fn asked(&self) {
        self.wake.notified().await;
    }

    /// Whether a waiter needs a push that has not completed yet.
    pub fn wanted(&self) -> bool {
        self.wanted.load(Ordering::SeqCst) > *self.done.borrow()
    }

    /// Numbers a push that is about to read the interest.
    pub fn begin(&self) -> u64 {
        self.started.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Push `n` completed (pushes complete in order); its waiters go on.
    pub fn finish(&self, n: u64) {
        self.done.send_if_modified(|done| {
            let advanced = n > *done;
            *done = (*done).max(n);
            advanced
        });
    }

    /// No push comes any more (the node is shutting down): nobody waits.
    pub fn close(&self) {
        self.finish(u64::MAX);
    }
}

/// Sends one peer's queued events, up to [`TRANSIENT_BATCH`] per RPC.
async fn drain(
    peers: Arc<Peers>,
    peer: NodeId,
    mut rx: mpsc::Receiver<TransientEvent>,
    counts: Arc<RelayCounts>,
) {
    let mut batch = Vec::with_capacity(64);
    while rx.recv_many(&mut batch, TRANSIENT_BATCH).await > 0 {
        let events = batch.len() as u64;
        let request = Request::App(encode(&AppRequest::Transient {
            events: std::mem::take(&mut batch),
        }));
        match peers.call(peer, &request, Duration::from_secs(2)).await {
            Ok(_) => counts.sent.fetch_add(events, Ordering::Relaxed),
            Err(error) => {
                tracing::debug!(peer, %error, events, "non-durable events to a peer were lost");
                counts.failed.fetch_add(events, Ordering::Relaxed)
            }
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A waiter is served by the first push that starts after it asked, not by one already
    /// under way; waiters that arrive together share one push.
    #[tokio::test]
    async fn a_waiter_needs_a_push_that_started_after_it_asked() {
        let sync = Arc::new(InterestSync::default());
        // A push under way before anyone asks.
        let early = sync.begin();
        assert!(!sync.wanted());
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let sync = sync.clone();
                tokio::spawn(async move { sync.wait(Duration::from_secs(5)).await })
            })
            .collect();
        while sync.requests.load(Ordering::Relaxed) < 3 {
            tokio::task::yield_now().await;
        }
        assert!(sync.wanted());
        sync.finish(early);
        assert!(sync.wanted(), "the push under way did not serve them");
        tokio::time::timeout(Duration::from_secs(1), sync.asked())
            .await
            .expect("the loop is woken");
        let next = sync.begin();
        sync.finish(next);
        assert!(!sync.wanted());
        for waiter in waiters {
            assert!(waiter.await.unwrap());
        }
        assert_eq!(sync.timeouts.load(Ordering::Relaxed), 0);
    }

    /// A wait gives up at its limit when no push comes, and nobody waits once the node closes.
    #[tokio::test]
    async fn a_wait_is_bounded_and_ends_at_close() {
        let sync = InterestSync::default();
        assert!(!sync.wait(Duration::from_millis(20)).await);
        assert_eq!(sync.timeouts.load(Ordering::Relaxed), 1);
        sync.close();
        assert!(sync.wait(Duration::from_secs(5)).await);
        assert!(!sync.wanted());
    }
}
