//! Command-line interface. Every `serve` setting can come from a flag, a `HERALD_*` environment
//! variable, or the TOML file given with `--config`, in that order of precedence.

use clap::{Args, Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;

/// herald: a clustered real-time pub/sub gateway. Publish with any Redis client or HTTP;
/// subscribe over Redis, Server-Sent Events or WebSocket.
#[derive(Debug, Parser)]
#[command(name = "herald", version, propagate_version = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// herald's subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a node (a single node with its embedded store unless told otherwise).
    Serve(Box<ServeArgs>),
    /// Create the cluster CA and node certificates for node-to-node mutual TLS.
    #[command(subcommand)]
    Certs(CertsCommand),
}

/// `herald certs ...`.
#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// Create the cluster CA (ca.pem, ca.key) in a directory; never overwrites one.
    Init {
        /// Directory of the cluster's certificates.
        #[arg(long, env = "HERALD_TLS_DIR", value_name = "DIR")]
        dir: PathBuf,
    },
    /// Issue node N's certificate (node-N.pem, node-N.key), signed by the CA in the directory.
    Issue {
        /// Directory of the cluster's certificates (holding ca.pem and ca.key).
        #[arg(long, env = "HERALD_TLS_DIR", value_name = "DIR")]
        dir: PathBuf,
        /// The node the certificate names.
        #[arg(long, value_name = "N")]
        node_id: u64,
    },
}

/// Settings of `herald serve`. Unset values fall back to the config file, then to defaults.
#[derive(Debug, Default, Args)]
pub struct ServeArgs {
    /// TOML file with settings (same names as the flags, with underscores).
    #[arg(long, env = "HERALD_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Address of the Redis-protocol listener [default: 127.0.0.1:6379].
    #[arg(long, env = "HERALD_RESP_ADDR", value_name = "ADDR")]
    pub resp_addr: Option<SocketAddr>,

    /// Address of the HTTP listener (SSE, WebSocket, publish API, health) [default: 127.0.0.1:8000].
    #[arg(long, env = "HERALD_HTTP_ADDR", value_name = "ADDR")]
    pub http_addr: Option<SocketAddr>,

    /// Directory of the node's data [default: ./herald-data].
    #[arg(long, env = "HERALD_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,

    /// Password clients must give with AUTH (or HELLO ... AUTH) [default: none].
    #[arg(
        long,
        env = "HERALD_REQUIREPASS",
        value_name = "PASSWORD",
        hide_env_values = true
    )]
    pub requirepass: Option<String>,

    /// Without a password, accept Redis clients from loopback addresses only [default: yes].
    #[arg(long, env = "HERALD_PROTECTED_MODE", value_name = "yes|no", value_parser = parse_yes_no)]
    pub protected_mode: Option<bool>,

    /// Most simultaneous Redis-protocol clients [default: 10000].
    #[arg(long, env = "HERALD_MAXCLIENTS", value_name = "N")]
    pub maxclients: Option<usize>,

    /// Longest request argument, e.g. 512mb [default: 512mb].
    #[arg(long, env = "HERALD_PROTO_MAX_BULK_LEN", value_name = "BYTES")]
    pub proto_max_bulk_len: Option<String>,

    /// Most unparsed input buffered per client, e.g. 1gb [default: 1gb].
    #[arg(long, env = "HERALD_CLIENT_QUERY_BUFFER_LIMIT", value_name = "BYTES")]
    pub client_query_buffer_limit: Option<String>,

    /// Output limit of subscribers as `<hard> <soft> <soft-seconds>`: a subscriber with more
    /// queued than `hard`, or more than `soft` for `soft-seconds`, is disconnected
    /// [default: "32mb 8mb 60"].
    #[arg(long, env = "HERALD_PUBSUB_OUTPUT_LIMIT", value_name = "LIMIT")]
    pub pubsub_output_limit: Option<String>,

    /// Close non-subscriber clients idle for this many seconds, 0 for never [default: 0].
    #[arg(long, env = "HERALD_TIMEOUT", value_name = "SECONDS")]
    pub timeout: Option<u64>,

    /// How long shutdown waits for clients to drain, in seconds [default: 5].
    #[arg(long, env = "HERALD_SHUTDOWN_TIMEOUT", value_name = "SECONDS")]
    pub shutdown_timeout: Option<u64>,

    /// Partitions (independent event sequences) of a new store; fixed once the store exists
    /// [default: 16].
    #[arg(long, env = "HERALD_PARTITIONS", value_name = "N")]
    pub partitions: Option<u16>,

    /// How long a message id is remembered, so a retried publish commits once, e.g. 10m
    /// [default: 10m].
    #[arg(long, env = "HERALD_DEDUP_WINDOW", value_name = "DURATION")]
    pub dedup_window: Option<String>,

    /// Origins allowed to call the HTTP API from browsers (CORS), comma-separated, or `*`
    /// [default: none].
    #[arg(
        long,
        env = "HERALD_CORS_ORIGINS",
        value_name = "ORIGINS",
        value_delimiter = ','
    )]
    pub cors_origins: Option<Vec<String>>,

    /// Interval of SSE keep-alive comments, e.g. 15s [default: 15s].
    #[arg(long, env = "HERALD_SSE_KEEP_ALIVE", value_name = "DURATION")]
    pub sse_keep_alive: Option<String>,

    /// Log filter, e.g. info or herald_gateway=debug [default: info].
    #[arg(long, env = "HERALD_LOG", value_name = "FILTER")]
    pub log: Option<String>,
}

fn parse_yes_no(value: &str) -> Result<bool, String> {
    match value.to_ascii_lowercase().as_str() {
        "yes" | "true" | "1" | "on" => Ok(true),
        "no" | "false" | "0" | "off" => Ok(false),
        _ => Err(format!("expected yes or no, got '{value}'")),
    }
}
