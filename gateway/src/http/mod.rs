//! The HTTP surface (axum). Today: liveness and readiness probes; the SSE, WebSocket, publish
//! and stats endpoints of the seed API are built on this router.

use axum::Json;
use axum::Router;
use axum::routing::get;
use serde_json::json;
use std::future::Future;
use tokio::net::TcpListener;

/// The HTTP routes.
pub fn router() -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
}

/// `GET /health`: the process is up and serving.
async fn health() -> Json<serde_json::Value> {
    Json(json!({ "status": "healthy" }))
}

/// `GET /ready`: the node accepts clients (a single node is ready once it listens).
async fn ready() -> Json<serde_json::Value> {
    Json(json!({ "status": "ready" }))
}

/// Serves HTTP on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router())
        .with_graceful_shutdown(shutdown)
        .await
}
