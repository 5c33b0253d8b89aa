//! Operations endpoints: `/api/realtime/stats` (the seed's JSON shape, with herald's additions),
//! `/health`, `/ready` and `/metrics` (Prometheus).

use super::HttpState;
use crate::hub::Kind;
use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use std::sync::atomic::Ordering;
use std::time::UNIX_EPOCH;

/// `GET /health`: the process is up, and which build it runs (`version`, `commit`).
pub async fn health() -> Json<Value> {
    Json(json!({
        "status": "healthy",
        "version": crate::build::VERSION,
        "commit": crate::build::COMMIT,
    }))
}

/// `GET /ready`: 200 while the node accepts clients and (in a cluster) can commit; 503 once it
/// is shutting down, before the cluster is formed, on the minority side of a partition, once
/// removed from its cluster, after a write to its store failed (a full disk), once one of
/// its Raft groups stopped (only a restart recovers these two), and while it applies the
/// backlog of a restart or a silence (catching up); the body says which.
pub async fn ready(State(state): State<HttpState>) -> Response {
    if state.shutdown().is_cancelled() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "shutting down" })),
        )
            .into_response()
    } else if let Some(failure) = state.broker().failure() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": failure.message })),
        )
            .into_response()
    } else if state
        .broker()
        .cluster()
        .is_some_and(|node| node.is_removed())
    {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "removed from the cluster: this node is no longer a member and commits nothing; stop it and delete its data directory, or join it again with `herald cluster join`" })),
        )
            .into_response()
    } else if let Some(refused) = state
        .broker()
        .cluster()
        .and_then(|node| node.store_refused())
    {
        // Publishes sent here are still committed by the members (forwarded): what the node
        // cannot do is serve history or streams.
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({
                "status": format!("{refused}; this node serves no stream or history until it is removed and joined again")
            })),
        )
            .into_response()
    } else if let Some(problem) = state.broker().unready() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({
                "status": format!("{problem}; durable publishes cannot commit on this node")
            })),
        )
            .into_response()
    } else if let Some(behind) = state.broker().cluster().and_then(|node| node.catching_up()) {
        // It commits, but the events it applies now are old: a subscription made here
        // waits until it has applied them, so clients are better sent elsewhere meanwhile.
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({
                "status": format!("{behind}; subscriptions made here wait until it has")
            })),
        )
            .into_response()
    } else if let Some(problem) = state.broker().degraded() {
        // Partitions that commit nowhere this node reaches: it serves its clients as well as
        // any member could, so it stays in the balancer's rotation, saying what is out.
        Json(json!({
            "status": "ready",
            "degraded": format!("{problem}; no member this node reaches commits it either: publishes to it fail and its streams wait until it commits again")
        }))
        .into_response()
    } else {
        Json(json!({ "status": "ready" })).into_response()
    }
}

/// `GET /api/realtime/stats`.
pub async fn stats(State(state): State<HttpState>) -> Json<Value> {
    // Channels with subscribers anywhere in the cluster (this node's alone when single).
    let channels = state.broker().active_names(Kind::Channel, None);
    let subscriptions = state.broker().total_channel_subscriptions();
    let describe = |clients: &super::StreamClients, prefix: &str| {
        clients.with_clients(|clients| {
            clients
                .iter()
                .map(|(id, c)| {
                    json!({
                        "clientId": format!("{prefix}{id}"),
                        "userId": c.user_id,
                        "channels": c.channels.iter().map(|ch| String::from_utf8_lossy(ch).into_owned()).collect::<Vec<_>>(),
                        "connectedAt": c.connected_at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64),
                        "eventsSent": c.events_sent.load(Ordering::Relaxed),
                    })
                })
                .collect::<Vec<_>>()
        })
    };
    let history = state.broker().store().channel_stats();
    // Why the node cannot commit, as `/ready` says it: its storage or a Raft group failed;
    // no quorum, not formed, refused, removed.
    let failure = state.broker().failure();
    let unready = match &failure {
        Some(failure) => Some(failure.message.clone()),
        None => state.broker().unready(),
    };
    // Some partitions commit nowhere this node reaches (see `/ready`).
    let degraded = unready
        .is_none()
        .then(|| state.broker().degraded())
        .flatten();
    // Connected and committing, but still applying a backlog (see `/ready`).
    let catching_up = unready
        .is_none()
        .then(|| state.broker().cluster().and_then(|node| node.catching_up()))
        .flatten();
    Json(json!({
        "status": if state.shutdown().is_cancelled() {
            "shutting down"
        } else if let Some(failure) = &failure {
            failure.status()
        } else if unready.is_some() {
            "unavailable"
        } else if catching_up.is_some() {
            "catching up"
        } else if degraded.is_some() {
            "degraded"
        } else {
            "healthy"
        },
        "reason": unready
            .clone()
            .or_else(|| catching_up.map(|behind| behind.to_string()))
            .or(degraded),
        "sse": {
            "totalConnections": state.sse_clients().len(),
            "totalEvents": state.sse_clients().total_events.load(Ordering::Relaxed),
            "clients": describe(state.sse_clients(), "sse_"),
        },
        "websocket": {
            "totalConnections": state.ws_clients().len(),
            "totalEvents": state.ws_clients().total_events.load(Ordering::Relaxed),
            "clients": describe(state.ws_clients(), "ws_"),
        },
        "resp": { "totalConnections": state.resp().clients.len() },
        "channels": {
            // The seed's connection to its one Redis; here, to a quorum of the cluster.
            "isConnected": unready.is_none(),
            "activeChannels": channels.len(),
            "totalSubscriptions": subscriptions,
            "redisSubscriptions": channels.len(),
            "channels": channels.iter().map(|c| String::from_utf8_lossy(c).into_owned()).collect::<Vec<_>>(),
        },
        "history": { "channels": history.channels, "events": history.events },
        "node": { "epoch": state.broker().epoch().to_string(), "partitions": state.broker().store().partitions() },
        "cluster": state.broker().cluster_connections().map(|(nodes, connections)| json!({
            "nodes": nodes,
            "totalConnections": connections,
            "nodeId": state.broker().cluster().map(|c| c.id()),
        })),
    }))
}

/// `GET /metrics`: Prometheus text format.
pub async fn metrics(State(state): State<HttpState>) -> Response {
    let hub = state.broker().hub();
    let stats = hub.stats();
    let broker = state.broker().stats();
    // Prometheus's build-info idiom: 1, with the build in its labels.
    metrics::gauge!("herald_build_info", "version" => crate::build::VERSION, "commit" => crate::build::COMMIT)
        .set(1.0);
    metrics::gauge!("herald_connections", "protocol" => "resp")
        .set(state.resp().clients.len() as f64);
    metrics::gauge!("herald_connections", "protocol" => "sse")
        .set(state.sse_clients().len() as f64);
    metrics::gauge!("herald_connections", "protocol" => "websocket")
        .set(state.ws_clients().len() as f64);
    metrics::counter!("herald_published_total", "durability" => "durable")
        .absolute(broker.durable_published.load(Ordering::Relaxed));
    metrics::counter!("herald_published_total", "durability" => "transient")
        .absolute(broker.transient_published.load(Ordering::Relaxed));
    metrics::counter!("herald_publish_duplicates_total")
        .absolute(broker.duplicates.load(Ordering::Relaxed));
    metrics::counter!("herald_publish_failures_total")
        .absolute(broker.failed.load(Ordering::Relaxed));
    metrics::counter!("herald_delivered_total").absolute(stats.delivered.load(Ordering::Relaxed));
    // Events sent from history (resumes, `last=N`, `HSUBSCRIBE` replays, `HISTORY`), which
    // `herald_delivered_total` (live delivery) does not count.
    metrics::counter!("herald_replayed_total").absolute(stats.replayed.load(Ordering::Relaxed));
    // Writes and syncs of the write-ahead logs past half a second: a slow or stalled disk.
    metrics::counter!("herald_disk_slow_operations_total")
        .absolute(herald_storage::io_watch::slow_operations());
    metrics::counter!("herald_dropped_clients_total")
        .absolute(stats.slow_clients_closed.load(Ordering::Relaxed));
    let history = state.broker().store().channel_stats();
    metrics::gauge!("herald_history_events").set(history.events as f64);
    metrics::gauge!("herald_history_channels").set(history.channels as f64);
    metrics::gauge!("herald_store_unwritten_bytes")
        .set(state.broker().store().unwritten_bytes() as f64);
    let failure = state.broker().failure();
    let catching_up = state
        .broker()
        .cluster()
        .is_some_and(|node| node.catching_up().is_some());
    let ready = !state.shutdown().is_cancelled()
        && failure.is_none()
        && state.broker().is_ready()
        && !catching_up;
    metrics::gauge!("herald_ready").set(f64::from(u8::from(ready)));
    metrics::gauge!("herald_storage_failed").set(f64::from(u8::from(
        failure.as_ref().is_some_and(|f| f.storage),
    )));
    // A Raft group stopped for another cause than its storage (its Raft task panicked).
    metrics::gauge!("herald_raft_group_stopped").set(f64::from(u8::from(
        failure.as_ref().is_some_and(|f| !f.storage),
    )));
    if let Some(node) = state.broker().cluster() {
        // Applying the backlog of a restart or a silence (what `/ready` says).
        metrics::gauge!("herald_cluster_catching_up").set(f64::from(u8::from(catching_up)));
        cluster_metrics(node);
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.render_metrics(),
    )
        .into_response()
}

/// The cluster as Prometheus sees it, from this node's view (`herald cluster status` in
/// numbers): quorum, clocks, and per Raft group (`group` 0 is the meta group, `group` p+1 partition
/// p) its term, leader, log and apply positions, elections this node called, and (on the
/// leader) each follower's lag in entries.
fn cluster_metrics(node: &herald_cluster::node::ClusterNode) {
    metrics::gauge!("herald_cluster_formed").set(f64::from(u8::from(node.is_formed())));
    metrics::gauge!("herald_cluster_has_quorum").set(f64::from(u8::from(node.has_quorum())));
    // Subscriptions that waited for the other members to learn their interest, the waits
    // that gave up (a member did not answer in time), and interest pushes sent.
    let sync = node.interest_sync();
    metrics::counter!("herald_interest_syncs_total")
        .absolute(sync.requests.load(Ordering::Relaxed));
    metrics::counter!("herald_interest_sync_timeouts_total")
        .absolute(sync.timeouts.load(Ordering::Relaxed));
    metrics::counter!("herald_interest_pushes_total").absolute(sync.pushes.load(Ordering::Relaxed));
    // Non-durable events between nodes: queued for a peer with interest, acknowledged by it,
    // dropped on a full queue, lost with a failed call, and received from peers.
    let relayed = &node.interest().relayed;
    for (outcome, count) in [
        ("queued", &relayed.queued),
        ("sent", &relayed.sent),
        ("dropped", &relayed.dropped),
        ("failed", &relayed.failed),
        ("received", &relayed.received),
    ] {
        metrics::counter!("herald_transient_relay_events_total", "outcome" => outcome)
            .absolute(count.load(Ordering::Relaxed));
    }
    let status = node.status();
    metrics::gauge!("herald_cluster_members").set(status.members.len() as f64);
    // Clocks: what this node adds to its own to propose with the majority's time (0 when it
    // agrees), and each member's measured offset (its clock minus this node's).
    metrics::gauge!("herald_clock_correction_ms").set(status.clock_correction_ms as f64);
    for (peer, link) in &status.links {
        if let Some(offset) = link.clock_offset_ms {
            metrics::gauge!("herald_peer_clock_offset_ms", "peer" => peer.to_string())
                .set(offset as f64);
        }
        // The connection this node calls the peer over: its round trip, and the datagrams it
        // took and lost (counted from the connection's start, so a reconnect resets them).
        if let Some(rtt) = link.rtt_us {
            metrics::gauge!("herald_peer_rtt_seconds", "peer" => peer.to_string())
                .set(rtt as f64 / 1e6);
        }
        if let Some(datagrams) = link.datagrams {
            for (direction, count) in [("sent", datagrams.sent), ("received", datagrams.received)] {
                metrics::counter!("herald_peer_datagrams_total", "peer" => peer.to_string(), "direction" => direction)
                    .absolute(count);
            }
            metrics::counter!("herald_peer_lost_packets_total", "peer" => peer.to_string())
                .absolute(datagrams.lost);
        }
    }
    for g in &status.groups {
        let group = g.group.to_string();
        let leader = g.leader.map_or(-1.0, |l| l as f64);
        metrics::gauge!("herald_raft_term", "group" => group.clone()).set(g.term as f64);
        metrics::gauge!("herald_raft_leader", "group" => group.clone()).set(leader);
        metrics::gauge!("herald_raft_is_leader", "group" => group.clone())
            .set(f64::from(u8::from(g.leader == Some(status.node))));
        metrics::gauge!("herald_raft_last_log_index", "group" => group.clone())
            .set(g.last_log_index.unwrap_or(0) as f64);
        metrics::gauge!("herald_raft_applied_index", "group" => group.clone())
            .set(g.applied_index.unwrap_or(0) as f64);
        metrics::counter!("herald_raft_elections_called_total", "group" => group.clone())
            .absolute(g.elections_called);
        for (peer, lag) in &g.lag {
            metrics::gauge!("herald_raft_follower_lag_entries", "group" => group.clone(), "peer" => peer.to_string())
                .set(*lag as f64);
        }
    }
}
