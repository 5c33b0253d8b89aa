//! The store: one node's durable event history in sled, and THE apply function.
//!
//! [`Store::apply`] is the state machine: it takes a batch of publishes in log order and, for
//! each, checks dedup, assigns the partition's next seq, writes history, trims retention and
//! records the message id, all in ONE atomic write. The single-node log
//! ([`crate::log::LocalLog`]) runs the same logic as `Store::apply_logged`, which also
//! returns the changes as a write-ahead-log record; the partition
//! groups' Raft state machine
//! ([`crate::raft::GroupStateMachine`]) runs the same logic with its Raft bookkeeping added to
//! the batch. It depends only on its inputs (the batch, the namespace config, `now_ms`) and the
//! store's own state (including the partition's applied clock), never on the local clock.
//!
//! The Raft logs and state of every group live in the same tree (see [`crate::raft`]).
//!
//! Every read and write goes through the store's `memtable::Tree`: writes land in memory and
//! reach sled at checkpoints ([`Store::flush`]), whole. Reads ([`Store::history_after`],
//! [`Store::last`], [`Store::oldest`]) take no store lock and see each apply whole; a batch's
//! events stay above the committed watermark callers filter on until it commits. The on-disk
//! layout is described in the private `codec` module.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use parking_lot::{Mutex, MutexGuard};

use crate::chunk_index::{ChunkIndex, take_oldest};
use crate::codec::{self, ChannelMeta, ChunkHead, DedupRecord, StoredChunk};
use crate::disk::DiskSync;
use crate::event::{Epoch, Event, Partition, Position, partition_of, unix_now_ms};
use crate::memtable::Tree;
use crate::namespace::Namespaces;
use crate::wal::LogName;

/// How many operations `expire` puts in one batch before applying it (between channels).
const EXPIRE_CHUNK: usize = 10_000;
/// How many channels (or dedup index entries) `expire` looks at before it lets a waiting apply
/// in, whether or not they needed work: a pass over a million channels none of which expires
/// yet held the writer lock for seconds, and every publish waited for it.
const EXPIRE_YIELD_EVERY: usize = 1_000;

/// Everything that can go wrong in the store or the log. `Clone` so that one failure can be
/// handed to every publisher of a batch.
#[derive(Clone, Debug, thiserror::Error)]
pub enum StorageError {
    /// sled failed (I/O, corruption it detected, ...). The outcome of a batch that failed in
    /// flush is unknown: it may or may not be on disk.
    #[error("storage failed: {}", describe_sled(.0))]
    Sled(#[from] sled::Error),
    /// The store was created with another partition count, which can never change.
    #[error(
        "store in {dir} was created with {stored} partitions but {requested} were requested; the partition count is fixed when a store is created (use --partitions {stored}, or an empty data directory; a cluster member on a store of another count must be removed, started on an empty data directory and joined again)"
    )]
    PartitionsMismatch {
        /// The store's directory.
        dir: PathBuf,
        /// The partition count on disk.
        stored: u16,
        /// The partition count asked for.
        requested: u16,
    },
    /// The store was written in an on-disk format this build does not read.
    #[error("store in {dir} has format version {found}, this build reads version {expected}")]
    FormatVersion {
        /// The store's directory.
        dir: PathBuf,
        /// The version on disk.
        found: u32,
        /// The version this build writes.
        expected: u32,
    },
    /// The options make no sense (e.g. zero partitions).
    #[error("invalid store options: {0}")]
    InvalidOptions(String),
    /// Stored bytes could not be decoded.
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// An earlier write to the store failed half-way (a full disk, an I/O error), so it takes
    /// no more writes until the node restarts and recovers from its write-ahead log. The
    /// publish refused with this was not written.
    #[error(
        "the store stopped taking writes after an earlier write failed; restart the node to recover from its write-ahead log (this publish was not written)"
    )]
    Broken,
    /// A bug: a task of the store or log failed unexpectedly (e.g. panicked).
    #[error("internal storage error: {0}")]
    Internal(String),
    /// The log's committer is gone (the log was shut down or its task died).
    #[error("the log is closed")]
    Closed,
    /// The cluster could not commit the publish (no leader, no quorum, outcome unknown); the
    /// text says which, and whether a retry with the same message id is safe.
    #[error("{0}")]
    Unavailable(String),
    /// A cluster member's store opened as a single node (its cluster settings forgotten):
    /// refused, as a write there would give positions the other members give other events.
    #[error(
        "store in {dir} belongs to a cluster member (cluster epoch {epoch}): start it with its cluster settings (--node-id, --cluster-addr, --peers, --tls-dir, or their config-file and environment forms); written to as a single node, its history would part from the other members' (for a single node, use another data directory)"
    )]
    ClusterMember {
        /// The store's directory.
        dir: PathBuf,
        /// The cluster's epoch.
        epoch: String,
    },
    /// A cluster node started under another node id than the one its store was first opened
    /// as (`--node-id` mixed up with another node's `--data-dir`): refused, as it would believe
    /// it leads that node's partitions and the members would mistake it for that node.
    #[error(
        "store in {dir} belongs to node {stored}, not node {requested}: start node {requested} on its own data directory (--data-dir), or start this one as node {stored} (--node-id {stored}); under another id, it would take node {stored}'s Raft state for its own"
    )]
    NodeIdMismatch {
        /// The store's directory.
        dir: PathBuf,
        /// The node id the store belongs to.
        stored: u64,
        /// The node id it was opened as.
        requested: u64,
    },
}

/// sled's error as a sentence: its I/O errors display as Rust's debug form (`Os { code: 28,
/// kind: StorageFull, .. }`), which says less to an operator than the system's message.
fn describe_sled(error: &sled::Error) -> String {
    match error {
        sled::Error::Io(io) => format!("I/O error: {}", describe_io(io)),
        other => other.to_string(),
    }
}

/// The system's message for `io`. sled hands a failed flush's error to every later caller as a
/// clone, which it makes as a new error carrying the original's debug text (`Os { code: 27,
/// kind: FileTooLarge, message: "File too large" }`, nested once more per further clone): the
/// error number is read back from that text and turned into the system's message again.
fn describe_io(io: &std::io::Error) -> String {
    let mut text = io.to_string();
    if io.raw_os_error().is_some() {
        return text;
    }
    // A clone of an error of our own (`Custom { kind: .., error: "<message>" }`, escaped, as
    // deep as it was cloned): its message.
    const CUSTOM: &str = "error: \"";
    while text.starts_with("Custom { kind: ")
        && let Some(at) = text.find(CUSTOM)
        && text.ends_with("\" }")
    {
        let inner = &text[at + CUSTOM.len()..text.len() - 3];
        text = inner.replace("\\\"", "\"").replace("\\\\", "\\");
    }
    const MARK: &str = "Os { code: ";
    let code = text.find(MARK).and_then(|at| {
        let digits = &text[at + MARK.len()..];
        let end = digits.find(|c: char| !c.is_ascii_digit())?;
        digits[..end].parse::<i32>().ok()
    });
    match code {
        Some(code) => std::io::Error::from_raw_os_error(code).to_string(),
        None => text,
    }
}

/// How a store is opened. The partition count is fixed at creation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreOptions {
    /// Number of partitions (sequence spaces); default 16. Must match on every later open.
    pub partitions: u16,
    /// How long a message id is remembered for dedup; default 10 minutes.
    pub dedup_window: Duration,
    /// sled's page cache size in bytes (counts on-disk size; RSS can be larger); default 64 MiB.
    pub cache_capacity: u64,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            partitions: 16,
            dedup_window: Duration::from_secs(600),
            cache_capacity: 64 << 20,
        }
    }
}

/// One publish as it enters the log.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Publish {
    /// The channel (binary-safe).
    pub channel: Bytes,
    /// The payload (binary-safe).
    pub payload: Bytes,
    /// An optional publisher-chosen id: a publish repeating a (channel, id) pair seen within the
    /// dedup window is not applied again. An empty id is an id like any other.
    pub message_id: Option<Bytes>,
}

impl Publish {
    /// A publish without a message id.
    pub fn new(channel: impl Into<Bytes>, payload: impl Into<Bytes>) -> Self {
        Publish {
            channel: channel.into(),
            payload: payload.into(),
            message_id: None,
        }
    }

    /// The same publish carrying message id `id`.
    pub fn with_id(mut self, id: impl Into<Bytes>) -> Self {
        self.message_id = Some(id.into());
        self
    }

    /// Bytes the publish occupies (channel + payload + id), for batch size limits.
    pub fn size(&self) -> usize {
        self.channel.len() + self.payload.len() + self.message_id.as_ref().map_or(0, |m| m.len())
    }
}

/// What applying one publish did.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Applied {
    /// A new event got this position (and was stored if its namespace keeps history).
    New(Event),
    /// The message id was seen within the dedup window: nothing was applied; this is the
    /// position the original publish got.
    Duplicate(Position),
}

impl Applied {
    /// The event's position: the new one, or the original one for a duplicate.
    pub fn position(&self) -> Position {
        match self {
            Applied::New(e) => e.position,
            Applied::Duplicate(p) => *p,
        }
    }

    /// Whether this publish was a duplicate.
    pub fn is_duplicate(&self) -> bool {
        matches!(self, Applied::Duplicate(_))
    }

    /// The new events among `applied` (duplicates left out), in order: what a commit hands to
    /// the hub.
    pub fn new_events(applied: &[Applied]) -> Vec<Event> {
        applied
            .iter()
            .filter_map(|a| match a {
                Applied::New(e) => Some(e.clone()),
                Applied::Duplicate(_) => None,
            })
            .collect()
    }
}

/// Size of the retained history, for `/metrics`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChannelStats {
    /// Channels with at least one retained event (expired-but-not-yet-deleted ones included).
    pub channels: u64,
    /// Retained events over all channels (same caveat).
    pub events: u64,
}

/// What [`Store::history_read`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryRead {
    /// The events read, as [`Store::history_after`] gives them.
    pub events: Vec<Event>,
    /// The highest seq the read knows to be no longer retained: the channel's removal floor
    /// (retention's trims and expiry's deletions; the partition's forgotten floor for a
    /// channel without bookkeeping), or the last seq of an expired chunk the read passed
    /// over, whichever is higher. Events after the read's start and at or below it were
    /// dropped, not read. Expired chunks past the last event read are not looked at.
    pub gone_through: u64,
}

/// State that only the writers (apply, expire, Raft bookkeeping) touch, under one lock.
struct WriteState {
    last_seq: Vec<u64>,
    forgotten: Vec<u64>,
    /// Per partition: the largest clock apply used (see [`Store::applied_clock`]).
    clock: Vec<u64>,
    /// The history chunks of recently trimmed channels, so that retention needs no scan.
    chunks: ChunkIndex,
}

/// The writes of one apply, like a `sled::Batch` (a later write of a key replaces an earlier
/// one) but readable: the local log puts them in its write-ahead log (see the `wal` module).
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Ops(BTreeMap<sled::IVec, Option<sled::IVec>>);

impl Ops {
    /// Sets `key` to `value`.
    pub(crate) fn insert(&mut self, key: impl Into<sled::IVec>, value: impl Into<sled::IVec>) {
        self.0.insert(key.into(), Some(value.into()));
    }

    /// Deletes `key`.
    pub(crate) fn remove(&mut self, key: impl Into<sled::IVec>) {
        self.0.insert(key.into(), None);
    }

    /// How many writes.
    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }

    /// The writes in key order, by value (`None`: a removal).
    pub(crate) fn into_entries(self) -> impl Iterator<Item = (sled::IVec, Option<sled::IVec>)> {
        self.0.into_iter()
    }

    /// The writes in key order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&[u8], Option<&[u8]>)> {
        self.0.iter().map(|(k, v)| (&k[..], v.as_deref()))
    }
}

/// How far a store's Raft journal has got (its records are numbered in write order, votes,
/// appends and applies alike, and never renumbered), as a cluster node shows it to its peers.
/// Raft trusts a voter never to forget what it acknowledged; a data directory restored from a
/// backup or a disk snapshot keeps its store id but has forgotten the records written since.
/// Its peers tell it apart: a run that starts (`start`) below a record an earlier run had made
/// durable went back in time (see `herald_cluster::peer_stores`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct JournalProgress {
    /// A random number drawn when the store was opened: tells one run from the next.
    pub run: u64,
    /// The journal's last record when this run opened it: what the data directory held.
    pub start: u64,
    /// The journal's last durable record now.
    pub durable: u64,
}

/// What a node records of a member's journal (see [`JournalProgress`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerProgress {
    /// The store id the member showed.
    pub store: u64,
    /// The run of it last seen.
    pub run: u64,
    /// The run before `run` (0: none seen): an exchange of that one, late (its connection's
    /// task held up), is not judged as a new run.
    pub previous_run: u64,
    /// Where that run's journal started.
    pub start: u64,
    /// The highest durable record it showed, any run.
    pub durable: u64,
    /// A run of it started below `durable`: its data directory went back in time, and it is
    /// refused until removed from the cluster (`run` and `start` are that run's).
    pub went_back: bool,
}

impl PeerProgress {
    const BYTES: usize = 41;

    fn encode(&self) -> [u8; Self::BYTES] {
        let mut out = [0u8; Self::BYTES];
        out[..8].copy_from_slice(&self.store.to_be_bytes());
        out[8..16].copy_from_slice(&self.run.to_be_bytes());
        out[16..24].copy_from_slice(&self.start.to_be_bytes());
        out[24..32].copy_from_slice(&self.durable.to_be_bytes());
        out[32..40].copy_from_slice(&self.previous_run.to_be_bytes());
        out[40] = u8::from(self.went_back);
        out
    }

    fn decode(bytes: &[u8]) -> Result<PeerProgress, StorageError> {
        if bytes.len() != Self::BYTES {
            return Err(StorageError::Corrupt(format!(
                "a peer's journal record is {} bytes, not {}",
                bytes.len(),
                Self::BYTES
            )));
        }
        Ok(PeerProgress {
            store: codec::be_u64(&bytes[..8], "peer store id")?,
            run: codec::be_u64(&bytes[8..16], "peer run")?,
            start: codec::be_u64(&bytes[16..24], "peer journal start")?,
            durable: codec::be_u64(&bytes[24..32], "peer journal record")?,
            previous_run: codec::be_u64(&bytes[32..40], "peer previous run")?,
            went_back: bytes[40] != 0,
        })
    }
}

/// One node's durable event history (see the module docs).
pub struct Store {
    /// The database `tree` lives in, open for the store's life.
    _db: sled::Db,
    /// What makes a sled flush survive power loss (see [`Store::flush`]).
    disk: Arc<DiskSync>,
    tree: Arc<Tree>,
    dir: PathBuf,
    epoch: AtomicU64,
    /// See [`Store::store_id`].
    store_id: u64,
    /// See [`Store::peer_store_generation`].
    peer_store_generation: AtomicU64,
    partitions: u16,
    dedup_window_ms: u64,
    write: Mutex<WriteState>,
    latest: Box<[AtomicU64]>,
    forgotten: Box<[AtomicU64]>,
    clock: Box<[AtomicU64]>,
    stat_channels: AtomicU64,
    stat_events: AtomicU64,
    /// The store joined a cluster (a meta group applied `Init`; persisted as `KEY_CLUSTER`).
    cluster: AtomicBool,
    /// Dedup records expire by their partition's applied clock, not the local one (set when the
    /// store joined a cluster or a Raft state machine was opened on it).
    deterministic_expiry: AtomicBool,
    /// What reads add to the wall clock to judge TTLs ([`Store::now_ms`]): in a cluster, the
    /// correction that brings this node's clock to the majority's (`cluster::clock`).
    clock_correction_ms: std::sync::atomic::AtomicI64,
    /// Times `expire` let waiting applies in (for tests).
    expire_yields: AtomicU64,
    /// Flush coalescing: tickets taken by callers of [`Store::flush`], the highest ticket a
    /// completed flush covered, and the lock one flush at a time holds.
    flush_tickets: AtomicU64,
    flushed_ticket: AtomicU64,
    flush_lock: tokio::sync::Mutex<()>,
    /// A write of [`Store::apply_logged`] failed half-way: sled's state no longer matches the
    /// counters, so every later apply is refused (a restart recovers from the log).
    broken: AtomicBool,
    /// What failed, once `broken` is set (for `/ready` and stats).
    broken_by: Mutex<Option<String>>,
    /// A [`crate::raft::RaftJournal`] is open on the store (there may be only one).
    raft_journal: AtomicBool,
    /// The open journal, for [`crate::raft::RaftJournal::of`].
    raft_journal_slot: Mutex<std::sync::Weak<crate::raft::RaftJournal>>,
    /// See [`Store::journal_progress`]: this run's random number, the journal's last record
    /// when it started (`u64::MAX`: not started) and its last durable record.
    run: u64,
    journal_start: AtomicU64,
    journal_durable: AtomicU64,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("dir", &self.dir)
            .field("epoch", &self.epoch())
            .field("partitions", &self.partitions)
            .finish_non_exhaustive()
    }
}

/// Deletions of `expire` not yet applied, with their effect on memory.
#[derive(Default)]
struct ExpireChunk {
    batch: Ops,
    ops: usize,
    forgotten: BTreeMap<Partition, u64>,
    d_channels: i64,
    d_events: i64,
}

/// A chunk stops growing at this many events ...
const CHUNK_EVENTS: usize = 128;
/// ... or once its payloads reach this many bytes (a bigger event makes a chunk of its own).
///
/// sled splits a leaf past 16 records and rewrites the whole leaf every 10 updates, so bigger
/// chunks mean fewer updates but more bytes per rewrite, and leaves over 128 KiB go to blob
/// files (synced by `DiskSync`). Measured with 1 KiB payloads, 16x32 (docs/benchmarks.md):
/// 6 KiB chunks gave 27k acks/s at 39-42 us CPU each, 64 KiB chunks 37-41k at 24 us.
const CHUNK_BYTES: usize = 64 << 10;

/// Per-channel work collected while applying one batch.
struct ChannelWork {
    partition: Partition,
    history_size: u64,
    meta: ChannelMeta,
    /// The batch's apply clock and the channel's TTL deadline: the same for all its new events.
    timestamp_ms: u64,
    expires_at_ms: Option<u64>,
    /// The batch's new events of the channel: seq, message id, payload.
    new: Vec<(u64, Option<Bytes>, Bytes)>,
}

/// Opens the sled database, retrying for up to 2 s while its directory lock is held: sled
/// releases the lock of a dropped database from its flusher thread, a moment after the drop.
fn open_db(dir: &Path, cache_capacity: u64) -> Result<sled::Db, StorageError> {
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    loop {
        match sled::Config::new()
            .path(dir)
            .cache_capacity(cache_capacity)
            .open()
        {
            Err(sled::Error::Io(error))
                if error.to_string().contains("could not acquire lock")
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            other => return Ok(other?),
        }
    }
}

/// The last record of the write-ahead log `log` whose writes are in `tree` (0: none).
fn read_log_applied(tree: &Tree, log: &LogName) -> Result<u64, StorageError> {
    match tree.get(log.marker)? {
        Some(v) => codec::be_u64(&v, "write-ahead log position"),
        None => Ok(0),
    }
}

/// Redoes the writes of the write-ahead-log records of `log` that sled does not hold (a crash
/// came before a checkpoint covered them, see the `wal` module), makes the store durable and
/// deletes the log.
fn replay_log(tree: &Tree, disk: &DiskSync, dir: &Path, log: &LogName) -> Result<(), StorageError> {
    let wal_dir = log.dir(dir);
    let mut next = read_log_applied(tree, log)? + 1;
    let (mut records, mut writes) = (0u64, 0usize);
    let last = crate::wal::read_all(&wal_dir, |record| {
        if record.lsn < next {
            return Ok(());
        }
        if record.lsn != next {
            return Err(StorageError::Corrupt(format!(
                "write-ahead log in {} resumes at record {} but the store holds only up to {}",
                wal_dir.display(),
                record.lsn,
                next - 1
            )));
        }
        let mut ops = record.ops;
        writes += ops.len();
        ops.insert(log.marker, &record.lsn.to_be_bytes());
        tree.apply(ops)?;
        next += 1;
        records += 1;
        Ok(())
    })?;
    if last > 0 {
        // The log goes only once what it held is durable in sled.
        tree.flush()?;
        disk.sync()
            .map_err(|e| StorageError::Sled(sled::Error::Io(e)))?;
        tracing::info!(dir = %wal_dir.display(), log = log.what, records, writes, "replayed the write-ahead log");
    }
    crate::wal::delete_all(&wal_dir)
}

impl Store {
    /// Opens (creating if needed) the store in `dir`.
    ///
    /// The first open picks a random epoch and records `options.partitions`; later opens reuse
    /// both and fail with [`StorageError::PartitionsMismatch`] if `options.partitions` differs.
    /// A write-ahead log the local log left behind (a crash) is replayed first.
    /// Only one process may have a store open (sled holds an exclusive lock on the directory).
    /// A lock still held by a store of this process that is being dropped (sled releases it
    /// from its background thread) is waited for, briefly.
    pub fn open(dir: &Path, options: StoreOptions) -> Result<Store, StorageError> {
        if options.partitions == 0 {
            return Err(StorageError::InvalidOptions(
                "the partition count must be at least 1".into(),
            ));
        }
        std::fs::create_dir_all(dir).map_err(|e| StorageError::Sled(sled::Error::Io(e)))?;
        let db = open_db(dir, options.cache_capacity)?;
        let disk =
            Arc::new(DiskSync::open(dir).map_err(|e| StorageError::Sled(sled::Error::Io(e)))?);
        let tree = Arc::new(Tree::new(db.open_tree(codec::TREE)?));

        let (epoch, partitions) = match tree.get(codec::KEY_VERSION)? {
            None => {
                let epoch = Epoch::random();
                let mut b = Ops::default();
                b.insert(codec::KEY_VERSION, &codec::FORMAT_VERSION.to_be_bytes());
                b.insert(codec::KEY_EPOCH, &epoch.0.to_be_bytes());
                b.insert(codec::KEY_PARTITIONS, &options.partitions.to_be_bytes());
                tree.apply(b)?;
                tree.flush()?;
                tracing::info!(dir = %dir.display(), %epoch, partitions = options.partitions, "created store");
                (epoch, options.partitions)
            }
            Some(v) => {
                let found = <[u8; 4]>::try_from(&v[..])
                    .map(u32::from_be_bytes)
                    .map_err(|_| StorageError::Corrupt("format version is not 4 bytes".into()))?;
                if found != codec::FORMAT_VERSION {
                    return Err(StorageError::FormatVersion {
                        dir: dir.to_path_buf(),
                        found,
                        expected: codec::FORMAT_VERSION,
                    });
                }
                let epoch = tree
                    .get(codec::KEY_EPOCH)?
                    .ok_or_else(|| StorageError::Corrupt("epoch missing".into()))?;
                let epoch = Epoch(codec::be_u64(&epoch, "epoch")?);
                let p = tree
                    .get(codec::KEY_PARTITIONS)?
                    .ok_or_else(|| StorageError::Corrupt("partition count missing".into()))?;
                let stored = <[u8; 2]>::try_from(&p[..])
                    .map(u16::from_be_bytes)
                    .map_err(|_| StorageError::Corrupt("partition count is not 2 bytes".into()))?;
                if stored != options.partitions {
                    return Err(StorageError::PartitionsMismatch {
                        dir: dir.to_path_buf(),
                        stored,
                        requested: options.partitions,
                    });
                }
                (epoch, stored)
            }
        };

        let store_id = match tree.get(codec::KEY_STORE_ID)? {
            Some(v) => codec::be_u64(&v, "store id")?,
            None => {
                let id = Epoch::random().0;
                tree.insert(codec::KEY_STORE_ID, &id.to_be_bytes())?;
                tree.flush()?;
                id
            }
        };

        replay_log(&tree, &disk, dir, &crate::wal::LOCAL)?;
        replay_log(&tree, &disk, dir, &crate::wal::RAFT)?;

        let mut last_seq = vec![0u64; usize::from(partitions)];
        let mut forgotten = vec![0u64; usize::from(partitions)];
        let mut clock = vec![0u64; usize::from(partitions)];
        for (prefix, into) in [
            (codec::PREFIX_LAST_SEQ, &mut last_seq),
            (codec::PREFIX_FORGOTTEN, &mut forgotten),
            (codec::PREFIX_CLOCK, &mut clock),
        ] {
            for kv in tree.scan_prefix(prefix) {
                let (k, v) = kv?;
                let p = k
                    .get(prefix.len()..)
                    .and_then(|b| <[u8; 2]>::try_from(b).ok())
                    .map(u16::from_be_bytes)
                    .ok_or_else(|| StorageError::Corrupt("partition key malformed".into()))?;
                let slot = into.get_mut(usize::from(p)).ok_or_else(|| {
                    StorageError::Corrupt(format!("partition {p} beyond the partition count"))
                })?;
                *slot = codec::be_u64(&v, "partition counter")?;
            }
        }

        let (mut channels, mut events) = (0u64, 0u64);
        for kv in tree.scan_prefix([codec::PREFIX_CHANNEL]) {
            let (_, v) = kv?;
            let meta: ChannelMeta = codec::decode(&v, "channel meta")?;
            if meta.retained > 0 {
                channels += 1;
                events += meta.retained;
            }
        }

        let cluster = tree.get(codec::KEY_CLUSTER)?.is_some();

        let atomics = |v: &[u64]| v.iter().map(|&x| AtomicU64::new(x)).collect::<Box<[_]>>();
        Ok(Store {
            store_id,
            peer_store_generation: AtomicU64::new(0),
            latest: atomics(&last_seq),
            forgotten: atomics(&forgotten),
            clock: atomics(&clock),
            write: Mutex::new(WriteState {
                last_seq,
                forgotten,
                clock,
                chunks: ChunkIndex::default(),
            }),
            _db: db,
            disk,
            tree,
            dir: dir.to_path_buf(),
            epoch: AtomicU64::new(epoch.0),
            partitions,
            dedup_window_ms: options.dedup_window.as_millis().min(u128::from(u64::MAX)) as u64,
            stat_channels: AtomicU64::new(channels),
            stat_events: AtomicU64::new(events),
            cluster: AtomicBool::new(cluster),
            deterministic_expiry: AtomicBool::new(cluster),
            clock_correction_ms: std::sync::atomic::AtomicI64::new(0),
            expire_yields: AtomicU64::new(0),
            flush_tickets: AtomicU64::new(0),
            flushed_ticket: AtomicU64::new(0),
            flush_lock: tokio::sync::Mutex::new(()),
            broken: AtomicBool::new(false),
            broken_by: Mutex::new(None),
            raft_journal: AtomicBool::new(false),
            raft_journal_slot: Mutex::new(std::sync::Weak::new()),
            run: Epoch::random().0,
            journal_start: AtomicU64::new(u64::MAX),
            journal_durable: AtomicU64::new(0),
        })
    }

    /// Whether a write failed half-way (a full disk, an I/O error): the store then refuses
    /// every apply until the node restarts and recovers from its write-ahead log, so the node
    /// should not be sent publishes (`/ready` says 503).
    pub fn is_broken(&self) -> bool {
        self.broken.load(Ordering::Acquire)
    }

    /// The error that broke the store (see [`Store::is_broken`]), if one did.
    pub fn broken_by(&self) -> Option<String> {
        self.broken_by.lock().clone()
    }

    /// Marks the store broken by `error` (the first error is kept).
    pub(crate) fn break_by(&self, error: &StorageError) {
        self.broken_by
            .lock()
            .get_or_insert_with(|| error.to_string());
        self.broken.store(true, Ordering::Release);
    }

    /// The store's epoch: chosen at random when it was created, replaced by the cluster's epoch
    /// when the store joins a cluster (the meta group's `Init`, see [`Store::cluster_initialized`]).
    pub fn epoch(&self) -> Epoch {
        Epoch(self.epoch.load(Ordering::Acquire))
    }

    /// A random id the store got when it was created, kept for its life (unlike the epoch,
    /// which becomes the cluster's). A cluster's members remember each other's: a node that
    /// comes back under its id with another store (its data directory lost or replaced) is
    /// told apart from the one they knew, and not trusted with a vote.
    pub fn store_id(&self) -> u64 {
        self.store_id
    }

    /// The store id node `peer` was last seen with, as recorded by [`Store::set_peer_store_id`].
    pub fn peer_store_id(&self, peer: u64) -> Result<Option<u64>, StorageError> {
        match self.tree.get(peer_store_key(peer))? {
            Some(v) => Ok(Some(codec::be_u64(&v, "peer store id")?)),
            None => Ok(None),
        }
    }

    /// Forgets the store ids of every peer not in `members`. The meta group's state machine
    /// calls it with each membership it applies (and a snapshot's), in log order, so a node
    /// removed and joined again is forgotten in between even when both come in one batch.
    pub fn forget_peer_store_ids_except(
        &self,
        members: &std::collections::BTreeSet<u64>,
    ) -> Result<(), StorageError> {
        let mut forgot = false;
        for (peer, _) in self.peer_store_ids()? {
            if !members.contains(&peer) {
                self.tree.remove(peer_store_key(peer))?;
                forgot = true;
            }
        }
        let mut progress = Vec::new();
        for kv in self.tree.scan_prefix(codec::PREFIX_PEER_PROGRESS) {
            let (key, _) = kv?;
            progress.push(codec::be_u64(
                &key[codec::PREFIX_PEER_PROGRESS.len()..],
                "peer id",
            )?);
        }
        // Journaled like the records themselves, so that a crash cannot redo a record
        // without its removal.
        let mut removals = Ops::default();
        for peer in progress.into_iter().filter(|peer| !members.contains(peer)) {
            removals.remove(peer_progress_key(peer));
        }
        if removals.len() > 0 {
            self.write_journaled(removals)?;
            forgot = true;
        }
        if forgot {
            self.peer_store_generation.fetch_add(1, Ordering::AcqRel);
        }
        Ok(())
    }

    /// How far this store's Raft journal has got, for peers to tell a data directory that
    /// went back in time (restored from a backup or a disk snapshot) from the one they knew
    /// (see [`JournalProgress`]); `None` before the journal is opened.
    pub fn journal_progress(&self) -> Option<JournalProgress> {
        let start = self.journal_start.load(Ordering::Acquire);
        (start != u64::MAX).then(|| JournalProgress {
            run: self.run,
            start,
            durable: self.journal_durable.load(Ordering::Acquire).max(start),
        })
    }

    /// The journal opened with `last` as its last record.
    pub(crate) fn journal_started(&self, last: u64) {
        self.journal_durable.fetch_max(last, Ordering::AcqRel);
        self.journal_start.store(last, Ordering::Release);
    }

    /// Every journal record up to `lsn` is durable.
    pub(crate) fn journal_durable(&self, lsn: u64) {
        self.journal_durable.fetch_max(lsn, Ordering::AcqRel);
    }

    /// What this node last recorded of member `peer`'s journal (see
    /// [`Store::set_peer_progress`]).
    pub fn peer_progress(&self, peer: u64) -> Result<Option<PeerProgress>, StorageError> {
        match self.tree.get(peer_progress_key(peer))? {
            Some(v) => PeerProgress::decode(&v).map(Some),
            None => Ok(None),
        }
    }

    /// Records what this node knows of member `peer`'s journal. With the Raft journal open,
    /// as a record of it, made durable with its next sync (a few ms) and redone after a
    /// crash, like the writes it records. A record marking the member's store as gone back in
    /// time is flushed.
    pub fn set_peer_progress(
        &self,
        peer: u64,
        progress: &PeerProgress,
    ) -> Result<(), StorageError> {
        let mut ops = Ops::default();
        ops.insert(peer_progress_key(peer), &progress.encode()[..]);
        self.write_journaled(ops)?;
        if progress.went_back {
            self.flush_blocking()?;
        }
        Ok(())
    }

    /// Writes `ops` as a record of the Raft journal if it is open (durable within a few ms,
    /// redone after a crash), else to the tree (durable at the next checkpoint).
    fn write_journaled(&self, ops: Ops) -> Result<(), StorageError> {
        let journal = self.raft_journal_slot.lock().upgrade();
        match journal {
            Some(journal) => journal.submit(ops, crate::raft::Done::Nobody),
            None => Ok(self.tree.apply(ops)?),
        }
    }

    /// Forgets every record of [`Store::set_peer_progress`] (flushed); returns how many there
    /// were.
    pub fn forget_peer_progress(&self) -> Result<usize, StorageError> {
        let keys: Vec<_> = self
            .tree
            .scan_prefix(codec::PREFIX_PEER_PROGRESS)
            .map(|kv| kv.map(|(key, _)| key))
            .collect::<Result<_, _>>()?;
        for key in &keys {
            self.tree.remove(key)?;
        }
        self.flush_blocking()?;
        Ok(keys.len())
    }

    /// Counts [`Store::forget_peer_store_ids_except`] calls that forgot something: a cache of
    /// the records is stale once it moved.
    pub fn peer_store_generation(&self) -> u64 {
        self.peer_store_generation.load(Ordering::Acquire)
    }

    /// Every recorded `(peer, store id)`.
    pub fn peer_store_ids(&self) -> Result<Vec<(u64, u64)>, StorageError> {
        let mut out = Vec::new();
        for kv in self.tree.scan_prefix(codec::PREFIX_PEER_STORE) {
            let (key, value) = kv?;
            let peer = codec::be_u64(&key[codec::PREFIX_PEER_STORE.len()..], "peer id")?;
            out.push((peer, codec::be_u64(&value, "peer store id")?));
        }
        Ok(out)
    }

    /// Records (or, with `None`, forgets) the store id of node `peer`. A record is written to
    /// sled at once (a checkpoint of the store's recent writes, see the `memtable` module): it
    /// is what keeps a member whose disk was lost from coming back with a vote, and it is
    /// rare (a peer's first contact with a store).
    pub fn set_peer_store_id(&self, peer: u64, id: Option<u64>) -> Result<(), StorageError> {
        match id {
            Some(id) => {
                self.tree.insert(peer_store_key(peer), &id.to_be_bytes())?;
                self.tree.flush()?;
            }
            None => self.tree.remove(peer_store_key(peer))?,
        };
        Ok(())
    }

    /// Binds the store to cluster node `node_id`: records it the first time a cluster node
    /// opens the store (a new store, or one from before the record existed), and refuses
    /// ([`StorageError::NodeIdMismatch`]) any other id afterwards. The store holds the node's
    /// Raft votes and logs: under another id it would pass for that node.
    pub fn claim_node_id(&self, node_id: u64) -> Result<(), StorageError> {
        match self.tree.get(codec::KEY_NODE_ID)? {
            Some(v) => {
                let stored = codec::be_u64(&v, "node id")?;
                if stored != node_id {
                    return Err(StorageError::NodeIdMismatch {
                        dir: self.dir.clone(),
                        stored,
                        requested: node_id,
                    });
                }
            }
            None => {
                self.tree
                    .insert(codec::KEY_NODE_ID, &node_id.to_be_bytes())?;
                self.tree.flush()?;
                tracing::info!(dir = %self.dir.display(), node_id, "the store belongs to this node id from now on");
            }
        }
        Ok(())
    }

    /// The cluster's namespace config as this node's meta group last applied it (`None`: the
    /// cluster holds none, or this store is not in a cluster).
    pub fn cluster_namespaces(
        &self,
    ) -> Result<Option<crate::namespace::NamespacesSpec>, StorageError> {
        match self.tree.get(codec::KEY_CLUSTER_NAMESPACES)? {
            Some(v) => Ok(Some(codec::decode(&v, "cluster namespace config")?)),
            None => Ok(None),
        }
    }

    /// Whether the store joined a cluster: its meta Raft group applied `Init` (or installed a
    /// snapshot taken after it). From then on [`Store::epoch`] is the cluster's epoch.
    pub fn cluster_initialized(&self) -> bool {
        self.cluster.load(Ordering::Acquire)
    }

    /// The applied clock of `partition` (0 = nothing applied yet, or no such partition): the
    /// largest clock an apply of the partition used. Apply never uses an older clock (an apply
    /// with an earlier `now_ms` uses this one), and in a cluster dedup records expire by it.
    pub fn applied_clock(&self, partition: Partition) -> u64 {
        self.clock
            .get(usize::from(partition))
            .map_or(0, |a| a.load(Ordering::Acquire))
    }

    /// The partition count, fixed when the store was created.
    pub fn partitions(&self) -> u16 {
        self.partitions
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The partition `channel` belongs to in this store.
    pub fn partition_of(&self, channel: &[u8]) -> Partition {
        partition_of(channel, self.partitions)
    }

    /// The last assigned seq of `partition` (0 = none yet, or no such partition).
    pub fn latest_seq(&self, partition: Partition) -> u64 {
        self.latest
            .get(usize::from(partition))
            .map_or(0, |a| a.load(Ordering::Acquire))
    }

    /// Number of channels with history and total retained events (kept in memory: O(1)).
    pub fn channel_stats(&self) -> ChannelStats {
        ChannelStats {
            channels: self.stat_channels.load(Ordering::Relaxed),
            events: self.stat_events.load(Ordering::Relaxed),
        }
    }

    /// Applies `batch` in order, as ONE atomic sled batch; returns one [`Applied`] per publish.
    ///
    /// For each publish: a (channel, message id) seen within the dedup window (in an earlier
    /// batch or earlier in this one) yields [`Applied::Duplicate`] with the original position.
    /// Otherwise the channel's partition assigns its next seq (contiguous, never reused), the
    /// event is written to history if its namespace keeps any (`history_size > 0`), the channel
    /// is trimmed to `history_size`, oldest first, and the message id is recorded with the
    /// apply clock. The event's TTL deadline is fixed here as `clock + history_ttl`.
    ///
    /// The apply clock of a partition is `max(now_ms, applied_clock(partition))`
    /// ([`Store::applied_clock`]), so time never runs backwards within a partition; it becomes
    /// the partition's new applied clock, in the same batch.
    ///
    /// Does not flush: the caller flushes ([`Store::flush`]) before acknowledging. If this
    /// returns an error nothing of the batch was applied. Callers must not pass publishes of
    /// non-durable namespaces (they are stored like durable ones if they do).
    pub fn apply(
        &self,
        batch: &[Publish],
        namespaces: &Namespaces,
        now_ms: u64,
    ) -> Result<Vec<Applied>, StorageError> {
        self.apply_with(batch, namespaces, now_ms, None, Ops::default())
    }

    /// [`Store::apply`] for the local log, as its write-ahead-log record `lsn`: returns the
    /// record (the apply's writes, see the `wal` module) with the outcome. The writes go to
    /// the store's table of recent writes with `lsn` as the last applied record (see the
    /// `memtable` module): a checkpoint puts them in sled whole, so after a crash sled holds
    /// every record up to the one it names, and replaying the later ones restores the rest.
    pub(crate) fn apply_logged(
        &self,
        batch: &[Publish],
        namespaces: &Namespaces,
        now_ms: u64,
        lsn: u64,
    ) -> Result<(Vec<Applied>, Vec<u8>), StorageError> {
        let mut record = Vec::new();
        let applied = self.apply_then(batch, namespaces, now_ms, None, Ops::default(), |ops| {
            record = crate::wal::encode(lsn, &ops);
            let mut ops = ops;
            ops.insert(codec::KEY_LOCAL_LOG, &lsn.to_be_bytes());
            let written = self.tree.apply(ops);
            if let Err(error) = &written {
                self.break_by(&StorageError::Sled(error.clone()));
            }
            Ok(written?)
        })?;
        Ok((applied, record))
    }

    /// The last write-ahead-log record of the local log whose apply is in the store (0: none).
    pub(crate) fn local_log_applied(&self) -> Result<u64, StorageError> {
        read_log_applied(&self.tree, &crate::wal::LOCAL)
    }

    /// Marks the store's Raft journal open; `false` if one already is.
    pub(crate) fn claim_raft_journal(&self) -> bool {
        self.raft_journal
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Where the store's open Raft journal is kept (a weak reference).
    pub(crate) fn raft_journal_slot(&self) -> &Mutex<std::sync::Weak<crate::raft::RaftJournal>> {
        &self.raft_journal_slot
    }

    /// Marks the store's Raft journal closed.
    pub(crate) fn release_raft_journal(&self) {
        self.raft_journal.store(false, Ordering::Release);
    }

    /// The last write-ahead-log record of the Raft logs whose writes are in the store (0: none).
    pub(crate) fn raft_log_applied(&self) -> Result<u64, StorageError> {
        read_log_applied(&self.tree, &crate::wal::RAFT)
    }

    /// [`Store::apply`], with the ops already in `ops` (the Raft bookkeeping of the entry; keys
    /// outside the store's event records) written in the same atomic sled batch. `tick` names
    /// a partition whose applied clock advances to `now_ms` even if `batch` has none of its
    /// publishes (an empty entry still moves its clock).
    pub(crate) fn apply_with(
        &self,
        batch: &[Publish],
        namespaces: &Namespaces,
        now_ms: u64,
        tick: Option<Partition>,
        ops: Ops,
    ) -> Result<Vec<Applied>, StorageError> {
        self.apply_then(batch, namespaces, now_ms, tick, ops, |ops| {
            Ok(self.tree.apply(ops)?)
        })
    }

    /// [`Store::apply_with`], but `write` writes the ops (the Raft state machine hands them to
    /// the journal, which writes them to the store after its record). `write` runs under the
    /// store's write lock; if it fails, every later apply is refused (a restart redoes the
    /// record).
    pub(crate) fn apply_writing(
        &self,
        batch: &[Publish],
        namespaces: &Namespaces,
        now_ms: u64,
        tick: Option<Partition>,
        ops: Ops,
        write: impl FnOnce(Ops) -> Result<(), StorageError>,
    ) -> Result<Vec<Applied>, StorageError> {
        self.apply_then(batch, namespaces, now_ms, tick, ops, |ops| {
            let written = write(ops);
            if let Err(error) = &written {
                self.break_by(error);
            }
            written
        })
    }

    /// The apply: works out the writes of `batch` into `sled_batch`, has `write` write them,
    /// then updates the in-memory counters. Holds the writer lock throughout.
    fn apply_then(
        &self,
        batch: &[Publish],
        namespaces: &Namespaces,
        now_ms: u64,
        tick: Option<Partition>,
        sled_batch: Ops,
        write: impl FnOnce(Ops) -> Result<(), StorageError>,
    ) -> Result<Vec<Applied>, StorageError> {
        let mut state = self.write.lock();
        if self.broken.load(Ordering::Acquire) {
            return Err(StorageError::Broken);
        }
        // Put back only after a successful apply: a failed or panicking one leaves it empty.
        let mut index = std::mem::take(&mut state.chunks);
        let applied = self.apply_locked(
            &mut state, &mut index, batch, namespaces, now_ms, tick, sled_batch, write,
        );
        if applied.is_ok() {
            state.chunks = index;
        }
        applied
    }

    /// [`Store::apply_then`]'s work, under the writer lock.
    #[allow(clippy::too_many_arguments)]
    fn apply_locked(
        &self,
        state: &mut WriteState,
        index: &mut ChunkIndex,
        batch: &[Publish],
        namespaces: &Namespaces,
        now_ms: u64,
        tick: Option<Partition>,
        mut sled_batch: Ops,
        write: impl FnOnce(Ops) -> Result<(), StorageError>,
    ) -> Result<Vec<Applied>, StorageError> {
        let mut out = Vec::with_capacity(batch.len());
        let mut next: BTreeMap<Partition, u64> = BTreeMap::new();
        let mut clocks: BTreeMap<Partition, u64> = BTreeMap::new();
        let mut seen: HashMap<Vec<u8>, Position> = HashMap::new();
        let mut channels: HashMap<Bytes, ChannelWork> = HashMap::new();
        if let Some(p) = tick.filter(|&p| p < self.partitions) {
            clocks.insert(p, now_ms.max(state.clock[usize::from(p)]));
        }

        for publish in batch {
            let config = namespaces.for_channel(&publish.channel);
            let partition = partition_of(&publish.channel, self.partitions);
            let now_ms = *clocks
                .entry(partition)
                .or_insert_with(|| now_ms.max(state.clock[usize::from(partition)]));

            let dedup_key = match &publish.message_id {
                Some(id) => {
                    let key = codec::dedup_key(&publish.channel, id);
                    if let Some(&pos) = seen.get(&key) {
                        out.push(Applied::Duplicate(pos));
                        continue;
                    }
                    if let Some(v) = self.tree.get(&key)? {
                        let rec: DedupRecord = codec::decode(&v, "dedup")?;
                        if rec.at_ms.saturating_add(self.dedup_window_ms) > now_ms {
                            out.push(Applied::Duplicate(Position::new(rec.partition, rec.seq)));
                            continue;
                        }
                    }
                    Some(key)
                }
                None => None,
            };

            let last = next
                .entry(partition)
                .or_insert(state.last_seq[usize::from(partition)]);
            *last += 1;
            let position = Position::new(partition, *last);

            if let Some(key) = dedup_key {
                let rec = DedupRecord {
                    partition,
                    seq: position.seq,
                    at_ms: now_ms,
                };
                sled_batch.insert(codec::dedup_expiry_key(now_ms, &key), &[][..]);
                sled_batch.insert(key.as_slice(), codec::encode(&rec));
                seen.insert(key, position);
            }

            // A channel that keeps no history still gets its meta: its loss floor moves past
            // each event, so a client resuming from before one is told of the gap.
            {
                let work = match channels.get_mut(&publish.channel) {
                    Some(w) => w,
                    None => {
                        let meta_key = codec::chan_key(codec::PREFIX_CHANNEL, &publish.channel);
                        let meta = match self.tree.get(&meta_key)? {
                            Some(v) => codec::decode(&v, "channel meta")?,
                            None => ChannelMeta {
                                retained: 0,
                                removed_through: state.forgotten[usize::from(partition)],
                            },
                        };
                        channels
                            .entry(publish.channel.clone())
                            .or_insert(ChannelWork {
                                partition,
                                history_size: config.history_size as u64,
                                meta,
                                timestamp_ms: now_ms,
                                expires_at_ms: config.history_ttl.map(|ttl| {
                                    now_ms.saturating_add(
                                        ttl.as_millis().min(u128::from(u64::MAX)) as u64
                                    )
                                }),
                                new: Vec::new(),
                            })
                    }
                };
                work.new.push((
                    position.seq,
                    publish.message_id.clone(),
                    publish.payload.clone(),
                ));
            }

            out.push(Applied::New(Event {
                position,
                channel: publish.channel.clone(),
                payload: publish.payload.clone(),
                message_id: publish.message_id.clone(),
                timestamp_ms: now_ms,
            }));
        }

        // Retention by count, per channel: drop the oldest committed events first, then (if the
        // batch alone overflows) the oldest of this batch's, which are then never written.
        let (mut d_channels, mut d_events) = (0i64, 0i64);
        for (channel, work) in channels {
            let ChannelWork {
                partition,
                history_size,
                mut meta,
                timestamp_ms,
                expires_at_ms,
                new,
            } = work;
            debug_assert_eq!(partition, partition_of(&channel, self.partitions));
            let before = meta.retained;
            let total = before + new.len() as u64;
            let excess = total.saturating_sub(history_size);
            let from_old = excess.min(before);
            if from_old > 0 {
                index.trim(&self.tree, &channel, &mut meta, from_old, &mut sled_batch)?;
            }
            let from_new = (excess - from_old) as usize;
            if from_new > 0 {
                meta.removed_through = meta.removed_through.max(new[from_new - 1].0);
            }
            let mut chunk = StoredChunk {
                partition,
                timestamp_ms,
                expires_at_ms,
                seqs: Vec::new(),
                message_ids: Vec::new(),
                payloads: Vec::new(),
            };
            let mut chunk_bytes = 0;
            for (seq, message_id, payload) in new.into_iter().skip(from_new) {
                if !chunk.seqs.is_empty()
                    && (chunk.seqs.len() == CHUNK_EVENTS
                        || chunk_bytes + payload.len() > CHUNK_BYTES)
                {
                    index.written(&channel, &chunk.seqs);
                    write_chunk(&channel, &mut chunk, &mut sled_batch);
                    chunk_bytes = 0;
                }
                chunk_bytes += payload.len();
                chunk.seqs.push(seq);
                chunk.message_ids.push(message_id);
                chunk.payloads.push(payload);
            }
            if !chunk.seqs.is_empty() {
                index.written(&channel, &chunk.seqs);
                write_chunk(&channel, &mut chunk, &mut sled_batch);
            }
            meta.retained = total - excess;
            sled_batch.insert(
                codec::chan_key(codec::PREFIX_CHANNEL, &channel),
                codec::encode(&meta),
            );
            d_events += meta.retained as i64 - before as i64;
            if before == 0 && meta.retained > 0 {
                d_channels += 1;
            }
        }

        for (&p, &seq) in &next {
            sled_batch.insert(
                codec::partition_key(codec::PREFIX_LAST_SEQ, p),
                &seq.to_be_bytes(),
            );
        }
        for (&p, &clock) in &clocks {
            sled_batch.insert(
                codec::partition_key(codec::PREFIX_CLOCK, p),
                &clock.to_be_bytes(),
            );
        }

        write(sled_batch)?;

        for (p, seq) in next {
            state.last_seq[usize::from(p)] = seq;
            self.latest[usize::from(p)].store(seq, Ordering::Release);
        }
        for (p, clock) in clocks {
            state.clock[usize::from(p)] = clock;
            self.clock[usize::from(p)].store(clock, Ordering::Release);
        }
        add(&self.stat_channels, d_channels);
        add(&self.stat_events, d_events);
        Ok(out)
    }
}

/// Event `i` of `chunk`.
fn chunk_event(channel: &Bytes, chunk: &StoredChunk, i: usize) -> Event {
    Event {
        position: Position::new(chunk.partition, chunk.seqs[i]),
        channel: channel.clone(),
        payload: chunk.payloads[i].clone(),
        message_id: chunk.message_ids[i].clone(),
        timestamp_ms: chunk.timestamp_ms,
    }
}

/// Writes `chunk` under its first seq's key and empties it for the next one.
fn write_chunk(channel: &[u8], chunk: &mut StoredChunk, batch: &mut Ops) {
    let key = codec::history_key(channel, chunk.seqs[0]);
    batch.insert(key, codec::encode(&*chunk));
    chunk.seqs.clear();
    chunk.message_ids.clear();
    chunk.payloads.clear();
}

/// The key of what this store holds of `peer` under `prefix` (its store id, its journal's
/// progress): the prefix, then the peer's id big-endian.
fn peer_key(prefix: &[u8], peer: u64) -> Vec<u8> {
    let mut key = prefix.to_vec();
    key.extend_from_slice(&peer.to_be_bytes());
    key
}

fn peer_progress_key(peer: u64) -> Vec<u8> {
    peer_key(codec::PREFIX_PEER_PROGRESS, peer)
}

fn peer_store_key(peer: u64) -> Vec<u8> {
    peer_key(codec::PREFIX_PEER_STORE, peer)
}

fn add(a: &AtomicU64, d: i64) {
    if d >= 0 {
        a.fetch_add(d as u64, Ordering::Relaxed);
    } else {
        a.fetch_sub(d.unsigned_abs(), Ordering::Relaxed);
    }
}

impl Store {
    /// Makes everything applied so far durable (sled `flush_async`: the whole database).
    /// A publish must not be acknowledged before the flush after its apply has returned `Ok`.
    ///
    /// sled 0.34 makes a flush stable with `sync_file_range`, which survives a process crash
    /// but neither empties the disk's write cache nor records an append's new file size; it
    /// `fsync`s only from its background flusher, every 500 ms. So the flush is followed by an
    /// `fdatasync` of the data file (and of the blob files sled wrote meanwhile, see the
    /// private `disk` module): an acknowledged event then survives power loss too, the guarantee of
    /// Redis's `appendfsync always`.
    ///
    /// Concurrent callers share flushes (every Raft group of the node flushes this one
    /// database): a caller waiting behind a running flush returns as soon as a flush that
    /// started after its call completes.
    pub async fn flush(&self) -> Result<(), StorageError> {
        // Every write of this caller happened before its ticket was taken.
        let ticket = self.flush_tickets.fetch_add(1, Ordering::AcqRel) + 1;
        let _one_at_a_time = self.flush_lock.lock().await;
        if self.flushed_ticket.load(Ordering::Acquire) >= ticket {
            return Ok(());
        }
        // This flush starts after the writes of every ticket taken so far.
        let covers = self.flush_tickets.load(Ordering::Acquire);
        self.tree.flush_async().await?;
        let disk = self.disk.clone();
        tokio::task::spawn_blocking(move || disk.sync())
            .await
            .map_err(|e| StorageError::Internal(format!("fdatasync task failed: {e}")))?
            .map_err(|e| StorageError::Sled(sled::Error::Io(e)))?;
        self.flushed_ticket.fetch_max(covers, Ordering::AcqRel);
        Ok(())
    }

    /// Bytes of recent writes held in memory that sled does not have yet (they are durable in
    /// the write-ahead log; a checkpoint writes them to sled): the memory that costs.
    pub fn unwritten_bytes(&self) -> u64 {
        self.tree.unwritten_bytes() as u64
    }

    /// Whether enough recent writes wait in memory for a checkpoint to start before the
    /// write-ahead log's segment fills (the `memtable` module's key limit).
    pub(crate) fn wants_checkpoint(&self) -> bool {
        self.tree.wants_checkpoint()
    }

    /// Blocking form of [`Store::flush`] (same guarantee, but not shared with concurrent
    /// callers of [`Store::flush`]): for the local log's flusher thread, shutdown paths and
    /// tests outside a runtime. Everything applied before the call is covered.
    pub fn flush_blocking(&self) -> Result<(), StorageError> {
        self.tree.flush()?;
        self.disk
            .sync()
            .map_err(|e| StorageError::Sled(sled::Error::Io(e)))?;
        Ok(())
    }

    /// Retained events of `channel` with `seq > after_seq` (`None`: from the oldest), ascending,
    /// at most `limit`, leaving out TTL-expired ones (by [`Store::now_ms`]).
    pub fn history_after(
        &self,
        channel: &[u8],
        after_seq: Option<u64>,
        limit: usize,
    ) -> Result<Vec<Event>, StorageError> {
        self.history_after_at(channel, after_seq, limit, self.now_ms())
    }

    /// [`Store::history_after`] with an explicit clock (`now_ms` decides what is expired).
    pub fn history_after_at(
        &self,
        channel: &[u8],
        after_seq: Option<u64>,
        limit: usize,
        now_ms: u64,
    ) -> Result<Vec<Event>, StorageError> {
        Ok(self
            .history_read_at(channel, after_seq, limit, now_ms)?
            .events)
    }

    /// [`Store::history_after`], also telling what the read found no longer retained
    /// ([`HistoryRead::gone_through`]): a replay in progress compares that with where it read
    /// from to learn that events it had not reached were dropped, whether retention removed
    /// them or they passed their TTL and expiry has not removed them yet (the read skips both).
    pub fn history_read(
        &self,
        channel: &[u8],
        after_seq: Option<u64>,
        limit: usize,
    ) -> Result<HistoryRead, StorageError> {
        self.history_read_at(channel, after_seq, limit, self.now_ms())
    }

    /// [`Store::history_read`] with an explicit clock.
    pub fn history_read_at(
        &self,
        channel: &[u8],
        after_seq: Option<u64>,
        limit: usize,
        now_ms: u64,
    ) -> Result<HistoryRead, StorageError> {
        let meta_key = codec::chan_key(codec::PREFIX_CHANNEL, channel);
        // One read of the meta for both the read's floor and the report's (without
        // bookkeeping the channel has no chunks, and its loss floor is the partition's).
        let (removed, mut gone_through) = match self.tree.get(&meta_key)? {
            Some(v) => {
                let r = codec::decode::<ChannelMeta>(&v, "channel meta")?.removed_through;
                (r, r)
            }
            None => (
                0,
                self.forgotten[usize::from(self.partition_of(channel))].load(Ordering::Acquire),
            ),
        };
        let mut out = Vec::new();
        if limit == 0 || after_seq == Some(u64::MAX) {
            return Ok(HistoryRead {
                events: out,
                gone_through,
            });
        }
        let floor = removed.max(after_seq.unwrap_or(0));
        let prefix = codec::chan_key(codec::PREFIX_HISTORY, channel);
        // Start at the chunk that may hold `floor + 1`: the last one starting at or before it.
        let start = match self
            .tree
            .range(prefix.clone()..=codec::history_key(channel, floor + 1))
            .next_back()
        {
            Some(kv) => kv?.0.to_vec(),
            None => prefix.clone(),
        };
        let channel = Bytes::copy_from_slice(channel);
        for kv in self.tree.range(start..) {
            let (k, v) = kv?;
            if !k.starts_with(&prefix) {
                break;
            }
            let head: ChunkHead = codec::decode(&v, "chunk")?;
            let first = head.first_above(floor);
            if first == head.seqs.len() {
                continue;
            }
            if head.expired(now_ms) {
                // Passed over: its events are gone for this reader, as if removed.
                gone_through = gone_through.max(head.seqs[head.seqs.len() - 1]);
                continue;
            }
            let chunk = codec::decode_chunk(&v)?;
            for i in first..chunk.seqs.len() {
                out.push(chunk_event(&channel, &chunk, i));
                if out.len() == limit {
                    return Ok(HistoryRead {
                        events: out,
                        gone_through,
                    });
                }
            }
        }
        Ok(HistoryRead {
            events: out,
            gone_through,
        })
    }

    /// The last `n` retained (unexpired, by [`Store::now_ms`]) events of `channel`, ascending.
    pub fn last(&self, channel: &[u8], n: usize) -> Result<Vec<Event>, StorageError> {
        self.last_at(channel, n, self.now_ms())
    }

    /// [`Store::last`] with an explicit clock.
    pub fn last_at(
        &self,
        channel: &[u8],
        n: usize,
        now_ms: u64,
    ) -> Result<Vec<Event>, StorageError> {
        let mut out = Vec::new();
        if n == 0 {
            return Ok(out);
        }
        let floor = self.removed_through(channel)?;
        let prefix = codec::chan_key(codec::PREFIX_HISTORY, channel);
        let channel = Bytes::copy_from_slice(channel);
        'chunks: for kv in self.tree.scan_prefix(&prefix).rev() {
            let (_, v) = kv?;
            let head: ChunkHead = codec::decode(&v, "chunk")?;
            let first = head.first_above(floor);
            if head.expired(now_ms) || first == head.seqs.len() {
                continue;
            }
            let chunk = codec::decode_chunk(&v)?;
            for i in (first..chunk.seqs.len()).rev() {
                out.push(chunk_event(&channel, &chunk, i));
                if out.len() == n {
                    break 'chunks;
                }
            }
        }
        out.reverse();
        Ok(out)
    }

    /// Where to read from for the last `n` retained (unexpired, by [`Store::now_ms`]) events
    /// of `channel`: the seq just before the n-th newest (give it to
    /// [`Store::history_after`]), or `None` when `channel` retains `n` events or fewer (read
    /// from the start). Reads chunk heads only, so a client's `last=N` can be replayed a page
    /// at a time.
    pub fn seq_before_last(&self, channel: &[u8], n: usize) -> Result<Option<u64>, StorageError> {
        self.seq_before_last_at(channel, n, self.now_ms())
    }

    /// [`Store::seq_before_last`] with an explicit clock.
    pub fn seq_before_last_at(
        &self,
        channel: &[u8],
        n: usize,
        now_ms: u64,
    ) -> Result<Option<u64>, StorageError> {
        if n == 0 {
            return Ok(Some(u64::MAX));
        }
        let floor = self.removed_through(channel)?;
        let prefix = codec::chan_key(codec::PREFIX_HISTORY, channel);
        let mut left = n;
        for kv in self.tree.scan_prefix(&prefix).rev() {
            let (_, v) = kv?;
            let head: ChunkHead = codec::decode(&v, "chunk")?;
            let first = head.first_above(floor);
            if head.expired(now_ms) || first == head.seqs.len() {
                continue;
            }
            let retained = &head.seqs[first..];
            if retained.len() >= left {
                // The n-th newest is retained[len - left]: read after the seq before it.
                return Ok(Some(retained[retained.len() - left].saturating_sub(1)));
            }
            left -= retained.len();
        }
        Ok(None)
    }

    /// The position of the oldest retained (unexpired, by [`Store::now_ms`]) event of `channel`.
    pub fn oldest(&self, channel: &[u8]) -> Result<Option<Position>, StorageError> {
        self.oldest_at(channel, self.now_ms())
    }

    /// [`Store::oldest`] with an explicit clock.
    pub fn oldest_at(&self, channel: &[u8], now_ms: u64) -> Result<Option<Position>, StorageError> {
        let floor = self.removed_through(channel)?;
        let prefix = codec::chan_key(codec::PREFIX_HISTORY, channel);
        for kv in self.tree.scan_prefix(&prefix) {
            let (_, v) = kv?;
            let head: ChunkHead = codec::decode(&v, "chunk")?;
            let first = head.first_above(floor);
            if !head.expired(now_ms) && first < head.seqs.len() {
                return Ok(Some(Position::new(head.partition, head.seqs[first])));
            }
        }
        Ok(None)
    }

    /// The highest seq of `channel` whose event is no longer retained (trimmed, expired by the
    /// [`Store::now_ms`], or dropped with the channel's bookkeeping); 0 if nothing was lost.
    ///
    /// A client resuming `channel` after seq `c` (its cursor's seq for the channel's partition)
    /// may have missed events iff `c < retention_floor(channel)`: that is the gap test. It can
    /// over-report (a floor inherited from the partition when the channel's bookkeeping was
    /// dropped), never under-report. Cost: one pass over the channel's chunk heads.
    pub fn retention_floor(&self, channel: &[u8]) -> Result<u64, StorageError> {
        self.retention_floor_at(channel, self.now_ms())
    }

    /// [`Store::retention_floor`] with an explicit clock.
    pub fn retention_floor_at(&self, channel: &[u8], now_ms: u64) -> Result<u64, StorageError> {
        let meta_key = codec::chan_key(codec::PREFIX_CHANNEL, channel);
        let mut floor = match self.tree.get(&meta_key)? {
            Some(v) => codec::decode::<ChannelMeta>(&v, "channel meta")?.removed_through,
            None => self.forgotten[usize::from(self.partition_of(channel))].load(Ordering::Acquire),
        };
        let prefix = codec::chan_key(codec::PREFIX_HISTORY, channel);
        for kv in self.tree.scan_prefix(&prefix) {
            let (_, v) = kv?;
            let head: ChunkHead = codec::decode(&v, "chunk")?;
            if head.expired(now_ms) {
                floor = floor.max(head.seqs.last().copied().unwrap_or(0));
            }
        }
        Ok(floor)
    }

    /// The channel's `removed_through` (0 without bookkeeping, which means without chunks).
    fn removed_through(&self, channel: &[u8]) -> Result<u64, StorageError> {
        let meta_key = codec::chan_key(codec::PREFIX_CHANNEL, channel);
        Ok(match self.tree.get(&meta_key)? {
            Some(v) => codec::decode::<ChannelMeta>(&v, "channel meta")?.removed_through,
            None => 0,
        })
    }

    /// Moves the oldest `count` retained events of `channel` out of retention (raising
    /// `meta.removed_through`, not touching `meta.retained`); then, if `expired_at` is given, also
    /// every retained event in chunks expired at that time, up to the first live chunk. Queues
    /// the deletion of every chunk left without a retained event. Returns how many events left
    /// retention and how many chunks are deleted.
    fn trim_oldest(
        &self,
        channel: &[u8],
        meta: &mut ChannelMeta,
        count: u64,
        expired_at: Option<u64>,
        batch: &mut Ops,
    ) -> Result<(u64, usize), StorageError> {
        let prefix = codec::chan_key(codec::PREFIX_HISTORY, channel);
        let (mut removed, mut chunks) = (0u64, 0usize);
        for kv in self.tree.scan_prefix(&prefix) {
            let (key, value) = kv?;
            let head: ChunkHead = codec::decode(&value, "chunk")?;
            let expired = expired_at.is_some_and(|now| head.expired(now));
            let (taken, emptied) =
                take_oldest(&head.seqs, meta, count.saturating_sub(removed), expired);
            removed += taken;
            if !emptied {
                break;
            }
            batch.remove(key);
            chunks += 1;
        }
        Ok((removed, chunks))
    }

    /// Deletes what retention no longer covers; returns how many records it deleted (events plus
    /// dedup entries). The node runs it periodically (e.g. every few seconds).
    ///
    /// - History: each channel is trimmed to its namespace's CURRENT `history_size` (so a lowered
    ///   size or a namespace switched to 0 takes effect here), then its leading TTL-expired
    ///   events are deleted (by the deadline fixed at apply time). A channel left with no event
    ///   loses its bookkeeping; its loss floor moves to its partition's forgotten floor.
    /// - Dedup: message ids recorded at or before `now_ms - dedup_window` are forgotten. Once
    ///   the store is in a cluster (or a Raft state machine was opened on it), a message id of
    ///   partition `p` is forgotten only when also `at + dedup_window <= applied_clock(p)`: apply
    ///   (which runs on every member with the leader's clock) would treat it as new anyway, so
    ///   members whose local clocks or expire runs differ still agree on every duplicate.
    ///
    /// Work is applied in batches of about 10,000 deletions, each consistent on its own.
    /// Cost: one read per channel with history plus the deleted records.
    pub fn expire(&self, namespaces: &Namespaces, now_ms: u64) -> Result<usize, StorageError> {
        let mut state = self.write.lock();
        let mut chunk = ExpireChunk::default();
        let mut deleted = 0usize;

        let mut visited = 0usize;
        // Commits what is pending and lets a waiting apply in, every so many channels or
        // deletions (an apply must not interleave with uncommitted work on the same channel).
        let mut pause = |chunk: &mut ExpireChunk, state: &mut MutexGuard<'_, WriteState>| {
            visited += 1;
            if chunk.ops < EXPIRE_CHUNK && !visited.is_multiple_of(EXPIRE_YIELD_EVERY) {
                return Ok(());
            }
            self.commit_chunk(chunk, state)?;
            self.expire_yields.fetch_add(1, Ordering::Relaxed);
            MutexGuard::bump(state);
            Ok::<(), StorageError>(())
        };

        for key in self.tree.scan_prefix([codec::PREFIX_CHANNEL]).keys() {
            pause(&mut chunk, &mut state)?;
            let meta_key = key?;
            // Read the meta afresh: the lock may have been yielded to apply since the scan began.
            let Some(v) = self.tree.get(&meta_key)? else {
                continue;
            };
            let mut meta: ChannelMeta = codec::decode(&v, "channel meta")?;
            let (channel, _) = codec::split_chan(&meta_key)?;
            let config = namespaces.for_channel(channel);
            let excess = meta.retained.saturating_sub(config.history_size as u64);
            // In a cluster, events are deleted for their TTL only once their partition's
            // applied clock (the members' agreed time, replicated) has passed it too: a node
            // whose own clock runs ahead would delete acknowledged events early, and its
            // snapshots would carry the loss to the others. Reads still hide them by `now_ms`.
            let ttl_now = if self.deterministic_expiry.load(Ordering::Acquire) {
                now_ms.min(state.clock[usize::from(partition_of(channel, self.partitions))])
            } else {
                now_ms
            };
            let (removed, chunks) =
                self.trim_oldest(channel, &mut meta, excess, Some(ttl_now), &mut chunk.batch)?;
            if removed > 0 || chunks > 0 || meta.retained == 0 {
                // Its chunks change behind the index's back: apply indexes it again if it must.
                state.chunks.forget(channel);
            }
            let removed = removed.min(meta.retained);
            if removed == 0 && meta.retained > 0 {
                continue;
            }
            let before = meta.retained;
            meta.retained = meta.retained.saturating_sub(removed);
            chunk.d_events -= (before - meta.retained) as i64;
            chunk.ops += chunks + 1;
            deleted += removed as usize;
            if meta.retained == 0 {
                let p = partition_of(channel, self.partitions);
                let current = chunk
                    .forgotten
                    .get(&p)
                    .copied()
                    .unwrap_or(state.forgotten[usize::from(p)]);
                chunk.forgotten.insert(p, current.max(meta.removed_through));
                chunk.batch.remove(meta_key);
                if before > 0 {
                    chunk.d_channels -= 1;
                }
            } else {
                chunk.batch.insert(meta_key, codec::encode(&meta));
            }
        }

        let deterministic = self.deterministic_expiry.load(Ordering::Acquire);
        let limit = if deterministic {
            now_ms.min(state.clock.iter().copied().max().unwrap_or(0))
        } else {
            now_ms
        };
        if let Some(cut) = limit.checked_sub(self.dedup_window_ms) {
            let end = match cut.checked_add(1) {
                Some(c) => {
                    let mut end = vec![codec::PREFIX_DEDUP_EXPIRY];
                    end.extend_from_slice(&c.to_be_bytes());
                    end
                }
                None => vec![codec::PREFIX_DEDUP_EXPIRY + 1],
            };
            for key in self
                .tree
                .range(vec![codec::PREFIX_DEDUP_EXPIRY]..end)
                .keys()
            {
                pause(&mut chunk, &mut state)?;
                let k = key?;
                let (at_ms, dedup_key) = codec::split_dedup_expiry_key(&k)?;
                if deterministic {
                    let p = partition_of(codec::record_channel(&k)?, self.partitions);
                    let limit = now_ms.min(state.clock[usize::from(p)]);
                    if at_ms.saturating_add(self.dedup_window_ms) > limit {
                        // Its partition's clock has not passed the window yet: keep it.
                        continue;
                    }
                }
                chunk.batch.remove(k);
                chunk.ops += 1;
                if let Some(v) = self.tree.get(&dedup_key)? {
                    let rec: DedupRecord = codec::decode(&v, "dedup")?;
                    // A newer record for the same id has its own index entry.
                    if rec.at_ms == at_ms {
                        chunk.batch.remove(dedup_key);
                        chunk.ops += 1;
                        deleted += 1;
                    }
                }
            }
        }

        self.commit_chunk(&mut chunk, &mut state)?;
        if deleted > 0 {
            tracing::debug!(deleted, "expired history and dedup entries");
        }
        Ok(deleted)
    }

    /// Applies one chunk of expire's work and publishes its effects to memory.
    fn commit_chunk(
        &self,
        chunk: &mut ExpireChunk,
        state: &mut WriteState,
    ) -> Result<(), StorageError> {
        let ExpireChunk {
            mut batch,
            ops,
            forgotten,
            d_channels,
            d_events,
        } = std::mem::take(chunk);
        if ops == 0 && forgotten.is_empty() {
            return Ok(());
        }
        for (&p, &f) in &forgotten {
            batch.insert(
                codec::partition_key(codec::PREFIX_FORGOTTEN, p),
                &f.to_be_bytes(),
            );
        }
        self.tree.apply(batch)?;
        for (p, f) in forgotten {
            state.forgotten[usize::from(p)] = f;
            self.forgotten[usize::from(p)].store(f, Ordering::Release);
        }
        add(&self.stat_channels, d_channels);
        add(&self.stat_events, d_events);
        Ok(())
    }
}

/// A point-in-time copy of everything one partition owns: the state of its Raft group.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct PartitionImage {
    pub partition: Partition,
    /// The partition's last assigned seq.
    pub last_seq: u64,
    /// The partition's forgotten floor.
    pub forgotten: u64,
    /// The partition's applied clock.
    pub clock: u64,
    /// The partition's raw `c`, `h`, `d` and `x` records (channel metas, events, live dedup
    /// records and their index entries).
    pub records: Vec<(Bytes, Bytes)>,
}

/// Channels with history and retained events, from channel meta values.
fn count_meta(value: &[u8], channels: &mut u64, events: &mut u64) -> Result<(), StorageError> {
    let meta: ChannelMeta = codec::decode(value, "channel meta")?;
    if meta.retained > 0 {
        *channels += 1;
        *events += meta.retained;
    }
    Ok(())
}

/// What the Raft state machines need from the store: atomic batches under the write lock,
/// partition images for snapshots, and the cluster identity.
impl Store {
    /// The store's one sled tree (Raft log records live in it too, under `r` keys).
    pub(crate) fn tree(&self) -> &Tree {
        &self.tree
    }

    /// From now on dedup records expire by their partition's applied clock (see [`Store::expire`]).
    /// The time reads judge TTLs by (unix ms): the wall clock, shifted by the correction a
    /// cluster node measured against the majority of its members ([`Self::set_clock_correction`]),
    /// so that a node whose clock runs ahead does not hide events that are not expired.
    pub fn now_ms(&self) -> u64 {
        unix_now_ms().saturating_add_signed(self.clock_correction_ms.load(Ordering::Relaxed))
    }

    /// Sets what [`Self::now_ms`] adds to the wall clock (the cluster's clock loop calls it
    /// after each round).
    pub fn set_clock_correction(&self, correction_ms: i64) {
        self.clock_correction_ms
            .store(correction_ms, Ordering::Relaxed);
    }

    pub(crate) fn enable_deterministic_expiry(&self) {
        self.deterministic_expiry.store(true, Ordering::Release);
    }

    /// Runs `f` under the write lock: no apply, expire, snapshot or install interleaves.
    pub(crate) fn with_write_lock<T>(
        &self,
        f: impl FnOnce(&Tree) -> Result<T, StorageError>,
    ) -> Result<T, StorageError> {
        let _state = self.write.lock();
        f(&self.tree)
    }

    /// Records that the store joined the cluster of `epoch`, with `batch` (the meta group's
    /// bookkeeping) in the same atomic sled batch; [`Store::epoch`] returns `epoch` from then on.
    ///
    /// An `Init` (`replace` = false) of a store that already joined a cluster with another epoch
    /// keeps the first epoch (positions stay meaningful) and logs a warning; an installed
    /// snapshot (`replace` = true) is authoritative. Returns the epoch in force.
    pub(crate) fn join_cluster(
        &self,
        epoch: Epoch,
        replace: bool,
        mut batch: Ops,
    ) -> Result<Epoch, StorageError> {
        let _state = self.write.lock();
        let current = self.epoch();
        let keep = !replace && self.cluster_initialized() && current != epoch;
        if keep {
            tracing::warn!(
                %current, requested = %epoch,
                "the store already joined a cluster with another epoch; keeping it"
            );
        } else {
            batch.insert(codec::KEY_EPOCH, &epoch.0.to_be_bytes());
            batch.insert(codec::KEY_CLUSTER, &epoch.0.to_be_bytes());
        }
        self.tree.apply(batch)?;
        if keep {
            return Ok(current);
        }
        // Durable at once, not at the next checkpoint: a restart must know it is a member's
        // store (see `StorageError::ClusterMember`).
        self.flush_blocking()?;
        self.epoch.store(epoch.0, Ordering::Release);
        self.cluster.store(true, Ordering::Release);
        self.deterministic_expiry.store(true, Ordering::Release);
        if current != epoch {
            tracing::info!(dir = %self.dir.display(), %epoch, "the store joined a cluster");
        }
        Ok(epoch)
    }

    /// A point-in-time copy of `partition`, and what `read` reads in the same instant (the
    /// group's applied state), both under the write lock.
    pub(crate) fn partition_image<T>(
        &self,
        partition: Partition,
        read: impl FnOnce(&Tree) -> Result<T, StorageError>,
    ) -> Result<(PartitionImage, T), StorageError> {
        if partition >= self.partitions {
            return Err(StorageError::Internal(format!(
                "partition {partition} beyond the partition count {}",
                self.partitions
            )));
        }
        let state = self.write.lock();
        let extra = read(&self.tree)?;
        let p = usize::from(partition);
        let bytes = |b: &[u8]| Bytes::copy_from_slice(b);
        let mut records = Vec::new();
        // Every `h` record has its channel's `c` record (apply writes both; expire drops the
        // meta only once the channel has no event left).
        for kv in self.tree.scan_prefix([codec::PREFIX_CHANNEL]) {
            let (k, v) = kv?;
            let (channel, _) = codec::split_chan(&k)?;
            if partition_of(channel, self.partitions) != partition {
                continue;
            }
            records.push((bytes(&k), bytes(&v)));
            for kv in self
                .tree
                .scan_prefix(codec::chan_key(codec::PREFIX_HISTORY, channel))
            {
                let (k, v) = kv?;
                records.push((bytes(&k), bytes(&v)));
            }
        }
        // Live dedup records, with their index entries rebuilt (stale index entries and records
        // past the window of the partition's clock change nothing and stay behind).
        for kv in self.tree.scan_prefix([codec::PREFIX_DEDUP]) {
            let (k, v) = kv?;
            let (channel, _) = codec::split_chan(&k)?;
            if partition_of(channel, self.partitions) != partition {
                continue;
            }
            let rec: DedupRecord = codec::decode(&v, "dedup")?;
            if rec.at_ms.saturating_add(self.dedup_window_ms) <= state.clock[p] {
                continue;
            }
            records.push((
                Bytes::from(codec::dedup_expiry_key(rec.at_ms, &k)),
                Bytes::new(),
            ));
            records.push((bytes(&k), bytes(&v)));
        }
        let image = PartitionImage {
            partition,
            last_seq: state.last_seq[p],
            forgotten: state.forgotten[p],
            clock: state.clock[p],
            records,
        };
        Ok((image, extra))
    }

    /// Replaces everything of `image.partition` with the image, and writes `batch` (the
    /// group's Raft bookkeeping), in ONE atomic sled batch; then updates the in-memory counters
    /// ([`Store::latest_seq`], the forgotten floor, the applied clock, [`Store::channel_stats`]).
    pub(crate) fn install_partition_image(
        &self,
        image: PartitionImage,
        batch: Ops,
    ) -> Result<(), StorageError> {
        let partition = image.partition;
        if partition >= self.partitions {
            return Err(StorageError::Corrupt(format!(
                "snapshot of partition {partition}, the store has {} partitions",
                self.partitions
            )));
        }
        let (mut new_channels, mut new_events) = (0u64, 0u64);
        for (k, v) in &image.records {
            let channel = codec::record_channel(k)?;
            if partition_of(channel, self.partitions) != partition {
                return Err(StorageError::Corrupt(format!(
                    "snapshot of partition {partition} holds a record of another partition"
                )));
            }
            if k[0] == codec::PREFIX_CHANNEL {
                count_meta(v, &mut new_channels, &mut new_events)?;
            }
        }

        let mut state = self.write.lock();
        // The partition's history is replaced wholesale.
        state.chunks = ChunkIndex::default();
        // `batch` holds the group's own (`r`) keys only, which no partition record shares.
        let mut ops = batch;
        let (mut old_channels, mut old_events) = (0u64, 0u64);
        for kv in self.tree.scan_prefix([codec::PREFIX_CHANNEL]) {
            let (k, v) = kv?;
            let (channel, _) = codec::split_chan(&k)?;
            if partition_of(channel, self.partitions) != partition {
                continue;
            }
            count_meta(&v, &mut old_channels, &mut old_events)?;
            for key in self
                .tree
                .scan_prefix(codec::chan_key(codec::PREFIX_HISTORY, channel))
                .keys()
            {
                ops.remove(key?);
            }
            ops.remove(k);
        }
        for prefix in [codec::PREFIX_DEDUP, codec::PREFIX_DEDUP_EXPIRY] {
            for key in self.tree.scan_prefix([prefix]).keys() {
                let key = key?;
                if partition_of(codec::record_channel(&key)?, self.partitions) == partition {
                    ops.remove(key);
                }
            }
        }
        // A batch is a map: the image's records replace the removals of the same keys.
        for (k, v) in image.records {
            ops.insert(&k[..], &v[..]);
        }
        for (prefix, value) in [
            (codec::PREFIX_LAST_SEQ, image.last_seq),
            (codec::PREFIX_FORGOTTEN, image.forgotten),
            (codec::PREFIX_CLOCK, image.clock),
        ] {
            ops.insert(
                codec::partition_key(prefix, partition),
                &value.to_be_bytes(),
            );
        }
        self.tree.apply(ops)?;

        let p = usize::from(partition);
        state.last_seq[p] = image.last_seq;
        state.forgotten[p] = image.forgotten;
        state.clock[p] = image.clock;
        self.latest[p].store(image.last_seq, Ordering::Release);
        self.forgotten[p].store(image.forgotten, Ordering::Release);
        self.clock[p].store(image.clock, Ordering::Release);
        add(
            &self.stat_channels,
            new_channels as i64 - old_channels as i64,
        );
        add(&self.stat_events, new_events as i64 - old_events as i64);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::namespace::NamespaceConfig;
    use crate::testutil::TempDir;
    use proptest::prelude::*;

    const T0: u64 = 1_700_000_000_000;

    fn opts(partitions: u16) -> StoreOptions {
        StoreOptions {
            partitions,
            dedup_window: Duration::from_secs(60),
            cache_capacity: 8 << 20,
        }
    }

    fn ns(history_size: usize, ttl: Option<Duration>) -> Namespaces {
        Namespaces::new(NamespaceConfig {
            history_size,
            history_ttl: ttl,
            durable: true,
        })
    }

    fn publish(ch: &str, payload: &str) -> Publish {
        Publish::new(ch.to_string(), payload.to_string())
    }

    fn new_event(a: &Applied) -> &Event {
        match a {
            Applied::New(e) => e,
            Applied::Duplicate(p) => panic!("unexpected duplicate of {p}"),
        }
    }

    fn payloads(events: &[Event]) -> Vec<String> {
        events
            .iter()
            .map(|e| String::from_utf8(e.payload.to_vec()).unwrap())
            .collect()
    }

    #[test]
    fn seqs_are_contiguous_per_partition_and_survive_reopen() {
        let dir = TempDir::new("reopen");
        let namespaces = ns(100, None);
        let (epoch, last) = {
            let store = Store::open(dir.path(), opts(4)).unwrap();
            assert_eq!(store.partitions(), 4);
            let batch: Vec<Publish> = (0..40)
                .map(|i| publish(&format!("ch{}", i % 7), &i.to_string()))
                .collect();
            let applied = store.apply(&batch, &namespaces, T0).unwrap();
            let mut per_partition: BTreeMap<Partition, Vec<u64>> = BTreeMap::new();
            for a in &applied {
                let e = new_event(a);
                assert_eq!(e.position.partition, store.partition_of(&e.channel));
                per_partition
                    .entry(e.position.partition)
                    .or_default()
                    .push(e.position.seq);
            }
            for (p, seqs) in &per_partition {
                assert_eq!(seqs, &(1..=seqs.len() as u64).collect::<Vec<_>>());
                assert_eq!(store.latest_seq(*p), seqs.len() as u64);
            }
            assert_eq!(store.latest_seq(99), 0);
            store.flush_blocking().unwrap();
            let last: Vec<u64> = (0..4).map(|p| store.latest_seq(p)).collect();
            (store.epoch(), last)
        };
        let store = Store::open(dir.path(), opts(4)).unwrap();
        assert_eq!(store.epoch(), epoch);
        assert_eq!(
            (0..4).map(|p| store.latest_seq(p)).collect::<Vec<_>>(),
            last
        );
        let a = store
            .apply(&[publish("ch0", "after")], &namespaces, T0 + 1)
            .unwrap();
        let p = store.partition_of(b"ch0");
        assert_eq!(a[0].position(), Position::new(p, last[usize::from(p)] + 1));
        assert_eq!(
            store.channel_stats(),
            ChannelStats {
                channels: 7,
                events: 41
            }
        );
        let h = store.history_after_at(b"ch0", None, 100, T0).unwrap();
        assert_eq!(
            payloads(&h),
            vec!["0", "7", "14", "21", "28", "35", "after"]
        );
    }

    #[test]
    fn partitions_mismatch_names_both_numbers() {
        let dir = TempDir::new("mismatch");
        drop(Store::open(dir.path(), opts(16)).unwrap());
        let err = Store::open(dir.path(), opts(8)).unwrap_err();
        assert!(matches!(
            err,
            StorageError::PartitionsMismatch {
                stored: 16,
                requested: 8,
                ..
            }
        ));
        let msg = err.to_string();
        assert!(
            msg.contains("16 partitions") && msg.contains("8 were requested"),
            "{msg}"
        );
        let err = Store::open(dir.path(), opts(0)).unwrap_err();
        assert!(matches!(err, StorageError::InvalidOptions(_)), "{err}");
    }

    #[test]
    fn a_store_keeps_the_node_id_it_was_first_claimed_as() {
        let dir = TempDir::new("node-id");
        {
            // A store from before the record (or a single node's): the first claim records.
            let store = Store::open(dir.path(), opts(4)).unwrap();
            store.claim_node_id(3).unwrap();
            store.claim_node_id(3).unwrap();
        }
        let store = Store::open(dir.path(), opts(4)).unwrap();
        store.claim_node_id(3).unwrap();
        let err = store.claim_node_id(2).unwrap_err();
        assert!(
            matches!(
                err,
                StorageError::NodeIdMismatch {
                    stored: 3,
                    requested: 2,
                    ..
                }
            ),
            "{err}"
        );
        let msg = err.to_string();
        assert!(
            msg.starts_with(&format!(
                "store in {} belongs to node 3, not node 2: ",
                dir.path().display()
            )) && msg.contains("--node-id 3")
                && !msg.contains('\n'),
            "{msg}"
        );
        store.claim_node_id(3).unwrap();
    }

    #[test]
    fn retention_by_count() {
        let dir = TempDir::new("count");
        let store = Store::open(dir.path(), opts(1)).unwrap();
        let namespaces = ns(3, None);
        for i in 1..=5 {
            store
                .apply(&[publish("c", &i.to_string())], &namespaces, T0)
                .unwrap();
        }
        let h = store.history_after_at(b"c", None, 10, T0).unwrap();
        assert_eq!(payloads(&h), vec!["3", "4", "5"]);
        assert_eq!(
            h.iter().map(|e| e.position.seq).collect::<Vec<_>>(),
            vec![3, 4, 5]
        );
        assert_eq!(store.retention_floor_at(b"c", T0).unwrap(), 2);
        assert_eq!(
            store.oldest_at(b"c", T0).unwrap(),
            Some(Position::new(0, 3))
        );
        assert_eq!(
            payloads(&store.last_at(b"c", 2, T0).unwrap()),
            vec!["4", "5"]
        );
        assert_eq!(
            payloads(&store.last_at(b"c", 10, T0).unwrap()),
            vec!["3", "4", "5"]
        );
        assert_eq!(
            payloads(&store.history_after_at(b"c", Some(3), 10, T0).unwrap()),
            vec!["4", "5"]
        );
        assert_eq!(
            payloads(&store.history_after_at(b"c", Some(3), 1, T0).unwrap()),
            vec!["4"]
        );
        assert!(
            store
                .history_after_at(b"c", Some(5), 10, T0)
                .unwrap()
                .is_empty()
        );
        assert!(
            store
                .history_after_at(b"c", Some(u64::MAX), 10, T0)
                .unwrap()
                .is_empty()
        );
        assert!(
            store
                .history_after_at(b"c", None, 0, T0)
                .unwrap()
                .is_empty()
        );
        assert_eq!(
            store.channel_stats(),
            ChannelStats {
                channels: 1,
                events: 3
            }
        );

        // One batch bigger than the history: only its newest survive, seqs still advance.
        let batch: Vec<Publish> = (6..=12).map(|i| publish("c", &i.to_string())).collect();
        let applied = store.apply(&batch, &namespaces, T0).unwrap();
        assert_eq!(applied.len(), 7);
        assert_eq!(applied[6].position(), Position::new(0, 12));
        assert_eq!(
            payloads(&store.history_after_at(b"c", None, 10, T0).unwrap()),
            vec!["10", "11", "12"]
        );
        assert_eq!(store.retention_floor_at(b"c", T0).unwrap(), 9);
        assert_eq!(
            store.channel_stats(),
            ChannelStats {
                channels: 1,
                events: 3
            }
        );

        // A channel of another name sharing a prefix is separate.
        store.apply(&[publish("cc", "x")], &namespaces, T0).unwrap();
        assert_eq!(
            payloads(&store.history_after_at(b"c", None, 10, T0).unwrap()),
            vec!["10", "11", "12"]
        );
        assert_eq!(store.retention_floor_at(b"cc", T0).unwrap(), 0);
        assert!(
            store
                .history_after_at(b"nope", None, 10, T0)
                .unwrap()
                .is_empty()
        );
        assert_eq!(store.oldest_at(b"nope", T0).unwrap(), None);
    }

    #[test]
    fn history_size_zero_still_sequences() {
        let dir = TempDir::new("zero");
        let store = Store::open(dir.path(), opts(1)).unwrap();
        let namespaces = ns(100, None).with(
            "live",
            NamespaceConfig {
                history_size: 0,
                history_ttl: None,
                durable: true,
            },
        );
        let a = store
            .apply(
                &[
                    publish("live:1", "a"),
                    publish("kept", "b"),
                    publish("live:1", "c"),
                ],
                &namespaces,
                T0,
            )
            .unwrap();
        assert_eq!(
            a.iter()
                .map(Applied::position)
                .map(|p| p.seq)
                .collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        assert!(
            store
                .history_after_at(b"live:1", None, 10, T0)
                .unwrap()
                .is_empty()
        );
        // Nothing is kept, and the loss floor says so: a cursor before seq 3 missed events.
        assert_eq!(store.retention_floor_at(b"live:1", T0).unwrap(), 3);
        assert_eq!(store.oldest_at(b"live:1", T0).unwrap(), None);
        assert_eq!(
            store.channel_stats(),
            ChannelStats {
                channels: 1,
                events: 1
            }
        );
    }

    #[test]
    fn retention_by_ttl_and_expire() {
        let dir = TempDir::new("ttl");
        let store = Store::open(dir.path(), opts(2)).unwrap();
        let namespaces = ns(100, Some(Duration::from_secs(10)));
        store
            .apply(&[publish("a", "1"), publish("b", "1")], &namespaces, T0)
            .unwrap();
        store
            .apply(&[publish("a", "2")], &namespaces, T0 + 5_000)
            .unwrap();

        assert_eq!(
            payloads(&store.history_after_at(b"a", None, 10, T0 + 9_999).unwrap()),
            vec!["1", "2"]
        );
        // At T0 + 10 s the first events are expired for readers, before expire runs.
        let h = store.history_after_at(b"a", None, 10, T0 + 10_000).unwrap();
        assert_eq!(payloads(&h), vec!["2"]);
        let floor = store.retention_floor_at(b"a", T0 + 10_000).unwrap();
        assert_eq!(
            floor,
            store.history_after_at(b"a", None, 1, T0).unwrap()[0]
                .position
                .seq
        );
        assert_eq!(
            store.oldest_at(b"a", T0 + 10_000).unwrap(),
            Some(h[0].position)
        );
        assert_eq!(
            payloads(&store.last_at(b"a", 5, T0 + 10_000).unwrap()),
            vec!["2"]
        );
        assert!(
            store
                .history_after_at(b"b", None, 10, T0 + 10_000)
                .unwrap()
                .is_empty()
        );
        // The system-clock forms see everything (T0 is long gone) as expired.
        assert!(store.history_after(b"a", None, 10).unwrap().is_empty());
        assert_eq!(store.oldest(b"a").unwrap(), None);

        assert_eq!(
            store.channel_stats(),
            ChannelStats {
                channels: 2,
                events: 3
            }
        );
        assert_eq!(store.expire(&namespaces, T0 + 9_999).unwrap(), 0);
        assert_eq!(store.expire(&namespaces, T0 + 10_000).unwrap(), 2);
        assert_eq!(
            store.channel_stats(),
            ChannelStats {
                channels: 1,
                events: 1
            }
        );
        assert_eq!(store.expire(&namespaces, T0 + 10_000).unwrap(), 0);
        // b's bookkeeping is gone; its loss floor lives on as its partition's forgotten floor.
        let pb = store.partition_of(b"b");
        assert!(store.retention_floor_at(b"b", T0 + 10_000).unwrap() >= 1);
        let floor_b = store.retention_floor_at(b"b", T0 + 10_000).unwrap();
        // A new event on b starts with that floor, so an old cursor still sees the gap.
        store
            .apply(&[publish("b", "2")], &namespaces, T0 + 11_000)
            .unwrap();
        assert_eq!(
            store.retention_floor_at(b"b", T0 + 11_000).unwrap(),
            floor_b
        );
        assert_eq!(store.expire(&namespaces, T0 + 20_000).unwrap(), 1);
        assert_eq!(store.expire(&namespaces, T0 + 22_000).unwrap(), 1);
        assert_eq!(store.channel_stats(), ChannelStats::default());
        assert!(store.latest_seq(pb) >= 2);
        drop(store);

        // The forgotten floors and stats survive a reopen.
        let store = Store::open(dir.path(), opts(2)).unwrap();
        assert_eq!(store.channel_stats(), ChannelStats::default());
        assert!(store.retention_floor_at(b"b", T0).unwrap() >= floor_b);
    }

    /// A read tells what it passed over as gone: expired chunks expiry has not removed yet
    /// count as removed, from the moment they expire, and so does what expiry removed.
    #[test]
    fn a_history_read_tells_what_it_found_expired_or_removed() {
        let dir = TempDir::new("ttl-read");
        let store = Store::open(dir.path(), opts(1)).unwrap();
        let namespaces = ns(100, Some(Duration::from_secs(10)));
        // Seqs 1-2 expire at T0 + 10 s, 3 at T0 + 15 s.
        store
            .apply(&[publish("a", "1"), publish("a", "2")], &namespaces, T0)
            .unwrap();
        store
            .apply(&[publish("a", "3")], &namespaces, T0 + 5_000)
            .unwrap();
        let read = |after: Option<u64>, limit: usize, now: u64| {
            let read = store.history_read_at(b"a", after, limit, now).unwrap();
            assert_eq!(
                read.events,
                store.history_after_at(b"a", after, limit, now).unwrap()
            );
            (payloads(&read.events), read.gone_through)
        };
        assert_eq!(
            read(Some(0), 10, T0 + 9_999),
            (vec!["1".into(), "2".into(), "3".into()], 0)
        );
        // Expired, not removed: the read skips seqs 1-2 and says so.
        assert_eq!(read(Some(0), 10, T0 + 10_000), (vec!["3".to_string()], 2));
        assert_eq!(read(None, 10, T0 + 10_000), (vec!["3".to_string()], 2));
        // Behind the read's start they are not looked at (no loss for that reader).
        assert_eq!(read(Some(2), 10, T0 + 10_000), (vec!["3".to_string()], 0));
        assert_eq!(read(Some(0), 10, T0 + 15_000), (vec![], 3));
        // Once expiry removed them, the channel's floor says the same.
        assert_eq!(store.expire(&namespaces, T0 + 10_000).unwrap(), 2);
        assert_eq!(read(Some(0), 10, T0 + 10_000), (vec!["3".to_string()], 2));
        assert_eq!(store.expire(&namespaces, T0 + 15_000).unwrap(), 1);
        // The channel lost its bookkeeping: its partition's forgotten floor is told.
        assert_eq!(read(Some(0), 10, T0 + 15_000), (vec![], 3));
        assert_eq!(read(Some(0), 0, T0 + 15_000), (vec![], 3));
    }

    #[test]
    fn expire_applies_a_lowered_history_size() {
        let dir = TempDir::new("lowered");
        let store = Store::open(dir.path(), opts(1)).unwrap();
        let batch: Vec<Publish> = (1..=10).map(|i| publish("job:1", &i.to_string())).collect();
        store.apply(&batch, &ns(10, None), T0).unwrap();
        store
            .apply(&[publish("other", "x")], &ns(10, None), T0)
            .unwrap();
        let lowered = ns(10, None).with(
            "job",
            NamespaceConfig {
                history_size: 4,
                history_ttl: None,
                durable: true,
            },
        );
        assert_eq!(store.expire(&lowered, T0).unwrap(), 6);
        assert_eq!(
            payloads(&store.history_after_at(b"job:1", None, 100, T0).unwrap()),
            vec!["7", "8", "9", "10"]
        );
        assert_eq!(store.retention_floor_at(b"job:1", T0).unwrap(), 6);
        let off = lowered.with(
            "job",
            NamespaceConfig {
                history_size: 0,
                history_ttl: None,
                durable: true,
            },
        );
        assert_eq!(store.expire(&off, T0).unwrap(), 4);
        assert_eq!(
            store.channel_stats(),
            ChannelStats {
                channels: 1,
                events: 1
            }
        );
    }

    /// The seqs of every stored chunk of `channel`, oldest first.
    fn stored_chunks(store: &Store, channel: &[u8]) -> Vec<Vec<u64>> {
        store
            .tree
            .scan_prefix(codec::chan_key(codec::PREFIX_HISTORY, channel))
            .values()
            .map(|v| {
                codec::decode::<ChunkHead>(&v.unwrap(), "chunk")
                    .unwrap()
                    .seqs
            })
            .collect()
    }

    /// Apply trims through its chunk index. Expiry deletes chunks behind it (entries the index
    /// still has are skipped: all their events are below the floor); the next trims are right.
    #[test]
    fn apply_trims_correctly_after_expiry_deleted_chunks() {
        let dir = TempDir::new("index");
        let store = Store::open(dir.path(), opts(1)).unwrap();
        let three = ns(3, None);
        let mut n = 0;
        let mut apply = |count: usize, namespaces: &Namespaces| {
            let batch: Vec<Publish> = (0..count)
                .map(|_| {
                    n += 1;
                    publish("job:1", &n.to_string())
                })
                .collect();
            store.apply(&batch, namespaces, T0).unwrap();
        };
        // One chunk per batch; the trims from the fourth on index the channel.
        for _ in 0..5 {
            apply(1, &three);
        }
        assert_eq!(
            stored_chunks(&store, b"job:1"),
            vec![vec![3], vec![4], vec![5]]
        );
        let one = ns(3, None).with(
            "job",
            NamespaceConfig {
                history_size: 1,
                history_ttl: None,
                durable: true,
            },
        );
        assert_eq!(store.expire(&one, T0).unwrap(), 2);
        assert_eq!(stored_chunks(&store, b"job:1"), vec![vec![5]]);
        apply(2, &three);
        apply(1, &three);
        assert_eq!(
            payloads(&store.history_after_at(b"job:1", None, 100, T0).unwrap()),
            vec!["6", "7", "8"]
        );
        assert_eq!(store.retention_floor_at(b"job:1", T0).unwrap(), 5);
        // Every stored chunk holds a retained event: none leaked.
        assert_eq!(stored_chunks(&store, b"job:1"), vec![vec![6, 7], vec![8]]);
        assert_eq!(store.channel_stats().events, 3);
    }

    /// A snapshot install replaces a partition's chunks: the index must start over, or the
    /// next trim would go by the chunks the store had before.
    #[test]
    fn apply_trims_correctly_after_a_snapshot_install() {
        let two = ns(2, None);
        let apply = |store: &Store, payloads: &[&str]| {
            let batch: Vec<Publish> = payloads.iter().map(|p| publish("job:1", p)).collect();
            store.apply(&batch, &two, T0).unwrap();
        };
        // The source: chunks [1, 2] and [3, 4]. The target: one chunk per event, indexed.
        let (dir_a, dir_b) = (TempDir::new("install-a"), TempDir::new("install-b"));
        let (source, target) = (
            Store::open(dir_a.path(), opts(1)).unwrap(),
            Store::open(dir_b.path(), opts(1)).unwrap(),
        );
        apply(&source, &["s1", "s2"]);
        apply(&source, &["s3", "s4"]);
        for p in ["t1", "t2", "t3", "t4"] {
            apply(&target, &[p]);
        }
        assert_eq!(stored_chunks(&target, b"job:1"), vec![vec![3], vec![4]]);
        let (image, ()) = source.partition_image(0, |_| Ok(())).unwrap();
        target
            .install_partition_image(image, Ops::default())
            .unwrap();
        assert_eq!(stored_chunks(&target, b"job:1"), vec![vec![3, 4]]);
        apply(&source, &["5"]);
        apply(&target, &["5"]);
        for store in [&source, &target] {
            assert_eq!(
                payloads(&store.history_after_at(b"job:1", None, 100, T0).unwrap()),
                vec!["s4", "5"]
            );
            assert_eq!(stored_chunks(store, b"job:1"), vec![vec![3, 4], vec![5]]);
        }
    }

    #[test]
    fn dedup_within_the_window() {
        let dir = TempDir::new("dedup");
        let store = Store::open(dir.path(), opts(4)).unwrap();
        let namespaces = ns(100, None);
        let first = store
            .apply(&[publish("c", "a").with_id("m1")], &namespaces, T0)
            .unwrap();
        let pos = first[0].position();

        // Retry in a later batch, twice in one batch, and a different channel with the same id.
        let again = store
            .apply(
                &[
                    publish("c", "a-retry").with_id("m1"),
                    publish("c", "b").with_id("m2"),
                    publish("c", "b-retry").with_id("m2"),
                    publish("d", "a").with_id("m1"),
                    publish("c", "no-id"),
                ],
                &namespaces,
                T0 + 59_999,
            )
            .unwrap();
        assert_eq!(again[0], Applied::Duplicate(pos));
        assert!(!again[1].is_duplicate());
        assert_eq!(again[2], Applied::Duplicate(again[1].position()));
        assert!(!again[3].is_duplicate());
        assert!(!again[4].is_duplicate());
        let h = store.history_after_at(b"c", None, 10, T0).unwrap();
        assert_eq!(payloads(&h), vec!["a", "b", "no-id"]);
        assert_eq!(h[0].message_id.as_deref(), Some(&b"m1"[..]));
        assert_eq!(h[2].message_id, None);

        // Past the window the id is new again, even before expire ran.
        let late = store
            .apply(
                &[publish("c", "late").with_id("m1")],
                &namespaces,
                T0 + 60_000,
            )
            .unwrap();
        assert!(!late[0].is_duplicate());
        assert_ne!(late[0].position(), pos);
        // Expire drops m1's stale index entry (not counted) but keeps the refreshed record.
        assert_eq!(store.expire(&namespaces, T0 + 60_000).unwrap(), 0);
        let retry = store
            .apply(&[publish("c", "x").with_id("m1")], &namespaces, T0 + 60_001)
            .unwrap();
        assert_eq!(retry[0], Applied::Duplicate(late[0].position()));
        // m2 and d/m1 (recorded at T0 + 59_999) go one window later, m1 (T0 + 60_000) after that.
        assert_eq!(store.expire(&namespaces, T0 + 119_999).unwrap(), 2);
        assert_eq!(store.expire(&namespaces, T0 + 120_000).unwrap(), 1);
        assert_eq!(store.expire(&namespaces, T0 + 1_000_000).unwrap(), 0);
        let fresh = store
            .apply(
                &[publish("c", "y").with_id("m1")],
                &namespaces,
                T0 + 120_001,
            )
            .unwrap();
        assert!(!fresh[0].is_duplicate());
    }

    /// The keys of `channel`'s history chunks, i.e. their first seqs.
    fn chunk_starts(store: &Store, channel: &str) -> Vec<u64> {
        store
            .tree
            .scan_prefix(codec::chan_key(codec::PREFIX_HISTORY, channel.as_bytes()))
            .keys()
            .map(|k| {
                let k = k.unwrap();
                u64::from_be_bytes(k[k.len() - 8..].try_into().unwrap())
            })
            .collect()
    }

    #[test]
    fn history_chunks_split_trim_partially_and_go_when_empty() {
        let dir = TempDir::new("chunks");
        let store = Store::open(dir.path(), opts(1)).unwrap();
        let namespaces = ns(200, None);
        let seqs = |events: &[Event]| events.iter().map(|e| e.position.seq).collect::<Vec<_>>();

        // 300 in one batch: the oldest 100 are never written, the rest fill a full chunk and
        // part of a second.
        let batch: Vec<Publish> = (1..=300).map(|i| publish("c", &i.to_string())).collect();
        store.apply(&batch, &namespaces, T0).unwrap();
        assert_eq!(
            chunk_starts(&store, "c"),
            vec![101, 101 + CHUNK_EVENTS as u64]
        );
        let all = store.history_after_at(b"c", None, 1000, T0).unwrap();
        assert_eq!(seqs(&all), (101..=300).collect::<Vec<_>>());
        assert_eq!(store.retention_floor_at(b"c", T0).unwrap(), 100);

        // 50 more: the first chunk loses its oldest 50 but stays, hiding them.
        let batch: Vec<Publish> = (301..=350).map(|i| publish("c", &i.to_string())).collect();
        store.apply(&batch, &namespaces, T0).unwrap();
        assert_eq!(chunk_starts(&store, "c"), vec![101, 229, 301]);
        let all = store.history_after_at(b"c", None, 1000, T0).unwrap();
        assert_eq!(seqs(&all), (151..=350).collect::<Vec<_>>());
        assert_eq!(payloads(&all[..1]), vec!["151"]);
        assert_eq!(
            seqs(&store.last_at(b"c", 3, T0).unwrap()),
            vec![348, 349, 350]
        );
        assert_eq!(
            store.oldest_at(b"c", T0).unwrap(),
            Some(Position::new(0, 151))
        );
        assert_eq!(store.retention_floor_at(b"c", T0).unwrap(), 150);
        assert_eq!(
            seqs(&store.history_after_at(b"c", Some(120), 2, T0).unwrap()),
            vec![151, 152]
        );
        assert_eq!(
            seqs(&store.history_after_at(b"c", Some(240), 2, T0).unwrap()),
            vec![241, 242]
        );

        // Payloads beyond the chunk byte limit start chunks of their own.
        let big = "x".repeat(CHUNK_BYTES);
        let batch = vec![
            publish("c", "small"),
            publish("c", &big),
            publish("c", "after"),
        ];
        store.apply(&batch, &namespaces, T0).unwrap();
        assert_eq!(
            chunk_starts(&store, "c"),
            vec![101, 229, 301, 351, 352, 353]
        );
        let last = store.last_at(b"c", 3, T0).unwrap();
        assert_eq!(last[1].payload.len(), CHUNK_BYTES);
        assert_eq!(payloads(&last[2..]), vec!["after"]);

        // A lowered history size: expire deletes the chunks left without a retained event.
        let deleted = store.expire(&ns(2, None), T0).unwrap();
        assert_eq!(deleted, 198);
        assert_eq!(chunk_starts(&store, "c"), vec![352, 353]);
        assert_eq!(
            seqs(&store.history_after_at(b"c", None, 10, T0).unwrap()),
            vec![352, 353]
        );
        assert_eq!(store.retention_floor_at(b"c", T0).unwrap(), 351);
        assert_eq!(
            store.channel_stats(),
            ChannelStats {
                channels: 1,
                events: 2
            }
        );
    }

    #[test]
    fn flush_syncs_the_blob_files_sled_writes_for_big_records() {
        let dir = TempDir::new("blobs");
        let store = Store::open(dir.path(), opts(1)).unwrap();
        let big = "b".repeat(300 << 10);
        store
            .apply(&[publish("c", &big)], &ns(10, None), T0)
            .unwrap();
        store.flush_blocking().unwrap();
        let on_disk: Vec<_> = std::fs::read_dir(dir.path().join("blobs"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(!on_disk.is_empty(), "sled wrote the 300 KiB record inline");
        assert!(on_disk.iter().all(|name| store.disk.was_synced(name)));
        let h = store.history_after_at(b"c", None, 10, T0).unwrap();
        assert_eq!(h[0].payload.len(), 300 << 10);
    }

    #[test]
    fn the_store_id_lasts_and_peer_store_ids_are_kept_until_forgotten() {
        let dir = TempDir::new("store-id");
        let (id, other) = {
            let store = Store::open(dir.path(), opts(4)).unwrap();
            store.set_peer_store_id(2, Some(22)).unwrap();
            store.set_peer_store_id(3, Some(33)).unwrap();
            store.set_peer_store_id(3, None).unwrap();
            let other = Store::open(TempDir::new("store-id-other").path(), opts(4)).unwrap();
            (store.store_id(), other.store_id())
        };
        assert_ne!(id, other, "every store gets its own id");
        let store = Store::open(dir.path(), opts(4)).unwrap();
        assert_eq!(store.store_id(), id, "kept across restarts");
        assert_eq!(store.peer_store_id(2).unwrap(), Some(22));
        assert_eq!(store.peer_store_id(3).unwrap(), None);
        assert_eq!(store.peer_store_ids().unwrap(), vec![(2, 22)]);
        // A membership without node 2 forgets it, and says so through the generation.
        store.set_peer_store_id(4, Some(44)).unwrap();
        let before = store.peer_store_generation();
        store
            .forget_peer_store_ids_except(&[1, 2, 4].into_iter().collect())
            .unwrap();
        assert_eq!(store.peer_store_generation(), before, "nothing to forget");
        store
            .forget_peer_store_ids_except(&[1, 4].into_iter().collect())
            .unwrap();
        assert_eq!(store.peer_store_ids().unwrap(), vec![(4, 44)]);
        assert_eq!(store.peer_store_generation(), before + 1);
    }

    /// A pass over many channels none of which expires still lets applies in between every
    /// [`EXPIRE_YIELD_EVERY`] channels, instead of holding the writer lock for the whole scan.
    #[test]
    fn expire_lets_applies_in_while_it_scans_channels_with_nothing_to_delete() {
        let dir = TempDir::new("expire-yields");
        let store = Store::open(dir.path(), opts(4)).unwrap();
        let namespaces = ns(100, Some(Duration::from_secs(3600)));
        let channels = 5 * EXPIRE_YIELD_EVERY;
        let batch: Vec<Publish> = (0..channels)
            .map(|i| publish(&format!("job:{i}"), "x"))
            .collect();
        store.apply(&batch, &namespaces, T0).unwrap();
        store.flush_blocking().unwrap();
        assert_eq!(store.expire(&namespaces, T0 + 1_000).unwrap(), 0);
        assert!(
            store.expire_yields.load(Ordering::Relaxed) >= (channels / EXPIRE_YIELD_EVERY) as u64,
            "yielded {} times over {channels} channels",
            store.expire_yields.load(Ordering::Relaxed)
        );
        assert_eq!(store.channel_stats().events, channels as u64);
    }

    #[test]
    fn expire_works_in_chunks() {
        let dir = TempDir::new("chunks");
        let store = Store::open(dir.path(), opts(4)).unwrap();
        let namespaces = ns(100_000, Some(Duration::from_secs(1)));
        let batch: Vec<Publish> = (0..12_000)
            .map(|i| publish(&format!("ch{}", i % 700), "x").with_id(format!("{i}")))
            .collect();
        store.apply(&batch, &namespaces, T0).unwrap();
        assert_eq!(
            store.channel_stats(),
            ChannelStats {
                channels: 700,
                events: 12_000
            }
        );
        // Events expire after 1 s, message ids after the 60 s window.
        assert_eq!(store.expire(&namespaces, T0 + 1_000).unwrap(), 12_000);
        assert_eq!(store.channel_stats(), ChannelStats::default());
        assert!(store.apply(&batch[..1], &namespaces, T0 + 2_000).unwrap()[0].is_duplicate());
        assert_eq!(store.expire(&namespaces, T0 + 60_000).unwrap(), 12_000);
        assert!(!store.apply(&batch[..1], &namespaces, T0 + 60_000).unwrap()[0].is_duplicate());
        // Left: 4 store meta keys (version, epoch, partitions, store id), 4 last seqs, 4
        // forgotten floors, 4 applied clocks, and the last publish's history, channel meta,
        // dedup record and dedup index entry.
        assert_eq!(store.tree.len(), 4 + 4 + 4 + 4 + 4);
    }

    #[test]
    fn the_applied_clock_never_runs_backwards_and_survives_reopen() {
        let dir = TempDir::new("clock");
        let namespaces = ns(100, None);
        {
            let store = Store::open(dir.path(), opts(4)).unwrap();
            let p = store.partition_of(b"c");
            assert_eq!(store.applied_clock(p), 0);
            store
                .apply(&[publish("c", "a").with_id("m")], &namespaces, T0 + 10)
                .unwrap();
            assert_eq!(store.applied_clock(p), T0 + 10);
            // A clock stepped back: the partition keeps its own, the id is still in its window.
            let a = store
                .apply(
                    &[publish("c", "b").with_id("m"), publish("c", "c")],
                    &namespaces,
                    T0,
                )
                .unwrap();
            assert!(a[0].is_duplicate());
            assert_eq!(new_event(&a[1]).timestamp_ms, T0 + 10);
            assert_eq!(store.applied_clock(p), T0 + 10);
            // A tick moves an idle partition's clock.
            let q = (p + 1) % 4;
            store
                .apply_with(&[], &namespaces, T0 + 20, Some(q), Ops::default())
                .unwrap();
            assert_eq!(store.applied_clock(q), T0 + 20);
        }
        let store = Store::open(dir.path(), opts(4)).unwrap();
        let p = store.partition_of(b"c");
        assert_eq!(store.applied_clock(p), T0 + 10);
        assert_eq!(store.applied_clock((p + 1) % 4), T0 + 20);
    }

    #[test]
    fn deterministic_dedup_expiry_waits_for_the_partition_clock() {
        let dir = TempDir::new("det-expiry");
        let store = Store::open(dir.path(), opts(4)).unwrap();
        store.enable_deterministic_expiry();
        let namespaces = ns(100, None);
        let p = store.partition_of(b"c");
        let other = (0..100)
            .map(|i| format!("o{i}"))
            .find(|c| store.partition_of(c.as_bytes()) != p)
            .unwrap();
        store
            .apply(&[publish("c", "a").with_id("m")], &namespaces, T0)
            .unwrap();
        // Another partition's clock moving on does not expire p's ids.
        store
            .apply(&[publish(&other, "x")], &namespaces, T0 + 600_000)
            .unwrap();
        assert_eq!(store.expire(&namespaces, T0 + 600_000).unwrap(), 0);
        store
            .apply(&[publish("c", "b")], &namespaces, T0 + 59_999)
            .unwrap();
        assert_eq!(store.expire(&namespaces, T0 + 600_000).unwrap(), 0);
        store
            .apply(&[publish("c", "b")], &namespaces, T0 + 60_000)
            .unwrap();
        // Nor does a partition clock ahead of the local one.
        assert_eq!(store.expire(&namespaces, T0 + 59_999).unwrap(), 0);
        assert_eq!(store.expire(&namespaces, T0 + 60_000).unwrap(), 1);
    }

    #[test]
    fn a_write_that_fails_half_way_breaks_the_store_until_it_reopens() {
        let dir = TempDir::new("broken");
        let namespaces = ns(100, None);
        let store = Store::open(dir.path(), opts(4)).unwrap();
        assert!(!store.is_broken());
        let failed = store.apply_writing(
            &[publish("c", "a")],
            &namespaces,
            T0,
            None,
            Ops::default(),
            |_| Err(StorageError::Internal("disk full".into())),
        );
        assert!(failed.is_err());
        assert!(store.is_broken());
        let refused = store
            .apply(&[publish("c", "b")], &namespaces, T0)
            .unwrap_err();
        assert!(
            refused.to_string().contains("restart the node"),
            "{refused}"
        );
        drop(store);
        let store = Store::open(dir.path(), opts(4)).unwrap();
        assert!(!store.is_broken());
        store.apply(&[publish("c", "b")], &namespaces, T0).unwrap();
    }

    #[test]
    fn sled_io_errors_read_as_the_system_message() {
        let error = StorageError::from(sled::Error::Io(std::io::Error::from_raw_os_error(28)));
        assert_eq!(
            error.to_string(),
            "storage failed: I/O error: No space left on device (os error 28)"
        );
        // sled's clone of a stored flush error, as every caller after the first gets it.
        let original = std::io::Error::from_raw_os_error(27);
        let cloned = std::io::Error::new(original.kind(), format!("{original:?}"));
        assert_eq!(
            StorageError::from(sled::Error::Io(cloned)).to_string(),
            "storage failed: I/O error: File too large (os error 27)"
        );
        let once = std::io::Error::new(original.kind(), format!("{original:?}"));
        let twice = std::io::Error::new(once.kind(), format!("{once:?}"));
        assert_eq!(
            StorageError::from(sled::Error::Io(twice)).to_string(),
            "storage failed: I/O error: File too large (os error 27)"
        );
        let other = std::io::Error::other("disk on fire");
        assert_eq!(
            StorageError::from(sled::Error::Io(other)).to_string(),
            "storage failed: I/O error: disk on fire"
        );
        // A clone of an error of our own, twice: its message, quotes and all.
        let ours = std::io::Error::new(original.kind(), "the log \"wal\" is full");
        let once = std::io::Error::new(ours.kind(), format!("{ours:?}"));
        let twice = std::io::Error::new(once.kind(), format!("{once:?}"));
        assert_eq!(
            StorageError::from(sled::Error::Io(twice)).to_string(),
            "storage failed: I/O error: the log \"wal\" is full"
        );
    }

    #[test]
    fn dedup_survives_reopen() {
        let dir = TempDir::new("dedup-reopen");
        let namespaces = ns(100, None);
        let pos = {
            let store = Store::open(dir.path(), opts(4)).unwrap();
            let a = store
                .apply(&[publish("c", "a").with_id("m1")], &namespaces, T0)
                .unwrap();
            store.flush_blocking().unwrap();
            a[0].position()
        };
        let store = Store::open(dir.path(), opts(4)).unwrap();
        let again = store
            .apply(&[publish("c", "a").with_id("m1")], &namespaces, T0 + 1)
            .unwrap();
        assert_eq!(again[0], Applied::Duplicate(pos));
    }

    #[test]
    fn binary_channels_and_payloads() {
        let dir = TempDir::new("binary");
        let store = Store::open(dir.path(), opts(3)).unwrap();
        let namespaces = ns(5, None);
        let ch = Bytes::from_static(b"\x00\xff:\r\n");
        let payload = Bytes::from(vec![0u8, 1, 2, 255]);
        let p = Publish {
            channel: ch.clone(),
            payload: payload.clone(),
            message_id: Some(Bytes::new()),
        };
        let a = store
            .apply(std::slice::from_ref(&p), &namespaces, T0)
            .unwrap();
        assert_eq!(
            store.apply(&[p], &namespaces, T0).unwrap()[0],
            Applied::Duplicate(a[0].position())
        );
        let h = store.history_after_at(&ch, None, 10, T0).unwrap();
        assert_eq!(h.len(), 1);
        assert_eq!(h[0].payload, payload);
        assert_eq!(h[0].channel, ch);
        assert_eq!(&h[0], new_event(&a[0]));
    }

    /// Channel names for the model test: namespaces a (size 2), b (size 5), default (size 3).
    const CHANNELS: [&str; 5] = ["a:1", "a:2", "b:1", "plain", "b:x:y"];

    fn model_namespaces() -> Namespaces {
        let cfg = |n| NamespaceConfig {
            history_size: n,
            history_ttl: None,
            durable: true,
        };
        Namespaces::new(cfg(3)).with("a", cfg(2)).with("b", cfg(5))
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

        #[test]
        fn apply_matches_a_model(
            batches in proptest::collection::vec(
                proptest::collection::vec((0..CHANNELS.len(), proptest::option::of(0u8..4)), 0..12),
                1..8,
            )
        ) {
            let dir = TempDir::new("model");
            let store = Store::open(dir.path(), opts(3)).unwrap();
            let namespaces = model_namespaces();
            let mut last: BTreeMap<Partition, u64> = BTreeMap::new();
            let mut ids: HashMap<(usize, u8), Position> = HashMap::new();
            let mut history: HashMap<usize, Vec<(Position, String)>> = HashMap::new();
            let mut dropped: HashMap<usize, u64> = HashMap::new();
            let mut n = 0u32;
            for (b, batch) in batches.iter().enumerate() {
                let publishes: Vec<Publish> = batch
                    .iter()
                    .map(|&(c, id)| {
                        n += 1;
                        let p = publish(CHANNELS[c], &format!("p{n}"));
                        match id { Some(id) => p.with_id(vec![id]), None => p }
                    })
                    .collect();
                let applied = store.apply(&publishes, &namespaces, T0 + b as u64).unwrap();
                prop_assert_eq!(applied.len(), publishes.len());
                for ((&(c, id), p), a) in batch.iter().zip(&publishes).zip(&applied) {
                    if let Some(&orig) = id.and_then(|id| ids.get(&(c, id))) {
                        prop_assert_eq!(a, &Applied::Duplicate(orig));
                        continue;
                    }
                    let part = store.partition_of(CHANNELS[c].as_bytes());
                    let seq = last.entry(part).or_insert(0);
                    *seq += 1;
                    let pos = Position::new(part, *seq);
                    prop_assert_eq!(a.position(), pos);
                    if let Some(id) = id { ids.insert((c, id), pos); }
                    let h = history.entry(c).or_default();
                    h.push((pos, String::from_utf8(p.payload.to_vec()).unwrap()));
                    let keep = namespaces.for_channel(CHANNELS[c].as_bytes()).history_size;
                    if h.len() > keep {
                        let (gone, _) = h.remove(0);
                        dropped.insert(c, gone.seq);
                    }
                }
            }
            for (p, seq) in &last {
                prop_assert_eq!(store.latest_seq(*p), *seq);
            }
            let mut total = 0;
            for (c, name) in CHANNELS.iter().enumerate() {
                let got = store.history_after_at(name.as_bytes(), None, 100, T0).unwrap();
                let want = history.get(&c).cloned().unwrap_or_default();
                prop_assert!(got.len() <= namespaces.for_channel(name.as_bytes()).history_size);
                prop_assert!(got.windows(2).all(|w| w[0].position < w[1].position));
                let got: Vec<(Position, String)> = got
                    .iter()
                    .map(|e| (e.position, String::from_utf8(e.payload.to_vec()).unwrap()))
                    .collect();
                prop_assert_eq!(&got, &want);
                total += want.len() as u64;

                // Every other read agrees with the model: the last n, resuming after each
                // retained event and after the last dropped one, the oldest, the loss floor.
                let name = name.as_bytes();
                let events = |got: Vec<Event>| -> Vec<(Position, String)> {
                    got.iter()
                        .map(|e| (e.position, String::from_utf8(e.payload.to_vec()).unwrap()))
                        .collect()
                };
                for k in 0..=want.len() + 1 {
                    let tail = want[want.len().saturating_sub(k)..].to_vec();
                    prop_assert_eq!(events(store.last_at(name, k, T0).unwrap()), tail.clone());
                    // The same events, read from where seq_before_last says to start.
                    let after = store.seq_before_last_at(name, k, T0).unwrap();
                    prop_assert_eq!(
                        events(store.history_after_at(name, after, usize::MAX, T0).unwrap()),
                        tail
                    );
                }
                for (i, (pos, _)) in want.iter().enumerate() {
                    let rest = events(store.history_after_at(name, Some(pos.seq), 100, T0).unwrap());
                    prop_assert_eq!(rest, want[i + 1..].to_vec());
                    let one = events(store.history_after_at(name, Some(pos.seq), 1, T0).unwrap());
                    prop_assert_eq!(one, want[i + 1..].iter().take(1).cloned().collect::<Vec<_>>());
                }
                let floor = dropped.get(&c).copied().unwrap_or(0);
                prop_assert_eq!(store.retention_floor_at(name, T0).unwrap(), floor);
                let resumed = events(store.history_after_at(name, Some(floor), 100, T0).unwrap());
                prop_assert_eq!(resumed, want.clone());
                prop_assert_eq!(store.oldest_at(name, T0).unwrap(), want.first().map(|(p, _)| *p));
                // No chunk outlives its events.
                for seqs in stored_chunks(&store, name) {
                    prop_assert!(seqs.last().is_some_and(|&s| s > floor), "{:?} floor {}", seqs, floor);
                }
            }
            prop_assert_eq!(store.channel_stats().events, total);
        }
    }
}
