//! Crash test: acknowledged publishes survive `kill -9`, and sequence numbers are never reused.
//!
//! The test re-executes its own binary as a child process (selected by [`WRITER_ENV`]); the
//! child publishes through a `LocalLog` from several tasks and prints every acknowledged
//! position. The parent SIGKILLs it mid-stream, reopens the store and checks every printed ack.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

mod support;
use support::{TempDir, run_writer_and_kill};

use herald_storage::{
    Applied, LocalLog, NamespaceConfig, Namespaces, Publish, Store, StoreOptions, partition_of,
};

/// Set in the child: the store directory it writes to.
const WRITER_ENV: &str = "HERALD_STORAGE_CRASH_WRITER_DIR";
const TEST_NAME: &str = "acknowledged_publishes_survive_kill_9";
const PARTITIONS: u16 = 4;
const WRITER_TASKS: usize = 8;
/// The parent kills the child after at least this many acks, plus a clock-derived 0-1999 more
/// so that repeated runs kill at different points (the count is printed).
const ACKS_BEFORE_KILL: usize = 400;

fn options() -> StoreOptions {
    StoreOptions {
        partitions: PARTITIONS,
        cache_capacity: 16 << 20,
        ..StoreOptions::default()
    }
}

fn namespaces() -> Namespaces {
    Namespaces::new(NamespaceConfig {
        history_size: 1_000_000,
        history_ttl: None,
        durable: true,
    })
}

#[test]
fn acknowledged_publishes_survive_kill_9() {
    if let Ok(dir) = std::env::var(WRITER_ENV) {
        writer(Path::new(&dir));
        return;
    }

    let dir = TempDir::new("crash");
    let kill_after = ACKS_BEFORE_KILL + (dir.nanos % 2000) as usize;
    let acks = run_writer_and_kill(TEST_NAME, WRITER_ENV, dir.path(), kill_after);

    let acked: Vec<Ack> = acks.iter().map(|l| Ack::parse(l)).collect();
    assert!(acked.len() >= ACKS_BEFORE_KILL);

    let store = open_after_crash(dir.path());
    let mut max_acked: BTreeMap<u16, u64> = BTreeMap::new();
    let mut histories: HashMap<String, Vec<herald_storage::Event>> = HashMap::new();
    for ack in &acked {
        let history = histories.entry(ack.channel.clone()).or_insert_with(|| {
            store
                .history_after_at(ack.channel.as_bytes(), None, usize::MAX, 0)
                .unwrap()
        });
        let event = history
            .iter()
            .find(|e| e.position.seq == ack.seq)
            .unwrap_or_else(|| panic!("acknowledged {ack:?} is missing after the crash"));
        assert_eq!(event.position.partition, ack.partition, "{ack:?}");
        assert_eq!(event.payload, ack.payload.as_bytes(), "{ack:?}");
        assert_eq!(
            ack.partition,
            partition_of(ack.channel.as_bytes(), PARTITIONS)
        );
        let m = max_acked.entry(ack.partition).or_insert(0);
        *m = (*m).max(ack.seq);
    }

    // History is ascending per channel and no seq of a partition appears twice.
    let mut seen: HashMap<(u16, u64), String> = HashMap::new();
    for (channel, events) in &histories {
        assert!(
            events
                .windows(2)
                .all(|w| w[0].position.seq < w[1].position.seq)
        );
        for e in events {
            let prev = seen.insert((e.position.partition, e.position.seq), channel.clone());
            assert!(prev.is_none(), "{:?} used twice", e.position);
        }
    }

    // New publishes continue after everything acknowledged (and everything stored).
    for (&p, &max) in &max_acked {
        assert!(
            store.latest_seq(p) >= max,
            "partition {p}: latest {} < acked {max}",
            store.latest_seq(p)
        );
    }
    let after: Vec<Publish> = histories
        .keys()
        .map(|c| Publish::new(c.clone(), "after-crash"))
        .collect();
    let latest_before: BTreeMap<u16, u64> =
        (0..PARTITIONS).map(|p| (p, store.latest_seq(p))).collect();
    let applied = store.apply(&after, &namespaces(), 1).unwrap();
    for a in &applied {
        let Applied::New(e) = a else {
            panic!("unexpected duplicate")
        };
        let p = e.position.partition;
        assert!(e.position.seq > latest_before[&p]);
        assert!(e.position.seq > max_acked.get(&p).copied().unwrap_or(0));
        assert!(
            !seen.contains_key(&(p, e.position.seq)),
            "{:?} reused",
            e.position
        );
    }
    eprintln!(
        "crash test: killed after {kill_after} acks, {} acks checked, latest seqs {:?}",
        acked.len(),
        (0..PARTITIONS)
            .map(|p| store.latest_seq(p))
            .collect::<Vec<_>>()
    );
}

/// The child: publish forever (bounded by a safety deadline), printing each ack.
fn writer(dir: &Path) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let store = Arc::new(Store::open(dir, options()).expect("writer opens the store"));
        let log = LocalLog::start(store, Arc::new(namespaces()), Arc::new(|_: &[_]| {})).unwrap();
        let deadline = Instant::now() + Duration::from_secs(180);
        let tasks: Vec<_> = (0..WRITER_TASKS)
            .map(|t| {
                let log = log.clone();
                tokio::spawn(async move {
                    let channel = format!("crash:{t}");
                    let mut i = 0u64;
                    while Instant::now() < deadline {
                        i += 1;
                        let payload = format!("t{t}-{i}");
                        let applied = log
                            .publish(Publish::new(channel.clone(), payload.clone()))
                            .await
                            .expect("publish");
                        let pos = applied.position();
                        let mut out = std::io::stdout().lock();
                        writeln!(out, "ACK {} {} {channel} {payload}", pos.partition, pos.seq)
                            .unwrap();
                        out.flush().unwrap();
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
    });
}

#[derive(Debug)]
struct Ack {
    partition: u16,
    seq: u64,
    channel: String,
    payload: String,
}

impl Ack {
    fn parse(line: &str) -> Ack {
        let f: Vec<&str> = line.split(' ').collect();
        assert_eq!(f.len(), 5, "bad ack line {line:?}");
        Ack {
            partition: f[1].parse().unwrap(),
            seq: f[2].parse().unwrap(),
            channel: f[3].to_string(),
            payload: f[4].to_string(),
        }
    }
}

/// Reopens the store; retries briefly in case the killed process's lock is still being released.
fn open_after_crash(dir: &Path) -> Store {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match Store::open(dir, options()) {
            // Store::open replays what the crash left in the write-ahead log.
            Ok(s) => return s,
            Err(e) if Instant::now() < deadline => {
                eprintln!("reopen failed ({e}), retrying");
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => panic!("store does not reopen after kill -9: {e}"),
        }
    }
}
