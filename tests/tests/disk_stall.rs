//! A node whose disk stops answering: its data directory is a FUSE passthrough
//! (`tests/fixtures/stallfs.py`) whose writes and syncs wait while a flag file exists. Past
//! `--disk-stall-timeout` the node closes its clients' connections (they resume elsewhere),
//! logs why, and exits with status 75 for its supervisor; a restart keeps every acknowledged
//! event.
//!
//! Needs `/dev/fuse`, and Debian's Python with fusepy over libfuse2 (`python3-fusepy`, which
//! `scripts/install-test-deps` installs); on a machine without `/dev/fuse` the test says so and
//! does nothing.

use eventsource_stream::Eventsource;
use futures::StreamExt;
use herald_tests::stalled_disk::StalledDisk;
use herald_tests::{Herald, PATIENCE, history_payloads, patient_connection, wait_until};
use std::time::Duration;

#[tokio::test]
async fn a_node_whose_disk_stalls_closes_its_connections_and_exits_for_its_supervisor() {
    let Some(disk) = StalledDisk::mount() else {
        return;
    };
    let data_dir = disk.mount.join("data");
    let mut node = Herald::start_in(data_dir.clone(), &["--disk-stall-timeout", "5s"], &[]);
    let client = redis::Client::open(node.url()).unwrap();
    let mut publisher = patient_connection(&client).await;
    let _: i64 = redis::cmd("PUBLISH")
        .arg("stall:news")
        .arg("before")
        .query_async(&mut publisher)
        .await
        .unwrap();

    // A browser's stream and a Redis subscriber, both live.
    let response = reqwest::get(format!("{}/api/stream/stall:news?last=1", node.http_url()))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut sse = Box::pin(response.bytes_stream().eventsource());
    let first = tokio::time::timeout(PATIENCE, sse.next())
        .await
        .expect("the retained event in time")
        .expect("stream open")
        .expect("well-formed SSE");
    assert_eq!(first.data, "before");
    let mut subscriber = client.get_async_pubsub().await.unwrap();
    subscriber.subscribe("stall:news").await.unwrap();

    // The disk stops: the next publish's write waits, and so does the node.
    let stalled = disk.stall();
    let mut stuck = patient_connection(&client).await;
    let stuck_publish = tokio::spawn(async move {
        redis::cmd("PUBLISH")
            .arg("stall:news")
            .arg("during")
            .query_async::<i64>(&mut stuck)
            .await
    });

    // Past the timeout every connection ends: the stream, the subscription and the publish
    // that waited (its outcome unknown to the client, who retries elsewhere).
    let ended = tokio::time::timeout(PATIENCE, async {
        while let Some(event) = sse.next().await {
            if event.is_err() {
                break;
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the SSE stream was not closed");
    let message = tokio::time::timeout(PATIENCE, subscriber.on_message().next())
        .await
        .expect("the subscription was not closed");
    assert!(message.is_none(), "a message came instead: {message:?}");
    let outcome = tokio::time::timeout(PATIENCE, stuck_publish)
        .await
        .expect("the waiting publish was not answered or closed")
        .unwrap();
    assert!(outcome.is_err(), "the publish succeeded: {outcome:?}");
    wait_until("the node says why it stops", || {
        node.log().contains("the disk has not answered a")
    });
    assert!(
        std::net::TcpStream::connect_timeout(&node.resp, Duration::from_secs(10)).is_err(),
        "the RESP listener still takes connections"
    );

    // Once the disk answers again, the process ends with the watchdog's status.
    drop(stalled);
    let status = node.wait_exit(PATIENCE).expect("the node exited");
    assert_eq!(status.code(), Some(75), "{}\n{}", status, node.log());

    // Restarted by its supervisor, it has every acknowledged event, once.
    drop(node.kill_keeping_data());
    let node = Herald::start_in(data_dir, &[], &[]);
    let history = history_payloads(&node, "stall:news").await;
    assert_eq!(
        history.first().map(String::as_str),
        Some("before"),
        "{history:?}"
    );
    assert!(
        history == ["before"] || history == ["before", "during"],
        "{history:?}"
    );
    drop(node);
    drop(disk);
}

/// Publishes `{"n": n}` on `channel` through `node` with message id `m-n`, retrying (same id)
/// until it is acknowledged: the node's partition may be electing a new leader.
async fn publish_until_acknowledged(node: &Herald, channel: &str, n: u32) {
    let body = serde_json::json!({ "channel": channel, "data": { "n": n }, "messageId": format!("m-{n}") });
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let response = reqwest::Client::new()
            .post(format!("{}/api/publish", node.http_url()))
            .json(&body)
            .send()
            .await;
        if response.is_ok_and(|r| r.status() == 200) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "publish {n} never acknowledged"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What a stream delivered: each event's `n` and id, in order, until it ends or `want` came.
async fn read_events(
    events: &mut (
             impl futures::Stream<Item = Result<eventsource_stream::Event, impl std::fmt::Debug>> + Unpin
         ),
    got: &mut Vec<(u32, String)>,
    want: usize,
) {
    while got.len() < want {
        let Ok(next) = tokio::time::timeout(PATIENCE, events.next()).await else {
            panic!("no event or end in time; got {got:?}");
        };
        match next {
            Some(Ok(event)) if event.event == "message" => {
                let data: serde_json::Value = serde_json::from_str(&event.data).unwrap();
                got.push((data["n"].as_u64().unwrap() as u32, event.id));
            }
            Some(Ok(_)) => {} // a reconnect notice: the end follows
            Some(Err(_)) | None => return,
        }
    }
}

/// A cluster member whose disk stalls: the others carry on, its streaming clients' connections
/// end, and they resume on another member with their `Last-Event-ID`, missing nothing and
/// seeing nothing twice; the node exits 75 and, started again, catches up.
#[tokio::test]
async fn a_cluster_member_whose_disk_stalls_lets_its_streams_resume_on_the_others() {
    let Some(disk) = StalledDisk::mount() else {
        return;
    };
    let mut cluster = herald_tests::cluster::Cluster::start_each_in(
        3,
        &[(3, &["--disk-stall-timeout", "5s"])],
        &[(3, disk.mount.join("data"))],
    );
    let channel = "stall:orders";
    for n in 0..5 {
        publish_until_acknowledged(cluster.node(1), channel, n).await;
    }
    let response = reqwest::get(format!(
        "{}/api/stream/{channel}?last=100",
        cluster.node(3).http_url()
    ))
    .await
    .unwrap();
    assert_eq!(response.status(), 200);
    let mut on_three = Box::pin(response.bytes_stream().eventsource());
    let mut got = Vec::new();
    read_events(&mut on_three, &mut got, 5).await;

    let stalled = disk.stall();
    for n in 5..25 {
        publish_until_acknowledged(cluster.node(1), channel, n).await;
    }
    // Node 3's stream ends (past the 5 s limit) with whatever it delivered before.
    read_events(&mut on_three, &mut got, usize::MAX).await;
    let last_id = got.last().unwrap().1.clone();
    let response = reqwest::Client::new()
        .get(format!(
            "{}/api/stream/{channel}",
            cluster.node(2).http_url()
        ))
        .header("Last-Event-ID", &last_id)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut on_two = Box::pin(response.bytes_stream().eventsource());
    read_events(&mut on_two, &mut got, 25).await;
    let numbers: Vec<u32> = got.iter().map(|(n, _)| *n).collect();
    assert_eq!(
        numbers,
        (0..25).collect::<Vec<_>>(),
        "every event once, in order"
    );

    drop(stalled);
    let status = cluster.members[2]
        .node
        .as_mut()
        .unwrap()
        .wait_exit(PATIENCE)
        .expect("node 3 exited once its disk answered");
    assert_eq!(status.code(), Some(75));
    cluster.kill(3);
    cluster.start_node(3, 3);
    herald_tests::eventually_equal(
        "node 3's history once it caught up",
        &(0..25)
            .map(|n| format!("{{\"n\":{n}}}"))
            .collect::<Vec<_>>(),
        || history_payloads(cluster.node(3), channel),
    )
    .await;
}

/// The commit latency a node reports covers the disk's sync: a publish held by a slow disk
/// shows in `herald_publish_commit_seconds` for as long as it waited. (A lone publish is
/// synced before the log's `enqueue` returns; the histogram counted only from there, so it
/// showed microseconds while clients waited on the disk.)
#[tokio::test]
async fn a_publish_held_by_a_slow_disk_shows_in_the_commit_latency() {
    let Some(disk) = StalledDisk::mount() else {
        return;
    };
    let node = Herald::start_in(disk.mount.join("data"), &[], &[]);
    let client = redis::Client::open(node.url()).unwrap();
    let mut publisher = patient_connection(&client).await;
    let commit_seconds = || async {
        let metrics = reqwest::get(format!("{}/metrics", node.http_url()))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        metrics
            .lines()
            .find_map(|line| line.strip_prefix("herald_publish_commit_seconds_sum "))
            .map_or(0.0, |sum| sum.trim().parse::<f64>().unwrap())
    };
    let before = commit_seconds().await;

    let stalled = disk.stall();
    let publish = tokio::spawn(async move {
        redis::cmd("PUBLISH")
            .arg("slow:news")
            .arg("held")
            .query_async::<i64>(&mut publisher)
            .await
    });
    // The disk answers again 1.5 s after the publish went out: it cannot have been committed
    // in less than about that.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    drop(stalled);
    tokio::time::timeout(PATIENCE, publish)
        .await
        .expect("the publish is answered once the disk is back")
        .unwrap()
        .expect("the publish succeeds");

    let waited = commit_seconds().await - before;
    assert!(
        waited >= 1.0,
        "the commit latency shows {waited:.6} s for a publish the disk held 1.5 s"
    );
}
