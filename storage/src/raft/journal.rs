//! The write-ahead log every Raft log and state machine of a node shares: what makes an
//! append (or a vote) durable with one `fdatasync` for all the node's groups at once, instead
//! of a sled flush (two device round trips, whole-leaf rewrites, sled's thread-pool wake-ups)
//! per append, and what keeps an apply whole across a crash without an atomic sled batch.
//!
//! A log store hands the journal its writes (entries as keys and values, a truncation as
//! deletions, a vote); a state machine the writes of one entry's apply. The journal writes
//! them as one record to its current segment (`pwrite`, no sync), then to sled, so reads see
//! them, followed by the record's number under `KEY_RAFT_LOG`. One thread `fdatasync`s the
//! segment for everything written since its last round, and only then reports the writes
//! durable: an append's [`LogFlushed`] callback (openraft goes on meanwhile: a leader
//! replicates while its own append syncs) or a vote's or truncation's waiter; nobody waits for
//! an apply's record (the entry is in the Raft log), so it shares the next append's sync, or
//! gets one of its own at most [`UNWAITED_SYNC_DELAY`] after it was written. The segment
//! files, their format and the checkpoints that flush sled and delete full segments are the
//! `wal` module's, shared with the single-node log; if the log fails, every sync becomes a
//! flush of the store.
//!
//! ## Recovery
//!
//! sled recovers a prefix of its writes, and every record's writes end with its number, so
//! after a crash sled holds each record up to the number it names (perhaps part of the next)
//! and [`crate::Store::open`] redoes the later ones from the log. A record is in the file
//! before any of its writes reaches sled, so after `kill -9` no write sled kept lacks its
//! record: an apply is whole or redone whole (a power loss can still lose a record sled's own
//! buffer write outran; see `docs/architecture.md`). Entries are written in index order and a
//! truncation as one atomic batch, so a partly written record never leaves a hole in a log.
//! Purges are not journaled: they delete entries the state machine applied, in an atomic sled
//! batch after those applies, so a purge sled recovers comes with the applies and with the
//! number of every record it purged.

use std::fs::File;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use openraft::storage::LogFlushed;
use parking_lot::{Condvar, Mutex};
use tokio::sync::oneshot;

use super::TypeConfig;
use crate::io_watch::{Operation, timed};
use crate::store::{Ops, StorageError, Store};
use crate::wal::{self, Wal, WalWriter};

/// Segment size of the journal: a checkpoint (sled flush) runs each time one fills.
const SEGMENT_BYTES: u64 = 64 << 20;

/// The longest a record nobody waits for (a state machine's apply) stays unsynced when no
/// waited-for record comes along to share a sync with. Under load the next append's sync
/// covers it; syncing applies on their own made 0.87 `fdatasync`s (each ~100 us of CPU) per
/// acknowledged publish on a cluster node at 3x1, against 0.49 without. Kept short so that
/// a checkpoint rarely writes an apply to sled whose record is not yet durable (see
/// `docs/architecture.md` on power loss).
const UNWAITED_SYNC_DELAY: Duration = Duration::from_millis(5);

/// Who is told that a record is durable.
pub(crate) enum Done {
    /// openraft's callback for an append.
    Flushed(LogFlushed<TypeConfig>),
    /// A caller waiting (a vote, a truncation).
    Waiter(oneshot::Sender<Result<(), String>>),
    /// Nobody (a state machine's apply: the entry is in the Raft log already).
    Nobody,
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
            Done::Nobody => {}
        }
    }
}

/// The journal's state, under one lock: records are numbered, written to the log file and
/// to sled in one order.
struct Queue {
    /// The number the next record gets.
    next_lsn: u64,
    /// The log (its fallback to store flushes and its checkpoints included); taken by the
    /// writer thread when it stops.
    writer: Option<WalWriter>,
    /// Who waits for the records written since the writer thread last took this.
    done: Vec<Done>,
    /// When the oldest record nobody waits for (an apply's) was written, if one was since the
    /// writer thread last took `done`: it is synced with the next waited-for record, or
    /// [`UNWAITED_SYNC_DELAY`] after this at the latest.
    unwaited_since: Option<Instant>,
    /// No more records: the writer syncs what is written, checkpoints and stops.
    closed: bool,
}

struct Shared {
    store: Arc<Store>,
    queue: Mutex<Queue>,
    wake: Condvar,
    /// Sync rounds completed (what the tests watch).
    rounds: AtomicU64,
}

/// The write-ahead log of the Raft logs (and state machine applies) in one [`Store`]; see
/// the module docs. One per store: open it once and share it (every
/// [`super::RaftLogStore`] and [`super::GroupStateMachine`] of the store takes it).
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
    /// The journal of `store`: the one open already, or a new one, started on a store whose
    /// [`Store::open`] replayed what a crash left, with its writer thread. Fails if the first
    /// segment or the thread cannot be created, or if the store's previous journal is still
    /// closing.
    pub fn of(store: &Arc<Store>) -> Result<Arc<RaftJournal>, StorageError> {
        let mut slot = store.raft_journal_slot().lock();
        if let Some(journal) = slot.upgrade() {
            return Ok(journal);
        }
        let journal = Self::open(store.clone())?;
        *slot = Arc::downgrade(&journal);
        Ok(journal)
    }

    /// A new journal of `store`; refused if the store has one open (use [`RaftJournal::of`]).
    fn open(store: Arc<Store>) -> Result<Arc<RaftJournal>, StorageError> {
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
        store.journal_started(next_lsn - 1);
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue {
                next_lsn,
                writer: Some(WalWriter::start(wal, store.clone())),
                done: Vec::new(),
                unwaited_since: None,
                closed: false,
            }),
            wake: Condvar::new(),
            rounds: AtomicU64::new(0),
            store,
        });
        let thread = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("herald-raft-wal".into())
                .spawn(move || shared.run())
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

    /// Writes `ops` as the next record to the log file (not synced: see [`Wal::write`]), then
    /// to sled (readable at once); `done` is told once the record is durable (or failed to
    /// be). Writing the record first means that after `kill -9` no write sled kept lacks its
    /// record. An error here means sled refused the writes (perhaps after some of them) or the
    /// journal is closed; `done` is then dropped.
    pub(crate) fn submit(&self, ops: Ops, done: Done) -> Result<(), StorageError> {
        let mut queue = self.shared.queue.lock();
        if queue.closed {
            return Err(StorageError::Closed);
        }
        let lsn = queue.next_lsn;
        if let Some(writer) = &mut queue.writer {
            writer.write(&[&wal::encode(lsn, &ops)]);
        }
        // The number is used even if sled fails below: the record is in the file, and the
        // next start redoes it.
        queue.next_lsn += 1;
        let tree = self.shared.store.tree();
        let marker = lsn.to_be_bytes();
        let mut ops = ops;
        ops.insert(wal::RAFT.marker, &marker);
        tree.apply(ops)?;
        // A record nobody waits for wakes the writer only to start the deadline of its sync.
        let wake = match done {
            Done::Nobody => {
                let first = queue.unwaited_since.is_none();
                if first {
                    queue.unwaited_since = Some(Instant::now());
                }
                first
            }
            done => {
                queue.done.push(done);
                true
            }
        };
        let next_lsn = queue.next_lsn;
        if let Some(writer) = &mut queue.writer {
            writer.rotate_if_full(next_lsn);
        }
        drop(queue);
        if wake {
            self.shared.wake.notify_one();
        }
        Ok(())
    }

    /// [`RaftJournal::submit`], then waits until the record is durable.
    pub(crate) async fn write(&self, ops: Ops) -> Result<(), StorageError> {
        let (tx, rx) = oneshot::channel();
        self.submit(ops, Done::Waiter(tx))?;
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(StorageError::Internal(format!(
                "the raft log could not be made durable: {e}"
            ))),
            Err(_) => Err(StorageError::Closed),
        }
    }

    /// Syncs what is written, flushes the store, deletes the log and stops the writer thread.
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
    /// The writer thread: one `fdatasync` for everything written since the last, then the
    /// callbacks, as soon as someone waits for a record (or [`UNWAITED_SYNC_DELAY`] after a
    /// record nobody waits for); at close, the log's last checkpoint.
    fn run(&self) {
        loop {
            let (done, file, written) = {
                let mut queue = self.queue.lock();
                loop {
                    if !queue.done.is_empty() || queue.closed {
                        break;
                    }
                    match queue.unwaited_since {
                        None => self.wake.wait(&mut queue),
                        Some(since) => {
                            let deadline = since + UNWAITED_SYNC_DELAY;
                            if Instant::now() >= deadline {
                                break;
                            }
                            self.wake.wait_until(&mut queue, deadline);
                        }
                    }
                }
                if queue.done.is_empty() && queue.unwaited_since.is_none() {
                    // Closed, nothing left to sync.
                    break;
                }
                queue.unwaited_since = None;
                (
                    std::mem::take(&mut queue.done),
                    queue.writer.as_ref().and_then(WalWriter::sync_handle),
                    queue.next_lsn - 1,
                )
            };
            let result = self.sync(file.as_deref());
            if result.is_ok() {
                self.store.journal_durable(written);
            }
            self.rounds.fetch_add(1, Ordering::Release);
            for d in done {
                d.complete(&result);
            }
        }
        let writer = self.queue.lock().writer.take();
        if let Some(writer) = writer {
            writer.close();
        }
    }

    /// Makes every record written so far durable: a sync of the current segment, or a flush
    /// of the store once the log was given up (or fails now).
    fn sync(&self, file: Option<&File>) -> Result<(), StorageError> {
        if let Some(file) = file {
            let dir = || wal::RAFT.dir(self.store.dir());
            match timed(Operation::Sync, dir, || file.sync_data()) {
                Ok(()) => return Ok(()),
                Err(error) => {
                    if let Some(writer) = &mut self.queue.lock().writer {
                        writer.fail(&error);
                    }
                }
            }
        }
        // Not under the queue's lock: a flush of the store takes long.
        let disk_full = self
            .queue
            .lock()
            .writer
            .as_ref()
            .map(|writer| writer.flush_store_error());
        match disk_full {
            Some(Some(error)) => Err(error),
            _ => self.store.flush_blocking(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::{Command, GroupStateMachine, RaftLogStore, partition_group};
    use crate::testutil::TempDir;
    use crate::{LiveNamespaces, NamespaceConfig, Namespaces, Publish, StoreOptions, codec};
    use openraft::storage::RaftStateMachine;
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
        // And a state machine's applies: history, dedup, counters, applied state.
        let channel = (0..)
            .map(|i| format!("c{i}"))
            .find(|c| store.partition_of(c.as_bytes()) == 0)
            .unwrap();
        let namespaces = LiveNamespaces::new(Namespaces::new(NamespaceConfig {
            history_size: 3,
            history_ttl: None,
            durable: true,
        }));
        let on_commit: crate::OnCommit = Arc::new(|_: &[crate::Event]| {});
        let mut sm = GroupStateMachine::new(journal.clone(), a, namespaces, on_commit).unwrap();
        for (index, id) in [(5, "m1"), (6, "m2"), (7, "m1")] {
            let entry = Entry {
                log_id: LogId::new(CommittedLeaderId::new(2, 1), index),
                payload: EntryPayload::Normal(Command::Publish {
                    now_ms: 1_000 + index,
                    publishes: (0..2)
                        .map(|i| {
                            Publish::new(channel.clone(), format!("{index}-{i}"))
                                .with_id(format!("{id}-{i}"))
                        })
                        .collect(),
                }),
            };
            log_a.blocking_append([entry.clone()]).await.unwrap();
            sm.apply([entry]).await.unwrap();
        }
        let history = store.history_after(channel.as_bytes(), None, 100).unwrap();
        assert_eq!(history.len(), 3, "retention keeps 3 of the 4 new events");
        let expected = raft_keys(&store);
        assert_eq!(
            log_a.get_log_state().await.unwrap().last_log_id,
            Some(LogId::new(CommittedLeaderId::new(2, 1), 7))
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
        drop((log_a, log_b, sm, journal));
        assert!(
            segment_files(&journal_dir).is_empty(),
            "closing checkpoints and deletes the journal"
        );

        let replayed = open(&fresh);
        let mut got = raft_keys(&replayed);
        got.retain(|(k, _)| k.as_slice() != wal::RAFT.marker);
        assert_eq!(got, expected);
        assert_eq!(
            replayed
                .history_after(channel.as_bytes(), None, 100)
                .unwrap(),
            history
        );
        assert_eq!(replayed.latest_seq(0), 4);
        assert!(segment_files(&target).is_empty(), "replayed and deleted");
        // Numbering goes on after the replayed records.
        let journal = RaftJournal::open(replayed.clone()).unwrap();
        let mut log_b = RaftLogStore::new(journal, b);
        log_b.blocking_append(blanks(1, 3..4)).await.unwrap();
        // 1 vote, 2 appends, 1 truncation, 1 append, 3 x (append + apply), then this append.
        assert_eq!(replayed.raft_log_applied().unwrap(), 12);
    }

    /// What a node shows its peers of its journal: a run starts where the run before it made
    /// its last record durable (a copy of the directory taken earlier would start below).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_run_starts_where_the_one_before_made_records_durable() {
        let dir = TempDir::new("journal-progress");
        let store = open(&dir);
        assert_eq!(store.journal_progress(), None, "no journal yet");
        let journal = RaftJournal::open(store.clone()).unwrap();
        let first = store.journal_progress().unwrap();
        assert_eq!((first.start, first.durable), (0, 0));
        let mut log = RaftLogStore::new(journal.clone(), partition_group(0));
        log.save_vote(&Vote::new_committed(1, 1)).await.unwrap();
        log.blocking_append(blanks(1, 1..4)).await.unwrap();
        let durable = store.journal_progress().unwrap().durable;
        assert_eq!(durable, 2, "a vote and an append");
        log.blocking_append(blanks(1, 4..6)).await.unwrap();
        assert_eq!(store.journal_progress().unwrap().durable, 3);
        drop((log, journal));
        drop(store);

        let store = open(&dir);
        let journal = RaftJournal::open(store.clone()).unwrap();
        let second = store.journal_progress().unwrap();
        assert_ne!(second.run, first.run, "a new run");
        assert_eq!((second.start, second.durable), (3, 3));
        drop(journal);
    }

    /// An apply whose writes the journal refuses (here: it is closed) fails, and the store
    /// refuses every later apply: sled may hold part of the writes, only a restart (which
    /// redoes the journal) makes it whole again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_apply_write_stops_the_store_until_restart() {
        let dir = TempDir::new("journal-broken");
        let store = open(&dir);
        let journal = RaftJournal::open(store.clone()).unwrap();
        let namespaces = LiveNamespaces::new(Namespaces::new(NamespaceConfig {
            history_size: 10,
            history_ttl: None,
            durable: true,
        }));
        let on_commit: crate::OnCommit = Arc::new(|_: &[crate::Event]| {});
        let group = partition_group(0);
        let mut sm =
            GroupStateMachine::new(journal.clone(), group, namespaces.clone(), on_commit).unwrap();
        let channel = (0..)
            .map(|i| format!("c{i}"))
            .find(|c| store.partition_of(c.as_bytes()) == 0)
            .unwrap();
        let publish = |index: u64| Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(Command::Publish {
                now_ms: 1_000,
                publishes: vec![Publish::new(channel.clone(), format!("{index}"))],
            }),
        };
        sm.apply([publish(1)]).await.unwrap();
        journal.close();
        assert!(sm.apply([publish(2)]).await.is_err());
        let refused = store
            .apply(
                &[Publish::new(channel.clone(), "x")],
                namespaces.local(),
                2_000,
            )
            .unwrap_err()
            .to_string();
        assert!(refused.contains("restart the node"), "{refused}");
        drop((sm, journal, store));
        let store = open(&dir);
        assert_eq!(
            store
                .history_after(channel.as_bytes(), None, 10)
                .unwrap()
                .len(),
            1
        );
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
        // Closed, the store can have a journal again (one, shared), and everything is there.
        let journal = RaftJournal::of(&store).unwrap();
        assert!(Arc::ptr_eq(&journal, &RaftJournal::of(&store).unwrap()));
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

    /// A record nobody waits for (an apply's) gets a sync of its own when no append comes
    /// along to share one, instead of staying unsynced until the next append.
    #[test]
    fn a_record_nobody_waits_for_is_synced_on_its_own() {
        let dir = TempDir::new("journal-unwaited");
        let store = open(&dir);
        let journal = RaftJournal::open(store.clone()).unwrap();
        let rounds = || journal.shared.rounds.load(Ordering::Acquire);
        for round in 0..3 {
            let before = rounds();
            let mut ops = Ops::default();
            ops.insert(format!("unwaited-{round}").into_bytes(), &b"x"[..]);
            journal.submit(ops, Done::Nobody).unwrap();
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            while rounds() == before {
                assert!(
                    std::time::Instant::now() < deadline,
                    "round {round}: the record was never synced"
                );
                std::thread::sleep(Duration::from_millis(1));
            }
            assert!(journal.shared.queue.lock().unwaited_since.is_none());
        }
    }
}
