//! A data directory whose disk stops answering: a FUSE passthrough
//! (`tests/fixtures/stallfs.py`) whose writes and syncs wait while a flag file exists.
//!
//! Needs `/dev/fuse`, and Debian's Python with fusepy over libfuse2 (`python3-fusepy`, which
//! `scripts/install-test-deps` installs).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::{PATIENCE, scratch_dir};

/// A FUSE mount whose writes and syncs wait while [`StalledDisk::stall`] is on.
pub struct StalledDisk {
    daemon: Child,
    /// The daemon's standard input: it unmounts and exits when this closes, even if this
    /// process is killed before its cleanup.
    lifeline: Option<std::process::ChildStdin>,
    /// Where the passthrough is mounted.
    pub mount: PathBuf,
    flag: PathBuf,
}

impl StalledDisk {
    /// Mounts a passthrough of a fresh directory; `None` without `/dev/fuse`.
    pub fn mount() -> Option<StalledDisk> {
        if !Path::new("/dev/fuse").exists() {
            eprintln!("SKIPPED: no /dev/fuse on this machine, so no disk can be stalled");
            return None;
        }
        let dir = scratch_dir("stalled-disk");
        let (root, mount, flag) = (dir.join("root"), dir.join("mnt"), dir.join("STALL"));
        std::fs::create_dir_all(&root).unwrap();
        std::fs::create_dir_all(&mount).unwrap();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/stallfs.py");
        let mut daemon = Command::new("/usr/bin/python3")
            .arg(script)
            .args([&root, &mount, &flag])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("Debian's python3 runs the FUSE passthrough (scripts/install-test-deps)");
        let lifeline = daemon.stdin.take();
        let mut disk = StalledDisk {
            daemon,
            lifeline,
            mount,
            flag,
        };
        let deadline = std::time::Instant::now() + PATIENCE;
        loop {
            let mounted = std::fs::read_to_string("/proc/mounts")
                .is_ok_and(|mounts| mounts.contains(disk.mount.to_str().unwrap()));
            if mounted {
                break;
            }
            if let Ok(Some(status)) = disk.daemon.try_wait() {
                let mut stderr = String::new();
                if let Some(mut pipe) = disk.daemon.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut pipe, &mut stderr);
                }
                panic!("the FUSE passthrough did not mount ({status}):\n{stderr}");
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the FUSE passthrough did not mount in time"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(disk)
    }

    /// Stalls the disk until the guard returned is dropped (before the node is, on a panic
    /// too: a node waiting on the disk cannot be killed).
    pub fn stall(&self) -> Unstall {
        std::fs::write(&self.flag, b"").unwrap();
        Unstall(self.flag.clone())
    }
}

/// Lets a stalled disk answer again when dropped.
pub struct Unstall(PathBuf);

impl Drop for Unstall {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

impl Drop for StalledDisk {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.flag);
        // Its input closed, the daemon unmounts and exits; SIGTERM and a lazy unmount cover
        // one that did not.
        drop(self.lifeline.take());
        let _ = Command::new("kill")
            .arg(self.daemon.id().to_string())
            .status();
        let _ = self.daemon.wait();
        let _ = Command::new("umount").arg("-l").arg(&self.mount).status();
    }
}
