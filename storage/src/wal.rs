//! The store's write-ahead logs: what makes a publish durable on one node with ONE append and
//! ONE `fdatasync` (the local log's, [`LOCAL`]), and a Raft append on a cluster node likewise
//! (the Raft journal's, [`RAFT`], written by `raft::journal`). Both work the same way; the
//! local log is described here.
//!
//! A sled flush costs two device round trips (sled's own write + `sync_file_range`, then our
//! `fdatasync`, see the private `disk` module) and rewrites whole leaves (4-5x the payload bytes
//! at 1 KiB). So the local log does not flush sled per batch: it appends the writes each
//! applied batch made to a file of its own, syncs that, and only then acknowledges. sled is
//! written and flushed now and then ("checkpoint"), after which the records it covers are
//! deleted.
//!
//! ## Files
//!
//! `DIR/wal/<first lsn, 20 digits>.log` (the Raft journal: `DIR/raft-wal/`): segments of
//! records, each
//! `u32 LE body length ++ u64 LE xxh3 of body ++ body` (body: see [`encode`]).
//! Records carry consecutive numbers (LSNs) from the segment's first; zeros after them are
//! space written ahead of time (a header of zeros ends the segment's records). A new segment starts
//! once the current one passes `LogOptions::segment_bytes` (64 MiB); a segment is deleted once a sled flush that
//! started after its last record was applied has completed.
//!
//! ## Recovery
//!
//! A record is the apply's writes (keys and new values), not its input, so replaying it is
//! redoing writes: it does not depend on what else sled holds. Each apply writes its LSN
//! (`KEY_LOCAL_LOG`) with its writes, and sled receives them only at checkpoints, as one atomic
//! batch (see the `memtable` module), so after a crash sled holds every record up to the LSN
//! it names, perhaps part of the next, and nothing later;
//! [`crate::Store::open`] rewrites the records after that LSN, in order, flushes, and deletes
//! the log: the store is then what the crashed process had acknowledged. A record cut short
//! (a crash during its append: never acknowledged) ends the log; a bad record followed by
//! good ones is corruption and the store refuses to open.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::path::{Path, PathBuf};

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::io_watch::{Operation, timed};
use crate::store::{Ops, StorageError, Store};

/// How far ahead of its records a segment is zero-filled (see [`Wal::append`]).
const PREALLOCATE: u64 = 256 << 10;

/// The zero-fill's write size: one page per write keeps the page cache's folios for the
/// segment at one page. Zeroed with one 256 KiB write, the segment sat in 256 KiB folios, and
/// every `fdatasync` wrote back (and `/proc/<pid>/io` counted as written) a whole folio for the
/// few hundred bytes a record dirtied: 262,406 `write_bytes` per 340-byte write + sync instead
/// of 4,434 (the device itself wrote ~4.6 KiB either way; measured on this machine).
const PAGE: u64 = 4096;

/// Zero-fills `[from, to)` of `file`, a page per write (see [`PAGE`]).
fn zero_fill(file: &File, from: u64, to: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    const ZEROS: [u8; PAGE as usize] = [0; PAGE as usize];
    let mut at = from;
    while at < to {
        let n = (PAGE - at % PAGE).min(to - at);
        file.write_all_at(&ZEROS[..n as usize], at)?;
        at += n;
    }
    Ok(())
}

/// Bytes before a record's body: length and checksum.
const HEADER: usize = 12;

/// One applied batch as recovery replays it: the writes its apply made, in key order.
#[derive(Debug)]
pub(crate) struct Record {
    /// Its number: one more than the record before it.
    pub lsn: u64,
    /// The apply's writes.
    pub ops: Ops,
}

/// Encodes the record `lsn` of an apply's writes, header included. Body: `u64 LE lsn`, then
/// per write `u32 LE key length ++ key ++ u8 (1 = set, 0 = delete) [++ u32 LE value length
/// ++ value]`; a hand-written format, as it is all byte strings and this is the hot path.
pub(crate) fn encode(lsn: u64, ops: &Ops) -> Vec<u8> {
    let size: usize = ops
        .iter()
        .map(|(k, v)| 9 + k.len() + v.map_or(0, <[u8]>::len))
        .sum();
    let mut out = Vec::with_capacity(HEADER + 8 + size);
    out.extend_from_slice(&[0; HEADER]);
    out.extend_from_slice(&lsn.to_le_bytes());
    let put = |out: &mut Vec<u8>, bytes: &[u8]| {
        let len = u32::try_from(bytes.len()).expect("sled keys and values are under 4 GiB");
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(bytes);
    };
    for (k, v) in ops.iter() {
        put(&mut out, k);
        match v {
            Some(v) => {
                out.push(1);
                put(&mut out, v);
            }
            None => out.push(0),
        }
    }
    let body = &out[HEADER..];
    let len = u32::try_from(body.len()).expect("a batch is far smaller than 4 GiB");
    let sum = xxhash_rust::xxh3::xxh3_64(body);
    out[..4].copy_from_slice(&len.to_le_bytes());
    out[4..HEADER].copy_from_slice(&sum.to_le_bytes());
    out
}

/// Decodes a record body (its checksum already verified).
fn decode(body: &[u8]) -> Option<Record> {
    fn take<'a>(body: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        let (head, rest) = body.split_at_checked(n)?;
        *body = rest;
        Some(head)
    }
    fn bytes<'a>(body: &mut &'a [u8]) -> Option<&'a [u8]> {
        let len = u32::from_le_bytes(take(body, 4)?.try_into().ok()?) as usize;
        take(body, len)
    }
    let mut body = body;
    let lsn = u64::from_le_bytes(take(&mut body, 8)?.try_into().ok()?);
    let mut ops = Ops::default();
    while !body.is_empty() {
        let key = bytes(&mut body)?;
        match take(&mut body, 1)?[0] {
            0 => ops.remove(key),
            1 => ops.insert(key, bytes(&mut body)?),
            _ => return None,
        }
    }
    Some(Record { lsn, ops })
}

pub(crate) fn io_error(what: &str, path: &Path, e: std::io::Error) -> StorageError {
    StorageError::Sled(sled::Error::Io(std::io::Error::new(
        e.kind(),
        format!("{what} {}: {e}", path.display()),
    )))
}

/// `ENOSPC` or `EFBIG` (a file size limit) somewhere in `error`'s chain: the disk is full, as
/// far as this process can tell. Returns its kind and the system's message for it.
fn disk_full_kind(
    error: &(dyn std::error::Error + 'static),
) -> Option<(std::io::ErrorKind, String)> {
    let mut current = Some(error);
    while let Some(error) = current {
        let io = error.downcast_ref::<std::io::Error>().or_else(|| {
            match error.downcast_ref::<StorageError>() {
                Some(StorageError::Sled(sled::Error::Io(io))) => Some(io),
                _ => None,
            }
        });
        if let Some(io) = io
            && matches!(
                io.kind(),
                std::io::ErrorKind::StorageFull | std::io::ErrorKind::FileTooLarge
            )
        {
            return Some((io.kind(), io.to_string()));
        }
        current = error.source();
    }
    None
}

/// One of the store's write-ahead logs: where its segments live and which sled key names the
/// last of its records whose writes sled holds.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LogName {
    /// The directory under the store's, for its segments.
    pub subdir: &'static str,
    /// The key each record's writes end with (the record's LSN, big-endian).
    pub marker: &'static [u8],
    /// What the log is, for messages.
    pub what: &'static str,
}

/// The single-node local log's write-ahead log (see the `log` module).
pub(crate) const LOCAL: LogName = LogName {
    subdir: "wal",
    marker: crate::codec::KEY_LOCAL_LOG,
    what: "local log",
};

/// The write-ahead log every Raft log of the node shares (see `raft::journal`).
pub(crate) const RAFT: LogName = LogName {
    subdir: "raft-wal",
    marker: crate::codec::KEY_RAFT_LOG,
    what: "raft log",
};

impl LogName {
    /// The directory of this log for the store in `store_dir`.
    pub(crate) fn dir(&self, store_dir: &Path) -> PathBuf {
        store_dir.join(self.subdir)
    }
}

fn segment_path(dir: &Path, first_lsn: u64) -> PathBuf {
    dir.join(format!("{first_lsn:020}.log"))
}

/// The segments in `dir`, by first LSN, ascending. Files of other names are left alone.
fn segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, StorageError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_error("cannot list", dir, e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| io_error("cannot list", dir, e))?;
        let name = entry.file_name();
        let Some(first) = name
            .to_str()
            .and_then(|n| n.strip_suffix(".log"))
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        out.push((first, entry.path()));
    }
    out.sort();
    Ok(out)
}

pub(crate) fn sync_dir(dir: &Path) -> Result<(), StorageError> {
    timed(
        Operation::Sync,
        || dir.to_path_buf(),
        || File::open(dir).and_then(|d| d.sync_all()),
    )
    .map_err(|e| io_error("cannot sync", dir, e))
}

/// Reads every whole record of the log in `dir`, in order, and hands each to `replay`.
/// Returns the LSN of the last record read (0 if none). A record cut short or failing its
/// checksum at the end of the last segment ends the log; anywhere else it is corruption.
pub(crate) fn read_all(
    dir: &Path,
    mut replay: impl FnMut(Record) -> Result<(), StorageError>,
) -> Result<u64, StorageError> {
    let segments = segments(dir)?;
    let mut last = 0;
    for (i, (first, path)) in segments.iter().enumerate() {
        let is_last = i + 1 == segments.len();
        let mut bytes = Vec::new();
        File::open(path)
            .and_then(|mut f| f.read_to_end(&mut bytes))
            .map_err(|e| io_error("cannot read", path, e))?;
        let mut at = 0usize;
        let mut expected = *first;
        while at < bytes.len() {
            let bad = |why: &str| {
                StorageError::Corrupt(format!(
                    "write-ahead log {} at byte {at}: {why}",
                    path.display()
                ))
            };
            // Zeros where the next header would be: the unused, preallocated end of the segment.
            if bytes[at..bytes.len().min(at + HEADER)]
                .iter()
                .all(|&b| b == 0)
            {
                break;
            }
            let whole = bytes.get(at..at + HEADER).and_then(|h| {
                let len = u32::from_le_bytes(h[..4].try_into().ok()?) as usize;
                let sum = u64::from_le_bytes(h[4..].try_into().ok()?);
                let body = bytes.get(at + HEADER..at + HEADER + len)?;
                (xxhash_rust::xxh3::xxh3_64(body) == sum).then_some(body)
            });
            let Some(body) = whole else {
                if is_last {
                    tracing::warn!(
                        file = %path.display(),
                        at,
                        dropped = bytes.len() - at,
                        "write-ahead log ends with an incomplete record (a crash during its append; it was never acknowledged)"
                    );
                    break;
                }
                return Err(bad("incomplete or damaged record before the last segment"));
            };
            let record = decode(body).ok_or_else(|| bad("a record that does not decode"))?;
            if record.lsn != expected {
                return Err(bad(&format!(
                    "record {} where {expected} was expected",
                    record.lsn
                )));
            }
            at += HEADER + body.len();
            expected += 1;
            last = record.lsn;
            replay(record)?;
        }
    }
    Ok(last)
}

/// Deletes every segment in `dir`: for after a flush that covers all their records.
pub(crate) fn delete_all(dir: &Path) -> Result<(), StorageError> {
    let paths: Vec<PathBuf> = segments(dir)?.into_iter().map(|(_, p)| p).collect();
    delete(&paths)
}

/// The segment being appended to, and the ones before it still waiting for a checkpoint.
pub(crate) struct Wal {
    dir: PathBuf,
    file: Arc<File>,
    /// The current segment's path.
    path: PathBuf,
    /// Bytes in `file` known to be whole records.
    len: u64,
    /// Bytes of `file` written so far (records, then zeros).
    zeroed: u64,
    /// The segment is full at this many bytes.
    segment_bytes: u64,
    /// Segments before the current one, not yet deleted.
    full: Vec<PathBuf>,
    /// A reusable buffer for one group's records.
    buffer: Vec<u8>,
}

impl Wal {
    /// Starts a new segment whose first record will be `next_lsn`, in the log directory `dir`
    /// (created if needed); segments are full past `segment_bytes`. Call after recovery
    /// ([`crate::Store::open`]).
    pub(crate) fn create(
        dir: &Path,
        next_lsn: u64,
        segment_bytes: u64,
    ) -> Result<Wal, StorageError> {
        std::fs::create_dir_all(dir).map_err(|e| io_error("cannot create", dir, e))?;
        let (file, path) = Self::new_segment(dir, next_lsn)?;
        Ok(Wal {
            dir: dir.to_path_buf(),
            file: Arc::new(file),
            path,
            len: 0,
            zeroed: 0,
            segment_bytes,
            full: Vec::new(),
            buffer: Vec::new(),
        })
    }

    fn new_segment(dir: &Path, first_lsn: u64) -> Result<(File, PathBuf), StorageError> {
        let path = segment_path(dir, first_lsn);
        let file = timed(
            Operation::Write,
            || path.clone(),
            || {
                OpenOptions::new()
                    .create(true)
                    .truncate(true)
                    .write(true)
                    .open(&path)
            },
        )
        .map_err(|e| io_error("cannot create", &path, e))?;
        // The name must survive a crash before any record in it counts.
        sync_dir(dir)?;
        Ok((file, path))
    }

    /// Appends `records` (encoded by [`encode`], consecutive LSNs) with one write and makes
    /// them durable with one `fdatasync`. On error the segment is cut back to its last whole
    /// record where possible; the caller must then stop using the log ([`WalWriter`] does),
    /// as what the failed sync left on disk is unknown.
    pub(crate) fn append(&mut self, records: &[&[u8]]) -> std::io::Result<()> {
        self.write(records)?;
        timed(
            Operation::Sync,
            || self.path.clone(),
            || self.file.sync_data(),
        )
    }

    /// Writes `records` (encoded by [`encode`], consecutive LSNs) with one write, without
    /// syncing: they survive the process (the page cache has them), not yet a power loss; see
    /// [`Wal::sync_handle`]. On error the segment is cut back to its last whole record where
    /// possible, and the caller must stop using the log.
    ///
    /// The segment is zero-filled [`PREALLOCATE`] bytes ahead of the records, so that most
    /// writes overwrite blocks the file already has: their `fdatasync` then has no file size
    /// or block allocation to commit to the ext4 journal, only the data. Measured with `dd
    /// oflag=dsync` on this machine: 1 KiB writes take 172 us appending, 104 us overwriting.
    pub(crate) fn write(&mut self, records: &[&[u8]]) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        // One record (the Raft journal's case) is written as it is; several are gathered into
        // one buffer, so that they still take one write.
        let bytes: &[u8] = if let [one] = records {
            one
        } else {
            self.buffer.clear();
            for r in records {
                self.buffer.extend_from_slice(r);
            }
            &self.buffer
        };
        let end = self.len + bytes.len() as u64;
        let zero_filled = if end > self.zeroed {
            let to = end.max(self.zeroed + PREALLOCATE).next_multiple_of(PAGE);
            timed(
                Operation::Write,
                || self.path.clone(),
                || zero_fill(&self.file, self.zeroed, to),
            )
            .map(|()| to)
        } else {
            Ok(self.zeroed)
        };
        let written = zero_filled.and_then(|zeroed| {
            self.zeroed = zeroed;
            timed(
                Operation::Write,
                || self.path.clone(),
                || self.file.write_all_at(bytes, self.len),
            )
        });
        match written {
            Ok(()) => {
                self.len = end;
                Ok(())
            }
            Err(e) => {
                if self.file.set_len(self.len).is_ok() {
                    self.zeroed = self.len;
                }
                Err(e)
            }
        }
    }

    /// The current segment's file: `sync_data` on it makes every record written to it so far
    /// durable (another thread may go on writing meanwhile).
    pub(crate) fn sync_handle(&self) -> Arc<File> {
        self.file.clone()
    }

    /// Whether the current segment is full: the caller should [`Wal::rotate`].
    pub(crate) fn is_full(&self) -> bool {
        self.len >= self.segment_bytes
    }

    /// Starts a new segment at `next_lsn` (the LSN the next appended record will carry); the
    /// current one joins those a checkpoint may delete.
    pub(crate) fn rotate(&mut self, next_lsn: u64) -> Result<(), StorageError> {
        let (file, path) = Self::new_segment(&self.dir, next_lsn)?;
        self.file = Arc::new(file);
        self.len = 0;
        self.zeroed = 0;
        self.full.push(std::mem::replace(&mut self.path, path));
        Ok(())
    }

    /// The full segments, taken: delete them once a sled flush started after this call has
    /// completed.
    pub(crate) fn take_full(&mut self) -> Vec<PathBuf> {
        std::mem::take(&mut self.full)
    }
}

/// Deletes `segments` (their records are covered by a completed sled flush).
pub(crate) fn delete(segments: &[PathBuf]) -> Result<(), StorageError> {
    for path in segments {
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error("cannot delete", path, e)),
        }
    }
    Ok(())
}

/// What makes the local log's batches durable, on its flusher thread: the write-ahead log
/// while it works, a flush of the store for every group once it has failed (slower, still
/// durable); and the checkpoints that flush the store and delete full segments.
pub(crate) struct WalWriter {
    /// `None` once an append or a rotation failed.
    wal: Option<Wal>,
    /// The log failed because the disk is full: a flush of the store cannot succeed either
    /// (and sled's was seen to wait forever after its own writes failed so), so every sync
    /// fails instead.
    disk_full: Option<(std::io::ErrorKind, String)>,
    /// The log's directory (deleted at [`WalWriter::close`]).
    dir: PathBuf,
    store: Arc<Store>,
    checkpoints: Checkpoints,
}

impl WalWriter {
    /// Writes to `wal`, the log of `store`; starts the checkpoint thread.
    pub(crate) fn start(wal: Wal, store: Arc<Store>) -> WalWriter {
        WalWriter {
            dir: wal.dir.clone(),
            wal: Some(wal),
            disk_full: None,
            checkpoints: Checkpoints::start(store.clone()),
            store,
        }
    }

    /// Makes durable the batches whose `records` these are (consecutive, in order): one
    /// write and one `fdatasync` (the local log).
    pub(crate) fn sync(&mut self, records: &[&[u8]]) -> Result<(), StorageError> {
        if let Some(wal) = &mut self.wal {
            match wal.append(records) {
                Ok(()) => return Ok(()),
                Err(error) => self.fail(&error),
            }
        }
        self.flush_store()
    }

    /// The fallback sync once the log was given up: a flush of the store, unless the disk is
    /// full (then the failure, at once).
    pub(crate) fn flush_store(&self) -> Result<(), StorageError> {
        match self.flush_store_error() {
            Some(error) => Err(error),
            None => self.store.flush_blocking(),
        }
    }

    /// Why a flush of the store must not be tried: the log failed for lack of space.
    pub(crate) fn flush_store_error(&self) -> Option<StorageError> {
        let (kind, cause) = self.disk_full.as_ref()?;
        Some(StorageError::Sled(sled::Error::Io(std::io::Error::new(
            *kind,
            format!(
                "the write-ahead log in {} failed for lack of space ({cause}); nothing more can be made durable until the node restarts with space freed",
                self.dir.display()
            ),
        ))))
    }

    /// Writes `records` without syncing them (the Raft journal: it writes under its lock and
    /// syncs on its own thread through [`WalWriter::sync_handle`]). If the write fails, the
    /// log is given up: the caller's syncs must then flush the store.
    pub(crate) fn write(&mut self, records: &[&[u8]]) {
        if let Some(wal) = &mut self.wal
            && let Err(error) = wal.write(records)
        {
            self.fail(&error);
        }
    }

    /// The current segment, to `sync_data` every record written so far (earlier segments are
    /// synced when they fill up); `None` once the log was given up: flush the store instead.
    pub(crate) fn sync_handle(&self) -> Option<Arc<File>> {
        self.wal.as_ref().map(Wal::sync_handle)
    }

    /// Gives the log up after `error`: from now on every sync is a flush of the store
    /// (slower, still durable).
    pub(crate) fn fail(&mut self, error: &(dyn std::error::Error + 'static)) {
        if self.disk_full.is_none() {
            self.disk_full = disk_full_kind(error);
            // Writes land in the store's memory first (see the `memtable` module), so nothing
            // else would stop the next apply: the store takes no more, each refused publish
            // is known not to be written, and a restart recovers from the log.
            if let Some(full) = self.flush_store_error() {
                self.store.break_by(&full);
            }
        }
        if self.wal.take().is_some() {
            tracing::error!(%error, dir = %self.dir.display(), "the write-ahead log failed; flushing the store for every sync from now on");
        }
    }

    /// Starts a new segment at `next_lsn` if the current one is full (syncing the full one
    /// first, for writers that sync only the current segment), and a checkpoint for the full
    /// ones.
    pub(crate) fn rotate_if_full(&mut self, next_lsn: u64) {
        let Some(wal) = &mut self.wal else { return };
        // Also when the store's table holds many keys (small records on many channels): a
        // checkpoint's batch then stays short (see `memtable::CHECKPOINT_KEYS`).
        let many_keys = || !self.checkpoints.busy() && self.store.wants_checkpoint();
        if !wal.is_full() && !many_keys() {
            return;
        }
        let rotated = timed(
            Operation::Sync,
            || wal.path.clone(),
            || wal.file.sync_data(),
        )
        .map_err(|e| io_error("cannot sync", &wal.path, e))
        .and_then(|()| wal.rotate(next_lsn));
        if let Err(error) = rotated {
            self.fail(&error);
            return;
        }
        let full = wal.take_full();
        self.checkpoints.request(full);
    }

    /// Whether the write-ahead log is still in use (for tests).
    #[cfg(test)]
    pub(crate) fn uses_the_log(&self) -> bool {
        self.wal.is_some()
    }

    /// Makes the next append fail, as a dying disk would (for tests).
    #[cfg(test)]
    pub(crate) fn break_the_log(&mut self) {
        if let Some(wal) = &mut self.wal {
            wal.file = Arc::new(File::open(&wal.path).expect("reopen the segment read-only"));
        }
    }

    /// The last checkpoint, after the last batch: flushes the store and deletes the whole log.
    pub(crate) fn close(self) {
        self.checkpoints.stop();
        let done = self
            .store
            .flush_blocking()
            .and_then(|()| delete_all(&self.dir));
        if let Err(error) = done {
            tracing::error!(%error, dir = %self.dir.display(), "the last checkpoint failed; the next start replays the write-ahead log");
        }
    }
}

/// The checkpoint thread: flushes the store, then deletes the segments the flush covers.
struct Checkpoints {
    tx: Option<std::sync::mpsc::Sender<Vec<PathBuf>>>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Requests asked for and not yet done (queued or running).
    outstanding: Arc<AtomicUsize>,
}

impl Checkpoints {
    /// Starts the thread; checkpoints flush `store`.
    fn start(store: Arc<Store>) -> Checkpoints {
        let (tx, rx) = std::sync::mpsc::channel::<Vec<PathBuf>>();
        let outstanding = Arc::new(AtomicUsize::new(0));
        let done = outstanding.clone();
        let spawned = std::thread::Builder::new()
            .name("herald-log-checkpoint".into())
            .spawn(move || {
                let mut pending = Vec::new();
                while let Ok(full) = rx.recv() {
                    let mut taken = 1;
                    pending.extend(full);
                    for more in rx.try_iter() {
                        pending.extend(more);
                        taken += 1;
                    }
                    // Every record in `pending` was applied before its segment was handed
                    // over, so a flush starting now covers them all.
                    match store.flush_blocking().and_then(|()| delete(&pending)) {
                        Ok(()) => pending.clear(),
                        Err(error) => {
                            tracing::error!(%error, "write-ahead log checkpoint failed; retrying at the next one");
                        }
                    }
                    done.fetch_sub(taken, Ordering::AcqRel);
                }
            });
        match spawned {
            Ok(thread) => Checkpoints {
                tx: Some(tx),
                thread: Some(thread),
                outstanding,
            },
            Err(error) => {
                tracing::error!(%error, "cannot start the checkpoint thread; segments stay until the log closes");
                Checkpoints {
                    tx: None,
                    thread: None,
                    outstanding,
                }
            }
        }
    }

    /// Asks for a checkpoint covering `full`.
    fn request(&self, full: Vec<PathBuf>) {
        if let Some(tx) = &self.tx {
            self.outstanding.fetch_add(1, Ordering::AcqRel);
            if tx.send(full).is_err() {
                self.outstanding.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }

    /// Whether a checkpoint is queued or running (without a thread: always, so that no
    /// segment is cut for a checkpoint that cannot come).
    fn busy(&self) -> bool {
        self.tx.is_none() || self.outstanding.load(Ordering::Acquire) > 0
    }

    /// Waits for the running checkpoint, if any, and stops the thread.
    fn stop(mut self) {
        drop(self.tx.take());
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::error!("the checkpoint thread panicked");
        }
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_full_disk_is_told_apart_from_other_failures() {
        use std::io::{Error, ErrorKind};
        let full = Error::from(ErrorKind::StorageFull);
        assert_eq!(
            disk_full_kind(&full).map(|(kind, _)| kind),
            Some(ErrorKind::StorageFull)
        );
        let limit = io_error(
            "cannot write",
            Path::new("/x"),
            Error::from(ErrorKind::FileTooLarge),
        );
        let (kind, cause) = disk_full_kind(&limit).unwrap();
        assert_eq!(kind, ErrorKind::FileTooLarge);
        assert!(cause.contains("too large"), "{cause}");
        let other = io_error(
            "cannot write",
            Path::new("/x"),
            Error::from(ErrorKind::Other),
        );
        assert_eq!(disk_full_kind(&other), None);
    }
    use super::*;
    use crate::testutil::TempDir;

    fn ops(n: usize) -> Ops {
        let mut ops = Ops::default();
        for i in 0..n {
            ops.insert(format!("k{i}").into_bytes(), vec![i as u8; i]);
        }
        ops.remove(&b"gone"[..]);
        ops
    }

    /// A new segment at `first` in `dir` holding `records`.
    fn segment(dir: &Path, first: u64, records: &[&[u8]]) -> Wal {
        let mut wal = Wal::create(dir, first, 1 << 20).unwrap();
        wal.append(records).unwrap();
        wal
    }

    fn read(dir: &Path) -> Result<Vec<Record>, StorageError> {
        let mut out = Vec::new();
        read_all(dir, |r| {
            out.push(r);
            Ok(())
        })?;
        Ok(out)
    }

    #[test]
    fn records_round_trip_across_segments() {
        let tmp = TempDir::new("wal-roundtrip");
        let dir = LOCAL.dir(tmp.path());
        let mut wal = segment(&dir, 1, &[&encode(1, &ops(3)), &encode(2, &ops(1))]);
        wal.rotate(3).unwrap();
        let c = encode(3, &ops(2));
        wal.append(&[&c]).unwrap();
        let got = read(&dir).unwrap();
        assert_eq!(got.iter().map(|r| r.lsn).collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(got[0].ops, ops(3));
        assert_eq!(got[2].ops, ops(2));
        assert_eq!(
            got[2].ops.iter().last().unwrap(),
            (&b"k1"[..], Some(&[1u8][..]))
        );
        let full = wal.take_full();
        assert_eq!(full, [segment_path(&dir, 1)]);
        delete(&full).unwrap();
        assert_eq!(read(&dir).unwrap().len(), 1);
    }

    #[test]
    fn a_torn_last_record_ends_the_log_but_damage_before_the_end_is_refused() {
        let tmp = TempDir::new("wal-torn");
        let dir = LOCAL.dir(tmp.path());
        let (a, b) = (encode(1, &ops(2)), encode(2, &ops(2)));
        drop(segment(&dir, 1, &[&a, &b]));
        let path = segment_path(&dir, 1);
        // The segment is zero-filled past its records.
        let len = std::fs::metadata(&path).unwrap().len();
        assert!(len >= PREALLOCATE, "{len}");
        // The second record's last bytes never reached the disk: the first is still read.
        let tear = |path: &Path, at: usize| {
            let mut bytes = std::fs::read(path).unwrap();
            bytes[at - 3..at].fill(0);
            std::fs::write(path, &bytes).unwrap();
        };
        tear(&path, a.len() + b.len());
        assert_eq!(read(&dir).unwrap().len(), 1);

        // The same damage in a segment that has a successor is corruption.
        let c = encode(2, &ops(1));
        drop(segment(&dir, 2, &[&c]));
        let err = read(&dir).unwrap_err().to_string();
        assert!(err.contains("incomplete or damaged"), "{err}");

        // A flipped byte in the last record is a torn append too.
        std::fs::remove_file(&path).unwrap();
        let second = segment_path(&dir, 2);
        let mut bytes = std::fs::read(&second).unwrap();
        bytes[c.len() - 1] ^= 0xff;
        std::fs::write(&second, &bytes).unwrap();
        assert_eq!(read(&dir).unwrap().len(), 0);
    }

    #[test]
    fn a_gap_in_the_numbers_is_refused() {
        let tmp = TempDir::new("wal-gap");
        let dir = LOCAL.dir(tmp.path());
        drop(segment(
            &dir,
            5,
            &[&encode(5, &ops(1)), &encode(7, &ops(1))],
        ));
        let err = read(&dir).unwrap_err().to_string();
        assert!(err.contains("record 7 where 6 was expected"), "{err}");
    }

    /// A log whose disk fails does not fail the publishes: the writer flushes the store
    /// instead, from then on, and the events are there after a restart.
    #[test]
    fn a_failing_log_falls_back_to_flushing_the_store() {
        let tmp = TempDir::new("wal-fallback");
        let options = crate::StoreOptions {
            partitions: 2,
            ..crate::StoreOptions::default()
        };
        let store = Arc::new(Store::open(tmp.path(), options.clone()).unwrap());
        let namespaces = crate::Namespaces::default();
        let dir = LOCAL.dir(tmp.path());
        let mut writer = WalWriter::start(Wal::create(&dir, 1, 1 << 20).unwrap(), store.clone());
        let publish = |lsn: u64, payload: &str| {
            let batch = [crate::Publish::new("c", payload.to_string())];
            store.apply_logged(&batch, &namespaces, 1, lsn).unwrap().1
        };

        let first = publish(1, "one");
        writer.sync(&[&first]).unwrap();
        assert!(writer.uses_the_log());
        let logged = std::fs::read(segment_path(&dir, 1)).unwrap();

        writer.break_the_log();
        let second = publish(2, "two");
        writer
            .sync(&[&second])
            .expect("the store flush stands in for the log");
        assert!(!writer.uses_the_log());
        let third = publish(3, "three");
        writer.sync(&[&third]).unwrap();
        assert_eq!(
            std::fs::read(segment_path(&dir, 1)).unwrap()[..logged.len()],
            logged[..],
            "the broken log is left as it was"
        );
        writer.close();
        drop(store);

        let store = Store::open(tmp.path(), options).unwrap();
        let payloads: Vec<_> = store
            .history_after_at(b"c", None, 10, 1)
            .unwrap()
            .into_iter()
            .map(|e| e.payload)
            .collect();
        assert_eq!(payloads, ["one", "two", "three"]);
        assert_eq!(store.local_log_applied().unwrap(), 3);
    }

    /// The zero-fill covers exactly its range, from and to any offset, a page per write.
    #[test]
    fn zero_fill_covers_unaligned_ranges() {
        use std::os::unix::fs::FileExt;
        let dir = TempDir::new("wal-zero-fill");
        let path = dir.path().join("f");
        let file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        file.write_all_at(&[7u8; 10_000], 0).unwrap();
        zero_fill(&file, 100, 9_000).unwrap();
        zero_fill(&file, 12_000, 12_000).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len(), 10_000);
        assert!(bytes[..100].iter().all(|&b| b == 7));
        assert!(bytes[100..9_000].iter().all(|&b| b == 0));
        assert!(bytes[9_000..].iter().all(|&b| b == 7));
        zero_fill(&file, 10_000, 3 * PAGE + 5).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 3 * PAGE + 5);
    }
}
