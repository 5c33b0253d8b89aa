//! The verdict on a member's Raft journal at the start of a connection: whether its data
//! directory went back in time (restored from a backup). Pure: [`crate::peer_stores`] holds
//! the records, their cache and the refusals; this module only compares a record with what the
//! member shows, so that every case (a restart, a late exchange of the previous run, a
//! restore) is tested here without a cluster.

use herald_storage::{JournalProgress, PeerProgress};

/// What to do with a member that showed `journal` on store `store`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Heard; the record becomes this (`None`: unchanged).
    Heard(Option<PeerProgress>),
    /// Refused: this run starts below what an earlier run made durable. The record becomes
    /// this (marked gone back).
    WentBack(PeerProgress),
    /// Refused: it was found gone back before (the record stays).
    StillRefused,
}

/// Judges `journal`, shown on `store` at the start of a connection, against `known`, the
/// record of the member (of any store, or none).
pub fn judge(known: Option<PeerProgress>, store: u64, journal: &JournalProgress) -> Verdict {
    let known = known.filter(|record| record.store == store);
    let heard = |record: PeerProgress| Verdict::Heard((known != Some(record)).then_some(record));
    match known {
        Some(record) if record.went_back => Verdict::StillRefused,
        // A late exchange of the run before (its connection's task was held up): that process
        // is gone, the run after it was judged already.
        Some(record) if record.previous_run != 0 && record.previous_run == journal.run => {
            Verdict::Heard(None)
        }
        Some(record) if record.run == journal.run => heard(PeerProgress {
            durable: record.durable.max(journal.durable),
            ..record
        }),
        Some(record) if journal.start < record.durable => Verdict::WentBack(PeerProgress {
            run: journal.run,
            previous_run: record.run,
            start: journal.start,
            went_back: true,
            ..record
        }),
        _ => heard(PeerProgress {
            store,
            run: journal.run,
            previous_run: known.map_or(0, |record| record.run),
            start: journal.start,
            durable: journal
                .durable
                .max(known.map_or(0, |record| record.durable)),
            went_back: false,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STORE: u64 = 7;

    fn shown(run: u64, start: u64, durable: u64) -> JournalProgress {
        JournalProgress {
            run,
            start,
            durable,
        }
    }

    fn record(run: u64, previous_run: u64, start: u64, durable: u64) -> PeerProgress {
        PeerProgress {
            store: STORE,
            run,
            previous_run,
            start,
            durable,
            went_back: false,
        }
    }

    #[test]
    fn a_first_sight_is_recorded() {
        assert_eq!(
            judge(None, STORE, &shown(1, 10, 12)),
            Verdict::Heard(Some(record(1, 0, 10, 12)))
        );
    }

    #[test]
    fn the_same_run_only_raises_the_record() {
        let known = record(1, 0, 10, 50);
        assert_eq!(
            judge(Some(known), STORE, &shown(1, 10, 60)),
            Verdict::Heard(Some(record(1, 0, 10, 60)))
        );
        // An older answer of the same run lowers nothing.
        assert_eq!(
            judge(Some(known), STORE, &shown(1, 10, 40)),
            Verdict::Heard(None)
        );
    }

    /// A restart (clean or `kill -9`): the new run starts where the last one made records
    /// durable, or past it.
    #[test]
    fn a_restart_is_heard() {
        let known = record(1, 0, 10, 50);
        assert_eq!(
            judge(Some(known), STORE, &shown(2, 50, 50)),
            Verdict::Heard(Some(record(2, 1, 50, 50)))
        );
        assert_eq!(
            judge(Some(known), STORE, &shown(2, 53, 55)),
            Verdict::Heard(Some(record(2, 1, 53, 55)))
        );
    }

    #[test]
    fn a_run_that_starts_below_what_was_durable_went_back() {
        let known = record(1, 0, 10, 50);
        assert_eq!(
            judge(Some(known), STORE, &shown(2, 30, 31)),
            Verdict::WentBack(PeerProgress {
                went_back: true,
                ..record(2, 1, 30, 50)
            })
        );
    }

    /// Once gone back, later runs are refused too, though a refused node's journal keeps
    /// growing past the record.
    #[test]
    fn a_run_after_one_that_went_back_is_still_refused() {
        let known = PeerProgress {
            went_back: true,
            ..record(2, 1, 30, 50)
        };
        assert_eq!(
            judge(Some(known), STORE, &shown(3, 80, 80)),
            Verdict::StillRefused
        );
    }

    /// The previous process's exchange, judged late (after the new run's): it would look like
    /// a run starting below the record, and refuse a healthy member for good.
    #[test]
    fn a_late_exchange_of_the_previous_run_is_not_judged() {
        let known = record(2, 1, 50, 70);
        assert_eq!(
            judge(Some(known), STORE, &shown(1, 10, 50)),
            Verdict::Heard(None)
        );
    }

    /// A record of another store (the member was removed and joined again on a new one) does
    /// not judge this one.
    #[test]
    fn a_record_of_another_store_is_not_compared() {
        let other = PeerProgress {
            store: STORE + 1,
            ..record(1, 0, 10, 500)
        };
        assert_eq!(
            judge(Some(other), STORE, &shown(5, 3, 3)),
            Verdict::Heard(Some(record(5, 0, 3, 3)))
        );
    }
}
