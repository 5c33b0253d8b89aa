//! WebSocket with a real client (`tokio-tungstenite`): the seed's messages (`connected`,
//! `subscribed`, events merged with `id` and `channel`, `pong`, alerts), subscribing by
//! `{type,id}` object and by name, unsubscribing, resume with a cursor after a disconnect, gap
//! notices, payloads that must arrive intact, errors that leave the connection open, and the
//! message size limit.

use futures::{SinkExt, StreamExt};
use herald_tests::{Herald, PATIENCE, config_file};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::{Error, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Connects to `path` (e.g. `/ws?userId=u1`) and returns the socket and its `connected`
/// message.
async fn connect(node: &Herald, path: &str) -> (Ws, Value) {
    let (mut ws, response) = connect_async(format!("ws://{}{path}", node.http))
        .await
        .expect("WebSocket handshake");
    assert_eq!(response.status(), 101);
    let connected = next(&mut ws).await;
    assert_eq!(connected["type"], "connected", "{connected}");
    (ws, connected)
}

/// The next JSON text message, skipping heartbeats and control frames.
async fn next(ws: &mut Ws) -> Value {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let message = tokio::time::timeout_at(deadline, ws.next())
            .await
            .expect("a message in time")
            .expect("connection open")
            .expect("no WebSocket error");
        match message {
            Message::Text(text) => {
                let value: Value = serde_json::from_str(&text).expect("each message is JSON");
                if value["type"] != "heartbeat" {
                    return value;
                }
            }
            Message::Ping(_) | Message::Pong(_) => {}
            other => panic!("unexpected message {other:?}"),
        }
    }
}

async fn send(ws: &mut Ws, message: Value) {
    ws.send(Message::text(message.to_string())).await.unwrap();
}

/// Subscribes and checks the confirmation names `channel`; returns its cursor (a durable
/// channel's only).
async fn subscribe(ws: &mut Ws, request: Value, channel: &str) -> Option<String> {
    send(ws, request).await;
    subscribed(next(ws).await, channel)
}

/// Checks that `reply` confirms a subscription to `channel` (the seed's message, with
/// herald's `cursor` where the channel is durable); returns the cursor.
fn subscribed(mut reply: Value, channel: &str) -> Option<String> {
    let cursor = reply.as_object_mut().and_then(|o| o.remove("cursor"));
    assert_eq!(
        reply,
        json!({ "type": "subscribed", "channel": channel }),
        "subscribe confirmation"
    );
    cursor.map(|c| c.as_str().expect("a string cursor").to_string())
}

/// Publishes over HTTP and returns the reply (position, id...).
async fn publish(node: &Herald, channel: &str, data: Value) -> Value {
    herald_tests::publish_http(node, &json!({ "channel": channel, "data": data })).await
}

/// `value` without its `id`, which must be a non-empty string; returns the id too.
fn split_id(mut value: Value) -> (String, Value) {
    let id = value
        .as_object_mut()
        .and_then(|o| o.remove("id"))
        .and_then(|id| id.as_str().map(str::to_string))
        .unwrap_or_else(|| panic!("an event with a string id: {value}"));
    assert!(!id.is_empty());
    (id, value)
}

fn is_rfc3339_utc(text: &str) -> bool {
    let b = text.as_bytes();
    let digits = |r: std::ops::Range<usize>| b[r].iter().all(u8::is_ascii_digit);
    b.len() >= 20
        && digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && b[10] == b'T'
        && digits(11..13)
        && b[13] == b':'
        && digits(14..16)
        && b[16] == b':'
        && digits(17..19)
        && text.ends_with('Z')
        && text[..4] >= *"2024"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_subscribe_receive_and_unsubscribe() {
    let node = Herald::start();
    let (mut ws, connected) = connect(&node, "/ws?userId=u1").await;
    assert_eq!(connected["message"], "Connected to real-time service");
    let client_id = connected["clientId"].as_str().unwrap();
    assert!(
        client_id.starts_with("ws_") && client_id.len() > 3,
        "{client_id}"
    );
    assert!(
        is_rfc3339_utc(connected["timestamp"].as_str().unwrap()),
        "{connected}"
    );

    subscribe(
        &mut ws,
        json!({ "type": "subscribe", "channel": { "type": "job_progress", "id": "job_123" } }),
        "job_progress:job_123",
    )
    .await;
    subscribe(
        &mut ws,
        json!({ "type": "subscribe", "channel": "render_progress:r1" }),
        "render_progress:r1",
    )
    .await;

    // The stats endpoint lists the client, its user and its channels.
    let stats: Value = reqwest::get(format!("{}/api/realtime/stats", node.http_url()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stats["websocket"]["totalConnections"], 1, "{stats}");
    let client = &stats["websocket"]["clients"][0];
    assert_eq!(client["userId"], "u1");
    assert_eq!(
        client["channels"],
        json!(["job_progress:job_123", "render_progress:r1"])
    );

    let progress = json!({
        "type": "job_progress",
        "jobId": "job_123",
        "status": "processing",
        "stage": "rendering",
        "progress": 0.75,
        "message": "Rendering frame 750/1000"
    });
    publish(&node, "job_progress:job_123", progress.clone()).await;
    let (_, event) = split_id(next(&mut ws).await);
    let mut expected = progress.clone();
    expected["channel"] = json!("job_progress:job_123");
    assert_eq!(event, expected, "the seed's message plus id and channel");

    publish(&node, "render_progress:r1", json!({ "frame": 1 })).await;
    let (_, event) = split_id(next(&mut ws).await);
    assert_eq!(
        event,
        json!({ "channel": "render_progress:r1", "frame": 1 })
    );

    send(
        &mut ws,
        json!({ "type": "unsubscribe", "channel": { "type": "job_progress", "id": "job_123" } }),
    )
    .await;
    assert_eq!(
        next(&mut ws).await,
        json!({ "type": "unsubscribed", "channel": "job_progress:job_123" })
    );
    publish(&node, "job_progress:job_123", json!({ "n": "after" })).await;
    publish(&node, "render_progress:r1", json!({ "frame": 2 })).await;
    let (_, event) = split_id(next(&mut ws).await);
    assert_eq!(
        event,
        json!({ "channel": "render_progress:r1", "frame": 2 }),
        "nothing of the unsubscribed channel"
    );

    let stats: Value = reqwest::get(format!("{}/api/realtime/stats", node.http_url()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let client = &stats["websocket"]["clients"][0];
    assert_eq!(client["channels"], json!(["render_progress:r1"]));
    assert_eq!(client["eventsSent"], 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsubscribing_a_type_removes_all_its_channels() {
    let node = Herald::start();
    let (mut ws, _) = connect(&node, "/ws").await;
    for id in ["a", "b"] {
        subscribe(
            &mut ws,
            json!({ "type": "subscribe", "channel": { "type": "job_progress", "id": id } }),
            &format!("job_progress:{id}"),
        )
        .await;
    }
    subscribe(
        &mut ws,
        json!({ "type": "subscribe", "channel": "job_progressive" }),
        "job_progressive",
    )
    .await;
    // The seed's example: unsubscribe by type, without id.
    send(
        &mut ws,
        json!({ "type": "unsubscribe", "channel": { "type": "job_progress" } }),
    )
    .await;
    assert_eq!(
        next(&mut ws).await,
        json!({ "type": "unsubscribed", "channel": "job_progress:a" })
    );
    assert_eq!(
        next(&mut ws).await,
        json!({ "type": "unsubscribed", "channel": "job_progress:b" })
    );
    publish(&node, "job_progress:a", json!({ "n": 1 })).await;
    publish(&node, "job_progress:b", json!({ "n": 2 })).await;
    publish(&node, "job_progressive", json!({ "n": 3 })).await;
    let (_, event) = split_id(next(&mut ws).await);
    assert_eq!(event, json!({ "channel": "job_progressive", "n": 3 }));

    // Unsubscribing from something not subscribed is confirmed too.
    send(
        &mut ws,
        json!({ "type": "unsubscribe", "channel": "never:subscribed" }),
    )
    .await;
    assert_eq!(
        next(&mut ws).await,
        json!({ "type": "unsubscribed", "channel": "never:subscribed" })
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_with_a_cursor_gets_exactly_the_missed_events_then_live() {
    let node = Herald::start();
    let channel = "job_progress:job_9";
    let (mut ws, _) = connect(&node, "/ws?userId=u1").await;
    subscribe(
        &mut ws,
        json!({ "type": "subscribe", "channel": { "type": "job_progress", "id": "job_9" } }),
        channel,
    )
    .await;
    let mut acks = Vec::new();
    for i in 0..3 {
        acks.push(publish(&node, channel, json!({ "type": "job_progress", "step": i })).await);
    }
    let mut last_id = String::new();
    for (i, ack) in acks.iter().enumerate() {
        let (id, event) = split_id(next(&mut ws).await);
        assert_eq!(event["step"], i);
        assert_ne!(id, last_id, "each event has a new id");
        assert_eq!(
            id,
            ack["id"].as_str().unwrap(),
            "the cursor the publisher was given"
        );
        last_id = id;
    }
    ws.close(None).await.unwrap();
    drop(ws);

    for i in 3..6 {
        publish(&node, channel, json!({ "type": "job_progress", "step": i })).await;
    }
    let (mut ws, _) = connect(&node, "/ws?userId=u1").await;
    subscribe(
        &mut ws,
        json!({ "type": "subscribe", "channel": channel, "cursor": last_id }),
        channel,
    )
    .await;
    for i in 3..8 {
        if i == 6 {
            publish(&node, channel, json!({ "type": "job_progress", "step": 6 })).await;
            publish(&node, channel, json!({ "type": "job_progress", "step": 7 })).await;
        }
        let (_, event) = split_id(next(&mut ws).await);
        assert_eq!(
            event,
            json!({ "channel": channel, "type": "job_progress", "step": i }),
            "missed events replayed in order, then live, none twice"
        );
    }
    // Nothing else is pending: the next message is the reply to a ping.
    send(&mut ws, json!({ "type": "ping" })).await;
    assert_eq!(next(&mut ws).await["type"], "pong");

    // `last` replays the most recent events on a first subscribe.
    let (mut ws, _) = connect(&node, "/ws").await;
    subscribe(
        &mut ws,
        json!({ "type": "subscribe", "channel": channel, "last": 2 }),
        channel,
    )
    .await;
    for i in 6..8 {
        assert_eq!(split_id(next(&mut ws).await).1["step"], i);
    }
}

/// A subscription that drops before its channel's first event resumes from the cursor its
/// `subscribed` carried: what was published while it was away arrives, once each. (Without
/// that cursor it could only come back live-only, and those events were lost to it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_dropped_before_its_first_event_resumes_from_its_subscribed_cursor() {
    let node = Herald::start();
    let channel = "job_progress:quiet";
    // Events of the channel from before the subscription are not among what it resumes.
    publish(&node, channel, json!({ "step": "before" })).await;
    let (mut ws, _) = connect(&node, "/ws?userId=u1").await;
    let cursor = subscribe(
        &mut ws,
        json!({ "type": "subscribe", "channel": channel }),
        channel,
    )
    .await
    .expect("a durable channel's subscribed carries a cursor");
    ws.close(None).await.unwrap();
    drop(ws);
    for i in 0..3 {
        publish(&node, channel, json!({ "step": i })).await;
    }
    let (mut ws, _) = connect(&node, "/ws?userId=u1").await;
    subscribe(
        &mut ws,
        json!({ "type": "subscribe", "channel": channel, "cursor": cursor }),
        channel,
    )
    .await;
    for i in 0..3 {
        assert_eq!(split_id(next(&mut ws).await).1["step"], i);
    }
    send(&mut ws, json!({ "type": "ping" })).await;
    assert_eq!(next(&mut ws).await["type"], "pong", "nothing else came");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cursor_older_than_retention_gets_a_gap_message_first() {
    let config = config_file("[namespace.short]\nhistory_size = 3\n");
    let node = Herald::start_with(&["--config", config.to_str().unwrap()]);
    let mut acks = Vec::new();
    for i in 0..10 {
        acks.push(publish(&node, "short:x", json!({ "n": i })).await);
    }
    let (mut ws, _) = connect(&node, "/ws").await;
    subscribe(
        &mut ws,
        json!({ "type": "subscribe", "channel": "short:x", "cursor": acks[0]["id"] }),
        "short:x",
    )
    .await;
    let gap = next(&mut ws).await;
    assert_eq!(
        gap,
        json!({
            "type": "gap",
            "channel": "short:x",
            "requested": acks[0]["position"],
            "oldest": acks[7]["position"],
            "reason": "retention"
        })
    );
    for i in 7..10 {
        assert_eq!(
            split_id(next(&mut ws).await).1["n"],
            i,
            "then what is retained"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payloads_arrive_intact() {
    let node = Herald::start();
    let (mut ws, _) = connect(&node, "/ws").await;
    subscribe(
        &mut ws,
        json!({ "type": "subscribe", "channel": "notes:n1" }),
        "notes:n1",
    )
    .await;
    let tricky = "line1\nline2 \"q\" é 中 \\ \t \u{1F600} </script>";

    // A JSON string is published as its text: not JSON, so it arrives as a string.
    publish(&node, "notes:n1", json!(tricky)).await;
    let (_, event) = split_id(next(&mut ws).await);
    assert_eq!(
        event,
        json!({ "channel": "notes:n1", "type": "message", "data": tricky })
    );

    // An object is merged, its strings untouched.
    let object = json!({ "type": "note", "text": tricky, "nested": { "list": [tricky, 1, null] } });
    publish(&node, "notes:n1", object.clone()).await;
    let (_, event) = split_id(next(&mut ws).await);
    let mut expected = object;
    expected["channel"] = json!("notes:n1");
    assert_eq!(event, expected);

    // Over RESP, raw bytes.
    let client = redis::Client::open(node.url()).unwrap();
    let mut conn = herald_tests::patient_connection(&client).await;
    let receivers: i64 = redis::cmd("PUBLISH")
        .arg("notes:n1")
        .arg(tricky)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(receivers, 1);
    let (_, event) = split_id(next(&mut ws).await);
    assert_eq!(event["data"], tricky);

    // Events larger than the client message limit are still delivered.
    let big = "x".repeat(200_000);
    publish(&node, "notes:n1", json!({ "big": big })).await;
    let (_, event) = split_id(next(&mut ws).await);
    assert_eq!(event["big"].as_str().unwrap().len(), 200_000);
}

/// A payload object with an `id` or `channel` of its own is wrapped in `data`, whatever the
/// field's value: with `null` too, merged, the message had the key twice, and `JSON.parse`
/// kept the payload's null instead of the cursor (or the channel).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_id_and_channel_fields_are_wrapped_even_when_null() {
    let node = Herald::start();
    let (mut ws, _) = connect(&node, "/ws").await;
    subscribe(
        &mut ws,
        json!({ "type": "subscribe", "channel": "own" }),
        "own",
    )
    .await;
    let payloads = [
        json!({ "id": null }),
        json!({ "channel": null }),
        json!({ "type": "job", "id": null, "channel": null, "n": 1 }),
    ];
    for payload in payloads {
        let reply = publish(&node, "own", payload.clone()).await;
        // serde_json, like JSON.parse, keeps the last of two equal keys: a key sent twice
        // would show here as the payload's null in place of the cursor or the channel.
        assert_eq!(
            next(&mut ws).await,
            json!({ "id": reply["id"], "channel": "own", "type": "message", "data": payload }),
            "the cursor, the channel and the payload whole"
        );
    }
}

/// `data` is the payload's text unless the payload is a JSON object or array: a scalar is never
/// re-read as JSON, so its type does not change with its content, a big number is not rounded
/// by the browser, and two different payloads never look alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_is_the_payload_text_unless_it_is_an_object_or_array() {
    let node = Herald::start();
    let (mut ws, _) = connect(&node, "/ws").await;
    subscribe(
        &mut ws,
        json!({ "type": "subscribe", "channel": "kinds" }),
        "kinds",
    )
    .await;
    let client = redis::Client::open(node.url()).unwrap();
    let mut conn = herald_tests::patient_connection(&client).await;
    let cases = [
        ("7", json!("7")),
        ("007", json!("007")),
        ("12345678901234567890", json!("12345678901234567890")),
        ("1e400", json!("1e400")),
        ("true", json!("true")),
        ("True", json!("True")),
        ("null", json!("null")),
        ("quoted", json!("quoted")),
        ("\"quoted\"", json!("\"quoted\"")),
        ("[1, \"a\"]", json!([1, "a"])),
        ("{\"id\": 5}", json!({ "id": 5 })),
    ];
    for (payload, data) in &cases {
        let _: i64 = redis::cmd("PUBLISH")
            .arg("kinds")
            .arg(*payload)
            .query_async(&mut conn)
            .await
            .unwrap();
        let (_, event) = split_id(next(&mut ws).await);
        assert_eq!(
            event,
            json!({ "channel": "kinds", "type": "message", "data": data }),
            "PUBLISH kinds {payload}"
        );
    }
    // Over HTTP, a JSON number is published as its digits and arrives as that text too.
    let body = r#"{"channel": "kinds", "data": 12345678901234567890}"#;
    let reply = herald_tests::publish_raw(&node, body).await;
    assert_eq!(reply.status(), 200);
    assert_eq!(
        split_id(next(&mut ws).await).1["data"],
        "12345678901234567890"
    );
}

/// A cursor naming a partition the store does not have (16 by default) was never handed out:
/// it is malformed, refused with an `error` (or a 400 on `/ws/alerts`), not taken for a
/// resume from before retention.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cursor_naming_a_partition_the_store_lacks_is_refused() {
    let node = Herald::start();
    let reply = publish(&node, "alerts:p", json!({ "n": 0 })).await;
    let mut cursor = herald_storage::Cursor::decode(reply["id"].as_str().unwrap()).unwrap();
    cursor.advance(herald_storage::Position::new(99, 3));
    let cursor = cursor.encode();
    let (mut ws, _) = connect(&node, "/ws").await;
    send(
        &mut ws,
        json!({ "type": "subscribe", "channel": "alerts:p", "cursor": cursor }),
    )
    .await;
    let refused = next(&mut ws).await;
    assert_eq!(
        refused,
        json!({
            "type": "error",
            "message": "invalid cursor: cursor names partition 99, but this store has 16 (0 to 15)",
        })
    );
    let alerts = reqwest::get(format!(
        "{}/ws/alerts?userId=p&lastEventId={cursor}",
        node.http_url()
    ))
    .await
    .unwrap();
    assert_eq!(alerts.status(), 400);
    assert_eq!(
        alerts.text().await.unwrap(),
        "invalid cursor: cursor names partition 99, but this store has 16 (0 to 15)\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_messages_get_errors_and_the_connection_stays_open() {
    let node = Herald::start();
    let (mut ws, _) = connect(&node, "/ws").await;
    let bad = [
        "not json".to_string(),
        json!({ "type": "dance" }).to_string(),
        json!({ "channel": "a" }).to_string(),
        json!({ "type": "subscribe" }).to_string(),
        json!({ "type": "subscribe", "channel": { "id": "x" } }).to_string(),
        // A job id not set yet: not a subscription to the bare type's channel.
        json!({ "type": "subscribe", "channel": { "type": "job_progress", "id": null } })
            .to_string(),
        json!({ "type": "subscribe", "channel": { "type": "job_progress", "id": "" } }).to_string(),
        json!({ "type": "subscribe", "channel": "a", "cursor": "not a cursor!" }).to_string(),
        json!({ "type": "subscribe", "channel": "a", "last": "many" }).to_string(),
        json!({ "type": "subscribe", "channel": "n".repeat(1025) }).to_string(),
    ];
    for message in &bad {
        ws.send(Message::text(message.clone())).await.unwrap();
        let reply = next(&mut ws).await;
        assert_eq!(reply["type"], "error", "{message} -> {reply}");
        let reason = reply["message"].as_str().unwrap();
        assert!(
            !reason.is_empty() && !reason.contains('\n'),
            "a one-line reason: {reason}"
        );
        assert_eq!(reply.as_object().unwrap().len(), 2, "{reply}");
    }
    ws.send(Message::binary(vec![1u8, 2, 3])).await.unwrap();
    assert_eq!(next(&mut ws).await["type"], "error");

    send(&mut ws, json!({ "type": "ping" })).await;
    let pong = next(&mut ws).await;
    assert_eq!(pong["type"], "pong");
    assert!(
        is_rfc3339_utc(pong["timestamp"].as_str().unwrap()),
        "{pong}"
    );

    // At most 1,024 channels per connection (a repeated one does not count twice).
    for i in 0..1024 {
        send(
            &mut ws,
            json!({ "type": "subscribe", "channel": format!("many:{i}") }),
        )
        .await;
        assert_eq!(next(&mut ws).await["type"], "subscribed");
    }
    send(&mut ws, json!({ "type": "subscribe", "channel": "many:0" })).await;
    assert_eq!(next(&mut ws).await["type"], "subscribed");
    // A name quoted in an error is cut short, and marked so.
    send(
        &mut ws,
        json!({ "type": "subscribe", "channel": "n".repeat(1025) }),
    )
    .await;
    assert_eq!(
        next(&mut ws).await["message"],
        format!(
            "cannot subscribe to {}…: channel name of 1025 bytes: the limit is 1024",
            "n".repeat(64)
        )
    );
    send(
        &mut ws,
        json!({ "type": "subscribe", "channel": "many:1024" }),
    )
    .await;
    let refused = next(&mut ws).await;
    assert_eq!(
        refused["message"],
        "cannot subscribe to many:1024: too many channels: one stream or connection holds at most 1024"
    );
    send(
        &mut ws,
        json!({ "type": "unsubscribe", "channel": { "type": "many" } }),
    )
    .await;
    for _ in 0..1024 {
        assert_eq!(next(&mut ws).await["type"], "unsubscribed");
    }

    // The refused subscribe with a bad cursor subscribed nothing; a good one works.
    publish(&node, "a", json!({ "n": 0 })).await;
    subscribe(&mut ws, json!({ "type": "subscribe", "channel": "a" }), "a").await;
    publish(&node, "a", json!({ "n": 1 })).await;
    assert_eq!(split_id(next(&mut ws).await).1["n"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_reach_their_user_only() {
    let node = Herald::start();
    let (mut ws, _) = connect(&node, "/ws/alerts?userId=u1").await;
    subscribed(next(&mut ws).await, "alerts:u1").expect("alerts are durable: a cursor");
    let alert = |id: &str| {
        json!({
            "type": "alert",
            "alertId": id,
            "severity": "warning",
            "category": "performance",
            "title": "High CPC Detected",
            "message": "Campaign CPC exceeded threshold"
        })
    };
    publish(&node, "alerts:u2", alert("alert_for_u2")).await;
    publish(&node, "alerts:u1", alert("alert_123")).await;
    let (_, event) = split_id(next(&mut ws).await);
    let mut expected = alert("alert_123");
    expected["channel"] = json!("alerts:u1");
    assert_eq!(event, expected, "u1's alert, and not u2's");

    // The same protocol works on the alerts connection.
    send(&mut ws, json!({ "type": "ping" })).await;
    assert_eq!(next(&mut ws).await["type"], "pong");

    // A reconnect resumes its alerts with ?cursor=.
    let missed = publish(&node, "alerts:u1", alert("alert_124")).await;
    let ack = publish(&node, "alerts:u1", alert("alert_125")).await;
    assert_ne!(missed["id"], ack["id"]);
    for expected in ["alert_124", "alert_125"] {
        assert_eq!(split_id(next(&mut ws).await).1["alertId"], expected);
    }
    drop(ws);
    let (mut ws, _) = connect(
        &node,
        &format!(
            "/ws/alerts?userId=u1&cursor={}",
            missed["id"].as_str().unwrap()
        ),
    )
    .await;
    assert_eq!(next(&mut ws).await["type"], "subscribed");
    assert_eq!(split_id(next(&mut ws).await).1["alertId"], "alert_125");

    // Without userId: 400, for WebSocket clients and plain requests alike.
    for path in ["/ws/alerts", "/ws/alerts?userId="] {
        match connect_async(format!("ws://{}{path}", node.http)).await {
            Err(Error::Http(response)) => assert_eq!(response.status(), 400),
            Err(other) => panic!("expected HTTP 400, got {other}"),
            Ok(_) => panic!("expected HTTP 400, the upgrade succeeded"),
        }
    }
    let plain = reqwest::get(format!("{}/ws/alerts", node.http_url()))
        .await
        .unwrap();
    assert_eq!(plain.status(), 400);
    assert!(plain.text().await.unwrap().contains("userId"));
    let bad_cursor =
        connect_async(format!("ws://{}/ws/alerts?userId=u1&cursor=!!", node.http)).await;
    assert!(
        matches!(&bad_cursor, Err(Error::Http(r)) if r.status() == 400),
        "a malformed cursor is a 400"
    );

    // An empty `last` is not given, as an empty cursor is: live alerts only.
    let (mut ws, _) = connect(&node, "/ws/alerts?userId=u1&last=&cursor=").await;
    assert_eq!(next(&mut ws).await["type"], "subscribed");
    publish(&node, "alerts:u1", alert("alert_126")).await;
    assert_eq!(split_id(next(&mut ws).await).1["alertId"], "alert_126");
    // A parameter given twice is a 400 naming it.
    for (path, name) in [
        ("/ws/alerts?userId=u1&last=1&last=2", "last"),
        ("/ws/alerts?userId=u1&userId=u2", "userId"),
        ("/ws/alerts?userId=u1&cursor=&cursor=", "cursor"),
        ("/ws?userId=u1&userId=u2", "userId"),
    ] {
        match connect_async(format!("ws://{}{path}", node.http)).await {
            Err(Error::Http(response)) => {
                assert_eq!(response.status(), 400, "{path}");
                let body = String::from_utf8(response.body().clone().unwrap_or_default());
                assert_eq!(
                    body.unwrap(),
                    format!(
                        "invalid query: {name}= is given more than once (it takes one value)\n"
                    ),
                    "{path}"
                );
            }
            Err(other) => panic!("{path}: expected HTTP 400, got {other}"),
            Ok(_) => panic!("{path}: expected HTTP 400, the upgrade succeeded"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_over_the_limit_closes_the_connection_and_the_server_survives() {
    let node = Herald::start();
    let (mut ws, _) = connect(&node, "/ws").await;
    // Just under the limit: an ordinary (bad) message.
    ws.send(Message::text("x".repeat(60 * 1024))).await.unwrap();
    assert_eq!(next(&mut ws).await["type"], "error");

    let _ = ws.send(Message::text("x".repeat(70 * 1024))).await;
    let close = loop {
        match tokio::time::timeout(PATIENCE, ws.next())
            .await
            .expect("the server closes in time")
        {
            Some(Ok(Message::Close(frame))) => break frame,
            Some(Ok(_)) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    };
    let close = close.expect("a close code");
    assert_eq!(u16::from(close.code), 1009, "{close:?}");
    assert!(!close.reason.is_empty());

    let (mut ws, _) = connect(&node, "/ws").await;
    send(&mut ws, json!({ "type": "ping" })).await;
    assert_eq!(next(&mut ws).await["type"], "pong");
}

/// An open WebSocket does not hold the node up at shutdown. The session sends close 1001 at
/// once, but nothing makes the node wait for it before exiting (upgraded connections are not
/// tracked by the HTTP server's graceful shutdown), so the frame is checked when it arrives;
/// the in-process test in `gateway/src/http/ws.rs` checks it deterministically.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_open_connections() {
    let mut node = Herald::start();
    let (mut ws, _) = connect(&node, "/ws").await;
    node.signal("TERM");
    loop {
        match tokio::time::timeout(PATIENCE, ws.next())
            .await
            .expect("the connection ends in time")
        {
            Some(Ok(Message::Close(frame))) => {
                let frame = frame.expect("a close code");
                assert_eq!(u16::from(frame.code), 1001);
                assert_eq!(frame.reason.as_str(), "server shutting down");
                break;
            }
            Some(Ok(_)) => continue,
            None | Some(Err(_)) => break,
        }
    }
    assert!(node.wait_exit(PATIENCE).is_some_and(|s| s.success()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_over_its_output_limit_is_cut_off_and_resumes_without_loss() {
    let config = config_file("[namespace.firehose]\nhistory_size = 5000\n");
    let node = Herald::start_with(&[
        "--config",
        config.to_str().unwrap(),
        "--pubsub-output-limit",
        "1mb 512kb 1",
    ]);
    let subscribe_all = json!({ "type": "subscribe", "channel": "firehose:all" });

    // The slow client: a small receive buffer, so the kernel absorbs little, and it does not
    // read until everything is published.
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(16 * 1024).unwrap();
    socket.connect(&node.http.into()).unwrap();
    socket.set_nonblocking(true).unwrap();
    let tcp = TcpStream::from_std(socket.into()).unwrap();
    let (slow, _) = tokio_tungstenite::client_async(format!("ws://{}/ws", node.http), tcp)
        .await
        .expect("handshake");
    let mut slow: WebSocketStream<TcpStream> = slow;
    slow.send(Message::text(subscribe_all.to_string()))
        .await
        .unwrap();

    let (mut fast, _) = connect(&node, "/ws").await;
    subscribe(&mut fast, subscribe_all.clone(), "firehose:all").await;
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
            let (_, event) = split_id(next(&mut fast).await);
            assert_eq!(event["n"], received);
            received += 1;
        }
    }

    // The slow one was cut off: its connection ends although far less than everything arrived.
    let mut last: Option<(String, u64)> = None;
    let mut subscribed = false;
    loop {
        let message = tokio::time::timeout(PATIENCE, slow.next())
            .await
            .expect("the server never cut the slow client off");
        match message {
            Some(Ok(Message::Text(text))) => {
                let value: Value = serde_json::from_str(&text).unwrap();
                match value["type"].as_str() {
                    Some("subscribed") => subscribed = true,
                    Some("connected" | "heartbeat") => {}
                    _ => {
                        let n = value["n"].as_u64().unwrap();
                        if let Some((_, previous)) = &last {
                            assert_eq!(n, previous + 1, "what arrived is in order");
                        }
                        last = Some((value["id"].as_str().unwrap().to_string(), n));
                    }
                }
            }
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
            Some(Ok(_)) => {}
        }
    }
    assert!(subscribed);
    let resume_from = match &last {
        Some((_, n)) => {
            assert!(
                (*n as usize) < TOTAL - 1,
                "the slow client was never cut off"
            );
            n + 1
        }
        None => 0,
    };

    // Resume from the last complete event it got: nothing still retained is lost.
    let (mut again, _) = connect(&node, "/ws").await;
    let mut request = subscribe_all.clone();
    match &last {
        Some((id, _)) => request["cursor"] = json!(id),
        None => request["last"] = json!(TOTAL),
    }
    subscribe(&mut again, request, "firehose:all").await;
    for n in resume_from..TOTAL as u64 {
        let (_, event) = split_id(next(&mut again).await);
        assert_eq!(event["n"], n, "resumed without gap or duplicate");
    }
}

/// Two channels of one partition share the stream's cursor, so an event's id can claim more
/// of its channel than was delivered: here the replay of `b` carries `a`'s later position.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]

async fn resuming_a_channel_that_shares_a_partition_loses_nothing() {
    let node = Herald::start();
    let partition = |ack: &Value| {
        ack["position"]
            .as_str()
            .unwrap()
            .split('-')
            .next()
            .unwrap()
            .to_string()
    };
    let first_a = publish(&node, "a", json!({ "warm": 1 })).await;
    let mut b = None;
    for i in 0..500 {
        let name = format!("b{i}");
        if partition(&publish(&node, &name, json!({ "warm": 1 })).await) == partition(&first_a) {
            b = Some(name);
            break;
        }
    }
    let b = b.expect("a channel in the same partition as a");
    let (mut ws, _) = connect(&node, "/ws").await;
    subscribe(&mut ws, json!({ "type": "subscribe", "channel": "a" }), "a").await;
    for i in 0..3 {
        publish(&node, &b, json!({ "b": i })).await;
    }
    publish(&node, "a", json!({ "a": 1 })).await;
    split_id(next(&mut ws).await);
    subscribe(
        &mut ws,
        json!({ "type": "subscribe", "channel": b, "last": 3 }),
        &b,
    )
    .await;
    // The client gets the first replayed event of b, then disconnects and resumes b from it.
    let (id, event) = split_id(next(&mut ws).await);
    assert_eq!(event["b"], 0);
    drop(ws);
    let (mut ws, _) = connect(&node, "/ws").await;
    subscribe(
        &mut ws,
        json!({ "type": "subscribe", "channel": b, "cursor": id }),
        &b,
    )
    .await;
    // The replay comes after `subscribed`, in its own time (a ping sent now may be answered
    // first): a live event marks the end of what the resume brings.
    publish(&node, &b, json!({ "b": "live" })).await;
    let mut replayed = Vec::new();
    loop {
        let (_, event) = split_id(next(&mut ws).await);
        replayed.push(event["b"].clone());
        if event["b"] == "live" {
            break;
        }
    }
    assert_eq!(
        replayed,
        [json!(1), json!(2), json!("live")],
        "the rest of b, then live"
    );
}

/// A subscribe with a cursor on a channel the connection already holds restarts that channel
/// from the cursor: the client gets what follows it again (it asked for it), then live events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribing_again_with_a_cursor_replays_from_it() {
    let node = Herald::start();
    let (mut ws, _) = connect(&node, "/ws").await;
    subscribe(
        &mut ws,
        json!({ "type": "subscribe", "channel": "again" }),
        "again",
    )
    .await;
    for i in 0..3 {
        publish(&node, "again", json!({ "n": i })).await;
    }
    let (first, _) = split_id(next(&mut ws).await);
    for n in 1..3 {
        assert_eq!(split_id(next(&mut ws).await).1["n"], n);
    }
    subscribe(
        &mut ws,
        json!({ "type": "subscribe", "channel": "again", "cursor": first }),
        "again",
    )
    .await;
    for n in 1..3 {
        assert_eq!(
            split_id(next(&mut ws).await).1["n"],
            n,
            "replayed after the cursor"
        );
    }
    publish(&node, "again", json!({ "n": 3 })).await;
    assert_eq!(split_id(next(&mut ws).await).1["n"], 3, "then live, once");
    send(&mut ws, json!({ "type": "ping" })).await;
    assert_eq!(next(&mut ws).await["type"], "pong", "nothing more");
}
