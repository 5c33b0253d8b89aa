//! The HTTP accept loop: SSE streams are written straight to their sockets, everything else is
//! served by hyper.
//!
//! # Why SSE streams bypass hyper
//!
//! An idle SSE stream is most of what a herald node holds: thousands of connections that each
//! receive an event now and then. hyper keeps, for the life of every HTTP/1 connection, an
//! 8 KiB read buffer (grown to 16 KiB right after the request head is read) and an 8 KiB write
//! buffer; it offers nothing smaller. Through hyper an idle SSE stream cost 20.5 KiB of
//! user-space RSS (`scripts/bench-idle --events 3`, 9,900 streams), most of it those buffers,
//! against a target of 8 KiB. Written directly, the same stream costs 3.1 KiB: the handler's
//! state, one small task and the socket's registration (`docs/benchmarks.md`, "Idle
//! connections under 8 KiB", 2026-12-02).
//!
//! # How
//!
//! Each accepted connection is first looked at with `peek` (an 8 KiB buffer, freed at once):
//! when it holds one complete `GET` request head for an SSE route (`/api/stream`,
//! `/api/stream/...`, `/api/stream?...`), with no body, no upgrade, no `Expect` and nothing after
//! it, the head is consumed, turned into an [`http::Request`](axum::http::Request) and run
//! through the same [`Router`] hyper uses (so routing, extractors, CORS and errors are
//! unchanged). The response head is written with every header the handler set, plus
//! `transfer-encoding: chunked` (or `content-length` for a body of known size, such as an
//! error), `connection: close` and `date`; then each body frame is written to the socket as it
//! comes, with one `write` per event and no buffer kept between events. Bytes only wait in a
//! queue (at most [`MAX_PENDING`] before the body stops being polled) while the client's socket
//! is full, and the queue is freed once drained. The connection closes when the body ends (the
//! handler ends it at shutdown, when this node loses its quorum, and when the client passes its
//! output limit, which aborts without the final chunk, as hyper does). A client that closes its
//! end is noticed at once (the socket is watched for reading), so its subscription goes with it.
//!
//! Anything else (other routes, WebSocket upgrades, keep-alive and pipelined requests,
//! HTTP/1.0, a head not complete in the first read, anything malformed) is handed to hyper
//! untouched, exactly as `axum::serve` would serve it.
//!
//! # Shutdown
//!
//! On the node's shutdown token the loop stops accepting, connections not yet past their first
//! read are dropped, hyper connections shut down gracefully (in-flight responses finish), SSE
//! streams end (their handler watches the same token), and [`run`] returns once every connection
//! is done. Upgraded WebSocket sessions are tracked separately (see
//! [`HttpState::track`](super::HttpState::track)).

use axum::Router;
use axum::body::{Body, HttpBody as _};
use axum::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use axum::http::{Method, Request, StatusCode, Version, response};
use bytes::{Buf, BytesMut};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::Poll;
use std::time::{Duration, SystemTime};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;
use tower::util::Oneshot;

/// How long a connection may take to send its request head (and, with keep-alive, each next
/// one) before it is closed: otherwise a client that connects and sends nothing, or a byte now
/// and then, holds a socket and a task for ever.
const HEAD_TIMEOUT: Duration = Duration::from_secs(30);

/// Bytes looked at before deciding who serves a connection. A request head that does not fit
/// goes to hyper (which allows larger ones).
const PEEK_BYTES: usize = 8 * 1024;
/// Most request headers parsed on the direct path (more go to hyper).
const MAX_HEADERS: usize = 64;
/// Most bytes waiting for a client's full socket before the response body is no longer polled.
/// Only a client that does not keep up ever has any; its output limit (in the hub) is what
/// ends it.
pub const MAX_PENDING: usize = 64 * 1024;

/// Accepts connections on `listener` and serves them with `router` until `shutdown` is
/// cancelled; returns once every connection has ended.
pub async fn run(listener: TcpListener, router: Router, shutdown: CancellationToken) {
    let connections = TaskTracker::new();
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    accept_failed(error, &shutdown).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        connections.spawn(connection(stream, router.clone(), shutdown.clone()));
    }
    drop(listener);
    connections.close();
    connections.wait().await;
}

/// After a failed `accept`: per-connection errors are ignored, others (out of descriptors)
/// are logged and followed by a pause, as `axum::serve` does.
pub(crate) async fn accept_failed(error: io::Error, shutdown: &CancellationToken) {
    if matches!(
        error.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    ) {
        return;
    }
    tracing::error!("HTTP accept failed: {error}");
    tokio::select! {
        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        _ = shutdown.cancelled() => {}
    }
}

/// A connection's work after its first look, boxed: the connection's task keeps only the state
/// of the path it took.
type Step = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Serves one connection: directly when its first bytes are an SSE request, else with hyper.
async fn connection(stream: TcpStream, router: Router, shutdown: CancellationToken) {
    // The first look is boxed too, and freed before the connection's long life.
    let first = Box::pin(async {
        tokio::select! {
            first = tokio::time::timeout(HEAD_TIMEOUT, first_look(&stream)) => first.ok(),
            _ = shutdown.cancelled() => None,
        }
    })
    .await;
    if let Some(step) = first.and_then(|first| step(first, stream, router, shutdown)) {
        step.await;
    }
}

/// What serves the connection after its first look (`None`: nothing to serve).
fn step(
    first: io::Result<First>,
    stream: TcpStream,
    router: Router,
    shutdown: CancellationToken,
) -> Option<Step> {
    match first {
        // The request leaves its box here, so the box is freed now, not when the stream ends.
        Ok(First::Sse(request)) => Some(Box::pin(serve_sse(
            stream,
            Box::pin(router.oneshot(*request)),
        ))),
        Ok(First::Other) => Some(Box::pin(serve_hyper(stream, router, shutdown))),
        Ok(First::Closed) => None,
        Err(error) => {
            tracing::trace!("HTTP connection failed before its request: {error}");
            None
        }
    }
}

/// What the first bytes of a connection are.
enum First {
    /// A complete SSE request head, and nothing after it (consumed from the socket).
    Sse(Box<Request<Body>>),
    /// Anything else: hyper's.
    Other,
    /// The client closed without sending anything.
    Closed,
}

/// Peeks at the first bytes and classifies them; an SSE request's head is then consumed (it
/// is parsed already), anything else is left for hyper to read.
async fn first_look(stream: &TcpStream) -> io::Result<First> {
    // On the heap, and freed on return: the connection keeps none of it.
    let mut buf = vec![0u8; PEEK_BYTES];
    let n = stream.peek(&mut buf).await?;
    if n == 0 {
        return Ok(First::Closed);
    }
    let Some((request, head_len)) = sse_request(&buf[..n]) else {
        return Ok(First::Other);
    };
    let mut read = 0;
    while read < head_len {
        stream.readable().await?;
        match stream.try_read(&mut buf[read..head_len]) {
            Ok(0) => return Ok(First::Closed),
            Ok(n) => read += n,
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
            Err(error) => return Err(error),
        }
    }
    Ok(First::Sse(Box::new(request)))
}

/// Whether `path` (origin form, with any query) is an SSE route: `/api/stream`,
/// `/api/stream/...` or `/api/stream?...`.
pub(crate) fn is_sse_path(path: &str) -> bool {
    path.strip_prefix("/api/stream")
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/') || rest.starts_with('?'))
}

/// `bytes` as an SSE request and its head's length, when they are exactly one complete
/// HTTP/1.1 `GET` head for an SSE route that the direct path can serve; `None` sends the
/// connection to hyper.
fn sse_request(bytes: &[u8]) -> Option<(Request<Body>, usize)> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut headers);
    let httparse::Status::Complete(head_len) = parsed.parse(bytes).ok()? else {
        return None;
    };
    // Pipelined bytes after the head are hyper's to handle.
    if head_len != bytes.len() || parsed.method? != "GET" || parsed.version? != 1 {
        return None;
    }
    let path = parsed.path?;
    if !is_sse_path(path) {
        return None;
    }
    let mut request = Request::builder()
        .method(Method::GET)
        .uri(path)
        .version(Version::HTTP_11)
        .body(Body::empty())
        .ok()?;
    let map = request.headers_mut();
    map.reserve(parsed.headers.len());
    for h in parsed.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes()).ok()?;
        // A body, an upgrade or an expectation: not a plain stream request.
        if name == header::CONTENT_LENGTH && h.value != b"0"
            || name == header::TRANSFER_ENCODING
            || name == header::UPGRADE
            || name == header::EXPECT
        {
            return None;
        }
        map.append(name, HeaderValue::from_bytes(h.value).ok()?);
    }
    Some((request, head_len))
}

/// Serves a connection with hyper (HTTP/1.1 with upgrades), as `axum::serve` does: graceful
/// shutdown lets an in-flight response finish and closes idle keep-alive connections.
pub(crate) async fn serve_hyper(stream: TcpStream, router: Router, shutdown: CancellationToken) {
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEAD_TIMEOUT);
    // Each request carries the client's address ([`super::ClientAddr`]), for the handlers
    // that take requests from loopback only.
    let client = stream.peer_addr().ok().map(super::ClientAddr);
    let service = tower::service_fn(move |mut request: Request<hyper::body::Incoming>| {
        if let Some(client) = client {
            request.extensions_mut().insert(client);
        }
        router.clone().oneshot(request)
    });
    let connection = builder
        .serve_connection_with_upgrades(TokioIo::new(stream), TowerToHyperService::new(service));
    tokio::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        _ = shutdown.cancelled() => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(error) = result {
        tracing::trace!("HTTP connection failed: {error:#}");
    }
}

/// Serves an SSE request on its own (its head is consumed already): waits for the router's
/// response, then writes it straight to the socket and closes it.
///
/// The routing's state comes boxed: an async fn's arguments and locals stay in its future for
/// its whole life, the box only until the response is there.
async fn serve_sse(mut stream: TcpStream, responding: Pin<Box<Oneshot<Router, Request<Body>>>>) {
    let (head, body, chunked) = {
        let response = match responding.await {
            Ok(response) => response,
            Err(never) => match never {},
        };
        let (parts, body) = response.into_parts();
        let (head, chunked) = response_head(&parts, &body);
        (head, body, chunked)
    };
    match forward(&stream, head, body, chunked, WRITE_STALL).await {
        Ok(()) => {
            let _ = stream.shutdown().await;
        }
        Err(error) => tracing::trace!("SSE connection ended: {error}"),
    }
}

/// The response head as hyper would write it (lowercase names, `date` unless set), closing the
/// connection after the body, which is chunked unless its length is known. Returns the head
/// and whether the body is chunked.
fn response_head(parts: &response::Parts, body: &Body) -> (BytesMut, bool) {
    let status = parts.status;
    let known_length = parts.headers.contains_key(header::CONTENT_LENGTH);
    let exact = body.size_hint().exact();
    let chunked = !known_length && exact.is_none() && status_has_body(status);
    let mut head = BytesMut::with_capacity(256);
    head.extend_from_slice(b"HTTP/1.1 ");
    head.extend_from_slice(status.as_str().as_bytes());
    head.extend_from_slice(b" ");
    head.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    head.extend_from_slice(b"\r\n");
    put_headers(&mut head, &parts.headers);
    if chunked {
        head.extend_from_slice(b"transfer-encoding: chunked\r\n");
    } else if !known_length && status_has_body(status) {
        head.extend_from_slice(b"content-length: ");
        head.extend_from_slice(itoa::Buffer::new().format(exact.unwrap_or(0)).as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"connection: close\r\n");
    if !parts.headers.contains_key(header::DATE) {
        head.extend_from_slice(b"date: ");
        head.extend_from_slice(httpdate::fmt_http_date(SystemTime::now()).as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"\r\n");
    (head, chunked)
}

/// Whether a response with `status` carries a body (not 1xx, 204 or 304).
fn status_has_body(status: StatusCode) -> bool {
    !(status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED)
}

/// Appends the handler's headers, except the connection-level ones this writer sets itself.
fn put_headers(head: &mut BytesMut, headers: &HeaderMap) {
    for (name, value) in headers {
        if name == header::CONNECTION
            || name == header::TRANSFER_ENCODING
            || name.as_str() == "keep-alive"
        {
            continue;
        }
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
}

/// How long an SSE stream waits for a socket that takes none of its bytes before it drops
/// the connection (as a WebSocket is dropped after the same time).
const WRITE_STALL: std::time::Duration = std::time::Duration::from_secs(60);

/// Body frames taken in one poll before the task yields, so a body that is always ready
/// cannot hold a worker thread (hyper's connections yield the same way).
const FRAMES_PER_POLL: usize = 16;

/// Writes `head`, then the body's frames as they come (chunked if `chunked`), until the body
/// ends (`Ok`: everything was written), fails, the client goes away, or its socket takes
/// nothing for `stall` (`Err`).
///
/// A hand-written poll loop rather than `select!` over futures: between events the stream then
/// keeps no future state, only this function's few locals.
async fn forward(
    stream: &TcpStream,
    mut pending: BytesMut,
    mut body: Body,
    chunked: bool,
    stall: std::time::Duration,
) -> io::Result<()> {
    let mut ended = false;
    // Set while written bytes wait for a socket that takes none (no cost between events).
    let mut stalled: Option<Pin<Box<tokio::time::Sleep>>> = None;
    std::future::poll_fn(|cx| {
        let mut frames = 0;
        loop {
            if ended && pending.is_empty() {
                return Poll::Ready(Ok(()));
            }
            // What the body has ready goes first, so it leaves in one write: the response head
            // with the first events, a burst of events queued while the socket was full.
            if !ended && pending.len() < MAX_PENDING {
                if frames == FRAMES_PER_POLL {
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                match Pin::new(&mut body).poll_frame(cx) {
                    Poll::Ready(Some(Ok(frame))) => {
                        frames += 1;
                        if let Ok(data) = frame.into_data()
                            && !data.is_empty()
                        {
                            if chunked {
                                let mut size = [0u8; 18];
                                let size = chunk_size_line(&mut size, data.len());
                                send(stream, &mut pending, &[size, &data, b"\r\n"])?;
                            } else {
                                send(stream, &mut pending, &[&data])?;
                            }
                        }
                        continue;
                    }
                    // The handler aborted the stream (output limit): close without the last
                    // chunk, as hyper does.
                    Poll::Ready(Some(Err(error))) => {
                        return Poll::Ready(Err(io::Error::other(error)));
                    }
                    Poll::Ready(None) => {
                        ended = true;
                        if chunked {
                            send(stream, &mut pending, &[b"0\r\n\r\n"])?;
                        }
                        continue;
                    }
                    Poll::Pending => {}
                }
            }
            if !pending.is_empty() {
                match stream.poll_write_ready(cx) {
                    Poll::Ready(ready) => {
                        ready?;
                        let before = pending.len();
                        flush(stream, &mut pending)?;
                        if pending.len() < before {
                            stalled = None;
                        }
                        continue;
                    }
                    Poll::Pending => {}
                }
                // A client that takes nothing (a stopped reader, a frozen tab) is not polled
                // for its output limit meanwhile (its events wait in its queue): it is
                // dropped after `stall` (WRITE_STALL) instead, and resumes with its cursor.
                let timer = stalled.get_or_insert_with(|| Box::pin(tokio::time::sleep(stall)));
                if timer.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the client took nothing for the write stall limit",
                    )));
                }
            }
            // Anything from the client: its end (it went away), or bytes to drop.
            match stream.poll_read_ready(cx) {
                Poll::Ready(ready) => {
                    ready?;
                    match client_closed(stream)? {
                        Some(true) => {
                            return Poll::Ready(Err(io::Error::new(
                                io::ErrorKind::ConnectionAborted,
                                "the client closed the stream",
                            )));
                        }
                        // Drained: poll again to wait for more.
                        Some(false) => continue,
                        // Still sending: let others run first.
                        None => {
                            cx.waker().wake_by_ref();
                            return Poll::Pending;
                        }
                    }
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    })
    .await
}

/// Writes `parts` (at most 3) now if nothing is queued and the socket takes them; queues what
/// it does not.
fn send(stream: &TcpStream, pending: &mut BytesMut, parts: &[&[u8]]) -> io::Result<()> {
    let mut written = 0;
    if pending.is_empty() {
        let mut slices = [IoSlice::new(&[]); 3];
        for (slice, part) in slices.iter_mut().zip(parts) {
            *slice = IoSlice::new(part);
        }
        match stream.try_write_vectored(&slices[..parts.len().min(3)]) {
            Ok(n) => written = n,
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
            Err(error) => return Err(error),
        }
    }
    for part in parts {
        if written >= part.len() {
            written -= part.len();
            continue;
        }
        pending.extend_from_slice(&part[written..]);
        written = 0;
    }
    Ok(())
}

/// Writes what the socket takes of `pending`; frees the queue once it is empty.
fn flush(stream: &TcpStream, pending: &mut BytesMut) -> io::Result<()> {
    match stream.try_write(pending) {
        Ok(n) => {
            pending.advance(n);
            if pending.is_empty() {
                // Nothing kept between events.
                *pending = BytesMut::new();
            }
            Ok(())
        }
        Err(error) if error.kind() == io::ErrorKind::WouldBlock => Ok(()),
        Err(error) => Err(error),
    }
}

/// Reads (and drops) whatever the client sent on a stream: `Some(true)` once it closed its
/// end, `Some(false)` once nothing more is there, `None` if it is still sending.
fn client_closed(stream: &TcpStream) -> io::Result<Option<bool>> {
    let mut scratch = [0u8; 256];
    // Bounded, so a client that keeps sending cannot hold the task here.
    for _ in 0..16 {
        match stream.try_read(&mut scratch) {
            Ok(0) => return Ok(Some(true)),
            Ok(_) => {}
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => return Ok(Some(false)),
            Err(error) => return Err(error),
        }
    }
    Ok(None)
}

/// `len` in hex followed by CRLF, the line before a chunk's data.
fn chunk_size_line(buf: &mut [u8; 18], len: usize) -> &[u8] {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut at = 16;
    let mut rest = len;
    loop {
        at -= 1;
        buf[at] = HEX[rest & 0xf];
        rest >>= 4;
        if rest == 0 {
            break;
        }
    }
    buf[16] = b'\r';
    buf[17] = b'\n';
    &buf[at..]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client that reads nothing (a stopped reader, a frozen tab) holds an SSE connection
    /// only until its socket has taken nothing for the stall limit: then the stream ends, and
    /// the client resumes from its cursor when it comes back.
    #[tokio::test]
    async fn a_client_that_takes_nothing_is_dropped_after_the_stall_limit() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        // Endless events, never read.
        let chunk = bytes::Bytes::from(vec![b'x'; 64 * 1024]);
        let events = futures::stream::repeat_with(move || Ok::<_, io::Error>(chunk.clone()));
        let ended = tokio::time::timeout(
            std::time::Duration::from_secs(30),
            forward(
                &server,
                BytesMut::from(&b"HTTP/1.1 200 OK\r\n\r\n"[..]),
                Body::from_stream(events),
                true,
                std::time::Duration::from_millis(300),
            ),
        )
        .await
        .expect("the stream ends once the client took nothing for the stall limit");
        let error = ended.expect_err("a dropped client is an error");
        assert_eq!(error.kind(), io::ErrorKind::TimedOut, "{error}");
        drop(client);
    }

    #[test]
    fn only_sse_paths_take_the_direct_path() {
        for path in [
            "/api/stream",
            "/api/stream?channel=a",
            "/api/stream/news",
            "/api/stream/render-progress/r1?last=3",
        ] {
            assert!(is_sse_path(path), "{path}");
        }
        for path in ["/api/streams", "/api/publish", "/ws", "/", "/api/stream-x"] {
            assert!(!is_sse_path(path), "{path}");
        }
    }

    #[test]
    fn complete_plain_get_heads_are_taken_others_go_to_hyper() {
        let head = b"GET /api/stream/news?last=2 HTTP/1.1\r\nHost: h\r\nLast-Event-ID: abc\r\n\r\n";
        let (request, len) = sse_request(head).expect("an SSE request");
        assert_eq!(len, head.len());
        assert_eq!(request.uri().path(), "/api/stream/news");
        assert_eq!(request.uri().query(), Some("last=2"));
        assert_eq!(request.headers()["last-event-id"], "abc");
        for other in [
            &b"GET /api/stream/news HTTP/1.1\r\nHost: h\r\n"[..],
            b"GET /api/stream/news HTTP/1.0\r\n\r\n",
            b"POST /api/stream/news HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
            b"GET /health HTTP/1.1\r\n\r\n",
            b"GET /api/stream/a HTTP/1.1\r\n\r\nGET /api/stream/b HTTP/1.1\r\n\r\n",
            b"GET /api/stream/a HTTP/1.1\r\nContent-Length: 3\r\n\r\n",
            b"GET /api/stream/a HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
            b"GET /api/stream/a HTTP/1.1\r\nExpect: 100-continue\r\n\r\n",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            b"garbage\r\n\r\n",
        ] {
            assert!(
                sse_request(other).is_none(),
                "{}",
                String::from_utf8_lossy(other)
            );
        }
    }

    #[test]
    fn chunk_size_lines_are_hex() {
        let mut buf = [0u8; 18];
        assert_eq!(chunk_size_line(&mut buf, 0), b"0\r\n");
        assert_eq!(chunk_size_line(&mut buf, 10), b"A\r\n");
        assert_eq!(chunk_size_line(&mut buf, 0x1f40), b"1F40\r\n");
        assert_eq!(
            chunk_size_line(&mut buf, usize::MAX),
            b"FFFFFFFFFFFFFFFF\r\n"
        );
    }

    #[test]
    fn heads_keep_the_handlers_headers_and_frame_the_body() {
        let response = axum::http::Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, "text/event-stream")
            .header(header::CACHE_CONTROL, "no-cache")
            .header("x-accel-buffering", "no")
            .header(header::ACCESS_CONTROL_ALLOW_ORIGIN, "*")
            .body(Body::from_stream(futures::stream::empty::<
                Result<bytes::Bytes, io::Error>,
            >()))
            .unwrap();
        let (parts, body) = response.into_parts();
        let (head, chunked) = response_head(&parts, &body);
        let head = String::from_utf8(head.to_vec()).unwrap();
        assert!(chunked);
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        for line in [
            "content-type: text/event-stream\r\n",
            "cache-control: no-cache\r\n",
            "x-accel-buffering: no\r\n",
            "access-control-allow-origin: *\r\n",
            "transfer-encoding: chunked\r\n",
            "connection: close\r\n",
            "date: ",
        ] {
            assert!(head.contains(line), "{line:?} missing from {head}");
        }
        assert!(head.ends_with("\r\n\r\n") && !head.contains("content-length"));

        let error = super::super::error_response(StatusCode::BAD_REQUEST, "no channel given");
        let (parts, body) = error.into_parts();
        let (head, chunked) = response_head(&parts, &body);
        let head = String::from_utf8(head.to_vec()).unwrap();
        assert!(!chunked);
        assert!(head.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{head}");
        assert!(head.contains("content-length: 17\r\n"), "{head}");
    }

    /// A node's HTTP surface in this process and raw HTTP/1.1 clients.
    mod live {
        use super::super::super::HttpSettings;
        use super::super::super::test_node::{self, TestNode};
        use bytes::Bytes;
        use memchr::memmem;
        use std::time::{Duration, Instant};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        use tokio::net::TcpStream;

        const PATIENCE: Duration = Duration::from_secs(10);

        async fn start() -> TestNode {
            test_node::start("listener", HttpSettings::default()).await
        }

        /// Reads until `buf` contains `needle` (or the connection ends); returns whether it does.
        async fn read_until(tcp: &mut TcpStream, buf: &mut Vec<u8>, needle: &[u8]) -> bool {
            let read = async {
                while memmem::find(buf, needle).is_none() {
                    let mut chunk = [0u8; 4096];
                    match tcp.read(&mut chunk).await {
                        Ok(0) | Err(_) => return false,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                true
            };
            tokio::time::timeout(PATIENCE, read)
                .await
                .expect("read in time")
        }

        async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
            let start = Instant::now();
            while !done() {
                assert!(start.elapsed() < PATIENCE, "{what}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn sse_streams_are_written_directly_and_end_cleanly_at_shutdown() {
            let mut node = start().await;
            let mut tcp = TcpStream::connect(node.addr).await.unwrap();
            tcp.write_all(b"GET /api/stream/news HTTP/1.1\r\nHost: herald\r\n\r\n")
                .await
                .unwrap();
            let mut got = Vec::new();
            assert!(read_until(&mut tcp, &mut got, b"\n\n\r\n").await);
            let text = String::from_utf8_lossy(&got).into_owned();
            assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
            for line in [
                "content-type: text/event-stream\r\n",
                "cache-control: no-cache\r\n",
                "x-accel-buffering: no\r\n",
                "transfer-encoding: chunked\r\n",
                "connection: close\r\n",
            ] {
                assert!(text.contains(line), "{line:?} missing from {text}");
            }
            // The first chunk is the `retry:` line and the stream's cursor.
            let (_, chunk) = text.split_once("\r\n\r\n").expect("a head");
            let (size, block) = chunk.split_once("\r\n").expect("a chunk size");
            assert_eq!(
                usize::from_str_radix(size, 16),
                Ok(block.len() - 2),
                "{text:?}"
            );
            assert!(block.starts_with("retry: 3000\nid: "), "{text:?}");
            assert!(block.ends_with("\n\n\r\n"), "{text:?}");
            assert_eq!(node.state.sse_clients().len(), 1);

            node.state
                .broker()
                .publish(Bytes::from("news"), Bytes::from("hello"), None)
                .await
                .unwrap();
            assert!(read_until(&mut tcp, &mut got, b"data: hello\n\n\r\n").await);

            node.shutdown.cancel();
            assert!(
                read_until(&mut tcp, &mut got, b"\r\n0\r\n\r\n").await,
                "the last chunk at shutdown: {:?}",
                String::from_utf8_lossy(&got)
            );
            let mut rest = Vec::new();
            assert_eq!(tcp.read_to_end(&mut rest).await.unwrap(), 0, "then the end");
            tokio::time::timeout(PATIENCE, node.served.take().unwrap())
                .await
                .expect("serve returns once every connection is done")
                .unwrap()
                .unwrap();
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_client_that_leaves_is_unsubscribed_at_once() {
            let node = start().await;
            let mut tcp = TcpStream::connect(node.addr).await.unwrap();
            tcp.write_all(b"GET /api/stream?channel=a&channel=b HTTP/1.1\r\n\r\n")
                .await
                .unwrap();
            assert!(read_until(&mut tcp, &mut Vec::new(), b"retry:").await);
            assert_eq!(node.state.sse_clients().len(), 1);
            drop(tcp);
            // Long before the next keep-alive (15 s) would have found out.
            wait_for("the client is gone from the stats", || {
                node.state.sse_clients().is_empty()
            })
            .await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn errors_on_stream_routes_have_a_length() {
            let node = start().await;
            let mut tcp = TcpStream::connect(node.addr).await.unwrap();
            tcp.write_all(b"GET /api/stream HTTP/1.1\r\n\r\n")
                .await
                .unwrap();
            let mut got = Vec::new();
            tokio::time::timeout(PATIENCE, tcp.read_to_end(&mut got))
                .await
                .unwrap()
                .unwrap();
            let text = String::from_utf8_lossy(&got);
            assert!(text.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{text}");
            assert!(text.contains("connection: close\r\n"), "{text}");
            let body = text.split("\r\n\r\n").nth(1).unwrap();
            assert!(
                text.contains(&format!("content-length: {}\r\n", body.len())),
                "{text}"
            );
            assert!(body.starts_with("no channel given"), "{body}");
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn everything_else_is_hypers_keep_alive_pipelining_and_split_heads() {
            let node = start().await;
            // Two pipelined requests on one kept-alive connection.
            let mut tcp = TcpStream::connect(node.addr).await.unwrap();
            tcp.write_all(b"GET /health HTTP/1.1\r\n\r\nGET /ready HTTP/1.1\r\n\r\n")
                .await
                .unwrap();
            let mut got = Vec::new();
            assert!(read_until(&mut tcp, &mut got, b"\"ready\"").await);
            let text = String::from_utf8_lossy(&got);
            assert_eq!(text.matches("HTTP/1.1 200 OK").count(), 2, "{text}");
            // A third request on the same connection.
            tcp.write_all(b"GET /health HTTP/1.1\r\n\r\n")
                .await
                .unwrap();
            let mut third = Vec::new();
            assert!(read_until(&mut tcp, &mut third, b"\"healthy\"").await);
            assert!(memmem::find(&third, b"HTTP/1.1 200 OK\r\n").is_some());

            // A stream request whose head does not arrive at once is still served (by hyper).
            let mut tcp = TcpStream::connect(node.addr).await.unwrap();
            tcp.write_all(b"GET /api/stream/news HTTP/1.1\r\nHo")
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
            tcp.write_all(b"st: herald\r\n\r\n").await.unwrap();
            let mut got = Vec::new();
            assert!(read_until(&mut tcp, &mut got, b"retry: 3000").await);
            assert!(got.starts_with(b"HTTP/1.1 200 OK\r\n"));
            assert_eq!(node.state.sse_clients().len(), 1);
        }
    }
}
