//! Node-to-node request/response RPC over the QUIC [`Transport`].
//!
//! One QUIC connection per peer, one bidirectional stream per call. Each side writes one frame
//! and finishes its send side: a `u32` big-endian length, then that many bytes of the value
//! encoded with `bincode::serde` in the standard configuration. Frames above [`MAX_FRAME`]
//! are refused on both sides.
//!
//! - Client: [`Peers`], a pool with at most one live connection per peer, dialed lazily, with
//!   exponential backoff after a failed dial; [`Peers::call`] sends one [`Request`] and waits
//!   for its [`Response`]. [`RpcError`] tells whether the request may have been delivered.
//! - Server: [`serve`] accepts connections (one task each, handshake included) and streams
//!   (one task each), and dispatches Raft RPCs to the group's [`openraft::Raft`] and
//!   application requests to the [`Handler`].

use crate::transport::{IncomingPeer, Transport};
use bytes::Bytes;
use futures::FutureExt as _;
use futures::future::BoxFuture;
use herald_storage::JournalProgress;
use herald_storage::raft::{GroupId, NodeId, TypeConfig};
use openraft::error::{InstallSnapshotError, RaftError};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The largest frame (encoded request or response, without its 4-byte length) either side
/// sends or accepts: 64 MiB.
pub const MAX_FRAME: usize = 64 << 20;

/// The largest Raft snapshot a node takes: the store decodes no record above 1 GiB, and a
/// snapshot is one record.
pub const MAX_SNAPSHOT_BYTES: u64 = 1 << 30;

/// QUIC application error code a server uses to stop reading an oversized request.
const FRAME_TOO_LARGE: u32 = 1;

/// A request from one node to another.
#[derive(Debug, Serialize, Deserialize)]
pub enum Request {
    /// Raft AppendEntries (also the heartbeat) for one group.
    AppendEntries {
        /// The Raft group.
        group: GroupId,
        /// openraft's request.
        rpc: AppendEntriesRequest<TypeConfig>,
    },
    /// Raft RequestVote for one group.
    Vote {
        /// The Raft group.
        group: GroupId,
        /// openraft's request.
        rpc: VoteRequest<NodeId>,
    },
    /// One chunk of a Raft snapshot for one group.
    InstallSnapshot {
        /// The Raft group.
        group: GroupId,
        /// openraft's request.
        rpc: InstallSnapshotRequest<TypeConfig>,
    },
    /// An opaque application request; the node layer defines its encoding.
    App(Bytes),
    /// The dialing node's store id, its first request on a new connection; answered with
    /// [`Response::StoreId`] (see [`StoreIds`]). Last, so that older nodes decode the others.
    StoreId(u64),
    /// The dialing node's store id and journal, its first request on a new connection
    /// (instead of [`Request::StoreId`]); answered with [`Response::Identity`] (see
    /// [`StoreIds`]). Last: a node from before it answers an error, and is sent `StoreId`.
    Identity(Identity),
}

/// A node's store id and how far its Raft journal has got: what each side of a new
/// connection shows the other (see [`StoreIds`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// See `Store::store_id`.
    pub store: u64,
    /// See `Store::journal_progress`.
    pub journal: JournalProgress,
}

impl Request {
    /// Whether this is a Raft message (refused to and from a member on another store).
    pub fn is_raft(&self) -> bool {
        matches!(
            self,
            Request::AppendEntries { .. } | Request::Vote { .. } | Request::InstallSnapshot { .. }
        )
    }
}

/// The answer to a [`Request`].
#[derive(Debug, Serialize, Deserialize)]
pub enum Response {
    /// What the group's Raft answered to [`Request::AppendEntries`].
    AppendEntries(Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>),
    /// What the group's Raft answered to [`Request::Vote`].
    Vote(Result<VoteResponse<NodeId>, RaftError<NodeId>>),
    /// What the group's Raft answered to [`Request::InstallSnapshot`].
    InstallSnapshot(
        Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>,
    ),
    /// The application's answer to [`Request::App`].
    App(Bytes),
    /// The node runs no Raft instance for this group (not yet, or no longer).
    NoSuchGroup(GroupId),
    /// The request could not be read (malformed or oversized frame); not processed.
    Error(String),
    /// Answer to [`Request::StoreId`]: the receiver's store id. Last, like the request.
    StoreId(u64),
    /// Answer to [`Request::Identity`]: the receiver's. Last, like the request.
    Identity(Identity),
}

/// Why a call failed. [`RpcError::not_sent`] tells whether a retry is known to be safe.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RpcError {
    /// No connection to the peer (down, in backoff after a failed dial, no address known, or
    /// the connection broke before the request was sent). The request was not sent.
    #[error("node {peer} is unreachable: {reason}")]
    Unreachable {
        /// The node called.
        peer: NodeId,
        /// Why.
        reason: String,
    },
    /// The request exceeds [`MAX_FRAME`] once encoded (or could not be encoded). Not sent.
    #[error("request to node {peer} not sent: {reason}")]
    TooLarge {
        /// The node called.
        peer: NodeId,
        /// Why.
        reason: String,
    },
    /// The request was (perhaps) sent but no response came in time: outcome unknown.
    #[error("no response from node {peer} within {timeout:?}; the request may still take effect")]
    Timeout {
        /// The node called.
        peer: NodeId,
        /// The time allowed.
        timeout: Duration,
    },
    /// The exchange failed after the request was (perhaps) sent (stream reset, connection
    /// lost, malformed response): outcome unknown.
    #[error("call to node {peer} failed: {reason}")]
    Failed {
        /// The node called.
        peer: NodeId,
        /// Why.
        reason: String,
    },
}

impl RpcError {
    /// The request certainly did not reach the peer: retrying cannot apply it twice.
    pub fn not_sent(&self) -> bool {
        matches!(
            self,
            RpcError::Unreachable { .. } | RpcError::TooLarge { .. }
        )
    }
}

// ---------------------------------------------------------------------------------------------
// The codec: frames and bincode, in one place.

fn codec() -> bincode::config::Configuration {
    bincode::config::standard()
}

/// Encodes `value` as a frame: 4-byte big-endian length, then bincode.
fn encode_frame<T: Serialize>(value: &T) -> Result<Vec<u8>, String> {
    let mut frame = vec![0u8; 4];
    bincode::serde::encode_into_std_write(value, &mut frame, codec())
        .map_err(|e| format!("cannot encode: {e}"))?;
    let len = frame.len() - 4;
    if len > MAX_FRAME {
        return Err(format!(
            "frame of {len} bytes exceeds the {MAX_FRAME}-byte limit"
        ));
    }
    frame[..4].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(frame)
}

fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    let (value, used) = bincode::serde::decode_from_slice(bytes, codec())
        .map_err(|e| format!("malformed frame: {e}"))?;
    if used != bytes.len() {
        return Err(format!(
            "malformed frame: {} trailing bytes",
            bytes.len() - used
        ));
    }
    Ok(value)
}

#[derive(Debug)]
enum FrameError {
    /// The length prefix announces more than [`MAX_FRAME`].
    TooLarge(usize),
    /// The stream ended or failed before a whole frame arrived.
    Read(String),
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::TooLarge(len) => {
                write!(f, "frame of {len} bytes exceeds the {MAX_FRAME}-byte limit")
            }
            FrameError::Read(reason) => f.write_str(reason),
        }
    }
}

/// Reads one frame, growing the buffer as data arrives (a length prefix alone allocates
/// little).
async fn read_frame(recv: &mut quinn::RecvStream) -> Result<Vec<u8>, FrameError> {
    let mut len = [0u8; 4];
    recv.read_exact(&mut len)
        .await
        .map_err(|e| FrameError::Read(format!("reading the frame length: {e}")))?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    let mut buf = Vec::with_capacity(len.min(1 << 20));
    while buf.len() < len {
        match recv.read_chunk(len - buf.len(), true).await {
            Ok(Some(chunk)) => buf.extend_from_slice(&chunk.bytes),
            Ok(None) => {
                return Err(FrameError::Read(format!(
                    "stream ended after {} of {len} bytes",
                    buf.len()
                )));
            }
            Err(e) => return Err(FrameError::Read(format!("reading the frame: {e}"))),
        }
    }
    // The stream's end (its FIN) came with the frame's last bytes: reading it lets the stream
    // close quietly. A `RecvStream` dropped before it has seen its end sends the peer a
    // STOP_SENDING frame, in a datagram of its own: two of the four datagrams of each call.
    let _ = recv.read_chunk(1, true).now_or_never();
    Ok(buf)
}

// ---------------------------------------------------------------------------------------------
// Client side.

/// Dialing and backoff settings of [`Peers`].
#[derive(Debug, Clone)]
pub struct PeersOptions {
    /// A dial (address resolution + QUIC handshake) that takes longer fails. A down peer on
    /// UDP gives no error, so this is how long finding out takes.
    pub connect_timeout: Duration,
    /// Backoff after the first failed dial; doubles on each further failure.
    pub backoff_initial: Duration,
    /// Backoff ceiling.
    pub backoff_max: Duration,
}

impl Default for PeersOptions {
    fn default() -> Self {
        PeersOptions {
            connect_timeout: Duration::from_secs(2),
            backoff_initial: Duration::from_millis(50),
            backoff_max: Duration::from_secs(2),
        }
    }
}

/// Where a peer listens: a socket address, or a `host:port` resolved at each dial (so DNS
/// names of containers and pods follow restarts). Converts from a [`SocketAddr`] and from a
/// `host:port` string (an IP address in it is used as is).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerAddr {
    /// A socket address.
    Socket(SocketAddr),
    /// A `host:port` to resolve at each dial.
    Host(String),
}

impl From<SocketAddr> for PeerAddr {
    fn from(addr: SocketAddr) -> Self {
        PeerAddr::Socket(addr)
    }
}

impl From<&str> for PeerAddr {
    fn from(addr: &str) -> Self {
        match addr.parse::<SocketAddr>() {
            Ok(socket) => PeerAddr::Socket(socket),
            Err(_) => PeerAddr::Host(addr.to_string()),
        }
    }
}

impl From<String> for PeerAddr {
    fn from(addr: String) -> Self {
        match addr.parse::<SocketAddr>() {
            Ok(socket) => PeerAddr::Socket(socket),
            Err(_) => PeerAddr::Host(addr),
        }
    }
}

impl From<&String> for PeerAddr {
    fn from(addr: &String) -> Self {
        PeerAddr::from(addr.as_str())
    }
}

/// What is wrong with `addr` as a member's cluster address (`HOST:PORT`), if anything: a DNS
/// name (letters, digits, `-`, `_`, `.`), an IPv4 address or a bracketed IPv6 one, and a port
/// from 1 to 65535. Members dial it as given, so a typo (`a:1;b:2`, a space, port 0) would make
/// a member that never answers; `--peers` and `herald cluster join` both check with this.
pub fn address_problem(addr: &str) -> Option<&'static str> {
    if addr.parse::<SocketAddr>().is_ok() {
        return None;
    }
    let Some((host, port)) = addr.rsplit_once(':') else {
        return Some("the address must be HOST:PORT");
    };
    let host_ok = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(inner) => inner.parse::<std::net::Ipv6Addr>().is_ok(),
        None => {
            !host.is_empty()
                && host.len() <= 253
                && host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        }
    };
    if !host_ok {
        return Some(
            "the address must be HOST:PORT, with a host name, an IPv4 address or a bracketed IPv6 one",
        );
    }
    match port.parse::<u16>() {
        Ok(0) | Err(_) => Some("the port must be a number from 1 to 65535"),
        Ok(_) => None,
    }
}

impl std::fmt::Display for PeerAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PeerAddr::Socket(addr) => addr.fmt(f),
            PeerAddr::Host(host) => f.write_str(host),
        }
    }
}

type DialResult = Option<Result<quinn::Connection, String>>;

enum Link {
    /// No connection and no dial under way.
    Idle,
    /// A live (as far as we know) connection.
    Connected(quinn::Connection),
    /// A dial is under way; its outcome is published here.
    Dialing(watch::Receiver<DialResult>),
    /// The last dial failed: no new dial before `until`.
    Backoff { until: Instant },
}

struct Slot {
    addr: Option<PeerAddr>,
    link: Link,
    /// Failed dials since the last successful one.
    failures: u32,
    /// The next backoff.
    backoff: Duration,
    /// Why the last dial failed.
    last_error: String,
    /// Bumped by each dial and by address changes: a dial's result is only recorded if the
    /// generation is still its own.
    generation: u64,
    /// When the oldest call made since the peer last answered one started (`None`: every
    /// call so far was answered). See [`Peers::unanswered_for`].
    unanswered_since: Option<Instant>,
    /// When the peer last answered a call (see [`Peers::called_within`]).
    last_answered: Option<Instant>,
    /// Whether a dial to the peer ever succeeded: the first failure to reach a peer this node
    /// had a connection to is worth a warning, not the first to reach one that may not be up
    /// yet (at formation, the nodes start one after another).
    ever_connected: bool,
    /// Since when dials to the peer fail (`None` while they do not).
    failing_since: Option<Instant>,
    /// Whether the current run of failures has been warned of.
    warned: bool,
    /// What the peer said of its formed cluster when its last dial was refused because this
    /// node is not a member (see [`Peers::formed_without_this_node`]).
    formed_note: Option<String>,
    /// Why the peer refused this node's store at the last dial's exchange, while it does (see
    /// [`Peers::refused_by`]).
    refused_note: Option<String>,
    /// The run (`JournalProgress::run`, drawn at each start) the peer showed at the exchange of
    /// the pooled connection: a connection in from another run means it restarted since.
    run: Option<u64>,
}

/// Dials to a peer never reached that fail this long are warned of: it should be up by then
/// (it is logged at info at the first failure, as a peer may simply not have started yet).
const NEVER_REACHED_WARNING: Duration = Duration::from_secs(60);

/// A peer that has left every call of this node unanswered this long is taken for gone
/// ([`Peers::is_silent`]): a node that finds every other member so is cut off, and one that
/// finds a majority so has lost its quorum, a second after it happened rather than at the
/// Raft timers' verdicts. Raft heartbeats make a call every 75 ms, so a live member answers
/// several in that time even on a loaded machine.
pub const SILENT_AFTER: Duration = Duration::from_secs(1);

/// The client side of node-to-node RPC: at most one live connection per peer, shared by all
/// callers (share the `Peers` itself in an `Arc`).
///
/// Dials lazily on the first call; concurrent callers wait for that one dial. After a failed
/// dial the peer is in backoff (50 ms doubling to 2 s by default, reset on success): calls
/// fail fast with [`RpcError::Unreachable`] and do not dial. While a retry dial is under way
/// after failures, other callers fail fast as well. A closed connection (peer gone, idle
/// timeout) is dropped and redialed on the next call.
pub struct Peers {
    transport: Arc<Transport>,
    options: PeersOptions,
    /// Tells the peers' stores apart; until set, no store ids are exchanged or checked.
    store_ids: std::sync::OnceLock<Arc<dyn StoreIds>>,
    slots: Mutex<HashMap<NodeId, Arc<Mutex<Slot>>>>,
    dials: AtomicU64,
    /// Counts the connections peers opened to this node (see [`Peers::arrivals`]).
    arrivals: tokio::sync::watch::Sender<u64>,
}

/// How this node's link to one peer stands, for `herald cluster status`: what an operator
/// looks at first when a node seems cut off.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerLink {
    /// `connected`, `silent` (connected, but the peer has answered no call for
    /// [`SILENT_AFTER`] or more: dead, paused or cut off, before QUIC's idle timeout closes
    /// the connection), `connecting`, `unreachable` (dials fail; retried with backoff) or
    /// `idle` (no connection needed yet, or the last one closed); `refused` in `herald cluster status`
    /// when the peer shows another store than the one it was a member with (or one gone back
    /// in time); `refuses this node` when the peer says so of this node's store (connected,
    /// but it takes no Raft message from this node; `last_error` says why).
    pub state: &'static str,
    /// The connection's current round-trip estimate (QUIC's), while connected.
    pub rtt_us: Option<u64>,
    /// UDP datagrams sent and received, and packets lost, on the connection this node calls
    /// the peer over (QUIC's counts since it opened; `None` while not connected): a call
    /// costs about one datagram each way, and losses on loopback or a LAN point at a
    /// saturated host or link.
    pub datagrams: Option<DatagramCounts>,
    /// Failed dials since the last successful one.
    pub failed_dials: u32,
    /// Why the last dial failed, while the peer is unreachable.
    pub last_error: Option<String>,
    /// The peer's clock minus this node's, ms, as last measured (filled in by the node:
    /// [`crate::clock`]).
    pub clock_offset_ms: Option<i64>,
    /// The peer's build (`0.1.0 (commit ...)`) as it last told it; `None` until it has.
    pub build: Option<String>,
    /// The highest record of the peer's Raft journal this node has seen durable (see
    /// [`crate::peer_stores`]); `None` until it has seen one.
    pub journal: Option<u64>,
}

/// What one QUIC connection has sent and lost (see [`PeerLink::datagrams`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DatagramCounts {
    /// UDP datagrams sent.
    pub sent: u64,
    /// UDP datagrams received.
    pub received: u64,
    /// Packets QUIC declared lost (and sent again, if they carried data).
    pub lost: u64,
}

/// A connection handed to a call, and whether it was dialed for it (a pooled one may turn
/// out stale).
struct Acquired {
    connection: quinn::Connection,
    fresh: bool,
    /// The peer's slot, to record whether the call is answered.
    slot: Arc<Mutex<Slot>>,
}

enum ExchangeError {
    /// Failed before anything was written.
    NotSent(String),
    /// Failed after the request was (perhaps) written.
    Failed(String),
}

impl Peers {
    /// What `id` said of its cluster when it last refused this node's dial as a non-member,
    /// if that cluster is formed: `epoch E; members 1 at host:port, ...`. `None` if it did not
    /// refuse, or is not formed (or runs a version that does not say).
    pub fn formed_without_this_node(&self, id: NodeId) -> Option<String> {
        let slot = self.slots.lock().get(&id).cloned()?;
        slot.lock().formed_note.clone()
    }

    /// The peers that refused this node's store at their last dial's exchange (its data
    /// directory lost, replaced or gone back in time: see [`StoreIds`]), each with why, as
    /// they said it: `node 2 refuses it (node 3: its data directory went back in time ...)`.
    ///
    /// A refusal from a peer whose own store this node refuses is left out: that is not the
    /// member but a process claiming its id (a node started on an old data directory of the
    /// same addresses, say), and its verdict on the members is worth nothing. Taken at its
    /// word, it made the healthy members refuse to serve streams and history, and kept them
    /// so after it had exited (an operator's finding).
    pub fn refused_by(&self) -> Vec<String> {
        let slots: Vec<_> = self
            .slots
            .lock()
            .iter()
            .map(|(id, slot)| (*id, slot.clone()))
            .collect();
        let impostor = |peer: NodeId| {
            self.store_ids
                .get()
                .is_some_and(|ids| ids.refused(peer) || ids.refused_dialed(peer))
        };
        slots
            .iter()
            .filter_map(|(peer, slot)| {
                let note = slot.lock().refused_note.clone()?;
                (!impostor(*peer)).then_some(note)
            })
            .collect()
    }

    /// Records whether `peer` refuses this node's store, as it answered in a clock round (`why`:
    /// `node N: ...`, see [`Peers::refused_by`]).
    pub fn set_refused(&self, peer: NodeId, why: Option<String>) {
        let Some(slot) = self.slots.lock().get(&peer).cloned() else {
            return;
        };
        slot.lock().refused_note = why.map(|why| refuses_it(peer, &why));
    }

    /// Whether `id` is known to be out of reach: its last dial failed, or its connection
    /// closed (a dead peer's, at the QUIC idle timeout). A peer never dialed is not.
    pub fn is_unreachable(&self, id: NodeId) -> bool {
        let Some(slot) = self.slots.lock().get(&id).cloned() else {
            return false;
        };
        let slot = slot.lock();
        slot.failures > 0 || matches!(&slot.link, Link::Connected(c) if c.close_reason().is_some())
    }

    /// How long `id` has left calls unanswered: since the start of the oldest call made over a
    /// connection after the peer last answered one; `None` while every call was answered (or
    /// none made). A live peer answers within its round trip; the figure of one that died or
    /// was cut off grows from the first call after that, and Raft heartbeats make one every
    /// heartbeat interval on any pair of nodes where one leads a group of the other. A peer
    /// that cannot be dialed makes no call: see [`Self::is_unreachable`].
    pub fn unanswered_for(&self, id: NodeId) -> Option<Duration> {
        let slot = self.slots.lock().get(&id).cloned()?;
        let since = slot.lock().unanswered_since?;
        Some(since.elapsed())
    }

    /// Whether this node has a call to `id` under way, or had one answered within `within`:
    /// if not, its silence would not show (see [`Self::unanswered_for`]), so the
    /// reachability check asks it something.
    pub fn called_within(&self, id: NodeId, within: Duration) -> bool {
        let Some(slot) = self.slots.lock().get(&id).cloned() else {
            return false;
        };
        let slot = slot.lock();
        slot.unanswered_since.is_some()
            || slot.last_answered.is_some_and(|at| at.elapsed() < within)
    }

    /// Whether `id` counts as gone silent: it is unreachable ([`Self::is_unreachable`]) or
    /// has left this node's calls unanswered for [`SILENT_AFTER`] ([`Self::unanswered_for`]).
    /// A member that answers anything within that time is not.
    pub fn is_silent(&self, id: NodeId) -> bool {
        self.is_unreachable(id) || self.unanswered_for(id).is_some_and(|d| d >= SILENT_AFTER)
    }

    /// Resolves once `id` has left calls unanswered for `silence` ([`Self::unanswered_for`]),
    /// checked every 25 ms: a caller waiting on one peer gives up on it when the peer stopped
    /// answering everyone, rather than at its own timeout.
    pub async fn until_silent(&self, id: NodeId, silence: Duration) {
        loop {
            if self.unanswered_for(id).is_some_and(|d| d >= silence) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// The link to every peer this node has an address for (see [`PeerLink`]).
    pub fn links(&self) -> BTreeMap<NodeId, PeerLink> {
        let slots: Vec<(NodeId, Arc<Mutex<Slot>>)> = self
            .slots
            .lock()
            .iter()
            .map(|(id, slot)| (*id, slot.clone()))
            .collect();
        slots
            .into_iter()
            .filter_map(|(id, slot)| {
                let slot = slot.lock();
                slot.addr.as_ref()?;
                let unreachable = slot.failures > 0;
                let (state, rtt_us, datagrams) = match &slot.link {
                    Link::Connected(c) if c.close_reason().is_none() => {
                        let stats = c.stats();
                        let datagrams = DatagramCounts {
                            sent: stats.udp_tx.datagrams,
                            received: stats.udp_rx.datagrams,
                            lost: stats.path.lost_packets,
                        };
                        (
                            "connected",
                            Some(c.rtt().as_micros() as u64),
                            Some(datagrams),
                        )
                    }
                    _ if unreachable => ("unreachable", None, None),
                    Link::Dialing(_) => ("connecting", None, None),
                    _ => ("idle", None, None),
                };
                // Connected, but the peer takes no Raft message from this node: what matters.
                let refuses = state == "connected" && slot.refused_note.is_some();
                // Connected, but answering nothing: a peer killed or paused keeps its
                // connection until QUIC's idle timeout, seconds after its groups moved on.
                let silent = (state == "connected")
                    .then(|| slot.unanswered_since.map(|since| since.elapsed()))
                    .flatten()
                    .filter(|silence| *silence >= SILENT_AFTER);
                let (state, last_error) = match silent {
                    _ if refuses => ("refuses this node", slot.refused_note.clone()),
                    Some(silence) => (
                        "silent",
                        Some(format!(
                            "it has answered no call for {:.1} s (down, paused or cut off?)",
                            silence.as_secs_f64()
                        )),
                    ),
                    None => (state, unreachable.then(|| slot.last_error.clone())),
                };
                Some((
                    id,
                    PeerLink {
                        state,
                        rtt_us,
                        datagrams,
                        failed_dials: slot.failures,
                        last_error,
                        clock_offset_ms: None,
                        build: None,
                        journal: None,
                    },
                ))
            })
            .collect()
    }

    /// A pool dialing through `transport` with the default [`PeersOptions`].
    pub fn new(transport: Arc<Transport>) -> Arc<Peers> {
        Peers::with_options(transport, PeersOptions::default())
    }

    /// A pool dialing through `transport`.
    pub fn with_options(transport: Arc<Transport>, options: PeersOptions) -> Arc<Peers> {
        Arc::new(Peers {
            transport,
            options,
            store_ids: std::sync::OnceLock::new(),
            slots: Mutex::new(HashMap::new()),
            dials: AtomicU64::new(0),
            arrivals: tokio::sync::watch::Sender::new(0),
        })
    }

    /// Sets how this node's and its peers' stores are told apart (once; later calls are
    /// ignored): each new connection then starts with an exchange of store ids, and Raft
    /// messages to a peer `store_ids` refuses are not sent.
    pub fn set_store_ids(&self, store_ids: Arc<dyn StoreIds>) {
        let _ = self.store_ids.set(store_ids);
    }

    /// This node's id.
    pub fn local_id(&self) -> NodeId {
        self.transport.id()
    }

    /// The dialing and backoff settings.
    pub fn options(&self) -> &PeersOptions {
        &self.options
    }

    /// Dials started since creation (for metrics and tests).
    pub fn dials(&self) -> u64 {
        self.dials.load(Ordering::Relaxed)
    }

    /// Sets where node `id` listens: a [`SocketAddr`], or a `host:port` string such as
    /// openraft's `BasicNode::addr` (a host name is resolved at each dial). Setting the same
    /// address again does nothing; a new one ends the peer's backoff.
    pub fn set_addr(&self, id: NodeId, addr: impl Into<PeerAddr>) {
        self.set(id, addr.into());
    }

    fn set(&self, id: NodeId, addr: PeerAddr) {
        let slot = self.slot(id);
        let mut slot = slot.lock();
        if slot.addr.as_ref() == Some(&addr) {
            return;
        }
        tracing::debug!(peer = id, %addr, "peer address set");
        slot.addr = Some(addr);
        // A new address may work where the old one failed: forget the backoff. A live
        // connection stays: its certificate proved it is that node.
        if !matches!(slot.link, Link::Connected(_)) {
            slot.link = Link::Idle;
        }
        slot.failures = 0;
        slot.failing_since = None;
        slot.warned = false;
        slot.backoff = self.options.backoff_initial;
        slot.generation += 1;
    }

    /// Node `id` has just connected to this node, so it is up: a backoff after failed dials
    /// to it (while it was down or restarting) ends, and the next call dials at once instead
    /// of up to [`PeersOptions::backoff_max`] later. A restarted leader's followers, and a
    /// restarted follower's leaders, otherwise reached it only when their backoff ran out:
    /// meanwhile it heard no leader and caught up with nothing.
    ///
    /// A dial still under way after failed ones is given up too: it went out while the peer
    /// was down, and its handshake waits for QUIC to resend its first packet (about a second
    /// later) or for the connect timeout. Seen in the chaos `kill` scenario: a restarted node's
    /// members reached it 1.0-1.4 s after it was ready in 4 of 14 restarts, their handshakes
    /// aborted meanwhile. (A first dial is left alone: at start-up two nodes dial each other.)
    pub fn dialed_in(&self, id: NodeId) {
        self.reset_backoff(id);
        // After the reset: a push that this starts reaches the peer at once.
        self.arrivals.send_modify(|n| *n += 1);
    }

    /// Node `id` opened a connection showing run `run` (`JournalProgress::run`, drawn at each
    /// start). A pooled connection on which it showed another run is to a process that is
    /// gone (killed and started again: QUIC finds out only at its idle timeout): it is closed
    /// now, so that the
    /// next call dials the new one. Non-durable events relayed to a node restarted right after
    /// a `kill -9` went down the old connection and were lost, though its new subscribers
    /// were confirmed.
    pub fn saw_run(&self, id: NodeId, run: u64) {
        let Some(slot) = self.slots.lock().get(&id).cloned() else {
            return;
        };
        let mut slot = slot.lock();
        if slot.run.is_none_or(|pooled| pooled == run) {
            return;
        }
        if let Link::Connected(connection) = &slot.link {
            tracing::debug!(
                peer = id,
                "the peer restarted: closing the connection to its previous run"
            );
            // Its unanswered calls still count (the peer stays silent until a call over the
            // next connection is answered): cleared here, the member looked answering in the
            // moment before that connection, judged by the store of the old run.
            connection.close(0u32.into(), b"the peer restarted");
            slot.link = Link::Idle;
        }
        slot.run = None;
    }

    /// [`Self::dialed_in`]'s end of a backoff.
    fn reset_backoff(&self, id: NodeId) {
        let Some(slot) = self.slots.lock().get(&id).cloned() else {
            return;
        };
        let mut slot = slot.lock();
        match slot.link {
            Link::Backoff { .. } => {
                tracing::debug!(peer = id, "the peer connected: its backoff ends");
            }
            Link::Dialing(_) if slot.failures > 0 => {
                tracing::debug!(
                    peer = id,
                    "the peer connected: the dial under way is given up"
                );
                // Its outcome no longer counts (see `dial`).
                slot.generation += 1;
            }
            _ => return,
        }
        slot.link = Link::Idle;
        slot.backoff = self.options.backoff_initial;
    }

    /// Changes each time a peer opens a connection to this node ([`Peers::dialed_in`]): a
    /// peer that has just (re)started knows nothing this node pushes periodically, such as its
    /// interest, and is told at once instead of at the next period.
    pub fn arrivals(&self) -> tokio::sync::watch::Receiver<u64> {
        self.arrivals.subscribe()
    }

    /// Forgets node `id` (removed from the cluster): closes its connection.
    pub fn remove(&self, id: NodeId) {
        let removed = self.slots.lock().remove(&id);
        if let Some(slot) = removed {
            let mut slot = slot.lock();
            slot.generation += 1;
            if let Link::Connected(connection) = &slot.link {
                connection.close(0u32.into(), b"removed");
            }
            slot.link = Link::Idle;
        }
    }

    fn slot(&self, id: NodeId) -> Arc<Mutex<Slot>> {
        self.slots
            .lock()
            .entry(id)
            .or_insert_with(|| {
                Arc::new(Mutex::new(Slot {
                    addr: None,
                    link: Link::Idle,
                    failures: 0,
                    backoff: self.options.backoff_initial,
                    last_error: String::new(),
                    generation: 0,
                    unanswered_since: None,
                    last_answered: None,
                    ever_connected: false,
                    failing_since: None,
                    warned: false,
                    formed_note: None,
                    refused_note: None,
                    run: None,
                }))
            })
            .clone()
    }

    /// Sends `request` to node `target` and waits at most `timeout` for the response
    /// (connecting included).
    pub async fn call(
        &self,
        target: NodeId,
        request: &Request,
        timeout: Duration,
    ) -> Result<Response, RpcError> {
        self.call_with(target, request, timeout, timeout).await
    }

    /// [`Self::call`], waiting at most `connect_wait` for a connection (then
    /// [`RpcError::Unreachable`]) within the overall `timeout`.
    pub async fn call_with(
        &self,
        target: NodeId,
        request: &Request,
        connect_wait: Duration,
        timeout: Duration,
    ) -> Result<Response, RpcError> {
        self.refuse_raft_to_changed_store(target, request)?;
        let frame = encode_frame(request).map_err(|reason| RpcError::TooLarge {
            peer: target,
            reason,
        })?;
        let deadline = Instant::now() + timeout;
        let mut retried = false;
        loop {
            let wait = connect_wait.min(deadline.saturating_duration_since(Instant::now()));
            let Acquired {
                connection,
                fresh,
                slot,
            } = self.acquire(target, wait).await?;
            // Again: the dial that made this connection may just have judged the peer.
            self.refuse_raft_to_changed_store(target, request)?;
            slot.lock()
                .unanswered_since
                .get_or_insert_with(Instant::now);
            let exchange = tokio::time::timeout_at(deadline, exchange(&connection, &frame)).await;
            match exchange {
                Ok(Ok(response)) => {
                    let mut slot = slot.lock();
                    slot.unanswered_since = None;
                    slot.last_answered = Some(Instant::now());
                    // The peer's verdict on this node's store, as its Raft answers show it
                    // (it may change on a connection: the node removed and joined again).
                    match &response {
                        Response::Error(reason) if reason.starts_with("refused:") => {
                            slot.refused_note = Some(refused_note(target, reason));
                        }
                        Response::AppendEntries(_)
                        | Response::Vote(_)
                        | Response::InstallSnapshot(_) => slot.refused_note = None,
                        _ => {}
                    }
                    return Ok(response);
                }
                Ok(Err(ExchangeError::NotSent(reason))) => {
                    self.drop_connection(target, &connection, &reason);
                    // A pooled connection may have died unnoticed: dial once more.
                    if !fresh && !retried {
                        retried = true;
                        continue;
                    }
                    return Err(RpcError::Unreachable {
                        peer: target,
                        reason,
                    });
                }
                Ok(Err(ExchangeError::Failed(reason))) => {
                    if connection.close_reason().is_some() {
                        self.drop_connection(target, &connection, &reason);
                    }
                    return Err(RpcError::Failed {
                        peer: target,
                        reason,
                    });
                }
                Err(_) => {
                    return Err(RpcError::Timeout {
                        peer: target,
                        timeout,
                    });
                }
            }
        }
    }

    /// Raft traffic with a member that came back on another store is refused both ways: its
    /// vote (or its acknowledgement of entries) would count what it no longer holds.
    fn refuse_raft_to_changed_store(
        &self,
        target: NodeId,
        request: &Request,
    ) -> Result<(), RpcError> {
        if !request.is_raft() {
            return Ok(());
        }
        let Some(store_ids) = self.store_ids.get() else {
            return Ok(());
        };
        if store_ids.refused_dialed(target) {
            return Err(RpcError::Unreachable {
                peer: target,
                reason: format!(
                    "node {target} runs on another store: {}",
                    store_changed(target)
                ),
            });
        }
        if !store_ids.takes_part(target) {
            return Err(RpcError::Unreachable {
                peer: target,
                reason: format!("node {target} is no longer a member of the cluster (removed)"),
            });
        }
        Ok(())
    }

    /// Removes `connection` from the pool if it is still the pooled one.
    fn drop_connection(&self, target: NodeId, connection: &quinn::Connection, reason: &str) {
        let slot = self.slot(target);
        let mut slot = slot.lock();
        if let Link::Connected(pooled) = &slot.link
            && pooled.stable_id() == connection.stable_id()
        {
            tracing::debug!(peer = target, %reason, "dropping the connection");
            slot.link = Link::Idle;
        }
    }

    /// A live connection to `target`: the pooled one, or the outcome of a dial (started here
    /// or already under way), waiting at most `wait`.
    async fn acquire(&self, target: NodeId, wait: Duration) -> Result<Acquired, RpcError> {
        let unreachable = |reason: String| RpcError::Unreachable {
            peer: target,
            reason,
        };
        let slot_ref = self.slot(target);
        let mut outcome = {
            let mut slot = slot_ref.lock();
            if let Link::Connected(connection) = &slot.link {
                match connection.close_reason() {
                    None => {
                        return Ok(Acquired {
                            connection: connection.clone(),
                            fresh: false,
                            slot: slot_ref.clone(),
                        });
                    }
                    Some(reason) => {
                        tracing::debug!(peer = target, %reason, "connection closed; redialing");
                        slot.link = Link::Idle;
                    }
                }
            }
            match &slot.link {
                Link::Dialing(outcome) if slot.failures == 0 => outcome.clone(),
                Link::Dialing(_) => {
                    return Err(unreachable(format!("{} (reconnecting)", slot.last_error)));
                }
                Link::Backoff { until } if Instant::now() < *until => {
                    return Err(unreachable(format!(
                        "{} (next attempt in {:?})",
                        slot.last_error,
                        until.saturating_duration_since(Instant::now())
                    )));
                }
                _ => {
                    let Some(addr) = slot.addr.clone() else {
                        return Err(unreachable("no address known".into()));
                    };
                    let (tx, rx) = watch::channel(None);
                    slot.generation += 1;
                    slot.link = Link::Dialing(rx.clone());
                    self.dials.fetch_add(1, Ordering::Relaxed);
                    tokio::spawn(dial(
                        self.transport.clone(),
                        slot_ref.clone(),
                        slot.generation,
                        target,
                        addr,
                        self.options.clone(),
                        self.store_ids.get().cloned(),
                        tx,
                    ));
                    rx
                }
            }
        };
        let result = match tokio::time::timeout(wait, outcome.wait_for(Option::is_some)).await {
            Ok(Ok(result)) => result.clone(),
            Ok(Err(_)) => return Err(unreachable("the dial was abandoned".into())),
            Err(_) => return Err(unreachable(format!("still connecting after {wait:?}"))),
        };
        match result {
            Some(Ok(connection)) => Ok(Acquired {
                connection,
                fresh: true,
                slot: slot_ref,
            }),
            Some(Err(reason)) => Err(unreachable(reason)),
            None => Err(unreachable("the dial was abandoned".into())),
        }
    }
}

/// Dials `target` and records the outcome in its slot (connection, or backoff).
#[allow(clippy::too_many_arguments)] // a spawned task's inputs, each used once
async fn dial(
    transport: Arc<Transport>,
    slot: Arc<Mutex<Slot>>,
    generation: u64,
    target: NodeId,
    addr: PeerAddr,
    options: PeersOptions,
    store_ids: Option<Arc<dyn StoreIds>>,
    outcome: watch::Sender<DialResult>,
) {
    let mut run = None;
    let attempt = async {
        let socket = resolve(&transport, &addr).await?;
        let connection = transport
            .connect(socket, target)
            .await
            .map(|peer| peer.connection)
            .map_err(|e| e.to_string())?;
        if let Some(store_ids) = &store_ids {
            match exchange_store_ids(&connection, target, store_ids.as_ref()).await {
                Ok((refused, shown)) => {
                    slot.lock().refused_note = refused;
                    run = shown;
                }
                Err(reason) => {
                    if crate::transport::refused_as_non_member(&connection) {
                        slot.lock().formed_note = crate::transport::non_member_note(&connection);
                        return Err(format!(
                            "node {target} refuses this node: {NOT_A_MEMBER} (yet: `herald cluster join` adds it)"
                        ));
                    }
                    return Err(reason);
                }
            }
        }
        Ok(connection)
    };
    let result = match tokio::time::timeout(options.connect_timeout, attempt).await {
        Ok(result) => result,
        Err(_) => Err(format!(
            "no connection to {addr} within {:?}",
            options.connect_timeout
        )),
    };
    {
        let mut slot = slot.lock();
        let current = slot.generation == generation;
        match &result {
            // Ours, or one whose slot moved on (a new address, the peer removed, a dial given
            // up when the peer dialed in) while no other dial runs: the connection is to the
            // right node (its certificate says so), so it is kept, and the peer is reachable
            // again (else `is_unreachable` stayed true over a working connection).
            Ok(connection) if current || matches!(slot.link, Link::Idle) => {
                if !current {
                    tracing::debug!(peer = target, "a dial given up connected after all: kept");
                }
                if slot.failures > 0 && slot.ever_connected {
                    tracing::info!(peer = target, "reconnected to node");
                } else if slot.failures > 0 {
                    tracing::info!(peer = target, "connected to node");
                } else {
                    tracing::debug!(peer = target, "connected to node");
                }
                slot.link = Link::Connected(connection.clone());
                slot.run = run;
                slot.formed_note = None;
                slot.failures = 0;
                slot.ever_connected = true;
                slot.failing_since = None;
                slot.warned = false;
                slot.backoff = options.backoff_initial;
            }
            Ok(_) => tracing::debug!(peer = target, "dial outcome superseded by another dial"),
            Err(_) if !current => {}
            Err(reason) => {
                slot.failures += 1;
                let failing = slot
                    .failing_since
                    .get_or_insert_with(Instant::now)
                    .elapsed();
                // Refused as a non-member: this node waits to be joined (or was removed).
                let not_member = reason.contains(NOT_A_MEMBER);
                if slot.failures == 1 && slot.ever_connected && !not_member {
                    slot.warned = true;
                    tracing::warn!(peer = target, %reason, "cannot connect to node");
                } else if slot.failures == 1 {
                    // Not up yet, most likely (nodes start one after another), or this node
                    // not joined yet.
                    tracing::info!(peer = target, %reason, "cannot connect to node yet");
                } else if !slot.warned && !not_member && failing >= NEVER_REACHED_WARNING {
                    slot.warned = true;
                    tracing::warn!(
                        peer = target,
                        %reason,
                        failures = slot.failures,
                        "still cannot connect to node {target} after {} s: is it running, at the address this node has for it?",
                        failing.as_secs()
                    );
                } else {
                    tracing::debug!(peer = target, %reason, failures = slot.failures, "cannot connect to node");
                }
                slot.link = Link::Backoff {
                    until: Instant::now() + slot.backoff,
                };
                slot.backoff = (slot.backoff * 2).min(options.backoff_max);
                slot.last_error = reason.clone();
            }
        }
    }
    outcome.send_replace(Some(result));
}

/// What a dial refused by a peer because this node is not a member says.
const NOT_A_MEMBER: &str = "not a member of its cluster";

/// A new connection's first exchange: this node's [`Identity`] for the peer's, which
/// `store_ids` judges. A node from before the identity is sent the store id alone; one from
/// before the store id answers with an error: it is not checked. `Ok(Some(why))`: the peer
/// refuses this node's store (the connection stays; no Raft message is taken on it).
async fn exchange_store_ids(
    connection: &quinn::Connection,
    target: NodeId,
    store_ids: &dyn StoreIds,
) -> Result<(Option<String>, Option<u64>), String> {
    let ours = store_ids.identity();
    let request = match ours {
        Some(identity) => Request::Identity(identity),
        None => Request::StoreId(store_ids.local()),
    };
    let mut answer = exchange(connection, &encode_frame(&request)?).await;
    if ours.is_some()
        && matches!(&answer, Ok(Response::Error(reason)) if !reason.starts_with("refused:"))
    {
        // A node from before the identity: the store id alone.
        let frame = encode_frame(&Request::StoreId(store_ids.local()))?;
        answer = exchange(connection, &frame).await;
    }
    match answer {
        Ok(Response::Identity(theirs)) => {
            if store_ids.accepts_dialed(target, theirs.store) {
                store_ids.accepts_journal(target, theirs.store, &theirs.journal);
            }
            Ok((None, Some(theirs.journal.run)))
        }
        Ok(Response::StoreId(theirs)) => {
            store_ids.accepts_dialed(target, theirs);
            Ok((None, None))
        }
        Ok(Response::Error(reason)) if reason.starts_with("refused:") => {
            tracing::error!(peer = target, "node {target} {reason}");
            Ok((Some(refused_note(target, &reason)), None))
        }
        // A node from before the exchange: not checked.
        Ok(_) => Ok((None, None)),
        Err(ExchangeError::NotSent(reason) | ExchangeError::Failed(reason)) => {
            Err(format!("exchanging store ids: {reason}"))
        }
    }
}

/// What `herald cluster status` and `/ready` say of a peer's `refused: ...` answer.
fn refused_note(peer: NodeId, refused: &str) -> String {
    refuses_it(peer, refused.trim_start_matches("refused:").trim_start())
}

/// `node N refuses it (why)`: one wording for a refusal heard at a dial and in a clock round.
fn refuses_it(peer: NodeId, why: &str) -> String {
    format!("node {peer} refuses it ({why})")
}

/// Resolves a peer address, preferring the address family the local endpoint is bound to.
async fn resolve(transport: &Transport, addr: &PeerAddr) -> Result<SocketAddr, String> {
    let host = match addr {
        PeerAddr::Socket(socket) => return Ok(*socket),
        PeerAddr::Host(host) => host,
    };
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host(host.as_str())
        .await
        .map_err(|e| format!("cannot resolve {host}: {e}"))?
        .collect();
    let ipv6 = transport.local_addr().map(|a| a.is_ipv6()).unwrap_or(false);
    addrs
        .iter()
        .find(|a| a.is_ipv6() == ipv6)
        .or(addrs.first())
        .copied()
        .ok_or_else(|| format!("{host} resolves to no address"))
}

/// One call on one stream: write the request frame, finish, read the response frame.
async fn exchange(connection: &quinn::Connection, frame: &[u8]) -> Result<Response, ExchangeError> {
    let (mut send, mut recv) = connection
        .open_bi()
        .await
        .map_err(|e| ExchangeError::NotSent(format!("cannot open a stream: {e}")))?;
    let failed =
        |what: &str, e: &dyn std::fmt::Display| ExchangeError::Failed(format!("{what}: {e}"));
    send.write_all(frame)
        .await
        .map_err(|e| failed("sending the request", &e))?;
    send.finish()
        .map_err(|e| failed("finishing the request", &e))?;
    let bytes = read_frame(&mut recv)
        .await
        .map_err(|e| failed("reading the response", &e))?;
    decode(&bytes).map_err(|e| failed("decoding the response", &e))
}

// ---------------------------------------------------------------------------------------------
// Server side.

/// What an operator is told about member `peer`, back with another store.
pub fn store_changed(peer: NodeId) -> String {
    format!(
        "its data directory was lost or replaced, so it may lack events it acknowledged and must not vote; {}",
        remove_and_join(peer)
    )
}

/// Why member `peer`, back on its store but with less of its journal than it had made
/// durable, is refused: `start` is where its journal begins now, `durable` what a run of it
/// had made durable before.
pub fn store_went_back(peer: NodeId, start: u64, durable: u64) -> String {
    let how = if durable > 0 {
        format!(
            " (its Raft journal starts at record {start}, and it had made record {durable} durable)"
        )
    } else {
        String::new()
    };
    format!(
        "its data directory went back in time{how}: restored from a backup or a disk snapshot, it may lack events it acknowledged and must not vote; {}",
        remove_and_join(peer)
    )
}

/// The operator's way back for a member refused for its store.
fn remove_and_join(peer: NodeId) -> String {
    format!(
        "remove it (`herald cluster remove --node-id {peer}`) and join it again (`herald cluster join --node-id {peer} --addr ...`)"
    )
}

/// Tells the stores of a cluster's members apart: each store has a random id for its life
/// (see `Store::store_id`), and a member must keep the one it had. A node restarted under the
/// same node id on an empty data directory would otherwise vote as if it still held what it
/// had acknowledged, and could elect a leader that lacks it.
///
/// The ids are exchanged once per connection, by the dialing node's first request (a
/// [`Request::StoreId`], answered with the receiver's), so the Raft messages themselves are
/// unchanged and a node from before the exchange still talks to newer ones during a rolling
/// upgrade (it is simply not checked).
///
/// The identity also shows how far the node's Raft journal has got, and a member whose
/// data directory went back in time (restored from a backup: same store id, less journal) is
/// refused for good, like one on another store (see `crate::peer_stores`).
pub trait StoreIds: Send + Sync {
    /// This node's store id.
    fn local(&self) -> u64;
    /// This node's store id and journal, once the journal is open (`None`: the store id
    /// alone is shown).
    fn identity(&self) -> Option<Identity> {
        None
    }
    /// Judges the journal member `peer` showed, on store `store`, at the start of a
    /// connection: whether it is heard.
    fn accepts_journal(&self, peer: NodeId, store: u64, journal: &JournalProgress) -> bool {
        let _ = (peer, store, journal);
        true
    }
    /// Why `peer` is refused, for its log and `herald cluster status`.
    fn refusal(&self, peer: NodeId) -> String {
        format!(
            "runs on another store than the one it was a member with: {}",
            store_changed(peer)
        )
    }
    /// Judges node `peer`, seen with store id `store`: whether it is heard. The verdict
    /// stands (see [`StoreIds::refused`]) until the peer is seen again.
    fn accepts(&self, peer: NodeId, store: u64) -> bool;
    /// [`StoreIds::accepts`] for the answer of a connection this node dialed, at the address
    /// the membership gives `peer`.
    fn accepts_dialed(&self, peer: NodeId, store: u64) -> bool {
        self.accepts(peer, store)
    }
    /// Whether the last verdict on `peer` was a refusal: then no Raft message goes to it or is
    /// taken from it.
    fn refused(&self, peer: NodeId) -> bool;
    /// Whether Raft messages on a connection on which `peer` showed store id `store` are
    /// refused: judged by the connection, so that a second process claiming `peer`'s id does
    /// not get the member itself refused.
    fn refused_store(&self, peer: NodeId, store: u64) -> bool {
        let _ = store;
        self.refused(peer)
    }
    /// Whether Raft messages to `peer` over the connections this node dials are refused.
    fn refused_dialed(&self, peer: NodeId) -> bool {
        self.refused(peer)
    }
    /// Whether `peer` may take part in Raft with this node as far as the cluster's membership
    /// goes: a node the membership no longer lists (removed, not joined again) takes part in
    /// no group, though partition groups may list it until their leaders take it out. Its
    /// record is forgotten at its removal, so that it can be joined again on a new store: a
    /// node back on an empty data directory would otherwise count as a voter of those groups
    /// from its removal on.
    fn takes_part(&self, peer: NodeId) -> bool {
        let _ = peer;
        true
    }
}

/// What a node serves: its Raft groups and its application requests.
pub trait Handler: Send + Sync + 'static {
    /// How this node's and its peers' stores are told apart; `None` accepts every store.
    fn store_ids(&self) -> Option<&dyn StoreIds> {
        None
    }

    /// The Raft instance of `group` on this node, if it runs one.
    fn raft(&self, group: GroupId) -> Option<openraft::Raft<TypeConfig>>;

    /// Whether a vote request for `group` from node `from` is heard. A node outside the group
    /// (removed, then restarted on its old data) must not disturb it with elections; refused
    /// votes are answered like an unknown group, so the sender backs off.
    fn accepts_vote(&self, from: NodeId, group: GroupId) -> bool {
        let _ = (from, group);
        true
    }

    /// Whether AppendEntries and InstallSnapshot for `group` from node `from` are heard. A
    /// node removed from the cluster while it led a group must not go on committing there:
    /// refused, it loses its quorum, and the members elect a leader among themselves.
    fn accepts_leader(&self, from: NodeId, group: GroupId) -> bool {
        let _ = (from, group);
        true
    }

    /// Called when `group`'s Raft accepted AppendEntries (from the leader it follows), which
    /// carried the leader's commit index: the leader is alive (failover detection uses it),
    /// and this node has that much to apply (catching up, [`crate::catch_up`]).
    fn heard_from_leader(&self, group: GroupId, leader_commit: Option<u64>) {
        let _ = (group, leader_commit);
    }

    /// Answers an application request from node `from`.
    fn app(&self, from: NodeId, request: Bytes) -> BoxFuture<'static, Bytes>;
}

/// Serves RPCs arriving at `transport` until `shutdown` is cancelled or the endpoint closes:
/// each connection in its own task (handshake and membership check included), each stream in
/// its own task. A peer that connects ends its backoff in `peers`, this node's client side
/// ([`Peers::dialed_in`]). The returned task ends once the accept loop and the connection
/// tasks have stopped; calls already being answered are not waited for (close the transport
/// with [`Transport::shutdown`] afterwards).
pub fn serve(
    transport: Arc<Transport>,
    handler: Arc<dyn Handler>,
    peers: Arc<Peers>,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let connections = TaskTracker::new();
        loop {
            let incoming = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                incoming = transport.accept_incoming() => incoming,
            };
            let Some(incoming) = incoming else { break };
            connections.spawn(serve_connection(
                incoming,
                handler.clone(),
                peers.clone(),
                shutdown.clone(),
            ));
        }
        connections.close();
        connections.wait().await;
    })
}

async fn serve_connection(
    incoming: IncomingPeer,
    handler: Arc<dyn Handler>,
    peers: Arc<Peers>,
    shutdown: CancellationToken,
) {
    let peer = tokio::select! {
        _ = shutdown.cancelled() => return,
        peer = incoming.authenticate() => match peer {
            Ok(peer) => peer,
            Err(_) => return, // logged by authenticate
        },
    };
    tracing::debug!(peer = peer.peer, addr = %peer.connection.remote_address(), "cluster connection accepted");
    peers.dialed_in(peer.peer);
    // The store id the peer shows on this connection (its first request): Raft messages are
    // judged by it, per connection.
    let shown: Arc<std::sync::OnceLock<u64>> = Arc::default();
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => break,
            stream = peer.connection.accept_bi() => stream,
        };
        match stream {
            Ok((send, recv)) => {
                tokio::spawn(serve_stream(
                    peer.peer,
                    shown.clone(),
                    send,
                    recv,
                    handler.clone(),
                    peers.clone(),
                ));
            }
            Err(reason) => {
                tracing::debug!(peer = peer.peer, %reason, "cluster connection ended");
                break;
            }
        }
    }
}

async fn serve_stream(
    from: NodeId,
    shown: Arc<std::sync::OnceLock<u64>>,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    handler: Arc<dyn Handler>,
    peers: Arc<Peers>,
) {
    let refused = |store_ids: &dyn StoreIds| match shown.get() {
        Some(store) => store_ids.refused_store(from, *store),
        // A node from before the exchange: judged by the last verdict on its id.
        None => store_ids.refused(from),
    };
    let response = match read_frame(&mut recv).await {
        Ok(bytes) => match decode::<Request>(&bytes) {
            Ok(Request::StoreId(store)) => {
                let _ = shown.set(store);
                dispatch(from, Request::StoreId(store), handler.as_ref()).await
            }
            Ok(Request::Identity(identity)) => {
                let _ = shown.set(identity.store);
                peers.saw_run(from, identity.journal.run);
                dispatch(from, Request::Identity(identity), handler.as_ref()).await
            }
            // Not `refused:`, which would tell the node its store is refused: it was removed.
            Ok(request)
                if request.is_raft()
                    && handler.store_ids().is_some_and(|ids| !ids.takes_part(from)) =>
            {
                Response::Error(format!(
                    "not a member: node {from} is no longer a member of this cluster (removed, and not joined again): it takes part in no Raft group"
                ))
            }
            Ok(request) if request.is_raft() && handler.store_ids().is_some_and(refused) => {
                let reason = handler.store_ids().map(|ids| ids.refusal(from));
                Response::Error(format!(
                    "refused: node {from}: {}",
                    reason.unwrap_or_default()
                ))
            }
            Ok(request) => dispatch(from, request, handler.as_ref()).await,
            Err(reason) => {
                tracing::warn!(peer = from, %reason, "malformed RPC request");
                Response::Error(reason)
            }
        },
        Err(FrameError::TooLarge(len)) => {
            let _ = recv.stop(FRAME_TOO_LARGE.into());
            let reason = FrameError::TooLarge(len).to_string();
            tracing::warn!(peer = from, %reason, "refused an RPC request");
            Response::Error(reason)
        }
        Err(FrameError::Read(reason)) => {
            // The caller gave up (timeout, cancellation) or the connection broke.
            tracing::debug!(peer = from, %reason, "incomplete RPC request");
            return;
        }
    };
    let frame = match encode_frame(&response) {
        Ok(frame) => frame,
        Err(reason) => {
            tracing::warn!(peer = from, %reason, "cannot send an RPC response");
            match encode_frame(&Response::Error(format!("response not sent: {reason}"))) {
                Ok(frame) => frame,
                Err(_) => return,
            }
        }
    };
    if let Err(reason) = send.write_all(&frame).await {
        tracing::debug!(peer = from, %reason, "cannot send an RPC response");
        return;
    }
    let _ = send.finish();
}

async fn dispatch(from: NodeId, request: Request, handler: &dyn Handler) -> Response {
    match request {
        Request::AppendEntries { group, .. } | Request::InstallSnapshot { group, .. }
            if !handler.accepts_leader(from, group) =>
        {
            Response::NoSuchGroup(group)
        }
        Request::AppendEntries { group, rpc } => match handler.raft(group) {
            Some(raft) => {
                let leader_commit = rpc.leader_commit.map(|id| id.index);
                let response = raft.append_entries(rpc).await;
                if matches!(
                    response,
                    Ok(AppendEntriesResponse::Success
                        | AppendEntriesResponse::PartialSuccess(_)
                        | AppendEntriesResponse::Conflict)
                ) {
                    handler.heard_from_leader(group, leader_commit);
                }
                Response::AppendEntries(response)
            }
            None => Response::NoSuchGroup(group),
        },
        Request::Vote { group, .. } if !handler.accepts_vote(from, group) => {
            Response::NoSuchGroup(group)
        }
        Request::Vote { group, rpc } => match handler.raft(group) {
            Some(raft) => Response::Vote(raft.vote(rpc).await),
            None => Response::NoSuchGroup(group),
        },
        // A snapshot's chunks go into memory at their offset: an offset or size past what any
        // snapshot can be (the store decodes none above 1 GiB) is refused, not allocated.
        Request::InstallSnapshot { rpc, .. }
            if rpc.offset.saturating_add(rpc.data.len() as u64) > MAX_SNAPSHOT_BYTES =>
        {
            Response::Error(format!(
                "snapshot chunk at offset {} of {} bytes passes the {MAX_SNAPSHOT_BYTES}-byte limit",
                rpc.offset,
                rpc.data.len()
            ))
        }
        Request::InstallSnapshot { group, rpc } => match handler.raft(group) {
            Some(raft) => Response::InstallSnapshot(raft.install_snapshot(rpc).await),
            None => Response::NoSuchGroup(group),
        },
        Request::App(request) => Response::App(handler.app(from, request).await),
        Request::StoreId(store) => match handler.store_ids() {
            // Refused: the peer is told why, so that its own log says what to do.
            Some(store_ids) if !store_ids.accepts(from, store) => {
                Response::Error(format!("refused: node {from}: {}", store_ids.refusal(from)))
            }
            Some(store_ids) => Response::StoreId(store_ids.local()),
            None => Response::Error("this node does not check store ids".into()),
        },
        Request::Identity(theirs) => match handler.store_ids() {
            Some(store_ids)
                if !store_ids.accepts(from, theirs.store)
                    || !store_ids.accepts_journal(from, theirs.store, &theirs.journal) =>
            {
                Response::Error(format!("refused: node {from}: {}", store_ids.refusal(from)))
            }
            Some(store_ids) => match store_ids.identity() {
                Some(ours) => Response::Identity(ours),
                None => Response::StoreId(store_ids.local()),
            },
            None => Response::Error("this node does not check store ids".into()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_carry_a_big_endian_length() {
        let frame = encode_frame(&Request::App(Bytes::from_static(b"hi"))).unwrap();
        let len = u32::from_be_bytes(frame[..4].try_into().unwrap()) as usize;
        assert_eq!(len, frame.len() - 4);
        match decode::<Request>(&frame[4..]).unwrap() {
            Request::App(bytes) => assert_eq!(&bytes[..], b"hi"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn malformed_and_oversized_frames_are_errors() {
        assert!(decode::<Request>(&[0xff, 0xff, 0xff]).is_err());
        let mut frame = encode_frame(&Request::App(Bytes::from_static(b"hi"))).unwrap();
        frame.push(0);
        assert!(
            decode::<Request>(&frame[4..])
                .unwrap_err()
                .contains("trailing")
        );
        let big = Request::App(Bytes::from(vec![0u8; MAX_FRAME + 1]));
        assert!(encode_frame(&big).unwrap_err().contains("exceeds"));
    }

    #[test]
    fn remote_raft_errors_roundtrip() {
        let error: RaftError<NodeId> = RaftError::Fatal(openraft::error::Fatal::Stopped);
        let frame = encode_frame(&Response::Vote(Err(error.clone()))).unwrap();
        match decode::<Response>(&frame[4..]).unwrap() {
            Response::Vote(Err(back)) => assert_eq!(back, error),
            other => panic!("{other:?}"),
        }
    }
}
