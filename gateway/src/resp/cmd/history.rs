//! herald's RESP extension for the durable history, so Redis-protocol consumers get the same
//! resume guarantee as SSE and WebSocket clients:
//!
//! - `HISTORY channel [AFTER cursor|0] [COUNT n]`: retained events after `cursor` (`0` or none:
//!   all retained), oldest first, at most `n` (default and largest 1000: more is an error, not
//!   a silent cut), as `[cursor, payload]` pairs. Each
//!   cursor resumes right after its event. When the history after `cursor` cannot be given in
//!   full (older than retention, from another epoch, or ahead of what a single node has, as
//!   for `HSUBSCRIBE` below), the first entry is the gap, `[hgap, channel, requested, oldest,
//!   reason]` (five elements, so no event can be mistaken for it), then what is retained (`n`
//!   events of it). `HISTORY channel LAST n`: the newest `n` (at most 1000), oldest first.
//! - `HSUBSCRIBE from channel [channel ...]`: like `SUBSCRIBE`, with history. `from` is `$`
//!   (live only), `0` (everything retained first) or a cursor (everything after it first).
//!   Confirmations are `[hsubscribe, channel, count]`; events arrive as
//!   `[hmessage, channel, cursor, payload]` (push frames in RESP3), where `cursor` is the
//!   stream's cursor after the event; a cursor older than retention, from another epoch, or
//!   ahead of what a single node has first gets `[hgap, channel, requested, oldest, reason]`.
//!   Replay hands over to live events with no gap and no duplicate. One history subscription
//!   per connection.
//! - `HUNSUBSCRIBE`: ends it (`[hunsubscribe, nil, count]`, the channels and patterns the
//!   connection still holds), after the live events that reached it (every publish sent
//!   before on the same connection included); an unfinished replay stops where it is. The
//!   history subscription's channels count in every subscription count (`SUBSCRIBE`,
//!   `UNSUBSCRIBE`, ...), as channels and patterns do.
//! - `HPUBLISH channel payload [ID message-id]`: `PUBLISH` with a message id, replying
//!   `[cursor, receivers, duplicate]`: the event's cursor (nil for non-durable namespaces), the
//!   receivers, and 1 when the message id was already committed within the dedup window (the
//!   cursor is then the original event's). A publisher retries with the same id after a
//!   failure or a failover, and the event is committed once.

use super::{Args, integer_arg, syntax_error};
use crate::hub::Format;
use crate::hub::encode::hmessage_head;
use crate::hub::outbox::Outbox;
use crate::reconnect::{Reason, ReconnectWatch};
use crate::resp::connection::{HistorySubscription, Session};
use crate::resp::frame::{Frame, Protocol};
use crate::resp::server::REPLY_BACKPRESSURE_BYTES;
use crate::stream::{Emit, EventStream, Gap, Resume, Start, check_cursor, position_text};
use bytes::{Bytes, BytesMut};
use futures::FutureExt;
use herald_storage::Cursor;
use std::panic::AssertUnwindSafe;
use tokio_util::sync::CancellationToken;

/// Default and largest `COUNT` (and largest `LAST`) of `HISTORY`: a reply's bound.
const HISTORY_COUNT: usize = 1000;

/// `HISTORY channel [AFTER cursor|0] [COUNT n]` or `HISTORY channel LAST n`.
pub(super) async fn history(session: &mut Session, args: &Args) {
    let mut after = None;
    let mut count = HISTORY_COUNT;
    let mut last = None;
    let mut after_or_count = false;
    let mut i = 2;
    while i < args.len() {
        if i + 1 >= args.len() {
            session.reply(syntax_error());
            return;
        }
        let value = &args[i + 1];
        if args[i].eq_ignore_ascii_case(b"after") {
            after_or_count = true;
            // `0` is the beginning, as in HSUBSCRIBE.
            if &value[..] == b"0" {
                after = None;
                i += 2;
                continue;
            }
            let decoded = Cursor::decode(&String::from_utf8_lossy(value))
                .map_err(|e| e.to_string())
                .and_then(|cursor| check_cursor(&cursor, &session.ctx.broker).map(|()| cursor));
            match decoded {
                Ok(cursor) => after = Some(cursor),
                Err(error) => {
                    session.reply(Frame::error(format!("ERR invalid cursor: {error}")));
                    return;
                }
            }
        } else if args[i].eq_ignore_ascii_case(b"last") {
            match integer_arg(value) {
                Ok(n) if n > 0 && n as usize <= HISTORY_COUNT => last = Some(n as usize),
                // Said, not cut silently: a client asking for more would take the newest
                // 1000 for all there is.
                Ok(n) if n > 0 => {
                    session.reply(Frame::error(format!(
                        "ERR LAST is at most {HISTORY_COUNT}: read older events by pages, with AFTER <cursor> COUNT n"
                    )));
                    return;
                }
                _ => {
                    session.reply(Frame::error("ERR LAST must be a positive integer"));
                    return;
                }
            }
        } else if args[i].eq_ignore_ascii_case(b"count") {
            after_or_count = true;
            match integer_arg(value) {
                Ok(n) if n > 0 && n as usize <= HISTORY_COUNT => count = n as usize,
                Ok(n) if n > 0 => {
                    session.reply(Frame::error(format!(
                        "ERR COUNT is at most {HISTORY_COUNT}: read more by pages, each AFTER the last cursor of the one before"
                    )));
                    return;
                }
                _ => {
                    session.reply(Frame::error("ERR COUNT must be a positive integer"));
                    return;
                }
            }
        } else {
            session.reply(syntax_error());
            return;
        }
        i += 2;
    }
    if last.is_some() && after_or_count {
        session.reply(Frame::error(
            "ERR LAST cannot be combined with AFTER or COUNT: use LAST n alone",
        ));
        return;
    }
    let broker = session.ctx.broker.clone();
    let channel = &args[1];
    if !broker.is_durable(channel) {
        session.reply(Frame::Array(Vec::new()));
        return;
    }
    // A store its members refuse (lost, replaced, restored from a backup) holds what it held,
    // not the cluster's history, and takes nothing new.
    if let Some(refused) = broker.cluster().and_then(|node| node.store_refused()) {
        session.reply(Frame::error(format!(
            "ERR {refused}: its history is not the cluster's; read from another node"
        )));
        return;
    }
    let partition = broker.partition_of(channel);
    // An event this node acknowledged (to this client or another) is in the answer, or the
    // answer is an error: a client that reads after its publish must not be told it is not
    // there.
    if !broker.caught_up([partition]).await {
        session.reply(Frame::error(
            "ERR this node has not applied events it acknowledged (it is behind its cluster, or cut off from it): retry, or read from another node",
        ));
        return;
    }
    // Only what is committed (flushed) is shown: the store may already hold the next batch
    // while its flush is in flight, and a cursor must never name an event a crash could undo.
    let committed = broker.committed_seq(partition);
    // Where the read starts, and whether the reply starts with a gap: the rules of HSUBSCRIBE,
    // SSE and WebSocket (`stream::Resume`).
    let resume = after.as_ref().map(|cursor| {
        let single_node = broker.cluster().is_none();
        Resume::new(cursor, partition, broker.epoch(), committed, single_node)
    });
    let store = broker.store();
    let events = match last {
        Some(n) => store.last(channel, n),
        None => store.history_after(channel, resume.and_then(|r| r.after()), count),
    };
    // Retention is checked after the read, so that events dropped while it ran are told too.
    let read = events.and_then(|events| {
        let Some(resume) = resume else {
            return Ok((events, None));
        };
        let floor = match resume.after() {
            Some(_) => store.retention_floor(channel)?,
            None => 0,
        };
        let gap = match resume.gap(floor) {
            Some(cause) => Some(cause.notice(channel.clone(), store.oldest(channel)?)),
            None => None,
        };
        Ok((events, gap))
    });
    match read {
        Ok((events, gap)) => {
            // A gap comes first, as `[hgap, channel, requested, oldest, reason]`: five elements
            // where an event has two, and `hgap` where an event has its cursor (never `hgap`).
            let events: Vec<Frame> = events
                .into_iter()
                .take_while(|event| event.position.seq <= committed)
                .map(|event| {
                    let mut cursor = Cursor::new(broker.epoch());
                    cursor.advance(event.position);
                    Frame::Array(vec![
                        Frame::Bulk(Bytes::from(cursor.encode())),
                        Frame::Bulk(event.payload),
                    ])
                })
                .collect();
            broker
                .hub()
                .stats()
                .replayed
                .fetch_add(events.len() as u64, std::sync::atomic::Ordering::Relaxed);
            let items = gap
                .map(|gap| Frame::Array(gap_items(gap)))
                .into_iter()
                .chain(events)
                .collect();
            session.reply(Frame::Array(items));
        }
        Err(error) => session.reply(Frame::error(format!("ERR cannot read history: {error}"))),
    }
}

/// `HPUBLISH channel payload [ID message-id]`.
pub(super) async fn hpublish(session: &mut Session, args: &Args) {
    let message_id = match &args[3..] {
        [] => None,
        [option, id] if option.eq_ignore_ascii_case(b"id") => Some(id.clone()),
        _ => {
            session.reply(syntax_error());
            return;
        }
    };
    if message_id
        .as_ref()
        .is_some_and(|id| id.len() > crate::broker::MAX_MESSAGE_ID_BYTES)
    {
        session.reply(Frame::error(format!(
            "ERR message id longer than {} bytes",
            crate::broker::MAX_MESSAGE_ID_BYTES
        )));
        return;
    }
    if let Err(reason) = crate::broker::check_publish_channel(&args[1]) {
        session.reply(Frame::error(format!("ERR {reason}")));
        return;
    }
    let broker = session.ctx.broker.clone();
    let outcome = match broker
        .enqueue(
            args[1].clone(),
            args[2].clone(),
            message_id,
            &mut session.wakes,
        )
        .await
    {
        Ok(ticket) => {
            // The reply needs the outcome, so this command waits for its commit in line.
            session.flush_replies().await;
            broker.wait(ticket).await
        }
        Err(error) => Err(error),
    };
    match outcome {
        Ok(published) => {
            let cursor = published.position.map_or(Frame::Null, |position| {
                let mut cursor = Cursor::new(broker.epoch());
                cursor.advance(position);
                Frame::Bulk(Bytes::from(cursor.encode()))
            });
            session.reply(Frame::Array(vec![
                cursor,
                Frame::Integer(published.receivers as i64),
                Frame::Integer(published.duplicate as i64),
            ]));
        }
        Err(error) => session.reply(Frame::error(format!("ERR publish failed: {error}"))),
    }
}

/// `HSUBSCRIBE from channel [channel ...]`.
pub(super) async fn hsubscribe(session: &mut Session, args: &Args) {
    if session.history.is_some() {
        session.reply(Frame::error(
            "ERR this connection already has a history subscription: HUNSUBSCRIBE first, or use another connection",
        ));
        return;
    }
    let start = match &args[1][..] {
        b"$" => Start::Live,
        b"0" => Start::Last(usize::MAX),
        cursor => match Start::from_cursor(&String::from_utf8_lossy(cursor))
            .map_err(|e| e.to_string())
            .and_then(|start| start.check(&session.ctx.broker).map(|()| start))
        {
            Ok(start) => start,
            Err(error) => {
                session.reply(Frame::error(format!("ERR invalid cursor: {error}")));
                return;
            }
        },
    };
    // No other stream takes an empty name either (and nothing is published under one).
    if args[2..].iter().any(|c| c.is_empty()) {
        session.reply(Frame::error("ERR empty channel name"));
        return;
    }
    if let Some(long) = args[2..]
        .iter()
        .find(|c| c.len() > crate::broker::MAX_CHANNEL_NAME_BYTES)
    {
        session.reply(Frame::error(format!(
            "ERR channel name of {} bytes: the limit is {}",
            long.len(),
            crate::broker::MAX_CHANNEL_NAME_BYTES
        )));
        return;
    }
    // A channel named twice is one subscription (its events come once).
    let channels: Vec<Bytes> = args[2..]
        .iter()
        .cloned()
        .collect::<indexmap::IndexSet<Bytes>>()
        .into_iter()
        .collect();
    let protocol = session.protocol;
    let format = if protocol == Protocol::Resp3 {
        Format::RespStream3
    } else {
        Format::RespStream2
    };
    let channels_count = channels.len();
    // Taken before the history is read: a skip after this moment may concern this stream.
    let mut reconnect = session.ctx.broker.reconnect_watch();
    let (mut stream, backlog) = match EventStream::open(
        session.ctx.broker.clone(),
        format,
        channels.clone(),
        start,
    )
    .await
    {
        Ok(opened) => opened,
        Err(error) => {
            session.reply(Frame::error(format!("ERR cannot read history: {error}")));
            return;
        }
    };
    let mut out = BytesMut::new();
    // Counted with the connection's other subscriptions, as Redis counts channels and patterns.
    let others = session.subscription_count(crate::hub::Kind::Channel);
    for (i, channel) in channels.iter().enumerate() {
        Frame::Push(vec![
            Frame::text("hsubscribe"),
            Frame::Bulk(channel.clone()),
            Frame::Integer((others + i + 1) as i64),
        ])
        .encode(protocol, &mut out);
    }
    write_emits(&mut out, protocol, backlog);
    session.flush_replies().await;
    let outbox = session.outbox().clone();
    outbox.push_reply(out.freeze());
    let stop = CancellationToken::new();
    let forward = {
        let outbox = outbox.clone();
        let stop = stop.clone();
        async move {
            let mut emits = Vec::new();
            // HUNSUBSCRIBE or RESET: what reached the subscription live goes out first.
            let hand_over = |stream: &mut EventStream, reconnect: &mut ReconnectWatch| {
                if let Some(reason) = reconnect.now() {
                    return end_with(&outbox, protocol, reason);
                }
                let mut emits = Vec::new();
                stream.take_queued(&mut emits);
                if !emits.is_empty() {
                    let mut out = BytesMut::new();
                    write_emits(&mut out, protocol, emits);
                    outbox.push_reply(out.freeze());
                }
            };
            loop {
                tokio::select! {
                    // Checked first: once live delivery skipped events (a snapshot install) or the
                    // node lost its quorum, nothing more may go out; the client is told why and
                    // resumes from its last cursor. Live delivery raises a skip before it hands
                    // over any event past the hole, so no such event is forwarded.
                    biased;
                    reason = reconnect.requested() => return end_with(&outbox, protocol, reason),
                    () = stop.cancelled() => return hand_over(&mut stream, &mut reconnect),
                    next = stream.next(&mut emits) => {
                        if next.is_none() {
                            // The stream passed its output limit: close the client so it resumes.
                            outbox.close(crate::hub::outbox::CloseReason::OutputLimit);
                            return;
                        }
                        // Raised between the poll above and this take: these events may be past
                        // a hole (see `ReconnectWatch::now`).
                        if let Some(reason) = reconnect.now() {
                            return end_with(&outbox, protocol, reason);
                        }
                        let mut out = BytesMut::new();
                        write_emits(&mut out, protocol, emits.drain(..));
                        outbox.push_reply(out.freeze());
                        // A slow reader holds the stream here; a skip or a lost quorum is still
                        // told at once (after what is queued), not once the client caught up.
                        tokio::select! {
                            biased;
                            reason = reconnect.requested() => return end_with(&outbox, protocol, reason),
                            () = stop.cancelled() => return hand_over(&mut stream, &mut reconnect),
                            () = outbox.wait_below(REPLY_BACKPRESSURE_BYTES) => {}
                        }
                    }
                    _ = outbox.wait_closing() => return,
                }
            }
        }
    };
    // A forwarder that panicked would leave its client waiting forever for events that no
    // longer come: the client is told, and closed, so that it resumes from its cursor.
    let forwarder = tokio::spawn(async move {
        if AssertUnwindSafe(forward).catch_unwind().await.is_err() {
            tracing::error!("a history subscription's forwarder panicked; closing its client");
            let mut out = BytesMut::new();
            Frame::error("ERR internal error in this history subscription: reconnect and resume from your cursor (HSUBSCRIBE)")
                .encode(protocol, &mut out);
            outbox.push_reply(out.freeze());
            outbox.close(crate::hub::outbox::CloseReason::AfterFlush);
        }
    });
    session.history = Some(HistorySubscription { forwarder, stop });
    session.history_channels = channels_count;
    session.record_subscription_counts();
}

/// Ends a history subscription's connection with why it must reconnect, after what it already
/// has queued.
fn end_with(outbox: &Outbox, protocol: Protocol, reason: Reason) {
    let mut out = BytesMut::new();
    Frame::error(reason.resp_error()).encode(protocol, &mut out);
    outbox.push_reply(out.freeze());
    outbox.close(crate::hub::outbox::CloseReason::AfterFlush);
}

/// `HUNSUBSCRIBE`.
pub(super) async fn hunsubscribe(session: &mut Session) {
    session.end_history().await;
    session.record_subscription_counts();
    // What the connection still holds (channels and patterns), as Redis's UNSUBSCRIBE counts.
    let count = session.subscription_count(crate::hub::Kind::Channel);
    session.reply(Frame::Push(vec![
        Frame::text("hunsubscribe"),
        Frame::Null,
        Frame::Integer(count as i64),
    ]));
}

fn write_emits(out: &mut BytesMut, protocol: Protocol, emits: impl IntoIterator<Item = Emit>) {
    let aggregate = if protocol == Protocol::Resp3 {
        b'>'
    } else {
        b'*'
    };
    for emit in emits {
        match emit {
            Emit::Event {
                cursor,
                channel,
                frame,
            } => {
                out.extend_from_slice(&hmessage_head(aggregate, &channel, Some(cursor.as_bytes())));
                out.extend_from_slice(&frame);
            }
            Emit::Transient { frame } => out.extend_from_slice(&frame),
            Emit::Gap(gap) => Frame::Push(gap_items(gap)).encode(protocol, out),
        }
    }
}

/// A gap notice's elements, `hgap, channel, requested, oldest, reason` (positions as `p-seq`,
/// nil when unknown): an `HSUBSCRIBE` push, or the first entry of a `HISTORY` reply.
fn gap_items(gap: Gap) -> Vec<Frame> {
    let text = |p| position_text(p).map_or(Frame::Null, |t| Frame::Bulk(Bytes::from(t)));
    vec![
        Frame::text("hgap"),
        Frame::Bulk(gap.channel),
        text(gap.requested),
        text(gap.oldest),
        Frame::text(gap.reason.as_str()),
    ]
}
