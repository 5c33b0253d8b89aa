//! A resumable event stream: what an SSE or WebSocket client holds.
//!
//! Opening a stream subscribes it to the hub first, then reads each partition's committed
//! watermark, then replays history up to that watermark; live events at or below the watermark
//! are skipped (they were replayed or predate the stream), everything above arrives live. So the
//! hand-over from history to live has no gap and no duplicate, whatever is being published
//! meanwhile. Each event the stream emits carries the stream's full cursor (the last delivered
//! sequence number of every partition it touches), which is what `Last-Event-ID` sends back.
//!
//! When the requested cursor is older than what is retained, comes from another epoch, or (on a
//! single node) is ahead of everything the node committed, the stream first emits a [`Gap`]
//! notice naming what was asked for and the oldest position available, then replays what is
//! retained. The `ahead` check is a heuristic for a data directory restored from an older
//! copy: it catches a client that comes back before the restored node has committed past its
//! cursor, not one that comes back later (positions alone cannot tell the reused ones apart).

use crate::broker::Broker;
use crate::hub::outbox::{Batch, Item, Outbox};
use crate::hub::{ClientId, Format, Kind, Subscriber};
use bytes::Bytes;
use herald_storage::{Cursor, CursorError, Event, Partition, Position, StorageError};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

/// Where a new stream starts.
#[derive(Debug, Clone)]
pub enum Start {
    /// Live events only.
    Live,
    /// Everything retained after this cursor, then live.
    After(Cursor),
    /// The last `n` retained events of each channel, then live.
    Last(usize),
}

impl Start {
    /// Parses a client's cursor (`Last-Event-ID`, `lastEventId`, a WebSocket `cursor`).
    pub fn from_cursor(text: &str) -> Result<Start, CursorError> {
        Cursor::decode(text.trim()).map(Start::After)
    }
}

/// Why history the client asked for cannot be replayed in full.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gap {
    /// The channel concerned.
    pub channel: Bytes,
    /// The position after which the client asked to resume (`None`: its cursor was from
    /// another epoch, so nothing it holds can be matched).
    pub requested: Option<Position>,
    /// The oldest position still retained for the channel, if any.
    pub oldest: Option<Position>,
    /// `"retention"`, `"epoch"`, or `"ahead"` (a single node was asked to resume after
    /// events it does not have: its data directory was restored from an older copy).
    pub reason: &'static str,
}

/// One thing the stream emits.
#[derive(Debug, Clone)]
pub enum Emit {
    /// An event with a history position: `cursor` is the stream's cursor after it.
    Event {
        cursor: String,
        channel: Bytes,
        frame: Bytes,
    },
    /// A message without a position (non-durable namespace).
    Transient { frame: Bytes },
    /// A gap notice.
    Gap(Gap),
}

/// An open stream: a hub subscription plus the stream's cursor.
pub struct EventStream {
    broker: Arc<Broker>,
    subscriber: Arc<Subscriber>,
    channels: Vec<Bytes>,
    format: Format,
    cursor: Cursor,
    /// Live events of a channel at or below its sequence number here were replayed or predate
    /// the channel's subscription.
    skip_upto: HashMap<Bytes, u64>,
    items: Vec<Item>,
}

impl EventStream {
    /// Subscribes to `channels` and returns the stream with what must be sent before live
    /// events: gap notices, then the replay, in order.
    pub fn open(
        broker: Arc<Broker>,
        format: Format,
        channels: Vec<Bytes>,
        start: Start,
    ) -> Result<(EventStream, Vec<Emit>), StorageError> {
        Self::open_into(broker, format, channels, start, Arc::new(Outbox::new()))
    }

    /// [`EventStream::open`], queueing live events into `outbox` (shared by a [`StreamSet`]).
    fn open_into(
        broker: Arc<Broker>,
        format: Format,
        channels: Vec<Bytes>,
        start: Start,
        outbox: Arc<Outbox>,
    ) -> Result<(EventStream, Vec<Emit>), StorageError> {
        let hub = broker.hub().clone();
        let id = hub.next_client_id();
        let subscriber = Arc::new(Subscriber::new(id, outbox, format));
        let mut stream = EventStream {
            cursor: Cursor::new(broker.epoch()),
            broker,
            subscriber,
            channels: Vec::new(),
            format,
            skip_upto: HashMap::new(),
            items: Vec::new(),
        };
        let emits = stream.add(channels, start)?;
        Ok((stream, emits))
    }

    /// Subscribes to `channels` and replays as `start` asks. Called once, at open: the
    /// cursor's per-partition position is exact only when every channel's replay is merged in
    /// one sequence order, so channels are never added to a running stream (a WebSocket
    /// connection opens one stream per subscription, see [`StreamSet`]).
    fn add(&mut self, channels: Vec<Bytes>, start: Start) -> Result<Vec<Emit>, StorageError> {
        let channels: Vec<Bytes> = channels
            .into_iter()
            .filter(|c| !self.channels.contains(c))
            .collect();
        if channels.is_empty() {
            return Ok(Vec::new());
        }
        let broker = self.broker.clone();
        // 1. Subscribe: from here on every committed event of these channels reaches the outbox.
        broker
            .hub()
            .subscribe(Kind::Channel, &self.subscriber, &channels, Vec::new());
        self.channels.extend(channels.iter().cloned());
        // 2. The watermark of each partition, read after subscribing.
        let mut watermarks: BTreeMap<Partition, u64> = BTreeMap::new();
        for channel in channels.iter().filter(|c| broker.is_durable(c)) {
            let p = broker.partition_of(channel);
            watermarks
                .entry(p)
                .or_insert_with(|| broker.committed_seq(p));
        }
        // On a single node a cursor is never ahead of what the node committed (events reach
        // clients after commit): one that is names events this node no longer has, its data
        // directory restored from an older copy, and the positions past its head are being
        // given to other events. Those partitions are resumed like another epoch's. Only the
        // stream's own partitions are checked: a cursor may name any partition number.
        let ahead: BTreeSet<Partition> = match &start {
            Start::After(cursor)
                if cursor.epoch == broker.epoch() && broker.cluster().is_none() =>
            {
                watermarks
                    .iter()
                    .filter(|&(&p, &committed)| cursor.get(p).unwrap_or(0) > committed)
                    .map(|(&p, _)| p)
                    .collect()
            }
            _ => BTreeSet::new(),
        };
        // In a cluster a cursor can be ahead of this node (it came from a node further along,
        // e.g. this one just restarted and is catching up): what it already covers must not
        // come again when this node applies it, so the cursor raises the point below which
        // live events are skipped.
        if let Start::After(cursor) = &start
            && cursor.epoch == broker.epoch()
        {
            for (&p, seq) in watermarks.iter_mut() {
                if !ahead.contains(&p) {
                    *seq = (*seq).max(cursor.get(p).unwrap_or(0));
                }
            }
        }
        // 3. History up to the watermarks, and gap notices.
        let store = broker.store();
        let mut emits = Vec::new();
        let mut replay: Vec<Event> = Vec::new();
        for channel in channels.iter().filter(|c| broker.is_durable(c)) {
            let p = broker.partition_of(channel);
            let limit = watermarks[&p];
            let events = match &start {
                Start::Live => Vec::new(),
                Start::Last(n) => store.last(channel, *n)?,
                Start::After(cursor) if cursor.epoch != broker.epoch() => {
                    emits.push(Emit::Gap(Gap {
                        channel: channel.clone(),
                        requested: None,
                        oldest: store.oldest(channel)?,
                        reason: "epoch",
                    }));
                    store.history_after(channel, None, usize::MAX)?
                }
                Start::After(cursor) if ahead.contains(&p) => {
                    emits.push(Emit::Gap(Gap {
                        channel: channel.clone(),
                        requested: Some(Position {
                            partition: p,
                            seq: cursor.get(p).unwrap_or(0),
                        }),
                        oldest: store.oldest(channel)?,
                        reason: "ahead",
                    }));
                    store.history_after(channel, None, usize::MAX)?
                }
                Start::After(cursor) => {
                    let after = cursor.get(p).unwrap_or(0);
                    if after < store.retention_floor(channel)? {
                        emits.push(Emit::Gap(Gap {
                            channel: channel.clone(),
                            requested: Some(Position {
                                partition: p,
                                seq: after,
                            }),
                            oldest: store.oldest(channel)?,
                            reason: "retention",
                        }));
                    }
                    store.history_after(channel, Some(after), usize::MAX)?
                }
            };
            replay.extend(events.into_iter().filter(|e| e.position.seq <= limit));
        }
        if let Start::After(cursor) = &start
            && cursor.epoch == broker.epoch()
        {
            // Partitions the store lacks are dropped: the cursor goes out with every event,
            // and a hand-made one naming thousands of partitions would make each event huge.
            let partitions = broker.store().partitions();
            for position in cursor
                .positions()
                .filter(|pos| pos.partition < partitions && !ahead.contains(&pos.partition))
            {
                self.cursor.advance(position);
            }
        }
        // Per partition in sequence order, so the cursor is exact after every event.
        replay.sort_by_key(|e| (e.position.partition, e.position.seq));
        replay.dedup_by_key(|e| e.position);
        for event in &replay {
            self.cursor.advance(event.position);
            emits.push(Emit::Event {
                cursor: self.cursor.encode(),
                channel: event.channel.clone(),
                frame: self.encode(event),
            });
        }
        for (&p, &seq) in &watermarks {
            self.cursor.advance(Position { partition: p, seq });
        }
        for channel in channels.iter().filter(|c| broker.is_durable(c)) {
            self.skip_upto
                .insert(channel.clone(), watermarks[&broker.partition_of(channel)]);
        }
        Ok(emits)
    }

    /// Removes channels from the stream (a WebSocket `unsubscribe`).
    pub fn remove(&mut self, channels: &[Bytes]) {
        self.broker
            .hub()
            .remove_client(self.subscriber.id(), &[(Kind::Channel, channels)]);
        self.channels.retain(|c| !channels.contains(c));
        for channel in channels {
            self.skip_upto.remove(channel);
        }
    }

    fn encode(&self, event: &Event) -> Bytes {
        match self.format {
            Format::WebSocket => {
                crate::hub::encode::websocket_tail(&event.channel, &event.payload, true)
            }
            Format::RespStream2 | Format::RespStream3 => {
                crate::hub::encode::resp_payload(&event.payload)
            }
            _ => crate::hub::encode::sse_data(&event.payload),
        }
    }

    /// The stream's channels.
    pub fn channels(&self) -> &[Bytes] {
        &self.channels
    }

    /// The stream's id in the hub.
    pub fn id(&self) -> ClientId {
        self.subscriber.id()
    }

    /// The stream's queue (close it to end the stream).
    pub fn outbox(&self) -> &Arc<Outbox> {
        self.subscriber.outbox()
    }

    /// The stream's current cursor.
    pub fn cursor(&self) -> &Cursor {
        &self.cursor
    }

    /// Waits for live events and appends them to `out`; `None` once the stream is closed
    /// (output limit passed, or closed by the server).
    pub async fn next(&mut self, out: &mut Vec<Emit>) -> Option<()> {
        let outbox = self.subscriber.outbox().clone();
        match outbox.next_items(&mut self.items, 256 * 1024).await {
            Batch::Closed(_) => None,
            Batch::Frames => {
                let items = std::mem::take(&mut self.items);
                for item in items {
                    if let Some(emit) = self.accept(item) {
                        out.push(emit);
                    }
                }
                Some(())
            }
        }
    }

    /// Turns one queued item into what to emit, skipping what was replayed already and
    /// advancing the cursor.
    fn accept(&mut self, item: Item) -> Option<Emit> {
        match item.position {
            None => Some(Emit::Transient { frame: item.frame }),
            Some((position, channel)) => {
                if self
                    .skip_upto
                    .get(&channel)
                    .is_some_and(|&s| position.seq <= s)
                {
                    return None;
                }
                self.cursor.advance(position);
                Some(Emit::Event {
                    cursor: self.cursor.encode(),
                    channel,
                    frame: item.frame,
                })
            }
        }
    }
}

/// The streams of one WebSocket connection: one [`EventStream`] per subscription, all queueing
/// into one outbox (so the connection has one queue, one limit, and events in commit order).
/// Each event carries the cursor of its own subscription, which is what the client sends back
/// to resume that subscription.
pub struct StreamSet {
    broker: Arc<Broker>,
    format: Format,
    outbox: Arc<Outbox>,
    streams: Vec<EventStream>,
    items: Vec<Item>,
}

impl StreamSet {
    /// An empty set; subscribe to add streams.
    pub fn new(broker: Arc<Broker>, format: Format) -> StreamSet {
        StreamSet {
            broker,
            format,
            outbox: Arc::new(Outbox::new()),
            streams: Vec::new(),
            items: Vec::new(),
        }
    }

    /// Opens a subscription to `channels` (those not subscribed already), returning its backlog.
    pub fn subscribe(
        &mut self,
        channels: Vec<Bytes>,
        start: Start,
    ) -> Result<Vec<Emit>, StorageError> {
        let channels: Vec<Bytes> = channels
            .into_iter()
            .filter(|c| !self.channels().contains(c))
            .collect();
        if channels.is_empty() {
            return Ok(Vec::new());
        }
        let (stream, backlog) = EventStream::open_into(
            self.broker.clone(),
            self.format,
            channels,
            start,
            self.outbox.clone(),
        )?;
        self.streams.push(stream);
        Ok(backlog)
    }

    /// Ends the subscriptions of `channels`; their events still queued are dropped.
    pub fn unsubscribe(&mut self, channels: &[Bytes]) {
        for stream in &mut self.streams {
            let mine: Vec<Bytes> = stream
                .channels
                .iter()
                .filter(|c| channels.contains(c))
                .cloned()
                .collect();
            if !mine.is_empty() {
                stream.remove(&mine);
            }
        }
        self.streams.retain(|s| !s.channels.is_empty());
    }

    /// Every subscribed channel.
    pub fn channels(&self) -> Vec<Bytes> {
        self.streams
            .iter()
            .flat_map(|s| s.channels.iter().cloned())
            .collect()
    }

    /// The connection's queue.
    pub fn outbox(&self) -> &Arc<Outbox> {
        &self.outbox
    }

    /// Waits for live events of any subscription; `None` once the connection's queue is closed.
    pub async fn next(&mut self, out: &mut Vec<Emit>) -> Option<()> {
        match self
            .outbox
            .clone()
            .next_items(&mut self.items, 256 * 1024)
            .await
        {
            Batch::Closed(_) => None,
            Batch::Frames => {
                for item in std::mem::take(&mut self.items) {
                    let owner = match &item.position {
                        Some((_, channel)) => self
                            .streams
                            .iter_mut()
                            .find(|s| s.channels.contains(channel)),
                        None => self.streams.first_mut(),
                    };
                    // No owner: the channel was unsubscribed after the event was queued.
                    if let Some(emit) = owner.and_then(|stream| stream.accept(item)) {
                        out.push(emit);
                    }
                }
                Some(())
            }
        }
    }
}

impl Drop for EventStream {
    fn drop(&mut self) {
        self.broker
            .hub()
            .remove_client(self.subscriber.id(), &[(Kind::Channel, &self.channels)]);
    }
}

/// `p-seq`, how positions are shown in gap notices and the publish API.
pub fn position_text(position: Option<Position>) -> Option<String> {
    position.map(|p| format!("{}-{}", p.partition, p.seq))
}
