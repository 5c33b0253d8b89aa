//! Local clusters for the cluster benchmarks, on loopback: herald nodes (certificates made with
//! `herald certs`, formed by `--bootstrap-expect`, the approach of `tests/src/cluster.rs`) and
//! NATS servers clustered by routes with JetStream on. Each process logs to a file in the work
//! directory and is killed when its cluster is dropped.

use crate::http;
use anyhow::{Context, bail};
use serde_json::Value;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Time allowed for one status request.
const STATUS_TIMEOUT: Duration = Duration::from_secs(2);

/// A directory for the clusters' data and logs, removed when dropped unless kept.
#[derive(Debug)]
pub struct WorkDir {
    /// The directory.
    pub path: PathBuf,
    keep: bool,
}

impl WorkDir {
    /// Uses `path` (created if missing), or a new directory under the system's temp dir.
    pub fn new(path: Option<PathBuf>, keep: bool) -> anyhow::Result<WorkDir> {
        let path = match path {
            Some(path) => path,
            None => {
                let nanos = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.subsec_nanos())
                    .unwrap_or(0);
                std::env::temp_dir()
                    .join(format!("herald-bench-{}-{nanos:08x}", std::process::id()))
            }
        };
        std::fs::create_dir_all(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        Ok(WorkDir { path, keep })
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if self.keep {
            eprintln!("kept {}", self.path.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// A free loopback TCP port (bound and released).
pub fn free_tcp_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A free loopback UDP port (bound and released).
pub fn free_udp_port() -> anyhow::Result<u16> {
    Ok(std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The last `lines` lines of a log file, for error messages.
pub fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn log_file(path: &Path) -> anyhow::Result<(Stdio, Stdio)> {
    let file = File::options()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    Ok((Stdio::from(file.try_clone()?), Stdio::from(file)))
}

/// One herald node of a [`HeraldCluster`].
#[derive(Debug)]
pub struct HeraldNode {
    /// Node id (1-based).
    pub id: u64,
    /// Redis-protocol address, `127.0.0.1:port`.
    pub resp: String,
    /// HTTP address, `127.0.0.1:port`.
    pub http: String,
    /// Cluster (QUIC, UDP) port.
    pub cluster_port: u16,
    /// The node's log file.
    pub log: PathBuf,
    data_dir: PathBuf,
    child: Option<Child>,
}

impl HeraldNode {
    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

/// A cluster of herald processes on loopback, each on fixed ports and its own data directory,
/// so a killed node restarts on its data with the same addresses.
#[derive(Debug)]
pub struct HeraldCluster {
    bin: PathBuf,
    tls_dir: PathBuf,
    partitions: u16,
    extra: Vec<String>,
    /// The nodes; `nodes[i]` has id `i + 1`.
    pub nodes: Vec<HeraldNode>,
}

fn run_certs(bin: &Path, args: &[&str]) -> anyhow::Result<()> {
    let output = Command::new(bin)
        .arg("certs")
        .args(args)
        .output()
        .with_context(|| format!("cannot run {}", bin.display()))?;
    if !output.status.success() {
        bail!(
            "herald certs {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

impl HeraldCluster {
    /// Makes certificates for `n` nodes in `dir`, starts the nodes (`--bootstrap-expect n`,
    /// `--partitions`, `--log warn` unless `extra` has a `--log`, plus `extra` arguments) and
    /// returns without waiting for formation (see [`HeraldCluster::wait_converged`]).
    pub fn start(
        bin: &Path,
        dir: &Path,
        n: usize,
        partitions: u16,
        extra: &[String],
    ) -> anyhow::Result<HeraldCluster> {
        let tls_dir = dir.join("herald-tls");
        let tls = tls_dir.to_string_lossy().into_owned();
        run_certs(bin, &["init", "--dir", &tls])?;
        let mut nodes = Vec::with_capacity(n);
        for id in 1..=n as u64 {
            run_certs(bin, &["issue", "--dir", &tls, "--node-id", &id.to_string()])?;
            let data_dir = dir.join(format!("herald-{id}"));
            std::fs::create_dir_all(&data_dir)?;
            nodes.push(HeraldNode {
                id,
                resp: format!("127.0.0.1:{}", free_tcp_port()?),
                http: format!("127.0.0.1:{}", free_tcp_port()?),
                cluster_port: free_udp_port()?,
                log: dir.join(format!("herald-{id}.log")),
                data_dir,
                child: None,
            });
        }
        let mut cluster = HeraldCluster {
            bin: bin.to_owned(),
            tls_dir,
            partitions,
            extra: extra.to_vec(),
            nodes,
        };
        for id in 1..=n as u64 {
            cluster.start_node(id)?;
        }
        Ok(cluster)
    }

    fn peers(&self) -> String {
        self.nodes
            .iter()
            .map(|m| format!("{}@127.0.0.1:{}", m.id, m.cluster_port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Starts (or restarts, on its kept data and the same ports) node `id`.
    pub fn start_node(&mut self, id: u64) -> anyhow::Result<()> {
        let peers = self.peers();
        let n = self.nodes.len();
        let index = (id as usize)
            .checked_sub(1)
            .filter(|&i| i < n)
            .with_context(|| format!("no node {id}"))?;
        let node = &mut self.nodes[index];
        anyhow::ensure!(node.child.is_none(), "node {id} is already running");
        let (stdout, stderr) = log_file(&node.log)?;
        let child = Command::new(&self.bin)
            .arg("serve")
            .args(["--node-id", &id.to_string()])
            .args([
                "--cluster-addr",
                &format!("127.0.0.1:{}", node.cluster_port),
            ])
            .args(["--peers", &peers])
            .args(["--bootstrap-expect", &n.to_string()])
            .arg("--tls-dir")
            .arg(&self.tls_dir)
            .args(["--partitions", &self.partitions.to_string()])
            .args(["--resp-addr", &node.resp, "--http-addr", &node.http])
            .arg("--data-dir")
            .arg(&node.data_dir)
            // Quiet by default; an extra `--log FILTER` replaces it (herald takes one).
            .args(
                ["--log", "warn"]
                    .into_iter()
                    .filter(|_| !self.extra.iter().any(|a| a.starts_with("--log"))),
            )
            .args(&self.extra)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("cannot start {}", self.bin.display()))?;
        node.child = Some(child);
        Ok(())
    }

    fn node_mut(&mut self, id: u64) -> anyhow::Result<&mut HeraldNode> {
        let index = (id as usize)
            .checked_sub(1)
            .filter(|&i| i < self.nodes.len())
            .with_context(|| format!("no node {id}"))?;
        Ok(&mut self.nodes[index])
    }

    /// Node `id`.
    pub fn node(&self, id: u64) -> &HeraldNode {
        &self.nodes[(id - 1) as usize]
    }

    /// `kill -9`s node `id` (its data is kept) and returns the instant just before the signal.
    pub fn kill(&mut self, id: u64) -> anyhow::Result<Instant> {
        let node = self.node_mut(id)?;
        let mut child = node
            .child
            .take()
            .with_context(|| format!("node {id} is not running"))?;
        let at = Instant::now();
        // Child::kill sends SIGKILL on Unix.
        child.kill().context("kill -9")?;
        child.wait().context("reaping the killed node")?;
        Ok(at)
    }

    /// Ids of the running nodes.
    pub fn running(&self) -> Vec<u64> {
        self.nodes
            .iter()
            .filter(|n| n.child.is_some())
            .map(|n| n.id)
            .collect()
    }

    /// Process ids of the running nodes.
    pub fn pids(&self) -> Vec<u32> {
        self.nodes.iter().filter_map(HeraldNode::pid).collect()
    }

    /// Fails if a node that should run has exited, with the end of its log.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        for node in &mut self.nodes {
            if let Some(child) = node.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                node.child = None;
                bail!(
                    "herald node {} exited ({status}); its log ends with:\n{}",
                    node.id,
                    log_tail(&node.log, 30)
                );
            }
        }
        Ok(())
    }

    /// `GET /api/cluster/status` of node `id`.
    pub async fn status(&self, id: u64) -> anyhow::Result<Value> {
        http::get_json(&self.node(id).http, "/api/cluster/status", STATUS_TIMEOUT).await
    }

    /// Waits until every running node is formed, sees a running leader for every group and
    /// agrees with the others on the leaders; with `caught_up`, also until every group's
    /// leader reports every other running node 0 entries behind.
    pub async fn wait_converged(
        &mut self,
        timeout: Duration,
        caught_up: bool,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            self.check_alive()?;
            let why = match self.converged(caught_up).await {
                Ok(()) => return Ok(()),
                Err(why) => why,
            };
            if Instant::now() > deadline {
                bail!("the herald cluster did not converge in {timeout:?}: {why:#}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn converged(&self, caught_up: bool) -> anyhow::Result<()> {
        let running = self.running();
        let mut first: Option<Vec<Option<u64>>> = None;
        let mut statuses = Vec::new();
        for &id in &running {
            let status = self.status(id).await?;
            anyhow::ensure!(
                status["formed"] == Value::Bool(true),
                "node {id} not formed"
            );
            let groups = status["groups"]
                .as_array()
                .with_context(|| format!("node {id}: no groups"))?;
            let leaders: Vec<Option<u64>> = groups.iter().map(|g| g["leader"].as_u64()).collect();
            anyhow::ensure!(
                leaders
                    .iter()
                    .all(|l| l.is_some_and(|l| running.contains(&l))),
                "node {id} sees a group without a running leader"
            );
            match &first {
                None => first = Some(leaders),
                Some(f) => anyhow::ensure!(*f == leaders, "nodes disagree on leaders"),
            }
            statuses.push((id, status));
        }
        if caught_up {
            for (id, status) in &statuses {
                for group in status["groups"].as_array().into_iter().flatten() {
                    if group["leader"].as_u64() != Some(*id) {
                        continue;
                    }
                    for other in running.iter().filter(|&&o| o != *id) {
                        let lag = group["lag"][other.to_string()].as_u64();
                        anyhow::ensure!(
                            lag == Some(0),
                            "group {} on leader {id}: node {other} lag {lag:?}",
                            group["group"]
                        );
                    }
                }
            }
        }
        Ok(())
    }
}

impl Drop for HeraldCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// NATS servers with JetStream, clustered by routes on loopback, each with its own store
/// directory and the server's default settings otherwise.
#[derive(Debug)]
pub struct NatsCluster {
    /// Client URLs, `nats://127.0.0.1:port`.
    pub urls: Vec<String>,
    /// Log files.
    pub logs: Vec<PathBuf>,
    children: Vec<Child>,
}

impl NatsCluster {
    /// Writes a config per server (`server_name`, `listen`, `jetstream { store_dir }`,
    /// `cluster { name, listen, routes }`) and starts `n` servers.
    pub fn start(bin: &Path, dir: &Path, n: usize) -> anyhow::Result<NatsCluster> {
        let client_ports: Vec<u16> = (0..n).map(|_| free_tcp_port()).collect::<Result<_, _>>()?;
        let route_ports: Vec<u16> = (0..n).map(|_| free_tcp_port()).collect::<Result<_, _>>()?;
        let routes: Vec<String> = route_ports
            .iter()
            .map(|p| format!("\"nats-route://127.0.0.1:{p}\""))
            .collect();
        let mut cluster = NatsCluster {
            urls: Vec::new(),
            logs: Vec::new(),
            children: Vec::new(),
        };
        for i in 0..n {
            let store = dir.join(format!("nats-{}", i + 1));
            std::fs::create_dir_all(&store)?;
            let config = format!(
                "server_name: \"n{id}\"\nlisten: \"127.0.0.1:{client}\"\n\
                 jetstream {{\n  store_dir: \"{store}\"\n}}\n\
                 cluster {{\n  name: \"herald-bench\"\n  listen: \"127.0.0.1:{route}\"\n  routes: [{routes}]\n}}\n",
                id = i + 1,
                client = client_ports[i],
                store = store.display(),
                route = route_ports[i],
                routes = routes.join(", "),
            );
            let conf = dir.join(format!("nats-{}.conf", i + 1));
            std::fs::write(&conf, config)?;
            let log = dir.join(format!("nats-{}.log", i + 1));
            let (stdout, stderr) = log_file(&log)?;
            let child = Command::new(bin)
                .arg("-c")
                .arg(&conf)
                .stdin(Stdio::null())
                .stdout(stdout)
                .stderr(stderr)
                .spawn()
                .with_context(|| format!("cannot start {}", bin.display()))?;
            cluster.children.push(child);
            cluster
                .urls
                .push(format!("nats://127.0.0.1:{}", client_ports[i]));
            cluster.logs.push(log);
        }
        Ok(cluster)
    }

    /// Process ids of the servers.
    pub fn pids(&self) -> Vec<u32> {
        self.children.iter().map(Child::id).collect()
    }

    /// Fails if a server has exited, with the end of its log.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        for (child, log) in self.children.iter_mut().zip(&self.logs) {
            if let Some(status) = child.try_wait()? {
                bail!(
                    "nats-server exited ({status}); its log ends with:\n{}",
                    log_tail(log, 30)
                );
            }
        }
        Ok(())
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
