//! `herald serve`: start-up, signal handling and graceful shutdown of one node.

use crate::config::{AddrSetting, NodeConfig};
use crate::metrics::Metrics;
use anyhow::{Context, Result, anyhow};
use herald_cluster::identity::NodeIdentity;
use herald_cluster::node::{ClusterConfig, ClusterError};
use herald_gateway::broker::Broker;
use herald_gateway::http::HttpState;
use herald_gateway::hub::Hub;
use herald_gateway::resp::RespServer;
use herald_gateway::starting::Starting;
use herald_storage::StorageError;
use std::fs::File;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Sets up `tracing` output to stderr with `filter` (resolved and checked by
/// [`NodeConfig::resolve`], `RUST_LOG` included).
pub fn init_logging(filter: &str) {
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing::subscriber::set_global_default(log_subscriber(filter, ansi, || {
        DropWriteErrors(std::io::stderr())
    }))
    .expect("logging is set up once");
}

/// The node's log: `filter` (a bare level made quiet about openraft, see [`quiet_openraft`]
/// and [`peer_request_error`]) over lines written to `writer`.
fn log_subscriber<W>(filter: &str, ansi: bool, writer: W) -> impl tracing::Subscriber + Send + Sync
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    use tracing_subscriber::Layer;
    use tracing_subscriber::filter::{FilterExt, filter_fn};
    use tracing_subscriber::layer::SubscriberExt;
    let quiet = quiet_openraft(filter) != filter.trim();
    let env = tracing_subscriber::EnvFilter::new(quiet_openraft(filter));
    let layer = tracing_subscriber::fmt::layer()
        .with_ansi(ansi)
        .with_writer(writer)
        .with_filter(env.and(filter_fn(move |meta| !(quiet && peer_request_error(meta)))));
    tracing_subscriber::registry().with(layer)
}

/// Whether an event is one of openraft's core errors about one peer's request: a vote or a
/// leadership confirmation that a peer did not answer (down, restarting, or not connected
/// yet). Those name the peer in a `target` field, and come in every election of every group
/// while a peer is away: a node started a few seconds after the others on a loaded machine
/// logged `ERROR while requesting vote ... node 3 is unreachable` during a healthy formation.
/// herald reports unreachable peers itself, as for replication (see [`quiet_openraft`]);
/// openraft's other core errors (a storage failure, a core that stopped) have no such field
/// and are kept.
fn peer_request_error(meta: &tracing::Metadata<'_>) -> bool {
    meta.is_event()
        && meta.target() == "openraft::core::raft_core"
        && meta.fields().field("target").is_some()
}

/// A log writer that drops the lines it cannot write. tracing-subscriber reports a failed
/// write with `eprintln!`, which panics when stderr itself is what failed: a node whose log
/// reader went away (`herald serve 2>&1 | head`, a log shipper restarted) died at its next
/// log line. Losing log lines is better than losing the node.
struct DropWriteErrors<W>(W);

impl<W: std::io::Write> std::io::Write for DropWriteErrors<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = self.0.write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = self.0.flush();
        Ok(())
    }
}

/// A bare level (`info`, `warn`, `error`) with openraft's chatter left out. At info, openraft
/// logs every election, vote and membership step of every group (hundreds of lines a second
/// during a network split, some 340 per node at start-up), so it runs at warn. And at any
/// level, its replication tasks log a WARN and an ERROR for every AppendEntries to a peer that
/// is down, paused or restarting: 5,135 lines on one node in a 3-minute chaos run of kills
/// and restarts, drowning herald's own lines. Those are off: herald says itself which peers it
/// cannot reach (`herald_cluster::rpc`), `herald cluster status` shows each link, and
/// `herald_raft_follower_lag_entries` a follower left behind. openraft's core stays at error
/// (a storage failure, a stopped group). Likewise its snapshot sender's WARN for every try
/// to a peer that is down (700 lines in 45 s while a node was upgraded): a snapshot that does
/// not arrive shows in `herald_raft_follower_lag_entries`. A filter with directives (`openraft=info`,
/// `herald_cluster=debug`) and the levels below info are taken as given.
fn quiet_openraft(filter: &str) -> String {
    const QUIET: &str = "openraft::replication=off,\
        openraft::engine::handler::replication_handler=off,openraft::core::raft_core=error,\
        openraft::network::snapshot_transport=error";
    match filter.trim() {
        "info" => format!("info,openraft=warn,{QUIET}"),
        level @ ("warn" | "error") => format!("{level},{QUIET}"),
        other => other.to_string(),
    }
}

/// Runs the node until SIGTERM or SIGINT, then drains clients and returns.
pub async fn run(config: NodeConfig) -> Result<()> {
    // Handlers first: a signal that arrives during start-up still means a clean stop.
    let signal = shutdown_signal()?;
    // Before anything touches the data directory: a stalled disk can hold up its first write.
    if let Some(timeout) = config.disk_stall_timeout {
        crate::disk_watchdog::start(timeout, config.data_dir.clone())
            .context("cannot start the disk-stall watchdog")?;
    }
    // Every check that needs no store comes before the store, and a data directory that does
    // not exist yet is created only once they all passed: a refused start (no certificates,
    // a port in use) leaves no data directory or store behind. One that exists is locked
    // first, so a second process on it is told that, not that its ports are taken.
    let existing_lock = if config.data_dir.exists() {
        Some(lock_data_dir(&config).await?)
    } else {
        None
    };
    check_free_space(&config.data_dir, MIN_FREE_BYTES_AT_START)?;
    if let Some(cluster) = &config.cluster {
        check_cluster_endpoint(cluster)?;
    }
    let shutdown = CancellationToken::new();
    // A port in use is a one-line error and nothing else.
    let resp_listener = TcpListener::bind(config.resp_addr.addr)
        .await
        .map_err(|e| bind_error(&config.resp_addr, "Redis-protocol clients", e))?;
    let http = TcpListener::bind(config.http_addr.addr)
        .await
        .map_err(|e| bind_error(&config.http_addr, "HTTP clients", e))?;
    let _data_lock = match existing_lock {
        Some(lock) => lock,
        None => lock_data_dir(&config).await?,
    };
    // Until the store is open, clients are answered at once (LOADING, 503, reconnect) instead
    // of waiting unanswered in the listen backlog through a log replay.
    let starting = Starting::answer(resp_listener, http, &config.resp, &config.http);
    tracing::info!(
        "opening the event store; until it is open, clients are answered LOADING (RESP) and 503 (HTTP)"
    );
    let metrics = Metrics::install()?;
    let hub = Arc::new(Hub::new(config.resp.pubsub_output_limit));
    let store_dir = config.data_dir.join("store");
    let broker = match &config.cluster {
        None => Broker::open(
            hub.clone(),
            &store_dir,
            config.store.clone(),
            config.namespaces.clone(),
        )
        .with_context(|| format!("cannot open the event store in {}", store_dir.display()))?,
        Some(cluster) => Broker::open_cluster(
            hub.clone(),
            &store_dir,
            config.store.clone(),
            config.namespaces.clone(),
            cluster.clone(),
            // Its own token: the cluster keeps committing while clients drain, and stops in
            // `broker.close()`.
            CancellationToken::new(),
        )
        .await
        .map_err(|error| match error {
            // Names the node, both ids and the store already.
            ClusterError::Storage(error @ StorageError::NodeIdMismatch { .. }) => {
                anyhow::Error::new(error)
            }
            ClusterError::AnotherCluster {
                epoch,
                members,
                advertise,
            } => anyhow!(
                "data directory {} holds the store of another cluster (cluster epoch {epoch}, members {members}): none of its members is at this node's address ({advertise}) or among its --peers, so start this node on its own data directory (an empty one for a node new to its cluster)",
                config.data_dir.display(),
            ),
            error => anyhow::Error::new(error).context(format!(
                "cannot start cluster node {} (store in {})",
                cluster.node_id,
                store_dir.display()
            )),
        })?,
    };
    broker.spawn_expiry(Duration::from_secs(5), shutdown.clone());
    let ports = starting.finish().await?;
    let http = ports.http;
    let mut resp = RespServer::with_listener(
        ports.resp,
        broker.clone(),
        config.resp.clone(),
        shutdown.clone(),
    )?;
    resp.adopt(ports.adopt);
    tracing::info!(addr = %resp.local_addr(), "RESP (Redis protocol) listening");
    tracing::info!(addr = %http.local_addr()?, "HTTP listening");
    if config.resp.requirepass.is_none() && !config.resp_addr.addr.ip().is_loopback() {
        tracing::warn!(
            "no --requirepass set: protected mode accepts Redis clients from loopback addresses only"
        );
    }
    tracing::info!(
        version = herald_gateway::build::VERSION,
        commit = herald_gateway::build::COMMIT,
        data_dir = %config.data_dir.display(),
        epoch = %broker.epoch(),
        partitions = broker.store().partitions(),
        "herald node ready"
    );

    let http_state = HttpState::new(
        broker.clone(),
        resp.context(),
        config.http.clone(),
        metrics.renderer(),
        shutdown.clone(),
    );
    let resp_task = tokio::spawn(resp.run(config.shutdown_timeout));
    let http_task = tokio::spawn(herald_gateway::http::serve(http, http_state));

    signal.await;
    // One deadline for the whole drain, taken before anything is told to stop: a client that
    // does not read what is left for it is given up at it, not a moment later (it was a
    // second later, as was every exit that had to wait for such a client).
    let deadline = tokio::time::Instant::now() + config.shutdown_timeout;
    tracing::info!("shutting down: no new clients, draining the connected ones");
    shutdown.cancel();
    let servers = async {
        let _ = resp_task.await;
        let _ = http_task.await;
    };
    if tokio::time::timeout_at(deadline, servers).await.is_err() {
        tracing::warn!("some connections did not close in time; exiting anyway");
    }
    broker.close().await;
    tracing::info!("herald stopped");
    Ok(())
}

/// What a cluster node checks before its store is opened: that its certificates load and make
/// a TLS configuration, and that its cluster address can be bound (the endpoint binds it again
/// once the store is open).
fn check_cluster_endpoint(cluster: &ClusterConfig) -> Result<()> {
    NodeIdentity::load(&cluster.tls_dir, cluster.node_id)
        .and_then(|identity| {
            identity.server_config()?;
            identity.client_config().map(drop)
        })
        .with_context(|| format!("cannot start cluster node {}", cluster.node_id))?;
    let setting = AddrSetting {
        addr: cluster.bind,
        flag: "--cluster-addr",
        env: "HERALD_CLUSTER_ADDR",
    };
    std::net::UdpSocket::bind(cluster.bind)
        .map(drop)
        .map_err(|e| bind_error(&setting, "the other cluster nodes (UDP)", e))
}

/// A one-line bind error naming the address, who it is for (`what`) and the setting that
/// changes it.
fn bind_error(setting: &AddrSetting, what: &str, error: std::io::Error) -> anyhow::Error {
    let reason = match error.kind() {
        std::io::ErrorKind::AddrInUse => "address already in use".to_string(),
        std::io::ErrorKind::PermissionDenied => "permission denied".to_string(),
        _ => error.to_string(),
    };
    anyhow!(
        "cannot listen on {} for {what}: {reason}; choose another address with {} (or {})",
        setting.addr,
        setting.flag,
        setting.env
    )
}

/// How long a start waits for the data directory's lock: a supervisor that restarts a node
/// the moment it killed it (`kill -9`, an OOM kill) may start the new process while the old
/// one is still being torn down, holding the lock a moment longer.
const LOCK_PATIENCE: Duration = Duration::from_secs(3);

/// Creates the data directory and locks it, so two nodes never share one. A lock held by
/// another process is waited for up to [`LOCK_PATIENCE`] before the start is refused.
async fn lock_data_dir(config: &NodeConfig) -> Result<File> {
    let dir = &config.data_dir;
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create data directory {}", dir.display()))?;
    let path = dir.join("herald.lock");
    let file = File::create(&path).with_context(|| format!("cannot create {}", path.display()))?;
    let deadline = tokio::time::Instant::now() + LOCK_PATIENCE;
    let mut told = false;
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(file),
            Err(std::fs::TryLockError::WouldBlock) => {}
            Err(std::fs::TryLockError::Error(error)) => {
                return Err(anyhow!("cannot lock {}: {error}", path.display()));
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(anyhow!(
                "data directory {} is in use by another herald process; give this node its own with --data-dir",
                dir.display()
            ));
        }
        if !told {
            told = true;
            tracing::info!(
                dir = %dir.display(),
                "the data directory is locked by another process; waiting up to {} s for it to exit (a restart right after a kill)",
                LOCK_PATIENCE.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The free space a node needs on its data directory's disk to start: sled writes as it opens
/// (a snapshot of its page table, its log's next segment) and the write-ahead logs are
/// replayed into it. Started on a full disk, sled was seen to leave a snapshot file cut short
/// that no later start could read ("Read corrupted data"), so the node refuses to start instead.
const MIN_FREE_BYTES_AT_START: u64 = 64 << 20;

/// Refuses to start when the disk holding `dir` has less than `needed` bytes free. A directory
/// not created yet is measured on its nearest existing parent's disk, where it will be.
fn check_free_space(dir: &Path, needed: u64) -> Result<()> {
    let on_disk = dir
        .ancestors()
        .find(|d| !d.as_os_str().is_empty() && d.exists())
        .unwrap_or(Path::new("."));
    let Some(free) = free_bytes(on_disk) else {
        return Ok(()); // cannot tell: start, as before
    };
    if free < needed {
        return Err(anyhow!(
            "only {} MiB free on the disk holding {}: starting now could leave the store unreadable; free space (at least {} MiB) and start again",
            free >> 20,
            dir.display(),
            needed >> 20
        ));
    }
    Ok(())
}

/// Bytes available to this process on the file system holding `dir` (`statvfs`).
fn free_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is a valid C string and `stat` a valid out-parameter for the call.
    if unsafe { libc::statvfs(path.as_ptr(), &mut stat) } != 0 {
        return None;
    }
    Some(stat.f_bavail.saturating_mul(stat.f_frsize))
}

/// Installs the SIGTERM and SIGINT handlers; the returned future completes on either.
fn shutdown_signal() -> Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?;
    Ok(async move {
        tokio::select! {
            _ = terminate.recv() => tracing::info!("SIGTERM received"),
            _ = interrupt.recv() => tracing::info!("SIGINT received"),
        }
    })
}

#[cfg(test)]
mod free_space_tests {
    use super::*;

    #[test]
    fn a_start_needs_free_space_on_the_data_disk() {
        let dir = std::env::temp_dir();
        let free = free_bytes(&dir).expect("statvfs works on the temp dir");
        assert!(free > 0);
        assert!(check_free_space(&dir, 1).is_ok());
        let error = check_free_space(&dir, free + (1 << 40))
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("free on the disk holding") && error.contains("free space"),
            "{error}"
        );
        // A data directory not created yet: measured where it will be, named as given.
        let new = dir
            .join(format!("herald-not-yet-{}", std::process::id()))
            .join("data");
        assert!(check_free_space(&new, 1).is_ok());
        let error = check_free_space(&new, free + (1 << 40))
            .unwrap_err()
            .to_string();
        assert!(error.contains(&new.display().to_string()), "{error}");
        assert!(!new.exists());
    }
}

#[cfg(test)]
mod logging_tests {
    use super::*;

    #[test]
    fn bare_levels_leave_openraft_replication_out_and_directives_are_kept() {
        for level in ["info", "warn", "error"] {
            let filter = quiet_openraft(level);
            assert!(filter.starts_with(level), "{filter}");
            assert!(filter.contains("openraft::replication=off"), "{filter}");
            assert!(
                filter.contains("openraft::network::snapshot_transport=error"),
                "{filter}"
            );
            tracing_subscriber::EnvFilter::try_new(&filter).expect("a valid filter");
        }
        assert!(quiet_openraft("info").contains("openraft=warn"));
        assert_eq!(quiet_openraft("debug"), "debug");
        assert_eq!(quiet_openraft("info,openraft=info"), "info,openraft=info");
    }

    /// Logs what openraft's core logs when a peer does not answer a vote request, and when its
    /// core stops on a storage error, under `filter`; returns the lines written.
    fn openraft_core_lines(filter: &str) -> String {
        let lines = Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
        let sink = lines.clone();
        let writer = move || Sink(sink.clone());
        tracing::subscriber::with_default(log_subscriber(filter, false, writer), || {
            let target = 3;
            tracing::error!(target: "openraft::core::raft_core", {error = "node 3 is unreachable", target = display(&target)}, "while requesting vote");
            tracing::error!(target: "openraft::core::raft_core", error = "disk failed", "quit RaftCore::main on error");
        });
        String::from_utf8(lines.lock().unwrap().clone()).unwrap()
    }

    struct Sink(Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_peer_that_does_not_answer_a_vote_is_no_error_line_and_a_stopped_core_is() {
        for level in ["info", "warn", "error"] {
            let lines = openraft_core_lines(level);
            assert!(!lines.contains("while requesting vote"), "{level}: {lines}");
            assert!(
                lines.contains("quit RaftCore::main on error"),
                "{level}: {lines}"
            );
        }
        // Directives are taken as given.
        let lines = openraft_core_lines("info,openraft=info");
        assert!(lines.contains("while requesting vote"), "{lines}");
    }
}
