//! The cluster of a compose file (`deploy/compose.yaml`: services `herald-1..3`, image
//! `herald:latest` built by `deploy/build-image`), run under its own project name so it never
//! touches another stack of the same file.
//!
//! The harness adds an override file that mounts a configuration with the workload's namespace
//! (long retention), sets `--publish-timeout` and SSE keep-alives, and turns the restart policy
//! off (the nemesis restarts nodes itself). Clients use the ports the compose file publishes on
//! the host. Faults:
//!
//! - kill: `docker kill -s KILL`, then `docker start`; stop: `docker stop` (SIGTERM);
//!   pause: `docker pause` / `unpause` (the cgroup freezer);
//! - partitions and loss: `iptables` in the container's network namespace, run from the host
//!   with `nsenter -t <pid> -n` (the image has no shell and no tools): UDP to the peer's address
//!   is dropped in `OUTPUT`;
//! - latency: a `prio` qdisc whose third band is a `netem` delay, with a `u32` filter sending
//!   UDP (the cluster traffic) there, so client traffic is not delayed.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::process::Command;

use super::{NodeAddr, Target, wait_converged, wait_http};

/// Settings of the compose target.
#[derive(Debug, Clone)]
pub struct ComposeOptions {
    /// The compose file.
    pub file: PathBuf,
    /// The project name.
    pub project: String,
    /// Where the override and configuration files go.
    pub dir: PathBuf,
    /// Retention of the workload namespace.
    pub history_size: u64,
    /// `--publish-timeout`.
    pub publish_timeout: String,
    /// The nodes' password (`HERALD_REQUIREPASS`).
    pub password: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Up,
    Paused,
    Down,
}

/// The compose cluster.
pub struct ComposeCluster {
    options: ComposeOptions,
    compose: Vec<String>,
    nodes: Vec<NodeAddr>,
    states: Vec<State>,
    /// Network namespaces with rules or qdiscs installed (node ids).
    dirty: Vec<u64>,
    /// Container ids (stable across kill / start / stop / pause).
    containers: Vec<Option<String>>,
    /// Whether the kernel has `sch_netem` (probed at start).
    netem: bool,
}

async fn run(program: &str, args: &[String]) -> Result<String> {
    let output = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .with_context(|| format!("run {program}"))?;
    if !output.status.success() {
        bail!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

impl ComposeCluster {
    /// Prepares the target (nothing runs until [`Target::start`]).
    pub async fn new(mut options: ComposeOptions) -> Result<ComposeCluster> {
        std::fs::create_dir_all(&options.dir)?;
        // Compose reads a relative bind-mount source as a volume name.
        options.dir = std::fs::canonicalize(&options.dir)?;
        options.file = std::fs::canonicalize(&options.file)
            .with_context(|| format!("compose file {}", options.file.display()))?;
        let compose = if run("docker", &strings(&["compose", "version"]))
            .await
            .is_ok()
        {
            vec!["docker".to_string(), "compose".to_string()]
        } else {
            vec!["docker-compose".to_string()]
        };
        let image = std::env::var("HERALD_IMAGE").unwrap_or_else(|_| "herald:latest".into());
        if run("docker", &strings(&["image", "inspect", &image]))
            .await
            .is_err()
        {
            bail!("the image {image} does not exist: build it with deploy/build-image");
        }
        let nodes = (1..=3u64)
            .map(|id| NodeAddr {
                id,
                resp: ([127, 0, 0, 1], 6380 + id as u16).into(),
                http: ([127, 0, 0, 1], 8000 + id as u16).into(),
            })
            .collect();
        Ok(ComposeCluster {
            options,
            compose,
            nodes,
            states: vec![State::Down; 3],
            dirty: Vec::new(),
            containers: vec![None; 3],
            netem: false,
        })
    }

    fn override_file(&self) -> PathBuf {
        self.options.dir.join("compose.chaos.yaml")
    }

    async fn compose(&self, args: &[&str]) -> Result<String> {
        let mut all: Vec<String> = self.compose[1..].to_vec();
        all.extend(strings(&[
            "-p",
            &self.options.project,
            "-f",
            &self.options.file.to_string_lossy(),
            "-f",
            &self.override_file().to_string_lossy(),
        ]));
        all.extend(strings(args));
        run(&self.compose[0], &all).await
    }

    async fn container(&self, id: u64) -> Result<String> {
        if let Some(container) = &self.containers[(id - 1) as usize] {
            return Ok(container.clone());
        }
        let name = format!("herald-{id}");
        let container = self.compose(&["ps", "-q", &name]).await?;
        if container.is_empty() {
            bail!("no container for {name}");
        }
        Ok(container)
    }

    async fn pid(&self, id: u64) -> Result<String> {
        let container = self.container(id).await?;
        let pid = run(
            "docker",
            &strings(&["inspect", "-f", "{{.State.Pid}}", &container]),
        )
        .await?;
        if pid == "0" {
            bail!("node {id}'s container is not running");
        }
        Ok(pid)
    }

    async fn ip(&self, id: u64) -> Result<String> {
        let container = self.container(id).await?;
        run(
            "docker",
            &strings(&[
                "inspect",
                "-f",
                "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}",
                &container,
            ]),
        )
        .await
        .map(|s| s.split_whitespace().next().unwrap_or_default().to_string())
    }

    /// Runs `tool args` in node `id`'s network namespace.
    async fn netns(&mut self, id: u64, tool: &str, args: &[&str]) -> Result<String> {
        let pid = self.pid(id).await?;
        let mut all = strings(&["-t", &pid, "-n", tool]);
        all.extend(strings(args));
        if !self.dirty.contains(&id) {
            self.dirty.push(id);
        }
        run("nsenter", &all).await
    }

    async fn docker(&self, verb: &[&str], id: u64) -> Result<()> {
        let container = self.container(id).await?;
        let mut args = strings(verb);
        args.push(container);
        run("docker", &args).await.map(|_| ())
    }
}

impl Target for ComposeCluster {
    fn nodes(&self) -> Vec<NodeAddr> {
        self.nodes.clone()
    }

    fn password(&self) -> Option<String> {
        Some(self.options.password.clone())
    }

    fn can_cut(&self) -> bool {
        true
    }

    fn can_delay(&self) -> bool {
        self.netem
    }

    fn is_up(&self, id: u64) -> bool {
        self.states[(id - 1) as usize] == State::Up
    }

    async fn start(&mut self) -> Result<()> {
        let config = self.options.dir.join("herald.toml");
        std::fs::write(
            &config,
            format!(
                "resp_addr = \"0.0.0.0:6379\"\nhttp_addr = \"0.0.0.0:8000\"\ncluster_addr = \"0.0.0.0:7000\"\n\
                 data_dir = \"/data\"\n\n[namespace.chaos]\nhistory_size = {}\nhistory_ttl = \"none\"\ndurable = true\n",
                self.options.history_size
            ),
        )?;
        let mut services = String::from("services:\n");
        for id in 1..=3 {
            services.push_str(&format!(
                "  herald-{id}:\n    restart: \"no\"\n    environment:\n      HERALD_PUBLISH_TIMEOUT: \"{}\"\n      HERALD_SSE_KEEP_ALIVE: \"1s\"\n      HERALD_REQUIREPASS: \"{}\"\n    volumes:\n      - {}:/etc/herald/herald.toml:ro\n",
                self.options.publish_timeout,
                self.options.password,
                config.display()
            ));
        }
        std::fs::write(self.override_file(), services)?;
        // A fresh cluster: remove what an earlier run of this project left.
        let _ = self.compose(&["down", "-v", "--remove-orphans"]).await;
        self.compose(&["up", "-d"]).await?;
        self.states = vec![State::Up; 3];
        self.containers = vec![None; 3];
        for id in 1..=3u64 {
            let container = self.container(id).await?;
            self.containers[(id - 1) as usize] = Some(container);
        }
        // Latency needs the kernel's netem qdisc, which not every kernel has.
        self.netem = self
            .netns(
                1,
                "tc",
                &[
                    "qdisc", "add", "dev", "eth0", "root", "handle", "1:", "netem", "delay", "1ms",
                ],
            )
            .await
            .is_ok();
        let _ = self
            .netns(1, "tc", &["qdisc", "del", "dev", "eth0", "root"])
            .await;
        self.dirty.clear();
        for node in self.nodes.clone() {
            if !wait_http(&node, Duration::from_secs(60)).await {
                bail!("node {} did not answer on {}", node.id, node.http);
            }
        }
        if !wait_converged(self, Duration::from_secs(90)).await {
            bail!("the compose cluster did not form within 90 s");
        }
        Ok(())
    }

    async fn kill(&mut self, id: u64) -> Result<()> {
        if self.states[(id - 1) as usize] == State::Paused {
            self.resume(id).await?;
        }
        self.docker(&["kill", "-s", "KILL"], id).await?;
        self.states[(id - 1) as usize] = State::Down;
        self.dirty.retain(|&d| d != id);
        Ok(())
    }

    async fn restart(&mut self, id: u64) -> Result<()> {
        if self.states[(id - 1) as usize] != State::Down {
            return Ok(());
        }
        self.docker(&["start"], id).await?;
        self.states[(id - 1) as usize] = State::Up;
        let node = self.nodes[(id - 1) as usize].clone();
        if !wait_http(&node, Duration::from_secs(60)).await {
            bail!("node {id} did not come back within 60 s");
        }
        Ok(())
    }

    async fn stop(&mut self, id: u64) -> Result<()> {
        if self.states[(id - 1) as usize] == State::Paused {
            self.resume(id).await?;
        }
        self.docker(&["stop", "-t", "20"], id).await?;
        self.states[(id - 1) as usize] = State::Down;
        self.dirty.retain(|&d| d != id);
        Ok(())
    }

    async fn pause(&mut self, id: u64) -> Result<()> {
        self.docker(&["pause"], id).await?;
        self.states[(id - 1) as usize] = State::Paused;
        Ok(())
    }

    async fn resume(&mut self, id: u64) -> Result<()> {
        if self.states[(id - 1) as usize] != State::Paused {
            bail!("node {id} is not paused");
        }
        self.docker(&["unpause"], id).await?;
        self.states[(id - 1) as usize] = State::Up;
        Ok(())
    }

    async fn cut(&mut self, from: u64, to: u64) -> Result<()> {
        let ip = self.ip(to).await?;
        self.netns(
            from,
            "iptables",
            &[
                "-w", "5", "-A", "OUTPUT", "-p", "udp", "-d", &ip, "-j", "DROP",
            ],
        )
        .await
        .map(|_| ())
    }

    async fn lose(&mut self, percent: u32) -> Result<()> {
        let probability = format!("{:.2}", f64::from(percent) / 100.0);
        for id in 1..=3 {
            self.netns(
                id,
                "iptables",
                &[
                    "-w",
                    "5",
                    "-A",
                    "OUTPUT",
                    "-p",
                    "udp",
                    "--dport",
                    "7000",
                    "-m",
                    "statistic",
                    "--mode",
                    "random",
                    "--probability",
                    &probability,
                    "-j",
                    "DROP",
                ],
            )
            .await?;
        }
        Ok(())
    }

    async fn delay(&mut self, ms: u32, jitter: u32) -> Result<()> {
        let (delay, jitter) = (format!("{ms}ms"), format!("{jitter}ms"));
        for id in 1..=3 {
            self.netns(
                id,
                "tc",
                &[
                    "qdisc", "add", "dev", "eth0", "root", "handle", "1:", "prio",
                ],
            )
            .await?;
            self.netns(
                id,
                "tc",
                &[
                    "qdisc", "add", "dev", "eth0", "parent", "1:3", "handle", "30:", "netem",
                    "delay", &delay, &jitter,
                ],
            )
            .await?;
            self.netns(
                id,
                "tc",
                &[
                    "filter", "add", "dev", "eth0", "protocol", "ip", "parent", "1:0", "prio", "3",
                    "u32", "match", "ip", "protocol", "17", "0xff", "flowid", "1:3",
                ],
            )
            .await?;
        }
        Ok(())
    }

    async fn heal_network(&mut self) -> Result<()> {
        for id in std::mem::take(&mut self.dirty) {
            if self.states[(id - 1) as usize] == State::Down {
                continue;
            }
            let _ = self
                .netns(id, "iptables", &["-w", "5", "-F", "OUTPUT"])
                .await;
            let _ = self
                .netns(id, "tc", &["qdisc", "del", "dev", "eth0", "root"])
                .await;
        }
        self.dirty.clear();
        Ok(())
    }

    async fn collect_logs(&mut self, dir: &Path) -> Result<()> {
        for id in 1..=3u64 {
            let container = self.container(id).await?;
            let output = Command::new("docker")
                .args(["logs", "--timestamps", &container])
                .output()
                .await?;
            let mut text = output.stdout;
            text.extend_from_slice(&output.stderr);
            std::fs::write(dir.join(format!("node-{id}.log")), text)?;
        }
        Ok(())
    }

    async fn shutdown(&mut self) -> Result<()> {
        for id in 1..=3 {
            if self.states[(id - 1) as usize] == State::Paused {
                let _ = self.resume(id).await;
            }
        }
        let _ = self.heal_network().await;
        self.compose(&["down", "-v", "--remove-orphans"]).await?;
        self.states = vec![State::Down; 3];
        Ok(())
    }
}
