//! Command-line interface. Every `serve` setting can come from a flag, a `HERALD_*` environment
//! variable, or the TOML file given with `--config`, in that order of precedence.

use clap::{Args, Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;

/// herald: a clustered real-time pub/sub gateway. Publish with any Redis client or HTTP;
/// subscribe over Redis, Server-Sent Events or WebSocket.
#[derive(Debug, Parser)]
#[command(
    name = "herald",
    version = herald_gateway::build::VERSION_AND_COMMIT,
    propagate_version = true
)]
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
    /// Operate a running cluster through one node's HTTP port: status, init, join, remove.
    Cluster(ClusterArgs),
    /// Check a running node over its HTTP port (`/health`, or `/ready` with --ready): exit 0
    /// when it answers 200, 1 otherwise. Made for container health checks.
    Health(HealthArgs),
}

/// `herald health`: a probe for health checks where no curl exists (e.g. a scratch image).
#[derive(Debug, Args)]
pub struct HealthArgs {
    /// The node's HTTP address; an unspecified host (0.0.0.0, `[::]`) means this machine's
    /// loopback, so the node's own --http-addr works as is.
    #[arg(
        long,
        env = "HERALD_HTTP_ADDR",
        value_name = "HOST:PORT",
        default_value = "127.0.0.1:8000"
    )]
    pub http: String,
    /// Ask `/ready` (the node can commit: cluster formed, quorum reachable) instead of
    /// `/health` (the process serves HTTP).
    #[arg(long)]
    pub ready: bool,
    /// Give up after this many seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 3)]
    pub timeout: u64,
}

/// `herald cluster ...`: talks to a node's `/api/cluster/*` endpoints.
#[derive(Debug, Args)]
pub struct ClusterArgs {
    /// The HTTP address of any node of the cluster.
    #[arg(
        long,
        env = "HERALD_HTTP_ADDR",
        value_name = "HOST:PORT",
        default_value = "127.0.0.1:8000",
        global = true
    )]
    pub http: String,
    /// The node's password (its --requirepass), if it has one.
    #[arg(
        long,
        env = "HERALD_REQUIREPASS",
        value_name = "PASSWORD",
        hide_env_values = true,
        global = true
    )]
    pub password: Option<String>,
    /// Give up waiting for the node's answer after this long, e.g. 30s (a bare number is
    /// seconds) [default: 10s for status and namespaces, 60s for init, join, remove and
    /// namespaces --set, changes that wait for a quorum of the cluster].
    #[arg(long, value_name = "DURATION", value_parser = parse_timeout, global = true)]
    pub timeout: Option<std::time::Duration>,
    /// What to do.
    #[command(subcommand)]
    pub command: ClusterCommand,
}

/// `herald cluster` subcommands.
#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Members and this node's link to each, then each Raft group's role, leader, term, log
    /// indexes, voters, elections and lag.
    ///
    /// The table: a first line with the node, the epoch and the build it runs, then THIS
    /// NODE'S CLOCK when this node's wall clock is off from the majority's; the members, each
    /// with how this node reaches it (connected and the round trip, UNREACHABLE and the last
    /// error, REFUSED and why, or REFUSES THIS NODE and why: it refuses this node's store), CLOCK when its clock is off by more than 0.5 s, and BUILD
    /// when it runs another build than this node (a rolling upgrade's progress); then one line per Raft group
    /// (group 0 is the meta group, the others the partitions): this node's role in it, the
    /// leader, the term, this node's last-log and applied indexes, the voters, the elections
    /// this node called (in parentheses, those taken over: elections the group's leader asked
    /// for, handing the group to this node), and, on a group this node leads, each member's
    /// lag in log entries. A node not in a formed cluster yet lists, instead of members,
    /// itself and the peers it was started with (--peers), with what it waits for.
    Status {
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// Form the cluster now from the node and its --peers (instead of --bootstrap-expect).
    Init {
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// Add a node (started with --node-id and --peers naming current members) to the cluster.
    Join {
        /// The new node's id (its certificate must name it).
        #[arg(long, value_name = "N")]
        node_id: u64,
        /// The new node's cluster address (host:port, UDP).
        #[arg(long, value_name = "HOST:PORT")]
        addr: String,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove a node from the cluster; its data is not trusted again without a new join.
    Remove {
        /// The node to remove.
        #[arg(long, value_name = "N")]
        node_id: u64,
        /// Remove it even where the voters left would have no live quorum (a group whose
        /// voters are this node and one that does not answer): such a group commits nothing
        /// until the silent node is back. Without it, such a removal is refused, saying which
        /// groups and nodes.
        #[arg(long)]
        force: bool,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show the cluster's namespace config (the one every member applies); with --set, replace
    /// it with the [namespace.NAME] tables of a file (e.g. a node's config file).
    Namespaces {
        /// The file whose [namespace.NAME] tables become the cluster's config.
        #[arg(long, value_name = "FILE")]
        set: Option<PathBuf>,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `herald certs ...`.
#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// Create the cluster CA (ca.pem, ca.key) in a directory; never overwrites one.
    Init {
        /// Directory of the cluster's certificates.
        #[arg(long, env = "HERALD_TLS_DIR", value_name = "DIR")]
        dir: PathBuf,
        /// Keep an existing CA (and existing node certificates) and succeed, instead of
        /// failing: makes the command safe to run again, e.g. from a one-shot container.
        #[arg(long)]
        if_missing: bool,
        /// Then issue these nodes' certificates too, as `herald certs issue` does,
        /// e.g. --issue 1,2,3.
        #[arg(long, value_name = "N,...", value_delimiter = ',')]
        issue: Vec<u64>,
    },
    /// Issue node N's certificate (node-N.pem, node-N.key), signed by the CA in the directory.
    Issue {
        /// Directory of the cluster's certificates (holding ca.pem and ca.key).
        #[arg(long, env = "HERALD_TLS_DIR", value_name = "DIR")]
        dir: PathBuf,
        /// The node the certificate names.
        #[arg(long, value_name = "N")]
        node_id: u64,
        /// Keep an existing certificate and key of that node and succeed, instead of failing.
        #[arg(long)]
        if_missing: bool,
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
    pub maxclients: Option<String>,

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
    pub timeout: Option<String>,

    /// How long shutdown waits for clients to drain, e.g. 10s or 500ms; a bare number is
    /// seconds [default: 5s].
    #[arg(long, env = "HERALD_SHUTDOWN_TIMEOUT", value_name = "DURATION")]
    pub shutdown_timeout: Option<String>,

    /// How long a write or sync of the write-ahead logs may wait before the node gives up on
    /// its disk: it closes every connection (clients resume on other nodes) and exits with
    /// status 75 (once the stuck write returns) for its supervisor to restart it, e.g. 30s (a
    /// bare number is seconds; at least 1s); 0 never gives up [default: 20s].
    #[arg(long, env = "HERALD_DISK_STALL_TIMEOUT", value_name = "DURATION")]
    pub disk_stall_timeout: Option<String>,

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

    /// This node's id in a cluster; setting it (with --tls-dir) turns clustering on. The node's
    /// certificate (`herald certs issue --node-id N`) must name it.
    #[arg(long, env = "HERALD_NODE_ID", value_name = "N")]
    pub node_id: Option<u64>,

    /// UDP address of the node-to-node QUIC endpoint [default: 127.0.0.1:7000].
    #[arg(long, env = "HERALD_CLUSTER_ADDR", value_name = "ADDR")]
    pub cluster_addr: Option<SocketAddr>,

    /// The host:port other nodes reach this node's cluster endpoint at [default: --cluster-addr].
    #[arg(long, env = "HERALD_ADVERTISE_ADDR", value_name = "HOST:PORT")]
    pub advertise_addr: Option<String>,

    /// The cluster's nodes as `ID@HOST:PORT`, comma-separated (this node may be included).
    #[arg(
        long,
        env = "HERALD_PEERS",
        value_name = "PEERS",
        value_delimiter = ','
    )]
    pub peers: Option<Vec<String>>,

    /// Form the cluster automatically once this many nodes (this one included) are up; the
    /// lowest id of --peers does it. 0 = wait for `herald cluster init` [default: 0].
    #[arg(long, env = "HERALD_BOOTSTRAP_EXPECT", value_name = "N")]
    pub bootstrap_expect: Option<usize>,

    /// Directory with the cluster CA certificate and this node's certificate and key.
    #[arg(long, env = "HERALD_TLS_DIR", value_name = "DIR")]
    pub tls_dir: Option<PathBuf>,

    /// Raft leader heartbeat, e.g. 75ms; also the AppendEntries timeout, so it must cover a
    /// follower's fsync [default: 75ms].
    #[arg(long, env = "HERALD_RAFT_HEARTBEAT", value_name = "DURATION")]
    pub raft_heartbeat: Option<String>,

    /// Raft election timeout range MIN-MAX, e.g. 250ms-350ms; a dead leader is replaced after
    /// about MAX + a random time in the range [default: 250ms-350ms].
    #[arg(long, env = "HERALD_ELECTION_TIMEOUT", value_name = "MIN-MAX")]
    pub election_timeout: Option<String>,

    /// A Raft group snapshots its state after this many log entries, and then drops all but
    /// the last tenth of them; a member further behind catches up from the snapshot
    /// [default: 20000].
    #[arg(long, env = "HERALD_RAFT_SNAPSHOT_LOGS", value_name = "N")]
    pub raft_snapshot_logs: Option<u64>,

    /// Fast failover: once a partition leader is silent for the lease, the surviving voters
    /// have the one with the longest log call an election at once, instead of waiting for
    /// Raft's own timers (false: timers only, a failover then takes ~0.3 s longer)
    /// [default: true].
    #[arg(long, env = "HERALD_RAFT_FAST_FAILOVER", value_name = "BOOL")]
    pub raft_fast_failover: Option<bool>,

    /// Forget, at this start, how far this node saw every member's Raft journal get: after a
    /// whole cluster is restored from backups taken at different times, members would refuse
    /// each other as gone back in time (start every node with it once). A member it refused
    /// for that is heard again. Not in the config file: a one-off.
    #[arg(
        long,
        env = "HERALD_FORGET_PEER_JOURNALS",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub forget_peer_journals: bool,

    /// How long a durable publish may wait for its quorum commit before failing, e.g. 5s
    /// [default: 5s].
    #[arg(long, env = "HERALD_PUBLISH_TIMEOUT", value_name = "DURATION")]
    pub publish_timeout: Option<String>,

    /// Log filter, e.g. info or warn,herald_gateway=debug; it must name a level. RUST_LOG is
    /// read when neither this nor the config file's `log` is set [default: info].
    #[arg(long, env = "HERALD_LOG", value_name = "FILTER")]
    pub log: Option<String>,
}

/// A `--timeout`: a duration or a bare number of seconds, above zero.
fn parse_timeout(value: &str) -> Result<std::time::Duration, String> {
    match crate::config::seconds_or_duration("timeout", value) {
        Ok(timeout) if timeout.is_zero() => Err("the timeout must be above zero".to_string()),
        Ok(timeout) => Ok(timeout),
        Err(error) => Err(error.to_string()),
    }
}

pub(crate) fn parse_yes_no(value: &str) -> Result<bool, String> {
    match value.to_ascii_lowercase().as_str() {
        "yes" | "true" | "1" | "on" => Ok(true),
        "no" | "false" | "0" | "off" => Ok(false),
        _ => Err(format!("expected yes or no, got '{value}'")),
    }
}
