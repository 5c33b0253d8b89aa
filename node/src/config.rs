//! The node's resolved configuration: flags and environment (from [`crate::cli`]) over the
//! TOML file over defaults.

use crate::cli::ServeArgs;
use anyhow::{Context, Result, anyhow, bail};
use herald_cluster::node::{ClusterConfig, RaftTimings};
use herald_cluster::proposer::ProposerOptions;
use herald_gateway::http::HttpSettings;
use herald_gateway::resp::RespSettings;
use herald_gateway::resp::settings::SettingError;
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
    // `true`/`false`, or `"yes"`/`"no"` as the flag and `CONFIG SET` take it.
    #[serde(default, deserialize_with = "bool_or_yes_no")]
    protected_mode: Option<bool>,
    // The settings `CONFIG SET` changes too: a TOML integer or a string, kept as text for
    // `NodeConfig::resolve` to parse as `CONFIG SET` does.
    #[serde(default, deserialize_with = "number_or_text")]
    maxclients: Option<String>,
    #[serde(default, deserialize_with = "number_or_text")]
    proto_max_bulk_len: Option<String>,
    #[serde(default, deserialize_with = "number_or_text")]
    client_query_buffer_limit: Option<String>,
    pubsub_output_limit: Option<String>,
    #[serde(default, deserialize_with = "number_or_text")]
    timeout: Option<String>,
    /// A duration, or whole seconds (a TOML integer or a string of digits) as it took before.
    #[serde(default, deserialize_with = "seconds_or_duration_text")]
    shutdown_timeout: Option<String>,
    /// A duration, or whole seconds; 0 turns the watchdog off.
    #[serde(default, deserialize_with = "seconds_or_duration_text")]
    disk_stall_timeout: Option<String>,
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
            let place = match herald_storage::namespace::toml_error_place(&text, &e) {
                place if place.is_empty() => place,
                place => format!(", line{place}"),
            };
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
    /// How long a disk operation may wait before the node is taken down (`None`: never); see
    /// `disk_watchdog`.
    pub disk_stall_timeout: Option<Duration>,
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

/// Refuses cluster settings (`(flag, set)`) given without `--node-id` and `--tls-dir`: they
/// would be ignored and the node run alone, taking publishes no other node sees (an env
/// file that lost `HERALD_NODE_ID` would start a standalone node that looks healthy).
fn refuse_cluster_settings_without_node(settings: &[(&str, bool)]) -> Result<()> {
    let set: Vec<&str> = settings
        .iter()
        .filter(|(_, set)| *set)
        .map(|(flag, _)| *flag)
        .collect();
    let Some((last, rest)) = set.split_last() else {
        return Ok(());
    };
    let (named, needs) = if rest.is_empty() {
        (last.to_string(), "needs")
    } else {
        (format!("{} and {last}", rest.join(", ")), "need")
    };
    bail!(
        "{named} {needs} --node-id and --tls-dir (cluster mode), and neither is set; without them herald runs a single node, so it refuses to start rather than ignore {named}: set --node-id and --tls-dir (HERALD_NODE_ID and HERALD_TLS_DIR, or node_id and tls_dir in the config file), or remove {named} to run a single node"
    )
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
        // The settings `CONFIG SET` changes go through its parser and bounds: a value the node
        // starts with can be set again at run time, none gets in that `CONFIG SET` would
        // refuse, and a refusal gives `CONFIG SET`'s reason.
        let redis_settings = [
            ("maxclients", given(args.maxclients, file.maxclients)),
            (
                "proto-max-bulk-len",
                given(args.proto_max_bulk_len, file.proto_max_bulk_len),
            ),
            (
                "client-query-buffer-limit",
                given(
                    args.client_query_buffer_limit,
                    file.client_query_buffer_limit,
                ),
            ),
            ("timeout", given(args.timeout, file.timeout)),
        ];
        for (setting, value) in redis_settings {
            if let Some((value, from)) = value {
                let flag = format!("--{setting}");
                set_as_config_set(&mut resp, setting, &value, &flag, from, &value)?;
            }
        }
        if let Some((value, from)) = given(args.pubsub_output_limit, file.pubsub_output_limit) {
            let flag = "--pubsub-output-limit";
            // The flag is `CONFIG SET client-output-buffer-limit`'s `pubsub` group without
            // the class, its words separated by any white space.
            let words: Vec<&str> = value.split_whitespace().collect();
            if words.len() != 3 {
                bail!(
                    "invalid {}: expected '<hard> <soft> <soft-seconds>', e.g. '32mb 8mb 60'",
                    named(flag, from, &value)
                );
            }
            let group = format!("pubsub {}", words.join(" "));
            let setting = "client-output-buffer-limit";
            set_as_config_set(&mut resp, setting, &group, flag, from, &value)?;
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
            for origin in &http.cors_origins {
                check_origin(origin)
                    .map_err(|e| anyhow!("invalid cors-origins '{origin}': {e}"))?;
            }
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
            (None, None) => {
                refuse_cluster_settings_without_node(&[
                    ("--peers", args.peers.is_some() || file.peers.is_some()),
                    (
                        "--bootstrap-expect",
                        args.bootstrap_expect.or(file.bootstrap_expect).is_some(),
                    ),
                    (
                        "--cluster-addr",
                        args.cluster_addr.or(file.cluster_addr).is_some(),
                    ),
                    (
                        "--advertise-addr",
                        args.advertise_addr.is_some() || file.advertise_addr.is_some(),
                    ),
                    (
                        "--publish-timeout",
                        args.publish_timeout.is_some() || file.publish_timeout.is_some(),
                    ),
                    (
                        "--raft-heartbeat",
                        args.raft_heartbeat.is_some() || file.raft_heartbeat.is_some(),
                    ),
                    (
                        "--election-timeout",
                        args.election_timeout.is_some() || file.election_timeout.is_some(),
                    ),
                    (
                        "--raft-snapshot-logs",
                        args.raft_snapshot_logs
                            .or(file.raft_snapshot_logs)
                            .is_some(),
                    ),
                    (
                        "--raft-fast-failover",
                        args.raft_fast_failover
                            .or(file.raft_fast_failover)
                            .is_some(),
                    ),
                    ("--forget-peer-journals", args.forget_peer_journals),
                ])?;
                None
            }
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
                    build: herald_gateway::build::VERSION_AND_COMMIT.to_string(),
                    forget_peer_journals: args.forget_peer_journals,
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
            disk_stall_timeout: match args.disk_stall_timeout.or(file.disk_stall_timeout) {
                Some(value) => match seconds_or_duration("disk-stall-timeout", &value)? {
                    timeout if timeout.is_zero() => None,
                    timeout if timeout < Duration::from_secs(1) => bail!(
                        "invalid disk-stall-timeout '{value}': at least 1s (the watchdog looks once a second), or 0 to turn it off"
                    ),
                    timeout => Some(timeout),
                },
                None => Some(crate::disk_watchdog::DEFAULT_TIMEOUT),
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
    d.deserialize_any(IntegerOrText {
        expecting: "a duration such as \"10s\" or \"500ms\", or whole seconds",
        negative: false,
    })
    .map(Some)
}

/// A file value that `CONFIG SET` parses: a TOML integer (written out in digits, a negative
/// one with its sign, for the setting's bounds to refuse) or a string, as text.
fn number_or_text<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    d.deserialize_any(IntegerOrText {
        expecting: "a whole number or a string",
        negative: true,
    })
    .map(Some)
}

/// Reads a file value that is a TOML boolean or a string the `--protected-mode` flag takes
/// (`yes`, `no`, ...).
fn bool_or_yes_no<'de, D: Deserializer<'de>>(d: D) -> Result<Option<bool>, D::Error> {
    struct BoolOrYesNo;
    impl serde::de::Visitor<'_> for BoolOrYesNo {
        type Value = bool;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("true, false, \"yes\" or \"no\"")
        }
        fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<bool, E> {
            Ok(v)
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<bool, E> {
            crate::cli::parse_yes_no(v).map_err(E::custom)
        }
    }
    d.deserialize_any(BoolOrYesNo).map(Some)
}

/// Reads a file value that is a TOML integer or a string as text; a negative integer is
/// refused here unless `negative` (then the setting's own bounds refuse it, with its reason).
struct IntegerOrText {
    expecting: &'static str,
    negative: bool,
}

impl serde::de::Visitor<'_> for IntegerOrText {
    type Value = String;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.expecting)
    }
    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<String, E> {
        Ok(v.to_string())
    }
    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<String, E> {
        if v < 0 && !self.negative {
            return Err(E::invalid_value(serde::de::Unexpected::Signed(v), &self));
        }
        Ok(v.to_string())
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<String, E> {
        Ok(v.to_string())
    }
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

/// Sets `setting` to `value` as `CONFIG SET setting value` does, through
/// [`RespSettings::set`]: start-up and the run-time command share one parser and one table of
/// bounds. A refusal gives `CONFIG SET`'s reason after `flag` and the text `given`, with the
/// flag's variable or the file's key, as `from` says.
fn set_as_config_set(
    resp: &mut RespSettings,
    setting: &str,
    value: &str,
    flag: &str,
    from: Source,
    given: &str,
) -> Result<()> {
    resp.set(setting, value).map_err(|error| {
        let why = match error {
            SettingError::Invalid(why) => why,
            // The names above are all settable.
            SettingError::Unknown | SettingError::Immutable => {
                format!("{setting} is not a setting CONFIG SET changes")
            }
        };
        anyhow!("invalid {}: {why}", named(flag, from, given))
    })
}

/// Refuses a CORS origin no browser sends, which would never match: an origin is `*` or
/// `scheme://host[:port]`, with no path (`https://app.example.com/` with its slash is the
/// usual slip).
fn check_origin(origin: &str) -> Result<(), String> {
    if origin == "*" {
        return Ok(());
    }
    let Some((scheme, authority)) = origin.split_once("://") else {
        return Err("an origin is scheme://host[:port], e.g. https://app.example.com".into());
    };
    let scheme_ok = scheme.starts_with(|c: char| c.is_ascii_alphabetic())
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c));
    if !scheme_ok {
        return Err(format!("'{scheme}' is not a URL scheme"));
    }
    if let Some(at) = authority.find(['/', '?', '#']) {
        return Err(format!(
            "an origin has no path: browsers send '{scheme}://{}', which this would never match",
            &authority[..at]
        ));
    }
    if authority.is_empty() || authority.contains(|c: char| c.is_whitespace() || c == ',') {
        return Err("an origin is scheme://host[:port], e.g. https://app.example.com".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use herald_gateway::hub::outbox::OutputLimit;
    use std::io::Write;

    #[test]
    fn cors_origins_are_scheme_host_port_without_a_path() {
        for good in [
            "*",
            "https://app.example.com",
            "http://localhost:3000",
            "http://[::1]:8080",
            "chrome-extension://abcdef",
        ] {
            assert_eq!(check_origin(good), Ok(()), "{good}");
        }
        assert_eq!(
            check_origin("http://a.com/"),
            Err(
                "an origin has no path: browsers send 'http://a.com', which this would never match"
                    .into()
            )
        );
        for bad in [
            "a.com",
            "http://",
            "http://a.com/app",
            "1http://a.com",
            "http://a b",
        ] {
            assert!(check_origin(bad).is_err(), "{bad}");
        }
    }

    /// The file takes `protected_mode` as the flag and `CONFIG SET` do (`"yes"`/`"no"`), and
    /// as a TOML boolean; anything else is refused saying what it takes.
    #[test]
    fn protected_mode_in_the_file_is_a_boolean_or_yes_no() {
        let read = |text: &str| toml::from_str::<FileConfig>(text).map(|f| f.protected_mode);
        assert_eq!(read("protected_mode = \"no\"").unwrap(), Some(false));
        assert_eq!(read("protected_mode = \"yes\"").unwrap(), Some(true));
        assert_eq!(read("protected_mode = false").unwrap(), Some(false));
        assert_eq!(read("").unwrap(), None);
        let error = read("protected_mode = \"maybe\"").unwrap_err().to_string();
        assert!(error.contains("expected yes or no, got 'maybe'"), "{error}");
        let error = read("protected_mode = 3").unwrap_err().to_string();
        assert!(error.contains("true, false, \"yes\" or \"no\""), "{error}");
    }

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
            maxclients: Some("9".into()),
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

    /// A flag (or its variable) of a setting `CONFIG SET` changes takes exactly the values
    /// `CONFIG SET` takes (which the compatibility tests check against Redis), to the same
    /// effect, and refuses the others with `CONFIG SET`'s reason: Redis's integers (no `+`, no
    /// leading zero) and memory values, and its bounds.
    #[test]
    fn start_up_takes_what_config_set_takes() {
        type Case = (&'static str, fn(&mut ServeArgs, &str), &'static str, bool);
        let maxclients: fn(&mut ServeArgs, &str) = |a, v| a.maxclients = Some(v.into());
        let timeout: fn(&mut ServeArgs, &str) = |a, v| a.timeout = Some(v.into());
        let bulk: fn(&mut ServeArgs, &str) = |a, v| a.proto_max_bulk_len = Some(v.into());
        let query: fn(&mut ServeArgs, &str) = |a, v| a.client_query_buffer_limit = Some(v.into());
        let cases: &[Case] = &[
            ("maxclients", maxclients, "0", false),
            ("maxclients", maxclients, "4294967296", false),
            ("maxclients", maxclients, "4294967295", true),
            ("maxclients", maxclients, "1", true),
            ("maxclients", maxclients, "05", false),
            ("maxclients", maxclients, "+5", false),
            ("maxclients", maxclients, "-1", false),
            ("maxclients", maxclients, "1.5", false),
            ("timeout", timeout, "2147483648", false),
            ("timeout", timeout, "2147483647", true),
            ("timeout", timeout, "0", true),
            ("timeout", timeout, "+40", false),
            ("timeout", timeout, "", false),
            ("proto-max-bulk-len", bulk, "1kb", false),
            ("proto-max-bulk-len", bulk, "1048575", false),
            ("proto-max-bulk-len", bulk, "1mb", true),
            ("proto-max-bulk-len", bulk, "2MB", true),
            ("proto-max-bulk-len", bulk, "18446744073709551615", false),
            ("proto-max-bulk-len", bulk, "9000000000gb", false),
            ("proto-max-bulk-len", bulk, "1.5mb", false),
            ("client-query-buffer-limit", query, "0", false),
            ("client-query-buffer-limit", query, "512kb", false),
            ("client-query-buffer-limit", query, "2000000b", true),
            ("client-query-buffer-limit", query, "1gb", true),
        ];
        for &(setting, set, value, accepted) in cases {
            let mut redis = RespSettings::default();
            let at_run_time = redis.set(setting, value);
            assert_eq!(
                at_run_time.is_ok(),
                accepted,
                "CONFIG SET {setting} {value}"
            );
            let mut args = ServeArgs::default();
            set(&mut args, value);
            match (at_run_time, NodeConfig::resolve(args)) {
                (Ok(()), Ok(config)) => assert_eq!(config.resp, redis, "--{setting} {value}"),
                (Err(SettingError::Invalid(why)), Err(error)) => {
                    let env = format!("HERALD_{}", setting.replace('-', "_").to_uppercase());
                    assert_eq!(
                        error.to_string(),
                        format!("invalid --{setting} '{value}' (or {env}): {why}")
                    );
                }
                (at_run_time, at_start_up) => {
                    panic!("--{setting} {value}: {at_start_up:?}, CONFIG SET: {at_run_time:?}")
                }
            }
        }
        let error = |setting: fn(&mut ServeArgs, &str), value: &str| {
            let mut args = ServeArgs::default();
            setting(&mut args, value);
            NodeConfig::resolve(args).unwrap_err().to_string()
        };
        assert_eq!(
            error(maxclients, "05"),
            "invalid --maxclients '05' (or HERALD_MAXCLIENTS): argument couldn't be parsed into an integer"
        );
        assert_eq!(
            error(timeout, "2147483648"),
            "invalid --timeout '2147483648' (or HERALD_TIMEOUT): argument must be between 0 and 2147483647 inclusive"
        );
    }

    /// `--pubsub-output-limit` is `CONFIG SET client-output-buffer-limit`'s `pubsub` group:
    /// soft seconds are read into a C `int` as Redis reads them, from its config file and
    /// command line as from `CONFIG SET` (2147483648 is negative, and refused; 4294967297 is 1).
    #[test]
    fn pubsub_output_limit_is_read_as_config_set_reads_it() {
        let limit = |value: &str| {
            NodeConfig::resolve(ServeArgs {
                pubsub_output_limit: Some(value.into()),
                ..ServeArgs::default()
            })
            .map(|config| config.resp.pubsub_output_limit)
            .map_err(|e| e.to_string())
        };
        let accepted = |hard_bytes, soft_bytes, soft_seconds| {
            Ok(OutputLimit {
                hard_bytes,
                soft_bytes,
                soft_seconds,
            })
        };
        assert_eq!(limit("32mb 8mb 60"), accepted(32 << 20, 8 << 20, 60));
        assert_eq!(limit(" 1mb\t512kb  +5 "), accepted(1 << 20, 512 << 10, 5));
        assert_eq!(limit("1k 1kb 2147483647"), accepted(1000, 1024, 2147483647));
        assert_eq!(limit("1 2 4294967296"), accepted(1, 2, 0));
        assert_eq!(limit("1 2 4294967297"), accepted(1, 2, 1));
        for value in [
            "1 2 2147483648",
            "1 2 -3",
            "1 2 99999999999999999999",
            "x 2 3",
            "-1 2 3",
        ] {
            let group = format!("pubsub {value}");
            let Err(SettingError::Invalid(why)) =
                RespSettings::default().set("client-output-buffer-limit", &group)
            else {
                panic!("CONFIG SET client-output-buffer-limit {group} was taken");
            };
            assert_eq!(
                limit(value),
                Err(format!(
                    "invalid --pubsub-output-limit '{value}' (or HERALD_PUBSUB_OUTPUT_LIMIT): {why}"
                ))
            );
        }
        assert_eq!(
            limit("1 2 2147483648"),
            Err("invalid --pubsub-output-limit '1 2 2147483648' (or HERALD_PUBSUB_OUTPUT_LIMIT): Error in hard, soft or soft_seconds setting in buffer limit configuration.".into())
        );
        assert_eq!(
            limit("pubsub 1 2 3"),
            Err("invalid --pubsub-output-limit 'pubsub 1 2 3' (or HERALD_PUBSUB_OUTPUT_LIMIT): expected '<hard> <soft> <soft-seconds>', e.g. '32mb 8mb 60'".into())
        );
    }

    /// The file's values are read as the flags' are, TOML integers or strings, and a refusal
    /// names the file's key.
    #[test]
    fn the_file_takes_what_config_set_takes() {
        let resolve = |text: &str| {
            let (path, mut file) = tempfile_in_target("herald-config-bounds.toml");
            writeln!(file, "{text}").unwrap();
            let config = NodeConfig::resolve(ServeArgs {
                config: Some(path.clone()),
                ..ServeArgs::default()
            })
            .map(|config| config.resp)
            .map_err(|e| e.to_string());
            let _ = std::fs::remove_file(path);
            config
        };
        let resp = resolve(
            "maxclients = \"50\"\ntimeout = 7\nproto_max_bulk_len = 2097152\nclient_query_buffer_limit = \"2mb\"\npubsub_output_limit = \"1mb 1mb 4294967297\"",
        )
        .unwrap();
        assert_eq!(
            (
                resp.maxclients,
                resp.timeout_seconds,
                resp.proto_max_bulk_len,
                resp.client_query_buffer_limit,
                resp.pubsub_output_limit.soft_seconds
            ),
            (50, 7, 2 << 20, 2 << 20, 1)
        );
        assert_eq!(
            resolve("maxclients = 0").unwrap_err(),
            "invalid --maxclients '0' (`maxclients` in the config file): argument must be between 1 and 4294967295 inclusive"
        );
        assert_eq!(
            resolve("timeout = -1").unwrap_err(),
            "invalid --timeout '-1' (`timeout` in the config file): argument must be between 0 and 2147483647 inclusive"
        );
        assert_eq!(
            resolve("pubsub_output_limit = \"1 2 2147483648\"").unwrap_err(),
            "invalid --pubsub-output-limit '1 2 2147483648' (`pubsub_output_limit` in the config file): Error in hard, soft or soft_seconds setting in buffer limit configuration."
        );
        let error = resolve("maxclients = 1.5").unwrap_err();
        assert!(
            error.contains("line 1") && error.contains("a whole number or a string"),
            "{error}"
        );
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

    /// `deploy/herald.example.toml` says it lists every setting with its default: with its
    /// settings uncommented it must parse, and name every key the file takes (the list comes
    /// from serde's own "unknown field, expected one of" message, so a new key cannot be
    /// forgotten there).
    #[test]
    fn the_example_file_lists_every_setting_and_parses_uncommented() {
        let example = include_str!("../../deploy/herald.example.toml");
        let setting = |line: &'static str| -> Option<&'static str> {
            let rest = line.strip_prefix("# ")?;
            let key = rest.split(" = ").next()?;
            (rest.starts_with("[namespace.")
                || (rest.contains(" = ")
                    && key.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')))
            .then_some(rest)
        };
        let uncommented: String = example
            .lines()
            .filter_map(setting)
            .map(|line| format!("{line}\n"))
            .collect();
        toml::from_str::<FileConfig>(&uncommented).unwrap_or_else(|e| {
            panic!("the example does not parse uncommented: {e}\n{uncommented}")
        });
        let refused = toml::from_str::<FileConfig>("no_such_key = 1")
            .expect_err("an unknown key")
            .to_string();
        let expected = refused
            .split("expected one of ")
            .nth(1)
            .unwrap_or_else(|| panic!("no key list in {refused}"));
        let keys: Vec<&str> = expected
            .split(", ")
            .map(|k| k.trim().trim_matches('`'))
            .filter(|k| !k.is_empty())
            .collect();
        assert!(
            keys.contains(&"resp_addr") && keys.contains(&"namespace"),
            "{keys:?}"
        );
        for key in keys {
            let listed = if key == "namespace" {
                uncommented.contains("[namespace.")
            } else {
                uncommented
                    .lines()
                    .any(|l| l.starts_with(&format!("{key} = ")))
            };
            assert!(listed, "deploy/herald.example.toml does not list `{key}`");
        }
    }
}
