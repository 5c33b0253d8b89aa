//! The sled-backed openraft storage: openraft's own storage suite, plus herald's rules (seqs
//! and dedup decided identically on every member, snapshots that carry a whole partition,
//! restarts that keep vote, log and applied state).

use std::collections::BTreeSet;
use std::io::Cursor;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use herald_storage::raft::{
    Command, GroupId, GroupStateMachine, META_GROUP, NodeId, RaftJournal, RaftLogStore, Reply,
    TypeConfig, partition_group,
};
use herald_storage::{
    Applied, Epoch, Event, LiveNamespaces, NamespaceConfig, Namespaces, OnCommit, Partition,
    Position, Publish, Store, StoreOptions,
};
use openraft::storage::{RaftLogStorage, RaftLogStorageExt, RaftStateMachine};
use openraft::testing::{StoreBuilder, Suite};
use openraft::{
    CommittedLeaderId, Entry, EntryPayload, LogId, Membership, RaftLogReader, RaftSnapshotBuilder,
    StorageError as RaftStorageError, StoredMembership, Vote,
};

mod support;
use support::TempDir;

const PARTITIONS: u16 = 4;
const T0: u64 = 1_700_000_000_000;
const WINDOW_MS: u64 = 60_000;

fn options() -> StoreOptions {
    StoreOptions {
        partitions: PARTITIONS,
        dedup_window: Duration::from_millis(WINDOW_MS),
        cache_capacity: 4 << 20,
    }
}

/// The store's one Raft journal.
fn journal(store: &Arc<Store>) -> Arc<RaftJournal> {
    RaftJournal::of(store).unwrap()
}

fn open(dir: &TempDir) -> Arc<Store> {
    Arc::new(Store::open(dir.path(), options()).unwrap())
}

fn namespaces() -> Arc<LiveNamespaces> {
    LiveNamespaces::new(
        Namespaces::new(NamespaceConfig {
            history_size: 100,
            history_ttl: None,
            durable: true,
        })
        .with(
            "short",
            NamespaceConfig {
                history_size: 2,
                history_ttl: None,
                durable: true,
            },
        ),
    )
}

fn ignore() -> OnCommit {
    Arc::new(|_: &[Event]| {})
}

/// An on_commit that records every call.
fn recorder() -> (OnCommit, Arc<Mutex<Vec<Vec<Event>>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    (
        Arc::new(move |events: &[Event]| s.lock().unwrap().push(events.to_vec())),
        seen,
    )
}

/// `n` channel names (with `prefix`) of partition `p`.
fn channels_of(store: &Store, p: Partition, prefix: &str, n: usize) -> Vec<String> {
    (0..)
        .map(|i| format!("{prefix}{i}"))
        .filter(|c| store.partition_of(c.as_bytes()) == p)
        .take(n)
        .collect()
}

fn log_id(term: u64, index: u64) -> LogId<NodeId> {
    LogId::new(CommittedLeaderId::new(term, 1), index)
}

fn entry(index: u64, command: Command) -> Entry<TypeConfig> {
    Entry {
        log_id: log_id(1, index),
        payload: EntryPayload::Normal(command),
    }
}

fn blank(index: u64) -> Entry<TypeConfig> {
    Entry {
        log_id: log_id(1, index),
        payload: EntryPayload::Blank,
    }
}

fn membership(index: u64, voters: &[NodeId]) -> Entry<TypeConfig> {
    Entry {
        log_id: log_id(1, index),
        payload: EntryPayload::Membership(Membership::new(
            vec![voters.iter().copied().collect::<BTreeSet<_>>()],
            None,
        )),
    }
}

fn publish(index: u64, now_ms: u64, publishes: Vec<Publish>) -> Entry<TypeConfig> {
    entry(index, Command::Publish { now_ms, publishes })
}

fn applied(reply: &Reply) -> &[Applied] {
    match reply {
        Reply::Applied(a) => a,
        Reply::None => panic!("expected Reply::Applied"),
    }
}

fn payloads(events: &[Event]) -> Vec<String> {
    events
        .iter()
        .map(|e| String::from_utf8(e.payload.to_vec()).unwrap())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// openraft's suite

struct Builder;

impl StoreBuilder<TypeConfig, RaftLogStore, GroupStateMachine, TempDir> for Builder {
    async fn build(
        &self,
    ) -> Result<(TempDir, RaftLogStore, GroupStateMachine), RaftStorageError<NodeId>> {
        let dir = TempDir::new("suite");
        let store = open(&dir);
        let group = partition_group(1);
        let log = RaftLogStore::new(journal(&store), group);
        let sm = GroupStateMachine::new(journal(&store), group, namespaces(), ignore()).unwrap();
        Ok((dir, log, sm))
    }
}

#[test]
fn openraft_storage_suite() {
    Suite::test_all(Builder).unwrap();
}

/// The suite again, on the meta group (its snapshots are the cluster identity).
struct MetaBuilder;

impl StoreBuilder<TypeConfig, RaftLogStore, GroupStateMachine, TempDir> for MetaBuilder {
    async fn build(
        &self,
    ) -> Result<(TempDir, RaftLogStore, GroupStateMachine), RaftStorageError<NodeId>> {
        let dir = TempDir::new("suite-meta");
        let store = open(&dir);
        let log = RaftLogStore::new(journal(&store), META_GROUP);
        let sm =
            GroupStateMachine::new(journal(&store), META_GROUP, namespaces(), ignore()).unwrap();
        Ok((dir, log, sm))
    }
}

#[test]
fn openraft_storage_suite_meta_group() {
    Suite::test_all(MetaBuilder).unwrap();
}

// ---------------------------------------------------------------------------------------------
// herald's rules

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_entries_assign_seqs_and_call_on_commit() {
    let dir = TempDir::new("apply");
    let store = open(&dir);
    let p: Partition = 2;
    let group = partition_group(p);
    let (on_commit, seen) = recorder();
    let mut sm = GroupStateMachine::new(journal(&store), group, namespaces(), on_commit).unwrap();
    let ch = channels_of(&store, p, "ch", 2);
    let other = channels_of(&store, 0, "ch", 1);

    let replies = sm
        .apply([
            blank(1),
            membership(2, &[1, 2, 3]),
            publish(
                3,
                T0,
                vec![
                    Publish::new(ch[0].clone(), "a"),
                    Publish::new(ch[1].clone(), "b").with_id("m1"),
                    Publish::new(ch[1].clone(), "b again").with_id("m1"),
                ],
            ),
            // A leader clock behind the partition's: apply keeps the partition's.
            publish(4, T0 - 5_000, vec![Publish::new(ch[0].clone(), "c")]),
            // A misrouted entry is refused whole, deterministically.
            publish(
                5,
                T0,
                vec![
                    Publish::new(ch[0].clone(), "x"),
                    Publish::new(other[0].clone(), "y"),
                ],
            ),
            entry(
                6,
                Command::Init {
                    epoch: Epoch(7),
                    partitions: PARTITIONS,
                },
            ),
            // An empty entry advances the clock (a leader's tick).
            publish(7, T0 + 1_000, Vec::new()),
        ])
        .await
        .unwrap();
    assert_eq!(replies.len(), 7, "one reply per entry");
    assert_eq!(replies[0], Reply::None);
    assert_eq!(replies[1], Reply::None);
    let a = applied(&replies[2]);
    assert_eq!(a.len(), 3);
    assert_eq!(a[0].position(), Position::new(p, 1));
    assert_eq!(a[1].position(), Position::new(p, 2));
    assert_eq!(a[2], Applied::Duplicate(Position::new(p, 2)));
    let b = applied(&replies[3]);
    assert_eq!(b[0].position(), Position::new(p, 3));
    match &b[0] {
        Applied::New(e) => assert_eq!(e.timestamp_ms, T0, "time never runs backwards"),
        other => panic!("{other:?}"),
    }
    assert_eq!(replies[4], Reply::None);
    assert_eq!(replies[5], Reply::None);
    assert_eq!(replies[6], Reply::Applied(Vec::new()));
    assert_eq!(store.latest_seq(p), 3);
    assert_eq!(store.latest_seq(0), 0);
    assert_eq!(store.applied_clock(p), T0 + 1_000);
    assert!(!store.cluster_initialized(), "Init on a partition group");

    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2, "one call per entry with new events");
    assert_eq!(payloads(&seen[0]), vec!["a", "b"]);
    assert_eq!(payloads(&seen[1]), vec!["c"]);
    assert_eq!(
        payloads(&store.history_after(ch[0].as_bytes(), None, 10).unwrap()),
        vec!["a", "c"]
    );

    let (last, mem) = sm.applied_state().await.unwrap();
    assert_eq!(last, Some(log_id(1, 7)));
    assert_eq!(mem.log_id(), &Some(log_id(1, 2)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_on_commit_does_not_fail_apply() {
    let dir = TempDir::new("panic");
    let store = open(&dir);
    let on_commit: OnCommit = Arc::new(|_: &[Event]| panic!("hub bug"));
    let mut sm =
        GroupStateMachine::new(journal(&store), partition_group(0), namespaces(), on_commit)
            .unwrap();
    let ch = channels_of(&store, 0, "c", 1);
    let r = sm
        .apply([publish(1, T0, vec![Publish::new(ch[0].clone(), "x")])])
        .await
        .unwrap();
    assert_eq!(applied(&r[0])[0].position(), Position::new(0, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meta_group_init_sets_the_epoch_and_checks_partitions() {
    let dir = TempDir::new("meta");
    let store = open(&dir);
    let own = store.epoch();
    let mut sm =
        GroupStateMachine::new(journal(&store), META_GROUP, namespaces(), ignore()).unwrap();
    assert!(!store.cluster_initialized());
    let ch = channels_of(&store, 0, "c", 1);
    let replies = sm
        .apply([
            membership(1, &[1]),
            publish(2, T0, vec![Publish::new(ch[0].clone(), "x")]),
            entry(
                3,
                Command::Init {
                    epoch: Epoch(42),
                    partitions: PARTITIONS,
                },
            ),
            // A second Init with another epoch does not move it.
            entry(
                4,
                Command::Init {
                    epoch: Epoch(43),
                    partitions: PARTITIONS,
                },
            ),
        ])
        .await
        .unwrap();
    assert_eq!(replies, vec![Reply::None; 4]);
    assert_eq!(
        store.latest_seq(0),
        0,
        "no publish applied by the meta group"
    );
    assert_ne!(own, Epoch(42));
    assert_eq!(store.epoch(), Epoch(42));
    assert!(store.cluster_initialized());

    // The meta snapshot carries the identity to a fresh store.
    let snap = sm
        .get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .unwrap();
    assert_eq!(snap.meta.last_log_id, Some(log_id(1, 4)));
    let dir2 = TempDir::new("meta2");
    let store2 = open(&dir2);
    let mut sm2 =
        GroupStateMachine::new(journal(&store2), META_GROUP, namespaces(), ignore()).unwrap();
    sm2.install_snapshot(&snap.meta, snap.snapshot)
        .await
        .unwrap();
    assert_eq!(store2.epoch(), Epoch(42));
    assert!(store2.cluster_initialized());
    assert_eq!(sm2.applied_state().await.unwrap().0, Some(log_id(1, 4)));

    // A partition count mismatch is an error naming both numbers.
    let err = sm
        .apply([entry(
            5,
            Command::Init {
                epoch: Epoch(42),
                partitions: PARTITIONS + 1,
            },
        )])
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains(&format!("{PARTITIONS} partitions")) && msg.contains("5 were requested"),
        "{msg}"
    );
    drop((sm, sm2, store, store2));

    // The cluster identity survives a restart.
    let store = open(&dir);
    assert_eq!(store.epoch(), Epoch(42));
    assert!(store.cluster_initialized());
}

/// The meta group's `Namespaces` entry puts the cluster's config in force (partition groups
/// then retain by it), survives a restart of the state machine, and travels in the meta
/// snapshot to a node that never applied the entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meta_group_namespaces_are_applied_kept_and_carried_by_snapshots() {
    let dir = TempDir::new("meta-ns");
    let store = open(&dir);
    let live = namespaces();
    let mut meta =
        GroupStateMachine::new(journal(&store), META_GROUP, live.clone(), ignore()).unwrap();
    let mut part =
        GroupStateMachine::new(journal(&store), partition_group(0), live.clone(), ignore())
            .unwrap();
    assert!(live.cluster().is_none());
    assert!(store.cluster_namespaces().unwrap().is_none());
    let cluster = Namespaces::new(NamespaceConfig {
        history_size: 1,
        history_ttl: None,
        durable: true,
    });
    let replies = meta
        .apply([
            membership(1, &[1]),
            entry(
                2,
                Command::Namespaces {
                    spec: cluster.to_spec(),
                },
            ),
        ])
        .await
        .unwrap();
    assert_eq!(replies, vec![Reply::None; 2]);
    assert_eq!(live.cluster().as_deref(), Some(&cluster));
    assert_eq!(store.cluster_namespaces().unwrap(), Some(cluster.to_spec()));
    // Partition groups apply with it: history_size 1, not the node's 100.
    let ch = channels_of(&store, 0, "c", 1);
    part.apply([
        membership(1, &[1]),
        publish(2, T0, vec![Publish::new(ch[0].clone(), "a")]),
        publish(3, T0, vec![Publish::new(ch[0].clone(), "b")]),
    ])
    .await
    .unwrap();
    assert_eq!(
        payloads(&store.history_after(ch[0].as_bytes(), None, 10).unwrap()),
        ["b"]
    );

    // A new state machine on the same store (a restart) puts it in force again.
    let again = namespaces();
    let _meta2 =
        GroupStateMachine::new(journal(&store), META_GROUP, again.clone(), ignore()).unwrap();
    assert_eq!(again.cluster().as_deref(), Some(&cluster));

    // The snapshot carries it; one without it (an older leader's) takes it away again.
    let snap = meta
        .get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .unwrap();
    let dir2 = TempDir::new("meta-ns2");
    let store2 = open(&dir2);
    let live2 = namespaces();
    let mut meta2 =
        GroupStateMachine::new(journal(&store2), META_GROUP, live2.clone(), ignore()).unwrap();
    meta2
        .install_snapshot(&snap.meta, snap.snapshot)
        .await
        .unwrap();
    assert_eq!(live2.cluster().as_deref(), Some(&cluster));
    assert_eq!(
        store2.cluster_namespaces().unwrap(),
        Some(cluster.to_spec())
    );

    let dir3 = TempDir::new("meta-ns3");
    let store3 = open(&dir3);
    let mut meta3 =
        GroupStateMachine::new(journal(&store3), META_GROUP, namespaces(), ignore()).unwrap();
    meta3.apply([membership(1, &[1])]).await.unwrap();
    let plain = meta3
        .get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .unwrap();
    meta2
        .install_snapshot(&plain.meta, plain.snapshot)
        .await
        .unwrap();
    assert!(live2.cluster().is_none());
    assert!(store2.cluster_namespaces().unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_snapshot_moves_the_whole_partition() {
    let p: Partition = 1;
    let q: Partition = 3;
    let ns = namespaces();

    // The leader: history in p (one channel trimmed), dedup ids, and data in q.
    let dir_a = TempDir::new("snap-a");
    let a = open(&dir_a);
    let ch = channels_of(&a, p, "ch", 3);
    let short = channels_of(&a, p, "short:", 1);
    let chq = channels_of(&a, q, "ch", 1);
    let mut sm_a =
        GroupStateMachine::new(journal(&a), partition_group(p), ns.clone(), ignore()).unwrap();
    let mut sm_aq =
        GroupStateMachine::new(journal(&a), partition_group(q), ns.clone(), ignore()).unwrap();
    let mut batch = Vec::new();
    for i in 0..30 {
        let c = &ch[i % ch.len()];
        batch.push(Publish::new(c.clone(), format!("{i}")).with_id(format!("id{i}")));
    }
    for i in 0..5 {
        batch.push(Publish::new(short[0].clone(), format!("s{i}")));
    }
    sm_a.apply([membership(1, &[1, 2]), publish(2, T0, batch)])
        .await
        .unwrap();
    sm_aq
        .apply([publish(1, T0, vec![Publish::new(chq[0].clone(), "q-a")])])
        .await
        .unwrap();

    // The follower: its own, different data in p and q.
    let dir_b = TempDir::new("snap-b");
    let b = open(&dir_b);
    let mut sm_b =
        GroupStateMachine::new(journal(&b), partition_group(p), ns.clone(), ignore()).unwrap();
    let mut sm_bq =
        GroupStateMachine::new(journal(&b), partition_group(q), ns.clone(), ignore()).unwrap();
    let stale = channels_of(&b, p, "stale", 2);
    sm_b.apply([publish(
        1,
        T0 - 1,
        vec![
            Publish::new(stale[0].clone(), "old").with_id("id0"),
            Publish::new(stale[1].clone(), "old"),
            Publish::new(ch[0].clone(), "old"),
        ],
    )])
    .await
    .unwrap();
    sm_bq
        .apply([publish(1, T0, vec![Publish::new(chq[0].clone(), "q-b")])])
        .await
        .unwrap();

    let snap = sm_a
        .get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .unwrap();
    assert_eq!(snap.meta.last_log_id, Some(log_id(1, 2)));
    let current = sm_a.get_current_snapshot().await.unwrap().unwrap();
    assert_eq!(current.meta, snap.meta);
    assert_eq!(current.snapshot.get_ref(), snap.snapshot.get_ref());

    let mut rx = sm_b.begin_receiving_snapshot().await.unwrap();
    *rx = Cursor::new(snap.snapshot.into_inner());
    sm_b.install_snapshot(&snap.meta, rx).await.unwrap();

    let check = |b: &Store| {
        assert_eq!(b.latest_seq(p), a.latest_seq(p));
        assert_eq!(b.latest_seq(p), 35);
        assert_eq!(b.applied_clock(p), a.applied_clock(p));
        for c in ch.iter().chain(&short).chain(&stale) {
            let c = c.as_bytes();
            assert_eq!(
                b.history_after_at(c, None, 100, T0).unwrap(),
                a.history_after_at(c, None, 100, T0).unwrap()
            );
            assert_eq!(
                b.retention_floor_at(c, T0).unwrap(),
                a.retention_floor_at(c, T0).unwrap()
            );
        }
        assert_eq!(
            payloads(
                &b.history_after_at(short[0].as_bytes(), None, 10, T0)
                    .unwrap()
            ),
            vec!["s3", "s4"]
        );
        // q is the follower's own.
        assert_eq!(
            payloads(&b.history_after_at(chq[0].as_bytes(), None, 10, T0).unwrap()),
            vec!["q-b"]
        );
        assert_eq!(b.channel_stats().events, a.channel_stats().events);
        assert_eq!(b.channel_stats().channels, a.channel_stats().channels);
    };
    check(&b);
    assert_eq!(
        sm_b.applied_state().await.unwrap(),
        (
            Some(log_id(1, 2)),
            StoredMembership::new(
                Some(log_id(1, 1)),
                Membership::new(vec![BTreeSet::from([1, 2])], None)
            )
        )
    );
    assert_eq!(
        sm_b.get_current_snapshot().await.unwrap().unwrap().meta,
        snap.meta
    );

    // Both now take the same decisions: the leader's ids are known, the follower's are gone.
    let next = |i| {
        publish(
            i,
            T0 + 10,
            vec![
                Publish::new(ch[1].clone(), "retry").with_id("id1"),
                Publish::new(stale[0].clone(), "new").with_id("id0"),
                Publish::new(ch[2].clone(), "new"),
            ],
        )
    };
    let ra = sm_a.apply([next(3)]).await.unwrap();
    let rb = sm_b.apply([next(3)]).await.unwrap();
    assert_eq!(ra, rb);
    assert_eq!(applied(&ra[0])[0], Applied::Duplicate(Position::new(p, 2)));
    assert_eq!(applied(&ra[0])[1].position(), Position::new(p, 36));

    // The installed state and snapshot survive a restart.
    drop((sm_b, sm_bq));
    drop(b);
    let b = open(&dir_b);
    assert_eq!(b.latest_seq(p), 37);
    let mut sm_b =
        GroupStateMachine::new(journal(&b), partition_group(p), ns.clone(), ignore()).unwrap();
    assert_eq!(sm_b.applied_state().await.unwrap().0, Some(log_id(1, 3)));
    assert_eq!(
        sm_b.get_current_snapshot().await.unwrap().unwrap().meta,
        snap.meta
    );
    // A snapshot of another group is refused.
    let mut sm_b0 = GroupStateMachine::new(journal(&b), partition_group(0), ns, ignore()).unwrap();
    let other = sm_b.get_current_snapshot().await.unwrap().unwrap();
    assert!(
        sm_b0
            .install_snapshot(&other.meta, other.snapshot)
            .await
            .is_err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_vote_log_and_applied_state() {
    let dir = TempDir::new("restart");
    let group: GroupId = partition_group(0);
    let ch = {
        let store = open(&dir);
        let ch = channels_of(&store, 0, "c", 1);
        let journal = journal(&store);
        let mut log = RaftLogStore::new(journal.clone(), group);
        let mut sm =
            GroupStateMachine::new(journal.clone(), group, namespaces(), ignore()).unwrap();
        log.save_vote(&Vote::new_committed(3, 1)).await.unwrap();
        let entries = vec![
            membership(1, &[1]),
            publish(2, T0, vec![Publish::new(ch[0].clone(), "one")]),
            publish(3, T0 + 1, vec![Publish::new(ch[0].clone(), "two")]),
            blank(4),
        ];
        log.blocking_append(entries.clone()).await.unwrap();
        log.save_committed(Some(log_id(1, 3))).await.unwrap();
        sm.apply(entries[..3].to_vec()).await.unwrap();
        // Another group's log in the same store stays apart.
        let mut other = RaftLogStore::new(journal, partition_group(1));
        other.blocking_append([blank(1)]).await.unwrap();
        store.flush().await.unwrap();
        ch
    };

    let store = open(&dir);
    let mut log = RaftLogStore::new(journal(&store), group);
    let mut sm = GroupStateMachine::new(journal(&store), group, namespaces(), ignore()).unwrap();
    assert_eq!(
        log.read_vote().await.unwrap(),
        Some(Vote::new_committed(3, 1))
    );
    assert_eq!(log.read_committed().await.unwrap(), Some(log_id(1, 3)));
    let state = log.get_log_state().await.unwrap();
    assert_eq!(state.last_log_id, Some(log_id(1, 4)));
    assert_eq!(state.last_purged_log_id, None);
    let entries = log.try_get_log_entries(0..).await.unwrap();
    assert_eq!(
        entries.iter().map(|e| e.log_id.index).collect::<Vec<_>>(),
        vec![1, 2, 3, 4]
    );
    let (last, mem) = sm.applied_state().await.unwrap();
    assert_eq!(last, Some(log_id(1, 3)));
    assert_eq!(mem.log_id(), &Some(log_id(1, 1)));
    assert_eq!(store.latest_seq(0), 2);
    assert_eq!(
        payloads(
            &store
                .history_after_at(ch[0].as_bytes(), None, 10, T0)
                .unwrap()
        ),
        vec!["one", "two"]
    );

    // Purge keeps its mark across a restart, even with the log empty.
    log.purge(log_id(1, 4)).await.unwrap();
    let mut reader = log.get_log_reader().await;
    assert!(reader.try_get_log_entries(0..10).await.unwrap().is_empty());
    sm.apply([blank(4)]).await.unwrap();
    store.flush().await.unwrap();
    drop((log, reader, sm, store));
    let store = open(&dir);
    let journal = journal(&store);
    let mut log = RaftLogStore::new(journal.clone(), group);
    let state = log.get_log_state().await.unwrap();
    assert_eq!(state.last_purged_log_id, Some(log_id(1, 4)));
    assert_eq!(state.last_log_id, Some(log_id(1, 4)));
    let mut other = RaftLogStore::new(journal, partition_group(1));
    assert_eq!(
        other.get_log_state().await.unwrap().last_log_id,
        Some(log_id(1, 1))
    );
}

/// Two members apply the same entries; one runs expire with a local clock far ahead of the
/// leader's, the other never. They must agree on every duplicate and every seq.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dedup_decisions_do_not_depend_on_local_expiry() {
    let p: Partition = 0;
    let ns = namespaces();
    let dirs = [TempDir::new("det-a"), TempDir::new("det-b")];
    let stores: Vec<Arc<Store>> = dirs.iter().map(open).collect();
    let mut sms: Vec<GroupStateMachine> = stores
        .iter()
        .map(|s| {
            GroupStateMachine::new(journal(s), partition_group(p), ns.clone(), ignore()).unwrap()
        })
        .collect();
    let ch = channels_of(&stores[0], p, "c", 2);
    let msg =
        |c: usize, id: &str| Publish::new(ch[c].clone(), id.to_string()).with_id(id.to_string());

    let rounds: Vec<(u64, Vec<Publish>)> = vec![
        (T0, vec![msg(0, "m1"), msg(1, "m2")]),
        (T0 + 30_000, vec![msg(0, "m3")]),
        // Retries within the window of the leader's clock: duplicates everywhere.
        (T0 + WINDOW_MS - 1, vec![msg(0, "m1"), msg(1, "m2")]),
        // m1 and m2 are past the window: new everywhere; m3 is not.
        (T0 + WINDOW_MS, vec![msg(0, "m1"), msg(0, "m3")]),
        // m2 (first seen at T0) is past its window, m3 (T0 + 30 s) is not.
        (T0 + WINDOW_MS + 20_000, vec![msg(1, "m2"), msg(0, "m3")]),
    ];
    let mut replies: Vec<Vec<Reply>> = vec![Vec::new(), Vec::new()];
    for (i, (now, batch)) in rounds.into_iter().enumerate() {
        for (m, sm) in sms.iter_mut().enumerate() {
            // Member 0's clock is an hour ahead and it expires before every entry.
            if m == 0 {
                stores[0].expire(ns.local(), now + 3_600_000).unwrap();
            }
            let r = sm
                .apply([publish(i as u64 + 1, now, batch.clone())])
                .await
                .unwrap();
            replies[m].extend(r);
        }
    }
    assert_eq!(replies[0], replies[1]);
    let dup = |r: &Reply| {
        applied(r)
            .iter()
            .map(Applied::is_duplicate)
            .collect::<Vec<_>>()
    };
    assert_eq!(dup(&replies[0][2]), vec![true, true]);
    assert_eq!(dup(&replies[0][3]), vec![false, true]);
    assert_eq!(dup(&replies[0][4]), vec![false, true]);
    assert_eq!(stores[0].latest_seq(p), stores[1].latest_seq(p));

    // Expire does forget ids once the partition's applied clock passed their window.
    let before = stores[0].expire(ns.local(), T0 + 10 * WINDOW_MS).unwrap();
    assert_eq!(before, 0, "everything already expired what it could");
    sms[0]
        .apply([publish(6, T0 + 10 * WINDOW_MS, Vec::new())])
        .await
        .unwrap();
    assert_eq!(
        stores[0].expire(ns.local(), T0 + 10 * WINDOW_MS).unwrap(),
        3
    );
}
