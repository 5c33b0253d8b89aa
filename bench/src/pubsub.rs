//! The pub/sub scenario: S subscriber connections, P pipelined publisher connections, a warmup,
//! a measured window and a drain, then one [`RunResult`].
//!
//! Every payload starts with a 16-byte header: the send time (nanoseconds since the run's
//! common [`Instant`], u64 little-endian), the publisher id (u32 LE) and the message's sequence
//! number on its (publisher, channel) pair (u32 LE). Subscribers use the send time for latency
//! and the measurement window, and the sequence numbers to spot lost or reordered messages.
//! Figures count the messages *sent* inside the window, wherever they are delivered.

use crate::report::RunResult;
use crate::resp::{Push, Reply, parse_push, parse_reply};
use anyhow::{Context, bail, ensure};
use hdrhistogram::Histogram;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Size of the timestamp/id/sequence header at the start of every payload.
pub const HEADER_LEN: usize = 16;
/// Read buffer of each subscriber connection.
const SUB_BUFFER: usize = 256 * 1024;
/// Read buffer of each publisher connection (replies are a few bytes each).
const PUB_BUFFER: usize = 64 * 1024;
/// Largest latency the histograms track, in microseconds (larger values are clamped).
const MAX_LATENCY_US: u64 = 60_000_000;
/// Time allowed to connect and subscribe.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long publishers may overrun the end of the run (a stalled server) before being aborted.
const PUBLISHER_GRACE: Duration = Duration::from_secs(10);

/// One pub/sub benchmark run.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// Name of the server in reports.
    pub label: String,
    /// Address of the server, `host:port`.
    pub addr: String,
    /// Publisher connections.
    pub publishers: usize,
    /// Subscriber connections.
    pub subscribers: usize,
    /// Channels; subscriber j listens on `j % channels`.
    pub channels: usize,
    /// Payload size in bytes, at least [`HEADER_LEN`].
    pub payload: usize,
    /// PUBLISH commands in flight per publisher.
    pub pipeline: usize,
    /// Cap on published messages per second over all publishers.
    pub rate: Option<u64>,
    /// Measured window.
    pub duration: Duration,
    /// Unmeasured publishing before the window.
    pub warmup: Duration,
    /// Most time to wait for late deliveries after publishing stops.
    pub drain: Duration,
}

impl Scenario {
    /// Subscribers listening on each channel.
    pub fn subscribers_per_channel(&self) -> Vec<u64> {
        let mut counts = vec![0u64; self.channels];
        for j in 0..self.subscribers {
            counts[j % self.channels] += 1;
        }
        counts
    }

    fn validate(&self) -> anyhow::Result<()> {
        ensure!(
            self.payload >= HEADER_LEN,
            "--payload must be at least {HEADER_LEN} bytes"
        );
        ensure!(self.publishers >= 1, "--publishers must be at least 1");
        ensure!(self.channels >= 1, "--channels must be at least 1");
        ensure!(self.pipeline >= 1, "--pipeline must be at least 1");
        ensure!(self.rate != Some(0), "--rate must be positive");
        ensure!(!self.duration.is_zero(), "--duration must be positive");
        ensure!(self.publishers <= u32::MAX as usize, "too many publishers");
        Ok(())
    }
}

/// Nanoseconds since a common start, shared by publishers and subscribers of a run.
#[derive(Debug, Clone, Copy)]
struct Clock(Instant);

impl Clock {
    #[inline]
    fn now(self) -> u64 {
        self.0.elapsed().as_nanos() as u64
    }

    fn instant(self, ns: u64) -> tokio::time::Instant {
        tokio::time::Instant::from_std(self.0 + Duration::from_nanos(ns))
    }
}

/// Timeline of a run, in [`Clock`] nanoseconds.
#[derive(Debug, Clone, Copy)]
struct Window {
    /// Measurement starts (after the warmup).
    measure_start: u64,
    /// Measurement and publishing stop.
    measure_end: u64,
}

impl Window {
    #[inline]
    fn contains(&self, ns: u64) -> bool {
        ns >= self.measure_start && ns < self.measure_end
    }
}

/// Writes the payload header.
#[inline]
fn encode_header(out: &mut [u8], sent_ns: u64, publisher: u32, seq: u32) {
    out[0..8].copy_from_slice(&sent_ns.to_le_bytes());
    out[8..12].copy_from_slice(&publisher.to_le_bytes());
    out[12..16].copy_from_slice(&seq.to_le_bytes());
}

/// Reads the payload header: send time, publisher id, sequence number.
#[inline]
fn decode_header(payload: &[u8]) -> Option<(u64, u32, u32)> {
    let header: &[u8; HEADER_LEN] = payload.get(..HEADER_LEN)?.try_into().ok()?;
    let sent = u64::from_le_bytes(header[0..8].try_into().ok()?);
    let publisher = u32::from_le_bytes(header[8..12].try_into().ok()?);
    let seq = u32::from_le_bytes(header[12..16].try_into().ok()?);
    Some((sent, publisher, seq))
}

fn channel_name(channel: usize) -> String {
    format!("bench:{channel}")
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

async fn connect(addr: &str) -> anyhow::Result<TcpStream> {
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
        .await
        .with_context(|| format!("connecting to {addr} timed out"))?
        .with_context(|| format!("cannot connect to {addr}"))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// A subscriber connection whose subscription is confirmed, with any bytes read past the
/// confirmation.
struct SubConn {
    stream: TcpStream,
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

async fn subscribe(addr: String, channel: usize, buffer: usize) -> anyhow::Result<SubConn> {
    let mut stream = connect(&addr).await?;
    let name = channel_name(channel);
    stream
        .write_all(&command(&[b"SUBSCRIBE", name.as_bytes()]))
        .await?;
    let mut buf = vec![0u8; buffer];
    let mut end = 0;
    let deadline = tokio::time::Instant::now() + CONNECT_TIMEOUT;
    loop {
        let n = tokio::time::timeout_at(deadline, stream.read(&mut buf[end..]))
            .await
            .context("no SUBSCRIBE confirmation")??;
        ensure!(n > 0, "connection closed before the SUBSCRIBE confirmation");
        end += n;
        let mut start = 0;
        while let Some((push, used)) = parse_push(&buf[start..end])? {
            start += used;
            match push {
                Push::Other { kind, .. } if kind.eq_ignore_ascii_case(b"subscribe") => {
                    return Ok(SubConn {
                        stream,
                        buf,
                        start,
                        end,
                    });
                }
                Push::Error(e) => bail!("SUBSCRIBE failed: {}", String::from_utf8_lossy(e)),
                _ => {}
            }
        }
        buf.copy_within(start..end, 0);
        end -= start;
        ensure!(end < buf.len(), "SUBSCRIBE confirmation too long");
    }
}

/// What a subscriber shares with the coordinator while running.
#[derive(Debug, Default)]
struct SubProgress {
    /// Messages received so far (warmup included).
    received: AtomicU64,
    /// The connection ended (closed by the server or failed).
    closed: AtomicBool,
}

/// What a subscriber measured.
#[derive(Debug)]
struct SubStats {
    /// Latencies (µs) of messages sent inside the window.
    hist: Histogram<u64>,
    /// Messages sent inside the window and delivered.
    delivered: u64,
    /// Messages missing between delivered ones (sequence gaps).
    lost: u64,
    /// Messages that arrived with an older sequence number than one already seen.
    reordered: u64,
    /// Messages without a valid header (someone else publishing on `bench:*`).
    foreign: u64,
    /// Longest time between two reads inside the window, in ns.
    max_gap_ns: u64,
    /// Why the connection ended early, with the time (Clock ns).
    closed: Option<(u64, String)>,
}

struct SubCtx {
    clock: Clock,
    window: Window,
    publishers: usize,
    progress: Arc<SubProgress>,
}

async fn subscriber(conn: SubConn, ctx: SubCtx, mut stop: oneshot::Receiver<()>) -> SubStats {
    let SubConn {
        mut stream,
        mut buf,
        mut start,
        mut end,
    } = conn;
    let mut stats = SubStats {
        hist: Histogram::new_with_max(MAX_LATENCY_US, 3).expect("histogram bounds"),
        delivered: 0,
        lost: 0,
        reordered: 0,
        foreign: 0,
        max_gap_ns: 0,
        closed: None,
    };
    let window = ctx.window;
    // Next expected sequence number per publisher (this subscriber sees one channel).
    let mut next_seq = vec![0u32; ctx.publishers];
    let mut last_read = 0u64;
    // Keep at least this much room to read into before compacting the buffer.
    let min_room = (buf.len() / 4).max(16 * 1024);
    loop {
        if end == buf.len() {
            if start > 0 {
                buf.copy_within(start..end, 0);
                end -= start;
                start = 0;
            } else {
                // One frame larger than the buffer.
                buf.resize(buf.len() * 2, 0);
            }
        }
        let read = tokio::select! {
            biased;
            _ = &mut stop => break,
            read = stream.read(&mut buf[end..]) => read,
        };
        let now = ctx.clock.now();
        match read {
            Ok(0) => {
                stats.closed = Some((now, "closed by the server".to_owned()));
                break;
            }
            Ok(n) => end += n,
            Err(e) => {
                stats.closed = Some((now, e.to_string()));
                break;
            }
        }
        if last_read >= window.measure_start && now <= window.measure_end {
            stats.max_gap_ns = stats.max_gap_ns.max(now - last_read);
        }
        last_read = now;

        let mut received = 0u64;
        loop {
            match parse_push(&buf[start..end]) {
                Ok(Some((push, used))) => {
                    start += used;
                    let Push::Message { payload, .. } = push else {
                        continue;
                    };
                    received += 1;
                    let Some((sent, publisher, seq)) = decode_header(payload) else {
                        stats.foreign += 1;
                        continue;
                    };
                    let Some(next) = next_seq.get_mut(publisher as usize) else {
                        stats.foreign += 1;
                        continue;
                    };
                    if seq >= *next {
                        stats.lost += u64::from(seq - *next);
                        *next = seq + 1;
                    } else {
                        stats.reordered += 1;
                    }
                    if window.contains(sent) {
                        stats.delivered += 1;
                        stats
                            .hist
                            .saturating_record(now.saturating_sub(sent) / 1000);
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    stats.closed = Some((now, e.to_string()));
                    ctx.progress.received.fetch_add(received, Ordering::Relaxed);
                    ctx.progress.closed.store(true, Ordering::Relaxed);
                    return stats;
                }
            }
        }
        ctx.progress.received.fetch_add(received, Ordering::Relaxed);
        if start == end {
            start = 0;
            end = 0;
        } else if buf.len() - end < min_room {
            buf.copy_within(start..end, 0);
            end -= start;
            start = 0;
        }
    }
    ctx.progress.closed.store(true, Ordering::Relaxed);
    stats
}

/// Shared pacing of all publishers under `--rate`: message k is due `k / rate` seconds after
/// the start, so publishers that fall behind catch up instead of lowering the rate.
#[derive(Debug)]
struct Pacer {
    rate: u64,
    start: u64,
    claimed: AtomicU64,
}

impl Pacer {
    /// Claims `n` messages; returns when (Clock ns) the first of them is due.
    fn claim(&self, n: u64) -> u64 {
        let k = self.claimed.fetch_add(n, Ordering::Relaxed);
        self.start + (u128::from(k) * 1_000_000_000 / u128::from(self.rate)) as u64
    }
}

/// A pre-encoded `PUBLISH bench:<c> <payload>` whose header is patched per message.
struct Template {
    bytes: Vec<u8>,
    header_at: usize,
}

fn publish_template(channel: usize, payload: usize) -> Template {
    let name = channel_name(channel);
    let mut bytes = format!(
        "*3\r\n$7\r\nPUBLISH\r\n${}\r\n{name}\r\n${payload}\r\n",
        name.len()
    )
    .into_bytes();
    let header_at = bytes.len();
    bytes.resize(header_at + payload, b'x');
    bytes.extend_from_slice(b"\r\n");
    Template { bytes, header_at }
}

/// What a publisher did.
#[derive(Debug, Default)]
struct PubStats {
    /// Messages published per channel, warmup included.
    total: Vec<u64>,
    /// Messages published per channel inside the window.
    in_window: Vec<u64>,
    /// Why it stopped early.
    error: Option<String>,
}

struct PubCtx {
    id: u32,
    clock: Clock,
    window: Window,
    channels: usize,
    payload: usize,
    pipeline: usize,
    pacer: Option<Arc<Pacer>>,
    /// Messages per paced batch.
    paced_batch: usize,
}

async fn publisher(mut stream: TcpStream, ctx: PubCtx) -> PubStats {
    let mut stats = PubStats {
        total: vec![0; ctx.channels],
        in_window: vec![0; ctx.channels],
        error: None,
    };
    if let Err(e) = publish_loop(&mut stream, &ctx, &mut stats).await {
        stats.error = Some(format!("publisher {}: {e:#}", ctx.id));
    }
    stats
}

async fn publish_loop(
    stream: &mut TcpStream,
    ctx: &PubCtx,
    stats: &mut PubStats,
) -> anyhow::Result<()> {
    let templates: Vec<Template> = (0..ctx.channels)
        .map(|c| publish_template(c, ctx.payload))
        .collect();
    let mut batch = Vec::with_capacity(ctx.pipeline * templates[0].bytes.len());
    let mut replies = vec![0u8; PUB_BUFFER];
    let (mut rstart, mut rend) = (0usize, 0usize);
    let mut seq = vec![0u32; ctx.channels];
    let mut channel = ctx.id as usize % ctx.channels;
    let window = ctx.window;
    loop {
        let mut n = ctx.pipeline;
        if let Some(pacer) = &ctx.pacer {
            n = ctx.paced_batch;
            let due = pacer.claim(n as u64);
            if due >= window.measure_end {
                break;
            }
            if due > ctx.clock.now() {
                tokio::time::sleep_until(ctx.clock.instant(due)).await;
            }
        }
        let sent = ctx.clock.now();
        if sent >= window.measure_end {
            break;
        }
        let in_window = window.contains(sent);
        batch.clear();
        for _ in 0..n {
            let template = &templates[channel];
            let at = batch.len() + template.header_at;
            batch.extend_from_slice(&template.bytes);
            encode_header(&mut batch[at..at + HEADER_LEN], sent, ctx.id, seq[channel]);
            seq[channel] = seq[channel].wrapping_add(1);
            stats.total[channel] += 1;
            if in_window {
                stats.in_window[channel] += 1;
            }
            channel += 1;
            if channel == ctx.channels {
                channel = 0;
            }
        }
        stream.write_all(&batch).await.context("sending PUBLISH")?;
        let mut pending = n;
        while pending > 0 {
            match parse_reply(&replies[rstart..rend])? {
                Some((Reply::Int(_), used)) => {
                    rstart += used;
                    pending -= 1;
                }
                Some((Reply::Error(e), _)) => {
                    bail!("PUBLISH failed: {}", String::from_utf8_lossy(e))
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
                    ensure!(read > 0, "connection closed by the server");
                    rend += read;
                }
            }
        }
    }
    Ok(())
}

/// Runs one scenario and measures it.
pub async fn run(scenario: &Scenario) -> anyhow::Result<RunResult> {
    scenario.validate()?;
    let s = scenario;
    let frame_len = s.payload + 64;
    let sub_buffer = SUB_BUFFER.max(frame_len * 4);

    // Subscribers first, each confirmed, so nothing published is missed.
    let connect_started = Instant::now();
    let mut pending: Vec<JoinHandle<anyhow::Result<SubConn>>> = Vec::with_capacity(s.subscribers);
    for j in 0..s.subscribers {
        pending.push(tokio::spawn(subscribe(
            s.addr.clone(),
            j % s.channels,
            sub_buffer,
        )));
    }
    let mut conns = Vec::with_capacity(s.subscribers);
    for (j, handle) in pending.into_iter().enumerate() {
        conns.push(handle.await?.with_context(|| format!("subscriber {j}"))?);
    }
    let mut pub_streams = Vec::with_capacity(s.publishers);
    for _ in 0..s.publishers {
        pub_streams.push(connect(&s.addr).await?);
    }
    let setup = connect_started.elapsed();

    let clock = Clock(Instant::now());
    let start = clock.now() + 1_000_000;
    let measure_start = start + s.warmup.as_nanos() as u64;
    let window = Window {
        measure_start,
        measure_end: measure_start + s.duration.as_nanos() as u64,
    };

    let mut subs = Vec::with_capacity(s.subscribers);
    for conn in conns {
        let progress = Arc::new(SubProgress::default());
        let (stop_tx, stop_rx) = oneshot::channel();
        let ctx = SubCtx {
            clock,
            window,
            publishers: s.publishers,
            progress: progress.clone(),
        };
        subs.push((
            tokio::spawn(subscriber(conn, ctx, stop_rx)),
            stop_tx,
            progress,
        ));
    }

    let pacer = s.rate.map(|rate| {
        Arc::new(Pacer {
            rate,
            start,
            claimed: AtomicU64::new(0),
        })
    });
    // Paced publishers send about one batch per millisecond each.
    let paced_batch = s
        .rate
        .map_or(s.pipeline, |rate| {
            (rate / 1000 / s.publishers as u64) as usize
        })
        .clamp(1, s.pipeline);
    let mut pubs = Vec::with_capacity(s.publishers);
    tokio::time::sleep_until(clock.instant(start)).await;
    for (id, stream) in pub_streams.into_iter().enumerate() {
        let ctx = PubCtx {
            id: id as u32,
            clock,
            window,
            channels: s.channels,
            payload: s.payload,
            pipeline: s.pipeline,
            pacer: pacer.clone(),
            paced_batch,
        };
        pubs.push(tokio::spawn(publisher(stream, ctx)));
    }

    let mut errors = Vec::new();
    let mut total = vec![0u64; s.channels];
    let mut published_per_channel = vec![0u64; s.channels];
    let give_up = clock.instant(window.measure_end) + PUBLISHER_GRACE;
    for handle in pubs {
        let abort = handle.abort_handle();
        match tokio::time::timeout_at(give_up, handle).await {
            Ok(joined) => {
                let stats = joined?;
                for c in 0..s.channels {
                    total[c] += stats.total[c];
                    published_per_channel[c] += stats.in_window[c];
                }
                errors.extend(stats.error);
            }
            Err(_) => {
                abort.abort();
                errors.push("a publisher stalled past the end of the run; aborted".to_owned());
            }
        }
    }
    let publish_end = clock.now();

    // Drain: wait until every live subscriber got everything published on its channel.
    let drain_deadline = clock.instant(publish_end) + s.drain;
    loop {
        let done = subs.iter().enumerate().all(|(j, (_, _, progress))| {
            progress.closed.load(Ordering::Relaxed)
                || progress.received.load(Ordering::Relaxed) >= total[j % s.channels]
        });
        if done || tokio::time::Instant::now() >= drain_deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let drained = Duration::from_nanos(clock.now().saturating_sub(publish_end));

    let mut hist = Histogram::<u64>::new_with_max(MAX_LATENCY_US, 3)?;
    let (mut delivered, mut lost, mut reordered, mut foreign, mut max_gap_ns) = (0, 0, 0, 0, 0);
    let mut disconnected = Vec::new();
    let mut undrained = 0usize;
    for (j, (handle, stop, progress)) in subs.into_iter().enumerate() {
        let _ = stop.send(());
        let stats = handle.await?;
        hist.add(&stats.hist)?;
        delivered += stats.delivered;
        lost += stats.lost;
        reordered += stats.reordered;
        foreign += stats.foreign;
        max_gap_ns = max_gap_ns.max(stats.max_gap_ns);
        if let Some((at, why)) = stats.closed {
            let at = at as f64 / 1e9 - start as f64 / 1e9;
            disconnected.push(format!("subscriber {j} at {at:.2}s: {why}"));
        } else if progress.received.load(Ordering::Relaxed) < total[j % s.channels] {
            undrained += 1;
        }
    }

    let expected = published_per_channel
        .iter()
        .zip(s.subscribers_per_channel())
        .map(|(published, subscribers)| published * subscribers)
        .sum();
    Ok(RunResult {
        scenario: s.clone(),
        published: published_per_channel.iter().sum(),
        expected,
        delivered,
        hist,
        lost,
        reordered,
        foreign,
        max_gap: Duration::from_nanos(max_gap_ns),
        setup,
        drained,
        undrained,
        disconnected,
        errors,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips() {
        let mut payload = [b'x'; 20];
        encode_header(&mut payload, 123_456_789_012, 7, 42);
        assert_eq!(decode_header(&payload), Some((123_456_789_012, 7, 42)));
        assert_eq!(&payload[16..], b"xxxx");
        assert_eq!(decode_header(&payload[..15]), None);
    }

    #[test]
    fn publish_template_is_a_publish_command() {
        let t = publish_template(3, 20);
        let text = String::from_utf8(t.bytes.clone()).unwrap();
        assert_eq!(
            text,
            format!(
                "*3\r\n$7\r\nPUBLISH\r\n$7\r\nbench:3\r\n$20\r\n{}\r\n",
                "x".repeat(20)
            )
        );
        assert_eq!(&t.bytes[t.header_at..t.header_at + 20], &[b'x'; 20]);
    }

    #[test]
    fn subscribers_spread_over_channels() {
        let s = Scenario {
            label: String::new(),
            addr: String::new(),
            publishers: 1,
            subscribers: 5,
            channels: 3,
            payload: 16,
            pipeline: 1,
            rate: None,
            duration: Duration::from_secs(1),
            warmup: Duration::ZERO,
            drain: Duration::ZERO,
        };
        assert_eq!(s.subscribers_per_channel(), vec![2, 2, 1]);
        assert!(Scenario { payload: 15, ..s }.validate().is_err());
    }

    #[test]
    fn pacer_spaces_messages() {
        let pacer = Pacer {
            rate: 1000,
            start: 5,
            claimed: AtomicU64::new(0),
        };
        assert_eq!(pacer.claim(10), 5);
        assert_eq!(pacer.claim(10), 5 + 10_000_000);
    }
}
