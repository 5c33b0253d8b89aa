//! Cluster operations over HTTP, what `herald cluster status | init | join | remove |
//! namespaces` calls: `GET /api/cluster/status`, `POST /api/cluster/init`,
//! `POST /api/cluster/join` (`{"nodeId": N, "addr": "host:port"}`), `POST /api/cluster/remove`
//! (`{"nodeId": N}`; `"force": true` to remove a node even where the voters left would have no
//! live quorum, which is otherwise refused with 409), `GET /api/cluster/namespaces` (the namespace config in force) and
//! `POST /api/cluster/namespaces` (a TOML body with `[namespace.NAME]` tables: the cluster's
//! new namespace config).
//!
//! When the node has a password (`--requirepass`), these need `Authorization: Bearer <password>`;
//! without one, protected mode (the default) takes the changes (init, join, remove, new
//! namespaces) from loopback only (403 otherwise), as it takes Redis clients.
//! On a single node they answer 409 with a one-line reason. The `POST` bodies are held to 2 MiB
//! as the publish API's are (see [`super::body`]), before anything else is checked: over it, a
//! 413 with `{"error"}`.

use super::{ClientAddr, HttpState};
use axum::extract::State;
use axum::extract::rejection::JsonRejection;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use herald_cluster::message::ProposeError;
use herald_cluster::node::{ClusterNode, InitError};
use serde::Deserialize;
use serde_json::json;

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

/// The cluster node, after checking the password; or the error response.
fn cluster(state: &HttpState, headers: &HeaderMap) -> Result<ClusterNode, Box<Response>> {
    let password = state.resp().settings.read().requirepass.clone();
    if let Some(password) = password {
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if given != Some(password.as_str()) {
            return Err(Box::new(error(
                StatusCode::UNAUTHORIZED,
                "cluster operations need Authorization: Bearer <requirepass>",
            )));
        }
    }
    state.broker().cluster().cloned().ok_or_else(|| {
        Box::new(error(
            StatusCode::CONFLICT,
            "this node runs alone (start it with --node-id and --tls-dir to cluster it)",
        ))
    })
}

/// What a cluster change (init, join, remove, namespaces) needs beyond [`cluster`]: without a
/// password, protected mode (on by default, as for Redis clients) takes changes from loopback
/// only. The HTTP port also serves browsers, and anyone reaching it could otherwise remove
/// members or change the namespaces (an operator's finding). `herald cluster` run on a node
/// (or through `docker compose exec`, `kubectl exec`) comes from loopback.
fn change_allowed(
    state: &HttpState,
    client: Option<Extension<ClientAddr>>,
) -> Result<(), Box<Response>> {
    let settings = state.resp().settings.read();
    if settings.requirepass.is_some() || !settings.protected_mode {
        return Ok(());
    }
    if client.is_some_and(|Extension(ClientAddr(addr))| addr.ip().is_loopback()) {
        return Ok(());
    }
    Err(Box::new(error(
        StatusCode::FORBIDDEN,
        "cluster changes are taken from loopback only while the node has no password (protected mode): run `herald cluster` on a node, or set --requirepass (then pass --password), or --protected-mode no",
    )))
}

/// `GET /api/cluster/status`.
pub async fn status(State(state): State<HttpState>, headers: HeaderMap) -> Response {
    match cluster(&state, &headers) {
        Ok(node) => Json(node.status()).into_response(),
        Err(response) => *response,
    }
}

/// `POST /api/cluster/init`: 200 once formed; 409 on a cluster formed already (nothing
/// changed); 503 when forming failed.
pub async fn init(
    State(state): State<HttpState>,
    client: Option<Extension<ClientAddr>>,
    headers: HeaderMap,
) -> Response {
    if let Err(response) = change_allowed(&state, client) {
        return *response;
    }
    let node = match cluster(&state, &headers) {
        Ok(node) => node,
        Err(response) => return *response,
    };
    match node.init().await {
        Ok(()) => Json(json!({ "status": "formed", "members": node.members() })).into_response(),
        // Nothing to do is not what was asked: a 409, which the CLI turns into exit code 1.
        Err(
            e @ (InitError::AlreadyFormed { .. }
            | InitError::FormedCatchingUp { .. }
            | InitError::FormedWithoutThisNode { .. }),
        ) => error(StatusCode::CONFLICT, e.to_string()),
        Err(InitError::Failed(e)) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

/// Body of join and remove.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MemberRequest {
    node_id: u64,
    #[serde(default)]
    addr: Option<String>,
    /// A removal that would leave groups without a live quorum goes ahead anyway (see
    /// `ClusterNode::removal_stalls`).
    #[serde(default)]
    force: bool,
}

/// A join or remove body, after the password check; or the error response.
fn member_request(
    state: &HttpState,
    headers: &HeaderMap,
    body: Result<Json<MemberRequest>, JsonRejection>,
    expected: &str,
) -> Result<(ClusterNode, MemberRequest), Box<Response>> {
    let node = cluster(state, headers)?;
    match body {
        Ok(Json(request)) => Ok((node, request)),
        Err(_) => Err(Box::new(error(
            StatusCode::BAD_REQUEST,
            format!("expected {expected}"),
        ))),
    }
}

/// The reply to a membership change.
fn changed(outcome: Result<(), ProposeError>, status: &str, node_id: u64) -> Response {
    match outcome {
        Ok(()) => Json(json!({ "status": status, "nodeId": node_id })).into_response(),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

/// `POST /api/cluster/join`.
pub async fn join(
    State(state): State<HttpState>,
    client: Option<Extension<ClientAddr>>,
    headers: HeaderMap,
    body: Result<Json<MemberRequest>, JsonRejection>,
) -> Response {
    let expected = "{\"nodeId\": N, \"addr\": \"host:port\"}";
    if let Err(response) = change_allowed(&state, client) {
        return *response;
    }
    let (node, request) = match member_request(&state, &headers, body, expected) {
        Ok(parts) => parts,
        Err(response) => return *response,
    };
    let Some(addr) = request.addr else {
        return error(
            StatusCode::BAD_REQUEST,
            "join needs \"addr\": the new node's cluster address",
        );
    };
    changed(
        node.join(request.node_id, addr).await,
        "joined",
        request.node_id,
    )
}

/// `POST /api/cluster/remove`.
pub async fn remove(
    State(state): State<HttpState>,
    client: Option<Extension<ClientAddr>>,
    headers: HeaderMap,
    body: Result<Json<MemberRequest>, JsonRejection>,
) -> Response {
    if let Err(response) = change_allowed(&state, client) {
        return *response;
    }
    let (node, request) = match member_request(&state, &headers, body, "{\"nodeId\": N}") {
        Ok(parts) => parts,
        Err(response) => return *response,
    };
    if !request.force
        && let Some(why) = node.removal_stalls(request.node_id)
    {
        return error(StatusCode::CONFLICT, why);
    }
    changed(
        node.remove(request.node_id).await,
        "removed",
        request.node_id,
    )
}

/// `GET /api/cluster/namespaces`: the namespace config in force on this node, where it comes
/// from (`cluster`: the meta group's; `node`: this node's file, the cluster holding none), and
/// this node's file config when it differs.
pub async fn namespaces(State(state): State<HttpState>, headers: HeaderMap) -> Response {
    let node = match cluster(&state, &headers) {
        Ok(node) => node,
        Err(response) => return *response,
    };
    let live = node.namespaces();
    let local = live.local();
    let body = match live.cluster() {
        Some(cluster) => json!({
            "source": "cluster",
            "config": cluster.to_toml(),
            "nodeFileDiffers": *cluster != **local,
            "nodeFile": local.to_toml(),
        }),
        None => json!({
            "source": "node",
            "config": local.to_toml(),
            "nodeFileDiffers": false,
            "nodeFile": local.to_toml(),
        }),
    };
    Json(body).into_response()
}

/// `POST /api/cluster/namespaces`: makes the body's `[namespace.NAME]` tables the cluster's
/// namespace config (400 with the reason if they do not parse).
pub async fn set_namespaces(
    State(state): State<HttpState>,
    client: Option<Extension<ClientAddr>>,
    headers: HeaderMap,
    body: String,
) -> Response {
    if let Err(response) = change_allowed(&state, client) {
        return *response;
    }
    let node = match cluster(&state, &headers) {
        Ok(node) => node,
        Err(response) => return *response,
    };
    let namespaces = match herald_storage::Namespaces::from_toml(&body) {
        Ok(namespaces) => namespaces,
        Err(reason) => return error(StatusCode::BAD_REQUEST, reason),
    };
    match node.set_namespaces(&namespaces).await {
        Ok(()) => Json(json!({ "status": "set", "config": namespaces.to_toml() })).into_response(),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::super::{ClientAddr, HttpSettings, router, test_node};
    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use tower::ServiceExt;

    /// The status a cluster change gets from a client at `from`.
    async fn remove_from(node: &test_node::TestNode, from: &str) -> StatusCode {
        let mut request = Request::post("/api/cluster/remove")
            .header("content-type", "application/json")
            .body(Body::from(r#"{"nodeId": 3}"#))
            .unwrap();
        request
            .extensions_mut()
            .insert(ClientAddr(from.parse().unwrap()));
        router(node.state.clone())
            .with_state(())
            .oneshot(request)
            .await
            .unwrap()
            .status()
    }

    /// Without a password, protected mode takes cluster changes from loopback only (a single
    /// node then says it runs alone: 409); with one, or with protected mode off, from anywhere
    /// (the password is checked next).
    #[tokio::test]
    async fn cluster_changes_without_a_password_come_from_loopback_only() {
        let node = test_node::start("cluster-changes", HttpSettings::default()).await;
        assert_eq!(
            remove_from(&node, "192.0.2.9:40000").await,
            StatusCode::FORBIDDEN
        );
        assert_eq!(
            remove_from(&node, "127.0.0.1:40000").await,
            StatusCode::CONFLICT
        );
        assert_eq!(
            remove_from(&node, "[::1]:40000").await,
            StatusCode::CONFLICT
        );
        node.state.resp().settings.write().requirepass = Some("secret".into());
        assert_eq!(
            remove_from(&node, "192.0.2.9:40000").await,
            StatusCode::UNAUTHORIZED
        );
        node.state.resp().settings.write().requirepass = None;
        node.state.resp().settings.write().protected_mode = false;
        assert_eq!(
            remove_from(&node, "192.0.2.9:40000").await,
            StatusCode::CONFLICT
        );
    }
}
