//! The store's tree: sled behind an in-memory table of every write since the last checkpoint.
//!
//! Both write-ahead logs (the local log's and the Raft journal, see the `wal` module) make a
//! write durable before sled holds it; sled is only their checkpoint. Writing each apply into
//! sled as it happened cost a third of a node's CPU at 1 KiB events (`Tree::insert` copying
//! the chunk into sled's log, its copy-on-write leaves, its I/O threads writing it all out)
//! and 3.6 KB of disk writes per event on top of the log's 1 KiB, although most of those
//! writes die before the next checkpoint: a history chunk is trimmed once its channel has
//! `history_size` newer events (100 by default), a Raft entry once a snapshot covers it.
//!
//! So writes land in [`Tree`]'s table (a `BTreeMap`), and reads look there first. A
//! checkpoint ([`Tree::flush`]) freezes the table, writes what it holds to sled as ONE atomic
//! batch, flushes sled, and drops it. A key written and removed between two checkpoints never
//! reaches sled. sled on disk therefore always holds the state of some checkpoint, whole, and
//! the write-ahead logs hold everything after it (their records are deleted only once a
//! checkpoint that started after them completed): recovery is unchanged.
//!
//! sled applies a batch under its own lock, which every sled read waits for: a checkpoint's
//! batch of a whole segment holds sled's readers for a few hundred milliseconds. An apply
//! therefore does not ask sled whether it holds a key while a checkpoint runs; it assumes so
//! (a later removal then writes a removal sled may not need), and publishes go on. Reads that
//! fall through the table to sled (older history, a message id older than the table) wait.
//!
//! Memory: the table holds the live writes since the last checkpoint, which the write-ahead
//! log bounds (a checkpoint runs once a 64 MiB segment is full, or once the table holds
//! [`CHECKPOINT_KEYS`] keys), twice during a checkpoint (the frozen table and the new one).

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, VecDeque};
use std::ops::{Bound, RangeBounds};
use std::path::PathBuf;
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use sled::IVec;

use crate::io_watch::{Operation, timed};
use crate::store::Ops;

/// A checkpoint starts once the table holds this many keys, even if the write-ahead log's
/// segment is not full yet. sled writes a checkpoint's batch at roughly 60,000 keys a second,
/// holding every sled read (an apply's lookup of a channel new to the table waits) and every
/// version of the pages it rewrites (its memory) until the batch ends: a 64 MiB segment of
/// small events on distinct channels made a batch of over a million keys, which took 20 s and
/// 5 GB. Bounded by key count, a checkpoint's batch takes about a second and its memory stays
/// near a hundred MiB.
pub(crate) const CHECKPOINT_KEYS: usize = 16 * 1024;

/// A key's state in a table.
#[derive(Clone, Debug)]
enum Slot {
    /// Written; `fresh` when sled (once the frozen table is written) does not hold the key, so
    /// that removing it needs no write to sled at all.
    Value(IVec, bool),
    /// Removed: sled holds a value that must go at the next checkpoint.
    Removed,
}

type Table = BTreeMap<IVec, Slot>;

#[derive(Default)]
struct Tables {
    /// Writes since the checkpoint under way (or the last one).
    active: Table,
    /// The writes a running checkpoint is putting into sled (readers still need them).
    frozen: Option<Arc<Table>>,
    /// Key and value bytes in `active`, and in `frozen`.
    active_bytes: usize,
    frozen_bytes: usize,
}

impl Slot {
    /// The bytes a slot of `key` holds (key and value).
    fn bytes(&self, key: &[u8]) -> usize {
        key.len()
            + match self {
                Slot::Value(value, _) => value.len(),
                Slot::Removed => 0,
            }
    }
}

/// sled's tree behind the table of recent writes (see the module docs). Every read and write
/// of the store's records goes through it.
pub(crate) struct Tree {
    sled: sled::Tree,
    tables: RwLock<Tables>,
    /// One checkpoint at a time.
    checkpoint: Mutex<()>,
}

impl Tree {
    /// `sled` with an empty table.
    pub(crate) fn new(sled: sled::Tree) -> Tree {
        Tree {
            sled,
            tables: RwLock::new(Tables::default()),
            checkpoint: Mutex::new(()),
        }
    }

    /// The value of `key`.
    pub(crate) fn get(&self, key: impl AsRef<[u8]>) -> sled::Result<Option<IVec>> {
        let key = key.as_ref();
        {
            let tables = self.tables.read();
            let slot = tables
                .active
                .get(key)
                .or_else(|| tables.frozen.as_ref().and_then(|f| f.get(key)));
            match slot {
                Some(Slot::Value(value, _)) => return Ok(Some(value.clone())),
                Some(Slot::Removed) => return Ok(None),
                None => {}
            }
        }
        self.sled.get(key)
    }

    /// Sets `key` to `value` (visible to readers at once; durable at the next checkpoint).
    pub(crate) fn insert(&self, key: impl AsRef<[u8]>, value: impl Into<IVec>) -> sled::Result<()> {
        let mut ops = Ops::default();
        ops.insert(key.as_ref(), value);
        self.apply(ops)
    }

    /// Removes `key`.
    pub(crate) fn remove(&self, key: impl AsRef<[u8]>) -> sled::Result<()> {
        let mut ops = Ops::default();
        ops.remove(key.as_ref());
        self.apply(ops)
    }

    /// Applies `ops`: readers see all of them or none.
    pub(crate) fn apply(&self, ops: Ops) -> sled::Result<()> {
        // Readers go on while sled is asked about the keys new to the tables; a checkpoint
        // (which moves keys between the tables and sled) waits. One lookup per key here and
        // one (an entry) below: an apply is on every publish's path.
        let tables = self.tables.upgradable_read();
        // While a checkpoint runs, sled's readers wait for its batch: assume sled holds the key.
        let checkpointing = tables.frozen.is_some();
        let mut held = Vec::with_capacity(ops.len());
        for (key, _) in ops.iter() {
            let known = tables.active.contains_key(key)
                || tables.frozen.as_ref().is_some_and(|f| f.contains_key(key));
            held.push(!known && (checkpointing || self.sled.contains_key(key)?));
        }
        let mut tables = parking_lot::RwLockUpgradableReadGuard::upgrade(tables);
        let Tables {
            active,
            frozen,
            active_bytes,
            ..
        } = &mut *tables;
        for ((key, value), held) in ops.into_entries().zip(held) {
            match active.entry(key) {
                Entry::Occupied(mut slot) => {
                    *active_bytes -= slot.get().bytes(slot.key());
                    match value {
                        Some(value) => {
                            let fresh = matches!(slot.get(), Slot::Value(_, true));
                            let new = Slot::Value(value, fresh);
                            *active_bytes += new.bytes(slot.key());
                            slot.insert(new);
                        }
                        // Written since sled last held the key: forgetting it is enough.
                        None if matches!(slot.get(), Slot::Value(_, true)) => {
                            slot.remove();
                        }
                        None => {
                            *active_bytes += slot.key().len();
                            slot.insert(Slot::Removed);
                        }
                    }
                }
                Entry::Vacant(slot) => {
                    // Whether sled will hold the key once the frozen table is written.
                    let sled_holds = match frozen.as_ref().and_then(|f| f.get(slot.key())) {
                        Some(Slot::Value(..)) => true,
                        Some(Slot::Removed) => false,
                        None => held,
                    };
                    match value {
                        Some(value) => {
                            let new = Slot::Value(value, !sled_holds);
                            *active_bytes += new.bytes(slot.key());
                            slot.insert(new);
                        }
                        None if sled_holds => {
                            *active_bytes += slot.key().len();
                            slot.insert(Slot::Removed);
                        }
                        None => {}
                    }
                }
            }
        }
        Ok(())
    }

    /// The records whose keys start with `prefix`, in key order (double-ended).
    pub(crate) fn scan_prefix(&self, prefix: impl AsRef<[u8]>) -> Iter {
        let prefix = prefix.as_ref();
        let start = Bound::Included(IVec::from(prefix));
        let end = match prefix_end(prefix) {
            Some(end) => Bound::Excluded(IVec::from(end)),
            None => Bound::Unbounded,
        };
        self.iter_bounds(start, end)
    }

    /// The records with keys in `range`, in key order (double-ended).
    pub(crate) fn range<K: AsRef<[u8]>, R: RangeBounds<K>>(&self, range: R) -> Iter {
        let bound = |b: Bound<&K>| match b {
            Bound::Included(k) => Bound::Included(IVec::from(k.as_ref())),
            Bound::Excluded(k) => Bound::Excluded(IVec::from(k.as_ref())),
            Bound::Unbounded => Bound::Unbounded,
        };
        self.iter_bounds(bound(range.start_bound()), bound(range.end_bound()))
    }

    /// Every record, in key order.
    #[cfg(test)]
    pub(crate) fn iter(&self) -> Iter {
        self.iter_bounds(Bound::Unbounded, Bound::Unbounded)
    }

    /// How many records (a full scan).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.iter().count()
    }

    fn iter_bounds(&self, start: Bound<IVec>, end: Bound<IVec>) -> Iter {
        let bounds = (start, end);
        // The table's part of the range, newest slot per key, copied (values are shared).
        let entry = |(k, slot): (&IVec, &Slot)| match slot {
            Slot::Value(v, _) => (k.clone(), Some(v.clone())),
            Slot::Removed => (k.clone(), None),
        };
        let mem: VecDeque<(IVec, Option<IVec>)> = {
            let tables = self.tables.read();
            // No checkpoint under way (the usual case): the active table's range as it is.
            if tables.frozen.is_none() {
                tables
                    .active
                    .range::<IVec, _>(bounds.clone())
                    .map(entry)
                    .collect()
            } else {
                let mut merged: BTreeMap<IVec, &Slot> = BTreeMap::new();
                if let Some(frozen) = &tables.frozen {
                    merged.extend(
                        frozen
                            .range::<IVec, _>(bounds.clone())
                            .map(|(k, s)| (k.clone(), s)),
                    );
                }
                merged.extend(
                    tables
                        .active
                        .range::<IVec, _>(bounds.clone())
                        .map(|(k, s)| (k.clone(), s)),
                );
                merged.iter().map(|(k, slot)| entry((k, *slot))).collect()
            }
        };
        // Read after the table: a checkpoint that moves writes from the table into sled
        // meanwhile shows them twice (same values), never not at all.
        Iter {
            mem,
            sled: self.sled.range(bounds),
            front: None,
            back: None,
        }
    }

    /// The checkpoint: writes the table to sled as one atomic batch and flushes sled, so that
    /// everything written before the call is durable. One at a time; a batch that fails
    /// leaves the table as it was (merged under anything written meanwhile).
    pub(crate) fn flush(&self) -> sled::Result<()> {
        let _one = self.checkpoint.lock();
        let frozen = self.freeze();
        let written = self.write_frozen(&frozen);
        // Once the batch is in, sled holds it (in memory, if the flush fails): the table goes.
        self.thaw(written.is_ok());
        written?;
        // Only sled's flush is timed: building the batch is work in memory, not the disk's.
        let sled = || PathBuf::from("sled (the store's database)");
        timed(Operation::Checkpoint, sled, || self.sled.flush()).map(drop)
    }

    /// [`Tree::flush`] for async callers: the batch is written on a blocking thread.
    pub(crate) async fn flush_async(self: &Arc<Self>) -> sled::Result<()> {
        let tree = self.clone();
        tokio::task::spawn_blocking(move || tree.flush())
            .await
            .unwrap_or_else(|e| {
                Err(sled::Error::Io(std::io::Error::other(format!(
                    "checkpoint task failed: {e}"
                ))))
            })
    }

    /// Moves the table aside for a checkpoint (readers keep seeing it).
    fn freeze(&self) -> Arc<Table> {
        let mut tables = self.tables.write();
        debug_assert!(tables.frozen.is_none());
        let frozen = Arc::new(std::mem::take(&mut tables.active));
        tables.frozen = Some(frozen.clone());
        tables.frozen_bytes = std::mem::take(&mut tables.active_bytes);
        frozen
    }

    fn write_frozen(&self, frozen: &Table) -> sled::Result<()> {
        if frozen.is_empty() {
            return Ok(());
        }
        let mut batch = sled::Batch::default();
        for (key, slot) in frozen {
            match slot {
                Slot::Value(value, _) => batch.insert(key.clone(), value.clone()),
                Slot::Removed => batch.remove(key.clone()),
            }
        }
        self.sled.apply_batch(batch)
    }

    /// Ends a checkpoint: sled now holds the frozen table (`written`), or the table goes back,
    /// under what was written since.
    fn thaw(&self, written: bool) {
        let mut tables = self.tables.write();
        let Some(frozen) = tables.frozen.take() else {
            return;
        };
        tables.frozen_bytes = 0;
        if written {
            // Freeing a segment's worth of keys takes a while: not while applies wait.
            drop(tables);
            drop(frozen);
        } else {
            let newer = std::mem::take(&mut tables.active);
            let mut table = Arc::try_unwrap(frozen).unwrap_or_else(|shared| (*shared).clone());
            for (key, slot) in newer {
                // Whether sled lacks the key: the frozen slot knows (it was not written).
                let fresh = match table.get(&key) {
                    Some(Slot::Value(_, fresh)) => Some(*fresh),
                    Some(Slot::Removed) => Some(false),
                    None => None,
                };
                match slot {
                    Slot::Value(value, newer_fresh) => {
                        table.insert(key, Slot::Value(value, fresh.unwrap_or(newer_fresh)));
                    }
                    Slot::Removed if fresh == Some(true) => {
                        table.remove(&key);
                    }
                    Slot::Removed => {
                        table.insert(key, Slot::Removed);
                    }
                }
            }
            tables.active_bytes = table.iter().map(|(k, slot)| slot.bytes(k)).sum();
            tables.active = table;
        }
    }

    /// Bytes (keys and values) of writes held in memory that sled does not have yet: what the
    /// table costs, for `/metrics`.
    pub(crate) fn unwritten_bytes(&self) -> usize {
        let tables = self.tables.read();
        tables.active_bytes + tables.frozen_bytes
    }

    /// Whether the table holds [`CHECKPOINT_KEYS`] or more keys and no checkpoint runs: the
    /// write-ahead logs then start one before their segment is full (see [`CHECKPOINT_KEYS`]).
    pub(crate) fn wants_checkpoint(&self) -> bool {
        let tables = self.tables.read();
        tables.frozen.is_none() && tables.active.len() >= CHECKPOINT_KEYS
    }
}

impl Drop for Tree {
    /// Writes the table to sled, as sled itself flushes when its database is dropped: a store
    /// closed without a last checkpoint keeps what it was told.
    fn drop(&mut self) {
        let pending = !self.tables.get_mut().active.is_empty();
        if pending && let Err(error) = self.flush() {
            tracing::error!(%error, "writing the store's recent writes to sled on close failed; the write-ahead log replays them at the next start");
        }
    }
}

/// The first key after every key that starts with `prefix` (`None`: no such key).
fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// Records of a [`Tree`] in key order: the table's part of the range merged with sled's, the
/// table's slot winning (a removal hides sled's record).
pub(crate) struct Iter {
    mem: VecDeque<(IVec, Option<IVec>)>,
    sled: sled::Iter,
    /// sled's next record from the front and from the back, read ahead to compare.
    front: Option<(IVec, IVec)>,
    back: Option<(IVec, IVec)>,
}

impl Iter {
    /// The keys only.
    pub(crate) fn keys(self) -> impl DoubleEndedIterator<Item = sled::Result<IVec>> {
        self.map(|kv| kv.map(|(k, _)| k))
    }

    /// The values only.
    #[cfg(test)]
    pub(crate) fn values(self) -> impl DoubleEndedIterator<Item = sled::Result<IVec>> {
        self.map(|kv| kv.map(|(_, v)| v))
    }

    /// sled's next key from `end` (read ahead and kept until taken). The two ends share one
    /// sled iterator: once it is spent, the last record read ahead at the other end is next.
    fn sled_key(&mut self, end: End) -> sled::Result<Option<IVec>> {
        let (slot, other) = match end {
            End::Front => (&mut self.front, &mut self.back),
            End::Back => (&mut self.back, &mut self.front),
        };
        if slot.is_none() {
            let next = match end {
                End::Front => self.sled.next(),
                End::Back => self.sled.next_back(),
            };
            *slot = match next {
                Some(kv) => Some(kv?),
                None => other.take(),
            };
        }
        Ok(slot.as_ref().map(|(k, _)| k.clone()))
    }

    /// The next record from `end`: the table's or sled's, whichever key comes first from that
    /// end; on equal keys the table's slot wins and sled's record is dropped.
    fn step(&mut self, end: End) -> Option<sled::Result<(IVec, IVec)>> {
        loop {
            let sled_key = match self.sled_key(end) {
                Ok(key) => key,
                Err(e) => return Some(Err(e)),
            };
            let mem_key = match end {
                End::Front => self.mem.front(),
                End::Back => self.mem.back(),
            }
            .map(|(k, _)| k);
            let mem_first = match (mem_key, &sled_key) {
                (None, None) => return None,
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (Some(mk), Some(sk)) => match end {
                    End::Front => mk <= sk,
                    End::Back => mk >= sk,
                },
            };
            let sled_slot = match end {
                End::Front => &mut self.front,
                End::Back => &mut self.back,
            };
            if !mem_first {
                return sled_slot.take().map(Ok);
            }
            let (key, value) = match end {
                End::Front => self.mem.pop_front(),
                End::Back => self.mem.pop_back(),
            }?;
            if sled_key.as_ref() == Some(&key) {
                *sled_slot = None;
            }
            if let Some(value) = value {
                return Some(Ok((key, value)));
            }
        }
    }
}

/// Which end of an [`Iter`] a step reads from.
#[derive(Clone, Copy)]
enum End {
    Front,
    Back,
}

impl Iterator for Iter {
    type Item = sled::Result<(IVec, IVec)>;

    fn next(&mut self) -> Option<Self::Item> {
        self.step(End::Front)
    }
}

impl DoubleEndedIterator for Iter {
    fn next_back(&mut self) -> Option<Self::Item> {
        self.step(End::Back)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn tree() -> ((), Arc<Tree>) {
        let db = sled::Config::new().temporary(true).open().unwrap();
        ((), Arc::new(Tree::new(db.open_tree("t").unwrap())))
    }

    fn all(iter: impl Iterator<Item = sled::Result<(IVec, IVec)>>) -> Vec<(Vec<u8>, Vec<u8>)> {
        iter.map(|kv| {
            let (k, v) = kv.unwrap();
            (k.to_vec(), v.to_vec())
        })
        .collect()
    }

    #[derive(Clone, Debug)]
    enum Step {
        Insert(u8, u8),
        Remove(u8),
        Checkpoint,
        /// A checkpoint's first step: applies that follow run while it is under way.
        Freeze,
        /// Its end, with its batch written to sled or failed.
        Thaw(bool),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            4 => (0u8..24, any::<u8>()).prop_map(|(k, v)| Step::Insert(k, v)),
            3 => (0u8..24).prop_map(Step::Remove),
            1 => Just(Step::Checkpoint),
            1 => Just(Step::Freeze),
            1 => any::<bool>().prop_map(Step::Thaw),
        ]
    }

    proptest! {
        /// Whatever the mix of writes and checkpoints (writes during one included, and ones
        /// whose batch failed), the tree reads like a plain map (forward, backward, by prefix,
        /// by range, from both ends at once), and sled alone holds that map after a checkpoint.
        #[test]
        fn reads_like_a_map(steps in proptest::collection::vec(step(), 1..80), lo in 0u8..24, hi in 0u8..24) {
            let (_dir, tree) = tree();
            let mut model: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
            let key = |k: u8| vec![b'k', k / 8, k];
            let mut frozen = None;
            for step in steps {
                match step {
                    Step::Insert(k, v) => {
                        tree.insert(key(k), vec![v]).unwrap();
                        model.insert(key(k), vec![v]);
                    }
                    Step::Remove(k) => {
                        tree.remove(key(k)).unwrap();
                        model.remove(&key(k));
                    }
                    Step::Checkpoint if frozen.is_none() => tree.flush().unwrap(),
                    Step::Freeze if frozen.is_none() => frozen = Some(tree.freeze()),
                    Step::Thaw(written) => if let Some(table) = frozen.take() {
                        if written {
                            tree.write_frozen(&table).unwrap();
                        }
                        tree.thaw(written);
                    },
                    Step::Checkpoint | Step::Freeze => {}
                }
                let want: Vec<_> = model.clone().into_iter().collect();
                prop_assert_eq!(&all(tree.iter()), &want);
                let mut backward = all(tree.iter().rev());
                backward.reverse();
                prop_assert_eq!(&backward, &want);
                let group = [b'k', lo / 8];
                let want_prefix: Vec<_> = want.iter().filter(|(k, _)| k.starts_with(&group)).cloned().collect();
                prop_assert_eq!(&all(tree.scan_prefix(group)), &want_prefix);
                let (a, b) = (key(lo.min(hi)), key(lo.max(hi)));
                let want_range: Vec<_> = want.iter().filter(|(k, _)| *k >= a && *k < b).cloned().collect();
                prop_assert_eq!(&all(tree.range(a.clone()..b.clone())), &want_range);
                // Alternating ends meet in the middle without losing or repeating a record.
                let mut both = tree.iter();
                let (mut front, mut back) = (Vec::new(), Vec::new());
                loop {
                    match both.next() { Some(kv) => front.push(kv.unwrap()), None => break }
                    match both.next_back() { Some(kv) => back.push(kv.unwrap()), None => break }
                }
                back.reverse();
                front.extend(back);
                prop_assert_eq!(all(front.into_iter().map(Ok)), want.clone());
                for k in 0..24 {
                    prop_assert_eq!(tree.get(key(k)).unwrap().map(|v| v.to_vec()), model.get(&key(k)).cloned());
                }
                let (counted, kept, frozen_bytes) = {
                    let tables = tree.tables.read();
                    let frozen_bytes = tables.frozen.as_ref().map_or(0, |f| f.iter().map(|(k, slot)| slot.bytes(k)).sum::<usize>());
                    (tables.active.iter().map(|(k, slot)| slot.bytes(k)).sum::<usize>(), tables.active_bytes, frozen_bytes)
                };
                prop_assert_eq!(kept, counted);
                prop_assert_eq!(tree.unwritten_bytes(), counted + frozen_bytes);
            }
            if let Some(table) = frozen.take() {
                tree.write_frozen(&table).unwrap();
                tree.thaw(true);
            }
            tree.flush().unwrap();
            let in_sled: Vec<_> = tree.sled.iter().map(|kv| { let (k, v) = kv.unwrap(); (k.to_vec(), v.to_vec()) }).collect();
            prop_assert_eq!(in_sled, model.into_iter().collect::<Vec<_>>());
        }
    }

    #[test]
    fn a_key_written_and_removed_between_checkpoints_never_reaches_sled() {
        let (_dir, tree) = tree();
        tree.insert(b"kept", b"1".to_vec()).unwrap();
        tree.insert(b"short-lived", b"2".to_vec()).unwrap();
        tree.remove(b"short-lived").unwrap();
        assert!(!tree.tables.read().active.contains_key(&b"short-lived"[..]));
        tree.flush().unwrap();
        assert_eq!(tree.sled.len(), 1);
        // Removing what sled holds leaves a removal for the next checkpoint.
        tree.remove(b"kept").unwrap();
        assert_eq!(tree.get(b"kept").unwrap(), None);
        assert_eq!(tree.sled.len(), 1);
        tree.flush().unwrap();
        assert_eq!(tree.sled.len(), 0);
    }

    /// Reads during a checkpoint see the frozen table under the new writes; a checkpoint
    /// whose batch failed puts the table back under them, nothing lost or resurrected.
    #[test]
    fn reads_during_a_checkpoint_and_after_a_failed_one() {
        for written in [true, false] {
            let (_dir, tree) = tree();
            tree.insert(b"a", b"1".to_vec()).unwrap();
            tree.flush().unwrap();
            tree.insert(b"b", b"2".to_vec()).unwrap();
            tree.remove(b"a").unwrap();
            let frozen = tree.freeze();
            // Meanwhile: b changes, c comes and goes, a comes back.
            tree.insert(b"b", b"3".to_vec()).unwrap();
            tree.insert(b"c", b"4".to_vec()).unwrap();
            tree.remove(b"c").unwrap();
            tree.insert(b"a", b"5".to_vec()).unwrap();
            let want = vec![
                (b"a".to_vec(), b"5".to_vec()),
                (b"b".to_vec(), b"3".to_vec()),
            ];
            assert_eq!(all(tree.scan_prefix(b"")), want);
            assert_eq!(
                all(tree.iter().rev()).into_iter().rev().collect::<Vec<_>>(),
                want
            );
            if written {
                tree.write_frozen(&frozen).unwrap();
            }
            tree.thaw(written);
            assert_eq!(all(tree.scan_prefix(b"")), want, "written: {written}");
            tree.remove(b"a").unwrap();
            tree.flush().unwrap();
            let in_sled: Vec<_> = all(tree.sled.iter());
            assert_eq!(
                in_sled,
                vec![(b"b".to_vec(), b"3".to_vec())],
                "written: {written}"
            );
            let counted: usize = {
                let tables = tree.tables.read();
                tables.active.iter().map(|(k, slot)| slot.bytes(k)).sum()
            };
            assert_eq!(tree.unwritten_bytes(), counted);
        }
    }

    /// A checkpoint of a table as big as a full log segment (64 MiB) is one sled batch: sled
    /// takes it, and a reopened database has all of it.
    #[test]
    fn a_segment_sized_table_checkpoints_whole() {
        let dir = crate::testutil::TempDir::new("memtable-big");
        let value = vec![7u8; 256 << 10];
        {
            let db = sled::Config::new().path(dir.path()).open().unwrap();
            let tree = Tree::new(db.open_tree("t").unwrap());
            for i in 0u32..256 {
                tree.insert(i.to_be_bytes(), value.clone()).unwrap();
            }
            assert_eq!(tree.sled.len(), 0);
            tree.flush().unwrap();
            assert_eq!(tree.sled.len(), 256);
        }
        // sled's flusher thread lets the file lock go a moment after the database is dropped
        // (a reopen at once failed with "could not acquire lock" on a loaded machine).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let db = loop {
            match sled::Config::new().path(dir.path()).open() {
                Ok(db) => break db,
                Err(error) if std::time::Instant::now() < deadline => {
                    assert!(error.to_string().contains("lock"), "{error}");
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                Err(error) => panic!("{error}"),
            }
        };
        let tree = db.open_tree("t").unwrap();
        assert_eq!(tree.len(), 256);
        assert!(tree.iter().values().all(|v| v.unwrap()[..] == value[..]));
    }
}
