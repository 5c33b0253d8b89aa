//! A cluster of real herald processes on loopback: certificates made with `herald certs`,
//! formation by `--bootstrap-expect`, and the status endpoint to find leaders and wait for
//! convergence.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::relay::Relay;
use crate::{Herald, PATIENCE, herald_binary, scratch_dir};

/// Partitions of test clusters: few, so formation and status stay quick.
pub const TEST_PARTITIONS: u16 = 4;

/// A free loopback UDP port claimed for this test (see [`crate::ports`]): a member's port is
/// in every peer's `--peers` before the member starts, and kept across its restarts.
pub fn free_udp_port() -> u16 {
    crate::ports::claim_port()
}

/// Runs `herald certs ...` and requires success.
pub fn certs(args: &[&str]) {
    let output = Command::new(herald_binary())
        .arg("certs")
        .args(args)
        .output()
        .expect("run herald certs");
    assert!(
        output.status.success(),
        "herald certs {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A blocking `GET` of `path` on `node`'s HTTP port, parsed as JSON (`None` if unreachable).
pub fn get_json(node: &Herald, path: &str) -> Option<Value> {
    let mut stream = TcpStream::connect(node.http).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: herald\r\n\r\n").ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    let body = text.split_once("\r\n\r\n")?.1;
    serde_json::from_str(body).ok()
}

/// One node slot of a [`Cluster`]: its id, addresses, and the running process (if up).
pub struct Member {
    /// Node id.
    pub id: u64,
    /// Cluster (QUIC) port.
    pub cluster_port: u16,
    /// The process, `None` while killed.
    pub node: Option<Herald>,
    data_dir: PathBuf,
    /// The relay the other nodes reach it through, if the cluster has relays.
    relay: Option<Relay>,
}

impl Drop for Cluster {
    /// Stops every node, then removes the data directories and the certificates: a test leaves
    /// nothing in the temp directory, passed or failed.
    fn drop(&mut self) {
        for member in &mut self.members {
            drop(member.node.take());
            let _ = std::fs::remove_dir_all(&member.data_dir);
        }
        let _ = std::fs::remove_dir_all(&self.tls_dir);
    }
}

/// A cluster of herald processes on loopback.
pub struct Cluster {
    /// The nodes, `members[i]` has id `i + 1`.
    pub members: Vec<Member>,
    tls_dir: PathBuf,
    extra: Vec<String>,
    /// Extra `herald serve` arguments of single nodes, after `extra`.
    node_extra: std::collections::BTreeMap<u64, Vec<String>>,
    /// Extra environment variables of single nodes' processes.
    node_env: std::collections::BTreeMap<u64, Vec<(String, String)>>,
}

impl Cluster {
    /// Starts `n` nodes that form one cluster by `--bootstrap-expect n`, and waits until every
    /// node sees a leader for every group.
    pub fn start(n: usize) -> Cluster {
        Cluster::start_with(n, &[])
    }

    /// [`Cluster::start`] with extra `herald serve` arguments for every node.
    pub fn start_with(n: usize, extra: &[&str]) -> Cluster {
        Cluster::start_some(n, n, extra)
    }

    /// Prepares `total` node slots (all named in every node's `--peers`) but starts and forms
    /// the cluster with the first `started` only; the others can join later.
    pub fn start_some(total: usize, started: usize, extra: &[&str]) -> Cluster {
        Cluster::launch_all(total, started, extra, &[], &[], &[], false)
    }

    /// [`Cluster::start_some`] with extra arguments for single nodes too: `(id, args)`.
    pub fn start_each(
        total: usize,
        started: usize,
        extra: &[&str],
        node_extra: &[(u64, &[&str])],
    ) -> Cluster {
        Cluster::launch_all(total, started, extra, node_extra, &[], &[], false)
    }

    /// [`Cluster::start`] with extra arguments for single nodes, `(id, args)`, and data
    /// directories of the test's choosing for some, `(id, dir)` (a mount of the test's own):
    /// the harness leaves those in place when it is done.
    pub fn start_each_in(
        n: usize,
        node_extra: &[(u64, &[&str])],
        node_dirs: &[(u64, PathBuf)],
    ) -> Cluster {
        Cluster::launch_all(n, n, &[], node_extra, &[], node_dirs, false)
    }

    /// [`Cluster::start_some`] with none started, and extra environment variables for single
    /// nodes' processes, kept for their starts: `(id, [(name, value)])`.
    pub fn prepare_with_env(total: usize, node_env: &[(u64, &[(&str, &str)])]) -> Cluster {
        Cluster::launch_all(total, 0, &[], &[], node_env, &[], false)
    }

    /// [`Cluster::start`] with extra environment variables for single nodes' processes, kept
    /// for their restarts: `(id, [(name, value)])`.
    pub fn start_with_env(n: usize, node_env: &[(u64, &[(&str, &str)])]) -> Cluster {
        Cluster::launch_all(n, n, &[], &[], node_env, &[], false)
    }

    /// [`Cluster::start`] with extra `herald serve` arguments for every node and extra
    /// environment variables for single nodes' processes (see [`Cluster::start_with_env`]).
    pub fn start_with_args_and_env(
        n: usize,
        extra: &[&str],
        node_env: &[(u64, &[(&str, &str)])],
    ) -> Cluster {
        Cluster::launch_all(n, n, extra, &[], node_env, &[], false)
    }

    /// Drops node `id`'s extra environment variables from its next start on.
    pub fn clear_node_env(&mut self, id: u64) {
        self.node_env.remove(&id);
    }

    /// [`Cluster::start`] with every node reached through a [`Relay`] of its own (its
    /// `--peers` entry, hence its member address, is the relay's), so that a test can cut one
    /// direction between two nodes with [`Cluster::block`].
    pub fn start_relayed(n: usize) -> Cluster {
        Cluster::launch_all(n, n, &[], &[], &[], &[], true)
    }

    fn launch_all(
        total: usize,
        started: usize,
        extra: &[&str],
        node_extra: &[(u64, &[&str])],
        node_env: &[(u64, &[(&str, &str)])],
        node_dirs: &[(u64, PathBuf)],
        relayed: bool,
    ) -> Cluster {
        let n = total;
        let tls_dir = scratch_dir("tls");
        let dir = tls_dir.to_str().unwrap().to_string();
        certs(&["init", "--dir", &dir]);
        let mut members = Vec::new();
        for id in 1..=n as u64 {
            certs(&["issue", "--dir", &dir, "--node-id", &id.to_string()]);
            let cluster_port = free_udp_port();
            members.push(Member {
                id,
                cluster_port,
                node: None,
                data_dir: node_dirs
                    .iter()
                    .find(|(node, _)| *node == id)
                    .map_or_else(|| scratch_dir(&format!("node{id}")), |(_, dir)| dir.clone()),
                relay: relayed.then(|| Relay::start(cluster_port)),
            });
        }
        let mut cluster = Cluster {
            members,
            tls_dir,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            node_extra: node_extra
                .iter()
                .map(|(id, args)| (*id, args.iter().map(|s| s.to_string()).collect()))
                .collect(),
            node_env: node_env
                .iter()
                .map(|(id, vars)| {
                    let vars = vars.iter().map(|(k, v)| (k.to_string(), v.to_string()));
                    (*id, vars.collect())
                })
                .collect(),
        };
        let ids: Vec<u64> = cluster.members.iter().map(|m| m.id).take(started).collect();
        // Start them all first: each waits for its RESP port only, formation happens after.
        for id in ids {
            cluster.start_node(id, started);
        }
        cluster.wait_converged();
        cluster
    }

    fn peers(&self) -> String {
        self.members
            .iter()
            .map(|m| {
                let port = m.relay.as_ref().map_or(m.cluster_port, |r| r.port);
                format!("{}@127.0.0.1:{port}", m.id)
            })
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Starts (or restarts, on its kept data) node `id`.
    pub fn start_node(&mut self, id: u64, bootstrap_expect: usize) {
        self.launch(id, bootstrap_expect, None, TEST_PARTITIONS);
    }

    /// [`Cluster::start_node`] with another partition count than the cluster's (a mistake).
    pub fn start_node_with_partitions(
        &mut self,
        id: u64,
        bootstrap_expect: usize,
        partitions: u16,
    ) {
        self.launch(id, bootstrap_expect, None, partitions);
    }

    /// [`Cluster::start_node`] with no file of the node allowed past `kib` KiB: its disk fills
    /// (see [`Herald::start_with_file_size_limit`]).
    pub fn start_node_with_file_size_limit(&mut self, id: u64, bootstrap_expect: usize, kib: u64) {
        self.launch(id, bootstrap_expect, Some(kib), TEST_PARTITIONS);
    }

    fn launch(
        &mut self,
        id: u64,
        bootstrap_expect: usize,
        file_size_limit: Option<u64>,
        partitions: u16,
    ) {
        let member = &self.members[(id - 1) as usize];
        let cluster_addr = format!("127.0.0.1:{}", member.cluster_port);
        let own = self.node_args(id, &cluster_addr, bootstrap_expect, partitions);
        let mut args: Vec<&str> = own.iter().map(String::as_str).collect();
        args.extend(self.extra.iter().map(String::as_str));
        if let Some(own) = self.node_extra.get(&id) {
            args.extend(own.iter().map(String::as_str));
        }
        let data_dir = member.data_dir.clone();
        let env: Vec<(&str, &str)> = self
            .node_env
            .get(&id)
            .into_iter()
            .flatten()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let node = match file_size_limit {
            Some(kib) => Herald::start_with_file_size_limit(data_dir, kib, &args),
            None => Herald::start_in(data_dir, &args, &env),
        };
        self.members[(id - 1) as usize].node = Some(node);
    }

    /// Starts a second process under node `id`'s id (a copied config, a stale pod): its own
    /// data directory and cluster port, the cluster's peers and certificates.
    pub fn start_impostor(&self, id: u64) -> Herald {
        let cluster_addr = format!("127.0.0.1:{}", free_udp_port());
        let args = self.node_args(id, &cluster_addr, self.members.len(), TEST_PARTITIONS);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Herald::start_in(scratch_dir(&format!("impostor{id}")), &args, &[])
    }

    /// The `herald serve` cluster flags node `id` is started with (its address, the peers,
    /// the certificates, the partitions), without `--data-dir`: for a test that starts a
    /// process of its own, with a value changed.
    pub fn serve_args(&self, id: u64) -> Vec<String> {
        let member = &self.members[(id - 1) as usize];
        let cluster_addr = format!("127.0.0.1:{}", member.cluster_port);
        self.node_args(id, &cluster_addr, self.members.len(), TEST_PARTITIONS)
    }

    /// The cluster flags of node `id`: its address, the peers, the certificates.
    fn node_args(
        &self,
        id: u64,
        cluster_addr: &str,
        bootstrap_expect: usize,
        partitions: u16,
    ) -> Vec<String> {
        [
            "--node-id",
            &id.to_string(),
            "--cluster-addr",
            cluster_addr,
            "--peers",
            &self.peers(),
            "--bootstrap-expect",
            &bootstrap_expect.to_string(),
            "--tls-dir",
            self.tls_dir.to_str().unwrap(),
            "--partitions",
            &partitions.to_string(),
        ]
        .map(String::from)
        .to_vec()
    }

    /// Node `id` (running).
    pub fn node(&self, id: u64) -> &Herald {
        self.members[(id - 1) as usize]
            .node
            .as_ref()
            .expect("node is running")
    }

    /// `kill -9`s node `id` (if it runs), keeping its data for a restart.
    pub fn kill(&mut self, id: u64) {
        let member = &mut self.members[(id - 1) as usize];
        if let Some(node) = member.node.take() {
            member.data_dir = node.kill_keeping_data();
        }
    }

    /// Node `id`'s data directory (`--data-dir`).
    pub fn data_dir(&self, id: u64) -> &std::path::Path {
        &self.members[(id - 1) as usize].data_dir
    }

    /// `kill -9`s node `id` and deletes its data directory: its next start is on an empty one
    /// (a lost disk).
    pub fn wipe(&mut self, id: u64) {
        self.kill(id);
        let member = &mut self.members[(id - 1) as usize];
        let _ = std::fs::remove_dir_all(&member.data_dir);
        member.data_dir = scratch_dir(&format!("node{id}-wiped"));
    }

    /// Node `id`'s own `herald serve` flags from its next start on (replacing any it had).
    pub fn set_node_args(&mut self, id: u64, args: &[&str]) {
        self.node_extra
            .insert(id, args.iter().map(|a| a.to_string()).collect());
    }

    /// A copy of node `id`'s data directory, taken while it is stopped (so the copy is whole):
    /// a backup, for [`Cluster::restore`].
    pub fn back_up(&self, id: u64) -> std::path::PathBuf {
        let member = &self.members[(id - 1) as usize];
        assert!(
            member.node.is_none(),
            "node {id} is stopped (`kill`) before a backup"
        );
        let backup = scratch_dir(&format!("node{id}-backup"));
        copy_dir(&member.data_dir, &backup);
        backup
    }

    /// `kill -9`s node `id` and puts a copy of `backup` (see [`Cluster::back_up`]) in place of
    /// its data directory: its next start is on the store as it was then.
    pub fn restore(&mut self, id: u64, backup: &std::path::Path) {
        self.kill(id);
        let member = &mut self.members[(id - 1) as usize];
        let _ = std::fs::remove_dir_all(&member.data_dir);
        copy_dir(backup, &member.data_dir);
    }

    /// Node `from` can no longer reach node `to` (its packets to `to`'s relay are dropped);
    /// `to` still reaches `from`. Needs [`Cluster::start_relayed`].
    pub fn block(&self, from: u64, to: u64) {
        let from_port = self.members[(from - 1) as usize].cluster_port;
        self.relay(to).block(from_port);
    }

    /// Undoes [`Cluster::block`].
    pub fn unblock(&self, from: u64, to: u64) {
        let from_port = self.members[(from - 1) as usize].cluster_port;
        self.relay(to).unblock(from_port);
    }

    fn relay(&self, id: u64) -> &Relay {
        self.members[(id - 1) as usize]
            .relay
            .as_ref()
            .expect("a cluster started with relays")
    }

    /// Ids of the running nodes.
    pub fn running(&self) -> Vec<u64> {
        self.members
            .iter()
            .filter(|m| m.node.is_some())
            .map(|m| m.id)
            .collect()
    }

    /// Runs `herald cluster ARGS --http <node id's HTTP address>`; returns (success, stdout+stderr).
    /// Panics if the command has not ended after three times [`PATIENCE`] (it is killed).
    pub fn cli(&self, via: u64, args: &[&str]) -> (bool, String) {
        cli_via(self.node(via).http, args)
    }

    /// The directory of the cluster's certificates (`--tls-dir`).
    pub fn tls_dir(&self) -> &std::path::Path {
        &self.tls_dir
    }

    /// `GET /api/cluster/status` of node `id`.
    pub fn status(&self, id: u64) -> Option<Value> {
        get_json(self.node(id), "/api/cluster/status")
    }

    /// The leader of `partition` as node `id` sees it.
    pub fn leader_of(&self, id: u64, partition: u16) -> Option<u64> {
        let status = self.status(id)?;
        status["groups"]
            .as_array()?
            .iter()
            .find(|g| g["partition"].as_u64() == Some(u64::from(partition)))?["leader"]
            .as_u64()
    }

    /// Waits until every running node is formed and sees a running leader for every group,
    /// and all running nodes agree on the leaders.
    pub fn wait_converged(&self) {
        let deadline = Instant::now() + PATIENCE * 2;
        loop {
            if self.converged() {
                return;
            }
            if Instant::now() > deadline {
                let statuses: Vec<String> = self
                    .running()
                    .iter()
                    .map(|&id| {
                        format!(
                            "node {id}: {:?}\nlog:\n{}",
                            self.status(id),
                            self.node(id).log()
                        )
                    })
                    .collect();
                panic!("the cluster did not converge:\n{}", statuses.join("\n\n"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn converged(&self) -> bool {
        let running = self.running();
        let mut leaders: Option<Vec<Option<u64>>> = None;
        for &id in &running {
            let Some(status) = self.status(id) else {
                return false;
            };
            if status["formed"] != Value::Bool(true) {
                return false;
            }
            let Some(groups) = status["groups"].as_array() else {
                return false;
            };
            let these: Vec<Option<u64>> = groups.iter().map(|g| g["leader"].as_u64()).collect();
            if these
                .iter()
                .any(|l| l.is_none_or(|l| !running.contains(&l)))
            {
                return false;
            }
            match &leaders {
                None => leaders = Some(these),
                Some(first) if *first != these => return false,
                Some(_) => {}
            }
        }
        true
    }
}

/// Runs `herald cluster ARGS --http HTTP` (a node's HTTP address); returns (success,
/// stdout+stderr). Panics if the command has not ended after three times [`PATIENCE`] (it is
/// killed).
pub fn cli_via(http: std::net::SocketAddr, args: &[&str]) -> (bool, String) {
    let mut child = Command::new(herald_binary())
        .arg("cluster")
        .args(args)
        .arg("--http")
        .arg(http.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run herald cluster");
    let read = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut text = Vec::new();
            let _ = pipe.read_to_end(&mut text);
            String::from_utf8_lossy(&text).into_owned()
        })
    };
    let stdout = read(Box::new(child.stdout.take().unwrap()));
    let stderr = read(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + PATIENCE * 3;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "herald cluster {args:?} did not end within {:?}",
                PATIENCE * 3
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let text = format!(
        "{}{}",
        stdout.join().unwrap_or_default(),
        stderr.join().unwrap_or_default()
    );
    (status.success(), text)
}

/// Copies directory `from` into `to` (created if missing), with `cp -a`: files, modes and
/// times as they are.
fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).expect("create the copy's directory");
    let status = std::process::Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", from.display()))
        .arg(to)
        .status()
        .expect("run cp");
    assert!(
        status.success(),
        "cp -a {} {}: {status}",
        from.display(),
        to.display()
    );
}
