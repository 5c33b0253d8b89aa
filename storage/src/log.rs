//! The log of one member: group commit on a single node.
//!
//! Publishers hand their publishes to one committer task through a bounded queue. The committer
//! takes everything queued (up to [`LogOptions::max_batch_publishes`] publishes or
//! [`LogOptions::max_batch_bytes`] bytes) as one batch, runs [`Store::apply`] on it, flushes the
//! store, hands the new events to `on_commit` (this is how the hub gets them, in commit order),
//! and only then acknowledges every publisher of the batch. While one flush is in flight the next
//! publishes queue up, so N concurrent publishers share one flush. When the queue is full,
//! publishers wait: that is the backpressure.
//!
//! The cluster replaces this with the partition Raft groups; what it calls on commit is the same
//! [`Store::apply`].

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::{mpsc, oneshot};

use crate::event::{Event, unix_now_ms};
use crate::namespace::Namespaces;
use crate::store::{Applied, Publish, StorageError, Store};

/// What the log calls with each committed batch's new events (duplicates left out), in commit
/// order, after the flush and before any publisher of the batch is acknowledged. It runs on the
/// committer task, so it must be quick and must not block (queue to the hub, don't write to
/// sockets). A panic in it is caught and logged; the batch is still acknowledged (it is durable).
pub type OnCommit = Arc<dyn Fn(&[Event]) + Send + Sync>;

/// Limits of the log; [`LogOptions::default`] is what [`LocalLog::start`] uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogOptions {
    /// Requests (a `publish` or a whole `publish_many`) that may wait in the queue; default 65,536.
    pub queue_capacity: usize,
    /// A batch stops growing at this many publishes; default 10,000. One `publish_many` is never
    /// split, so a bigger one makes a bigger batch.
    pub max_batch_publishes: usize,
    /// A batch stops growing at this many bytes of channels, payloads and ids; default 16 MiB.
    pub max_batch_bytes: usize,
}

impl Default for LogOptions {
    fn default() -> Self {
        LogOptions {
            queue_capacity: 65_536,
            max_batch_publishes: 10_000,
            max_batch_bytes: 16 << 20,
        }
    }
}

/// Counters of the log since it started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LogStats {
    /// Batches committed (each is one apply and one flush).
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

struct Request {
    publishes: Vec<Publish>,
    bytes: usize,
    reply: oneshot::Sender<Result<Vec<Applied>, StorageError>>,
}

struct Counters {
    batches: AtomicU64,
    publishes: AtomicU64,
}

struct Inner {
    tx: mpsc::Sender<Msg>,
    counters: Arc<Counters>,
}

/// A handle to the single-node log; cheap to clone. The committer task stops once every handle
/// is dropped and the queued publishes are committed.
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
    /// Starts the committer task with [`LogOptions::default`]. Must be called inside a Tokio
    /// runtime.
    pub fn start(store: Arc<Store>, namespaces: Arc<Namespaces>, on_commit: OnCommit) -> LocalLog {
        Self::start_with(store, namespaces, on_commit, LogOptions::default())
    }

    /// Starts the committer task with explicit limits. Must be called inside a Tokio runtime.
    pub fn start_with(
        store: Arc<Store>,
        namespaces: Arc<Namespaces>,
        on_commit: OnCommit,
        options: LogOptions,
    ) -> LocalLog {
        let (tx, rx) = mpsc::channel(options.queue_capacity.max(1));
        let counters = Arc::new(Counters {
            batches: AtomicU64::new(0),
            publishes: AtomicU64::new(0),
        });
        let committer = Committer {
            store,
            namespaces,
            on_commit,
            options,
            counters: counters.clone(),
        };
        tokio::spawn(committer.run(rx));
        LocalLog {
            inner: Arc::new(Inner { tx, counters }),
        }
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
        let (reply, rx) = oneshot::channel();
        let bytes = publish.size();
        self.inner
            .tx
            .send(Msg::Publish(Request {
                publishes: vec![publish],
                bytes,
                reply,
            }))
            .await
            .map_err(|_| StorageError::Closed)?;
        Ok(Pending(rx))
    }

    async fn submit(&self, publishes: Vec<Publish>) -> Result<Vec<Applied>, StorageError> {
        let (reply, rx) = oneshot::channel();
        let bytes = publishes.iter().map(Publish::size).sum();
        self.inner
            .tx
            .send(Msg::Publish(Request {
                publishes,
                bytes,
                reply,
            }))
            .await
            .map_err(|_| StorageError::Closed)?;
        rx.await.map_err(|_| StorageError::Closed)?
    }

    /// Stops the log for every handle: publishes queued before this call are committed and
    /// acknowledged as usual, later ones fail with [`StorageError::Closed`]. Resolves once the
    /// committer has finished its last batch (its flush included), so the node can close the
    /// store after it. Calling it again, or after the committer stopped, returns at once.
    pub async fn close(&self) {
        let (done, rx) = oneshot::channel();
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
}

impl Committer {
    async fn run(self, mut rx: mpsc::Receiver<Msg>) {
        let mut carry: Option<Request> = None;
        let mut closing: Option<oneshot::Sender<()>> = None;
        loop {
            let first = match carry.take() {
                Some(r) => r,
                None => match rx.recv().await {
                    Some(Msg::Publish(r)) => r,
                    Some(Msg::Close(done)) => {
                        closing = Some(done);
                        break;
                    }
                    None => break,
                },
            };
            let mut count = first.publishes.len();
            let mut bytes = first.bytes;
            let mut requests = vec![first];
            while count < self.options.max_batch_publishes && bytes < self.options.max_batch_bytes {
                match rx.try_recv() {
                    Ok(Msg::Close(done)) => {
                        closing = Some(done);
                        break;
                    }
                    Ok(Msg::Publish(r)) => {
                        if count + r.publishes.len() > self.options.max_batch_publishes
                            || bytes + r.bytes > self.options.max_batch_bytes
                        {
                            carry = Some(r);
                            break;
                        }
                        count += r.publishes.len();
                        bytes += r.bytes;
                        requests.push(r);
                    }
                    Err(_) => break,
                }
            }
            self.commit(requests, count).await;
            if closing.is_some() {
                break;
            }
        }
        // Refuse what is still queued (it was sent after the close) and anything later.
        rx.close();
        while let Some(msg) = rx.recv().await {
            match msg {
                Msg::Publish(r) => {
                    let _ = r.reply.send(Err(StorageError::Closed));
                }
                Msg::Close(done) => {
                    let _ = done.send(());
                }
            }
        }
        if let Some(done) = closing {
            let _ = done.send(());
        }
        tracing::debug!("local log committer stopped");
    }

    async fn commit(&self, mut requests: Vec<Request>, count: usize) {
        let mut publishes = Vec::with_capacity(count);
        let mut counts = Vec::with_capacity(requests.len());
        for r in &mut requests {
            counts.push(r.publishes.len());
            publishes.append(&mut r.publishes);
        }
        let result = self.apply_and_flush(publishes).await;
        match result {
            Ok(applied) => {
                self.counters.batches.fetch_add(1, Ordering::Relaxed);
                self.counters
                    .publishes
                    .fetch_add(applied.len() as u64, Ordering::Relaxed);
                let events: Vec<Event> = applied
                    .iter()
                    .filter_map(|a| match a {
                        Applied::New(e) => Some(e.clone()),
                        Applied::Duplicate(_) => None,
                    })
                    .collect();
                if !events.is_empty() {
                    let on_commit = &self.on_commit;
                    if std::panic::catch_unwind(AssertUnwindSafe(|| on_commit(&events))).is_err() {
                        tracing::error!(events = events.len(), "on_commit panicked");
                    }
                }
                let mut rest = applied.into_iter();
                for (r, n) in requests.into_iter().zip(counts) {
                    let mine: Vec<Applied> = rest.by_ref().take(n).collect();
                    let _ = r.reply.send(Ok(mine));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, publishes = count, "log batch failed");
                for r in requests {
                    let _ = r.reply.send(Err(e.clone()));
                }
            }
        }
    }

    async fn apply_and_flush(&self, publishes: Vec<Publish>) -> Result<Vec<Applied>, StorageError> {
        let store = self.store.clone();
        let namespaces = self.namespaces.clone();
        let now = unix_now_ms();
        let applied =
            tokio::task::spawn_blocking(move || store.apply(&publishes, &namespaces, now))
                .await
                .map_err(|e| StorageError::Internal(format!("apply task failed: {e}")))??;
        self.store.flush().await?;
        Ok(applied)
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
        let log = LocalLog::start(store.clone(), Arc::new(Namespaces::default()), on_commit);
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

    #[tokio::test]
    async fn acknowledged_only_after_on_commit() {
        let dir = TempDir::new("ack");
        let delivered = Arc::new(Mutex::new(HashSet::<Position>::new()));
        let d = delivered.clone();
        let on_commit: OnCommit = Arc::new(move |events: &[Event]| {
            d.lock().extend(events.iter().map(|e| e.position));
        });
        let log = LocalLog::start(open(&dir), Arc::new(Namespaces::default()), on_commit);
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
        let log = LocalLog::start(store.clone(), Arc::new(Namespaces::default()), on_commit);
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
    async fn duplicates_are_acknowledged_but_not_delivered() {
        let dir = TempDir::new("dup");
        let (on_commit, seen) = recorder();
        let log = LocalLog::start(open(&dir), Arc::new(Namespaces::default()), on_commit);
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
        };
        let log = LocalLog::start_with(
            open(&dir),
            Arc::new(Namespaces::default()),
            on_commit,
            options,
        );
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
        let log = LocalLog::start(store.clone(), Arc::new(Namespaces::default()), on_commit);
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
        let log = LocalLog::start(store.clone(), Arc::new(Namespaces::default()), on_commit);
        let a = log.publish(Publish::new("c", "x")).await.unwrap();
        let b = log.publish(Publish::new("c", "y")).await.unwrap();
        assert_eq!(b.position().seq, a.position().seq + 1);
        assert_eq!(store.history_after(b"c", None, 10).unwrap().len(), 2);
    }
}
