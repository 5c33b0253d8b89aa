//! The files that hold each group's current snapshot data, under `<store dir>/snapshots/`.
//!
//! A snapshot of a big partition is hundreds of MB: kept in sled, every build wrote a new sled
//! blob file and sled never reclaimed the old ones. So sled keeps only the snapshot's meta and
//! the name of its file ([`SnapshotFile`], under `r` group `f`), and the data is a file of its
//! own, named `g<group>-<snapshot id, sanitised>-<n>.snap`.
//!
//! The order survives `kill -9` at any point: the file is written under a temporary name,
//! synced, renamed and its directory synced ([`write`]) before sled names it; the record is
//! flushed before the group's other files are deleted ([`remove_others`]). What a crash leaves
//! (a temporary file, a file sled never came to name, an old file not yet deleted) is deleted
//! when the group's state machine is created.

use std::fs::File;
use std::io::{Read, Write as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use openraft::{BasicNode, SnapshotMeta};
use serde::{Deserialize, Serialize};

use super::{GroupId, NodeId};
use crate::store::StorageError;
use crate::wal::{io_error, sync_dir};

/// The directory of snapshot files, under the store's.
const SUBDIR: &str = "snapshots";
const SUFFIX: &str = ".snap";
const TMP_SUFFIX: &str = ".snap.tmp";

/// Makes file names unique within the process.
static FILE_COUNTER: AtomicU64 = AtomicU64::new(0);

/// The current snapshot of a group whose data is in a file (`r` group `f`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct SnapshotFile {
    pub meta: SnapshotMeta<NodeId, BasicNode>,
    /// The file's name in the snapshot directory.
    pub file: String,
    /// The data's length in bytes.
    pub len: u64,
    /// xxh3 of the data.
    pub xxh3: u64,
}

/// The snapshot directory of the store in `store_dir`.
pub(crate) fn dir(store_dir: &Path) -> PathBuf {
    store_dir.join(SUBDIR)
}

/// What a file of `group` starts with (`g1-` is no prefix of `g10-`).
fn group_prefix(group: GroupId) -> String {
    format!("g{group}-")
}

/// `snapshot_id` with what is not `[A-Za-z0-9_-]` replaced by `_`, at most 100 characters.
fn sanitise(snapshot_id: &str) -> String {
    snapshot_id
        .chars()
        .take(100)
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Writes `data` as a new snapshot file of `group` in `dir` (created if needed), durably:
/// temporary name, `fsync`, rename, `fsync` of the directory. Returns the record naming it
/// (not yet stored).
pub(crate) fn write(
    dir: &Path,
    group: GroupId,
    meta: &SnapshotMeta<NodeId, BasicNode>,
    data: &[u8],
) -> Result<SnapshotFile, StorageError> {
    if !dir.exists() {
        std::fs::create_dir_all(dir).map_err(|e| io_error("cannot create", dir, e))?;
        if let Some(parent) = dir.parent() {
            sync_dir(parent)?;
        }
    }
    let (name, path) = loop {
        let n = FILE_COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!(
            "{}{}-{n}{SUFFIX}",
            group_prefix(group),
            sanitise(&meta.snapshot_id)
        );
        let path = dir.join(&name);
        // A file of an earlier run may have the name (the counter starts at 0 every run).
        if !path.exists() {
            break (name, path);
        }
    };
    let tmp = dir.join(format!("{name}.tmp"));
    let written = File::create(&tmp).and_then(|mut f| {
        f.write_all(data)?;
        f.sync_all()
    });
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(io_error("cannot write snapshot file", &tmp, e));
    }
    std::fs::rename(&tmp, &path).map_err(|e| io_error("cannot rename", &tmp, e))?;
    sync_dir(dir)?;
    Ok(SnapshotFile {
        meta: meta.clone(),
        file: name,
        len: data.len() as u64,
        xxh3: xxhash_rust::xxh3::xxh3_64(data),
    })
}

/// The data of the snapshot `record` names, checked against its length and checksum.
pub(crate) fn read(dir: &Path, record: &SnapshotFile) -> Result<Vec<u8>, StorageError> {
    let path = dir.join(&record.file);
    let mut data = Vec::with_capacity(usize::try_from(record.len).unwrap_or(0));
    File::open(&path)
        .and_then(|mut f| f.read_to_end(&mut data))
        .map_err(|e| io_error("cannot read snapshot file", &path, e))?;
    if data.len() as u64 != record.len {
        return Err(StorageError::Corrupt(format!(
            "snapshot file {} has {} bytes, snapshot {} has {}",
            path.display(),
            data.len(),
            record.meta.snapshot_id,
            record.len
        )));
    }
    if xxhash_rust::xxh3::xxh3_64(&data) != record.xxh3 {
        return Err(StorageError::Corrupt(format!(
            "snapshot file {} fails its checksum",
            path.display()
        )));
    }
    Ok(data)
}

/// Deletes the snapshot files (and temporary files) of `group` in `dir` but `keep`. Files of
/// other groups and of other names are left alone.
pub(crate) fn remove_others(
    dir: &Path,
    group: GroupId,
    keep: Option<&str>,
) -> Result<(), StorageError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_error("cannot list", dir, e)),
    };
    let prefix = group_prefix(group);
    for entry in entries {
        let entry = entry.map_err(|e| io_error("cannot list", dir, e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            continue;
        };
        if !name.starts_with(&prefix)
            || !(name.ends_with(SUFFIX) || name.ends_with(TMP_SUFFIX))
            || Some(name) == keep
        {
            continue;
        }
        let path = entry.path();
        match std::fs::remove_file(&path) {
            Ok(()) => tracing::debug!(group, file = %path.display(), "deleted a snapshot file"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error("cannot delete", &path, e)),
        }
    }
    Ok(())
}

/// Deletes the file `record` names (a snapshot sled did not come to name).
pub(crate) fn remove(dir: &Path, record: &SnapshotFile) {
    let path = dir.join(&record.file);
    if let Err(e) = std::fs::remove_file(&path)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(file = %path.display(), error = %e, "cannot delete a snapshot file");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_sanitised_and_kept_per_group() {
        assert_eq!(sanitise("g1-T1-N2-5/../x y"), "g1-T1-N2-5____x_y");
        let tmp = crate::testutil::TempDir::new("snapfile");
        let dir = dir(tmp.path());
        let meta = |id: &str| SnapshotMeta {
            last_log_id: None,
            last_membership: Default::default(),
            snapshot_id: id.into(),
        };
        let a = write(&dir, 1, &meta("a"), b"one").unwrap();
        let b = write(&dir, 1, &meta("a"), b"two").unwrap();
        let c = write(&dir, 10, &meta("c"), b"ten").unwrap();
        assert_ne!(a.file, b.file);
        assert_eq!(read(&dir, &a).unwrap(), b"one");
        std::fs::write(dir.join("g1-x.snap.tmp"), b"partial").unwrap();
        std::fs::write(dir.join("other"), b"not ours").unwrap();
        remove_others(&dir, 1, Some(&b.file)).unwrap();
        let mut left: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        let mut want = vec![b.file.clone(), c.file.clone(), "other".to_string()];
        want.sort();
        assert_eq!(left, want);
        assert_eq!(read(&dir, &b).unwrap(), b"two");
        // A missing or short file is an error naming it.
        let err = read(&dir, &a).unwrap_err().to_string();
        assert!(err.contains(&a.file), "{err}");
        std::fs::write(dir.join(&c.file), b"te").unwrap();
        let err = read(&dir, &c).unwrap_err().to_string();
        assert!(err.contains(&c.file) && err.contains("2 bytes"), "{err}");
    }
}
