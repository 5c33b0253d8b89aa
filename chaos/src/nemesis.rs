//! The nemesis: faults scheduled like Jepsen's — quiet, fault, heal, quiet, fault, heal... —
//! each logged with its time window, the nodes it hit and each group's leader just before.
//!
//! | kind | what | heal |
//! |---|---|---|
//! | `kill` | `kill -9` of a random node | start it again on its data |
//! | `kill-leader` | `kill -9` of the leader of a random workload partition (or of the meta group) | start it again |
//! | `pause` | `SIGSTOP` (`docker pause`) of a random node | `SIGCONT` |
//! | `pause-leader` | the same, of a partition leader: a stale leader wakes up later | `SIGCONT` |
//! | `restart` | rolling restart: `SIGTERM` each node in turn, wait for its exit, start it, wait for the cluster | (none) |
//! | `partition-node` | one random node cut off from the two others, both ways (minority 1 / majority 2) | remove the rules |
//! | `partition-leader` | the same, for a partition leader | remove the rules |
//! | `partition-bridge` | one link cut both ways; the third node still sees both ends | remove the rules |
//! | `partition-asym` | one node can receive but not send | remove the rules |
//! | `loss` | a share of all cluster packets dropped at random | remove the rules |
//! | `latency` | every cluster packet delayed (netem; compose target only) | remove the qdisc |

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Result;
use rand::Rng;
use rand::seq::IndexedRandom;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::history::{Fault, Recorder};
use crate::target::{Target, leaders, wait_converged};

/// A kind of fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum FaultKind {
    /// `kill -9` of a random node.
    Kill,
    /// `kill -9` of a partition (or meta) leader.
    KillLeader,
    /// SIGSTOP of a random node.
    Pause,
    /// SIGSTOP of a partition leader.
    PauseLeader,
    /// Rolling restart with SIGTERM.
    Restart,
    /// One node isolated.
    PartitionNode,
    /// A partition leader isolated.
    PartitionLeader,
    /// One link cut.
    PartitionBridge,
    /// One node mute (receives, cannot send).
    PartitionAsym,
    /// Random packet loss.
    Loss,
    /// Added latency.
    Latency,
}

impl FaultKind {
    /// Every kind.
    pub const ALL: [FaultKind; 11] = [
        FaultKind::Kill,
        FaultKind::KillLeader,
        FaultKind::Pause,
        FaultKind::PauseLeader,
        FaultKind::Restart,
        FaultKind::PartitionNode,
        FaultKind::PartitionLeader,
        FaultKind::PartitionBridge,
        FaultKind::PartitionAsym,
        FaultKind::Loss,
        FaultKind::Latency,
    ];

    /// The kebab-case name.
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::Kill => "kill",
            FaultKind::KillLeader => "kill-leader",
            FaultKind::Pause => "pause",
            FaultKind::PauseLeader => "pause-leader",
            FaultKind::Restart => "restart",
            FaultKind::PartitionNode => "partition-node",
            FaultKind::PartitionLeader => "partition-leader",
            FaultKind::PartitionBridge => "partition-bridge",
            FaultKind::PartitionAsym => "partition-asym",
            FaultKind::Loss => "loss",
            FaultKind::Latency => "latency",
        }
    }

    /// Whether `target` can inject this kind.
    pub fn available(self, target: &impl Target) -> bool {
        match self {
            FaultKind::PartitionNode
            | FaultKind::PartitionLeader
            | FaultKind::PartitionBridge
            | FaultKind::PartitionAsym
            | FaultKind::Loss => target.can_cut(),
            FaultKind::Latency => target.can_delay(),
            _ => true,
        }
    }

    /// Whether the victims of this kind stop serving (kill, pause, isolation): the failover
    /// metrics are measured for these.
    pub fn takes_nodes_away(self) -> bool {
        matches!(
            self,
            FaultKind::Kill
                | FaultKind::KillLeader
                | FaultKind::Pause
                | FaultKind::PauseLeader
                | FaultKind::PartitionNode
                | FaultKind::PartitionLeader
                | FaultKind::PartitionAsym
        )
    }
}

/// Nemesis settings.
#[derive(Debug, Clone)]
pub struct NemesisOptions {
    /// The kinds to draw from.
    pub kinds: Vec<FaultKind>,
    /// Take the kinds in turn (else at random).
    pub in_turn: bool,
    /// How long each fault lasts before its heal.
    pub fault_time: Duration,
    /// Quiet time before the first fault and after each heal.
    pub quiet_time: Duration,
    /// Stop after this many faults.
    pub max_faults: Option<usize>,
    /// Packet loss of `loss`, in percent.
    pub loss_percent: u32,
    /// Delay of `latency`, in ms (jitter: a quarter of it).
    pub latency_ms: u32,
}

/// What undoes an active fault.
enum Undo {
    Restart(Vec<u64>),
    Resume(Vec<u64>),
    Network,
    Nothing,
}

/// Runs faults until `until` (no fault starts that could not end by then) or `max_faults`.
/// `partitions` are the partitions the workload's channels live on (the leaders worth
/// killing).
pub async fn run(
    target: &mut impl Target,
    recorder: &Recorder,
    options: &NemesisOptions,
    partitions: &[u16],
    until: Instant,
) -> Result<()> {
    let kinds: Vec<FaultKind> = options
        .kinds
        .iter()
        .copied()
        .filter(|k| k.available(target))
        .collect();
    if kinds.len() < options.kinds.len() {
        recorder.note(format!(
            "this target cannot inject {:?}; skipping them",
            options
                .kinds
                .iter()
                .filter(|k| !kinds.contains(k))
                .map(|k| k.name())
                .collect::<Vec<_>>()
        ));
    }
    if kinds.is_empty() {
        anyhow::bail!("no fault kind left to inject");
    }
    let mut turn = 0usize;
    sleep_until_or(options.quiet_time, until).await;
    loop {
        if options.max_faults.is_some_and(|max| turn >= max) {
            break;
        }
        if Instant::now() + options.fault_time + Duration::from_secs(1) > until {
            break;
        }
        let kind = if options.in_turn {
            kinds[turn % kinds.len()]
        } else {
            *kinds.choose(&mut rand::rng()).expect("fault kinds")
        };
        let index = recorder.lock().faults.len();
        let leaders_before = leaders(target).await;
        let start = recorder.now();
        let (nodes, detail, undo) =
            match inject(target, kind, options, partitions, &leaders_before).await {
                Ok(injected) => injected,
                Err(error) => {
                    recorder.note(format!("fault {index} ({}) failed: {error:#}", kind.name()));
                    let _ = heal_everything(target, recorder).await;
                    turn += 1;
                    sleep_until_or(options.quiet_time, until).await;
                    continue;
                }
            };
        recorder.note(format!(
            "fault {index}: {} {detail} (nodes {nodes:?})",
            kind.name()
        ));
        recorder.lock().faults.push(Fault {
            index,
            kind: kind.name().to_string(),
            nodes: nodes.clone(),
            detail,
            start,
            start_utc: recorder.clock.utc(start),
            injected: recorder.now(),
            end: None,
            leaders_before,
        });
        if !matches!(undo, Undo::Nothing) {
            tokio::time::sleep(options.fault_time).await;
        }
        if let Err(error) = undo_fault(target, undo).await {
            recorder.note(format!("heal of fault {index} failed: {error:#}"));
            let _ = heal_everything(target, recorder).await;
        }
        let end = recorder.now();
        recorder.lock().faults[index].end = Some(end);
        recorder.note(format!("fault {index} healed"));
        turn += 1;
        sleep_until_or(options.quiet_time, until).await;
    }
    Ok(())
}

async fn sleep_until_or(duration: Duration, until: Instant) {
    tokio::time::sleep_until((Instant::now() + duration).min(until)).await;
}

/// The leader of a random workload partition (or, one time in `partitions + 1`, of the meta
/// group), falling back to a random node.
fn some_leader(partitions: &[u16], leaders: &HashMap<String, u64>) -> (u64, String) {
    let mut rng = rand::rng();
    let group = if partitions.is_empty() || rng.random_range(0..=partitions.len()) == 0 {
        "meta".to_string()
    } else {
        partitions.choose(&mut rng).expect("partitions").to_string()
    };
    match leaders.get(&group) {
        Some(&leader) => (leader, format!("leader of group {group}")),
        None => (
            rng.random_range(1..=3),
            format!("random node (group {group} had no known leader)"),
        ),
    }
}

async fn inject(
    target: &mut impl Target,
    kind: FaultKind,
    options: &NemesisOptions,
    partitions: &[u16],
    leaders: &HashMap<String, u64>,
) -> Result<(Vec<u64>, String, Undo)> {
    let random = rand::rng().random_range(1..=3u64);
    Ok(match kind {
        FaultKind::Kill => {
            target.kill(random).await?;
            (vec![random], "kill -9".into(), Undo::Restart(vec![random]))
        }
        FaultKind::KillLeader => {
            let (victim, what) = some_leader(partitions, leaders);
            target.kill(victim).await?;
            (
                vec![victim],
                format!("kill -9 of the {what}"),
                Undo::Restart(vec![victim]),
            )
        }
        FaultKind::Pause => {
            target.pause(random).await?;
            (vec![random], "paused".into(), Undo::Resume(vec![random]))
        }
        FaultKind::PauseLeader => {
            let (victim, what) = some_leader(partitions, leaders);
            target.pause(victim).await?;
            (
                vec![victim],
                format!("pause of the {what}"),
                Undo::Resume(vec![victim]),
            )
        }
        FaultKind::Restart => {
            let mut order = vec![1u64, 2, 3];
            let first = rand::rng().random_range(0..3);
            order.rotate_left(first);
            for &id in &order {
                target.stop(id).await?;
                target.restart(id).await?;
                wait_converged(target, Duration::from_secs(30)).await;
            }
            (
                order.clone(),
                format!("rolling restart (SIGTERM, start) in the order {order:?}"),
                Undo::Nothing,
            )
        }
        FaultKind::PartitionNode | FaultKind::PartitionLeader => {
            let (victim, what) = if kind == FaultKind::PartitionLeader {
                some_leader(partitions, leaders)
            } else {
                (random, "random node".to_string())
            };
            for other in (1..=3).filter(|&o| o != victim) {
                target.cut(victim, other).await?;
                target.cut(other, victim).await?;
            }
            (
                vec![victim],
                format!("{what} isolated: [{victim}] | {:?}", others(victim)),
                Undo::Network,
            )
        }
        FaultKind::PartitionBridge => {
            let [a, b] = others(random);
            target.cut(a, b).await?;
            target.cut(b, a).await?;
            (
                vec![a, b],
                format!("link {a}<->{b} cut; node {random} sees both"),
                Undo::Network,
            )
        }
        FaultKind::PartitionAsym => {
            for other in others(random) {
                target.cut(random, other).await?;
            }
            (
                vec![random],
                format!(
                    "node {random} receives but its packets to {:?} are dropped",
                    others(random)
                ),
                Undo::Network,
            )
        }
        FaultKind::Loss => {
            target.lose(options.loss_percent).await?;
            (
                vec![1, 2, 3],
                format!("{}% of cluster packets dropped", options.loss_percent),
                Undo::Network,
            )
        }
        FaultKind::Latency => {
            let ms = options.latency_ms;
            target.delay(ms, ms / 4).await?;
            (
                vec![1, 2, 3],
                format!("cluster packets delayed {ms} ms ± {} ms", ms / 4),
                Undo::Network,
            )
        }
    })
}

fn others(id: u64) -> [u64; 2] {
    match id {
        1 => [2, 3],
        2 => [1, 3],
        _ => [1, 2],
    }
}

async fn undo_fault(target: &mut impl Target, undo: Undo) -> Result<()> {
    match undo {
        Undo::Restart(ids) => {
            for id in ids {
                target.restart(id).await?;
            }
        }
        Undo::Resume(ids) => {
            for id in ids {
                target.resume(id).await?;
            }
        }
        Undo::Network => target.heal_network().await?,
        Undo::Nothing => {}
    }
    Ok(())
}

/// The final heal: network back, every paused node resumed, every stopped node started.
pub async fn heal_everything(target: &mut impl Target, recorder: &Recorder) -> Result<()> {
    target.heal_network().await?;
    for node in target.nodes() {
        if !target.is_up(node.id) {
            // Paused or down: resume is harmless on a dead node's slot only if paused, so try
            // resume first, then a restart.
            if target.resume(node.id).await.is_err() || !target.is_up(node.id) {
                target.restart(node.id).await?;
            }
            recorder.note(format!("heal: node {} back", node.id));
        }
    }
    Ok(())
}
