//! The idle-connections scenario: N Server-Sent Events streams and N WebSocket clients on one
//! channel of a herald node, its resident memory per connection, then the time one published
//! event takes to reach all of them.
//!
//! The clients are deliberately cheap, so that one process on a shared machine can hold tens of
//! thousands: raw HTTP/1.1 over TCP, a hand-rolled WebSocket upgrade and frames, one small task
//! per connection that only wakes when bytes arrive, and one task that pings every WebSocket
//! now and then (herald closes WebSocket clients that stay silent too long).
//!
//! 1. Sample the server's `VmRSS` (`--pid`).
//! 2. Open the SSE streams (`GET /api/stream/<channel>`; established once the `retry:` line
//!    arrives), wait `--settle`, sample again: the difference over N is the memory per SSE
//!    connection.
//! 3. Open the WebSockets (`/ws?userId=...`, then `{"type":"subscribe","channel":...}`;
//!    established once `"subscribed"` arrives), settle, sample: the memory per WebSocket.
//! 4. Publish `--events` events, one at a time, with `POST /api/publish`; for each, the time
//!    from sending the request to each connection's reading it (p50, p99, max = everyone has
//!    it), and the publish's own response time.

use crate::procfs::ProcSample;
use crate::report::{json_list, json_str, thousands};
use anyhow::{Context, bail, ensure};
use hdrhistogram::Histogram;
use memchr::memmem;
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::task::JoinSet;

/// What every published event's data starts with; readers count its occurrences.
const MARK: &[u8] = b"@herald-idle-event@";
/// Read buffer of each connection's reader (events are small; keep-alives smaller).
const READ_BUFFER: usize = 2048;
/// Most bytes of handshake (HTTP response head plus first messages) read before giving up.
const HANDSHAKE_LIMIT: usize = 64 * 1024;
/// Largest latency the histograms track, in microseconds.
const MAX_LATENCY_US: u64 = 600_000_000;

/// The idle scenario.
#[derive(Debug, Clone)]
pub struct IdleScenario {
    /// herald's HTTP address, `host:port`.
    pub http: String,
    /// SSE connections to open.
    pub sse: usize,
    /// WebSocket connections to open.
    pub ws: usize,
    /// The channel every connection listens on.
    pub channel: String,
    /// herald's process id, for its resident memory.
    pub pid: Option<u32>,
    /// Events to publish, one after the other.
    pub events: usize,
    /// Size of each event's data in bytes.
    pub payload: usize,
    /// Connections being opened at the same time.
    pub concurrency: usize,
    /// Wait after opening connections before sampling memory.
    pub settle: Duration,
    /// Idle time after everything is connected, before the first publish.
    pub hold: Duration,
    /// Most time to wait for one event to reach every connection.
    pub timeout: Duration,
    /// Interval of client pings on WebSockets (zero: never).
    pub ws_ping: Duration,
}

/// The kind of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Sse,
    Ws,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Sse => "SSE",
            Kind::Ws => "WebSocket",
        }
    }
}

/// Percent-encodes a path or query component (everything but unreserved characters).
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for &b in text.as_bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b':') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// A masked client frame (RFC 6455 5.2) of `opcode` with `payload` (under 64 KiB).
fn client_frame(opcode: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 8);
    out.push(0x80 | opcode);
    if payload.len() < 126 {
        out.push(0x80 | payload.len() as u8);
    } else {
        out.push(0x80 | 126);
        out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

/// Reads from `stream` into `buf` until `done(buf)` says the handshake is complete.
async fn read_until(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    what: &str,
    done: impl Fn(&[u8]) -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let mut chunk = [0u8; 4096];
    loop {
        if done(buf)? {
            return Ok(());
        }
        ensure!(
            buf.len() < HANDSHAKE_LIMIT,
            "no {what} in the first {HANDSHAKE_LIMIT} bytes"
        );
        let n = stream.read(&mut chunk).await?;
        ensure!(n > 0, "connection closed before {what}");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// The status line's code, once the response head is complete.
fn status_of(head: &[u8]) -> anyhow::Result<Option<u16>> {
    if memmem::find(head, b"\r\n\r\n").is_none() {
        return Ok(None);
    }
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let text = String::from_utf8_lossy(line);
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("bad HTTP status line {text:?}"))?;
    Ok(Some(code))
}

/// Opens one SSE stream; returns once its `retry:` line has arrived.
async fn open_sse(addr: String, path: Arc<str>) -> anyhow::Result<TcpStream> {
    let mut stream = TcpStream::connect(&addr).await?;
    stream.set_nodelay(true)?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\nCache-Control: no-cache\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    let mut buf = Vec::new();
    read_until(
        &mut stream,
        &mut buf,
        "SSE `retry:` line",
        |buf| match status_of(buf)? {
            None => Ok(false),
            Some(200) => Ok(memmem::find(buf, b"retry:").is_some()),
            Some(code) => bail!(
                "HTTP {code}: {}",
                String::from_utf8_lossy(buf)
                    .lines()
                    .last()
                    .unwrap_or_default()
            ),
        },
    )
    .await?;
    Ok(stream)
}

/// Opens one WebSocket and subscribes it to `channel`; returns once `subscribed` arrived.
async fn open_ws(addr: String, index: usize, subscribe: Arc<[u8]>) -> anyhow::Result<TcpStream> {
    let mut stream = TcpStream::connect(&addr).await?;
    stream.set_nodelay(true)?;
    let request = format!(
        "GET /ws?userId=bench-idle-{index} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    let mut buf = Vec::new();
    read_until(
        &mut stream,
        &mut buf,
        "WebSocket upgrade",
        |buf| match status_of(buf)? {
            None => Ok(false),
            Some(101) => Ok(true),
            Some(code) => bail!("HTTP {code} instead of 101 Switching Protocols"),
        },
    )
    .await?;
    stream.write_all(&subscribe).await?;
    read_until(&mut stream, &mut buf, "`subscribed` message", |buf| {
        if memmem::find(buf, b"\"subscribed\"").is_some() {
            return Ok(true);
        }
        if let Some(at) = memmem::find(buf, b"\"error\"") {
            bail!(
                "subscribe refused: {}",
                String::from_utf8_lossy(&buf[at.saturating_sub(16)..])
            );
        }
        Ok(false)
    })
    .await?;
    Ok(stream)
}

/// What the readers share with the coordinator.
struct Shared {
    start: Instant,
    events: usize,
    /// Receive time of event e on connection c at `c * events + e`: ns since `start`, plus one
    /// (0 = not received).
    received_at: Vec<AtomicU64>,
    /// Connections that received event e, at e.
    received: Vec<AtomicUsize>,
    /// Connections closed by the server or failed.
    closed: AtomicUsize,
}

/// Reads a connection until it closes, noting when each event's mark arrives.
async fn reader<R: AsyncRead + Unpin>(mut stream: R, conn: usize, shared: Arc<Shared>) {
    let mut buf = vec![0u8; READ_BUFFER];
    let mut keep = 0usize;
    let mut seen = 0usize;
    let finder = memmem::Finder::new(MARK);
    loop {
        let n = match stream.read(&mut buf[keep..]).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let now = shared.start.elapsed().as_nanos() as u64 + 1;
        let end = keep + n;
        let mut from = 0;
        while let Some(i) = finder.find(&buf[from..end]) {
            if seen < shared.events {
                shared.received_at[conn * shared.events + seen].store(now, Ordering::Relaxed);
                shared.received[seen].fetch_add(1, Ordering::Release);
            }
            seen += 1;
            from += i + MARK.len();
        }
        // Keep the tail, in case a mark is split across reads.
        let tail = from.max(end.saturating_sub(MARK.len() - 1));
        buf.copy_within(tail..end, 0);
        keep = end - tail;
    }
    shared.closed.fetch_add(1, Ordering::Relaxed);
}

/// Opens `count` connections of `kind`, `concurrency` at a time; returns the established ones
/// and the errors (first few) and their count.
async fn open_all(
    kind: Kind,
    s: &IdleScenario,
    count: usize,
) -> (Vec<TcpStream>, Vec<String>, usize, Duration) {
    let started = Instant::now();
    let path: Arc<str> = Arc::from(format!("/api/stream/{}", percent_encode(&s.channel)));
    let subscribe = format!(
        "{{\"type\":\"subscribe\",\"channel\":{}}}",
        json_str(&s.channel)
    );
    let subscribe: Arc<[u8]> = Arc::from(client_frame(0x1, subscribe.as_bytes(), [7, 1, 9, 3]));
    let mut set = JoinSet::new();
    let mut next = 0usize;
    let mut streams = Vec::with_capacity(count);
    let mut errors = Vec::new();
    let mut failed = 0usize;
    let mut last_report = Instant::now();
    while next < count || !set.is_empty() {
        while next < count && set.len() < s.concurrency.max(1) {
            let addr = s.http.clone();
            let index = next;
            match kind {
                Kind::Sse => set.spawn(open_sse(addr, path.clone())),
                Kind::Ws => set.spawn(open_ws(addr, index, subscribe.clone())),
            };
            next += 1;
        }
        match set.join_next().await {
            Some(Ok(Ok(stream))) => streams.push(stream),
            Some(Ok(Err(e))) => {
                failed += 1;
                if errors.len() < 5 {
                    errors.push(format!("{}: {e:#}", kind.name()));
                }
            }
            Some(Err(e)) => {
                failed += 1;
                if errors.len() < 5 {
                    errors.push(format!("{}: connect task failed: {e}", kind.name()));
                }
            }
            None => {}
        }
        if last_report.elapsed() >= Duration::from_secs(5) {
            eprintln!(
                "  {} {} of {count} {} connections open",
                streams.len(),
                if failed > 0 {
                    format!("({failed} failed)")
                } else {
                    String::new()
                },
                kind.name()
            );
            last_report = Instant::now();
        }
    }
    (streams, errors, failed, started.elapsed())
}

/// Memory used by one group of connections.
#[derive(Debug, Clone, Default)]
pub struct Opened {
    /// Connections asked for.
    pub requested: usize,
    /// Connections established.
    pub established: usize,
    /// Connections that failed to open.
    pub failed: usize,
    /// The first few failures.
    pub errors: Vec<String>,
    /// Time to open them all.
    pub open_time: Duration,
    /// Server RSS growth over opening them and settling, in bytes (`None` without `--pid`).
    pub rss_growth: Option<i64>,
}

impl Opened {
    /// RSS growth per established connection, in bytes.
    pub fn per_connection(&self) -> Option<f64> {
        let growth = self.rss_growth?;
        (self.established > 0).then(|| growth as f64 / self.established as f64)
    }
}

/// How one event reached every connection.
#[derive(Debug)]
pub struct Delivery {
    /// Time from sending `POST /api/publish` to its response.
    pub publish_response: Duration,
    /// Time from sending the publish to each connection's read of the event, in µs.
    pub hist: Histogram<u64>,
    /// The same for the SSE connections only, then for the WebSockets only.
    pub by_kind: [Histogram<u64>; 2],
    /// Connections that got it.
    pub reached: usize,
    /// Live connections that had not got it when the wait ended.
    pub missing: usize,
    /// Server CPU time from the publish until every connection had the event (`--pid`).
    pub server_cpu: Option<Duration>,
}

/// What the idle run measured.
#[derive(Debug)]
pub struct IdleResult {
    /// The scenario.
    pub scenario: IdleScenario,
    /// Server RSS before any connection, in bytes.
    pub rss_start: Option<u64>,
    /// The SSE connections.
    pub sse: Opened,
    /// The WebSocket connections.
    pub ws: Opened,
    /// Server RSS once everything is connected and idle (after `--hold`).
    pub rss_idle: Option<u64>,
    /// Server RSS after the events were delivered.
    pub rss_after: Option<u64>,
    /// One entry per event.
    pub deliveries: Vec<Delivery>,
    /// Connections closed by the server during the run.
    pub closed: usize,
}

impl IdleResult {
    fn established(&self) -> usize {
        self.sse.established + self.ws.established
    }

    /// RSS growth per connection from the start to after the deliveries, in bytes.
    pub fn per_connection_after(&self) -> Option<f64> {
        let (start, after) = (self.rss_start?, self.rss_after?);
        (self.established() > 0).then(|| (after as f64 - start as f64) / self.established() as f64)
    }

    /// Human-readable report.
    pub fn human(&self) -> String {
        let mut out = String::new();
        let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
        if let Some(start) = self.rss_start {
            let _ = writeln!(out, "server RSS at start: {:.1} MiB", mib(start));
        }
        for (kind, opened) in [(Kind::Sse, &self.sse), (Kind::Ws, &self.ws)] {
            if opened.requested == 0 {
                continue;
            }
            let _ = write!(
                out,
                "{}: {} of {} open in {:.1}s ({} conn/s)",
                kind.name(),
                opened.established,
                opened.requested,
                opened.open_time.as_secs_f64(),
                thousands(opened.established as f64 / opened.open_time.as_secs_f64().max(1e-9)),
            );
            if let (Some(growth), Some(per)) = (opened.rss_growth, opened.per_connection()) {
                let _ = write!(
                    out,
                    "; server RSS +{:.1} MiB = {:.0} B ({:.2} KiB) per connection",
                    growth as f64 / (1024.0 * 1024.0),
                    per,
                    per / 1024.0
                );
            }
            out.push('\n');
            for error in &opened.errors {
                let _ = writeln!(out, "  error: {error}");
            }
        }
        if let Some(idle) = self.rss_idle {
            let _ = writeln!(
                out,
                "server RSS idle with all connections: {:.1} MiB",
                mib(idle)
            );
        }
        for (i, d) in self.deliveries.iter().enumerate() {
            let _ = writeln!(
                out,
                "event {}: reached {} of {} connections; publish response {:.2} ms; \
                 publish-to-receive ms p50 {:.2} p90 {:.2} p99 {:.2} max (all) {:.2}{}{}",
                i + 1,
                d.reached,
                self.established(),
                d.publish_response.as_secs_f64() * 1e3,
                d.hist.value_at_quantile(0.5) as f64 / 1e3,
                d.hist.value_at_quantile(0.9) as f64 / 1e3,
                d.hist.value_at_quantile(0.99) as f64 / 1e3,
                d.hist.max() as f64 / 1e3,
                d.server_cpu.map_or(String::new(), |cpu| format!(
                    "; server CPU {:.0} ms ({:.1} us per connection)",
                    cpu.as_secs_f64() * 1e3,
                    cpu.as_secs_f64() * 1e6 / d.reached.max(1) as f64
                )),
                if d.missing > 0 {
                    format!(" ({} still missing at the timeout)", d.missing)
                } else {
                    String::new()
                }
            );
            for (kind, hist) in [Kind::Sse, Kind::Ws].iter().zip(&d.by_kind) {
                if !hist.is_empty() {
                    let _ = writeln!(
                        out,
                        "  {}: {} connections, ms p50 {:.2} p99 {:.2} max {:.2}",
                        kind.name(),
                        hist.len(),
                        hist.value_at_quantile(0.5) as f64 / 1e3,
                        hist.value_at_quantile(0.99) as f64 / 1e3,
                        hist.max() as f64 / 1e3,
                    );
                }
            }
        }
        if let (Some(after), Some(per)) = (self.rss_after, self.per_connection_after()) {
            let _ = writeln!(
                out,
                "server RSS after delivery: {:.1} MiB = {:.0} B ({:.2} KiB) per connection over the start",
                mib(after),
                per,
                per / 1024.0
            );
        }
        if self.closed > 0 {
            let _ = writeln!(
                out,
                "warning: {} connection(s) closed by the server",
                self.closed
            );
        }
        out
    }

    /// One JSON object.
    pub fn json(&self) -> String {
        let opt = |v: Option<u64>| v.map_or("null".to_owned(), |v| v.to_string());
        let optf = |v: Option<f64>| v.map_or("null".to_owned(), |v| format!("{v:.1}"));
        let opened = |o: &Opened| {
            format!(
                "{{\"requested\":{},\"established\":{},\"failed\":{},\"open_s\":{:.3},\
                 \"rss_growth_bytes\":{},\"rss_per_connection_bytes\":{},\"errors\":{}}}",
                o.requested,
                o.established,
                o.failed,
                o.open_time.as_secs_f64(),
                o.rss_growth.map_or("null".to_owned(), |v| v.to_string()),
                optf(o.per_connection()),
                json_list(&o.errors)
            )
        };
        let deliveries: Vec<String> = self
            .deliveries
            .iter()
            .map(|d| {
                format!(
                    "{{\"publish_response_ms\":{:.3},\"reached\":{},\"missing\":{},\
                     \"server_cpu_ms\":{},\"receive_ms\":{},\"sse_receive_ms\":{},\
                     \"websocket_receive_ms\":{}}}",
                    d.publish_response.as_secs_f64() * 1e3,
                    d.reached,
                    d.missing,
                    d.server_cpu.map_or("null".to_owned(), |c| format!(
                        "{:.1}",
                        c.as_secs_f64() * 1e3
                    )),
                    ms_json(&d.hist),
                    ms_json(&d.by_kind[0]),
                    ms_json(&d.by_kind[1]),
                )
            })
            .collect();
        format!(
            "{{\"http\":{},\"channel\":{},\"rss_start_bytes\":{},\"sse\":{},\"websocket\":{},\
             \"rss_idle_bytes\":{},\"rss_after_bytes\":{},\"rss_per_connection_after_bytes\":{},\
             \"deliveries\":[{}],\"closed\":{}}}",
            json_str(&self.scenario.http),
            json_str(&self.scenario.channel),
            opt(self.rss_start),
            opened(&self.sse),
            opened(&self.ws),
            opt(self.rss_idle),
            opt(self.rss_after),
            optf(self.per_connection_after()),
            deliveries.join(","),
            self.closed
        )
    }
}

/// Percentiles of a histogram of µs, in ms, as JSON (`null` when empty).
fn ms_json(hist: &Histogram<u64>) -> String {
    if hist.is_empty() {
        return "null".to_owned();
    }
    format!(
        "{{\"count\":{},\"p50\":{:.3},\"p90\":{:.3},\"p99\":{:.3},\"max\":{:.3}}}",
        hist.len(),
        hist.value_at_quantile(0.5) as f64 / 1e3,
        hist.value_at_quantile(0.9) as f64 / 1e3,
        hist.value_at_quantile(0.99) as f64 / 1e3,
        hist.max() as f64 / 1e3,
    )
}

fn rss(pid: Option<u32>) -> anyhow::Result<Option<u64>> {
    pid.map(|pid| ProcSample::read(pid).map(|s| s.rss))
        .transpose()
}

/// Sends one `POST /api/publish` on a fresh connection and reads the whole response.
async fn publish(addr: &str, channel: &str, data: &str) -> anyhow::Result<()> {
    let body = format!(
        "{{\"channel\":{},\"data\":{}}}",
        json_str(channel),
        json_str(data)
    );
    let request = format!(
        "POST /api/publish HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("cannot connect to {addr}"))?;
    stream.set_nodelay(true)?;
    stream.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    match status_of(&response)? {
        Some(200) => Ok(()),
        Some(code) => bail!(
            "POST /api/publish: HTTP {code}: {}",
            String::from_utf8_lossy(&response)
        ),
        None => bail!("POST /api/publish: incomplete response"),
    }
}

/// Pings every WebSocket each `every`, so herald does not close them as silent.
async fn pinger(mut writers: Vec<OwnedWriteHalf>, every: Duration) {
    let ping = client_frame(0x9, b"", [1, 2, 3, 4]);
    let mut ticker = tokio::time::interval(every);
    ticker.tick().await;
    loop {
        ticker.tick().await;
        for writer in &mut writers {
            // A failed write means the connection is gone; its reader counts it.
            let _ = writer.write_all(&ping).await;
        }
    }
}

/// Runs the scenario.
pub async fn run(s: &IdleScenario) -> anyhow::Result<IdleResult> {
    ensure!(s.sse + s.ws > 0, "nothing to open: give --sse and/or --ws");
    ensure!(s.events >= 1, "--events must be at least 1");
    warn_about_fd_limit(s.sse + s.ws);
    let rss_start = rss(s.pid)?;
    let mut last_rss = rss_start;

    let mut streams: Vec<(Kind, TcpStream)> = Vec::with_capacity(s.sse + s.ws);
    let mut groups = Vec::new();
    for (kind, count) in [(Kind::Sse, s.sse), (Kind::Ws, s.ws)] {
        if count == 0 {
            groups.push(Opened::default());
            continue;
        }
        eprintln!("opening {count} {} connections", kind.name());
        let (opened, errors, failed, open_time) = open_all(kind, s, count).await;
        tokio::time::sleep(s.settle).await;
        let now_rss = rss(s.pid)?;
        let rss_growth = match (last_rss, now_rss) {
            (Some(before), Some(after)) => Some(after as i64 - before as i64),
            _ => None,
        };
        last_rss = now_rss;
        groups.push(Opened {
            requested: count,
            established: opened.len(),
            failed,
            errors,
            open_time,
            rss_growth,
        });
        streams.extend(opened.into_iter().map(|stream| (kind, stream)));
    }
    let ws_opened = groups.pop().unwrap_or_default();
    let sse_opened = groups.pop().unwrap_or_default();

    // One reader per connection from here on.
    let shared = Arc::new(Shared {
        start: Instant::now(),
        events: s.events,
        received_at: (0..streams.len() * s.events)
            .map(|_| AtomicU64::new(0))
            .collect(),
        received: (0..s.events).map(|_| AtomicUsize::new(0)).collect(),
        closed: AtomicUsize::new(0),
    });
    let conns = streams.len();
    let mut writers = Vec::new();
    for (conn, (kind, stream)) in streams.into_iter().enumerate() {
        match kind {
            Kind::Sse => {
                tokio::spawn(reader(stream, conn, shared.clone()));
            }
            Kind::Ws => {
                let (read, write) = stream.into_split();
                writers.push(write);
                tokio::spawn(reader(read, conn, shared.clone()));
            }
        }
    }
    let pinger = (!s.ws_ping.is_zero() && !writers.is_empty())
        .then(|| tokio::spawn(pinger(writers, s.ws_ping)));

    if !s.hold.is_zero() {
        eprintln!("holding {} connections idle for {:?}", conns, s.hold);
        tokio::time::sleep(s.hold).await;
    }
    let rss_idle = rss(s.pid)?;

    let mut deliveries = Vec::with_capacity(s.events);
    let filler = "x".repeat(s.payload.saturating_sub(MARK.len() + 8));
    for event in 0..s.events {
        let data = format!("{}{event}:{filler}", String::from_utf8_lossy(MARK));
        let cpu_before = s.pid.map(ProcSample::read).transpose()?;
        let sent = shared.start.elapsed().as_nanos() as u64;
        publish(&s.http, &s.channel, &data).await?;
        let publish_response =
            Duration::from_nanos(shared.start.elapsed().as_nanos() as u64 - sent);
        let deadline = Instant::now() + s.timeout;
        loop {
            let live = conns - shared.closed.load(Ordering::Relaxed);
            if shared.received[event].load(Ordering::Acquire) >= live || Instant::now() >= deadline
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let server_cpu = match (s.pid, cpu_before) {
            (Some(pid), Some(before)) => Some(Duration::from_secs_f64(
                ProcSample::read(pid)?.since(&before).cpu_s.max(0.0),
            )),
            _ => None,
        };
        let mut hist = Histogram::<u64>::new_with_max(MAX_LATENCY_US, 3)?;
        let mut by_kind = [hist.clone(), hist.clone()];
        let mut reached = 0;
        for conn in 0..conns {
            let at = shared.received_at[conn * s.events + event].load(Ordering::Relaxed);
            if at > 0 {
                reached += 1;
                let us = (at - 1).saturating_sub(sent) / 1000;
                hist.saturating_record(us);
                // Connections are numbered SSE first, then WebSocket.
                by_kind[usize::from(conn >= sse_opened.established)].saturating_record(us);
            }
        }
        let missing = conns
            .saturating_sub(shared.closed.load(Ordering::Relaxed))
            .saturating_sub(reached);
        deliveries.push(Delivery {
            publish_response,
            hist,
            by_kind,
            reached,
            missing,
            server_cpu,
        });
        // Let the server settle between events.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let rss_after = rss(s.pid)?;
    if let Some(pinger) = pinger {
        pinger.abort();
    }
    Ok(IdleResult {
        scenario: s.clone(),
        rss_start,
        sse: sse_opened,
        ws: ws_opened,
        rss_idle,
        rss_after,
        deliveries,
        closed: shared.closed.load(Ordering::Relaxed),
    })
}

/// Warns when this process may not open `connections` sockets.
fn warn_about_fd_limit(connections: usize) {
    let Ok(limits) = std::fs::read_to_string("/proc/self/limits") else {
        return;
    };
    let soft = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse::<usize>().ok());
    if let Some(soft) = soft
        && soft < connections + 64
    {
        eprintln!(
            "warning: this process may open {soft} files but needs about {}: raise `ulimit -n`",
            connections + 64
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_masked() {
        let frame = client_frame(0x1, b"hi", [1, 2, 3, 4]);
        assert_eq!(frame, vec![0x81, 0x82, 1, 2, 3, 4, b'h' ^ 1, b'i' ^ 2]);
        let long = client_frame(0x1, &[0u8; 300], [0, 0, 0, 0]);
        assert_eq!(&long[..4], &[0x81, 0x80 | 126, 1, 44]);
        assert_eq!(long.len(), 4 + 4 + 300);
        assert_eq!(
            client_frame(0x9, b"", [9, 9, 9, 9]),
            vec![0x89, 0x80, 9, 9, 9, 9]
        );
    }

    #[test]
    fn encodes_paths_and_reads_status() {
        assert_eq!(percent_encode("bench-idle:1"), "bench-idle:1");
        assert_eq!(percent_encode("a b/é"), "a%20b%2F%C3%A9");
        assert_eq!(status_of(b"HTTP/1.1 200 OK\r\n").unwrap(), None);
        assert_eq!(
            status_of(b"HTTP/1.1 101 Switching Protocols\r\n\r\n").unwrap(),
            Some(101)
        );
        assert!(status_of(b"garbage\r\n\r\n").is_err());
    }

    #[tokio::test]
    async fn reader_finds_marks_split_across_reads() {
        let mut stream = Vec::new();
        for e in 0..3 {
            stream.extend_from_slice(b"id: 1\ndata: ");
            stream.extend_from_slice(MARK);
            stream.extend_from_slice(format!("{e}:xxxx\n\n").as_bytes());
        }
        let shared = Arc::new(Shared {
            start: Instant::now(),
            events: 3,
            received_at: (0..3).map(|_| AtomicU64::new(0)).collect(),
            received: (0..3).map(|_| AtomicUsize::new(0)).collect(),
            closed: AtomicUsize::new(0),
        });
        // A reader that gets the bytes 5 at a time.
        let (mut tx, rx) = tokio::io::duplex(5);
        let task = tokio::spawn(reader(rx, 0, shared.clone()));
        tx.write_all(&stream).await.unwrap();
        drop(tx);
        task.await.unwrap();
        for e in 0..3 {
            assert_eq!(shared.received[e].load(Ordering::Relaxed), 1, "event {e}");
            assert!(shared.received_at[e].load(Ordering::Relaxed) > 0);
        }
        assert_eq!(shared.closed.load(Ordering::Relaxed), 1);
    }
}
