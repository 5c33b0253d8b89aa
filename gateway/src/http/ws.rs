//! WebSocket: `GET /ws?userId=U` and `GET /ws/alerts?userId=U`.
//!
//! The seed's protocol, JSON text messages in both directions, plus herald's resume and error
//! messages. Every event carries the cursor to resume from.
//!
//! # Server messages
//!
//! | message | when |
//! |---|---|
//! | `{"type":"connected","message":"Connected to real-time service","clientId":"ws_<id>","timestamp":"<RFC 3339>"}` | first, on connect |
//! | `{"type":"heartbeat","serverTime":"<RFC 3339>"}` | every 30 s, together with a WebSocket ping |
//! | `{"type":"subscribed","channel":"<name>","cursor":"<id>"}` | a subscription took effect; its backlog follows. `cursor` (durable channels only) is where it starts: a client that drops before the channel's first event resumes from it |
//! | `{"type":"unsubscribed","channel":"<name>"}` | nothing more of the channel will be sent |
//! | `{"type":"pong","timestamp":"<RFC 3339>"}` | the reply to `ping` |
//! | `{"id":"<cursor>","channel":"<name>",...}` | an event (see below) |
//! | `{"type":"gap","channel":..,"requested":"p-seq"\|null,"oldest":"p-seq"\|null,"reason":"retention"\|"epoch"\|"ahead"}` | a resume asked for history no longer retained (or from another store, or ahead of a single node's); what is retained follows |
//! | `{"type":"error","message":"<one-line reason>"}` | a client message was refused; the connection stays open |
//!
//! An event whose payload is a JSON object is that object with `id` and `channel` added, so the
//! seed's messages (`{"type":"job_progress","jobId":..,"progress":..}`,
//! `{"type":"alert","alertId":..,"severity":..}`) arrive as the seed sent them. Any other
//! payload (an object with a `channel` field of its own included, or with an `id` when the
//! event has a cursor: either would clash) arrives as
//! `{"id":..,"channel":..,"type":"message","data":<the payload>}`: `data` is the payload itself
//! when it is a JSON object or array, else the payload's text as a JSON string (`7`, `true`
//! and `"x"` arrive as the strings `"7"`, `"true"` and `"\"x\""`: never re-read as JSON, so no
//! number is rounded and no two payloads look alike). Events of non-durable namespaces have no
//! `id` (they cannot be resumed).
//!
//! # Client messages
//!
//! - `{"type":"subscribe","channel":{"type":"job_progress","id":"job_123"}}` subscribes to
//!   `job_progress:job_123`; `{"type":"job_progress"}` without `id` is the channel
//!   `job_progress` (an `id` that is there must be a non-empty string or a number: `null`
//!   and `""` are refused); `"channel":"any:name"` names a channel directly. herald adds
//!   `"cursor":"<id>"` (or `"lastEventId"`, as in the query), to receive everything retained
//!   after that event first (the `id` of the last event received on the channel), or
//!   `"last":N`, the last N retained events first.
//!   Subscribing to a channel already subscribed changes nothing and replays nothing.
//! - `{"type":"unsubscribe","channel":...}` with the same forms. The object form without `id`
//!   (the seed's example) removes every channel of that type: `job_progress` and all
//!   `job_progress:*`; one `unsubscribed` answers each channel removed.
//! - `{"type":"ping"}`.
//!
//! Malformed JSON, an unknown `type`, a missing or invalid channel, a malformed cursor and
//! binary messages each get an `error` message; the connection stays open.
//!
//! # Connections
//!
//! - `/ws/alerts` requires `userId` (400 without it) and starts subscribed to `alerts:<userId>`
//!   (a `subscribed` message follows `connected`); `?cursor=<id>` (or `?lastEventId=<id>`) or
//!   `?last=N` replay its history first (an empty one is not given), a malformed cursor is a
//!   400. Otherwise the protocol is the same. On both, `userId`, `cursor`, `lastEventId` and
//!   `last` take one value: one given twice is a 400.
//! - Each heartbeat goes with a WebSocket ping, which browsers answer on their own. A client from
//!   which nothing (message, ping or pong) arrived for 60 s is closed with code 1000; time the
//!   session spent writing to a slow reader (and so not reading) does not count.
//! - Client messages above 64 KiB close the connection with code 1009.
//! - A client that does not keep up with its events passes the output limit
//!   (`pubsub-output-limit`) and is closed with code 1008; one whose socket accepts nothing for
//!   60 s is dropped. Either resumes with its cursors and loses nothing still retained.
//! - At shutdown every client gets close code 1001, "server shutting down".
//! - A node that must send the client elsewhere (quorum lost, store refused or failed, history
//!   unreadable at connect) closes with code 1012 and a reason: reconnect and resume.
//!
//! The intervals and limits are [`HttpSettings`](super::HttpSettings)' `ws_heartbeat`,
//! `ws_timeout` and `ws_max_message`.

use super::sse::gap_json;
use super::{HttpState, StreamClient, error_response};
use crate::hub::Format;
use crate::hub::outbox::{CloseReason, Outbox};
use crate::reconnect::Reason;
use crate::stream::{Emit, Start, StreamSet};
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use bytes::{BufMut, Bytes, BytesMut};
use futures::{SinkExt, StreamExt};
use serde_json::{Map, Value};
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

/// How long a close frame may take to go out, and how long the peer's reply is awaited.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// A write that held the session up at least this long moves the idle deadline on by its
/// length (shorter ones are not worth a timer update per write).
const READING_PAUSE_COUNTED: Duration = Duration::from_millis(50);
/// Most bytes read from the socket at once, and the read buffer every connection keeps.
/// tungstenite's default, 128 KiB, stayed resident per connection (and was zeroed on every
/// read); client messages are small (a subscribe is about 100 bytes), and a larger one is read
/// in several pieces.
const READ_BUFFER: usize = 1024;
/// Outgoing frames are buffered up to this size before a write while a batch is queued; the
/// buffer keeps the largest size it ever reached, so this bounds what a connection that once
/// had a burst (a replay, a slow moment) keeps afterwards. tungstenite's default is 128 KiB.
const WRITE_BUFFER: usize = 8 * 1024;

/// `GET /ws?userId=U`: a connection that subscribes with messages.
pub async fn connect(
    State(state): State<HttpState>,
    RawQuery(query): RawQuery,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let (_, user_id) = match params_and_user(query.as_deref()) {
        Ok(parsed) => parsed,
        Err(reason) => return error_response(StatusCode::BAD_REQUEST, reason),
    };
    match upgrade {
        Ok(upgrade) => open(state, upgrade, user_id, Vec::new(), Start::Live).await,
        Err(rejection) => rejection.into_response(),
    }
}

/// `GET /ws/alerts?userId=U`: a connection subscribed to `alerts:U` from the start.
pub async fn alerts(
    State(state): State<HttpState>,
    RawQuery(query): RawQuery,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let (params, user_id) = match params_and_user(query.as_deref()) {
        Ok(parsed) => parsed,
        Err(reason) => return error_response(StatusCode::BAD_REQUEST, reason),
    };
    let Some(user_id) = user_id else {
        return error_response(
            StatusCode::BAD_REQUEST,
            "missing userId: connect to /ws/alerts?userId=<user>",
        );
    };
    let start = match start_param(&params).and_then(|start| {
        start
            .check(state.broker())
            .map(|()| start)
            .map_err(|e| format!("invalid cursor: {e}"))
    }) {
        Ok(start) => start,
        Err(reason) => return error_response(StatusCode::BAD_REQUEST, reason),
    };
    match upgrade {
        Ok(upgrade) => {
            let channel = Bytes::from(format!("alerts:{user_id}"));
            if let Err(reason) = super::check_channels([&channel[..]], 0) {
                return error_response(StatusCode::BAD_REQUEST, reason);
            }
            open(state, upgrade, Some(user_id), vec![channel], start).await
        }
        Err(rejection) => rejection.into_response(),
    }
}

/// A WebSocket query's parameters and its `userId`.
type ParamsAndUser = (Vec<(String, String)>, Option<String>);

/// The query's parameters and its `userId` (`None` when absent or empty), or why the query
/// is refused: what both WebSocket endpoints read first.
fn params_and_user(query: Option<&str>) -> Result<ParamsAndUser, String> {
    let params = super::query_params(query)?;
    let user_id = param(&params, "userId")?.filter(|u| !u.is_empty());
    Ok((params, user_id))
}

/// The single-valued parameter `name`, or why the query is refused (given twice).
fn param(params: &[(String, String)], name: &str) -> Result<Option<String>, String> {
    super::single_param(params, name).map(|value| value.map(str::to_string))
}

/// `?cursor=` (or `?lastEventId=`), else `?last=N`, else live; an empty value is not given.
fn start_param(params: &[(String, String)]) -> Result<Start, String> {
    let (cursor, last_event_id) = (param(params, "cursor")?, param(params, "lastEventId")?);
    let last = super::last_param(params)?;
    if let Some(cursor) = cursor.or(last_event_id).filter(|c| !c.trim().is_empty()) {
        return Start::from_cursor(&cursor).map_err(|e| format!("invalid cursor: {e}"));
    }
    Ok(last.map_or(Start::Live, Start::Last))
}

/// Opens the stream before upgrading (so nothing published meanwhile is missed; in a cluster,
/// once the other members know of it), then hands it to the session. A history that cannot be
/// read upgrades and closes at once with [`history_failed`]'s frame.
async fn open(
    state: HttpState,
    upgrade: WebSocketUpgrade,
    user_id: Option<String>,
    channels: Vec<Bytes>,
    start: Start,
) -> Response {
    let mut streams = StreamSet::new(state.broker().clone(), Format::WebSocket);
    let backlog = match streams.subscribe(channels, start).await {
        Ok(backlog) => backlog,
        Err(error) => {
            tracing::warn!(%error, "a WebSocket could not read its history; told to reconnect");
            return upgrade.on_upgrade(|mut socket| async move {
                let _ = tokio::time::timeout(
                    CLOSE_GRACE,
                    socket.send(Message::Close(Some(history_failed()))),
                )
                .await;
            });
        }
    };
    let max = state.settings().ws_max_message;
    upgrade
        .max_message_size(max)
        .max_frame_size(max)
        // Both buffers stay allocated for the connection's life: tungstenite's 128 KiB read
        // buffer made an idle WebSocket cost 138 KiB of RSS (see the constants).
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .on_upgrade(move |socket| {
            let tracked = state.clone();
            tracked.track(session(socket, state, streams, backlog, user_id))
        })
}

/// The close frame of a connection whose history could not be read at open: upgraded and
/// closed with 1012 and a reason, like every other "reconnect and resume" end. A refused
/// handshake (503) reaches a browser's `WebSocket` as a bare 1006, with no reason to act on.
fn history_failed() -> CloseFrame {
    CloseFrame {
        code: 1012,
        reason: Utf8Bytes::from_static(
            "this node cannot read the history now: reconnect and resume from your cursor",
        ),
    }
}

/// A client message, as the session sees it.
#[derive(Debug)]
enum Incoming {
    /// A text message.
    Text(Utf8Bytes),
    /// A binary message (refused).
    Binary,
    /// A ping or pong: the client is alive.
    Alive,
    /// A close frame: tungstenite answers it, and the next read ends the connection.
    Closing,
}

/// What a read from the socket means for the session: a message, or the end (the client went
/// away, or broke the protocol).
fn incoming(read: Option<Result<Message, axum::Error>>) -> Result<Incoming, End> {
    match read {
        None => Err(End::Gone),
        Some(Ok(Message::Text(text))) => Ok(Incoming::Text(text)),
        Some(Ok(Message::Binary(_))) => Ok(Incoming::Binary),
        Some(Ok(Message::Ping(_) | Message::Pong(_))) => Ok(Incoming::Alive),
        Some(Ok(Message::Close(_))) => Ok(Incoming::Closing),
        Some(Err(error)) => Err(match fault(&error) {
            Some((code, reason)) => End::Fault(code, reason),
            None => End::Gone,
        }),
    }
}

/// Why a session ends.
#[derive(Debug)]
enum End {
    /// The client closed the connection, or it broke.
    Gone,
    /// The node is shutting down.
    Shutdown,
    /// The client must reconnect and resume from its cursor (see `reconnect`).
    Reconnect(Reason),
    /// Nothing came from the client for `ws_timeout`.
    Idle,
    /// The client passed its output limit.
    Slow,
    /// A write made no progress for `ws_timeout`.
    Stalled,
    /// The client broke the protocol.
    Fault(u16, String),
}

impl End {
    /// The close frame to send, if one can still be sent.
    fn close_frame(self, max_message: usize) -> Option<CloseFrame> {
        let (code, reason) = match self {
            End::Gone => return None,
            End::Shutdown => (1001, "server shutting down".to_string()),
            End::Reconnect(reason) => (1012, reason.ws_close_reason().to_string()),
            End::Idle => (
                1000,
                "idle timeout: nothing received from the client".to_string(),
            ),
            End::Slow => (
                1008,
                "too slow: output limit passed; reconnect and resume from your cursor".to_string(),
            ),
            End::Stalled => (1008, "the client stopped reading".to_string()),
            End::Fault(1009, _) => (
                1009,
                format!("message too big: the limit is {max_message} bytes"),
            ),
            End::Fault(code, reason) => (code, reason),
        };
        Some(CloseFrame {
            code,
            reason: Utf8Bytes::from(truncate(&reason, 123)),
        })
    }
}

/// The session's socket. One task reads and writes it (no split halves, reader task or
/// channel between them: each of those stayed allocated for every idle connection). Every
/// write is abandoned when the client passes its output limit, the node shuts down, or the
/// socket accepts nothing for `stall`.
struct Socket {
    socket: WebSocket,
    outbox: Arc<Outbox>,
    shutdown: CancellationToken,
    stall: Duration,
}

impl Socket {
    /// The next message from the client (cancel-safe: a partly read frame stays buffered).
    async fn read(&mut self) -> Result<Incoming, End> {
        incoming(self.socket.next().await)
    }

    /// Sends `messages` (queued with `feed`, then one flush). The write's state is boxed: held
    /// while a write is under way instead of in every idle session's future (128 bytes less per
    /// connection, for one allocation per write).
    async fn send(&mut self, messages: Vec<Message>) -> Result<(), End> {
        if messages.is_empty() {
            return Ok(());
        }
        let socket = &mut self.socket;
        let write = async move {
            for message in messages {
                socket.feed(message).await?;
            }
            socket.flush().await
        };
        let (outbox, shutdown, stall) = (&self.outbox, &self.shutdown, self.stall);
        Box::pin(async move {
            tokio::select! {
                written = write => written.map_err(|_| End::Gone),
                _ = outbox.wait_aborted() => Err(End::Slow),
                _ = shutdown.cancelled() => Err(End::Shutdown),
                _ = tokio::time::sleep(stall) => Err(End::Stalled),
            }
        })
        .await
    }

    /// [`send`](Self::send), with the idle deadline moved on by the time the write took: while
    /// a write to a slow reader is under way nothing is read (not even the pong to a heartbeat
    /// ping that waits behind it), so that time is not the client's silence.
    async fn send_reading_paused(
        &mut self,
        messages: Vec<Message>,
        idle: Pin<&mut tokio::time::Sleep>,
    ) -> Result<(), End> {
        let started = Instant::now();
        self.send(messages).await?;
        let paused = started.elapsed();
        if paused >= READING_PAUSE_COUNTED {
            let deadline = idle.deadline() + paused;
            idle.reset(deadline);
        }
        Ok(())
    }

    /// Sends a close frame, giving up after [`CLOSE_GRACE`].
    async fn close(&mut self, frame: CloseFrame) {
        let _ =
            tokio::time::timeout(CLOSE_GRACE, self.socket.send(Message::Close(Some(frame)))).await;
    }

    /// After a close frame: reads on until the connection ends (the client's close reply, then
    /// the end), for at most [`CLOSE_GRACE`]. A few protocol errors are read past (the rest of
    /// an offending message); more, or a failed connection, end it.
    async fn drain(&mut self) {
        let read = async {
            let mut faults = 0;
            while let Some(read) = self.socket.next().await {
                if let Err(error) = read {
                    faults += 1;
                    if fault(&error).is_none() || faults > 4 {
                        break;
                    }
                }
            }
        };
        let _ = tokio::time::timeout(CLOSE_GRACE, read).await;
    }
}

/// Counts the events sent to one client, for the stats endpoint (when queued for the socket).
struct Counter {
    state: HttpState,
    events_sent: Arc<AtomicU64>,
}

impl Counter {
    fn add(&self, n: u64) {
        if n > 0 {
            self.events_sent.fetch_add(n, Ordering::Relaxed);
            self.state.ws_clients().count_events(n);
        }
    }
}

/// A connected client's session: set up here, run by the returned future until the client
/// leaves or is closed.
///
/// Not an `async fn`: the future of one keeps its arguments twice (as arguments, and as the
/// locals they are moved into: about 500 bytes here) for the session's whole life, while the
/// `async move` block below holds each value once.
fn session(
    socket: WebSocket,
    state: HttpState,
    mut streams: StreamSet,
    backlog: Vec<Emit>,
    user_id: Option<String>,
) -> impl Future<Output = ()> + Send + 'static {
    let id = state.broker().hub().next_client_id();
    let events_sent = Arc::new(AtomicU64::new(0));
    let guard = state.ws_clients().register(
        id,
        StreamClient {
            channels: streams.channels(),
            connected_at: SystemTime::now(),
            events_sent: events_sent.clone(),
            user_id: user_id.clone(),
        },
    );
    tracing::debug!(
        id,
        user_id = user_id.as_deref(),
        "WebSocket client connected"
    );
    let max_message = state.settings().ws_max_message;
    let mut socket = Socket {
        socket,
        outbox: streams.outbox().clone(),
        shutdown: state.shutdown().clone(),
        stall: state.settings().ws_timeout,
    };
    let counter = Counter {
        state: state.clone(),
        events_sent,
    };
    async move {
        let Err(end) = run(&state, id, &counter, &mut socket, &mut streams, backlog).await;
        tracing::debug!(id, reason = ?end, "WebSocket client disconnected");
        if let Some(frame) = end.close_frame(max_message) {
            socket.close(frame).await;
            socket.drain().await;
        }
        // Listed in the stats until here.
        drop(guard);
    }
}

/// The session loop: live events, client messages, heartbeats, the idle timeout, shutdown.
async fn run(
    state: &HttpState,
    id: u64,
    counter: &Counter,
    socket: &mut Socket,
    stream: &mut StreamSet,
    backlog: Vec<Emit>,
) -> Result<Infallible, End> {
    let settings = state.settings();
    let mut reconnect = state.broker().reconnect_watch();
    let mut first = vec![text(format!(
        r#"{{"type":"connected","message":"Connected to real-time service","clientId":"ws_{}","timestamp":"{}"}}"#,
        id,
        rfc3339(SystemTime::now())
    ))];
    for channel in stream.channels() {
        first.push(subscribed(stream, &channel));
    }
    counter.add(push_emits(&mut first, backlog, &stream.channels()));
    socket.send(first).await?;

    let mut heartbeat = tokio::time::interval_at(
        Instant::now() + settings.ws_heartbeat,
        settings.ws_heartbeat,
    );
    heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let idle = tokio::time::sleep(settings.ws_timeout);
    tokio::pin!(idle);
    let mut emits = Vec::new();
    loop {
        tokio::select! {
            // In this order: a reconnect request wins over a ready event, so that after a
            // history skip no event past the hole reaches the client before it must resume.
            biased;
            _ = state.shutdown().cancelled() => return Err(End::Shutdown),
            reason = reconnect.requested() => return Err(End::Reconnect(reason)),
            incoming = socket.read() => {
                let incoming = incoming?;
                if matches!(incoming, Incoming::Closing) {
                    continue;
                }
                idle.as_mut().reset(Instant::now() + settings.ws_timeout);
                let mut out = Vec::new();
                let sent = match incoming {
                    Incoming::Alive | Incoming::Closing => 0,
                    Incoming::Binary => {
                        out.push(error_message("binary messages are not supported: send JSON text"));
                        0
                    }
                    // Boxed: a subscribe may wait for the cluster, and that state is not kept
                    // in every idle session's future.
                    Incoming::Text(message) => {
                        Box::pin(handle(state, id, stream, &message, &mut out)).await
                    }
                };
                counter.add(sent);
                socket.send_reading_paused(out, idle.as_mut()).await?;
            }
            next = stream.next(&mut emits) => {
                // Events ready at every pass would keep the idle branch (last) from ever being
                // polled: nothing came from the client (its branch comes first), so judge here.
                if Instant::now() >= idle.deadline() {
                    return Err(End::Idle);
                }
                if next.is_none() {
                    return Err(match socket.outbox.closed() {
                        Some(CloseReason::AfterFlush) => End::Shutdown,
                        _ => End::Slow,
                    });
                }
                if let Some(reason) = reconnect.now() {
                    return Err(End::Reconnect(reason));
                }
                let mut out = Vec::with_capacity(emits.len());
                counter.add(push_emits(&mut out, emits.drain(..), &stream.channels()));
                socket.send_reading_paused(out, idle.as_mut()).await?;
            }
            _ = heartbeat.tick() => {
                let beat = text(format!(
                    r#"{{"type":"heartbeat","serverTime":"{}"}}"#,
                    rfc3339(SystemTime::now())
                ));
                socket.send_reading_paused(vec![beat, Message::Ping(Bytes::new())], idle.as_mut()).await?;
            }
            // After the client's messages: one that came while a write held the session up
            // counts as activity, not as silence.
            _ = &mut idle => return Err(End::Idle),
        }
    }
}

/// The close code for a read error, or `None` when the connection itself failed.
fn fault(error: &axum::Error) -> Option<(u16, String)> {
    // axum does not expose tungstenite's error type; its messages are stable.
    let text = error.to_string();
    if text.starts_with("Space limit exceeded") {
        Some((1009, text))
    } else if text.starts_with("UTF-8") {
        Some((1007, "invalid UTF-8 in a text message".to_string()))
    } else if text.starts_with("WebSocket protocol error") {
        Some((1002, text))
    } else {
        None
    }
}

/// Handles one client message, appending the replies (and any backlog) to `out`; returns how
/// many events were appended. A subscribe's `subscribed` comes once the subscription is in
/// place (in a cluster, once the other members know of it).
async fn handle(
    state: &HttpState,
    id: u64,
    stream: &mut StreamSet,
    message: &str,
    out: &mut Vec<Message>,
) -> u64 {
    let request = match parse_request(message) {
        Ok(request) => request,
        Err(reason) => {
            out.push(error_message(&reason));
            return 0;
        }
    };
    match request {
        Request::Ping => {
            out.push(text(format!(
                r#"{{"type":"pong","timestamp":"{}"}}"#,
                rfc3339(SystemTime::now())
            )));
            0
        }
        Request::Subscribe { channel, start } => {
            if let Err(reason) = start.check(state.broker()) {
                out.push(error_message(&format!("invalid cursor: {reason}")));
                return 0;
            }
            // Limits (a repeated subscribe does not add a channel).
            let held = stream.channels();
            let others = held.len() - usize::from(held.contains(&channel));
            if let Err(reason) = super::check_channels([&channel[..]], others) {
                out.push(error_message(&format!(
                    "cannot subscribe to {}: {reason}",
                    shortened(&String::from_utf8_lossy(&channel))
                )));
                return 0;
            }
            // Subscribing again with a cursor or `last` restarts that channel from there (its
            // queued live events are dropped: the replay covers them).
            if held.contains(&channel) && !matches!(start, Start::Live) {
                stream.unsubscribe(std::slice::from_ref(&channel));
            }
            match stream.subscribe(vec![channel.clone()], start).await {
                Ok(backlog) => {
                    state.ws_clients().set_channels(id, stream.channels());
                    out.push(subscribed(stream, &channel));
                    push_emits(out, backlog, &stream.channels())
                }
                Err(error) => {
                    out.push(error_message(&format!(
                        "cannot subscribe to {}: {error}",
                        shortened(&String::from_utf8_lossy(&channel))
                    )));
                    0
                }
            }
        }
        Request::Unsubscribe { target } => {
            let channels: Vec<Bytes> = match &target {
                Target::Channel(channel) => vec![channel.clone()],
                Target::Type(kind) => {
                    let prefix = format!("{kind}:");
                    stream
                        .channels()
                        .iter()
                        .filter(|c| c[..] == *kind.as_bytes() || c.starts_with(prefix.as_bytes()))
                        .cloned()
                        .collect()
                }
            };
            stream.unsubscribe(&channels);
            state.ws_clients().set_channels(id, stream.channels());
            if channels.is_empty() {
                // Nothing of that type: confirm the name asked for, as Redis does.
                if let Target::Type(kind) = target {
                    out.push(control("unsubscribed", kind.as_bytes()));
                }
            }
            for channel in &channels {
                out.push(control("unsubscribed", channel));
            }
            0
        }
    }
}

/// A parsed client message.
#[derive(Debug)]
enum Request {
    Subscribe { channel: Bytes, start: Start },
    Unsubscribe { target: Target },
    Ping,
}

/// What an `unsubscribe` names.
#[derive(Debug, PartialEq, Eq)]
enum Target {
    /// One channel.
    Channel(Bytes),
    /// `{"type":T}` without `id`: the channel `T` and every `T:*` channel.
    Type(String),
}

const TYPES: &str = "expected subscribe, unsubscribe or ping";

fn parse_request(message: &str) -> Result<Request, String> {
    let value: Value = serde_json::from_str(message).map_err(|e| format!("invalid JSON: {e}"))?;
    let Value::Object(map) = value else {
        return Err(format!("expected a JSON object with a \"type\": {TYPES}"));
    };
    let kind = match map.get("type") {
        Some(Value::String(kind)) => kind.as_str(),
        Some(_) => return Err(format!("\"type\" must be a string: {TYPES}")),
        None => return Err(format!("missing \"type\": {TYPES}")),
    };
    match kind {
        "ping" => Ok(Request::Ping),
        "subscribe" => {
            let channel = match target(&map, "subscribe")? {
                Target::Channel(channel) => channel,
                Target::Type(kind) => Bytes::from(kind),
            };
            Ok(Request::Subscribe {
                channel,
                start: start_field(&map)?,
            })
        }
        "unsubscribe" => Ok(Request::Unsubscribe {
            target: target(&map, "unsubscribe")?,
        }),
        other => Err(format!(
            "unknown message type {}: {TYPES}",
            serde_json::to_string(&shortened(other)).expect("strings serialize")
        )),
    }
}

/// The `channel` field: `"name"` or `{"type":T,"id":I}` (`T:I`), `{"type":T}`.
fn target(map: &Map<String, Value>, verb: &str) -> Result<Target, String> {
    let expected = "a channel name or an object {\"type\":..,\"id\":..}";
    match map.get("channel") {
        None | Some(Value::Null) => Err(format!("{verb} needs a \"channel\": {expected}")),
        Some(Value::String(name)) if name.is_empty() => Err("empty channel name".to_string()),
        Some(Value::String(name)) => Ok(Target::Channel(Bytes::from(name.clone()))),
        Some(Value::Object(channel)) => {
            let kind = match channel.get("type") {
                Some(Value::String(kind)) if !kind.is_empty() => kind,
                _ => return Err("a channel object needs a non-empty string \"type\"".to_string()),
            };
            match channel.get("id") {
                // `"id": null` is refused like `""`: it is what a client whose id is not set
                // yet sends, and it must not quietly get the bare type's channel.
                None => Ok(Target::Type(kind.clone())),
                Some(Value::String(id)) if !id.is_empty() => {
                    Ok(Target::Channel(Bytes::from(format!("{kind}:{id}"))))
                }
                Some(Value::Number(id)) => Ok(Target::Channel(Bytes::from(format!("{kind}:{id}")))),
                Some(_) => {
                    Err("a channel's \"id\" must be a non-empty string or a number".to_string())
                }
            }
        }
        Some(_) => Err(format!("\"channel\" must be {expected}")),
    }
}

/// Where a subscription starts: `cursor` (or `lastEventId`, the name the query and SSE use),
/// else `last`, else live.
fn start_field(map: &Map<String, Value>) -> Result<Start, String> {
    let cursor = match map.get("cursor") {
        None | Some(Value::Null) => map.get("lastEventId"),
        given => given,
    };
    match cursor {
        None | Some(Value::Null) => {}
        Some(Value::String(cursor)) if cursor.trim().is_empty() => {}
        Some(Value::String(cursor)) => {
            return Start::from_cursor(cursor).map_err(|e| format!("invalid cursor: {e}"));
        }
        Some(_) => {
            return Err(
                "\"cursor\" must be a string: the id of the last event received".to_string(),
            );
        }
    }
    match map.get("last") {
        None | Some(Value::Null) => Ok(Start::Live),
        Some(last) => last
            .as_u64()
            .map(|n| Start::Last(usize::try_from(n).unwrap_or(usize::MAX)))
            .ok_or_else(|| "\"last\" must be a whole number".to_string()),
    }
}

/// Appends the messages of `emits` to `out`, dropping events of channels no longer subscribed
/// (queued before an `unsubscribe`); returns how many events were appended.
fn push_emits(
    out: &mut Vec<Message>,
    emits: impl IntoIterator<Item = Emit>,
    channels: &[Bytes],
) -> u64 {
    let mut events = 0;
    for emit in emits {
        let message = match emit {
            Emit::Event {
                cursor,
                channel,
                frame,
            } => {
                if !channels.contains(&channel) {
                    continue;
                }
                let mut message = BytesMut::with_capacity(frame.len() + cursor.len() + 8);
                message.put_slice(b"{\"id\":\"");
                message.put_slice(cursor.as_bytes());
                message.put_slice(b"\",");
                message.put_slice(&frame);
                message.freeze()
            }
            Emit::Transient { frame } => {
                if frame_channel(&frame)
                    .is_some_and(|c| !channels.iter().any(|s| s[..] == *c.as_bytes()))
                {
                    continue;
                }
                let mut message = BytesMut::with_capacity(frame.len() + 1);
                message.put_u8(b'{');
                message.put_slice(&frame);
                message.freeze()
            }
            Emit::Gap(gap) => {
                out.push(bytes_text(gap_json(&gap)));
                continue;
            }
        };
        out.push(bytes_text(message));
        events += 1;
    }
    events
}

/// The channel of a WebSocket frame (it starts with `"channel":"<name>"`).
fn frame_channel(frame: &[u8]) -> Option<String> {
    let rest = frame.strip_prefix(b"\"channel\":")?;
    serde_json::Deserializer::from_slice(rest)
        .into_iter::<String>()
        .next()?
        .ok()
}

fn bytes_text(bytes: Bytes) -> Message {
    match Utf8Bytes::try_from(bytes) {
        Ok(text) => Message::Text(text),
        // Frames are built from JSON and lossily decoded names, so this does not happen.
        Err(_) => error_message("internal error: a message was not UTF-8"),
    }
}

fn text(message: String) -> Message {
    Message::Text(Utf8Bytes::from(message))
}

/// `{"type":<kind>,"channel":<channel>}`.
fn control(kind: &str, channel: &[u8]) -> Message {
    let mut out = BytesMut::with_capacity(channel.len() + 32);
    out.put_slice(format!("{{\"type\":\"{kind}\",\"channel\":").as_bytes());
    crate::hub::encode::put_json_string(&mut out, channel);
    out.put_u8(b'}');
    bytes_text(out.freeze())
}

/// `{"type":"subscribed","channel":..,"cursor":..}`: `cursor` (a durable channel's only) is
/// where the subscription starts, for a client that drops before its first event to resume
/// from (see [`crate::stream::EventStream::resume_cursor`]).
fn subscribed(stream: &StreamSet, channel: &[u8]) -> Message {
    let Some(cursor) = stream.resume_cursor(channel) else {
        return control("subscribed", channel);
    };
    let mut out = BytesMut::with_capacity(channel.len() + cursor.len() + 48);
    out.put_slice(b"{\"type\":\"subscribed\",\"channel\":");
    crate::hub::encode::put_json_string(&mut out, channel);
    out.put_slice(b",\"cursor\":\"");
    out.put_slice(cursor.as_bytes());
    out.put_slice(b"\"}");
    bytes_text(out.freeze())
}

fn error_message(reason: &str) -> Message {
    text(format!(
        r#"{{"type":"error","message":{}}}"#,
        serde_json::to_string(reason).expect("strings serialize")
    ))
}

/// Most bytes of a client's name (a channel, a message type) quoted in an error message.
const QUOTED_BYTES: usize = 64;

/// `text` as an error message quotes it: whole up to [`QUOTED_BYTES`], else its first
/// [`QUOTED_BYTES`] followed by `…`, so that the message stays one short line and does not
/// pass the prefix off as the whole name.
fn shortened(text: &str) -> std::borrow::Cow<'_, str> {
    let kept = truncate(text, QUOTED_BYTES);
    if kept.len() == text.len() {
        std::borrow::Cow::Borrowed(text)
    } else {
        std::borrow::Cow::Owned(format!("{kept}…"))
    }
}

/// The longest prefix of `text` of at most `max` bytes ending on a character boundary.
fn truncate(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// `time` as RFC 3339 in UTC with milliseconds, as JavaScript's `toISOString` writes it:
/// `2025-12-05T10:00:00.000Z`.
fn rfc3339(time: SystemTime) -> String {
    let since = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (hour, minute, second) = (secs % 86_400 / 3600, secs % 3600 / 60, secs % 60);
    // Days to civil date (Howard Hinnant's algorithm), for days since 1970-01-01.
    let z = (secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}.{:03}Z",
        since.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64, millis: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_millis(millis)
    }

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(rfc3339(at(0, 0)), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(at(1_764_928_800, 7)), "2025-12-05T10:00:00.007Z");
        assert_eq!(rfc3339(at(1_709_164_800, 0)), "2024-02-29T00:00:00.000Z");
        assert_eq!(rfc3339(at(951_868_799, 999)), "2000-02-29T23:59:59.999Z");
        assert_eq!(rfc3339(at(4_107_542_400, 0)), "2100-03-01T00:00:00.000Z");
    }

    fn subscribed_to(message: &str) -> Bytes {
        match parse_request(message).unwrap() {
            Request::Subscribe { channel, .. } => channel,
            other => panic!("not a subscribe: {other:?}"),
        }
    }

    #[test]
    fn channels_from_objects_and_names() {
        assert_eq!(
            subscribed_to(
                r#"{"type":"subscribe","channel":{"type":"job_progress","id":"job_123"}}"#
            ),
            "job_progress:job_123"
        );
        assert_eq!(
            subscribed_to(r#"{"type":"subscribe","channel":{"type":"campaign_metrics","id":42}}"#),
            "campaign_metrics:42"
        );
        assert_eq!(
            subscribed_to(r#"{"type":"subscribe","channel":{"type":"job_progress"}}"#),
            "job_progress"
        );
        assert_eq!(
            subscribed_to(r#"{"type":"subscribe","channel":"plain:name"}"#),
            "plain:name"
        );
        match parse_request(r#"{"type":"unsubscribe","channel":{"type":"job_progress"}}"#) {
            Ok(Request::Unsubscribe { target }) => {
                assert_eq!(target, Target::Type("job_progress".into()))
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse_request(r#"{"type":"ping"}"#),
            Ok(Request::Ping)
        ));
    }

    #[test]
    fn start_from_cursor_or_last() {
        let last = parse_request(r#"{"type":"subscribe","channel":"a","last":3}"#).unwrap();
        assert!(matches!(
            last,
            Request::Subscribe {
                start: Start::Last(3),
                ..
            }
        ));
        let named_as_in_sse =
            parse_request(r#"{"type":"subscribe","channel":"a","lastEventId":"!!"}"#).unwrap_err();
        assert!(
            named_as_in_sse.contains("invalid cursor"),
            "{named_as_in_sse}"
        );
        let live = parse_request(r#"{"type":"subscribe","channel":"a","cursor":""}"#).unwrap();
        assert!(matches!(
            live,
            Request::Subscribe {
                start: Start::Live,
                ..
            }
        ));
    }

    #[test]
    fn refusals_are_one_line() {
        for bad in [
            "not json",
            "[1,2]",
            r#"{"kind":"ping"}"#,
            r#"{"type":7}"#,
            r#"{"type":"dance"}"#,
            r#"{"type":"subscribe"}"#,
            r#"{"type":"subscribe","channel":""}"#,
            r#"{"type":"subscribe","channel":5}"#,
            r#"{"type":"subscribe","channel":{"id":"x"}}"#,
            r#"{"type":"subscribe","channel":{"type":"a","id":[]}}"#,
            r#"{"type":"subscribe","channel":{"type":"a","id":null}}"#,
            r#"{"type":"subscribe","channel":{"type":"a","id":""}}"#,
            r#"{"type":"unsubscribe","channel":{"type":"a","id":null}}"#,
            r#"{"type":"subscribe","channel":"a","cursor":"!!"}"#,
            r#"{"type":"subscribe","channel":"a","cursor":5}"#,
            r#"{"type":"subscribe","channel":"a","last":-1}"#,
            r#"{"type":"unsubscribe"}"#,
        ] {
            let reason = parse_request(bad).expect_err(bad);
            assert!(
                !reason.is_empty() && !reason.contains('\n'),
                "{bad}: {reason}"
            );
        }
        let long = format!(r#"{{"type":"{}"}}"#, "x".repeat(10_000));
        assert_eq!(
            parse_request(&long).unwrap_err(),
            format!("unknown message type \"{}…\": {TYPES}", "x".repeat(64))
        );
        assert_eq!(shortened("short"), "short");
        assert_eq!(shortened(&"é".repeat(40)), format!("{}…", "é".repeat(32)));
    }

    #[test]
    fn transient_frames_name_their_channel() {
        let frame = crate::hub::encode::websocket_tail(b"a \"b\" \xc3\xa9", b"{\"x\":1}", true);
        assert_eq!(frame_channel(&frame).as_deref(), Some("a \"b\" é"));
        assert_eq!(frame_channel(b"nothing"), None);
    }

    #[test]
    fn close_reasons_fit_a_close_frame() {
        let frame = End::Fault(1002, "é".repeat(100))
            .close_frame(65_536)
            .unwrap();
        assert!(frame.reason.len() <= 123);
        assert_eq!(
            End::Fault(1009, String::new())
                .close_frame(10)
                .unwrap()
                .code,
            1009
        );
        assert!(End::Gone.close_frame(10).is_none());
        let failed = history_failed();
        assert_eq!(
            failed.code, 1012,
            "the code every reconnect-and-resume end uses"
        );
        assert!(failed.reason.len() <= 123);
    }

    /// A node's HTTP surface in this process, with short WebSocket intervals; a raw client
    /// (the handshake and unmasked server frames are simple enough to read by hand).
    mod live {
        use super::super::super::HttpSettings;
        use super::super::super::test_node::{self, TestNode};
        use super::*;
        use std::net::SocketAddr;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        use tokio::net::TcpStream;

        async fn start(heartbeat: Duration, timeout: Duration) -> TestNode {
            let settings = HttpSettings {
                ws_heartbeat: heartbeat,
                ws_timeout: timeout,
                ..HttpSettings::default()
            };
            test_node::start("ws", settings).await
        }

        async fn handshake(addr: SocketAddr) -> TcpStream {
            let mut tcp = TcpStream::connect(addr).await.unwrap();
            tcp.write_all(
                b"GET /ws HTTP/1.1\r\nHost: herald\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                  Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
            )
            .await
            .unwrap();
            let mut head = Vec::new();
            while !head.ends_with(b"\r\n\r\n") {
                head.push(tcp.read_u8().await.unwrap());
            }
            assert!(
                head.starts_with(b"HTTP/1.1 101"),
                "{}",
                String::from_utf8_lossy(&head)
            );
            tcp
        }

        /// The next frame's opcode and payload; `None` at the end of the connection.
        async fn frame(tcp: &mut TcpStream) -> Option<(u8, Vec<u8>)> {
            let read = async {
                let mut head = [0u8; 2];
                tcp.read_exact(&mut head).await.ok()?;
                let len = match head[1] & 0x7f {
                    126 => u64::from(tcp.read_u16().await.ok()?),
                    127 => tcp.read_u64().await.ok()?,
                    n => u64::from(n),
                };
                let mut payload = vec![0; len as usize];
                tcp.read_exact(&mut payload).await.ok()?;
                Some((head[0] & 0x0f, payload))
            };
            tokio::time::timeout(Duration::from_secs(30), read)
                .await
                .expect("a frame in time")
        }

        /// Reads frames until a close frame; returns the text messages' types, the number of
        /// pings, and the close code.
        async fn until_close(tcp: &mut TcpStream, pong: bool) -> (Vec<String>, usize, u16) {
            let (mut types, mut pings) = (Vec::new(), 0);
            loop {
                let (opcode, payload) = frame(tcp).await.expect("a close frame first");
                match opcode {
                    1 => {
                        let value: Value = serde_json::from_slice(&payload).unwrap();
                        types.push(value["type"].as_str().unwrap_or_default().to_string());
                    }
                    8 => return (types, pings, u16::from_be_bytes([payload[0], payload[1]])),
                    9 => {
                        pings += 1;
                        if pong {
                            // A masked, empty pong.
                            tcp.write_all(&[0x8a, 0x80, 1, 2, 3, 4]).await.unwrap();
                        }
                    }
                    _ => {}
                }
            }
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn heartbeats_come_with_pings_and_silent_clients_are_closed() {
            let node = start(Duration::from_millis(50), Duration::from_secs(2)).await;
            let mut silent = handshake(node.addr).await;
            let (types, pings, code) = until_close(&mut silent, false).await;
            assert_eq!(types[0], "connected");
            assert!(types[1..].iter().all(|t| t == "heartbeat"), "{types:?}");
            assert!(types.len() > 1 && pings > 0, "{types:?} {pings}");
            assert_eq!(code, 1000, "closed for silence");
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn clients_answering_pings_stay_and_shutdown_closes_with_1001() {
            let node = start(Duration::from_millis(50), Duration::from_millis(1500)).await;
            let mut alive = handshake(node.addr).await;
            let answer = tokio::spawn(async move {
                let outcome = until_close(&mut alive, true).await;
                (outcome, alive)
            });
            // Well past the timeout, the client answering pings is still connected.
            tokio::time::sleep(Duration::from_secs(4)).await;
            assert!(!answer.is_finished(), "a client answering pings was closed");
            node.shutdown.cancel();
            let ((types, pings, code), _alive) = answer.await.unwrap();
            assert!(pings > 1, "{pings}");
            assert_eq!(types[0], "connected");
            assert_eq!(code, 1001);
        }
    }
}
