//! `herald-bench`: publish-to-delivery throughput and latency of herald, or of any server that
//! speaks RESP pub/sub (e.g. `redis-server`), for P publishers x S subscribers x payload size.
//!
//! `pubsub` opens S subscriber connections (subscriber j runs `SUBSCRIBE bench:<j % channels>`
//! and waits for the confirmation), then P publisher connections that send pipelined batches of
//! `PUBLISH bench:<c> <payload>` round-robin over the channels, optionally capped by `--rate`
//! messages/s in total. Each payload starts with its send time, publisher id and sequence number;
//! subscribers parse the pushes in place and record publish-to-delivery latency in HDR histograms
//! (µs, 3 significant digits). Messages sent during `--warmup` are excluded; after `--duration`
//! publishing stops and subscribers get up to `--drain` (2 s) to receive the rest. The report gives
//! published and delivered msg/s, the delivery ratio (delivered / published x subscribers per
//! channel) and latency p50/p90/p99/p99.9/max, plus warnings for disconnects, lost or reordered
//! messages and stalls.
//!
//! `compare` runs the same scenario against two servers in turns, alternating which goes first
//! each round, and prints a table of both sides' delivered msg/s, p50, p99 and their ratio.
//!
//! `durable` measures acknowledged writes: C connections each pipelining K commands
//! (`PUBLISH` for herald, whose durable namespaces acknowledge after the flush to disk;
//! `XADD [MAXLEN ~ N]` for Redis Streams), against one or more servers in turns, rotating which
//! goes first; it reports acked msg/s, ack latency percentiles, the first target's throughput
//! over each other's, and with `--pid` each server's CPU time and disk writes per message.
//!
//! `idle` opens N SSE streams and N WebSockets to herald on one channel, reports herald's RSS
//! growth per connection (`--pid`), then publishes events over HTTP and measures how long each
//! takes to reach every connection.
//!
//! `cluster` starts a 3-node herald cluster and a 3-server NATS JetStream cluster on loopback
//! and compares replicated durable publishes: herald `PUBLISH` over RESP (acknowledged after
//! the Raft quorum commit) against JetStream publishes awaiting their PubAck (stream with 3
//! replicas, file storage), C connections spread over the nodes, K in flight each.
//!
//! `failover` starts a 3-node herald cluster, then repeatedly `kill -9`s a partition leader and
//! measures the time to the first acknowledged publish to that partition, restarting the
//! victim on its data after each kill.
//!
//! ```text
//! cargo build --release -p herald-bench
//! ./target/release/herald-bench pubsub --addr 127.0.0.1:6379 --publishers 1 --subscribers 50 \
//!     --payload 64 --duration 10s --warmup 2s [--channels 1] [--pipeline 32] [--rate N] [--json]
//! ./target/release/herald-bench compare --a herald=127.0.0.1:6379 --b redis=127.0.0.1:6390 \
//!     --publishers 1 --subscribers 50 --payload 64,1024 --duration 10s --rounds 2
//! ./target/release/herald-bench durable --target herald=publish@127.0.0.1:6379 \
//!     --target redis=xadd@127.0.0.1:6390 --maxlen 100 --shape 1x1,1x32,16x32 --payload 64,1024
//! ./target/release/herald-bench idle --http 127.0.0.1:8000 --pid <herald pid> --sse 10000 \
//!     --ws 10000 --channel bench-idle --events 3
//! ./target/release/herald-bench cluster --herald-bin target/release/herald \
//!     --nats-bin nats-server --shape 3x1,3x32,12x32,48x32 --payload 64,1024 --rounds 2
//! ./target/release/herald-bench failover --herald-bin target/release/herald --kills 20
//! ```
//!
//! `scripts/bench-pubsub`, `scripts/bench-durable` and `scripts/bench-idle` start the servers
//! and run these with the settings of docs/benchmarks.md; `scripts/bench-cluster` and
//! `scripts/bench-failover` run `cluster` and `failover`, which start their own servers.
//!
//! The client is meant to stay out of the way of the server it measures: no allocation per
//! message, 256 KiB read buffers, one write per batch of PUBLISH commands, one clock read per
//! socket read on the subscriber side.

mod cli;
mod cluster;
mod durable;
mod failover;
mod http;
mod idle;
mod launch;
mod procfs;
mod pubsub;
mod report;
mod resp;

use clap::Parser;
use cli::{
    Cli, Command, CompareArgs, DurableArgs, DurableCommand, IdleArgs, LoadArgs, PubsubArgs, Target,
};
use pubsub::Scenario;
use report::{CompareRow, RunResult, Side};

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all();
    if let Some(threads) = cli.threads {
        runtime.worker_threads(threads.max(1));
    }
    let runtime = runtime.build()?;
    runtime.block_on(async {
        match cli.command {
            Command::Pubsub(args) => run_pubsub(args).await,
            Command::Compare(args) => run_compare(args).await,
            Command::Durable(args) => run_durable(args).await,
            Command::Idle(args) => run_idle(args).await,
            Command::Cluster(args) => cluster::compare(&args).await,
            Command::Failover(args) => failover::run(&args).await,
        }
    })
}

fn scenario(label: &str, addr: &str, payload: usize, load: &LoadArgs) -> Scenario {
    Scenario {
        label: label.to_owned(),
        addr: addr.to_owned(),
        publishers: load.publishers,
        subscribers: load.subscribers,
        channels: load.channels,
        payload,
        pipeline: load.pipeline,
        rate: load.rate,
        duration: load.duration,
        warmup: load.warmup,
        drain: load.drain,
    }
}

async fn run_pubsub(args: PubsubArgs) -> anyhow::Result<()> {
    let label = args.label.as_deref().unwrap_or(&args.addr);
    let result = pubsub::run(&scenario(label, &args.addr, args.payload, &args.load)).await?;
    if args.load.json {
        println!("{}", result.json());
    } else {
        println!("{}", result.human());
    }
    Ok(())
}

async fn run_compare(args: CompareArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.rounds >= 1, "--rounds must be at least 1");
    let sides = [&args.a, &args.b];
    let mut runs: Vec<(usize, usize, RunResult)> = Vec::new();
    let mut first = true;
    for &payload in &args.payload {
        for round in 0..args.rounds {
            // A first in even rounds, B first in odd ones.
            for k in 0..2 {
                let side = (k + round) % 2;
                let target: &Target = sides[side];
                if !first {
                    tokio::time::sleep(args.pause).await;
                }
                first = false;
                eprintln!(
                    "round {}/{}: {} ({}), {} B",
                    round + 1,
                    args.rounds,
                    target.label,
                    target.addr,
                    payload
                );
                let s = scenario(&target.label, &target.addr, payload, &args.load);
                let result = pubsub::run(&s).await?;
                if !args.load.json {
                    println!("{}", result.human());
                }
                runs.push((payload, side, result));
            }
        }
    }

    let rows: Vec<CompareRow> = args
        .payload
        .iter()
        .filter_map(|&payload| {
            let side = |which: usize| {
                let mine: Vec<&RunResult> = runs
                    .iter()
                    .filter(|(p, s, _)| *p == payload && *s == which)
                    .map(|(_, _, r)| r)
                    .collect();
                Side::merge(&mine)
            };
            Some(CompareRow {
                payload,
                a: side(0)?,
                b: side(1)?,
            })
        })
        .collect();
    if args.load.json {
        let runs: Vec<RunResult> = runs.into_iter().map(|(_, _, r)| r).collect();
        println!("{}", report::compare_json(&args.a, &args.b, &rows, &runs));
    } else {
        println!();
        print!("{}", report::compare_table(&args.a, &args.b, &rows));
    }
    Ok(())
}

async fn run_durable(args: DurableArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.rounds >= 1, "--rounds must be at least 1");
    let labels: Vec<String> = args.targets.iter().map(|t| t.label.clone()).collect();
    for (label, _) in &args.pids {
        anyhow::ensure!(
            labels.contains(label),
            "--pid {label}=...: no target is labelled {label:?}"
        );
    }
    let n = args.targets.len();
    // (payload, shape, target index, result)
    let mut runs: Vec<(usize, (usize, usize), usize, durable::DurableResult)> = Vec::new();
    let mut first = true;
    for &payload in &args.payload {
        for &(connections, pipeline) in &args.shape {
            for round in 0..args.rounds {
                // Rotate the order: each target goes first in turn.
                for k in 0..n {
                    let index = (k + round) % n;
                    let target = &args.targets[index];
                    if !first {
                        tokio::time::sleep(args.pause).await;
                    }
                    first = false;
                    eprintln!(
                        "round {}/{}: {} ({}), {connections}x{pipeline}, {payload} B",
                        round + 1,
                        args.rounds,
                        target.label,
                        target.addr,
                    );
                    let scenario = durable::DurableScenario {
                        label: target.label.clone(),
                        addr: target.addr.clone(),
                        mode: match target.command {
                            DurableCommand::Publish => durable::Mode::Publish,
                            DurableCommand::Xadd => durable::Mode::Xadd {
                                maxlen: (args.maxlen > 0).then_some(args.maxlen),
                            },
                        },
                        pid: args
                            .pids
                            .iter()
                            .find(|(label, _)| *label == target.label)
                            .map(|&(_, pid)| pid),
                        prefix: args.prefix.clone(),
                        connections,
                        pipeline,
                        payload,
                        duration: args.duration,
                        warmup: args.warmup,
                    };
                    let result = durable::run(&scenario).await?;
                    if !args.json {
                        println!("{}", result.human());
                    }
                    runs.push((payload, (connections, pipeline), index, result));
                }
            }
        }
    }
    let mut rows = Vec::new();
    for &payload in &args.payload {
        for &shape in &args.shape {
            let sides: Option<Vec<durable::Merged>> = (0..n)
                .map(|index| {
                    let mine: Vec<&durable::DurableResult> = runs
                        .iter()
                        .filter(|(p, s, i, _)| *p == payload && *s == shape && *i == index)
                        .map(|(_, _, _, r)| r)
                        .collect();
                    durable::Merged::of(&mine)
                })
                .collect();
            if let Some(sides) = sides {
                rows.push(durable::DurableRow {
                    payload,
                    connections: shape.0,
                    pipeline: shape.1,
                    sides,
                });
            }
        }
    }
    if args.json {
        let runs: Vec<durable::DurableResult> = runs.into_iter().map(|(.., r)| r).collect();
        println!("{}", durable::compare_json(&labels, &rows, &runs));
    } else {
        println!();
        print!("{}", durable::table(&labels, &rows));
    }
    Ok(())
}

async fn run_idle(args: IdleArgs) -> anyhow::Result<()> {
    let scenario = idle::IdleScenario {
        http: args.http,
        sse: args.sse,
        ws: args.ws,
        channel: args.channel,
        pid: args.pid,
        events: args.events,
        payload: args.payload,
        concurrency: args.concurrency,
        settle: args.settle,
        hold: args.hold,
        timeout: args.timeout,
        ws_ping: args.ws_ping,
    };
    let result = idle::run(&scenario).await?;
    if args.json {
        println!("{}", result.json());
    } else {
        print!("{}", result.human());
    }
    Ok(())
}
