//! `herald serve`: start-up, signal handling and graceful shutdown of one node.

use crate::config::{AddrSetting, NodeConfig};
use anyhow::{Context, Result, anyhow};
use herald_gateway::hub::Hub;
use herald_gateway::resp::RespServer;
use std::fs::File;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Sets up `tracing` output to stderr with `filter` (overridden by `RUST_LOG` when set).
pub fn init_logging(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(filter));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        .init();
}

/// Runs the node until SIGTERM or SIGINT, then drains clients and returns.
pub async fn run(config: NodeConfig) -> Result<()> {
    // Handlers first: a signal that arrives during start-up still means a clean stop.
    let signal = shutdown_signal()?;
    let _data_lock = lock_data_dir(&config)?;
    let shutdown = CancellationToken::new();
    let hub = Arc::new(Hub::new(config.resp.pubsub_output_limit));

    let resp = RespServer::bind(
        config.resp_addr.addr,
        hub.clone(),
        config.resp.clone(),
        shutdown.clone(),
    )
    .await
    .map_err(|e| bind_error(&config.resp_addr, "Redis-protocol", e.source))?;
    let http = TcpListener::bind(config.http_addr.addr)
        .await
        .map_err(|e| bind_error(&config.http_addr, "HTTP", e))?;
    tracing::info!(addr = %resp.local_addr(), "RESP (Redis protocol) listening");
    tracing::info!(addr = %http.local_addr()?, "HTTP listening");
    if config.resp.requirepass.is_none() && !config.resp_addr.addr.ip().is_loopback() {
        tracing::warn!(
            "no --requirepass set: protected mode accepts Redis clients from loopback addresses only"
        );
    }
    tracing::info!(version = env!("CARGO_PKG_VERSION"), data_dir = %config.data_dir.display(), "herald node ready");

    let resp_task = tokio::spawn(resp.run(config.shutdown_timeout));
    let http_shutdown = shutdown.clone();
    let http_task = tokio::spawn(herald_gateway::http::serve(http, async move {
        http_shutdown.cancelled().await
    }));

    signal.await;
    tracing::info!("shutting down: no new clients, draining the connected ones");
    shutdown.cancel();
    let drained = tokio::time::timeout(
        config.shutdown_timeout + std::time::Duration::from_secs(1),
        async {
            let _ = resp_task.await;
            let _ = http_task.await;
        },
    )
    .await;
    if drained.is_err() {
        tracing::warn!("some connections did not close in time; exiting anyway");
    }
    tracing::info!("herald stopped");
    Ok(())
}

/// A one-line bind error naming the address and the setting that changes it.
fn bind_error(setting: &AddrSetting, what: &str, error: std::io::Error) -> anyhow::Error {
    let reason = match error.kind() {
        std::io::ErrorKind::AddrInUse => "address already in use".to_string(),
        std::io::ErrorKind::PermissionDenied => "permission denied".to_string(),
        _ => error.to_string(),
    };
    anyhow!(
        "cannot listen on {} for {what} clients: {reason}; choose another address with {} (or {})",
        setting.addr,
        setting.flag,
        setting.env
    )
}

/// Creates the data directory and locks it, so two nodes never share one.
fn lock_data_dir(config: &NodeConfig) -> Result<File> {
    let dir = &config.data_dir;
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create data directory {}", dir.display()))?;
    let path = dir.join("herald.lock");
    let file = File::create(&path).with_context(|| format!("cannot create {}", path.display()))?;
    file.try_lock().map_err(|_| {
        anyhow!("data directory {} is in use by another herald process; give this node its own with --data-dir", dir.display())
    })?;
    Ok(file)
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
