//! A UDP relay in front of one node's cluster (QUIC) port, which can drop the traffic of chosen
//! senders: one-way unreachability between two nodes (A cannot reach B, while B still reaches
//! A), without privileges or iptables.
//!
//! Each sender (told apart by its source port, a node's cluster port) gets an upstream socket
//! of its own towards the node, so the node sees one peer address per sender and its answers
//! go back to the right one. A blocked sender's packets are dropped both ways: its own
//! connections to the node go nowhere. Other nodes' connections to the blocked sender go
//! through that sender's own relay, and are unaffected.

use std::collections::{HashMap, HashSet};
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How often the relay's threads look at the stop flag.
const POLL: Duration = Duration::from_millis(100);

/// A relay to `127.0.0.1:<target port>`; its threads stop when it is dropped.
pub struct Relay {
    /// The port the relay listens on (give it to the nodes as the target's address).
    pub port: u16,
    blocked: Arc<Mutex<HashSet<u16>>>,
    stop: Arc<AtomicBool>,
}

impl Relay {
    /// Starts relaying from a fresh loopback port to `target_port`.
    pub fn start(target_port: u16) -> Relay {
        let listen = UdpSocket::bind("127.0.0.1:0").expect("bind the relay");
        listen.set_read_timeout(Some(POLL)).unwrap();
        let port = listen.local_addr().unwrap().port();
        let blocked = Arc::new(Mutex::new(HashSet::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let target: SocketAddr = ([127, 0, 0, 1], target_port).into();
        {
            let (blocked, stop) = (blocked.clone(), stop.clone());
            std::thread::spawn(move || front(listen, target, blocked, stop));
        }
        Relay {
            port,
            blocked,
            stop,
        }
    }

    /// Drops (both ways) the traffic of the sender bound to `source_port` from now on.
    pub fn block(&self, source_port: u16) {
        self.blocked.lock().unwrap().insert(source_port);
    }

    /// Relays the sender bound to `source_port` again.
    pub fn unblock(&self, source_port: u16) {
        self.blocked.lock().unwrap().remove(&source_port);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Senders -> node: one upstream socket per sender, each with a thread relaying the node's
/// answers back.
fn front(
    listen: UdpSocket,
    target: SocketAddr,
    blocked: Arc<Mutex<HashSet<u16>>>,
    stop: Arc<AtomicBool>,
) {
    let mut upstreams: HashMap<SocketAddr, UdpSocket> = HashMap::new();
    let mut buf = vec![0u8; 65_536];
    while !stop.load(Ordering::Relaxed) {
        let Ok((len, from)) = listen.recv_from(&mut buf) else {
            continue;
        };
        if blocked.lock().unwrap().contains(&from.port()) {
            continue;
        }
        let upstream = upstreams.entry(from).or_insert_with(|| {
            let upstream = UdpSocket::bind("127.0.0.1:0").expect("bind an upstream socket");
            upstream.connect(target).unwrap();
            upstream.set_read_timeout(Some(POLL)).unwrap();
            let (back, listen) = (upstream.try_clone().unwrap(), listen.try_clone().unwrap());
            let (blocked, stop) = (blocked.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 65_536];
                while !stop.load(Ordering::Relaxed) {
                    // A refused send (the node is down) is an error here too: go on.
                    let Ok(len) = back.recv(&mut buf) else {
                        continue;
                    };
                    if !blocked.lock().unwrap().contains(&from.port()) {
                        let _ = listen.send_to(&buf[..len], from);
                    }
                }
            });
            upstream
        });
        let _ = upstream.send(&buf[..len]);
    }
}
