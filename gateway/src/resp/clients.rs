//! The registry of connected RESP clients, for `CLIENT LIST / KILL / INFO`, `INFO clients`,
//! `maxclients` and shutdown.

use crate::hub::{ClientId, Subscriber};
use bytes::Bytes;
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

/// What `CLIENT LIST` shows of a client and can change while it runs.
#[derive(Debug)]
pub struct ClientMeta {
    /// `CLIENT SETNAME`.
    pub name: Option<Bytes>,
    /// `CLIENT SETINFO LIB-NAME`.
    pub lib_name: Option<Bytes>,
    /// `CLIENT SETINFO LIB-VER`.
    pub lib_ver: Option<Bytes>,
    /// The last command run and its subcommand (or ""), as `CLIENT LIST`'s `cmd=` shows it.
    pub last_command: (&'static str, &'static str),
    /// When the last command arrived.
    pub last_active: Instant,
    /// Channel, pattern and shard-channel subscription counts.
    pub subscriptions: [usize; 3],
    /// Bytes received and not yet parsed.
    pub query_buffer: usize,
    /// Inside `MULTI`: the commands queued and the bytes they hold.
    pub transaction: Option<(usize, usize)>,
}

/// One connected client.
#[derive(Debug)]
pub struct ClientInfo {
    /// `CLIENT ID`.
    pub id: ClientId,
    /// The client's address.
    pub addr: SocketAddr,
    /// The address it connected to.
    pub laddr: SocketAddr,
    /// When it connected.
    pub connected: Instant,
    /// Its queue and protocol, as the hub sees it.
    pub subscriber: Arc<Subscriber>,
    /// Changing details.
    pub meta: Mutex<ClientMeta>,
}

impl ClientInfo {
    /// A freshly connected client.
    pub fn new(
        id: ClientId,
        addr: SocketAddr,
        laddr: SocketAddr,
        subscriber: Arc<Subscriber>,
    ) -> Self {
        let now = Instant::now();
        ClientInfo {
            id,
            addr,
            laddr,
            connected: now,
            subscriber,
            meta: Mutex::new(ClientMeta {
                name: None,
                lib_name: None,
                lib_ver: None,
                last_command: ("NULL", ""),
                last_active: now,
                subscriptions: [0; 3],
                query_buffer: 0,
                transaction: None,
            }),
        }
    }

    /// Whether the client holds any subscription (Redis's `P` flag, the `pubsub` type).
    pub fn is_subscriber(&self) -> bool {
        self.meta.lock().subscriptions.iter().any(|&n| n > 0)
    }

    /// The client's `CLIENT LIST` line, in Redis 7's field order.
    pub fn describe(&self) -> String {
        let meta = self.meta.lock();
        let now = Instant::now();
        let lossy = |b: &Option<Bytes>| {
            b.as_ref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default()
        };
        let pubsub = meta.subscriptions.iter().any(|&n| n > 0);
        let outbox = self.subscriber.outbox();
        let mut line = String::with_capacity(256);
        let _ = write!(
            line,
            "id={} addr={} laddr={} fd=-1 name={} age={} idle={} flags={} db=0 sub={} psub={} ssub={} \
             multi={} qbuf={} qbuf-free=0 argv-mem=0 multi-mem={} rbs=0 rbp=0 obl=0 oll={} omem={} \
             tot-mem=0 events=r cmd={} user=default redir=-1 resp={} lib-name={} lib-ver={}",
            self.id,
            self.addr,
            self.laddr,
            lossy(&meta.name),
            now.duration_since(self.connected).as_secs(),
            now.duration_since(meta.last_active).as_secs(),
            match (pubsub, meta.transaction.is_some()) {
                (false, false) => "N",
                (true, false) => "P",
                (false, true) => "x",
                (true, true) => "Px",
            },
            meta.subscriptions[0],
            meta.subscriptions[1],
            meta.subscriptions[2],
            meta.transaction.map_or(-1, |(commands, _)| commands as i64),
            meta.query_buffer,
            meta.transaction.map_or(0, |(_, bytes)| bytes),
            outbox.queued_frames(),
            outbox.queued_bytes(),
            if meta.last_command.1.is_empty() {
                meta.last_command.0.to_string()
            } else {
                format!("{}|{}", meta.last_command.0, meta.last_command.1)
            },
            self.subscriber.protocol().version(),
            lossy(&meta.lib_name),
            lossy(&meta.lib_ver),
        );
        line
    }
}

/// All connected clients by id.
#[derive(Debug, Default)]
pub struct ClientRegistry {
    clients: Mutex<BTreeMap<ClientId, Arc<ClientInfo>>>,
}

impl ClientRegistry {
    /// Adds a client unless `max` clients are already connected.
    pub fn try_add(&self, client: Arc<ClientInfo>, max: usize) -> bool {
        let mut clients = self.clients.lock();
        if clients.len() >= max {
            return false;
        }
        clients.insert(client.id, client);
        true
    }

    /// Forgets a disconnected client.
    pub fn remove(&self, id: ClientId) {
        self.clients.lock().remove(&id);
    }

    /// Number of connected clients.
    pub fn len(&self) -> usize {
        self.clients.lock().len()
    }

    /// Whether no client is connected.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A snapshot of the connected clients, by id.
    pub fn snapshot(&self) -> Vec<Arc<ClientInfo>> {
        self.clients.lock().values().cloned().collect()
    }
}
