//! # herald
//!
//! The herald binary: parses the command line, resolves the configuration and runs a node.
//!
//! ## Layout
//!
//! - `cli`: flags and `HERALD_*` environment variables (clap).
//! - `config`: the TOML file and the precedence flags > environment > file > defaults.
//! - `certs`: `herald certs init | issue` (in `main`), the cluster's certificates.
//! - `cluster`: `herald cluster status | init | join | remove`, over a node's HTTP port.
//! - `serve`: start-up (data directory, listeners), signal handling and graceful shutdown.

mod cli;
mod cluster;
mod config;
mod metrics;
mod serve;

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    match cli.command {
        cli::Command::Certs(command) => certs(command),
        cli::Command::Cluster(args) => cluster::run(args),
        cli::Command::Serve(args) => {
            let config = match config::NodeConfig::resolve(*args) {
                Ok(config) => config,
                Err(error) => {
                    eprintln!("herald: {error:#}");
                    return ExitCode::from(1);
                }
            };
            serve::init_logging(&config.log);
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(runtime) => runtime,
                Err(error) => {
                    eprintln!("herald: cannot start the async runtime: {error}");
                    return ExitCode::from(1);
                }
            };
            match runtime.block_on(serve::run(config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    eprintln!("herald: {error:#}");
                    ExitCode::from(1)
                }
            }
        }
    }
}

/// `herald certs init | issue`.
fn certs(command: cli::CertsCommand) -> ExitCode {
    use herald_cluster::identity::{init_ca, issue_node};
    let outcome = match command {
        cli::CertsCommand::Init { dir } => init_ca(&dir).map(|()| {
            println!(
                "created the cluster CA: {} (keep {} private)",
                dir.join("ca.pem").display(),
                dir.join("ca.key").display()
            );
        }),
        cli::CertsCommand::Issue { dir, node_id } => {
            issue_node(&dir, node_id).map(|(cert, key)| {
                println!(
                    "issued node {node_id}'s certificate: {} and {}",
                    cert.display(),
                    key.display()
                );
            })
        }
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("herald: {error}");
            ExitCode::from(1)
        }
    }
}
