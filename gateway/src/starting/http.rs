//! The HTTP port while the node starts: one start-up answer per connection (see the module
//! above for which).

use super::{Answered, STARTING};
use crate::http::HttpSettings;
use crate::http::listener::{accept_failed, is_sse_path, serve_hyper};
use crate::reconnect::reconnect_body;
use axum::Router;
use axum::body::Body;
use axum::extract::FromRequest;
use axum::extract::ws::{CloseFrame, Message, WebSocketUpgrade};
use axum::http::{HeaderValue, Method, Request, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Accepts HTTP connections on `listener` and answers one request on each with `router` until
/// `ready` is cancelled; then returns the listener. Connections accepted by then still get
/// their answer.
pub(super) async fn answer(
    listener: TcpListener,
    router: Router,
    ready: CancellationToken,
) -> TcpListener {
    // Connections already accepted keep their own (never cancelled) token: they get their
    // one answer after `ready` too.
    let connections = CancellationToken::new();
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    accept_failed(error, &ready).await;
                    continue;
                }
            },
            _ = ready.cancelled() => break,
        };
        // With hyper as the node serves it (upgrades allowed, for the WebSocket close).
        tokio::spawn(serve_hyper(stream, router.clone(), connections.clone()));
    }
    listener
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
        "/health" if get => axum::Json(json!({
            "status": "starting",
            "version": crate::build::VERSION,
            "commit": crate::build::COMMIT,
        }))
        .into_response(),
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
        _ if get && is_sse_path(path) => {
            let body = reconnect_body(
                retry,
                "this node is starting (loading its event store): reconnect in a moment with your Last-Event-ID",
            );
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
