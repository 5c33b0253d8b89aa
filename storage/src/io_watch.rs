//! Timing of the store's own disk writes and syncs: slow ones reported, stalled ones found.
//!
//! Every write and sync of the write-ahead logs (the local log's and the Raft journal's:
//! records, zero-fill, new segments, directory syncs), every checkpoint of recent writes into
//! sled and every sync of sled's files runs through `timed`. One that ends past [`SLOW`] is
//! counted ([`slow_operations`], `herald_disk_slow_operations_total`) and logged as a WARN
//! naming the file.
//!
//! A stalled disk never lets the operation end, so a WARN would never come. So while a write
//! or sync of a log runs ([`Operation::watched`]), its start sits in one of a fixed set of
//! slots, and [`oldest_in_flight`] is the one that started first and how long it has waited;
//! the node's watchdog (`herald serve --disk-stall-timeout`) reads it from a thread of its own,
//! which no stalled write can block, and takes the node down once it passes the limit (see
//! `node/src/disk_watchdog.rs`). Only the logs' operations are watched: each is small (a batch
//! of records, a sync of what was written since the last one), and a Raft append waits for
//! them on the async runtime, so they are what freezes a node. A checkpoint or a sync of sled's
//! files can take long on a working disk (a snapshot installed whole, a start-up's replay):
//! they are timed for the WARN only.
//!
//! Not covered: reads (sled's page reads, history reads, the replay at start-up).
//!
//! Cost per watched operation: a clock read (taken anyway for the WARN), one atomic add and
//! one compare-and-swap to take a slot, one store to give it back; no allocation (the file's
//! path is built only for a WARN).

use std::path::PathBuf;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// A write or sync that takes longer is logged as a WARN: the disk is slow or stalled, and
/// every commit on the node waits for it (a Raft append is written on the async runtime, so
/// while it waits the node answers nothing else either).
pub const SLOW: Duration = Duration::from_millis(500);

/// Operations the watchdog can see at once. The store runs a handful at a time (the local
/// log's writer and syncer, the Raft journal's writer and syncer); past this many, an
/// operation runs unwatched rather than wait for a slot.
const SLOTS: usize = 64;

/// The slots of the operations in flight: each holds 0 (free) or `start << 3 | kind`, `start`
/// in milliseconds since [`base`] plus one (so that a start at 0 ms is not 0).
struct Slots {
    slots: [AtomicU64; SLOTS],
    /// Where the next claim starts looking, spreading concurrent claims over the slots.
    next: AtomicUsize,
}

impl Slots {
    const fn new() -> Slots {
        Slots {
            slots: [const { AtomicU64::new(0) }; SLOTS],
            next: AtomicUsize::new(0),
        }
    }

    /// Takes a free slot for an operation of `kind` started at `start`; an unwatched claim
    /// when every slot is taken.
    fn claim(&self, kind: Operation, start: Instant) -> Claim<'_> {
        let value =
            (start.saturating_duration_since(base()).as_millis() as u64 + 1) << 3 | kind.code();
        let first = self.next.fetch_add(1, Ordering::Relaxed);
        for i in 0..SLOTS {
            let slot = &self.slots[(first + i) % SLOTS];
            if slot
                .compare_exchange(0, value, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                return Claim(Some(slot));
            }
        }
        Claim(None)
    }

    /// The operation in flight that started first, and how long it has run.
    fn oldest(&self) -> Option<(Operation, Duration)> {
        let now = base().elapsed().as_millis() as u64 + 1;
        self.slots
            .iter()
            .map(|slot| slot.load(Ordering::Acquire))
            .filter(|&value| value != 0)
            .map(|value| {
                let kind = Operation::ALL
                    .get((value & 0b111) as usize)
                    .copied()
                    .unwrap_or(Operation::Write);
                (kind, Duration::from_millis(now.saturating_sub(value >> 3)))
            })
            .max_by_key(|(_, running)| *running)
    }
}

/// The process's watched operations.
static IN_FLIGHT: Slots = Slots::new();

/// Writes and syncs that took longer than [`SLOW`], since start.
static SLOW_OPERATIONS: AtomicU64 = AtomicU64::new(0);

/// When the last slow-disk WARN was logged, to log at most one in 10 s.
static SLOW_LOGGED: std::sync::Mutex<Option<Instant>> = std::sync::Mutex::new(None);

/// What a timed operation does, as the watchdog and the WARN name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// A write of a log file (records, zero-fill, a new segment).
    Write,
    /// A sync (`fdatasync`/`fsync`) of a log file or its directory.
    Sync,
    /// A checkpoint's flush of sled (recent writes, already handed to sled, to disk).
    Checkpoint,
    /// A sync of sled's files after a flush.
    StoreSync,
}

impl Operation {
    const ALL: [Operation; 4] = [
        Operation::Write,
        Operation::Sync,
        Operation::Checkpoint,
        Operation::StoreSync,
    ];

    /// The verb for messages: "write", "sync", "checkpoint".
    pub fn verb(self) -> &'static str {
        match self {
            Operation::Write => "write",
            Operation::Sync | Operation::StoreSync => "sync",
            Operation::Checkpoint => "checkpoint",
        }
    }

    /// Whether the watchdog sees it while it runs: the logs' writes and syncs (see the module
    /// doc).
    pub fn watched(self) -> bool {
        matches!(self, Operation::Write | Operation::Sync)
    }

    fn code(self) -> u64 {
        self as u64
    }
}

/// The instant slot times count from (the first use in the process).
fn base() -> Instant {
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

/// How many writes and syncs of the write-ahead logs, and checkpoints, took longer than half a
/// second since the node started, for `/metrics` (`herald_disk_slow_operations_total`): a
/// disk that is slow shows here, and in a WARN naming the file.
pub fn slow_operations() -> u64 {
    SLOW_OPERATIONS.load(Ordering::Relaxed)
}

/// The operation still running that started first, and how long it has run: a disk that
/// stalls shows here while the operation waits (a WARN and [`slow_operations`] come only once
/// it ends). `None` when none runs.
pub fn oldest_in_flight() -> Option<(Operation, Duration)> {
    IN_FLIGHT.oldest()
}

/// An operation's claim on a slot, given back on drop (also when the operation panics).
struct Claim<'a>(Option<&'a AtomicU64>);

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        if let Some(slot) = self.0 {
            slot.store(0, Ordering::Release);
        }
    }
}

/// Runs `operation` (a `kind` of disk operation on the file or directory `path` names, asked
/// for only when it is reported), visible to [`oldest_in_flight`] while it runs if `kind` is
/// [`Operation::watched`], and reports it if it took past [`SLOW`].
pub(crate) fn timed<T>(
    kind: Operation,
    path: impl FnOnce() -> PathBuf,
    operation: impl FnOnce() -> T,
) -> T {
    let start = Instant::now();
    let claim = kind.watched().then(|| IN_FLIGHT.claim(kind, start));
    let result = operation();
    drop(claim);
    let took = start.elapsed();
    if took >= SLOW {
        SLOW_OPERATIONS.fetch_add(1, Ordering::Relaxed);
        let mut logged = SLOW_LOGGED.lock().unwrap_or_else(|e| e.into_inner());
        if logged.is_none_or(|at| at.elapsed() >= Duration::from_secs(10)) {
            *logged = Some(Instant::now());
            tracing::warn!(
                file = %path().display(),
                took_ms = took.as_millis() as u64,
                "the disk took {} ms to {} {}: it is slow or stalled, and every commit on this node waits for it (see herald_disk_slow_operations_total)",
                took.as_millis(),
                kind.verb(),
                match kind {
                    Operation::Checkpoint => "recent writes into the store",
                    Operation::StoreSync => "the store's files",
                    Operation::Write | Operation::Sync => "a write-ahead log file",
                },
            );
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    #[test]
    fn a_slow_operation_is_counted_and_its_result_kept() {
        assert_eq!(
            timed(Operation::Sync, || PathBuf::from("fast.log"), || 7),
            7
        );
        let before = slow_operations();
        let slow = timed(
            Operation::Sync,
            || PathBuf::from("slow.log"),
            || {
                std::thread::sleep(SLOW);
                8
            },
        );
        assert_eq!(slow, 8);
        assert!(slow_operations() > before);
    }

    /// An operation that does not end is seen while it waits, with its kind and a time that
    /// grows, and no longer once it ends. (Other tests of the crate run timed operations
    /// meanwhile: only the one that started first is reported, so the wait is long enough to
    /// be it.)
    #[test]
    fn an_operation_that_does_not_end_is_seen_while_it_runs() {
        let (release, released) = mpsc::channel::<()>();
        let (started, has_started) = mpsc::channel::<()>();
        let stalled = std::thread::spawn(move || {
            timed(
                Operation::Sync,
                || PathBuf::from("stalled"),
                || {
                    started.send(()).unwrap();
                    released.recv().unwrap();
                },
            )
        });
        has_started.recv().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match oldest_in_flight() {
                Some((Operation::Sync, running)) if running >= Duration::from_secs(2) => {
                    break;
                }
                _ if Instant::now() > deadline => {
                    panic!(
                        "the stalled checkpoint was not seen: {:?}",
                        oldest_in_flight()
                    )
                }
                _ => std::thread::sleep(Duration::from_millis(50)),
            }
        }
        release.send(()).unwrap();
        stalled.join().unwrap();
        let gone = Instant::now() + Duration::from_secs(30);
        while oldest_in_flight().is_some_and(|(_, running)| running >= Duration::from_secs(2)) {
            assert!(Instant::now() < gone, "the ended operation is still seen");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Every slot busy: one more operation runs unwatched, and a slot given back serves again.
    #[test]
    fn claims_beyond_the_slots_run_unwatched() {
        let slots = Slots::new();
        let start = Instant::now();
        let claims: Vec<Claim> = (0..SLOTS)
            .map(|_| slots.claim(Operation::Write, start))
            .collect();
        assert!(claims.iter().all(|c| c.0.is_some()));
        assert!(slots.claim(Operation::Write, start).0.is_none());
        drop(claims);
        assert!(slots.claim(Operation::Write, start).0.is_some());
        assert!(slots.oldest().is_none(), "every claim was given back");
    }

    /// Checkpoints and syncs of sled's files are timed but not watched: they can take long on
    /// a working disk.
    #[test]
    fn checkpoints_are_not_watched() {
        let seen = timed(
            Operation::Checkpoint,
            || PathBuf::from("c"),
            || {
                IN_FLIGHT
                    .slots
                    .iter()
                    .filter(|slot| {
                        slot.load(Ordering::Acquire) & 0b111 == Operation::Checkpoint.code()
                    })
                    .filter(|slot| slot.load(Ordering::Acquire) != 0)
                    .count()
            },
        );
        assert_eq!(seen, 0);
        assert!(!Operation::StoreSync.watched());
        assert!(Operation::Write.watched() && Operation::Sync.watched());
    }
}
