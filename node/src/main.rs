//! # herald
//!
//! The herald binary: parses the command line, resolves the configuration and runs a node.
//!
//! ## Layout
//!
//! - `cli`: flags and `HERALD_*` environment variables (clap).
//! - `config`: the TOML file and the precedence flags > environment > file > defaults.
//! - `certs`: `herald certs init | issue [--if-missing]` (in `main`), the cluster's certificates.
//! - `cluster`: `herald cluster status | init | join | remove | namespaces`, over a node's HTTP port.
//! - `health`: `herald health [--ready]`, a probe of a node's `/health` or `/ready` for
//!   container health checks.
//! - `disk_watchdog`: takes the node down when its disk stops answering, so that its clients
//!   resume on other nodes.
//! - `serve`: start-up (data directory, listeners), signal handling and graceful shutdown.

/// `println!` that does not panic when stdout is closed: `herald cluster status | head` closes
/// the pipe once it has what it wants, which is not the command's failure.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}

/// `eprintln!` that does not panic when stderr is closed: a node started with `2>&-` (or whose
/// log reader went away) that fails to start exits 1 with its reason lost, not 101 in a panic.
macro_rules! complain {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr().lock(), $($arg)*);
    }};
}

mod cli;
mod cluster;
mod config;
mod disk_watchdog;
mod health;
mod metrics;
mod serve;

use clap::Parser;
use std::path::Path;
use std::process::ExitCode;

/// jemalloc instead of glibc's malloc. sled allocates and frees several buffers per write, and
/// glibc's `_int_malloc` alone was 10% of a cluster node's CPU at 12x32. In alternating runs
/// (docs/benchmarks.md, session 12) jemalloc and mimalloc both gave the cluster 20-35% more
/// acknowledged publishes per second at 12x32 for less CPU each; jemalloc started with the
/// smaller RSS (35 MiB against 39-52 MiB; glibc 11 MiB) and the same ~5.5 KiB per idle
/// connection.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    match cli.command {
        cli::Command::Certs(command) => certs(command),
        cli::Command::Cluster(args) => cluster::run(args),
        cli::Command::Health(args) => health::run(args),
        cli::Command::Serve(args) => {
            let config = match config::NodeConfig::resolve(*args) {
                Ok(config) => config,
                Err(error) => {
                    complain!("herald: {error:#}");
                    return ExitCode::from(1);
                }
            };
            serve::init_logging(&config.log);
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(runtime) => runtime,
                Err(error) => {
                    complain!("herald: cannot start the async runtime: {error}");
                    return ExitCode::from(1);
                }
            };
            match runtime.block_on(serve::run(config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    complain!("herald: {error:#}");
                    ExitCode::from(1)
                }
            }
        }
    }
}

/// `herald certs init | issue`.
fn certs(command: cli::CertsCommand) -> ExitCode {
    let outcome = match command {
        cli::CertsCommand::Init {
            dir,
            if_missing,
            issue,
        } => init_ca(&dir, if_missing).and_then(|()| {
            issue
                .into_iter()
                .try_for_each(|node_id| issue_node(&dir, node_id, if_missing))
        }),
        cli::CertsCommand::Issue {
            dir,
            node_id,
            if_missing,
        } => issue_node(&dir, node_id, if_missing),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            complain!("herald: {error}");
            ExitCode::from(1)
        }
    }
}

/// Creates the cluster CA in `dir`; with `if_missing`, an existing `ca.pem` is kept (its
/// `ca.key` may have been moved offline once every node had its certificate).
fn init_ca(dir: &Path, if_missing: bool) -> Result<(), String> {
    let (cert, key) = (dir.join("ca.pem"), dir.join("ca.key"));
    if if_missing && cert.exists() {
        say!("kept the existing cluster CA: {}", cert.display());
        return Ok(());
    }
    herald_cluster::identity::init_ca(dir).map_err(|e| e.to_string())?;
    say!(
        "created the cluster CA: {} (keep {} private)",
        cert.display(),
        key.display()
    );
    Ok(())
}

/// Issues node `node_id`'s certificate in `dir`; with `if_missing`, an existing certificate
/// and key are kept (one without the other is an error: the directory needs a look).
fn issue_node(dir: &Path, node_id: u64, if_missing: bool) -> Result<(), String> {
    let cert = dir.join(format!("node-{node_id}.pem"));
    let key = dir.join(format!("node-{node_id}.key"));
    if if_missing {
        let half = |present: &Path, missing: &Path| {
            Err(format!(
                "{} exists but {} does not: restore it, or remove both and issue again",
                present.display(),
                missing.display()
            ))
        };
        match (cert.exists(), key.exists()) {
            (true, true) => {
                say!(
                    "kept node {node_id}'s existing certificate: {} and {}",
                    cert.display(),
                    key.display()
                );
                return Ok(());
            }
            (true, false) => return half(&cert, &key),
            (false, true) => return half(&key, &cert),
            (false, false) => {}
        }
    }
    let (cert, key) =
        herald_cluster::identity::issue_node(dir, node_id).map_err(|e| e.to_string())?;
    say!(
        "issued node {node_id}'s certificate: {} and {}",
        cert.display(),
        key.display()
    );
    Ok(())
}
