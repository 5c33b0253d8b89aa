//! Failover time of a 3-node herald cluster: from `kill -9` of a partition's leader to the
//! first acknowledged publish to that partition.
//!
//! The cluster is started here (see [`crate::launch`]). Before the kills, one channel per
//! partition is found by publishing to probe channels and reading the partition from each
//! reply's `position`. Then, for each kill:
//!
//! 1. The victim is the next node in turn (or, if it leads no partition, the node leading the
//!    most), and the partition is one it leads according to `/api/cluster/status`.
//! 2. A publisher loop posts `POST /api/publish` with a fresh `messageId` per message to a
//!    surviving node, every `--interval`, each attempt with a short timeout
//!    (`--request-timeout`); a failed attempt is retried with the same message id, alternating
//!    between the two survivors. The first publish must land on the expected partition.
//! 3. After `--steady` of successful publishing, the victim is killed with SIGKILL. The
//!    failover time is from just before the signal to the acknowledgement of the first
//!    attempt *sent after* the kill. Meanwhile a survivor's status is polled every 10 ms to
//!    note when it first names another leader for the partition.
//! 4. The victim restarts on its data (same ports) and the next kill waits until every group
//!    has a leader that every node agrees on and every follower is caught up (lag 0), plus
//!    `--settle`.

use crate::cli::FailoverArgs;
use crate::http;
use crate::launch::{HeraldCluster, WorkDir};
use crate::report::json_str;
use anyhow::{Context, bail};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// herald's channels for the probes and the failover publishes (default namespace: durable).
const CHANNEL_PREFIX: &str = "bench-failover:";
/// How often the leader watcher polls a survivor's status.
const WATCH_EVERY: Duration = Duration::from_millis(10);
/// Time allowed for control requests (probes, status).
const CONTROL_TIMEOUT: Duration = Duration::from_secs(10);

/// The partition of a publish reply's `position` (`"P-SEQ"`).
pub fn partition_of(reply: &Value) -> Option<u64> {
    reply["position"].as_str()?.split('-').next()?.parse().ok()
}

/// Partition -> leader, as node `id` reports it.
async fn leaders(cluster: &HeraldCluster, id: u64) -> anyhow::Result<BTreeMap<u64, Option<u64>>> {
    let status = cluster.status(id).await?;
    Ok(status["groups"]
        .as_array()
        .context("status without groups")?
        .iter()
        .filter_map(|g| Some((g["partition"].as_u64()?, g["leader"].as_u64())))
        .collect())
}

/// The meta group's leader, as node `id` reports it.
async fn meta_leader(cluster: &HeraldCluster, id: u64) -> Option<u64> {
    let status = cluster.status(id).await.ok()?;
    status["groups"]
        .as_array()?
        .iter()
        .find(|g| g["partition"].is_null())?["leader"]
        .as_u64()
}

/// Publishes once to each probe channel until every partition has one; partition -> channel.
async fn map_partitions(
    http_addr: &str,
    partitions: u16,
    payload: &str,
) -> anyhow::Result<BTreeMap<u64, String>> {
    let mut found = BTreeMap::new();
    for i in 0..(partitions as usize * 64) {
        if found.len() == partitions as usize {
            break;
        }
        let channel = format!("{CHANNEL_PREFIX}{i}");
        let body = json!({ "channel": channel, "data": payload }).to_string();
        let response = http::request(
            http_addr,
            "POST",
            "/api/publish",
            Some(body.as_bytes()),
            CONTROL_TIMEOUT,
        )
        .await?;
        if response.status != 200 {
            bail!(
                "probe publish failed: {} {}",
                response.status,
                response.text()
            );
        }
        let partition = partition_of(&response.json()?)
            .with_context(|| format!("no position in {}", response.text()))?;
        found.entry(partition).or_insert(channel);
    }
    anyhow::ensure!(
        found.len() == partitions as usize,
        "found channels for only {} of {partitions} partitions",
        found.len()
    );
    Ok(found)
}

/// What the publisher saw around one kill.
#[derive(Debug, Default)]
struct Outcome {
    /// Acknowledged publishes before the kill.
    before: u64,
    /// Kill to the acknowledgement of the first attempt sent after it.
    failover: Option<Duration>,
    /// The survivor that acknowledged it.
    acked_by: Option<String>,
    /// Attempts sent after the kill, the successful one included.
    attempts_after: u64,
    /// Failed attempts after the kill, by kind.
    failures: BTreeMap<String, u64>,
    /// The reply's `duplicate` flag (a retried message that had committed already).
    duplicate: bool,
}

struct Publisher {
    targets: Vec<String>,
    channel: String,
    partition: u64,
    payload: String,
    run_id: String,
    interval: Duration,
    request_timeout: Duration,
    retry_pause: Duration,
    give_up: Duration,
    successes: Arc<AtomicU64>,
}

fn failure_kind(result: &anyhow::Result<http::Response>) -> String {
    match result {
        Ok(response) => {
            let text = response.text();
            let short: String = text.chars().take(60).collect();
            format!("{} {short}", response.status)
        }
        Err(e) => {
            let text = format!("{e:#}");
            if text.contains("no response within") {
                "client timeout".to_owned()
            } else if text.contains("cannot connect") {
                "connect failed".to_owned()
            } else {
                text.chars().take(60).collect()
            }
        }
    }
}

impl Publisher {
    async fn run(self, mut kill: watch::Receiver<Option<Instant>>) -> anyhow::Result<Outcome> {
        let mut outcome = Outcome::default();
        let mut message = 0u64;
        loop {
            message += 1;
            let body = json!({
                "channel": self.channel,
                "data": self.payload,
                "messageId": format!("{}-{message}", self.run_id),
            })
            .to_string();
            let mut attempt = 0usize;
            loop {
                let target = &self.targets[attempt % self.targets.len()];
                let sent = Instant::now();
                let result = http::request(
                    target,
                    "POST",
                    "/api/publish",
                    Some(body.as_bytes()),
                    self.request_timeout,
                )
                .await;
                let done = Instant::now();
                let killed_at = *kill.borrow();
                let after_kill = killed_at.is_some_and(|k| sent >= k);
                if after_kill {
                    outcome.attempts_after += 1;
                }
                match &result {
                    Ok(response) if response.status == 200 => {
                        let reply = response.json()?;
                        let partition = partition_of(&reply);
                        anyhow::ensure!(
                            partition == Some(self.partition),
                            "publish to {} landed on partition {partition:?}, not {}",
                            self.channel,
                            self.partition
                        );
                        if let (true, Some(k)) = (after_kill, killed_at) {
                            outcome.failover = Some(done - k);
                            outcome.acked_by = Some(target.clone());
                            outcome.duplicate = reply["duplicate"] == Value::Bool(true);
                            return Ok(outcome);
                        }
                        if killed_at.is_none() {
                            outcome.before += 1;
                            self.successes.fetch_add(1, Ordering::Relaxed);
                        }
                        break;
                    }
                    _ => {
                        // Failures before the kill (rare: a slow moment of the machine)
                        // are retried like the others but not counted.
                        if after_kill {
                            *outcome.failures.entry(failure_kind(&result)).or_default() += 1;
                        }
                        if let Some(k) = killed_at
                            && done - k > self.give_up
                        {
                            return Ok(outcome);
                        }
                        // A fast failure (refused, 503) is retried after a short pause; a
                        // timeout at once.
                        if done - sent < self.request_timeout {
                            tokio::time::sleep(self.retry_pause).await;
                        }
                        attempt += 1;
                    }
                }
            }
            // Pace the publishes before the kill; go on at once once it happened.
            if kill.borrow().is_none() {
                tokio::select! {
                    _ = tokio::time::sleep(self.interval) => {}
                    _ = kill.changed() => {}
                }
            }
        }
    }
}

/// Polls node `watcher` until it names a leader of `partition` other than `victim`.
async fn watch_leader(
    cluster_http: String,
    partition: u64,
    victim: u64,
    killed: Instant,
    give_up: Duration,
) -> Option<(Duration, u64)> {
    loop {
        if let Ok(status) =
            http::get_json(&cluster_http, "/api/cluster/status", Duration::from_secs(1)).await
        {
            let leader = status["groups"].as_array().and_then(|groups| {
                groups
                    .iter()
                    .find(|g| g["partition"].as_u64() == Some(partition))?["leader"]
                    .as_u64()
            });
            if let Some(leader) = leader.filter(|&l| l != victim) {
                return Some((killed.elapsed(), leader));
            }
        }
        if killed.elapsed() > give_up {
            return None;
        }
        tokio::time::sleep(WATCH_EVERY).await;
    }
}

/// One kill's record.
#[derive(Debug)]
pub struct KillRecord {
    /// 1-based.
    pub index: usize,
    /// The killed node.
    pub victim: u64,
    /// Partition led by the victim, published to.
    pub partition: u64,
    /// Whether the victim also led the meta group.
    pub meta_leader: bool,
    /// Partitions the victim led.
    pub led: usize,
    /// Kill to a survivor's status naming another leader, and that leader.
    pub leader_seen: Option<(Duration, u64)>,
    /// Kill to the first acknowledged publish sent after it; `None` if none within the
    /// give-up time.
    pub failover: Option<Duration>,
    /// The survivor (HTTP address) that acknowledged it.
    pub acked_by: Option<String>,
    /// Attempts after the kill.
    pub attempts_after: u64,
    /// Failed attempts after the kill, by kind.
    pub failures: BTreeMap<String, u64>,
    /// Acknowledged publishes before the kill.
    pub before: u64,
    /// Whether the acknowledged reply was flagged duplicate.
    pub duplicate: bool,
    /// Restart of the victim to a converged, caught-up cluster.
    pub rejoin: Duration,
}

/// Nearest-rank percentile of sorted values (`q` in 0..=1).
pub fn percentile(sorted: &[Duration], q: f64) -> Option<Duration> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

fn ms(d: Duration) -> String {
    format!("{:.0}", d.as_secs_f64() * 1e3)
}

fn ms_opt(d: Option<Duration>) -> String {
    d.map_or("-".to_owned(), ms)
}

/// Summary line of a set of durations: p50, p99, max, mean.
fn summary(values: &[Option<Duration>], give_up: Duration) -> String {
    let missing = values.iter().filter(|v| v.is_none()).count();
    // A missing value counts as the give-up time (a lower bound of the truth).
    let mut sorted: Vec<Duration> = values.iter().map(|v| v.unwrap_or(give_up)).collect();
    sorted.sort();
    if sorted.is_empty() {
        return "no samples".to_owned();
    }
    let mean = sorted.iter().sum::<Duration>() / sorted.len() as u32;
    let mut out = format!(
        "p50 {} ms, p99 {} ms, max {} ms, mean {} ms, min {} ms (n={})",
        ms_opt(percentile(&sorted, 0.5)),
        ms_opt(percentile(&sorted, 0.99)),
        ms(sorted[sorted.len() - 1]),
        ms(mean),
        ms(sorted[0]),
        sorted.len()
    );
    if missing > 0 {
        let _ = write!(
            out,
            "; {missing} never happened within {} s (counted as that)",
            give_up.as_secs()
        );
    }
    out
}

fn record_json(r: &KillRecord) -> String {
    let failures: Vec<String> = r
        .failures
        .iter()
        .map(|(k, v)| format!("{}:{v}", json_str(k)))
        .collect();
    format!(
        "{{\"kill\":{},\"victim\":{},\"partition\":{},\"meta_leader\":{},\"partitions_led\":{},\
         \"leader_seen_ms\":{},\"new_leader\":{},\"failover_ms\":{},\"acked_by\":{},\
         \"attempts_after_kill\":{},\"failures\":{{{}}},\"published_before\":{},\"duplicate\":{},\
         \"rejoin_ms\":{:.1}}}",
        r.index,
        r.victim,
        r.partition,
        r.meta_leader,
        r.led,
        r.leader_seen.map_or("null".to_owned(), |(d, _)| format!(
            "{:.1}",
            d.as_secs_f64() * 1e3
        )),
        r.leader_seen
            .map_or("null".to_owned(), |(_, l)| l.to_string()),
        r.failover.map_or("null".to_owned(), |d| format!(
            "{:.1}",
            d.as_secs_f64() * 1e3
        )),
        r.acked_by.as_deref().map_or("null".to_owned(), json_str),
        r.attempts_after,
        failures.join(","),
        r.before,
        r.duplicate,
        r.rejoin.as_secs_f64() * 1e3,
    )
}

/// Runs the failover benchmark and prints each kill and the summary (or JSON).
pub async fn run(args: &FailoverArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.kills >= 1, "--kills must be at least 1");
    let work = WorkDir::new(args.work_dir.clone(), args.keep)?;
    eprintln!("work directory {}", work.path.display());
    let mut cluster = HeraldCluster::start(
        &args.herald_bin,
        &work.path,
        3,
        args.partitions,
        &args.herald_args,
    )?;
    cluster
        .wait_converged(Duration::from_secs(60), true)
        .await?;
    let payload = "x".repeat(args.payload);
    let channels = map_partitions(&cluster.node(1).http, args.partitions, &payload).await?;
    eprintln!(
        "herald: 3 nodes formed, {} partitions; a channel for each found",
        args.partitions
    );
    let run_id = format!(
        "bench-failover-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0)
    );

    let mut records: Vec<KillRecord> = Vec::new();
    let mut per_victim_turn: BTreeMap<u64, usize> = BTreeMap::new();
    for index in 1..=args.kills {
        // Who leads what, from a node's status (all agree after convergence).
        let observer = cluster.running()[0];
        let leaders = leaders(&cluster, observer).await?;
        let mut led: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
        for (&partition, leader) in &leaders {
            if let Some(l) = leader {
                led.entry(*l).or_default().push(partition);
            }
        }
        let preferred = ((index - 1) % 3) as u64 + 1;
        let victim = if led.get(&preferred).is_some_and(|p| !p.is_empty()) {
            preferred
        } else {
            *led.iter()
                .max_by_key(|(_, p)| p.len())
                .context("no partition has a leader")?
                .0
        };
        let partitions = &led[&victim];
        let turn = per_victim_turn.entry(victim).or_default();
        let partition = partitions[*turn % partitions.len()];
        *turn += 1;
        let channel = channels[&partition].clone();
        let meta = meta_leader(&cluster, observer).await == Some(victim);
        let survivors: Vec<u64> = cluster
            .running()
            .into_iter()
            .filter(|&id| id != victim)
            .collect();
        // Start with the survivors in turn, so both get to take the first attempts.
        let mut targets: Vec<String> = survivors
            .iter()
            .map(|&id| cluster.node(id).http.clone())
            .collect();
        let turns = index % targets.len();
        targets.rotate_left(turns);
        let watcher_http = targets[0].clone();

        let successes = Arc::new(AtomicU64::new(0));
        let (kill_tx, kill_rx) = watch::channel(None);
        let publisher = Publisher {
            targets,
            channel: channel.clone(),
            partition,
            payload: payload.clone(),
            run_id: format!("{run_id}-{index}"),
            interval: args.interval,
            request_timeout: args.request_timeout,
            retry_pause: args.retry_pause,
            give_up: args.give_up,
            successes: successes.clone(),
        };
        let publishing = tokio::spawn(publisher.run(kill_rx));
        // Steady publishing first: at least --steady and a few acknowledged publishes.
        let steady_until = Instant::now() + args.steady;
        loop {
            if publishing.is_finished() {
                break;
            }
            if Instant::now() >= steady_until && successes.load(Ordering::Relaxed) >= 3 {
                break;
            }
            anyhow::ensure!(
                Instant::now() < steady_until + Duration::from_secs(30),
                "no steady publishing to {channel} before kill {index}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if publishing.is_finished() {
            let outcome = publishing.await?;
            bail!(
                "the publisher stopped before kill {index}: {:?}",
                outcome.err()
            );
        }

        let killed = cluster.kill(victim)?;
        let _ = kill_tx.send(Some(killed));
        let watching = tokio::spawn(watch_leader(
            watcher_http,
            partition,
            victim,
            killed,
            args.give_up,
        ));
        let outcome = publishing.await??;
        let leader_seen = watching.await?;

        let restarted = Instant::now();
        cluster.start_node(victim)?;
        cluster
            .wait_converged(Duration::from_secs(120), true)
            .await
            .with_context(|| format!("after restarting node {victim} (kill {index})"))?;
        let rejoin = restarted.elapsed();
        let record = KillRecord {
            index,
            victim,
            partition,
            meta_leader: meta,
            led: partitions.len(),
            leader_seen,
            failover: outcome.failover,
            acked_by: outcome.acked_by,
            attempts_after: outcome.attempts_after,
            failures: outcome.failures,
            before: outcome.before,
            duplicate: outcome.duplicate,
            rejoin,
        };
        if !args.json {
            let failures: Vec<String> = record
                .failures
                .iter()
                .map(|(k, v)| format!("{v}x {k}"))
                .collect();
            println!(
                "kill {index:>2}: node {victim} (led {} partitions{}), partition {partition:>2}: \
                 new leader {} seen after {} ms, first ack after {} ms via {} \
                 ({} attempts after the kill{}{}); rejoined in {} ms",
                record.led,
                if meta { ", meta leader" } else { "" },
                record
                    .leader_seen
                    .map_or("-".to_owned(), |(_, l)| l.to_string()),
                ms_opt(record.leader_seen.map(|(d, _)| d)),
                ms_opt(record.failover),
                record.acked_by.as_deref().unwrap_or("-"),
                record.attempts_after,
                if failures.is_empty() {
                    String::new()
                } else {
                    format!(": {}", failures.join(", "))
                },
                if record.duplicate { ", duplicate" } else { "" },
                ms(record.rejoin),
            );
        }
        records.push(record);
        tokio::time::sleep(args.settle).await;
    }

    let failovers: Vec<Option<Duration>> = records.iter().map(|r| r.failover).collect();
    let elections: Vec<Option<Duration>> = records
        .iter()
        .map(|r| r.leader_seen.map(|(d, _)| d))
        .collect();
    if args.json {
        let items: Vec<String> = records.iter().map(record_json).collect();
        let sorted = |values: &[Option<Duration>]| {
            let mut v: Vec<Duration> = values.iter().map(|d| d.unwrap_or(args.give_up)).collect();
            v.sort();
            v
        };
        let (f, e) = (sorted(&failovers), sorted(&elections));
        let p = |v: &[Duration], q| {
            percentile(v, q).map_or("null".to_owned(), |d| {
                format!("{:.1}", d.as_secs_f64() * 1e3)
            })
        };
        println!(
            "{{\"kills\":{},\"failover_ms\":{{\"p50\":{},\"p99\":{},\"max\":{}}},\
             \"leader_seen_ms\":{{\"p50\":{},\"p99\":{},\"max\":{}}},\"records\":[{}]}}",
            records.len(),
            p(&f, 0.5),
            p(&f, 0.99),
            p(&f, 1.0),
            p(&e, 0.5),
            p(&e, 0.99),
            p(&e, 1.0),
            items.join(",")
        );
    } else {
        println!();
        println!(
            "kill -9 of a partition leader -> first acknowledged publish to that partition: {}",
            summary(&failovers, args.give_up)
        );
        println!(
            "kill -9 -> a survivor's status names the new leader:                          {}",
            summary(&elections, args.give_up)
        );
    }
    drop(cluster);
    drop(work);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<Duration> = (1..=20).map(Duration::from_millis).collect();
        assert_eq!(percentile(&v, 0.5), Some(Duration::from_millis(10)));
        assert_eq!(percentile(&v, 0.99), Some(Duration::from_millis(20)));
        assert_eq!(percentile(&v, 0.0), Some(Duration::from_millis(1)));
        assert_eq!(percentile(&[], 0.5), None);
    }

    #[test]
    fn reads_partitions_from_positions() {
        assert_eq!(partition_of(&json!({ "position": "7-42" })), Some(7));
        assert_eq!(partition_of(&json!({ "id": "x" })), None);
        let s = summary(
            &[Some(Duration::from_millis(10)), None],
            Duration::from_secs(30),
        );
        assert!(s.contains("1 never happened"), "{s}");
    }
}
