//! The log of one member: group commit on a single node, in a two-stage pipeline over a
//! write-ahead log.
//!
//! Publishers hand their publishes to the log through a bounded queue; when it is full they
//! wait: that is the backpressure. Two stages, each on its own OS thread, commit them:
//!
//! 1. The **applier** takes everything queued (up to [`LogOptions::max_batch_publishes`]
//!    publishes or [`LogOptions::max_batch_bytes`] bytes) as one batch, runs [`Store::apply`] on
//!    it (in memory: sled is not flushed), encodes the batch as the next write-ahead-log record,
//!    passes both to the flusher through a short bounded queue (4 batches; the applier waits
//!    when it is full) and goes on with the next batch.
//! 2. The **flusher** takes every applied batch waiting, appends their records to the
//!    write-ahead log with ONE write and ONE `fdatasync` (the private `wal` module), then, batch
//!    by batch in apply order, hands the new events to `on_commit` (this is how the hub gets
//!    them, in commit order) and only then acknowledges the batch's publishers. If the sync
//!    fails, a flush of the store stands in for it (see below); if that fails too, every
//!    batch it was to cover fails.
//!
//! So applying batch N+1 overlaps syncing batch N, N concurrent publishers share one apply,
//! and the batches applied during one sync share the next. No publish is acknowledged, nor
//! handed to `on_commit`, before its record is durable.
//!
//! When nothing else is outstanding, the publisher's own thread applies, syncs and answers its
//! request (`Committer::commit_now`): one publisher at a time is served as Redis serves it,
//! without the two hand-offs to the applier and back. When the applier's batch is the only one
//! outstanding, it syncs and commits it itself, without a hand-off to the flusher. As soon as
//! publishes overlap, the pipeline above takes over.
//!
//! sled itself is flushed only at **checkpoints**, on a third thread: each time a log segment
//! fills up (64 MiB) or the store's table of recent writes holds many keys (see the `memtable`
//! module), and when the log closes; a checkpoint deletes the segments it covers.
//! [`Store::open`] replays the records a crash left uncovered. If the write-ahead log ever
//! fails (a write or sync error), the log stops using it and flushes sled for every group
//! instead: slower, still durable. All of this is the private `wal` module's `WalWriter`.
//!
//! The stages are threads that block (on their queues, in `apply`, in the sync) rather than
//! Tokio tasks: a task would hand every apply and sync to another thread (`spawn_blocking`)
//! and back, and each hand-off costs wake-ups. Publishers still await their replies on Tokio
//! `oneshot` channels (answered already when their own thread committed them).
//!
//! The cluster replaces this with the partition Raft groups; what it calls on commit is the same
//! [`Store::apply`].

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use tokio::sync::{mpsc, oneshot};

use crate::event::{Event, unix_now_ms};
use crate::namespace::Namespaces;
use crate::store::{Applied, Publish, StorageError, Store};
use crate::wal::{self, Wal, WalWriter};

/// What the log calls with each committed batch's new events (duplicates left out), in commit
/// order, after the flush and before any publisher of the batch is acknowledged. It runs on the
/// flusher, so it must be quick and must not block (queue to the hub, don't write to sockets):
/// the next flush waits for it. A panic in it is caught and logged; the batch is still
/// acknowledged (it is durable).
pub type OnCommit = Arc<dyn Fn(&[Event]) + Send + Sync>;

/// Applied batches that may wait for the flusher; when that many wait, the applier waits too.
const PIPELINE_DEPTH: usize = 4;

/// Limits of the log; [`LogOptions::default`] is what [`LocalLog::start`] uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogOptions {
    /// Requests (a `publish`, a whole `publish_many` or `enqueue_many`: one RESP read's staged
    /// publishes, up to 1,024 or 1 MiB) that may wait in the queue; default 65,536. Memory is
    /// bounded by the connections' read buffers as well: a connection waits here before it
    /// reads on.
    pub queue_capacity: usize,
    /// A batch stops growing at this many publishes; default 10,000. One `publish_many` is never
    /// split, so a bigger one makes a bigger batch.
    pub max_batch_publishes: usize,
    /// A batch stops growing at this many bytes of channels, payloads and ids; default 16 MiB.
    pub max_batch_bytes: usize,
    /// A write-ahead-log segment is closed (and a checkpoint started) past this many bytes;
    /// default 64 MiB. It bounds both the disk the log uses and the replay after a crash.
    pub segment_bytes: u64,
}

impl Default for LogOptions {
    fn default() -> Self {
        LogOptions {
            queue_capacity: 65_536,
            max_batch_publishes: 10_000,
            max_batch_bytes: 16 << 20,
            segment_bytes: 64 << 20,
        }
    }
}

/// Counters of the log since it started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LogStats {
    /// Batches committed (each is one apply; one flush covers every batch applied while the
    /// flush before it ran).
    pub batches: u64,
    /// Publishes committed (duplicates included).
    pub publishes: u64,
    /// Requests waiting in the queue right now.
    pub queued: usize,
}

enum Msg {
    Publish(Request),
    /// Commit everything queued before this, then stop; the sender is told when done.
    Close(oneshot::Sender<()>),
}

type Reply = oneshot::Sender<Result<Vec<Applied>, StorageError>>;

/// Publishes queued together, and who waits for them: one reply for all of them (a
/// `publish_many`), or one per publish ([`LocalLog::enqueue_many`]), each with how many of the
/// publishes (in order) it answers for.
struct Request {
    publishes: Vec<Publish>,
    bytes: usize,
    replies: Vec<(Reply, usize)>,
}

/// A batch the applier has applied (or failed to), on its way to the flusher.
struct Batch {
    /// Each reply and the number of publishes it answers for, in queue order.
    replies: Vec<(Reply, usize)>,
    /// Requests of the batch (what it takes off [`Committer::outstanding`] once answered).
    requests: usize,
    /// Publishes of the batch.
    count: usize,
    applied: Result<Vec<Applied>, StorageError>,
    /// The batch's write-ahead-log record (when `applied` is `Ok`).
    record: Vec<u8>,
    /// The record's number (when `applied` is `Ok`).
    lsn: u64,
    /// Number of the batch, counting from 1 in apply order (for the tests' trace).
    #[cfg_attr(not(test), allow(dead_code))]
    id: u64,
}

/// What the pipeline did, in order, recorded by the tests' builds.
#[cfg(test)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    /// The apply of batch N returned.
    Applied(u64),
    /// A sync of the write-ahead log (or a flush of the store) started.
    Flush,
    /// Batch N is about to go to `on_commit` and be acknowledged.
    Committed(u64),
}

struct Counters {
    batches: AtomicU64,
    publishes: AtomicU64,
    #[cfg(test)]
    trace: parking_lot::Mutex<Vec<Step>>,
}

impl Counters {
    #[cfg(test)]
    fn trace(&self, step: Step) {
        self.trace.lock().push(step);
    }
}

struct Inner {
    tx: mpsc::Sender<Msg>,
    counters: Arc<Counters>,
    committer: Arc<Committer>,
}

/// A handle to the single-node log; cheap to clone. The pipeline stops once every handle is
/// dropped and the queued publishes are committed.
#[derive(Clone)]
pub struct LocalLog {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for LocalLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalLog")
            .field("stats", &self.stats())
            .finish()
    }
}

impl LocalLog {
    /// Starts the pipeline (three threads) with [`LogOptions::default`]. Called inside a Tokio
    /// runtime, `on_commit` runs in its context. Fails if the store or the OS fails.
    pub fn start(
        store: Arc<Store>,
        namespaces: Arc<Namespaces>,
        on_commit: OnCommit,
    ) -> Result<LocalLog, StorageError> {
        Self::start_with(store, namespaces, on_commit, LogOptions::default())
    }

    /// [`LocalLog::start`] with explicit limits.
    pub fn start_with(
        store: Arc<Store>,
        namespaces: Arc<Namespaces>,
        on_commit: OnCommit,
        options: LogOptions,
    ) -> Result<LocalLog, StorageError> {
        // Store::open replayed what a crash left in the write-ahead log.
        let next_lsn = store.local_log_applied()? + 1;
        let wal = Wal::create(
            &wal::LOCAL.dir(store.dir()),
            next_lsn,
            options.segment_bytes,
        )?;
        let (tx, rx) = mpsc::channel(options.queue_capacity.max(1));
        let counters = Arc::new(Counters {
            batches: AtomicU64::new(0),
            publishes: AtomicU64::new(0),
            #[cfg(test)]
            trace: parking_lot::Mutex::default(),
        });
        let committer = Arc::new(Committer {
            writer: parking_lot::Mutex::new(Some(WalWriter::start(wal, store.clone()))),
            store,
            namespaces,
            on_commit,
            options,
            counters: counters.clone(),
            outstanding: AtomicUsize::new(0),
            stage: parking_lot::Mutex::new(Stage {
                next_lsn,
                next_id: 0,
            }),
            closing: AtomicBool::new(false),
            contended_at: AtomicU64::new(0),
            started: std::time::Instant::now(),
        });
        let (applied_tx, applied_rx) = std::sync::mpsc::sync_channel(PIPELINE_DEPTH);
        let thread_error =
            |e: std::io::Error| StorageError::Internal(format!("cannot start a log thread: {e}"));
        // `on_commit` runs on the flusher (or the applier): give it the caller's runtime, as a
        // task would have.
        let runtime = tokio::runtime::Handle::try_current().ok();
        let applier = committer.clone();
        let flusher = committer.clone();
        let flusher_runtime = runtime.clone();
        let flusher = std::thread::Builder::new()
            .name("herald-log-flush".into())
            .spawn(move || {
                let _runtime = flusher_runtime.as_ref().map(tokio::runtime::Handle::enter);
                flusher.run_flusher(applied_rx)
            })
            .map_err(thread_error)?;
        // If this fails, the flusher sees its queue close and ends.
        std::thread::Builder::new()
            .name("herald-log-apply".into())
            .spawn(move || {
                let _runtime = runtime.as_ref().map(tokio::runtime::Handle::enter);
                applier.run_applier(rx, applied_tx, flusher)
            })
            .map_err(thread_error)?;
        Ok(LocalLog {
            inner: Arc::new(Inner {
                tx,
                counters,
                committer,
            }),
        })
    }

    /// Publishes one event; resolves once it is applied AND flushed (or with the batch's error,
    /// after which its outcome is unknown: retry with a message id to make that safe).
    /// Dropping the future after it was queued does not withdraw the publish.
    pub async fn publish(&self, publish: Publish) -> Result<Applied, StorageError> {
        let mut applied = self.submit(vec![publish]).await?;
        applied
            .pop()
            .ok_or_else(|| StorageError::Internal("the log returned no result".into()))
    }

    /// Publishes several events as one request: they go into the same batch, in order, and
    /// resolve together (the HTTP batch form).
    pub async fn publish_many(&self, batch: Vec<Publish>) -> Result<Vec<Applied>, StorageError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        self.submit(batch).await
    }

    /// Queues one publish and returns at once (or when the queue has room) with a handle to
    /// await its outcome later. Queue order is commit order, so a connection that pipelines
    /// publishes enqueues them one after another and awaits them together: they share a flush.
    pub async fn enqueue(&self, publish: Publish) -> Result<Pending, StorageError> {
        let mut pending = self.enqueue_many(vec![publish]).await?;
        pending
            .pop()
            .ok_or_else(|| StorageError::Internal("the log returned no handle".into()))
    }

    /// Queues several publishes as ONE request (so they go into the same batch, in order) and
    /// returns a handle per publish, to be awaited separately. A connection that read several
    /// pipelined publishes at once hands them over this way: queued one by one, the applier
    /// would wake on the first, commit it alone, and the rest would wait for a second sync.
    pub async fn enqueue_many(
        &self,
        publishes: Vec<Publish>,
    ) -> Result<Vec<Pending>, StorageError> {
        if publishes.is_empty() {
            return Ok(Vec::new());
        }
        let bytes = publishes.iter().map(Publish::size).sum();
        let (replies, pending): (Vec<_>, Vec<_>) = publishes
            .iter()
            .map(|_| {
                let (reply, rx) = oneshot::channel();
                ((reply, 1), Pending(rx))
            })
            .unzip();
        self.send(Request {
            publishes,
            bytes,
            replies,
        })
        .await?;
        Ok(pending)
    }

    /// Hands `request` to the log: committed here and now when nothing else is outstanding
    /// ([`Committer::commit_now`]), else queued for the applier.
    async fn send(&self, request: Request) -> Result<(), StorageError> {
        let committer = &self.inner.committer;
        let Err(request) = committer.commit_now(request) else {
            return Ok(());
        };
        // Counted before it is queued, so that no publish can be committed ahead of it on
        // another thread (see `Committer::outstanding`).
        committer.outstanding.fetch_add(1, Ordering::AcqRel);
        if self.inner.tx.send(Msg::Publish(request)).await.is_err() {
            committer.outstanding.fetch_sub(1, Ordering::AcqRel);
            return Err(StorageError::Closed);
        }
        Ok(())
    }

    async fn submit(&self, publishes: Vec<Publish>) -> Result<Vec<Applied>, StorageError> {
        let (reply, rx) = oneshot::channel();
        let bytes = publishes.iter().map(Publish::size).sum();
        self.send(Request {
            replies: vec![(reply, publishes.len())],
            publishes,
            bytes,
        })
        .await?;
        rx.await.map_err(|_| StorageError::Closed)?
    }

    /// Stops the log for every handle: publishes queued before this call are committed and
    /// acknowledged as usual, later ones fail with [`StorageError::Closed`]. Resolves once the
    /// pipeline has committed its last batch (its flush included), so the node can close the
    /// store after it. Calling it again, or after the pipeline stopped, returns at once.
    pub async fn close(&self) {
        let (done, rx) = oneshot::channel();
        self.inner.committer.closing.store(true, Ordering::Release);
        if self.inner.tx.send(Msg::Close(done)).await.is_ok() {
            let _ = rx.await;
        }
    }

    /// Batches and publishes committed so far, and the current queue length. `publishes /
    /// batches` is the group-commit factor.
    pub fn stats(&self) -> LogStats {
        let tx = &self.inner.tx;
        LogStats {
            batches: self.inner.counters.batches.load(Ordering::Relaxed),
            publishes: self.inner.counters.publishes.load(Ordering::Relaxed),
            queued: tx.max_capacity() - tx.capacity(),
        }
    }
}

/// A publish queued with [`LocalLog::enqueue`], not yet known to be committed.
#[derive(Debug)]
pub struct Pending(oneshot::Receiver<Result<Vec<Applied>, StorageError>>);

impl Pending {
    /// Waits until the publish is applied and flushed (or its batch failed).
    pub async fn wait(self) -> Result<Applied, StorageError> {
        let mut applied = self.0.await.map_err(|_| StorageError::Closed)??;
        applied
            .pop()
            .ok_or_else(|| StorageError::Internal("the log returned no result".into()))
    }
}

struct Committer {
    store: Arc<Store>,
    namespaces: Arc<Namespaces>,
    on_commit: OnCommit,
    options: LogOptions,
    counters: Arc<Counters>,
    /// What syncs: the flusher's, or the applier's (or a publisher's) when nothing else waits.
    /// `None` once closed. Taken before the stage is let go, so records are synced and batches
    /// committed in apply order.
    writer: parking_lot::Mutex<Option<WalWriter>>,
    /// Requests handed to the log and not answered yet: queued, in a batch being applied, at
    /// the flusher, or being committed. Raised before a request is queued, lowered once its
    /// batch is answered: when it is 0 nothing can be committed ahead of a new request, so
    /// the request's own thread may commit it.
    outstanding: AtomicUsize,
    /// Held while a batch is applied: by the applier, or by a publisher committing its own.
    stage: parking_lot::Mutex<Stage>,
    /// `close()` was called: nothing more is committed outside the applier.
    closing: AtomicBool,
    /// When a request last found another outstanding (`started`'s clock in ns, +1; 0: never):
    /// requests are then coming together, and share the pipeline's syncs instead.
    contended_at: AtomicU64,
    /// The clock of `contended_at`.
    started: std::time::Instant,
}

/// How long after a request found another outstanding no request is committed on its own
/// thread: while publishers overlap, a sync their batch shares beats a sync each, and a Tokio
/// worker held by a sync holds up the tasks queued on it.
const CONTENDED: std::time::Duration = std::time::Duration::from_millis(10);

/// The numbering of the batches, under [`Committer::stage`].
struct Stage {
    /// The write-ahead-log record number of the next applied batch.
    next_lsn: u64,
    /// The last batch's number (the tests' trace).
    next_id: u64,
}

/// What the applier carries from one batch to the next.
#[derive(Default)]
struct Intake {
    /// A request that did not fit in the last batch: it starts the next one.
    carry: Option<Request>,
    /// `close()` calls seen; answered once the last batch is committed.
    closing: Vec<oneshot::Sender<()>>,
}

impl Committer {
    /// Grows a batch from `first` with what is queued right now, within the limits. Stops at a
    /// `Close` (which it records).
    fn fill(
        &self,
        first: Request,
        rx: &mut mpsc::Receiver<Msg>,
        intake: &mut Intake,
    ) -> (Vec<Request>, usize) {
        let mut count = first.publishes.len();
        let mut bytes = first.bytes;
        let mut requests = vec![first];
        while count < self.options.max_batch_publishes && bytes < self.options.max_batch_bytes {
            match rx.try_recv() {
                Ok(Msg::Close(done)) => {
                    intake.closing.push(done);
                    break;
                }
                Ok(Msg::Publish(r)) => {
                    if count + r.publishes.len() > self.options.max_batch_publishes
                        || bytes + r.bytes > self.options.max_batch_bytes
                    {
                        intake.carry = Some(r);
                        break;
                    }
                    count += r.publishes.len();
                    bytes += r.bytes;
                    requests.push(r);
                }
                Err(_) => break,
            }
        }
        (requests, count)
    }

    /// Stage 1's work on one batch: [`Store::apply`] (blocking) as write-ahead-log record
    /// `lsn`, and the record's encoding. A panic in it fails the batch.
    fn apply(&self, requests: Vec<Request>, count: usize, id: u64, lsn: u64) -> Batch {
        let mut publishes = Vec::with_capacity(count);
        let mut replies = Vec::with_capacity(requests.len());
        let request_count = requests.len();
        for r in requests {
            replies.extend(r.replies);
            publishes.extend(r.publishes);
        }
        let now = unix_now_ms();
        let (applied, record) = match std::panic::catch_unwind(AssertUnwindSafe(|| {
            self.store
                .apply_logged(&publishes, &self.namespaces, now, lsn)
        }))
        .unwrap_or_else(|_| Err(StorageError::Internal("apply panicked".into())))
        {
            Ok((applied, record)) => (Ok(applied), record),
            Err(e) => (Err(e), Vec::new()),
        };
        #[cfg(test)]
        self.counters.trace(Step::Applied(id));
        Batch {
            replies,
            requests: request_count,
            count,
            applied,
            record,
            lsn,
            id,
        }
    }

    /// Stage 2's work after the flush of `group` returned `flushed`: commits each batch in
    /// apply order (`on_commit`, then its replies), or fails it.
    fn finish(&self, group: &mut Vec<Batch>, flushed: &Result<(), StorageError>) {
        for batch in group.drain(..) {
            // Lowered before the replies go out: a publisher told of its commit finds the log
            // free for its next request.
            self.outstanding.fetch_sub(batch.requests, Ordering::AcqRel);
            let result = match (batch.applied, flushed) {
                (Ok(applied), Ok(())) => Ok(applied),
                (Err(e), _) => Err(e),
                (Ok(_), Err(e)) => Err(e.clone()),
            };
            let applied = match result {
                Ok(applied) => applied,
                Err(e) => {
                    tracing::error!(error = %e, publishes = batch.count, "log batch failed");
                    for (reply, _) in batch.replies {
                        let _ = reply.send(Err(e.clone()));
                    }
                    continue;
                }
            };
            #[cfg(test)]
            self.counters.trace(Step::Committed(batch.id));
            self.counters.batches.fetch_add(1, Ordering::Relaxed);
            self.counters
                .publishes
                .fetch_add(applied.len() as u64, Ordering::Relaxed);
            let events = Applied::new_events(&applied);
            if !events.is_empty() {
                let on_commit = &self.on_commit;
                if std::panic::catch_unwind(AssertUnwindSafe(|| on_commit(&events))).is_err() {
                    tracing::error!(events = events.len(), "on_commit panicked");
                }
            }
            let mut rest = applied.into_iter();
            for (reply, n) in batch.replies {
                let mine: Vec<Applied> = rest.by_ref().take(n).collect();
                let _ = reply.send(Ok(mine));
            }
        }
    }
}

impl Committer {
    /// Commits `request` on the caller's thread, as one batch, when nothing else is
    /// outstanding (no request queued, being applied, at the flusher or being committed) and
    /// no request found another outstanding in the last [`CONTENDED`]:
    /// apply, one write and one `fdatasync`, `on_commit`, the replies. One publisher at a
    /// time is then served as Redis serves it, by the thread that read it, without the two
    /// thread hand-offs of the pipeline (one connection's p50 at 64 B fell from 244 to 140 µs,
    /// Redis `always`'s 207, `docs/benchmarks.md`, session 29). It blocks the caller (a Tokio
    /// worker) for the sync, and for `on_commit` (which waits only when the delivery thread's
    /// queue is full); only one request at a time is committed this way, and as soon as a
    /// second one is outstanding they go to the pipeline. Gives the request back when it
    /// cannot.
    fn commit_now(&self, request: Request) -> Result<(), Request> {
        if self.closing.load(Ordering::Acquire) {
            return Err(request);
        }
        let now = self.started.elapsed().as_nanos() as u64 + 1;
        let contend = |request| {
            self.contended_at.store(now, Ordering::Relaxed);
            Err(request)
        };
        if self.outstanding.load(Ordering::Acquire) != 0 {
            return contend(request);
        }
        let contended = self.contended_at.load(Ordering::Relaxed);
        if contended != 0 && now.saturating_sub(contended) < CONTENDED.as_nanos() as u64 {
            return Err(request);
        }
        let Some(mut stage) = self.stage.try_lock() else {
            return contend(request);
        };
        // Checked again under the stage: a request queued meanwhile goes first.
        if self.outstanding.load(Ordering::Acquire) != 0 {
            return contend(request);
        }
        self.outstanding.fetch_add(1, Ordering::AcqRel);
        stage.next_id += 1;
        let count = request.publishes.len();
        let batch = self.apply(vec![request], count, stage.next_id, stage.next_lsn);
        if batch.applied.is_ok() {
            stage.next_lsn += 1;
        }
        let mut writer = self.writer.lock();
        drop(stage);
        self.commit_with(&mut writer, vec![batch]);
        Ok(())
    }

    /// Stage 1, on its own thread: batches, applies, hands over to the flusher. On close (or
    /// once every handle is dropped) it waits for the flusher to commit the last batch, then
    /// refuses what is still queued and answers the `close()` calls.
    fn run_applier(
        &self,
        mut rx: mpsc::Receiver<Msg>,
        to_flusher: std::sync::mpsc::SyncSender<Batch>,
        flusher: std::thread::JoinHandle<()>,
    ) {
        let mut intake = Intake::default();
        loop {
            let first = match intake.carry.take() {
                Some(r) => r,
                None => match rx.blocking_recv() {
                    Some(Msg::Publish(r)) => r,
                    Some(Msg::Close(done)) => {
                        intake.closing.push(done);
                        break;
                    }
                    None => break,
                },
            };
            let mut stage = self.stage.lock();
            let (requests, count) = self.fill(first, &mut rx, &mut intake);
            stage.next_id += 1;
            let batch = self.apply(requests, count, stage.next_id, stage.next_lsn);
            if batch.applied.is_ok() {
                // A failed apply changed nothing: its number goes to the next batch.
                stage.next_lsn += 1;
            }
            // Nothing else outstanding (nothing queued or carried over, at the flusher or being
            // committed) and the writer free: sync and commit here, which saves a hand-off to
            // the flusher and back at low load. Every earlier batch is answered, so commit
            // order holds. The writer is checked too because a flusher still answering the
            // batch before has counted it off already: waiting for it here would stop this
            // thread applying the next batch. Otherwise the flusher syncs while the next batch
            // is applied.
            let idle = (self.outstanding.load(Ordering::Acquire) == batch.requests
                && intake.closing.is_empty())
            .then(|| self.writer.try_lock())
            .flatten();
            if let Some(mut writer) = idle {
                drop(stage);
                self.commit_with(&mut writer, vec![batch]);
                continue;
            }
            // Blocks while PIPELINE_DEPTH batches wait for the flusher (backpressure).
            let sent = to_flusher.send(batch);
            drop(stage);
            if sent.is_err() {
                // The flusher is gone; the batch's replies were dropped (`Closed`).
                break;
            }
            if !intake.closing.is_empty() {
                break;
            }
        }
        drop(to_flusher);
        if flusher.join().is_err() {
            tracing::error!("local log flusher panicked");
        }
        // The last checkpoint, after the last batch.
        if let Some(writer) = self.writer.lock().take() {
            writer.close();
        }
        // Refuse what is still queued (it was sent after the close) and anything later.
        rx.close();
        while let Some(msg) = rx.blocking_recv() {
            match msg {
                Msg::Publish(r) => {
                    for (reply, _) in r.replies {
                        let _ = reply.send(Err(StorageError::Closed));
                    }
                }
                Msg::Close(done) => intake.closing.push(done),
            }
        }
        for done in intake.closing {
            let _ = done.send(());
        }
        tracing::debug!("local log stopped");
    }

    /// Stage 2, on its own thread: takes every applied batch waiting and commits them
    /// together ([`Committer::commit`]). Ends when the applier is gone and nothing waits.
    fn run_flusher(&self, rx: std::sync::mpsc::Receiver<Batch>) {
        let mut group = Vec::with_capacity(PIPELINE_DEPTH + 1);
        while let Ok(first) = rx.recv() {
            group.push(first);
            while group.len() <= PIPELINE_DEPTH {
                match rx.try_recv() {
                    Ok(batch) => group.push(batch),
                    Err(_) => break,
                }
            }
            self.commit(std::mem::take(&mut group));
        }
    }

    /// Syncs the records of `group` (applied batches, in apply order) once for all of them,
    /// commits them in apply order, and starts a checkpoint if the segment filled up.
    fn commit(&self, group: Vec<Batch>) {
        let mut writer = self.writer.lock();
        self.commit_with(&mut writer, group);
    }

    /// [`Committer::commit`] with the writer already held.
    fn commit_with(&self, writer: &mut Option<WalWriter>, mut group: Vec<Batch>) {
        let Some(writer) = writer.as_mut() else {
            let closed = Err(StorageError::Closed);
            self.finish(&mut group, &closed);
            return;
        };
        // Every batch in `group` was applied before it got here, so their records (or a
        // flush of the store) cover them.
        let flushed = if group.iter().any(|b| b.applied.is_ok()) {
            #[cfg(test)]
            self.counters.trace(Step::Flush);
            let records: Vec<&[u8]> = group
                .iter()
                .filter(|b| b.applied.is_ok())
                .map(|b| b.record.as_slice())
                .collect();
            std::panic::catch_unwind(AssertUnwindSafe(|| writer.sync(&records)))
                .unwrap_or_else(|_| Err(StorageError::Internal("sync panicked".into())))
        } else {
            Ok(())
        };
        let next_lsn = group
            .iter()
            .filter(|b| b.applied.is_ok())
            .map(|b| b.lsn + 1)
            .max();
        self.finish(&mut group, &flushed);
        if let Some(next_lsn) = next_lsn {
            writer.rotate_if_full(next_lsn);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Position;
    use crate::store::StoreOptions;
    use crate::testutil::TempDir;
    use parking_lot::Mutex;
    use std::collections::{BTreeMap, HashSet};

    fn open(dir: &TempDir) -> Arc<Store> {
        let options = StoreOptions {
            partitions: 4,
            cache_capacity: 8 << 20,
            ..StoreOptions::default()
        };
        Arc::new(Store::open(dir.path(), options).unwrap())
    }

    /// A log on `store` with the default namespaces and `options`.
    fn start_with(store: &Arc<Store>, on_commit: OnCommit, options: LogOptions) -> LocalLog {
        LocalLog::start_with(
            store.clone(),
            Arc::new(Namespaces::default()),
            on_commit,
            options,
        )
        .unwrap()
    }

    /// An on_commit that records every batch it is handed.
    fn recorder() -> (OnCommit, Arc<Mutex<Vec<Vec<Event>>>>) {
        let seen = Arc::new(Mutex::new(Vec::<Vec<Event>>::new()));
        let s = seen.clone();
        (
            Arc::new(move |events: &[Event]| s.lock().push(events.to_vec())),
            seen,
        )
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_publishes_share_flushes() {
        let dir = TempDir::new("group");
        let store = open(&dir);
        let (on_commit, seen) = recorder();
        let log =
            LocalLog::start(store.clone(), Arc::new(Namespaces::default()), on_commit).unwrap();
        let tasks: Vec<_> = (0..200)
            .map(|i| {
                let log = log.clone();
                tokio::spawn(async move {
                    log.publish(Publish::new(format!("ch{}", i % 10), format!("{i}")))
                        .await
                })
            })
            .collect();
        let mut positions = HashSet::new();
        for t in tasks {
            let applied = t.await.unwrap().unwrap();
            assert!(!applied.is_duplicate());
            assert!(positions.insert(applied.position()), "position reused");
        }
        let stats = log.stats();
        assert_eq!(stats.publishes, 200);
        eprintln!("200 concurrent publishes: {} batches", stats.batches);
        assert!(
            stats.batches < 50,
            "200 publishes took {} flushes",
            stats.batches
        );
        let batches = seen.lock().clone();
        assert_eq!(batches.len() as u64, stats.batches);
        // on_commit saw every event once, in commit order: ascending within each partition.
        let mut last: BTreeMap<u16, u64> = BTreeMap::new();
        let mut delivered = 0;
        for e in batches.iter().flatten() {
            let prev = last
                .insert(e.position.partition, e.position.seq)
                .unwrap_or(0);
            assert_eq!(e.position.seq, prev + 1);
            delivered += 1;
        }
        assert_eq!(delivered, 200);
        assert_eq!(store.channel_stats().events, 200);
    }

    /// Many publishers, small batches and a slow `on_commit` (so the applier runs ahead of the
    /// flusher): batches overlap, yet every event reaches `on_commit` once, in commit order, and
    /// each batch is committed only after a flush that started once its apply had returned.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn overlapping_batches_commit_in_order_after_a_later_flush() {
        let dir = TempDir::new("pipeline");
        let store = open(&dir);
        let seen = Arc::new(Mutex::new(Vec::<Event>::new()));
        let s = seen.clone();
        let on_commit: OnCommit = Arc::new(move |events: &[Event]| {
            s.lock().extend_from_slice(events);
            std::thread::sleep(std::time::Duration::from_millis(2));
        });
        let options = LogOptions {
            max_batch_publishes: 4,
            ..LogOptions::default()
        };
        let log = start_with(&store, on_commit, options);
        const PUBLISHERS: usize = 32;
        const EACH: usize = 20;
        let tasks: Vec<_> = (0..PUBLISHERS)
            .map(|p| {
                let log = log.clone();
                tokio::spawn(async move {
                    let mut acked = Vec::new();
                    for i in 0..EACH {
                        let publish = Publish::new(format!("ch{p}"), format!("{i}"));
                        acked.push(log.publish(publish).await.unwrap().position());
                    }
                    acked
                })
            })
            .collect();
        let mut acked = HashSet::new();
        for t in tasks {
            for position in t.await.unwrap() {
                assert!(acked.insert(position), "position reused");
            }
        }
        let total = PUBLISHERS * EACH;
        assert_eq!(acked.len(), total);

        // on_commit saw each acknowledged event once, in commit order.
        let seen = seen.lock().clone();
        assert_eq!(seen.len(), total);
        assert_eq!(
            seen.iter().map(|e| e.position).collect::<HashSet<_>>(),
            acked
        );
        let mut last: BTreeMap<u16, u64> = BTreeMap::new();
        for e in &seen {
            let prev = last
                .insert(e.position.partition, e.position.seq)
                .unwrap_or(0);
            assert_eq!(e.position.seq, prev + 1, "out of commit order");
        }

        // Each batch: applied, then a flush started, then committed; batches in apply order.
        let trace = log.inner.counters.trace.lock().clone();
        let mut applied = HashSet::new();
        let mut flushed = HashSet::new(); // applied before the latest flush started
        let mut next_commit = 1;
        let mut overlapped = 0; // batches applied while an earlier one waited for its commit
        let mut shared = 0; // flushes that covered more than one batch
        let mut this_flush = 0;
        for step in &trace {
            match *step {
                Step::Applied(id) => {
                    if id > next_commit {
                        overlapped += 1;
                    }
                    applied.insert(id);
                }
                Step::Flush => {
                    shared += usize::from(this_flush > 1);
                    this_flush = 0;
                    flushed.extend(applied.iter().copied());
                }
                Step::Committed(id) => {
                    assert_eq!(id, next_commit, "committed out of apply order");
                    assert!(
                        flushed.contains(&id),
                        "batch {id} committed before a flush after its apply"
                    );
                    next_commit += 1;
                    this_flush += 1;
                }
            }
        }
        shared += usize::from(this_flush > 1);
        let stats = log.stats();
        assert_eq!(stats.batches, next_commit - 1);
        assert_eq!(stats.batches as usize, applied.len());
        assert_eq!(stats.publishes as usize, total);
        let flushes = trace.iter().filter(|s| **s == Step::Flush).count();
        eprintln!(
            "{total} publishes: {} batches, {flushes} flushes, {overlapped} applied ahead, {shared} shared flushes",
            stats.batches
        );
        assert!(overlapped > 0, "no apply overlapped a flush");
        assert!(shared > 0, "no flush covered two batches");
        assert_eq!(store.channel_stats().events as usize, total);
    }

    /// With nothing else outstanding, a request is committed by the thread that hands it
    /// over: its outcome is there when `enqueue` returns, and `on_commit` has seen it.
    #[tokio::test]
    async fn a_lone_request_is_committed_before_enqueue_returns() {
        let dir = TempDir::new("inline");
        let store = open(&dir);
        let (on_commit, seen) = recorder();
        let log = start_with(&store, on_commit, LogOptions::default());
        for i in 1..=3u64 {
            let Pending(mut outcome) = log
                .enqueue(Publish::new("a", format!("{i}")))
                .await
                .unwrap();
            let applied = outcome
                .try_recv()
                .expect("answered before enqueue returned");
            assert_eq!(applied.unwrap()[0].position().seq, i);
            assert_eq!(seen.lock().len() as u64, i);
        }
        assert_eq!(log.inner.committer.outstanding.load(Ordering::Acquire), 0);
    }

    /// A request handed over while another is outstanding (here: queued while the applier
    /// is held mid-batch) is queued behind it, never committed ahead of it by its own thread.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[expect(
        clippy::await_holding_lock,
        reason = "the held stage is the applier stopped mid-batch; enqueue only tries it"
    )]
    async fn a_request_behind_an_outstanding_one_waits_its_turn() {
        let dir = TempDir::new("inline-order");
        let store = open(&dir);
        let (on_commit, seen) = recorder();
        let log = start_with(&store, on_commit, LogOptions::default());
        let stage = log.inner.committer.stage.lock();
        let Pending(mut first) = log.enqueue(Publish::new("a", "first")).await.unwrap();
        let Pending(mut second) = log.enqueue(Publish::new("a", "second")).await.unwrap();
        assert!(first.try_recv().is_err() && second.try_recv().is_err());
        assert_eq!(log.inner.committer.outstanding.load(Ordering::Acquire), 2);
        drop(stage);
        let first = Pending(first).wait().await.unwrap();
        let second = Pending(second).wait().await.unwrap();
        assert_eq!((first.position().seq, second.position().seq), (1, 2));
        let payloads: Vec<String> = seen
            .lock()
            .iter()
            .flatten()
            .map(|e| String::from_utf8_lossy(&e.payload).into_owned())
            .collect();
        assert_eq!(payloads, ["first", "second"]);
        assert_eq!(log.inner.committer.outstanding.load(Ordering::Acquire), 0);
    }

    #[tokio::test]
    async fn acknowledged_only_after_on_commit() {
        let dir = TempDir::new("ack");
        let delivered = Arc::new(Mutex::new(HashSet::<Position>::new()));
        let d = delivered.clone();
        let on_commit: OnCommit = Arc::new(move |events: &[Event]| {
            d.lock().extend(events.iter().map(|e| e.position));
        });
        let log = LocalLog::start(open(&dir), Arc::new(Namespaces::default()), on_commit).unwrap();
        for i in 0..20 {
            let a = log
                .publish(Publish::new("c", format!("{i}")))
                .await
                .unwrap();
            assert!(delivered.lock().contains(&a.position()));
        }
    }

    #[tokio::test]
    async fn publish_many_is_one_round_in_order() {
        let dir = TempDir::new("many");
        let (on_commit, seen) = recorder();
        let store = open(&dir);
        let log =
            LocalLog::start(store.clone(), Arc::new(Namespaces::default()), on_commit).unwrap();
        assert!(log.publish_many(Vec::new()).await.unwrap().is_empty());
        let batch: Vec<Publish> = (0..50)
            .map(|i| Publish::new("one", format!("{i}")))
            .collect();
        let applied = log.publish_many(batch).await.unwrap();
        assert_eq!(applied.len(), 50);
        let seqs: Vec<u64> = applied.iter().map(|a| a.position().seq).collect();
        assert_eq!(seqs, (1..=50).collect::<Vec<_>>());
        assert_eq!(log.stats().batches, 1);
        assert_eq!(seen.lock().len(), 1);
        let h = store.history_after(b"one", Some(45), 10).unwrap();
        assert_eq!(h.len(), 5);
        assert_eq!(h[0].payload, "45");
    }

    #[tokio::test]
    async fn enqueue_many_is_one_batch_with_a_result_per_publish() {
        let dir = TempDir::new("enqueue-many");
        let (on_commit, seen) = recorder();
        let log = LocalLog::start(open(&dir), Arc::new(Namespaces::default()), on_commit).unwrap();
        assert!(log.enqueue_many(Vec::new()).await.unwrap().is_empty());
        // A duplicate inside the request answers its own handle with the original position.
        let batch: Vec<Publish> = (0..40)
            .map(|i| Publish::new(if i % 2 == 0 { "a" } else { "b" }, format!("{i}")))
            .chain([Publish::new("a", "again").with_id("x")])
            .chain([Publish::new("a", "again").with_id("x")])
            .collect();
        let pending = log.enqueue_many(batch).await.unwrap();
        assert_eq!(pending.len(), 42);
        let mut results = Vec::new();
        for p in pending {
            results.push(p.wait().await.unwrap());
        }
        let seqs: Vec<(bool, u64)> = results[..40]
            .iter()
            .map(|a| (matches!(a, Applied::New(_)), a.position().seq))
            .collect();
        // "a" and "b" hash to their partitions; within each, sequence numbers follow the
        // request's order.
        for parity in 0..2 {
            let mine: Vec<u64> = seqs
                .iter()
                .skip(parity)
                .step_by(2)
                .map(|(new, seq)| {
                    assert!(new);
                    *seq
                })
                .collect();
            assert!(mine.windows(2).all(|w| w[0] < w[1]), "{mine:?}");
        }
        assert!(matches!(results[40], Applied::New(_)));
        assert_eq!(results[41], Applied::Duplicate(results[40].position()));
        assert_eq!(log.stats().batches, 1);
        assert_eq!(seen.lock().len(), 1);
    }

    #[tokio::test]
    async fn duplicates_are_acknowledged_but_not_delivered() {
        let dir = TempDir::new("dup");
        let (on_commit, seen) = recorder();
        let log = LocalLog::start(open(&dir), Arc::new(Namespaces::default()), on_commit).unwrap();
        let first = log
            .publish(Publish::new("c", "x").with_id("id-1"))
            .await
            .unwrap();
        let retry = log
            .publish(Publish::new("c", "x").with_id("id-1"))
            .await
            .unwrap();
        assert_eq!(retry, Applied::Duplicate(first.position()));
        let events: usize = seen.lock().iter().map(Vec::len).sum();
        assert_eq!(events, 1);
        assert_eq!(log.stats().publishes, 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn small_queue_and_batch_limits_backpressure_without_loss() {
        let dir = TempDir::new("limits");
        let (on_commit, seen) = recorder();
        let options = LogOptions {
            queue_capacity: 4,
            max_batch_publishes: 10,
            max_batch_bytes: 1 << 20,
            ..LogOptions::default()
        };
        let log = LocalLog::start_with(
            open(&dir),
            Arc::new(Namespaces::default()),
            on_commit,
            options,
        )
        .unwrap();
        let tasks: Vec<_> = (0..100)
            .map(|i| {
                let log = log.clone();
                tokio::spawn(async move { log.publish(Publish::new(format!("c{i}"), "p")).await })
            })
            .collect();
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        let seen = seen.lock();
        assert!(seen.iter().all(|b| b.len() <= 10));
        assert_eq!(seen.iter().map(Vec::len).sum::<usize>(), 100);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn close_commits_what_was_queued_then_refuses() {
        let dir = TempDir::new("close");
        let (on_commit, seen) = recorder();
        let store = open(&dir);
        let log =
            LocalLog::start(store.clone(), Arc::new(Namespaces::default()), on_commit).unwrap();
        let queued: Vec<_> = (0..50)
            .map(|i| {
                let log = log.clone();
                tokio::spawn(async move { log.publish(Publish::new("c", format!("{i}"))).await })
            })
            .collect();
        // Wait until every task has its publish in the queue or committed.
        while log.stats().publishes + log.stats().queued as u64 == 0 {
            tokio::task::yield_now().await;
        }
        log.close().await;
        let mut ok = 0;
        for t in queued {
            match t.await.unwrap() {
                Ok(_) => ok += 1,
                Err(e) => assert!(matches!(e, StorageError::Closed), "{e}"),
            }
        }
        // Everything acknowledged was delivered and stored; nothing else was.
        assert_eq!(seen.lock().iter().map(Vec::len).sum::<usize>(), ok);
        assert_eq!(store.history_after(b"c", None, 100).unwrap().len(), ok);
        let err = log.publish(Publish::new("c", "late")).await.unwrap_err();
        assert!(matches!(err, StorageError::Closed));
        assert_eq!(err.to_string(), "the log is closed");
        log.close().await;
    }

    #[tokio::test]
    async fn a_panicking_on_commit_does_not_lose_acks() {
        let dir = TempDir::new("panic");
        let on_commit: OnCommit = Arc::new(|_: &[Event]| panic!("hub bug"));
        let store = open(&dir);
        let log =
            LocalLog::start(store.clone(), Arc::new(Namespaces::default()), on_commit).unwrap();
        let a = log.publish(Publish::new("c", "x")).await.unwrap();
        let b = log.publish(Publish::new("c", "y")).await.unwrap();
        assert_eq!(b.position().seq, a.position().seq + 1);
        assert_eq!(store.history_after(b"c", None, 10).unwrap().len(), 2);
    }

    /// Opening a store redoes exactly the write-ahead-log records sled does not hold, so
    /// positions and dedup answers are those the crashed process acknowledged; a log that
    /// skips records the store lacks is refused.
    #[test]
    fn open_replays_only_what_the_store_lacks() {
        let batches: Vec<(u64, Vec<Publish>)> = vec![
            (
                100,
                vec![Publish::new("a", "1").with_id("x"), Publish::new("b", "2")],
            ),
            (101, vec![Publish::new("a", "3")]),
            // A retry of message id "x": a duplicate of the first event.
            (
                102,
                vec![Publish::new("a", "1").with_id("x"), Publish::new("a", "4")],
            ),
        ];
        let namespaces = Namespaces::default();
        let history = |store: &Store, channel: &[u8]| {
            store
                .history_after_at(channel, None, 100, 0)
                .unwrap()
                .into_iter()
                .map(|e| (e.position, e.payload, e.timestamp_ms))
                .collect::<Vec<_>>()
        };

        // What the crashed process did: the batches applied in order, each a record.
        let reference_dir = TempDir::new("replay-reference");
        let reference = open(&reference_dir);
        let mut records = Vec::new();
        let mut outcomes = Vec::new();
        for (lsn, (now, publishes)) in batches.iter().enumerate() {
            let (applied, record) = reference
                .apply_logged(publishes, &namespaces, *now, lsn as u64 + 1)
                .unwrap();
            outcomes.extend(applied);
            records.push(record);
        }
        assert!(outcomes[3].is_duplicate());

        // A store that holds the first record only, with all three in its log.
        let dir = TempDir::new("replay");
        let store = open(&dir);
        store
            .apply_logged(&batches[0].1, &namespaces, batches[0].0, 1)
            .unwrap();
        let mut wal = Wal::create(&wal::LOCAL.dir(store.dir()), 1, 1 << 20).unwrap();
        wal.append(&records.iter().map(Vec::as_slice).collect::<Vec<_>>())
            .unwrap();
        drop(wal);
        store.flush_blocking().unwrap();
        drop(store);

        let store = open(&dir);
        for channel in [&b"a"[..], b"b"] {
            assert_eq!(history(&store, channel), history(&reference, channel));
        }
        assert_eq!(history(&store, b"a").len(), 3, "the retry was stored once");
        assert_eq!(store.local_log_applied().unwrap(), 3);
        for p in 0..store.partitions() {
            assert_eq!(store.latest_seq(p), reference.latest_seq(p));
        }
        // The log is gone once replayed.
        assert!(
            std::fs::read_dir(wal::LOCAL.dir(store.dir()))
                .unwrap()
                .next()
                .is_none()
        );
        drop(store);

        // A log that starts after what the store holds lost records: refused.
        let gap = TempDir::new("replay-gap");
        drop(open(&gap));
        let mut wal = Wal::create(&wal::LOCAL.dir(gap.path()), 2, 1 << 20).unwrap();
        wal.append(&[&records[1]]).unwrap();
        drop(wal);
        let options = StoreOptions {
            partitions: 4,
            ..StoreOptions::default()
        };
        let err = Store::open(gap.path(), options).unwrap_err().to_string();
        assert!(
            err.contains("resumes at record 2 but the store holds only up to 0"),
            "{err}"
        );
    }

    /// Full segments are deleted by checkpoints while publishing goes on, closing deletes the
    /// rest, and everything acknowledged is in the store when it is reopened.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn checkpoints_delete_full_segments_and_close_leaves_no_log() {
        let dir = TempDir::new("checkpoints");
        let store = open(&dir);
        let wal_dir = wal::LOCAL.dir(store.dir());
        let segment_files = || std::fs::read_dir(&wal_dir).unwrap().count();
        let (on_commit, _) = recorder();
        let options = LogOptions {
            segment_bytes: 4 << 10,
            ..LogOptions::default()
        };
        let log = start_with(&store, on_commit, options);
        let mut most = 0;
        for i in 0..300 {
            log.publish(Publish::new(format!("c{}", i % 3), vec![b'x'; 200]))
                .await
                .unwrap();
            most = most.max(segment_files());
        }
        // 300 records of ~220 bytes fill ~16 segments of 4 KiB; checkpoints delete them.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while segment_files() > 2 {
            assert!(
                std::time::Instant::now() < deadline,
                "{} segments stay",
                segment_files()
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert!(most >= 2, "the log never rotated");
        log.close().await;
        assert_eq!(segment_files(), 0, "closing leaves no log behind");
        drop(log);
        drop(store);
        let store = open(&dir);
        let events: usize = (0..3)
            .map(|c| {
                store
                    .history_after(format!("c{c}").as_bytes(), None, 1000)
                    .unwrap()
                    .len()
            })
            .sum();
        assert_eq!(events, 300);
    }

    /// Many small events on distinct channels start a checkpoint long before the segment is
    /// full: a checkpoint's sled batch stays within `memtable::CHECKPOINT_KEYS` keys or so.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_new_keys_start_a_checkpoint_before_the_segment_fills() {
        let dir = TempDir::new("checkpoint-keys");
        let store = open(&dir);
        let wal_dir = wal::LOCAL.dir(store.dir());
        let segment_files = || std::fs::read_dir(&wal_dir).unwrap().count();
        let (on_commit, _) = recorder();
        let log = start_with(&store, on_commit, LogOptions::default());
        // Each publish on a new channel adds two keys (history chunk, channel meta); the
        // records come to a few MiB, far from a 64 MiB segment.
        let publishes = crate::memtable::CHECKPOINT_KEYS;
        for start in (0..publishes).step_by(512) {
            let batch = (start..(start + 512).min(publishes))
                .map(|i| Publish::new(format!("job:{i}"), &b"x"[..]))
                .collect();
            log.publish_many(batch).await.unwrap();
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        // A checkpoint ran: the segment it covered is gone, and sled holds the keys.
        while segment_files() > 1 || store.unwritten_bytes() > 64 << 10 {
            assert!(
                std::time::Instant::now() < deadline,
                "{} segments, {} bytes unwritten",
                segment_files(),
                store.unwritten_bytes()
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        log.close().await;
    }
}
