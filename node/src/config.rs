//! The node's resolved configuration: flags and environment (from [`crate::cli`]) over the
//! TOML file over defaults.

use crate::cli::ServeArgs;
use anyhow::{Context, Result, anyhow, bail};
use herald_cluster::node::{ClusterConfig, RaftTimings};
use herald_cluster::proposer::ProposerOptions;
use herald_gateway::http::HttpSettings;
use herald_gateway::hub::outbox::OutputLimit;
use herald_gateway::resp::RespSettings;
use herald_gateway::resp::settings::{SOFT_SECONDS_MAX, parse_memory};
use herald_storage::{Namespaces, StoreOptions, parse_duration};
use serde::{Deserialize, Deserializer};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The settings file: the same settings as the flags, with underscores.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    resp_addr: Option<SocketAddr>,
    http_addr: Option<SocketAddr>,
    data_dir: Option<PathBuf>,
    requirepass: Option<String>,
    protected_mode: Option<bool>,
    maxclients: Option<usize>,
    proto_max_bulk_len: Option<String>,
    client_query_buffer_limit: Option<String>,
    pubsub_output_limit: Option<String>,
    timeout: Option<u64>,
    /// A duration, or whole seconds (a TOML integer or a string of digits) as it took before.
    #[serde(default, deserialize_with = "seconds_or_duration_text")]
    shutdown_timeout: Option<String>,
    log: Option<String>,
    partitions: Option<u16>,
    dedup_window: Option<String>,
    cors_origins: Option<Vec<String>>,
    sse_keep_alive: Option<String>,
    node_id: Option<u64>,
    cluster_addr: Option<SocketAddr>,
    advertise_addr: Option<String>,
    peers: Option<Vec<String>>,
    bootstrap_expect: Option<usize>,
    tls_dir: Option<PathBuf>,
    publish_timeout: Option<String>,
    raft_heartbeat: Option<String>,
    election_timeout: Option<String>,
    raft_snapshot_logs: Option<u64>,
    raft_fast_failover: Option<bool>,
    /// `[namespace.NAME]` tables.
    #[serde(default)]
    namespace: Option<Namespaces>,
}

impl FileConfig {
    /// Reads and parses a settings file; errors name the file and the offending key.
    pub fn load(path: &Path) -> Result<FileConfig> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        toml::from_str(&text).map_err(|e| {
            // The line at fault, as written: a type error's message names no key.
            let place = e
                .span()
                .and_then(|span| {
                    let line = text[..span.start.min(text.len())].matches('\n').count();
                    text.lines()
                        .nth(line)
                        .map(|l| format!(", line {} (`{}`)", line + 1, l.trim()))
                })
                .unwrap_or_default();
            anyhow!(
                "invalid config file {}{place}: {}",
                path.display(),
                e.message()
            )
        })
    }
}

/// Where a setting's address came from, to tell the operator which knob to turn.
#[derive(Debug, Clone, Copy)]
pub struct AddrSetting {
    /// The address.
    pub addr: SocketAddr,
    /// The flag that sets it.
    pub flag: &'static str,
    /// The environment variable that sets it.
    pub env: &'static str,
}

/// Everything `herald serve` needs, resolved.
#[derive(Debug)]
pub struct NodeConfig {
    /// The Redis-protocol listener.
    pub resp_addr: AddrSetting,
    /// The HTTP listener.
    pub http_addr: AddrSetting,
    /// The node's data directory.
    pub data_dir: PathBuf,
    /// RESP server settings.
    pub resp: RespSettings,
    /// How long shutdown waits for clients.
    pub shutdown_timeout: Duration,
    /// Log filter.
    pub log: String,
    /// Store settings (partitions, dedup window).
    pub store: StoreOptions,
    /// Namespace behaviour (history, durability).
    pub namespaces: Namespaces,
    /// HTTP settings.
    pub http: HttpSettings,
    /// Cluster settings; `None` runs a single node.
    pub cluster: Option<ClusterConfig>,
}

/// Parses `ID@HOST:PORT` peer entries.
pub fn parse_peers(entries: &[String]) -> Result<BTreeMap<u64, String>> {
    let mut peers = BTreeMap::new();
    for entry in entries.iter().map(|e| e.trim()).filter(|e| !e.is_empty()) {
        let (id, addr) = entry.split_once('@').ok_or_else(|| {
            anyhow!("invalid peer '{entry}': expected ID@HOST:PORT, e.g. 2@10.0.0.2:7000")
        })?;
        let id: u64 = id
            .parse()
            .map_err(|_| anyhow!("invalid peer '{entry}': '{id}' is not a node id"))?;
        if let Some(problem) = herald_cluster::rpc::address_problem(addr) {
            bail!("invalid peer '{entry}': {problem}; separate peers with ','");
        }
        if peers.insert(id, addr.to_string()).is_some() {
            bail!("invalid peers: node {id} is listed twice");
        }
    }
    Ok(peers)
}

impl NodeConfig {
    /// Resolves flags/environment over the file (if any) over defaults.
    pub fn resolve(args: ServeArgs) -> Result<NodeConfig> {
        let file = match &args.config {
            Some(path) => FileConfig::load(path)?,
            None => FileConfig::default(),
        };
        let mut resp = RespSettings::default();
        resp.requirepass = args
            .requirepass
            .or(file.requirepass)
            .filter(|p| !p.is_empty());
        resp.protected_mode = args
            .protected_mode
            .or(file.protected_mode)
            .unwrap_or(resp.protected_mode);
        if let Some((maxclients, from)) = given(args.maxclients, file.maxclients) {
            resp.maxclients = maxclients;
            in_config_set_range(
                "maxclients",
                from,
                &maxclients.to_string(),
                maxclients as u64,
            )?;
        }
        if let Some((value, from)) = given(args.proto_max_bulk_len, file.proto_max_bulk_len) {
            resp.proto_max_bulk_len = memory("--proto-max-bulk-len", from, &value)?;
            let bytes = resp.proto_max_bulk_len as u64;
            in_config_set_range("proto-max-bulk-len", from, &value, bytes)?;
        }
        if let Some((value, from)) = given(
            args.client_query_buffer_limit,
            file.client_query_buffer_limit,
        ) {
            resp.client_query_buffer_limit = memory("--client-query-buffer-limit", from, &value)?;
            let bytes = resp.client_query_buffer_limit as u64;
            in_config_set_range("client-query-buffer-limit", from, &value, bytes)?;
        }
        if let Some((value, from)) = given(args.pubsub_output_limit, file.pubsub_output_limit) {
            resp.pubsub_output_limit = output_limit(&value, from)?;
        }
        if let Some((timeout, from)) = given(args.timeout, file.timeout) {
            resp.timeout_seconds = timeout;
            in_config_set_range("timeout", from, &timeout.to_string(), timeout)?;
        }
        let mut store = StoreOptions::default();
        if let Some(partitions) = args.partitions.or(file.partitions) {
            if partitions == 0 {
                bail!("partitions must be at least 1");
            }
            store.partitions = partitions;
        }
        if let Some(window) = args.dedup_window.or(file.dedup_window) {
            store.dedup_window = parse_duration(&window)
                .map_err(|e| anyhow!("invalid dedup-window '{window}': {e}"))?;
        }
        let mut http = HttpSettings::default();
        if let Some(origins) = args.cors_origins.or(file.cors_origins) {
            http.cors_origins = origins
                .into_iter()
                .map(|o| o.trim().to_string())
                .filter(|o| !o.is_empty())
                .collect();
        }
        if let Some(interval) = args.sse_keep_alive.or(file.sse_keep_alive) {
            http.keep_alive = parse_duration(&interval)
                .map_err(|e| anyhow!("invalid sse-keep-alive '{interval}': {e}"))?;
            if http.keep_alive.is_zero() {
                bail!("sse-keep-alive must be above zero");
            }
        }
        let node_id = args.node_id.or(file.node_id);
        let tls_dir = args.tls_dir.or(file.tls_dir);
        let cluster = match (node_id, tls_dir) {
            (None, None) => None,
            (None, Some(_)) => {
                bail!("--tls-dir is set but --node-id is not: a cluster node needs both")
            }
            (Some(_), None) => bail!(
                "--node-id is set but --tls-dir is not: a cluster node needs both (create it with `herald certs init` and `herald certs issue`)"
            ),
            (Some(node_id), Some(tls_dir)) => {
                let bind = args
                    .cluster_addr
                    .or(file.cluster_addr)
                    .unwrap_or(([127, 0, 0, 1], 7000).into());
                let peers = parse_peers(&args.peers.or(file.peers).unwrap_or_default())?;
                let advertise = args
                    .advertise_addr
                    .or(file.advertise_addr)
                    .or_else(|| peers.get(&node_id).cloned())
                    .unwrap_or_else(|| bind.to_string());
                let mut proposer = ProposerOptions::default();
                if let Some(timeout) = args.publish_timeout.or(file.publish_timeout) {
                    proposer.publish_timeout = parse_duration(&timeout)
                        .map_err(|e| anyhow!("invalid publish-timeout '{timeout}': {e}"))?;
                }
                let mut raft = RaftTimings::default();
                if let Some(value) = args.raft_heartbeat.or(file.raft_heartbeat) {
                    raft.heartbeat_ms = millis("raft-heartbeat", &value)?;
                }
                if let Some(value) = args.election_timeout.or(file.election_timeout) {
                    let (min, max) = value.split_once('-').ok_or_else(|| {
                        anyhow!(
                            "invalid election-timeout '{value}': expected MIN-MAX, e.g. 250ms-350ms"
                        )
                    })?;
                    raft.election_min_ms = millis("election-timeout", min)?;
                    raft.election_max_ms = millis("election-timeout", max)?;
                }
                if let Some(n) = args.raft_snapshot_logs.or(file.raft_snapshot_logs) {
                    if n == 0 {
                        bail!("invalid raft-snapshot-logs 0: a snapshot needs at least one entry");
                    }
                    raft.snapshot_logs = n;
                }
                if let Some(fast) = args.raft_fast_failover.or(file.raft_fast_failover) {
                    raft.fast_failover = fast;
                }
                if raft.heartbeat_ms == 0
                    || raft.election_min_ms <= raft.heartbeat_ms
                    || raft.election_max_ms <= raft.election_min_ms
                {
                    bail!(
                        "invalid Raft timers: need 0 < heartbeat ({} ms) < election minimum ({} ms) < election maximum ({} ms)",
                        raft.heartbeat_ms,
                        raft.election_min_ms,
                        raft.election_max_ms
                    );
                }
                let bootstrap_expect = args.bootstrap_expect.or(file.bootstrap_expect).unwrap_or(0);
                let forming = peers
                    .keys()
                    .chain([&node_id])
                    .collect::<BTreeSet<_>>()
                    .len();
                if bootstrap_expect > forming {
                    bail!(
                        "--bootstrap-expect {bootstrap_expect} but --peers names only {forming} node(s) (this one included): name every node that forms the cluster in --peers, or lower --bootstrap-expect"
                    );
                }
                Some(ClusterConfig {
                    node_id,
                    bind,
                    advertise,
                    peers: peers.into_iter().filter(|(id, _)| *id != node_id).collect(),
                    bootstrap_expect,
                    tls_dir,
                    raft,
                    proposer,
                })
            }
        };
        Ok(NodeConfig {
            cluster,
            resp_addr: AddrSetting {
                addr: args
                    .resp_addr
                    .or(file.resp_addr)
                    .unwrap_or(([127, 0, 0, 1], 6379).into()),
                flag: "--resp-addr",
                env: "HERALD_RESP_ADDR",
            },
            http_addr: AddrSetting {
                addr: args
                    .http_addr
                    .or(file.http_addr)
                    .unwrap_or(([127, 0, 0, 1], 8000).into()),
                flag: "--http-addr",
                env: "HERALD_HTTP_ADDR",
            },
            data_dir: args
                .data_dir
                .or(file.data_dir)
                .unwrap_or_else(|| PathBuf::from("herald-data")),
            resp,
            shutdown_timeout: match args.shutdown_timeout.or(file.shutdown_timeout) {
                Some(value) => seconds_or_duration("shutdown-timeout", &value)?,
                None => Duration::from_secs(5),
            },
            log: log_filter(args.log, file.log, std::env::var("RUST_LOG").ok())?,
            store,
            namespaces: file.namespace.unwrap_or_default(),
            http,
        })
    }
}

/// The log filter: `--log` (or `HERALD_LOG`), else the file's `log`, else `RUST_LOG` (the
/// tracing ecosystem's variable, read last so that herald's own settings win as documented),
/// else `info`; refused by [`check_log_filter`] when it could not mean what was meant.
fn log_filter(
    setting: Option<String>,
    file: Option<String>,
    rust_log: Option<String>,
) -> Result<String> {
    let rust_log = rust_log.filter(|v| !v.trim().is_empty());
    let (filter, source) = match (setting, file, rust_log) {
        (Some(filter), _, _) => (filter, "--log / HERALD_LOG"),
        (None, Some(filter), _) => (filter, "`log` in the config file"),
        (None, None, Some(filter)) => (filter, "RUST_LOG"),
        (None, None, None) => return Ok("info".to_string()),
    };
    check_log_filter(&filter, source)?;
    Ok(filter)
}

/// Refuses a log filter that names no level anywhere (`verbose`, `inf`): tracing takes a bare
/// word that is not a level as a target name, so such a filter would log nothing at all but
/// that target, silently. Refuses, too, a directive tracing cannot parse (`herald=loud`).
fn check_log_filter(filter: &str, source: &str) -> Result<()> {
    const EXPECTED: &str = "give a level (trace, debug, info, warn, error or off) and/or target=level directives, comma-separated, e.g. info or warn,herald_cluster=debug";
    let names_level = filter
        .split(',')
        .map(|directive| {
            directive
                .rsplit_once('=')
                .map_or(directive, |(_, level)| level)
        })
        .map(str::trim)
        // tracing reads an empty level as `error`: `herald=` is no level named.
        .any(|level| {
            !level.is_empty()
                && level
                    .parse::<tracing_subscriber::filter::LevelFilter>()
                    .is_ok()
        });
    if !names_level {
        bail!("invalid log filter '{filter}' ({source}): it names no level; {EXPECTED}");
    }
    tracing_subscriber::EnvFilter::builder()
        .parse(filter)
        .map_err(|e| anyhow!("invalid log filter '{filter}' ({source}): {e}; {EXPECTED}"))?;
    Ok(())
}

/// A setting that took whole seconds before it took units: a duration (`10s`, `500ms`, `2m`),
/// or a bare number of seconds, as before.
pub fn seconds_or_duration(name: &str, value: &str) -> Result<Duration> {
    let text = value.trim();
    let seconds = (!text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()))
        .then(|| text.parse::<u64>().ok())
        .flatten();
    seconds
        .map(Duration::from_secs)
        .or_else(|| parse_duration(text).ok())
        .ok_or_else(|| {
            anyhow!(
                "invalid {name} '{value}': expected a duration such as 10s, 500ms or 2m (a bare number is seconds)"
            )
        })
}

/// The file form of [`seconds_or_duration`]: a TOML integer (seconds) or a string, kept as
/// text for [`NodeConfig::resolve`] to parse as it parses the flag.
fn seconds_or_duration_text<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    struct Text;
    impl serde::de::Visitor<'_> for Text {
        type Value = String;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a duration such as \"10s\" or \"500ms\", or whole seconds")
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<String, E> {
            u64::try_from(v)
                .map(|v| v.to_string())
                .map_err(|_| E::invalid_value(serde::de::Unexpected::Signed(v), &self))
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<String, E> {
            Ok(v.to_string())
        }
    }
    d.deserialize_any(Text).map(Some)
}

fn millis(name: &str, value: &str) -> Result<u64> {
    let duration =
        parse_duration(value.trim()).map_err(|e| anyhow!("invalid {name} '{value}': {e}"))?;
    Ok(duration.as_millis().min(u128::from(u64::MAX)) as u64)
}

/// Where a setting's value came from: a flag (or its `HERALD_*` variable, which clap reads
/// as the flag), or the config file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Flag,
    File,
}

/// The value of a setting, the flag's over the file's, and where it came from.
fn given<T>(flag: Option<T>, file: Option<T>) -> Option<(T, Source)> {
    flag.map(|v| (v, Source::Flag))
        .or_else(|| file.map(|v| (v, Source::File)))
}

/// `--flag 'value'` as the operator set it, for an error: with the flag's variable, or the
/// file's key.
fn named(flag: &str, from: Source, value: &str) -> String {
    let key = flag.trim_start_matches('-').replace('-', "_");
    match from {
        Source::Flag => format!("{flag} '{value}' (or HERALD_{})", key.to_ascii_uppercase()),
        Source::File => format!("{flag} '{value}' (`{key}` in the config file)"),
    }
}

/// Refuses a number that `CONFIG SET setting` would refuse: the flag and the run-time command
/// take the same range, so a value the node starts with can be set again, and none it could
/// never have been set to at run time gets in at start-up. `value` is the text given, `number`
/// what it means.
fn in_config_set_range(setting: &str, from: Source, value: &str, number: u64) -> Result<()> {
    let Some((min, max)) = herald_gateway::resp::settings::bounds(setting) else {
        return Ok(());
    };
    let number = i128::from(number);
    if number < i128::from(min) || number > i128::from(max) {
        let flag = named(&format!("--{setting}"), from, value);
        let unit = if matches!(setting, "proto-max-bulk-len" | "client-query-buffer-limit") {
            format!(" ({number} bytes): it must be from {min} (1mb) to {max} bytes")
        } else {
            format!(": it must be from {min} to {max}")
        };
        bail!("invalid {flag}{unit}, the range CONFIG SET {setting} accepts");
    }
    Ok(())
}

fn memory(flag: &str, from: Source, value: &str) -> Result<usize> {
    parse_memory(value).map_err(|_| {
        anyhow!(
            "invalid {}: expected a size such as 1024, 64kb, 32mb or 1gb",
            named(flag, from, value)
        )
    })
}

fn output_limit(value: &str, from: Source) -> Result<OutputLimit> {
    let flag = named("--pubsub-output-limit", from, value);
    let parts: Vec<&str> = value.split_whitespace().collect();
    let [hard, soft, seconds] = parts[..] else {
        bail!("invalid {flag}: expected '<hard> <soft> <soft-seconds>', e.g. '32mb 8mb 60'");
    };
    let size = |bound: &str, text: &str| {
        parse_memory(text).map_err(|_| {
            anyhow!(
                "invalid {flag}: the {bound} limit '{text}' is not a size such as 1024, 64kb, 32mb or 1gb"
            )
        })
    };
    let soft_seconds = seconds
        .parse::<u64>()
        .ok()
        .filter(|s| *s <= SOFT_SECONDS_MAX)
        .ok_or_else(|| {
            anyhow!(
                "invalid {flag}: soft-seconds '{seconds}' must be whole seconds from 0 to {SOFT_SECONDS_MAX}, the range CONFIG SET client-output-buffer-limit accepts"
            )
        })?;
    Ok(OutputLimit {
        hard_bytes: size("hard", hard)?,
        soft_bytes: size("soft", soft)?,
        soft_seconds,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn peers_are_id_at_host_port() {
        let parse = |entries: &[&str]| {
            parse_peers(&entries.iter().map(|e| e.to_string()).collect::<Vec<_>>())
                .map_err(|e| e.to_string())
        };
        let peers = parse(&[
            "1@10.0.0.1:7000",
            "2@node-2.herald_svc:7000",
            "3@[::1]:7000",
        ])
        .unwrap();
        assert_eq!(peers[&2], "node-2.herald_svc:7000");
        assert_eq!(peers[&3], "[::1]:7000");
        for bad in [
            "1@a:7000;2@b:7000",
            "1@:7000",
            "1@a b:7000",
            "1@host:0",
            "1@host:70000",
            "1@[nope]:7000",
            "1@host",
        ] {
            let error = parse(&[bad]).unwrap_err();
            assert!(
                error.starts_with(&format!("invalid peer '{bad}'")),
                "{error}"
            );
        }
        assert_eq!(
            parse(&["1@a:1", "1@b:2"]).unwrap_err(),
            "invalid peers: node 1 is listed twice"
        );
    }

    #[test]
    fn rust_log_is_read_only_when_neither_the_setting_nor_the_file_sets_the_log() {
        let some = |s: &str| Some(s.to_string());
        let filter = |setting, file, rust_log| log_filter(setting, file, rust_log).unwrap();
        assert_eq!(filter(some("warn"), some("debug"), some("off")), "warn");
        assert_eq!(filter(None, some("debug"), some("off")), "debug");
        assert_eq!(filter(None, None, some("off")), "off");
        assert_eq!(filter(None, None, some(" ")), "info");
        assert_eq!(filter(None, None, None), "info");
    }

    #[test]
    fn a_log_filter_that_names_no_level_is_refused() {
        for good in [
            "info",
            "WARN",
            "off",
            "herald=debug,warn",
            "warn,herald_cluster=debug",
            "info,openraft=info",
            "herald_gateway=debug",
            "warn,herald_cluster",
            "info,herald_cluster[join]=debug",
        ] {
            assert!(check_log_filter(good, "--log").is_ok(), "{good}");
        }
        for bad in ["verbose", "inf", "herald_cluster", "", " , "] {
            let error = check_log_filter(bad, "--log / HERALD_LOG")
                .unwrap_err()
                .to_string();
            assert_eq!(
                error,
                format!(
                    "invalid log filter '{bad}' (--log / HERALD_LOG): it names no level; give a level (trace, debug, info, warn, error or off) and/or target=level directives, comma-separated, e.g. info or warn,herald_cluster=debug"
                )
            );
        }
        let error = check_log_filter("info,herald=loud", "RUST_LOG")
            .unwrap_err()
            .to_string();
        assert!(
            error.starts_with("invalid log filter 'info,herald=loud' (RUST_LOG): ")
                && error.contains("target=level")
                && !error.contains('\n'),
            "{error}"
        );
        let error = log_filter(None, Some("verbose".into()), None)
            .unwrap_err()
            .to_string();
        assert!(error.contains("(`log` in the config file)"), "{error}");
    }

    #[test]
    fn flags_override_file_which_overrides_defaults() {
        let mut file = tempfile_in_target("herald-config-test.toml");
        writeln!(
            file.1,
            "resp_addr = \"127.0.0.1:7777\"\nmaxclients = 5\npubsub_output_limit = \"1mb 512kb 10\""
        )
        .unwrap();
        let args = ServeArgs {
            config: Some(file.0.clone()),
            maxclients: Some(9),
            ..ServeArgs::default()
        };
        let config = NodeConfig::resolve(args).unwrap();
        assert_eq!(config.resp_addr.addr.port(), 7777, "file beats default");
        assert_eq!(config.resp.maxclients, 9, "flag beats file");
        assert_eq!(
            config.http_addr.addr.port(),
            8000,
            "default when nobody says"
        );
        assert_eq!(config.resp.pubsub_output_limit.hard_bytes, 1 << 20);
        std::fs::remove_file(&file.0).unwrap();
    }

    /// Each value refused at start-up is one `CONFIG SET` refuses for the same setting, and
    /// each accepted one it accepts: the flags, the variables and the file take Redis's range.
    #[test]
    fn start_up_refuses_what_config_set_refuses() {
        let flag = |set: fn(&mut ServeArgs, &str), value: &str| {
            let mut args = ServeArgs::default();
            set(&mut args, value);
            NodeConfig::resolve(args).map_err(|e| e.to_string())
        };
        type Case = (&'static str, fn(&mut ServeArgs, &str), &'static str, bool);
        let cases: &[Case] = &[
            (
                "maxclients",
                |a, v| a.maxclients = v.parse().ok(),
                "0",
                false,
            ),
            (
                "maxclients",
                |a, v| a.maxclients = v.parse().ok(),
                "4294967296",
                false,
            ),
            (
                "maxclients",
                |a, v| a.maxclients = v.parse().ok(),
                "4294967295",
                true,
            ),
            (
                "maxclients",
                |a, v| a.maxclients = v.parse().ok(),
                "1",
                true,
            ),
            (
                "timeout",
                |a, v| a.timeout = v.parse().ok(),
                "2147483648",
                false,
            ),
            (
                "timeout",
                |a, v| a.timeout = v.parse().ok(),
                "2147483647",
                true,
            ),
            ("timeout", |a, v| a.timeout = v.parse().ok(), "0", true),
            (
                "proto-max-bulk-len",
                |a, v| a.proto_max_bulk_len = Some(v.into()),
                "1kb",
                false,
            ),
            (
                "proto-max-bulk-len",
                |a, v| a.proto_max_bulk_len = Some(v.into()),
                "1048575",
                false,
            ),
            (
                "proto-max-bulk-len",
                |a, v| a.proto_max_bulk_len = Some(v.into()),
                "1mb",
                true,
            ),
            (
                "proto-max-bulk-len",
                |a, v| a.proto_max_bulk_len = Some(v.into()),
                "18446744073709551615",
                false,
            ),
            (
                "client-query-buffer-limit",
                |a, v| a.client_query_buffer_limit = Some(v.into()),
                "0",
                false,
            ),
            (
                "client-query-buffer-limit",
                |a, v| a.client_query_buffer_limit = Some(v.into()),
                "512kb",
                false,
            ),
            (
                "client-query-buffer-limit",
                |a, v| a.client_query_buffer_limit = Some(v.into()),
                "1gb",
                true,
            ),
        ];
        for &(setting, set, value, accepted) in cases {
            let redis = RespSettings::default().set(setting, value).is_ok();
            assert_eq!(redis, accepted, "CONFIG SET {setting} {value}");
            match flag(set, value) {
                Ok(_) => assert!(accepted, "--{setting} {value} was accepted"),
                Err(error) => {
                    assert!(!accepted, "--{setting} {value}: {error}");
                    let env = format!("HERALD_{}", setting.replace('-', "_").to_uppercase());
                    assert!(
                        error.starts_with(&format!("invalid --{setting} '{value}' (or {env})"))
                            && error.ends_with(&format!("the range CONFIG SET {setting} accepts")),
                        "{error}"
                    );
                }
            }
        }
        // Soft seconds: Redis reads them into an int.
        for (seconds, accepted) in [("2147483648", false), ("2147483647", true), ("0", true)] {
            let limit = format!("32mb 8mb {seconds}");
            let redis = RespSettings::default()
                .set("client-output-buffer-limit", &format!("pubsub {limit}"))
                .is_ok();
            assert_eq!(
                redis, accepted,
                "CONFIG SET client-output-buffer-limit {limit}"
            );
            let got = flag(|a, v| a.pubsub_output_limit = Some(v.into()), &limit);
            match got {
                Ok(_) => assert!(accepted, "{limit} was accepted"),
                Err(error) => assert!(
                    !accepted
                        && error.starts_with(&format!("invalid --pubsub-output-limit '{limit}' (or HERALD_PUBSUB_OUTPUT_LIMIT)"))
                        && error.contains("soft-seconds '2147483648'"),
                    "{error}"
                ),
            }
        }
        // The file's values are checked alike, and the error names the file's key.
        let (path, mut file) = tempfile_in_target("herald-config-bounds.toml");
        writeln!(file, "maxclients = 0").unwrap();
        let error = NodeConfig::resolve(ServeArgs {
            config: Some(path.clone()),
            ..ServeArgs::default()
        })
        .unwrap_err()
        .to_string();
        assert_eq!(
            error,
            "invalid --maxclients '0' (`maxclients` in the config file): it must be from 1 to 4294967295, the range CONFIG SET maxclients accepts"
        );
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn fast_failover_is_on_unless_the_file_or_a_flag_turns_it_off() {
        let mut file = tempfile_in_target("herald-config-failover.toml");
        writeln!(
            file.1,
            "node_id = 1\ntls_dir = \"tls\"\nraft_fast_failover = false"
        )
        .unwrap();
        let fast_failover = |args: ServeArgs| {
            NodeConfig::resolve(args)
                .unwrap()
                .cluster
                .unwrap()
                .raft
                .fast_failover
        };
        let from_file = |flag: Option<bool>| ServeArgs {
            config: Some(file.0.clone()),
            raft_fast_failover: flag,
            ..ServeArgs::default()
        };
        assert!(!fast_failover(from_file(None)), "the file turns it off");
        assert!(
            fast_failover(from_file(Some(true))),
            "a flag beats the file"
        );
        assert!(fast_failover(ServeArgs {
            node_id: Some(1),
            tls_dir: Some(PathBuf::from("tls")),
            ..ServeArgs::default()
        }));
        std::fs::remove_file(&file.0).unwrap();
    }

    #[test]
    fn unknown_file_keys_are_named() {
        let mut file = tempfile_in_target("herald-config-typo.toml");
        writeln!(file.1, "resp_adr = \"127.0.0.1:7777\"").unwrap();
        let args = ServeArgs {
            config: Some(file.0.clone()),
            ..ServeArgs::default()
        };
        let error = NodeConfig::resolve(args).unwrap_err().to_string();
        assert!(error.contains("resp_adr"), "{error}");
        std::fs::remove_file(&file.0).unwrap();
    }

    #[test]
    fn a_bad_value_is_reported_with_its_line() {
        let (path, mut file) = tempfile_in_target("herald-config-bad.toml");
        write!(file, "[namespace.x]\nhistory_size = 5\ndurable = \"yes\"\n").unwrap();
        let error = FileConfig::load(&path).unwrap_err().to_string();
        assert_eq!(
            error,
            format!(
                "invalid config file {}, line 3 (`durable = \"yes\"`): invalid type: string \"yes\", expected a boolean",
                path.display()
            )
        );
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn shutdown_timeout_takes_units_and_bare_seconds() {
        let timeout = |flag: &str| {
            NodeConfig::resolve(ServeArgs {
                shutdown_timeout: Some(flag.to_string()),
                ..ServeArgs::default()
            })
            .map(|c| c.shutdown_timeout)
        };
        assert_eq!(timeout("1500ms").unwrap(), Duration::from_millis(1500));
        assert_eq!(timeout("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(timeout("7").unwrap(), Duration::from_secs(7), "as before");
        let error = timeout("10x").unwrap_err().to_string();
        assert_eq!(
            error,
            "invalid shutdown-timeout '10x': expected a duration such as 10s, 500ms or 2m (a bare number is seconds)"
        );
        let default = NodeConfig::resolve(ServeArgs::default()).unwrap();
        assert_eq!(default.shutdown_timeout, Duration::from_secs(5));
        for (line, want) in [
            ("shutdown_timeout = 3", Some(Duration::from_secs(3))),
            (
                "shutdown_timeout = \"250ms\"",
                Some(Duration::from_millis(250)),
            ),
            ("shutdown_timeout = \"4\"", Some(Duration::from_secs(4))),
            ("shutdown_timeout = -1", None),
            ("shutdown_timeout = 2.5", None),
        ] {
            let (path, mut file) = tempfile_in_target("herald-config-shutdown.toml");
            writeln!(file, "{line}").unwrap();
            let got = NodeConfig::resolve(ServeArgs {
                config: Some(path.clone()),
                ..ServeArgs::default()
            });
            match want {
                Some(want) => assert_eq!(got.unwrap().shutdown_timeout, want, "{line}"),
                None => {
                    let error = got.unwrap_err().to_string();
                    assert!(
                        error.contains("line 1") && error.contains("whole seconds"),
                        "{line}: {error}"
                    );
                }
            }
            let _ = std::fs::remove_file(path);
        }
    }

    fn tempfile_in_target(name: &str) -> (PathBuf, std::fs::File) {
        let path = std::env::temp_dir().join(format!("{}-{name}", std::process::id()));
        let file = std::fs::File::create(&path).unwrap();
        (path, file)
    }
}
