//! The HTTP surface (axum): the seed API's SSE streams, WebSocket endpoints, publish API and
//! stats, plus health, readiness and Prometheus metrics.
//!
//! - [`sse`]: `GET /api/stream/...`, resumable with `Last-Event-ID`.
//! - [`ws`]: `/ws` and `/ws/alerts`, the seed's WebSocket protocol with resumable subscriptions.
//! - [`publish`]: `POST /api/publish`.
//! - [`body`]: the size limit of the `POST` endpoints' bodies.
//! - [`ops`]: `/api/realtime/stats`, `/health`, `/ready`, `/metrics`.
//!
//! [`serve`] runs its own accept loop (`listener`): SSE requests are answered and streamed
//! straight to their sockets, without hyper's per-connection buffers (an idle SSE stream went
//! from 20.5 to 3.1 KiB of RSS); everything else is served by hyper as `axum::serve` would.

pub mod body;
pub mod cluster;
pub(crate) mod listener;
pub mod ops;
pub mod publish;
pub mod sse;
#[cfg(test)]
mod test_node;
pub mod ws;

use crate::broker::Broker;
use crate::resp::ServerContext;
use axum::Router;
use axum::extract::Request;
use axum::middleware::{self, Next};
use axum::routing::{MethodRouter, get, post};
use bytes::Bytes;
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower_http::cors::{AllowHeaders, AllowOrigin, CorsLayer};

pub use crate::broker::MAX_CHANNEL_NAME_BYTES;

/// The most channels one SSE stream or one WebSocket connection holds. Opening a stream reads
/// each channel's history, and every event batch walks the list.
pub const MAX_STREAM_CHANNELS: usize = 1024;

/// Why a stream's channels are refused, if they are: an empty or too long name, or too many.
pub(crate) fn check_channels<'a>(
    names: impl IntoIterator<Item = &'a [u8]>,
    already: usize,
) -> Result<(), String> {
    let mut count = already;
    for name in names {
        if name.is_empty() {
            return Err("empty channel name".to_string());
        }
        if name.len() > MAX_CHANNEL_NAME_BYTES {
            return Err(format!(
                "channel name of {} bytes: the limit is {MAX_CHANNEL_NAME_BYTES}",
                name.len()
            ));
        }
        count += 1;
    }
    if count > MAX_STREAM_CHANNELS {
        return Err(format!(
            "too many channels: one stream or connection holds at most {MAX_STREAM_CHANNELS}"
        ));
    }
    Ok(())
}

/// A query string's `name=value` pairs, decoded as an HTML form's are (`+` is a space, `%XX`
/// a byte), or why it cannot be: a name or value that is not UTF-8 once decoded. (The usual
/// decoders replace such bytes with U+FFFD, which turned `?channel=%FF` into a stream of the
/// channel U+FFFD instead of the 400 `/api/stream/%FF` gets.)
pub(crate) fn query_params(query: Option<&str>) -> Result<Vec<(String, String)>, String> {
    let Some(query) = query else {
        return Ok(Vec::new());
    };
    let mut pairs = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let name = String::from_utf8(percent_decode(name)).map_err(|e| {
            format!(
                "invalid query: a parameter name is not UTF-8 once percent-decoded ({})",
                String::from_utf8_lossy(e.as_bytes())
            )
        })?;
        let value = String::from_utf8(percent_decode(value))
            .map_err(|_| format!("invalid query: {name}= is not UTF-8 once percent-decoded"))?;
        pairs.push((name, value));
    }
    Ok(pairs)
}

/// The value of `name`, a parameter that takes one value, if it is given; a parameter given
/// more than once is refused (one handler took the first copy, another the last).
pub(crate) fn single_param<'a>(
    params: &'a [(String, String)],
    name: &str,
) -> Result<Option<&'a str>, String> {
    let mut found = params.iter().filter(|(k, _)| k == name).map(|(_, v)| v);
    match (found.next(), found.next()) {
        (value, None) => Ok(value.map(String::as_str)),
        (Some(_), Some(_)) => Err(given_twice(name)),
        (None, Some(_)) => unreachable!("a second value without a first"),
    }
}

/// Why a query is refused that gives the single-valued parameter `name` more than once.
pub(crate) fn given_twice(name: &str) -> String {
    format!("invalid query: {name}= is given more than once (it takes one value)")
}

/// Why a request is refused that gives the single-valued header `name` more than once, with
/// different values (the same value twice is that value).
pub(crate) fn header_given_twice(name: &str) -> String {
    format!(
        "invalid header: {name} is given more than once, with different values (it takes one value)"
    )
}

/// `?last=N`'s value: `None` when it is not given or empty (`?last=`, as a URL built from an
/// unset variable has it), else the whole number, or why it is not one.
pub(crate) fn last_param(params: &[(String, String)]) -> Result<Option<usize>, String> {
    match single_param(params, "last")? {
        Some(n) if !n.trim().is_empty() => n
            .parse()
            .map(Some)
            .map_err(|_| format!("invalid last '{n}': expected a whole number")),
        _ => Ok(None),
    }
}

/// `text` with `+` as a space and each `%XX` as its byte (a `%` not followed by two hex digits
/// stays as it is, as browsers do), with the `percent-encoding` crate; its UTF-8 is checked by
/// the caller.
fn percent_decode(text: &str) -> Vec<u8> {
    percent_encoding::percent_decode_str(&text.replace('+', " ")).collect()
}

/// HTTP settings.
#[derive(Debug, Clone)]
pub struct HttpSettings {
    /// Interval of SSE keep-alive comments.
    pub keep_alive: Duration,
    /// The reconnection delay SSE clients are told (`retry:`).
    pub retry: Duration,
    /// Origins allowed by CORS; empty disables CORS headers, `*` allows any.
    pub cors_origins: Vec<String>,
    /// Interval of WebSocket `heartbeat` messages.
    pub ws_heartbeat: Duration,
    /// WebSocket clients silent this long are closed.
    pub ws_timeout: Duration,
    /// Largest WebSocket message (and frame) accepted from a client.
    pub ws_max_message: usize,
}

impl Default for HttpSettings {
    fn default() -> Self {
        HttpSettings {
            keep_alive: Duration::from_secs(15),
            retry: Duration::from_secs(3),
            cors_origins: Vec::new(),
            ws_heartbeat: Duration::from_secs(30),
            ws_timeout: Duration::from_secs(60),
            ws_max_message: 64 * 1024,
        }
    }
}

/// What `/api/realtime/stats` shows of one streaming client.
#[derive(Debug)]
pub struct StreamClient {
    /// Its channels.
    pub channels: Vec<Bytes>,
    /// When it connected.
    pub connected_at: SystemTime,
    /// Events sent to it.
    pub events_sent: Arc<AtomicU64>,
    /// The user it said it is (`userId`), for WebSocket clients.
    pub user_id: Option<String>,
}

/// Connected clients of one HTTP protocol, for stats and metrics.
#[derive(Debug, Default)]
pub struct StreamClients {
    clients: Mutex<BTreeMap<u64, StreamClient>>,
    /// Events sent to all clients of this protocol since start.
    pub total_events: AtomicU64,
}

impl StreamClients {
    /// Registers a client; it is removed when the returned guard drops.
    pub fn register(self: &Arc<Self>, id: u64, client: StreamClient) -> ClientGuard {
        self.clients.lock().insert(id, client);
        ClientGuard {
            clients: self.clone(),
            id,
        }
    }

    /// Number of connected clients.
    pub fn len(&self) -> usize {
        self.clients.lock().len()
    }

    /// Whether none is connected.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Runs `f` over the clients (for the stats endpoint).
    pub fn with_clients<T>(&self, f: impl FnOnce(&BTreeMap<u64, StreamClient>) -> T) -> T {
        f(&self.clients.lock())
    }

    /// Updates a client's channel list.
    pub fn set_channels(&self, id: u64, channels: Vec<Bytes>) {
        if let Some(client) = self.clients.lock().get_mut(&id) {
            client.channels = channels;
        }
    }

    /// Counts `n` events sent.
    pub fn count_events(&self, n: u64) {
        self.total_events.fetch_add(n, Ordering::Relaxed);
    }
}

/// Removes a client from its registry when dropped.
pub struct ClientGuard {
    clients: Arc<StreamClients>,
    id: u64,
}

impl Drop for ClientGuard {
    fn drop(&mut self) {
        self.clients.clients.lock().remove(&self.id);
    }
}

/// State shared by the HTTP handlers.
#[derive(Clone)]
pub struct HttpState {
    inner: Arc<Inner>,
}

struct Inner {
    broker: Arc<Broker>,
    resp: Arc<ServerContext>,
    settings: HttpSettings,
    render_metrics: Arc<dyn Fn() -> String + Send + Sync>,
    shutdown: CancellationToken,
    sse: Arc<StreamClients>,
    ws: Arc<StreamClients>,
    /// Upgraded connections (WebSocket sessions), which the HTTP server no longer tracks:
    /// shutdown waits for them to send their close frames.
    sessions: tokio_util::task::TaskTracker,
}

impl HttpState {
    /// State for the handlers; `render_metrics` produces the Prometheus text.
    pub fn new(
        broker: Arc<Broker>,
        resp: Arc<ServerContext>,
        settings: HttpSettings,
        render_metrics: Arc<dyn Fn() -> String + Send + Sync>,
        shutdown: CancellationToken,
    ) -> HttpState {
        let (sse, ws): (Arc<StreamClients>, Arc<StreamClients>) = (Arc::default(), Arc::default());
        {
            let (sse, ws, resp) = (sse.clone(), ws.clone(), resp.clone());
            broker.set_connection_counter(Box::new(move || {
                [
                    ("resp".to_string(), resp.clients.len() as u64),
                    ("sse".to_string(), sse.len() as u64),
                    ("websocket".to_string(), ws.len() as u64),
                ]
                .into_iter()
                .collect()
            }));
        }
        HttpState {
            inner: Arc::new(Inner {
                broker,
                resp,
                settings,
                render_metrics,
                shutdown,
                sse,
                ws,
                sessions: tokio_util::task::TaskTracker::new(),
            }),
        }
    }

    /// Where publishes go.
    pub fn broker(&self) -> &Arc<Broker> {
        &self.inner.broker
    }

    /// The RESP server's shared state (for stats).
    pub fn resp(&self) -> &Arc<ServerContext> {
        &self.inner.resp
    }

    /// HTTP settings.
    pub fn settings(&self) -> &HttpSettings {
        &self.inner.settings
    }

    /// Cancelled when the node shuts down: streams end so clients move elsewhere.
    pub fn shutdown(&self) -> &CancellationToken {
        &self.inner.shutdown
    }

    /// Connected SSE clients.
    pub fn sse_clients(&self) -> &Arc<StreamClients> {
        &self.inner.sse
    }

    /// Connected WebSocket clients.
    pub fn ws_clients(&self) -> &Arc<StreamClients> {
        &self.inner.ws
    }

    /// Tracks a WebSocket session so shutdown waits for it.
    pub fn track<F: std::future::Future<Output = ()> + Send + 'static>(
        &self,
        session: F,
    ) -> tokio_util::task::task_tracker::TrackedFuture<F> {
        self.inner.sessions.track_future(session)
    }

    fn render_metrics(&self) -> String {
        (self.inner.render_metrics)()
    }
}

/// The HTTP routes.
pub fn router(state: HttpState) -> Router {
    let cors = cors_layer(&state.settings().cors_origins);
    let router = Router::new()
        .route("/health", get(ops::health))
        .route("/ready", get(ops::ready))
        .route("/metrics", get(ops::metrics))
        .route("/api/realtime/stats", get(ops::stats))
        .route("/api/cluster/status", get(cluster::status))
        .route(
            "/api/cluster/init",
            limited(post(cluster::init), body::Errors::Json),
        )
        .route(
            "/api/cluster/join",
            limited(post(cluster::join), body::Errors::Json),
        )
        .route(
            "/api/cluster/remove",
            limited(post(cluster::remove), body::Errors::Json),
        )
        .route(
            "/api/cluster/namespaces",
            get(cluster::namespaces)
                .merge(limited(post(cluster::set_namespaces), body::Errors::Json)),
        )
        .route(
            "/api/publish",
            limited(post(publish::publish), body::Errors::Text),
        )
        .route("/api/stream", get(sse::stream_query))
        .route("/api/stream/{endpoint}/{id}", get(sse::entity_stream))
        .route("/api/stream/council-score", get(sse::council_score))
        .route("/api/stream/evaluate-creative", get(sse::evaluate_creative))
        .route("/api/stream/{channel}", get(sse::stream_channel))
        .route("/ws", get(ws::connect))
        .route("/ws/alerts", get(ws::alerts))
        .fallback(not_found)
        .with_state(state);
    match cors {
        Some(cors) => router.layer(cors),
        None => router,
    }
}

/// `route` with its request body read first and held to [`body::MAX_BODY_BYTES`] (see
/// [`body`]), a body over it answered 413 in the words `errors` says.
fn limited(route: MethodRouter<HttpState>, errors: body::Errors) -> MethodRouter<HttpState> {
    route.layer(middleware::from_fn(move |request: Request, next: Next| {
        body::limit(errors, request, next)
    }))
}

/// A path no route takes: a 404, with a hint under `/api/stream/` (a channel name's `/` must
/// be sent as `%2F`: `/api/stream/a/b` is not the channel `a/b`), empty elsewhere as before.
async fn not_found(uri: axum::http::Uri) -> axum::response::Response {
    use axum::response::IntoResponse;
    if let Some(rest) = uri.path().strip_prefix("/api/stream/") {
        // `/api/stream/render-progress/` (an empty id): the id is missing, not misplaced.
        if let Some(missing) = rest.strip_suffix('/').and_then(sse::missing_id) {
            return missing;
        }
        return error_response(
            axum::http::StatusCode::NOT_FOUND,
            "no such stream: a channel name is one path segment, so send its '/' as %2F \
             (/api/stream/a%2Fb streams the channel a/b), or use /api/stream?channel=a%2Fb",
        );
    }
    axum::http::StatusCode::NOT_FOUND.into_response()
}

/// The address of the client a request came from (a request extension, set for every
/// request hyper serves).
#[derive(Clone, Copy, Debug)]
pub struct ClientAddr(pub std::net::SocketAddr);

/// The CORS layer for `origins` (none when empty).
pub(crate) fn cors_layer(origins: &[String]) -> Option<CorsLayer> {
    if origins.is_empty() {
        return None;
    }
    let any = origins.iter().any(|o| o == "*");
    let allow = if any {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| o.parse().ok()))
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([axum::http::Method::GET, axum::http::Method::POST])
            // Whatever headers the page's request carries (`Authorization` for a proxy in
            // front, `X-Request-ID`...): herald reads only its own and ignores the rest, and an
            // origin not allowed gets no `access-control-allow-origin`, so its preflight fails.
            .allow_headers(AllowHeaders::mirror_request())
            // Origins named one by one may send credentials (`new EventSource(url,
            // {withCredentials: true})`, `fetch` with `credentials: "include"`: the cookie of a
            // proxy that authenticates in front of herald); browsers never allow that with `*`.
            .allow_credentials(!any),
    )
}

/// Serves HTTP on `listener` until the node shuts down; open streams end at shutdown, and it
/// returns once every connection and WebSocket session has ended.
///
/// SSE requests are served directly on their sockets, everything else by hyper (see the
/// `listener` module for why and how).
pub async fn serve(listener: TcpListener, state: HttpState) -> std::io::Result<()> {
    let shutdown = state.shutdown().clone();
    let sessions = state.inner.sessions.clone();
    // Handlers become routes once (as `into_make_service` does) and every connection shares
    // them: `axum::serve` with a plain router copied its route tables into each connection
    // (27 -> 20 KiB of RSS per idle SSE connection, measured).
    let router = router(state).with_state(());
    listener::run(listener, router, shutdown).await;
    sessions.close();
    sessions.wait().await;
    Ok(())
}

/// A one-line plain-text error response.
pub(crate) fn error_response(
    status: axum::http::StatusCode,
    message: impl Into<String>,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let mut text = message.into();
    text.push('\n');
    (
        status,
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::test_node;
    use super::*;

    #[test]
    fn queries_decode_as_forms_and_refuse_what_is_not_utf8() {
        let pairs = query_params(Some(
            "channel=a%2Fb&channel=x+y&&last=3&flag&pct=100%&e=%C3%A9",
        ))
        .unwrap();
        let expected = [
            ("channel", "a/b"),
            ("channel", "x y"),
            ("last", "3"),
            ("flag", ""),
            ("pct", "100%"),
            ("e", "é"),
        ];
        assert_eq!(pairs, expected.map(|(k, v)| (k.to_string(), v.to_string())));
        assert_eq!(query_params(None).unwrap(), Vec::new());
        assert_eq!(
            query_params(Some("channel=%FF")).unwrap_err(),
            "invalid query: channel= is not UTF-8 once percent-decoded"
        );
        assert!(query_params(Some("%FF=1")).is_err());
    }

    /// A browser's preflight for a request with headers of its own (`Authorization`,
    /// `X-Request-ID`) is allowed for an allowed origin: only `content-type` and
    /// `last-event-id` were, so such a `fetch` failed CORS.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn preflights_allow_the_headers_they_ask_for_on_allowed_origins() {
        let settings = HttpSettings {
            cors_origins: vec!["https://app.example.com".to_string()],
            ..HttpSettings::default()
        };
        let node = test_node::start("cors", settings).await;
        let client = reqwest::Client::new();
        let url = format!("http://{}/api/publish", node.addr);
        let preflight = |origin: &str| {
            client
                .request(reqwest::Method::OPTIONS, &url)
                .header("origin", origin)
                .header("access-control-request-method", "POST")
                .header(
                    "access-control-request-headers",
                    "authorization,content-type,x-request-id",
                )
                .send()
        };
        let allowed = preflight("https://app.example.com").await.unwrap();
        assert!(allowed.status().is_success(), "{}", allowed.status());
        let headers = allowed.headers();
        assert_eq!(
            headers["access-control-allow-origin"],
            "https://app.example.com"
        );
        let allowed_headers = headers["access-control-allow-headers"].to_str().unwrap();
        for name in ["authorization", "content-type", "x-request-id"] {
            assert!(allowed_headers.contains(name), "{name}: {allowed_headers}");
        }
        assert!(
            headers["access-control-allow-methods"]
                .to_str()
                .unwrap()
                .contains("POST")
        );
        // Another origin is not allowed: without `access-control-allow-origin` the browser
        // fails its preflight whatever else the answer says.
        let other = preflight("https://evil.example").await.unwrap();
        assert!(!other.headers().contains_key("access-control-allow-origin"));

        // The request itself, as the browser then sends it.
        let publish = client
            .post(&url)
            .header("origin", "https://app.example.com")
            .header("authorization", "Bearer t")
            .header("x-request-id", "r-1")
            .header("content-type", "application/json")
            .body(r#"{"channel":"cors","data":"hi"}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(publish.status(), 200);
        assert_eq!(
            publish.headers()["access-control-allow-origin"],
            "https://app.example.com"
        );
    }

    #[test]
    fn single_valued_parameters_are_refused_twice_and_an_empty_last_is_none() {
        let params = query_params(Some("last=3&channel=a&channel=b&lastEventId=x")).unwrap();
        assert_eq!(single_param(&params, "last").unwrap(), Some("3"));
        assert_eq!(single_param(&params, "cursor").unwrap(), None);
        assert_eq!(last_param(&params).unwrap(), Some(3));
        assert_eq!(
            single_param(&params, "channel").unwrap_err(),
            "invalid query: channel= is given more than once (it takes one value)"
        );
        for query in ["", "last=", "last=+", "other=1"] {
            let params = query_params(Some(query)).unwrap();
            assert_eq!(last_param(&params).unwrap(), None, "{query}");
        }
        for query in ["last=1&last=2", "last=&last=", "last=x"] {
            assert!(
                last_param(&query_params(Some(query)).unwrap()).is_err(),
                "{query}"
            );
        }
    }
}
