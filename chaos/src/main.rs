//! # herald-chaos
//!
//! A Jepsen-style fault-injection harness for a 3-node herald cluster. It runs a workload of
//! publishers and resuming subscribers against the cluster while a nemesis kills, pauses,
//! restarts and partitions nodes, then heals everything, lets every subscriber catch up, reads
//! every node's history, and checks the whole record against herald's delivery contract
//! (`shared/design.md`): nothing acknowledged is lost, nothing is duplicated, order holds,
//! cursors never go backwards, gap notices only where retention explains them, and every node
//! serves the same history. It writes `result.json`, a self-contained `report.html` and the raw
//! record, and exits non-zero on any violation.
//!
//! ```sh
//! herald-chaos smoke                      # 3 minutes on loopback: kills, pauses, a rolling restart
//! herald-chaos run --all                  # every fault kind the target supports, >= 100 faults
//! herald-chaos run --faults kill-leader,partition-node --duration 5m
//! herald-chaos run --target compose --compose-file deploy/compose.yaml --all
//! ```
//!
//! Exit status: 0 when every run is valid, 1 when a run found a violation, 2 when the harness
//! itself failed (the cluster did not start, ...).
//!
//! ## Layout
//!
//! | module | owns |
//! |---|---|
//! | [`workload`] | writers (RESP `HPUBLISH ... ID`, HTTP `POST /api/publish` with `messageId`), retries of unknown outcomes on another node; subscribers (SSE, WebSocket, RESP `HSUBSCRIBE`) that reconnect to a random node with their cursor |
//! | [`nemesis`] | the fault kinds and the Jepsen-like schedule (quiet, fault, heal, ...), each fault logged with its window |
//! | [`checker`] | the verdict: losses (prefix / middle / postfix), duplicates, order, cursors, gap notices, node histories; failover, resume, latency and throughput figures |
//! | [`report`] | `result.json`, `history/*.jsonl`, `report.html` with inline SVG plots |
//! | [`runner`] | one scenario from cluster start to report |
//! | [`target`] | where the cluster runs: [`target::local`] (processes on loopback) or [`target::compose`] (containers) |
//! | [`history`] | the record every other module writes or reads |
//! | [`cursor`], [`resp`] | herald's cursor format; a minimal RESP2 client |

mod checker;
mod cursor;
mod history;
mod nemesis;
mod report;
mod resp;
mod runner;
mod target;
mod workload;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::json;

use crate::history::Protocol;
use crate::nemesis::{FaultKind, NemesisOptions};
use crate::report::RunResult;
use crate::runner::Scenario;
use crate::target::Target;
use crate::target::compose::{ComposeCluster, ComposeOptions};
use crate::target::local::{LocalCluster, LocalOptions, write_config};
use crate::workload::WorkloadOptions;

/// Fault injection against a 3-node herald cluster, checked against the delivery contract.
#[derive(Debug, Parser)]
#[command(name = "herald-chaos", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The 3-minute local scenario for CI: kills, pauses and a rolling restart.
    Smoke {
        #[command(flatten)]
        common: Common,
        /// How long faults are injected.
        #[arg(long, default_value = "180s", value_parser = parse_duration)]
        duration: Duration,
    },
    /// A scenario of chosen faults, or with --all the full suite.
    Run {
        #[command(flatten)]
        common: Common,
        /// Fault kinds to draw from (default: every kind the target supports).
        #[arg(long, value_delimiter = ',', value_enum)]
        faults: Vec<FaultKind>,
        /// How long faults are injected (one scenario).
        #[arg(long, default_value = "300s", value_parser = parse_duration)]
        duration: Duration,
        /// Stop after this many faults (one scenario).
        #[arg(long)]
        max_faults: Option<usize>,
        /// Take the kinds in turn instead of at random.
        #[arg(long)]
        in_turn: bool,
        /// The full suite: one scenario per fault kind the target supports, then a mixed one.
        #[arg(long)]
        all: bool,
        /// With --all: faults per kind's scenario (raised so that the suite has at least 100).
        #[arg(long, default_value_t = 10)]
        faults_per_kind: usize,
        /// With --all: faults in the final mixed scenario.
        #[arg(long, default_value_t = 12)]
        mixed_faults: usize,
    },
    /// Checks a saved run again (after a change of the checker) and rewrites its report.
    Check {
        /// The run's output directory (with result.json and history/).
        dir: PathBuf,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum TargetKind {
    /// Three processes on loopback, started by the harness.
    Local,
    /// The cluster of a compose file, in containers.
    Compose,
}

#[derive(Debug, Clone, Args)]
struct Common {
    /// Where the cluster runs.
    #[arg(long, value_enum, default_value = "local")]
    target: TargetKind,
    /// The compose file of `--target compose`.
    #[arg(long, default_value = "deploy/compose.yaml")]
    compose_file: PathBuf,
    /// The herald binary of `--target local` [default: target/release/herald, else
    /// target/debug/herald].
    #[arg(long, env = "HERALD_BIN")]
    herald_bin: Option<PathBuf>,
    /// Output directory [default: target/chaos/SCENARIO-UNIXTIME].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Writers (alternately RESP and HTTP).
    #[arg(long, default_value_t = 8)]
    writers: usize,
    /// Publishes per second of each writer.
    #[arg(long, default_value_t = 25.0)]
    rate: f64,
    /// Channels (one SSE, one WebSocket and one RESP subscriber each).
    #[arg(long, default_value_t = 8)]
    channels: usize,
    /// How long each fault lasts.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    fault_time: Duration,
    /// Quiet time before the first fault and after each heal.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    quiet_time: Duration,
    /// Workload time after the final heal.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    recovery: Duration,
    /// How long subscribers may take to catch up at the end.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    drain_timeout: Duration,
    /// Retention (`history_size`) of the workload's namespace.
    #[arg(long, default_value_t = 100_000)]
    history_size: u64,
    /// The nodes' `--publish-timeout`.
    #[arg(long, default_value = "5s")]
    publish_timeout: String,
    /// How long a publish attempt may take before its outcome is unknown.
    #[arg(long, default_value = "8s", value_parser = parse_duration)]
    attempt_timeout: Duration,
    /// How long a value is retried before its writer gives up on it.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    value_deadline: Duration,
    /// A subscriber reconnects after this long without a sign of life (it pings every second).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    idle_timeout: Duration,
    /// Partitions of the local cluster's store.
    #[arg(long, default_value_t = 8)]
    partitions: u16,
    /// Packet loss of the `loss` fault, in percent.
    #[arg(long, default_value_t = 30)]
    loss: u32,
    /// Delay of the `latency` fault, in ms.
    #[arg(long, default_value_t = 200)]
    latency: u32,
    /// Local target: no iptables network faults even when iptables is usable.
    #[arg(long)]
    no_network_faults: bool,
    /// The compose nodes' password [default: $HERALD_REQUIREPASS, else change-me].
    #[arg(long)]
    password: Option<String>,
}

/// Parses `500ms`, `10s`, `3m`, `1h` (a bare number is seconds).
fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("invalid duration '{text}'"))?;
    let seconds = match unit {
        "" | "s" => number,
        "ms" => number / 1000.0,
        "m" => number * 60.0,
        "h" => number * 3600.0,
        _ => return Err(format!("invalid duration unit in '{text}' (ms, s, m, h)")),
    };
    Ok(Duration::from_secs_f64(seconds))
}

fn herald_binary(common: &Common) -> Result<PathBuf> {
    if let Some(path) = &common.herald_bin {
        return Ok(path.clone());
    }
    let roots = [
        PathBuf::from("."),
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".."),
    ];
    for profile in ["release", "debug"] {
        for root in &roots {
            let path = root.join("target").join(profile).join("herald");
            if path.is_file() {
                return Ok(path);
            }
        }
    }
    bail!("no herald binary: build it (cargo build --release -p herald) or set HERALD_BIN")
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A scenario's settings from the command line.
fn scenario(
    common: &Common,
    name: &str,
    out: &Path,
    kinds: Vec<FaultKind>,
    duration: Duration,
    max_faults: Option<usize>,
    in_turn: bool,
) -> Scenario {
    let password = compose_password(common);
    let settings = json!({
        "target": format!("{:?}", common.target).to_lowercase(),
        "faults": kinds.iter().map(|k| k.name()).collect::<Vec<_>>(),
        "in_turn": in_turn,
        "duration_s": duration.as_secs_f64(),
        "max_faults": max_faults,
        "fault_time_s": common.fault_time.as_secs_f64(),
        "quiet_time_s": common.quiet_time.as_secs_f64(),
        "writers": common.writers,
        "rate_per_writer": common.rate,
        "channels": common.channels,
        "subscribers": common.channels * 3,
        "partitions": common.partitions,
        "history_size": common.history_size,
        "publish_timeout": common.publish_timeout,
        "attempt_timeout_s": common.attempt_timeout.as_secs_f64(),
        "value_deadline_s": common.value_deadline.as_secs_f64(),
        "idle_timeout_s": common.idle_timeout.as_secs_f64(),
        "recovery_s": common.recovery.as_secs_f64(),
        "drain_timeout_s": common.drain_timeout.as_secs_f64(),
        "loss_percent": common.loss,
        "latency_ms": common.latency,
    });
    Scenario {
        name: name.to_string(),
        duration,
        nemesis: NemesisOptions {
            kinds,
            in_turn,
            fault_time: common.fault_time,
            quiet_time: common.quiet_time,
            max_faults,
            loss_percent: common.loss,
            latency_ms: common.latency,
        },
        workload: WorkloadOptions {
            writers: common.writers.max(1),
            rate: common.rate,
            attempt_timeout: common.attempt_timeout,
            value_deadline: common.value_deadline,
            idle_timeout: common.idle_timeout,
            password: (common.target == TargetKind::Compose).then_some(password),
        },
        channels: common.channels.max(1),
        protocols: vec![Protocol::Sse, Protocol::Ws, Protocol::Resp],
        recovery: common.recovery,
        drain_timeout: common.drain_timeout,
        history_size: common.history_size,
        out: out.to_path_buf(),
        settings,
    }
}

fn compose_password(common: &Common) -> String {
    common
        .password
        .clone()
        .or_else(|| std::env::var("HERALD_REQUIREPASS").ok())
        .unwrap_or_else(|| "change-me".to_string())
}

/// Runs one scenario on a fresh cluster of the chosen target.
async fn run_one(common: &Common, scenario: &Scenario) -> Result<RunResult> {
    match common.target {
        TargetKind::Local => {
            let dir = scenario.out.join("cluster");
            std::fs::create_dir_all(&dir)?;
            let config = dir.join("herald.toml");
            write_config(&config, common.history_size)?;
            let mut cluster = LocalCluster::new(LocalOptions {
                binary: herald_binary(common)?,
                dir: dir.clone(),
                logs: scenario.out.join("nodes"),
                config,
                partitions: common.partitions,
                publish_timeout: common.publish_timeout.clone(),
                network_faults: !common.no_network_faults && LocalCluster::iptables_usable(),
            })?;
            let result = guarded(&mut cluster, scenario, "local").await;
            drop(cluster);
            // The nodes' data is evidence only when something went wrong.
            if result.as_ref().is_ok_and(|r| r.checked.valid) {
                for id in 1..=3 {
                    let _ = std::fs::remove_dir_all(dir.join(format!("node-{id}")));
                }
            }
            result
        }
        TargetKind::Compose => {
            let mut cluster = ComposeCluster::new(ComposeOptions {
                file: common.compose_file.clone(),
                project: "herald-chaos".into(),
                dir: scenario.out.join("cluster"),
                history_size: common.history_size,
                publish_timeout: common.publish_timeout.clone(),
                password: compose_password(common),
            })
            .await?;
            guarded(&mut cluster, scenario, "compose").await
        }
    }
}

/// Runs the scenario, shutting the cluster down on an error or Ctrl-C as well.
async fn guarded(target: &mut impl Target, scenario: &Scenario, name: &str) -> Result<RunResult> {
    let outcome = tokio::select! {
        result = runner::run(target, scenario, name) => result,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    if outcome.is_err() {
        let _ = target.shutdown().await;
    }
    outcome
}

/// The kinds the target supports (probed without starting anything).
fn available(common: &Common) -> Vec<FaultKind> {
    let network = match common.target {
        TargetKind::Local => !common.no_network_faults && LocalCluster::iptables_usable(),
        TargetKind::Compose => true,
    };
    FaultKind::ALL
        .into_iter()
        .filter(|k| match k {
            FaultKind::PartitionNode
            | FaultKind::PartitionLeader
            | FaultKind::PartitionBridge
            | FaultKind::PartitionAsym
            | FaultKind::Loss => network,
            FaultKind::Latency => common.target == TargetKind::Compose,
            _ => true,
        })
        .collect()
}

fn print_result(result: &RunResult) {
    let c = &result.checked;
    let m = &c.metrics;
    let f = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.0}"));
    println!(
        "{}: {} | faults {} | values {} (ok {}, failed {}, unknown {}) | deliveries {} | failover p50/p99 {}/{} ms | resume p50/p99 {}/{} ms | acks/s {:.0} (in faults {:.0}) | report {}",
        result.scenario,
        if c.valid {
            "VALID".to_string()
        } else {
            format!("INVALID {:?}", c.violation_counts)
        },
        c.stats.faults,
        c.stats.values,
        c.stats.ok,
        c.stats.failed,
        c.stats.unknown,
        c.stats.deliveries,
        f(m.failover_publish.p50),
        f(m.failover_publish.p99),
        f(m.resume.p50),
        f(m.resume.p99),
        m.throughput,
        m.throughput_in_faults,
        result.report
    );
}

/// `herald-chaos check DIR`.
fn recheck(dir: &Path) -> Result<bool> {
    let (old, record, histories) = report::load(dir)?;
    let settings = old["settings"].clone();
    let history_size = settings["history_size"].as_u64().unwrap_or(100_000);
    let checked = checker::check(&record, &histories, history_size);
    let result = RunResult {
        scenario: old["scenario"].as_str().unwrap_or("?").to_string(),
        target: old["target"].as_str().unwrap_or("?").to_string(),
        settings,
        started_at_unix_ms: old["started_at_unix_ms"].as_u64().unwrap_or(0),
        wall_seconds: old["wall_seconds"].as_f64().unwrap_or(0.0),
        recovered_ms: old["recovered_ms"].as_f64(),
        drained_ms: old["drained_ms"].as_f64(),
        missing_after_drain: old["missing_after_drain"].as_u64().unwrap_or(0) as usize,
        checked,
        report: dir.join("report.html").display().to_string(),
    };
    report::write(dir, &result, &record, &histories)?;
    print_result(&result);
    Ok(result.checked.valid)
}

async fn main_inner() -> Result<bool> {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { dir } => recheck(&dir),
        Command::Smoke { common, duration } => {
            let out = common
                .out
                .clone()
                .unwrap_or_else(|| PathBuf::from(format!("target/chaos/smoke-{}", unix_now())));
            let kinds = vec![
                FaultKind::KillLeader,
                FaultKind::Pause,
                FaultKind::Restart,
                FaultKind::Kill,
                FaultKind::PauseLeader,
            ];
            let s = scenario(&common, "smoke", &out, kinds, duration, None, true);
            let result = run_one(&common, &s).await?;
            print_result(&result);
            Ok(result.checked.valid)
        }
        Command::Run {
            common,
            faults,
            duration,
            max_faults,
            in_turn,
            all,
            faults_per_kind,
            mixed_faults,
        } => {
            let kinds = if faults.is_empty() {
                available(&common)
            } else {
                faults
            };
            if !all {
                let out = common
                    .out
                    .clone()
                    .unwrap_or_else(|| PathBuf::from(format!("target/chaos/run-{}", unix_now())));
                let s = scenario(&common, "run", &out, kinds, duration, max_faults, in_turn);
                let result = run_one(&common, &s).await?;
                print_result(&result);
                return Ok(result.checked.valid);
            }
            let root = common
                .out
                .clone()
                .unwrap_or_else(|| PathBuf::from(format!("target/chaos/suite-{}", unix_now())));
            let cycle = common.fault_time + common.quiet_time;
            // At least 100 faults in all, however few kinds the target supports.
            let per_kind = faults_per_kind.max(
                100usize
                    .saturating_sub(mixed_faults)
                    .div_ceil(kinds.len().max(1)),
            );
            let mut plan: Vec<(String, Vec<FaultKind>, usize)> = kinds
                .iter()
                .map(|k| (k.name().to_string(), vec![*k], per_kind))
                .collect();
            plan.push(("mixed".to_string(), kinds.clone(), mixed_faults));
            let mut results = Vec::new();
            let mut valid = true;
            for (name, kinds, count) in plan {
                // Rolling restarts take longer than a fault window: give them room.
                let per = if kinds == [FaultKind::Restart] {
                    cycle + Duration::from_secs(30)
                } else {
                    cycle + Duration::from_secs(5)
                };
                let duration = per * count as u32 + common.quiet_time;
                let s = scenario(
                    &common,
                    &name,
                    &root.join(&name),
                    kinds,
                    duration,
                    Some(count),
                    false,
                );
                match run_one(&common, &s).await {
                    Ok(result) => {
                        print_result(&result);
                        valid &= result.checked.valid;
                        results.push(json!({
                            "scenario": name,
                            "valid": result.checked.valid,
                            "faults": result.checked.stats.faults,
                            "violations": result.checked.violation_counts,
                            "values": result.checked.stats.values,
                            "acknowledged": result.checked.stats.ok,
                            "failover_ms": result.checked.metrics.failover_publish,
                            "resume_ms": result.checked.metrics.resume,
                            "throughput": result.checked.metrics.throughput,
                            "throughput_in_faults": result.checked.metrics.throughput_in_faults,
                            "report": result.report,
                        }));
                    }
                    Err(error) => {
                        eprintln!("scenario {name}: harness error: {error:#}");
                        valid = false;
                        results.push(json!({ "scenario": name, "error": format!("{error:#}") }));
                    }
                }
                write_suite(&root, &results)?;
            }
            let total: u64 = results.iter().filter_map(|r| r["faults"].as_u64()).sum();
            println!(
                "suite: {total} faults in {} scenarios; {}",
                results.len(),
                if valid { "VALID" } else { "INVALID" }
            );
            Ok(valid)
        }
    }
}

/// `suite.json` and `index.html` of a `run --all`.
fn write_suite(root: &Path, results: &[serde_json::Value]) -> Result<()> {
    std::fs::create_dir_all(root)?;
    std::fs::write(
        root.join("suite.json"),
        serde_json::to_string_pretty(results)?,
    )
    .context("write suite.json")?;
    let mut page = String::from(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>herald-chaos suite</title><style>body{font:14px sans-serif;margin:2em}td,th{border:1px solid #ccc;padding:2px 8px}table{border-collapse:collapse}</style></head><body><h1>herald-chaos suite</h1><table><tr><th>scenario</th><th>verdict</th><th>faults</th><th>acknowledged</th><th>failover p50/p99 ms</th><th>resume p50/p99 ms</th><th>acks/s (in faults)</th><th>violations</th></tr>",
    );
    let f = |v: &serde_json::Value| v.as_f64().map_or("-".to_string(), |v| format!("{v:.0}"));
    for r in results {
        let name = r["scenario"].as_str().unwrap_or("?");
        let verdict = match (r.get("error"), r["valid"].as_bool()) {
            (Some(e), _) => format!("error: {e}"),
            (_, Some(true)) => "valid".into(),
            _ => "INVALID".into(),
        };
        page.push_str(&format!(
            "<tr><td><a href=\"{name}/report.html\">{name}</a></td><td>{verdict}</td><td>{}</td><td>{}</td><td>{}/{}</td><td>{}/{}</td><td>{} ({})</td><td>{}</td></tr>",
            r["faults"],
            r["acknowledged"],
            f(&r["failover_ms"]["p50"]),
            f(&r["failover_ms"]["p99"]),
            f(&r["resume_ms"]["p50"]),
            f(&r["resume_ms"]["p99"]),
            f(&r["throughput"]),
            f(&r["throughput_in_faults"]),
            r["violations"]
        ));
    }
    page.push_str("</table></body></html>");
    std::fs::write(root.join("index.html"), page)?;
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    match main_inner().await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(error) => {
            eprintln!("herald-chaos: {error:#}");
            ExitCode::from(2)
        }
    }
}
