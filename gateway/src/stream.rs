//! A resumable event stream: what an SSE or WebSocket client holds.
//!
//! Opening a stream subscribes it to the hub first, then reads each partition's committed
//! watermark, then replays history up to that watermark; live events at or below the watermark
//! are skipped (they were replayed or predate the stream), everything above arrives live. So the
//! hand-over from history to live has no gap and no duplicate, whatever is being published
//! meanwhile. The replay is read a page at a time (`replay`: at most [`REPLAY_PAGE_EVENTS`] events or
//! [`REPLAY_PAGE_BYTES`] of payload) as the client takes it, so a resume over a long history
//! holds one page in memory, not the history; should retention drop events the replay has not
//! reached yet (a client slower than the publishers), a gap notice says so where they were. Each event the stream emits carries the stream's full cursor (the last delivered
//! sequence number of every partition it touches), which is what `Last-Event-ID` sends back.
//!
//! When the requested cursor is older than what is retained, comes from another epoch, or (on a
//! single node) is ahead of everything the node committed, the stream first emits a [`Gap`]
//! notice naming what was asked for and the oldest position available, then replays what is
//! retained. The `ahead` check is a heuristic for a data directory restored from an older
//! copy: it catches a client that comes back before the restored node has committed past its
//! cursor, not one that comes back later (positions alone cannot tell the reused ones apart).
//! These rules are [`Resume`]'s, which `HISTORY` follows too.

mod replay;
mod resume;

use replay::{ChannelReplay, Replay, ReplayItem};
pub use replay::{REPLAY_PAGE_BYTES, REPLAY_PAGE_EVENTS};
pub use resume::{GapCause, GapReason, Resume};

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

    /// Why this start is malformed for `broker`'s store, if it is: see [`check_cursor`].
    pub fn check(&self, broker: &Broker) -> Result<(), String> {
        match self {
            Start::After(cursor) => check_cursor(cursor, broker),
            Start::Live | Start::Last(_) => Ok(()),
        }
    }
}

/// Why `cursor` is malformed for `broker`'s store, if it is: a cursor of the store's epoch
/// that names a partition the store does not have was never handed out (the partition count
/// is fixed for a store's, and a cluster's, life), so it is hand-made or corrupted. A cursor of
/// another epoch may name any partition: it gets an `epoch` gap instead.
pub fn check_cursor(cursor: &Cursor, broker: &Broker) -> Result<(), String> {
    if cursor.epoch != broker.epoch() {
        return Ok(());
    }
    let partitions = broker.store().partitions();
    match cursor.positions().find(|p| p.partition >= partitions) {
        Some(position) => Err(format!(
            "cursor names partition {}, but this store has {partitions} (0 to {})",
            position.partition,
            partitions - 1
        )),
        None => Ok(()),
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
    /// Why (see [`Resume`] for the rules).
    pub reason: GapReason,
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
    /// History not yet replayed; live events wait behind it.
    replay: Option<Replay>,
    /// Where the cursor goes once the replay is done (every partition's watermark).
    watermarks: BTreeMap<Partition, u64>,
}

impl EventStream {
    /// Subscribes to `channels` and returns the stream with the gap notices that must be sent
    /// first; the replay then comes from [`EventStream::next`], a page at a time, before any
    /// live event. In a cluster it returns once the other members know of the channels this
    /// node had no subscriber of (see [`Broker::announce`]): what confirms the subscription
    /// to the client (a response head, a `subscribed` message) comes after this.
    pub async fn open(
        broker: Arc<Broker>,
        format: Format,
        channels: Vec<Bytes>,
        start: Start,
    ) -> Result<(EventStream, Vec<Emit>), StorageError> {
        Self::open_into(broker, format, channels, start, Arc::new(Outbox::new())).await
    }

    /// [`EventStream::open`], queueing live events into `outbox` (shared by a [`StreamSet`]).
    async fn open_into(
        broker: Arc<Broker>,
        format: Format,
        channels: Vec<Bytes>,
        start: Start,
        outbox: Arc<Outbox>,
    ) -> Result<(EventStream, Vec<Emit>), StorageError> {
        let _reserved = broker.announce(Kind::Channel, &channels).await;
        // What this node acknowledged is in what the stream replays (a live stream replays
        // nothing: it does not wait).
        if !matches!(start, Start::Live) {
            let partitions: BTreeSet<Partition> = channels
                .iter()
                .filter(|c| broker.is_durable(c))
                .map(|c| broker.partition_of(c))
                .collect();
            let _ = broker.caught_up(partitions).await;
        }
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
            replay: None,
            watermarks: BTreeMap::new(),
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
        // Where the cursor resumes each partition, and whether with a gap (the rules are
        // `Resume`'s). Only the stream's own partitions are looked at: a cursor may name any
        // partition number.
        let single_node = broker.cluster().is_none();
        let resumes: BTreeMap<Partition, Resume> = match &start {
            Start::After(cursor) => watermarks
                .iter()
                .map(|(&p, &committed)| {
                    let resume = Resume::new(cursor, p, broker.epoch(), committed, single_node);
                    (p, resume)
                })
                .collect(),
            Start::Live | Start::Last(_) => BTreeMap::new(),
        };
        // In a cluster a cursor can be ahead of this node (it came from a node further along,
        // e.g. this one just restarted and is catching up): what it already covers must not
        // come again when this node applies it, so the cursor raises the point below which
        // live events are skipped. Where it cannot be matched (another epoch; on a single
        // node, ahead of what it committed) it raises nothing.
        for (p, seq) in watermarks.iter_mut() {
            if let Some(after) = resumes.get(p).and_then(Resume::after) {
                *seq = (*seq).max(after);
            }
        }
        // 3. Gap notices, and where each channel's replay starts (read later, by pages).
        let store = broker.store();
        let mut emits = Vec::new();
        let mut parts: BTreeMap<Partition, Vec<ChannelReplay>> = BTreeMap::new();
        for channel in channels.iter().filter(|c| broker.is_durable(c)) {
            let p = broker.partition_of(channel);
            let mut floor_told = 0;
            let after = match &start {
                Start::Live => continue,
                Start::Last(n) => store.seq_before_last(channel, *n)?,
                Start::After(_) => {
                    let resume = resumes[&p];
                    // The floor is read only where the cursor was matched (it costs a pass
                    // over the channel's chunk heads, and is not looked at otherwise).
                    let floor = match resume.after() {
                        Some(_) => store.retention_floor(channel)?,
                        None => 0,
                    };
                    if let Some(cause) = resume.gap(floor) {
                        floor_told = floor;
                        emits.push(Emit::Gap(
                            cause.notice(channel.clone(), store.oldest(channel)?),
                        ));
                    }
                    resume.after()
                }
            };
            // The notice above told of what retention dropped so far; the replay reports only
            // what it drops while it runs.
            parts.entry(p).or_default().push(ChannelReplay::new(
                channel.clone(),
                after,
                floor_told,
            ));
        }
        if let Start::After(cursor) = &start
            && cursor.epoch == broker.epoch()
        {
            // Partitions the store lacks are dropped (callers refuse such cursors first, see
            // `check_cursor`): the cursor goes out with every event, and a hand-made one naming
            // thousands of partitions would make each event huge. So are the stream's
            // partitions the cursor could not be matched in (`ahead`): they start over.
            let partitions = broker.store().partitions();
            let unmatched = |p: Partition| resumes.get(&p).is_some_and(|r| r.after().is_none());
            for position in cursor
                .positions()
                .filter(|pos| pos.partition < partitions && !unmatched(pos.partition))
            {
                self.cursor.advance(position);
            }
        }
        // `last=N` starts each partition's replay after a known seq: the cursor starts there
        // too (the lowest of its channels'), so that a client that drops before any event of
        // a partition resumes at its window, not at the start of what is retained.
        if let Start::Last(_) = &start {
            for (&p, channels) in &parts {
                let starts: Option<Vec<u64>> = channels.iter().map(ChannelReplay::after).collect();
                if let Some(from) = starts.and_then(|s| s.into_iter().min()) {
                    let seq = from.min(watermarks[&p]);
                    if seq > 0 {
                        self.cursor.advance(Position { partition: p, seq });
                    }
                }
            }
        }
        // Per partition in sequence order, so the cursor is exact after every event.
        self.replay = Replay::new(
            parts
                .into_iter()
                .map(|(partition, channels)| (watermarks[&partition], channels)),
        );
        for channel in channels.iter().filter(|c| broker.is_durable(c)) {
            self.skip_upto
                .insert(channel.clone(), watermarks[&broker.partition_of(channel)]);
        }
        for (p, seq) in watermarks {
            let mark = self.watermarks.entry(p).or_insert(0);
            *mark = (*mark).max(seq);
        }
        if self.replay.is_none() {
            self.finish_replay();
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

    /// The cursor to resume this stream from as it stands, encoded, if it has a durable
    /// channel (`None`: nothing of it can be resumed). Sent when the stream opens (SSE's first
    /// `id:`, WebSocket's `subscribed`), so that a client that drops before its first event
    /// resumes from there instead of coming back live-only and missing what was published
    /// meanwhile.
    pub fn resume_cursor(&self) -> Option<String> {
        self.channels
            .iter()
            .any(|c| self.broker.is_durable(c))
            .then(|| self.cursor.encode())
    }

    /// Whether history is still to be replayed (live events wait behind it).
    fn replaying(&self) -> bool {
        self.replay.is_some()
    }

    /// The replay is over: the cursor moves to the watermarks (what live delivery starts
    /// after).
    fn finish_replay(&mut self) {
        self.replay = None;
        for (&partition, &seq) in &self.watermarks {
            self.cursor.advance(Position { partition, seq });
        }
    }

    /// Appends the next page of the replay to `out`; `None` if the history cannot be read
    /// (the stream must end: its client resumes from its cursor).
    fn replay_page(&mut self, out: &mut Vec<Emit>) -> Option<()> {
        let mut replay = self.replay.take()?;
        let store = self.broker.store().clone();
        let items = match replay.page(&store) {
            Ok(items) => items,
            Err(error) => {
                tracing::warn!(id = self.id(), %error, "cannot read history for a replay; ending the stream");
                return None;
            }
        };
        let mut replayed = 0;
        for item in items {
            match item {
                ReplayItem::Gap(gap) => out.push(Emit::Gap(gap)),
                ReplayItem::Event(event) => {
                    replayed += 1;
                    self.cursor.advance(event.position);
                    out.push(Emit::Event {
                        cursor: self.cursor.encode(),
                        channel: event.channel.clone(),
                        frame: self.encode(&event),
                    });
                }
            }
        }
        self.broker
            .hub()
            .stats()
            .replayed
            .fetch_add(replayed, std::sync::atomic::Ordering::Relaxed);
        if replay.is_done() {
            self.finish_replay();
        } else {
            self.replay = Some(replay);
        }
        Some(())
    }

    /// Appends the next page of the replay, or waits for live events and appends them, to
    /// `out`; `None` once the stream is closed (output limit passed, closed by the server, or
    /// its history unreadable).
    pub async fn next(&mut self, out: &mut Vec<Emit>) -> Option<()> {
        if self.replaying() {
            if self.subscriber.outbox().closed().is_some() {
                return None;
            }
            return self.replay_page(out);
        }
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

    /// Appends the live events already queued for the stream to `out`, without waiting: what
    /// a stream being ended still owes its client. Nothing while a replay is unfinished (live
    /// events wait behind it).
    pub fn take_queued(&mut self, out: &mut Vec<Emit>) {
        if self.replaying() {
            return;
        }
        let outbox = self.subscriber.outbox().clone();
        if outbox.take_items(&mut self.items) == Some(Batch::Frames) {
            for item in std::mem::take(&mut self.items) {
                if let Some(emit) = self.accept(item) {
                    out.push(emit);
                }
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

    /// Opens a subscription to `channels` (those not subscribed already), returning its backlog
    /// (in a cluster, once the other members know of it: see [`EventStream::open`]).
    pub async fn subscribe(
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
        )
        .await?;
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

    /// The resume cursor of the subscription holding `channel` (see
    /// [`EventStream::resume_cursor`]).
    pub fn resume_cursor(&self, channel: &[u8]) -> Option<String> {
        self.streams
            .iter()
            .find(|s| s.channels.iter().any(|c| c[..] == *channel))?
            .resume_cursor()
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

    /// Appends the next replay page of a subscription still replaying, or waits for live
    /// events of any subscription; `None` once the connection's queue is closed (or a
    /// subscription's history cannot be read).
    pub async fn next(&mut self, out: &mut Vec<Emit>) -> Option<()> {
        if let Some(stream) = self.streams.iter_mut().find(|s| s.replaying()) {
            if self.outbox.closed().is_some() {
                return None;
            }
            return stream.replay_page(out);
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::Hub;
    use herald_storage::{NamespaceConfig, Namespaces, StoreOptions};

    fn broker(name: &str, history_size: usize) -> (Arc<Broker>, std::path::PathBuf) {
        broker_ttl(name, history_size, None)
    }

    /// A broker whose channels also lose their events `history_ttl` after publication (no
    /// expiry worker runs: expired events stay stored until a test removes them).
    fn broker_ttl(
        name: &str,
        history_size: usize,
        history_ttl: Option<std::time::Duration>,
    ) -> (Arc<Broker>, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!(
            "herald-stream-{name}-{}-{:x}",
            std::process::id(),
            rand_suffix()
        ));
        let namespaces = Namespaces::new(NamespaceConfig {
            history_size,
            history_ttl,
            durable: true,
        });
        let hub = Arc::new(Hub::new(crate::hub::outbox::OutputLimit::PUBSUB_DEFAULT));
        let broker = Broker::open(hub, &dir, StoreOptions::default(), namespaces).unwrap();
        (broker, dir)
    }

    fn rand_suffix() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
    }

    async fn publish(broker: &Broker, channel: &str, range: std::ops::Range<u32>) {
        for i in range {
            broker
                .publish(
                    Bytes::from(channel.to_string()),
                    Bytes::from(i.to_string()),
                    None,
                )
                .await
                .unwrap();
        }
    }

    /// What `next` gives until the replay is over: (channel, payload) per event, and gaps.
    async fn drain_replay(stream: &mut EventStream) -> (Vec<(String, String)>, Vec<Gap>, usize) {
        let (mut events, mut gaps, mut pages) = (Vec::new(), Vec::new(), 0);
        while stream.replaying() {
            let mut out = Vec::new();
            stream.next(&mut out).await.expect("open");
            pages += 1;
            for emit in out {
                match emit {
                    Emit::Event { channel, frame, .. } => events.push((
                        String::from_utf8_lossy(&channel).into_owned(),
                        String::from_utf8_lossy(&frame).into_owned(),
                    )),
                    Emit::Gap(gap) => gaps.push(gap),
                    Emit::Transient { .. } => panic!("no transient events here"),
                }
            }
        }
        (events, gaps, pages)
    }

    /// A resume over more history than a page holds comes in several pages, merged across
    /// channels in sequence order, each event once; the cursor ends at the watermark.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_long_replay_comes_in_pages_in_order() {
        let (broker, dir) = broker("pages", 5_000);
        // Three channels of one partition, interleaved.
        let store = broker.store().clone();
        let mut names: Vec<String> = Vec::new();
        for i in 0.. {
            let name = format!("ch{i}");
            if store.partition_of(name.as_bytes()) == 0 {
                names.push(name);
            }
            if names.len() == 3 {
                break;
            }
        }
        let mut want = Vec::new();
        for round in 0..500u32 {
            for name in &names {
                publish(&broker, name, round..round + 1).await;
                want.push((name.clone(), format!("data: {round}\n\n")));
            }
        }
        let channels = names.iter().map(|n| Bytes::from(n.clone())).collect();
        let (mut stream, backlog) = EventStream::open(
            broker.clone(),
            Format::Sse,
            channels,
            Start::Last(usize::MAX),
        )
        .await
        .unwrap();
        assert!(backlog.is_empty());
        let (events, gaps, pages) = drain_replay(&mut stream).await;
        assert!(gaps.is_empty(), "{gaps:?}");
        assert_eq!(events.len(), want.len());
        assert_eq!(events, want);
        assert_eq!(pages, 3, "1,500 events in pages of {REPLAY_PAGE_EVENTS}");
        assert_eq!(stream.cursor().get(0), Some(1_500));
        // `last=N` starts N events back in each channel.
        let (mut last, _) = EventStream::open(
            broker.clone(),
            Format::Sse,
            vec![Bytes::from(names[0].clone())],
            Start::Last(2),
        )
        .await
        .unwrap();
        // Before any event, its cursor already starts at the window: a client that drops
        // now resumes with the last 2, not all 500.
        let window_start = last.cursor().get(0).expect("partition 0 in the cursor");
        let (events, _, _) = drain_replay(&mut last).await;
        assert_eq!(
            events,
            [498, 499].map(|r| (names[0].clone(), format!("data: {r}\n\n")))
        );
        assert_eq!(
            store
                .history_after(names[0].as_bytes(), Some(window_start), 10)
                .unwrap()
                .len(),
            2
        );
        drop((stream, last));
        let _ = std::fs::remove_dir_all(dir);
    }

    /// Events retention drops while a replay has not reached them yet are told as a gap where
    /// they were, then the replay and live delivery go on.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn events_dropped_during_a_replay_become_a_gap_notice() {
        let (broker, dir) = broker("drop", 600);
        publish(&broker, "c", 0..600).await;
        let (mut stream, _) = EventStream::open(
            broker.clone(),
            Format::Sse,
            vec![Bytes::from_static(b"c")],
            Start::Last(600),
        )
        .await
        .unwrap();
        let mut first = Vec::new();
        stream.next(&mut first).await.unwrap();
        assert_eq!(first.len(), REPLAY_PAGE_EVENTS);
        // 600 more: retention (600) drops everything the replay had not sent yet.
        publish(&broker, "c", 600..1_200).await;
        let mut rest = Vec::new();
        while stream.replaying() {
            stream.next(&mut rest).await.unwrap();
        }
        // What was read before the drop still comes (read ahead: it was retained then), then
        // one gap notice from the last event sent to the oldest retained one.
        let (gap, sent) = rest.split_last().expect("a gap notice");
        let sent: Vec<&[u8]> = sent
            .iter()
            .map(|e| match e {
                Emit::Event { frame, .. } => &frame[..],
                other => panic!("want events before the gap, got {other:?}"),
            })
            .collect();
        let want: Vec<String> = (REPLAY_PAGE_EVENTS..REPLAY_PAGE_EVENTS + sent.len())
            .map(|i| format!("data: {i}\n\n"))
            .collect();
        assert_eq!(sent, want.iter().map(|w| w.as_bytes()).collect::<Vec<_>>());
        match gap {
            Emit::Gap(gap) => {
                assert_eq!(gap.reason, GapReason::Retention);
                let requested = gap.requested.expect("a position");
                assert_eq!(
                    requested.seq,
                    (REPLAY_PAGE_EVENTS + sent.len()) as u64,
                    "{gap:?}"
                );
                assert_eq!(gap.oldest.map(|p| p.seq), Some(601), "{gap:?}");
            }
            other => panic!("want a gap notice last, got {other:?}"),
        }
        // Live delivery follows with the events published after the open.
        let mut live = Vec::new();
        while live.len() < 600 {
            stream.next(&mut live).await.unwrap();
        }
        match (&live[0], &live[599]) {
            (Emit::Event { frame: a, .. }, Emit::Event { frame: b, .. }) => {
                assert_eq!(&a[..], b"data: 600\n\n");
                assert_eq!(&b[..], b"data: 1199\n\n");
            }
            other => panic!("{other:?}"),
        }
        drop(stream);
        let _ = std::fs::remove_dir_all(dir);
    }

    /// Events that pass their TTL after the stream opened (retained then, so no gap at open)
    /// and before the replay reached them are told as a gap, even though the expiry worker
    /// has not removed them yet (reads already leave them out).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn events_expiring_before_the_replay_reaches_them_become_a_gap_notice() {
        use std::time::{Duration, Instant};
        let ttl = Duration::from_secs(3);
        let (broker, dir) = broker_ttl("ttl", 100, Some(ttl));
        let started = Instant::now();
        publish(&broker, "c", 0..3).await;
        // Published later, so still retained when the first three have expired.
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        publish(&broker, "c", 3..5).await;
        let p = broker.partition_of(b"c");
        let (mut stream, backlog) = EventStream::open(
            broker.clone(),
            Format::Sse,
            vec![Bytes::from_static(b"c")],
            Start::After(Cursor::new(broker.epoch())),
        )
        .await
        .unwrap();
        assert!(
            backlog.is_empty(),
            "everything was retained at the open: {backlog:?}"
        );
        // The first three expire; the expiry worker (not running here) has not removed them.
        tokio::time::sleep(
            (started + ttl + Duration::from_millis(300)).saturating_duration_since(Instant::now()),
        )
        .await;
        let (events, gaps, _) = drain_replay(&mut stream).await;
        assert_eq!(
            gaps,
            [Gap {
                channel: Bytes::from_static(b"c"),
                requested: Some(Position {
                    partition: p,
                    seq: 0
                }),
                oldest: Some(Position {
                    partition: p,
                    seq: 4
                }),
                reason: GapReason::Retention,
            }]
        );
        assert_eq!(
            events,
            [3, 4].map(|i| ("c".to_string(), format!("data: {i}\n\n")))
        );
        drop(stream);
        let _ = std::fs::remove_dir_all(dir);
    }
}
