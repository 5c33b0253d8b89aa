//! A client's bounded queue of encoded frames waiting to be written to its socket.
//!
//! Publishers push shared, already-encoded frames (`Bytes`, one reference count each) and never
//! wait: when a client's queue passes its output limit the client is marked for closing and its
//! queue is dropped, so one slow reader cannot stall a publisher or other subscribers. The
//! connection's writer drains the queue in batches, so a burst costs one write, not one per frame.

use bytes::{Bytes, BytesMut};
use herald_storage::Position;
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::time::{Duration, Instant};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Redis's `client-output-buffer-limit` for one client class: a hard limit in bytes, and a soft
/// limit that closes the client when exceeded continuously for `soft_seconds`. Zero disables a
/// limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutputLimit {
    /// Close as soon as this many bytes are queued.
    pub hard_bytes: usize,
    /// Close when at least this many bytes stay queued for `soft_seconds`.
    pub soft_bytes: usize,
    /// How long the soft limit may be exceeded.
    pub soft_seconds: u64,
}

impl OutputLimit {
    /// Redis's default for pub/sub clients: `32mb 8mb 60`.
    pub const PUBSUB_DEFAULT: OutputLimit = OutputLimit {
        hard_bytes: 32 * 1024 * 1024,
        soft_bytes: 8 * 1024 * 1024,
        soft_seconds: 60,
    };
}

/// Why a client's connection is being closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// Its queued output passed the output limit; queued frames are dropped.
    OutputLimit,
    /// `CLIENT KILL`; queued frames are dropped.
    Killed,
    /// The client asked (`QUIT`), sent a malformed request, or the server is shutting down:
    /// queued frames are written first.
    AfterFlush,
}

#[derive(Debug, Default)]
struct State {
    frames: VecDeque<Item>,
    bytes: usize,
    soft_exceeded_since: Option<Instant>,
    closed: Option<CloseReason>,
}

/// The queue itself; shared between the connection (writer side) and the hub (publishers).
#[derive(Debug, Default)]
pub struct Outbox {
    state: Mutex<State>,
    /// Wakes the writer when the queue becomes non-empty or is closed.
    ready: Notify,
    /// Wakes a reader waiting for the queue to drain (reply backpressure).
    drained: Notify,
    /// Cancelled when the client is marked for closing, so its reader stops too.
    closing: CancellationToken,
    /// Cancelled when queued output is to be dropped: aborts a write in progress, so a client
    /// that stopped reading cannot hold its connection open.
    aborted: CancellationToken,
}

/// One queued frame. `position` is set for events of the durable history: the SSE and WebSocket
/// writers use it to advance the stream's cursor and to skip events already replayed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    /// Where the event sits in the history and its channel, if it has a place there.
    pub position: Option<(Position, Bytes)>,
    /// The encoded frame (for SSE and WebSocket, everything but the per-stream id).
    pub frame: Bytes,
}

impl Item {
    /// A frame with no history position (replies, non-durable messages).
    pub fn plain(frame: Bytes) -> Item {
        Item {
            position: None,
            frame,
        }
    }
}

/// What happened to a message offered with [`Outbox::push_message`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Queued for the client.
    Queued,
    /// Not queued: this message took the client over its limit, and the client is now closed.
    LimitReached,
    /// Not queued: the client was already closing.
    Closed,
}

/// What the writer gets from [`Outbox::next_batch`].
#[derive(Debug, PartialEq, Eq)]
pub enum Batch {
    /// Frames were appended to the buffer; write them.
    Frames,
    /// The client is being closed; stop after writing the buffer.
    Closed(CloseReason),
}

impl Outbox {
    /// Creates an empty, open queue.
    pub fn new() -> Self {
        Self::default()
    }

    /// Queues a reply to the client's own command. Replies are not limited here: the
    /// connection stops reading commands while too much output is queued (see
    /// [`Outbox::wait_below`]).
    pub fn push_reply(&self, frame: Bytes) {
        let mut state = self.state.lock();
        if state.closed.is_some() {
            return;
        }
        let was_empty = state.frames.is_empty();
        state.bytes += frame.len();
        state.frames.push_back(Item::plain(frame));
        drop(state);
        if was_empty {
            self.ready.notify_one();
        }
    }

    /// Queues a pub/sub message under `limit`. When the message would take the client over
    /// the limit, the client is closed instead and the message is not delivered to it.
    pub fn push_message(&self, item: Item, limit: &OutputLimit) -> Delivery {
        let (delivery, wake) = self.enqueue_message(item, limit);
        if wake {
            self.wake();
        }
        delivery
    }

    /// Like [`Outbox::push_message`], but leaves waking the writer to the caller: `true` means
    /// the queue was empty and [`Outbox::wake`] must be called. A publisher handling a batch of
    /// commands wakes each receiver once at the end of the batch, so the receiver writes the
    /// whole batch in one go instead of racing the publisher message by message.
    pub fn enqueue_message(&self, item: Item, limit: &OutputLimit) -> (Delivery, bool) {
        let mut state = self.state.lock();
        if state.closed.is_some() {
            return (Delivery::Closed, false);
        }
        let queued = state.bytes + item.frame.len();
        let over_hard = limit.hard_bytes > 0 && queued > limit.hard_bytes;
        let over_soft = limit.soft_bytes > 0 && queued > limit.soft_bytes;
        // As in Redis: the first time over the soft limit starts the clock; the client is
        // closed once it is still over the limit after more than `soft_seconds`.
        let soft_expired = if over_soft {
            match state.soft_exceeded_since {
                None => {
                    state.soft_exceeded_since = Some(Instant::now());
                    false
                }
                Some(since) => since.elapsed() > Duration::from_secs(limit.soft_seconds),
            }
        } else {
            state.soft_exceeded_since = None;
            false
        };
        if over_hard || soft_expired {
            self.close_locked(&mut state, CloseReason::OutputLimit);
            return (Delivery::LimitReached, true);
        }
        let was_empty = state.frames.is_empty();
        state.bytes = queued;
        state.frames.push_back(item);
        (Delivery::Queued, was_empty)
    }

    /// Wakes the writer (after [`Outbox::enqueue_message`] asked for it).
    pub fn wake(&self) {
        self.ready.notify_one();
    }

    /// Marks the client for closing. The first reason given wins.
    pub fn close(&self, reason: CloseReason) {
        let mut state = self.state.lock();
        if state.closed.is_none() {
            self.close_locked(&mut state, reason);
        }
        drop(state);
        self.ready.notify_one();
        self.drained.notify_waiters();
    }

    fn close_locked(&self, state: &mut State, reason: CloseReason) {
        self.closing.cancel();
        state.closed = Some(reason);
        if reason != CloseReason::AfterFlush {
            self.aborted.cancel();
            state.frames = VecDeque::new();
            state.bytes = 0;
        }
    }

    /// Completes once the client is marked for closing.
    pub async fn wait_closing(&self) {
        self.closing.cancelled().await
    }

    /// Completes once queued output is to be dropped (`Killed`, `OutputLimit`).
    pub async fn wait_aborted(&self) {
        self.aborted.cancelled().await
    }

    /// Whether the client was marked for closing, and why.
    pub fn closed(&self) -> Option<CloseReason> {
        self.state.lock().closed
    }

    /// Bytes queued and not yet handed to the writer (`omem` in `CLIENT LIST`).
    pub fn queued_bytes(&self) -> usize {
        self.state.lock().bytes
    }

    /// Number of frames queued (`oll` in `CLIENT LIST`).
    pub fn queued_frames(&self) -> usize {
        self.state.lock().frames.len()
    }

    /// Waits for frames and appends up to about `max_bytes` of them to `out` (the RESP writer).
    pub async fn next_batch(&self, out: &mut BytesMut, max_bytes: usize) -> Batch {
        self.next_with(max_bytes, |item| out.extend_from_slice(&item.frame))
            .await
    }

    /// Waits for frames and moves up to about `max_bytes` of them to `out` (the SSE and
    /// WebSocket writers, which format each event with the stream's cursor).
    pub async fn next_items(&self, out: &mut Vec<Item>, max_bytes: usize) -> Batch {
        self.next_with(max_bytes, |item| out.push(item)).await
    }

    /// Moves what is queued to `out` without waiting (a stream being ended hands over what
    /// reached it); `None` when nothing is queued and the client is not closed.
    pub fn take_items(&self, out: &mut Vec<Item>) -> Option<Batch> {
        self.take_with(usize::MAX, |item| out.push(item))
    }

    async fn next_with(&self, max_bytes: usize, mut take: impl FnMut(Item)) -> Batch {
        loop {
            if let Some(batch) = self.take_with(max_bytes, &mut take) {
                return batch;
            }
            self.ready.notified().await;
        }
    }

    fn take_with(&self, max_bytes: usize, mut take: impl FnMut(Item)) -> Option<Batch> {
        let mut state = self.state.lock();
        if !state.frames.is_empty() {
            let mut taken = 0;
            while let Some(item) = state.frames.pop_front() {
                taken += item.frame.len();
                take(item);
                if taken >= max_bytes {
                    break;
                }
            }
            state.bytes -= taken;
            if state.soft_exceeded_since.is_some() && state.bytes == 0 {
                state.soft_exceeded_since = None;
            }
            drop(state);
            self.drained.notify_waiters();
            return Some(Batch::Frames);
        }
        state.closed.map(Batch::Closed)
    }

    /// Waits until at most `bytes` are queued or the client is closing: the reader's
    /// backpressure, so a client that pipelines without reading cannot grow memory unbounded.
    pub async fn wait_below(&self, bytes: usize) {
        loop {
            let drained = self.drained.notified();
            tokio::pin!(drained);
            drained.as_mut().enable();
            {
                let state = self.state.lock();
                if state.bytes <= bytes || state.closed.is_some() {
                    return;
                }
            }
            drained.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(n: usize) -> Bytes {
        Bytes::from(vec![b'x'; n])
    }

    #[tokio::test]
    async fn batches_everything_queued_in_one_go() {
        let outbox = Outbox::new();
        outbox.push_reply(frame(3));
        assert_eq!(
            outbox.push_message(Item::plain(frame(4)), &OutputLimit::PUBSUB_DEFAULT),
            Delivery::Queued
        );
        let mut out = BytesMut::new();
        assert_eq!(outbox.next_batch(&mut out, 1 << 20).await, Batch::Frames);
        assert_eq!(out.len(), 7);
        assert_eq!(outbox.queued_bytes(), 0);
    }

    #[tokio::test]
    async fn hard_limit_closes_and_drops() {
        let outbox = Outbox::new();
        let limit = OutputLimit {
            hard_bytes: 10,
            soft_bytes: 0,
            soft_seconds: 0,
        };
        assert_eq!(
            outbox.push_message(Item::plain(frame(6)), &limit),
            Delivery::Queued
        );
        assert_eq!(
            outbox.push_message(Item::plain(frame(6)), &limit),
            Delivery::LimitReached
        );
        assert_eq!(outbox.closed(), Some(CloseReason::OutputLimit));
        assert_eq!(
            outbox.push_message(Item::plain(frame(1)), &limit),
            Delivery::Closed
        );
        let mut out = BytesMut::new();
        assert_eq!(
            outbox.next_batch(&mut out, 1 << 20).await,
            Batch::Closed(CloseReason::OutputLimit)
        );
        assert!(
            out.is_empty(),
            "queued frames of a client over its limit are dropped"
        );
    }

    #[tokio::test]
    async fn soft_limit_needs_to_last() {
        let outbox = Outbox::new();
        let limit = OutputLimit {
            hard_bytes: 0,
            soft_bytes: 5,
            soft_seconds: 0,
        };
        assert_eq!(
            outbox.push_message(Item::plain(frame(6)), &limit),
            Delivery::Queued,
            "first time over soft starts the clock"
        );
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(
            outbox.push_message(Item::plain(frame(1)), &limit),
            Delivery::LimitReached,
            "still over after soft_seconds"
        );
        let patient = Outbox::new();
        let limit = OutputLimit {
            hard_bytes: 0,
            soft_bytes: 5,
            soft_seconds: 3600,
        };
        assert_eq!(
            patient.push_message(Item::plain(frame(6)), &limit),
            Delivery::Queued
        );
        assert_eq!(
            patient.push_message(Item::plain(frame(6)), &limit),
            Delivery::Queued
        );
    }

    #[tokio::test]
    async fn close_after_flush_keeps_queued_frames() {
        let outbox = Outbox::new();
        outbox.push_reply(frame(2));
        outbox.close(CloseReason::AfterFlush);
        outbox.push_reply(frame(5));
        let mut out = BytesMut::new();
        assert_eq!(outbox.next_batch(&mut out, 1 << 20).await, Batch::Frames);
        assert_eq!(out.len(), 2, "nothing is queued after the close");
        assert_eq!(
            outbox.next_batch(&mut out, 1 << 20).await,
            Batch::Closed(CloseReason::AfterFlush)
        );
    }
}
