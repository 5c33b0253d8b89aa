//! The local hub: which of this node's clients listen to which channels and patterns, and the
//! fan-out of each published message to them.
//!
//! The hub is protocol-neutral: a subscriber is an [`Outbox`] plus the [`Format`] its frames
//! are encoded in (RESP2, RESP3, SSE, WebSocket). Each message is encoded at most once per
//! format (lazily, only for formats some receiver uses, see [`encode`]) and the encoded frame is
//! shared by reference count among all receivers. Events of the durable history carry their
//! position, so SSE and WebSocket streams can put their cursor on each event. Publishing takes a read lock; subscribing a write lock, under which the
//! subscription's confirmation is queued, so no message can overtake the confirmation.
//! In a cluster, names new to this node are [reserved](Hub::reserve) first: they count in the
//! node's interest while the other members learn of them, before the subscription (and its
//! confirmation) enters the hub.

pub mod encode;
pub mod glob;
pub mod outbox;

use crate::resp::frame::Protocol;
use bytes::Bytes;
use encode::Encoded;
pub use encode::Format;
use glob::Glob;
use herald_storage::{Event, Position};
use indexmap::IndexMap;
use outbox::{Delivery, Item, Outbox, OutputLimit};
use parking_lot::RwLock;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};

/// A client's id, unique for the life of the process (`CLIENT ID`).
pub type ClientId = u64;

/// The three independent subscription spaces of Redis pub/sub.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// `SUBSCRIBE` / `PUBLISH`.
    Channel,
    /// `PSUBSCRIBE`: glob patterns over `PUBLISH` channels.
    Pattern,
    /// `SSUBSCRIBE` / `SPUBLISH`: shard channels, a separate name space.
    Shard,
}

/// A receiving client as the hub sees it.
#[derive(Debug)]
pub struct Subscriber {
    id: ClientId,
    outbox: Arc<Outbox>,
    format: AtomicU8,
}

impl Subscriber {
    /// A subscriber writing into `outbox` with frames of `format`.
    pub fn new(id: ClientId, outbox: Arc<Outbox>, format: Format) -> Self {
        Subscriber {
            id,
            outbox,
            format: AtomicU8::new(format as u8),
        }
    }

    /// The client's id.
    pub fn id(&self) -> ClientId {
        self.id
    }

    /// The client's queue.
    pub fn outbox(&self) -> &Arc<Outbox> {
        &self.outbox
    }

    /// The format its frames are encoded in.
    pub fn format(&self) -> Format {
        Format::from_u8(self.format.load(Ordering::Relaxed))
    }

    /// The RESP protocol of a RESP client (RESP2 for others).
    pub fn protocol(&self) -> Protocol {
        if self.format() == Format::Resp3 {
            Protocol::Resp3
        } else {
            Protocol::Resp2
        }
    }

    /// Switches a RESP client's protocol (after `HELLO`).
    pub fn set_protocol(&self, protocol: Protocol) {
        self.format
            .store(Format::resp(protocol) as u8, Ordering::Relaxed);
    }
}

type Receivers = IndexMap<ClientId, Arc<Subscriber>>;

/// Receivers whose writers still have to be woken after a batch of publishes. Waking once per
/// batch lets each writer send the whole batch with one write. Dropping it wakes them all, so a
/// wake-up can be late but never lost.
#[derive(Default)]
pub struct Wakes(Vec<Arc<Outbox>>);

impl Wakes {
    /// Wakes every writer collected so far.
    pub fn wake_all(&mut self) {
        for outbox in self.0.drain(..) {
            outbox.wake();
        }
    }
}

impl Drop for Wakes {
    fn drop(&mut self) {
        self.wake_all();
    }
}

struct PatternEntry {
    glob: Glob,
    receivers: Receivers,
}

#[derive(Default)]
struct HubState {
    channels: HashMap<Bytes, Receivers>,
    patterns: IndexMap<Bytes, PatternEntry>,
    shards: HashMap<Bytes, Receivers>,
    /// Names subscriptions are about to add (see [`Reservation`]), with how many reserved each.
    pending: HashMap<(Kind, Bytes), u32>,
}

impl HubState {
    /// Whether this node has a subscriber of `name`.
    fn holds(&self, kind: Kind, name: &[u8]) -> bool {
        match kind {
            Kind::Channel => self.channels.contains_key(name),
            Kind::Shard => self.shards.contains_key(name),
            Kind::Pattern => self.patterns.contains_key(name),
        }
    }
}

/// Names a subscription is about to add that this node had no subscriber of: counted in
/// [`Hub::interest`] until the reservation is dropped (once the subscription is in the hub),
/// so that the other cluster members can learn of them before the subscription is confirmed.
#[must_use = "the names stay reserved until it is dropped"]
pub struct Reservation {
    hub: Arc<Hub>,
    kind: Kind,
    names: Vec<Bytes>,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut state = self.hub.state.write();
        for name in self.names.drain(..) {
            let key = (self.kind, name);
            if let Some(n) = state.pending.get_mut(&key) {
                *n -= 1;
                if *n == 0 {
                    state.pending.remove(&key);
                }
            }
        }
    }
}

/// Counters the stats and metrics endpoints report.
#[derive(Debug, Default)]
pub struct HubStats {
    /// Messages published through this hub.
    pub published: AtomicU64,
    /// Message copies queued to receivers (live delivery).
    pub delivered: AtomicU64,
    /// Events sent to clients from history, not live: the replays of resumed and `last=N`
    /// streams (SSE, WebSocket, `HSUBSCRIBE`) and the events of `HISTORY` replies.
    pub replayed: AtomicU64,
    /// Clients closed for passing their output limit.
    pub slow_clients_closed: AtomicU64,
}

/// Channel and pattern subscriptions of this node's clients.
pub struct Hub {
    state: RwLock<HubState>,
    limit: RwLock<OutputLimit>,
    stats: HubStats,
    next_client_id: AtomicU64,
}

impl Default for Hub {
    fn default() -> Self {
        Hub::new(OutputLimit::PUBSUB_DEFAULT)
    }
}

impl Hub {
    /// An empty hub whose receivers are held to `limit`.
    pub fn new(limit: OutputLimit) -> Self {
        Hub {
            state: RwLock::default(),
            limit: RwLock::new(limit),
            stats: HubStats::default(),
            next_client_id: AtomicU64::new(1),
        }
    }

    /// A fresh client id, unique across every protocol this node serves.
    pub fn next_client_id(&self) -> ClientId {
        self.next_client_id.fetch_add(1, Ordering::Relaxed)
    }

    /// The counters.
    pub fn stats(&self) -> &HubStats {
        &self.stats
    }

    /// The output limit applied to receivers (`client-output-buffer-limit pubsub`).
    pub fn output_limit(&self) -> OutputLimit {
        *self.limit.read()
    }

    /// Changes the output limit (`CONFIG SET`).
    pub fn set_output_limit(&self, limit: OutputLimit) {
        *self.limit.write() = limit;
    }

    /// Reserves those of `names` this node has no subscriber of yet (see [`Reservation`]);
    /// `None` when it holds them all, so that a subscription that adds no interest costs
    /// nothing more.
    pub fn reserve(self: &Arc<Self>, kind: Kind, names: &[Bytes]) -> Option<Reservation> {
        {
            // The common case (every name held here already) under the read lock only.
            let state = self.state.read();
            if names.iter().all(|name| state.holds(kind, name)) {
                return None;
            }
        }
        let mut state = self.state.write();
        let new: Vec<Bytes> = names
            .iter()
            .filter(|name| !state.holds(kind, name))
            .cloned()
            .collect();
        if new.is_empty() {
            return None;
        }
        for name in &new {
            *state.pending.entry((kind, name.clone())).or_default() += 1;
        }
        Some(Reservation {
            hub: self.clone(),
            kind,
            names: new,
        })
    }

    /// Adds `subscriber` to each name, queueing `replies[i]` (if given) right after adding
    /// `names[i]`.
    pub fn subscribe(
        &self,
        kind: Kind,
        subscriber: &Arc<Subscriber>,
        names: &[Bytes],
        replies: Vec<Bytes>,
    ) {
        let mut state = self.state.write();
        let mut replies = replies.into_iter();
        for name in names {
            let receivers = match kind {
                Kind::Channel => state.channels.entry(name.clone()).or_default(),
                Kind::Shard => state.shards.entry(name.clone()).or_default(),
                Kind::Pattern => {
                    &mut state
                        .patterns
                        .entry(name.clone())
                        .or_insert_with(|| PatternEntry {
                            glob: Glob::new(name),
                            receivers: Receivers::new(),
                        })
                        .receivers
                }
            };
            receivers.insert(subscriber.id, subscriber.clone());
            if let Some(reply) = replies.next() {
                subscriber.outbox.push_reply(reply);
            }
        }
    }

    /// Removes `subscriber` from each name, queueing `replies[i]` right after removing
    /// `names[i]`. Extra replies (unsubscribing from nothing) are queued at the end.
    pub fn unsubscribe(
        &self,
        kind: Kind,
        subscriber: &Subscriber,
        names: &[Bytes],
        replies: Vec<Bytes>,
    ) {
        let mut state = self.state.write();
        let mut replies = replies.into_iter();
        for name in names {
            Self::remove_locked(&mut state, kind, subscriber.id, name);
            if let Some(reply) = replies.next() {
                subscriber.outbox.push_reply(reply);
            }
        }
        for reply in replies {
            subscriber.outbox.push_reply(reply);
        }
    }

    /// Removes a departing client from everything it was subscribed to.
    pub fn remove_client(&self, id: ClientId, subscriptions: &[(Kind, &[Bytes])]) {
        let mut state = self.state.write();
        for (kind, names) in subscriptions {
            for name in names.iter() {
                Self::remove_locked(&mut state, *kind, id, name);
            }
        }
    }

    fn remove_locked(state: &mut HubState, kind: Kind, id: ClientId, name: &Bytes) {
        match kind {
            Kind::Channel => remove_receiver(&mut state.channels, id, name),
            Kind::Shard => remove_receiver(&mut state.shards, id, name),
            Kind::Pattern => {
                if let Some(entry) = state.patterns.get_mut(name) {
                    entry.receivers.swap_remove(&id);
                    if entry.receivers.is_empty() {
                        state.patterns.swap_remove(name);
                    }
                }
            }
        }
    }

    /// `PUBLISH`: queues the message to every subscriber of `channel` and of every pattern
    /// matching it. Returns the number of receivers, counted as Redis counts them.
    pub fn publish(&self, channel: &[u8], payload: &[u8]) -> usize {
        self.publish_batched(channel, payload, &mut Wakes::default())
    }

    /// [`Hub::publish`], leaving the receivers' wake-ups in `wakes` for the caller to do at the
    /// end of its batch.
    pub fn publish_batched(&self, channel: &[u8], payload: &[u8], wakes: &mut Wakes) -> usize {
        self.fan_out(channel, payload, None, wakes)
    }

    /// Delivers events committed to the durable history, in order, with their positions.
    /// Returns the receivers of each.
    pub fn deliver_events(&self, events: &[Event], wakes: &mut Wakes) -> Vec<usize> {
        events
            .iter()
            .map(|event| {
                self.fan_out(
                    &event.channel,
                    &event.payload,
                    Some((event.position, &event.channel)),
                    wakes,
                )
            })
            .collect()
    }

    fn fan_out(
        &self,
        channel: &[u8],
        payload: &[u8],
        position: Option<(Position, &Bytes)>,
        wakes: &mut Wakes,
    ) -> usize {
        let limit = self.output_limit();
        let state = self.state.read();
        let mut receivers = 0;
        if let Some(subscribers) = state.channels.get(channel) {
            let mut message = Encoded::new(b"message", None, channel, payload, position.is_some());
            receivers += self.deliver(subscribers, &mut message, position, &limit, wakes);
        }
        for (pattern, entry) in &state.patterns {
            if entry.glob.matches(channel) {
                let mut message = Encoded::new(
                    b"pmessage",
                    Some(pattern),
                    channel,
                    payload,
                    position.is_some(),
                );
                receivers += self.deliver(&entry.receivers, &mut message, position, &limit, wakes);
            }
        }
        self.stats.published.fetch_add(1, Ordering::Relaxed);
        self.stats
            .delivered
            .fetch_add(receivers as u64, Ordering::Relaxed);
        receivers
    }

    /// Number of receivers a message on `channel` would reach now (channel and pattern
    /// subscriptions), as `PUBLISH` counts them.
    pub fn receiver_count(&self, channel: &[u8]) -> usize {
        let state = self.state.read();
        state.channels.get(channel).map_or(0, IndexMap::len)
            + state
                .patterns
                .values()
                .filter(|entry| entry.glob.matches(channel))
                .map(|entry| entry.receivers.len())
                .sum::<usize>()
    }

    /// Whether delivering `events` costs at most `limit` units of work: one per event, one per
    /// pattern it is matched against, one per receiver. Counted under one read of the
    /// subscriptions, giving up as soon as the limit is passed (so a node with many patterns
    /// answers at once): the commit path delivers such small fan-outs itself instead of
    /// handing them to a thread.
    pub fn fan_out_at_most(&self, events: &[Event], limit: usize) -> bool {
        let state = self.state.read();
        let per_event = 1 + state.patterns.len();
        if events.len().saturating_mul(per_event) > limit {
            return false;
        }
        let mut work = events.len() * per_event;
        for event in events {
            work += state.channels.get(&event.channel).map_or(0, IndexMap::len);
            for entry in state.patterns.values() {
                if entry.glob.matches(&event.channel) {
                    work += entry.receivers.len();
                }
            }
            if work > limit {
                return false;
            }
        }
        true
    }

    /// `SPUBLISH`: queues the message to every subscriber of shard channel `channel`.
    pub fn spublish(&self, channel: &[u8], payload: &[u8], wakes: &mut Wakes) -> usize {
        let limit = self.output_limit();
        let state = self.state.read();
        let receivers = match state.shards.get(channel) {
            Some(subscribers) => {
                let mut message = Encoded::new(b"smessage", None, channel, payload, false);
                self.deliver(subscribers, &mut message, None, &limit, wakes)
            }
            None => 0,
        };
        self.stats.published.fetch_add(1, Ordering::Relaxed);
        self.stats
            .delivered
            .fetch_add(receivers as u64, Ordering::Relaxed);
        receivers
    }

    fn deliver(
        &self,
        subscribers: &Receivers,
        message: &mut Encoded<'_>,
        position: Option<(Position, &Bytes)>,
        limit: &OutputLimit,
        wakes: &mut Wakes,
    ) -> usize {
        for subscriber in subscribers.values() {
            let frame = message.frame(subscriber.format());
            let position = position.map(|(p, channel)| (p, channel.clone()));
            let (delivery, wake) = subscriber
                .outbox
                .enqueue_message(Item { position, frame }, limit);
            if wake {
                wakes.0.push(subscriber.outbox.clone());
            }
            if delivery == Delivery::LimitReached {
                self.stats
                    .slow_clients_closed
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    client = subscriber.id,
                    "subscriber closed: it passed its output buffer limit"
                );
            }
        }
        subscribers.len()
    }

    /// Channels (or shard channels) with at least one subscriber, optionally filtered by a glob.
    pub fn active_names(&self, kind: Kind, filter: Option<&Glob>) -> Vec<Bytes> {
        let state = self.state.read();
        let names: Box<dyn Iterator<Item = &Bytes>> = match kind {
            Kind::Channel => Box::new(state.channels.keys()),
            Kind::Shard => Box::new(state.shards.keys()),
            Kind::Pattern => Box::new(state.patterns.keys()),
        };
        names
            .filter(|name| filter.is_none_or(|glob| glob.matches(name)))
            .cloned()
            .collect()
    }

    /// Subscriber count of each channel (or shard channel) in `names`.
    pub fn subscriber_counts(&self, kind: Kind, names: &[Bytes]) -> Vec<usize> {
        let state = self.state.read();
        let map = match kind {
            Kind::Shard => &state.shards,
            _ => &state.channels,
        };
        names
            .iter()
            .map(|name| map.get(name).map_or(0, IndexMap::len))
            .collect()
    }

    /// Every channel, pattern and shard channel with subscribers, with their counts: what this
    /// node tells the other cluster members. A reserved name without subscribers yet counts
    /// its reservations.
    pub fn interest(&self) -> herald_cluster::interest::Interest {
        let state = self.state.read();
        let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        let mut interest = herald_cluster::interest::Interest {
            channels: state
                .channels
                .iter()
                .map(|(k, v)| (k.clone(), count(v.len())))
                .collect(),
            patterns: state
                .patterns
                .iter()
                .map(|(k, e)| (k.clone(), count(e.receivers.len())))
                .collect(),
            shards: state
                .shards
                .iter()
                .map(|(k, v)| (k.clone(), count(v.len())))
                .collect(),
            connections: Default::default(),
        };
        for ((kind, name), &n) in &state.pending {
            let map = match kind {
                Kind::Channel => &mut interest.channels,
                Kind::Pattern => &mut interest.patterns,
                Kind::Shard => &mut interest.shards,
            };
            map.entry(name.clone()).or_insert(n);
        }
        interest
    }

    /// Number of distinct patterns with subscribers (`PUBSUB NUMPAT`).
    pub fn pattern_count(&self) -> usize {
        self.state.read().patterns.len()
    }

    /// Number of distinct channels with subscribers, and of subscriptions to them.
    pub fn channel_totals(&self) -> (usize, usize) {
        let state = self.state.read();
        let subscriptions = state.channels.values().map(IndexMap::len).sum::<usize>()
            + state
                .patterns
                .values()
                .map(|e| e.receivers.len())
                .sum::<usize>()
            + state.shards.values().map(IndexMap::len).sum::<usize>();
        (state.channels.len() + state.shards.len(), subscriptions)
    }
}

fn remove_receiver(map: &mut HashMap<Bytes, Receivers>, id: ClientId, name: &Bytes) {
    if let Some(receivers) = map.get_mut(name) {
        receivers.swap_remove(&id);
        if receivers.is_empty() {
            map.remove(name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use outbox::Batch;

    fn subscriber(id: ClientId, protocol: Protocol) -> Arc<Subscriber> {
        Arc::new(Subscriber::new(
            id,
            Arc::new(Outbox::new()),
            Format::resp(protocol),
        ))
    }

    async fn drain(subscriber: &Subscriber) -> String {
        let mut out = bytes::BytesMut::new();
        if subscriber.outbox.queued_frames() > 0 {
            assert_eq!(
                subscriber.outbox.next_batch(&mut out, usize::MAX).await,
                Batch::Frames
            );
        }
        String::from_utf8(out.to_vec()).unwrap()
    }

    #[test]
    fn fan_out_at_most_counts_events_patterns_and_receivers() {
        let hub = Hub::default();
        let event = |channel: &'static str| Event {
            position: Position::new(0, 1),
            channel: Bytes::from_static(channel.as_bytes()),
            payload: Bytes::new(),
            message_id: None,
            timestamp_ms: 0,
        };
        let quiet: Vec<Event> = (0..10).map(|_| event("quiet")).collect();
        assert!(hub.fan_out_at_most(&quiet, 10));
        assert!(!hub.fan_out_at_most(&quiet, 9));
        let a = subscriber(1, Protocol::Resp2);
        let ch = Bytes::from_static(b"busy");
        hub.subscribe(
            Kind::Channel,
            &a,
            std::slice::from_ref(&ch),
            vec![Bytes::new()],
        );
        // One event plus one receiver.
        assert!(hub.fan_out_at_most(&[event("busy")], 2));
        assert!(!hub.fan_out_at_most(&[event("busy")], 1));
        // Patterns that match nothing still cost their matching, per event.
        let patterns: Vec<Bytes> = (0..5).map(|i| Bytes::from(format!("user:{i}:*"))).collect();
        let replies = patterns.iter().map(|_| Bytes::new()).collect();
        hub.subscribe(Kind::Pattern, &a, &patterns, replies);
        assert!(hub.fan_out_at_most(&quiet, 60));
        assert!(!hub.fan_out_at_most(&quiet, 59));
    }

    #[test]
    fn a_reservation_counts_new_names_until_dropped() {
        let hub = Arc::new(Hub::default());
        let a = subscriber(1, Protocol::Resp2);
        let held = Bytes::from_static(b"held");
        let new = Bytes::from_static(b"new");
        hub.subscribe(
            Kind::Channel,
            &a,
            std::slice::from_ref(&held),
            vec![Bytes::new()],
        );
        // A subscription that adds nothing this node lacks reserves nothing (and waits for
        // nothing).
        assert!(
            hub.reserve(Kind::Channel, std::slice::from_ref(&held))
                .is_none()
        );
        // A shard channel of the same name is another space.
        let shard = hub.reserve(Kind::Shard, std::slice::from_ref(&held));
        assert!(shard.is_some());
        let first = hub.reserve(Kind::Channel, &[held.clone(), new.clone()]);
        let second = hub.reserve(Kind::Channel, std::slice::from_ref(&new));
        assert!(first.is_some() && second.is_some());
        let interest = hub.interest();
        assert_eq!(interest.channels.get(&held), Some(&1));
        assert_eq!(interest.channels.get(&new), Some(&2), "two reservations");
        assert_eq!(interest.shards.get(&held), Some(&1));
        drop((first, shard));
        assert_eq!(hub.interest().channels.get(&new), Some(&1));
        // Once subscribed, the subscribers count, not the reservation.
        hub.subscribe(
            Kind::Channel,
            &a,
            std::slice::from_ref(&new),
            vec![Bytes::new()],
        );
        assert_eq!(hub.interest().channels.get(&new), Some(&1));
        drop(second);
        assert_eq!(hub.interest().channels.get(&new), Some(&1));
        assert!(hub.interest().shards.is_empty());
        hub.remove_client(1, &[(Kind::Channel, &[held, new])]);
        assert_eq!(
            hub.interest(),
            herald_cluster::interest::Interest::default()
        );
    }

    #[tokio::test]
    async fn fan_out_counts_and_encodes_per_protocol() {
        let hub = Hub::default();
        let (a, b) = (
            subscriber(1, Protocol::Resp2),
            subscriber(2, Protocol::Resp3),
        );
        let ch = Bytes::from_static(b"news");
        hub.subscribe(
            Kind::Channel,
            &a,
            std::slice::from_ref(&ch),
            vec![Bytes::new()],
        );
        hub.subscribe(
            Kind::Channel,
            &b,
            std::slice::from_ref(&ch),
            vec![Bytes::new()],
        );
        hub.subscribe(
            Kind::Pattern,
            &a,
            &[Bytes::from_static(b"n*")],
            vec![Bytes::new()],
        );
        assert_eq!(hub.publish(b"news", b"hi"), 3);
        assert_eq!(
            drain(&a).await,
            "*3\r\n$7\r\nmessage\r\n$4\r\nnews\r\n$2\r\nhi\r\n*4\r\n$8\r\npmessage\r\n$2\r\nn*\r\n$4\r\nnews\r\n$2\r\nhi\r\n"
        );
        assert_eq!(
            drain(&b).await,
            ">3\r\n$7\r\nmessage\r\n$4\r\nnews\r\n$2\r\nhi\r\n"
        );
        assert_eq!(
            hub.spublish(b"news", b"hi", &mut Wakes::default()),
            0,
            "shard channels are a separate space"
        );
        hub.remove_client(
            1,
            &[
                (Kind::Channel, std::slice::from_ref(&ch)),
                (Kind::Pattern, &[Bytes::from_static(b"n*")]),
            ],
        );
        assert_eq!(hub.publish(b"news", b"x"), 1);
        assert_eq!(hub.pattern_count(), 0);
    }
}
