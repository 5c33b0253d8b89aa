//! Whether this node has applied what its partitions' leaders had committed when it last
//! (re)joined them: a node back from a restart, a pause or a cut-off link has a backlog to
//! apply, and what it applies meanwhile is old. Delivered to a subscription made in that
//! window, those old events would pass for live ones (a Redis `SUBSCRIBE` got 3,000 events
//! published before it, seconds after a restart). So subscriptions wait until the node has
//! caught up (`ClusterNode::wait_caught_up`), and `/ready` says 503 meanwhile.
//!
//! A group is *resynchronising* from the moment this node starts, and again whenever its
//! leader was silent for longer than [`CatchUp::new`]'s `resync_after` (two leader leases:
//! what `/ready` already counts as cut off): the first AppendEntries heard then sets the
//! target, the leader's commit index as that message gave it, and the group is caught up once
//! this node applied that far (or leads the group). Ordinary follower lag, the few entries in
//! flight under load, never counts: only a backlog built up while the node was away does.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use herald_storage::Partition;
use herald_storage::raft::NodeId;

/// Not heard from the group's leader since this node started.
const UNHEARD: u64 = u64::MAX;
/// Caught up: nothing to apply before subscriptions may start.
const SYNCED: u64 = 0;

/// Per group: the leader commits heard and what must be applied before the group counts as
/// caught up. Written on every accepted AppendEntries, read by subscriptions and `/ready`.
#[derive(Debug)]
pub struct CatchUp {
    start: Instant,
    resync_after: Duration,
    /// Milliseconds since `start` of the last AppendEntries heard, per group.
    heard: Vec<AtomicU64>,
    /// The highest leader commit heard, as a count of entries (index + 1; 0: none), per group.
    commit: Vec<AtomicU64>,
    /// [`UNHEARD`], [`SYNCED`], or the commit count this node must apply first, per group.
    target: Vec<AtomicU64>,
    /// Milliseconds since `start` when each group last became [`UNHEARD`] (the start, or a
    /// pause of the process).
    unheard_at: Vec<AtomicU64>,
    /// Milliseconds since `start` of the pause detector's last tick (see [`CatchUp::tick`]).
    ticked: AtomicU64,
    /// Milliseconds since `start` until which each group's target still rises with what its
    /// leader commits (see [`RESYNC_WINDOW`]).
    window_until: Vec<AtomicU64>,
}

/// How long after a resynchronisation starts the target goes on rising with the leader's
/// commits: the first AppendEntries read after a pause may have waited in the socket's buffer
/// since before it, with the commit index of then (a target set by it alone was met at once,
/// and the backlog committed since reached new subscriptions as live events). A leader's
/// fresh messages come within a heartbeat (75 ms).
const RESYNC_WINDOW: Duration = Duration::from_millis(300);

/// How often the pause detector ticks ([`CatchUp::tick`]); a look at it older than twice this
/// means it has not run since the process was paused, or the runtime is starved.
pub const TICK: Duration = Duration::from_millis(100);

/// How far one group is from caught up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lag {
    /// Caught up.
    Synced,
    /// Its leader has not been heard since this node started: how far behind it is, is not
    /// known yet.
    Unheard,
    /// This many entries its leader had committed are still to be applied here.
    Behind(u64),
}

/// A partition this node is still catching up on (`ClusterNode::catching_up`); its
/// `Display` is what `/ready` says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CatchingUp {
    /// The partition (the first one behind).
    pub partition: Partition,
    /// Its leader, if known.
    pub leader: Option<NodeId>,
    /// Entries its leader committed that are still to apply here; `None` while the leader
    /// has not been heard since this node started.
    pub behind: Option<u64>,
}

impl fmt::Display for CatchingUp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let leader = match self.leader {
            Some(node) => format!("node {node}"),
            None => "its leader".to_string(),
        };
        match self.behind {
            Some(entries) => write!(
                f,
                "catching up: partition {} has {entries} entries committed by {leader} still to apply here",
                self.partition
            ),
            None => write!(
                f,
                "catching up: this node has not heard from the leader of partition {} since it started",
                self.partition
            ),
        }
    }
}

impl CatchUp {
    /// A table for `groups` groups, all unheard; a group resynchronises after its leader was
    /// silent for `resync_after`.
    pub fn new(groups: usize, resync_after: Duration) -> CatchUp {
        CatchUp {
            start: Instant::now(),
            resync_after,
            heard: (0..groups).map(|_| AtomicU64::new(0)).collect(),
            commit: (0..groups).map(|_| AtomicU64::new(0)).collect(),
            target: (0..groups).map(|_| AtomicU64::new(UNHEARD)).collect(),
            unheard_at: (0..groups).map(|_| AtomicU64::new(0)).collect(),
            ticked: AtomicU64::new(0),
            window_until: (0..groups).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// The pause detector's tick, every [`TICK`]: returns how long the process went without
    /// one when that was longer than `resync_after` (a `SIGSTOP`, a frozen VM, a starved
    /// runtime). Every group is then caught up on again: its leaders committed meanwhile
    /// what this node has not applied, and a subscription the node took while paused (it
    /// waited in the socket's backlog) would otherwise start before the node even heard of it.
    pub fn tick(&self) -> Option<Duration> {
        let now = self.start.elapsed().as_millis() as u64;
        let before = self.ticked.swap(now, Ordering::AcqRel);
        let gap = Duration::from_millis(now.saturating_sub(before));
        if gap <= self.resync_after {
            return None;
        }
        for (target, at) in self.target.iter().zip(&self.unheard_at) {
            at.store(now, Ordering::Release);
            target.store(UNHEARD, Ordering::Release);
        }
        Some(gap)
    }

    /// Whether the pause detector has ticked lately: if not, the process may just have been
    /// resumed, and the detector not run yet to find it (see [`CatchUp::tick`]).
    pub fn ticking(&self) -> bool {
        let now = self.start.elapsed().as_millis() as u64;
        let ticked = self.ticked.load(Ordering::Acquire);
        Duration::from_millis(now.saturating_sub(ticked)) < TICK * 2
    }

    /// How long `group` has been [`Lag::Unheard`] (since the start, or the last pause).
    pub fn unheard_for(&self, group: usize) -> Duration {
        let at = self
            .unheard_at
            .get(group)
            .map_or(0, |at| at.load(Ordering::Acquire));
        self.start
            .elapsed()
            .saturating_sub(Duration::from_millis(at))
    }

    /// Notes an AppendEntries from `group`'s leader, accepted, carrying its commit index.
    pub fn heard(&self, group: usize, leader_commit: Option<u64>) {
        let (Some(heard), Some(commit), Some(target)) = (
            self.heard.get(group),
            self.commit.get(group),
            self.target.get(group),
        ) else {
            return;
        };
        let count = leader_commit.map_or(0, |index| index + 1);
        let now = self.start.elapsed().as_millis() as u64;
        let before = heard.swap(now, Ordering::AcqRel);
        commit.fetch_max(count, Ordering::AcqRel);
        let silent = Duration::from_millis(now.saturating_sub(before)) > self.resync_after;
        let window = &self.window_until[group];
        if target.load(Ordering::Acquire) == UNHEARD || silent {
            // Back from a silence (or just started): apply what the leader has committed
            // before counting as caught up. At least 1, so that the target is never SYNCED.
            window.store(now + RESYNC_WINDOW.as_millis() as u64, Ordering::Release);
            target.store(count.max(1), Ordering::Release);
        } else if now < window.load(Ordering::Acquire) {
            // Still in the window: a fresher message raises the target (never from SYNCED,
            // which the window keeps from being reached meanwhile).
            let _ = target.fetch_update(Ordering::AcqRel, Ordering::Acquire, |goal| {
                (goal != SYNCED && goal != UNHEARD && goal < count).then_some(count)
            });
        }
    }

    /// Whether `group` is known to be caught up (one atomic read: the fast path of every
    /// subscription).
    pub fn is_synced(&self, group: usize) -> bool {
        self.target
            .get(group)
            .is_none_or(|target| target.load(Ordering::Acquire) == SYNCED)
    }

    /// Where `group` stands, given how many of its entries this node has applied (index + 1)
    /// and whether it leads the group (a leader is caught up by definition).
    pub fn lag(&self, group: usize, applied: u64, leads: bool) -> Lag {
        let Some(target) = self.target.get(group) else {
            return Lag::Synced;
        };
        let goal = target.load(Ordering::Acquire);
        if goal == SYNCED {
            return Lag::Synced;
        }
        let now = self.start.elapsed().as_millis() as u64;
        let in_window = now < self.window_until[group].load(Ordering::Acquire);
        if leads || (goal != UNHEARD && applied >= goal && !in_window) {
            // A concurrent resync (a newer target) is kept: only this goal is cleared.
            let _ = target.compare_exchange(goal, SYNCED, Ordering::AcqRel, Ordering::Acquire);
            return Lag::Synced;
        }
        if goal == UNHEARD {
            return Lag::Unheard;
        }
        let commit = self.commit[group].load(Ordering::Acquire);
        Lag::Behind(commit.saturating_sub(applied).max(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RESYNC: Duration = Duration::from_millis(50);

    #[test]
    fn a_group_is_caught_up_once_it_applied_what_its_leader_had_committed_when_first_heard() {
        // A leader silent for longer than the window waits is still no silence here.
        let catch_up = CatchUp::new(2, RESYNC_WINDOW * 10);
        assert_eq!(catch_up.lag(1, 0, false), Lag::Unheard);
        catch_up.heard(1, Some(99)); // 100 entries committed
        assert_eq!(catch_up.lag(1, 40, false), Lag::Behind(60));
        // Within the window, a fresher commit raises the goal (the first message may have
        // waited in a buffer), and reaching the goal does not count yet.
        catch_up.heard(1, Some(149));
        assert_eq!(catch_up.lag(1, 150, false), Lag::Behind(1));
        std::thread::sleep(RESYNC_WINDOW);
        // Past it, later commits raise what is shown, not the goal.
        catch_up.heard(1, Some(199));
        assert_eq!(catch_up.lag(1, 120, false), Lag::Behind(80));
        assert!(!catch_up.is_synced(1));
        assert_eq!(catch_up.lag(1, 150, false), Lag::Synced);
        assert!(catch_up.is_synced(1));
        // Ordinary lag behind later commits does not count.
        catch_up.heard(1, Some(249));
        assert_eq!(catch_up.lag(1, 160, false), Lag::Synced);
        // Group 0 was never heard.
        assert_eq!(catch_up.lag(0, 0, false), Lag::Unheard);
    }

    #[test]
    fn a_silence_longer_than_the_limit_makes_the_group_catch_up_again() {
        let catch_up = CatchUp::new(1, RESYNC);
        catch_up.heard(0, Some(9));
        std::thread::sleep(RESYNC_WINDOW);
        assert_eq!(catch_up.lag(0, 10, false), Lag::Synced);
        std::thread::sleep(RESYNC * 3);
        catch_up.heard(0, Some(499));
        assert_eq!(catch_up.lag(0, 10, false), Lag::Behind(490));
        std::thread::sleep(RESYNC_WINDOW);
        assert_eq!(catch_up.lag(0, 500, false), Lag::Synced);
    }

    #[test]
    fn a_pause_of_the_process_makes_every_group_catch_up_again() {
        let catch_up = CatchUp::new(2, RESYNC);
        // Waits `d`, the detector ticking as it does while the process runs.
        let ticking_for = |d: Duration| {
            let until = Instant::now() + d;
            while Instant::now() < until {
                assert_eq!(catch_up.tick(), None);
                std::thread::sleep(Duration::from_millis(10));
            }
        };
        for group in 0..2 {
            catch_up.heard(group, Some(9));
        }
        ticking_for(RESYNC_WINDOW);
        for group in 0..2 {
            assert_eq!(catch_up.lag(group, 10, false), Lag::Synced);
        }
        assert_eq!(catch_up.tick(), None);
        assert!(catch_up.ticking());
        std::thread::sleep(TICK * 3);
        assert!(!catch_up.ticking());
        assert!(catch_up.tick().is_some_and(|gap| gap >= TICK * 3));
        for group in 0..2 {
            assert_eq!(catch_up.lag(group, 10, false), Lag::Unheard);
            assert!(catch_up.unheard_for(group) < RESYNC);
        }
        // Heard again: what its leader had committed then is the goal.
        catch_up.heard(0, Some(99));
        assert_eq!(catch_up.lag(0, 10, false), Lag::Behind(90));
        ticking_for(RESYNC_WINDOW);
        assert_eq!(catch_up.lag(0, 100, false), Lag::Synced);
    }

    #[test]
    fn a_leader_and_an_empty_group_are_caught_up() {
        let catch_up = CatchUp::new(1, RESYNC);
        assert_eq!(catch_up.lag(0, 0, true), Lag::Synced);
        assert_eq!(catch_up.lag(0, 0, false), Lag::Synced, "stays caught up");
        // A leader with no commit yet (None) still sets a goal of at least one entry.
        let fresh = CatchUp::new(1, RESYNC);
        fresh.heard(0, None);
        assert_eq!(fresh.lag(0, 0, false), Lag::Behind(1));
        std::thread::sleep(RESYNC_WINDOW);
        assert_eq!(fresh.lag(0, 1, false), Lag::Synced);
        // An unknown group never panics.
        assert_eq!(fresh.lag(7, 0, false), Lag::Synced);
        fresh.heard(7, Some(3));
    }
}
