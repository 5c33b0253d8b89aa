//! Where the cluster under test runs, and the faults it can be given.
//!
//! - [`local`]: three herald processes on loopback started by the harness; faults are signals
//!   (`kill -9`, `SIGSTOP`/`SIGCONT`, `SIGTERM`) and, when the harness may use `iptables`, drops
//!   of the nodes' cluster (QUIC/UDP) traffic on loopback, matched by port.
//! - [`compose`]: the 3-node cluster of `deploy/compose.yaml` in containers; faults are
//!   `docker kill`/`pause`/`stop`, and `iptables` / `tc netem` run inside each container's
//!   network namespace from the host (`nsenter -t <pid> -n`).

pub mod compose;
pub mod local;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use serde_json::Value;

/// A node's client-facing addresses (stable across restarts).
#[derive(Debug, Clone)]
pub struct NodeAddr {
    /// Node id (1-based).
    pub id: u64,
    /// Redis-protocol address.
    pub resp: SocketAddr,
    /// HTTP address.
    pub http: SocketAddr,
}

/// What the nemesis and the runner need of a cluster.
pub trait Target {
    /// The nodes' addresses.
    fn nodes(&self) -> Vec<NodeAddr>;
    /// The password clients must give (RESP `AUTH`, `Bearer` on `/api/cluster/*`), if any.
    fn password(&self) -> Option<String>;
    /// Whether network faults (partitions, loss) can be injected.
    fn can_cut(&self) -> bool;
    /// Whether latency can be injected.
    fn can_delay(&self) -> bool;
    /// Whether node `id` is running and not paused.
    fn is_up(&self, id: u64) -> bool;
    /// Starts the whole cluster and waits until it is formed.
    async fn start(&mut self) -> Result<()>;
    /// `kill -9` of node `id` (its data is kept).
    async fn kill(&mut self, id: u64) -> Result<()>;
    /// Starts node `id` again on its data (after a kill or a stop).
    async fn restart(&mut self, id: u64) -> Result<()>;
    /// `SIGTERM` to node `id`, waiting for it to exit (graceful stop).
    async fn stop(&mut self, id: u64) -> Result<()>;
    /// Freezes node `id` (`SIGSTOP` / `docker pause`).
    async fn pause(&mut self, id: u64) -> Result<()>;
    /// Unfreezes node `id`.
    async fn resume(&mut self, id: u64) -> Result<()>;
    /// Drops the cluster traffic from node `from` to node `to` (one direction).
    async fn cut(&mut self, from: u64, to: u64) -> Result<()>;
    /// Drops `percent` % of the cluster packets between all nodes, at random.
    async fn lose(&mut self, percent: u32) -> Result<()>;
    /// Delays every cluster packet by `ms` ± `jitter` ms.
    async fn delay(&mut self, ms: u32, jitter: u32) -> Result<()>;
    /// Removes every network fault.
    async fn heal_network(&mut self) -> Result<()>;
    /// Copies (or finishes writing) the nodes' logs into `dir`.
    async fn collect_logs(&mut self, dir: &Path) -> Result<()>;
    /// Stops everything and removes what the harness installed (firewall rules, containers).
    async fn shutdown(&mut self) -> Result<()>;
}

/// An HTTP client for status queries.
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .connect_timeout(Duration::from_secs(1))
        .build()
        .expect("HTTP client")
}

/// `GET /api/cluster/status` of a node, `None` if it does not answer.
pub async fn status(
    client: &reqwest::Client,
    node: &NodeAddr,
    password: Option<&str>,
) -> Option<Value> {
    let mut request = client.get(format!("http://{}/api/cluster/status", node.http));
    if let Some(password) = password {
        request = request.bearer_auth(password);
    }
    let response = request.send().await.ok()?;
    if !response.status().is_success() {
        return None;
    }
    response.json().await.ok()
}

/// The name of a group in status: `meta` or the partition number.
pub fn group_name(group: &Value) -> String {
    match group["partition"].as_u64() {
        Some(p) => p.to_string(),
        None => "meta".to_string(),
    }
}

/// Each group's leader as the running nodes see it (the most common answer per group).
pub async fn leaders(target: &impl Target) -> HashMap<String, u64> {
    let client = http_client();
    let password = target.password();
    let mut votes: HashMap<String, HashMap<u64, usize>> = HashMap::new();
    for node in target.nodes() {
        if !target.is_up(node.id) {
            continue;
        }
        let Some(status) = status(&client, &node, password.as_deref()).await else {
            continue;
        };
        for group in status["groups"].as_array().into_iter().flatten() {
            if let Some(leader) = group["leader"].as_u64() {
                *votes
                    .entry(group_name(group))
                    .or_default()
                    .entry(leader)
                    .or_default() += 1;
            }
        }
    }
    votes
        .into_iter()
        .filter_map(|(group, counts)| {
            counts
                .into_iter()
                .max_by_key(|&(leader, n)| (n, leader))
                .map(|(leader, _)| (group, leader))
        })
        .collect()
}

/// Whether every running node is formed, sees a running leader for every group, and all agree.
pub async fn converged(target: &impl Target) -> bool {
    let client = http_client();
    let password = target.password();
    let up: Vec<u64> = target
        .nodes()
        .iter()
        .map(|n| n.id)
        .filter(|&id| target.is_up(id))
        .collect();
    let mut first: Option<Vec<Option<u64>>> = None;
    for node in target.nodes() {
        if !up.contains(&node.id) {
            continue;
        }
        let Some(status) = status(&client, &node, password.as_deref()).await else {
            return false;
        };
        if status["formed"] != Value::Bool(true) {
            return false;
        }
        let Some(groups) = status["groups"].as_array() else {
            return false;
        };
        let these: Vec<Option<u64>> = groups.iter().map(|g| g["leader"].as_u64()).collect();
        if these.iter().any(|l| l.is_none_or(|l| !up.contains(&l))) {
            return false;
        }
        match &first {
            None => first = Some(these),
            Some(f) if *f != these => return false,
            Some(_) => {}
        }
    }
    first.is_some()
}

/// Waits up to `timeout` for [`converged`]; returns whether it happened.
pub async fn wait_converged(target: &impl Target, timeout: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if converged(target).await {
            return true;
        }
        if tokio::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits up to `timeout` until every running node has applied the same log index in every
/// group (so their histories can be compared); returns whether it happened.
pub async fn wait_applied(target: &impl Target, timeout: Duration) -> bool {
    let client = http_client();
    let password = target.password();
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let mut seen: Option<Vec<Option<u64>>> = None;
        let mut same = true;
        for node in target.nodes() {
            if !target.is_up(node.id) {
                continue;
            }
            let Some(status) = status(&client, &node, password.as_deref()).await else {
                same = false;
                break;
            };
            let applied: Vec<Option<u64>> = status["groups"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|g| g["applied_index"].as_u64())
                .collect();
            let last: Vec<Option<u64>> = status["groups"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|g| g["last_log_index"].as_u64())
                .collect();
            if applied != last {
                same = false;
                break;
            }
            match &seen {
                None => seen = Some(applied),
                Some(s) if *s != applied => {
                    same = false;
                    break;
                }
                Some(_) => {}
            }
        }
        if same && seen.is_some() {
            return true;
        }
        if tokio::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Waits until `GET /health` of `node` answers (any status), up to `timeout`.
pub async fn wait_http(node: &NodeAddr, timeout: Duration) -> bool {
    let client = http_client();
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if client
            .get(format!("http://{}/health", node.http))
            .send()
            .await
            .is_ok()
        {
            return true;
        }
        if tokio::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
