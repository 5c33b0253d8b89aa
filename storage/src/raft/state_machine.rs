//! The state machine of one group, applied to the node's one [`Store`].
//!
//! - A partition group applies [`Command::Publish`] with [`Store::apply`]'s logic. The entry's
//!   writes and the group's applied state (`r` group `a`: last applied log id and membership)
//!   go to the node's [`RaftJournal`] as ONE record, written to the journal's file before any
//!   of them reaches the store, whose table of recent writes takes them in one step (sled
//!   gets them at the next checkpoint, see the `memtable` module). After `kill -9` sled holds
//!   every record up to the journal number it names
//!   and `Store::open` redoes the later ones, so an entry is never left half applied (applying
//!   it again over half its writes could assign other seqs or find it a duplicate of itself:
//!   `tests/raft_crash.rs` catches that). The apply clock is `max(now_ms, applied clock of the
//!   partition)`, written in that record too, so every member assigns the same seqs and takes
//!   the same dedup decisions.
//! - The meta group applies [`Command::Init`]: the cluster's epoch becomes the store's; and
//!   [`Command::Namespaces`]: the cluster's namespace config, stored and put in force on this
//!   node ([`LiveNamespaces`]).
//! - Snapshots: a partition group's is a point-in-time copy of everything of its partition
//!   (taken under the store's write lock, so no apply interleaves); the meta group's is the
//!   cluster identity and namespace config. The current snapshot's data is a file of its own
//!   under `<store dir>/snapshots/`, its meta and file name are under `r` group `f` (see the
//!   `snapshot_file` module); a store written before keeps its snapshot inline under `r` group
//!   `s` until the next snapshot of the group replaces it.
//!
//! Applying does not flush: the entries are durable in the log already (the Raft journal), and
//! a crash before sled's next flush (a journal checkpoint) only makes openraft apply them
//! again, with the same outcome. A purge is written after the applies it covers and sled
//! recovers a prefix of its writes, so the entries to apply again are still in the log.

use crate::memtable::Tree;
use std::io::Cursor;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    BasicNode, Entry, EntryPayload, ErrorSubject, ErrorVerb, LogId, OptionalSend,
    RaftSnapshotBuilder, SnapshotMeta, StoredMembership,
};
use serde::{Deserialize, Serialize};

use super::journal::{Done, RaftJournal};
use super::snapshot_file::{self, SnapshotFile};
use super::support::{RaftStorageError, blocking, get, raft_err};
use super::{Command, GroupId, NodeId, Reply, TypeConfig, group_partition};
use crate::codec;
use crate::event::{Epoch, Partition, unix_now_ms};
use crate::log::OnCommit;
use crate::namespace::{LiveNamespaces, NamespacesSpec};
use crate::store::{Applied, Ops, PartitionImage, StorageError, Store};

/// What the state machine of a group has applied (`r` group `a`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct AppliedState {
    pub last_applied: Option<LogId<NodeId>>,
    pub membership: StoredMembership<NodeId, BasicNode>,
}

/// The current snapshot of a group as stores written before snapshot files kept it, data
/// inline (`r` group `s`). Read, never written: the next snapshot of the group replaces it.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, BasicNode>,
    data: bytes::Bytes,
}

/// The head of a [`StoredSnapshot`]: its meta, decoded without copying the data (bincode
/// decodes fields in order and ignores what follows).
#[derive(Clone, Debug, Serialize, Deserialize)]
struct StoredSnapshotHead {
    meta: SnapshotMeta<NodeId, BasicNode>,
}

/// The data of a snapshot (membership and last applied are in its [`SnapshotMeta`]).
#[derive(Clone, Debug, Serialize, Deserialize)]
enum GroupImage {
    /// The meta group: the cluster's identity.
    Meta {
        epoch: Epoch,
        partitions: u16,
        /// Whether `Init` was applied (before it, `epoch` is just the leader store's own).
        initialized: bool,
    },
    /// A partition group: everything of the partition.
    Partition(PartitionImage),
    /// The meta group once it holds a namespace config (built only then, so that a snapshot
    /// without one still decodes on nodes that predate the variant).
    MetaWithNamespaces {
        /// As in [`GroupImage::Meta`].
        epoch: Epoch,
        /// As in [`GroupImage::Meta`].
        partitions: u16,
        /// As in [`GroupImage::Meta`].
        initialized: bool,
        /// The cluster's namespace config.
        namespaces: NamespacesSpec,
    },
}

/// Applies of at most this many entries and [`INLINE_BYTES`] of payload run inline; larger
/// ones (a follower catching up) on the blocking pool.
const INLINE_ENTRIES: usize = 8;
/// See [`INLINE_ENTRIES`].
const INLINE_BYTES: usize = 64 << 10;

/// The payload bytes of the publishes in `entries`.
fn payload_bytes(entries: &[Entry<TypeConfig>]) -> usize {
    entries
        .iter()
        .map(|e| match &e.payload {
            EntryPayload::Normal(Command::Publish { publishes, .. }) => {
                publishes.iter().map(crate::Publish::size).sum()
            }
            _ => 0,
        })
        .sum()
}

/// Makes snapshot ids unique within the process.
static SNAPSHOT_COUNTER: AtomicU64 = AtomicU64::new(0);

/// What the state machine and its snapshot builders share.
struct Shared {
    store: Arc<Store>,
    /// Where applies write (see the module docs).
    journal: Arc<RaftJournal>,
    group: GroupId,
    /// `None` for the meta group.
    partition: Option<Partition>,
    /// Partition groups apply with its current config; the meta group sets the cluster's.
    namespaces: Arc<LiveNamespaces>,
    on_commit: OnCommit,
    /// Where the group's snapshot files are.
    snapshot_dir: std::path::PathBuf,
    /// Held while the group's snapshot files or record change, or a file is read: a build and
    /// an install do not delete each other's files.
    snapshot_lock: parking_lot::Mutex<()>,
}

/// The state machine of one group (meta or partition) on the node's shared [`Store`]; see the
/// module docs.
pub struct GroupStateMachine {
    shared: Arc<Shared>,
    /// What is persisted under `r` group `a` (kept in memory for [`RaftStateMachine::applied_state`]).
    applied: AppliedState,
}

impl std::fmt::Debug for GroupStateMachine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupStateMachine")
            .field("group", &self.shared.group)
            .field("last_applied", &self.applied.last_applied)
            .finish_non_exhaustive()
    }
}

/// Builds snapshots of a group (a point-in-time copy, consistent with its last applied log id),
/// concurrently with the state machine's applies.
pub struct GroupSnapshotBuilder {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for GroupSnapshotBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupSnapshotBuilder")
            .field("group", &self.shared.group)
            .finish()
    }
}

fn read_applied(tree: &Tree, group: GroupId) -> Result<AppliedState, StorageError> {
    Ok(get(
        tree,
        &codec::raft_key(group, codec::RAFT_APPLIED),
        "raft applied state",
    )?
    .unwrap_or_default())
}

impl GroupStateMachine {
    /// The state machine of `group` in `store`, resuming from its persisted applied state.
    ///
    /// `on_commit` receives each applied `Publish` entry's new events (duplicates left out), in
    /// log order, right after the entry's sled batch is applied; a panic in it is caught and
    /// logged. Opening any group's state machine switches the store's dedup expiry to the
    /// partitions' applied clocks (see [`Store::expire`]). The meta group's puts the namespace
    /// config the store holds for the cluster (if any) in force in `namespaces`. Fails if
    /// `group` is a partition group beyond the store's partition count, or the stored state
    /// cannot be read.
    pub fn new(
        journal: Arc<RaftJournal>,
        group: GroupId,
        namespaces: Arc<LiveNamespaces>,
        on_commit: OnCommit,
    ) -> Result<GroupStateMachine, StorageError> {
        let store = journal.store().clone();
        let partition = group_partition(group);
        if let Some(p) = partition
            && p >= store.partitions()
        {
            return Err(StorageError::InvalidOptions(format!(
                "raft group {group} is partition {p}, but the store has {} partitions",
                store.partitions()
            )));
        }
        store.enable_deterministic_expiry();
        let applied = read_applied(store.tree(), group)?;
        if partition.is_none() {
            namespaces.set_cluster(store.cluster_namespaces()?.as_ref());
        }
        let shared = Shared {
            snapshot_dir: snapshot_file::dir(store.dir()),
            snapshot_lock: parking_lot::Mutex::new(()),
            store,
            journal,
            group,
            partition,
            namespaces,
            on_commit,
        };
        // Files of the group no record names: what a crash left behind.
        let named = shared.snapshot_file_record(shared.store.tree())?;
        snapshot_file::remove_others(
            &shared.snapshot_dir,
            group,
            named.as_ref().map(|r| r.file.as_str()),
        )?;
        Ok(GroupStateMachine {
            shared: Arc::new(shared),
            applied,
        })
    }

    /// The group this state machine applies.
    pub fn group(&self) -> GroupId {
        self.shared.group
    }

    /// The log id of the last applied entry (`None`: nothing yet).
    pub fn last_applied(&self) -> Option<LogId<NodeId>> {
        self.applied.last_applied
    }
}

impl Shared {
    fn applied_key(&self) -> Vec<u8> {
        codec::raft_key(self.group, codec::RAFT_APPLIED)
    }

    /// The key of a snapshot kept inline (stores written before snapshot files).
    fn inline_snapshot_key(&self) -> Vec<u8> {
        codec::raft_key(self.group, codec::RAFT_SNAPSHOT)
    }

    fn snapshot_file_key(&self) -> Vec<u8> {
        codec::raft_key(self.group, codec::RAFT_SNAPSHOT_FILE)
    }

    /// The record of the group's current snapshot file, if it has one.
    fn snapshot_file_record(&self, tree: &Tree) -> Result<Option<SnapshotFile>, StorageError> {
        get(tree, &self.snapshot_file_key(), "raft snapshot file")
    }

    /// The meta of the group's current snapshot (in a file or inline), if it has one.
    fn current_snapshot_meta(
        &self,
        tree: &Tree,
    ) -> Result<Option<SnapshotMeta<NodeId, BasicNode>>, StorageError> {
        if let Some(record) = self.snapshot_file_record(tree)? {
            return Ok(Some(record.meta));
        }
        let head: Option<StoredSnapshotHead> =
            get(tree, &self.inline_snapshot_key(), "raft snapshot")?;
        Ok(head.map(|h| h.meta))
    }

    /// Writes that make `record` the group's current snapshot (and drop an inline one).
    fn name_snapshot_file(&self, batch: &mut Ops, record: &SnapshotFile) {
        batch.insert(self.snapshot_file_key(), codec::encode(record));
        batch.remove(self.inline_snapshot_key());
    }

    /// The write of the group's applied state `next`.
    fn bookkeeping(&self, next: &AppliedState) -> Ops {
        let mut batch = Ops::default();
        batch.insert(self.applied_key(), codec::encode(next));
        batch
    }

    /// The meta group's membership changed: the store ids recorded for nodes outside it are
    /// forgotten (a node removed, then joined again on a new store, is not refused for the
    /// store it had).
    fn forget_peers_outside(
        &self,
        membership: &openraft::Membership<NodeId, BasicNode>,
    ) -> Result<(), StorageError> {
        let members = membership.nodes().map(|(id, _)| *id).collect();
        self.store.forget_peer_store_ids_except(&members)
    }

    /// Applies `entries` in order; `applied` follows what is persisted. One sled batch per
    /// `Publish` or `Init` entry (with its bookkeeping); the bookkeeping of other entries rides
    /// along with the next such batch or one final batch.
    fn apply_entries(
        &self,
        applied: &mut AppliedState,
        entries: Vec<Entry<TypeConfig>>,
    ) -> Result<Vec<Reply>, StorageError> {
        let mut replies = Vec::with_capacity(entries.len());
        let mut pending: Option<AppliedState> = None;
        for entry in entries {
            let log_id = entry.log_id;
            let mut next = pending.take().unwrap_or_else(|| applied.clone());
            next.last_applied = Some(log_id);
            match entry.payload {
                EntryPayload::Blank => {
                    pending = Some(next);
                    replies.push(Reply::None);
                }
                EntryPayload::Membership(membership) => {
                    if self.partition.is_none() {
                        self.forget_peers_outside(&membership)?;
                    }
                    next.membership = StoredMembership::new(Some(log_id), membership);
                    pending = Some(next);
                    replies.push(Reply::None);
                }
                EntryPayload::Normal(Command::Publish { now_ms, publishes }) => {
                    let Some(partition) = self.partition else {
                        tracing::warn!(%log_id, "a Publish entry in the meta group; ignored");
                        pending = Some(next);
                        replies.push(Reply::None);
                        continue;
                    };
                    if let Some(stray) = publishes
                        .iter()
                        .find(|p| self.store.partition_of(&p.channel) != partition)
                    {
                        tracing::error!(
                            %log_id, group = self.group, partition,
                            channel_partition = self.store.partition_of(&stray.channel),
                            "a Publish entry with a channel of another partition; the whole entry is ignored"
                        );
                        pending = Some(next);
                        replies.push(Reply::None);
                        continue;
                    }
                    let out = self.store.apply_writing(
                        &publishes,
                        &self.namespaces.current(),
                        now_ms,
                        Some(partition),
                        self.bookkeeping(&next),
                        |ops| self.journal.submit(ops, Done::Nobody),
                    )?;
                    *applied = next;
                    self.commit(&out);
                    replies.push(Reply::Applied(out));
                }
                EntryPayload::Normal(Command::Init { epoch, partitions }) => {
                    if self.partition.is_some() {
                        tracing::warn!(%log_id, group = self.group, "an Init entry in a partition group; ignored");
                        pending = Some(next);
                        replies.push(Reply::None);
                        continue;
                    }
                    let ours = self.store.partitions();
                    if partitions != ours {
                        tracing::error!(
                            %log_id, cluster_partitions = partitions, store_partitions = ours,
                            dir = %self.store.dir().display(),
                            "the cluster has {partitions} partitions but this node's store has {ours}; \
                             this node cannot be a member (use a store created with {partitions} partitions)"
                        );
                        return Err(StorageError::PartitionsMismatch {
                            dir: self.store.dir().to_path_buf(),
                            stored: ours,
                            requested: partitions,
                        });
                    }
                    self.store
                        .join_cluster(epoch, false, self.bookkeeping(&next))?;
                    *applied = next;
                    replies.push(Reply::None);
                }
                EntryPayload::Normal(Command::Namespaces { spec }) => {
                    if self.partition.is_some() {
                        tracing::warn!(%log_id, group = self.group, "a Namespaces entry in a partition group; ignored");
                        pending = Some(next);
                        replies.push(Reply::None);
                        continue;
                    }
                    let mut batch = self.bookkeeping(&next);
                    batch.insert(codec::KEY_CLUSTER_NAMESPACES, codec::encode(&spec));
                    self.store.with_write_lock(|tree| Ok(tree.apply(batch)?))?;
                    // Rare, and what a node restarted alone serves by: durable at once.
                    self.store.flush_blocking()?;
                    self.namespaces.set_cluster(Some(&spec));
                    *applied = next;
                    replies.push(Reply::None);
                }
            }
        }
        if let Some(next) = pending {
            let batch = self.bookkeeping(&next);
            self.store.with_write_lock(|tree| Ok(tree.apply(batch)?))?;
            *applied = next;
        }
        Ok(replies)
    }

    /// Hands an entry's new events to `on_commit`.
    fn commit(&self, out: &[Applied]) {
        let events = Applied::new_events(out);
        if events.is_empty() {
            return;
        }
        let on_commit = &self.on_commit;
        if std::panic::catch_unwind(AssertUnwindSafe(|| on_commit(&events))).is_err() {
            tracing::error!(
                group = self.group,
                events = events.len(),
                "on_commit panicked"
            );
        }
    }

    /// Builds a snapshot and makes it the current one (unless a newer one already is).
    fn build(&self) -> Result<(SnapshotMeta<NodeId, BasicNode>, Vec<u8>), StorageError> {
        let store = &self.store;
        let (image, applied) = match self.partition {
            Some(p) => {
                let (image, applied) =
                    store.partition_image(p, |tree| read_applied(tree, self.group))?;
                (GroupImage::Partition(image), applied)
            }
            None => store.with_write_lock(|tree| {
                let (epoch, partitions, initialized) = (
                    store.epoch(),
                    store.partitions(),
                    store.cluster_initialized(),
                );
                let image = match get::<NamespacesSpec>(
                    tree,
                    codec::KEY_CLUSTER_NAMESPACES,
                    "cluster namespace config",
                )? {
                    Some(namespaces) => GroupImage::MetaWithNamespaces {
                        epoch,
                        partitions,
                        initialized,
                        namespaces,
                    },
                    None => GroupImage::Meta {
                        epoch,
                        partitions,
                        initialized,
                    },
                };
                Ok((image, read_applied(tree, self.group)?))
            })?,
        };
        let data = codec::encode(&image);
        let n = SNAPSHOT_COUNTER.fetch_add(1, Ordering::Relaxed);
        let snapshot_id = match applied.last_applied {
            Some(l) => format!(
                "g{}-{}-{}-{}-{}",
                self.group,
                l.leader_id,
                l.index,
                unix_now_ms(),
                n
            ),
            None => format!("g{}-none-{}-{}", self.group, unix_now_ms(), n),
        };
        let meta = SnapshotMeta {
            last_log_id: applied.last_applied,
            last_membership: applied.membership,
            snapshot_id,
        };
        let _files = self.snapshot_lock.lock();
        // The file is durable before sled names it.
        let record = snapshot_file::write(&self.snapshot_dir, self.group, &meta, &data)?;
        let named = store.with_write_lock(|tree| {
            let current = self.current_snapshot_meta(tree)?;
            if current.is_none_or(|c| c.last_log_id <= meta.last_log_id) {
                let mut batch = Ops::default();
                self.name_snapshot_file(&mut batch, &record);
                tree.apply(batch)?;
                Ok(true)
            } else {
                Ok(false)
            }
        });
        match named {
            Ok(true) => {
                // The record is durable before the files it replaces are deleted.
                store.flush_blocking()?;
                snapshot_file::remove_others(&self.snapshot_dir, self.group, Some(&record.file))?;
            }
            Ok(false) => snapshot_file::remove(&self.snapshot_dir, &record),
            Err(e) => {
                snapshot_file::remove(&self.snapshot_dir, &record);
                return Err(e);
            }
        }
        tracing::info!(
            group = self.group,
            snapshot = %meta.snapshot_id,
            bytes = data.len(),
            "built a snapshot"
        );
        Ok((meta, data))
    }

    /// Replaces the group's state with a snapshot, atomically, and makes it the current one
    /// (its data written to a file first); durable on return.
    fn install(
        &self,
        meta: SnapshotMeta<NodeId, BasicNode>,
        data: Vec<u8>,
        next: &AppliedState,
    ) -> Result<(), StorageError> {
        let image: GroupImage = codec::decode(&data, "raft snapshot")?;
        let _files = self.snapshot_lock.lock();
        // The file is durable before sled names it.
        let record = snapshot_file::write(&self.snapshot_dir, self.group, &meta, &data)?;
        drop(data);
        if let Err(e) = self.install_image(&meta, image, &record, next) {
            snapshot_file::remove(&self.snapshot_dir, &record);
            return Err(e);
        }
        // The record is durable before the files it replaces are deleted.
        self.store.flush_blocking()?;
        snapshot_file::remove_others(&self.snapshot_dir, self.group, Some(&record.file))?;
        tracing::info!(group = self.group, snapshot = %meta.snapshot_id, "installed a snapshot");
        Ok(())
    }

    /// The sled part of [`Shared::install`]: the image, `next` and `record`, in one batch.
    fn install_image(
        &self,
        meta: &SnapshotMeta<NodeId, BasicNode>,
        image: GroupImage,
        record: &SnapshotFile,
        next: &AppliedState,
    ) -> Result<(), StorageError> {
        if self.partition.is_none() {
            self.forget_peers_outside(meta.last_membership.membership())?;
        }
        let mut batch = self.bookkeeping(next);
        let snapshot_id = &meta.snapshot_id;
        self.name_snapshot_file(&mut batch, record);
        let (partition_image, meta_image) = match image {
            GroupImage::Partition(image) => (Some(image), None),
            GroupImage::Meta {
                epoch,
                partitions,
                initialized,
            } => (None, Some((epoch, partitions, initialized, None))),
            GroupImage::MetaWithNamespaces {
                epoch,
                partitions,
                initialized,
                namespaces,
            } => (
                None,
                Some((epoch, partitions, initialized, Some(namespaces))),
            ),
        };
        match (self.partition, partition_image, meta_image) {
            (Some(p), Some(image), None) if image.partition == p => {
                self.store.install_partition_image(image, batch)?;
            }
            (None, None, Some((epoch, partitions, initialized, namespaces))) => {
                let ours = self.store.partitions();
                if partitions != ours {
                    tracing::error!(
                        cluster_partitions = partitions,
                        store_partitions = ours,
                        "the cluster's snapshot has {partitions} partitions but this node's store has {ours}"
                    );
                    return Err(StorageError::PartitionsMismatch {
                        dir: self.store.dir().to_path_buf(),
                        stored: ours,
                        requested: partitions,
                    });
                }
                match &namespaces {
                    Some(spec) => batch.insert(codec::KEY_CLUSTER_NAMESPACES, codec::encode(spec)),
                    None => batch.remove(codec::KEY_CLUSTER_NAMESPACES),
                }
                if initialized {
                    self.store.join_cluster(epoch, true, batch)?;
                } else {
                    self.store.with_write_lock(|tree| Ok(tree.apply(batch)?))?;
                }
                self.namespaces.set_cluster(namespaces.as_ref());
            }
            _ => {
                return Err(StorageError::Corrupt(format!(
                    "snapshot {snapshot_id} is not one of group {}",
                    self.group
                )));
            }
        }
        Ok(())
    }

    fn current_snapshot(&self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let _files = self.snapshot_lock.lock();
        let tree = self.store.tree();
        if let Some(record) = self.snapshot_file_record(tree)? {
            let data = snapshot_file::read(&self.snapshot_dir, &record)?;
            return Ok(Some(Snapshot {
                meta: record.meta,
                snapshot: Box::new(Cursor::new(data)),
            }));
        }
        let stored: Option<StoredSnapshot> =
            get(tree, &self.inline_snapshot_key(), "raft snapshot")?;
        Ok(stored.map(|s| Snapshot {
            meta: s.meta,
            snapshot: Box::new(Cursor::new(s.data.to_vec())),
        }))
    }
}

impl RaftSnapshotBuilder<TypeConfig> for GroupSnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, RaftStorageError> {
        let shared = self.shared.clone();
        let (meta, data) = blocking(move || shared.build())
            .await
            .map_err(|e| raft_err(ErrorSubject::Snapshot(None), ErrorVerb::Write, e))?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for GroupStateMachine {
    type SnapshotBuilder = GroupSnapshotBuilder;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, BasicNode>), RaftStorageError>
    {
        Ok((self.applied.last_applied, self.applied.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Reply>, RaftStorageError>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry<TypeConfig>> = entries.into_iter().collect();
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        if entries.len() <= INLINE_ENTRIES && payload_bytes(&entries) <= INLINE_BYTES {
            // Small applies (the common case: one proposal round) run on the runtime's thread:
            // a hand-off to the blocking pool and back costs more than the apply itself.
            return self
                .shared
                .apply_entries(&mut self.applied, entries)
                .map_err(|e| raft_err(ErrorSubject::StateMachine, ErrorVerb::Write, e));
        }
        let shared = self.shared.clone();
        let mut applied = self.applied.clone();
        let (result, applied) = tokio::task::spawn_blocking(move || {
            let result = shared.apply_entries(&mut applied, entries);
            (result, applied)
        })
        .await
        .map_err(|e| {
            raft_err(
                ErrorSubject::StateMachine,
                ErrorVerb::Write,
                StorageError::Internal(format!("apply task failed: {e}")),
            )
        })?;
        self.applied = applied;
        result.map_err(|e| raft_err(ErrorSubject::StateMachine, ErrorVerb::Write, e))
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        GroupSnapshotBuilder {
            shared: self.shared.clone(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, RaftStorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), RaftStorageError> {
        let error = |e| {
            raft_err(
                ErrorSubject::Snapshot(Some(meta.signature())),
                ErrorVerb::Write,
                e,
            )
        };
        let next = AppliedState {
            last_applied: meta.last_log_id,
            membership: meta.last_membership.clone(),
        };
        let shared = self.shared.clone();
        let (meta_owned, data, state) = (meta.clone(), snapshot.into_inner(), next.clone());
        blocking(move || shared.install(meta_owned, data, &state))
            .await
            .map_err(error)?;
        self.applied = next;
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, RaftStorageError> {
        let shared = self.shared.clone();
        blocking(move || shared.current_snapshot())
            .await
            .map_err(|e| raft_err(ErrorSubject::Snapshot(None), ErrorVerb::Read, e))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::time::Duration;

    use openraft::{CommittedLeaderId, Membership};

    use super::*;
    use crate::namespace::{NamespaceConfig, Namespaces};
    use crate::raft::{META_GROUP, partition_group};
    use crate::store::{Publish, StoreOptions};
    use crate::testutil::TempDir;

    const T0: u64 = 1_700_000_000_000;

    fn open(dir: &TempDir) -> Arc<Store> {
        let options = StoreOptions {
            partitions: 2,
            dedup_window: Duration::from_secs(60),
            cache_capacity: 4 << 20,
        };
        Arc::new(Store::open(dir.path(), options).unwrap())
    }

    fn machine(store: &Arc<Store>, group: GroupId) -> GroupStateMachine {
        let namespaces = LiveNamespaces::new(Namespaces::new(NamespaceConfig {
            history_size: 100_000,
            history_ttl: None,
            durable: true,
        }));
        let journal = RaftJournal::of(store).unwrap();
        GroupStateMachine::new(journal, group, namespaces, Arc::new(|_: &[_]| {})).unwrap()
    }

    fn entry(index: u64, payload: EntryPayload<TypeConfig>) -> Entry<TypeConfig> {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload,
        }
    }

    /// Entry `index`: 50 publishes of 4 KiB to channels of `partition`.
    fn publishes(store: &Store, partition: Partition, index: u64) -> Entry<TypeConfig> {
        let publishes = (0..)
            .map(|i| format!("ch{i}"))
            .filter(|c| store.partition_of(c.as_bytes()) == partition)
            .take(50)
            .map(|c| Publish::new(c, vec![b'x'; 4096]))
            .collect();
        entry(
            index,
            EntryPayload::Normal(Command::Publish {
                now_ms: T0 + index,
                publishes,
            }),
        )
    }

    fn files(dir: &std::path::Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(snapshot_file::dir(dir))
            .map(|entries| {
                entries
                    .map(|e| e.unwrap().file_name().into_string().unwrap())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }

    fn raw(store: &Store, group: GroupId, tag: u8) -> Option<sled::IVec> {
        store.tree().get(codec::raft_key(group, tag)).unwrap()
    }

    #[tokio::test]
    async fn a_snapshot_is_one_file_and_sled_keeps_only_its_name() {
        let tmp = TempDir::new("snapfiles");
        let store = open(&tmp);
        let (p, group) = (1, partition_group(1));
        let mut sm = machine(&store, group);
        let voters = Membership::new(vec![BTreeSet::from([1])], None);
        sm.apply([entry(1, EntryPayload::Membership(voters))])
            .await
            .unwrap();
        let mut last = None;
        for round in 0..4u64 {
            sm.apply([publishes(&store, p, 2 + round)]).await.unwrap();
            let snap = sm
                .get_snapshot_builder()
                .await
                .build_snapshot()
                .await
                .unwrap();
            assert!(snap.snapshot.get_ref().len() as u64 > (round + 1) * 200 * 1024);
            let names = files(tmp.path());
            assert_eq!(names.len(), 1, "{names:?}");
            last = Some(snap);
        }
        let last = last.unwrap();
        // sled holds the name, not the data.
        let record = raw(&store, group, codec::RAFT_SNAPSHOT_FILE).unwrap();
        assert!(record.len() < 1024, "{} bytes", record.len());
        assert!(raw(&store, group, codec::RAFT_SNAPSHOT).is_none());

        // After a restart: the same snapshot; leftovers of the group are deleted, not others'.
        drop(sm);
        drop(store);
        let kept = files(tmp.path());
        let dir = snapshot_file::dir(tmp.path());
        for name in [
            format!("g{group}-orphan-7.snap"),
            format!("g{group}-orphan-8.snap.tmp"),
            format!("g{}-other-1.snap", group + 1),
            "unrelated".to_string(),
        ] {
            std::fs::write(dir.join(name), b"left over").unwrap();
        }
        let store = open(&tmp);
        let mut sm = machine(&store, group);
        let mut want = kept.clone();
        want.push(format!("g{}-other-1.snap", group + 1));
        want.push("unrelated".into());
        want.sort();
        assert_eq!(files(tmp.path()), want);
        let current = sm.get_current_snapshot().await.unwrap().unwrap();
        assert_eq!(current.meta, last.meta);
        assert_eq!(current.snapshot.get_ref(), last.snapshot.get_ref());

        // A snapshot installed on a fresh store is readable after a restart.
        let tmp2 = TempDir::new("snapfiles-install");
        let store2 = open(&tmp2);
        let mut sm2 = machine(&store2, group);
        sm2.install_snapshot(
            &last.meta,
            Box::new(Cursor::new(last.snapshot.get_ref().clone())),
        )
        .await
        .unwrap();
        assert_eq!(files(tmp2.path()).len(), 1);
        drop(sm2);
        drop(store2);
        let store2 = open(&tmp2);
        let mut sm2 = machine(&store2, group);
        let installed = sm2.get_current_snapshot().await.unwrap().unwrap();
        assert_eq!(installed.meta, last.meta);
        assert_eq!(installed.snapshot.get_ref(), last.snapshot.get_ref());
        assert_eq!(store2.latest_seq(p), store.latest_seq(p));

        // A snapshot of another group is refused, and leaves no file.
        let mut sm2_other = machine(&store2, META_GROUP);
        assert!(
            sm2_other
                .install_snapshot(
                    &last.meta,
                    Box::new(Cursor::new(last.snapshot.get_ref().clone()))
                )
                .await
                .is_err()
        );
        assert_eq!(files(tmp2.path()).len(), 1);

        // A missing file is an error naming it, not a panic.
        let name = files(tmp2.path()).pop().unwrap();
        std::fs::remove_file(snapshot_file::dir(tmp2.path()).join(&name)).unwrap();
        let err = sm2.get_current_snapshot().await.unwrap_err().to_string();
        assert!(err.contains(&name), "{err}");
    }

    #[tokio::test]
    async fn an_inline_snapshot_of_an_older_store_is_read_then_replaced() {
        let tmp = TempDir::new("snapfiles-inline");
        let store = open(&tmp);
        let group = META_GROUP;
        let mut sm = machine(&store, group);
        let built = sm
            .get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();
        // As a store written before snapshot files kept it.
        let old = StoredSnapshot {
            meta: built.meta.clone(),
            data: bytes::Bytes::from(built.snapshot.get_ref().clone()),
        };
        let mut batch = Ops::default();
        batch.remove(codec::raft_key(group, codec::RAFT_SNAPSHOT_FILE));
        batch.insert(
            codec::raft_key(group, codec::RAFT_SNAPSHOT),
            codec::encode(&old),
        );
        store.tree().apply(batch).unwrap();
        drop(sm);
        drop(store);

        let store = open(&tmp);
        let mut sm = machine(&store, group);
        // The file no record names any more is gone; the inline snapshot is current.
        assert!(files(tmp.path()).is_empty());
        let current = sm.get_current_snapshot().await.unwrap().unwrap();
        assert_eq!(current.meta, built.meta);
        assert_eq!(current.snapshot.get_ref(), built.snapshot.get_ref());

        let next = sm
            .get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();
        assert!(raw(&store, group, codec::RAFT_SNAPSHOT).is_none());
        assert_eq!(files(tmp.path()).len(), 1);
        let current = sm.get_current_snapshot().await.unwrap().unwrap();
        assert_eq!(current.meta, next.meta);
    }
}
