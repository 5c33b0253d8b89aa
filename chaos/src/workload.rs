//! The workload: writers publishing unique values with message ids, and subscribers resuming
//! with their cursors on any disconnect.
//!
//! **Writers** (half over RESP `HPUBLISH ... ID`, half over `POST /api/publish`) each publish
//! `{"w": writer, "s": seq, "t": ms}` at a steady rate, one publish in flight at a time, to the
//! channels in turn. Every value goes to a random node first (avoiding, for 5 s, a node where an
//! attempt just failed, as a client with failure detection would). An attempt that fails —
//! refused, timed out, or answered with an error — is retried with the same message id on
//! another node, with backoff, until it is acknowledged or the value's deadline passes. Each attempt is
//! classified: *ok* (acknowledged with a position), *failed* (certainly not committed: nothing
//! was sent, or herald said nothing was committed) or *unknown* (anything else).
//!
//! **Subscribers** (one per channel and protocol: SSE, WebSocket, RESP `HSUBSCRIBE`) start from
//! the beginning of the channel and, whenever their connection ends — the node died, was told it
//! has no quorum (`event: reconnect`, close code), or stayed silent past the idle timeout while
//! pinged every second — reconnect to a random other node with the cursor of the last event they
//! received. Every event, gap notice and connection is recorded with its time and node.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Result, anyhow, bail};
use eventsource_stream::Eventsource;
use futures::{SinkExt, StreamExt};
use rand::Rng;
use serde_json::{Value as Json, json};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::cursor::{Cursor, Position};
use crate::history::{
    Attempt, AttemptResult, Delivery, Episode, GapNotice, Outcome, Protocol, Publish, Recorder,
    ValueId,
};
use crate::resp;
use crate::target::NodeAddr;

/// Workload settings.
#[derive(Debug, Clone)]
pub struct WorkloadOptions {
    /// Writers (half RESP, half HTTP; at least one of each when two or more).
    pub writers: usize,
    /// Publishes per second of each writer.
    pub rate: f64,
    /// How long one attempt may take before its outcome is unknown.
    pub attempt_timeout: Duration,
    /// How long a value is retried before the writer gives up on it.
    pub value_deadline: Duration,
    /// A subscriber reconnects after this long without any sign of life from its node.
    pub idle_timeout: Duration,
    /// The nodes' password.
    pub password: Option<String>,
}

/// How long a writer avoids a node after an attempt on it failed.
const SUSPECT_FOR: Duration = Duration::from_secs(5);

/// `?last=` / `"last"` asked on a subscriber's first connection: everything retained.
const FROM_THE_START: u64 = 1_000_000_000;

/// Starts `options.writers` writers; they publish until `stop` is cancelled.
pub fn spawn_writers(
    options: &WorkloadOptions,
    nodes: &[NodeAddr],
    channels: &Arc<Vec<String>>,
    recorder: &Recorder,
    stop: &CancellationToken,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..options.writers)
        .map(|w| {
            let protocol = if w % 2 == 0 {
                Protocol::Resp
            } else {
                Protocol::Http
            };
            let writer = Writer {
                w: w as u32,
                protocol,
                nodes: nodes.to_vec(),
                channels: channels.clone(),
                recorder: recorder.clone(),
                options: options.clone(),
                resp: (0..nodes.len()).map(|_| None).collect(),
                suspect: vec![Instant::now(); nodes.len()],
                http: reqwest::Client::builder()
                    .timeout(options.attempt_timeout)
                    .connect_timeout(Duration::from_secs(2))
                    .build()
                    .expect("HTTP client"),
            };
            tokio::spawn(writer.run(stop.clone()))
        })
        .collect()
}

/// One writer.
struct Writer {
    w: u32,
    protocol: Protocol,
    nodes: Vec<NodeAddr>,
    channels: Arc<Vec<String>>,
    recorder: Recorder,
    options: WorkloadOptions,
    /// One RESP connection per node, opened on demand.
    resp: Vec<Option<resp::Connection>>,
    http: reqwest::Client,
    /// Per node: avoid it for new values until then (it just failed or timed out), as a
    /// client with failure detection would.
    suspect: Vec<Instant>,
}

impl Writer {
    async fn run(mut self, stop: CancellationToken) {
        let interval = Duration::from_secs_f64(1.0 / self.options.rate.max(0.001));
        let mut next = Instant::now();
        for s in 0u64.. {
            let now = Instant::now();
            if next > now {
                tokio::select! {
                    _ = tokio::time::sleep_until(next) => {}
                    _ = stop.cancelled() => break,
                }
            }
            if stop.is_cancelled() {
                break;
            }
            // No catching up in bursts after a stall.
            next = next.max(now) + interval;
            self.publish(ValueId { w: self.w, s }).await;
        }
    }

    async fn publish(&mut self, value: ValueId) {
        let channel = (value.w as usize + value.s as usize) % self.channels.len();
        let invoked = self.recorder.now();
        let payload = json!({ "w": value.w, "s": value.s, "t": invoked.round() as u64 });
        let deadline = Instant::now() + self.options.value_deadline;
        let mut node = self.pick(None);
        let mut attempts = Vec::new();
        let mut backoff = Duration::from_millis(50);
        loop {
            let start = self.recorder.now();
            let result = match self.protocol {
                Protocol::Http => self.publish_http(node, channel, &payload, value).await,
                _ => self.publish_resp(node, channel, &payload, value).await,
            };
            let end = self.recorder.now();
            let done = matches!(result, AttemptResult::Ok { .. });
            attempts.push(Attempt {
                node: self.nodes[node].id,
                start,
                end,
                result,
            });
            if done || Instant::now() + backoff > deadline {
                break;
            }
            self.suspect[node] = Instant::now() + SUSPECT_FOR;
            // Another node next time.
            node = self.pick(Some(node));
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
        let ack = attempts.iter().find_map(|a| match &a.result {
            AttemptResult::Ok { position, .. } => Some((*position, a.end)),
            _ => None,
        });
        let outcome = if ack.is_some() {
            Outcome::Ok
        } else if attempts
            .iter()
            .any(|a| matches!(a.result, AttemptResult::Unknown { .. }))
        {
            Outcome::Unknown
        } else {
            Outcome::Failed
        };
        self.recorder.publish(Publish {
            value,
            channel,
            protocol: self.protocol,
            attempts,
            outcome,
            position: ack.map(|(p, _)| p),
            invoked,
            acked: ack.map(|(_, t)| t),
        });
    }

    /// A random node other than `not`, preferring nodes that have not failed lately.
    fn pick(&self, not: Option<usize>) -> usize {
        let now = Instant::now();
        let candidates: Vec<usize> = (0..self.nodes.len())
            .filter(|&n| Some(n) != not || self.nodes.len() == 1)
            .collect();
        let healthy: Vec<usize> = candidates
            .iter()
            .copied()
            .filter(|&n| self.suspect[n] <= now)
            .collect();
        let pool = if healthy.is_empty() {
            &candidates
        } else {
            &healthy
        };
        pool[rand::rng().random_range(0..pool.len())]
    }

    async fn publish_http(
        &self,
        node: usize,
        channel: usize,
        payload: &Json,
        value: ValueId,
    ) -> AttemptResult {
        let body = json!({
            "channel": self.channels[channel],
            "data": payload,
            "messageId": value.message_id(),
        });
        let url = format!("http://{}/api/publish", self.nodes[node].http);
        let response = match self.http.post(url).json(&body).send().await {
            Ok(response) => response,
            Err(error) if error.is_connect() => {
                return AttemptResult::Failed {
                    error: format!("not sent: {error}"),
                };
            }
            Err(error) => {
                return AttemptResult::Unknown {
                    error: error_chain(&error),
                };
            }
        };
        let status = response.status();
        let text = match response.text().await {
            Ok(text) => text,
            Err(error) => {
                return AttemptResult::Unknown {
                    error: error_chain(&error),
                };
            }
        };
        if status.is_success() {
            let reply: Json = match serde_json::from_str(&text) {
                Ok(reply) => reply,
                Err(error) => {
                    return AttemptResult::Unknown {
                        error: format!("unparsable reply {text:?}: {error}"),
                    };
                }
            };
            match reply["position"].as_str().and_then(Position::parse) {
                Some(position) => AttemptResult::Ok {
                    position,
                    duplicate: reply["duplicate"] == true,
                },
                None => AttemptResult::Unknown {
                    error: format!("reply without a position: {text}"),
                },
            }
        } else {
            classify(format!("HTTP {}: {text}", status.as_u16()))
        }
    }

    async fn publish_resp(
        &mut self,
        node: usize,
        channel: usize,
        payload: &Json,
        value: ValueId,
    ) -> AttemptResult {
        let addr = self.nodes[node].resp;
        if self.resp[node].is_none() {
            match resp::Connection::connect(
                addr,
                Duration::from_secs(2),
                self.options.password.as_deref(),
            )
            .await
            {
                Ok(connection) => self.resp[node] = Some(connection),
                Err(error) => {
                    return AttemptResult::Failed {
                        error: format!("not sent: {error:#}"),
                    };
                }
            }
        }
        let connection = self.resp[node].as_mut().expect("connected");
        let payload = payload.to_string();
        let message_id = value.message_id();
        let args = [
            b"HPUBLISH".as_slice(),
            self.channels[channel].as_bytes(),
            payload.as_bytes(),
            b"ID",
            message_id.as_bytes(),
        ];
        let request = connection.request(&args);
        let reply = match tokio::time::timeout(self.options.attempt_timeout, request).await {
            Ok(Ok(reply)) => reply,
            Ok(Err(error)) => {
                self.resp[node] = None;
                return AttemptResult::Unknown {
                    error: format!("{error:#}"),
                };
            }
            Err(_) => {
                self.resp[node] = None;
                return AttemptResult::Unknown {
                    error: format!("no reply within {:?}", self.options.attempt_timeout),
                };
            }
        };
        match reply {
            resp::Value::Error(error) => classify(error),
            resp::Value::Array(Some(items)) if items.len() == 3 => {
                let position = items[0]
                    .text()
                    .and_then(|c| Cursor::decode(&c))
                    .and_then(|c| c.single());
                match position {
                    Some(position) => AttemptResult::Ok {
                        position,
                        duplicate: items[2] == resp::Value::Int(1),
                    },
                    None => AttemptResult::Unknown {
                        error: format!("reply without a cursor: {items:?}"),
                    },
                }
            }
            other => AttemptResult::Unknown {
                error: format!("unexpected reply {other:?}"),
            },
        }
    }
}

/// An error reply is a certain failure only when herald says nothing was committed.
fn classify(error: String) -> AttemptResult {
    let certain = error.contains("nothing was committed")
        || error.contains("not formed yet")
        || error.starts_with("HTTP 4");
    if certain {
        AttemptResult::Failed { error }
    } else {
        AttemptResult::Unknown { error }
    }
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Starts one subscriber per channel and protocol; they run until `stop` is cancelled.
pub fn spawn_subscribers(
    options: &WorkloadOptions,
    protocols: &[Protocol],
    nodes: &[NodeAddr],
    channels: &Arc<Vec<String>>,
    recorder: &Recorder,
    stop: &CancellationToken,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut handles = Vec::new();
    for channel in 0..channels.len() {
        for &protocol in protocols {
            let id = recorder.add_subscriber(protocol, channel);
            let subscriber = Subscriber {
                id,
                protocol,
                channel: channels[channel].clone(),
                nodes: nodes.to_vec(),
                recorder: recorder.clone(),
                options: options.clone(),
                cursor: None,
                conn: 0,
                http: reqwest::Client::builder()
                    .connect_timeout(Duration::from_secs(2))
                    .build()
                    .expect("HTTP client"),
            };
            handles.push(tokio::spawn(subscriber.run(stop.clone())));
        }
    }
    handles
}

/// One subscriber: one channel, one protocol, reconnecting with its cursor.
struct Subscriber {
    id: usize,
    protocol: Protocol,
    channel: String,
    nodes: Vec<NodeAddr>,
    recorder: Recorder,
    options: WorkloadOptions,
    /// The cursor of the last event received (`None`: nothing yet).
    cursor: Option<String>,
    conn: u32,
    http: reqwest::Client,
}

impl Subscriber {
    async fn run(mut self, stop: CancellationToken) {
        let mut node = (self.id + rand::rng().random_range(0..self.nodes.len())) % self.nodes.len();
        loop {
            let addr = self.nodes[node].clone();
            let resumed_from = self
                .cursor
                .as_deref()
                .and_then(Cursor::decode)
                .and_then(|c| c.single());
            let mut episode = Episode {
                sub: self.id,
                conn: self.conn,
                node: addr.id,
                start: self.recorder.now(),
                connected: None,
                first_event: None,
                end: None,
                reason: String::new(),
                resumed_from,
                events: 0,
            };
            let result = tokio::select! {
                result = self.connection(&addr, &mut episode) => result,
                _ = stop.cancelled() => Err(anyhow!("stopped")),
            };
            episode.end = Some(self.recorder.now());
            episode.reason = match result {
                Ok(()) => "ended".into(),
                Err(error) => format!("{error:#}"),
            };
            self.recorder.lock().episodes.push(episode);
            self.conn += 1;
            if stop.is_cancelled() {
                return;
            }
            let pause = rand::rng().random_range(50..250);
            tokio::time::sleep(Duration::from_millis(pause)).await;
            let others = self.nodes.len() - 1;
            node = (node + 1 + rand::rng().random_range(0..others.max(1))) % self.nodes.len();
        }
    }

    async fn connection(&mut self, node: &NodeAddr, episode: &mut Episode) -> Result<()> {
        match self.protocol {
            Protocol::Sse => self.sse(node, episode).await,
            Protocol::Ws => self.websocket(node, episode).await,
            _ => self.resp(node, episode).await,
        }
    }

    /// Records one received event and moves the cursor.
    fn event(&mut self, node: u64, episode: &mut Episode, cursor: &str, payload: &Json) {
        let t = self.recorder.now();
        let decoded = Cursor::decode(cursor);
        let position = decoded.as_ref().and_then(Cursor::single);
        let value = match (payload["w"].as_u64(), payload["s"].as_u64()) {
            (Some(w), Some(s)) => Some(ValueId { w: w as u32, s }),
            _ => None,
        };
        let raw = if value.is_none() {
            Some(payload.to_string())
        } else if position.is_none() {
            Some(format!("cursor {cursor}"))
        } else {
            None
        };
        self.recorder.deliver(Delivery {
            sub: self.id,
            conn: self.conn,
            node,
            t,
            position,
            epoch: decoded.map(|c| c.epoch),
            value,
            raw,
        });
        episode.events += 1;
        episode.first_event.get_or_insert(t);
        self.cursor = Some(cursor.to_string());
    }

    fn gap(&self, node: u64, notice: &Json) {
        let text = |v: &Json| v.as_str().map(str::to_string);
        self.recorder.lock().gaps.push(GapNotice {
            sub: self.id,
            conn: self.conn,
            node,
            t: self.recorder.now(),
            requested: text(&notice["requested"]),
            oldest: text(&notice["oldest"]),
            reason: notice["reason"].as_str().unwrap_or("?").to_string(),
        });
    }

    async fn sse(&mut self, node: &NodeAddr, episode: &mut Episode) -> Result<()> {
        let mut url = format!("http://{}/api/stream/{}", node.http, self.channel);
        let mut request = self.http.get(&url);
        match &self.cursor {
            Some(cursor) => request = request.header("Last-Event-ID", cursor),
            None => {
                url.push_str(&format!("?last={FROM_THE_START}"));
                request = self.http.get(&url);
            }
        }
        let response = tokio::time::timeout(Duration::from_secs(3), request.send())
            .await
            .map_err(|_| anyhow!("no response within 3 s"))??;
        if !response.status().is_success() {
            let status = response.status();
            let text = response.text().await.unwrap_or_default();
            bail!("HTTP {status}: {text}");
        }
        episode.connected = Some(self.recorder.now());
        let activity = Arc::new(AtomicU64::new(0));
        let clock = self.recorder.clock;
        let seen = activity.clone();
        let mut events = response
            .bytes_stream()
            .inspect(move |_| seen.store(clock.now() as u64, Ordering::Relaxed))
            .eventsource();
        activity.store(clock.now() as u64, Ordering::Relaxed);
        let idle = self.options.idle_timeout.as_millis() as u64;
        loop {
            tokio::select! {
                next = events.next() => match next {
                    None => bail!("stream ended"),
                    Some(Err(error)) => bail!("stream broke: {error}"),
                    Some(Ok(event)) => match event.event.as_str() {
                        "message" => {
                            let payload: Json = serde_json::from_str(&event.data)
                                .unwrap_or(Json::String(event.data.clone()));
                            self.event(node.id, episode, &event.id, &payload);
                        }
                        "gap" => {
                            let notice: Json = serde_json::from_str(&event.data).unwrap_or_default();
                            self.gap(node.id, &notice);
                        }
                        "reconnect" => bail!("event: reconnect"),
                        _ => {}
                    },
                },
                _ = tokio::time::sleep(Duration::from_millis(250)) => {
                    if clock.now() as u64 > activity.load(Ordering::Relaxed) + idle {
                        bail!("idle for {idle} ms");
                    }
                }
            }
        }
    }

    async fn websocket(&mut self, node: &NodeAddr, episode: &mut Episode) -> Result<()> {
        let url = format!("ws://{}/ws?userId=chaos-{}", node.http, self.id);
        let (socket, _) = tokio::time::timeout(
            Duration::from_secs(3),
            tokio_tungstenite::connect_async(url),
        )
        .await
        .map_err(|_| anyhow!("no handshake within 3 s"))??;
        let (mut sink, mut stream) = socket.split();
        let subscribe = match &self.cursor {
            Some(cursor) => {
                json!({ "type": "subscribe", "channel": self.channel, "cursor": cursor })
            }
            None => json!({ "type": "subscribe", "channel": self.channel, "last": FROM_THE_START }),
        };
        sink.send(Message::text(subscribe.to_string())).await?;
        let idle = self.options.idle_timeout;
        let mut last = Instant::now();
        let mut ping = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                next = stream.next() => {
                    let message = match next {
                        None => bail!("connection ended"),
                        Some(Err(error)) => bail!("connection broke: {error}"),
                        Some(Ok(message)) => message,
                    };
                    last = Instant::now();
                    let text = match message {
                        Message::Text(text) => text,
                        Message::Close(frame) => bail!(
                            "closed: {}",
                            frame.map_or("no reason".to_string(), |f| format!("{} {}", f.code, f.reason))
                        ),
                        _ => continue,
                    };
                    let value: Json = serde_json::from_str(&text).unwrap_or_default();
                    match value["type"].as_str() {
                        Some("subscribed") => {
                            episode.connected.get_or_insert(self.recorder.now());
                        }
                        Some("gap") => self.gap(node.id, &value),
                        Some("error") => bail!("error message: {}", value["message"]),
                        Some("connected" | "heartbeat" | "pong" | "unsubscribed") => {}
                        _ => match value["id"].as_str() {
                            Some(cursor) => {
                                let cursor = cursor.to_string();
                                self.event(node.id, episode, &cursor, &value);
                            }
                            None => bail!("unexpected message {text}"),
                        },
                    }
                }
                _ = ping.tick() => {
                    if last.elapsed() > idle {
                        bail!("idle for {idle:?}");
                    }
                    sink.send(Message::text(r#"{"type":"ping"}"#)).await?;
                }
            }
        }
    }

    async fn resp(&mut self, node: &NodeAddr, episode: &mut Episode) -> Result<()> {
        let connection = resp::Connection::connect(
            node.resp,
            Duration::from_secs(3),
            self.options.password.as_deref(),
        )
        .await?;
        let (mut reader, mut writer) = connection.into_split();
        let from = self.cursor.clone().unwrap_or_else(|| "0".to_string());
        writer
            .send(&[b"HSUBSCRIBE", from.as_bytes(), self.channel.as_bytes()])
            .await?;
        // Pings from their own task: an abandoned read would corrupt the stream.
        let pinger = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                if writer.send(&[b"PING"]).await.is_err() {
                    return;
                }
            }
        });
        let _stop_pinger = AbortOnDrop(pinger);
        let idle = self.options.idle_timeout;
        loop {
            let value = match tokio::time::timeout(idle, reader.read()).await {
                Err(_) => bail!("idle for {idle:?}"),
                Ok(Err(error)) => bail!("connection broke: {error:#}"),
                Ok(Ok(value)) => value,
            };
            if let resp::Value::Error(error) = &value {
                bail!("error reply: {error}");
            }
            let Some(items) = value.items() else {
                continue;
            };
            let kind = items
                .first()
                .and_then(resp::Value::text)
                .unwrap_or_default();
            match kind.as_str() {
                "hsubscribe" => {
                    episode.connected.get_or_insert(self.recorder.now());
                }
                "hmessage" if items.len() == 4 => {
                    let cursor = items[2].text().unwrap_or_default();
                    let payload = items[3]
                        .bytes()
                        .and_then(|b| serde_json::from_slice(b).ok())
                        .unwrap_or_else(|| Json::String(items[3].text().unwrap_or_default()));
                    self.event(node.id, episode, &cursor, &payload);
                }
                "hgap" if items.len() == 5 => {
                    let notice = json!({
                        "requested": items[2].text(),
                        "oldest": items[3].text(),
                        "reason": items[4].text(),
                    });
                    self.gap(node.id, &notice);
                }
                _ => {}
            }
        }
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
