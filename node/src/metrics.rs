//! Prometheus metrics: installs the recorder the gateway's `metrics` calls report to, with
//! histogram buckets (so latencies are histograms, not summaries) and periodic upkeep.

use anyhow::{Context, Result};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::sync::Arc;
use std::time::Duration;

/// The installed recorder.
pub struct Metrics {
    handle: PrometheusHandle,
}

/// Publish-to-commit latency buckets, in seconds: 100 µs to 5 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

impl Metrics {
    /// Installs the global recorder. Must run inside a Tokio runtime (for the upkeep task).
    pub fn install() -> Result<Metrics> {
        let handle = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".to_string()), LATENCY_BUCKETS)
            .context("invalid metrics buckets")?
            .install_recorder()
            .context("cannot install the metrics recorder")?;
        describe();
        let upkeep = handle.clone();
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(Duration::from_secs(5));
            loop {
                ticker.tick().await;
                upkeep.run_upkeep();
            }
        });
        Ok(Metrics { handle })
    }

    /// Renders the Prometheus text format (what `/metrics` serves).
    pub fn renderer(&self) -> Arc<dyn Fn() -> String + Send + Sync> {
        let handle = self.handle.clone();
        Arc::new(move || handle.render())
    }
}

/// Gives every metric herald reports its `# HELP` line (and unit): what an operator reads
/// next to the number. A metric named here but never reported is not rendered.
fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    // Clients and events.
    describe_gauge!(
        "herald_connections",
        Unit::Count,
        "Open client connections, by protocol (resp, sse, websocket)."
    );
    describe_counter!(
        "herald_published_total",
        Unit::Count,
        "Events published through this node (committed, for durable namespaces)."
    );
    describe_counter!(
        "herald_publish_duplicates_total",
        Unit::Count,
        "Publishes answered as duplicates of an earlier one with the same message id."
    );
    describe_counter!(
        "herald_publish_failures_total",
        Unit::Count,
        "Publishes refused or failed (nothing committed, or outcome unknown), by reason."
    );
    describe_histogram!(
        "herald_publish_commit_seconds",
        Unit::Seconds,
        "Time from a publish's arrival to its commit (on disk, on a quorum in a cluster)."
    );
    describe_counter!(
        "herald_delivered_total",
        Unit::Count,
        "Live events delivered to clients (one per client an event reached)."
    );
    describe_counter!(
        "herald_replayed_total",
        Unit::Count,
        "Events sent to clients from history: resumes, last=N, HSUBSCRIBE, HISTORY replies."
    );
    describe_counter!(
        "herald_dropped_clients_total",
        Unit::Count,
        "Clients cut off for falling behind their output limit (they resume from their cursor)."
    );
    // History and storage.
    describe_gauge!(
        "herald_history_events",
        Unit::Count,
        "Events retained in the durable history."
    );
    describe_gauge!(
        "herald_history_channels",
        Unit::Count,
        "Channels with retained history."
    );
    describe_gauge!(
        "herald_store_unwritten_bytes",
        Unit::Bytes,
        "Recent writes held in memory (safe in the write-ahead log) until the next checkpoint."
    );
    describe_counter!(
        "herald_disk_slow_operations_total",
        Unit::Count,
        "Disk writes and syncs of the store that took over 500 ms."
    );
    describe_gauge!(
        "herald_storage_failed",
        "1 once a write to the store failed (a full disk): restart the node to recover."
    );
    describe_gauge!(
        "herald_ready",
        "1 while /ready answers 200 (the node accepts clients and can commit)."
    );
    describe_gauge!(
        "herald_build_info",
        "Always 1; the labels name the running build (version, commit)."
    );
    // Cluster.
    describe_gauge!(
        "herald_cluster_formed",
        "1 once this node is in a formed cluster."
    );
    describe_gauge!(
        "herald_cluster_has_quorum",
        "1 while every Raft group can commit on this node."
    );
    describe_gauge!(
        "herald_cluster_catching_up",
        "1 while this node applies a backlog committed while it was down or cut off."
    );
    describe_gauge!(
        "herald_cluster_members",
        Unit::Count,
        "Members of the cluster, as this node knows them."
    );
    describe_gauge!(
        "herald_clock_correction_ms",
        Unit::Milliseconds,
        "Correction applied to this node's clock to agree with the members' majority."
    );
    describe_gauge!(
        "herald_peer_clock_offset_ms",
        Unit::Milliseconds,
        "Each member's clock offset from this node's, as last measured."
    );
    describe_gauge!(
        "herald_peer_rtt_seconds",
        Unit::Seconds,
        "Round-trip time of the connection to each member."
    );
    describe_counter!(
        "herald_peer_datagrams_total",
        Unit::Count,
        "UDP datagrams on the connection to each member, by direction (a reconnect restarts it)."
    );
    describe_counter!(
        "herald_peer_lost_packets_total",
        Unit::Count,
        "Packets lost on the connection to each member (a reconnect restarts it)."
    );
    describe_counter!(
        "herald_interest_syncs_total",
        Unit::Count,
        "Subscriptions that waited for the other members to learn their interest."
    );
    describe_counter!(
        "herald_interest_sync_timeouts_total",
        Unit::Count,
        "Interest waits that gave up on a member that did not answer in time."
    );
    describe_counter!(
        "herald_interest_pushes_total",
        Unit::Count,
        "Pushes of this node's subscription interest to the other members."
    );
    describe_counter!(
        "herald_transient_relay_events_total",
        Unit::Count,
        "Non-durable events between nodes, by outcome (queued, sent, dropped, failed, received)."
    );
    describe_gauge!(
        "herald_raft_group_stopped",
        "1 once one of this node's Raft groups stopped (its storage failed, or its task ended)."
    );
    describe_gauge!(
        "herald_raft_term",
        "Current Raft term, per group (0 = meta, p+1 = partition p)."
    );
    describe_gauge!(
        "herald_raft_leader",
        "Node id of the group's leader as this node knows it (0 = none), per group."
    );
    describe_gauge!(
        "herald_raft_is_leader",
        "1 where this node leads the group, per group."
    );
    describe_gauge!(
        "herald_raft_last_log_index",
        "Index of the last entry in this node's log, per group."
    );
    describe_gauge!(
        "herald_raft_applied_index",
        "Index of the last entry this node applied, per group."
    );
    describe_counter!(
        "herald_raft_elections_called_total",
        Unit::Count,
        "Elections this node called, per group."
    );
    describe_gauge!(
        "herald_raft_follower_lag_entries",
        Unit::Count,
        "On a leader: entries each follower is behind, per group and follower."
    );
}
