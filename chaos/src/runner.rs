//! One scenario from start to verdict: start the cluster, start subscribers then writers, run
//! the nemesis, heal everything, let the workload run a little longer (the cluster must
//! recover), stop the writers, drain the subscribers, read every node's history, check, write
//! the report.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::checker::{self, HistoryEntry, NodeHistory};
use crate::cursor::Cursor;
use crate::history::{Protocol, Recorder, ValueId};
use crate::nemesis::{self, NemesisOptions};
use crate::report::{self, RunResult};
use crate::resp;
use crate::target::{NodeAddr, Target, wait_applied, wait_converged};
use crate::workload::{self, WorkloadOptions};

/// A scenario.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// Its name (the output directory's too).
    pub name: String,
    /// How long the nemesis runs (the workload runs from before it until after the recovery).
    pub duration: Duration,
    /// The nemesis.
    pub nemesis: NemesisOptions,
    /// The workload.
    pub workload: WorkloadOptions,
    /// Number of channels.
    pub channels: usize,
    /// Subscriber protocols (one subscriber per channel and protocol).
    pub protocols: Vec<Protocol>,
    /// Workload time after the final heal.
    pub recovery: Duration,
    /// How long the subscribers may take to catch up at the end.
    pub drain_timeout: Duration,
    /// Retention of the workload namespace.
    pub history_size: u64,
    /// Where the report goes.
    pub out: PathBuf,
    /// The settings as the user gave them (for the report).
    pub settings: serde_json::Value,
}

/// Runs `scenario` on `target` (started here, shut down at the end) and writes its report.
pub async fn run(
    target: &mut impl Target,
    scenario: &Scenario,
    target_name: &str,
) -> Result<RunResult> {
    let wall = std::time::Instant::now();
    std::fs::create_dir_all(&scenario.out)?;
    let channels: Arc<Vec<String>> = Arc::new(
        (0..scenario.channels)
            .map(|i| format!("chaos:c{i}"))
            .collect(),
    );
    let recorder = Recorder::new(channels.to_vec());
    recorder.note(format!(
        "scenario {}: starting the {target_name} cluster",
        scenario.name
    ));
    target.start().await.context("starting the cluster")?;
    recorder.note("cluster formed");
    let nodes = target.nodes();

    let stop_subscribers = CancellationToken::new();
    let stop_writers = CancellationToken::new();
    let subscribers = workload::spawn_subscribers(
        &scenario.workload,
        &scenario.protocols,
        &nodes,
        &channels,
        &recorder,
        &stop_subscribers,
    );
    // Let the subscribers connect before the first publish (they start from the beginning
    // of their channel anyway, so this only keeps the first connections quiet).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let writers = workload::spawn_writers(
        &scenario.workload,
        &nodes,
        &channels,
        &recorder,
        &stop_writers,
    );
    recorder.note(format!(
        "workload: {} writers at {}/s each, {} subscribers on {} channels",
        scenario.workload.writers,
        scenario.workload.rate,
        scenario.protocols.len() * scenario.channels,
        scenario.channels
    ));

    // The partitions the channels live on (from the first acknowledgements).
    let deadline = Instant::now() + Duration::from_secs(15);
    let partitions = loop {
        let partitions: Vec<u16> = {
            let record = recorder.lock();
            let mut found: Vec<(usize, u16)> = record
                .publishes
                .iter()
                .filter_map(|p| p.position.map(|pos| (p.channel, pos.partition)))
                .collect();
            found.sort_unstable();
            found.dedup();
            if found.len() >= scenario.channels || Instant::now() > deadline {
                let mut parts: Vec<u16> = found.into_iter().map(|(_, p)| p).collect();
                parts.sort_unstable();
                parts.dedup();
                parts
            } else {
                Vec::new()
            }
        };
        if !partitions.is_empty() || Instant::now() > deadline {
            break partitions;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    recorder.note(format!(
        "the workload's channels live on partitions {partitions:?}"
    ));

    let until = Instant::now() + scenario.duration;
    let nemesis_result =
        nemesis::run(target, &recorder, &scenario.nemesis, &partitions, until).await;
    if let Err(error) = &nemesis_result {
        recorder.note(format!("nemesis stopped: {error:#}"));
    }
    recorder.note("final heal");
    if let Err(error) = nemesis::heal_everything(target, &recorder).await {
        recorder.note(format!("final heal failed: {error:#}"));
    }
    let heal_start = recorder.now();
    let recovered_ms = wait_converged(target, Duration::from_secs(60))
        .await
        .then(|| recorder.now() - heal_start);
    recorder.note(match recovered_ms {
        Some(ms) => format!("cluster converged {ms:.0} ms after the heal"),
        None => "cluster did NOT converge within 60 s of the heal".to_string(),
    });
    tokio::time::sleep(scenario.recovery).await;
    recorder.note("stopping the writers");
    stop_writers.cancel();
    for writer in writers {
        let _ = writer.await;
    }
    let drain_start = recorder.now();
    let deadline = Instant::now() + scenario.drain_timeout;
    let drained_ms = loop {
        let (missing, behind) = recorder.missing();
        if missing == 0 {
            break Some(recorder.now() - drain_start);
        }
        if Instant::now() > deadline {
            recorder.note(format!(
                "drain timed out: {behind} subscribers still miss {missing} acknowledged values"
            ));
            break None;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let (missing_after_drain, _) = recorder.missing();
    if let Some(ms) = drained_ms {
        recorder.note(format!("every subscriber caught up ({ms:.0} ms)"));
    }
    stop_subscribers.cancel();
    for subscriber in subscribers {
        let _ = subscriber.await;
    }

    // The nodes' histories, once they have applied the same log.
    if !wait_applied(target, Duration::from_secs(30)).await {
        recorder
            .note("the nodes did not reach the same applied index within 30 s; comparing anyway");
    }
    let mut histories = Vec::new();
    for node in &nodes {
        histories.push(read_history(node, &channels, target.password().as_deref()).await);
    }
    recorder.note("histories read; checking");
    let logs = scenario.out.join("nodes");
    std::fs::create_dir_all(&logs)?;
    if let Err(error) = target.collect_logs(&logs).await {
        recorder.note(format!("collecting node logs failed: {error:#}"));
    }
    let _ = target.shutdown().await;

    let record = recorder.lock();
    let checked = checker::check(&record, &histories, scenario.history_size);
    let result = RunResult {
        scenario: scenario.name.clone(),
        target: target_name.to_string(),
        settings: scenario.settings.clone(),
        started_at_unix_ms: recorder.clock.unix_start_ms,
        wall_seconds: wall.elapsed().as_secs_f64(),
        recovered_ms,
        drained_ms,
        missing_after_drain,
        checked,
        report: scenario.out.join("report.html").display().to_string(),
    };
    report::write(&scenario.out, &result, &record, &histories)?;
    Ok(result)
}

/// Reads a node's whole history of every channel with `HISTORY channel AFTER cursor COUNT 1000`.
async fn read_history(node: &NodeAddr, channels: &[String], password: Option<&str>) -> NodeHistory {
    let mut history = NodeHistory {
        node: node.id,
        channels: Vec::new(),
        error: None,
    };
    let result: Result<()> = async {
        let mut connection =
            resp::Connection::connect(node.resp, Duration::from_secs(5), password).await?;
        for channel in channels {
            let mut entries = Vec::new();
            let mut after: Option<String> = None;
            loop {
                let mut args: Vec<&[u8]> = vec![b"HISTORY", channel.as_bytes()];
                if let Some(cursor) = &after {
                    args.push(b"AFTER");
                    args.push(cursor.as_bytes());
                }
                args.push(b"COUNT");
                args.push(b"1000");
                let reply =
                    tokio::time::timeout(Duration::from_secs(20), connection.request(&args))
                        .await
                        .context("HISTORY timed out")??;
                if let resp::Value::Error(e) = &reply {
                    anyhow::bail!("HISTORY {channel}: {e}");
                }
                let items = reply.items().unwrap_or_default();
                let mut events = 0;
                for item in items {
                    let pair = item.items().unwrap_or_default();
                    // A gap notice, `[hgap, channel, requested, oldest, reason]`, is no event:
                    // what it says is missing shows as missing positions.
                    if pair.len() == 5 && pair[0].text().as_deref() == Some("hgap") {
                        continue;
                    }
                    events += 1;
                    let cursor = pair.first().and_then(resp::Value::text).unwrap_or_default();
                    let payload: serde_json::Value = pair
                        .get(1)
                        .and_then(resp::Value::bytes)
                        .and_then(|b| serde_json::from_slice(b).ok())
                        .unwrap_or_default();
                    let value = match (payload["w"].as_u64(), payload["s"].as_u64()) {
                        (Some(w), Some(s)) => Some(ValueId { w: w as u32, s }),
                        _ => None,
                    };
                    let position = Cursor::decode(&cursor).and_then(|c| c.single());
                    entries.push(HistoryEntry {
                        position,
                        value,
                        raw: (value.is_none() || position.is_none())
                            .then(|| format!("{cursor} {payload}")),
                    });
                    after = Some(cursor);
                }
                if events < 1000 {
                    break;
                }
            }
            history.channels.push(entries);
        }
        Ok(())
    }
    .await;
    if let Err(error) = result {
        history.error = Some(format!("{error:#}"));
    }
    history
}
