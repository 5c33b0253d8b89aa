//! The durable-publish scenario: C connections, each keeping K write commands in flight (one
//! pipelined batch at a time, the next sent when every reply of the previous one is in), for a
//! warmup and a measured window; then one [`DurableResult`].
//!
//! Against herald the command is `PUBLISH <prefix>:<i> <payload>` (acknowledged once the event
//! is flushed to disk when the channel's namespace is durable); against Redis it is
//! `XADD <prefix>:<i> [MAXLEN ~ N] * f <payload>` (acknowledged according to the server's
//! `appendfsync`). Connection i writes only to its own key. The ack latency of a command is the
//! time from writing its batch to reading its reply; figures cover the batches *sent* inside
//! the window.

use crate::procfs::{ProcDelta, ProcSample};
use crate::report::{Latency, json_list, json_str, latency_json, thousands};
use crate::resp::{Ack, parse_ack};
use anyhow::{Context, bail, ensure};
use hdrhistogram::Histogram;
use std::fmt::Write as _;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

/// Read buffer of each connection (replies are a few bytes each).
const REPLY_BUFFER: usize = 64 * 1024;
/// Largest latency the histograms track, in microseconds (larger values are clamped).
const MAX_LATENCY_US: u64 = 60_000_000;
/// Time allowed to connect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long connections may overrun the end of the run (a stalled server) before being aborted.
const GRACE: Duration = Duration::from_secs(10);

/// Which write command acknowledges a durable publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `PUBLISH key payload` (herald: durable namespaces ack after the flush).
    Publish,
    /// `XADD key [MAXLEN ~ n] * f payload` (Redis Streams; durability is the server's
    /// `appendfsync`).
    Xadd {
        /// Approximate trim to this many entries per stream (`MAXLEN ~`), if any.
        maxlen: Option<u64>,
    },
}

impl Mode {
    /// The command as shown in reports.
    pub fn describe(&self) -> String {
        match self {
            Mode::Publish => "PUBLISH".to_owned(),
            Mode::Xadd { maxlen: None } => "XADD".to_owned(),
            Mode::Xadd { maxlen: Some(n) } => format!("XADD MAXLEN ~ {n}"),
        }
    }
}

/// One durable-publish run against one server.
#[derive(Debug, Clone)]
pub struct DurableScenario {
    /// Name of the server in reports.
    pub label: String,
    /// Address of the server, `host:port`.
    pub addr: String,
    /// The write command.
    pub mode: Mode,
    /// The server's process id, to report its CPU time and disk writes (same machine only).
    pub pid: Option<u32>,
    /// Keys (channels or streams) are `<prefix>:<connection>`.
    pub prefix: String,
    /// Concurrent connections (C).
    pub connections: usize,
    /// Commands each connection pipelines per batch (K).
    pub pipeline: usize,
    /// Payload size in bytes.
    pub payload: usize,
    /// Measured window.
    pub duration: Duration,
    /// Unmeasured writing before the window.
    pub warmup: Duration,
}

impl DurableScenario {
    fn validate(&self) -> anyhow::Result<()> {
        ensure!(self.connections >= 1, "connections must be at least 1");
        ensure!(self.pipeline >= 1, "pipeline must be at least 1");
        ensure!(self.payload >= 1, "payload must be at least 1 byte");
        ensure!(!self.duration.is_zero(), "--duration must be positive");
        Ok(())
    }

    /// `CxK`, how the load shape is written on the command line and in tables.
    pub fn shape(&self) -> String {
        format!("{}x{}", self.connections, self.pipeline)
    }
}

/// Encodes a command as a RESP array of bulk strings.
fn command(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        out.extend_from_slice(arg);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// One write command for connection `i`.
fn write_command(mode: Mode, key: &str, payload: &[u8]) -> Vec<u8> {
    match mode {
        Mode::Publish => command(&[b"PUBLISH", key.as_bytes(), payload]),
        Mode::Xadd { maxlen: None } => command(&[b"XADD", key.as_bytes(), b"*", b"f", payload]),
        Mode::Xadd { maxlen: Some(n) } => {
            let n = n.to_string();
            command(&[
                b"XADD",
                key.as_bytes(),
                b"MAXLEN",
                b"~",
                n.as_bytes(),
                b"*",
                b"f",
                payload,
            ])
        }
    }
}

/// What one connection measured.
struct ConnStats {
    hist: Histogram<u64>,
    /// Commands sent inside the window and acknowledged.
    acked: u64,
    /// Batches sent inside the window.
    batches: u64,
    error: Option<String>,
}

struct Window {
    start: Instant,
    measure_start: Duration,
    measure_end: Duration,
}

async fn connection(
    mut stream: TcpStream,
    batch: Vec<u8>,
    pipeline: usize,
    window: std::sync::Arc<Window>,
) -> ConnStats {
    let mut stats = ConnStats {
        hist: Histogram::new_with_max(MAX_LATENCY_US, 3).expect("histogram bounds"),
        acked: 0,
        batches: 0,
        error: None,
    };
    if let Err(e) = write_loop(&mut stream, &batch, pipeline, &window, &mut stats).await {
        stats.error = Some(format!("{e:#}"));
    }
    stats
}

async fn write_loop(
    stream: &mut TcpStream,
    batch: &[u8],
    pipeline: usize,
    window: &Window,
    stats: &mut ConnStats,
) -> anyhow::Result<()> {
    let mut replies = vec![0u8; REPLY_BUFFER];
    let (mut rstart, mut rend) = (0usize, 0usize);
    loop {
        let sent = window.start.elapsed();
        if sent >= window.measure_end {
            return Ok(());
        }
        let measured = sent >= window.measure_start;
        stream.write_all(batch).await.context("sending commands")?;
        if measured {
            stats.batches += 1;
        }
        let mut pending = pipeline;
        let mut now = sent;
        while pending > 0 {
            match parse_ack(&replies[rstart..rend])? {
                Some((Ack::Ok, used)) => {
                    rstart += used;
                    pending -= 1;
                    if measured {
                        stats.acked += 1;
                        stats
                            .hist
                            .saturating_record((now - sent).as_micros() as u64);
                    }
                }
                Some((Ack::Error(e), _)) => {
                    bail!("command refused: {}", String::from_utf8_lossy(e))
                }
                None => {
                    if rstart == rend {
                        (rstart, rend) = (0, 0);
                    } else if rstart > 0 {
                        replies.copy_within(rstart..rend, 0);
                        rend -= rstart;
                        rstart = 0;
                    }
                    let read = stream
                        .read(&mut replies[rend..])
                        .await
                        .context("reading replies")?;
                    now = window.start.elapsed();
                    ensure!(read > 0, "connection closed by the server");
                    rend += read;
                }
            }
        }
    }
}

/// What one durable run measured.
#[derive(Debug)]
pub struct DurableResult {
    /// The scenario that ran.
    pub scenario: DurableScenario,
    /// Commands sent inside the window and acknowledged.
    pub acked: u64,
    /// Batches sent inside the window.
    pub batches: u64,
    /// Ack latency of those commands, in microseconds.
    pub hist: Histogram<u64>,
    /// Time to connect everything.
    pub setup: Duration,
    /// The server's CPU time, memory change and disk writes over the measured window, when its
    /// pid was given.
    pub server: Option<ProcDelta>,
    /// Connection failures.
    pub errors: Vec<String>,
}

impl DurableResult {
    /// Acknowledged commands per second.
    pub fn acked_per_s(&self) -> f64 {
        self.acked as f64 / self.scenario.duration.as_secs_f64()
    }

    /// Latency percentiles.
    pub fn latency(&self) -> Latency {
        Latency::of(&self.hist)
    }

    /// One human-readable line, then error lines if any.
    pub fn human(&self) -> String {
        let s = &self.scenario;
        let l = self.latency();
        let mut out = format!(
            "{}: {}, CxK {}, {} B: acked {} msg/s, ack latency us p50 {} p90 {} p99 {} p99.9 {} max {}",
            s.label,
            s.mode.describe(),
            s.shape(),
            s.payload,
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
                "; server CPU {:.0}% ({:.1} us/msg), disk writes {:.0} B/msg",
                server.cpu_s / s.duration.as_secs_f64() * 100.0,
                per_msg(server.cpu_s * 1e6, self.acked),
                per_msg(server.write_bytes as f64, self.acked),
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
                "{{\"cpu_s\":{:.3},\"rss_change_bytes\":{},\"write_bytes\":{}}}",
                d.cpu_s, d.rss, d.write_bytes
            )
        });
        format!(
            "{{\"label\":{},\"addr\":{},\"command\":{},\"connections\":{},\"pipeline\":{},\
             \"payload\":{},\"duration_s\":{},\"warmup_s\":{},\"acked\":{},\"acked_per_s\":{:.1},\
             \"batches\":{},\"latency_us\":{},\"setup_s\":{:.3},\"server\":{},\"errors\":{}}}",
            json_str(&s.label),
            json_str(&s.addr),
            json_str(&s.mode.describe()),
            s.connections,
            s.pipeline,
            s.payload,
            s.duration.as_secs_f64(),
            s.warmup.as_secs_f64(),
            self.acked,
            self.acked_per_s(),
            self.batches,
            latency_json(&self.latency()),
            self.setup.as_secs_f64(),
            server,
            json_list(&self.errors),
        )
    }
}

fn per_msg(total: f64, msgs: u64) -> f64 {
    if msgs == 0 { 0.0 } else { total / msgs as f64 }
}

async fn connect(addr: &str) -> anyhow::Result<TcpStream> {
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
        .await
        .with_context(|| format!("connecting to {addr} timed out"))?
        .with_context(|| format!("cannot connect to {addr}"))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Runs one scenario and measures it.
pub async fn run(s: &DurableScenario) -> anyhow::Result<DurableResult> {
    s.validate()?;
    let payload = vec![b'x'; s.payload];
    let setup_started = Instant::now();
    let mut streams = Vec::with_capacity(s.connections);
    for _ in 0..s.connections {
        streams.push(connect(&s.addr).await?);
    }
    let setup = setup_started.elapsed();

    let start = Instant::now() + Duration::from_millis(1);
    let window = std::sync::Arc::new(Window {
        start,
        measure_start: s.warmup,
        measure_end: s.warmup + s.duration,
    });
    let mut handles: Vec<JoinHandle<ConnStats>> = Vec::with_capacity(s.connections);
    for (i, stream) in streams.into_iter().enumerate() {
        let key = format!("{}:{i}", s.prefix);
        let one = write_command(s.mode, &key, &payload);
        let batch = one.repeat(s.pipeline);
        handles.push(tokio::spawn(connection(
            stream,
            batch,
            s.pipeline,
            window.clone(),
        )));
    }
    // Sample the server's counters at the window's edges.
    let server_at_start = match s.pid {
        Some(pid) => {
            tokio::time::sleep_until((start + s.warmup).into()).await;
            Some(ProcSample::read(pid)?)
        }
        None => None,
    };
    let server = match (s.pid, server_at_start) {
        (Some(pid), Some(before)) => {
            tokio::time::sleep_until((start + s.warmup + s.duration).into()).await;
            Some(ProcSample::read(pid)?.since(&before))
        }
        _ => None,
    };

    let mut hist = Histogram::<u64>::new_with_max(MAX_LATENCY_US, 3)?;
    let (mut acked, mut batches) = (0, 0);
    let mut errors = Vec::new();
    let give_up = tokio::time::Instant::from_std(start + s.warmup + s.duration + GRACE);
    for (i, handle) in handles.into_iter().enumerate() {
        let abort = handle.abort_handle();
        match tokio::time::timeout_at(give_up, handle).await {
            Ok(joined) => {
                let stats = joined?;
                hist.add(&stats.hist)?;
                acked += stats.acked;
                batches += stats.batches;
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
    Ok(DurableResult {
        scenario: s.clone(),
        acked,
        batches,
        hist,
        setup,
        server,
        errors,
    })
}

/// Several rounds of one (target, payload, shape) merged.
#[derive(Debug)]
pub struct Merged {
    /// Mean acknowledged msg/s over the rounds.
    pub acked_per_s: f64,
    /// Latency over all rounds' commands.
    pub latency: Latency,
    /// Server CPU microseconds per acknowledged message, when measured.
    pub cpu_us_per_msg: Option<f64>,
    /// Rounds with errors.
    pub troubled_rounds: usize,
}

impl Merged {
    /// Merges rounds; `None` without any.
    pub fn of(runs: &[&DurableResult]) -> Option<Merged> {
        let first = runs.first()?;
        let mut hist = first.hist.clone();
        for run in &runs[1..] {
            hist.add(&run.hist).ok()?;
        }
        let acked: u64 = runs.iter().map(|r| r.acked).sum();
        let cpu: Option<f64> = runs
            .iter()
            .map(|r| r.server.map(|d| d.cpu_s))
            .sum::<Option<f64>>();
        Some(Merged {
            acked_per_s: runs.iter().map(|r| r.acked_per_s()).sum::<f64>() / runs.len() as f64,
            latency: Latency::of(&hist),
            cpu_us_per_msg: cpu.map(|c| per_msg(c * 1e6, acked)),
            troubled_rounds: runs.iter().filter(|r| !r.errors.is_empty()).count(),
        })
    }

    fn json(&self) -> String {
        format!(
            "{{\"acked_per_s\":{:.1},\"latency_us\":{},\"server_cpu_us_per_msg\":{},\"troubled_rounds\":{}}}",
            self.acked_per_s,
            latency_json(&self.latency),
            self.cpu_us_per_msg
                .map_or("null".to_owned(), |c| format!("{c:.2}")),
            self.troubled_rounds
        )
    }
}

/// One row of the comparison: a payload size and load shape, every target merged over rounds.
#[derive(Debug)]
pub struct DurableRow {
    /// Payload size in bytes.
    pub payload: usize,
    /// Connections (C).
    pub connections: usize,
    /// Pipeline depth (K).
    pub pipeline: usize,
    /// One entry per target, in the order given.
    pub sides: Vec<Merged>,
}

/// The comparison table as text: acked msg/s, p50 and p99 per target, then the first target's
/// throughput over each other's.
pub fn table(labels: &[String], rows: &[DurableRow]) -> String {
    let mut out = String::new();
    let _ = write!(out, "{:>8} {:>7}", "payload", "CxK");
    for label in labels {
        let _ = write!(
            out,
            " | {:>16} {:>8} {:>8}",
            format!("{label} msg/s"),
            "p50 us",
            "p99 us"
        );
    }
    for label in &labels[1..] {
        let _ = write!(out, " | {:>14}", format!("{}/{}", labels[0], label));
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
                " | {:>16} {:>8} {:>8}{}",
                thousands(side.acked_per_s),
                side.latency.p50,
                side.latency.p99,
                if side.troubled_rounds > 0 { "!" } else { "" }
            );
        }
        for side in &row.sides[1..] {
            let _ = write!(
                out,
                " | {:>14.2}",
                row.sides[0].acked_per_s / side.acked_per_s
            );
        }
        out.push('\n');
    }
    if troubled {
        out.push_str("(! = some rounds had errors, see above)\n");
    }
    out
}

/// The comparison as one JSON object.
pub fn compare_json(labels: &[String], rows: &[DurableRow], runs: &[DurableResult]) -> String {
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
    let runs: Vec<String> = runs.iter().map(DurableResult::json).collect();
    format!(
        "{{\"targets\":{},\"rows\":[{}],\"runs\":[{}]}}",
        json_list(labels),
        rows.join(","),
        runs.join(",")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_resp_arrays() {
        let publish = write_command(Mode::Publish, "d:0", b"xy");
        assert_eq!(publish, b"*3\r\n$7\r\nPUBLISH\r\n$3\r\nd:0\r\n$2\r\nxy\r\n");
        let xadd = write_command(Mode::Xadd { maxlen: None }, "d:1", b"xy");
        assert_eq!(
            xadd,
            b"*5\r\n$4\r\nXADD\r\n$3\r\nd:1\r\n$1\r\n*\r\n$1\r\nf\r\n$2\r\nxy\r\n"
        );
        let trimmed = write_command(Mode::Xadd { maxlen: Some(100) }, "d:1", b"xy");
        assert_eq!(
            String::from_utf8(trimmed).unwrap(),
            "*8\r\n$4\r\nXADD\r\n$3\r\nd:1\r\n$6\r\nMAXLEN\r\n$1\r\n~\r\n$3\r\n100\r\n$1\r\n*\r\n$1\r\nf\r\n$2\r\nxy\r\n"
        );
        assert_eq!(
            Mode::Xadd { maxlen: Some(100) }.describe(),
            "XADD MAXLEN ~ 100"
        );
    }

    #[test]
    fn table_has_a_ratio_per_other_target() {
        let side = |rate: f64| Merged {
            acked_per_s: rate,
            latency: Latency {
                p50: 1,
                p90: 2,
                p99: 3,
                p999: 4,
                max: 5,
                mean: 1.5,
            },
            cpu_us_per_msg: None,
            troubled_rounds: 0,
        };
        let rows = vec![DurableRow {
            payload: 64,
            connections: 1,
            pipeline: 32,
            sides: vec![side(3000.0), side(1000.0), side(6000.0)],
        }];
        let labels = vec!["herald".to_owned(), "ra".to_owned(), "re".to_owned()];
        let text = table(&labels, &rows);
        assert!(text.contains("herald/ra"), "{text}");
        assert!(text.contains("3.00"), "{text}");
        assert!(text.contains("0.50"), "{text}");
        assert!(compare_json(&labels, &rows, &[]).starts_with("{\"targets\":[\"herald\""));
    }
}
