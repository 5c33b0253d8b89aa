//! The checker: reads the run's record and the nodes' histories after the heal, and judges them
//! against herald's delivery contract (`shared/design.md`, clauses 1-6).
//!
//! | violation | contract | what it means |
//! |---|---|---|
//! | `acked-lost-prefix` / `-middle` / `-postfix` | 1, 3 | an acknowledged value a subscriber never received, before its first / between / after its last received value |
//! | `committed-not-delivered` | 2, 3 | a value committed (in the nodes' history) but not acknowledged, which a subscriber skipped |
//! | `history-missing` | 1, 3 | a node's history after the heal lacks committed events the others have (of the newest `history_size` per channel: retention drops the rest) |
//! | `history-beyond-retention` | - | a node's history of a channel holds events older than its newest `history_size` |
//! | `history-order` | 2 | a node's history of a channel is not in position order |
//! | `history-unreadable` | 3 | a node's history could not be read after the heal |
//! | `position-conflict` | 2, 3 | two different values seen at one position (by nodes, acknowledgements or subscribers) |
//! | `duplicate-commit` | 5 | one message id committed at two positions |
//! | `ack-position-mismatch` | 5 | two acknowledgements of one message id name different positions |
//! | `failed-but-committed` | 1 | herald said "nothing was committed", and the value was committed |
//! | `unexpected` | 2 | a delivered or stored value that no writer published |
//! | `duplicate-delivery` | 2, 3 | a subscriber got one value at two positions |
//! | `redelivery` | 3 | after a resume, a subscriber got an event at or before its cursor again |
//! | `order` | 2 | on one connection, an event's position was not after the previous one's |
//! | `epoch-change` | 3 | a cursor from another epoch was handed out |
//! | `ack-order` | 1, 2 | a value acknowledged before another was even sent sits after it in the channel |
//! | `unexplained-gap` | 4 | a gap notice that retention does not explain |
//! | `malformed` | - | an event without a decodable cursor or payload |

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::cursor::Position;
use crate::history::{AttemptResult, Outcome, Publish, Record, ValueId};
use crate::nemesis::FaultKind;

/// One entry of a node's history.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// Its position.
    pub position: Option<Position>,
    /// The value it carries.
    pub value: Option<ValueId>,
    /// The raw payload or cursor when either did not parse.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub raw: Option<String>,
}

/// A node's history of every workload channel, read after the heal.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeHistory {
    /// The node.
    pub node: u64,
    /// Per channel, in the order the node returned it.
    pub channels: Vec<Vec<HistoryEntry>>,
    /// Why it could not be read.
    pub error: Option<String>,
}

/// One violation.
#[derive(Debug, Clone, Serialize)]
pub struct Violation {
    /// Its kind (see the module docs).
    pub kind: &'static str,
    /// The contract clauses concerned.
    pub clause: &'static str,
    /// What was seen.
    pub detail: String,
}

/// Latency-like figures in milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    /// Samples.
    pub count: usize,
    /// Median.
    pub p50: Option<f64>,
    /// 99th percentile.
    pub p99: Option<f64>,
    /// Largest.
    pub max: Option<f64>,
}

impl Summary {
    /// Summarises `samples` (any order).
    pub fn of(samples: &[f64]) -> Summary {
        let mut sorted: Vec<f64> = samples.iter().copied().filter(|v| v.is_finite()).collect();
        sorted.sort_by(f64::total_cmp);
        let at = |q: f64| -> Option<f64> {
            if sorted.is_empty() {
                return None;
            }
            let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
            Some(sorted[i])
        };
        Summary {
            count: sorted.len(),
            p50: at(0.50),
            p99: at(0.99),
            max: sorted.last().copied(),
        }
    }
}

/// One failover sample.
#[derive(Debug, Clone, Serialize)]
pub struct FailoverSample {
    /// The fault.
    pub fault: usize,
    /// Its kind.
    pub kind: String,
    /// The partition (publishes) or subscriber (resumes).
    pub of: String,
    /// Milliseconds from the fault's start, `None` if it never happened before the fault ended
    /// or could not be measured.
    pub ms: Option<f64>,
    /// Why a publish failover was not measured: no publish went to a surviving node soon after
    /// the fault (every writer of the partition waited on a victim), so the first
    /// acknowledgement tells only when someone asked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unmeasured: Option<String>,
}

/// A publish failover is measured only if some publish went to a surviving node within this
/// many milliseconds of the fault.
const FAILOVER_UNASKED_MS: f64 = 1_000.0;

/// The measured figures.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Metrics {
    /// From a fault that took away a partition's leader to that partition's first acknowledged
    /// publish sent, after the fault started, to a node the fault spared. (An attempt sent to
    /// a paused node waits for the client's timeout, however soon the others elect.)
    pub failover_publish: Summary,
    /// The same, per fault kind.
    pub failover_publish_by_kind: BTreeMap<String, Summary>,
    /// From a fault that took away a subscriber's node to the first event on its next
    /// connection.
    pub resume: Summary,
    /// The same, per fault kind.
    pub resume_by_kind: BTreeMap<String, Summary>,
    /// Every failover sample.
    pub failover_samples: Vec<FailoverSample>,
    /// Every resume sample.
    pub resume_samples: Vec<FailoverSample>,
    /// Publish latency (first attempt to acknowledgement, retries included), all values.
    pub latency: Summary,
    /// The same, for values sent during a fault.
    pub latency_in_faults: Summary,
    /// The same, for values sent outside faults.
    pub latency_outside_faults: Summary,
    /// Acknowledged publishes per second over the whole run.
    pub throughput: f64,
    /// ... while a fault was active.
    pub throughput_in_faults: f64,
    /// ... while none was.
    pub throughput_outside_faults: f64,
    /// Events a subscriber received again after resuming (at or before its cursor), per subscriber.
    pub redeliveries: BTreeMap<usize, u64>,
    /// Connections per subscriber.
    pub connections: BTreeMap<usize, u64>,
}

/// Counts.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Stats {
    /// Values published.
    pub values: usize,
    /// Values acknowledged.
    pub ok: usize,
    /// Values that certainly failed.
    pub failed: usize,
    /// Values of unknown outcome.
    pub unknown: usize,
    /// Unknown values found committed.
    pub unknown_committed: usize,
    /// Publish attempts.
    pub attempts: usize,
    /// Attempts that were acknowledged with `duplicate: true`.
    pub duplicate_acks: usize,
    /// Events received by subscribers.
    pub deliveries: usize,
    /// Gap notices received.
    pub gap_notices: usize,
    /// Values committed (in any history).
    pub committed: usize,
    /// Faults injected.
    pub faults: usize,
    /// History entries per node (all channels).
    pub history_entries: BTreeMap<u64, usize>,
}

/// The verdict.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Checked {
    /// No violation.
    pub valid: bool,
    /// Violations per kind (all of them).
    pub violation_counts: BTreeMap<&'static str, usize>,
    /// The violations (at most [`MAX_LISTED`] per kind).
    pub violations: Vec<Violation>,
    /// Counts.
    pub stats: Stats,
    /// Figures.
    pub metrics: Metrics,
}

/// Violations listed per kind (all are counted).
pub const MAX_LISTED: usize = 25;

struct Verdicts {
    counts: BTreeMap<&'static str, usize>,
    listed: Vec<Violation>,
}

impl Verdicts {
    fn add(&mut self, kind: &'static str, clause: &'static str, detail: impl FnOnce() -> String) {
        let n = self.counts.entry(kind).or_default();
        *n += 1;
        if *n <= MAX_LISTED {
            self.listed.push(Violation {
                kind,
                clause,
                detail: detail(),
            });
        }
    }
}

/// Checks a run. `history_size` is the workload namespace's retention (for gap notices).
pub fn check(record: &Record, histories: &[NodeHistory], history_size: u64) -> Checked {
    let mut v = Verdicts {
        counts: BTreeMap::new(),
        listed: Vec::new(),
    };
    let channels = record.channels.len();
    let publishes: HashMap<ValueId, &Publish> =
        record.publishes.iter().map(|p| (p.value, p)).collect();
    let mut stats = Stats {
        values: record.publishes.len(),
        faults: record.faults.len(),
        deliveries: record.deliveries.len(),
        gap_notices: record.gaps.len(),
        ..Stats::default()
    };
    for p in &record.publishes {
        match p.outcome {
            Outcome::Ok => stats.ok += 1,
            Outcome::Failed => stats.failed += 1,
            Outcome::Unknown => stats.unknown += 1,
        }
        stats.attempts += p.attempts.len();
        stats.duplicate_acks += p
            .attempts
            .iter()
            .filter(|a| {
                matches!(
                    a.result,
                    AttemptResult::Ok {
                        duplicate: true,
                        ..
                    }
                )
            })
            .count();
    }

    // 0. Each subscriber's deliveries in order: accepted (after its cursor) or not. A delivery
    //    at or before the subscriber's cursor is a redelivery; its cursor does not name its
    //    position (herald's cursors never go back), so only accepted deliveries say where a
    //    value is.
    let epoch = record.deliveries.iter().find_map(|d| d.epoch);
    let mut accepted = vec![false; record.deliveries.len()];
    let mut metrics = Metrics::default();
    {
        let mut last: Vec<Option<(Position, u32)>> = vec![None; record.subscribers.len()];
        let mut got: Vec<HashSet<ValueId>> = vec![HashSet::new(); record.subscribers.len()];
        let mut epoch_reported = vec![false; record.subscribers.len()];
        let mut redeliveries: BTreeMap<usize, u64> =
            record.subscribers.iter().map(|s| (s.id, 0)).collect();
        for (i, d) in record.deliveries.iter().enumerate() {
            let sub = &record.subscribers[d.sub];
            let name = &record.channels[sub.channel];
            if d.epoch != epoch && !epoch_reported[d.sub] {
                epoch_reported[d.sub] = true;
                v.add("epoch-change", "3", || {
                    format!(
                        "subscriber {} got a cursor of epoch {:?} (cluster: {:?}) from node {} at {:.0} ms",
                        sub.id, d.epoch, epoch, d.node, d.t
                    )
                });
            }
            let Some(position) = d.position else {
                v.add("malformed", "-", || {
                    format!("subscriber {} from node {}: {:?}", sub.id, d.node, d.raw)
                });
                continue;
            };
            if let Some((previous, conn)) = last[d.sub]
                && position <= previous
            {
                let again = d.value.is_some_and(|value| got[d.sub].contains(&value));
                if conn == d.conn {
                    v.add("order", "2", || {
                        format!(
                            "subscriber {} ({}) on {name}, node {}, connection {}: cursor {position} after {previous} at {:.0} ms (value {:?}, {})",
                            sub.id, sub.protocol.name(), d.node, d.conn, d.t, d.value,
                            if again { "received before" } else { "not received before" }
                        )
                    });
                } else {
                    *redeliveries.entry(d.sub).or_default() += 1;
                    v.add("redelivery", "3", || {
                        format!(
                            "subscriber {} ({}) on {name} resumed with cursor {previous} on node {} (connection {}) and at {:.0} ms got {:?} ({}) carrying cursor {position}",
                            sub.id, sub.protocol.name(), d.node, d.conn, d.t, d.value,
                            if again { "a value it had received before" } else { "a value it had NOT received before" }
                        )
                    });
                }
            } else {
                accepted[i] = true;
                last[d.sub] = Some((position, d.conn));
            }
            if let Some(value) = d.value {
                got[d.sub].insert(value);
            }
        }
        metrics.redeliveries = redeliveries;
    }

    // 1. What is at each position of each channel, from every source.
    let mut truth: Vec<BTreeMap<Position, (ValueId, String)>> = vec![BTreeMap::new(); channels];
    let mut put = |v: &mut Verdicts,
                   channel: usize,
                   position: Position,
                   value: ValueId,
                   source: String| {
        match truth[channel].get(&position) {
            Some((existing, seen_by)) if *existing != value => {
                let existing = *existing;
                let seen_by = seen_by.clone();
                v.add("position-conflict", "2, 3", || {
                    format!(
                        "channel {} position {position}: {existing} ({seen_by}) vs {value} ({source})",
                        record.channels[channel]
                    )
                });
            }
            Some(_) => {}
            None => {
                truth[channel].insert(position, (value, source));
            }
        }
    };
    for history in histories {
        for (channel, entries) in history.channels.iter().enumerate() {
            for entry in entries {
                if let (Some(position), Some(value)) = (entry.position, entry.value) {
                    put(
                        &mut v,
                        channel,
                        position,
                        value,
                        format!("history of node {}", history.node),
                    );
                }
            }
        }
    }
    for p in &record.publishes {
        for a in &p.attempts {
            if let AttemptResult::Ok { position, .. } = a.result {
                put(
                    &mut v,
                    p.channel,
                    position,
                    p.value,
                    format!("ack by node {} at {:.0} ms", a.node, a.end),
                );
            }
        }
    }
    for (d, _) in record
        .deliveries
        .iter()
        .zip(&accepted)
        .filter(|(_, accepted)| **accepted)
    {
        if let (Some(position), Some(value)) = (d.position, d.value) {
            let channel = record.subscribers[d.sub].channel;
            put(
                &mut v,
                channel,
                position,
                value,
                format!("subscriber {} from node {} at {:.0} ms", d.sub, d.node, d.t),
            );
        }
    }

    // 2. Committed values: each at one position only, on its own channel, published by a writer.
    let mut committed: HashMap<ValueId, Position> = HashMap::new();
    for (channel, entries) in truth.iter().enumerate() {
        for (&position, &(value, _)) in entries {
            match publishes.get(&value) {
                None => v.add("unexpected", "2", || {
                    format!(
                        "{value} at {position} on {} was never published",
                        record.channels[channel]
                    )
                }),
                Some(p) if p.channel != channel => v.add("unexpected", "2", || {
                    format!(
                        "{value} published on {} found on {} at {position}",
                        record.channels[p.channel], record.channels[channel]
                    )
                }),
                Some(_) => {}
            }
            if let Some(&first) = committed.get(&value) {
                v.add("duplicate-commit", "5", || {
                    format!(
                        "{value} committed at {first} and at {position} on {}",
                        record.channels[channel]
                    )
                });
            } else {
                committed.insert(value, position);
            }
        }
    }
    stats.committed = committed.len();

    // 3. Per value: acknowledgements agree; "nothing was committed" was true.
    let bounds = commit_bounds(record);
    for p in &record.publishes {
        let acks: Vec<(Position, bool, u64)> = p
            .attempts
            .iter()
            .filter_map(|a| match a.result {
                AttemptResult::Ok {
                    position,
                    duplicate,
                } => Some((position, duplicate, a.node)),
                _ => None,
            })
            .collect();
        if acks.iter().any(|a| a.0 != acks[0].0) {
            v.add("ack-position-mismatch", "5", || {
                format!("{} acknowledged at different positions: {acks:?}", p.value)
            });
        }
        // Which attempts may have committed it: those sent before the commit, which happened
        // before any later position of its partition was acknowledged.
        if let Some(&position) = committed.get(&p.value) {
            let bound = commit_bound(&bounds, position);
            let candidates: Vec<_> = p.attempts.iter().filter(|a| a.start < bound).collect();
            if !candidates.is_empty()
                && candidates
                    .iter()
                    .all(|a| matches!(a.result, AttemptResult::Failed { .. }))
            {
                v.add("failed-but-committed", "1", || {
                    let attempts: Vec<String> = p
                        .attempts
                        .iter()
                        .map(|a| {
                            format!(
                                "node {} [{:.0}-{:.0} ms] {:?}",
                                a.node, a.start, a.end, a.result
                            )
                        })
                        .collect();
                    format!(
                        "{} on {} is committed at {position}, before {bound:.0} ms (when a later position of partition {} was acknowledged); every attempt sent before then was answered as a certain failure. Attempts: {}",
                        p.value,
                        record.channels[p.channel],
                        position.partition,
                        attempts.join("; ")
                    )
                });
            }
        }
        if p.outcome == Outcome::Unknown && committed.contains_key(&p.value) {
            stats.unknown_committed += 1;
        }
    }

    // 4. Real-time order of acknowledgements within a channel.
    for channel in 0..channels {
        let mut acked: Vec<&Publish> = record
            .publishes
            .iter()
            .filter(|p| p.channel == channel && p.position.is_some())
            .collect();
        let mut by_invoke = acked.clone();
        acked.sort_by(|a, b| a.acked.unwrap_or(0.0).total_cmp(&b.acked.unwrap_or(0.0)));
        by_invoke.sort_by(|a, b| a.invoked.total_cmp(&b.invoked));
        let mut i = 0;
        let mut max: Option<&Publish> = None;
        for b in by_invoke {
            while i < acked.len() && acked[i].acked.unwrap_or(f64::MAX) < b.invoked {
                if max.is_none_or(|m| m.position < acked[i].position) {
                    max = Some(acked[i]);
                }
                i += 1;
            }
            if let Some(a) = max
                && a.position >= b.position
            {
                v.add("ack-order", "1, 2", || {
                    format!(
                        "on {}: {} acknowledged at {:.0} ms at {:?}, but {} sent later (at {:.0} ms) sits at {:?}",
                        record.channels[channel], a.value, a.acked.unwrap_or(0.0), a.position,
                        b.value, b.invoked, b.position
                    )
                });
            }
        }
    }

    // 5. The nodes' histories after the heal.
    let acked_values: HashSet<ValueId> = record
        .publishes
        .iter()
        .filter(|p| p.outcome == Outcome::Ok)
        .map(|p| p.value)
        .collect();
    for history in histories {
        if let Some(error) = &history.error {
            v.add("history-unreadable", "3", || {
                format!("node {}: {error}", history.node)
            });
            continue;
        }
        let mut total = 0;
        for (channel, entries) in history.channels.iter().enumerate() {
            total += entries.len();
            let mut last: Option<Position> = None;
            let mut have: HashSet<Position> = HashSet::new();
            for entry in entries {
                match entry.position {
                    Some(position) => {
                        if last.is_some_and(|l| position <= l) {
                            v.add("history-order", "2", || {
                                format!(
                                    "node {} channel {}: {position} after {:?}",
                                    history.node, record.channels[channel], last
                                )
                            });
                        }
                        last = Some(position);
                        have.insert(position);
                    }
                    None => v.add("malformed", "-", || {
                        format!(
                            "node {} channel {}: history entry {:?}",
                            history.node, record.channels[channel], entry.raw
                        )
                    }),
                }
            }
            // Retention keeps the newest `history_size` events of a channel: those must all
            // be there (a channel's events are in one partition, so position order is commit
            // order), and nothing older may be.
            let kept = usize::try_from(history_size).unwrap_or(usize::MAX);
            let dropped = truth[channel].len().saturating_sub(kept);
            let missing: Vec<(Position, ValueId)> = truth[channel]
                .iter()
                .skip(dropped)
                .filter(|(p, _)| !have.contains(p))
                .map(|(p, (value, _))| (*p, *value))
                .collect();
            if let Some((oldest_kept, _)) = truth[channel].iter().nth(dropped) {
                let beyond = have.iter().filter(|p| *p < oldest_kept).count();
                if beyond > 0 {
                    v.add("history-beyond-retention", "-", || {
                        format!(
                            "node {} channel {}: {beyond} events older than the newest {history_size} are still in its history",
                            history.node, record.channels[channel]
                        )
                    });
                }
            }
            if !missing.is_empty() {
                let acked = missing
                    .iter()
                    .filter(|(_, value)| acked_values.contains(value))
                    .count();
                v.add("history-missing", "1, 3", || {
                    format!(
                        "node {} lacks {} committed events of {} ({} acknowledged), e.g. {:?}",
                        history.node,
                        missing.len(),
                        record.channels[channel],
                        acked,
                        &missing[..missing.len().min(5)]
                    )
                });
            }
        }
        stats.history_entries.insert(history.node, total);
    }

    // 6. Subscribers: duplicates among accepted deliveries, and losses.
    let mut per_sub: Vec<Vec<(&crate::history::Delivery, bool)>> =
        vec![Vec::new(); record.subscribers.len()];
    for (d, ok) in record.deliveries.iter().zip(&accepted) {
        per_sub[d.sub].push((d, *ok));
    }
    for sub in &record.subscribers {
        let channel = sub.channel;
        let name = &record.channels[channel];
        let mut received: HashMap<ValueId, Position> = HashMap::new();
        let mut any: HashSet<ValueId> = HashSet::new();
        let mut positions: HashSet<Position> = HashSet::new();
        for &(d, ok) in &per_sub[sub.id] {
            if let Some(value) = d.value {
                any.insert(value);
            }
            let (true, Some(position)) = (ok, d.position) else {
                continue;
            };
            positions.insert(position);
            match d.value {
                None => v.add("malformed", "-", || {
                    format!("subscriber {} at {position}: {:?}", sub.id, d.raw)
                }),
                Some(value) => {
                    if let Some(&first) = received.get(&value) {
                        v.add("duplicate-delivery", "2, 3", || {
                            format!(
                                "subscriber {} ({}) on {name} got {value} at {first} and again at {position} (node {}, {:.0} ms)",
                                sub.id, sub.protocol.name(), d.node, d.t
                            )
                        });
                    } else {
                        received.insert(value, position);
                    }
                }
            }
        }
        // Losses: committed values of the channel the subscriber never got, placed by position
        // relative to what it accepted.
        let first = positions.iter().min().copied();
        let latest = positions.iter().max().copied();
        for (&position, &(value, _)) in &truth[channel] {
            if any.contains(&value) {
                continue;
            }
            if acked_values.contains(&value) {
                let kind = match (first, latest) {
                    (Some(f), _) if position < f => "acked-lost-prefix",
                    (_, Some(l)) if position > l => "acked-lost-postfix",
                    (None, None) => "acked-lost-postfix",
                    _ => "acked-lost-middle",
                };
                v.add(kind, "1, 3", || {
                    let p = publishes[&value];
                    format!(
                        "subscriber {} ({}) on {name} never got {value} at {position}, acknowledged at {:.0} ms by node {:?}",
                        sub.id,
                        sub.protocol.name(),
                        p.acked.unwrap_or(0.0),
                        p.attempts
                            .iter()
                            .rev()
                            .find(|a| matches!(a.result, AttemptResult::Ok { .. }))
                            .map(|a| a.node)
                    )
                });
            } else if latest.is_some_and(|l| position < l) {
                v.add("committed-not-delivered", "2, 3", || {
                    format!(
                        "subscriber {} ({}) on {name} skipped {value} at {position} (committed, outcome unknown to its writer)",
                        sub.id,
                        sub.protocol.name()
                    )
                });
            }
        }
    }
    for e in &record.episodes {
        *metrics.connections.entry(e.sub).or_default() += 1;
    }

    // 7. Gap notices: only retention may explain them.
    for gap in &record.gaps {
        let channel = record.subscribers[gap.sub].channel;
        let explained = gap.reason == "retention" && truth[channel].len() as u64 > history_size;
        if !explained {
            v.add("unexplained-gap", "4", || {
                format!(
                    "subscriber {} on {} got a gap notice from node {} at {:.0} ms: requested {:?}, oldest {:?}, reason {} ({} events committed, history_size {history_size})",
                    gap.sub, record.channels[channel], gap.node, gap.t, gap.requested, gap.oldest, gap.reason, truth[channel].len()
                )
            });
        }
    }

    measure(record, &mut metrics);
    Checked {
        valid: v.counts.is_empty(),
        violation_counts: v.counts,
        violations: v.listed,
        stats,
        metrics,
    }
}

/// Per partition: acknowledged sequence numbers in order, each with the earliest
/// acknowledgement time of it or any later sequence number.
type Bounds = HashMap<u16, Vec<(u64, f64)>>;

fn commit_bounds(record: &Record) -> Bounds {
    let mut bounds: Bounds = HashMap::new();
    for p in &record.publishes {
        for a in &p.attempts {
            if let AttemptResult::Ok { position, .. } = a.result {
                bounds
                    .entry(position.partition)
                    .or_default()
                    .push((position.seq, a.end));
            }
        }
    }
    for acks in bounds.values_mut() {
        acks.sort_by(|x, y| x.0.cmp(&y.0).then(x.1.total_cmp(&y.1)));
        let mut min = f64::INFINITY;
        for entry in acks.iter_mut().rev() {
            min = min.min(entry.1);
            entry.1 = min;
        }
    }
    bounds
}

/// The latest time `position` can have been committed: before the first acknowledgement of a
/// later position of its partition (positions are assigned in apply order).
fn commit_bound(bounds: &Bounds, position: Position) -> f64 {
    let Some(acks) = bounds.get(&position.partition) else {
        return f64::INFINITY;
    };
    let i = acks.partition_point(|&(seq, _)| seq <= position.seq);
    acks.get(i).map_or(f64::INFINITY, |&(_, t)| t)
}

/// Whether `t` (ms) falls in a fault window.
pub fn in_fault(record: &Record, t: f64) -> bool {
    record
        .faults
        .iter()
        .any(|f| t >= f.start && t <= f.end.unwrap_or(f64::MAX))
}

fn kind_of(name: &str) -> Option<FaultKind> {
    FaultKind::ALL.into_iter().find(|k| k.name() == name)
}

/// Failover, resume, latency and throughput figures.
fn measure(record: &Record, metrics: &mut Metrics) {
    // Partitions of the channels, from the acknowledgements.
    let mut channel_partition: HashMap<usize, u16> = HashMap::new();
    for p in &record.publishes {
        if let Some(position) = p.position {
            channel_partition.insert(p.channel, position.partition);
        }
    }
    let mut by_kind: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut resume_by_kind: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for fault in &record.faults {
        let Some(kind) = kind_of(&fault.kind) else {
            continue;
        };
        if !kind.takes_nodes_away() {
            continue;
        }
        let end = fault.end.unwrap_or(f64::MAX);
        // Measured from when the fault was in place (a `docker kill` takes a while; locally the
        // two are the same instant).
        let t0 = if fault.injected > fault.start {
            fault.injected
        } else {
            fault.start
        };
        // Publishes: partitions whose leader was a victim.
        let mut partitions: Vec<u16> = channel_partition.values().copied().collect();
        partitions.sort_unstable();
        partitions.dedup();
        for partition in partitions {
            let Some(leader) = fault.leaders_before.get(&partition.to_string()) else {
                continue;
            };
            if !fault.nodes.contains(leader) {
                continue;
            }
            let spared: Vec<&crate::history::Attempt> = record
                .publishes
                .iter()
                .filter(|p| channel_partition.get(&p.channel) == Some(&partition))
                .flat_map(|p| p.attempts.iter())
                .filter(|a| a.start >= t0 && !fault.nodes.contains(&a.node))
                .collect();
            let first_ack = spared
                .iter()
                .filter(|a| matches!(a.result, AttemptResult::Ok { .. }))
                .map(|a| a.end)
                .fold(f64::INFINITY, f64::min);
            let first_sent = spared.iter().map(|a| a.start).fold(f64::INFINITY, f64::min);
            let (ms, unmeasured) = if !first_ack.is_finite() {
                (None, None)
            } else if first_sent - t0 > FAILOVER_UNASKED_MS {
                let reason = format!(
                    "no publish went to a surviving node until {:.0} ms after the fault",
                    first_sent - t0
                );
                (None, Some(reason))
            } else {
                (Some(first_ack - t0), None)
            };
            metrics.failover_samples.push(FailoverSample {
                fault: fault.index,
                kind: fault.kind.clone(),
                of: format!("partition {partition}"),
                ms,
                unmeasured,
            });
            if let Some(ms) = ms {
                by_kind.entry(fault.kind.clone()).or_default().push(ms);
            }
        }
        // Subscribers whose node was a victim and whose connection broke during the fault.
        for sub in &record.subscribers {
            let mut episodes: Vec<&crate::history::Episode> =
                record.episodes.iter().filter(|e| e.sub == sub.id).collect();
            episodes.sort_by_key(|e| e.conn);
            let hit = episodes.iter().position(|e| {
                fault.nodes.contains(&e.node)
                    && e.start <= fault.start
                    && e.end.is_some_and(|t| t >= fault.start && t <= end + 1000.0)
            });
            let Some(hit) = hit else { continue };
            let resumed = episodes[hit + 1..]
                .iter()
                .find_map(|e| e.first_event)
                .map(|t| t - t0);
            metrics.resume_samples.push(FailoverSample {
                fault: fault.index,
                kind: fault.kind.clone(),
                of: format!("subscriber {} ({})", sub.id, sub.protocol.name()),
                ms: resumed,
                unmeasured: None,
            });
            if let Some(ms) = resumed {
                resume_by_kind
                    .entry(fault.kind.clone())
                    .or_default()
                    .push(ms);
            }
        }
    }
    let all: Vec<f64> = by_kind.values().flatten().copied().collect();
    metrics.failover_publish = Summary::of(&all);
    metrics.failover_publish_by_kind = by_kind
        .iter()
        .map(|(k, s)| (k.clone(), Summary::of(s)))
        .collect();
    let all: Vec<f64> = resume_by_kind.values().flatten().copied().collect();
    metrics.resume = Summary::of(&all);
    metrics.resume_by_kind = resume_by_kind
        .iter()
        .map(|(k, s)| (k.clone(), Summary::of(s)))
        .collect();

    // Latency and throughput.
    let mut all = Vec::new();
    let mut inside = Vec::new();
    let mut outside = Vec::new();
    let (mut acks_in, mut acks_out) = (0usize, 0usize);
    for p in &record.publishes {
        let Some(acked) = p.acked else { continue };
        let latency = acked - p.invoked;
        all.push(latency);
        if in_fault(record, p.invoked) {
            inside.push(latency);
        } else {
            outside.push(latency);
        }
        if in_fault(record, acked) {
            acks_in += 1;
        } else {
            acks_out += 1;
        }
    }
    metrics.latency = Summary::of(&all);
    metrics.latency_in_faults = Summary::of(&inside);
    metrics.latency_outside_faults = Summary::of(&outside);
    let first = record
        .publishes
        .iter()
        .map(|p| p.invoked)
        .fold(f64::INFINITY, f64::min);
    let last = record
        .publishes
        .iter()
        .filter_map(|p| p.acked)
        .fold(0.0f64, f64::max);
    let span = (last - first).max(1.0);
    let fault_time: f64 = record
        .faults
        .iter()
        .map(|f| f.end.unwrap_or(last).min(last) - f.start.max(first))
        .filter(|d| *d > 0.0)
        .sum();
    metrics.throughput = (acks_in + acks_out) as f64 / (span / 1000.0);
    metrics.throughput_in_faults = if fault_time > 0.0 {
        acks_in as f64 / (fault_time / 1000.0)
    } else {
        0.0
    };
    let quiet = span - fault_time;
    metrics.throughput_outside_faults = if quiet > 0.0 {
        acks_out as f64 / (quiet / 1000.0)
    } else {
        0.0
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::{Attempt, Delivery, Fault, Protocol, SubscriberInfo};

    fn publish(w: u32, s: u64, seq: u64, at: f64) -> Publish {
        let position = Position { partition: 1, seq };
        Publish {
            value: ValueId { w, s },
            channel: 0,
            protocol: Protocol::Http,
            attempts: vec![Attempt {
                node: 1,
                start: at,
                end: at + 1.0,
                result: AttemptResult::Ok {
                    position,
                    duplicate: false,
                },
            }],
            outcome: Outcome::Ok,
            position: Some(position),
            invoked: at,
            acked: Some(at + 1.0),
        }
    }

    fn record(deliver: &[u64]) -> Record {
        let mut record = Record {
            channels: vec!["chaos:c0".into()],
            subscribers: vec![SubscriberInfo {
                id: 0,
                protocol: Protocol::Sse,
                channel: 0,
            }],
            ..Record::default()
        };
        for s in 0..5 {
            record.publishes.push(publish(0, s, s + 1, s as f64 * 10.0));
        }
        for (i, &seq) in deliver.iter().enumerate() {
            record.deliveries.push(Delivery {
                sub: 0,
                conn: if i < 2 { 0 } else { 1 },
                node: 1,
                t: 100.0 + i as f64,
                position: Some(Position { partition: 1, seq }),
                epoch: Some(7),
                value: Some(ValueId { w: 0, s: seq - 1 }),
                raw: None,
            });
        }
        record
    }

    #[test]
    fn failover_counts_only_publishes_sent_to_nodes_the_fault_spared() {
        let mut record = record(&[1, 2, 3, 4, 5]);
        // Node 1 (the partition's leader) is paused at 100 ms. Writer 1 waits on it until
        // 8,100 ms; writer 2 tries node 2 at 300 ms, fails, and is acknowledged there at 700 ms.
        let mut stuck = publish(1, 0, 6, 110.0);
        stuck.attempts[0].end = 8_100.0;
        let mut moved = publish(2, 0, 7, 300.0);
        moved.attempts[0].node = 2;
        let acked = std::mem::replace(
            &mut moved.attempts[0].result,
            AttemptResult::Failed {
                error: "CLUSTERDOWN no leader".into(),
            },
        );
        moved.attempts.push(Attempt {
            node: 2,
            start: 650.0,
            end: 700.0,
            result: acked,
        });
        record.publishes.extend([stuck, moved]);
        record.faults.push(Fault {
            index: 0,
            kind: "pause-leader".into(),
            nodes: vec![1],
            detail: String::new(),
            start: 100.0,
            start_utc: String::new(),
            injected: 100.0,
            end: Some(9_000.0),
            leaders_before: HashMap::from([("1".to_string(), 1)]),
        });
        let mut metrics = Metrics::default();
        measure(&record, &mut metrics);
        let samples: Vec<_> = metrics.failover_samples.iter().map(|s| s.ms).collect();
        assert_eq!(samples, vec![Some(600.0)]);

        // Had writer 2 also waited on node 1, the first publish to a surviving node would come
        // only after the client's timeout: that measures the client, not the failover.
        let moved = record.publishes.last_mut().unwrap();
        moved.attempts.remove(0);
        moved.attempts[0].start = 8_150.0;
        moved.attempts[0].end = 8_160.0;
        let mut metrics = Metrics::default();
        measure(&record, &mut metrics);
        let sample = &metrics.failover_samples[0];
        assert_eq!(sample.ms, None);
        assert_eq!(
            sample.unmeasured.as_deref(),
            Some("no publish went to a surviving node until 8050 ms after the fault")
        );
        assert_eq!(metrics.failover_publish.count, 0);
    }

    #[test]
    fn a_complete_run_is_valid() {
        let checked = check(&record(&[1, 2, 3, 4, 5]), &[], 1000);
        assert!(checked.valid, "{:?}", checked.violations);
    }

    #[test]
    fn losses_are_split_into_prefix_middle_and_postfix() {
        let checked = check(&record(&[2, 4]), &[], 1000);
        assert_eq!(checked.violation_counts.get("acked-lost-prefix"), Some(&1));
        assert_eq!(checked.violation_counts.get("acked-lost-middle"), Some(&1));
        assert_eq!(checked.violation_counts.get("acked-lost-postfix"), Some(&1));
    }

    #[test]
    fn a_resume_that_replays_is_a_redelivery() {
        let checked = check(&record(&[1, 2, 2, 3, 4, 5]), &[], 1000);
        assert_eq!(checked.violation_counts.get("redelivery"), Some(&1));
        assert_eq!(checked.metrics.redeliveries.get(&0), Some(&1));
    }

    fn node_history(seqs: &[u64]) -> NodeHistory {
        NodeHistory {
            node: 1,
            channels: vec![
                seqs.iter()
                    .map(|&seq| HistoryEntry {
                        position: Some(Position { partition: 1, seq }),
                        value: Some(ValueId { w: 0, s: seq - 1 }),
                        raw: None,
                    })
                    .collect(),
            ],
            error: None,
        }
    }

    #[test]
    fn histories_are_held_to_the_newest_history_size_events() {
        let record = record(&[1, 2, 3, 4, 5]);
        let kept = check(&record, &[node_history(&[3, 4, 5])], 3);
        assert!(kept.valid, "{:?}", kept.violations);
        let short = check(&record, &[node_history(&[4, 5])], 3);
        assert_eq!(short.violation_counts.get("history-missing"), Some(&1));
        let long = check(&record, &[node_history(&[2, 3, 4, 5])], 3);
        assert_eq!(
            long.violation_counts.get("history-beyond-retention"),
            Some(&1)
        );
        let all = check(&record, &[node_history(&[1, 2, 3, 4, 5])], 1000);
        assert!(all.valid, "{:?}", all.violations);
    }

    #[test]
    fn two_values_at_one_position_conflict() {
        let mut record = record(&[1, 2, 3, 4, 5]);
        record.deliveries[4].value = Some(ValueId { w: 9, s: 9 });
        let checked = check(&record, &[], 1000);
        assert!(checked.violation_counts.contains_key("position-conflict"));
    }
}
