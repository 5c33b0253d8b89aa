//! Three herald processes on loopback, started by the harness.
//!
//! Every node gets fixed ports (chosen below the kernel's ephemeral range, so no client's
//! outgoing connection can take one while its node is down), its own data directory and log
//! file in the run's output directory, and the same command line on every (re)start. Network
//! faults are `iptables` rules on loopback in a chain of the harness's own
//! (`HCHAOS<pid>`, hooked into `OUTPUT`), matching the UDP ports of the nodes' cluster
//! endpoints: each node's QUIC endpoint sends from its cluster port, so `--sport A --dport B`
//! is exactly the traffic from A to B. The chain is removed on heal and at exit.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::{NodeAddr, Target, wait_converged, wait_http};

/// One node slot.
struct LocalNode {
    addr: NodeAddr,
    cluster_port: u16,
    data: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    paused: bool,
}

/// Settings of a local cluster.
#[derive(Debug, Clone)]
pub struct LocalOptions {
    /// The herald binary.
    pub binary: PathBuf,
    /// Where data and certificates go.
    pub dir: PathBuf,
    /// Where the nodes' logs go (`node-N.log`, appended to across restarts).
    pub logs: PathBuf,
    /// The node configuration file (namespaces).
    pub config: PathBuf,
    /// Partitions of the store.
    pub partitions: u16,
    /// `--publish-timeout`.
    pub publish_timeout: String,
    /// Use `iptables` for network faults.
    pub network_faults: bool,
}

/// The local cluster.
pub struct LocalCluster {
    options: LocalOptions,
    tls: PathBuf,
    nodes: Vec<LocalNode>,
    chain: Option<String>,
}

impl LocalCluster {
    /// Prepares a 3-node cluster (nothing runs until [`Target::start`]).
    pub fn new(options: LocalOptions) -> Result<LocalCluster> {
        std::fs::create_dir_all(&options.dir)?;
        std::fs::create_dir_all(&options.logs)?;
        let tls = options.dir.join("tls");
        let ports = free_ports(9)?;
        let nodes = (0..3u64)
            .map(|i| {
                let id = i + 1;
                let base = (i * 3) as usize;
                LocalNode {
                    addr: NodeAddr {
                        id,
                        resp: SocketAddr::from(([127, 0, 0, 1], ports[base])),
                        http: SocketAddr::from(([127, 0, 0, 1], ports[base + 1])),
                    },
                    cluster_port: ports[base + 2],
                    data: options.dir.join(format!("node-{id}")),
                    log: options.logs.join(format!("node-{id}.log")),
                    child: None,
                    paused: false,
                }
            })
            .collect();
        Ok(LocalCluster {
            options,
            tls,
            nodes,
            chain: None,
        })
    }

    fn node(&mut self, id: u64) -> &mut LocalNode {
        &mut self.nodes[(id - 1) as usize]
    }

    fn certs(&self, args: &[&str]) -> Result<()> {
        let output = Command::new(&self.options.binary)
            .arg("certs")
            .args(args)
            .output()
            .context("run herald certs")?;
        if !output.status.success() {
            bail!(
                "herald certs {args:?} failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(())
    }

    fn spawn(&mut self, id: u64) -> Result<()> {
        let peers = self
            .nodes
            .iter()
            .map(|n| format!("{}@127.0.0.1:{}", n.addr.id, n.cluster_port))
            .collect::<Vec<_>>()
            .join(",");
        let options = self.options.clone();
        let tls = self.tls.clone();
        let node = self.node(id);
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)?;
        writeln!(log, "==== herald-chaos: starting node {id}")?;
        let child = Command::new(&options.binary)
            .arg("serve")
            .args(["--node-id", &id.to_string()])
            .args([
                "--cluster-addr",
                &format!("127.0.0.1:{}", node.cluster_port),
            ])
            .args(["--peers", &peers])
            .args(["--bootstrap-expect", "3"])
            .arg("--tls-dir")
            .arg(&tls)
            .args(["--partitions", &options.partitions.to_string()])
            .args(["--resp-addr", &node.addr.resp.to_string()])
            .args(["--http-addr", &node.addr.http.to_string()])
            .arg("--data-dir")
            .arg(&node.data)
            .arg("--config")
            .arg(&options.config)
            .args(["--publish-timeout", &options.publish_timeout])
            .args(["--sse-keep-alive", "1s"])
            .args(["--log", "info"])
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("spawn {}", options.binary.display()))?;
        node.child = Some(child);
        node.paused = false;
        Ok(())
    }

    fn signal(&mut self, id: u64, signal: i32) -> Result<()> {
        let node = self.node(id);
        let Some(child) = node.child.as_ref() else {
            bail!("node {id} is not running");
        };
        // SAFETY: kill(2) on the pid of a child we own; no memory is involved.
        let rc = unsafe { libc::kill(child.id() as i32, signal) };
        if rc != 0 {
            bail!(
                "kill({}, {signal}) failed: {}",
                child.id(),
                std::io::Error::last_os_error()
            );
        }
        Ok(())
    }

    fn iptables(args: &[&str]) -> Result<()> {
        let output = Command::new("iptables")
            .args(["-w", "5"])
            .args(args)
            .output()
            .context("run iptables")?;
        if !output.status.success() {
            bail!(
                "iptables {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(())
    }

    /// The harness's chain, created and hooked into OUTPUT on first use.
    fn chain(&mut self) -> Result<String> {
        if let Some(chain) = &self.chain {
            return Ok(chain.clone());
        }
        let chain = format!("HCHAOS{}", std::process::id());
        Self::iptables(&["-N", &chain])?;
        Self::iptables(&["-I", "OUTPUT", "1", "-j", &chain])?;
        self.chain = Some(chain.clone());
        Ok(chain)
    }

    fn port(&self, id: u64) -> String {
        self.nodes[(id - 1) as usize].cluster_port.to_string()
    }

    fn remove_chain(&mut self) {
        if let Some(chain) = self.chain.take() {
            let _ = Self::iptables(&["-D", "OUTPUT", "-j", &chain]);
            let _ = Self::iptables(&["-F", &chain]);
            let _ = Self::iptables(&["-X", &chain]);
        }
    }

    /// Whether this process may change iptables rules (checked by creating and removing a
    /// scratch chain).
    pub fn iptables_usable() -> bool {
        let chain = format!("HCHAOSPROBE{}", std::process::id());
        let ok = Self::iptables(&["-N", &chain]).is_ok();
        if ok {
            let _ = Self::iptables(&["-X", &chain]);
        }
        ok
    }
}

impl Target for LocalCluster {
    fn nodes(&self) -> Vec<NodeAddr> {
        self.nodes.iter().map(|n| n.addr.clone()).collect()
    }

    fn password(&self) -> Option<String> {
        None
    }

    fn can_cut(&self) -> bool {
        self.options.network_faults
    }

    fn can_delay(&self) -> bool {
        false
    }

    fn is_up(&self, id: u64) -> bool {
        let node = &self.nodes[(id - 1) as usize];
        node.child.is_some() && !node.paused
    }

    async fn start(&mut self) -> Result<()> {
        let tls = self.tls.to_string_lossy().into_owned();
        self.certs(&["init", "--dir", &tls])?;
        for id in 1..=3u64 {
            self.certs(&["issue", "--dir", &tls, "--node-id", &id.to_string()])?;
        }
        for id in 1..=3 {
            self.spawn(id)?;
        }
        for id in 1..=3 {
            let addr = self.nodes[(id - 1) as usize].addr.clone();
            if !wait_http(&addr, Duration::from_secs(30)).await {
                bail!("node {id} did not start; see its log");
            }
        }
        if !wait_converged(self, Duration::from_secs(60)).await {
            bail!("the cluster did not form within 60 s");
        }
        Ok(())
    }

    async fn kill(&mut self, id: u64) -> Result<()> {
        let node = self.node(id);
        if let Some(mut child) = node.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        node.paused = false;
        Ok(())
    }

    async fn restart(&mut self, id: u64) -> Result<()> {
        if self.node(id).child.is_some() {
            return Ok(());
        }
        self.spawn(id)?;
        let addr = self.node(id).addr.clone();
        if !wait_http(&addr, Duration::from_secs(30)).await {
            bail!("node {id} did not come back within 30 s");
        }
        Ok(())
    }

    async fn stop(&mut self, id: u64) -> Result<()> {
        if self.node(id).paused {
            self.resume(id).await?;
        }
        self.signal(id, libc::SIGTERM)?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let node = self.node(id);
            let exited = match node.child.as_mut() {
                Some(child) => child.try_wait()?.is_some(),
                None => true,
            };
            if exited {
                node.child = None;
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                let id_text = id.to_string();
                self.kill(id).await?;
                bail!("node {id_text} did not exit within 20 s of SIGTERM; killed it");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn pause(&mut self, id: u64) -> Result<()> {
        self.signal(id, libc::SIGSTOP)?;
        self.node(id).paused = true;
        Ok(())
    }

    async fn resume(&mut self, id: u64) -> Result<()> {
        self.signal(id, libc::SIGCONT)?;
        self.node(id).paused = false;
        Ok(())
    }

    async fn cut(&mut self, from: u64, to: u64) -> Result<()> {
        let chain = self.chain()?;
        let (sport, dport) = (self.port(from), self.port(to));
        Self::iptables(&[
            "-A",
            &chain,
            "-p",
            "udp",
            "-s",
            "127.0.0.1",
            "--sport",
            &sport,
            "--dport",
            &dport,
            "-j",
            "DROP",
        ])
    }

    async fn lose(&mut self, percent: u32) -> Result<()> {
        let chain = self.chain()?;
        let probability = format!("{:.2}", f64::from(percent) / 100.0);
        for from in 1..=3 {
            for to in 1..=3 {
                if from == to {
                    continue;
                }
                let (sport, dport) = (self.port(from), self.port(to));
                Self::iptables(&[
                    "-A",
                    &chain,
                    "-p",
                    "udp",
                    "-s",
                    "127.0.0.1",
                    "--sport",
                    &sport,
                    "--dport",
                    &dport,
                    "-m",
                    "statistic",
                    "--mode",
                    "random",
                    "--probability",
                    &probability,
                    "-j",
                    "DROP",
                ])?;
            }
        }
        Ok(())
    }

    async fn delay(&mut self, _ms: u32, _jitter: u32) -> Result<()> {
        bail!("latency needs the compose target (netem on loopback would slow every process)")
    }

    async fn heal_network(&mut self) -> Result<()> {
        if let Some(chain) = &self.chain {
            Self::iptables(&["-F", chain])?;
        }
        Ok(())
    }

    async fn collect_logs(&mut self, dir: &Path) -> Result<()> {
        // The logs are written into `options.logs` as the nodes run; copy them if asked for
        // another place.
        for node in &self.nodes {
            let target = dir.join(format!("node-{}.log", node.addr.id));
            if target != node.log && node.log.exists() {
                std::fs::copy(&node.log, &target)?;
            }
        }
        Ok(())
    }

    async fn shutdown(&mut self) -> Result<()> {
        self.remove_chain();
        for id in 1..=3 {
            if self.node(id).paused {
                let _ = self.resume(id).await;
            }
            let _ = self.kill(id).await;
        }
        Ok(())
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        self.remove_chain();
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                // SAFETY: kill(2) on our own child; SIGCONT first so a paused child can die.
                unsafe { libc::kill(child.id() as i32, libc::SIGCONT) };
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// `n` distinct free loopback ports (TCP and UDP), below the ephemeral range.
fn free_ports(n: usize) -> Result<Vec<u16>> {
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let (from, to) = if low > 12000 {
        (10000u16, low - 1)
    } else {
        (61000u16, 65000u16)
    };
    let mut ports = Vec::new();
    let mut tries = 0;
    while ports.len() < n {
        tries += 1;
        if tries > 10_000 {
            bail!("no free ports found in {from}..{to}");
        }
        let port = rand::random_range(from..to);
        if ports.contains(&port) {
            continue;
        }
        let free = TcpListener::bind(("127.0.0.1", port)).is_ok()
            && UdpSocket::bind(("127.0.0.1", port)).is_ok();
        if free {
            ports.push(port);
        }
    }
    Ok(ports)
}

/// Writes the node configuration used by every local node.
pub fn write_config(path: &Path, history_size: u64) -> Result<()> {
    let mut file = File::create(path)?;
    writeln!(
        file,
        "# herald-chaos: the workload's channels keep far more history than a run publishes,\n\
         # so retention never explains a missing event.\n\
         [namespace.chaos]\nhistory_size = {history_size}\nhistory_ttl = \"none\"\ndurable = true"
    )?;
    Ok(())
}
