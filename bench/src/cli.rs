//! Command-line interface of `herald-bench`.

use clap::{Args, Parser, Subcommand};
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
}
