//! A 3-node cluster of real processes on loopback, formed by `--bootstrap-expect`: publish on
//! one node and receive on the others over SSE, WebSocket and RESP; `kill -9` a partition
//! leader in the middle of a publish stream with message ids and resume on another node with
//! nothing lost, nothing duplicated, order kept; restart and catch-up; a minority node that
//! refuses durable publishes.

use eventsource_stream::Eventsource;
use futures::{SinkExt, Stream, StreamExt};
use herald_tests::cluster::Cluster;
use herald_tests::{PATIENCE, eventually_equal, history_payloads};
use redis::AsyncCommands;
use serde_json::{Value, json};
use std::pin::Pin;
use std::time::Duration;
use tokio_tungstenite::connect_async;
use tokio_tungstenite::tungstenite::Message;

type Events = Pin<Box<dyn Stream<Item = eventsource_stream::Event> + Send>>;

async fn sse(http: std::net::SocketAddr, channel: &str, last_event_id: Option<&str>) -> Events {
    let mut request = reqwest::Client::new().get(format!("http://{http}/api/stream/{channel}"));
    if let Some(id) = last_event_id {
        request = request.header("Last-Event-ID", id);
    }
    let response = request.send().await.expect("SSE request");
    assert_eq!(response.status(), 200);
    Box::pin(
        response
            .bytes_stream()
            .eventsource()
            .map(|e| e.expect("well-formed SSE")),
    )
}

/// The next `message` event (skipping other kinds such as comments).
async fn next_message(events: &mut Events) -> eventsource_stream::Event {
    loop {
        let event = tokio::time::timeout(PATIENCE, events.next())
            .await
            .expect("an event in time")
            .expect("stream open");
        if event.event == "message" {
            return event;
        }
    }
}

/// The next event that is not a `message` (the `reconnect` a stream ends with).
async fn next_non_message(events: &mut Events) -> eventsource_stream::Event {
    loop {
        let event = tokio::time::timeout(PATIENCE, events.next())
            .await
            .expect("a reconnect event in time")
            .expect("the stream ends only after the reconnect event");
        if event.event != "message" {
            return event;
        }
    }
}

/// The `n` field of the next `count` message events.
async fn read_n(events: &mut Events, count: usize) -> Vec<i64> {
    let mut values = Vec::with_capacity(count);
    while values.len() < count {
        let event = next_message(events).await;
        let data: Value = serde_json::from_str(&event.data).unwrap();
        values.push(data["n"].as_i64().expect("an event with an n"));
    }
    values
}

/// The partition of a publish reply's `position` (`PARTITION-SEQ`).
/// Sends node `id` SIGTERM and waits for it to exit with success (its process is kept, with
/// its log).
fn stop_with_sigterm(cluster: &mut Cluster, id: u64) {
    cluster.node(id).signal("TERM");
    let status = cluster.members[(id - 1) as usize]
        .node
        .as_mut()
        .unwrap()
        .wait_exit(PATIENCE)
        .unwrap_or_else(|| panic!("node {id} exits after SIGTERM"));
    assert!(status.success(), "{status:?}");
}

fn partition_of_reply(reply: &Value) -> u16 {
    let position = reply["position"].as_str().expect("a position");
    let (partition, _) = position.split_once('-').expect("PARTITION-SEQ");
    partition.parse().expect("a partition number")
}

/// The `/metrics` text of the node serving HTTP at `http`.
async fn metrics_of(http: std::net::SocketAddr) -> String {
    reqwest::get(format!("http://{http}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The node's `herald_transient_relay_events_total` for `outcome` (0 before it is first set).
async fn relay_count(http: std::net::SocketAddr, outcome: &str) -> u64 {
    let metrics = metrics_of(http).await;
    let series = format!("herald_transient_relay_events_total{{outcome=\"{outcome}\"}} ");
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(&series))
        .map_or(0, |n| n.trim().parse().expect("a count"))
}

/// Waits until the node's relay count for `outcome` reaches `n` (the peer's answer comes after
/// its subscribers have the events).
async fn wait_for_relay_count(http: std::net::SocketAddr, outcome: &str, n: u64) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let count = relay_count(http, outcome).await;
        if count == n {
            return;
        }
        assert!(
            count < n && tokio::time::Instant::now() < deadline,
            "{outcome}: {count}, expected {n}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One HTTP publish attempt: `Ok(reply)` on 200, `Err(text)` otherwise.
async fn try_publish(http: std::net::SocketAddr, body: &Value) -> Result<Value, String> {
    let response = reqwest::Client::new()
        .post(format!("http://{http}/api/publish"))
        .json(body)
        .timeout(Duration::from_secs(20))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status();
    let text = response.text().await.map_err(|e| e.to_string())?;
    if status == 200 {
        serde_json::from_str(&text).map_err(|e| e.to_string())
    } else {
        Err(format!("{status}: {text}"))
    }
}

/// `herald cluster status` names this node's build and every peer's (what `herald --version`
/// prints after the name): which nodes a rolling upgrade has reached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_status_names_every_members_build() {
    let cluster = Cluster::start(3);
    let version = std::process::Command::new(herald_tests::herald_binary())
        .arg("--version")
        .output()
        .unwrap()
        .stdout;
    let build = String::from_utf8(version)
        .unwrap()
        .trim_end()
        .strip_prefix("herald ")
        .unwrap()
        .to_string();
    for id in 1..=3u64 {
        let want: Vec<String> = vec![build.clone(); 3];
        herald_tests::eventually_equal(
            &format!("node {id}'s status names every member's build"),
            &want,
            || async {
                let status = cluster.status(id).expect("status");
                (1..=3u64)
                    .map(|peer| {
                        let build = if peer == id {
                            &status["build"]
                        } else {
                            &status["links"][peer.to_string()]["build"]
                        };
                        build.as_str().unwrap_or("none").to_string()
                    })
                    .collect::<Vec<_>>()
            },
        )
        .await;
    }
    let (ok, table) = cluster.cli(1, &["status"]);
    assert!(ok, "{table}");
    assert!(
        table
            .lines()
            .next()
            .unwrap()
            .ends_with(&format!("build: {build}")),
        "{table}"
    );
    assert!(!table.contains("BUILD"), "one build everywhere:\n{table}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_on_one_node_reaches_subscribers_on_the_others() {
    let cluster = Cluster::start(3);
    let (a, b, c) = (cluster.node(1), cluster.node(2), cluster.node(3));

    let mut events = sse(b.http, "job_progress:j1", None).await;
    let (mut ws, _) = connect_async(format!("ws://{}/ws?userId=u1", c.http))
        .await
        .expect("WebSocket handshake");
    ws.send(Message::text(
        json!({ "type": "subscribe", "channel": "job_progress:j1" }).to_string(),
    ))
    .await
    .unwrap();
    let mut pubsub = redis::Client::open(c.url())
        .unwrap()
        .get_async_pubsub()
        .await
        .unwrap();
    pubsub.subscribe("job_progress:j1").await.unwrap();
    let mut ws_messages = Vec::new();
    // Wait for the WebSocket subscription to be confirmed before publishing.
    while ws_messages.is_empty() {
        let message = tokio::time::timeout(PATIENCE, ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if let Message::Text(text) = message {
            let value: Value = serde_json::from_str(&text).unwrap();
            if value["type"] == "subscribed" {
                ws_messages.push(value);
            }
        }
    }

    // Two publishes over HTTP on A, one over RESP on A.
    for step in 0..2 {
        let reply = try_publish(
            a.http,
            &json!({ "channel": "job_progress:j1", "data": { "step": step } }),
        )
        .await
        .expect("publish on A");
        assert_eq!(reply["durable"], true);
    }
    let mut publisher =
        herald_tests::patient_connection(&redis::Client::open(a.url()).unwrap()).await;
    let _: i64 = publisher
        .publish("job_progress:j1", r#"{"step":2}"#)
        .await
        .unwrap();

    for step in 0..3 {
        let event = next_message(&mut events).await;
        let data: Value = serde_json::from_str(&event.data).unwrap();
        assert_eq!(data, json!({ "step": step }), "SSE on B, in order");
        assert!(!event.id.is_empty());
    }
    let mut stream = pubsub.on_message();
    for step in 0..3 {
        let message = tokio::time::timeout(PATIENCE, stream.next())
            .await
            .unwrap()
            .unwrap();
        let payload: String = message.get_payload().unwrap();
        let data: Value = serde_json::from_str(&payload).unwrap();
        assert_eq!(data, json!({ "step": step }), "RESP on C, in order");
    }
    let mut step = 0;
    while step < 3 {
        let message = tokio::time::timeout(PATIENCE, ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let Message::Text(text) = message else {
            continue;
        };
        let value: Value = serde_json::from_str(&text).unwrap();
        if value["channel"] == "job_progress:j1" && value.get("step").is_some() {
            assert_eq!(value["step"], step, "WebSocket on C, in order: {value}");
            step += 1;
        }
    }

    // An event too big for one node-to-node message is refused before it is proposed, on
    // every node (a leader that appended it could never replicate it, and its partition would
    // stall); the channel keeps working.
    for node in [a, b, c] {
        let mut conn =
            herald_tests::patient_connection(&redis::Client::open(node.url()).unwrap()).await;
        let refused: redis::RedisResult<i64> =
            conn.publish("job_progress:j1", vec![b'x'; 33 << 20]).await;
        let error = refused.unwrap_err().to_string();
        assert!(
            error.contains("over a cluster's limit of 33554432 bytes per event"),
            "{error}"
        );
    }
    let _: i64 = publisher
        .publish("job_progress:j1", r#"{"step":3}"#)
        .await
        .unwrap();
    let event = next_message(&mut events).await;
    assert_eq!(event.data, r#"{"step":3}"#);

    // Prometheus sees the cluster: quorum, and each group's term and leader.
    let metrics = metrics_of(b.http).await;
    for line in [
        "herald_ready 1",
        "herald_storage_failed 0",
        "herald_raft_group_stopped 0",
        "herald_cluster_has_quorum 1",
        "herald_cluster_members 3",
        "herald_clock_correction_ms 0",
        "herald_raft_term{group=\"0\"}",
        "herald_raft_leader{group=\"1\"}",
        "herald_raft_elections_called_total{group=\"0\"}",
        "herald_peer_rtt_seconds{peer=",
        "herald_peer_datagrams_total{peer=",
        "direction=\"sent\"}",
        "herald_peer_lost_packets_total{peer=",
    ] {
        assert!(metrics.contains(line), "{line} missing from:\n{metrics}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_partition_leader_loses_and_duplicates_nothing() {
    // Below the default history size (100), so every event stays retained for the resumes.
    const TOTAL: usize = 90;
    let mut cluster = Cluster::start(3);
    let channel = "orders:failover";
    let first = try_publish(
        cluster.node(1).http,
        &json!({ "channel": channel, "data": { "n": -1 }, "messageId": "start" }),
    )
    .await
    .expect("first publish");
    let cursor = first["id"].as_str().unwrap().to_string();
    let partition = partition_of_reply(&first);
    let leader = cluster.leader_of(1, partition).expect("a leader");
    let survivors: Vec<u64> = cluster
        .running()
        .into_iter()
        .filter(|&id| id != leader)
        .collect();
    let watcher = survivors[0];
    // A live subscriber on a node that survives, from the first event on.
    let mut live = sse(cluster.node(watcher).http, channel, Some(&cursor)).await;

    let https: Vec<(u64, std::net::SocketAddr)> = cluster
        .running()
        .iter()
        .map(|&id| (id, cluster.node(id).http))
        .collect();
    let publisher = {
        let survivors = survivors.clone();
        tokio::spawn(async move {
            let mut retries = 0usize;
            let mut duplicates = 0usize;
            for n in 0..TOTAL {
                let body =
                    json!({ "channel": channel, "data": { "n": n }, "messageId": format!("m{n}") });
                let mut attempt = 0usize;
                loop {
                    // Spread publishes over all nodes; after a failure use the survivors only.
                    let (_, http) = if attempt == 0 {
                        https[n % https.len()]
                    } else {
                        let id = survivors[attempt % survivors.len()];
                        *https.iter().find(|(i, _)| *i == id).unwrap()
                    };
                    match try_publish(http, &body).await {
                        Ok(reply) => {
                            if reply["duplicate"] == true {
                                duplicates += 1;
                            }
                            break;
                        }
                        Err(_) => {
                            attempt += 1;
                            retries += 1;
                            assert!(attempt < 200, "publish {n} never succeeded");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (retries, duplicates)
        })
    };
    // Kill the leader once the stream is under way.
    let mut seen = read_n(&mut live, 30).await;
    cluster.kill(leader);
    let (retries, duplicates) = publisher.await.unwrap();
    eprintln!(
        "killed node {leader} (leader of partition {partition}); {retries} retries, {duplicates} duplicate replies"
    );

    // The live subscriber on a survivor: every event once, in order.
    seen.extend(read_n(&mut live, TOTAL - seen.len()).await);
    assert_eq!(
        seen,
        (0..TOTAL as i64).collect::<Vec<_>>(),
        "live stream on node {watcher}"
    );

    // A client of the dead node resumes on the other survivor with its cursor.
    let other = *survivors.last().unwrap();
    let mut resumed = sse(cluster.node(other).http, channel, Some(&cursor)).await;
    let got = read_n(&mut resumed, TOTAL).await;
    assert_eq!(
        got,
        (0..TOTAL as i64).collect::<Vec<_>>(),
        "resumed on node {other}"
    );

    // The killed node restarts on its data, catches up, and serves the same history.
    cluster.start_node(leader, 3);
    cluster.wait_converged();
    let mut restarted = sse(cluster.node(leader).http, channel, Some(&cursor)).await;
    let again = read_n(&mut restarted, TOTAL).await;
    assert_eq!(
        again,
        (0..TOTAL as i64).collect::<Vec<_>>(),
        "restarted node {leader}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cut_off_from_the_majority_refuses_durable_publishes() {
    let config =
        herald_tests::config_file("[namespace.cursor]\nhistory_size = 0\ndurable = false\n");
    let mut cluster = Cluster::start_with(
        3,
        &[
            "--publish-timeout",
            "2s",
            "--config",
            config.to_str().unwrap(),
        ],
    );
    let lone = cluster.node(1).http;
    // Streaming clients of the node that will be cut off.
    let mut events = sse(lone, "orders:1", None).await;
    let (mut ws, _) = connect_async(format!("ws://{lone}/ws?userId=u1"))
        .await
        .expect("WebSocket handshake");
    let mut subscriber = herald_tests::RawConn::connect(cluster.node(1).resp);
    subscriber.command(&[b"SUBSCRIBE", b"orders:1"]);
    subscriber.read_until_suffix(b":1\r\n");
    // A channel whose partition another node leads: node 1 only forwards its publishes.
    let mut forwarded = None;
    for k in 0..64 {
        let channel = format!("orders:f{k}");
        let reply = try_publish(lone, &json!({ "channel": channel, "data": 0 }))
            .await
            .expect("publish while the cluster is whole");
        if cluster.leader_of(1, partition_of_reply(&reply)) != Some(1) {
            forwarded = Some(channel);
            break;
        }
    }
    let forwarded = forwarded.expect("node 1 does not lead every partition");
    cluster.kill(2);
    cluster.kill(3);
    let error = try_publish(lone, &json!({ "channel": "orders:1", "data": 1 }))
        .await
        .expect_err("a minority node must not acknowledge");
    assert!(error.starts_with("503"), "{error}");
    assert!(
        error.contains("quorum") || error.contains("leader"),
        "the error says why: {error}"
    );
    // Where node 1 never proposed, the failure is certain: safe to retry without a message id.
    let error = try_publish(lone, &json!({ "channel": forwarded, "data": 1 }))
        .await
        .expect_err("a minority node must not acknowledge");
    assert!(error.starts_with("503"), "{error}");
    assert!(error.contains("nothing was committed"), "{error}");
    // A batch that fails in part says which events went out (a non-durable one is delivered
    // on this node), so that a retry resends only the failed ones.
    let batch = json!([
        { "channel": "cursor:doc", "data": 1 },
        { "channel": forwarded, "data": 2 },
    ]);
    let error = try_publish(lone, &batch)
        .await
        .expect_err("the durable half cannot commit");
    let body = error
        .strip_prefix("503 Service Unavailable: ")
        .unwrap_or_else(|| panic!("a 503 with a body: {error}"));
    let body: Value = serde_json::from_str(body).expect("a JSON body");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .starts_with("1 of 2 events failed"),
        "{body}"
    );
    let results = body["results"].as_array().expect("results");
    assert_eq!(results.len(), 2, "{body}");
    assert_eq!(results[0]["durable"], json!(false), "{body}");
    assert!(results[0].get("error").is_none(), "{body}");
    assert_eq!(results[1]["channel"], json!(forwarded), "{body}");
    assert!(
        results[1]["error"]
            .as_str()
            .unwrap()
            .contains("nothing was committed"),
        "{body}"
    );
    // Its status says why: the other two cannot be reached.
    herald_tests::wait_until(
        "the lone node's status shows both peers unreachable",
        || {
            let (ok, table) = cluster.cli(1, &["status"]);
            ok && table
                .lines()
                .any(|l| l.starts_with("  2  ") && l.contains("UNREACHABLE ("))
                && table
                    .lines()
                    .any(|l| l.starts_with("  3  ") && l.contains("UNREACHABLE ("))
        },
    );
    // Not ready: load balancers move clients elsewhere.
    herald_tests::wait_until("the lone node reports not ready", || {
        let mut stream = std::net::TcpStream::connect(lone).unwrap();
        use std::io::{Read, Write};
        write!(stream, "GET /ready HTTP/1.0\r\n\r\n").unwrap();
        let mut text = String::new();
        stream.read_to_string(&mut text).unwrap();
        let refused = text.starts_with("HTTP/1.0 503") || text.starts_with("HTTP/1.1 503");
        // It says which group cannot commit and why, not only that it cannot.
        if refused {
            assert!(
                text.contains("\"status\":\"no quorum: ")
                    && (text.contains("partition ")
                        || text.contains("the meta group")
                        || text.contains("no majority of the cluster's members"))
                    && text.contains("; durable publishes cannot commit on this node"),
                "{text}"
            );
        }
        refused
    });
    // Its streams are told to resume elsewhere: SSE gets `event: reconnect` and ends, the
    // WebSocket is closed with 1012.
    let reconnect = next_non_message(&mut events).await;
    assert_eq!(reconnect.event, "reconnect", "{reconnect:?}");
    assert!(reconnect.data.contains("quorum"), "{}", reconnect.data);
    let end = tokio::time::timeout(PATIENCE, events.next())
        .await
        .expect("the stream ends");
    assert!(end.is_none(), "nothing after the reconnect event: {end:?}");
    let close = loop {
        let message = tokio::time::timeout(PATIENCE, ws.next())
            .await
            .expect("a close frame in time")
            .expect("connection open until the close frame")
            .expect("no WebSocket error");
        if let Message::Close(frame) = message {
            break frame.expect("a close code");
        }
    };
    assert_eq!(u16::from(close.code), 1012, "{close:?}");
    // A RESP subscriber is told why and disconnected, so that it resubscribes elsewhere.
    let rest = tokio::task::spawn_blocking(move || subscriber.read_to_close())
        .await
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&rest),
        "-ERR this node lost its cluster quorum: reconnect to another node (HSUBSCRIBE resumes from your cursor)\r\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_durable_events_and_pubsub_counts_span_the_cluster() {
    let config = herald_tests::config_file(
        "[namespace.cursor]\nhistory_size = 0\ndurable = false\n\
         [namespace.quiet]\nhistory_size = 0\ndurable = false\n",
    );
    let cluster = Cluster::start_with(3, &["--config", config.to_str().unwrap()]);
    let (a, b, c) = (cluster.node(1), cluster.node(2), cluster.node(3));

    // Subscribers on B (exact channel) and C (pattern).
    let mut on_b = redis::Client::open(b.url())
        .unwrap()
        .get_async_pubsub()
        .await
        .unwrap();
    on_b.subscribe("cursor:doc1").await.unwrap();
    let mut on_c = redis::Client::open(c.url())
        .unwrap()
        .get_async_pubsub()
        .await
        .unwrap();
    on_c.psubscribe("cursor:*").await.unwrap();

    // Node A learns of them through the interest exchange.
    let mut conn = herald_tests::patient_connection(&redis::Client::open(a.url()).unwrap()).await;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let numsub: (String, i64) = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg("cursor:doc1")
            .query_async(&mut conn)
            .await
            .unwrap();
        let numpat: i64 = redis::cmd("PUBSUB")
            .arg("NUMPAT")
            .query_async(&mut conn)
            .await
            .unwrap();
        if numsub.1 == 1 && numpat == 1 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "A never saw the remote subscriptions"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let channels: Vec<String> = redis::cmd("PUBSUB")
        .arg("CHANNELS")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(channels, vec!["cursor:doc1".to_string()]);

    // A non-durable publish on A reaches both remote subscribers; the reply counts them.
    let receivers: i64 = conn.publish("cursor:doc1", "x=1").await.unwrap();
    assert_eq!(
        receivers, 2,
        "one exact subscriber on B, one pattern subscriber on C"
    );
    let message = tokio::time::timeout(PATIENCE, on_b.on_message().next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(message.get_payload::<String>().unwrap(), "x=1");
    let message = tokio::time::timeout(PATIENCE, on_c.on_message().next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(message.get_channel_name(), "cursor:doc1");
    assert_eq!(message.get_payload::<String>().unwrap(), "x=1");
    // A queued the event once for each of B and C; each acknowledged it.
    assert_eq!(relay_count(a.http, "queued").await, 2);
    wait_for_relay_count(a.http, "sent", 2).await;
    assert_eq!(relay_count(b.http, "received").await, 1);
    assert_eq!(relay_count(c.http, "received").await, 1);

    // Only nodes with interest get an event: one nobody wants stays on A...
    let receivers: i64 = conn.publish("quiet:x", "x=2").await.unwrap();
    assert_eq!(receivers, 0);
    assert_eq!(relay_count(a.http, "queued").await, 2, "sent to nobody");
    // ...and one only C's pattern wants goes from B to C, not to A.
    let mut on_b_conn =
        herald_tests::patient_connection(&redis::Client::open(b.url()).unwrap()).await;
    let receivers: i64 = on_b_conn.publish("cursor:doc2", "x=3").await.unwrap();
    assert_eq!(receivers, 1, "C's pattern subscriber");
    let message = tokio::time::timeout(PATIENCE, on_c.on_message().next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(message.get_channel_name(), "cursor:doc2");
    assert_eq!(relay_count(b.http, "queued").await, 1, "to C alone");
    assert_eq!(relay_count(c.http, "received").await, 2);
    assert_eq!(relay_count(a.http, "received").await, 0);
    for node in [a, b, c] {
        for outcome in ["dropped", "failed"] {
            assert_eq!(relay_count(node.http, outcome).await, 0, "{outcome}");
        }
    }

    // The stats count the whole cluster.
    let stats: Value = reqwest::get(format!("{}/api/realtime/stats", a.http_url()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stats["cluster"]["nodes"], 3, "{stats}");
    // Node A has no subscriber of its own: the channel and its one exact subscription are B's.
    assert_eq!(stats["channels"]["activeChannels"], 1, "{stats}");
    assert_eq!(stats["channels"]["totalSubscriptions"], 1, "{stats}");
    assert!(
        stats["cluster"]["totalConnections"]["resp"]
            .as_u64()
            .unwrap()
            >= 3,
        "{stats}"
    );
}

/// The next WebSocket text message, as JSON.
async fn next_ws_json(
    ws: &mut tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
) -> Value {
    loop {
        let message = tokio::time::timeout(PATIENCE, ws.next())
            .await
            .expect("a WebSocket message in time")
            .expect("WebSocket open")
            .expect("WebSocket message");
        if let Message::Text(text) = message {
            return serde_json::from_str(&text).expect("JSON");
        }
    }
}

/// Rounds per way of subscribing in the tests below: every one must hold, not most.
const RACE_ROUNDS: usize = 20;

/// A 3-node cluster where `cursor:*` and `alerts:*` are non-durable, with a RESP connection
/// to node 1 to publish through.
async fn race_cluster() -> (Cluster, redis::aio::MultiplexedConnection) {
    let config = herald_tests::config_file(
        "[namespace.cursor]\nhistory_size = 0\ndurable = false\n\n[namespace.alerts]\nhistory_size = 0\ndurable = false\n",
    );
    let cluster = Cluster::start_with(3, &["--config", config.to_str().unwrap()]);
    let client = redis::Client::open(cluster.node(1).url()).unwrap();
    let publisher = herald_tests::patient_connection(&client).await;
    (cluster, publisher)
}

/// Redis's promise: once a subscription is confirmed, every later publish reaches it and counts
/// it. In a cluster the confirmation comes once the other nodes know of the subscription, so a
/// publish on another node right after it is neither lost (non-durable namespace) nor counted
/// as reaching nobody (durable or not). Here over RESP: `SUBSCRIBE` (non-durable and durable
/// channels), `PSUBSCRIBE`, `SSUBSCRIBE` on node 2, publishes on node 1. Every round on a fresh
/// channel, so each one adds interest node 2 did not have.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_right_after_a_confirmed_resp_subscribe_on_another_node_reaches_it() {
    let (cluster, mut publisher) = race_cluster().await;
    let b = cluster.node(2);
    // RESP SUBSCRIBE on B, PUBLISH on A: non-durable, then durable channels.
    let mut on_b = redis::Client::open(b.url())
        .unwrap()
        .get_async_pubsub()
        .await
        .unwrap();
    for (namespace, rounds) in [("cursor", RACE_ROUNDS), ("orders", RACE_ROUNDS / 2)] {
        for round in 0..rounds {
            let channel = format!("{namespace}:resp-race-{round}");
            on_b.subscribe(&channel).await.unwrap();
            let receivers: i64 = publisher.publish(&channel, round).await.unwrap();
            assert_eq!(
                receivers, 1,
                "PUBLISH {channel} right after B confirmed SUBSCRIBE"
            );
            let message = tokio::time::timeout(PATIENCE, on_b.on_message().next())
                .await
                .unwrap_or_else(|_| panic!("{channel}: the publish never reached B"))
                .unwrap();
            assert_eq!(message.get_channel_name(), channel);
            assert_eq!(message.get_payload::<usize>().unwrap(), round);
        }
    }

    // PSUBSCRIBE on B.
    for round in 0..RACE_ROUNDS / 4 {
        let pattern = format!("cursor:pattern-race-{round}:*");
        let channel = format!("cursor:pattern-race-{round}:x");
        on_b.psubscribe(&pattern).await.unwrap();
        let receivers: i64 = publisher.publish(&channel, round).await.unwrap();
        assert_eq!(
            receivers, 1,
            "PUBLISH {channel} right after B confirmed PSUBSCRIBE"
        );
        let message = tokio::time::timeout(PATIENCE, on_b.on_message().next())
            .await
            .unwrap_or_else(|_| panic!("{channel}: the publish never reached B"))
            .unwrap();
        assert_eq!(message.get_channel_name(), channel);
    }
    drop(on_b);

    // SSUBSCRIBE on B (raw: the redis crate has no async SSUBSCRIBE), SPUBLISH on A.
    let mut raw = herald_tests::RawConn::connect(b.resp);
    for round in 0..RACE_ROUNDS / 4 {
        let channel = format!("shard-race-{round}");
        raw.command(&[b"SSUBSCRIBE", channel.as_bytes()]);
        let confirmation = raw.read_frame();
        assert!(
            confirmation.windows(10).any(|w| w == b"ssubscribe"),
            "{}",
            String::from_utf8_lossy(&confirmation)
        );
        let receivers: i64 = redis::cmd("SPUBLISH")
            .arg(&channel)
            .arg(round)
            .query_async(&mut publisher)
            .await
            .unwrap();
        assert_eq!(
            receivers, 1,
            "SPUBLISH {channel} right after B confirmed SSUBSCRIBE"
        );
        let message = raw.read_frame();
        assert!(
            message.windows(8).any(|w| w == b"smessage"),
            "{}",
            String::from_utf8_lossy(&message)
        );
    }
    drop(raw);
}

/// A node that has just restarted knows no other node's interest until they push theirs (every
/// 3 s): its non-durable publishes meanwhile went to no other node, and the subscribers there,
/// subscribed all along, missed them (`PUBLISH` answered 0). Now they go to every member whose
/// interest it does not know yet, and the members push theirs as soon as it connects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_sends_its_first_non_durable_publishes_to_the_other_nodes() {
    let (mut cluster, _) = race_cluster().await;
    let mut on_b = redis::Client::open(cluster.node(2).url())
        .unwrap()
        .get_async_pubsub()
        .await
        .unwrap();
    on_b.subscribe("cursor:restart").await.unwrap();
    for round in 0..3 {
        cluster.kill(1);
        cluster.start_node(1, 3);
        let client = redis::Client::open(cluster.node(1).url()).unwrap();
        let mut publisher = herald_tests::patient_connection(&client).await;
        let _: i64 = publisher.publish("cursor:restart", round).await.unwrap();
        let message = tokio::time::timeout(PATIENCE, on_b.on_message().next())
            .await
            .unwrap_or_else(|_| {
                panic!("round {round}: the first publish through the restarted node never reached node 2")
            })
            .unwrap();
        assert_eq!(message.get_payload::<i64>().unwrap(), round);
    }
}

/// The other way round: a node restarted a second after a `kill -9` takes a subscriber,
/// confirmed; the non-durable events published on another node right after reach it, every
/// one. (They went down the connection to the dead process, which QUIC finds dead only at its
/// idle timeout, and were lost: the first publish of each round, or a whole burst.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_of_a_node_restarted_after_kill_gets_every_event_published_elsewhere() {
    let (mut cluster, mut publisher) = race_cluster().await;
    for round in 0..3 {
        cluster.kill(2);
        cluster.start_node(2, 3);
        let mut on_b = redis::Client::open(cluster.node(2).url())
            .unwrap()
            .get_async_pubsub()
            .await
            .unwrap();
        let channel = format!("cursor:after-kill-{round}");
        on_b.subscribe(&channel).await.unwrap();
        for n in 0..5 {
            let receivers: i64 = publisher.publish(&channel, n).await.unwrap();
            assert_eq!(
                receivers, 1,
                "round {round}: PUBLISH {n} counted node 2's subscriber"
            );
        }
        let mut messages = on_b.on_message();
        for n in 0..5 {
            let message = tokio::time::timeout(PATIENCE, messages.next())
                .await
                .unwrap_or_else(|_| panic!("round {round}: event {n} never reached node 2"))
                .unwrap();
            assert_eq!(message.get_payload::<i64>().unwrap(), n, "round {round}");
        }
    }
}

/// As above, for an SSE stream on node 3: once its response head arrived (what
/// `EventSource.onopen` tells), an HTTP publish on node 1 reaches it and counts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_right_after_an_sse_stream_opened_on_another_node_reaches_it() {
    let (cluster, _) = race_cluster().await;
    let (a, c) = (cluster.node(1), cluster.node(3));
    // An SSE stream on C: once its response head arrived, an HTTP publish on A.
    for round in 0..RACE_ROUNDS {
        let channel = format!("cursor:sse-race-{round}");
        let mut events = sse(c.http, &channel, None).await;
        let reply = try_publish(
            a.http,
            &json!({ "channel": channel, "data": { "n": round } }),
        )
        .await
        .expect("publish on A");
        assert_eq!(reply["receivers"], 1, "{channel}: {reply}");
        let got = read_n(&mut events, 1).await;
        assert_eq!(got, vec![round as i64], "{channel}");
    }
}

/// As above, for a WebSocket `subscribe` on node 3 (once `subscribed` arrived) and
/// `/ws/alerts` on node 2 (once the handshake is done).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_right_after_a_websocket_subscribe_on_another_node_reaches_it() {
    let (cluster, mut publisher) = race_cluster().await;
    let (b, c) = (cluster.node(2), cluster.node(3));
    // A WebSocket `subscribe` on C: once `subscribed` arrived, PUBLISH on A.
    let (mut ws, _) = connect_async(format!("ws://{}/ws?userId=racer", c.http))
        .await
        .expect("WebSocket handshake");
    assert_eq!(next_ws_json(&mut ws).await["type"], "connected");
    for round in 0..RACE_ROUNDS {
        let channel = format!("cursor:ws-race-{round}");
        ws.send(Message::text(
            json!({ "type": "subscribe", "channel": channel }).to_string(),
        ))
        .await
        .unwrap();
        loop {
            let confirmation = next_ws_json(&mut ws).await;
            match confirmation["type"].as_str() {
                Some("heartbeat") => continue,
                Some("subscribed") => break,
                _ => panic!("{channel}: {confirmation}"),
            }
        }
        let payload = json!({ "n": round }).to_string();
        let receivers: i64 = publisher.publish(&channel, &payload).await.unwrap();
        assert_eq!(
            receivers, 1,
            "PUBLISH {channel} right after `subscribed` on C"
        );
        loop {
            let message = next_ws_json(&mut ws).await;
            if message["type"] != "heartbeat" {
                assert_eq!(message["channel"], channel.as_str(), "{message}");
                break;
            }
        }
    }
    drop(ws);

    // `/ws/alerts` on B: subscribed once the handshake is done.
    for round in 0..RACE_ROUNDS / 4 {
        let user = format!("alert-racer-{round}");
        let (mut ws, _) = connect_async(format!("ws://{}/ws/alerts?userId={user}", b.http))
            .await
            .expect("WebSocket handshake");
        let channel = format!("alerts:{user}");
        let receivers: i64 = publisher.publish(&channel, "{\"n\":1}").await.unwrap();
        assert_eq!(
            receivers, 1,
            "PUBLISH {channel} right after the /ws/alerts handshake"
        );
        loop {
            let message = next_ws_json(&mut ws).await;
            if message["channel"] == channel.as_str() {
                break;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_joins_catches_up_and_is_removed() {
    let mut cluster = Cluster::start_some(4, 3, &[]);
    let channel = "audit:join";
    let mut cursor = String::new();
    for n in 0..20 {
        let reply = try_publish(
            cluster.node(1 + n % 3).http,
            &json!({ "channel": channel, "data": { "n": n } }),
        )
        .await
        .expect("publish");
        if n == 0 {
            cursor = reply["id"].as_str().unwrap().to_string();
        }
    }

    // A join naming a node that never answers (a wrong address) makes it a member, but never
    // a voter of any group: a voter that cannot vote would cost the groups their tolerance
    // of one failure.
    let nowhere = format!("127.0.0.1:{}", herald_tests::cluster::free_udp_port());
    let (ok, text) = cluster.cli(1, &["join", "--node-id", "9", "--addr", &nowhere]);
    assert!(ok, "join failed: {text}");
    assert!(
        text.contains(&format!(
            "herald: warning: node 9 does not answer at {nowhere}"
        )) && text.contains("becomes a voter only once it answers"),
        "{text}"
    );
    // An address that cannot be one, and a member's address changed by a join, are refused.
    for nonsense in ["nonsense", "a:7000;b:7000"] {
        let (ok, text) = cluster.cli(1, &["join", "--node-id", "8", "--addr", nonsense]);
        assert!(!ok && text.contains("HOST:PORT"), "{nonsense}: {text}");
    }
    let (ok, text) = cluster.cli(1, &["join", "--node-id", "2", "--addr", "127.0.0.1:1"]);
    assert!(!ok && text.contains("already a member"), "{text}");

    // Node 4 starts, is joined by hand, and catches up on every partition.
    cluster.start_node(4, 3);
    let addr = format!("127.0.0.1:{}", cluster.members[3].cluster_port);
    let (ok, text) = cluster.cli(2, &["join", "--node-id", "4", "--addr", &addr]);
    assert!(ok && !text.contains("warning"), "join failed: {text}");
    cluster.wait_converged();
    let (ok, status) = cluster.cli(4, &["status"]);
    assert!(ok, "{status}");
    assert!(status.contains("formed: true"), "{status}");
    let mut events = sse(cluster.node(4).http, channel, Some(&cursor)).await;
    for n in 1..20 {
        let event = next_message(&mut events).await;
        let data: Value = serde_json::from_str(&event.data).unwrap();
        assert_eq!(data["n"], n, "node 4 serves the history it caught up on");
    }
    // ...and live events published elsewhere.
    try_publish(
        cluster.node(1).http,
        &json!({ "channel": channel, "data": { "n": 20 } }),
    )
    .await
    .expect("publish");
    let event = next_message(&mut events).await;
    assert_eq!(serde_json::from_str::<Value>(&event.data).unwrap()["n"], 20);
    // Node 4 takes its share: it becomes a voter where the placement over the members (1, 2,
    // 3, 4, 9) puts it (partitions 1, 2, 3), and leads partition 3, which it heads.
    herald_tests::wait_until(
        "node 4 votes in partitions 1-3 and leads partition 3",
        || {
            cluster.status(1).is_some_and(|s| {
                let groups = s["groups"].as_array().unwrap();
                let votes = |p: u64| {
                    groups.iter().any(|g| {
                        g["partition"] == p && g["voters"].as_array().unwrap().contains(&json!(4))
                    })
                };
                votes(1)
                    && votes(2)
                    && votes(3)
                    && groups
                        .iter()
                        .any(|g| g["partition"] == 3 && g["leader"] == 4)
            })
        },
    );
    let status = cluster.status(1).unwrap();
    for group in status["groups"].as_array().unwrap() {
        assert!(
            !group["voters"].as_array().unwrap().contains(&json!(9)),
            "node 9 never answered, yet votes: {group}"
        );
    }
    let (ok, text) = cluster.cli(1, &["remove", "--node-id", "9"]);
    assert!(ok, "remove of the node that never answered failed: {text}");

    // Removing node 3, which leads partitions and keeps running: the members stop hearing it,
    // elect leaders among themselves, and no group keeps it; the others go on committing.
    let status = cluster.status(3).unwrap();
    assert!(
        status["groups"]
            .as_array()
            .unwrap()
            .iter()
            .any(|g| g["leader"] == 3 && g["partition"].is_u64()),
        "node 3 leads a partition: {status}"
    );
    let (ok, text) = cluster.cli(1, &["remove", "--node-id", "3"]);
    assert!(ok, "remove failed: {text}");
    assert!(
        !text.contains("warning"),
        "three members left survive a failure: {text}"
    );
    herald_tests::wait_until("node 3 leaves every group", || {
        cluster.status(1).is_some_and(|s| {
            s["members"].get("3").is_none()
                && s["groups"].as_array().unwrap().iter().all(|g| {
                    !g["voters"].as_array().unwrap().contains(&json!(3))
                        && !g["learners"].as_array().unwrap().contains(&json!(3))
                        && g["leader"] != 3
                })
        })
    });
    try_publish(
        cluster.node(4).http,
        &json!({ "channel": channel, "data": { "n": 21 } }),
    )
    .await
    .expect("the remaining three still commit");

    // Node 3 still runs, but nothing it accepts is acknowledged: the members refuse its
    // forwards and its appends, so it cannot commit anything.
    let refused = try_publish(
        cluster.node(3).http,
        &json!({ "channel": channel, "data": { "n": -1 } }),
    )
    .await
    .expect_err("a removed node must not acknowledge publishes");
    assert!(refused.starts_with("5"), "{refused}");
    // ...and it says so to its probes and operators.
    herald_tests::wait_until("node 3's /ready says it was removed", || {
        herald_tests::cluster::get_json(cluster.node(3), "/ready").is_some_and(|r| {
            r["status"]
                .as_str()
                .is_some_and(|s| s.starts_with("removed from the cluster"))
        })
    });

    // No longer hearing leaders, it calls elections: the members must not hear them (no term
    // changes while it keeps trying).
    let terms = |cluster: &Cluster| -> Vec<u64> {
        cluster.status(1).unwrap()["groups"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| g["term"].as_u64().unwrap())
            .collect()
    };
    // First the members settle: every partition led by its first placed node among 1, 2, 4
    // (hand-backs and voter moves change terms; they must be over before terms are compared).
    herald_tests::wait_until("leadership settles on the placement", || {
        cluster.status(1).is_some_and(|s| {
            let groups = s["groups"].as_array().unwrap();
            [(0, 1), (1, 2), (2, 4), (3, 1)].iter().all(|&(p, leader)| {
                groups
                    .iter()
                    .any(|g| g["partition"] == p && g["leader"] == leader)
            })
        })
    });
    let before = terms(&cluster);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        terms(&cluster),
        before,
        "a removed node disturbed the groups"
    );
    try_publish(
        cluster.node(2).http,
        &json!({ "channel": channel, "data": { "n": 22 } }),
    )
    .await
    .expect("still committing");
    // The members' history has every acknowledged event once, in order, and nothing of what
    // the removed node was sent.
    let mut history = sse(cluster.node(1).http, channel, Some(&cursor)).await;
    assert_eq!(
        read_n(&mut history, 22).await,
        (1..=22).collect::<Vec<i64>>()
    );
}

/// The meta group's leader as node `id` sees it.
fn meta_leader(cluster: &Cluster, id: u64) -> Option<u64> {
    let status = cluster.status(id)?;
    status["groups"]
        .as_array()?
        .iter()
        .find(|g| g["group"] == 0)?["leader"]
        .as_u64()
}

/// Each group's leader, voters and learners as node `id` sees them, on one line.
fn group_summary(cluster: &Cluster, id: u64) -> String {
    let Some(status) = cluster.status(id) else {
        return "no status".into();
    };
    status["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| {
            format!(
                "[group {} leader {} voters {} learners {}]",
                g["group"], g["leader"], g["voters"], g["learners"]
            )
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Whether every running node but `removed` has dropped it from the membership and from each
/// group but those of `skip` (partitions), and sees a leader among themselves there.
fn removal_settled(cluster: &Cluster, removed: u64, skip: &[u64]) -> bool {
    let rest: Vec<u64> = cluster
        .running()
        .into_iter()
        .filter(|&id| id != removed)
        .collect();
    rest.iter().all(|&id| {
        cluster.status(id).is_some_and(|s| {
            s["members"].get(removed.to_string()).is_none()
                && s["groups"].as_array().unwrap().iter().all(|g| {
                    g["partition"].as_u64().is_some_and(|p| skip.contains(&p))
                        || (g["leader"].as_u64().is_some_and(|l| rest.contains(&l))
                            && !g["voters"].as_array().unwrap().contains(&json!(removed))
                            && !g["learners"].as_array().unwrap().contains(&json!(removed)))
                })
        })
    })
}

/// Waits until [`removal_settled`], showing every running node's groups if it never is.
fn wait_removal_settled(cluster: &Cluster, removed: u64, skip: &[u64]) {
    let deadline = std::time::Instant::now() + PATIENCE * 2;
    while !removal_settled(cluster, removed, skip) {
        if std::time::Instant::now() > deadline {
            let views: Vec<String> = cluster
                .running()
                .iter()
                .map(|&id| format!("node {id}: {}", group_summary(cluster, id)))
                .collect();
            panic!(
                "the others did not elect leaders among themselves and drop node {removed} (partitions {skip:?} aside):\n{}",
                views.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Publishes on channel after channel (`tag` and a count), through each of `via` in turn,
/// until each partition but those of `skip` has acknowledged one.
async fn publish_in_every_partition(cluster: &Cluster, via: &[u64], skip: &[u64], tag: &str) {
    let partitions = cluster.status(via[0]).unwrap()["groups"]
        .as_array()
        .unwrap()
        .len() as u64
        - 1;
    let mut missing: std::collections::BTreeSet<u64> =
        (0..partitions).filter(|p| !skip.contains(p)).collect();
    for n in 0..500 {
        let channel = format!("metarm:{n}");
        // Only a channel of a partition still missing, so that no publish waits on a stalled one.
        let partition = herald_storage::partition_of(channel.as_bytes(), partitions as u16);
        if !missing.contains(&u64::from(partition)) {
            continue;
        }
        let reply = publish_until_acked(cluster, via[n % via.len()], &channel, tag).await;
        missing.remove(&u64::from(partition_of_reply(&reply)));
        if missing.is_empty() {
            return;
        }
    }
    panic!("partitions {missing:?} never committed");
}

/// Removes the meta group's leader with `herald cluster remove`, asked through the leader
/// itself or through another running member, while node `dead` (if any) is down, and checks
/// what an operator relies on: the command succeeds; the remaining members elect a meta
/// leader among themselves, drop the removed node from every group and go on committing (the
/// meta group and the partitions); the removed node says in `/ready` that it was removed; and
/// no node panicked (tests run the debug build, where openraft's assertions hold).
///
/// A partition whose three voters included both the removed node and the dead one has a
/// single live voter left (the members refuse the removed node's messages): it commits again
/// once the dead node is back, which is checked last.
async fn remove_the_meta_leader(cluster: &mut Cluster, through_itself: bool, dead: Option<u64>) {
    if let Some(dead) = dead {
        cluster.kill(dead);
    }
    let running = cluster.running();
    let mut agreed = None;
    herald_tests::wait_until("the running members agree on a meta leader", || {
        let views: Vec<Option<u64>> = running.iter().map(|&id| meta_leader(cluster, id)).collect();
        agreed = views[0].filter(|l| running.contains(l) && views.iter().all(|v| *v == views[0]));
        agreed.is_some()
    });
    let leader = agreed.unwrap();
    let stalled: Vec<u64> = match dead {
        None => Vec::new(),
        Some(dead) => partition_voters(cluster, leader)
            .unwrap()
            .into_iter()
            .filter(|(_, voters)| voters.contains(&leader) && voters.contains(&dead))
            .map(|(partition, _)| partition)
            .collect(),
    };
    let via = if through_itself {
        leader
    } else {
        *running.iter().find(|&&id| id != leader).unwrap()
    };
    let mut remove = vec!["remove", "--node-id"];
    let leader_id = leader.to_string();
    remove.push(&leader_id);
    if let (Some(dead), false) = (dead, stalled.is_empty()) {
        // Refused while it would stall those partitions, saying which and why, once `via`
        // knows the dead node does not answer.
        herald_tests::wait_until(&format!("node {via} finds node {dead} unreachable"), || {
            cluster
                .status(via)
                .is_some_and(|s| s["links"][dead.to_string()]["state"] == "unreachable")
        });
        let (ok, text) = cluster.cli(via, &remove);
        assert!(
            !ok,
            "a removal that stalls partitions {stalled:?} went ahead: {text}"
        );
        assert!(
            text.contains(&format!("removing node {leader} now would leave"))
                && text.contains(&format!(
                    "without a quorum while node {dead} does not answer"
                ))
                && stalled
                    .iter()
                    .all(|p| text.contains(&format!("partition {p}")))
                && text.contains("--force"),
            "{text}"
        );
        remove.push("--force");
    }
    let (ok, text) = cluster.cli(via, &remove);
    assert!(
        ok && text.starts_with(&format!("removed: node {leader} is no longer a member")),
        "removing meta leader {leader} through node {via}: {text}\nits log:\n{}",
        cluster.node(leader).log()
    );
    let rest: Vec<u64> = running.iter().copied().filter(|&id| id != leader).collect();
    wait_removal_settled(cluster, leader, &stalled);
    publish_in_every_partition(cluster, &rest, &stalled, "after").await;
    // The meta group commits too: a node (that never answers) is joined and removed again.
    let nowhere = format!("127.0.0.1:{}", herald_tests::cluster::free_udp_port());
    let (ok, text) = cluster.cli(rest[0], &["join", "--node-id", "9", "--addr", &nowhere]);
    assert!(ok, "a join after the removal: {text}");
    let (ok, text) = cluster.cli(rest[rest.len() - 1], &["remove", "--node-id", "9"]);
    assert!(ok, "a removal after the removal: {text}");
    herald_tests::wait_until(
        &format!("node {leader}'s /ready says it was removed"),
        || {
            herald_tests::cluster::get_json(cluster.node(leader), "/ready").is_some_and(|r| {
                r["status"]
                    .as_str()
                    .is_some_and(|s| s.starts_with("removed from the cluster"))
            })
        },
    );
    if let Some(dead) = dead {
        cluster.start_node(dead, cluster.members.len());
        wait_removal_settled(cluster, leader, &[]);
        let live: Vec<u64> = rest.iter().copied().chain([dead]).collect();
        publish_in_every_partition(cluster, &live, &[], "back").await;
    }
    for id in cluster.running() {
        let log = cluster.node(id).log();
        assert!(!log.contains("panicked"), "node {id} panicked:\n{log}");
    }
}

/// Removing the meta group's leader (as when decommissioning node 1, which formed the cluster
/// and usually leads it) through itself: openraft 0.9 keeps a leader that removed itself
/// leading until its next tick, and must not be asked for a second membership change
/// meanwhile, or its Raft task panics on an assertion.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_meta_leader_is_removed_through_itself() {
    let mut cluster = Cluster::start(3);
    remove_the_meta_leader(&mut cluster, true, None).await;
}

/// The same removal asked through another member, which passes it on to the meta leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_meta_leader_is_removed_through_another_member() {
    let mut cluster = Cluster::start(3);
    remove_the_meta_leader(&mut cluster, false, None).await;
}

/// The same with a member dead: 4 nodes, node 4 down; the three meta voters left (one dead)
/// still make a quorum.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_meta_leader_is_removed_while_a_member_is_dead() {
    let mut cluster = Cluster::start(4);
    remove_the_meta_leader(&mut cluster, true, Some(4)).await;
}

/// The case first seen: 5 nodes, node 5 down, the meta leader removed through itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_meta_leader_of_five_is_removed_while_one_is_dead() {
    let mut cluster = Cluster::start(5);
    remove_the_meta_leader(&mut cluster, true, Some(5)).await;
}

/// Each partition group's (partition, voters) as node `via` sees them (the meta group left
/// out).
fn partition_voters(cluster: &Cluster, via: u64) -> Option<Vec<(u64, Vec<u64>)>> {
    let status = cluster.status(via)?;
    let groups = status["groups"].as_array()?.iter();
    let partitions = groups.filter_map(|g| {
        let voters = g["voters"].as_array()?.iter().filter_map(Value::as_u64);
        Some((g["partition"].as_u64()?, voters.collect()))
    });
    Some(partitions.collect())
}

/// A member that is down is never made a voter. A dead learner looks caught up while its
/// partition is idle (its match stays near the leader's last entry), and a leader that checked
/// its partition count while it was up does not ask again; yet as a voter it would take the
/// place of a live one. Here node 4, checked by node 1 when it joined, dies; then node 2 is
/// removed: partition 0 (voters 1, 2, 3, led by node 1) is short of a voter, and of its
/// learners 4 and 5 it must promote live node 5 (and not swap node 4 in for it later, where
/// the placement puts node 4), so that it still commits when one more of its voters dies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_learner_is_not_promoted_after_a_removal() {
    let mut cluster = Cluster::start_some(5, 3, &[]);
    // A channel on partition 0.
    let mut channel = String::new();
    for i in 0.. {
        let name = format!("dead-learner:{i}");
        let reply = publish_until_acked(&cluster, 1, &name, "probe").await;
        if partition_of_reply(&reply) == 0 {
            channel = name;
            break;
        }
    }
    // Nodes 4 and 5 join; node 1, the meta leader, checks their partition count as it makes
    // them meta voters.
    for id in [4, 5] {
        cluster.start_node(id, 3);
        let addr = format!(
            "127.0.0.1:{}",
            cluster.members[id as usize - 1].cluster_port
        );
        let (ok, text) = cluster.cli(1, &["join", "--node-id", &id.to_string(), "--addr", &addr]);
        assert!(ok, "join of node {id} failed: {text}");
    }
    // Voters where the placement over 1-5 puts them.
    let placed: Vec<(u64, Vec<u64>)> = vec![
        (0, vec![1, 2, 3]),
        (1, vec![2, 3, 4]),
        (2, vec![3, 4, 5]),
        (3, vec![1, 4, 5]),
    ];
    herald_tests::wait_until(
        "the joined nodes vote where the placement puts them",
        || partition_voters(&cluster, 1).is_some_and(|v| v == placed),
    );
    cluster.kill(4);
    // Longer than a member takes to count as silent (1 s without an answer).
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Partition 1, voters 2, 3 and 4, has no quorum once node 2 leaves while node 4 is down:
    // the removal is refused for it, and forced (that partition is not this test's concern).
    let (ok, text) = cluster.cli(1, &["remove", "--node-id", "2"]);
    assert!(
        !ok && text
            .contains("would leave partition 1 without a quorum while node 4 does not answer"),
        "{text}"
    );
    let (ok, text) = cluster.cli(1, &["remove", "--node-id", "2", "--force"]);
    assert!(ok, "remove failed: {text}");
    let mut voters = Vec::new();
    herald_tests::wait_until("partition 0 has three voters again", || {
        partition_voters(&cluster, 1).is_some_and(|groups| {
            voters = groups[0].1.clone();
            voters.len() == 3 && !voters.contains(&2)
        })
    });
    assert_eq!(voters, [1, 3, 5], "partition 0 promoted dead node 4");
    // Nor is node 4 swapped in for node 5 later, though the placement over 1, 3, 4 and 5 puts
    // partition 0 on 1, 3 and 4 (placement rounds are a second apart).
    let until = tokio::time::Instant::now() + Duration::from_secs(5);
    while tokio::time::Instant::now() < until {
        let groups = partition_voters(&cluster, 1).expect("node 1's status");
        assert_eq!(groups[0].1, [1, 3, 5], "dead node 4 swapped in: {groups:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Node 3 dies too: partition 0 still commits.
    cluster.kill(3);
    publish_until_acked(&cluster, 1, &channel, "after node 3 died").await;
}

/// A Raft group as one node sees it.
#[derive(Debug)]
struct GroupView {
    /// `None` for the meta group.
    partition: Option<u64>,
    leader: Option<u64>,
    /// Elections the node called in it ...
    elections: u64,
    /// ... and how many hand-backs it took (each calls one).
    takeovers: u64,
}

/// Node `id`'s view of every group.
fn group_views(cluster: &Cluster, id: u64) -> Option<Vec<GroupView>> {
    let status = cluster.status(id)?;
    Some(
        status["groups"]
            .as_array()?
            .iter()
            .map(|g| GroupView {
                partition: g["partition"].as_u64(),
                leader: g["leader"].as_u64(),
                elections: g["elections_called"].as_u64().expect("elections_called"),
                takeovers: g["takeovers"].as_u64().expect("takeovers"),
            })
            .collect(),
    )
}

/// A node restarted after `kill -9` rejoins as a follower: it calls no election of its own
/// before it has heard the current leaders (so it deposes nobody), and it catches up with what
/// was committed while it was down (its write-ahead logs replayed first). Then the partitions
/// placed first on it are handed back to it by their leaders while publishers run, with and
/// without message ids: none of the latter fails, and every acknowledged publish is there
/// once, in order.
///
/// The assertion on elections is on what the restarted node itself did (`elections_called`,
/// counted per group from the vote requests it sent), not on the leaders' terms: on a starved
/// machine a leader's heartbeat can be late enough for another member to call an election,
/// and that is not this test's concern.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_catches_up_and_takes_its_partitions_back() {
    // Per channel, below the default history size (100), so every event stays retained.
    const MAX_PER_CHANNEL: usize = 90;
    let mut cluster = Cluster::start(3);
    cluster.wait_converged();
    cluster.kill(1);
    cluster.wait_converged();
    // Commit something in every partition while node 1 is down.
    for i in 0..64 {
        try_publish(
            cluster.node(2).http,
            &json!({ "channel": format!("orders:{i}"), "data": i }),
        )
        .await
        .expect("publish with node 1 down");
    }
    let committed: Vec<Option<u64>> = cluster.status(2).unwrap()["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["applied_index"].as_u64())
        .collect();
    let after_kill = group_views(&cluster, 2).unwrap();
    assert!(
        after_kill.iter().all(|v| v.leader != Some(1)),
        "node 1 leads nothing while down: {after_kill:?}"
    );

    // Publishers run through the restart and the hand-backs, on half the channels with
    // message ids (retried until acknowledged), on the other half without (not retried: a
    // hand-back must not make a publish fail, since nothing is lost in it).
    let channels: Vec<String> = (0..8).map(|i| format!("orders:back{i}")).collect();
    let with_ids = |c: usize| c < 4;
    let mut cursors = Vec::new();
    for channel in &channels {
        let reply = try_publish(
            cluster.node(2).http,
            &json!({ "channel": channel, "data": { "n": -1 }, "messageId": format!("{channel}-start") }),
        )
        .await
        .expect("first publish");
        cursors.push(reply["id"].as_str().unwrap().to_string());
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let publisher = {
        let https = [cluster.node(2).http, cluster.node(3).http];
        let channels = channels.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut acked: Vec<Vec<i64>> = vec![Vec::new(); channels.len()];
            let mut failed = Vec::new();
            let mut n = 0usize;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && n < MAX_PER_CHANNEL {
                for (c, channel) in channels.iter().enumerate() {
                    if !with_ids(c) {
                        let body = json!({ "channel": channel, "data": { "n": n } });
                        match try_publish(https[n % 2], &body).await {
                            Ok(_) => acked[c].push(n as i64),
                            Err(error) => failed.push(format!("{channel} {n}: {error}")),
                        }
                        continue;
                    }
                    let body = json!({ "channel": channel, "data": { "n": n }, "messageId": format!("{channel}-{n}") });
                    let mut attempt = 0usize;
                    while let Err(error) = try_publish(https[attempt % 2], &body).await {
                        attempt += 1;
                        assert!(
                            attempt < 200,
                            "publish {n} to {channel} never succeeded: {error}"
                        );
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    acked[c].push(n as i64);
                }
                n += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            (acked, failed)
        })
    };

    cluster.start_node(1, 3);
    cluster.wait_converged();
    herald_tests::wait_until(
        "node 1 applies what was committed while it was down",
        || {
            let Some(status) = cluster.status(1) else {
                return false;
            };
            status["groups"]
                .as_array()
                .unwrap()
                .iter()
                .zip(&committed)
                .all(|(g, &c)| g["applied_index"].as_u64() >= c)
        },
    );
    // The partitions placed first on node 1 (members 1, 2, 3: partition p starts at p mod 3)
    // come back to it, handed over by their leaders.
    let preferred_by_1: Vec<u64> = (0..u64::from(herald_tests::cluster::TEST_PARTITIONS))
        .filter(|p| p % 3 == 0)
        .collect();
    herald_tests::wait_until("node 1 leads its partitions again", || {
        group_views(&cluster, 1).is_some_and(|views| {
            views
                .iter()
                .filter(|v| v.partition.is_some_and(|p| preferred_by_1.contains(&p)))
                .all(|v| v.leader == Some(1))
        })
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (acked, failed) = publisher.await.unwrap();
    eprintln!(
        "acknowledged per channel: {:?}",
        acked.iter().map(Vec::len).collect::<Vec<_>>()
    );
    assert_eq!(
        failed,
        Vec::<String>::new(),
        "publishes without ids that failed"
    );

    // Every election node 1 called was a take-over its leader asked for: it deposed nobody
    // on its own.
    let views = group_views(&cluster, 1).unwrap();
    for v in &views {
        assert!(
            v.elections <= v.takeovers,
            "node 1 called elections nobody asked for: {v:?} (all: {views:?})"
        );
    }
    assert!(
        views.iter().any(|v| v.takeovers > 0),
        "no partition was handed back: {views:?}"
    );

    // Every acknowledged publish is there once, in order, on the node that took over.
    for ((channel, cursor), acked) in channels.iter().zip(&cursors).zip(&acked) {
        try_publish(
            cluster.node(1).http,
            &json!({ "channel": channel, "data": { "n": -2 }, "messageId": format!("{channel}-end") }),
        )
        .await
        .expect("end marker");
        let mut events = sse(cluster.node(1).http, channel, Some(cursor)).await;
        let got = read_n(&mut events, acked.len() + 1).await;
        let mut expected = acked.clone();
        expected.push(-2);
        assert_eq!(got, expected, "{channel} on node 1");
    }
}

/// With fast failover off, only openraft's own timers can replace a dead leader: herald's
/// pre-vote must switch them on (they are off while a leader is heard, see `failover`) once
/// the surviving voters agree that nobody hears it, on the restarted node too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raft_timers_alone_replace_a_dead_leader() {
    let mut cluster = Cluster::start_with(3, &["--raft-fast-failover", "false"]);
    let channel = "orders:timers";
    let first = try_publish(
        cluster.node(1).http,
        &json!({ "channel": channel, "data": 1 }),
    )
    .await
    .expect("first publish");
    let partition = partition_of_reply(&first);
    // Two leaders die in turn, the first one restarted in between, so the second election
    // also counts on the restarted node's timers.
    for round in 0..2 {
        let leader = cluster.leader_of(1, partition).expect("a leader");
        let observer = *cluster.running().iter().find(|&&id| id != leader).unwrap();
        cluster.kill(leader);
        herald_tests::wait_until("the survivors elect a leader by their timers", || {
            cluster
                .leader_of(observer, partition)
                .is_some_and(|l| l != leader)
        });
        let reply = try_publish(
            cluster.node(observer).http,
            &json!({ "channel": channel, "data": round + 2 }),
        )
        .await
        .expect("publish after the election");
        assert_eq!(partition_of_reply(&reply), partition);
        cluster.start_node(leader, 3);
        cluster.wait_converged();
    }
}

/// The `n` and SSE id of each `message` event until `count` of them arrived or the stream sent
/// another kind of event (returned with them) or ended.
async fn read_until_other(
    what: &str,
    events: &mut Events,
    count: usize,
) -> (Vec<(i64, String)>, Option<eventsource_stream::Event>) {
    let mut got = Vec::new();
    while got.len() < count {
        let next = tokio::time::timeout(PATIENCE, events.next()).await;
        let Ok(next) = next else {
            panic!("{what}: no event in time after {got:?}");
        };
        let Some(event) = next else {
            return (got, None);
        };
        if event.event != "message" {
            return (got, Some(event));
        }
        let data: Value = serde_json::from_str(&event.data).unwrap();
        got.push((data["n"].as_i64().expect("an event with an n"), event.id));
    }
    (got, None)
}

/// An `HSUBSCRIBE` consumer on `resp`, from `cursor` on `channel`, its confirmation read.
fn hsubscribe(resp: std::net::SocketAddr, cursor: &str, channel: &str) -> herald_tests::RawConn {
    let mut conn = herald_tests::RawConn::connect(resp);
    conn.command(&[b"HSUBSCRIBE", cursor.as_bytes(), channel.as_bytes()]);
    let confirmation = conn.read_frame();
    assert!(
        confirmation.starts_with(b"*3\r\n$10\r\nhsubscribe\r\n"),
        "{}",
        String::from_utf8_lossy(&confirmation)
    );
    conn
}

/// The `n` and cursor of each `hmessage` until `count` of them arrived or an error reply came
/// (returned with them).
fn read_hmessages_until_error(
    conn: &mut herald_tests::RawConn,
    count: usize,
) -> (Vec<(i64, String)>, Option<String>) {
    let mut got = Vec::new();
    while got.len() < count {
        let frame = conn.read_frame();
        if frame.starts_with(b"-") {
            return (got, Some(String::from_utf8_lossy(&frame).into_owned()));
        }
        let (_, cursor, payload) = herald_tests::parse_hmessage(&frame);
        let data: Value = serde_json::from_str(&payload).unwrap();
        got.push((data["n"].as_i64().expect("an event with an n"), cursor));
    }
    (got, None)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_catches_up_from_a_snapshot_sends_its_streams_to_resume() {
    // Snapshots every 20 entries, keeping 2: a member stopped for 60 entries can only catch up
    // from a snapshot, which moves its store forward without delivering the events between.
    const TOTAL: i64 = 60;
    let cluster = Cluster::start_with(3, &["--raft-snapshot-logs", "20"]);
    cluster.wait_converged();
    let channel = "orders:snapshot";
    let first = try_publish(
        cluster.node(1).http,
        &json!({ "channel": channel, "data": { "n": 0 } }),
    )
    .await
    .expect("first publish");
    let partition = partition_of_reply(&first);
    let leader = cluster.leader_of(1, partition).expect("a leader");
    let lagger = cluster
        .running()
        .into_iter()
        .find(|&id| id != leader)
        .unwrap();
    let group = |status: &Value| -> Value {
        status["groups"]
            .as_array()
            .unwrap()
            .iter()
            .find(|g| g["partition"].as_u64() == Some(u64::from(partition)))
            .cloned()
            .unwrap()
    };

    // A subscriber of the member that will fall behind, from the first event on.
    let cursor = first["id"].as_str().unwrap().to_string();
    let mut events = sse(cluster.node(lagger).http, channel, Some(&cursor)).await;
    // And a RESP consumer of its history (`HSUBSCRIBE`), whose messages the delivery thread
    // queues itself.
    let mut consumer = hsubscribe(cluster.node(lagger).resp, &cursor, channel);
    let behind_at = group(&cluster.status(lagger).unwrap())["last_log_index"]
        .as_u64()
        .unwrap();

    cluster.node(lagger).signal("STOP");
    for n in 1..=TOTAL {
        try_publish(
            cluster.node(leader).http,
            &json!({ "channel": channel, "data": { "n": n } }),
        )
        .await
        .expect("publish while one member is stopped");
    }
    herald_tests::wait_until(
        "the leader drops the entries the stopped member lacks",
        || {
            cluster.status(leader).is_some_and(|s| {
                group(&s)["purged_index"]
                    .as_u64()
                    .is_some_and(|p| p > behind_at)
            })
        },
    );
    cluster.node(lagger).signal("CONT");

    // The member catches up from the snapshot. Its subscriber either gets every event live or
    // is told to reconnect; resuming from its last id on the same member must then give the
    // rest: every event once, in order.
    let (mut got, other) = read_until_other("the open stream", &mut events, TOTAL as usize).await;
    assert!(
        got.iter().map(|(n, _)| *n).eq(1..=got.len() as i64),
        "nothing past the hole before the reconnect: {got:?}"
    );
    let other = other.expect("the stream is told to reconnect: the snapshot skipped live delivery");
    assert_eq!(other.event, "reconnect", "{other:?}");
    let last_id = got.last().map(|(_, id)| id.clone());
    herald_tests::wait_until("the member applied the snapshot", || {
        cluster.status(lagger).is_some_and(|s| {
            group(&s)["applied_index"]
                .as_u64()
                .is_some_and(|a| a > behind_at)
        })
    });
    // Nothing may have arrived before the reconnect: then resume from the first event.
    let resume_from = last_id.unwrap_or_else(|| cursor.clone());
    let mut resumed = sse(cluster.node(lagger).http, channel, Some(&resume_from)).await;
    let want = TOTAL as usize - got.len();
    let (rest, other) = read_until_other("the resumed stream", &mut resumed, want).await;
    assert!(
        other.is_none(),
        "unexpected {other:?}; the member's log:\n{}",
        cluster.node(lagger).log()
    );
    got.extend(rest);
    let ns: Vec<i64> = got.iter().map(|(n, _)| *n).collect();
    assert_eq!(ns, (1..=TOTAL).collect::<Vec<_>>());

    // The RESP consumer likewise: nothing past the hole, then the reason and a close; resuming
    // from its last cursor gives the rest.
    let (mut got, error) = tokio::task::spawn_blocking(move || {
        let read = read_hmessages_until_error(&mut consumer, TOTAL as usize);
        let after = consumer.read_to_close();
        assert!(after.is_empty(), "nothing after the error: {after:?}");
        read
    })
    .await
    .unwrap();
    assert!(
        got.iter().map(|(n, _)| *n).eq(1..=got.len() as i64),
        "nothing past the hole before the error: {got:?}"
    );
    assert_eq!(
        error.as_deref(),
        Some(
            "-ERR this node caught up from a snapshot: reconnect and resume from your cursor (HSUBSCRIBE)\r\n"
        ),
        "the consumer is told why it is closed"
    );
    let resume_from = got.last().map_or(cursor, |(_, c)| c.clone());
    let resp = cluster.node(lagger).resp;
    let want = TOTAL as usize - got.len();
    let (rest, error) = tokio::task::spawn_blocking(move || {
        read_hmessages_until_error(&mut hsubscribe(resp, &resume_from, channel), want)
    })
    .await
    .unwrap();
    assert_eq!(error, None);
    got.extend(rest);
    let ns: Vec<i64> = got.iter().map(|(n, _)| *n).collect();
    assert_eq!(ns, (1..=TOTAL).collect::<Vec<_>>(), "over RESP");
}

/// The size of the largest file under `dir`, in KiB.
fn largest_file_kib(dir: &std::path::Path) -> u64 {
    let mut largest = 0;
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let meta = entry.metadata().unwrap();
        largest = largest.max(if meta.is_dir() {
            largest_file_kib(&entry.path()) * 1024
        } else {
            meta.len()
        });
    }
    largest / 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_whose_disk_fills_sends_its_clients_away_and_catches_up_after_a_restart() {
    const CHANNELS: usize = 50;
    let mut cluster = Cluster::start(3);
    // Node 3 comes back allowed 2 MiB more than its largest file: its disk fills first.
    let dir3 = cluster.node(3).data_dir.clone();
    cluster.kill(3);
    let limit = largest_file_kib(&dir3) + 2048;
    cluster.start_node_with_file_size_limit(3, 3, limit);
    cluster.wait_converged();
    let node3 = cluster.node(3).http;
    let mut watcher = sse(node3, "fill:0", None).await;
    let told = tokio::spawn(async move {
        loop {
            match tokio::time::timeout(PATIENCE * 4, watcher.next()).await {
                Ok(Some(event)) if event.event == "reconnect" => {
                    // A loaded machine may keep node 3 from hearing its leaders for a while
                    // before its disk fills: told to move for that, the client comes back.
                    if event.data.contains("lost its cluster quorum") {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        watcher = sse(node3, "fill:0", None).await;
                        continue;
                    }
                    return Some(event.data);
                }
                Ok(Some(_)) => continue,
                _ => return None,
            }
        }
    });

    // Publishers on nodes 1 and 2, with message ids, retried until acknowledged, until node 3
    // says its storage failed (and somewhat beyond, to see the cluster carry on).
    let mut acked = vec![Vec::new(); CHANNELS];
    let mut failed_at = None;
    let mut i = 0usize;
    while failed_at.is_none_or(|at| i < at + 200) {
        assert!(i < 30_000, "node 3's files never filled up");
        let channel = i % CHANNELS;
        let body = json!({
            "channel": format!("fill:{channel}"),
            "data": { "n": i, "pad": "x".repeat(1000) },
            "messageId": format!("fill-{i}"),
        });
        let mut attempt = 0;
        while let Err(error) =
            try_publish(cluster.node(1 + (attempt + i) as u64 % 2).http, &body).await
        {
            attempt += 1;
            assert!(attempt < 20, "publish {i} kept failing: {error}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        acked[channel].push(i as i64);
        if failed_at.is_none() && i.is_multiple_of(50) {
            let ready = herald_tests::cluster::get_json(cluster.node(3), "/ready");
            let status = ready
                .as_ref()
                .and_then(|r| r["status"].as_str())
                .unwrap_or("");
            if status.starts_with("storage failed") {
                assert!(status.contains("File too large (os error 27)"), "{status}");
                assert!(status.contains("restart the node"), "{status}");
                failed_at = Some(i);
            }
        }
        i += 1;
    }
    let told = told
        .await
        .unwrap()
        .expect("node 3's SSE client is told to reconnect");
    assert!(told.contains("storage failed"), "{told}");
    let stats = herald_tests::cluster::get_json(cluster.node(3), "/api/realtime/stats").unwrap();
    assert_eq!(stats["status"], "storage failed", "{stats}");
    assert_eq!(stats["channels"]["isConnected"], false, "{stats}");
    assert!(
        stats["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("storage failed")),
        "{stats}"
    );
    let metrics = metrics_of(cluster.node(3).http).await;
    for line in ["herald_storage_failed 1", "herald_raft_group_stopped 0"] {
        assert!(metrics.contains(line), "{line} missing from:\n{metrics}");
    }
    // Its stopped groups take no more Raft messages: each made openraft log an ERROR, some
    // 80 a second, burying the line that says why (on a disk that may hold the log too).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let log = cluster.node(3).log();
    let flood = log.matches("failure sending RaftMsg to RaftCore").count();
    assert!(flood < 20, "{flood} lines of the Raft message error flood");

    // Restarted without the limit, node 3 catches up: every acknowledged event, in order, once.
    cluster.kill(3);
    cluster.start_node(3, 3);
    cluster.wait_converged();
    for channel in [0, 1, CHANNELS - 1] {
        let name = format!("fill:{channel}");
        let want: Vec<i64> = acked[channel]
            .iter()
            .rev()
            .take(100)
            .rev()
            .copied()
            .collect();
        eventually_equal(&format!("node 3 has all of {name}"), &want, || async {
            history_payloads(cluster.node(3), &name)
                .await
                .iter()
                .map(|p| {
                    serde_json::from_str::<Value>(p).unwrap()["n"]
                        .as_i64()
                        .unwrap()
                })
                .collect::<Vec<i64>>()
        })
        .await;
    }
}

/// Publishes `data` on `channel` through node `via` until it is acknowledged (retrying with
/// the same message id), and returns the reply.
async fn publish_until_acked(cluster: &Cluster, via: u64, channel: &str, data: &str) -> Value {
    let body =
        json!({ "channel": channel, "data": data, "messageId": format!("{channel}-{data}") });
    let deadline = tokio::time::Instant::now() + PATIENCE * 2;
    loop {
        match try_publish(cluster.node(via).http, &body).await {
            Ok(reply) => return reply,
            Err(error) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "{data} never acknowledged: {error}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// A channel (named `PREFIX:N`) whose partition node 1 leads, found by publishing `probe` on
/// each until one lands there.
async fn channel_led_by_node_1(cluster: &Cluster, prefix: &str) -> String {
    for i in 0.. {
        let name = format!("{prefix}:{i}");
        let reply = publish_until_acked(cluster, 1, &name, "probe").await;
        if cluster.leader_of(1, partition_of_reply(&reply)) == Some(1) {
            return name;
        }
    }
    unreachable!()
}

/// Asserts that for many election timeouts nothing commits through node 2 on `channel`:
/// node 2 lacks an acknowledged event, and node 3 (which forgot it) must not help it lead
/// (without the check, nodes 2 and 3 elect node 2 within one timeout). Then that node 2 logs
/// `refusing node 3: {why}` and node 3 is told `told`, in its log and its `/ready`.
async fn assert_node_3_cannot_help_node_2_lead(
    cluster: &Cluster,
    channel: &str,
    why: &str,
    told: &str,
) {
    let until = tokio::time::Instant::now() + Duration::from_secs(8);
    while tokio::time::Instant::now() < until {
        let refused = try_publish(
            cluster.node(2).http,
            &json!({ "channel": channel, "data": "too early" }),
        )
        .await
        .expect_err("nodes 2 and 3 must not form a quorum: 3 forgot what it acknowledged");
        assert!(refused.starts_with("503"), "{refused}");
    }
    let refusing = format!("refusing node 3: {why}");
    herald_tests::wait_until("node 2 says why it refuses node 3", || {
        cluster.node(2).log().contains(&refusing)
    });
    herald_tests::wait_until("node 3 is told why it is refused", || {
        cluster.node(3).log().contains(told)
    });
    herald_tests::wait_until("node 3's status shows node 2 refusing it", || {
        cluster.status(3).is_some_and(|status| {
            status["links"]["2"]["state"] == "refuses this node"
                && status["links"]["2"]["lastError"]
                    .as_str()
                    .is_some_and(|why| why.contains(told))
        })
    });
    // Its history is not the cluster's: HISTORY says so, a stream is sent elsewhere at once.
    let mut conn =
        herald_tests::patient_connection(&redis::Client::open(cluster.node(3).url()).unwrap())
            .await;
    let history: Result<Vec<(String, Vec<u8>)>, _> = redis::cmd("HISTORY")
        .arg(channel)
        .arg("LAST")
        .arg(10)
        .query_async(&mut conn)
        .await;
    let error = history.expect_err("HISTORY on a refused node").to_string();
    assert!(error.contains("refused by the cluster"), "{error}");
    let mut events = sse(cluster.node(3).http, channel, None).await;
    let first = next_non_message(&mut events).await;
    assert_eq!(first.event, "reconnect", "{first:?}");
    assert!(
        first.data.contains("refuses this node's store"),
        "{first:?}"
    );
    herald_tests::wait_until("node 3's /ready says why it cannot commit", || {
        herald_tests::cluster::get_json(cluster.node(3), "/ready").is_some_and(|ready| {
            ready["status"].as_str().is_some_and(|status| {
                status.contains("refused by the cluster") && status.contains(told)
            })
        })
    });
}

/// Starts node 1 again (it has every acknowledged event), publishes `after` through node 2, and
/// waits until nodes 1 and 2 hold `acknowledged` then `after` on `channel`; returns that list.
async fn node_1_back_has_every_event(
    cluster: &mut Cluster,
    channel: &str,
    acknowledged: &[&str],
) -> Vec<String> {
    cluster.start_node(1, 3);
    publish_until_acked(cluster, 2, channel, "after").await;
    let want: Vec<String> = acknowledged
        .iter()
        .chain(&["after"])
        .map(|s| s.to_string())
        .collect();
    // Acknowledged once a quorum has it: node 1, just restarted, may apply it a moment later.
    for id in [1, 2] {
        eventually_equal(
            &format!("node {id} holds every acknowledged event"),
            &want,
            || history_payloads(cluster.node(id), channel),
        )
        .await;
    }
    want
}

/// `herald cluster remove` of node 3 through node 1, then `join` at its address (tried until
/// the removal lets it).
fn remove_node_3_and_join_it_again(cluster: &Cluster) {
    let (ok, text) = cluster.cli(1, &["remove", "--node-id", "3"]);
    assert!(ok, "remove failed: {text}");
    let addr = format!("127.0.0.1:{}", cluster.members[2].cluster_port);
    herald_tests::wait_until("node 3 can be joined again", || {
        cluster
            .cli(1, &["join", "--node-id", "3", "--addr", &addr])
            .0
    });
}

/// The operator's way back for node 3, refused for its store: remove it and join it again; it
/// then catches up to `want` on `channel`, and is ready.
async fn remove_and_join_node_3_again(cluster: &Cluster, channel: &str, want: &[String]) {
    remove_node_3_and_join_it_again(cluster);
    node_3_catches_up_and_is_ready(cluster, channel, want).await;
}

/// Node 3, joined again, catches up to `want` on `channel` (it is refused until it hears from
/// the members that they take it again: a clock round), and is ready.
async fn node_3_catches_up_and_is_ready(cluster: &Cluster, channel: &str, want: &[String]) {
    eventually_equal("node 3 catches up", &want.to_vec(), || async {
        herald_tests::try_history_payloads(cluster.node(3), channel)
            .await
            .unwrap_or_default()
    })
    .await;
    herald_tests::wait_until("node 3 is ready again", || {
        herald_tests::cluster::get_json(cluster.node(3), "/ready")
            .is_some_and(|ready| ready["status"] == "ready")
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_back_on_an_empty_data_directory_cannot_vote_away_acknowledged_events() {
    let mut cluster = Cluster::start(3);
    let channel = channel_led_by_node_1(&cluster, "wiped").await;
    // With node 2 paused, an event commits on nodes 1 and 3 only.
    cluster.node(2).signal("STOP");
    publish_until_acked(&cluster, 1, &channel, "acknowledged").await;
    // Node 1 dies; node 3 dies and loses its disk; node 2 resumes; node 3 comes back empty.
    cluster.kill(1);
    cluster.wipe(3);
    cluster.node(2).signal("CONT");
    cluster.start_node(3, 3);

    // Node 2 lacks the event, and node 3 must not help it lead: nothing commits until node 1
    // (which has the event) is back.
    assert_node_3_cannot_help_node_2_lead(
        &cluster,
        &channel,
        "it runs on another store",
        "runs on another store than the one it was a member with",
    )
    .await;
    let want =
        node_1_back_has_every_event(&mut cluster, &channel, &["probe", "acknowledged"]).await;
    remove_and_join_node_3_again(&cluster, &channel, &want).await;
}

/// A member removed and joined again while it kept running shows its store at no new
/// connection; its peers record it all the same (from its answer to their clock round), so
/// when it later comes back on an empty data directory it is refused like any member that
/// lost its disk, instead of being trusted on the empty one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_joined_again_while_running_is_refused_on_an_empty_data_directory() {
    let mut cluster = Cluster::start(3);
    remove_node_3_and_join_it_again(&cluster);
    // The meta group's log up to the join: applied on a node, the removal's forgetting is
    // behind it, and what it knows of node 3's journal was learnt since.
    let joined = cluster
        .status(1)
        .and_then(|s| s["groups"][0]["last_log_index"].as_u64())
        .expect("node 1's status");
    for id in [1, 2] {
        herald_tests::wait_until("the member has heard node 3 since the join", || {
            cluster.status(id).is_some_and(|s| {
                s["groups"][0]["applied_index"].as_u64() >= Some(joined)
                    && s["links"]["3"]["journal"].as_u64().is_some()
            })
        });
    }

    cluster.wipe(3);
    cluster.start_node(3, 3);
    for id in [1, 2] {
        herald_tests::wait_until("the member refuses node 3 on its empty store", || {
            cluster
                .status(id)
                .is_some_and(|s| s["links"]["3"]["state"] == "refused")
                && cluster
                    .node(id)
                    .log()
                    .contains("refusing node 3: it runs on another store")
        });
    }
}

/// The highest record of node `of`'s Raft journal node `by` has seen durable (its status).
fn journal_seen(cluster: &Cluster, by: u64, of: u64) -> Option<u64> {
    cluster.status(by)?["links"][of.to_string()]["journal"].as_u64()
}

/// A data directory restored from a backup keeps its store id but has forgotten what the
/// member acknowledged since: like a lost one, it must not help elect a leader that lacks
/// those events. Its peers tell it by its Raft journal, which starts below what they saw it
/// make durable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_restored_from_a_backup_cannot_vote_away_acknowledged_events() {
    let mut cluster = Cluster::start(3);
    let channel = channel_led_by_node_1(&cluster, "restored").await;
    // Node 3 is stopped, backed up and started again.
    stop_with_sigterm(&mut cluster, 3);
    cluster.kill(3);
    let backup = cluster.back_up(3);
    cluster.start_node(3, 3);
    let mut backed_up = 0;
    herald_tests::wait_until("node 3 shows its journal", || {
        let start = cluster
            .status(3)
            .and_then(|s| s["journal"]["start"].as_u64());
        backed_up = start.unwrap_or_default();
        start.is_some()
    });
    // It acknowledges more, and node 2 sees its journal pass where the backup ends.
    publish_until_acked(&cluster, 1, &channel, "after the backup").await;
    herald_tests::wait_until("node 2 sees node 3's journal pass the backup", || {
        journal_seen(&cluster, 2, 3).is_some_and(|seen| seen > backed_up)
    });
    // With node 2 paused, an event commits on nodes 1 and 3 only.
    cluster.node(2).signal("STOP");
    publish_until_acked(&cluster, 1, &channel, "acknowledged").await;
    // Node 1 dies; node 3 dies and is restored from the backup; node 2 resumes; node 3
    // comes back.
    cluster.kill(1);
    cluster.restore(3, &backup);
    cluster.node(2).signal("CONT");
    cluster.start_node(3, 3);

    // Node 2 lacks the event, and node 3 must not help it lead: nothing commits until node 1
    // (which has the event) is back.
    assert_node_3_cannot_help_node_2_lead(
        &cluster,
        &channel,
        "its data directory went back in time",
        "went back in time",
    )
    .await;
    let want = node_1_back_has_every_event(
        &mut cluster,
        &channel,
        &["probe", "after the backup", "acknowledged"],
    )
    .await;
    let refused = |cluster: &Cluster, by: u64| {
        cluster
            .status(by)
            .is_some_and(|status| status["links"]["3"]["state"] == "refused")
    };
    // Node 1, down when node 3 came back, refuses it too (node 2 tells it, if its own record
    // did not catch it).
    herald_tests::wait_until("node 1 refuses node 3 too", || refused(&cluster, 1));
    // Node 2 still refuses node 3 after a restart of its own.
    stop_with_sigterm(&mut cluster, 2);
    cluster.kill(2);
    cluster.start_node(2, 3);
    herald_tests::wait_until("node 2, restarted, still refuses node 3", || {
        refused(&cluster, 2)
            && cluster
                .node(2)
                .log()
                .contains("refusing node 3: its data directory went back in time")
    });
    // What an operator who restored every node does: each forgets the journals it saw.
    for id in [1, 2] {
        stop_with_sigterm(&mut cluster, id);
        cluster.kill(id);
    }
    for id in [1, 2] {
        cluster.set_node_args(id, &["--forget-peer-journals"]);
        cluster.start_node(id, 3);
    }
    for id in [1, 2] {
        herald_tests::wait_until("the journals are forgotten and node 3 heard again", || {
            cluster
                .node(id)
                .log()
                .contains("forgot how far the members' Raft journals had got")
                && cluster
                    .status(id)
                    .is_some_and(|status| status["links"]["3"]["state"] == "connected")
        });
    }

    remove_and_join_node_3_again(&cluster, &channel, &want).await;
    let _ = std::fs::remove_dir_all(backup);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_init_by_hand_while_a_node_is_down_creates_every_partition() {
    // No --bootstrap-expect: the cluster is formed by `herald cluster init`, with node 1 away.
    let mut cluster = Cluster::start_some(3, 0, &[]);
    cluster.start_node(2, 0);
    cluster.start_node(3, 0);
    // Before the init, /ready says what the node waits for.
    let ready = herald_tests::cluster::get_json(cluster.node(2), "/ready").expect("/ready answers");
    let status = ready["status"].as_str().unwrap_or_default();
    assert!(
        status.starts_with("not formed yet: ") && status.contains("herald cluster init"),
        "{ready}"
    );
    let (ok, text) = cluster.cli(2, &["init"]);
    assert!(ok, "init failed: {text}");
    // Every partition (node 1 is the first voter of some) gets a leader among nodes 2 and 3.
    cluster.wait_converged();
    for i in 0..32 {
        publish_until_acked(&cluster, 2 + i % 2, &format!("init:{i}"), "x").await;
    }
    cluster.start_node(1, 0);
    cluster.wait_converged();
    publish_until_acked(&cluster, 1, "init:after", "y").await;
}

/// The same init, with its node killed before a quorum was up (the task writing the cluster's
/// identity dies with it): the meta group has its members but no cluster; once they are up,
/// its leader writes it, and every partition is created, again with no second `init`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_init_cut_short_by_a_restart_is_finished_by_the_meta_leader() {
    let mut cluster = Cluster::start_some(3, 0, &[]);
    cluster.start_node(1, 0);
    let (ok, text) = cluster.cli(1, &["init", "--timeout", "2s"]);
    assert!(!ok, "init cannot complete with 1 of 3 members up: {text}");
    cluster.kill(1);
    for id in 1..=3 {
        cluster.start_node(id, 0);
    }
    cluster.wait_converged();
    for i in 0..8 {
        publish_until_acked(&cluster, 1 + i % 3, &format!("restarted:{i}"), "x").await;
    }
}

/// A member that stops answering (killed, paused, cut off) keeps its QUIC connection until the
/// idle timeout; `herald cluster status` says it is silent from the first second on, rather
/// than "connected" while its partitions have already moved on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_a_member_that_stopped_answering_as_silent() {
    let cluster = Cluster::start(3);
    let link = |by: u64| cluster.status(by).map(|s| s["links"]["3"].clone());
    herald_tests::wait_until("node 1 is connected to node 3", || {
        link(1).is_some_and(|l| l["state"] == "connected")
    });
    cluster.node(3).signal("STOP");
    herald_tests::wait_until("node 1 calls node 3 silent", || {
        link(1).is_some_and(|l| {
            l["state"] == "silent"
                && l["lastError"]
                    .as_str()
                    .is_some_and(|e| e.contains("answered no call for"))
        })
    });
    cluster.node(3).signal("CONT");
    herald_tests::wait_until("node 3 answers again", || {
        link(1).is_some_and(|l| l["state"] == "connected")
    });
}

/// `herald cluster init` while most members are down cannot commit the cluster's identity; it
/// times out saying the change may still complete, and it does: once a quorum is up, the
/// cluster is formed and every partition created, with no second `init`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_init_that_timed_out_with_most_members_down_completes_once_they_are_up() {
    let mut cluster = Cluster::start_some(3, 0, &[]);
    cluster.start_node(1, 0);
    let (ok, text) = cluster.cli(1, &["init", "--timeout", "2s"]);
    assert!(!ok, "init cannot complete with 1 of 3 members up: {text}");
    assert!(text.contains("the change may still complete"), "{text}");
    cluster.start_node(2, 0);
    cluster.start_node(3, 0);
    cluster.wait_converged();
    for i in 0..8 {
        publish_until_acked(&cluster, 1 + i % 3, &format!("late:{i}"), "x").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_stopped_with_sigterm_hands_its_partitions_over_first() {
    let mut cluster = Cluster::start(3);
    let views = group_views(&cluster, 2).unwrap();
    assert!(
        views
            .iter()
            .any(|v| v.partition.is_some() && v.leader == Some(1)),
        "node 1 leads a partition: {views:?}"
    );
    stop_with_sigterm(&mut cluster, 1);
    // Right as it has exited, every partition it led has a new leader: none waited for a
    // failover (which takes an election timeout to even start). The taker knows it leads at
    // once; the other survivor learns it from the taker's next message, which on a loaded
    // machine may come after this look, so a partition counts as taken over when either
    // survivor names a leader other than node 1.
    let (views_2, views_3) = (
        group_views(&cluster, 2).unwrap(),
        group_views(&cluster, 3).unwrap(),
    );
    for (view_2, view_3) in views_2
        .iter()
        .zip(&views_3)
        .filter(|(v, _)| v.partition.is_some())
    {
        assert!(
            [view_2.leader, view_3.leader]
                .iter()
                .any(|l| l.is_some_and(|l| l != 1)),
            "partition {:?} was not handed over: node 2 sees {views_2:?}, node 3 {views_3:?}",
            view_2.partition
        );
    }
    // And they commit at once.
    publish_until_acked(&cluster, 2, "after-term", "x").await;
}

/// The meta group holds the namespace config: the forming node's file becomes the cluster's,
/// every member applies it whatever its own file says, and `herald cluster namespaces --set`
/// changes it for all of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_member_applies_the_clusters_namespace_config() {
    let forming = herald_tests::config_file("[namespace.small]\nhistory_size = 3\n");
    let other = herald_tests::config_file("[namespace.small]\nhistory_size = 50\n");
    let (forming, other) = (forming.to_str().unwrap(), other.to_str().unwrap());
    let cluster = Cluster::start_each(
        3,
        3,
        &[],
        &[
            (1, &["--config", forming]),
            (2, &["--config", other]),
            (3, &["--config", other]),
        ],
    );
    for id in 1..=3 {
        herald_tests::eventually_equal(
            &format!("node {id} applies the cluster's namespace config"),
            &Some("cluster".to_string()),
            || async {
                herald_tests::cluster::get_json(cluster.node(id), "/api/cluster/namespaces")
                    .and_then(|v| v["source"].as_str().map(str::to_string))
            },
        )
        .await;
    }
    for i in 0..6 {
        try_publish(
            cluster.node(2).http,
            &json!({ "channel": "small:a", "data": i.to_string() }),
        )
        .await
        .expect("publish");
    }
    let kept: Vec<String> = ["3", "4", "5"].map(String::from).to_vec();
    for id in 1..=3 {
        herald_tests::eventually_equal(
            &format!("node {id} keeps the cluster's history_size"),
            &kept,
            || herald_tests::history_payloads(cluster.node(id), "small:a"),
        )
        .await;
    }

    let (ok, shown) = cluster.cli(3, &["namespaces"]);
    assert!(ok, "{shown}");
    assert!(
        shown.contains("# the cluster's namespace config (every member applies it):")
            && shown.contains("[namespace.small]\nhistory_size = 3\n")
            && shown.contains("# this node's config file differs (not in force):")
            && shown.contains("# history_size = 50"),
        "{shown}"
    );

    let smaller = herald_tests::config_file("[namespace.small]\nhistory_size = 2\n");
    let (ok, set) = cluster.cli(2, &["namespaces", "--set", smaller.to_str().unwrap()]);
    assert!(ok, "{set}");
    try_publish(
        cluster.node(3).http,
        &json!({ "channel": "small:a", "data": "6" }),
    )
    .await
    .expect("publish");
    let kept: Vec<String> = ["5", "6"].map(String::from).to_vec();
    for id in 1..=3 {
        herald_tests::eventually_equal(
            &format!("node {id} applies the new history_size"),
            &kept,
            || herald_tests::history_payloads(cluster.node(id), "small:a"),
        )
        .await;
    }

    let wrong = herald_tests::config_file("resp_addr = \"127.0.0.1:6379\"\n");
    let (ok, refused) = cluster.cli(1, &["namespaces", "--set", wrong.to_str().unwrap()]);
    assert!(!ok, "{refused}");
    assert!(
        refused.contains("no [namespace.NAME] table (write [namespace.default] for the defaults)"),
        "{refused}"
    );
    // A bad value is named by file and line, and nothing changes.
    let bad = herald_tests::config_file("[namespace.small]\nhistory_ttl = \"forever\"\n");
    let (ok, refused) = cluster.cli(1, &["namespaces", "--set", bad.to_str().unwrap()]);
    assert!(!ok, "{refused}");
    assert!(
        refused.starts_with(&format!(
            "herald: {}: line 2 (`history_ttl = \"forever\"`): invalid duration \"forever\"",
            bad.display()
        )) && refused.contains("\"none\" for no age limit; nothing was sent"),
        "{refused}"
    );
    let (ok, shown) = cluster.cli(1, &["namespaces"]);
    assert!(ok && shown.contains("history_size = 2"), "{shown}");
}

/// The SIGTERM hand-over asks another voter when the first one refuses. Node 3 is cut off
/// from node 2 in one direction (node 2 and node 1 still reach it), so it refuses to take
/// over node 1's partitions (it could not lead node 2); node 2 can. With both followers
/// caught up, node 3 is asked first (a tie goes to the higher id, as it did when only one
/// voter was asked, and then no partition was handed over: each waited for a failover).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigterm_hand_over_asks_another_voter_when_the_first_refuses() {
    let mut cluster = Cluster::start_relayed(3);
    let led: Vec<u64> = group_views(&cluster, 1)
        .unwrap()
        .iter()
        .filter(|v| v.leader == Some(1))
        .filter_map(|v| v.partition)
        .collect();
    assert!(!led.is_empty(), "node 1 leads a partition");
    herald_tests::wait_until("nodes 2 and 3 hold node 1's whole log", || {
        let Some(status) = cluster.status(1) else {
            return false;
        };
        status["groups"].as_array().unwrap().iter().all(|g| {
            g["leader"].as_u64() != Some(1)
                || g["lag"].as_object().is_some_and(|lag| {
                    ["2", "3"].iter().all(|id| lag.contains_key(*id))
                        && lag.values().all(|l| l == 0)
                })
        })
    });
    cluster.block(3, 2);
    stop_with_sigterm(&mut cluster, 1);
    let log = cluster.members[0].node.as_ref().unwrap().log();
    // Right as node 1 has exited, node 2 leads its partitions: none waited for a failover.
    let views = group_views(&cluster, 2).unwrap();
    for partition in &led {
        let view = views
            .iter()
            .find(|v| v.partition == Some(*partition))
            .unwrap();
        assert_eq!(
            view.leader,
            Some(2),
            "partition {partition} was not handed over to node 2: {views:?}\nnode 1's log:\n{log}"
        );
        assert!(
            log.contains(&format!(
                "shutting down: node 2 took over partition {partition}"
            )),
            "{log}"
        );
    }
    assert!(
        log.contains("cannot take over") && log.contains("it cannot reach every other voter"),
        "node 3 was asked first and refused: {log}"
    );
    cluster.unblock(3, 2);
    publish_until_acked(&cluster, 2, "after-term", "x").await;
}

/// A node cut off from a partition's leader (but not from the rest of the cluster) gets its
/// publishes to that partition committed through a member that reaches the leader, instead of
/// failing them at the publish timeout; and it calls no elections meanwhile (herald's
/// pre-vote: the other voter still hears the leader), so the leader is not deposed when the
/// link heals (`partition-bridge` in the chaos suite).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cut_off_from_a_leader_publishes_through_another_member() {
    let cluster = Cluster::start_relayed(3);
    let mut channel = String::new();
    for i in 0.. {
        let name = format!("bridged:{i}");
        let reply = publish_until_acked(&cluster, 1, &name, "probe").await;
        if cluster.leader_of(1, partition_of_reply(&reply)) == Some(1) {
            channel = name;
            break;
        }
    }
    let partition = {
        let reply = publish_until_acked(&cluster, 1, &channel, "before").await;
        partition_of_reply(&reply)
    };
    let elections_of_node_2 = |cluster: &Cluster| {
        group_views(cluster, 2)
            .unwrap()
            .iter()
            .find(|v| v.partition == Some(u64::from(partition)))
            .map(|v| v.elections)
            .unwrap()
    };
    let elections_before = elections_of_node_2(&cluster);

    cluster.block(1, 2);
    cluster.block(2, 1);
    let cut_at = std::time::Instant::now();
    let mut sent = vec!["probe".to_string(), "before".to_string()];
    for i in 0..5 {
        let data = format!("cut-{i}");
        // Retried with its message id until acknowledged: without a way around the cut link,
        // none ever is while the link stays cut.
        publish_until_acked(&cluster, 2, &channel, &data).await;
        sent.push(data);
    }
    // Long enough for openraft's timers to have called a dozen elections on node 2 (about
    // three a second); a starved machine may delay the leader's heartbeats to node 3 past a
    // lease now and then, and then node 2 may rightly call one.
    tokio::time::sleep(Duration::from_secs(5).saturating_sub(cut_at.elapsed())).await;
    let elections_during = elections_of_node_2(&cluster) - elections_before;
    assert!(
        elections_during <= 3,
        "node 2 called {elections_during} elections in partition {partition} while the other voter heard its leader; its log:\n{}",
        cluster.node(2).log()
    );
    eventually_equal("node 3's history", &sent, || {
        history_payloads(cluster.node(3), &channel)
    })
    .await;

    cluster.unblock(1, 2);
    cluster.unblock(2, 1);
    publish_until_acked(&cluster, 2, &channel, "healed").await;
    sent.push("healed".to_string());
    eventually_equal("node 2's history", &sent, || {
        history_payloads(cluster.node(2), &channel)
    })
    .await;
    assert_eq!(
        cluster.leader_of(2, partition),
        Some(1),
        "node 1 still leads"
    );
}

/// A member restarted without its cluster settings (a config file not picked up) must not
/// open its store as a single node: a publish there would take a position the other members
/// give another event, and after a restart with the right settings the node's history would
/// differ from theirs for good. It refuses to start, and says what to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_members_store_refuses_to_open_as_a_single_node() {
    let mut cluster = Cluster::start(3);
    publish_until_acked(&cluster, 1, "member:1", "before").await;
    cluster.kill(3);
    // The cluster's count: a store of another count is refused for that already.
    let data_dir = cluster.data_dir(3).to_path_buf();
    let (status, stderr) = herald_tests::serve_expecting_refusal([
        "--partitions",
        "4",
        "--data-dir",
        data_dir.to_str().unwrap(),
    ])
    .await;
    assert!(
        status.is_some_and(|s| !s.success()),
        "a member's store was served as a single node ({status:?}): {stderr}"
    );
    assert!(
        stderr.contains("belongs to a cluster member") && stderr.contains("--node-id"),
        "{stderr}"
    );
    // With its settings it rejoins, and has what the others have.
    cluster.start_node(3, 3);
    publish_until_acked(&cluster, 1, "member:1", "after").await;
    eventually_equal(
        "node 3's history",
        &vec!["before".to_string(), "after".to_string()],
        || history_payloads(cluster.node(3), "member:1"),
    )
    .await;
}

/// The documented way back for a member that lost its disk, in the order an operator
/// rebuilding its machine takes: remove it and join it again while it is still down, then
/// start it on its empty data directory. The members must judge it by the store it shows
/// after the join, not by the one it had before (they recorded that old store at the join,
/// and refused the node for good).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_lost_its_disk_is_joined_again_before_it_is_back() {
    let mut cluster = Cluster::start(3);
    publish_until_acked(&cluster, 1, "rebuilt:1", "before").await;
    cluster.wipe(3);
    remove_node_3_and_join_it_again(&cluster);
    cluster.start_node(3, 3);
    publish_until_acked(&cluster, 3, "rebuilt:1", "after").await;
    eventually_equal(
        "node 3 catches up",
        &vec!["before".to_string(), "after".to_string()],
        || history_payloads(cluster.node(3), "rebuilt:1"),
    )
    .await;
    let (_, status) = cluster.cli(1, &["status"]);
    assert!(!status.contains("REFUSED"), "{status}");
}

/// The documented way back for a member that lost its disk, taken while it runs and while
/// publishers keep the partitions busy: it is refused on its empty store, removed, joined
/// again, catches up (from snapshots and logs) and is ready, with every Raft group running.
/// (Under load, its Raft groups quit on "try to get log at index 0", and it could not start
/// again.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_back_on_an_empty_disk_is_joined_again_under_load_while_it_runs() {
    let mut cluster = Cluster::start_with(3, &["--raft-snapshot-logs", "200"]);
    let http = cluster.node(1).http;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut acked = 0u64;
            for n in 0u64.. {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let body = json!({ "channel": format!("busy:{}", n % 16), "data": n });
                if try_publish(http, &body).await.is_ok() {
                    acked += 1;
                }
            }
            acked
        })
    };
    publish_until_acked(&cluster, 1, "rebuilt:2", "before").await;
    // Joined again right after its removal: the join waits for the partitions' leaders to
    // have taken node 3 out of their groups (it would otherwise stay a voter there, with the
    // progress its lost store had made).
    rejoin_on_an_empty_disk(&mut cluster, 3, 1);
    publish_until_acked(&cluster, 1, "rebuilt:2", "after").await;
    let want = ["before".to_string(), "after".to_string()];
    node_3_catches_up_and_is_ready(&cluster, "rebuilt:2", &want).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let acked = load.await.unwrap();
    assert!(acked > 0, "the load published nothing");
    cluster.wait_converged();
    let log = cluster.node(3).log();
    assert!(
        !log.contains("quit RaftCore"),
        "a Raft group quit on node 3:\n{log}"
    );
    // It starts again on what it caught up on.
    stop_with_sigterm(&mut cluster, 3);
    cluster.start_node(3, 3);
    publish_until_acked(&cluster, 3, "rebuilt:2", "restarted").await;
}

/// Node `id` loses its disk and comes back on an empty one; once node `via` refuses its new
/// store, it is removed and joined again through `via` (the documented way back).
fn rejoin_on_an_empty_disk(cluster: &mut Cluster, id: u64, via: u64) {
    cluster.wipe(id);
    cluster.start_node(id, 3);
    herald_tests::wait_until(
        &format!("node {via} refuses node {id} on its empty store"),
        || {
            cluster
                .node(via)
                .log()
                .contains(&format!("refusing node {id}"))
        },
    );
    let node = id.to_string();
    let (ok, text) = cluster.cli(via, &["remove", "--node-id", &node]);
    assert!(ok, "remove failed: {text}");
    let addr = format!(
        "127.0.0.1:{}",
        cluster.members[(id - 1) as usize].cluster_port
    );
    let (ok, text) = cluster.cli(via, &["join", "--node-id", &node, "--addr", &addr]);
    assert!(ok, "join right after the removal failed: {text}");
}

/// A member started on a stale copy of its data directory refuses the members whose store
/// changed since the copy (here node 1, joined again on a new disk), and they refuse it (it
/// went back in time). Its refusal is worth nothing, as it is no member: the healthy members
/// took it at their word, answered `/ready` 503 "refused by the cluster: node 3 refuses it",
/// served no stream or history, and stayed so after it had exited (an operator's finding).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_on_a_stale_copy_of_its_data_does_not_get_the_healthy_members_refused() {
    let mut cluster = Cluster::start(3);
    publish_until_acked(&cluster, 1, "stale:1", "first").await;
    cluster.kill(3);
    let stale = cluster.back_up(3);
    cluster.start_node(3, 3);
    // Node 1 loses its disk and is joined again: a new store, which nodes 2 and 3 record.
    rejoin_on_an_empty_disk(&mut cluster, 1, 2);
    publish_until_acked(&cluster, 3, "stale:1", "second").await;
    node_ready(&cluster, 1);
    // Every partition has its three voters again (node 3 leaving one with two would stop it).
    herald_tests::wait_until("every partition has three voters", || {
        cluster.status(2).is_some_and(|status| {
            status["groups"].as_array().unwrap().iter().all(|g| {
                g["voters"]
                    .as_array()
                    .is_some_and(|voters| voters.len() == 3)
            })
        })
    });
    // Node 3 back on the stale copy: it knows node 1's old store.
    cluster.restore(3, &stale);
    cluster.start_node(3, 3);
    herald_tests::wait_until("the stale node 3 refuses node 1", || {
        cluster.node(3).log().contains("refusing node 1")
    });
    herald_tests::wait_until("node 1 refuses the stale node 3", || {
        cluster.node(1).log().contains("refusing node 3")
    });
    // Nodes 1 and 2 (once they replaced node 3 as leader where it led) are ready and stay
    // so, and serve history, while it runs and after it has gone.
    for phase in ["while it runs", "after it has gone"] {
        node_ready(&cluster, 1);
        node_ready(&cluster, 2);
        // (Not "ready" at every look: a loaded machine can make a heartbeat late.)
        for _ in 0..10 {
            for id in [1, 2] {
                let ready = herald_tests::cluster::get_json(cluster.node(id), "/ready").unwrap();
                assert!(
                    !ready["status"].as_str().unwrap().contains("refused"),
                    "node {id} {phase}: {ready}"
                );
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        node_ready(&cluster, 1);
        node_ready(&cluster, 2);
        let history = herald_tests::try_history_payloads(cluster.node(1), "stale:1").await;
        assert_eq!(
            history,
            Ok(vec!["first".to_string(), "second".to_string()]),
            "node 1's history {phase}"
        );
        cluster.kill(3);
    }
}

fn node_ready(cluster: &Cluster, id: u64) {
    let mut last = None;
    let deadline = std::time::Instant::now() + PATIENCE;
    while std::time::Instant::now() < deadline {
        last = herald_tests::cluster::get_json(cluster.node(id), "/ready");
        if last
            .as_ref()
            .is_some_and(|ready| ready["status"] == "ready")
        {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = cluster.node(id).log();
    let tail: Vec<&str> = log.lines().rev().take(60).collect();
    panic!(
        "node {id} is not ready: {last:?}\n{}",
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    );
}

/// Partitions whose voters are down commit nowhere, and a node that reaches the majority of
/// the members serves the others as well as any member could: it keeps its streams and says
/// ready, with the problem. In a 5-node cluster that lost two nodes (or split 2|3), every
/// node of the majority side sent every stream away ("this node lost its cluster quorum")
/// and answered `/ready` 503, though it committed most partitions: streaming was out
/// everywhere, clients bouncing from node to node (a chaos tester's finding).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_out_everywhere_do_not_send_the_streams_of_a_sound_node_away() {
    let mut cluster = Cluster::start(5);
    let channels = channel_per_partition(cluster.node(1).http, "split").await;
    let status = cluster.status(1).unwrap();
    let voters_of = |partition: u16| -> Vec<u64> {
        status["groups"]
            .as_array()
            .unwrap()
            .iter()
            .find(|g| g["partition"] == partition)
            .unwrap()["voters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect()
    };
    let (whole, _) = channels
        .iter()
        .find(|(_, p)| !voters_of(*p).iter().any(|v| *v >= 4))
        .expect("a partition on nodes 1-3");
    assert!(
        channels
            .iter()
            .any(|(_, p)| voters_of(*p).contains(&4) && voters_of(*p).contains(&5)),
        "a partition on nodes 4 and 5: {status}"
    );
    let mut stream = sse(cluster.node(1).http, whole, None).await;
    cluster.kill(4);
    cluster.kill(5);
    // Every node left says so, the one that leads a partition whose other voters are gone
    // included (the members it reaches hear it, which is not a quorum: it said 503).
    for id in 1..=3 {
        herald_tests::wait_until(&format!("node {id} says it is ready, degraded"), || {
            herald_tests::cluster::get_json(cluster.node(id), "/ready").is_some_and(|ready| {
                ready["status"] == "ready"
                    && ready["degraded"]
                        .as_str()
                        .is_some_and(|d| d.contains("no member this node reaches commits it"))
            })
        });
    }
    let stats = herald_tests::cluster::get_json(cluster.node(1), "/api/realtime/stats").unwrap();
    assert_eq!(stats["status"], "degraded", "{stats}");
    // Past the 3 s a node without quorum waits before it sends its streams away: the stream
    // is still there, and gets what is published to its partition.
    tokio::time::sleep(Duration::from_secs(4)).await;
    try_publish(
        cluster.node(2).http,
        &json!({ "channel": whole, "data": { "n": 7 } }),
    )
    .await
    .expect("the partition on nodes 1-3 commits");
    assert_eq!(read_n(&mut stream, 1).await, vec![7]);
}

/// A node that formed a cluster of its own (started with itself as its only peer) refuses
/// this cluster's members as non-members of its cluster: a join of it is refused, naming its
/// cluster, instead of adding a member that never answers (it was accepted, and the warning
/// blamed its address: an operator's finding).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_of_another_formed_cluster_is_not_joined() {
    let cluster = Cluster::start_some(4, 3, &[]);
    let own = format!("4@127.0.0.1:{}", cluster.members[3].cluster_port);
    let mut args = cluster.serve_args(4);
    let at = |flag: &str| args.iter().position(|a| a == flag).unwrap() + 1;
    let (peers, expect) = (at("--peers"), at("--bootstrap-expect"));
    args[peers] = own;
    args[expect] = "1".to_string();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let alone = herald_tests::Herald::start_in(herald_tests::scratch_dir("alone"), &args, &[]);
    herald_tests::wait_until("node 4 formed a cluster of its own", || {
        herald_tests::cluster::get_json(&alone, "/ready").is_some_and(|r| r["status"] == "ready")
    });
    let addr = format!("127.0.0.1:{}", cluster.members[3].cluster_port);
    let (ok, text) = cluster.cli(1, &["join", "--node-id", "4", "--addr", &addr]);
    assert!(!ok, "joined: {text}");
    assert!(
        text.contains("node 4 is a member of another cluster (epoch ")
            && text.contains("nothing was changed"),
        "{text}"
    );
    assert!(
        cluster.status(1).unwrap()["members"].get("4").is_none(),
        "node 4 is not a member"
    );
}

/// Nodes 1 and 2 formed with `--bootstrap-expect 2` though their `--peers` name node 3,
/// which was started later expecting 3: they let it connect (it is in their peers), so no
/// refusal tells it, but the formation asked them and they said they formed without it. Its
/// status and `/ready` say it is left out and how to join it (they kept saying node 1 would
/// form the cluster once three nodes answered: an operator's finding).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_a_formation_left_out_says_so() {
    let mut cluster = Cluster::start_some(3, 2, &[]);
    cluster.start_node(3, 3);
    herald_tests::wait_until("node 3's /ready says it was left out", || {
        herald_tests::cluster::get_json(cluster.node(3), "/ready").is_some_and(|ready| {
            ready["status"]
                .as_str()
                .is_some_and(|s| s.starts_with("the cluster was formed without this node (epoch "))
        })
    });
    let (_, table) = cluster.cli(3, &["status"]);
    assert!(
        table.contains("\nLEFT OUT: the cluster was formed without this node")
            && table.contains("herald cluster join --node-id 3"),
        "{table}"
    );
}

/// A second process started under a member's node id (a copied config, a stale pod) is
/// refused, and the member itself keeps working: refusals are judged per connection, by the
/// store each shows, not per node id (the member used to be refused too, for as long as its
/// connections lasted, and the partitions it led stalled).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_process_with_a_members_id_does_not_cut_the_member_off() {
    let cluster = Cluster::start(3);
    // A channel whose partition node 2 leads: its publishes need node 2's Raft messages to be
    // taken by the others.
    let mut channel = String::new();
    for i in 0.. {
        let name = format!("impostor:{i}");
        let reply = publish_until_acked(&cluster, 1, &name, "probe").await;
        if cluster.leader_of(1, partition_of_reply(&reply)) == Some(2) {
            channel = name;
            break;
        }
    }
    let impostor = cluster.start_impostor(2);
    for id in [1, 3] {
        herald_tests::wait_until(&format!("node {id} refuses the impostor"), || {
            cluster.node(id).log().contains("refusing node 2")
        });
    }
    let mut sent = vec!["probe".to_string()];
    for i in 0..5 {
        let data = format!("with-impostor-{i}");
        let body = json!({ "channel": channel, "data": data, "messageId": data });
        let mut attempts = 0;
        loop {
            attempts += 1;
            match try_publish(cluster.node(1).http, &body).await {
                Ok(_) => break,
                Err(error) => assert!(attempts < 3, "{data} not acknowledged: {error}"),
            }
        }
        sent.push(data);
    }
    let (_, status) = cluster.cli(1, &["status"]);
    assert!(!status.contains("REFUSED"), "{status}");
    drop(impostor);
    eventually_equal("node 2's history", &sent, || {
        history_payloads(cluster.node(2), &channel)
    })
    .await;
}

/// Three nodes formed by --bootstrap-expect whose forming node (1) stops after the cluster's
/// Init, leaving every partition uncreated (a test-only fault, as if it died there).
fn a_cluster_whose_formation_stops_after_init() -> Cluster {
    // Only the forming node acts on it; given to each node's process, not set in this one
    // (where it reached the nodes of every test running alongside under `cargo test`).
    let stop: &[(&str, &str)] = &[("HERALD_TEST_FORMATION_STOPS_AFTER_INIT", "1")];
    let mut cluster = Cluster::prepare_with_env(3, &[(1, stop), (2, stop), (3, stop)]);
    for id in [2, 3, 1] {
        cluster.start_node(id, 3);
    }
    herald_tests::wait_until("the forming node stopped after Init", || {
        cluster
            .node(1)
            .log()
            .contains("partitions left uninitialised")
    });
    cluster
}

/// A formation cut short between the cluster's Init and the partitions' initialisation (the
/// forming node killed in those milliseconds; here a test-only fault stops it there) left a
/// cluster that said it was formed but whose partitions never had a voter: not ready, for
/// good, whatever was restarted. The meta leader finishes the formation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_formation_cut_short_is_finished_by_the_meta_leader() {
    let cluster = a_cluster_whose_formation_stops_after_init();
    // Converged: every group has a leader every node agrees on.
    cluster.wait_converged();
    for i in 0..8 {
        publish_until_acked(&cluster, 1 + i % 3, &format!("formed:{i}"), "x").await;
    }
    let log = cluster.node(1).log();
    assert!(
        log.contains("formation was cut short"),
        "the meta leader (node 1) said what it did: {log}"
    );
}

/// `herald cluster init` on a formed cluster whose partitions were never created (a formation
/// cut short, as above) creates them, over the cluster's members, as the meta leader would ten
/// seconds later; it says it changed nothing only when nothing was missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_init_creates_the_partitions_of_a_formation_cut_short() {
    let cluster = a_cluster_whose_formation_stops_after_init();
    let (ok, text) = cluster.cli(2, &["init"]);
    assert!(ok, "init failed: {text}");
    cluster.wait_converged();
    for i in 0..8 {
        publish_until_acked(&cluster, 1 + i % 3, &format!("created:{i}"), "x").await;
    }
    let log = cluster.node(2).log();
    assert!(
        log.contains("creating the partitions no member has a log for"),
        "{log}"
    );
    let (ok, text) = cluster.cli(2, &["init"]);
    assert!(!ok && text.contains("already formed"), "{text}");
}

/// A member that was down while big events were published catches up: AppendEntries carry
/// at most about 1 MiB of entries each. openraft sent up to 300 entries at once (19 MiB of
/// 64 KiB events) and gave each request the heartbeat interval to be answered: the request
/// never made it in time, was sent again and again, and the member never caught up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_catches_up_on_big_events() {
    let mut cluster = Cluster::start(3);
    cluster.kill(3);
    let big = "x".repeat(64 << 10);
    let client = reqwest::Client::new();
    for i in 0..300 {
        let body = json!({ "channel": "big:1", "data": format!("{i:03}{big}"), "messageId": format!("big-{i}") });
        let mut attempts = 0;
        loop {
            attempts += 1;
            let sent = client
                .post(format!("http://{}/api/publish", cluster.node(1).http))
                .json(&body)
                .timeout(Duration::from_secs(20))
                .send()
                .await;
            match sent {
                Ok(response) if response.status() == 200 => break,
                other => assert!(attempts < 20, "publish {i}: {other:?}"),
            }
        }
    }
    let want = history_payloads(cluster.node(1), "big:1").await;
    assert_eq!(want.len(), 100, "the default namespace keeps 100");
    cluster.start_node(3, 3);
    eventually_equal("node 3's history", &want, || {
        history_payloads(cluster.node(3), "big:1")
    })
    .await;
}

/// A node started with another partition count than the others (a mistake in one node's
/// flags) is not let into the cluster at formation: it used to become a voter and the leader
/// of a partition it could not serve (its meta group stopped on the cluster's Init), and
/// publishes to that partition failed through every node. The forming node says why it waits;
/// restarted with the right count on an empty data directory, the node completes the cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_another_partition_count_is_not_let_in_at_formation() {
    let mut cluster = Cluster::start_some(3, 0, &[]);
    cluster.start_node_with_partitions(3, 3, 8);
    cluster.start_node(2, 3);
    cluster.start_node(1, 3);
    herald_tests::wait_until("the forming node names the mismatch", || {
        cluster
            .node(1)
            .log()
            .contains("node 3 runs more partitions than this node (4)")
    });
    let status = cluster.status(1).expect("status");
    assert_eq!(
        status["formed"], false,
        "formed without a third good node: {status}"
    );
    cluster.wipe(3);
    cluster.start_node(3, 3);
    cluster.wait_converged();
    for i in 0..8 {
        publish_until_acked(&cluster, 1 + i % 3, &format!("counted:{i}"), "x").await;
    }
}

/// A node started with another partition count than the cluster's is refused by `herald
/// cluster join`, with fewer partitions as with more: a node with fewer was let in, its meta
/// group stopped on the cluster's `Init` ("created with 2 partitions but 4 were requested"),
/// and the others made it a voter all the same, costing the cluster its fault tolerance.
#[test]
fn a_join_of_a_node_with_another_partition_count_is_refused() {
    let mut cluster = Cluster::start_some(4, 3, &[]);
    let addr = format!("127.0.0.1:{}", cluster.members[3].cluster_port);
    for (partitions, described) in [(2, "fewer"), (8, "more")] {
        cluster.start_node_with_partitions(4, 3, partitions);
        let (ok, text) = cluster.cli(2, &["join", "--node-id", "4", "--addr", &addr]);
        assert!(!ok, "joined with {partitions} partitions: {text}");
        assert!(
            text.contains(&format!(
                "node 4 runs {described} partitions than the cluster (4): the count is fixed when a store is created; start it with --partitions 4 on an empty data directory, then join it"
            )),
            "{text}"
        );
        let members = cluster.status(1).expect("status")["members"].clone();
        assert!(members.get("4").is_none(), "node 4 is a member: {members}");
        cluster.wipe(4);
    }
    cluster.start_node(4, 3);
    let (ok, text) = cluster.cli(2, &["join", "--node-id", "4", "--addr", &addr]);
    assert!(ok, "join failed: {text}");
    cluster.wait_converged();
}

/// A node joined before it was up (the join cannot ask it its partition count, and lets it
/// in, as it lets in a wrong address) and then started with another count than the cluster's
/// is never made a voter: its meta group stopped on the cluster's `Init`, and as a voter it
/// cost the groups their fault tolerance. The leaders say why.
#[test]
fn a_node_of_another_partition_count_joined_before_it_was_up_never_votes() {
    let mut cluster = Cluster::start_some(4, 3, &[]);
    let addr = format!("127.0.0.1:{}", cluster.members[3].cluster_port);
    let (ok, text) = cluster.cli(1, &["join", "--node-id", "4", "--addr", &addr]);
    assert!(ok, "join failed: {text}");
    cluster.start_node_with_partitions(4, 3, 2);
    herald_tests::wait_until("a leader refuses node 4 a vote", || {
        (1..=3).any(|id| {
            cluster.node(id).log().contains(
                "node 4 runs fewer partitions than the cluster (4): it is not made a voter of any group",
            )
        })
    });
    let status = cluster.status(1).expect("status");
    for group in status["groups"].as_array().unwrap() {
        assert!(
            !group["voters"].as_array().unwrap().contains(&json!(4)),
            "node 4 votes: {group}"
        );
    }
}

/// `herald cluster` gives up on a node that does not answer (here SIGSTOPped: its kernel
/// still accepts the connection), as `herald health` does, instead of waiting forever: a read
/// after its default timeout, a change after `--timeout`, saying the change may still
/// complete.
#[test]
fn cluster_commands_give_up_on_a_node_that_does_not_answer() {
    let cluster = Cluster::start(1);
    cluster.node(1).signal("STOP");
    let (ok, out) = cluster.cli(1, &["status"]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("no answer from") && out.contains("within 10s") && out.contains("--timeout"),
        "{out}"
    );
    let (ok, out) = cluster.cli(
        1,
        &[
            "join",
            "--node-id",
            "2",
            "--addr",
            "127.0.0.1:7999",
            "--timeout",
            "1s",
        ],
    );
    assert!(!ok, "{out}");
    assert!(
        out.contains("within 1s to the join of node 2")
            && out.contains("the change may still complete; check with `herald cluster status`"),
        "{out}"
    );
    let (ok, out) = cluster.cli(1, &["remove", "--node-id", "2", "--timeout", "2"]);
    assert!(!ok, "{out}");
    assert!(out.contains("within 2s to the removal of node 2"), "{out}");
    cluster.node(1).signal("CONT");
    let (ok, out) = cluster.cli(1, &["status", "--timeout", "30s"]);
    assert!(ok, "{out}");
    let (ok, out) = cluster.cli(1, &["status", "--timeout", "0"]);
    assert!(
        !ok && out.contains("the timeout must be above zero"),
        "{out}"
    );
}

/// `herald cluster status --help` says what the table shows: every column of the groups'
/// header, and nothing the table does not show (it has no commit positions).
#[test]
fn the_status_help_names_what_the_table_shows() {
    let cluster = Cluster::start(1);
    let (ok, table) = cluster.cli(1, &["status"]);
    assert!(ok, "{table}");
    let header = table
        .lines()
        .find(|l| l.starts_with("group "))
        .unwrap_or_else(|| panic!("no groups header: {table}"));
    let output = std::process::Command::new(herald_tests::herald_binary())
        .args(["cluster", "status", "--help"])
        .output()
        .expect("run herald cluster status --help");
    assert!(output.status.success());
    let help = String::from_utf8(output.stdout).unwrap().to_lowercase();
    for column in header.split_whitespace() {
        let column = column.trim_matches(|c| c == '(' || c == ')');
        assert!(
            help.contains(column),
            "help does not name `{column}`:\n{help}"
        );
    }
    for shown in ["members", "connected", "unreachable", "refused"] {
        assert!(
            help.contains(shown),
            "help does not name `{shown}`:\n{help}"
        );
    }
    assert!(
        !help.contains("commit"),
        "the table shows no commit positions:\n{help}"
    );
}

/// `herald cluster remove --node-id ID` through node 1: its exit status, stdout and stderr.
fn cli_remove(cluster: &Cluster, id: &str) -> (bool, String, String) {
    let output = std::process::Command::new(herald_tests::herald_binary())
        .args(["cluster", "remove", "--node-id", id, "--http"])
        .arg(cluster.node(1).http.to_string())
        .output()
        .expect("run herald cluster remove");
    let stdout = String::from_utf8(output.stdout).unwrap();
    let stderr = String::from_utf8(output.stderr).unwrap();
    (output.status.success(), stdout, stderr)
}

/// A removal that leaves the cluster unable to survive a failure (two members) succeeds, and
/// says on stderr what the operator lost. One more is refused: every partition's voters are
/// then the last two members, and a group of two cannot drop one once the members stop
/// taking its messages (it was accepted, and no partition ever committed again, with no way
/// back: an operator's finding).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removal_down_to_two_members_warns_and_one_more_is_refused() {
    let cluster = Cluster::start(3);
    let (ok, stdout, stderr) = cli_remove(&cluster, "3");
    assert!(ok, "{stdout}{stderr}");
    assert!(
        stdout.starts_with("removed: node 3 is no longer a member"),
        "{stdout}"
    );
    assert!(
        !stdout.contains("warning"),
        "the warning goes to stderr: {stdout}"
    );
    assert!(
        stderr.starts_with("herald: warning: the cluster has 2 members left (nodes 1 and 2)")
            && stderr.contains("no failure tolerance")
            && stderr.contains("herald cluster join"),
        "{stderr}"
    );
    let (ok, stdout, stderr) = cli_remove(&cluster, "2");
    assert!(!ok, "{stdout}{stderr}");
    assert!(
        stderr.contains("removing node 2 would leave partition")
            && stderr.contains("A cluster cannot shrink below two members")
            && stderr.contains("--force"),
        "{stderr}"
    );
    // Nothing changed: both members commit on every partition.
    for via in [1, 2] {
        for (channel, _) in channel_per_partition(cluster.node(via).http, "pair").await {
            publish_until_acked(&cluster, via, &channel, "still").await;
        }
    }
}

/// Two removals back to back (an operator shrinking 4 nodes to 2... or 5 to 3) left the
/// partitions whose voters were both removed nodes with one voter the members still hear, for
/// good: the second removal came before the partitions' leaders had taken the first node out.
/// A removal now answers once the node has left every partition group, so the next one finds
/// the groups whole; every partition commits afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_removals_back_to_back_leave_every_partition_committing() {
    let cluster = Cluster::start(4);
    for id in ["4", "3"] {
        let (ok, stdout, stderr) = cli_remove(&cluster, id);
        assert!(ok, "removing node {id}: {stdout}{stderr}");
    }
    for (channel, _) in channel_per_partition(cluster.node(1).http, "shrunk").await {
        publish_until_acked(&cluster, 2, &channel, "after").await;
    }
}

/// A node of another cluster (its own certificates, peers and addresses) started on a
/// member's data directory is refused, saying whose directory it is and what to do, instead
/// of serving that cluster's history as its own; the member then starts on it as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_of_another_cluster_is_refused_a_members_data_directory() {
    use herald_tests::cluster::{certs, free_udp_port};
    let mut cluster = Cluster::start(1);
    publish_until_acked(&cluster, 1, "theirs:1", "kept").await;
    cluster.kill(1);

    let tls = herald_tests::scratch_dir("other-cluster-tls");
    let tls = tls.to_str().unwrap();
    certs(&["init", "--dir", tls, "--issue", "1,2,3"]);
    let ports: Vec<u16> = (0..3).map(|_| free_udp_port()).collect();
    let peers = (1..=3)
        .map(|id| format!("{id}@127.0.0.1:{}", ports[id - 1]))
        .collect::<Vec<_>>()
        .join(",");
    let cluster_addr = format!("127.0.0.1:{}", ports[0]);
    let data_dir = cluster.data_dir(1).to_path_buf();
    let (status, stderr) = herald_tests::serve_expecting_refusal([
        "--node-id",
        "1",
        "--tls-dir",
        tls,
        "--peers",
        &peers,
        "--cluster-addr",
        &cluster_addr,
        "--bootstrap-expect",
        "3",
        "--partitions",
        "4",
        "--data-dir",
        data_dir.to_str().unwrap(),
    ])
    .await;
    assert!(
        status.is_some_and(|s| s.code() == Some(1)),
        "a node of another cluster ran on a member's data directory ({status:?}): {stderr}"
    );
    let last = stderr.lines().last().unwrap_or_default();
    let member = format!("1 at 127.0.0.1:{}", cluster.members[0].cluster_port);
    assert!(
        last.contains(&format!(
            "data directory {} holds the store of another cluster",
            cluster.data_dir(1).display()
        )) && last.contains(&member)
            && last.contains("start this node on its own data directory"),
        "{stderr}"
    );

    cluster.start_node(1, 1);
    cluster.wait_converged();
    eventually_equal(
        "the member's history, as it was",
        &vec!["kept".to_string()],
        || history_payloads(cluster.node(1), "theirs:1"),
    )
    .await;
    let _ = std::fs::remove_dir_all(tls);
}

/// A node removed from the cluster, once it knows it (its `/ready` says so), refuses durable
/// publishes at once, saying it was removed (they used to wait out the publish timeout and fail
/// with "its leader ... was unreachable ...; this node may be cut off"), and sends its SSE and
/// RESP subscribers elsewhere with that reason (they were told it "lost its cluster quorum").
/// Joined again, it says so and takes publishes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_node_tells_publishers_and_subscribers_it_was_removed() {
    let cluster = Cluster::start(4);
    let (ok, text) = cluster.cli(1, &["remove", "--node-id", "4"]);
    assert!(ok, "remove failed: {text}");
    let removed = cluster.node(4);
    herald_tests::wait_until("node 4's /ready says it was removed", || {
        herald_tests::cluster::get_json(removed, "/ready").is_some_and(|r| {
            r["status"]
                .as_str()
                .is_some_and(|s| s.starts_with("removed from the cluster"))
        })
    });
    // Its `herald cluster status` says so first (it listed the members it last knew, as if
    // all was well).
    let (ok, table) = cluster.cli(4, &["status"]);
    assert!(
        ok && table
            .lines()
            .nth(1)
            .is_some_and(|l| l.starts_with("REMOVED: this node was removed from the cluster")),
        "{table}"
    );
    let refused = try_publish(removed.http, &json!({ "channel": "gone:1", "data": 1 }))
        .await
        .expect_err("a removed node must not acknowledge publishes");
    assert!(
        refused.starts_with("503")
            && refused.contains("this node was removed from the cluster")
            && refused.contains("publish to another node"),
        "{refused}"
    );
    let mut publisher = herald_tests::RawConn::connect(removed.resp);
    publisher.command(&[b"PUBLISH", b"gone:1", b"x"]);
    let reply = String::from_utf8_lossy(&publisher.read_until_suffix(b"\r\n")).into_owned();
    assert!(
        reply.starts_with("-") && reply.contains("this node was removed from the cluster"),
        "{reply}"
    );

    let mut events = sse(removed.http, "gone:1", None).await;
    let reconnect = next_non_message(&mut events).await;
    assert_eq!(reconnect.event, "reconnect", "{reconnect:?}");
    assert!(
        reconnect
            .data
            .contains("this node was removed from the cluster; reconnect to another node"),
        "{}",
        reconnect.data
    );
    let mut subscriber = herald_tests::RawConn::connect(removed.resp);
    subscriber.command(&[b"SUBSCRIBE", b"gone:1"]);
    let rest = tokio::task::spawn_blocking(move || subscriber.read_to_close())
        .await
        .unwrap();
    assert!(
        String::from_utf8_lossy(&rest).ends_with(
            "-ERR this node was removed from the cluster: reconnect to another node (HSUBSCRIBE resumes from your cursor)\r\n"
        ),
        "{}",
        String::from_utf8_lossy(&rest)
    );

    let addr = format!("127.0.0.1:{}", cluster.members[3].cluster_port);
    let (ok, text) = cluster.cli(1, &["join", "--node-id", "4", "--addr", &addr]);
    assert!(ok, "join failed: {text}");
    herald_tests::wait_until("node 4 says it is a member again", || {
        removed
            .log()
            .contains("this node is a member of the cluster again (joined)")
    });
    publish_until_acked(&cluster, 4, "gone:1", "back").await;
}

/// A node in no formed cluster (started, not joined yet: `/ready` 503) sends its SSE clients
/// elsewhere with `event: reconnect`. It used to hold their streams open with nothing ever to
/// deliver: a browser's `EventSource` behind a proxy without health checks (open-source
/// nginx) that landed on it stayed there for good, receiving nothing. Once joined, it streams.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_not_joined_yet_sends_its_streams_elsewhere_until_it_is() {
    let mut cluster = Cluster::start_some(4, 3, &[]);
    cluster.start_node(4, 3);
    let http = cluster.node(4).http;
    // Its store open (while it opens, every stream is told "starting" instead).
    herald_tests::wait_until("node 4's store is open", || {
        herald_tests::cluster::get_json(cluster.node(4), "/health")
            .is_some_and(|h| h["status"] == "healthy")
    });
    let mut events = sse(http, "waiting:1", None).await;
    let reconnect = next_non_message(&mut events).await;
    assert_eq!(reconnect.event, "reconnect", "{reconnect:?}");
    assert!(
        reconnect
            .data
            .contains("this node is not in a formed cluster yet; reconnect to another node"),
        "{}",
        reconnect.data
    );

    let addr = format!("127.0.0.1:{}", cluster.members[3].cluster_port);
    let (ok, text) = cluster.cli(1, &["join", "--node-id", "4", "--addr", &addr]);
    assert!(ok, "join failed: {text}");
    cluster.wait_converged();
    // A member now, it streams what is published elsewhere. Its watcher looks every 250 ms,
    // so a stream opened just before it did may still be sent away: open another then.
    let deadline = std::time::Instant::now() + PATIENCE;
    for n in 0.. {
        let mut events = sse(http, "waiting:1", None).await;
        try_publish(
            cluster.node(1).http,
            &json!({ "channel": "waiting:1", "data": { "n": n } }),
        )
        .await
        .expect("publish");
        let event = tokio::time::timeout(PATIENCE, events.next())
            .await
            .expect("an event in time")
            .expect("an event before the stream ends");
        if event.event == "message" {
            let data: Value = serde_json::from_str(&event.data).unwrap();
            assert_eq!(data["n"], n);
            break;
        }
        assert_eq!(event.event, "reconnect", "{event:?}");
        assert!(
            std::time::Instant::now() < deadline,
            "node 4 still sends streams away once joined: {}",
            event.data
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A node started with another node's id on a member's data directory (`--node-id 2` on
/// node 3's) is refused, naming both ids and the directory: it would take node 3's Raft state
/// for node 2's, believe it leads node 2's partitions, and the members would advise removing
/// the healthy node 2. Node 3 then starts on its directory as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_started_under_another_id_on_a_members_data_directory_is_refused() {
    let mut cluster = Cluster::start(3);
    publish_until_acked(&cluster, 1, "ids:1", "kept").await;
    cluster.kill(3);
    let data_dir = cluster.data_dir(3).to_path_buf();
    let mut args = cluster.serve_args(3);
    let at = args.iter().position(|a| a == "--node-id").unwrap() + 1;
    args[at] = "2".to_string();
    args.extend(["--data-dir".to_string(), data_dir.display().to_string()]);
    let (status, stderr) = herald_tests::serve_expecting_refusal(&args).await;
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(1),
        "node 2 ran on node 3's data directory: {stderr}"
    );
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with(&format!(
            "herald: store in {} belongs to node 3, not node 2: start node 2 on its own data directory (--data-dir), or start this one as node 3 (--node-id 3)",
            data_dir.join("store").display()
        )),
        "{stderr}"
    );
    cluster.start_node(3, 3);
    cluster.wait_converged();
    eventually_equal(
        "node 3's history, as it was",
        &vec!["kept".to_string()],
        || history_payloads(cluster.node(3), "ids:1"),
    )
    .await;
}

/// libfaketime, which shifts a process's wall clock (`scripts/install-test-deps` installs
/// it), under the machine's multiarch directory (`/usr/lib/<arch>-linux-gnu/faketime`).
fn libfaketime() -> Option<String> {
    std::fs::read_dir("/usr/lib")
        .ok()?
        .flatten()
        .find_map(|dir| {
            let lib = dir.path().join("faketime/libfaketime.so.1");
            lib.exists().then(|| lib.to_string_lossy().into_owned())
        })
}

/// The environment that runs a node under libfaketime (at `lib`) with its wall clock `by`
/// (`+2h`) ahead; timers and Raft run on the monotonic clock, left alone.
fn clock_ahead<'a>(lib: &'a str, by: &'a str) -> [(&'a str, &'a str); 3] {
    [
        ("LD_PRELOAD", lib),
        ("FAKETIME", by),
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
    ]
}

/// A member whose clock runs two hours ahead leads a partition after a message id was
/// committed there: its entries must not carry its clock, which would move the partition's
/// clock two hours on and make every member forget the message id (a retry would commit
/// twice). The members measure each other's clocks and the skewed one proposes with the
/// majority's time; `herald cluster status` shows the skew.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_with_a_clock_hours_ahead_does_not_make_the_cluster_forget_message_ids() {
    const TWO_HOURS_MS: i64 = 2 * 3_600_000;
    let libfaketime = libfaketime().expect("libfaketime is missing: run scripts/install-test-deps");
    let ahead = clock_ahead(&libfaketime, "+2h");
    let mut cluster = Cluster::start_with_env(3, &[(3, &ahead)]);
    let near = |ms: Option<i64>, expected: i64| ms.is_some_and(|ms| (ms - expected).abs() < 60_000);
    herald_tests::wait_until("node 3 knows its clock is two hours ahead", || {
        let status = cluster.status(3).unwrap_or_default();
        near(status["clock_correction_ms"].as_i64(), -TWO_HOURS_MS)
    });
    herald_tests::wait_until("node 1 sees node 3's clock two hours ahead", || {
        let status = cluster.status(1).unwrap_or_default();
        status["clock_correction_ms"].as_i64() == Some(0)
            && near(status["links"]["3"]["clockOffsetMs"].as_i64(), TWO_HOURS_MS)
    });
    let (ok, table) = cluster.cli(1, &["status"]);
    assert!(ok && table.contains("CLOCK +7200"), "{table}");
    // Prometheus sees it too.
    let metrics = metrics_of(cluster.node(3).http).await;
    let correction = metrics
        .lines()
        .find_map(|l| l.strip_prefix("herald_clock_correction_ms "))
        .and_then(|v| v.parse::<f64>().ok());
    assert!(
        near(correction.map(|c| c as i64), -TWO_HOURS_MS),
        "{correction:?} in:\n{metrics}"
    );

    // Partition 2 is node 3's (its first voter): while node 3 is down, a message id is
    // committed there under node 1's or 2's clock.
    cluster.kill(3);
    cluster.wait_converged();
    let mut first = None;
    for i in 0..64 {
        let channel = format!("clock:{i}");
        let reply = publish_until_acked(&cluster, 1, &channel, "once").await;
        if partition_of_reply(&reply) == 2 {
            first = Some((channel, reply));
            break;
        }
    }
    let (channel, first) = first.expect("a channel on partition 2");
    assert_eq!(first["duplicate"], json!(false), "{first}");

    // Node 3 comes back and takes partition 2 back; it commits there.
    cluster.start_node(3, 3);
    herald_tests::wait_until("node 3 leads partition 2 again", || {
        cluster.leader_of(1, 2) == Some(3) && cluster.leader_of(3, 2) == Some(3)
    });
    let later = publish_until_acked(&cluster, 1, &channel, "later").await;
    assert_eq!(partition_of_reply(&later), 2);

    // The retry of the first publish is still known.
    let retry = publish_until_acked(&cluster, 1, &channel, "once").await;
    assert_eq!(
        (&retry["duplicate"], &retry["position"]),
        (&json!(true), &first["position"]),
        "the message id was forgotten: {retry}"
    );
}

/// A member whose clock runs three hours ahead neither hides nor deletes events of a
/// namespace with a one-hour TTL: its reads judge TTLs by the majority's time, and its expiry
/// deletes an event only once the partition's replicated clock has passed its deadline too.
/// (It deleted them by its own clock, and its snapshots carried the loss to the members that
/// installed them.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_with_a_clock_hours_ahead_neither_hides_nor_deletes_history_early() {
    const THREE_HOURS_MS: i64 = 3 * 3_600_000;
    let libfaketime = libfaketime().expect("libfaketime is missing: run scripts/install-test-deps");
    let ahead = clock_ahead(&libfaketime, "+3h");
    let config = herald_tests::config_file("[namespace.ttl]\nhistory_ttl = \"1h\"\n");
    let mut cluster = Cluster::start_with_args_and_env(
        3,
        &["--config", config.to_str().unwrap()],
        &[(3, &ahead)],
    );
    herald_tests::wait_until("node 3 knows its clock is three hours ahead", || {
        let status = cluster.status(3).unwrap_or_default();
        status["clock_correction_ms"]
            .as_i64()
            .is_some_and(|ms| (ms + THREE_HOURS_MS).abs() < 60_000)
    });
    // Channels on several partitions, published through a sane node and the skewed one.
    let channels: Vec<String> = (0..8).map(|i| format!("ttl:{i}")).collect();
    for (i, channel) in channels.iter().enumerate() {
        let via = if i % 2 == 0 { 1 } else { 3 };
        publish_until_acked(&cluster, via, channel, "kept").await;
    }
    let want = vec!["kept".to_string()];
    node_holds_each(&cluster, 3, &channels, &want, "shows").await;
    // Node 3's expiry runs every 5 s: let two passes go by, then look at what its store kept,
    // with its clock put right.
    tokio::time::sleep(std::time::Duration::from_secs(11)).await;
    cluster.kill(3);
    cluster.clear_node_env(3);
    cluster.start_node(3, 3);
    node_holds_each(&cluster, 3, &channels, &want, "kept in its store").await;
}

/// Waits until node `id`'s history of each of `channels` is `want` (`what` it did, for the
/// failure message).
async fn node_holds_each(
    cluster: &Cluster,
    id: u64,
    channels: &[String],
    want: &[String],
    what: &str,
) {
    let want = want.to_vec();
    for channel in channels {
        eventually_equal(
            &format!("node {id} {what} {channel}'s events"),
            &want,
            || async {
                herald_tests::try_history_payloads(cluster.node(id), channel)
                    .await
                    .unwrap_or_default()
            },
        )
        .await;
    }
}

/// One channel (named `{prefix}:{k}`) per partition, each published to once through `http`
/// while the cluster is whole: whether that node leads the partition or forwards to its leader.
async fn channel_per_partition(http: std::net::SocketAddr, prefix: &str) -> Vec<(String, u16)> {
    let mut channels = Vec::new();
    for k in 0..64 {
        let channel = format!("{prefix}:{k}");
        let reply = try_publish(http, &json!({ "channel": channel, "data": 0 }))
            .await
            .expect("publish while the cluster is whole");
        let partition = partition_of_reply(&reply);
        if !channels.iter().any(|(_, p)| *p == partition) {
            channels.push((channel, partition));
        }
    }
    assert_eq!(channels.len(), 4, "a channel per partition: {channels:?}");
    channels
}

/// Publishes through `http` until one is `refused` (one in flight when the node learns may be
/// told its outcome is unknown), then requires every partition's publish to be refused too.
async fn assert_publishes_refused_at_once(
    http: std::net::SocketAddr,
    channels: &[(String, u16)],
    refused: impl Fn(&str) -> bool,
) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let error = try_publish(http, &json!({ "channel": channels[0].0, "data": 1 }))
            .await
            .expect_err("a node that can commit with no other member must not acknowledge");
        if refused(&error) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never refused at once: {error}"
        );
    }
    for (channel, partition) in channels {
        let error = try_publish(http, &json!({ "channel": channel, "data": 2 }))
            .await
            .expect_err("a node that can commit with no other member must not acknowledge");
        assert!(refused(&error), "partition {partition}: {error}");
    }
}

/// A node no other member answers any more refuses durable publishes as soon as it knows (a
/// second of silence), saying it lost its quorum and that nothing was committed, rather than
/// holding each one for the publish timeout (two minutes here: a wait would fail the test).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_no_member_answers_refuses_publishes_at_once() {
    let mut cluster = Cluster::start_with(3, &["--publish-timeout", "120s"]);
    let lone = cluster.node(1).http;
    let channels = channel_per_partition(lone, "orders").await;
    cluster.kill(2);
    cluster.kill(3);
    assert_publishes_refused_at_once(lone, &channels, |error| {
        error.starts_with("503")
            && error.contains("lost its quorum")
            && error.contains("nothing was committed")
    })
    .await;
}

/// A node whose every other member came back on an empty data directory (it refuses them:
/// they would vote as if they still held what they acknowledged) cannot commit anything: it
/// refuses durable publishes at once, naming the refusal and saying nothing was committed,
/// rather than holding each one for the publish timeout (two minutes here) and answering
/// "outcome unknown" while its `/ready` already says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_refuses_every_other_member_refuses_publishes_at_once() {
    let mut cluster = Cluster::start_with(3, &["--publish-timeout", "120s"]);
    let lone = cluster.node(1).http;
    let channels = channel_per_partition(lone, "wiped-peers").await;
    cluster.wipe(2);
    cluster.wipe(3);
    cluster.start_node(2, 3);
    cluster.start_node(3, 3);
    herald_tests::wait_until("node 1 refuses nodes 2 and 3", || {
        let log = cluster.node(1).log();
        log.contains("refusing node 2") && log.contains("refusing node 3")
    });
    // Its `/ready` names the members it refuses, not a symptom (a group with no leader).
    herald_tests::wait_until("node 1's /ready names the members it refuses", || {
        herald_tests::cluster::get_json(cluster.node(1), "/ready").is_some_and(|ready| {
            ready["status"]
                .as_str()
                .is_some_and(|status| status.contains("refuses node 2, node 3"))
        })
    });
    assert_publishes_refused_at_once(lone, &channels, |error| {
        error.starts_with("503")
            && error.contains("refuses")
            && error.contains("nothing was committed")
    })
    .await;
    // So do its stats, which no longer say "healthy".
    let stats = herald_tests::cluster::get_json(cluster.node(1), "/api/realtime/stats")
        .expect("the stats answer");
    assert_eq!(stats["status"], "unavailable", "{stats}");
    assert_eq!(stats["channels"]["isConnected"], false, "{stats}");
    assert!(
        stats["reason"]
            .as_str()
            .is_some_and(|r| r.contains("refuses node 2, node 3")),
        "{stats}"
    );
}

/// The clients of a node that was just `kill -9`ed reconnect to the others at once: their
/// new subscriptions are confirmed and get the events published after. Confirming waits until
/// the other members know the interest, and the dead node (its connection open until the idle
/// timeout) is given up once it has answered nothing for 400 ms, so no subscribe runs into
/// the 1 s interest-sync limit. (When the push waited the whole limit for the dead node, the
/// subscribe's own 1 s wait raced it: this counter check caught that in about one run of
/// three; the time itself is measured by the chaos harness, `docs/reliability.md`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribes_right_after_a_member_dies_do_not_wait_for_it() {
    let mut cluster = Cluster::start(3);
    let http = cluster.node(1).http;
    // Interest pushes before the kill, answered by everyone.
    let _before = sse(http, "moved:warmup", None).await;
    cluster.kill(3);
    // At once, as reconnecting clients do, on channels node 1 holds no interest in yet.
    let mut streams = Vec::new();
    for i in 0..3 {
        streams.push(sse(http, &format!("moved:{i}"), None).await);
    }
    let metrics = metrics_of(http).await;
    assert!(
        metrics.contains("herald_interest_sync_timeouts_total 0"),
        "a subscribe waited the whole limit for the dead node:\n{metrics}"
    );
    for (i, stream) in streams.iter_mut().enumerate() {
        let channel = format!("moved:{i}");
        publish_until_acked(&cluster, 2, &channel, "after").await;
        assert_eq!(next_message(stream).await.data, "after");
    }
}

/// Read-your-writes on one node: a publish acknowledged by a node that forwarded it to its
/// partition's leader is in that node's history and stream replays at once, although the
/// node applies it only when the leader's next message tells it of the commit. (Before the
/// fix, HISTORY right after PUBLISH missed the event for most channels.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_after_an_acknowledged_publish_on_the_same_node_sees_it() {
    let cluster = Cluster::start(3);
    let node = cluster.node(1);
    let mut conn =
        herald_tests::patient_connection(&redis::Client::open(node.url()).unwrap()).await;
    // Channels on every partition, most of them led by another node.
    for i in 0..200 {
        let channel = format!("ryw:{}", i % 40);
        let payload = format!("v{i}");
        let _: i64 = conn.publish(&channel, &payload).await.unwrap();
        let history: Vec<(String, Vec<u8>)> = redis::cmd("HISTORY")
            .arg(&channel)
            .arg("LAST")
            .arg(1)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(
            history.last().map(|(_, p)| p.as_slice()),
            Some(payload.as_bytes()),
            "publish {i} on {channel}"
        );
    }
    // Over HTTP and SSE: a stream opened right after the publish's answer replays it.
    for i in 0..20 {
        let channel = format!("ryw-sse:{i}");
        let body = json!({"channel": channel, "data": {"n": i}});
        try_publish(node.http, &body).await.unwrap();
        let mut events = sse(node.http, &format!("{channel}?last=1"), None).await;
        assert_eq!(read_n(&mut events, 1).await, vec![i]);
    }
}

/// The WARN and ERROR lines of a node's log.
fn warnings_and_errors(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|line| line.contains(" WARN ") || line.contains(" ERROR "))
        .collect()
}

/// Asserts that nodes 1-3 logged no WARN or ERROR since `logged` (each one's log length then)
/// for `what`, and still show cluster epoch `epoch`: the command changed nothing.
fn assert_members_unchanged(cluster: &Cluster, logged: &[usize], epoch: &str, what: &str) {
    for id in 1..=3u64 {
        let log = cluster.node(id).log();
        let since = &log[logged[id as usize - 1]..];
        assert!(
            warnings_and_errors(since).is_empty(),
            "node {id} logged for {what}:\n{since}"
        );
        let status = cluster.status(id).expect("status");
        assert_eq!(status["epoch"].as_str(), Some(epoch), "node {id}");
    }
}

/// `herald cluster init` on a formed cluster says plainly that it is formed and fails (exit 1:
/// it formed nothing, as `herald certs init` over an existing CA fails), on any node; the
/// cluster is unchanged, and no node logs a WARN or an ERROR for it. (It answered "formed"
/// with exit 0, and every node logged openraft's "Can not initialize" ERROR for each group.)
#[test]
fn an_init_of_a_formed_cluster_says_it_is_formed_and_changes_nothing() {
    let cluster = Cluster::start(3);
    let epoch = cluster.status(1).expect("status")["epoch"]
        .as_str()
        .expect("an epoch")
        .to_string();
    let logged: Vec<usize> = (1..=3).map(|id| cluster.node(id).log().len()).collect();
    for via in [1, 2] {
        let (ok, text) = cluster.cli(via, &["init"]);
        assert!(!ok, "an init of a formed cluster succeeded: {text}");
        assert!(
            text.starts_with(&format!(
                "herald: the cluster is already formed (epoch {epoch}; members 1 at 127.0.0.1:"
            )) && text.contains("nothing was changed")
                && text.contains("herald cluster join"),
            "{text}"
        );
    }
    // What a second init did (nothing) would have been logged by now.
    std::thread::sleep(Duration::from_secs(1));
    assert_members_unchanged(&cluster, &logged, &epoch, "the init");
    cluster.wait_converged();
}

/// `herald cluster status` on a node whose cluster is not formed yet shows what it waits for,
/// itself, and the peers it was started with, each with its link (it showed an empty member
/// list: nothing to tell a peer that is down from one that is up).
#[test]
fn the_status_of_a_node_not_formed_yet_shows_it_and_its_peers() {
    let mut cluster = Cluster::start_some(3, 0, &[]);
    cluster.start_node(1, 0);
    cluster.start_node(2, 0);
    let port = |id: u64| cluster.members[id as usize - 1].cluster_port;
    let want = [
        format!("  1  127.0.0.1:{}  connected, rtt ", port(1)),
        format!("  2  127.0.0.1:{}  this node", port(2)),
        format!("  3  127.0.0.1:{}  UNREACHABLE (", port(3)),
    ];
    let mut table = String::new();
    let deadline = std::time::Instant::now() + PATIENCE;
    while !want.iter().all(|line| table.contains(line.as_str())) {
        assert!(
            std::time::Instant::now() < deadline,
            "want lines {want:#?} in:\n{table}"
        );
        std::thread::sleep(Duration::from_millis(200));
        let (ok, text) = cluster.cli(2, &["status"]);
        assert!(ok, "{text}");
        table = text;
    }
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("node 2  formed: false"), "{table}");
    assert!(
        lines[1].starts_with("not formed yet: waiting for `herald cluster init`")
            && lines[1].contains(&format!(
                "herald cluster join --node-id 2 --addr 127.0.0.1:{}",
                port(2)
            )),
        "{table}"
    );
    assert_eq!(
        lines[2], "members: none yet; the peers this node was started with (--peers):",
        "{table}"
    );
    assert!(
        lines[3..6]
            .iter()
            .zip(&want)
            .all(|(l, w)| l.starts_with(w.as_str())),
        "{table}"
    );
    let status = cluster.status(2).expect("status");
    assert_eq!(status["bootstrap_expect"], 0, "{status}");
    assert_eq!(
        status["peers"].as_object().map(|p| p.len()),
        Some(2),
        "{status}"
    );
}

/// A healthy formation by `--bootstrap-expect`, of nodes started a few seconds apart (longer
/// than a dial's timeout, so that the first node's first dials to the others fail), logs no
/// WARN and no ERROR line on any node. (Each node warned that it could not connect to a node
/// not started yet, and of the handshakes its peers gave up.)
#[test]
fn a_formation_of_nodes_started_one_after_another_logs_no_warning_or_error() {
    let mut cluster = Cluster::start_some(3, 0, &[]);
    for id in 1..=3 {
        if id > 1 {
            std::thread::sleep(Duration::from_millis(2500));
        }
        cluster.start_node(id, 3);
    }
    cluster.wait_converged();
    // Whatever follows a formation (placement rounds, clocks) has a second to show.
    std::thread::sleep(Duration::from_secs(1));
    for id in 1..=3 {
        let log = cluster.node(id).log();
        assert!(
            warnings_and_errors(&log).is_empty(),
            "node {id} warned during a healthy formation:\n{log}"
        );
    }
}

/// A cluster formed by hand, as an operator does it: node 1 alone (`--peers` naming itself),
/// `herald cluster init`, then nodes 2 and 3, each started with `--peers` naming node 1 and
/// itself and joined with `herald cluster join` a few seconds later, logs no WARN and no ERROR
/// line on any node. (A node waiting to be joined dials its peers, which refused it with a
/// WARN on each attempt, and it warned that it could not connect.)
#[test]
fn a_cluster_formed_by_init_and_joins_logs_no_warning_or_error() {
    use herald_tests::cluster::{certs, free_udp_port, get_json};
    use herald_tests::{Herald, scratch_dir};
    let tls = scratch_dir("init-join-tls");
    let tls = tls.to_str().unwrap();
    certs(&["init", "--dir", tls, "--issue", "1,2,3"]);
    let ports: Vec<u16> = (0..3).map(|_| free_udp_port()).collect();
    let addr = |id: usize| format!("127.0.0.1:{}", ports[id - 1]);
    let start = |id: usize, peers: &str| {
        let node_id = id.to_string();
        let cluster_addr = addr(id);
        let args = [
            "--node-id",
            &node_id,
            "--cluster-addr",
            &cluster_addr,
            "--peers",
            peers,
            "--tls-dir",
            tls,
            "--partitions",
            "4",
        ];
        Herald::start_in(scratch_dir(&format!("init-join-{id}")), &args, &[])
    };
    let cli = |node: &Herald, args: &[&str]| {
        let output = std::process::Command::new(herald_tests::herald_binary())
            .arg("cluster")
            .args(args)
            .arg("--http")
            .arg(node.http.to_string())
            .output()
            .expect("run herald cluster");
        let text = String::from_utf8_lossy(&output.stdout).to_string()
            + &String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "herald cluster {args:?}: {text}");
    };
    let mut nodes = vec![start(1, &format!("1@{}", addr(1)))];
    cli(&nodes[0], &["init"]);
    for id in [2, 3] {
        nodes.push(start(id, &format!("1@{},{id}@{}", addr(1), addr(id))));
        // Long enough for the new node to dial node 1 and be refused, as it is until joined.
        std::thread::sleep(Duration::from_secs(2));
        cli(
            &nodes[0],
            &["join", "--node-id", &id.to_string(), "--addr", &addr(id)],
        );
    }
    // Every node formed, with a leader for every group, which every node names alike.
    let converged = || {
        let views: Vec<Option<Vec<Value>>> = nodes
            .iter()
            .map(|node| {
                let status = get_json(node, "/api/cluster/status")?;
                let groups = status["groups"].as_array()?;
                (status["formed"] == true
                    && status["members"].as_object()?.len() == 3
                    && groups.iter().all(|g| g["leader"].is_u64()))
                .then(|| groups.iter().map(|g| g["leader"].clone()).collect())
            })
            .collect();
        views.iter().all(Option::is_some) && views.windows(2).all(|w| w[0] == w[1])
    };
    herald_tests::wait_until("the three nodes form one cluster", converged);
    std::thread::sleep(Duration::from_secs(1));
    for (id, node) in nodes.iter().enumerate() {
        let log = node.log();
        assert!(
            warnings_and_errors(&log).is_empty(),
            "node {} warned while the cluster was formed by hand:\n{log}",
            id + 1
        );
    }
    drop(nodes);
    let _ = std::fs::remove_dir_all(tls);
}

/// A leader does not try to hand a partition back to its preferred node while that node is
/// dead. (A dead node's replication progress stays where it was on an idle partition, so it
/// looked ready: the leader tried again and again, each try closing the partition to
/// publishes for a few hundred milliseconds and holding up its other hand-backs.)
#[test]
fn no_partition_is_handed_back_to_a_dead_node() {
    let mut cluster = Cluster::start(3);
    cluster.wait_converged();
    let led_by_2_and_3 = |cluster: &Cluster| {
        cluster.status(2).is_some_and(|s| {
            s["groups"]
                .as_array()
                .unwrap()
                .iter()
                .all(|g| g["partition"].is_null() || g["leader"] == 2 || g["leader"] == 3)
        })
    };
    // Node 1 freezes: nodes 2 and 3 take its partitions. It wakes up and answers their
    // heartbeats, so their leaders know it caught up, and dies before they hand anything back.
    cluster.node(1).signal("STOP");
    herald_tests::wait_until("nodes 2 and 3 lead every partition", || {
        led_by_2_and_3(&cluster)
    });
    cluster.node(1).signal("CONT");
    std::thread::sleep(Duration::from_millis(1000));
    cluster.kill(1);
    assert!(led_by_2_and_3(&cluster), "{:?}", cluster.status(2));
    // A hand-back already under way when node 1 died ends within a couple of leases.
    std::thread::sleep(Duration::from_secs(3));
    let logged: Vec<usize> = [2, 3].map(|id| cluster.node(id).log().len()).to_vec();
    // A leader hands back after three placement rounds (seconds) of readiness; give it several.
    std::thread::sleep(Duration::from_secs(10));
    for (i, id) in [2u64, 3].into_iter().enumerate() {
        let log = cluster.node(id).log();
        let tries: Vec<&str> = log[logged[i]..]
            .lines()
            .filter(|line| line.contains("hand") && line.contains(" to=1"))
            .collect();
        assert!(
            tries.is_empty(),
            "node {id} tried to hand a partition to dead node 1:\n{}",
            tries.join("\n")
        );
    }
}

/// `herald cluster init` through a node started after its cluster formed (so not a member,
/// and not formed itself) refuses, saying the cluster is formed (its epoch and members) and
/// how to join the node, and forms nothing; the members log no WARN or ERROR for it. (It
/// answered "not the leader of group 0 (leader: None)", after the node had formed a meta
/// group of its own over its --peers, whose elections moved the real cluster's meta leader.)
/// Both for a node the members name in their --peers (it connects and asks) and one they do
/// not (they refuse its connections, and say their epoch in the refusal).
#[test]
fn an_init_through_a_node_started_after_the_cluster_formed_refuses_and_forms_nothing() {
    use herald_tests::cluster::{certs, cli_via, free_udp_port};
    let mut cluster = Cluster::start_some(4, 3, &[]);
    let epoch = cluster.status(1).expect("status")["epoch"]
        .as_str()
        .expect("an epoch")
        .to_string();
    // Node 4: in every member's --peers, started to wait for an init.
    cluster.start_node(4, 0);
    // Node 5: in no member's --peers; its own name the members and itself.
    let tls = cluster.tls_dir().to_str().unwrap().to_string();
    certs(&["issue", "--dir", &tls, "--node-id", "5"]);
    let port5 = free_udp_port();
    let peers = (1..=3)
        .map(|id| format!("{id}@127.0.0.1:{}", cluster.members[id - 1].cluster_port))
        .chain([format!("5@127.0.0.1:{port5}")])
        .collect::<Vec<_>>()
        .join(",");
    let node5 = herald_tests::Herald::start_in(
        herald_tests::scratch_dir("node5"),
        &[
            "--node-id",
            "5",
            "--cluster-addr",
            &format!("127.0.0.1:{port5}"),
            "--peers",
            &peers,
            "--tls-dir",
            &tls,
            "--partitions",
            &herald_tests::cluster::TEST_PARTITIONS.to_string(),
        ],
        &[],
    );
    let logged: Vec<usize> = (1..=3).map(|id| cluster.node(id).log().len()).collect();
    for (id, http, port) in [
        (4, cluster.node(4).http, cluster.members[3].cluster_port),
        (5, node5.http, port5),
    ] {
        let (ok, text) = cli_via(http, &["init"]);
        assert!(!ok, "an init through node {id} succeeded: {text}");
        assert!(
            text.starts_with(&format!(
                "herald: the cluster is already formed (epoch {epoch}; members 1 at 127.0.0.1:"
            )) && text.contains("nothing was changed")
                && text.contains(&format!(
                    "`herald cluster join --node-id {id} --addr 127.0.0.1:{port}` through a member"
                )),
            "node {id}: {text}"
        );
    }
    // A meta group formed by the init would have been logged, and have called elections, by now.
    std::thread::sleep(Duration::from_secs(3));
    for (id, node) in [(4, cluster.node(4)), (5, &node5)] {
        let log = node.log();
        assert!(
            !log.contains("formed the meta group"),
            "node {id} formed a meta group:\n{log}"
        );
        let status = herald_tests::cluster::get_json(node, "/api/cluster/status").expect("status");
        assert_eq!(status["formed"], false, "node {id}: {status}");
        assert_eq!(
            status["groups"][0]["voters"],
            json!([]),
            "node {id}: {status}"
        );
    }
    assert_members_unchanged(&cluster, &logged, &epoch, "the inits");
    // Node 5, refused as a non-member, tells its probes and publishers why it is out (it
    // said "not formed yet", as if no cluster existed).
    let left_out =
        format!("the cluster was formed without this node (epoch {epoch}; members 1 at 127.0.0.1:");
    let join_5 =
        format!("`herald cluster join --node-id 5 --addr 127.0.0.1:{port5}` through a member");
    herald_tests::wait_until("node 5's /ready says it was left out", || {
        herald_tests::cluster::get_json(&node5, "/ready").is_some_and(|ready| {
            ready["status"]
                .as_str()
                .is_some_and(|s| s.starts_with(&left_out) && s.contains(&join_5))
        })
    });
    let status = herald_tests::cluster::get_json(&node5, "/api/cluster/status").expect("status");
    assert!(
        status["left_out"]
            .as_str()
            .is_some_and(|s| s.starts_with(&left_out)),
        "{status}"
    );
    let mut publisher = herald_tests::RawConn::connect(node5.resp);
    publisher.command(&[b"PUBLISH", b"out:1", b"x"]);
    let reply = String::from_utf8_lossy(&publisher.read_until_suffix(b"\r\n")).into_owned();
    assert!(
        reply.starts_with(&format!("-ERR publish failed: {left_out}"))
            && reply.contains("nothing was committed"),
        "{reply}"
    );
    // Joined, node 4 becomes a member as usual.
    let addr = format!("127.0.0.1:{}", cluster.members[3].cluster_port);
    let (ok, text) = cluster.cli(1, &["join", "--node-id", "4", "--addr", &addr]);
    assert!(ok, "join failed: {text}");
    cluster.wait_converged();
}

/// A node started with a cluster's flags for node 1 (its address, peers and certificates)
/// while node 1 is down, but on the data directory of another cluster, refuses to start before
/// it opens its endpoint: the members, which dial node 1's address all the time, log no WARN or
/// ERROR about it. (It opened its endpoint first and answered their dials showing the other
/// cluster's store, and they logged "refusing node 1: it runs on another store ... remove it
/// and join it again" of their node 1, whose own data directory is intact.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_on_another_clusters_data_directory_is_refused_before_it_opens_its_endpoint() {
    let mut cluster = Cluster::start(3);
    let mut other = Cluster::start(1);
    other.kill(1);
    cluster.kill(1);
    let logged: Vec<usize> = (2..=3).map(|id| cluster.node(id).log().len()).collect();
    let mut args = cluster.serve_args(1);
    args.extend(["--data-dir".into(), other.data_dir(1).display().to_string()]);
    let (status, stderr) = herald_tests::serve_expecting_refusal(&args).await;
    assert!(
        status.is_some_and(|s| s.code() == Some(1)),
        "a node ran on another cluster's data directory ({status:?}): {stderr}"
    );
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.contains(&format!(
            "data directory {} holds the store of another cluster",
            other.data_dir(1).display()
        )) && last.contains(&format!("1 at 127.0.0.1:{}", other.members[0].cluster_port))
            && last.contains("start this node on its own data directory"),
        "{stderr}"
    );
    // The members dial node 1 every couple of seconds at most.
    tokio::time::sleep(Duration::from_secs(3)).await;
    for id in 2..=3 {
        let log = cluster.node(id).log();
        let since = &log[logged[id as usize - 2]..];
        let about_its_store: Vec<&str> = warnings_and_errors(since)
            .into_iter()
            .filter(|line| line.contains("another store") || line.contains("refusing node 1"))
            .collect();
        assert!(
            about_its_store.is_empty(),
            "node {id} logged about the refused node:\n{since}"
        );
    }
    cluster.start_node(1, 3);
    cluster.wait_converged();
}

/// A node back from a restart applies the backlog its leaders committed meanwhile; delivered
/// to a subscription made in that window, those old events passed for live ones (a Redis
/// `SUBSCRIBE` on node 3 right after its restart got all 2,000 as if just published). A
/// subscription now waits until the node has caught up: the first event a `SUBSCRIBE` and a
/// live SSE stream get is the one published after them. `/ready` says 503 meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_on_a_node_catching_up_gets_no_event_published_before_it() {
    let mut cluster = Cluster::start(3);
    let channel = "catching-up";
    cluster.kill(3);
    let client = redis::Client::open(cluster.node(1).url()).unwrap();
    let mut publisher = herald_tests::patient_connection(&client).await;
    // Once the partitions node 3 led have moved, a backlog of 2,000 events of 20 KB: seconds
    // to apply for a debug build.
    herald_tests::wait_until("node 1 commits without node 3", || {
        herald_tests::cluster::get_json(cluster.node(1), "/ready")
            .is_some_and(|ready| ready["status"] == "ready")
    });
    let filler = "x".repeat(20_000);
    for batch in 0..20 {
        let mut pipe = redis::pipe();
        for n in 0..100 {
            pipe.publish(channel, format!("old-{batch}-{n}-{filler}"));
        }
        let _: Vec<i64> = pipe.query_async(&mut publisher).await.unwrap();
    }
    cluster.start_node(3, 3);
    // At once (the harness waits for a PING reply only): node 3 is still applying.
    let mut on_c = redis::Client::open(cluster.node(3).url())
        .unwrap()
        .get_async_pubsub()
        .await
        .unwrap();
    on_c.subscribe(channel).await.unwrap();
    let mut stream = sse(cluster.node(3).http, channel, None).await;
    let _: i64 = publisher.publish(channel, "live").await.unwrap();
    assert_next_is_live(&mut on_c).await;
    let first = next_message(&mut stream).await.data;
    assert!(
        first.contains("live") && !first.contains("old-"),
        "the SSE stream on node 3 got an old event as live: {}",
        first.get(..40).unwrap_or(&first)
    );
    node_3_becomes_ready(&cluster);
}

/// A subscription sent to a node while it is paused (`SIGSTOP`, a frozen VM) waits in its
/// socket's backlog and is read the moment it resumes, before the node has even heard from
/// its leaders of what they committed meanwhile: it got that backlog as live events (a chaos
/// tester's finding: 4,364 events published up to 15 s before it). The node notices its own
/// pause and catches up before the subscription starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_sent_to_a_paused_node_gets_no_event_published_before_it() {
    let cluster = Cluster::start(3);
    let channel = "paused-catch-up";
    let client = redis::Client::open(cluster.node(1).url()).unwrap();
    let mut publisher = herald_tests::patient_connection(&client).await;
    let _: i64 = publisher.publish(channel, "first").await.unwrap();
    cluster.node(3).signal("STOP");
    let subscriber = redis::Client::open(cluster.node(3).url()).unwrap();
    let subscribed = tokio::spawn(async move {
        let mut on_c = subscriber.get_async_pubsub().await.unwrap();
        on_c.subscribe(channel).await.unwrap();
        on_c
    });
    let filler = "x".repeat(10_000);
    for batch in 0..10 {
        let mut pipe = redis::pipe();
        for n in 0..100 {
            pipe.publish(channel, format!("old-{batch}-{n}-{filler}"));
        }
        let _: Vec<i64> = pipe.query_async(&mut publisher).await.unwrap();
    }
    // Paused for seconds, not a scheduling hiccup (a node a few hundred milliseconds behind
    // delivers those as live: ordinary lag).
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.node(3).signal("CONT");
    let mut on_c = tokio::time::timeout(PATIENCE, subscribed)
        .await
        .expect("subscribed once node 3 resumed")
        .unwrap();
    let _: i64 = publisher.publish(channel, "live").await.unwrap();
    assert_next_is_live(&mut on_c).await;
}

/// Requires the next message node 3's `subscriber` gets to be `live`, not an old event.
async fn assert_next_is_live(subscriber: &mut redis::aio::PubSub) {
    let mut messages = subscriber.on_message();
    let first = tokio::time::timeout(PATIENCE, messages.next())
        .await
        .expect("an event in time")
        .expect("subscribed");
    let first: String = first.get_payload().unwrap();
    assert_eq!(
        first.get(..12).unwrap_or(&first),
        "live",
        "SUBSCRIBE on node 3 got an old event as live"
    );
}

fn node_3_becomes_ready(cluster: &Cluster) {
    herald_tests::wait_until("node 3 is ready", || {
        herald_tests::cluster::get_json(cluster.node(3), "/ready")
            .is_some_and(|ready| ready["status"] == "ready")
    });
}
