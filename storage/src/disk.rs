//! What makes a sled flush survive power loss.
//!
//! sled 0.34 makes its own flush stable with `sync_file_range` (survives `kill -9`, not a power
//! loss), so [`crate::Store::flush`] follows it with [`DiskSync::sync`].

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::File;
use std::path::{Path, PathBuf};

use parking_lot::Mutex;

use crate::io_watch::{Operation, timed};

/// What makes a sled flush survive power loss: `fdatasync` of sled's data file, and of the
/// blob files sled wrote since the last sync.
///
/// sled 0.34 writes a log record over 128 KiB (a big value, or a leaf page rewritten whole) to
/// a file of its own under `blobs/`, named by its log sequence number, with no sync; the data
/// file then holds only a pointer to it. A blob is complete before the log buffer pointing at
/// it can be written, so after a sled flush every blob it covers is whole: syncing every new
/// (or grown) blob file and the directory, then the data file, makes the flush durable.
/// sled deletes blobs as it rewrites their pages, so there are few; each sync lists them.
pub(crate) struct DiskSync {
    data_file: File,
    blobs_dir: PathBuf,
    /// Blob files already synced, by name, with the length they had then.
    synced_blobs: Mutex<HashMap<OsString, u64>>,
}

impl DiskSync {
    /// For the sled database in `dir` (opened already: its data file `db` must exist).
    pub(crate) fn open(dir: &Path) -> std::io::Result<DiskSync> {
        let data_path = dir.join("db");
        let data_file = File::open(&data_path)
            .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", data_path.display())))?;
        Ok(DiskSync {
            data_file,
            blobs_dir: dir.join("blobs"),
            synced_blobs: Mutex::new(HashMap::new()),
        })
    }

    /// Makes everything sled has written so far durable: call it after a sled flush.
    pub(crate) fn sync(&self) -> std::io::Result<()> {
        self.sync_blobs()?;
        let path = || self.blobs_dir.with_file_name("db");
        timed(Operation::StoreSync, path, || self.data_file.sync_data())
    }

    fn sync_blobs(&self) -> std::io::Result<()> {
        let entries = match std::fs::read_dir(&self.blobs_dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        let mut synced = self.synced_blobs.lock();
        let mut present = HashMap::with_capacity(synced.len());
        let mut new_names = false;
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name();
            let len = match entry.metadata() {
                Ok(m) => m.len(),
                // Deleted by sled since the listing: nothing to make durable.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            if synced.get(&name) != Some(&len) {
                match File::open(entry.path()) {
                    Ok(file) => file.sync_data()?,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e),
                }
                new_names |= !synced.contains_key(&name);
            }
            present.insert(name, len);
        }
        *synced = present;
        if new_names {
            File::open(&self.blobs_dir)?.sync_all()?;
        }
        Ok(())
    }

    /// Whether blob file `name` was synced at its current length (for tests).
    #[cfg(test)]
    pub(crate) fn was_synced(&self, name: &std::ffi::OsStr) -> bool {
        let len = std::fs::metadata(self.blobs_dir.join(name))
            .map(|m| m.len())
            .ok();
        len.is_some() && self.synced_blobs.lock().get(name).copied() == len
    }
}
