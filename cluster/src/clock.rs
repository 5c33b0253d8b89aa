//! The cluster's clock: this node's wall clock, corrected by the majority of the members'.
//!
//! Every Raft entry that publishes carries its leader's clock, and applying it moves the
//! partition's clock to `max(entry clock, partition clock)`: that clock decides when dedup
//! records are forgotten (`dedup_window`, 10 min) and when events expire (`history_ttl`). A
//! leader whose clock runs ahead (a VM resumed with a stale clock, a node without NTP) would
//! move the partition's clock ahead for good: message ids forgotten early (a retry commits
//! twice) and history dropped early, on every member, long after that leader is gone.
//!
//! So every node measures each member's clock every [`CLOCK_ROUND`] (an `AppRequest::Clock`:
//! the answer's wall clock against the midpoint of the call, good to half its round trip) and
//! keeps, for its own proposals, its wall clock shifted by the median of the offsets (its own
//! 0 included; between two middle values, the one nearer 0). With a majority of sane clocks
//! the median is one of them: a skewed node proposes with the majority's time, and a sane
//! node ignores one skewed member. Offsets under [`CLOCK_TOLERANCE`] are not corrected
//! (measurement jitter), and measurements older than [`CLOCK_STALE`] are not used. A node
//! whose correction passes the tolerance, or that sees a member off by more, logs a warning:
//! the clock should still be fixed. A node that measured nobody (a single node, or one whose
//! members do not answer) uses its own clock.
//!
//! A node just started has measured nobody yet, and in a rolling restart it is often handed
//! partitions within a second of its start. So a leader proposes only once the first round
//! has ended ([`ClusterClock::wait_first_round`]): milliseconds when the members answer, at
//! most the round's 1 s call timeout when some do not.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::{Duration, Instant};

use herald_storage::raft::NodeId;
use parking_lot::Mutex;
use tokio::sync::watch;

/// How often each member's clock is measured.
pub const CLOCK_ROUND: Duration = Duration::from_secs(2);
/// A measurement older than this is not used (the member stopped answering).
pub const CLOCK_STALE: Duration = Duration::from_secs(10);
/// Offsets within this are left alone: jitter, and the half round trip a measurement may be
/// off by. Well below the windows the clock decides (minutes).
pub const CLOCK_TOLERANCE: Duration = Duration::from_millis(500);
/// A measurement whose call took longer than this is dropped: it could be off by half of it.
pub const CLOCK_MAX_RTT: Duration = Duration::from_millis(500);

/// One member's clock as last measured.
#[derive(Clone, Copy, Debug)]
struct Reading {
    /// The member's clock minus this node's, in milliseconds.
    offset_ms: i64,
    /// When it was measured.
    at: Instant,
}

/// The members' clock offsets and the correction they give (see the module doc).
#[derive(Debug)]
pub struct ClusterClock {
    readings: Mutex<BTreeMap<NodeId, Reading>>,
    /// The correction as last computed ([`Self::refresh`]): what every proposal reads.
    correction: AtomicI64,
    /// Whether a round of measurements has ended since this node started (read on every
    /// proposal, so an atomic; `first_round` wakes those waiting for it).
    measured: AtomicBool,
    first_round: watch::Sender<bool>,
}

impl Default for ClusterClock {
    fn default() -> Self {
        ClusterClock {
            readings: Mutex::default(),
            correction: AtomicI64::default(),
            measured: AtomicBool::new(false),
            first_round: watch::channel(false).0,
        }
    }
}

impl ClusterClock {
    /// Marks the end of a round of measurements (the clock loop calls it after
    /// [`Self::refresh`]): proposals waiting for the first go ahead.
    pub fn round_ended(&self) {
        if !self.measured.swap(true, Ordering::AcqRel) {
            self.first_round.send_replace(true);
        }
    }

    /// Whether a round of measurements has ended since this node started.
    pub fn measured(&self) -> bool {
        self.measured.load(Ordering::Acquire)
    }

    /// Returns once the first round of measurements has ended (at once after that).
    pub async fn wait_first_round(&self) {
        if self.measured() {
            return;
        }
        let mut ended = self.first_round.subscribe();
        let _ = ended.wait_for(|ended| *ended).await;
    }

    /// Records a measurement of `member`: its clock read `their_ms` in an answer to a call
    /// sent when this node's clock read `sent_ms` and that took `rtt`. Returns the offset
    /// (the member's clock minus this node's, ms), or `None` when the call took too long to
    /// tell.
    pub fn record(
        &self,
        member: NodeId,
        sent_ms: u64,
        their_ms: u64,
        rtt: Duration,
    ) -> Option<i64> {
        if rtt > CLOCK_MAX_RTT {
            return None;
        }
        let midpoint = sent_ms as i64 + (rtt.as_millis() as i64) / 2;
        let offset_ms = their_ms as i64 - midpoint;
        self.readings.lock().insert(
            member,
            Reading {
                offset_ms,
                at: Instant::now(),
            },
        );
        Some(offset_ms)
    }

    /// Forgets the members not in `members` (they left the cluster).
    pub fn retain(&self, members: impl Fn(NodeId) -> bool) {
        self.readings.lock().retain(|id, _| members(*id));
    }

    /// The last fresh offset of each member (ms; the member's clock minus this node's).
    pub fn offsets(&self) -> BTreeMap<NodeId, i64> {
        self.readings
            .lock()
            .iter()
            .filter(|(_, r)| r.at.elapsed() <= CLOCK_STALE)
            .map(|(id, r)| (*id, r.offset_ms))
            .collect()
    }

    /// Computes the correction from the fresh readings (the median offset, when past the
    /// tolerance; 0 otherwise), keeps it for [`Self::now_ms`] and returns it. The clock loop
    /// calls it after each round.
    pub fn refresh(&self) -> i64 {
        let offsets: Vec<i64> = self.offsets().into_values().collect();
        let median = median_with_self(&offsets);
        let correction = if median.unsigned_abs() > CLOCK_TOLERANCE.as_millis() as u64 {
            median
        } else {
            0
        };
        self.correction.store(correction, Ordering::Relaxed);
        correction
    }

    /// What this node adds to its clock to get the cluster's (ms), as last refreshed.
    pub fn correction_ms(&self) -> i64 {
        self.correction.load(Ordering::Relaxed)
    }

    /// The cluster's clock now (unix ms): what this node's proposals carry. One atomic read
    /// on top of the wall clock: it runs for every proposal round.
    pub fn now_ms(&self) -> u64 {
        let local = herald_storage::unix_now_ms();
        local.saturating_add_signed(self.correction_ms())
    }
}

/// The median of `offsets` and this node's own 0; between two middle values, the one nearer
/// 0 (with two clocks that disagree, nobody can tell which is right: no correction).
pub fn median_with_self(offsets: &[i64]) -> i64 {
    let mut all: Vec<i64> = offsets.to_vec();
    all.push(0);
    all.sort_unstable();
    let n = all.len();
    if n % 2 == 1 {
        all[n / 2]
    } else {
        let (a, b) = (all[n / 2 - 1], all[n / 2]);
        if a.unsigned_abs() <= b.unsigned_abs() {
            a
        } else {
            b
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: i64 = 3_600_000;

    #[test]
    fn the_majority_decides_and_two_clocks_that_disagree_change_nothing() {
        // Alone, or with one member that agrees.
        assert_eq!(median_with_self(&[]), 0);
        assert_eq!(median_with_self(&[3]), 0);
        // Two members, this node an hour ahead of both: it goes back an hour.
        assert_eq!(median_with_self(&[-HOUR, -HOUR + 40]), -HOUR + 40);
        // This node sane, one member an hour ahead: the sane members decide.
        assert_eq!(median_with_self(&[HOUR, 12]), 12);
        assert_eq!(median_with_self(&[HOUR, -7, 5, 2 * HOUR]), 5);
        // Two clocks an hour apart: no majority, no correction.
        assert_eq!(median_with_self(&[HOUR]), 0);
        assert_eq!(median_with_self(&[-HOUR]), 0);
    }

    #[tokio::test]
    async fn proposals_wait_for_the_first_round_only() {
        let clock = std::sync::Arc::new(ClusterClock::default());
        assert!(!clock.measured());
        let waiting = tokio::spawn({
            let clock = clock.clone();
            async move { clock.wait_first_round().await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished(), "no round has ended yet");
        clock.refresh();
        clock.round_ended();
        tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .expect("woken by the end of the first round")
            .unwrap();
        assert!(clock.measured());
        // Later rounds change nothing; waiting returns at once.
        clock.round_ended();
        tokio::time::timeout(Duration::from_millis(1), clock.wait_first_round())
            .await
            .unwrap();
    }

    #[test]
    fn jitter_is_left_alone_and_slow_or_stale_measurements_do_not_count() {
        let clock = ClusterClock::default();
        let rtt = Duration::from_millis(2);
        // Members 30 ms behind: within the tolerance.
        assert_eq!(clock.record(2, 1_000_000, 999_971, rtt), Some(-30));
        assert_eq!(clock.record(3, 1_000_000, 999_971, rtt), Some(-30));
        assert_eq!(clock.refresh(), 0);
        // An hour behind: corrected.
        clock.record(2, 10 * HOUR as u64, 9 * HOUR as u64 + 1, rtt);
        clock.record(3, 10 * HOUR as u64, 9 * HOUR as u64 + 1, rtt);
        assert_eq!(clock.correction_ms(), 0, "not before the refresh");
        assert_eq!(clock.refresh(), -HOUR);
        assert_eq!(clock.correction_ms(), -HOUR);
        let corrected = clock.now_ms() as i64;
        let local = herald_storage::unix_now_ms() as i64;
        assert!(
            (local - HOUR - corrected).abs() < 1_000,
            "{corrected} vs {local}"
        );
        // A call too slow to tell is not recorded.
        assert_eq!(
            clock.record(2, 0, HOUR as u64, Duration::from_secs(1)),
            None
        );
        // A member that left no longer counts.
        clock.retain(|id| id != 3);
        assert_eq!(clock.offsets().len(), 1);
        assert_eq!(
            clock.refresh(),
            0,
            "one member against this node: no majority"
        );
    }
}
