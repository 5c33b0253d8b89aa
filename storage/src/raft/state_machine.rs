//! The state machine of one group, applied to the node's one [`Store`].
//!
//! - A partition group applies [`Command::Publish`] with [`Store::apply`]'s logic. The entry's
//!   writes and the group's applied state (`r` group `a`: last applied log id and membership)
//!   go to the node's [`RaftJournal`] as ONE record, written to the journal's file before any
//!   of them reaches sled; sled then gets them one by one (an atomic sled batch would seal and
//!   write sled's log buffer twice, on sled's thread pool: measured, that was a third of a
//!   node's CPU). After `kill -9` sled holds every record up to the journal number it names
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
//!   cluster identity and namespace config. The current snapshot (meta and data) is kept under `r` group `s`.
//!
//! Applying does not flush: the entries are durable in the log already (the Raft journal), and
//! a crash before sled's next flush (a journal checkpoint) only makes openraft apply them
//! again, with the same outcome. A purge is written after the applies it covers and sled
//! recovers a prefix of its writes, so the entries to apply again are still in the log.

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

use super::journal::{Done, RaftJournal, Write};
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

/// The current snapshot of a group (`r` group `s`).
#[derive(Clone, Debug, Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, BasicNode>,
    data: bytes::Bytes,
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

fn read_applied(tree: &sled::Tree, group: GroupId) -> Result<AppliedState, StorageError> {
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
        Ok(GroupStateMachine {
            shared: Arc::new(Shared {
                store,
                journal,
                group,
                partition,
                namespaces,
                on_commit,
            }),
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

    fn snapshot_key(&self) -> Vec<u8> {
        codec::raft_key(self.group, codec::RAFT_SNAPSHOT)
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
                        |ops| self.journal.submit(ops, Write::InOrder, Done::Nobody),
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
                        .join_cluster(epoch, false, self.bookkeeping(&next).into_sled())?;
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
                    self.store
                        .with_write_lock(|tree| Ok(tree.apply_batch(batch.into_sled())?))?;
                    self.namespaces.set_cluster(Some(&spec));
                    *applied = next;
                    replies.push(Reply::None);
                }
            }
        }
        if let Some(next) = pending {
            let batch = self.bookkeeping(&next);
            self.store
                .with_write_lock(|tree| Ok(tree.apply_batch(batch.into_sled())?))?;
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
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data: bytes::Bytes::from(data.clone()),
        };
        let key = self.snapshot_key();
        store.with_write_lock(|tree| {
            let current: Option<StoredSnapshot> = get(tree, &key, "raft snapshot")?;
            if current.is_none_or(|c| c.meta.last_log_id <= stored.meta.last_log_id) {
                tree.insert(key.as_slice(), codec::encode(&stored))?;
            }
            Ok(())
        })?;
        tracing::info!(
            group = self.group,
            snapshot = %meta.snapshot_id,
            bytes = data.len(),
            "built a snapshot"
        );
        Ok((meta, data))
    }

    /// Replaces the group's state with a snapshot, atomically, and makes it the current one.
    fn install(
        &self,
        meta: SnapshotMeta<NodeId, BasicNode>,
        data: Vec<u8>,
        next: &AppliedState,
    ) -> Result<(), StorageError> {
        let image: GroupImage = codec::decode(&data, "raft snapshot")?;
        if self.partition.is_none() {
            self.forget_peers_outside(meta.last_membership.membership())?;
        }
        let mut batch = self.bookkeeping(next);
        let snapshot_id = meta.snapshot_id.clone();
        let stored = StoredSnapshot {
            meta,
            data: bytes::Bytes::from(data),
        };
        batch.insert(self.snapshot_key(), codec::encode(&stored));
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
                self.store
                    .install_partition_image(image, batch.into_sled())?;
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
                    self.store.join_cluster(epoch, true, batch.into_sled())?;
                } else {
                    self.store
                        .with_write_lock(|tree| Ok(tree.apply_batch(batch.into_sled())?))?;
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
        tracing::info!(group = self.group, snapshot = %snapshot_id, "installed a snapshot");
        Ok(())
    }

    fn current_snapshot(&self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let stored: Option<StoredSnapshot> =
            get(self.store.tree(), &self.snapshot_key(), "raft snapshot")?;
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
        self.shared.store.flush().await.map_err(error)?;
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
