//! Crash test of a cluster node's storage: `kill -9` while Raft groups append and apply
//! through the node's journal. Every append reported durable is in the log after the restart,
//! and the state machines, once they apply again what the crash left unapplied (as openraft
//! does at start), hold exactly what a store that applied the same log from scratch holds: no
//! entry half applied, the same positions and the same duplicate decisions.
//!
//! The test re-executes its own binary as a child process (selected by [`WRITER_ENV`]): the
//! child runs one task per group, each appending an entry, printing `ACK group index` once the
//! append is durable, then applying it. The parent SIGKILLs it mid-stream and checks.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

mod support;
use support::{TempDir, run_writer_and_kill};

use herald_storage::raft::{
    Command, GroupId, GroupStateMachine, RaftJournal, RaftLogStore, TypeConfig, partition_group,
};
use herald_storage::{
    Event, LiveNamespaces, NamespaceConfig, Namespaces, OnCommit, Publish, Store, StoreOptions,
};
use openraft::storage::{RaftLogStorage, RaftLogStorageExt, RaftStateMachine};
use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId, RaftLogReader};

/// Set in the child: the store directory it writes to.
const WRITER_ENV: &str = "HERALD_STORAGE_RAFT_CRASH_DIR";
const TEST_NAME: &str = "acknowledged_appends_survive_kill_9_and_applies_are_never_half_done";
const PARTITIONS: u16 = 4;
/// Channels per partition the entries publish to.
const CHANNELS: usize = 3;
/// The parent kills the child after at least this many acks, plus a clock-derived 0-999 more.
const ACKS_BEFORE_KILL: usize = 300;

fn options() -> StoreOptions {
    StoreOptions {
        partitions: PARTITIONS,
        cache_capacity: 16 << 20,
        ..StoreOptions::default()
    }
}

fn namespaces() -> Arc<LiveNamespaces> {
    // A short history, so that applies also trim.
    LiveNamespaces::new(Namespaces::new(NamespaceConfig {
        history_size: 50,
        history_ttl: None,
        durable: true,
    }))
}

fn ignore() -> OnCommit {
    Arc::new(|_: &[Event]| {})
}

/// The channels of `partition` the entries publish to.
fn channels(store: &Store, partition: u16) -> Vec<String> {
    (0..)
        .map(|i| format!("ch{i}"))
        .filter(|c| store.partition_of(c.as_bytes()) == partition)
        .take(CHANNELS)
        .collect()
}

/// Entry `index` of a partition's log: three publishes, every third one repeating a message id
/// of the entry before (a retry, which apply must find a duplicate).
fn entry(channels: &[String], index: u64) -> Entry<TypeConfig> {
    let publishes = (0..3u64)
        .map(|i| {
            let channel = channels[((index + i) as usize) % channels.len()].clone();
            let id = if i == 2 && index.is_multiple_of(3) {
                format!("m{}-0", index - 1)
            } else {
                format!("m{index}-{i}")
            };
            Publish::new(
                channel,
                format!("entry {index} publish {i} {}", "x".repeat(200)),
            )
            .with_id(id)
        })
        .collect();
    Entry {
        log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
        payload: EntryPayload::Normal(Command::Publish {
            now_ms: 1_700_000_000_000 + index,
            publishes,
        }),
    }
}

#[test]
fn acknowledged_appends_survive_kill_9_and_applies_are_never_half_done() {
    if let Ok(dir) = std::env::var(WRITER_ENV) {
        writer(Path::new(&dir));
        return;
    }

    let dir = TempDir::new("raft-crash");
    let kill_after = ACKS_BEFORE_KILL + (dir.nanos % 1000) as usize;
    let acks = run_writer_and_kill(TEST_NAME, WRITER_ENV, dir.path(), kill_after);
    let mut acked: BTreeMap<GroupId, u64> = BTreeMap::new();
    for line in &acks {
        let mut parts = line.split_whitespace().skip(1);
        let group: GroupId = parts.next().unwrap().parse().unwrap();
        let index: u64 = parts.next().unwrap().parse().unwrap();
        let m = acked.entry(group).or_insert(0);
        *m = (*m).max(index);
    }

    runtime().block_on(async {
        let store = Arc::new(Store::open(dir.path(), options()).expect("reopen after kill -9"));
        let journal = RaftJournal::of(&store).unwrap();
        let reference_dir = TempDir::new("raft-crash-reference");
        let reference = Arc::new(Store::open(reference_dir.path(), options()).unwrap());
        let reference_journal = RaftJournal::of(&reference).unwrap();
        for p in 0..PARTITIONS {
            let group = partition_group(p);
            let mut log = RaftLogStore::new(journal.clone(), group);
            let last = log
                .get_log_state()
                .await
                .unwrap()
                .last_log_id
                .map_or(0, |l| l.index);
            let acked = acked.get(&group).copied().unwrap_or(0);
            assert!(
                last >= acked,
                "group {group}: acknowledged up to {acked}, the log ends at {last}"
            );
            let entries = log.try_get_log_entries(1..=last).await.unwrap();
            let indexes: Vec<u64> = entries.iter().map(|e| e.log_id.index).collect();
            assert_eq!(
                indexes,
                (1..=last).collect::<Vec<_>>(),
                "group {group}: a hole in the log"
            );
            let names = channels(&store, p);
            for e in &entries {
                assert_eq!(
                    e,
                    &entry(&names, e.log_id.index),
                    "group {group}: entry changed"
                );
            }

            // What openraft does at start: apply what is after the last applied entry.
            let mut sm =
                GroupStateMachine::new(journal.clone(), group, namespaces(), ignore()).unwrap();
            let applied = sm.applied_state().await.unwrap().0.map_or(0, |l| l.index);
            assert!(
                applied <= last,
                "group {group}: applied {applied} beyond the log's {last}"
            );
            sm.apply(entries[applied as usize..].to_vec())
                .await
                .unwrap();

            let mut fresh =
                GroupStateMachine::new(reference_journal.clone(), group, namespaces(), ignore())
                    .unwrap();
            fresh.apply(entries.clone()).await.unwrap();
            for channel in &names {
                let got = store
                    .history_after_at(channel.as_bytes(), None, usize::MAX, 0)
                    .unwrap();
                let want = reference
                    .history_after_at(channel.as_bytes(), None, usize::MAX, 0)
                    .unwrap();
                assert_eq!(
                    got, want,
                    "group {group}, channel {channel}: history differs from a clean apply"
                );
            }
            assert_eq!(
                store.latest_seq(p),
                reference.latest_seq(p),
                "partition {p}"
            );
        }
        eprintln!(
            "raft crash test: {} acks, killed after {kill_after}, logs end at {acked:?} or later",
            acks.len()
        );
    });
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// The child: one task per partition group, appending and applying until killed.
fn writer(dir: &Path) {
    runtime().block_on(async {
        let store = Arc::new(Store::open(dir, options()).unwrap());
        let journal = RaftJournal::of(&store).unwrap();
        let mut tasks = Vec::new();
        for p in 0..PARTITIONS {
            let journal = journal.clone();
            let names = channels(&store, p);
            tasks.push(tokio::spawn(async move {
                let group = partition_group(p);
                let mut log = RaftLogStore::new(journal.clone(), group);
                let mut sm =
                    GroupStateMachine::new(journal, group, namespaces(), ignore()).unwrap();
                for index in 1.. {
                    let e = entry(&names, index);
                    log.blocking_append([e.clone()]).await.unwrap();
                    println!("ACK {group} {index}");
                    sm.apply([e]).await.unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
}
