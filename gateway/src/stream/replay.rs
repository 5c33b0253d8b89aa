//! The history part of a stream, read a page at a time as the client takes it: per partition
//! (ascending), each channel's events after its read position up to the partition's
//! watermark, merged in sequence order with a heap of the channels' next events. A stream holds
//! read positions and one page, never its whole history. A channel whose unread events
//! retention drops meanwhile (a client slower than the publishers), or whose unread events
//! pass their TTL (whether or not expiry removed them yet), yields a gap notice where they
//! were.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};

use bytes::Bytes;
use herald_storage::{Event, Position, StorageError, Store};

use super::{Gap, GapReason};

/// Events a replay page holds at most.
pub const REPLAY_PAGE_EVENTS: usize = 512;
/// Payload bytes a replay page holds at most, past its first event.
pub const REPLAY_PAGE_BYTES: usize = 256 * 1024;
/// Events read from one channel at a time while merging several channels' histories.
const CHANNEL_READ: usize = 64;

/// One thing a replay page holds, in order.
pub(super) enum ReplayItem {
    Event(Event),
    Gap(Gap),
}

/// History still to replay (see the module docs).
pub(super) struct Replay {
    parts: VecDeque<PartReplay>,
}

struct PartReplay {
    /// Replay up to this seq; later events arrive live.
    limit: u64,
    channels: Vec<ChannelReplay>,
    /// (next seq, channel index) of every channel with a read event: the merge order.
    heads: BinaryHeap<Reverse<(u64, usize)>>,
    started: bool,
}

/// One channel's place in a replay.
pub(super) struct ChannelReplay {
    channel: Bytes,
    /// Read after this seq next (`None`: from the oldest retained).
    after: Option<u64>,
    /// Events read and not yet replayed.
    read: VecDeque<Event>,
    /// Nothing more to read up to the limit.
    done: bool,
    /// Retention's floor for the channel that a gap notice already told the client about.
    floor_told: u64,
}

impl ChannelReplay {
    /// `channel` replayed after `after` (`None`: from its oldest retained event); retention
    /// drops up to `floor_told` were told already.
    pub(super) fn new(channel: Bytes, after: Option<u64>, floor_told: u64) -> ChannelReplay {
        ChannelReplay {
            channel,
            after,
            read: VecDeque::new(),
            done: false,
            floor_told,
        }
    }

    /// Where the channel's replay goes on from.
    pub(super) fn after(&self) -> Option<u64> {
        self.after
    }

    /// Once what was read is replayed: a gap notice if events after the read position were
    /// dropped since (the read skipped them), then the channel's next events up to `limit`.
    fn refill(&mut self, store: &Store, limit: u64) -> Result<Option<Gap>, StorageError> {
        if self.done || !self.read.is_empty() {
            return Ok(None);
        }
        // What the read passed over is judged by the read itself (the same clock, the same
        // removal floor): expired chunks that expiry has not removed yet are skipped by the
        // read, and so count as dropped here too.
        let read = store.history_read(&self.channel, self.after, CHANNEL_READ)?;
        let gap = self.dropped(store, limit, read.gone_through)?;
        if read.events.len() < CHANNEL_READ {
            self.done = true;
        }
        for event in read.events {
            if event.position.seq > limit {
                self.done = true;
                break;
            }
            self.read.push_back(event);
        }
        Ok(gap)
    }

    /// A gap notice for events after the read position that are gone through `gone_through`
    /// (retention dropped them, or they expired) and no notice told of yet.
    fn dropped(
        &mut self,
        store: &Store,
        limit: u64,
        gone_through: u64,
    ) -> Result<Option<Gap>, StorageError> {
        let Some(after) = self.after.filter(|&after| after < limit) else {
            return Ok(None);
        };
        if gone_through <= after.max(self.floor_told) {
            return Ok(None);
        }
        self.floor_told = gone_through;
        Ok(Some(Gap {
            channel: self.channel.clone(),
            requested: Some(Position {
                partition: store.partition_of(&self.channel),
                seq: after,
            }),
            oldest: store.oldest(&self.channel)?,
            reason: GapReason::Retention,
        }))
    }
}

impl Replay {
    /// A replay of `(limit, channels)` per partition, in the order given; `None` if there is
    /// nothing to replay.
    pub(super) fn new(
        parts: impl IntoIterator<Item = (u64, Vec<ChannelReplay>)>,
    ) -> Option<Replay> {
        let parts: VecDeque<PartReplay> = parts
            .into_iter()
            .map(|(limit, channels)| PartReplay {
                limit,
                channels,
                heads: BinaryHeap::new(),
                started: false,
            })
            .collect();
        (!parts.is_empty()).then_some(Replay { parts })
    }

    /// The next page of the replay (gap notices and events), in order; empty once done.
    pub(super) fn page(&mut self, store: &Store) -> Result<Vec<ReplayItem>, StorageError> {
        let mut out = Vec::new();
        let (mut events, mut bytes) = (0usize, 0usize);
        while let Some(part) = self.parts.front_mut() {
            if !part.started {
                part.started = true;
                for (i, channel) in part.channels.iter_mut().enumerate() {
                    if let Some(gap) = channel.refill(store, part.limit)? {
                        out.push(ReplayItem::Gap(gap));
                    }
                    if let Some(first) = channel.read.front() {
                        part.heads.push(Reverse((first.position.seq, i)));
                    }
                }
            }
            let Some(Reverse((_, i))) = part.heads.pop() else {
                self.parts.pop_front();
                continue;
            };
            let channel = &mut part.channels[i];
            let Some(event) = channel.read.pop_front() else {
                continue;
            };
            channel.after = Some(event.position.seq);
            bytes += event.payload.len();
            events += 1;
            out.push(ReplayItem::Event(event));
            // A drop behind this event is told after it, before what follows it.
            if let Some(gap) = channel.refill(store, part.limit)? {
                out.push(ReplayItem::Gap(gap));
            }
            if let Some(next) = channel.read.front() {
                part.heads.push(Reverse((next.position.seq, i)));
            }
            if events >= REPLAY_PAGE_EVENTS || bytes >= REPLAY_PAGE_BYTES {
                break;
            }
        }
        Ok(out)
    }

    /// Whether everything was replayed.
    pub(super) fn is_done(&self) -> bool {
        self.parts.is_empty()
    }
}
