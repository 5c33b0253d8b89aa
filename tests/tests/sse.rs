//! Server-Sent Events with a real SSE parser (`eventsource-stream` over `reqwest`): delivery
//! with ids, resume with `Last-Event-ID` after a disconnect and after `kill -9`, gap notices,
//! bad cursors, publish bursts during reconnects, and payloads that must arrive intact.

use eventsource_stream::{Event, Eventsource};
use futures::{Stream, StreamExt};
use herald_tests::{Herald, PATIENCE, config_file};
use serde_json::{Value, json};
use std::pin::Pin;

type Events = Pin<Box<dyn Stream<Item = Event> + Send>>;

/// Opens an SSE stream; `last_event_id` goes in the `Last-Event-ID` header.
async fn connect(url: &str, last_event_id: Option<&str>) -> Events {
    let mut request = reqwest::Client::new().get(url);
    if let Some(id) = last_event_id {
        request = request.header("Last-Event-ID", id);
    }
    let response = request.send().await.expect("SSE request");
    assert_eq!(
        response.status(),
        200,
        "{}",
        response.text().await.unwrap_or_default()
    );
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    Box::pin(
        response
            .bytes_stream()
            .eventsource()
            .map(|e| e.expect("well-formed SSE")),
    )
}

async fn next(events: &mut Events) -> Event {
    tokio::time::timeout(PATIENCE, events.next())
        .await
        .expect("an event in time")
        .expect("stream open")
}

/// Publishes over HTTP and returns the reply (position, id, duplicate...).
async fn publish(node: &Herald, channel: &str, data: Value, message_id: Option<&str>) -> Value {
    let mut body = json!({ "channel": channel, "data": data });
    if let Some(id) = message_id {
        body["messageId"] = json!(id);
    }
    herald_tests::publish_http(node, &body).await
}

/// The next request a worker subscribed to a requests channel receives, as JSON.
async fn next_request(worker: &mut redis::aio::PubSub) -> Value {
    let message = tokio::time::timeout(PATIENCE, worker.on_message().next())
        .await
        .expect("a worker request in time")
        .expect("the worker's subscription is open");
    serde_json::from_slice(message.get_payload_bytes()).expect("a JSON request")
}

/// Publishes `marker` on the council-score requests channel and checks it is the next message
/// the workers get on `requests`: no request was published before it.
async fn no_request_before_marker(
    node: &Herald,
    requests: &mut (impl futures::Stream<Item = redis::Msg> + Unpin),
    marker: &str,
) {
    publish(node, "council_score_requests", json!(marker), None).await;
    let next = tokio::time::timeout(PATIENCE, requests.next())
        .await
        .expect("a message in time")
        .expect("the subscription is open");
    assert_eq!(next.get_payload_bytes(), marker.as_bytes());
}

fn stream_url(node: &Herald, channel: &str) -> String {
    format!("{}/api/stream/{channel}", node.http_url())
}

/// The `id:` of a stream's first block (with `retry:`, before any event), read off the wire:
/// an SSE parser dispatches no event for it, but a browser keeps it as the last event id.
async fn first_block_id(url: &str) -> Option<String> {
    let mut response = reqwest::Client::new()
        .get(url)
        .send()
        .await
        .expect("SSE request");
    assert_eq!(response.status(), 200);
    let mut text = Vec::new();
    while !text.windows(2).any(|w| w == b"\n\n") {
        let chunk = tokio::time::timeout(PATIENCE, response.chunk())
            .await
            .expect("the first block in time")
            .expect("a readable stream")
            .expect("the stream is open");
        text.extend_from_slice(&chunk);
    }
    let text = String::from_utf8(text).unwrap();
    let block = text.split("\n\n").next().unwrap();
    assert!(block.starts_with("retry: "), "{block:?}");
    block
        .lines()
        .find_map(|line| line.strip_prefix("id: "))
        .map(str::to_string)
}

/// A stream that drops before its channel's first event (an `EventSource` whose node died, a
/// job watched before it starts) resumes from the id of the stream's first block: what was
/// published meanwhile arrives, once each. Without it a browser reconnects with no
/// `Last-Event-ID`, live-only, and those events are lost to it. A stream of a non-durable
/// channel has no id to give.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_dropped_before_its_first_event_resumes_from_its_first_id() {
    let config = config_file("[namespace.fast]\nhistory_size = 0\ndurable = false\n");
    let node = Herald::start_with(&["--config", config.to_str().unwrap()]);
    let url = stream_url(&node, "render_progress:quiet");
    publish(
        &node,
        "render_progress:quiet",
        json!({ "step": "before" }),
        None,
    )
    .await;
    let id = first_block_id(&url)
        .await
        .expect("a durable stream's first block has an id");
    for i in 0..3 {
        publish(&node, "render_progress:quiet", json!({ "step": i }), None).await;
    }
    let mut resumed = connect(&url, Some(&id)).await;
    for i in 0..3 {
        let data: Value = serde_json::from_str(&next(&mut resumed).await.data).unwrap();
        assert_eq!(data["step"], i, "what was published while away, in order");
    }
    publish(
        &node,
        "render_progress:quiet",
        json!({ "step": "live" }),
        None,
    )
    .await;
    let data: Value = serde_json::from_str(&next(&mut resumed).await.data).unwrap();
    assert_eq!(data["step"], "live", "then live, nothing twice");

    assert_eq!(first_block_id(&stream_url(&node, "fast:x")).await, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_arrive_with_ids_and_resume_exactly_after_a_disconnect() {
    let node = Herald::start();
    let url = stream_url(&node, "job_progress:job_1");
    let mut events = connect(&url, None).await;
    for i in 0..3 {
        publish(
            &node,
            "job_progress:job_1",
            json!({ "type": "job_progress", "step": i }),
            None,
        )
        .await;
    }
    let mut last_id = String::new();
    for i in 0..3 {
        let event = next(&mut events).await;
        assert_eq!(event.event, "message");
        let data: Value = serde_json::from_str(&event.data).unwrap();
        assert_eq!(data, json!({ "type": "job_progress", "step": i }));
        assert!(
            !event.id.is_empty() && event.id != last_id,
            "each event has a new id"
        );
        last_id = event.id;
    }
    drop(events);

    for i in 3..6 {
        publish(&node, "job_progress:job_1", json!({ "step": i }), None).await;
    }
    let mut resumed = connect(&url, Some(&last_id)).await;
    for i in 3..8 {
        if i == 6 {
            publish(&node, "job_progress:job_1", json!({ "step": 6 }), None).await;
            publish(&node, "job_progress:job_1", json!({ "step": 7 }), None).await;
        }
        let data: Value = serde_json::from_str(&next(&mut resumed).await.data).unwrap();
        assert_eq!(
            data["step"], i,
            "missed events replayed in order, then live, none twice"
        );
    }

    // Polyfills send the cursor as a query parameter.
    let mut polyfill = connect(&format!("{url}?lastEventId={last_id}"), None).await;
    let data: Value = serde_json::from_str(&next(&mut polyfill).await.data).unwrap();
    assert_eq!(data["step"], 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_n_replays_the_most_recent_events() {
    let node = Herald::start();
    for i in 0..10 {
        publish(&node, "campaign_metrics:c1", json!({ "n": i }), None).await;
    }
    let mut events = connect(
        &format!("{}/api/stream/campaign-metrics/c1?last=3", node.http_url()),
        None,
    )
    .await;
    for i in 7..10 {
        let data: Value = serde_json::from_str(&next(&mut events).await.data).unwrap();
        assert_eq!(data["n"], i);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_events_survive_kill_9_and_cursors_still_resume() {
    let node = Herald::start();
    let url = stream_url(&node, "render_progress:r1");
    let mut events = connect(&url, None).await;
    publish(&node, "render_progress:r1", json!({ "frame": 0 }), None).await;
    let first = next(&mut events).await;
    drop(events);
    let mut acknowledged = Vec::new();
    for i in 1..50 {
        acknowledged.push(publish(&node, "render_progress:r1", json!({ "frame": i }), None).await);
    }
    let data_dir = node.kill_keeping_data();

    let node = Herald::start_in(data_dir, &[], &[]);
    let mut resumed = connect(
        &format!("{}/api/stream/render-progress/r1", node.http_url()),
        Some(&first.id),
    )
    .await;
    for (i, ack) in (1..50).zip(&acknowledged) {
        let event = next(&mut resumed).await;
        let data: Value = serde_json::from_str(&event.data).unwrap();
        assert_eq!(
            data["frame"], i,
            "every acknowledged event is there after kill -9, in order"
        );
        assert_eq!(
            event.id,
            ack["id"].as_str().unwrap(),
            "its cursor is the one the publisher was given"
        );
    }
    let ack = publish(&node, "render_progress:r1", json!({ "frame": 50 }), None).await;
    let event = next(&mut resumed).await;
    assert_eq!(
        serde_json::from_str::<Value>(&event.data).unwrap()["frame"],
        50
    );
    assert_ne!(
        ack["position"],
        acknowledged.last().unwrap()["position"],
        "positions are never reused"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cursor_older_than_retention_gets_a_gap_notice_first() {
    let config = config_file("[namespace.short]\nhistory_size = 3\n");
    let node = Herald::start_with(&["--config", config.to_str().unwrap()]);
    let mut acks = Vec::new();
    for i in 0..10 {
        acks.push(publish(&node, "short:x", json!({ "n": i }), None).await);
    }
    let stale = acks[0]["id"].as_str().unwrap();
    let mut events = connect(&stream_url(&node, "short:x"), Some(stale)).await;
    let gap = next(&mut events).await;
    assert_eq!(gap.event, "gap");
    let gap: Value = serde_json::from_str(&gap.data).unwrap();
    assert_eq!(gap["channel"], "short:x");
    assert_eq!(gap["reason"], "retention");
    assert_eq!(gap["requested"], acks[0]["position"]);
    assert_eq!(gap["oldest"], acks[7]["position"]);
    for i in 7..10 {
        let data: Value = serde_json::from_str(&next(&mut events).await.data).unwrap();
        assert_eq!(data["n"], i, "then everything still retained");
    }

    // A cursor inside retention resumes without a gap notice.
    let mut events = connect(
        &stream_url(&node, "short:x"),
        Some(acks[7]["id"].as_str().unwrap()),
    )
    .await;
    let event = next(&mut events).await;
    assert_eq!(event.event, "message");
    assert_eq!(serde_json::from_str::<Value>(&event.data).unwrap()["n"], 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cursor_from_another_cluster_epoch_is_reported_then_everything_is_replayed() {
    let other = Herald::start();
    let foreign = publish(&other, "news", json!("elsewhere"), None).await;
    let node = Herald::start();
    publish(&node, "news", json!("one"), None).await;
    publish(&node, "news", json!("two"), None).await;
    let mut events = connect(
        &stream_url(&node, "news"),
        Some(foreign["id"].as_str().unwrap()),
    )
    .await;
    let gap = next(&mut events).await;
    assert_eq!(gap.event, "gap");
    let gap: Value = serde_json::from_str(&gap.data).unwrap();
    assert_eq!(gap["reason"], "epoch");
    assert_eq!(gap["requested"], Value::Null);
    assert_eq!(next(&mut events).await.data, "one");
    assert_eq!(next(&mut events).await.data, "two");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_cursors_and_parameters_are_a_400_with_the_reason() {
    let node = Herald::start();
    let client = reqwest::Client::new();
    let cases = [
        (
            stream_url(&node, "news"),
            Some("!!!"),
            "invalid Last-Event-ID: cursor is not base64url",
        ),
        (
            stream_url(&node, "news"),
            Some("AA"),
            "invalid Last-Event-ID: cursor is truncated",
        ),
        (
            format!("{}?lastEventId=AA", stream_url(&node, "news")),
            None,
            "invalid lastEventId: cursor is truncated",
        ),
        (
            format!("{}?last=many", stream_url(&node, "news")),
            None,
            "invalid last 'many': expected a whole number",
        ),
        (
            format!("{}/api/stream", node.http_url()),
            None,
            "no channel given",
        ),
        (
            stream_url(&node, &"n".repeat(1025)),
            None,
            "channel name of 1025 bytes: the limit is 1024",
        ),
        (
            format!(
                "{}/api/stream?{}",
                node.http_url(),
                (0..1025)
                    .map(|i| format!("channel=c{i}"))
                    .collect::<Vec<_>>()
                    .join("&")
            ),
            None,
            "too many channels: one stream or connection holds at most 1024",
        ),
    ];
    for (url, cursor, reason) in cases {
        let mut request = client.get(&url);
        if let Some(cursor) = cursor {
            request = request.header("Last-Event-ID", cursor);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 400, "{url}");
        let body = response.text().await.unwrap();
        assert!(
            body.starts_with(reason) && body.lines().count() == 1,
            "{body:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_burst_during_reconnects_is_delivered_once_in_order() {
    let node = Herald::start();
    let url = stream_url(&node, "burst");
    const TOTAL: u64 = 600;
    // Subscribed before the first publish: a first connect without a cursor takes only what
    // is published after it.
    let mut events = Some(connect(&url, None).await);
    let publisher = {
        let base = node.http_url();
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            for i in 0..TOTAL {
                let body = json!({ "channel": "burst", "data": { "n": i } });
                let response = client
                    .post(format!("{base}/api/publish"))
                    .json(&body)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status(), 200);
            }
        })
    };
    let mut received: Vec<u64> = Vec::new();
    let mut last_id: Option<String> = None;
    let mut reconnects = 0;
    while received.len() < TOTAL as usize {
        let mut events = match events.take() {
            Some(events) => events,
            None => connect(&url, last_id.as_deref()).await,
        };
        // Take a few events, then drop the connection mid-burst.
        for _ in 0..(37 + reconnects * 11) {
            if received.len() == TOTAL as usize {
                break;
            }
            let event = next(&mut events).await;
            received.push(
                serde_json::from_str::<Value>(&event.data).unwrap()["n"]
                    .as_u64()
                    .unwrap(),
            );
            last_id = Some(event.id);
        }
        reconnects += 1;
    }
    publisher.await.unwrap();
    assert!(reconnects > 3);
    assert_eq!(
        received,
        (0..TOTAL).collect::<Vec<_>>(),
        "no loss, no duplicate, in order"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payloads_with_newlines_and_non_ascii_arrive_intact() {
    let node = Herald::start();
    let mut events = connect(&stream_url(&node, "text"), None).await;
    let texts = [
        "line one\nline two\n\nline four",
        "é 中文 ✓ \"quoted\" \\ back",
        "ends with newline\n",
        "",
        "data: not a field",
    ];
    for text in texts {
        publish(&node, "text", json!(text), None).await;
    }
    let object = json!({ "msg": "multi\nline é", "nested": { "list": [1, "два"] } });
    publish(&node, "text", object.clone(), None).await;
    for text in texts {
        assert_eq!(next(&mut events).await.data, text);
    }
    assert_eq!(
        serde_json::from_str::<Value>(&next(&mut events).await.data).unwrap(),
        object
    );

    // The same bytes published over RESP arrive the same way.
    let client = redis::Client::open(node.url()).unwrap();
    let mut connection = herald_tests::patient_connection(&client).await;
    let _: i64 = redis::AsyncCommands::publish(&mut connection, "text", texts[0])
        .await
        .unwrap();
    assert_eq!(next(&mut events).await.data, texts[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_ids_make_retries_commit_once() {
    let node = Herald::start();
    let mut events = connect(&stream_url(&node, "orders"), None).await;
    let first = publish(&node, "orders", json!({ "order": 1 }), Some("order-1")).await;
    let retry = publish(&node, "orders", json!({ "order": 1 }), Some("order-1")).await;
    assert_eq!(first["duplicate"], false);
    assert_eq!(retry["duplicate"], true);
    assert_eq!(retry["position"], first["position"]);
    assert_eq!(first["receivers"], 1, "the stream got the original");
    assert_eq!(retry["receivers"], 0, "the retry delivered nothing");
    publish(&node, "orders", json!({ "order": 2 }), Some("order-2")).await;
    assert_eq!(
        serde_json::from_str::<Value>(&next(&mut events).await.data).unwrap()["order"],
        1
    );
    assert_eq!(
        serde_json::from_str::<Value>(&next(&mut events).await.data).unwrap()["order"],
        2,
        "the retry was not delivered again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn council_score_publishes_a_request_and_streams_the_workers_answer() {
    let node = Herald::start();
    let client = redis::Client::open(node.url()).unwrap();
    let mut worker = client.get_async_pubsub().await.unwrap();
    worker.subscribe("council_score_requests").await.unwrap();
    let mut events = connect(
        &format!(
            "{}/api/stream/council-score?videoUrl=https://v/1.mp4&transcript=hello\
             &replyChannel=alerts:someone",
            node.http_url()
        ),
        None,
    )
    .await;
    let request = next_request(&mut worker).await;
    assert_eq!(request["videoUrl"], "https://v/1.mp4");
    assert_eq!(request["transcript"], "hello");
    // The query cannot choose where the workers answer: the server's reply channel wins over
    // a parameter of the same name.
    let reply_channel = request["replyChannel"].as_str().unwrap().to_string();
    assert!(reply_channel.starts_with("council_score:req_"));
    assert_eq!(
        reply_channel,
        format!("council_score:{}", request["requestId"].as_str().unwrap())
    );
    publish(
        &node,
        &reply_channel,
        json!({ "type": "council_score_stream", "stage": "gemini", "isComplete": false }),
        None,
    )
    .await;
    let data: Value = serde_json::from_str(&next(&mut events).await.data).unwrap();
    assert_eq!(data["stage"], "gemini");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_health_ready_and_metrics() {
    let node = Herald::start();
    let _events = connect(&stream_url(&node, "job_progress:job_9"), None).await;
    publish(&node, "job_progress:job_9", json!({ "p": 1 }), None).await;
    let client = reqwest::Client::new();
    let stats: Value = client
        .get(format!("{}/api/realtime/stats", node.http_url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stats["status"], "healthy");
    assert_eq!(stats["sse"]["totalConnections"], 1);
    assert_eq!(
        stats["sse"]["clients"][0]["channels"][0],
        "job_progress:job_9"
    );
    assert!(
        stats["channels"]["channels"]
            .as_array()
            .unwrap()
            .contains(&json!("job_progress:job_9"))
    );
    assert_eq!(stats["channels"]["isConnected"], true);
    let health: Value = client
        .get(format!("{}/health", node.http_url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["status"], "healthy");
    // Which build the node runs, as `herald --version` says it.
    let version = std::process::Command::new(herald_tests::herald_binary())
        .arg("--version")
        .output()
        .unwrap()
        .stdout;
    let version = String::from_utf8(version).unwrap();
    let commit = health["commit"].as_str().unwrap();
    assert_eq!(
        version,
        format!(
            "herald {} (commit {commit})\n",
            health["version"].as_str().unwrap()
        )
    );
    assert_eq!(
        client
            .get(format!("{}/ready", node.http_url()))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let metrics = client
        .get(format!("{}/metrics", node.http_url()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for name in [
        "herald_connections{protocol=\"sse\"} 1",
        "herald_publish_commit_seconds_bucket",
        "herald_published_total",
        "herald_history_events",
        "herald_store_unwritten_bytes",
        // (Its value is the disk's: a slow CI disk may count some.)
        "herald_disk_slow_operations_total ",
    ] {
        assert!(metrics.contains(name), "{name} missing from\n{metrics}");
    }
    // Every family says what it is (an operator reads it next to the number).
    for line in metrics.lines().filter(|l| l.starts_with("# TYPE ")) {
        let family = line.split_whitespace().nth(2).unwrap();
        assert!(
            metrics.contains(&format!("# HELP {family} ")),
            "{family} has no HELP line in\n{metrics}"
        );
    }
    assert!(
        metrics
            .lines()
            .any(|line| line.starts_with("herald_build_info{")
                && line.contains(&format!("commit=\"{commit}\""))
                && line.ends_with(" 1")),
        "no herald_build_info with commit {commit} in\n{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_sse_client_is_cut_off_without_slowing_others_and_resumes_without_loss() {
    use std::io::{Read, Write};
    let config = config_file("[namespace.firehose]\nhistory_size = 10000\n");
    let node = Herald::start_with(&[
        "--config",
        config.to_str().unwrap(),
        "--pubsub-output-limit",
        "1mb 512kb 1",
    ]);
    let url = stream_url(&node, "firehose:all");

    // The slow client: a raw socket that reads the response head, then never reads again.
    // A small receive buffer, so the kernel absorbs little of what the server sends.
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(16 * 1024).unwrap();
    socket.connect(&node.http.into()).unwrap();
    let mut slow: std::net::TcpStream = socket.into();
    slow.set_read_timeout(Some(PATIENCE)).unwrap();
    write!(
        slow,
        "GET /api/stream/firehose:all HTTP/1.1\r\nHost: herald\r\n\r\n"
    )
    .unwrap();
    let mut head = Vec::new();
    while !String::from_utf8_lossy(&head).contains("retry:") {
        let mut byte = [0u8; 1024];
        let n = slow.read(&mut byte).unwrap();
        assert!(n > 0, "stream closed early");
        head.extend_from_slice(&byte[..n]);
    }

    let mut fast = connect(&url, None).await;
    const TOTAL: usize = 2000;
    let pad = "x".repeat(4000);
    let mut received = 0;
    for batch in 0..TOTAL / 100 {
        let events: Vec<Value> = (batch * 100..(batch + 1) * 100)
            .map(|n| json!({ "channel": "firehose:all", "data": { "n": n, "pad": pad } }))
            .collect();
        herald_tests::publish_http(&node, &Value::Array(events)).await;
        // The fast client keeps up (it reads each batch before the next is published).
        while received < (batch + 1) * 100 {
            let data: Value = serde_json::from_str(&next(&mut fast).await.data).unwrap();
            assert_eq!(data["n"], received);
            received += 1;
        }
    }

    // The slow one was cut off: its stream ends although far less than everything arrived.
    let mut got = head;
    let outcome = slow.read_to_end(&mut got);
    assert!(
        !matches!(&outcome, Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)),
        "the server never closed the slow client"
    );
    let text = String::from_utf8_lossy(&got).into_owned();
    let complete_events = text.matches("\n\n").count();
    assert!(complete_events < TOTAL, "the slow client was never cut off");
    // Resume from the last complete event it got: nothing still retained is lost.
    let mut last_id = None;
    let mut last_n: i64 = -1;
    for block in text.split("\n\n") {
        let id = block.lines().find_map(|l| l.strip_prefix("id: "));
        let data = block.lines().find_map(|l| l.strip_prefix("data: "));
        if let (Some(id), Some(data)) = (id, data)
            && let Ok(value) = serde_json::from_str::<Value>(data)
        {
            last_id = Some(id.to_string());
            last_n = value["n"].as_i64().unwrap();
        }
    }
    let mut resumed = connect(&url, last_id.as_deref()).await;
    for n in (last_n + 1) as usize..TOTAL {
        let data: Value = serde_json::from_str(&next(&mut resumed).await.data).unwrap();
        assert_eq!(
            data["n"], n,
            "resumed exactly where the cut-off client stopped"
        );
    }
}

/// `data` is published as the client wrote it: a parsed-and-printed value would round big
/// numbers and sort keys. A malformed body is told by the field at fault.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_publish_keeps_data_as_written() {
    let node = Herald::start();
    let mut events = connect(&stream_url(&node, "exact"), None).await;
    let client = reqwest::Client::new();
    let url = format!("{}/api/publish", node.http_url());
    let body = r#"{"channel": "exact", "data": {"z": 12345678901234567890123, "a": [1.10, 1E2]}}"#;
    let reply = client.post(&url).body(body).send().await.unwrap();
    assert_eq!(reply.status(), 200);
    assert_eq!(
        next(&mut events).await.data,
        r#"{"z":12345678901234567890123,"a":[1.10,1E2]}"#
    );
    let reply = client
        .post(&url)
        .body(r#"{"channel": "exact", "data": 1, "messageID": "m"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 400);
    let text = reply.text().await.unwrap();
    assert!(text.contains("unknown field `messageID`"), "{text}");
    let long_id = "i".repeat(1025);
    let reply = client
        .post(&url)
        .body(json!({ "channel": "exact", "data": 1, "messageId": long_id }).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 400);
    let text = reply.text().await.unwrap();
    assert!(text.contains("messageId longer than 1024 bytes"), "{text}");
}

/// A single node whose data directory was restored from an older copy hands out again the
/// positions a client already saw. That client's cursor is ahead of the node: it gets a gap
/// notice (`ahead`) and everything retained, not a stream that silently skips the new events
/// reusing those positions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cursor_ahead_of_a_restored_node_gets_a_gap_and_everything_retained() {
    let node = Herald::start();
    for i in 1..=2 {
        publish(&node, "restored", json!(format!("old {i}")), None).await;
    }
    let data_dir = node.kill_keeping_data();
    let backup = herald_tests::scratch_dir("backup");
    let copied = std::process::Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", data_dir.display()))
        .arg(&backup)
        .status()
        .unwrap();
    assert!(copied.success());

    let node = Herald::start_in(data_dir, &[], &[]);
    let mut lost = Value::Null;
    for i in 3..=4 {
        lost = publish(&node, "restored", json!(format!("lost {i}")), None).await;
    }
    let cursor = lost["id"].as_str().unwrap().to_string();
    let data_dir = node.kill_keeping_data();
    std::fs::remove_dir_all(&data_dir).unwrap();

    // The restored copy gives the next event the position "lost 3" had.
    let node = Herald::start_in(backup, &[], &[]);
    publish(&node, "restored", json!("new 3"), None).await;
    let mut events = connect(&stream_url(&node, "restored"), Some(&cursor)).await;
    let gap = next(&mut events).await;
    assert_eq!(gap.event, "gap");
    let gap: Value = serde_json::from_str(&gap.data).unwrap();
    assert_eq!(gap["reason"], "ahead");
    assert_eq!(gap["requested"], lost["position"]);
    let mut seen = Vec::new();
    for _ in 0..3 {
        seen.push(next(&mut events).await.data);
    }
    assert_eq!(seen, ["old 1", "old 2", "new 3"]);
    // Live events follow, and the ids handed out now resume on this node without a gap.
    publish(&node, "restored", json!("new 4"), None).await;
    let live = next(&mut events).await;
    assert_eq!(live.data, "new 4");
    drop(events);
    publish(&node, "restored", json!("new 5"), None).await;
    let mut resumed = connect(&stream_url(&node, "restored"), Some(&live.id)).await;
    assert_eq!(next(&mut resumed).await.data, "new 5");
}

/// With a `requestId` of the client's, the request's stream survives a reconnect: the same URL
/// with `Last-Event-ID` (what `EventSource` does after a network blip) resumes the request's
/// answers instead of publishing a second request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_council_score_request_with_its_own_id_resumes_instead_of_starting_again() {
    let node = Herald::start();
    let client = redis::Client::open(node.url()).unwrap();
    let mut worker = client.get_async_pubsub().await.unwrap();
    worker.subscribe("council_score_requests").await.unwrap();
    let url = format!(
        "{}/api/stream/council-score?videoUrl=v1&requestId=job-7",
        node.http_url()
    );
    let mut events = connect(&url, None).await;
    let mut requests = worker.on_message();
    let request = tokio::time::timeout(PATIENCE, requests.next())
        .await
        .unwrap()
        .unwrap();
    let request: Value = serde_json::from_slice(request.get_payload_bytes()).unwrap();
    assert_eq!(request["requestId"], "job-7");
    assert_eq!(request["replyChannel"], "council_score:job-7");
    publish(
        &node,
        "council_score:job-7",
        json!({ "stage": "gemini" }),
        None,
    )
    .await;
    let first = next(&mut events).await;
    drop(events);

    // The blip: one stage is published while the client is away.
    publish(
        &node,
        "council_score:job-7",
        json!({ "stage": "claude" }),
        None,
    )
    .await;
    let mut resumed = connect(&url, Some(&first.id)).await;
    let data: Value = serde_json::from_str(&next(&mut resumed).await.data).unwrap();
    assert_eq!(data["stage"], "claude");
    // No second request went to the workers: the next one they see is this marker.
    no_request_before_marker(&node, &mut requests, "marker").await;

    // A reconnect without a cursor (the connection dropped before the first answer, or a
    // blank Last-Event-ID) replays the request's whole reply channel: nothing is lost, and the
    // request (same message id) is not sent to the workers twice.
    drop(resumed);
    for cursor in [None, Some(" ")] {
        let mut again = connect(&url, cursor).await;
        let stages: Vec<Value> = [next(&mut again).await, next(&mut again).await]
            .iter()
            .map(|e| serde_json::from_str(&e.data).unwrap())
            .collect();
        assert_eq!(stages[0]["stage"], "gemini");
        assert_eq!(stages[1]["stage"], "claude");
    }
    no_request_before_marker(&node, &mut requests, "marker 2").await;

    let bad = reqwest::get(format!(
        "{}/api/stream/council-score?requestId=a%20b",
        node.http_url()
    ))
    .await
    .unwrap();
    assert_eq!(bad.status(), 400);
    let empty = reqwest::get(format!("{}/api/stream?channel=a&channel=", node.http_url()))
        .await
        .unwrap();
    assert_eq!(empty.status(), 400);
}

/// A seed endpoint without its id (`/api/stream/render-progress`) is a 400 saying the id is
/// missing (it streamed a channel of that name, which nothing publishes to, so the client
/// waited forever); a channel of exactly that name still streams through `?channel=`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seed_endpoint_without_its_id_is_a_400_naming_the_missing_id() {
    let node = Herald::start();
    for (endpoint, namespace) in [
        ("render-progress", "render_progress"),
        ("campaign-metrics", "campaign_metrics"),
        ("ab-test-results", "ab_test_results"),
    ] {
        // Without the id, and with an empty one (`render-progress/${jobId}` with `jobId` "").
        for path in [endpoint.to_string(), format!("{endpoint}/")] {
            let response = reqwest::get(format!("{}/api/stream/{path}", node.http_url()))
                .await
                .unwrap();
            assert_eq!(response.status(), 400, "{path}");
            assert_eq!(
                response.text().await.unwrap().trim_end(),
                format!(
                    "/api/stream/{endpoint} needs an id: /api/stream/{endpoint}/{{id}} streams channel {namespace}:{{id}} (a channel named '{endpoint}' streams at /api/stream?channel={endpoint})"
                )
            );
        }
    }
    let mut events = connect(
        &format!("{}/api/stream?channel=render-progress", node.http_url()),
        None,
    )
    .await;
    publish(&node, "render-progress", json!({ "n": 1 }), None).await;
    let event = next(&mut events).await;
    assert_eq!(serde_json::from_str::<Value>(&event.data).unwrap()["n"], 1);
}

/// A cursor naming a partition the store does not have (16 by default) was never handed out:
/// it is malformed, a 400 with the reason, not a resume with a `retention` gap (nothing left
/// retention). One from another store may name any partition: that is an `epoch` gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cursor_naming_a_partition_the_store_lacks_is_a_400() {
    let node = Herald::start();
    let first = publish(&node, "wide", json!("w1"), None).await;
    let mut cursor = herald_storage::Cursor::decode(first["id"].as_str().unwrap()).unwrap();
    cursor.advance(herald_storage::Position::new(99, 7));
    let cursor = cursor.encode();
    let reason = "cursor names partition 99, but this store has 16 (0 to 15)";
    let client = reqwest::Client::new();
    let url = stream_url(&node, "wide");
    let cases = [
        (
            client.get(&url).header("Last-Event-ID", &cursor),
            "Last-Event-ID",
        ),
        (
            client.get(format!("{url}?lastEventId={cursor}")),
            "lastEventId",
        ),
        (
            client.get(format!(
                "{}/api/stream/council-score?requestId=r1&lastEventId={cursor}",
                node.http_url()
            )),
            "lastEventId",
        ),
    ];
    for (request, source) in cases {
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 400);
        assert_eq!(
            response.text().await.unwrap(),
            format!("invalid {source}: {reason}\n")
        );
    }
    // A whole cursor still resumes.
    publish(&node, "wide", json!("w2"), None).await;
    let mut events = connect(&url, first["id"].as_str()).await;
    assert_eq!(next(&mut events).await.data, "w2");
}

/// Channel names in URLs: a query value that is not UTF-8 once decoded is a 400, as the same
/// name in the path is (it was decoded to U+FFFD and streamed that channel); a raw `/` in the
/// path is a 404 that says to send it as `%2F`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_names_in_urls_are_utf8_and_slashes_are_percent_encoded() {
    let node = Herald::start();
    for path in ["/api/stream?channel=%FF", "/api/stream/%FF"] {
        let response = reqwest::get(format!("{}{path}", node.http_url()))
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "{path}");
        let body = response.text().await.unwrap();
        assert!(body.contains("UTF-8"), "{path}: {body}");
    }
    for path in ["/api/stream/a/b", "/api/stream/a/b/c"] {
        let response = reqwest::get(format!("{}{path}", node.http_url()))
            .await
            .unwrap();
        assert_eq!(response.status(), 404, "{path}");
        let body = response.text().await.unwrap();
        assert!(
            body.contains("%2F") && body.lines().count() == 1,
            "{path}: {body:?}"
        );
    }
    // Sent as %2F, the name works in the path and in the query.
    for path in ["/api/stream/a%2Fb", "/api/stream?channel=a%2Fb"] {
        let mut events = connect(&format!("{}{path}", node.http_url()), None).await;
        publish(&node, "a/b", json!(path), None).await;
        assert_eq!(next(&mut events).await.data, path);
    }
}

/// One limit for channel names: what no stream could subscribe to cannot be published over
/// HTTP (single or batch), nor over RESP to a durable channel (`PUBLISH`) or with `HPUBLISH`.
/// A non-durable `PUBLISH` keeps Redis's unlimited names: RESP subscribers take any name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_names_over_the_limit_cannot_be_published() {
    let config = config_file("[namespace.live]\nhistory_size = 0\ndurable = false\n");
    let node = Herald::start_with(&["--config", config.to_str().unwrap()]);
    let client = reqwest::Client::new();
    let url = format!("{}/api/publish", node.http_url());
    let long = "n".repeat(1025);
    let bodies = [
        json!({ "channel": long, "data": 1 }),
        json!([{ "channel": "ok", "data": 1 }, { "channel": long, "data": 2 }]),
        json!({ "channel": format!("live:{long}"), "data": 1 }),
    ];
    for body in bodies {
        let reply = client.post(&url).json(&body).send().await.unwrap();
        assert_eq!(reply.status(), 400);
        let text = reply.text().await.unwrap();
        assert!(
            text.contains("bytes: the limit is 1024") && text.starts_with("event "),
            "{text}"
        );
    }
    // Nothing of the refused batch was published.
    assert!(herald_tests::history_payloads(&node, "ok").await.is_empty());
    let at_limit = "n".repeat(1024);
    let mut events = connect(&stream_url(&node, &at_limit), None).await;
    publish(&node, &at_limit, json!("fits"), None).await;
    assert_eq!(next(&mut events).await.data, "fits");

    let redis = redis::Client::open(node.url()).unwrap();
    let mut conn = herald_tests::patient_connection(&redis).await;
    for command in ["PUBLISH", "HPUBLISH"] {
        let error = redis::cmd(command)
            .arg(&long)
            .arg("x")
            .query_async::<redis::Value>(&mut conn)
            .await
            .unwrap_err();
        assert!(
            error
                .to_string()
                .contains("channel name of 1025 bytes: the limit is 1024"),
            "{command}: {error}"
        );
    }
    let receivers: i64 = redis::cmd("PUBLISH")
        .arg(format!("live:{long}"))
        .arg("x")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(
        receivers, 0,
        "a non-durable channel takes any name, as in Redis"
    );
}

/// `data` that is a JSON string holding half a surrogate pair has no UTF-8 text: the error
/// names the event and the escape, with no position inside the string taken for one in the
/// body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_surrogate_in_string_data_is_named_as_such() {
    let node = Herald::start();
    let reply = herald_tests::publish_raw(
        &node,
        r#"[{"channel": "x", "data": "fine"}, {"channel": "x", "data": "\ud800"}]"#,
    )
    .await;
    assert_eq!(reply.status(), 400);
    let text = reply.text().await.unwrap();
    assert!(
        text.starts_with(
            "event 1 has invalid data: the string holds an unpaired UTF-16 surrogate (\\ud800)"
        ),
        "{text}"
    );
    assert!(!text.contains("line 1"), "{text}");
}

/// A field of the wrong type is named with its event (counted from 0, as the other errors
/// count), in each body form; nothing of a refused batch is published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_typed_field_is_named_with_its_event() {
    let node = Herald::start();
    let expected = "; expected {\"channel\": \"...\", \"data\": ..., \"messageId\"?: \"...\"}, an \
                    array of them, or {\"events\": [...]}\n";
    for (body, reason) in [
        (
            r#"{"channel":5,"data":"x"}"#,
            "`channel`: invalid type: integer `5`, expected a string",
        ),
        (
            r#"{"channel":"a","data":"x","messageId":5}"#,
            "`messageId`: invalid type: integer `5`, expected a string",
        ),
        (
            r#"[{"channel":"typed","data":1},{"channel":1,"data":1}]"#,
            "event 1: `channel`: invalid type: integer `1`, expected a string",
        ),
        (
            r#"{"events":[{"channel":"typed","data":1},{"channel":"a","data":1,"messageId":[]}]}"#,
            "event 1: `messageId`: invalid type: sequence, expected a string",
        ),
        (
            r#"[{"channel":"typed","data":1},{"channel":"a"}]"#,
            "event 1: missing field `data`",
        ),
    ] {
        let reply = herald_tests::publish_raw(&node, body).await;
        assert_eq!(reply.status(), 400, "{body}");
        assert_eq!(
            reply.text().await.unwrap(),
            format!("invalid publish request: {reason}{expected}"),
            "{body}"
        );
    }
    assert!(
        herald_tests::history_payloads(&node, "typed")
            .await
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_shutting_down_tells_its_streams_to_reconnect() {
    let node = Herald::start();
    let mut events = connect(&stream_url(&node, "bye"), None).await;
    publish(&node, "bye", json!("last"), None).await;
    assert_eq!(next(&mut events).await.data, "last");
    node.signal("TERM");
    let event = next(&mut events).await;
    assert_eq!(event.event, "reconnect");
    assert!(event.data.contains("shutting down"), "{}", event.data);
    let end = tokio::time::timeout(PATIENCE, events.next()).await.unwrap();
    assert!(end.is_none(), "the stream ends after it: {end:?}");
}

/// A durable namespace that keeps no history (history_size 0): a client resuming from before an
/// event it missed is told so by a gap notice (nothing to replay), then gets live events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_without_history_tells_a_resuming_client_what_it_missed() {
    let config = config_file("[namespace.h0]\nhistory_size = 0\n");
    let node = Herald::start_with(&["--config", config.to_str().unwrap()]);
    let first = publish(&node, "h0:a", json!({ "n": 0 }), None).await;
    let missed = publish(&node, "h0:a", json!({ "n": 1 }), None).await;
    let mut events = connect(
        &stream_url(&node, "h0:a"),
        Some(first["id"].as_str().unwrap()),
    )
    .await;
    let gap = next(&mut events).await;
    assert_eq!(gap.event, "gap", "{gap:?}");
    let gap: Value = serde_json::from_str(&gap.data).unwrap();
    assert_eq!(gap["reason"], "retention");
    assert_eq!(gap["requested"], first["position"]);
    assert_eq!(gap["oldest"], Value::Null, "nothing is kept");
    assert_ne!(missed["position"], first["position"]);
    publish(&node, "h0:a", json!({ "n": 2 }), None).await;
    let live: Value = serde_json::from_str(&next(&mut events).await.data).unwrap();
    assert_eq!(live["n"], 2);
}

/// A channel listed more than once on a multi-channel stream, as written or in another
/// spelling that decodes to the same name (`dup%2Fb` and `dup/b`), is streamed once: its
/// retained events are replayed once on a first connect and on a resume, and the copies do not
/// count toward the 1,024-channel limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_listed_twice_is_streamed_once() {
    let node = Herald::start();
    for i in 0..3 {
        publish(&node, "dup:a", json!(format!("a{i}")), None).await;
        publish(&node, "dup/b", json!(format!("b{i}")), None).await;
    }
    let base = format!("{}/api/stream", node.http_url());
    let url = format!("{base}?channel=dup:a&channel=dup%2Fb&channel=dup:a&channel=dup/b&last=3");
    let mut events = connect(&url, None).await;
    let mut replayed = Vec::new();
    for _ in 0..6 {
        replayed.push(next(&mut events).await);
    }
    // Each channel's events in order (the two may be in different partitions, replayed one
    // after the other), each id once; a copy would come before the marker published next.
    let mut ids: Vec<&str> = replayed.iter().map(|e| e.id.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 6, "an id twice: {replayed:?}");
    for prefix in ["a", "b"] {
        let of: Vec<&str> = replayed
            .iter()
            .map(|e| e.data.as_str())
            .filter(|d| d.starts_with(prefix))
            .collect();
        assert_eq!(
            of,
            [0, 1, 2].map(|i| format!("{prefix}{i}")),
            "{replayed:?}"
        );
    }
    publish(&node, "dup:a", json!("marker"), None).await;
    assert_eq!(next(&mut events).await.data, "marker");
    drop(events);

    // A resume after `a0` on a URL that lists `dup:a` three times (`%3A` is `:`).
    let a0 = replayed.iter().find(|e| e.data == "a0").unwrap().id.clone();
    let url = format!("{base}?channel=dup:a&channel=dup%3Aa&channel=dup:a");
    let mut resumed = connect(&url, Some(&a0)).await;
    for data in ["a1", "a2", "marker"] {
        assert_eq!(next(&mut resumed).await.data, data);
    }
    publish(&node, "dup:a", json!("marker 2"), None).await;
    assert_eq!(next(&mut resumed).await.data, "marker 2");

    // 1,024 channels and a copy of one: within the limit.
    let many = (0..1024)
        .map(|i| format!("channel=c{i}"))
        .chain(["channel=c0".to_string()])
        .collect::<Vec<_>>()
        .join("&");
    let response = reqwest::get(format!("{base}?{many}")).await.unwrap();
    assert_eq!(response.status(), 200);
}

/// `HEAD` is a safe method: on a stream route it gets the head a `GET` gets (or its 400), and
/// `council-score` and `evaluate-creative` publish no request for it (they did: axum serves
/// `HEAD` with the `GET` handler).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_on_stream_routes_answers_the_head_and_publishes_nothing() {
    let node = Herald::start();
    let client = redis::Client::open(node.url()).unwrap();
    let mut worker = client.get_async_pubsub().await.unwrap();
    worker.subscribe("council_score_requests").await.unwrap();
    worker
        .subscribe("creative_evaluation_requests")
        .await
        .unwrap();
    let http = reqwest::Client::new();
    let base = node.http_url();
    for path in [
        "/api/stream/council-score?videoUrl=v1",
        "/api/stream/council-score?videoUrl=v1&requestId=head-1",
        "/api/stream/evaluate-creative?content=c1&type=image",
        "/api/stream/evaluate-creative?content=c1&requestId=head-2",
        "/api/stream/news?last=3",
        "/api/stream?channel=a&channel=b",
        "/api/stream/render-progress/r1",
    ] {
        let response = http.head(format!("{base}{path}")).send().await.unwrap();
        assert_eq!(response.status(), 200, "{path}");
        let headers = response.headers();
        assert_eq!(headers["content-type"], "text/event-stream", "{path}");
        assert_eq!(headers["cache-control"], "no-cache", "{path}");
        assert_eq!(headers["x-accel-buffering"], "no", "{path}");
    }
    // Nothing was subscribed: no SSE client is left behind by the HEADs.
    let stats = herald_tests::cluster::get_json(&node, "/api/realtime/stats").expect("stats");
    assert_eq!(stats["sse"]["totalConnections"], 0, "{stats}");
    // What a GET would refuse, a HEAD is refused too (with no body).
    for path in [
        "/api/stream/council-score?requestId=a%20b",
        "/api/stream?channel=",
        "/api/stream/news?last=many",
    ] {
        let response = http.head(format!("{base}{path}")).send().await.unwrap();
        assert_eq!(response.status(), 400, "{path}");
    }
    // No request reached the workers: the first message they get is this marker.
    no_request_before_marker(&node, &mut worker.on_message(), "marker").await;
    // And a GET still publishes its request.
    let _events = connect(
        &format!("{base}/api/stream/evaluate-creative?content=c2"),
        None,
    )
    .await;
    let request = next_request(&mut worker).await;
    assert_eq!(request["content"], "c2");
}

/// An empty `?last=` (a URL built as `?last=${n ?? ''}`) means "not given", as an empty
/// `?lastEventId=` does: a live stream, not a 400 that `EventSource` would never retry. A
/// parameter that takes one value and is given twice is a 400 naming it, on every route
/// (one took the first copy, another the last).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_last_is_not_given_and_a_parameter_given_twice_is_a_400() {
    let node = Herald::start();
    let client = redis::Client::open(node.url()).unwrap();
    let mut worker = client.get_async_pubsub().await.unwrap();
    worker.subscribe("council_score_requests").await.unwrap();
    publish(&node, "empty-last", json!("before"), None).await;
    let base = node.http_url();
    for path in [
        "/api/stream/empty-last?last=",
        "/api/stream/empty-last?last=&lastEventId=",
        "/api/stream?channel=empty-last&last=",
    ] {
        let mut events = connect(&format!("{base}{path}"), None).await;
        publish(&node, "empty-last", json!(path), None).await;
        assert_eq!(next(&mut events).await.data, path, "live, nothing replayed");
    }
    let _request = connect(
        &format!("{base}/api/stream/council-score?videoUrl=v&last="),
        None,
    )
    .await;
    let request = next_request(&mut worker).await;
    assert_eq!(request["videoUrl"], "v");

    for (path, name) in [
        ("/api/stream/news?last=1&last=2", "last"),
        ("/api/stream?channel=a&channel=b&last=1&last=1", "last"),
        ("/api/stream/news?lastEventId=&lastEventId=", "lastEventId"),
        (
            "/api/stream/render-progress/r1?lastEventId=a&last=1&lastEventId=b",
            "lastEventId",
        ),
        (
            "/api/stream/council-score?videoUrl=a&videoUrl=b",
            "videoUrl",
        ),
        (
            "/api/stream/evaluate-creative?content=c&requestId=r1&requestId=r2",
            "requestId",
        ),
    ] {
        let response = reqwest::get(format!("{base}{path}")).await.unwrap();
        assert_eq!(response.status(), 400, "{path}");
        assert_eq!(
            response.text().await.unwrap(),
            format!("invalid query: {name}= is given more than once (it takes one value)\n"),
            "{path}"
        );
    }
    // No request reached the workers for the refused ones.
    no_request_before_marker(&node, &mut worker.on_message(), "marker").await;
}

/// `Last-Event-ID` given twice with different values is a 400 saying so, on every stream
/// route, as a parameter that takes one value given twice is (which one would the stream
/// resume from?); nothing is streamed or published for it. The same value twice is that value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_last_event_id_given_twice_with_different_values_is_a_400() {
    const REFUSED: &str = "invalid header: Last-Event-ID is given more than once, with different values (it takes one value)\n";
    let node = Herald::start();
    let client = redis::Client::open(node.url()).unwrap();
    let mut worker = client.get_async_pubsub().await.unwrap();
    worker.subscribe("council_score_requests").await.unwrap();
    let first = publish(&node, "twice", json!("one"), None).await;
    publish(&node, "twice", json!("two"), None).await;
    let first = first["id"].as_str().unwrap().to_string();
    let other = publish(&node, "elsewhere", json!("x"), None).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let base = node.http_url();
    let http = reqwest::Client::new();
    for path in [
        "/api/stream/twice",
        "/api/stream?channel=twice",
        "/api/stream/render-progress/r1",
        "/api/stream/council-score?videoUrl=v",
    ] {
        for (one, two) in [(first.as_str(), other.as_str()), ("", first.as_str())] {
            let response = http
                .get(format!("{base}{path}"))
                .header("Last-Event-ID", one)
                .header("Last-Event-ID", two)
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 400, "{path} {one:?} {two:?}");
            assert_eq!(response.text().await.unwrap(), REFUSED, "{path}");
        }
    }

    // A head that comes in two pieces is read by hyper, not by the direct SSE path: the same.
    let mut raw = herald_tests::RawConn::connect(node.http);
    raw.send(
        format!(
            "GET /api/stream/twice HTTP/1.1\r\nHost: herald\r\nConnection: close\r\n\
             Last-Event-ID: {first}\r\n"
        )
        .as_bytes(),
    );
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    raw.send(format!("Last-Event-ID: {other}\r\n\r\n").as_bytes());
    let reply = String::from_utf8(raw.read_to_close()).unwrap();
    assert!(
        reply.starts_with("HTTP/1.1 400 Bad Request\r\n") && reply.ends_with(REFUSED),
        "{reply:?}"
    );

    // The same value twice (blanks around it aside) resumes after it.
    let response = http
        .get(stream_url(&node, "twice"))
        .header("Last-Event-ID", first.as_str())
        .header("Last-Event-ID", format!(" {first}"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut events: Events = Box::pin(
        response
            .bytes_stream()
            .eventsource()
            .map(|e| e.expect("well-formed SSE")),
    );
    assert_eq!(next(&mut events).await.data, "two");

    // No request reached the workers for the refused council-score streams.
    publish(
        &node,
        "council_score_requests",
        json!({ "marker": 1 }),
        None,
    )
    .await;
    assert_eq!(
        next_request(&mut worker).await,
        json!({ "marker": 1 }),
        "the marker is the first request"
    );
}

/// A counter's value in the node's `/metrics`.
async fn counter(node: &Herald, name: &str) -> u64 {
    let text = reqwest::get(format!("{}/metrics", node.http_url()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|line| {
            line.strip_prefix(name)?
                .strip_prefix(' ')?
                .parse::<u64>()
                .ok()
        })
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
}

/// Events sent from history are counted in `herald_replayed_total`, whichever way a client
/// asks for them (SSE `Last-Event-ID` and `?last=N`, a WebSocket subscribe with a cursor, RESP
/// `HISTORY` and `HSUBSCRIBE`), each event once; `herald_delivered_total` counts live
/// deliveries only, as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_replayed_from_history_are_counted_apart_from_live_deliveries() {
    use futures::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    let node = Herald::start();
    let mut ids = Vec::new();
    for n in 1..=5 {
        let reply = publish(&node, "replayed", json!({ "n": n }), None).await;
        ids.push(reply["id"].as_str().unwrap().to_string());
    }
    assert_eq!(counter(&node, "herald_replayed_total").await, 0);
    let delivered = counter(&node, "herald_delivered_total").await;
    let url = stream_url(&node, "replayed");
    let data = |n: u64| json!({ "n": n }).to_string();

    // SSE: a resume after the 2nd event (3 events), then the last 2.
    let mut resumed = connect(&url, Some(&ids[1])).await;
    for n in 3..=5 {
        assert_eq!(next(&mut resumed).await.data, data(n));
    }
    let mut last = connect(&format!("{url}?last=2"), None).await;
    for n in 4..=5 {
        assert_eq!(next(&mut last).await.data, data(n));
    }
    assert_eq!(counter(&node, "herald_replayed_total").await, 5);

    // WebSocket: a subscribe with the 1st event's cursor (4 events).
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws?userId=u", node.http))
        .await
        .unwrap();
    let request = json!({ "type": "subscribe", "channel": "replayed", "cursor": ids[0] });
    ws.send(Message::text(request.to_string())).await.unwrap();
    let mut ws_next = async || loop {
        let message = tokio::time::timeout(PATIENCE, ws.next())
            .await
            .expect("a WebSocket message in time")
            .expect("open")
            .expect("no error");
        if let Message::Text(text) = message {
            let value: Value = serde_json::from_str(&text).unwrap();
            // Events are the published objects (with `id` and `channel`): no `type`.
            match value["type"].as_str() {
                None => return value,
                Some("connected" | "subscribed" | "heartbeat") => {}
                Some(_) => panic!("unexpected message {value}"),
            }
        }
    };
    for n in 2..=5 {
        assert_eq!(ws_next().await["n"], n);
    }
    assert_eq!(counter(&node, "herald_replayed_total").await, 9);

    // RESP: HISTORY from the start (5) and its LAST 2, then HSUBSCRIBE from the start (5).
    let client = redis::Client::open(node.url()).unwrap();
    let mut resp = herald_tests::patient_connection(&client).await;
    for (args, count) in [(&["AFTER", "0"][..], 5), (&["LAST", "2"][..], 2)] {
        let events: Vec<(String, String)> = redis::cmd("HISTORY")
            .arg("replayed")
            .arg(args)
            .query_async(&mut resp)
            .await
            .unwrap();
        assert_eq!(events.len(), count, "{args:?}");
    }
    let mut hsub = herald_tests::RawConn::connect(node.resp);
    hsub.command(&[b"HSUBSCRIBE", b"0", b"replayed"]);
    hsub.read_frame();
    for n in 1..=5 {
        let (_, _, payload) = herald_tests::parse_hmessage(&hsub.read_frame());
        assert_eq!(payload, data(n));
    }
    assert_eq!(counter(&node, "herald_replayed_total").await, 21);
    assert_eq!(
        counter(&node, "herald_delivered_total").await,
        delivered,
        "replays are not live deliveries"
    );

    // A live event reaches the four streams: delivered, not replayed.
    publish(&node, "replayed", json!({ "n": 6 }), None).await;
    assert_eq!(next(&mut resumed).await.data, data(6));
    assert_eq!(next(&mut last).await.data, data(6));
    assert_eq!(ws_next().await["n"], 6);
    assert_eq!(herald_tests::parse_hmessage(&hsub.read_frame()).2, data(6));
    assert_eq!(
        counter(&node, "herald_delivered_total").await,
        delivered + 4
    );
    assert_eq!(counter(&node, "herald_replayed_total").await, 21);
}

/// A page on an origin named in `--cors-origins` may open its stream with credentials
/// (`new EventSource(url, {withCredentials: true})`: a browser requires
/// `access-control-allow-credentials: true` and its own origin echoed, and failed the stream
/// without them); with `*` no credentials are allowed (browsers refuse that pairing anyway).
#[tokio::test]
async fn a_named_origin_may_stream_with_credentials() {
    let node = Herald::start_configured(&["--cors-origins", "http://app.example"], &[]);
    let client = reqwest::Client::new();
    let url = format!("{}/api/stream/cors:1", node.http_url());
    let preflight = client
        .request(reqwest::Method::OPTIONS, &url)
        .header("origin", "http://app.example")
        .header("access-control-request-method", "GET")
        .header("access-control-request-headers", "last-event-id")
        .send()
        .await
        .unwrap();
    let header = |response: &reqwest::Response, name: &str| {
        response
            .headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_string())
    };
    assert_eq!(
        header(&preflight, "access-control-allow-origin").as_deref(),
        Some("http://app.example")
    );
    assert_eq!(
        header(&preflight, "access-control-allow-credentials").as_deref(),
        Some("true")
    );
    let stream = client
        .get(&url)
        .header("origin", "http://app.example")
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    assert_eq!(
        header(&stream, "access-control-allow-origin").as_deref(),
        Some("http://app.example")
    );
    assert_eq!(
        header(&stream, "access-control-allow-credentials").as_deref(),
        Some("true")
    );
    // Another origin is not allowed (the credentials header alone lets it do nothing).
    let other = client
        .get(&url)
        .header("origin", "http://evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(header(&other, "access-control-allow-origin"), None);

    let any = Herald::start_configured(&["--cors-origins", "*"], &[]);
    let stream = client
        .get(format!("{}/api/stream/cors:1", any.http_url()))
        .header("origin", "http://app.example")
        .send()
        .await
        .unwrap();
    assert_eq!(
        header(&stream, "access-control-allow-origin").as_deref(),
        Some("*")
    );
    assert_eq!(header(&stream, "access-control-allow-credentials"), None);
}
