//! What a run records: every publish attempt and its outcome, every event each subscriber
//! received, every gap notice, every subscriber connection, every fault. The workload and the
//! nemesis write here while the run goes on; the checker and the report read it afterwards,
//! and it is saved next to the report as the evidence behind every verdict.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::cursor::Position;

/// A published value: writer `w`'s `s`-th publish. Unique in a run; its message id is
/// `w{w}-s{s}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ValueId {
    /// The writer.
    pub w: u32,
    /// The writer's sequence number.
    pub s: u64,
}

impl ValueId {
    /// The message id the value is published with (the same on every retry).
    pub fn message_id(&self) -> String {
        format!("w{}-s{}", self.w, self.s)
    }
}

impl std::fmt::Display for ValueId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "w{}-s{}", self.w, self.s)
    }
}

/// The client protocol a writer or subscriber uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// `HPUBLISH` / `HSUBSCRIBE` over the Redis protocol.
    Resp,
    /// `POST /api/publish`.
    Http,
    /// `GET /api/stream/{channel}`.
    Sse,
    /// `/ws` with `subscribe` messages.
    Ws,
}

impl Protocol {
    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Resp => "resp",
            Protocol::Http => "http",
            Protocol::Sse => "sse",
            Protocol::Ws => "ws",
        }
    }
}

/// How one publish attempt ended.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "lowercase")]
pub enum AttemptResult {
    /// Acknowledged at `position`; `duplicate` when the message id had been committed already.
    Ok {
        /// Where the event is.
        position: Position,
        /// herald's `duplicate` flag.
        duplicate: bool,
    },
    /// Certainly not committed (refused before sending, or herald said nothing was committed).
    Failed {
        /// Why.
        error: String,
    },
    /// Sent, but no definite answer (timeout, connection lost, "outcome unknown").
    Unknown {
        /// Why.
        error: String,
    },
}

/// One try of a publish on one node.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Attempt {
    /// The node it was sent to.
    pub node: u64,
    /// Milliseconds since the run started.
    pub start: f64,
    /// When it ended.
    pub end: f64,
    /// How.
    #[serde(flatten)]
    pub result: AttemptResult,
}

/// The final outcome of a value, over all its attempts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Some attempt was acknowledged.
    Ok,
    /// Every attempt certainly failed.
    Failed,
    /// No acknowledgement, and at least one attempt may have committed.
    Unknown,
}

/// Everything about one published value.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Publish {
    /// The value.
    pub value: ValueId,
    /// Index of its channel.
    pub channel: usize,
    /// The writer's protocol.
    pub protocol: Protocol,
    /// Its attempts, in order.
    pub attempts: Vec<Attempt>,
    /// The outcome.
    pub outcome: Outcome,
    /// The acknowledged position (of the first acknowledgement).
    pub position: Option<Position>,
    /// When the first attempt started.
    pub invoked: f64,
    /// When it was acknowledged.
    pub acked: Option<f64>,
}

/// One event as a subscriber received it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Delivery {
    /// The subscriber.
    pub sub: usize,
    /// Its connection number (0, 1, ... per subscriber).
    pub conn: u32,
    /// The node it came from.
    pub node: u64,
    /// Milliseconds since the run started.
    pub t: f64,
    /// The event's position (from its cursor).
    pub position: Option<Position>,
    /// The epoch of its cursor.
    pub epoch: Option<u64>,
    /// The value it carried, if it parsed as one.
    pub value: Option<ValueId>,
    /// The raw payload when it did not parse, or the raw cursor when that did not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub raw: Option<String>,
}

/// A gap notice as a subscriber received it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GapNotice {
    /// The subscriber.
    pub sub: usize,
    /// Its connection number.
    pub conn: u32,
    /// The node that sent it.
    pub node: u64,
    /// Milliseconds since the run started.
    pub t: f64,
    /// The position the client asked to resume after.
    pub requested: Option<String>,
    /// The oldest position retained.
    pub oldest: Option<String>,
    /// `retention` or `epoch`.
    pub reason: String,
}

/// One connection of a subscriber.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Episode {
    /// The subscriber.
    pub sub: usize,
    /// Its connection number.
    pub conn: u32,
    /// The node.
    pub node: u64,
    /// When the connection attempt started.
    pub start: f64,
    /// When it was established (the subscription confirmed), if it was.
    pub connected: Option<f64>,
    /// The first event on it.
    pub first_event: Option<f64>,
    /// When it ended.
    pub end: Option<f64>,
    /// Why it ended (or failed).
    pub reason: String,
    /// The cursor position it resumed from (`None`: the first connection, from the beginning).
    pub resumed_from: Option<Position>,
    /// Events received on it.
    pub events: u64,
}

/// A subscriber's identity.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SubscriberInfo {
    /// Its index.
    pub id: usize,
    /// The protocol.
    pub protocol: Protocol,
    /// Index of its channel.
    pub channel: usize,
}

/// One injected fault.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Fault {
    /// Its number in the run.
    pub index: usize,
    /// The fault kind (`kill`, `pause-leader`, ...).
    pub kind: String,
    /// The nodes it hit.
    pub nodes: Vec<u64>,
    /// What exactly was done.
    pub detail: String,
    /// When it started (ms since the run started).
    pub start: f64,
    /// The same as UTC time of day (to find it in the nodes' logs).
    #[serde(default)]
    pub start_utc: String,
    /// When the injection was complete (a partition takes several rules, a rolling restart
    /// several restarts).
    #[serde(default)]
    pub injected: f64,
    /// When its heal finished.
    pub end: Option<f64>,
    /// Each group's leader just before the fault (`"meta"` or the partition number).
    pub leaders_before: HashMap<String, u64>,
}

/// Milliseconds since the run started (and the wall-clock time of the start, to match the
/// nodes' logs, which are in UTC).
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    start: Instant,
    /// Unix time of the start, in ms.
    pub unix_start_ms: u64,
}

impl Clock {
    /// A clock starting now.
    pub fn new() -> Clock {
        Clock {
            start: Instant::now(),
            unix_start_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
        }
    }

    /// Milliseconds since the start.
    pub fn now(&self) -> f64 {
        self.start.elapsed().as_secs_f64() * 1000.0
    }

    /// `HH:MM:SS.mmm` UTC of `ms` after the start (what the nodes' log lines begin with).
    pub fn utc(&self, ms: f64) -> String {
        utc(self.unix_start_ms, ms)
    }
}

/// `HH:MM:SS.mmm` UTC of `ms` after `unix_start_ms`.
pub fn utc(unix_start_ms: u64, ms: f64) -> String {
    let unix = unix_start_ms + ms.max(0.0) as u64;
    let day_ms = unix % 86_400_000;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        day_ms / 3_600_000,
        day_ms / 60_000 % 60,
        day_ms / 1000 % 60,
        day_ms % 1000
    )
}

/// The run's record.
#[derive(Debug, Default)]
pub struct Record {
    /// Channel names.
    pub channels: Vec<String>,
    /// Every finished publish.
    pub publishes: Vec<Publish>,
    /// Every received event.
    pub deliveries: Vec<Delivery>,
    /// Every gap notice.
    pub gaps: Vec<GapNotice>,
    /// Every subscriber connection.
    pub episodes: Vec<Episode>,
    /// The subscribers.
    pub subscribers: Vec<SubscriberInfo>,
    /// The faults.
    pub faults: Vec<Fault>,
    /// Notes of the harness (cluster start-up, heal, drain...), with their times.
    pub log: Vec<(f64, String)>,
    /// Acknowledged values per channel (for the drain).
    pub acked: Vec<HashSet<ValueId>>,
    /// Values received per subscriber (for the drain).
    pub received: Vec<HashSet<ValueId>>,
}

/// The record, shared by every task of a run.
#[derive(Debug, Clone)]
pub struct Recorder {
    inner: Arc<Mutex<Record>>,
    /// The run's clock.
    pub clock: Clock,
}

impl Recorder {
    /// An empty record for `channels`.
    pub fn new(channels: Vec<String>) -> Recorder {
        let acked = vec![HashSet::new(); channels.len()];
        Recorder {
            inner: Arc::new(Mutex::new(Record {
                channels,
                acked,
                ..Record::default()
            })),
            clock: Clock::new(),
        }
    }

    /// Locks the record.
    pub fn lock(&self) -> MutexGuard<'_, Record> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Milliseconds since the run started.
    pub fn now(&self) -> f64 {
        self.clock.now()
    }

    /// Notes something the harness did, and prints it.
    pub fn note(&self, text: impl Into<String>) {
        let text = text.into();
        let t = self.now();
        eprintln!("[{:>8.1}s {}Z] {text}", t / 1000.0, self.clock.utc(t));
        self.lock().log.push((t, text));
    }

    /// Registers a subscriber; returns its index.
    pub fn add_subscriber(&self, protocol: Protocol, channel: usize) -> usize {
        let mut record = self.lock();
        let id = record.subscribers.len();
        record.subscribers.push(SubscriberInfo {
            id,
            protocol,
            channel,
        });
        record.received.push(HashSet::new());
        id
    }

    /// Records a finished publish.
    pub fn publish(&self, publish: Publish) {
        let mut record = self.lock();
        if publish.outcome == Outcome::Ok {
            let channel = publish.channel;
            record.acked[channel].insert(publish.value);
        }
        record.publishes.push(publish);
    }

    /// Records a delivery.
    pub fn deliver(&self, delivery: Delivery) {
        let mut record = self.lock();
        if let Some(value) = delivery.value {
            let sub = delivery.sub;
            record.received[sub].insert(value);
        }
        record.deliveries.push(delivery);
    }

    /// How many acknowledged values the subscribers are missing in total, and how many
    /// subscribers miss something.
    pub fn missing(&self) -> (usize, usize) {
        let record = self.lock();
        let mut total = 0;
        let mut behind = 0;
        for sub in &record.subscribers {
            let received = &record.received[sub.id];
            let missing = record.acked[sub.channel]
                .iter()
                .filter(|v| !received.contains(v))
                .count();
            total += missing;
            behind += usize::from(missing > 0);
        }
        (total, behind)
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::new()
    }
}
