//! When a node ends its streams and asks their clients to reconnect and resume from their
//! cursors, and what each protocol tells them.
//!
//! Two cluster situations make a node's live delivery useless to a client, and both are fixed
//! the same way: the stream ends with an explicit reason and the client resumes from its cursor
//! (on this node or another), which replays history and loses nothing.
//!
//! - **Quorum lost** ([`Reason::NoQuorum`]): the node has been cut off from its cluster for
//!   [`CUT_OFF_AFTER`] (a Raft group without a leader it hears), or a majority of the members
//!   has answered none of its calls for a second (`ClusterNode::reaches_majority`: then at
//!   once); nothing new commits here. Raised while it lasts, so a client that comes back too
//!   early is sent away again.
//! - **Removed** ([`Reason::Removed`]): the node knows it was removed from its cluster
//!   (`ClusterNode::is_removed`, what `/ready` says): nothing commits here again. Raised at
//!   once and while it lasts, ahead of a lost quorum.
//! - **Not formed** ([`Reason::NotFormed`]): the node is in no formed cluster yet (it waits
//!   for a join, for `herald cluster init`, or for its `--bootstrap-expect` peers; `/ready`
//!   says 503): no event reaches it, so a stream there would wait in silence for good (a
//!   browser's `EventSource` behind a proxy without health checks stayed open on it, receiving
//!   nothing). Raised at once and while it lasts; lifted once the node is formed.
//! - **Stopped** ([`Reason::StorageFailed`], [`Reason::GroupStopped`]): one of the node's Raft
//!   groups stopped, on a storage failure (a full disk) or for another reason (its Raft task
//!   panicked), so that partition's events no longer reach this node. Raised at once and while
//!   it lasts (until a restart).
//! - **Refused** ([`Reason::Refused`]): the cluster's members refuse this node's store (its
//!   data directory lost, replaced or restored from a backup: `herald_cluster::peer_stores`),
//!   so its history is not the cluster's and nothing new reaches it. Raised at once and while
//!   it lasts; lifted once they take it again (removed and joined again).
//! - **History skipped** ([`Reason::Skipped`]): the node caught up from a Raft snapshot, which
//!   moves partitions forward without applying (so without delivering) the events in between.
//!   An event: streams open at that moment end; later ones read the history that now has them.
//!
//! SSE gets an `event: reconnect` and the end of the stream, WebSocket a 1012 close frame, a
//! RESP subscriber an error reply and a close. A single node never asks anyone to reconnect.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use herald_cluster::node::{Availability, ClusterNode};
use herald_storage::{Partition, Store};
use tokio::sync::watch;

/// How long a cluster node must be without quorum before its streaming clients are told to
/// move: longer than an ordinary leader election, so a failover elsewhere does not bounce them.
pub const CUT_OFF_AFTER: Duration = Duration::from_secs(3);

/// How often the quorum and the store's positions are looked at.
const CHECK_EVERY: Duration = Duration::from_millis(250);

/// Why a stream must end and its client reconnect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// This node lost its cluster quorum.
    NoQuorum,
    /// This node was removed from its cluster.
    Removed,
    /// This node is in no formed cluster yet (not joined, not initialised).
    NotFormed,
    /// This node's history skipped ahead of its live delivery (a snapshot install).
    Skipped,
    /// One of this node's Raft groups stopped on a storage failure.
    StorageFailed,
    /// One of this node's Raft groups stopped for another reason (its Raft task panicked).
    GroupStopped,
    /// The cluster's members refuse this node's store (its data directory lost, replaced or
    /// restored from a backup): it takes no part in the cluster until removed and joined again.
    Refused,
}

impl Reason {
    /// The SSE event that ends the stream.
    pub fn sse_event(self) -> &'static [u8] {
        match self {
            Reason::NoQuorum => b"event: reconnect\ndata: {\"type\":\"reconnect\",\"reason\":\"this node lost its cluster quorum; reconnect to another node with your Last-Event-ID\"}\n\n",
            Reason::Removed => b"event: reconnect\ndata: {\"type\":\"reconnect\",\"reason\":\"this node was removed from the cluster; reconnect to another node with your Last-Event-ID\"}\n\n",
            Reason::NotFormed => b"event: reconnect\ndata: {\"type\":\"reconnect\",\"reason\":\"this node is not in a formed cluster yet; reconnect to another node with your Last-Event-ID\"}\n\n",
            Reason::Skipped => b"event: reconnect\ndata: {\"type\":\"reconnect\",\"reason\":\"this node caught up from a snapshot; reconnect with your Last-Event-ID to get every event\"}\n\n",
            Reason::StorageFailed => b"event: reconnect\ndata: {\"type\":\"reconnect\",\"reason\":\"this node's storage failed; reconnect to another node with your Last-Event-ID\"}\n\n",
            Reason::GroupStopped => b"event: reconnect\ndata: {\"type\":\"reconnect\",\"reason\":\"a Raft group stopped on this node; reconnect to another node with your Last-Event-ID\"}\n\n",
            Reason::Refused => b"event: reconnect\ndata: {\"type\":\"reconnect\",\"reason\":\"the cluster refuses this node's store; reconnect to another node with your Last-Event-ID\"}\n\n",
        }
    }

    /// The reason of the WebSocket close frame (code 1012, "service restart").
    pub fn ws_close_reason(self) -> &'static str {
        match self {
            Reason::NoQuorum => {
                "this node lost its cluster quorum: reconnect to another node and resume from your cursor"
            }
            Reason::Removed => {
                "this node was removed from the cluster: reconnect to another node and resume from your cursor"
            }
            Reason::NotFormed => {
                "this node is not in a formed cluster yet: reconnect to another node and resume from your cursor"
            }
            Reason::Skipped => {
                "this node caught up from a snapshot: reconnect and resume from your cursor"
            }
            Reason::StorageFailed => {
                "this node's storage failed: reconnect to another node and resume from your cursor"
            }
            Reason::GroupStopped => {
                "a Raft group stopped on this node: reconnect to another node and resume from your cursor"
            }
            Reason::Refused => {
                "the cluster refuses this node's store: reconnect to another node and resume from your cursor"
            }
        }
    }

    /// The error a RESP subscriber gets before its connection closes.
    pub fn resp_error(self) -> &'static str {
        match self {
            Reason::NoQuorum => {
                "ERR this node lost its cluster quorum: reconnect to another node (HSUBSCRIBE resumes from your cursor)"
            }
            Reason::Removed => {
                "ERR this node was removed from the cluster: reconnect to another node (HSUBSCRIBE resumes from your cursor)"
            }
            Reason::NotFormed => {
                "ERR this node is not in a formed cluster yet: reconnect to another node (HSUBSCRIBE resumes from your cursor)"
            }
            Reason::Skipped => {
                "ERR this node caught up from a snapshot: reconnect and resume from your cursor (HSUBSCRIBE)"
            }
            Reason::StorageFailed => {
                "ERR this node's storage failed: reconnect to another node (HSUBSCRIBE resumes from your cursor)"
            }
            Reason::GroupStopped => {
                "ERR a Raft group stopped on this node: reconnect to another node (HSUBSCRIBE resumes from your cursor)"
            }
            Reason::Refused => {
                "ERR the cluster refuses this node's store: reconnect to another node (HSUBSCRIBE resumes from your cursor)"
            }
        }
    }
}

/// A whole SSE body that sends the client away at once: the `retry:` delay, then an
/// `event: reconnect` with `reason` in the shape of [`Reason::sse_event`], for the reasons that
/// are not a [`Reason`] (a node that is starting, a history read that failed). A browser's
/// `EventSource` retries a 200 `text/event-stream` that ends; on a 503 it gives up for good.
pub fn reconnect_body(retry: std::time::Duration, reason: &str) -> Vec<u8> {
    let reason = serde_json::Value::from(reason);
    format!(
        "retry: {}\nevent: reconnect\ndata: {{\"type\":\"reconnect\",\"reason\":{reason}}}\n\n",
        retry.as_millis()
    )
    .into_bytes()
}

/// The node's two signals; the broker holds one.
#[derive(Debug)]
pub struct Reconnect {
    /// Set while clients must stay away from this node: [`Reason::NoQuorum`] once it has been
    /// without quorum for [`CUT_OFF_AFTER`], [`Reason::StorageFailed`] or
    /// [`Reason::GroupStopped`] once a group stopped.
    cut_off: watch::Receiver<Option<Reason>>,
    /// Counts history skips.
    skips: watch::Receiver<u64>,
    /// Whether the node is formed, read when a stream asks.
    formed: Formed,
    /// Set while some partitions commit nowhere this node reaches (see [`Reconnect::degraded`]),
    /// with when the watcher last judged so.
    degraded: Degraded,
}

/// The watcher's last [`Availability::Degraded`] verdict and when it was reached.
type Degraded = Arc<parking_lot::Mutex<Option<(tokio::time::Instant, String)>>>;

/// How often the watcher asks the members again, while partitions cannot commit here,
/// whether they commit them (see `ClusterNode::availability`).
const AVAILABILITY_EVERY: Duration = Duration::from_secs(1);

/// How long each member may take to answer that question.
const AVAILABILITY_WAIT: Duration = Duration::from_millis(300);

/// How long a degraded verdict stands without being renewed.
const DEGRADED_FRESH: Duration = Duration::from_secs(3);

/// One stream's view of [`Reconnect`]: remembers which skips it has already seen.
#[derive(Debug)]
pub struct ReconnectWatch {
    cut_off: watch::Receiver<Option<Reason>>,
    skips: watch::Receiver<u64>,
    formed: Formed,
}

/// Whether a cluster node is formed, read from its store at the moment it is asked: a
/// [`Reason::NotFormed`] the watcher has not lifted yet (it looks every [`CHECK_EVERY`]) must
/// not send away a stream opened right after the formation.
#[derive(Clone)]
struct Formed(Option<Arc<Store>>);

impl Formed {
    /// Whether `reason` still holds now (a `NotFormed` no longer does once the store is formed).
    fn holds(&self, reason: Reason) -> bool {
        reason != Reason::NotFormed || !self.0.as_ref().is_some_and(|s| s.cluster_initialized())
    }
}

impl std::fmt::Debug for Formed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Formed")
    }
}

impl Reconnect {
    /// A single node: never asks anyone to reconnect.
    pub fn never() -> Reconnect {
        Reconnect {
            cut_off: watch::channel(None).1,
            skips: watch::channel(0).1,
            formed: Formed(None),
            degraded: Degraded::default(),
        }
    }

    /// Starts watching a cluster node: its quorum, and its store's positions against
    /// `delivered` (each partition's highest seq handed to live delivery, which this raises past
    /// a skip). `skips` counts history skips: live delivery raises it itself when an event's seq
    /// is not the one after its partition's last (before the event reaches any stream); this
    /// watcher raises it when the store moved ahead and no commit followed. The watcher ends
    /// with the node.
    pub fn watch_cluster(
        node: ClusterNode,
        store: Arc<Store>,
        delivered: Arc<Vec<AtomicU64>>,
        skips_tx: Arc<watch::Sender<u64>>,
    ) -> Reconnect {
        let (cut_off_tx, cut_off) = watch::channel(None);
        let skips = skips_tx.subscribe();
        let formed = Formed(Some(store.clone()));
        let degraded = Degraded::default();
        let verdict = degraded.clone();
        tokio::spawn(async move {
            let mut without_quorum: Option<tokio::time::Instant> = None;
            // Whether this node has had a quorum since it started: one that has not (it just
            // joined, or restarted and is catching up) has lost nothing.
            let mut had_quorum = false;
            let mut detector = SkipDetector::new(delivered.len());
            // What the node can serve while groups cannot commit here.
            let judge = Judge::default();
            let mut ticker = tokio::time::interval(CHECK_EVERY);
            loop {
                tokio::select! {
                    _ = ticker.tick() => {}
                    _ = node.stopped() => return,
                }
                // A broken store (a write-ahead log that failed for lack of space breaks it at
                // once) is told before its groups stop on it, and before a quorum lost meanwhile.
                let failed = match store.broken_by() {
                    Some(cause) if store.is_broken() => Some((
                        Reason::StorageFailed,
                        format!("storage failed: a write to the store failed ({cause})"),
                    )),
                    _ => node.failure().map(|failure| {
                        let reason = if failure.storage {
                            Reason::StorageFailed
                        } else {
                            Reason::GroupStopped
                        };
                        (reason, failure.to_string())
                    }),
                };
                if let Some((reason, failure)) = failed {
                    if *cut_off_tx.borrow() != Some(reason) {
                        tracing::error!(
                            "{failure}: telling streaming and subscribed clients to reconnect elsewhere; restart the node"
                        );
                        let _ = cut_off_tx.send(Some(reason));
                    }
                } else if node.is_removed() {
                    // Told before a quorum lost (which follows: the members no longer talk to
                    // it), and instead of it when that came first.
                    if *cut_off_tx.borrow() != Some(Reason::Removed) {
                        tracing::warn!(
                            "this node was removed from the cluster: telling streaming and subscribed clients to reconnect elsewhere; stop it and delete its data directory, or join it again with `herald cluster join`"
                        );
                        let _ = cut_off_tx.send(Some(Reason::Removed));
                    }
                } else if let Some(refused) = node.store_refused() {
                    // Its history is what its store held, and nothing new reaches it: said at
                    // once (its members answered so), lifted once they take it again.
                    without_quorum = None;
                    if *cut_off_tx.borrow() != Some(Reason::Refused) {
                        tracing::error!(
                            "{refused}: telling streaming and subscribed clients to reconnect elsewhere"
                        );
                        let _ = cut_off_tx.send(Some(Reason::Refused));
                    }
                } else if !node.is_formed() {
                    // No event reaches a node in no formed cluster: its streams would wait in
                    // silence. Said at once (it is no passing election), and lifted once formed.
                    without_quorum = None;
                    if *cut_off_tx.borrow() != Some(Reason::NotFormed) {
                        tracing::info!(
                            "this node is not in a formed cluster yet (waiting for a join, `herald cluster init` or its --bootstrap-expect peers): telling streaming and subscribed clients to connect elsewhere until it is"
                        );
                        let _ = cut_off_tx.send(Some(Reason::NotFormed));
                    }
                } else if usable(&node, &judge, &verdict) {
                    had_quorum = true;
                    without_quorum = None;
                    cut_off_tx.send_if_modified(|v| v.take().is_some());
                } else {
                    // Formed now: what holds from here on is whether it has a quorum.
                    cut_off_tx.send_if_modified(|v| {
                        matches!(*v, Some(Reason::NotFormed | Reason::Refused))
                            && v.take().is_some()
                    });
                    let since = *without_quorum.get_or_insert_with(tokio::time::Instant::now);
                    // A majority of the members silent for a second already (no failover
                    // elsewhere looks like that): now; otherwise after CUT_OFF_AFTER.
                    let cut_off = since.elapsed() >= CUT_OFF_AFTER || !node.reaches_majority();
                    if cut_off && cut_off_tx.borrow().is_none() {
                        if had_quorum {
                            tracing::warn!(
                                "this node has lost its quorum: telling streaming and subscribed clients to reconnect elsewhere"
                            );
                        } else {
                            tracing::info!(
                                "this node has no quorum yet (it is catching up after a join or a restart, or its members are not up): telling streaming and subscribed clients to connect elsewhere until it has"
                            );
                        }
                        let _ = cut_off_tx.send(Some(Reason::NoQuorum));
                    }
                }
                let stored: Vec<u64> = (0..delivered.len())
                    .map(|p| store.latest_seq(p as Partition))
                    .collect();
                let done: Vec<u64> = delivered.iter().map(|d| d.load(Ordering::SeqCst)).collect();
                let skipped = detector.check(&stored, &done);
                if !skipped.is_empty() {
                    tracing::info!(
                        ?skipped,
                        "history skipped ahead of live delivery (caught up from a snapshot): streams resume from their cursors"
                    );
                    // Signal first, then move delivery's mark: a commit racing this sees either
                    // the old mark (and signals the skip again) or the signal already raised,
                    // so no stream forwards an event past the hole unwarned.
                    skips_tx.send_modify(|n| *n += 1);
                    for &(partition, upto) in &skipped {
                        delivered[partition].fetch_max(upto, Ordering::SeqCst);
                    }
                }
            }
        });
        Reconnect {
            cut_off,
            skips,
            formed,
            degraded,
        }
    }

    /// Why some partitions cannot commit here, while the node is otherwise sound and no
    /// member it reaches commits them either ([`Availability::Degraded`], as the watcher last
    /// judged it): its clients are not sent away, and `/ready` stays 200. `None` otherwise.
    pub fn degraded(&self) -> Option<String> {
        let verdict = self.degraded.lock();
        let (at, text) = verdict.as_ref()?;
        (at.elapsed() < DEGRADED_FRESH).then(|| text.clone())
    }

    /// A watch for one stream, taken when it starts: skips before this moment are not its
    /// concern (the history it reads has them).
    pub fn watch(&self) -> ReconnectWatch {
        let mut skips = self.skips.clone();
        skips.borrow_and_update();
        ReconnectWatch {
            cut_off: self.cut_off.clone(),
            skips,
            formed: self.formed.clone(),
        }
    }
}

impl ReconnectWatch {
    /// The reason the client must reconnect, if it must now (without waiting). A stream calls
    /// it after it took events and before it sends them: `biased;` only orders the branches
    /// within one poll, so a skip raised between the poll of [`Self::requested`] and the take
    /// would otherwise let events past the hole out first. Live delivery raises a skip before
    /// it queues any event past the hole, so a stream holding such an event sees the skip here.
    pub fn now(&mut self) -> Option<Reason> {
        let cut_off = *self.cut_off.borrow();
        if let Some(reason) = cut_off.filter(|r| self.formed.holds(*r)) {
            Some(reason)
        } else if self.skips.has_changed().unwrap_or(false) {
            Some(Reason::Skipped)
        } else {
            None
        }
    }

    /// Resolves with the reason once the stream's client must reconnect (at once if the node
    /// is cut off now); never on a single node.
    pub async fn requested(&mut self) -> Reason {
        // Each side ends `false` when its watcher is gone (a single node): never, then.
        let cut_off = async {
            let formed = &self.formed;
            match self
                .cut_off
                .wait_for(|r| r.is_some_and(|r| formed.holds(r)))
                .await
            {
                Ok(reason) => *reason,
                Err(_) => None,
            }
        };
        let skipped = async { self.skips.changed().await.is_ok() };
        tokio::select! {
            Some(reason) = cut_off => reason,
            true = skipped => Reason::Skipped,
            else => std::future::pending().await,
        }
    }
}

/// The watcher's view of what the node can serve, judged by a task of its own (probes of the
/// members take up to [`AVAILABILITY_WAIT`], which the watcher's other looks must not wait
/// for: a history skip found late reached streams opened after it).
#[derive(Default)]
struct Judge {
    /// The last verdict and when it was reached.
    last: Arc<parking_lot::Mutex<Option<(tokio::time::Instant, Availability)>>>,
    /// A judgement is under way.
    running: Arc<std::sync::atomic::AtomicBool>,
}

/// Whether the node serves its clients as well as any member it reaches: every group commits
/// here, or the partitions that do not commit nowhere it reaches either
/// ([`ClusterNode::availability`], judged again every [`AVAILABILITY_EVERY`] while groups
/// cannot commit here, in the background). Until a first verdict, it does not. Records a
/// degraded verdict in `verdict` for `/ready`.
fn usable(node: &ClusterNode, judge: &Judge, verdict: &Degraded) -> bool {
    if node.has_quorum() && node.reaches_majority() {
        if judge
            .last
            .lock()
            .take()
            .is_some_and(|(_, a)| matches!(a, Availability::Degraded(_)))
        {
            tracing::info!("every partition commits here again");
        }
        *verdict.lock() = None;
        return true;
    }
    let due = judge
        .last
        .lock()
        .as_ref()
        .is_none_or(|(at, _)| at.elapsed() >= AVAILABILITY_EVERY);
    if due && !judge.running.swap(true, Ordering::AcqRel) {
        let (node, last, running) = (node.clone(), judge.last.clone(), judge.running.clone());
        tokio::spawn(async move {
            let availability = node.availability(AVAILABILITY_WAIT).await;
            let mut last = last.lock();
            let was_degraded = last
                .as_ref()
                .is_some_and(|(_, a)| matches!(a, Availability::Degraded(_)));
            if let Availability::Degraded(problem) = &availability
                && !was_degraded
            {
                tracing::info!(
                    "{problem}: no member this node reaches commits it either, so streaming and subscribed clients stay (they get its events once it commits again)"
                );
            }
            *last = Some((tokio::time::Instant::now(), availability));
            running.store(false, Ordering::Release);
        });
    }
    let last = judge.last.lock();
    match last.as_ref() {
        Some((at, Availability::Degraded(problem))) => {
            *verdict.lock() = Some((*at, problem.clone()));
            true
        }
        Some((_, Availability::Whole)) => {
            *verdict.lock() = None;
            true
        }
        _ => {
            *verdict.lock() = None;
            false
        }
    }
}

/// Decides, from two successive looks, which partitions' stored history got ahead of delivery
/// for good: what was stored at the previous look and is still not delivered never went
/// through delivery (a commit is delivered microseconds after it is stored).
#[derive(Debug)]
struct SkipDetector {
    /// What was stored at the previous look, per partition.
    previous: Vec<u64>,
    /// What was delivered at the previous look, per partition.
    previous_done: Vec<u64>,
}

impl SkipDetector {
    fn new(partitions: usize) -> SkipDetector {
        SkipDetector {
            previous: vec![0; partitions],
            previous_done: vec![0; partitions],
        }
    }

    /// Returns `(partition, stored seq)` for every partition whose previous look's stored seq
    /// is still above what was delivered, and whose delivery made no progress since: delivery
    /// that is only slow (a loaded machine, a burst) still moves, while events skipped by a
    /// snapshot never come. (Events after a skip make live delivery raise it itself.)
    fn check(&mut self, stored: &[u64], delivered: &[u64]) -> Vec<(usize, u64)> {
        let mut skipped = Vec::new();
        for (p, (&now, &done)) in stored.iter().zip(delivered).enumerate() {
            if self.previous[p] > done && done == self.previous_done[p] {
                skipped.push((p, now));
            }
            self.previous[p] = now;
            self.previous_done[p] = done;
        }
        skipped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_is_told_in_each_protocol_and_a_stopped_group_by_its_kind() {
        let all = [
            Reason::NoQuorum,
            Reason::Removed,
            Reason::NotFormed,
            Reason::Skipped,
            Reason::StorageFailed,
            Reason::GroupStopped,
        ];
        for reason in all {
            let sse = std::str::from_utf8(reason.sse_event()).unwrap();
            let data = sse
                .strip_prefix("event: reconnect\ndata: ")
                .and_then(|rest| rest.strip_suffix("\n\n"))
                .unwrap_or_else(|| panic!("{sse:?}"));
            let data: serde_json::Value = serde_json::from_str(data).unwrap();
            assert_eq!(data["type"], "reconnect");
            // A WebSocket close frame's reason holds at most 123 bytes.
            assert!(reason.ws_close_reason().len() <= 123, "{reason:?}");
            assert!(reason.resp_error().starts_with("ERR "), "{reason:?}");
        }
        for text in [
            std::str::from_utf8(Reason::StorageFailed.sse_event()).unwrap(),
            Reason::StorageFailed.ws_close_reason(),
            Reason::StorageFailed.resp_error(),
        ] {
            assert!(text.contains("this node's storage failed"), "{text}");
        }
        for text in [
            std::str::from_utf8(Reason::GroupStopped.sse_event()).unwrap(),
            Reason::GroupStopped.ws_close_reason(),
            Reason::GroupStopped.resp_error(),
        ] {
            assert!(text.contains("a Raft group stopped on this node"), "{text}");
            assert!(!text.contains("storage"), "{text}");
        }
    }

    #[test]
    fn history_stored_and_delivered_is_no_skip() {
        let mut skips = SkipDetector::new(2);
        assert!(skips.check(&[5, 7], &[5, 7]).is_empty());
        // Stored a moment before delivery: not a skip yet...
        assert!(skips.check(&[9, 7], &[5, 7]).is_empty());
        // ...and delivered by the next look.
        assert!(skips.check(&[12, 7], &[12, 7]).is_empty());
    }

    #[test]
    fn delivery_that_is_slow_but_moving_is_no_skip() {
        let mut skips = SkipDetector::new(1);
        assert!(skips.check(&[50], &[10]).is_empty());
        assert!(skips.check(&[50], &[30]).is_empty(), "still delivering");
        assert!(skips.check(&[50], &[50]).is_empty());
        // Stuck below what was stored: skipped.
        assert!(skips.check(&[60], &[50]).is_empty());
        assert_eq!(skips.check(&[60], &[50]), vec![(0, 60)]);
    }

    #[test]
    fn history_that_never_reaches_delivery_is_a_skip() {
        let mut skips = SkipDetector::new(2);
        assert!(skips.check(&[5, 40], &[5, 7]).is_empty());
        assert_eq!(skips.check(&[5, 41], &[5, 7]), vec![(1, 41)]);
    }

    #[tokio::test]
    async fn a_single_node_never_asks_to_reconnect() {
        let mut watch = Reconnect::never().watch();
        let asked = tokio::time::timeout(Duration::from_millis(50), watch.requested()).await;
        assert!(asked.is_err(), "{asked:?}");
    }

    #[tokio::test]
    async fn a_cut_off_node_asks_now_and_a_skip_asks_only_streams_open_at_the_time() {
        let (cut_tx, cut_off) = watch::channel(None);
        let (skip_tx, skips) = watch::channel(0u64);
        let reconnect = Reconnect {
            cut_off,
            skips,
            formed: Formed(None),
            degraded: Degraded::default(),
        };
        let mut open = reconnect.watch();
        skip_tx.send_modify(|n| *n += 1);
        assert_eq!(open.requested().await, Reason::Skipped);
        // A stream that starts after the skip reads history that has the events.
        let mut later = reconnect.watch();
        let asked = tokio::time::timeout(Duration::from_millis(50), later.requested()).await;
        assert!(asked.is_err(), "{asked:?}");
        cut_tx.send(Some(Reason::NoQuorum)).unwrap();
        assert_eq!(later.requested().await, Reason::NoQuorum);
        assert_eq!(reconnect.watch().requested().await, Reason::NoQuorum);
    }
}
