//! One RESP client: a reader that parses and runs commands, and a writer that drains the
//! client's [`Outbox`] to the socket.
//!
//! Replies to a batch of pipelined commands are encoded into one buffer and queued once; pub/sub
//! messages arrive in the same queue from the hub, so the writer sends replies and messages in
//! the order they were queued, batched into as few writes as possible.

use crate::broker::Ticket;
use crate::hub::outbox::{Batch, CloseReason, Outbox};
use crate::hub::{Kind, Subscriber, Wakes};
use crate::resp::clients::ClientInfo;
use crate::resp::cmd;
use crate::resp::cmd::transaction::Transaction;
use crate::resp::frame::{Frame, Protocol, encode_header};
use crate::resp::parse::RequestParser;
use crate::resp::server::{REPLY_BACKPRESSURE_BYTES, ServerContext};
use bytes::{Bytes, BytesMut};
use herald_storage::Publish;
use indexmap::IndexSet;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedWriteHalf;
use tokio_util::sync::CancellationToken;

/// Most bytes the writer gathers into one write.
const WRITE_BATCH_BYTES: usize = 256 * 1024;
/// Read buffers larger than this are released once empty, so idle clients stay small.
const IDLE_BUFFER_BYTES: usize = 16 * 1024;
/// How much room to make before each read.
const READ_CHUNK_BYTES: usize = 16 * 1024;

/// Durable publishes staged by one connection are handed to the log once this many wait...
const STAGE_MAX_PUBLISHES: usize = 1024;
/// ...or once they hold this many bytes, whichever comes first.
const STAGE_MAX_BYTES: usize = 1 << 20;

/// A reply in waiting: encoded, a publish still being committed, or a publish staged (not yet
/// handed to the log).
enum Slot {
    Ready(BytesMut),
    Publish(Ticket),
    Staged,
}

/// The per-connection state commands work on.
pub(crate) struct Session {
    /// Server-wide state.
    pub ctx: Arc<ServerContext>,
    /// This client's registry entry (and its hub subscriber).
    pub client: Arc<ClientInfo>,
    /// The protocol replies are encoded in.
    pub protocol: Protocol,
    /// Whether `AUTH` succeeded (always true without `requirepass`).
    pub authenticated: bool,
    /// Subscriptions by kind: channels, patterns, shard channels.
    pub subscriptions: [IndexSet<Bytes>; 3],
    /// Replies not yet queued, in command order; durable publishes wait in their slot for
    /// their commit while later commands that cannot observe them run (see
    /// [`Session::settle_publishes`]).
    slots: Vec<Slot>,
    /// How many of `slots` are [`Slot::Publish`]: publishes handed to the log whose commit
    /// has not been waited for yet.
    unsettled: usize,
    /// Durable publishes read but not yet handed to the log, and their slots: they go to the
    /// log together ([`Session::submit_staged`]) so that they share one batch and one sync.
    staged: Vec<Publish>,
    staged_slots: Vec<usize>,
    staged_bytes: usize,
    /// Receivers of this batch's publishes, woken when the batch's replies are queued.
    pub wakes: Wakes,
    /// Set by `QUIT` and protocol errors: stop after queued output is written.
    pub closing: bool,
    /// This connection's history subscription (`HSUBSCRIBE`), if any.
    pub history: Option<HistorySubscription>,
    /// How many channels the history subscription holds: they count in every subscription
    /// count the client is told, so a client that leaves pub/sub mode at a count of zero does
    /// not leave while history events still come.
    pub history_channels: usize,
    /// The open transaction (`MULTI` until `EXEC`, `DISCARD` or `RESET`), if any.
    pub transaction: Option<Transaction>,
    /// Set while `EXEC` runs: [`Session::flush_replies`] then queues nothing, so that its
    /// array of replies goes out whole.
    pub hold_replies: bool,
    /// Bytes encoded into `slots` since they were last queued (publish replies still to
    /// come not counted).
    reply_bytes: usize,
}

impl Session {
    fn new(ctx: Arc<ServerContext>, client: Arc<ClientInfo>) -> Self {
        let authenticated = ctx.settings.read().requirepass.is_none();
        Session {
            ctx,
            client,
            protocol: Protocol::Resp2,
            authenticated,
            subscriptions: Default::default(),
            slots: Vec::new(),
            unsettled: 0,
            staged: Vec::new(),
            staged_slots: Vec::new(),
            staged_bytes: 0,
            wakes: Wakes::default(),
            closing: false,
            history: None,
            history_channels: 0,
            transaction: None,
            hold_replies: false,
            reply_bytes: 0,
        }
    }

    /// This client's hub handle.
    pub fn subscriber(&self) -> &Arc<Subscriber> {
        &self.client.subscriber
    }

    /// This client's queue.
    pub fn outbox(&self) -> &Arc<Outbox> {
        self.client.subscriber.outbox()
    }

    /// Encodes a reply; it is queued with the rest of the batch.
    pub fn reply(&mut self, frame: Frame) {
        let protocol = self.protocol;
        self.encode_reply(|buffer| frame.encode(protocol, buffer));
    }

    /// Bytes of replies encoded and not queued yet (what `EXEC` holds).
    pub fn reply_bytes(&self) -> usize {
        self.reply_bytes
    }

    /// Encodes into the last ready slot (a new one if the last is a publish's).
    fn encode_reply(&mut self, encode: impl FnOnce(&mut BytesMut)) {
        if !matches!(self.slots.last(), Some(Slot::Ready(_))) {
            self.slots.push(Slot::Ready(BytesMut::new()));
        }
        let Some(Slot::Ready(buffer)) = self.slots.last_mut() else {
            unreachable!()
        };
        let before = buffer.len();
        encode(buffer);
        self.reply_bytes += buffer.len() - before;
    }

    /// Encodes the header of an array reply of `len` items; the next `len` replies are its
    /// items (`EXEC`'s reply).
    pub fn reply_array_header(&mut self, len: usize) {
        self.encode_reply(|buffer| encode_header(buffer, b'*', len as i64));
    }

    /// Reserves the reply slot of a publish whose outcome is not known yet.
    pub fn reply_later(&mut self, ticket: Ticket) {
        self.slots.push(Slot::Publish(ticket));
        self.unsettled += 1;
    }

    /// Stages a publish to a durable namespace: its reply slot is reserved now, and it goes to
    /// the log with the other publishes of the same read ([`Session::submit_staged`]), or
    /// at once past the staging limits.
    pub async fn stage_publish(&mut self, publish: Publish) {
        self.staged_bytes += publish.size();
        self.staged.push(publish);
        self.staged_slots.push(self.slots.len());
        self.slots.push(Slot::Staged);
        if self.staged.len() >= STAGE_MAX_PUBLISHES || self.staged_bytes >= STAGE_MAX_BYTES {
            self.submit_staged().await;
        }
    }

    /// Hands the staged publishes to the log as one request. Runs before any other command
    /// (so a command never overtakes a publish read before it) and before replies are queued.
    pub async fn submit_staged(&mut self) {
        if self.staged.is_empty() {
            return;
        }
        self.staged_bytes = 0;
        let publishes = std::mem::take(&mut self.staged);
        let tickets = self
            .ctx
            .broker
            .enqueue_many(publishes, &mut self.wakes)
            .await;
        for (index, ticket) in std::mem::take(&mut self.staged_slots)
            .into_iter()
            .zip(tickets)
        {
            self.slots[index] = match ticket {
                Ok(ticket) => {
                    self.unsettled += 1;
                    Slot::Publish(ticket)
                }
                Err(error) => {
                    let mut buffer = BytesMut::new();
                    Frame::error(format!("ERR publish failed: {error}"))
                        .encode(self.protocol, &mut buffer);
                    Slot::Ready(buffer)
                }
            };
        }
    }

    /// Waits until every publish read so far has taken effect (committed, and handed to the
    /// local subscribers, history subscriptions included), keeping the replies in their slots.
    /// Runs before a command that could observe an earlier publish of the same connection
    /// (reads history, or changes what it is delivered to), so that commands take effect in
    /// the order they were sent even though durable publishes are answered later. Costs
    /// nothing when no publish is outstanding, which is the case for all but the first such
    /// command after a run of publishes.
    pub async fn settle_publishes(&mut self) {
        self.submit_staged().await;
        if self.unsettled == 0 {
            return;
        }
        self.unsettled = 0;
        for slot in &mut self.slots {
            if !matches!(slot, Slot::Publish(_)) {
                continue;
            }
            let Slot::Publish(ticket) = std::mem::replace(slot, Slot::Ready(BytesMut::new()))
            else {
                unreachable!()
            };
            let frame = match self.ctx.broker.wait(ticket).await {
                Ok(published) => Frame::Integer(published.receivers as i64),
                Err(error) => Frame::error(format!("ERR publish failed: {error}")),
            };
            let mut buffer = BytesMut::new();
            frame.encode(self.protocol, &mut buffer);
            *slot = Slot::Ready(buffer);
        }
    }

    /// Queues the replies encoded so far. Must run before anything else is queued directly
    /// (hub subscription confirmations), to keep replies in command order. While `EXEC` runs
    /// ([`Session::hold_replies`]) it only hands the staged publishes to the log.
    pub async fn flush_replies(&mut self) {
        self.submit_staged().await;
        if self.hold_replies {
            return;
        }
        self.unsettled = 0;
        self.reply_bytes = 0;
        self.wakes.wake_all();
        let mut out = BytesMut::new();
        for slot in std::mem::take(&mut self.slots) {
            match slot {
                Slot::Ready(buffer) if out.is_empty() => out = buffer,
                Slot::Ready(buffer) => out.extend_from_slice(&buffer),
                Slot::Publish(ticket) => {
                    let frame = match self.ctx.broker.wait(ticket).await {
                        Ok(published) => Frame::Integer(published.receivers as i64),
                        Err(error) => Frame::error(format!("ERR publish failed: {error}")),
                    };
                    frame.encode(self.protocol, &mut out);
                }
                Slot::Staged => unreachable!("staged publishes are submitted first"),
            }
        }
        if !out.is_empty() {
            self.outbox().push_reply(out.freeze());
        }
    }

    /// Total subscriptions counted the way Redis counts them for `kind`'s replies: channels
    /// plus patterns (plus the history subscription's channels), or shard channels alone.
    pub fn subscription_count(&self, kind: Kind) -> usize {
        match kind {
            Kind::Shard => self.subscriptions[2].len(),
            _ => self.subscriptions[0].len() + self.subscriptions[1].len() + self.history_channels,
        }
    }

    /// Whether the client is in Redis's subscribed state.
    pub fn in_pubsub_context(&self) -> bool {
        self.subscriptions.iter().any(|s| !s.is_empty()) || self.history.is_some()
    }

    /// Publishes the subscription counts to the registry (for `CLIENT LIST`; history channels
    /// count as channels, as in the replies).
    pub fn record_subscription_counts(&self) {
        let counts = [
            self.subscriptions[0].len() + self.history_channels,
            self.subscriptions[1].len(),
            self.subscriptions[2].len(),
        ];
        self.client.meta.lock().subscriptions = counts;
    }

    /// Ends the history subscription, if there is one, once the events that reached it live
    /// are queued for the client (see [`HistorySubscription::end`]).
    pub async fn end_history(&mut self) {
        if let Some(history) = self.history.take() {
            history.end().await;
        }
        self.history_channels = 0;
    }

    /// Drops every subscription without replies (disconnect, `RESET`).
    pub fn drop_subscriptions(&mut self) {
        if let Some(history) = self.history.take() {
            history.forwarder.abort();
        }
        self.history_channels = 0;
        let [channels, patterns, shards] = std::mem::take(&mut self.subscriptions);
        let channels: Vec<Bytes> = channels.into_iter().collect();
        let patterns: Vec<Bytes> = patterns.into_iter().collect();
        let shards: Vec<Bytes> = shards.into_iter().collect();
        self.ctx.hub.remove_client(
            self.client.id,
            &[
                (Kind::Channel, &channels),
                (Kind::Pattern, &patterns),
                (Kind::Shard, &shards),
            ],
        );
        self.record_subscription_counts();
    }
}

/// A connection's history subscription (`HSUBSCRIBE`): the task that forwards its events to
/// the client, and the token that asks it to stop.
pub(crate) struct HistorySubscription {
    /// The forwarding task.
    pub forwarder: tokio::task::JoinHandle<()>,
    /// Cancelled to end the subscription (see [`HistorySubscription::end`]).
    pub stop: CancellationToken,
}

impl HistorySubscription {
    /// Ends the subscription as `HUNSUBSCRIBE` and `RESET` do: the forwarder first queues the
    /// live events that already reached the subscription (every publish the connection sent
    /// before, see [`Session::settle_publishes`]), then stops; an unfinished replay stops where
    /// it is. Returns once it has stopped, so a reply queued after this comes after them.
    pub async fn end(self) {
        self.stop.cancel();
        let _ = self.forwarder.await;
    }
}

impl Drop for Session {
    /// Normally the subscriptions are gone already. After a panic in a command (a bug) this is
    /// what takes the client out of the hub and ends its writer, instead of leaving both behind.
    fn drop(&mut self) {
        if self.history.is_some() || self.subscriptions.iter().any(|s| !s.is_empty()) {
            self.drop_subscriptions();
        }
        if std::thread::panicking() {
            self.client.subscriber.outbox().close(CloseReason::Killed);
        }
    }
}

/// Where a connection adopted from the start-up answerer left off; empty for a new one.
pub(crate) struct Unread {
    /// The request being parsed, if one is half read.
    pub parser: RequestParser,
    /// Bytes read and not parsed yet.
    pub buffer: BytesMut,
    /// A `MULTI` was refused with `-LOADING` and its transaction is not over: the session
    /// starts in a refused transaction, so its commands are not run one by one.
    pub in_refused_transaction: bool,
}

/// Serves one client until it disconnects, is killed, or the server shuts down, starting
/// from what the start-up answerer left `unread`.
pub(crate) async fn serve(
    ctx: Arc<ServerContext>,
    stream: TcpStream,
    client: Arc<ClientInfo>,
    unread: Unread,
) {
    let Unread {
        mut parser,
        mut buffer,
        in_refused_transaction,
    } = unread;
    let (mut reader, writer) = stream.into_split();
    let outbox = client.subscriber.outbox().clone();
    let writer = tokio::spawn(write_loop(writer, outbox.clone()));
    let mut session = Session::new(ctx.clone(), client);
    if in_refused_transaction {
        session.transaction = Some(Transaction::refused());
        session.client.meta.lock().transaction = Some((0, 0));
    }
    let mut reconnect = ctx.broker.reconnect_watch();

    'connection: loop {
        // Run every complete request in the buffer; their replies go out as one batch.
        let (limits, query_limit, timeout) = {
            let settings = ctx.settings.read();
            (
                settings.request_limits(),
                settings.client_query_buffer_limit,
                settings.timeout_seconds,
            )
        };
        loop {
            // Shutting down: requests not run yet get no reply (nothing of theirs is done, as
            // when the connection drops), while those run so far get theirs below, a
            // publish's once it is committed.
            if ctx.shutdown.is_cancelled() {
                break;
            }
            match parser.next_request(&mut buffer, &limits, session.authenticated) {
                Ok(Some(args)) => {
                    cmd::execute(&mut session, args).await;
                    if session.closing {
                        session.flush_replies().await;
                        outbox.close(CloseReason::AfterFlush);
                        break 'connection;
                    }
                }
                Ok(None) => break,
                Err(error) => {
                    tracing::debug!(id = session.client.id, %error, "closing client after a protocol error");
                    session.reply(Frame::error(format!("ERR {error}")));
                    session.flush_replies().await;
                    outbox.close(CloseReason::AfterFlush);
                    break 'connection;
                }
            }
        }
        session.flush_replies().await;
        // (At shutdown the requests left unrun stay in the buffer: not a client to kill,
        // which would drop the replies just queued.)
        if buffer.len() > query_limit && !ctx.shutdown.is_cancelled() {
            tracing::warn!(
                id = session.client.id,
                bytes = buffer.len(),
                "closing client that reached max query buffer length"
            );
            outbox.close(CloseReason::Killed);
            break;
        }
        session.client.meta.lock().query_buffer = buffer.len();
        if buffer.is_empty() && buffer.capacity() > IDLE_BUFFER_BYTES {
            buffer = BytesMut::new();
        }

        // Backpressure: a client that pipelines without reading waits here, not in memory.
        tokio::select! {
            _ = outbox.wait_below(REPLY_BACKPRESSURE_BYTES) => {}
            _ = ctx.shutdown.cancelled() => break,
        }

        buffer.reserve(READ_CHUNK_BYTES);
        let idle = idle_deadline(timeout, &session);
        tokio::select! {
            read = reader.read_buf(&mut buffer) => match read {
                // The peer closed its side: still deliver what it asked for, then stop.
                Ok(0) => {
                    outbox.close(CloseReason::AfterFlush);
                    break;
                }
                Err(_) => {
                    outbox.close(CloseReason::Killed);
                    break;
                }
                Ok(_) => {}
            },
            _ = outbox.wait_closing() => break,
            _ = ctx.shutdown.cancelled() => break,
            // A subscriber of a node cut off from its cluster, or whose live delivery skipped
            // events (a snapshot install), is told why and closed, so that it resumes
            // elsewhere. A history subscription's forwarder does this itself (see
            // `cmd::history`), ahead of its events, so that nothing past a hole goes out.
            reason = reconnect.requested(),
                if session.in_pubsub_context() && session.history.is_none() => {
                tracing::debug!(id = session.client.id, ?reason, "closing a subscriber: it must reconnect");
                session.reply(Frame::error(reason.resp_error()));
                session.flush_replies().await;
                outbox.close(CloseReason::AfterFlush);
                break;
            }
            _ = idle => {
                tracing::debug!(id = session.client.id, "closing idle client");
                outbox.close(CloseReason::Killed);
                break;
            }
        }
    }

    session.drop_subscriptions();
    if ctx.shutdown.is_cancelled() {
        outbox.close(CloseReason::AfterFlush);
    }
    if writer.await.unwrap_or(false) {
        linger(&mut reader, ctx.shutdown.is_cancelled()).await;
    }
}

/// The idle timeout (`timeout` setting); subscribers are exempt, as in Redis.
async fn idle_deadline(timeout_seconds: u64, session: &Session) {
    if timeout_seconds == 0 || session.in_pubsub_context() {
        std::future::pending::<()>().await;
    }
    tokio::time::sleep(Duration::from_secs(timeout_seconds)).await;
}

/// Writes queued frames until the client is closed; batches whatever is queued into one write.
/// Returns whether everything queued was written and the write side shut (a FIN sent): the
/// close was graceful.
async fn write_loop(mut socket: OwnedWriteHalf, outbox: Arc<Outbox>) -> bool {
    let mut buffer = BytesMut::new();
    loop {
        match outbox.next_batch(&mut buffer, WRITE_BATCH_BYTES).await {
            Batch::Frames => {}
            Batch::Closed(reason) => {
                let flushed = socket.shutdown().await.is_ok();
                return flushed && reason == CloseReason::AfterFlush;
            }
        }
        let written = tokio::select! {
            written = socket.write_all(&buffer) => written.is_ok(),
            _ = outbox.wait_aborted() => false,
        };
        if !written {
            outbox.close(CloseReason::Killed);
            return false;
        }
        buffer.clear();
        if buffer.capacity() > IDLE_BUFFER_BYTES {
            buffer = BytesMut::new();
        }
    }
}

/// How long a graceful close waits for the client to take its last replies, but at shutdown.
const LINGER_MAX: Duration = Duration::from_secs(1);

/// How often a graceful close looks whether the client has taken its last replies (in its
/// first second; ten times less often after).
const LINGER_STEP: Duration = Duration::from_millis(10);

/// After a graceful close's last reply and FIN: waits until the client's kernel has
/// acknowledged all of it (or the client closes its side), reading and dropping what the
/// client still sends (requests the node will not run) meanwhile. Closing a socket with unread
/// bytes makes the kernel send a reset and drop what it has not sent yet: a pipelining client
/// lost the replies of publishes that were committed, and would publish them again. Once
/// everything is acknowledged, a reset takes nothing from the client.
///
/// At shutdown (`shutting_down`) it waits as long as the drain may take (`--shutdown-timeout`
/// ends the process): a client that reads slowly, through a small receive buffer, takes its
/// replies in bursts as far apart as TCP's zero-window probes, which back off past a second,
/// so "no progress for a while" cannot tell it from one that reads nothing. It lost the
/// replies of committed publishes with a limit of a second. Otherwise (`QUIT`, a protocol
/// error, the client's own FIN: the client sends nothing after it, or is at fault) it waits
/// [`LINGER_MAX`] at most, so that a client that never reads does not hold its connection.
async fn linger(reader: &mut tokio::net::tcp::OwnedReadHalf, shutting_down: bool) {
    use tokio::io::AsyncReadExt;
    let start = tokio::time::Instant::now();
    let deadline = (!shutting_down).then(|| start + LINGER_MAX);
    // On the heap, and only here: not a part of every connection's future.
    let mut scratch = vec![0u8; 4096];
    while unacknowledged_bytes(reader) != Some(0) {
        // Past the first second (only at shutdown), a look every 100 ms: many connections
        // to peers gone for good do not keep the node busy through its drain.
        let step = if start.elapsed() < LINGER_MAX {
            LINGER_STEP
        } else {
            LINGER_STEP * 10
        };
        match tokio::time::timeout(step, reader.read(&mut scratch)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return,
            Ok(Ok(_)) | Err(_) => {}
        }
        if deadline.is_some_and(|deadline| tokio::time::Instant::now() >= deadline) {
            return;
        }
    }
}

/// Bytes this socket has sent or queued that its peer has not acknowledged yet (the FIN
/// counts one), from the kernel (`SIOCOUTQ`); `None` if it cannot tell.
#[cfg(target_os = "linux")]
fn unacknowledged_bytes(reader: &tokio::net::tcp::OwnedReadHalf) -> Option<usize> {
    use std::os::fd::AsRawFd;
    let fd = reader.as_ref().as_raw_fd();
    let mut bytes: libc::c_int = 0;
    // SAFETY: `fd` is this connection's open socket, and `bytes` a valid out-parameter for
    // the request (an int).
    let result = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut bytes) };
    (result == 0).then(|| usize::try_from(bytes).unwrap_or(0))
}

/// Elsewhere the kernel is not asked: a graceful close lingers until the client closes its
/// side, or [`LINGER_MAX`] passes (at shutdown: until the process exits).
#[cfg(not(target_os = "linux"))]
fn unacknowledged_bytes(_: &tokio::net::tcp::OwnedReadHalf) -> Option<usize> {
    None
}
