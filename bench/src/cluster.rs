//! Replicated durable publishing: a 3-node herald cluster against a 3-server NATS JetStream
//! cluster, side by side in one run.
//!
//! Both clusters run on loopback, started here (see [`crate::launch`]). herald gets `PUBLISH
//! bench-cluster:<i> <payload>` over RESP with the `redis` crate: channels of the default
//! namespace (durable, 100 events kept per channel), acknowledged after the Raft quorum commit
//! (fsync on the leader and the followers). NATS gets JetStream publishes with `async-nats` on
//! subjects `bench-cluster.<i>` of one stream (`num_replicas: 3`, `storage: file`, 100
//! messages kept per subject), each awaiting its PubAck; the servers keep their default sync
//! behaviour (no fsync per write).
//!
//! C connections are spread round-robin over the three nodes (servers); each keeps K publishes
//! in flight as one batch (all K sent, then all K acks awaited, then the next batch) and walks
//! the channels (subjects) so that the load covers every partition. Latency is from sending a
//! batch to each publish's acknowledgement; figures cover the batches sent inside the
//! measured window. The server side is summed over the three processes (CPU time, disk
//! writes); for herald the Raft entries appended per partition give the mean batch size.

use crate::cli::{ClusterArgs, ClusterSystem};
use crate::launch::{HeraldCluster, NatsCluster, WorkDir};
use crate::procfs::{NetSample, ProcDelta, ProcSample};
use crate::report::{Latency, json_list, json_str, latency_json, thousands};
use anyhow::{Context, bail};
use bytes::Bytes;
use futures::future::try_join_all;
use hdrhistogram::Histogram;
use serde_json::Value;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Largest latency the histograms track, in microseconds (larger values are clamped).
const MAX_LATENCY_US: u64 = 60_000_000;
/// Time allowed to connect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Client-side limit on one acknowledgement; far above any latency of a healthy run.
const ACK_TIMEOUT: Duration = Duration::from_secs(30);
/// How long connections may overrun the end of the run before being aborted.
const GRACE: Duration = Duration::from_secs(35);
/// herald channels are `<HERALD_PREFIX><i>` (default namespace).
const HERALD_PREFIX: &str = "bench-cluster:";
/// NATS subjects are `<NATS_PREFIX><i>`.
const NATS_PREFIX: &str = "bench-cluster.";
/// The JetStream stream holding every bench subject.
const NATS_STREAM: &str = "BENCH_CLUSTER";
/// Replicas of the stream, as herald's partitions have voters.
const REPLICAS: usize = 3;

/// One run against one cluster.
#[derive(Debug, Clone)]
pub struct ClusterScenario {
    /// Which system.
    pub system: ClusterSystem,
    /// herald RESP addresses or NATS URLs, one per node.
    pub addrs: Vec<String>,
    /// herald HTTP addresses (for Raft entry counts); empty for NATS.
    pub status_addrs: Vec<String>,
    /// Server process ids, to sum their CPU time and disk writes.
    pub pids: Vec<u32>,
    /// Connections (C), spread round-robin over `addrs`.
    pub connections: usize,
    /// Publishes each connection keeps in flight per batch (K).
    pub pipeline: usize,
    /// Payload size in bytes.
    pub payload: usize,
    /// Channels (subjects) the publishes are spread over.
    pub channels: usize,
    /// Measured window.
    pub duration: Duration,
    /// Unmeasured publishing before the window.
    pub warmup: Duration,
}

impl ClusterScenario {
    /// `CxK`.
    pub fn shape(&self) -> String {
        format!("{}x{}", self.connections, self.pipeline)
    }
}

/// A connection of either system.
enum Conn {
    Herald(redis::aio::MultiplexedConnection),
    Nats(async_nats::jetstream::Context),
}

impl Conn {
    async fn open(system: ClusterSystem, addr: &str) -> anyhow::Result<Conn> {
        let connect = async {
            match system {
                ClusterSystem::Herald => {
                    let client = redis::Client::open(format!("redis://{addr}/"))?;
                    let config = redis::AsyncConnectionConfig::new()
                        .set_connection_timeout(Some(CONNECT_TIMEOUT))
                        .set_response_timeout(Some(ACK_TIMEOUT));
                    let conn = client
                        .get_multiplexed_async_connection_with_config(&config)
                        .await?;
                    Ok::<_, anyhow::Error>(Conn::Herald(conn))
                }
                ClusterSystem::Nats => {
                    let client = async_nats::connect(addr).await?;
                    let context = async_nats::jetstream::context::ContextBuilder::new()
                        .timeout(ACK_TIMEOUT)
                        .build(client);
                    Ok(Conn::Nats(context))
                }
            }
        };
        tokio::time::timeout(CONNECT_TIMEOUT, connect)
            .await
            .with_context(|| format!("connecting to {addr} timed out"))?
            .with_context(|| format!("cannot connect to {addr}"))
    }

    /// Sends one publish per name, then awaits every acknowledgement; returns when each came.
    async fn batch(&self, names: &[&str], payload: &Bytes) -> anyhow::Result<Vec<Instant>> {
        match self {
            Conn::Herald(conn) => {
                let publishes = names.iter().map(|&name| {
                    let mut conn = conn.clone();
                    async move {
                        redis::cmd("PUBLISH")
                            .arg(name)
                            .arg(payload.as_ref())
                            .query_async::<i64>(&mut conn)
                            .await
                            .map(|_| Instant::now())
                    }
                });
                try_join_all(publishes).await.context("PUBLISH failed")
            }
            Conn::Nats(context) => {
                let mut acks = Vec::with_capacity(names.len());
                for &name in names {
                    acks.push(
                        context
                            .publish(name.to_owned(), payload.clone())
                            .await
                            .context("JetStream publish failed")?,
                    );
                }
                try_join_all(
                    acks.into_iter()
                        .map(|ack| async move { ack.await.map(|_| Instant::now()) }),
                )
                .await
                .context("no PubAck")
            }
        }
    }
}

/// What one connection measured.
struct ConnStats {
    hist: Histogram<u64>,
    acked: u64,
    error: Option<String>,
}

struct Window {
    start: Instant,
    measure_start: Duration,
    measure_end: Duration,
}

async fn connection(
    conn: Conn,
    index: usize,
    s: Arc<ClusterScenario>,
    names: Arc<Vec<String>>,
    window: Arc<Window>,
) -> ConnStats {
    let mut stats = ConnStats {
        hist: Histogram::new_with_max(MAX_LATENCY_US, 3).expect("histogram bounds"),
        acked: 0,
        error: None,
    };
    let payload = Bytes::from(vec![b'x'; s.payload]);
    // Publish j of this connection goes to channel (index + j * C) % channels.
    let mut next = index;
    let mut batch: Vec<&str> = Vec::with_capacity(s.pipeline);
    loop {
        let sent_at = Instant::now();
        let sent = sent_at.saturating_duration_since(window.start);
        if sent >= window.measure_end {
            break;
        }
        let measured = sent >= window.measure_start;
        batch.clear();
        for _ in 0..s.pipeline {
            batch.push(&names[next % names.len()]);
            next += s.connections;
        }
        match conn.batch(&batch, &payload).await {
            Ok(done) => {
                if measured {
                    for at in done {
                        stats.acked += 1;
                        stats
                            .hist
                            .saturating_record((at - sent_at).as_micros() as u64);
                    }
                }
            }
            Err(e) => {
                stats.error = Some(format!("{e:#}"));
                break;
            }
        }
    }
    stats
}

/// What one run measured.
#[derive(Debug)]
pub struct ClusterResult {
    /// The scenario that ran.
    pub scenario: ClusterScenario,
    /// Publishes sent inside the window and acknowledged.
    pub acked: u64,
    /// Their ack latency, in microseconds.
    pub hist: Histogram<u64>,
    /// The servers' CPU time and disk writes over the window, summed.
    pub server: Option<ProcDelta>,
    /// herald: Raft log entries appended to the partition groups over the window.
    pub raft_entries: Option<u64>,
    /// UDP datagrams and TCP segments the machine sent over the window (servers and client).
    pub net: Option<NetSample>,
    /// This benchmark client's own CPU time over the window, in seconds.
    pub client_cpu_s: f64,
    /// Connection failures.
    pub errors: Vec<String>,
}

impl ClusterResult {
    /// Acknowledged publishes per second.
    pub fn acked_per_s(&self) -> f64 {
        self.acked as f64 / self.scenario.duration.as_secs_f64()
    }

    /// Latency percentiles.
    pub fn latency(&self) -> Latency {
        Latency::of(&self.hist)
    }

    /// Server CPU microseconds per acknowledged publish.
    pub fn cpu_us_per_ack(&self) -> Option<f64> {
        self.server.map(|d| per_ack(d.cpu_s * 1e6, self.acked))
    }

    /// Acknowledged publishes per Raft entry (herald's mean commit batch).
    pub fn publishes_per_entry(&self) -> Option<f64> {
        self.raft_entries
            .filter(|&e| e > 0)
            .map(|e| self.acked as f64 / e as f64)
    }

    /// One human-readable line, then error lines if any.
    pub fn human(&self) -> String {
        let s = &self.scenario;
        let l = self.latency();
        let mut out = format!(
            "{}: CxK {}, {} B, {} channels: acked {} msg/s, ack latency us p50 {} p90 {} p99 {} p99.9 {} max {}",
            s.system.name(),
            s.shape(),
            s.payload,
            s.channels,
            thousands(self.acked_per_s()),
            l.p50,
            l.p90,
            l.p99,
            l.p999,
            l.max,
        );
        if let Some(server) = &self.server {
            let _ = write!(
                out,
                "; servers CPU {:.0}% ({:.1} us/msg), disk writes {:.0} B/msg",
                server.cpu_s / s.duration.as_secs_f64() * 100.0,
                self.cpu_us_per_ack().unwrap_or(0.0),
                per_ack(server.write_bytes as f64, self.acked),
            );
        }
        if let Some(net) = &self.net {
            let _ = write!(
                out,
                "; sent per msg {:.1} UDP datagrams + {:.1} TCP segments",
                per_ack(net.udp_out as f64, self.acked),
                per_ack(net.tcp_out as f64, self.acked),
            );
        }
        let _ = write!(
            out,
            "; client CPU {:.0}%",
            self.client_cpu_s / s.duration.as_secs_f64() * 100.0
        );
        if let (Some(entries), Some(per)) = (self.raft_entries, self.publishes_per_entry()) {
            let _ = write!(
                out,
                "; {} Raft entries ({per:.1} publishes each)",
                thousands(entries as f64)
            );
        }
        for error in &self.errors {
            let _ = write!(out, "\n  error: {error}");
        }
        out
    }

    /// One JSON object.
    pub fn json(&self) -> String {
        let s = &self.scenario;
        let server = self.server.map_or("null".to_owned(), |d| {
            format!(
                "{{\"cpu_s\":{:.3},\"write_bytes\":{}}}",
                d.cpu_s, d.write_bytes
            )
        });
        format!(
            "{{\"system\":{},\"connections\":{},\"pipeline\":{},\"payload\":{},\"channels\":{},\
             \"duration_s\":{},\"warmup_s\":{},\"acked\":{},\"acked_per_s\":{:.1},\
             \"latency_us\":{},\"servers\":{},\"raft_entries\":{},\"udp_out\":{},\
             \"tcp_out\":{},\"client_cpu_s\":{:.3},\"errors\":{}}}",
            json_str(s.system.name()),
            s.connections,
            s.pipeline,
            s.payload,
            s.channels,
            s.duration.as_secs_f64(),
            s.warmup.as_secs_f64(),
            self.acked,
            self.acked_per_s(),
            latency_json(&self.latency()),
            server,
            self.raft_entries
                .map_or("null".to_owned(), |e| e.to_string()),
            self.net
                .map_or("null".to_owned(), |n| n.udp_out.to_string()),
            self.net
                .map_or("null".to_owned(), |n| n.tcp_out.to_string()),
            self.client_cpu_s,
            json_list(&self.errors),
        )
    }
}

fn per_ack(total: f64, acks: u64) -> f64 {
    if acks == 0 { 0.0 } else { total / acks as f64 }
}

fn sample_all(pids: &[u32]) -> anyhow::Result<Vec<ProcSample>> {
    pids.iter().map(|&pid| ProcSample::read(pid)).collect()
}

fn sum_since(after: &[ProcSample], before: &[ProcSample]) -> ProcDelta {
    after
        .iter()
        .zip(before)
        .map(|(a, b)| a.since(b))
        .fold(ProcDelta::default(), |sum, d| ProcDelta {
            rss: sum.rss + d.rss,
            cpu_s: sum.cpu_s + d.cpu_s,
            write_bytes: sum.write_bytes + d.write_bytes,
        })
}

/// Sum over partitions of the highest last log index any node reports; `None` if a node
/// does not answer.
async fn raft_log_total(status_addrs: &[String]) -> Option<u64> {
    let mut highest: std::collections::BTreeMap<u64, u64> = Default::default();
    for addr in status_addrs {
        let status = crate::http::get_json(addr, "/api/cluster/status", Duration::from_secs(2))
            .await
            .ok()?;
        for group in status["groups"].as_array()? {
            let (Some(partition), Some(last)) = (
                group["partition"].as_u64(),
                group["last_log_index"].as_u64(),
            ) else {
                continue;
            };
            let entry = highest.entry(partition).or_default();
            *entry = (*entry).max(last);
        }
    }
    Some(highest.values().sum())
}

/// Runs one scenario and measures it.
pub async fn run(s: &ClusterScenario) -> anyhow::Result<ClusterResult> {
    anyhow::ensure!(
        s.connections >= 1 && s.pipeline >= 1,
        "CxK must be positive"
    );
    anyhow::ensure!(!s.addrs.is_empty(), "no addresses");
    let prefix = match s.system {
        ClusterSystem::Herald => HERALD_PREFIX,
        ClusterSystem::Nats => NATS_PREFIX,
    };
    let names: Arc<Vec<String>> = Arc::new(
        (0..s.channels.max(1))
            .map(|i| format!("{prefix}{i}"))
            .collect(),
    );
    let mut conns = Vec::with_capacity(s.connections);
    for c in 0..s.connections {
        conns.push(Conn::open(s.system, &s.addrs[c % s.addrs.len()]).await?);
    }
    let scenario = Arc::new(s.clone());
    let start = Instant::now() + Duration::from_millis(1);
    let window = Arc::new(Window {
        start,
        measure_start: s.warmup,
        measure_end: s.warmup + s.duration,
    });
    let handles: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(c, conn)| {
            tokio::spawn(connection(
                conn,
                c,
                scenario.clone(),
                names.clone(),
                window.clone(),
            ))
        })
        .collect();

    tokio::time::sleep_until((start + s.warmup).into()).await;
    let cpu_before = sample_all(&s.pids)?;
    let client_before = ProcSample::read(std::process::id())?;
    let log_before = raft_log_total(&s.status_addrs).await;
    let net_before = NetSample::read();
    tokio::time::sleep_until((start + s.warmup + s.duration).into()).await;
    let net = NetSample::read().zip(net_before).map(|(a, b)| a.since(&b));
    let cpu_after = sample_all(&s.pids)?;
    let client_cpu_s = ProcSample::read(std::process::id())?
        .since(&client_before)
        .cpu_s;
    let log_after = raft_log_total(&s.status_addrs).await;
    let server = (!s.pids.is_empty()).then(|| sum_since(&cpu_after, &cpu_before));
    let raft_entries = match (log_before, log_after) {
        (Some(b), Some(a)) if !s.status_addrs.is_empty() => Some(a.saturating_sub(b)),
        _ => None,
    };

    let mut hist = Histogram::<u64>::new_with_max(MAX_LATENCY_US, 3)?;
    let mut acked = 0;
    let mut errors = Vec::new();
    let give_up = tokio::time::Instant::from_std(start + s.warmup + s.duration + GRACE);
    for (i, handle) in handles.into_iter().enumerate() {
        let abort = handle.abort_handle();
        match tokio::time::timeout_at(give_up, handle).await {
            Ok(joined) => {
                let stats = joined?;
                hist.add(&stats.hist)?;
                acked += stats.acked;
                errors.extend(stats.error.map(|e| format!("connection {i}: {e}")));
            }
            Err(_) => {
                abort.abort();
                errors.push(format!(
                    "connection {i} stalled past the end of the run; aborted"
                ));
            }
        }
    }
    Ok(ClusterResult {
        scenario: s.clone(),
        acked,
        hist,
        server,
        raft_entries,
        net,
        client_cpu_s,
        errors,
    })
}

/// (Re)creates the bench stream: every `bench-cluster.>` subject, `REPLICAS` replicas, file
/// storage, `max_per_subject` messages kept per subject; retried while JetStream forms.
async fn create_stream(
    url: &str,
    max_per_subject: i64,
    timeout: Duration,
) -> anyhow::Result<Value> {
    use async_nats::jetstream::stream::{Config, StorageType};
    let deadline = Instant::now() + timeout;
    let mut last_error = String::new();
    while Instant::now() < deadline {
        let attempt = async {
            let client = async_nats::connect(url).await?;
            let js = async_nats::jetstream::new(client);
            let _ = js.delete_stream(NATS_STREAM).await;
            let mut stream = js
                .create_stream(Config {
                    name: NATS_STREAM.to_owned(),
                    subjects: vec![format!("{NATS_PREFIX}>")],
                    num_replicas: REPLICAS,
                    storage: StorageType::File,
                    max_messages_per_subject: max_per_subject,
                    ..Default::default()
                })
                .await?;
            let info = stream.info().await?;
            let cluster = info.cluster.as_ref();
            Ok::<_, anyhow::Error>(serde_json::json!({
                "leader": cluster.and_then(|c| c.leader.clone()),
                "replicas": cluster.map(|c| c.replicas.len()),
            }))
        };
        match tokio::time::timeout(Duration::from_secs(10), attempt).await {
            Ok(Ok(info)) => return Ok(info),
            Ok(Err(e)) => last_error = format!("{e:#}"),
            Err(_) => last_error = "timed out".to_owned(),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    bail!("cannot create the JetStream stream in {timeout:?}: {last_error}")
}

/// Several rounds of one (system, payload, shape) merged.
#[derive(Debug)]
pub struct Merged {
    /// Mean acknowledged msg/s over the rounds.
    pub acked_per_s: f64,
    /// Latency over all rounds' publishes.
    pub latency: Latency,
    /// Server CPU microseconds per acknowledged publish.
    pub cpu_us_per_ack: Option<f64>,
    /// herald: acknowledged publishes per Raft entry.
    pub publishes_per_entry: Option<f64>,
    /// Rounds with errors.
    pub troubled_rounds: usize,
}

impl Merged {
    /// Merges rounds; `None` without any.
    pub fn of(runs: &[&ClusterResult]) -> Option<Merged> {
        let first = runs.first()?;
        let mut hist = first.hist.clone();
        for run in &runs[1..] {
            hist.add(&run.hist).ok()?;
        }
        let acked: u64 = runs.iter().map(|r| r.acked).sum();
        let cpu: Option<f64> = runs.iter().map(|r| r.server.map(|d| d.cpu_s)).sum();
        let entries: Option<u64> = runs.iter().map(|r| r.raft_entries).sum();
        Some(Merged {
            acked_per_s: runs.iter().map(|r| r.acked_per_s()).sum::<f64>() / runs.len() as f64,
            latency: Latency::of(&hist),
            cpu_us_per_ack: cpu.map(|c| per_ack(c * 1e6, acked)),
            publishes_per_entry: entries.filter(|&e| e > 0).map(|e| acked as f64 / e as f64),
            troubled_rounds: runs.iter().filter(|r| !r.errors.is_empty()).count(),
        })
    }

    fn json(&self) -> String {
        format!(
            "{{\"acked_per_s\":{:.1},\"latency_us\":{},\"servers_cpu_us_per_msg\":{},\
             \"publishes_per_raft_entry\":{},\"troubled_rounds\":{}}}",
            self.acked_per_s,
            latency_json(&self.latency),
            self.cpu_us_per_ack
                .map_or("null".to_owned(), |c| format!("{c:.2}")),
            self.publishes_per_entry
                .map_or("null".to_owned(), |c| format!("{c:.2}")),
            self.troubled_rounds
        )
    }
}

/// One row of the comparison.
#[derive(Debug)]
pub struct ClusterRow {
    /// Payload size in bytes.
    pub payload: usize,
    /// Connections (C).
    pub connections: usize,
    /// Pipeline depth (K).
    pub pipeline: usize,
    /// One entry per system, in the order of `--systems`.
    pub sides: Vec<Merged>,
}

/// The comparison table as text.
pub fn table(systems: &[ClusterSystem], rows: &[ClusterRow]) -> String {
    let mut out = String::new();
    let _ = write!(out, "{:>8} {:>7}", "payload", "CxK");
    for system in systems {
        let _ = write!(
            out,
            " | {:>14} {:>8} {:>8} {:>9}",
            format!("{} acks/s", system.name()),
            "p50 us",
            "p99 us",
            "CPU us/ack"
        );
    }
    if systems.len() == 2 {
        let _ = write!(
            out,
            " | {:>12}",
            format!("{}/{}", systems[0].name(), systems[1].name())
        );
    }
    if systems.contains(&ClusterSystem::Herald) {
        let _ = write!(out, " | {:>11}", "pub/entry");
    }
    out.push('\n');
    let mut troubled = false;
    for row in rows {
        let _ = write!(
            out,
            "{:>8} {:>7}",
            format!("{} B", row.payload),
            format!("{}x{}", row.connections, row.pipeline)
        );
        for side in &row.sides {
            troubled |= side.troubled_rounds > 0;
            let _ = write!(
                out,
                " | {:>14} {:>8} {:>8} {:>9}{}",
                thousands(side.acked_per_s),
                side.latency.p50,
                side.latency.p99,
                side.cpu_us_per_ack
                    .map_or("-".to_owned(), |c| format!("{c:.1}")),
                if side.troubled_rounds > 0 { "!" } else { "" }
            );
        }
        if row.sides.len() == 2 {
            let _ = write!(
                out,
                " | {:>12.2}",
                row.sides[0].acked_per_s / row.sides[1].acked_per_s
            );
        }
        if let Some(index) = systems.iter().position(|s| *s == ClusterSystem::Herald) {
            let _ = write!(
                out,
                " | {:>11}",
                row.sides[index]
                    .publishes_per_entry
                    .map_or("-".to_owned(), |p| format!("{p:.1}"))
            );
        }
        out.push('\n');
    }
    if troubled {
        out.push_str("(! = some rounds had errors, see above)\n");
    }
    out
}

/// Starts the clusters, runs every (payload, shape, round, system), rotating which system goes
/// first each round, and prints each run and the table (or JSON).
pub async fn compare(args: &ClusterArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.rounds >= 1, "--rounds must be at least 1");
    anyhow::ensure!(!args.systems.is_empty(), "--systems is empty");
    let work = WorkDir::new(args.work_dir.clone(), args.keep)?;
    eprintln!("work directory {}", work.path.display());

    let mut herald = None;
    let mut nats = None;
    if args.systems.contains(&ClusterSystem::Herald) {
        let mut cluster = HeraldCluster::start(
            &args.herald_bin,
            &work.path,
            REPLICAS,
            args.partitions,
            &args.herald_args,
        )?;
        cluster
            .wait_converged(Duration::from_secs(60), false)
            .await?;
        eprintln!(
            "herald: 3 nodes formed, {} partitions, RESP {:?}",
            args.partitions,
            cluster
                .nodes
                .iter()
                .map(|n| n.resp.as_str())
                .collect::<Vec<_>>()
        );
        herald = Some(cluster);
    }
    if args.systems.contains(&ClusterSystem::Nats) {
        let mut cluster = NatsCluster::start(&args.nats_bin, &work.path, REPLICAS)?;
        let info = create_stream(
            &cluster.urls[0],
            args.history as i64,
            Duration::from_secs(60),
        )
        .await;
        cluster.check_alive()?;
        let info = info?;
        eprintln!(
            "nats: 3 servers, stream {NATS_STREAM} (R{REPLICAS}, file, {} per subject), leader {}",
            args.history, info["leader"]
        );
        nats = Some(cluster);
    }

    let systems = &args.systems;
    let n = systems.len();
    // (payload, shape, system index, result)
    let mut runs: Vec<(usize, (usize, usize), usize, ClusterResult)> = Vec::new();
    let mut first = true;
    for &payload in &args.payload {
        for &(connections, pipeline) in &args.shape {
            for round in 0..args.rounds {
                for k in 0..n {
                    let index = (k + round) % n;
                    let system = systems[index];
                    if !first {
                        tokio::time::sleep(args.pause).await;
                    }
                    first = false;
                    let (addrs, status_addrs, pids) = match system {
                        ClusterSystem::Herald => {
                            let c = herald.as_mut().context("herald not started")?;
                            c.check_alive()?;
                            (
                                c.nodes.iter().map(|n| n.resp.clone()).collect(),
                                c.nodes.iter().map(|n| n.http.clone()).collect(),
                                c.pids(),
                            )
                        }
                        ClusterSystem::Nats => {
                            let c = nats.as_mut().context("nats not started")?;
                            c.check_alive()?;
                            (c.urls.clone(), Vec::new(), c.pids())
                        }
                    };
                    eprintln!(
                        "round {}/{}: {}, {connections}x{pipeline}, {payload} B",
                        round + 1,
                        args.rounds,
                        system.name()
                    );
                    let scenario = ClusterScenario {
                        system,
                        addrs,
                        status_addrs,
                        pids,
                        connections,
                        pipeline,
                        payload,
                        channels: args.channels,
                        duration: args.duration,
                        warmup: args.warmup,
                    };
                    let result = run(&scenario).await?;
                    if !args.json {
                        println!("{}", result.human());
                    }
                    runs.push((payload, (connections, pipeline), index, result));
                }
            }
        }
    }

    let mut rows = Vec::new();
    for &payload in &args.payload {
        for &shape in &args.shape {
            let sides: Option<Vec<Merged>> = (0..n)
                .map(|index| {
                    let mine: Vec<&ClusterResult> = runs
                        .iter()
                        .filter(|(p, s, i, _)| *p == payload && *s == shape && *i == index)
                        .map(|(.., r)| r)
                        .collect();
                    Merged::of(&mine)
                })
                .collect();
            if let Some(sides) = sides {
                rows.push(ClusterRow {
                    payload,
                    connections: shape.0,
                    pipeline: shape.1,
                    sides,
                });
            }
        }
    }
    if args.json {
        let names: Vec<String> = systems.iter().map(|s| s.name().to_owned()).collect();
        let rows: Vec<String> = rows
            .iter()
            .map(|r| {
                let sides: Vec<String> = r.sides.iter().map(Merged::json).collect();
                format!(
                    "{{\"payload\":{},\"connections\":{},\"pipeline\":{},\"sides\":[{}]}}",
                    r.payload,
                    r.connections,
                    r.pipeline,
                    sides.join(",")
                )
            })
            .collect();
        let runs: Vec<String> = runs.iter().map(|(.., r)| r.json()).collect();
        println!(
            "{{\"systems\":{},\"rows\":[{}],\"runs\":[{}]}}",
            json_list(&names),
            rows.join(","),
            runs.join(",")
        );
    } else {
        println!();
        print!("{}", table(systems, &rows));
    }
    drop(herald);
    drop(nats);
    drop(work);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_has_ratio_and_batch_columns() {
        let side = |rate: f64, per: Option<f64>| Merged {
            acked_per_s: rate,
            latency: Latency {
                p50: 1,
                p90: 2,
                p99: 3,
                p999: 4,
                max: 5,
                mean: 1.5,
            },
            cpu_us_per_ack: Some(12.5),
            publishes_per_entry: per,
            troubled_rounds: 0,
        };
        let rows = vec![ClusterRow {
            payload: 64,
            connections: 3,
            pipeline: 32,
            sides: vec![side(3000.0, Some(7.25)), side(1500.0, None)],
        }];
        let text = table(&[ClusterSystem::Herald, ClusterSystem::Nats], &rows);
        assert!(text.contains("herald/nats"), "{text}");
        assert!(text.contains("2.00"), "{text}");
        assert!(text.contains("7.2"), "{text}");
        assert!(text.contains("3x32"), "{text}");
    }

    #[test]
    fn sums_process_deltas() {
        let a = ProcSample {
            rss: 10,
            cpu_s: 2.0,
            write_bytes: 100,
        };
        let b = ProcSample {
            rss: 5,
            cpu_s: 0.5,
            write_bytes: 40,
        };
        let d = sum_since(&[a, a], &[b, b]);
        assert_eq!(d.cpu_s, 3.0);
        assert_eq!(d.write_bytes, 120);
    }
}
