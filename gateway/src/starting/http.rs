//! The HTTP port while the node starts: one start-up answer per connection (see the module
//! above for which).

use super::{Answered, STARTING};
use crate::http::HttpSettings;
use crate::reconnect::reconnect_event;
use axum::Router;
use axum::body::Body;
use axum::extract::FromRequest;
use axum::extract::ws::{CloseFrame, Message, WebSocketUpgrade};
use axum::http::{HeaderValue, Method, Request, StatusCode, header};
use axum::response::{IntoResponse, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// How long a connection may take to send its request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(30);

/// Accepts HTTP connections on `listener` and answers one request on each with `router` until
/// `ready` is cancelled; then returns the listener. Connections accepted by then still get
/// their answer.
pub(super) async fn answer(
    listener: TcpListener,
    router: Router,
    ready: CancellationToken,
) -> TcpListener {
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    tracing::warn!(%error, "accepting an HTTP client failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = ready.cancelled() => break,
        };
        tokio::spawn(serve(stream, router.clone()));
    }
    listener
}

/// Serves one connection with hyper, upgrades allowed (for the WebSocket close).
async fn serve(stream: TcpStream, router: Router) {
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEAD_TIMEOUT);
    let served = builder
        .serve_connection_with_upgrades(TokioIo::new(stream), TowerToHyperService::new(router))
        .await;
    if let Err(error) = served {
        tracing::trace!("HTTP connection failed while starting: {error:#}");
    }
}

/// Every request goes to [`respond`], with the node's CORS headers.
pub(super) fn router(settings: &HttpSettings, answered: Arc<Answered>) -> Router {
    let retry = settings.retry;
    let router = Router::new().fallback(move |request: Request<Body>| {
        answered.http_requests.fetch_add(1, Ordering::Relaxed);
        respond(request, retry)
    });
    match crate::http::cors_layer(&settings.cors_origins) {
        Some(cors) => router.layer(cors),
        None => router,
    }
}

/// The start-up answer to `request`; `retry` is the SSE reconnection delay.
async fn respond(request: Request<Body>, retry: Duration) -> Response {
    let path = request.uri().path();
    let get = request.method() == Method::GET;
    let mut response = match path {
        "/health" if get => axum::Json(json!({ "status": "starting" })).into_response(),
        "/ready" if get => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({ "status": "starting: loading the event store" })),
        )
            .into_response(),
        "/ws" | "/ws/alerts" if get => {
            match WebSocketUpgrade::from_request(request, &()).await {
                // The upgrade response keeps its own `Connection: upgrade`.
                Ok(upgrade) => return upgrade.on_upgrade(close_websocket),
                Err(_) => unavailable(),
            }
        }
        _ if get && (path == "/api/stream" || path.starts_with("/api/stream/")) => {
            let mut body = format!("retry: {}\n", retry.as_millis()).into_bytes();
            body.extend_from_slice(&reconnect_event(
                "this node is starting (loading its event store): reconnect in a moment with your Last-Event-ID",
            ));
            (
                [
                    (header::CONTENT_TYPE, "text/event-stream"),
                    (header::CACHE_CONTROL, "no-cache"),
                ],
                body,
            )
                .into_response()
        }
        _ => unavailable(),
    };
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// A 503 with `Retry-After: 1` and the one-line reason.
fn unavailable() -> Response {
    let mut response =
        crate::http::error_response(StatusCode::SERVICE_UNAVAILABLE, STARTING.to_string());
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    response
}

/// Closes an accepted WebSocket with 1012 ("service restart") and the reason.
async fn close_websocket(mut socket: axum::extract::ws::WebSocket) {
    let frame = CloseFrame {
        code: 1012,
        reason: "this node is starting: reconnect in a moment and resume from your cursor".into(),
    };
    if socket.send(Message::Close(Some(frame))).await.is_ok() {
        // Let the client's close frame come back, briefly, so the close is a clean one.
        let _ = tokio::time::timeout(Duration::from_secs(1), socket.recv()).await;
    }
}
