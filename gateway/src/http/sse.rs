//! Server-Sent Events: `GET /api/stream/{channel}`, `GET /api/stream?channel=a&channel=b`, and
//! the seed's endpoints mapped onto channels.
//!
//! | endpoint | channel streamed |
//! |---|---|
//! | `/api/stream/render-progress/{jobId}` | `render_progress:{jobId}` |
//! | `/api/stream/campaign-metrics/{campaignId}` | `campaign_metrics:{campaignId}` |
//! | `/api/stream/ab-test-results/{testId}` | `ab_test_results:{testId}` |
//! | `/api/stream/council-score?videoUrl=&transcript=&features=` | publishes a request on `council_score_requests`, streams `council_score:{requestId}` |
//! | `/api/stream/evaluate-creative?content=&type=` | publishes a request on `creative_evaluation_requests`, streams `creative_evaluation:{requestId}` |
//!
//! `/api/stream/render-progress` (and the other two) without an id is a 400 that says the id is
//! missing: a channel of exactly that name streams at `/api/stream?channel=render-progress`.
//! A channel listed more than once in `?channel=` (as written or once decoded) is streamed once.
//! A `HEAD` to any of these routes is checked as a `GET` is and gets the same response head,
//! but subscribes to nothing and publishes nothing (`HEAD` is a safe method).
//!
//! Every event of a durable channel carries `id: <cursor>`, and so does the stream's first
//! block (with `retry:`, and no event: `EventSource` dispatches nothing for it but keeps the
//! id), so a client that drops before its first event resumes from where it opened rather than
//! live-only. A client that reconnects with
//! `Last-Event-ID` (or `?lastEventId=` for polyfills) gets everything retained after it, then
//! live events, with no gap and no duplicate; `?last=N` replays the last N events on a first
//! connect. A cursor older than retention, from another epoch, or ahead of what a single node
//! has, first gets an `event: gap` naming the requested and oldest available positions. A
//! malformed cursor is a 400. An empty `last` or cursor is as if not given; `last`,
//! `lastEventId` and every parameter of the request endpoints take one value, and one given
//! twice is a 400; so is a `Last-Event-ID` header given twice with different values.
//!
//! `council-score` and `evaluate-creative` take an optional `requestId` of the client's
//! (1-64 of `A-Z a-z 0-9 _ -`): the stream is then `{replies}:{requestId}`, and a reconnect to
//! the same URL with `Last-Event-ID` (what `EventSource` does after a network blip) resumes
//! that request instead of publishing another. A connect without a cursor replays the whole
//! reply channel (a reconnect before the first answer loses nothing) and publishes the request
//! with its id as message id, so a repeat within the dedup window commits once. Without a
//! `requestId`, herald picks a fresh id on every connect, so a reconnect starts a new request.

use super::{ClientGuard, HttpState, StreamClient, error_response};
use crate::broker::Broker;
use crate::hub::Format;
use crate::hub::encode::put_json_string;
use crate::reconnect::ReconnectWatch;
use crate::stream::{Emit, EventStream, Gap, Start, position_text};
use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::Response;
use bytes::{BufMut, Bytes, BytesMut};
use herald_storage::StorageError;
use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

/// `GET /api/stream/{channel}`.
pub async fn stream_channel(
    State(state): State<HttpState>,
    method: Method,
    Path(channel): Path<String>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    // `/api/stream/render-progress` without its id would stream a channel of that name,
    // which nothing publishes to: a client that lost its id would wait forever.
    if let Some(missing) = missing_id(&channel) {
        return missing;
    }
    open(
        state,
        vec![Bytes::from(channel)],
        &headers,
        query.as_deref(),
        method == Method::HEAD,
    )
    .await
}

/// The 400 of a stream endpoint asked for without its id (`/api/stream/render-progress`, or
/// `/api/stream/render-progress/` from a client whose id was empty), if `endpoint` is one.
pub(crate) fn missing_id(endpoint: &str) -> Option<Response> {
    let (endpoint, namespace) = ENTITY_STREAMS.iter().find(|(name, _)| *name == endpoint)?;
    Some(error_response(
        StatusCode::BAD_REQUEST,
        format!(
            "/api/stream/{endpoint} needs an id: /api/stream/{endpoint}/{{id}} streams channel {namespace}:{{id}} (a channel named '{endpoint}' streams at /api/stream?channel={endpoint})"
        ),
    ))
}

/// The last event of every stream when the node shuts down.
const SHUTDOWN_EVENT: &[u8] = b"event: reconnect\ndata: {\"type\":\"reconnect\",\"reason\":\"this node is shutting down; reconnect with your Last-Event-ID\"}\n\n";

/// `GET /api/stream?channel=a&channel=b`: each channel once, however often it is listed.
pub async fn stream_query(
    State(state): State<HttpState>,
    method: Method,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    let params = match params(query.as_deref()) {
        Ok(params) => params,
        Err(reason) => return error_response(StatusCode::BAD_REQUEST, reason),
    };
    // Each channel once, in first-seen order, compared as decoded (`a%2Fb` is `a/b`): a copy
    // would replay every retained event twice and count toward the channel limit.
    let mut seen = HashSet::new();
    let channels: Vec<Bytes> = params
        .iter()
        .filter(|(k, _)| k == "channel")
        .map(|(_, v)| v.as_str())
        .filter(|channel| seen.insert(*channel))
        .map(|channel| Bytes::copy_from_slice(channel.as_bytes()))
        .collect();
    if channels.is_empty() {
        return error_response(
            StatusCode::BAD_REQUEST,
            "no channel given: use /api/stream/{channel} or ?channel=a&channel=b",
        );
    }
    if channels.iter().any(|c| c.is_empty()) {
        return error_response(
            StatusCode::BAD_REQUEST,
            "empty channel name: every ?channel= needs a name",
        );
    }
    open(
        state,
        channels,
        &headers,
        query.as_deref(),
        method == Method::HEAD,
    )
    .await
}

/// The seed's per-entity endpoints and the channel namespace each maps to.
const ENTITY_STREAMS: &[(&str, &str)] = &[
    ("render-progress", "render_progress"),
    ("campaign-metrics", "campaign_metrics"),
    ("ab-test-results", "ab_test_results"),
];

/// `GET /api/stream/{render-progress|campaign-metrics|ab-test-results}/{id}`.
pub async fn entity_stream(
    State(state): State<HttpState>,
    method: Method,
    Path((endpoint, id)): Path<(String, String)>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    match ENTITY_STREAMS.iter().find(|(name, _)| *name == endpoint) {
        Some((_, namespace)) => {
            open(
                state,
                vec![Bytes::from(format!("{namespace}:{id}"))],
                &headers,
                query.as_deref(),
                method == Method::HEAD,
            )
            .await
        }
        None => error_response(
            StatusCode::NOT_FOUND,
            format!(
                "no stream endpoint '{endpoint}': use render-progress, campaign-metrics, ab-test-results, or /api/stream/{{channel}} (a '/' in a channel name is sent as %2F)"
            ),
        ),
    }
}

/// `GET /api/stream/council-score?videoUrl=&transcript=&features=`.
pub async fn council_score(
    State(state): State<HttpState>,
    method: Method,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    request_stream(
        state,
        "council_score_requests",
        "council_score",
        &headers,
        query.as_deref(),
        method == Method::HEAD,
    )
    .await
}

/// `GET /api/stream/evaluate-creative?content=&type=`.
pub async fn evaluate_creative(
    State(state): State<HttpState>,
    method: Method,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    request_stream(
        state,
        "creative_evaluation_requests",
        "creative_evaluation",
        &headers,
        query.as_deref(),
        method == Method::HEAD,
    )
    .await
}

/// Streams the reply channel of a fresh request, then publishes the request (with the query
/// parameters) for workers: subscribing first means no answer can be missed. A `HEAD`
/// (`head`) is checked as a `GET` is and gets its response head, but publishes nothing.
async fn request_stream(
    state: HttpState,
    requests: &str,
    replies: &str,
    headers: &HeaderMap,
    query: Option<&str>,
    head: bool,
) -> Response {
    let params = match params(query) {
        Ok(params) => params,
        Err(reason) => return error_response(StatusCode::BAD_REQUEST, reason),
    };
    let start = match start_of(headers, query, state.broker()) {
        Ok(start) => start,
        Err(reason) => return error_response(StatusCode::BAD_REQUEST, reason),
    };
    // Each parameter becomes one field of the request: one given twice is refused, rather
    // than one of its values dropped.
    let mut names = HashSet::new();
    if let Some((name, _)) = params.iter().find(|(name, _)| !names.insert(name.as_str())) {
        return error_response(StatusCode::BAD_REQUEST, super::given_twice(name));
    }
    let (request_id, start, resuming) = match params.iter().find(|(k, _)| k == "requestId") {
        Some((_, id)) => {
            if !valid_request_id(id) {
                return error_response(
                    StatusCode::BAD_REQUEST,
                    "invalid requestId: use 1 to 64 of A-Z, a-z, 0-9, _ and -",
                );
            }
            match start {
                // A cursor: the request was published on an earlier connect; resume it.
                Start::After(_) => (id.clone(), start, true),
                // No cursor: perhaps a first connect, perhaps a reconnect before the first
                // answer (`EventSource` sends `Last-Event-ID` only once it got an id). The
                // channel is this request's alone, so replaying all of it loses nothing; the
                // request is published again, and its message id makes a repeat commit once.
                _ => (id.clone(), Start::Last(usize::MAX), false),
            }
        }
        None => (format!("req_{:016x}", rand_u64()), start, false),
    };
    let reply_channel = format!("{replies}:{request_id}");
    let response = open_from(
        state.clone(),
        vec![Bytes::from(reply_channel.clone())],
        start,
        head,
    )
    .await;
    if response.status() != StatusCode::OK || resuming || head {
        return response;
    }
    let mut request = serde_json::Map::new();
    for (key, value) in params {
        if key != "lastEventId" && key != "last" {
            request.insert(key, value.into());
        }
    }
    // Set after the parameters, so a `replyChannel` in the query can never redirect the
    // workers' answers away from this stream (or into another client's channel).
    request.insert("requestId".into(), request_id.clone().into());
    request.insert("replyChannel".into(), reply_channel.into());
    let payload = Bytes::from(serde_json::Value::Object(request).to_string());
    if let Err(error) = state
        .broker()
        .publish(
            Bytes::from(requests.to_string()),
            payload,
            Some(Bytes::from(request_id)),
        )
        .await
    {
        return error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("cannot publish the request: {error}"),
        );
    }
    response
}

/// A client's own `requestId`: 1-64 of `A-Z a-z 0-9 _ -`, so that it names one channel and
/// nothing else (no `:` to reach another namespace).
fn valid_request_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn params(query: Option<&str>) -> Result<Vec<(String, String)>, String> {
    super::query_params(query)
}

/// Where the client wants to start: `Last-Event-ID` header, else `lastEventId`, else `last=N`
/// (an empty one, like an empty cursor, is not given). A cursor naming a partition `broker`'s
/// store does not have is malformed, and `lastEventId` or `last` given twice is refused, as is
/// a `Last-Event-ID` header given twice with different values.
fn start_of(headers: &HeaderMap, query: Option<&str>, broker: &Broker) -> Result<Start, String> {
    let params = params(query)?;
    // Checked even when the header makes them moot: the same URL works the same way whether
    // or not a reconnect adds the header.
    let query_cursor = super::single_param(&params, "lastEventId")?;
    let last = super::last_param(&params)?;
    let (cursor, source) = match last_event_id(headers)? {
        Some(value) => (Some(value), "Last-Event-ID"),
        None => (query_cursor.map(str::to_string), "lastEventId"),
    };
    if let Some(cursor) = cursor.filter(|c| !c.trim().is_empty()) {
        let start = Start::from_cursor(&cursor).map_err(|e| format!("invalid {source}: {e}"))?;
        start
            .check(broker)
            .map_err(|e| format!("invalid {source}: {e}"))?;
        return Ok(start);
    }
    Ok(last.map_or(Start::Live, Start::Last))
}

/// The `Last-Event-ID` header's value, if given. Given twice with different values it is
/// refused, as a single-valued query parameter given twice is (one handler would resume from
/// the first, another from the last); the same value twice (blanks around it aside) is that
/// value.
fn last_event_id(headers: &HeaderMap) -> Result<Option<String>, String> {
    let mut values = headers.get_all("last-event-id").iter();
    let Some(first) = values.next() else {
        return Ok(None);
    };
    if values.any(|other| other.as_bytes().trim_ascii() != first.as_bytes().trim_ascii()) {
        return Err(super::header_given_twice("Last-Event-ID"));
    }
    match first.to_str() {
        Ok(value) => Ok(Some(value.to_string())),
        Err(_) => Err("invalid Last-Event-ID: not ASCII".into()),
    }
}

/// Opens a stream of `channels` from where the request says (`head`: see [`open_from`]).
async fn open(
    state: HttpState,
    channels: Vec<Bytes>,
    headers: &HeaderMap,
    query: Option<&str>,
    head: bool,
) -> Response {
    match start_of(headers, query, state.broker()) {
        Ok(start) => open_from(state, channels, start, head).await,
        Err(reason) => error_response(StatusCode::BAD_REQUEST, reason),
    }
}

/// Opens an SSE stream of `channels` starting at `start`. The response head goes out once the
/// subscription is in place, in a cluster once the other members know of it (so a client's
/// `EventSource.onopen` means it is subscribed).
///
/// For a `HEAD` (`head`), the request is checked as a `GET`'s is and answered with the same
/// head, but nothing is subscribed or read: `HEAD` is a safe method.
async fn open_from(state: HttpState, channels: Vec<Bytes>, start: Start, head: bool) -> Response {
    if let Err(reason) = super::check_channels(channels.iter().map(|c| &c[..]), 0) {
        return error_response(StatusCode::BAD_REQUEST, reason);
    }
    if head {
        // A body of unknown length, never polled: the head says what a `GET`'s would.
        return stream_response(Body::from_stream(futures::stream::empty::<
            Result<Bytes, std::io::Error>,
        >()));
    }
    // Taken before the history is read: a skip after this point ends the stream.
    let reconnect = state.broker().reconnect_watch();
    let (stream, backlog) =
        match EventStream::open(state.broker().clone(), Format::Sse, channels.clone(), start).await
        {
            Ok(opened) => opened,
            Err(error) => return history_failed(state.settings().retry, &error),
        };
    let events_sent = Arc::new(AtomicU64::new(0));
    let guard = state.sse_clients().register(
        stream.id(),
        StreamClient {
            channels,
            connected_at: SystemTime::now(),
            events_sent: events_sent.clone(),
            user_id: None,
        },
    );
    tracing::debug!(id = stream.id(), "SSE client connected");

    let mut first = BytesMut::new();
    first.put_slice(format!("retry: {}\n", state.settings().retry.as_millis()).as_bytes());
    // The cursor the stream starts from, in the block of no event that sets the retry: a
    // browser keeps it as its last event id, so a reconnect before the first event resumes
    // from here rather than live-only (what was published meanwhile would be lost).
    if let Some(cursor) = stream.resume_cursor() {
        first.put_slice(b"id: ");
        first.put_slice(cursor.as_bytes());
        first.put_u8(b'\n');
    }
    first.put_u8(b'\n');
    let sent = write_emits(&mut first, backlog);
    events_sent.fetch_add(sent, Ordering::Relaxed);
    state.sse_clients().count_events(sent);

    let open = Open {
        first: Some(first.freeze()),
        stream,
        state,
        events_sent,
        _guard: guard,
        emits: Vec::new(),
        reconnect,
    };
    // The state is used in place (`as_mut`), not taken apart and put back: the future keeps it
    // once instead of twice, for as long as the stream is idle.
    let body = futures::stream::unfold(Some(open), |mut open| async move {
        let o = open.as_mut()?;
        if let Some(first) = o.first.take() {
            return Some((Ok(first), open));
        }
        let keep_alive = o.state.settings().keep_alive;
        let chunk = tokio::select! {
            // A reconnect request wins over a ready event: after a history skip, the events
            // past the hole must not reach the client before it is told to resume.
            biased;
            reason = o.reconnect.requested() => {
                tracing::info!(id = o.stream.id(), ?reason, "SSE client told to reconnect");
                return Some((Ok(Bytes::from_static(reason.sse_event())), None));
            }
            next = o.stream.next(&mut o.emits) => {
                if next.is_none() {
                    // Over its output limit: abort the connection (an error, not the end of
                    // the body, which would wait to flush to a client that does not read).
                    tracing::info!(id = o.stream.id(), "SSE client cut off: it passed its output limit");
                    return Some((Err(std::io::Error::other("output limit passed")), None));
                }
                if let Some(reason) = o.reconnect.now() {
                    tracing::info!(id = o.stream.id(), ?reason, "SSE client told to reconnect");
                    return Some((Ok(Bytes::from_static(reason.sse_event())), None));
                }
                let mut out = BytesMut::new();
                let sent = write_emits(&mut out, o.emits.drain(..));
                o.events_sent.fetch_add(sent, Ordering::Relaxed);
                o.state.sse_clients().count_events(sent);
                out.freeze()
            }
            _ = tokio::time::sleep(keep_alive) => Bytes::from_static(b": keep-alive\n\n"),
            // Said, so that a client moves at once (to another node behind the same address)
            // instead of taking the end for a network failure.
            _ = o.state.shutdown().cancelled() => {
                return Some((Ok(Bytes::from_static(SHUTDOWN_EVENT)), None));
            }
        };
        Some((Ok(chunk), open))
    });
    stream_response(Body::from_stream(body))
}

/// The answer to a stream whose history could not be read: a 200 stream that sets the retry
/// delay, says why in an `event: reconnect` and ends, so that the client comes back with its
/// cursor. A 503 made a browser's `EventSource` give up for good, over what is most likely a
/// passing failure.
fn history_failed(retry: std::time::Duration, error: &StorageError) -> Response {
    tracing::warn!(%error, "an SSE stream could not read its history; told to reconnect");
    stream_response(Body::from(crate::reconnect::reconnect_body(
        retry,
        &format!(
            "this node cannot read the history now ({error}); reconnect with your Last-Event-ID"
        ),
    )))
}

/// A stream's response: 200 and the SSE headers, with `body`.
fn stream_response(body: Body) -> Response {
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .header("x-accel-buffering", "no")
        .body(body)
        .expect("valid response")
}

/// An open SSE stream, what its body holds between events.
struct Open {
    /// The `retry:` line and the backlog, sent first.
    first: Option<Bytes>,
    stream: EventStream,
    state: HttpState,
    events_sent: Arc<AtomicU64>,
    /// Listed in the stats while the stream is open.
    _guard: ClientGuard,
    /// Reused between events.
    emits: Vec<Emit>,
    /// Says when the client must reconnect (cluster quorum lost, history skipped).
    reconnect: ReconnectWatch,
}

/// Writes emits as SSE; returns how many were events.
fn write_emits(out: &mut BytesMut, emits: impl IntoIterator<Item = Emit>) -> u64 {
    let mut events = 0;
    for emit in emits {
        match emit {
            Emit::Event { cursor, frame, .. } => {
                out.put_slice(b"id: ");
                out.put_slice(cursor.as_bytes());
                out.put_u8(b'\n');
                out.put_slice(&frame);
                events += 1;
            }
            Emit::Transient { frame } => {
                out.put_slice(&frame);
                events += 1;
            }
            Emit::Gap(gap) => {
                out.put_slice(b"event: gap\ndata: ");
                out.put_slice(&gap_json(&gap));
                out.put_slice(b"\n\n");
            }
        }
    }
    events
}

/// The JSON of a gap notice: `{"channel":..,"requested":"p-seq"|null,"oldest":"p-seq"|null,"reason":..}`.
pub fn gap_json(gap: &Gap) -> Bytes {
    let mut out = BytesMut::new();
    out.put_slice(b"{\"type\":\"gap\",\"channel\":");
    put_json_string(&mut out, &gap.channel);
    let field = |out: &mut BytesMut, name: &str, value: Option<String>| {
        out.put_slice(format!(",\"{name}\":").as_bytes());
        match value {
            Some(v) => out.put_slice(format!("\"{v}\"").as_bytes()),
            None => out.put_slice(b"null"),
        }
    };
    field(&mut out, "requested", position_text(gap.requested));
    field(&mut out, "oldest", position_text(gap.oldest));
    out.put_slice(format!(",\"reason\":\"{}\"}}", gap.reason).as_bytes());
    out.freeze()
}

/// A random number for request ids.
pub(crate) fn rand_u64() -> u64 {
    use std::collections::hash_map::RandomState;
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u128(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stream whose history cannot be read is told to come back (a browser's `EventSource`
    /// retries a 200 stream that ends, and gives up for good on a 503).
    #[tokio::test]
    async fn a_failed_history_read_is_a_stream_that_says_reconnect() {
        let error = StorageError::Internal("disk read failed".into());
        let response = history_failed(std::time::Duration::from_secs(3), &error);
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            response.headers()[header::CONTENT_TYPE],
            "text/event-stream"
        );
        let body = axum::body::to_bytes(response.into_body(), 1 << 16)
            .await
            .unwrap();
        assert_eq!(
            std::str::from_utf8(&body).unwrap(),
            "retry: 3000\nevent: reconnect\ndata: {\"type\":\"reconnect\",\"reason\":\"this node cannot read the history now (internal storage error: disk read failed); reconnect with your Last-Event-ID\"}\n\n"
        );
    }
}
