//! The local hub: which of this node's clients listen to which channels and patterns, and the
//! fan-out of each published message to them.
//!
//! The hub is protocol-neutral: a subscriber is an [`Outbox`] plus the RESP version its frames
//! are encoded in. Each message is encoded at most once per protocol version (lazily, only for
//! versions some receiver uses) and the encoded frame is shared by reference count among all
//! receivers. Publishing takes a read lock; subscribing a write lock, under which the
//! subscription's confirmation is queued, so no message can overtake the confirmation.

pub mod glob;
pub mod outbox;

use crate::resp::frame::{Protocol, encode_bulk, encode_header};
use bytes::{Bytes, BytesMut};
use glob::Glob;
use indexmap::IndexMap;
use outbox::{Delivery, Outbox, OutputLimit};
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
    protocol: AtomicU8,
}

impl Subscriber {
    /// A subscriber writing into `outbox` with frames of `protocol`.
    pub fn new(id: ClientId, outbox: Arc<Outbox>, protocol: Protocol) -> Self {
        Subscriber {
            id,
            outbox,
            protocol: AtomicU8::new(protocol as u8),
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

    /// The protocol its frames are encoded in.
    pub fn protocol(&self) -> Protocol {
        if self.protocol.load(Ordering::Relaxed) == Protocol::Resp3 as u8 {
            Protocol::Resp3
        } else {
            Protocol::Resp2
        }
    }

    /// Switches the protocol (after `HELLO`).
    pub fn set_protocol(&self, protocol: Protocol) {
        self.protocol.store(protocol as u8, Ordering::Relaxed);
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
}

/// Counters the stats and metrics endpoints report.
#[derive(Debug, Default)]
pub struct HubStats {
    /// Messages published through this hub.
    pub published: AtomicU64,
    /// Message copies queued to receivers.
    pub delivered: AtomicU64,
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

/// A message's frames, encoded on first use per protocol version.
struct Encoded<'a> {
    parts: [&'a [u8]; 3],
    kind: &'static [u8],
    frames: [Option<Bytes>; 2],
}

impl<'a> Encoded<'a> {
    fn new(kind: &'static [u8], parts: [&'a [u8]; 3]) -> Self {
        Encoded {
            parts,
            kind,
            frames: [None, None],
        }
    }

    fn frame(&mut self, protocol: Protocol) -> Bytes {
        let slot = &mut self.frames[(protocol == Protocol::Resp3) as usize];
        slot.get_or_insert_with(|| {
            let parts: Vec<&[u8]> = self
                .parts
                .iter()
                .copied()
                .filter(|p| !p.is_empty())
                .collect();
            let size = 32 + self.kind.len() + parts.iter().map(|p| p.len() + 16).sum::<usize>();
            let mut out = BytesMut::with_capacity(size);
            let aggregate = if protocol == Protocol::Resp3 {
                b'>'
            } else {
                b'*'
            };
            encode_header(&mut out, aggregate, 1 + parts.len() as i64);
            encode_bulk(&mut out, self.kind);
            for part in parts {
                encode_bulk(&mut out, part);
            }
            out.freeze()
        })
        .clone()
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

    /// Adds `subscriber` to each name, queueing `replies[i]` right after adding `names[i]`.
    pub fn subscribe(
        &self,
        kind: Kind,
        subscriber: &Arc<Subscriber>,
        names: &[Bytes],
        replies: Vec<Bytes>,
    ) {
        let mut state = self.state.write();
        for (name, reply) in names.iter().zip(replies) {
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
            subscriber.outbox.push_reply(reply);
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
        let limit = self.output_limit();
        let state = self.state.read();
        let mut receivers = 0;
        if let Some(subscribers) = state.channels.get(channel) {
            let mut message = Encoded::new(b"message", [channel, payload, b""]);
            receivers += self.deliver(subscribers, &mut message, &limit, wakes);
        }
        for (pattern, entry) in &state.patterns {
            if entry.glob.matches(channel) {
                let mut message = Encoded::new(b"pmessage", [pattern, channel, payload]);
                receivers += self.deliver(&entry.receivers, &mut message, &limit, wakes);
            }
        }
        self.stats.published.fetch_add(1, Ordering::Relaxed);
        self.stats
            .delivered
            .fetch_add(receivers as u64, Ordering::Relaxed);
        receivers
    }

    /// `SPUBLISH`: queues the message to every subscriber of shard channel `channel`.
    pub fn spublish(&self, channel: &[u8], payload: &[u8], wakes: &mut Wakes) -> usize {
        let limit = self.output_limit();
        let state = self.state.read();
        let receivers = match state.shards.get(channel) {
            Some(subscribers) => {
                let mut message = Encoded::new(b"smessage", [channel, payload, b""]);
                self.deliver(subscribers, &mut message, &limit, wakes)
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
        limit: &OutputLimit,
        wakes: &mut Wakes,
    ) -> usize {
        for subscriber in subscribers.values() {
            let frame = message.frame(subscriber.protocol());
            let (delivery, wake) = subscriber.outbox.enqueue_message(frame, limit);
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
        Arc::new(Subscriber::new(id, Arc::new(Outbox::new()), protocol))
    }

    async fn drain(subscriber: &Subscriber) -> String {
        let mut out = BytesMut::new();
        if subscriber.outbox.queued_frames() > 0 {
            assert_eq!(
                subscriber.outbox.next_batch(&mut out, usize::MAX).await,
                Batch::Frames
            );
        }
        String::from_utf8(out.to_vec()).unwrap()
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
