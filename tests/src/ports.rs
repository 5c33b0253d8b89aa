//! Ports for listeners whose address must be known before the process starts (a cluster
//! member's QUIC port is in every peer's `--peers`; a reference `redis-server`'s port is on
//! its command line).
//!
//! Binding port 0 and releasing it is not enough: the kernel hands the same port out again as
//! the ephemeral source port of any outgoing socket (another test's QUIC client, a reqwest
//! connection), and a node started a moment later then fails with "address already in use".
//! So ports come from below the kernel's ephemeral range, where nothing is handed out
//! implicitly, and each is claimed by creating a file for it in a directory shared by every
//! test process: two tests running at once never get the same port, and a node restarted on
//! its port finds it still free.

use std::fs::OpenOptions;
use std::hash::{BuildHasher, RandomState};
use std::net::{TcpListener, UdpSocket};
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

/// How long a claim holds: longer than any test runs; older claims (from earlier runs) are
/// taken over.
const CLAIM_LIFETIME: Duration = Duration::from_secs(3600);

/// How many ports below the ephemeral range are used.
const SPAN: u16 = 12_000;

/// A loopback port free for both TCP and UDP, outside the kernel's ephemeral range, and
/// claimed for this test alone.
pub fn claim_port() -> u16 {
    let (low, high) = range();
    let dir = claims_dir();
    let random = RandomState::new();
    for attempt in 0u64..10_000 {
        let port =
            low + (random.hash_one((std::process::id(), attempt)) % u64::from(high - low)) as u16;
        if claim(&dir, port) && bindable(port) {
            return port;
        }
    }
    panic!(
        "no free port claimable in {low}..{high} (claims in {})",
        dir.display()
    );
}

/// The ports handed out: the `SPAN` ports below the ephemeral range (`ip_local_port_range`).
fn range() -> (u16, u16) {
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    let high = ephemeral_low.max(1024 + SPAN);
    (high - SPAN, high)
}

fn claims_dir() -> PathBuf {
    let dir = std::env::temp_dir().join("herald-test-ports");
    std::fs::create_dir_all(&dir).expect("create the port claims directory");
    dir
}

/// Claims `port` by creating its file; a claim older than [`CLAIM_LIFETIME`] is taken over.
fn claim(dir: &std::path::Path, port: u16) -> bool {
    let path = dir.join(port.to_string());
    let create = || {
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .is_ok()
    };
    if create() {
        return true;
    }
    let stale = std::fs::metadata(&path)
        .and_then(|meta| meta.modified())
        .ok()
        .and_then(|modified| SystemTime::now().duration_since(modified).ok())
        .is_some_and(|age| age > CLAIM_LIFETIME);
    // Two processes may both see it stale: only one of them removes it and creates it anew
    // (the other's create fails, or its remove fails first).
    stale && std::fs::remove_file(&path).is_ok() && create()
}

/// Whether nothing (a process outside the tests, say) listens on `port` for TCP or UDP.
fn bindable(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok() && UdpSocket::bind(("127.0.0.1", port)).is_ok()
}
