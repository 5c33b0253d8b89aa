//! The RESP listener: accepts clients, enforces `maxclients` and protected mode, runs one
//! connection task per client, and drains them all on shutdown.

use crate::broker::Broker;
use crate::hub::outbox::Outbox;
use crate::hub::{Format, Hub, Subscriber};
use crate::resp::clients::{ClientInfo, ClientRegistry};
use crate::resp::connection;
use crate::resp::parse::RequestParser;
use crate::resp::settings::RespSettings;
use bytes::BytesMut;
use parking_lot::RwLock;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Server-wide counters for `INFO stats`.
#[derive(Debug, Default)]
pub struct ServerStats {
    /// Connections accepted since start.
    pub connections_received: AtomicU64,
    /// Connections refused (`maxclients`, protected mode).
    pub rejected_connections: AtomicU64,
    /// Commands executed.
    pub commands_processed: AtomicU64,
}

/// State shared by every RESP connection of the node.
pub struct ServerContext {
    /// Where publishes go.
    pub broker: Arc<Broker>,
    /// The node's pub/sub hub.
    pub hub: Arc<Hub>,
    /// Settings `CONFIG SET` can change.
    pub settings: RwLock<RespSettings>,
    /// Connected clients.
    pub clients: ClientRegistry,
    /// Counters.
    pub stats: ServerStats,
    /// When the server started (`uptime_in_seconds`).
    pub started: Instant,
    /// A random id of this process (`run_id`).
    pub run_id: String,
    /// The address the listener is bound to.
    pub listen_addr: SocketAddr,
    /// Cancelled when the node shuts down.
    pub shutdown: CancellationToken,
}

/// Output queued beyond this stops a client's command reading until it drains.
pub(crate) const REPLY_BACKPRESSURE_BYTES: usize = 4 * 1024 * 1024;

/// The Redis-protocol server.
pub struct RespServer {
    listener: TcpListener,
    context: Arc<ServerContext>,
    adopted: Option<mpsc::Receiver<AdoptedClient>>,
}

/// A client connection accepted before the server ran (by the node's start-up answerer,
/// [`crate::starting`]), handed over with what it has sent that is not a complete request
/// yet. The server admits it as if it had just accepted it.
#[derive(Debug)]
pub struct AdoptedClient {
    /// The connection.
    pub stream: TcpStream,
    /// The client's address.
    pub addr: SocketAddr,
    /// The request being parsed, if one is half read.
    pub parser: RequestParser,
    /// Bytes read from the client and not parsed yet.
    pub buffer: BytesMut,
    /// The client sent `MULTI` while the node was starting (answered `-LOADING`) and no
    /// `EXEC`, `DISCARD` or `RESET` since: the rest of that transaction must not run as
    /// plain commands (the session starts in a refused transaction, whose `EXEC` answers
    /// `EXECABORT`).
    pub in_refused_transaction: bool,
}

/// A bind failure, naming the address so the node can tell the operator which flag to change.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr}: {source}")]
pub struct BindError {
    /// The address asked for.
    pub addr: SocketAddr,
    /// What the OS said.
    #[source]
    pub source: io::Error,
}

impl RespServer {
    /// Binds the listener. Nothing is accepted until [`RespServer::run`].
    pub async fn bind(
        addr: SocketAddr,
        broker: Arc<Broker>,
        settings: RespSettings,
        shutdown: CancellationToken,
    ) -> Result<RespServer, BindError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| BindError { addr, source })?;
        RespServer::with_listener(listener, broker, settings, shutdown)
            .map_err(|source| BindError { addr, source })
    }

    /// A server on an already bound listener (the node binds every port before it opens the
    /// store, so a port in use fails fast and touches nothing).
    pub fn with_listener(
        listener: TcpListener,
        broker: Arc<Broker>,
        settings: RespSettings,
        shutdown: CancellationToken,
    ) -> io::Result<RespServer> {
        let listen_addr = listener.local_addr()?;
        let hub = broker.hub().clone();
        hub.set_output_limit(settings.pubsub_output_limit);
        let context = Arc::new(ServerContext {
            broker,
            hub,
            settings: RwLock::new(settings),
            clients: ClientRegistry::default(),
            stats: ServerStats::default(),
            started: Instant::now(),
            run_id: random_run_id(),
            listen_addr,
            shutdown,
        });
        Ok(RespServer {
            listener,
            context,
            adopted: None,
        })
    }

    /// Also admits the connections that arrive on `from`, until it closes: clients accepted
    /// before this server ran.
    pub fn adopt(&mut self, from: mpsc::Receiver<AdoptedClient>) {
        self.adopted = Some(from);
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.context.listen_addr
    }

    /// The shared state, for other parts of the node that report on RESP clients.
    pub fn context(&self) -> Arc<ServerContext> {
        self.context.clone()
    }

    /// Accepts clients until shutdown, then waits up to `drain_timeout` for every connection
    /// to end: each runs no further request, queues the replies of those it ran (a publish's
    /// once committed), flushes them and closes.
    pub async fn run(self, drain_timeout: Duration) {
        let tracker = TaskTracker::new();
        let context = self.context;
        let mut adopted = self.adopted;
        loop {
            let accepted = tokio::select! {
                accepted = self.listener.accept() => accepted.map(|(stream, addr)| AdoptedClient {
                    stream,
                    addr,
                    parser: RequestParser::new(),
                    buffer: BytesMut::new(),
                    in_refused_transaction: false,
                }),
                client = next_adopted(&mut adopted) => Ok(client),
                _ = context.shutdown.cancelled() => break,
            };
            match accepted {
                Ok(client) => {
                    let context = context.clone();
                    tracker.spawn(async move { admit(context, client).await });
                }
                Err(error) => {
                    // Out of file descriptors and similar: back off instead of spinning.
                    tracing::warn!(%error, "accepting a RESP client failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        drop(self.listener);
        tracker.close();
        // Each connection ends itself on `shutdown`, once the replies of the requests it ran
        // are queued (a publish's waits for its commit) and flushed. Closing every client's
        // queue here instead dropped the reply of a publish still waiting for its commit: the
        // event was committed and the client, told nothing, published it again.
        if tokio::time::timeout(drain_timeout, tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                remaining = context.clients.len(),
                "RESP clients still open after the drain timeout"
            );
        }
    }
}

/// The next adopted client; pending for ever once there are none to come.
async fn next_adopted(from: &mut Option<mpsc::Receiver<AdoptedClient>>) -> AdoptedClient {
    loop {
        match from {
            Some(receiver) => match receiver.recv().await {
                Some(client) => return client,
                None => *from = None,
            },
            None => std::future::pending().await,
        }
    }
}

/// Applies the admission rules to a new connection, then serves it.
async fn admit(context: Arc<ServerContext>, accepted: AdoptedClient) {
    let AdoptedClient {
        mut stream,
        addr,
        parser,
        buffer,
        in_refused_transaction,
    } = accepted;
    context
        .stats
        .connections_received
        .fetch_add(1, Ordering::Relaxed);
    let _ = stream.set_nodelay(true);
    let (denied, maxclients) = {
        let settings = context.settings.read();
        let denied =
            settings.protected_mode && settings.requirepass.is_none() && !addr.ip().is_loopback();
        (denied, settings.maxclients)
    };
    if denied {
        context
            .stats
            .rejected_connections
            .fetch_add(1, Ordering::Relaxed);
        tracing::warn!(%addr, "refused a non-loopback client in protected mode");
        let _ = stream.write_all(PROTECTED_MODE_DENIED.as_bytes()).await;
        return;
    }
    let laddr = stream.local_addr().unwrap_or(context.listen_addr);
    let id = context.hub.next_client_id();
    let subscriber = Arc::new(Subscriber::new(id, Arc::new(Outbox::new()), Format::Resp2));
    let client = Arc::new(ClientInfo::new(id, addr, laddr, subscriber));
    if !context.clients.try_add(client.clone(), maxclients) {
        context
            .stats
            .rejected_connections
            .fetch_add(1, Ordering::Relaxed);
        let _ = stream
            .write_all(b"-ERR max number of clients reached\r\n")
            .await;
        return;
    }
    tracing::debug!(id, %addr, "RESP client connected");
    let _listed = Listed {
        context: &context,
        id,
    };
    let unread = connection::Unread {
        parser,
        buffer,
        in_refused_transaction,
    };
    connection::serve(context.clone(), stream, client, unread).await;
    tracing::debug!(id, %addr, "RESP client disconnected");
}

/// Takes a client out of the client list when its connection ends, however it ends: a panic
/// in a command (a bug) must not leave it counted against `maxclients`.
struct Listed<'a> {
    context: &'a ServerContext,
    id: crate::hub::ClientId,
}

impl Drop for Listed<'_> {
    fn drop(&mut self) {
        self.context.clients.remove(self.id);
    }
}

const PROTECTED_MODE_DENIED: &str = "-DENIED herald is running in protected mode because protected \
mode is enabled and no password is set for the default user. In this mode connections are only \
accepted from the loopback interface. If you want to connect from other computers, either set a \
password with --requirepass (HERALD_REQUIREPASS, or CONFIG SET requirepass from a loopback \
client), or disable protected mode with --protected-mode no if the network is trusted.\r\n";

fn random_run_id() -> String {
    use std::collections::hash_map::RandomState;
    use std::hash::{BuildHasher, Hasher};
    let mut id = String::with_capacity(40);
    while id.len() < 40 {
        let mut hasher = RandomState::new().build_hasher();
        hasher.write_usize(id.len());
        id.push_str(&format!("{:016x}", hasher.finish()));
    }
    id.truncate(40);
    id
}
