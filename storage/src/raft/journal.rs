//! The write-ahead log every Raft log of a node shares: what makes an append (or a vote)
//! durable with one write and one `fdatasync` for all the node's groups at once, instead of a
//! sled flush (two device round trips, whole-leaf rewrites, sled's thread-pool wake-ups) per
//! append.
//!
//! A log store hands the journal its writes (entries as keys and values, a truncation as
//! deletions, a vote). The journal writes them to sled at once, so reads see them, followed by
//! the record's number under `KEY_RAFT_LOG`; then it queues the record. One thread appends
//! everything queued while its previous sync ran as one write, `fdatasync`s the segment, and
//! only then reports the writes durable: an append's [`LogFlushed`] callback (openraft goes on
//! meanwhile: a leader replicates while its own append syncs) or a vote's or truncation's
//! waiter. The segment files, their format, the fallback to sled flushes when the log fails
//! and the checkpoints that flush sled and delete full segments are the `wal` module's, shared
//! with the single-node log.
//!
//! ## Recovery
//!
//! sled recovers a prefix of its writes, and every record's writes end with its number, so
//! after a crash sled holds each record up to the number it names (perhaps part of the next)
//! and [`crate::Store::open`] redoes the later ones from the log. Entries are written in index
//! order and a truncation as one atomic batch, so a partly written record never leaves a hole
//! in a log. Purges are not journaled: they delete entries the state machine applied, in an
//! atomic sled batch after those applies, so a purge sled recovers comes with the applies and
//! with the number of every record it purged.

use std::sync::Arc;
use std::thread::JoinHandle;

use openraft::storage::LogFlushed;
use parking_lot::{Condvar, Mutex};
use tokio::sync::oneshot;

use super::TypeConfig;
use crate::store::{Ops, StorageError, Store};
use crate::wal::{self, Wal, WalWriter};

/// Segment size of the journal: a checkpoint (sled flush) runs each time one fills.
const SEGMENT_BYTES: u64 = 64 << 20;

/// How a record's writes go to sled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Write {
    /// One by one, in key order (entries: a prefix of them is a log without holes). Cheaper:
    /// sled seals and writes its buffer, waking its thread pool, for every atomic batch.
    InOrder,
    /// As one atomic sled batch (a truncation: its deletions must not happen in part).
    Atomic,
}

/// Who is told that a record is durable.
pub(crate) enum Done {
    /// openraft's callback for an append.
    Flushed(LogFlushed<TypeConfig>),
    /// A caller waiting (a vote, a truncation).
    Waiter(oneshot::Sender<Result<(), String>>),
}

impl Done {
    fn complete(self, result: &Result<(), StorageError>) {
        match self {
            Done::Flushed(callback) => callback.log_io_completed(
                result
                    .as_ref()
                    .map(|_| ())
                    .map_err(|e| std::io::Error::other(e.to_string())),
            ),
            Done::Waiter(tx) => {
                let _ = tx.send(result.as_ref().map(|_| ()).map_err(|e| e.to_string()));
            }
        }
    }
}

/// Records written to sled and waiting for the writer thread.
struct Queue {
    /// The number the next record gets.
    next_lsn: u64,
    records: Vec<Vec<u8>>,
    done: Vec<Done>,
    /// No more records: the writer syncs what is queued, checkpoints and stops.
    closed: bool,
}

struct Shared {
    store: Arc<Store>,
    queue: Mutex<Queue>,
    wake: Condvar,
}

/// The write-ahead log of the Raft logs in one [`Store`]; see the module docs. One per store:
/// open it once and share it (every [`super::RaftLogStore`] of the store takes it).
pub struct RaftJournal {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for RaftJournal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftJournal")
            .field("dir", &self.shared.store.dir())
            .finish_non_exhaustive()
    }
}

impl RaftJournal {
    /// Starts the journal of `store` (whose [`Store::open`] replayed what a crash left) and its
    /// writer thread. Fails if the store already has an open journal, or the first segment or
    /// the thread cannot be created.
    pub fn open(store: Arc<Store>) -> Result<Arc<RaftJournal>, StorageError> {
        Self::open_with(store, SEGMENT_BYTES)
    }

    fn open_with(store: Arc<Store>, segment_bytes: u64) -> Result<Arc<RaftJournal>, StorageError> {
        if !store.claim_raft_journal() {
            return Err(StorageError::InvalidOptions(format!(
                "the store in {} already has an open raft journal",
                store.dir().display()
            )));
        }
        let started = Self::start(store.clone(), segment_bytes);
        if started.is_err() {
            store.release_raft_journal();
        }
        started
    }

    fn start(store: Arc<Store>, segment_bytes: u64) -> Result<Arc<RaftJournal>, StorageError> {
        let next_lsn = store.raft_log_applied()? + 1;
        let wal = Wal::create(&wal::RAFT.dir(store.dir()), next_lsn, segment_bytes)?;
        let writer = WalWriter::start(wal, store.clone());
        let shared = Arc::new(Shared {
            store,
            queue: Mutex::new(Queue {
                next_lsn,
                records: Vec::new(),
                done: Vec::new(),
                closed: false,
            }),
            wake: Condvar::new(),
        });
        let thread = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("herald-raft-wal".into())
                .spawn(move || shared.run(writer))
                .map_err(|e| {
                    StorageError::Internal(format!("cannot start the raft log writer: {e}"))
                })?
        };
        Ok(Arc::new(RaftJournal {
            shared,
            thread: Mutex::new(Some(thread)),
        }))
    }

    /// The store the journal writes to.
    pub fn store(&self) -> &Arc<Store> {
        &self.shared.store
    }

    /// Writes `ops` to sled (readable at once) and queues them as one record; `done` is told
    /// once the record is durable (or failed to be). An error here means sled refused the
    /// writes (perhaps after some of them) or the journal is closed; `done` is then dropped.
    pub(crate) fn submit(&self, ops: Ops, how: Write, done: Done) -> Result<(), StorageError> {
        let mut queue = self.shared.queue.lock();
        if queue.closed {
            return Err(StorageError::Closed);
        }
        let lsn = queue.next_lsn;
        let record = wal::encode(lsn, &ops);
        let tree = self.shared.store.tree();
        let marker = lsn.to_be_bytes();
        match how {
            Write::InOrder => {
                ops.write_one_by_one(tree)?;
                tree.insert(wal::RAFT.marker, &marker)?;
            }
            Write::Atomic => {
                let mut ops = ops;
                ops.insert(wal::RAFT.marker, &marker);
                tree.apply_batch(ops.into_sled())?;
            }
        }
        queue.next_lsn += 1;
        queue.records.push(record);
        queue.done.push(done);
        drop(queue);
        self.shared.wake.notify_one();
        Ok(())
    }

    /// [`RaftJournal::submit`], then waits until the record is durable.
    pub(crate) async fn write(&self, ops: Ops, how: Write) -> Result<(), StorageError> {
        let (tx, rx) = oneshot::channel();
        self.submit(ops, how, Done::Waiter(tx))?;
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(StorageError::Internal(format!(
                "the raft log could not be made durable: {e}"
            ))),
            Err(_) => Err(StorageError::Closed),
        }
    }

    /// Syncs what is queued, flushes the store, deletes the log and stops the writer thread.
    /// Later submits fail with [`StorageError::Closed`]. Also done on drop.
    pub fn close(&self) {
        self.shared.queue.lock().closed = true;
        self.shared.wake.notify_one();
        if let Some(thread) = self.thread.lock().take() {
            if thread.join().is_err() {
                tracing::error!("the raft log writer panicked");
            }
            self.shared.store.release_raft_journal();
        }
    }
}

impl Drop for RaftJournal {
    fn drop(&mut self) {
        self.close();
    }
}

impl Shared {
    /// The writer thread: one append + `fdatasync` for everything queued, then the callbacks.
    fn run(&self, mut writer: WalWriter) {
        loop {
            let (records, done, next_lsn) = {
                let mut queue = self.queue.lock();
                while queue.records.is_empty() && !queue.closed {
                    self.wake.wait(&mut queue);
                }
                if queue.records.is_empty() {
                    break;
                }
                (
                    std::mem::take(&mut queue.records),
                    std::mem::take(&mut queue.done),
                    queue.next_lsn,
                )
            };
            let slices: Vec<&[u8]> = records.iter().map(Vec::as_slice).collect();
            let result = writer.sync(&slices);
            for d in done {
                d.complete(&result);
            }
            writer.rotate_if_full(next_lsn);
        }
        writer.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::{RaftLogStore, partition_group};
    use crate::testutil::TempDir;
    use crate::{StoreOptions, codec};
    use openraft::storage::{RaftLogStorage, RaftLogStorageExt};
    use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId, Vote};

    fn open(dir: &TempDir) -> Arc<Store> {
        let options = StoreOptions {
            partitions: 2,
            cache_capacity: 8 << 20,
            ..StoreOptions::default()
        };
        Arc::new(Store::open(dir.path(), options).unwrap())
    }

    fn blanks(term: u64, indexes: std::ops::Range<u64>) -> Vec<Entry<TypeConfig>> {
        indexes
            .map(|index| Entry {
                log_id: LogId::new(CommittedLeaderId::new(term, 1), index),
                payload: EntryPayload::Blank,
            })
            .collect()
    }

    /// Every Raft key of `store`, with its value.
    fn raft_keys(store: &Store) -> Vec<(Vec<u8>, Vec<u8>)> {
        store
            .tree()
            .scan_prefix([codec::PREFIX_RAFT])
            .map(|kv| kv.map(|(k, v)| (k.to_vec(), v.to_vec())).unwrap())
            .collect()
    }

    fn segment_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
        std::fs::read_dir(dir)
            .map(|d| d.map(|e| e.unwrap().path()).collect())
            .unwrap_or_default()
    }

    /// A store that lost every journaled write (sled had not flushed them) gets them back from
    /// the journal at open: the same entries, truncation, vote, for every group.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn open_redoes_the_writes_only_the_journal_holds() {
        let crashed = TempDir::new("journal-crashed");
        let store = open(&crashed);
        let journal = RaftJournal::open(store.clone()).unwrap();
        let (a, b) = (partition_group(0), partition_group(1));
        let mut log_a = RaftLogStore::new(journal.clone(), a);
        let mut log_b = RaftLogStore::new(journal.clone(), b);
        log_a.save_vote(&Vote::new_committed(2, 1)).await.unwrap();
        log_a.blocking_append(blanks(1, 1..6)).await.unwrap();
        log_b.blocking_append(blanks(1, 1..3)).await.unwrap();
        // A new leader's entries replace the tail from index 4.
        log_a
            .truncate(LogId::new(CommittedLeaderId::new(1, 1), 4))
            .await
            .unwrap();
        log_a.blocking_append(blanks(2, 4..5)).await.unwrap();
        let expected = raft_keys(&store);
        assert_eq!(
            log_a.get_log_state().await.unwrap().last_log_id,
            Some(LogId::new(CommittedLeaderId::new(2, 1), 4))
        );
        // What a crash leaves: the journal's files, while sled (here: another store) has none.
        let journal_dir = wal::RAFT.dir(store.dir());
        let fresh = TempDir::new("journal-fresh");
        drop(open(&fresh));
        let target = wal::RAFT.dir(fresh.path());
        std::fs::create_dir_all(&target).unwrap();
        for file in segment_files(&journal_dir) {
            std::fs::copy(&file, target.join(file.file_name().unwrap())).unwrap();
        }
        drop((log_a, log_b, journal));
        assert!(
            segment_files(&journal_dir).is_empty(),
            "closing checkpoints and deletes the journal"
        );

        let replayed = open(&fresh);
        let mut got = raft_keys(&replayed);
        got.retain(|(k, _)| k.as_slice() != wal::RAFT.marker);
        assert_eq!(got, expected);
        assert!(segment_files(&target).is_empty(), "replayed and deleted");
        // Numbering goes on after the replayed records.
        let journal = RaftJournal::open(replayed.clone()).unwrap();
        let mut log_b = RaftLogStore::new(journal, b);
        log_b.blocking_append(blanks(1, 3..4)).await.unwrap();
        assert_eq!(replayed.raft_log_applied().unwrap(), 6);
    }

    /// Full segments go at checkpoints while appends go on; one journal per store.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn checkpoints_delete_full_segments_and_a_store_has_one_journal() {
        let dir = TempDir::new("journal-checkpoints");
        let store = open(&dir);
        let journal = RaftJournal::open_with(store.clone(), 4 << 10).unwrap();
        let second = RaftJournal::open(store.clone()).unwrap_err().to_string();
        assert!(
            second.contains("already has an open raft journal"),
            "{second}"
        );
        let journal_dir = wal::RAFT.dir(store.dir());
        let mut log = RaftLogStore::new(journal.clone(), partition_group(0));
        let mut seen = std::collections::BTreeSet::new();
        for i in 1..=400 {
            log.blocking_append(blanks(1, i..i + 1)).await.unwrap();
            seen.extend(segment_files(&journal_dir));
        }
        assert!(seen.len() >= 3, "the journal never rotated: {seen:?}");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while segment_files(&journal_dir).len() > 2 {
            assert!(std::time::Instant::now() < deadline, "full segments stay");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        journal.close();
        assert!(segment_files(&journal_dir).is_empty());
        assert!(
            log.save_vote(&Vote::new_committed(1, 1)).await.is_err(),
            "a closed journal refuses writes"
        );
        drop((log, journal));
        // Closed, the store can have a journal again, and everything is there.
        let journal = RaftJournal::open(store.clone()).unwrap();
        let mut log = RaftLogStore::new(journal, partition_group(0));
        assert_eq!(
            log.get_log_state()
                .await
                .unwrap()
                .last_log_id
                .map(|l| l.index),
            Some(400)
        );
    }
}
