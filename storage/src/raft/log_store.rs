//! The Raft log of one group, in the node's one [`Store`].
//!
//! Records (see the `codec` module): `r` group `l` index -> entry, `r` group `v` -> vote,
//! `r` group `p` -> last purged log id, `r` group `c` -> committed log id. Entries are bincode.
//!
//! Reads: the newest entries of each group are also kept in memory ([`RecentEntries`]), so
//! replication to followers and the state machine's apply (both read what was just appended)
//! clone them instead of reading sled, whose iterators copy the leaf they read.
//!
//! Durability: appends, votes and truncations go through the node's [`RaftJournal`] (one
//! write-ahead log for every group of the store): written to sled at once, durable once the
//! journal's next `fdatasync` covers them. [`RaftLogStorage::append`] returns as soon as the
//! entries are written and readable, and calls its callback when they are durable, so openraft
//! goes on meanwhile (a leader sends the entries to its followers while its own copy syncs);
//! [`RaftLogStorage::save_vote`] and [`RaftLogStorage::truncate`] return once durable. A purge
//! is one atomic sled batch (the new last purged log id with the deletions), not journaled and
//! not flushed: losing it in a crash only brings back entries the state machine already
//! applied. The committed log id is not journaled either (openraft may lose it), and is written
//! only every [`COMMITTED_EVERY`] entries: openraft calls `save_committed` on every commit, and
//! a sled write per commit was 2.4% of a cluster node's CPU. A restarted node that reads an
//! older committed id applies less of its log before a leader tells it the rest; never more
//! than was committed, as the id only grows.

use crate::memtable::Tree;
use std::collections::VecDeque;
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{Entry, ErrorSubject, ErrorVerb, LogId, OptionalSend, RaftLogReader, Vote};
use parking_lot::Mutex;
use serde::Deserialize;

use super::journal::{Done, RaftJournal};
use super::support::{RaftStorageError, blocking, get, put, raft_err};
use super::{GroupId, NodeId, TypeConfig};
use crate::codec;
use crate::store::{Ops, StorageError, Store};

/// Reads of at most this many entries run inline; longer ones go to the blocking pool.
const INLINE_ENTRIES: u64 = 64;
/// Appends of at most this many bytes are written to sled inline; bigger ones on the blocking
/// pool.
const INLINE_APPEND_BYTES: usize = 256 << 10;

/// `save_committed` writes the committed log id when it moved this many entries since the last
/// write (see the module doc).
const COMMITTED_EVERY: u64 = 1024;

/// [`RecentEntries`] keeps at most this many entries of a group ...
const RECENT_ENTRIES: usize = 512;
/// ... and at most about this many payload bytes.
const RECENT_BYTES: usize = 1 << 20;

/// The newest entries of a group's log, in index order and without holes: the log's tail
/// (every append lands here, so when not empty its last entry is the log's last entry).
#[derive(Default)]
struct RecentEntries {
    entries: VecDeque<(Entry<TypeConfig>, usize)>,
    bytes: usize,
}

impl RecentEntries {
    fn first_index(&self) -> Option<u64> {
        self.entries.front().map(|(e, _)| e.log_id.index)
    }

    /// Adds entries just written to the log; they replace any kept entry at or after their
    /// first index (openraft truncates before it overwrites, but this keeps the tail true).
    fn appended(&mut self, entries: Vec<Entry<TypeConfig>>) {
        let Some(first) = entries.first().map(|e| e.log_id.index) else {
            return;
        };
        self.remove_from(first);
        if self
            .entries
            .back()
            .is_some_and(|(e, _)| e.log_id.index + 1 != first)
        {
            self.clear();
        }
        for entry in entries {
            let bytes = entry_bytes(&entry);
            self.bytes += bytes;
            self.entries.push_back((entry, bytes));
        }
        while self.entries.len() > RECENT_ENTRIES
            || (self.bytes > RECENT_BYTES && self.entries.len() > 1)
        {
            self.pop_front();
        }
    }

    /// Forgets the entries at and after `index`.
    fn remove_from(&mut self, index: u64) {
        while self
            .entries
            .back()
            .is_some_and(|(e, _)| e.log_id.index >= index)
        {
            if let Some((_, bytes)) = self.entries.pop_back() {
                self.bytes -= bytes;
            }
        }
    }

    /// Forgets the entries up to and including `index`.
    fn remove_through(&mut self, index: u64) {
        while self.first_index().is_some_and(|i| i <= index) {
            self.pop_front();
        }
    }

    fn pop_front(&mut self) {
        if let Some((_, bytes)) = self.entries.pop_front() {
            self.bytes -= bytes;
        }
    }

    fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
    }

    /// The entries in `[start, end)` (`end` `None`: to the end of the log), if all are kept.
    fn get(&self, start: u64, end: Option<u64>) -> Option<Vec<Entry<TypeConfig>>> {
        let first = self.first_index()?;
        let next = first + self.entries.len() as u64;
        let end = end.unwrap_or(next);
        if start < first || end > next {
            return None;
        }
        let from = usize::try_from(start - first).ok()?;
        let to = usize::try_from(end - first).ok()?;
        Some(
            self.entries
                .range(from..to)
                .map(|(e, _)| e.clone())
                .collect(),
        )
    }
}

/// The payload bytes of an entry, roughly (what batching and the caches count).
fn entry_bytes(entry: &Entry<TypeConfig>) -> usize {
    match &entry.payload {
        openraft::EntryPayload::Normal(super::Command::Publish { publishes, .. }) => {
            publishes.iter().map(crate::Publish::size).sum()
        }
        _ => 64,
    }
}

/// The first field of a stored entry: bincode decodes it without the payload.
#[derive(Deserialize)]
struct EntryHead {
    log_id: LogId<NodeId>,
}

/// The Raft log (and vote) of one group, stored in the node's shared [`Store`] and made durable
/// by its [`RaftJournal`]. Cheap to clone: the clone is the same log (it is also its own
/// [`RaftLogStorage::LogReader`]).
#[derive(Clone)]
pub struct RaftLogStore {
    journal: Arc<RaftJournal>,
    store: Arc<Store>,
    group: GroupId,
    /// The index of the committed log id last written, plus one (0: none written yet).
    committed_written: Arc<AtomicU64>,
    /// The log's tail in memory, shared with every clone (the readers).
    recent: Arc<Mutex<RecentEntries>>,
}

impl Debug for RaftLogStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftLogStore")
            .field("group", &self.group)
            .field("dir", &self.store.dir())
            .finish()
    }
}

impl RaftLogStore {
    /// The log of `group` in the journal's store. Opening it writes nothing; a group that
    /// never stored anything has an empty log and no vote.
    pub fn new(journal: Arc<RaftJournal>, group: GroupId) -> RaftLogStore {
        RaftLogStore {
            store: journal.store().clone(),
            journal,
            group,
            committed_written: Arc::new(AtomicU64::new(0)),
            recent: Arc::default(),
        }
    }

    /// The group this log belongs to.
    pub fn group(&self) -> GroupId {
        self.group
    }

    /// The store the log lives in.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    fn key(&self, tag: u8) -> Vec<u8> {
        codec::raft_key(self.group, tag)
    }
}

/// `[start, end)` of a range of indexes (`end` `None`: to the end of the log); `None` if empty.
fn index_bounds<RB: RangeBounds<u64>>(range: &RB) -> Option<(u64, Option<u64>)> {
    let start = match range.start_bound() {
        Bound::Included(&s) => s,
        Bound::Excluded(&s) => s.checked_add(1)?,
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(&e) => e.checked_add(1),
        Bound::Excluded(&e) => Some(e),
        Bound::Unbounded => None,
    };
    match end {
        Some(e) if e <= start => None,
        _ => Some((start, end)),
    }
}

/// The key just past the group's log (the end of its `l` range).
fn log_end_key(group: GroupId) -> Vec<u8> {
    codec::raft_key(group, codec::RAFT_LOG + 1)
}

fn read_entries(
    tree: &Tree,
    group: GroupId,
    start: u64,
    end: Option<u64>,
) -> Result<Vec<Entry<TypeConfig>>, StorageError> {
    let from = codec::raft_log_key(group, start);
    let to = end.map_or_else(|| log_end_key(group), |e| codec::raft_log_key(group, e));
    let mut out = Vec::new();
    for kv in tree.range(from..to) {
        let (k, v) = kv?;
        let entry: Entry<TypeConfig> = codec::decode(&v, "raft log entry")?;
        let index = codec::raft_log_key_index(&k)?;
        if entry.log_id.index != index {
            return Err(StorageError::Corrupt(format!(
                "raft log of group {group}: entry {} stored at index {index}",
                entry.log_id
            )));
        }
        out.push(entry);
    }
    Ok(out)
}

impl RaftLogReader<TypeConfig> for RaftLogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, RaftStorageError> {
        let Some((start, end)) = index_bounds(&range) else {
            return Ok(Vec::new());
        };
        if let Some(entries) = self.recent.lock().get(start, end) {
            return Ok(entries);
        }
        let group = self.group;
        let small = end.is_some_and(|e| e - start <= INLINE_ENTRIES);
        let result = if small {
            read_entries(self.store.tree(), group, start, end)
        } else {
            let store = self.store.clone();
            blocking(move || read_entries(store.tree(), group, start, end)).await
        };
        result.map_err(|e| raft_err(ErrorSubject::Logs, ErrorVerb::Read, e))
    }
}

impl RaftLogStore {
    fn log_state(&self) -> Result<LogState<TypeConfig>, StorageError> {
        let tree = self.store.tree();
        let last_purged_log_id: Option<LogId<NodeId>> = get(
            tree,
            &self.key(codec::RAFT_PURGED),
            "raft last purged log id",
        )?;
        let last = match tree.scan_prefix(self.key(codec::RAFT_LOG)).next_back() {
            Some(kv) => {
                let (_, v) = kv?;
                let head: EntryHead = codec::decode(&v, "raft log entry")?;
                Some(head.log_id)
            }
            None => None,
        };
        Ok(LogState {
            last_purged_log_id,
            last_log_id: last.or(last_purged_log_id),
        })
    }

    /// Writes `entries` through the journal; `done` hears when they are durable.
    fn write_entries(
        journal: &RaftJournal,
        group: GroupId,
        entries: &[Entry<TypeConfig>],
        done: Done,
    ) -> Result<(), StorageError> {
        let mut ops = Ops::default();
        for entry in entries {
            ops.insert(
                codec::raft_log_key(group, entry.log_id.index),
                codec::encode(entry),
            );
        }
        journal.submit(ops, done)
    }

    /// The deletions of the entries in `[from, to)` (`to` `None`: to the end).
    fn deletions(
        store: &Store,
        group: GroupId,
        from: u64,
        to: Option<u64>,
    ) -> Result<Ops, StorageError> {
        let tree = store.tree();
        let start = codec::raft_log_key(group, from);
        let end = to.map_or_else(|| log_end_key(group), |t| codec::raft_log_key(group, t));
        let mut ops = Ops::default();
        if start < end {
            for key in tree.range(start..end).keys() {
                ops.remove(key?);
            }
        }
        Ok(ops)
    }
}

impl RaftLogStorage<TypeConfig> for RaftLogStore {
    type LogReader = RaftLogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, RaftStorageError> {
        self.log_state()
            .map_err(|e| raft_err(ErrorSubject::Logs, ErrorVerb::Read, e))
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), RaftStorageError> {
        let mut ops = Ops::default();
        ops.insert(self.key(codec::RAFT_VOTE), codec::encode(vote));
        self.journal
            .write(ops)
            .await
            .map_err(|e| raft_err(ErrorSubject::Vote, ErrorVerb::Write, e))
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, RaftStorageError> {
        get(self.store.tree(), &self.key(codec::RAFT_VOTE), "raft vote")
            .map_err(|e| raft_err(ErrorSubject::Vote, ErrorVerb::Read, e))
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<NodeId>>,
    ) -> Result<(), RaftStorageError> {
        let key = self.key(codec::RAFT_COMMITTED);
        let result = match committed {
            Some(c) => {
                let written = self.committed_written.load(Ordering::Relaxed);
                if written != 0 && c.index + 1 < written.saturating_add(COMMITTED_EVERY) {
                    return Ok(());
                }
                self.committed_written.store(c.index + 1, Ordering::Relaxed);
                put(self.store.tree(), &key, &c)
            }
            None => {
                self.committed_written.store(0, Ordering::Relaxed);
                self.store
                    .tree()
                    .remove(&key)
                    .map(|_| ())
                    .map_err(StorageError::from)
            }
        };
        result.map_err(|e| raft_err(ErrorSubject::Store, ErrorVerb::Write, e))
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, RaftStorageError> {
        get(
            self.store.tree(),
            &self.key(codec::RAFT_COMMITTED),
            "raft committed log id",
        )
        .map_err(|e| raft_err(ErrorSubject::Store, ErrorVerb::Read, e))
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), RaftStorageError>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let write = |e| raft_err(ErrorSubject::Logs, ErrorVerb::Write, e);
        let entries: Vec<Entry<TypeConfig>> = entries.into_iter().collect();
        let bytes: usize = entries.iter().map(entry_bytes).sum();
        let group = self.group;
        // Only a durable append may be reported: the journal calls the callback (which tells
        // openraft it can vote and acknowledge with these entries) after its sync.
        let done = Done::Flushed(callback);
        let entries = if bytes <= INLINE_APPEND_BYTES {
            Self::write_entries(&self.journal, group, &entries, done).map_err(write)?;
            entries
        } else {
            let journal = self.journal.clone();
            blocking(move || Self::write_entries(&journal, group, &entries, done).map(|()| entries))
                .await
                .map_err(write)?
        };
        // In memory once in sled: a read in between finds them there.
        self.recent.lock().appended(entries);
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), RaftStorageError> {
        tracing::debug!(group = self.group, %log_id, "truncate the raft log from here");
        let write = |e| raft_err(ErrorSubject::Logs, ErrorVerb::Delete, e);
        // Out of memory first: a reader then finds them in sled until they are gone there too.
        self.recent.lock().remove_from(log_id.index);
        let (store, group) = (self.store.clone(), self.group);
        let ops = blocking(move || Self::deletions(&store, group, log_id.index, None))
            .await
            .map_err(write)?;
        self.journal.write(ops).await.map_err(write)
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), RaftStorageError> {
        tracing::debug!(group = self.group, %log_id, "purge the raft log up to here");
        self.recent.lock().remove_through(log_id.index);
        let (store, group) = (self.store.clone(), self.group);
        blocking(move || {
            let mut ops = Self::deletions(&store, group, 0, log_id.index.checked_add(1))?;
            ops.insert(
                codec::raft_key(group, codec::RAFT_PURGED),
                codec::encode(&log_id),
            );
            Ok(store.tree().apply(ops)?)
        })
        .await
        .map_err(|e| raft_err(ErrorSubject::Logs, ErrorVerb::Delete, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blank(term: u64, index: u64) -> Entry<TypeConfig> {
        Entry {
            log_id: LogId::new(openraft::CommittedLeaderId::new(term, 1), index),
            payload: openraft::EntryPayload::Blank,
        }
    }

    fn ids(entries: Option<Vec<Entry<TypeConfig>>>) -> Option<Vec<(u64, u64)>> {
        entries.map(|es| {
            es.iter()
                .map(|e| (e.log_id.leader_id.term, e.log_id.index))
                .collect()
        })
    }

    #[test]
    fn recent_entries_follow_appends_truncations_and_purges() {
        let mut recent = RecentEntries::default();
        assert_eq!(ids(recent.get(0, None)), None);
        recent.appended((5..10).map(|i| blank(1, i)).collect());
        assert_eq!(ids(recent.get(6, Some(8))), Some(vec![(1, 6), (1, 7)]));
        assert_eq!(ids(recent.get(8, None)), Some(vec![(1, 8), (1, 9)]));
        assert_eq!(ids(recent.get(4, Some(6))), None, "not all kept");
        assert_eq!(ids(recent.get(9, Some(11))), None, "past the end");
        // An append over the tail replaces it (a new leader's entries).
        recent.appended(vec![blank(2, 8)]);
        assert_eq!(ids(recent.get(7, None)), Some(vec![(1, 7), (2, 8)]));
        recent.remove_from(8);
        assert_eq!(ids(recent.get(5, None)).map(|v| v.len()), Some(3));
        recent.remove_through(6);
        assert_eq!(ids(recent.get(7, None)), Some(vec![(1, 7)]));
        // A hole restarts the tail.
        recent.appended(vec![blank(3, 20)]);
        assert_eq!(ids(recent.get(7, Some(8))), None);
        assert_eq!(ids(recent.get(20, None)), Some(vec![(3, 20)]));
        // Bounded by count.
        recent.appended(
            (21..21 + RECENT_ENTRIES as u64)
                .map(|i| blank(3, i))
                .collect(),
        );
        assert_eq!(recent.entries.len(), RECENT_ENTRIES);
        assert_eq!(recent.first_index(), Some(21));
    }

    #[test]
    fn bounds() {
        assert_eq!(index_bounds(&(3..3)), None);
        assert_eq!(index_bounds(&(5..7)), Some((5, Some(7))));
        assert_eq!(index_bounds(&(5..=7)), Some((5, Some(8))));
        assert_eq!(index_bounds(&(5..)), Some((5, None)));
        assert_eq!(index_bounds(&(..=u64::MAX)), Some((0, None)));
        assert_eq!(
            index_bounds(&(Bound::Excluded(u64::MAX), Bound::Unbounded)),
            None
        );
        assert_eq!(
            index_bounds(&(Bound::Included(7), Bound::Excluded(5))),
            None
        );
    }
}
