//! Node-to-node transport: one QUIC endpoint per node (quinn), mutual TLS under the cluster CA,
//! one connection per peer carrying many streams.
//!
//! Both sides prove who they are: the dialer checks the server's certificate names the node it
//! meant to reach, the acceptor reads the dialer's node id from its certificate and refuses ids
//! that are not (or no longer) members. Refusals are logged with the reason. Keep-alive and idle
//! timeouts are short so a dead peer is noticed within seconds.

use crate::identity::{IdentityError, NodeId, NodeIdentity, node_id_of};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// Timeouts and limits of node-to-node QUIC.
#[derive(Debug, Clone)]
pub struct TransportOptions {
    /// Keep-alive interval: keeps NAT state and detects dead peers.
    pub keep_alive: Duration,
    /// A connection silent this long is dead.
    pub idle_timeout: Duration,
    /// Streams a peer may have open at once (many Raft groups share a connection).
    pub max_streams: u32,
    /// The round trip assumed before one is measured. QUIC resends a lost first packet after
    /// three times this; its default (333 ms, for the open internet) made a dial that went out
    /// while the peer was restarting wait a second for the resend, holding a rolling
    /// restart's hand-over. Cluster links are a LAN or a few regions apart: a resend too early
    /// costs one small packet.
    pub initial_rtt: Duration,
}

impl Default for TransportOptions {
    fn default() -> Self {
        TransportOptions {
            keep_alive: Duration::from_millis(500),
            idle_timeout: Duration::from_secs(3),
            max_streams: 1024,
            initial_rtt: Duration::from_millis(50),
        }
    }
}

/// Why a connection failed or was refused.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// Certificates or TLS configuration.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// The endpoint could not be created. (The OS error is in the message, not chained as a
    /// source: printed with its chain, it appeared twice.)
    #[error("cannot open the cluster endpoint on {addr}: {error}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// What failed.
        error: std::io::Error,
    },
    /// Dialing or the handshake failed.
    #[error("connection to node {peer} at {addr} failed: {reason}")]
    Connect {
        /// The node dialed.
        peer: NodeId,
        /// Its address.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
    /// An incoming connection was refused.
    #[error("refused a connection from {addr}: {reason}")]
    Refused {
        /// Where it came from.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
}

/// An authenticated connection to another node.
#[derive(Debug, Clone)]
pub struct PeerConnection {
    /// The node at the other end, as its certificate proves.
    pub peer: NodeId,
    /// The QUIC connection.
    pub connection: quinn::Connection,
}

/// Decides which node ids may connect (the current members).
pub type PeerFilter = Arc<dyn Fn(NodeId) -> bool + Send + Sync>;

/// The application close code of a connection refused because its node is not a member;
/// the dialer reads it to say so ([`refused_as_non_member`]).
pub const CLOSE_NOT_A_MEMBER: u32 = 3;

/// How often at most a node logs that it refused connections of the same non-member: one
/// waiting to be joined (or removed, and still running) dials every couple of seconds.
const NON_MEMBER_LOG_EVERY: Duration = Duration::from_secs(600);

/// What a node refusing a non-member tells it of its cluster, if formed: `epoch E; members
/// 1 at host:port, ...` (see [`Transport::set_refusal_note`]).
pub type RefusalNote = Arc<dyn Fn() -> Option<String> + Send + Sync>;

/// The close reason of a refusal of a non-member; a formed cluster's node follows it with
/// [`FORMED_NOTE`] and its note.
const NOT_A_MEMBER_REASON: &str = "not a member";

/// What comes between [`NOT_A_MEMBER_REASON`] and the refusing node's [`RefusalNote`].
const FORMED_NOTE: &str = "; formed: ";

/// The longest note sent (a close reason must fit in one packet).
const MAX_NOTE: usize = 900;

/// When this node last logged a refusal of each non-member.
type Refusals = Arc<parking_lot::Mutex<std::collections::HashMap<NodeId, std::time::Instant>>>;

/// When each address whose handshake failed was last warned of (see
/// [`IncomingPeer::authenticate`]).
type FailedHandshakes =
    Arc<parking_lot::Mutex<std::collections::HashMap<SocketAddr, std::time::Instant>>>;

/// How often a failed handshake from one address is warned of: a node with certificates of
/// another CA redials every few seconds, and each attempt was a WARN line on every member.
const FAILED_HANDSHAKE_LOG_EVERY: Duration = Duration::from_secs(60);

/// Whether a refusal of `key` is due to be logged again: none was within `every` (then this
/// one is recorded). Entries older than `every` are dropped, so the table stays small.
fn log_due<K: std::hash::Hash + Eq + Copy>(
    logged: &parking_lot::Mutex<std::collections::HashMap<K, std::time::Instant>>,
    key: K,
    every: Duration,
) -> bool {
    let now = std::time::Instant::now();
    let mut logged = logged.lock();
    logged.retain(|_, at| now.duration_since(*at) < every);
    let due = !logged.contains_key(&key);
    if due {
        logged.insert(key, now);
    }
    due
}

/// This node's QUIC endpoint.
pub struct Transport {
    endpoint: quinn::Endpoint,
    identity: NodeIdentity,
    allowed: PeerFilter,
    refusals: Refusals,
    failed_handshakes: FailedHandshakes,
    note: Arc<parking_lot::RwLock<Option<RefusalNote>>>,
}

impl Transport {
    /// Opens the endpoint on `addr` (UDP). Must run inside a Tokio runtime.
    pub fn bind(
        addr: SocketAddr,
        identity: NodeIdentity,
        options: &TransportOptions,
        allowed: PeerFilter,
    ) -> Result<Transport, TransportError> {
        let mut transport = quinn::TransportConfig::default();
        transport
            .keep_alive_interval(Some(options.keep_alive))
            .initial_rtt(options.initial_rtt)
            .max_idle_timeout(Some(
                options
                    .idle_timeout
                    .try_into()
                    .map_err(|_| IdentityError::Tls("idle timeout too large".into()))?,
            ))
            .max_concurrent_bidi_streams(options.max_streams.into())
            .max_concurrent_uni_streams(options.max_streams.into());
        let transport = Arc::new(transport);
        let server_crypto = QuicServerConfig::try_from(identity.server_config()?)
            .map_err(|e| IdentityError::Tls(e.to_string()))?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(server_crypto));
        server.transport_config(transport.clone());
        let client_crypto = QuicClientConfig::try_from(identity.client_config()?)
            .map_err(|e| IdentityError::Tls(e.to_string()))?;
        let mut client = quinn::ClientConfig::new(Arc::new(client_crypto));
        client.transport_config(transport);
        let mut endpoint = quinn::Endpoint::server(server, addr)
            .map_err(|error| TransportError::Bind { addr, error })?;
        endpoint.set_default_client_config(client);
        Ok(Transport {
            endpoint,
            identity,
            allowed,
            refusals: Refusals::default(),
            failed_handshakes: FailedHandshakes::default(),
            note: Arc::default(),
        })
    }

    /// What this node tells a node it refuses as a non-member about its cluster (its epoch
    /// and members, once formed): so that `herald cluster init` through a node that is not a
    /// member finds the cluster formed, and refuses, instead of forming one of its own.
    pub fn set_refusal_note(&self, note: RefusalNote) {
        *self.note.write() = Some(note);
    }

    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.identity.id
    }

    /// Dials node `peer` at `addr`; the handshake fails unless its certificate names `peer`
    /// and comes from the cluster CA.
    pub async fn connect(
        &self,
        addr: SocketAddr,
        peer: NodeId,
    ) -> Result<PeerConnection, TransportError> {
        let failed = |reason: String| TransportError::Connect { peer, addr, reason };
        let server_name = crate::identity::node_name(peer);
        let connecting = self
            .endpoint
            .connect(addr, &server_name)
            .map_err(|e| failed(e.to_string()))?;
        let connection = connecting
            .await
            .map_err(|e| failed(with_certificate_advice(e.to_string(), false)))?;
        match peer_id(&connection) {
            Some(id) if id == peer => Ok(PeerConnection { peer, connection }),
            other => {
                connection.close(1u32.into(), b"wrong node");
                Err(failed(format!("its certificate names node {other:?}")))
            }
        }
    }

    /// Waits for the next incoming connection attempt and returns it at once, before the
    /// handshake: finish it with [`IncomingPeer::authenticate`], in a task of its own, so one
    /// slow or hostile handshake cannot hold up the accept loop. `None` once the endpoint is
    /// closed.
    pub async fn accept_incoming(&self) -> Option<IncomingPeer> {
        let incoming = self.endpoint.accept().await?;
        Some(IncomingPeer {
            incoming,
            allowed: self.allowed.clone(),
            refusals: self.refusals.clone(),
            failed_handshakes: self.failed_handshakes.clone(),
            note: self.note.clone(),
        })
    }

    /// Waits for the next incoming connection and authenticates it (handshake included, so
    /// this blocks on that one handshake; accept loops should prefer [`Self::accept_incoming`]).
    /// Refused ones are logged and returned as errors so the caller's loop can go on; `None`
    /// once the endpoint is closed.
    pub async fn accept(&self) -> Option<Result<PeerConnection, TransportError>> {
        let incoming = self.accept_incoming().await?;
        Some(incoming.authenticate().await)
    }

    /// Closes every connection and waits for them to finish cleanly.
    pub async fn shutdown(&self) {
        self.endpoint.close(0u32.into(), b"shutting down");
        self.endpoint.wait_idle().await;
    }
}

/// An incoming connection attempt, not yet handshaken nor authenticated.
pub struct IncomingPeer {
    incoming: quinn::Incoming,
    allowed: PeerFilter,
    refusals: Refusals,
    failed_handshakes: FailedHandshakes,
    note: Arc<parking_lot::RwLock<Option<RefusalNote>>>,
}

impl std::fmt::Debug for IncomingPeer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IncomingPeer")
            .field("remote_address", &self.incoming.remote_address())
            .finish()
    }
}

impl IncomingPeer {
    /// Where the attempt comes from (not yet authenticated).
    pub fn remote_address(&self) -> SocketAddr {
        self.incoming.remote_address()
    }

    /// Completes the handshake and checks the dialer's certificate names a member node.
    /// Refusals are returned as errors and logged with the reason: at WARN when something is
    /// wrong (a certificate of no node, a failed TLS verification), lower for what happens
    /// as nodes come and go (a dialer that gave up its handshake, a node waiting to be
    /// joined). A handshake that stalls ends after the transport's idle timeout.
    pub async fn authenticate(self) -> Result<PeerConnection, TransportError> {
        let addr = self.incoming.remote_address();
        let refused = |reason: String| {
            // Once a minute per address: a misconfigured node redials every few seconds.
            if log_due(&self.failed_handshakes, addr, FAILED_HANDSHAKE_LOG_EVERY) {
                tracing::warn!(
                    %addr,
                    %reason,
                    "refused a cluster connection (logged once a minute per address)"
                );
            } else {
                tracing::debug!(%addr, %reason, "refused a cluster connection");
            }
            TransportError::Refused { addr, reason }
        };
        let connection = match self.incoming.await {
            Ok(connection) => connection,
            Err(error) if dialer_gave_up(&error) => {
                // A dial given up (its timeout, or the dialer found this node had dialed in),
                // or a dialer stopped: its side says why, if anything is wrong.
                let reason = format!("handshake ended by the dialer: {error}");
                tracing::debug!(%addr, %reason, "no cluster connection");
                return Err(TransportError::Refused { addr, reason });
            }
            Err(error) => {
                return Err(refused(with_certificate_advice(
                    format!("handshake failed: {error}"),
                    true,
                )));
            }
        };
        match peer_id(&connection) {
            None => {
                connection.close(2u32.into(), b"no node certificate");
                Err(refused("its certificate names no node".into()))
            }
            Some(peer) if !(self.allowed)(peer) => {
                let note = self.note.read().as_ref().and_then(|note| note());
                let mut close = NOT_A_MEMBER_REASON.to_string();
                if let Some(mut note) = note {
                    if note.len() > MAX_NOTE {
                        let mut end = MAX_NOTE;
                        while !note.is_char_boundary(end) {
                            end -= 1;
                        }
                        note.truncate(end);
                        note.push_str(", ...");
                    }
                    close.push_str(FORMED_NOTE);
                    close.push_str(&note);
                }
                connection.close(CLOSE_NOT_A_MEMBER.into(), close.as_bytes());
                let reason = format!("node {peer} is not a member of this cluster");
                // A node waiting for `herald cluster join` (or a member that has not applied
                // the join yet), or a removed one still running: logged now and then.
                if log_due(&self.refusals, peer, NON_MEMBER_LOG_EVERY) {
                    tracing::info!(
                        %addr,
                        "refused a cluster connection from node {peer}: not a member of this cluster (a node waiting for `herald cluster join`, or one removed; logged once every {} minutes)",
                        NON_MEMBER_LOG_EVERY.as_secs() / 60
                    );
                } else {
                    tracing::debug!(%addr, %reason, "refused a cluster connection");
                }
                Err(TransportError::Refused { addr, reason })
            }
            Some(peer) => Ok(PeerConnection { peer, connection }),
        }
    }
}

/// `reason` (a failed handshake), with what to do when a certificate was refused for its
/// CA: TLS says only `invalid peer certificate: BadSignature` (or `UnknownIssuer`), on the
/// side that refused it; the other side sees `aborted by peer` and the same words. `accepting`:
/// this node was dialed.
fn with_certificate_advice(reason: String, accepting: bool) -> String {
    let foreign_ca = reason.contains("invalid peer certificate")
        && (reason.contains("BadSignature") || reason.contains("UnknownIssuer"));
    if !foreign_ca {
        return reason;
    }
    let whose = match (accepting, reason.contains("aborted by peer")) {
        (true, true) => "the dialer does not trust this node's certificate",
        (true, false) => "this node does not trust the dialer's certificate",
        (false, true) => "the node dialed does not trust this node's certificate",
        (false, false) => "this node does not trust the certificate of the node it dialed",
    };
    format!(
        "{reason}: {whose}, issued by another CA than its own ca.pem (another cluster's certificates, or a CA made again with `herald certs init`); give every node a certificate from the one cluster CA (`herald certs issue`)"
    )
}

/// Whether a handshake ended because the dialer ended it (closed it, or went silent): a
/// dial given up, a node stopped mid-handshake. A TLS failure is not one.
fn dialer_gave_up(error: &quinn::ConnectionError) -> bool {
    match error {
        quinn::ConnectionError::ApplicationClosed(_)
        | quinn::ConnectionError::Reset
        | quinn::ConnectionError::TimedOut
        | quinn::ConnectionError::LocallyClosed => true,
        // An application closing during the handshake is sent as this transport code.
        quinn::ConnectionError::ConnectionClosed(close) => {
            close.error_code == quinn::TransportErrorCode::APPLICATION_ERROR
        }
        _ => false,
    }
}

/// Whether `connection` was closed by its peer because this node is not a member of the
/// peer's cluster ([`CLOSE_NOT_A_MEMBER`]).
pub fn refused_as_non_member(connection: &quinn::Connection) -> bool {
    matches!(
        connection.close_reason(),
        Some(quinn::ConnectionError::ApplicationClosed(close))
            if close.error_code == quinn::VarInt::from_u32(CLOSE_NOT_A_MEMBER)
    )
}

/// What the peer that closed `connection` as refusing a non-member said of its cluster: its
/// [`RefusalNote`] (`epoch E; members ...`) when it is formed, `None` otherwise.
pub fn non_member_note(connection: &quinn::Connection) -> Option<String> {
    match connection.close_reason() {
        Some(quinn::ConnectionError::ApplicationClosed(close))
            if close.error_code == quinn::VarInt::from_u32(CLOSE_NOT_A_MEMBER) =>
        {
            let reason = String::from_utf8_lossy(&close.reason);
            reason
                .strip_prefix(NOT_A_MEMBER_REASON)?
                .strip_prefix(FORMED_NOTE)
                .map(str::to_string)
        }
        _ => None,
    }
}

/// The node id the peer's certificate names.
fn peer_id(connection: &quinn::Connection) -> Option<NodeId> {
    let identity = connection.peer_identity()?;
    let certs = identity
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .ok()?;
    node_id_of(certs.first()?)
}
