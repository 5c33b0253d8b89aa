//! Command-line interface of `herald-bench`.

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::time::Duration;

/// Measures publish-to-delivery throughput and latency of herald or any RESP (Redis) server.
#[derive(Debug, Parser)]
#[command(name = "herald-bench", version)]
pub struct Cli {
    /// Tokio worker threads of the benchmark client [default: one per CPU].
    #[arg(long, global = true, value_name = "N")]
    pub threads: Option<usize>,

    /// What to run.
    #[command(subcommand)]
    pub command: Command,
}

/// The benchmark's subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// P publishers x S subscribers against one server: throughput and delivery latency.
    Pubsub(PubsubArgs),
    /// The same pub/sub scenario against two servers, alternating them round by round.
    Compare(CompareArgs),
    /// Acknowledged durable publishes (herald PUBLISH vs Redis XADD): throughput and ack
    /// latency for C connections x K pipelined commands, against one or more servers in turns.
    Durable(DurableArgs),
    /// N idle SSE and N idle WebSocket connections to herald: its memory per connection, and
    /// the time one published event takes to reach all of them.
    Idle(IdleArgs),
    /// Replicated durable publishes: a 3-node herald cluster (RESP `PUBLISH`, Raft quorum
    /// commit) against a 3-server NATS JetStream cluster (R3 file stream, PubAck), both
    /// started here on loopback; acks/s and ack latency for C connections x K in flight.
    Cluster(ClusterArgs),
    /// Failover of a 3-node herald cluster started here: `kill -9` of a partition leader to
    /// the first acknowledged publish to that partition, over repeated kills and restarts.
    Failover(FailoverArgs),
}

/// Load shape shared by `pubsub` and `compare`.
#[derive(Debug, Clone, Args)]
pub struct LoadArgs {
    /// Publisher connections.
    #[arg(long, default_value_t = 1, value_name = "P")]
    pub publishers: usize,

    /// Subscriber connections; subscriber j subscribes to channel `bench:<j % channels>`.
    #[arg(long, default_value_t = 50, value_name = "S")]
    pub subscribers: usize,

    /// Channels (`bench:0` ..); publishers publish round-robin over them.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub channels: usize,

    /// Measured time, e.g. 10s, 500ms, 1m.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,

    /// Publishing time before the measurement, excluded from the figures.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub warmup: Duration,

    /// Most time subscribers wait for late deliveries after publishing stops.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub drain: Duration,

    /// PUBLISH commands each publisher keeps in flight (sent as one batch).
    #[arg(long, default_value_t = 32, value_name = "N")]
    pub pipeline: usize,

    /// Cap on messages published per second over all publishers [default: unlimited].
    #[arg(long, value_name = "MSGS_PER_S")]
    pub rate: Option<u64>,

    /// Print JSON instead of human-readable text.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `pubsub`.
#[derive(Debug, Clone, Args)]
pub struct PubsubArgs {
    /// Address of the RESP server.
    #[arg(long, default_value = "127.0.0.1:6379", value_name = "HOST:PORT")]
    pub addr: String,

    /// Payload size in bytes (at least 16), e.g. 64, 1k, 1KiB.
    #[arg(long, default_value = "64", value_parser = parse_size, value_name = "BYTES")]
    pub payload: usize,

    /// Name of the server in the report [default: the address].
    #[arg(long)]
    pub label: Option<String>,

    /// Load shape.
    #[command(flatten)]
    pub load: LoadArgs,
}

/// Arguments of `compare`.
#[derive(Debug, Clone, Args)]
pub struct CompareArgs {
    /// First server, as `label=host:port` or `host:port`.
    #[arg(long, value_parser = parse_target, value_name = "LABEL=HOST:PORT")]
    pub a: Target,

    /// Second server, as `label=host:port` or `host:port`.
    #[arg(long, value_parser = parse_target, value_name = "LABEL=HOST:PORT")]
    pub b: Target,

    /// Payload sizes to compare, comma-separated, e.g. 64,1024.
    #[arg(long, default_value = "64", value_delimiter = ',', value_parser = parse_size, value_name = "BYTES")]
    pub payload: Vec<usize>,

    /// Rounds per payload size; each round runs both servers, in alternating order.
    #[arg(long, default_value_t = 2, value_name = "N")]
    pub rounds: usize,

    /// Pause between runs, to let the servers settle.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub pause: Duration,

    /// Load shape.
    #[command(flatten)]
    pub load: LoadArgs,
}

/// Arguments of `durable`.
#[derive(Debug, Clone, Args)]
pub struct DurableArgs {
    /// A server, as `LABEL=[publish|xadd@]HOST:PORT` (the command defaults to `publish`);
    /// repeat to compare several in turns. Ratios are the first target's over each other's.
    #[arg(long = "target", required = true, value_parser = parse_durable_target, value_name = "LABEL=CMD@HOST:PORT")]
    pub targets: Vec<DurableTarget>,

    /// A target's process id, as `LABEL=PID`, to report its CPU time and disk writes per
    /// message (server on this machine only); repeatable.
    #[arg(long = "pid", value_parser = parse_pid, value_name = "LABEL=PID")]
    pub pids: Vec<(String, u32)>,

    /// Load shapes to run, as CxK (C connections, each pipelining K commands), comma-separated.
    #[arg(long, default_value = "1x1,1x32,16x32", value_delimiter = ',', value_parser = parse_shape, value_name = "CxK")]
    pub shape: Vec<(usize, usize)>,

    /// Payload sizes, comma-separated, e.g. 64,1024.
    #[arg(long, default_value = "64,1024", value_delimiter = ',', value_parser = parse_size, value_name = "BYTES")]
    pub payload: Vec<usize>,

    /// `XADD ... MAXLEN ~ N`: trim each stream to about N entries (herald's default namespace
    /// keeps 100); 0 = no trimming.
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub maxlen: u64,

    /// Keys are `<prefix>:<connection>`.
    #[arg(long, default_value = "bench-durable")]
    pub prefix: String,

    /// Rounds per (payload, shape); each round runs every target, rotating which goes first.
    #[arg(long, default_value_t = 2, value_name = "N")]
    pub rounds: usize,

    /// Measured time per run.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,

    /// Writing time before the measurement, excluded from the figures.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub warmup: Duration,

    /// Pause between runs, to let the servers settle.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub pause: Duration,

    /// Print JSON instead of human-readable text.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `idle`. A flag given twice takes its last value (scripts pass defaults first).
#[derive(Debug, Clone, Args)]
#[command(args_override_self = true)]
pub struct IdleArgs {
    /// herald's HTTP address.
    #[arg(long, default_value = "127.0.0.1:8000", value_name = "HOST:PORT")]
    pub http: String,

    /// SSE connections (`GET /api/stream/<channel>`).
    #[arg(long, default_value_t = 10_000, value_name = "N")]
    pub sse: usize,

    /// WebSocket connections (`/ws`, subscribed to the channel).
    #[arg(long, default_value_t = 10_000, value_name = "N")]
    pub ws: usize,

    /// The channel every connection listens on.
    #[arg(long, default_value = "bench-idle")]
    pub channel: String,

    /// herald's process id, to read its resident memory (VmRSS) from /proc.
    #[arg(long)]
    pub pid: Option<u32>,

    /// Events to publish, one at a time, once everything is connected.
    #[arg(long, default_value_t = 3, value_name = "N")]
    pub events: usize,

    /// Size of each event's data.
    #[arg(long, default_value = "64", value_parser = parse_size, value_name = "BYTES")]
    pub payload: usize,

    /// Connections being opened at the same time.
    #[arg(long, default_value_t = 200, value_name = "N")]
    pub concurrency: usize,

    /// Wait after opening each group of connections before reading the RSS.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub settle: Duration,

    /// Idle time with everything connected before the first publish.
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    pub hold: Duration,

    /// Most time to wait for one event to reach every connection.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub timeout: Duration,

    /// Interval of the client's WebSocket pings (herald closes silent clients); 0 = never.
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    pub ws_ping: Duration,

    /// Print JSON instead of human-readable text.
    #[arg(long)]
    pub json: bool,
}

/// A system measured by `cluster`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ClusterSystem {
    /// herald nodes, RESP `PUBLISH` with the `redis` crate.
    Herald,
    /// nats-server with JetStream, publishes with `async-nats`.
    Nats,
}

impl ClusterSystem {
    /// The name in reports.
    pub fn name(self) -> &'static str {
        match self {
            ClusterSystem::Herald => "herald",
            ClusterSystem::Nats => "nats",
        }
    }
}

/// Arguments of `cluster`. A flag given twice takes its last value (scripts pass defaults
/// first).
#[derive(Debug, Clone, Args)]
#[command(args_override_self = true)]
pub struct ClusterArgs {
    /// The herald binary to run.
    #[arg(long, default_value = "target/release/herald", value_name = "PATH")]
    pub herald_bin: PathBuf,

    /// The nats-server binary to run.
    #[arg(long, default_value = "nats-server", value_name = "PATH")]
    pub nats_bin: PathBuf,

    /// Systems to measure, comma-separated, in this order in the table; ratios are the first
    /// over the second.
    #[arg(
        long,
        default_value = "herald,nats",
        value_delimiter = ',',
        value_name = "LIST"
    )]
    pub systems: Vec<ClusterSystem>,

    /// Load shapes, as CxK (C connections spread over the three nodes, each keeping K
    /// publishes in flight), comma-separated.
    #[arg(long, default_value = "3x1,3x32,12x32,48x32", value_delimiter = ',', value_parser = parse_shape, value_name = "CxK")]
    pub shape: Vec<(usize, usize)>,

    /// Payload sizes, comma-separated, e.g. 64,1024.
    #[arg(long, default_value = "64,1024", value_delimiter = ',', value_parser = parse_size, value_name = "BYTES")]
    pub payload: Vec<usize>,

    /// Channels (herald) / subjects (NATS) the publishes are spread over.
    #[arg(long, default_value_t = 64, value_name = "N")]
    pub channels: usize,

    /// Messages the NATS stream keeps per subject (`max_msgs_per_subject`), as herald's
    /// default namespace keeps 100 events per channel.
    #[arg(long, default_value_t = 100, value_name = "N")]
    pub history: u64,

    /// herald partitions (`--partitions` of each node).
    #[arg(long, default_value_t = 16, value_name = "N")]
    pub partitions: u16,

    /// Extra argument for every `herald serve`; repeatable (e.g. `--herald-arg=--publish-timeout
    /// --herald-arg=10s`).
    #[arg(long = "herald-arg", value_name = "ARG", allow_hyphen_values = true)]
    pub herald_args: Vec<String>,

    /// Rounds per (payload, shape); each round runs every system, rotating which goes first.
    #[arg(long, default_value_t = 2, value_name = "N")]
    pub rounds: usize,

    /// Measured time per run.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,

    /// Publishing time before the measurement, excluded from the figures.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub warmup: Duration,

    /// Pause between runs, to let the servers settle.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub pause: Duration,

    /// Directory for the clusters' data and logs [default: a new one under the temp dir].
    #[arg(long, value_name = "DIR")]
    pub work_dir: Option<PathBuf>,

    /// Keep the work directory (data and logs) at the end.
    #[arg(long)]
    pub keep: bool,

    /// Print JSON instead of human-readable text.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `failover`. A flag given twice takes its last value.
#[derive(Debug, Clone, Args)]
#[command(args_override_self = true)]
pub struct FailoverArgs {
    /// The herald binary to run.
    #[arg(long, default_value = "target/release/herald", value_name = "PATH")]
    pub herald_bin: PathBuf,

    /// Kills (each followed by a restart of the victim on its data).
    #[arg(long, default_value_t = 20, value_name = "N")]
    pub kills: usize,

    /// herald partitions (`--partitions` of each node).
    #[arg(long, default_value_t = 16, value_name = "N")]
    pub partitions: u16,

    /// Extra argument for every `herald serve`; repeatable.
    #[arg(long = "herald-arg", value_name = "ARG", allow_hyphen_values = true)]
    pub herald_args: Vec<String>,

    /// Client timeout of one publish attempt; a timed-out attempt is retried at once.
    #[arg(long, default_value = "250ms", value_parser = parse_duration)]
    pub request_timeout: Duration,

    /// Pause before retrying an attempt that failed fast (refused, 503).
    #[arg(long, default_value = "5ms", value_parser = parse_duration)]
    pub retry_pause: Duration,

    /// Interval between publishes before the kill.
    #[arg(long, default_value = "10ms", value_parser = parse_duration)]
    pub interval: Duration,

    /// Publishing before each kill.
    #[arg(long, default_value = "500ms", value_parser = parse_duration)]
    pub steady: Duration,

    /// Pause after the victim is back and caught up, before the next kill.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub settle: Duration,

    /// Give up on one failover after this long (counted as this long).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub give_up: Duration,

    /// Size of each publish's data.
    #[arg(long, default_value = "64", value_parser = parse_size, value_name = "BYTES")]
    pub payload: usize,

    /// Directory for the cluster's data and logs [default: a new one under the temp dir].
    #[arg(long, value_name = "DIR")]
    pub work_dir: Option<PathBuf>,

    /// Keep the work directory (data and logs) at the end.
    #[arg(long)]
    pub keep: bool,

    /// Print JSON instead of human-readable text.
    #[arg(long)]
    pub json: bool,
}

/// The write command a durable target is measured with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DurableCommand {
    /// `PUBLISH` (herald).
    Publish,
    /// `XADD` (Redis Streams).
    Xadd,
}

/// A server to measure durable publishes against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DurableTarget {
    /// Name in reports.
    pub label: String,
    /// The write command.
    pub command: DurableCommand,
    /// `host:port`.
    pub addr: String,
}

/// Parses `LABEL=[publish|xadd@]HOST:PORT`.
pub fn parse_durable_target(text: &str) -> Result<DurableTarget, String> {
    let (label, rest) = text
        .split_once('=')
        .ok_or_else(|| format!("expected LABEL=[publish|xadd@]HOST:PORT, got {text:?}"))?;
    let (command, addr) = match rest.split_once('@') {
        Some((command, addr)) => (command.trim(), addr.trim()),
        None => ("publish", rest.trim()),
    };
    let command = match command.to_ascii_lowercase().as_str() {
        "publish" => DurableCommand::Publish,
        "xadd" => DurableCommand::Xadd,
        other => return Err(format!("unknown command {other:?}: use publish or xadd")),
    };
    let target = parse_target(&format!("{label}={addr}"))?;
    Ok(DurableTarget {
        label: target.label,
        command,
        addr: target.addr,
    })
}

/// Parses `LABEL=PID`.
pub fn parse_pid(text: &str) -> Result<(String, u32), String> {
    let (label, pid) = text
        .split_once('=')
        .ok_or_else(|| format!("expected LABEL=PID, got {text:?}"))?;
    let pid = pid
        .trim()
        .parse()
        .map_err(|_| format!("bad pid in {text:?}"))?;
    Ok((label.trim().to_owned(), pid))
}

/// Parses a load shape `CxK`.
pub fn parse_shape(text: &str) -> Result<(usize, usize), String> {
    let (c, k) = text
        .trim()
        .split_once(['x', 'X', '*'])
        .ok_or_else(|| format!("expected CxK (connections x pipeline), got {text:?}"))?;
    let c: usize = c
        .parse()
        .map_err(|_| format!("bad connections in {text:?}"))?;
    let k: usize = k.parse().map_err(|_| format!("bad pipeline in {text:?}"))?;
    if c == 0 || k == 0 {
        return Err(format!(
            "connections and pipeline must be positive in {text:?}"
        ));
    }
    Ok((c, k))
}

/// A server to benchmark: a name for reports and its address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Name in reports.
    pub label: String,
    /// `host:port`.
    pub addr: String,
}

/// Parses `label=host:port` or `host:port` (the label is then the address).
pub fn parse_target(text: &str) -> Result<Target, String> {
    let (label, addr) = match text.split_once('=') {
        Some((label, addr)) => (label.trim(), addr.trim()),
        None => (text.trim(), text.trim()),
    };
    if label.is_empty() || addr.is_empty() || !addr.contains(':') {
        return Err(format!(
            "expected LABEL=HOST:PORT or HOST:PORT, got {text:?}"
        ));
    }
    Ok(Target {
        label: label.to_owned(),
        addr: addr.to_owned(),
    })
}

/// Parses a duration: a number with unit `ns`, `us`, `ms`, `s`, `m` or `h` (seconds without one).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("bad duration {text:?}"))?;
    let seconds = match unit.trim() {
        "ns" => number / 1e9,
        "us" | "µs" => number / 1e6,
        "ms" => number / 1e3,
        "" | "s" => number,
        "m" | "min" => number * 60.0,
        "h" => number * 3600.0,
        _ => return Err(format!("bad duration unit in {text:?} (use ms, s, m, ...)")),
    };
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("bad duration {text:?}: {e}"))
}

/// Parses a size in bytes: a number with optional `k`/`kb`/`kib` or `m`/`mb`/`mib` (x1024).
pub fn parse_size(text: &str) -> Result<usize, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: usize = number.parse().map_err(|_| format!("bad size {text:?}"))?;
    let factor = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1024,
        "m" | "mb" | "mib" => 1024 * 1024,
        _ => return Err(format!("bad size unit in {text:?}")),
    };
    number
        .checked_mul(factor)
        .ok_or_else(|| format!("size {text:?} too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_durations() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert!(parse_duration("3 parsecs").is_err());
        assert!(parse_duration("s").is_err());
    }

    #[test]
    fn parses_sizes_and_targets() {
        assert_eq!(parse_size("64"), Ok(64));
        assert_eq!(parse_size("1k"), Ok(1024));
        assert_eq!(parse_size("1KiB"), Ok(1024));
        assert!(parse_size("1x").is_err());
        assert_eq!(
            parse_target("herald=127.0.0.1:6379"),
            Ok(Target {
                label: "herald".into(),
                addr: "127.0.0.1:6379".into()
            })
        );
        assert_eq!(
            parse_target("localhost:6390").unwrap().label,
            "localhost:6390"
        );
        assert!(parse_target("redis=").is_err());
    }

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from([
            "herald-bench",
            "compare",
            "--a",
            "herald=127.0.0.1:6379",
            "--b",
            "redis=127.0.0.1:6390",
            "--payload",
            "64,1024",
            "--duration",
            "3s",
            "--rounds",
            "1",
        ])
        .unwrap();
        let Command::Compare(args) = cli.command else {
            panic!("not compare")
        };
        assert_eq!(args.payload, vec![64, 1024]);
        assert_eq!(args.load.duration, Duration::from_secs(3));
    }

    #[test]
    fn parses_durable_arguments() {
        assert_eq!(parse_shape("16x32"), Ok((16, 32)));
        assert!(parse_shape("0x1").is_err());
        assert!(parse_shape("16").is_err());
        assert_eq!(
            parse_durable_target("ra=xadd@127.0.0.1:16391"),
            Ok(DurableTarget {
                label: "ra".into(),
                command: DurableCommand::Xadd,
                addr: "127.0.0.1:16391".into()
            })
        );
        assert_eq!(
            parse_durable_target("herald=127.0.0.1:1").unwrap().command,
            DurableCommand::Publish
        );
        assert!(parse_durable_target("x=del@127.0.0.1:1").is_err());
        assert!(parse_durable_target("127.0.0.1:1").is_err());
        assert_eq!(parse_pid("herald=42"), Ok(("herald".into(), 42)));
        let cli = Cli::try_parse_from([
            "herald-bench",
            "durable",
            "--target",
            "herald=127.0.0.1:1",
            "--target",
            "redis=xadd@127.0.0.1:2",
            "--shape",
            "1x1,16x32",
            "--maxlen",
            "100",
        ])
        .unwrap();
        let Command::Durable(args) = cli.command else {
            panic!("not durable")
        };
        assert_eq!(args.shape, vec![(1, 1), (16, 32)]);
        assert_eq!(args.payload, vec![64, 1024]);
        assert_eq!(args.targets.len(), 2);
    }

    #[test]
    fn parses_cluster_and_failover_arguments() {
        let cli = Cli::try_parse_from([
            "herald-bench",
            "cluster",
            "--systems",
            "nats,herald",
            "--shape",
            "3x1,12x32",
            "--herald-arg=--publish-timeout",
            "--herald-arg=10s",
            "--duration",
            "1s",
            "--duration",
            "2s",
        ])
        .unwrap();
        let Command::Cluster(args) = cli.command else {
            panic!("not cluster")
        };
        assert_eq!(
            args.systems,
            vec![ClusterSystem::Nats, ClusterSystem::Herald]
        );
        assert_eq!(args.shape, vec![(3, 1), (12, 32)]);
        assert_eq!(args.herald_args, vec!["--publish-timeout", "10s"]);
        assert_eq!(args.duration, Duration::from_secs(2));
        assert_eq!(args.payload, vec![64, 1024]);
        let cli = Cli::try_parse_from(["herald-bench", "failover", "--kills", "3"]).unwrap();
        let Command::Failover(args) = cli.command else {
            panic!("not failover")
        };
        assert_eq!(args.kills, 3);
        assert_eq!(args.request_timeout, Duration::from_millis(250));
    }

    #[test]
    fn idle_flags_can_be_overridden() {
        let cli = Cli::try_parse_from([
            "herald-bench",
            "idle",
            "--sse",
            "9000",
            "--ws",
            "9000",
            "--sse",
            "10",
            "--hold",
            "1m",
        ])
        .unwrap();
        let Command::Idle(args) = cli.command else {
            panic!("not idle")
        };
        assert_eq!((args.sse, args.ws), (10, 9000));
        assert_eq!(args.hold, Duration::from_secs(60));
    }
}
