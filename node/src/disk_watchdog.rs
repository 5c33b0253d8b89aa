//! The disk-stall watchdog: a node whose disk stops answering is taken down, so that its
//! clients move to nodes that work.
//!
//! A write or sync that never returns freezes the node: a Raft append is written on the async
//! runtime, so the node answers nothing while it waits. The other members find it silent and
//! elect new leaders within a second, so the cluster goes on; its own clients do not. Its SSE
//! and WebSocket clients wait on streams that say nothing (a browser's `EventSource` has no
//! timeout of its own) and its RESP clients on replies that do not come, for as long as the
//! disk is stuck.
//!
//! A thread of its own (no async runtime, no lock the store takes) reads
//! [`herald_storage::io_watch::oldest_in_flight`] every second. Once a write, sync or
//! checkpoint has waited past `--disk-stall-timeout` (default 20 s, the default of
//! CockroachDB's `storage.max_sync_duration`, which does the same), it:
//!
//! 1. logs an ERROR naming the operation and how long it has waited (from another thread,
//!    waiting at most 1 s for it: a log file on the stalled disk must not hold the rest up);
//! 2. shuts down every TCP and UDP socket of the process (`shutdown(2)`), so that clients see
//!    their connection end and resume on another node with their cursor. Exiting alone would
//!    not do it: a thread blocked in an uninterruptible write-back wait keeps the process's
//!    file table, and with it every connection, open until the disk answers;
//! 3. exits with status 75 (`EX_TEMPFAIL`), running no destructor (they could wait on the disk
//!    too). A supervisor (systemd's `Restart=on-failure`, a container restart policy) starts it
//!    again; what it acknowledged is on the other members (or, alone, in its synced log), and
//!    its journal is read back as after a `kill -9`, which the chaos suite tests.

use herald_storage::io_watch::{Operation, oldest_in_flight};
use std::path::PathBuf;
use std::time::Duration;

/// The exit status of a node taken down by the watchdog (`EX_TEMPFAIL` of `sysexits.h`: a
/// temporary failure, start it again).
pub const EXIT_STATUS: i32 = 75;

/// The default `--disk-stall-timeout`.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(20);

/// How often the watchdog looks.
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// Starts the watchdog thread for the store in `data_dir`, taking the node down once a disk
/// operation has waited `timeout`.
pub fn start(timeout: Duration, data_dir: PathBuf) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("disk-watchdog".into())
        .spawn(move || {
            let (operation, waited) = watch(timeout, CHECK_EVERY, oldest_in_flight, sleep_for);
            take_down(operation, waited, timeout, &data_dir);
        })
        .map(drop)
}

/// Reads `oldest` every `every` until an operation has run `timeout` or longer, and returns it.
///
/// A process stopped whole (`SIGSTOP`, `docker pause`, a frozen VM) stops this thread too, and
/// finds at its return an operation that has "run" through the pause: that is not a stall. So
/// a sleep that overran by far restarts the watch, and an operation counts only the time the
/// watchdog itself was awake to see (a stalled disk leaves this thread running).
fn watch(
    timeout: Duration,
    every: Duration,
    oldest: impl Fn() -> Option<(Operation, Duration)>,
    mut sleep: impl FnMut(Duration) -> Duration,
) -> (Operation, Duration) {
    let mut awake = Duration::ZERO;
    loop {
        if let Some((operation, running)) = oldest()
            && running.min(awake) >= timeout
        {
            return (operation, running);
        }
        let slept = sleep(every);
        awake = if slept > every + PAUSED {
            Duration::ZERO
        } else {
            awake + slept
        };
    }
}

/// How far past its time a sleep of the watchdog must end to mean the process was stopped.
const PAUSED: Duration = Duration::from_secs(2);

/// Sleeps `every` and returns how long it took.
fn sleep_for(every: Duration) -> Duration {
    let start = std::time::Instant::now();
    std::thread::sleep(every);
    start.elapsed()
}

/// Says why, ends every connection, and exits with [`EXIT_STATUS`].
fn take_down(
    operation: Operation,
    waited: Duration,
    timeout: Duration,
    data_dir: &std::path::Path,
) -> ! {
    let message = format!(
        "the disk has not answered a {} in {} s (--disk-stall-timeout {} s), so this node stops: its connections are closed so that clients resume on other nodes, and it exits with status {EXIT_STATUS} for its supervisor to start it again once {} is usable",
        operation.verb(),
        waited.as_secs(),
        timeout.as_secs(),
        data_dir.display(),
    );
    let (said, has_said) = std::sync::mpsc::channel();
    let _ = std::thread::Builder::new()
        .name("disk-watchdog-log".into())
        .spawn(move || {
            tracing::error!("{message}");
            let _ = said.send(());
        });
    let _ = has_said.recv_timeout(Duration::from_secs(1));
    shut_down_sockets();
    // SAFETY: `_exit` ends the process at once; nothing here relies on what it skips.
    unsafe { libc::_exit(EXIT_STATUS) }
}

/// `shutdown(SHUT_RDWR)` on every IP socket the process has open: TCP connections end (the
/// peer reads what was sent, then end of stream), listeners stop taking connections, the
/// cluster's UDP socket sends no more (the other members then find the node silent). Other
/// descriptors are left alone. A thread blocked on the disk cannot delay this, as it holds
/// none of the sockets' locks.
fn shut_down_sockets() {
    let Ok(entries) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    let fds: Vec<i32> = entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    shut_down_if_sockets(&fds);
}

/// `shutdown(SHUT_RDWR)` on those of `fds` that are IP sockets. Unix sockets are left alone:
/// tokio's signal driver reads a socket pair of its own, and panics at its end of stream.
fn shut_down_if_sockets(fds: &[i32]) {
    for &fd in fds {
        // SAFETY: `fstat` only writes into `stat`, which outlives the call; a descriptor
        // closed meanwhile (the listing's own, say) makes it fail, and it is then skipped.
        let mut stat: libc::stat = unsafe { std::mem::zeroed() };
        if unsafe { libc::fstat(fd, &mut stat) } != 0
            || stat.st_mode & libc::S_IFMT != libc::S_IFSOCK
        {
            continue;
        }
        let mut domain: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: `getsockopt` writes at most `len` bytes into `domain`, which outlives it.
        let asked = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_DOMAIN,
                (&mut domain as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        if asked != 0 || (domain != libc::AF_INET && domain != libc::AF_INET6) {
            continue;
        }
        // SAFETY: `shutdown` on a socket descriptor; an error (an unconnected UDP socket) is
        // of no matter here.
        unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::net::{TcpListener, TcpStream};
    use std::sync::atomic::{AtomicU64, Ordering};

    /// The watchdog returns the first operation it sees at or past the limit, and not before.
    #[test]
    fn watch_returns_once_an_operation_has_waited_the_limit() {
        let calls = AtomicU64::new(0);
        let every = Duration::from_secs(1);
        let found = watch(
            Duration::from_secs(20),
            every,
            || {
                let n = calls.fetch_add(1, Ordering::Relaxed);
                (n > 0).then(|| (Operation::Sync, Duration::from_secs(n)))
            },
            |every| every,
        );
        assert_eq!(found, (Operation::Sync, Duration::from_secs(20)));
        assert_eq!(calls.load(Ordering::Relaxed), 21);
    }

    /// An operation found old after the process was stopped (a sleep that took far longer than
    /// asked) must stay stuck a whole limit after the pause before the node is taken down.
    #[test]
    fn a_pause_of_the_process_is_not_a_stall() {
        let sleeps = AtomicU64::new(0);
        let every = Duration::from_secs(1);
        let found = watch(
            Duration::from_secs(20),
            every,
            // One operation, started just before a 60 s pause and still running after.
            || {
                Some((
                    Operation::Write,
                    Duration::from_secs(sleeps.load(Ordering::Relaxed) * 1000),
                ))
            },
            |every| {
                let n = sleeps.fetch_add(1, Ordering::Relaxed);
                if n == 0 {
                    Duration::from_secs(60)
                } else {
                    every
                }
            },
        );
        assert_eq!(found.0, Operation::Write);
        assert_eq!(
            sleeps.load(Ordering::Relaxed),
            21,
            "20 s awake after the pause"
        );
    }

    /// A connection's peer reads end of stream once its socket is shut down, a listener
    /// refuses connections, and a file and a Unix socket among the descriptors are left as
    /// they were.
    #[test]
    fn sockets_are_shut_down_and_files_are_not() {
        use std::io::Write;
        use std::os::fd::AsRawFd;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let mut client = TcpStream::connect(addr).unwrap();
        let (server_side, _) = listener.accept().unwrap();
        let path = std::env::temp_dir().join(format!("herald-watchdog-{}", std::process::id()));
        let mut file = std::fs::File::create(&path).unwrap();
        let (mut unix_a, mut unix_b) = std::os::unix::net::UnixStream::pair().unwrap();
        shut_down_if_sockets(&[
            server_side.as_raw_fd(),
            listener.as_raw_fd(),
            file.as_raw_fd(),
            unix_a.as_raw_fd(),
        ]);
        client
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut buffer = [0u8; 16];
        assert_eq!(client.read(&mut buffer).unwrap(), 0, "the peer saw no end");
        assert_eq!(
            TcpStream::connect_timeout(&addr, Duration::from_secs(10))
                .unwrap_err()
                .kind(),
            std::io::ErrorKind::ConnectionRefused
        );
        unix_a.write_all(b"x").unwrap();
        let mut one = [0u8; 1];
        unix_b.read_exact(&mut one).unwrap();
        file.write_all(b"still open").unwrap();
        drop(file);
        assert_eq!(std::fs::read(&path).unwrap(), b"still open");
        std::fs::remove_file(&path).unwrap();
    }
}
