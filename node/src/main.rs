//! # herald
//!
//! The herald binary: parses the command line, resolves the configuration and runs a node.
//!
//! ## Layout
//!
//! - `cli`: flags and `HERALD_*` environment variables (clap).
//! - `config`: the TOML file and the precedence flags > environment > file > defaults.
//! - `serve`: start-up (data directory, listeners), signal handling and graceful shutdown.

mod cli;
mod config;
mod metrics;
mod serve;

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    match cli.command {
        cli::Command::Serve(args) => {
            let config = match config::NodeConfig::resolve(args) {
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
