//! Which store each cluster member runs on: a member restarted on an empty (or another) data
//! directory is refused until it is removed and joined again.
//!
//! Raft assumes a voter never forgets what it wrote. A node whose data directory is lost and
//! that comes back under its node id starts with an empty log, grants its vote to any
//! candidate, and can so make a quorum with a node that lacks acknowledged events: they are
//! then lost, and the positions they had are given to other events. So every store has a
//! random id for its life (`Store::store_id`); two nodes exchange theirs at the start of every
//! connection (see [`crate::rpc::StoreIds`]). Each node records, trust on first use, the store
//! id every member first showed, and refuses Raft messages to and from a member that shows
//! another.
//!
//! A node that leaves the cluster is forgotten, so that a removed node can be joined again on
//! a new store: the meta group's state machine forgets the records of nodes outside each
//! membership it applies, in log order (`Store::forget_peer_store_ids_except`), so a node that
//! catches up on "removed, then joined again" in one batch forgets it too. A node that joins
//! gets the store id it showed at its last exchange since it left (if any) recorded, even when
//! no new connection (so no new exchange) follows the join; one that has not shown one since
//! (the usual "lost disk: remove it, join it again" before it is back, or a node removed and
//! joined again while it kept running) is recorded at its first exchange after the join, or
//! from its answer to the first clock round ([`PeerStores::saw_journal`]), whichever comes
//! first.
//!
//! A data directory restored from a backup or a disk snapshot keeps its store id, but has
//! forgotten what was written since: the same danger. So a node also shows how far its Raft
//! journal has got (`Store::journal_progress`: a random number per run, the journal's last
//! record when the run began, its last durable record now), at the start of every connection
//! and each clock round. Each node records, per member, the highest durable record it saw and
//! the run it was seen in (in memory at once; in its store, as a record of its own journal,
//! whenever that moved by more than `WRITE_SLACK` (64)). A new run that begins below it went back
//! in time: the member is refused for good (the verdict is flushed and told to the other
//! members each round: [`PeerStores::heard_went_back`]), until it is removed and joined again.
//! A backup taken after the member's last report (its last round before it stopped) is not
//! told apart (nor, by a node that crashed since, one within `WRITE_SLACK` (64) records of what
//! it had written down); a member stopped and copied whole is (its next run starts where it
//! stopped).
//! The verdict on a journal shown is [`crate::peer_journals::judge`]; this module keeps the
//! records it compares with.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use herald_storage::raft::TypeConfig;
use herald_storage::{JournalProgress, PeerProgress, Store};
use openraft::Raft;
use parking_lot::Mutex;

use crate::NodeId;
use crate::peer_journals::Verdict;
use crate::rpc::{Identity, StoreIds, store_changed, store_went_back};

/// How often a refused member is logged.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// This node's record of its peers' store ids (see the module doc).
pub struct PeerStores {
    store: Arc<Store>,
    /// The meta group, whose membership says who the members are; until set, every peer is
    /// heard (formation).
    meta: OnceLock<Raft<TypeConfig>>,
    /// Held while a record is read and judged, or written (the records themselves are in the
    /// store: they are read once per connection, no cache is worth its invalidation).
    judging: Mutex<()>,
    /// The store's [`Store::peer_store_generation`] that `refused` reflects.
    generation: AtomicU64,
    /// The store id each peer showed at its last exchange, member or not.
    shown: Mutex<HashMap<NodeId, u64>>,
    /// Peers refused at their last exchange, and when each was last logged.
    refused: Mutex<HashMap<NodeId, Instant>>,
    /// The store id each peer showed on the last connection this node dialed to it (at the
    /// address the membership gives it: the member itself, not a process claiming its id).
    dialed: Mutex<HashMap<NodeId, u64>>,
    /// The recorded store ids as last read from the store (`None`: no record), for the
    /// per-message checks; cleared when the store's generation moves.
    records: Mutex<(u64, HashMap<NodeId, Option<u64>>)>,
    /// What this node knows of each member's journal.
    journals: Mutex<Journals>,
}

/// How far a member's journal may get past what is written of it to the store before the
/// record is written again. Writing every raise would feed itself: each write is a record of
/// this node's own journal, which its peers see and write down in turn, every round, idle or
/// not. A record written this far behind only makes a check after a crash of this node less
/// strict by as much (this process judges by what it holds in memory).
const WRITE_SLACK: u64 = 64;

/// What this node knows of each member's journal (see the module doc).
#[derive(Default)]
struct Journals {
    /// The store's [`Store::peer_store_generation`] these reflect.
    generation: u64,
    /// The record of each member as this process holds it (`None`: none in the store), raised
    /// at once.
    known: HashMap<NodeId, Option<PeerProgress>>,
    /// The highest durable record written to the store for each member.
    written: HashMap<NodeId, u64>,
}

impl PeerStores {
    /// Records kept in `store`.
    pub fn new(store: Arc<Store>) -> Arc<PeerStores> {
        let generation = AtomicU64::new(store.peer_store_generation());
        Arc::new(PeerStores {
            store,
            meta: OnceLock::new(),
            judging: Mutex::new(()),
            generation,
            shown: Mutex::new(HashMap::new()),
            refused: Mutex::new(HashMap::new()),
            dialed: Mutex::new(HashMap::new()),
            records: Mutex::new((0, HashMap::new())),
            journals: Mutex::new(Journals::default()),
        })
    }

    /// Starts judging peers by the meta group's membership, and records the store id of each
    /// node that joins it. The watcher ends with the group.
    pub fn watch(self: &Arc<Self>, meta: Raft<TypeConfig>) {
        let _ = self.meta.set(meta.clone());
        let this = Arc::downgrade(self);
        let mut metrics = meta.metrics();
        tokio::spawn(async move {
            let mut last: Option<BTreeSet<NodeId>> = None;
            while metrics.changed().await.is_ok() {
                let members: BTreeSet<NodeId> = {
                    let m = metrics.borrow_and_update();
                    m.membership_config
                        .membership()
                        .nodes()
                        .map(|(id, _)| *id)
                        .collect()
                };
                if members.is_empty() || last.as_ref() == Some(&members) {
                    continue;
                }
                let Some(this) = this.upgrade() else { return };
                // Nothing is recorded before the cluster has members (see `accepts`): its
                // first membership records what each member showed last.
                if last.is_none() {
                    for member in &members {
                        this.record_shown(*member);
                    }
                }
                if let Some(before) = &last {
                    // What a node that left showed is of its old store: a node joined again
                    // after a lost disk must not be judged by it (it would be refused for good).
                    for left in before.difference(&members) {
                        this.shown.lock().remove(left);
                    }
                    for joined in members.difference(before) {
                        this.record_shown(*joined);
                    }
                }
                last = Some(members);
            }
        });
    }

    /// Drops the refusals whose record the store forgot since the last look (the node left
    /// the cluster).
    fn sync(&self) {
        let now = self.store.peer_store_generation();
        if self.generation.swap(now, Ordering::AcqRel) == now {
            return;
        }
        self.refused
            .lock()
            .retain(|peer, _| matches!(self.store.peer_store_id(*peer), Ok(Some(_))));
    }

    /// A node just joined: records the store id it last showed, if it has no record yet.
    fn record_shown(&self, peer: NodeId) {
        let Some(shown) = self.shown.lock().get(&peer).copied() else {
            return;
        };
        let _judging = self.judging.lock();
        if matches!(self.store.peer_store_id(peer), Ok(Some(_))) {
            return;
        }
        self.set_record(peer, shown);
    }

    /// Whether `peer` is refused over the connections this node dials to it (for `herald
    /// cluster status`).
    pub fn is_refused(&self, peer: NodeId) -> bool {
        StoreIds::refused_dialed(self, peer)
    }

    /// Whether `peer` is refused over the connections this node dials to it, or was at the
    /// last exchange it made (a member restarted on an empty store dials in before this node
    /// dials its new process): what the reachability verdicts count as not answering.
    pub fn refuses(&self, peer: NodeId) -> bool {
        self.is_refused(peer) || StoreIds::refused(self, peer)
    }

    /// The store id recorded for `peer`, through a cache kept in step with the store.
    fn record(&self, peer: NodeId) -> Option<u64> {
        let generation = self.store.peer_store_generation();
        let mut records = self.records.lock();
        if records.0 != generation {
            *records = (generation, HashMap::new());
        }
        if let Some(record) = records.1.get(&peer) {
            return *record;
        }
        let record = self.store.peer_store_id(peer).ok().flatten();
        records.1.insert(peer, record);
        record
    }

    /// The journals known, after dropping those of members the store forgot since the last
    /// look (they left the cluster).
    fn journals(&self) -> parking_lot::MutexGuard<'_, Journals> {
        let generation = self.store.peer_store_generation();
        let mut journals = self.journals.lock();
        if journals.generation != generation {
            journals.generation = generation;
            let kept = |peer: &NodeId| matches!(self.store.peer_progress(*peer), Ok(Some(_)));
            journals.known.retain(|peer, _| kept(peer));
            journals.written.retain(|peer, _| kept(peer));
        }
        journals
    }

    /// What this node knows of `peer`'s journal (read from the store the first time).
    fn journal_record(&self, peer: NodeId) -> Option<PeerProgress> {
        let mut journals = self.journals();
        if let Some(record) = journals.known.get(&peer) {
            return *record;
        }
        let record = self.store.peer_progress(peer).ok().flatten();
        journals.known.insert(peer, record);
        if let Some(record) = record {
            journals.written.insert(peer, record.durable);
        }
        record
    }

    /// Records what is known of `peer`'s journal: in memory at once; in the store when it
    /// changes more than a raise of at most `WRITE_SLACK` (64) records. Called under `judging`.
    fn set_journal_record(&self, peer: NodeId, record: PeerProgress) {
        let mut journals = self.journals();
        let before = journals.known.get(&peer).copied().flatten();
        let written = journals.written.get(&peer).copied();
        let write = before.is_none_or(|before| {
            before.store != record.store
                || before.run != record.run
                || before.went_back != record.went_back
        }) || written.is_none_or(|written| record.durable > written + WRITE_SLACK);
        journals.known.insert(peer, Some(record));
        if !write {
            return;
        }
        journals.written.insert(peer, record.durable);
        drop(journals);
        if let Err(error) = self.store.set_peer_progress(peer, &record) {
            tracing::warn!(peer, %error, "cannot record a member's journal");
        }
    }

    /// Whether `peer`, seen on `store`, went back in time (see the module doc).
    fn went_back(&self, peer: NodeId, store: u64) -> bool {
        self.journal_record(peer)
            .is_some_and(|record| record.store == store && record.went_back)
    }

    /// Raises what is known of member `peer`'s journal to what it showed in a clock round,
    /// if that is the run last judged; records it if none was (its connections started
    /// before this node knew the membership). Another run is judged at its first connection,
    /// not here: this answer may be an earlier run's, overtaken.
    ///
    /// A member with no store id recorded gets the one it answered with recorded: a node
    /// removed and joined again while it kept running shows its store at no new connection,
    /// and would otherwise be trusted on whatever store it next connects with, an empty
    /// one after a lost disk included. The answer came over a connection this node dialed to
    /// the member's address, from the process running there now.
    pub fn saw_journal(&self, peer: NodeId, identity: &Identity) {
        let _judging = self.judging.lock();
        if !self.membership_known() || !self.is_member(peer) {
            return;
        }
        match self.record(peer) {
            None => {
                tracing::debug!(
                    peer,
                    store = format_args!("{:016x}", identity.store),
                    "recording the store a member answers from"
                );
                self.set_record(peer, identity.store);
                self.refused.lock().remove(&peer);
            }
            Some(known) if known != identity.store => return,
            Some(_) => {}
        }
        let journal = &identity.journal;
        let raised = match self.journal_record(peer) {
            Some(record) if record.store == identity.store => {
                (record.run == journal.run && record.durable < journal.durable && !record.went_back)
                    .then_some(PeerProgress {
                        durable: journal.durable,
                        ..record
                    })
            }
            _ => Some(PeerProgress {
                store: identity.store,
                run: journal.run,
                previous_run: 0,
                start: journal.start,
                durable: journal.durable,
                went_back: false,
            }),
        };
        if let Some(record) = raised {
            self.set_journal_record(peer, record);
        }
    }

    /// The members this node refuses as gone back in time, each with the store id it refuses
    /// (told to the others in the clock round: see [`PeerStores::heard_went_back`]).
    pub fn went_back_members(&self) -> Vec<(NodeId, u64)> {
        let Some(meta) = self.meta.get() else {
            return Vec::new();
        };
        let members: Vec<NodeId> = meta
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .nodes()
            .map(|(id, _)| *id)
            .collect();
        members
            .into_iter()
            .filter_map(|member| {
                let record = self.journal_record(member)?;
                (record.went_back && self.record(member) == Some(record.store))
                    .then_some((member, record.store))
            })
            .collect()
    }

    /// Member `from` refuses the members in `went_back` (with the store each showed) as gone
    /// back in time: so does this node, if it knows each on the same store. A member that was
    /// down when a restored node first came back would otherwise judge only that node's later
    /// runs, whose journals start higher and higher (it writes records of its own while
    /// refused), and might let it in.
    pub fn heard_went_back(&self, from: NodeId, went_back: &[(NodeId, u64)]) {
        for &(peer, store) in went_back {
            let _judging = self.judging.lock();
            if !self.membership_known()
                || !self.is_member(peer)
                || self.record(peer) != Some(store)
                || self.went_back(peer, store)
            {
                continue;
            }
            let known = self
                .journal_record(peer)
                .filter(|record| record.store == store);
            self.set_journal_record(
                peer,
                PeerProgress {
                    store,
                    run: known.map_or(0, |record| record.run),
                    previous_run: known.map_or(0, |record| record.previous_run),
                    start: known.map_or(0, |record| record.start),
                    durable: known.map_or(0, |record| record.durable),
                    went_back: true,
                },
            );
            self.refuse(peer, || {
                tracing::error!(
                    peer,
                    from,
                    "refusing node {peer}: node {from} found {}",
                    store_went_back(peer, 0, 0)
                );
            });
        }
    }

    /// The highest journal record of `peer`'s known to this node, and whether it went back
    /// (for `herald cluster status`).
    pub fn journal_seen(&self, peer: NodeId) -> Option<PeerProgress> {
        self.journal_record(peer)
    }

    /// This node's store id and journal (see [`StoreIds::identity`]).
    pub fn identity(&self) -> Option<Identity> {
        StoreIds::identity(self)
    }

    /// Why `peer` is refused (see [`StoreIds::refusal`]).
    pub fn refusal(&self, peer: NodeId) -> String {
        StoreIds::refusal(self, peer)
    }

    /// Whether `peer`, showing store `store`, is refused (see [`StoreIds::refused_store`]).
    pub fn refused_store(&self, peer: NodeId, store: u64) -> bool {
        StoreIds::refused_store(self, peer, store)
    }

    /// Logs a refusal of `peer`, at most every [`WARN_EVERY`], and records it.
    fn refuse(&self, peer: NodeId, log: impl FnOnce()) {
        let mut refused = self.refused.lock();
        let now = Instant::now();
        match refused.get(&peer) {
            Some(at) if now.duration_since(*at) < WARN_EVERY => {}
            _ => {
                refused.insert(peer, now);
                log();
            }
        }
    }

    /// Records `store` for `peer` in the store and the cache.
    fn set_record(&self, peer: NodeId, store: u64) {
        if let Err(error) = self.store.set_peer_store_id(peer, Some(store)) {
            tracing::warn!(peer, %error, "cannot record a member's store id");
        }
        self.records.lock().1.remove(&peer);
    }

    /// Whether this node knows the cluster's membership (the meta group has one).
    fn membership_known(&self) -> bool {
        self.meta.get().is_some_and(crate::node::has_membership)
    }

    /// Whether `peer` is a member, as far as this node knows (`true` before it knows any).
    fn is_member(&self, peer: NodeId) -> bool {
        let Some(meta) = self.meta.get() else {
            return true;
        };
        let metrics = meta.metrics();
        let metrics = metrics.borrow();
        let membership = metrics.membership_config.membership();
        membership.nodes().next().is_none() || membership.nodes().any(|(id, _)| *id == peer)
    }

    /// Records the verdict on `peer` and returns it.
    fn judge(&self, peer: NodeId, known: u64, shown: u64) -> bool {
        let mut refused = self.refused.lock();
        if known == shown {
            // Refused for its journal, it stays so (and its refusal is logged only so often).
            if !self.went_back(peer, shown) {
                refused.remove(&peer);
            }
            return true;
        }
        drop(refused);
        self.refuse(peer, || {
            tracing::error!(
                peer,
                known = format_args!("{known:016x}"),
                shown = format_args!("{shown:016x}"),
                "refusing node {peer}: it runs on another store than the one it was a member with; {} (or a second process was started with node id {peer}, e.g. from a copied config: stop that one; the member itself keeps working)",
                store_changed(peer)
            );
        });
        false
    }
}

impl StoreIds for PeerStores {
    fn local(&self) -> u64 {
        self.store.store_id()
    }

    fn refused(&self, peer: NodeId) -> bool {
        if self.generation.load(Ordering::Acquire) != self.store.peer_store_generation() {
            self.sync();
        }
        self.refused.lock().contains_key(&peer)
    }

    fn accepts_dialed(&self, peer: NodeId, store: u64) -> bool {
        self.dialed.lock().insert(peer, store);
        self.accepts(peer, store)
    }

    fn takes_part(&self, peer: NodeId) -> bool {
        !self.membership_known() || self.is_member(peer)
    }

    fn refused_store(&self, peer: NodeId, store: u64) -> bool {
        // Members only have records (a node that leaves is forgotten).
        self.record(peer).is_some_and(|known| known != store) || self.went_back(peer, store)
    }

    fn identity(&self) -> Option<Identity> {
        Some(Identity {
            store: self.store.store_id(),
            journal: self.store.journal_progress()?,
        })
    }

    fn accepts_journal(&self, peer: NodeId, store: u64, journal: &JournalProgress) -> bool {
        let _judging = self.judging.lock();
        self.sync();
        if !self.membership_known() || !self.is_member(peer) {
            return true;
        }
        let known = self.journal_record(peer);
        let shown_start = journal.start;
        let (start, durable) = match crate::peer_journals::judge(known, store, journal) {
            Verdict::Heard(record) => {
                if let Some(record) = record {
                    self.set_journal_record(peer, record);
                }
                return true;
            }
            Verdict::WentBack(record) => {
                self.set_journal_record(peer, record);
                (shown_start, record.durable)
            }
            // Named by the run found gone back: a refused node's later runs start higher.
            Verdict::StillRefused => known.map_or((shown_start, 0), |r| (r.start, r.durable)),
        };
        self.refuse(peer, || {
            tracing::error!(
                peer,
                start,
                durable,
                "refusing node {peer}: {}",
                store_went_back(peer, start, durable)
            );
        });
        false
    }

    fn refusal(&self, peer: NodeId) -> String {
        match self.journal_record(peer) {
            Some(record) if record.went_back && self.record(peer) == Some(record.store) => {
                store_went_back(peer, record.start, record.durable)
            }
            _ => format!(
                "runs on another store than the one it was a member with: {}",
                store_changed(peer)
            ),
        }
    }

    fn refused_dialed(&self, peer: NodeId) -> bool {
        let dialed = self.dialed.lock().get(&peer).copied();
        match dialed {
            Some(store) => self.refused_store(peer, store),
            None => self.refused(peer),
        }
    }

    fn accepts(&self, peer: NodeId, store: u64) -> bool {
        self.shown.lock().insert(peer, store);
        let _judging = self.judging.lock();
        self.sync();
        // Before the cluster has members there is nothing to protect, and a node seen then
        // may yet be replaced (wiped, restarted with other settings) before it is let in: it
        // is recorded when the first membership names it (see `watch`).
        if !self.membership_known() {
            self.refused.lock().remove(&peer);
            return true;
        }
        // Not a member (yet, or any more): other rules decide what it may do.
        if !self.is_member(peer) {
            self.refused.lock().remove(&peer);
            return true;
        }
        match self.store.peer_store_id(peer) {
            Ok(Some(first)) => self.judge(peer, first, store),
            Ok(None) => {
                self.set_record(peer, store);
                self.refused.lock().remove(&peer);
                true
            }
            Err(error) => {
                tracing::warn!(peer, %error, "cannot read a member's store id");
                true
            }
        }
    }
}
