//! What the storage tests share: a temporary directory, and (for the crash tests) running the
//! test's own binary as a writer child process that is `kill -9`ed mid-stream.

// Each test binary includes this module and uses only part of it.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A unique directory under the system temp dir, removed on drop; `nanos` (the clock when it
/// was made) varies the kill point between runs.
pub struct TempDir {
    path: PathBuf,
    pub nanos: u128,
}

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let path = std::env::temp_dir().join(format!(
            "herald-storage-{tag}-{}-{}-{nanos}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).unwrap();
        TempDir { path, nanos }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Runs test `test_name` of this binary again as a child with `env` set to `dir` (the child
/// sees it and writes instead of testing), waits (up to 120 s) until it has printed `kill_after`
/// lines starting with `ACK `, SIGKILLs it, and returns every `ACK ` line it printed before
/// dying.
pub fn run_writer_and_kill(
    test_name: &str,
    env: &str,
    dir: &Path,
    kill_after: usize,
) -> Vec<String> {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", test_name, "--nocapture", "--test-threads=1"])
        .env(env, dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn the writer");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if line.starts_with("ACK ") && tx.send(line).is_err() {
                break;
            }
        }
    });

    // Wait (a condition, with a generous limit) for enough acks, then kill -9 mid-stream.
    let mut acks = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while acks.len() < kill_after {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(line) => acks.push(line),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if let Some(status) = child.try_wait().unwrap() {
                    panic!(
                        "writer exited early with {status} after {} acks",
                        acks.len()
                    );
                }
                assert!(
                    Instant::now() < deadline,
                    "only {} acks in 120 s",
                    acks.len()
                );
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                panic!("writer closed stdout after {} acks", acks.len())
            }
        }
    }
    child.kill().expect("SIGKILL the writer");
    let status = child.wait().unwrap();
    assert!(!status.success(), "writer was killed, got {status}");
    // Every line printed before the kill is an acknowledgement: read them all.
    reader.join().unwrap();
    acks.extend(rx.try_iter());
    acks
}
