//! herald's RESP history extension (`HISTORY`, `HSUBSCRIBE`, `HUNSUBSCRIBE`): Redis-protocol
//! consumers resume from a cursor with the same guarantee as SSE clients, across `kill -9`.

use herald_tests::{Herald, RawConn, config_file};

fn publish(node: &Herald, channel: &str, payload: &str) {
    let mut conn = RawConn::connect(node.resp);
    conn.command(&[b"PUBLISH", channel.as_bytes(), payload.as_bytes()]);
    let reply = conn.read_until_suffix(b"\r\n");
    assert!(
        reply.starts_with(b":"),
        "{}",
        String::from_utf8_lossy(&reply)
    );
}

/// Reads `HISTORY` through the redis crate: `[(cursor, payload)]`.
fn history(node: &Herald, args: &[&str]) -> Vec<(String, String)> {
    let mut connection = redis::Client::open(node.url())
        .unwrap()
        .get_connection()
        .unwrap();
    redis::cmd("HISTORY")
        .arg(args)
        .query(&mut connection)
        .unwrap()
}

/// Reads one `hmessage` frame and returns (channel, cursor, payload).
fn read_hmessage(conn: &mut RawConn) -> (String, String, String) {
    herald_tests::parse_hmessage(&conn.read_frame())
}

#[test]
fn history_reads_after_a_cursor() {
    let node = Herald::start();
    for i in 0..5 {
        publish(&node, "news", &format!("n{i}"));
    }
    let all = history(&node, &["news"]);
    assert_eq!(
        all.iter().map(|(_, p)| p.as_str()).collect::<Vec<_>>(),
        ["n0", "n1", "n2", "n3", "n4"]
    );
    let after = history(&node, &["news", "AFTER", &all[1].0, "COUNT", "2"]);
    assert_eq!(
        after.iter().map(|(_, p)| p.as_str()).collect::<Vec<_>>(),
        ["n2", "n3"]
    );
    let mut conn = RawConn::connect(node.resp);
    conn.command(&[b"HISTORY", b"news", b"AFTER", b"%%%"]);
    assert_eq!(
        conn.read_until_suffix(b"\r\n"),
        b"-ERR invalid cursor: cursor is not base64url\r\n"
    );
}

/// A cursor naming a partition the store does not have was never handed out: `HISTORY` and
/// `HSUBSCRIBE` refuse it as malformed.
#[test]
fn a_cursor_naming_a_partition_the_store_lacks_is_refused() {
    let node = Herald::start();
    publish(&node, "news", "n0");
    let (id, _) = history(&node, &["news"]).remove(0);
    let mut cursor = herald_storage::Cursor::decode(&id).unwrap();
    cursor.advance(herald_storage::Position::new(99, 1));
    let cursor = cursor.encode();
    let refusal: &[u8] =
        b"-ERR invalid cursor: cursor names partition 99, but this store has 16 (0 to 15)\r\n";
    let mut conn = RawConn::connect(node.resp);
    conn.command(&[b"HISTORY", b"news", b"AFTER", cursor.as_bytes()]);
    assert_eq!(conn.read_until_suffix(b"\r\n"), refusal);
    conn.command(&[b"HSUBSCRIBE", cursor.as_bytes(), b"news"]);
    assert_eq!(conn.read_until_suffix(b"\r\n"), refusal);
    // The connection is still usable, and holds no history subscription.
    conn.command(&[b"HSUBSCRIBE", id.as_bytes(), b"news"]);
    assert_eq!(
        conn.read_frame(),
        b"*3\r\n$10\r\nhsubscribe\r\n$4\r\nnews\r\n:1\r\n"
    );
}

#[test]
fn hsubscribe_replays_then_goes_live_and_resumes_after_kill_9() {
    let node = Herald::start();
    for i in 0..3 {
        publish(&node, "orders", &format!("o{i}"));
    }
    let first = history(&node, &["orders", "COUNT", "1"]).remove(0).0;

    let mut consumer = RawConn::connect(node.resp);
    consumer.command(&[b"HSUBSCRIBE", first.as_bytes(), b"orders"]);
    assert_eq!(
        consumer.read_frame(),
        b"*3\r\n$10\r\nhsubscribe\r\n$6\r\norders\r\n:1\r\n"
    );
    assert_eq!(read_hmessage(&mut consumer).2, "o1");
    let (channel, _, payload) = read_hmessage(&mut consumer);
    assert_eq!((channel.as_str(), payload.as_str()), ("orders", "o2"));
    publish(&node, "orders", "o3");
    let (_, last_cursor, payload) = read_hmessage(&mut consumer);
    assert_eq!(payload, "o3", "live after the replay, nothing twice");
    drop(consumer);

    for i in 4..7 {
        publish(&node, "orders", &format!("o{i}"));
    }
    let data_dir = node.kill_keeping_data();
    let node = Herald::start_in(data_dir, &[], &[]);
    let mut consumer = RawConn::connect(node.resp);
    consumer.command(&[b"HSUBSCRIBE", last_cursor.as_bytes(), b"orders"]);
    consumer.read_frame();
    for i in 4..7 {
        assert_eq!(
            read_hmessage(&mut consumer).2,
            format!("o{i}"),
            "resumed on the restarted node"
        );
    }
    // Ordinary commands other than the subscription set are refused while subscribed (RESP2).
    consumer.command(&[b"HSUBSCRIBE", b"$", b"other"]);
    assert!(
        consumer
            .read_frame()
            .starts_with(b"-ERR this connection already has a history subscription")
    );
    consumer.command(&[b"HUNSUBSCRIBE"]);
    assert_eq!(
        consumer.read_frame(),
        b"*3\r\n$12\r\nhunsubscribe\r\n$-1\r\n:0\r\n"
    );
    consumer.command(&[b"PING"]);
    assert_eq!(consumer.read_frame(), b"+PONG\r\n");
}

#[test]
fn hsubscribe_reports_a_gap_when_the_cursor_left_retention() {
    let config = config_file("[namespace.tiny]\nhistory_size = 2\n");
    let node = Herald::start_with(&["--config", config.to_str().unwrap()]);
    for i in 0..6 {
        publish(&node, "tiny:t", &format!("t{i}"));
    }
    let retained = history(&node, &["tiny:t"]);
    assert_eq!(retained.len(), 2);
    let mut other = Herald::start();
    publish(&other, "x", "y");
    let foreign = history(&other, &["x"]).remove(0).0;
    other.signal("KILL");
    let _ = other.wait_exit(std::time::Duration::from_secs(10));

    let mut consumer = RawConn::connect(node.resp);
    consumer.command(&[b"HELLO", b"3"]);
    consumer.read_frame();
    consumer.command(&[b"HSUBSCRIBE", foreign.as_bytes(), b"tiny:t"]);
    consumer.read_frame();
    let gap = String::from_utf8(consumer.read_frame()).unwrap();
    assert!(
        gap.starts_with(">5\r\n$4\r\nhgap\r\n$6\r\ntiny:t\r\n_\r\n")
            && gap.ends_with("$5\r\nepoch\r\n"),
        "{gap}"
    );
    assert_eq!(
        read_hmessage(&mut consumer).2,
        "t4",
        "then what is retained"
    );
    assert_eq!(read_hmessage(&mut consumer).2, "t5");
}

#[test]
fn hpublish_with_a_message_id_commits_once() {
    let node = Herald::start();
    let mut connection = redis::Client::open(node.url())
        .unwrap()
        .get_connection()
        .unwrap();
    let first: (String, i64, i64) = redis::cmd("HPUBLISH")
        .arg(&["payments", "p1", "ID", "pay-1"])
        .query(&mut connection)
        .unwrap();
    let retry: (String, i64, i64) = redis::cmd("HPUBLISH")
        .arg(&["payments", "p1", "ID", "pay-1"])
        .query(&mut connection)
        .unwrap();
    assert_eq!(first.2, 0);
    assert_eq!(retry.2, 1, "the retry is recognised");
    assert_eq!(
        retry.0, first.0,
        "and answered with the original event's cursor"
    );
    let events = history(&node, &["payments"]);
    assert_eq!(
        events,
        vec![(first.0.clone(), "p1".to_string())],
        "committed once"
    );
    let bad: redis::RedisResult<redis::Value> = redis::cmd("HPUBLISH")
        .arg(&["payments", "p1", "MSGID", "x"])
        .query(&mut connection);
    assert_eq!(bad.unwrap_err().to_string(), "ResponseError: syntax error");
    let long_id = "i".repeat(1025);
    let too_long: redis::RedisResult<redis::Value> = redis::cmd("HPUBLISH")
        .arg(&["payments", "p2", "ID", long_id.as_str()])
        .query(&mut connection);
    assert!(
        too_long
            .unwrap_err()
            .to_string()
            .contains("message id longer than 1024 bytes")
    );
    assert_eq!(history(&node, &["payments"]).len(), 1, "nothing committed");
}

/// An empty channel name is refused where a stream would read it: `PUBLISH` to a durable
/// channel (nothing is stored), `HPUBLISH` and `HSUBSCRIBE`, as SSE, WebSocket and the HTTP
/// publish refuse it. A non-durable `PUBLISH ""` and `SUBSCRIBE ""` work as in Redis.
#[test]
fn an_empty_channel_name_is_refused_where_a_stream_would_read_it() {
    let node = Herald::start();
    let mut conn = RawConn::connect(node.resp);
    for (command, reply) in [
        (
            &[&b"PUBLISH"[..], b"", b"x"][..],
            &b"-ERR empty channel name for a durable channel (streams read its history, and take no empty name)\r\n"[..],
        ),
        (&[b"HPUBLISH", b"", b"x"], b"-ERR empty channel name\r\n"),
        (&[b"HPUBLISH", b"", b"x", b"ID", b"m"], b"-ERR empty channel name\r\n"),
        (&[b"HSUBSCRIBE", b"$", b"", b"ok"], b"-ERR empty channel name\r\n"),
        (&[b"HSUBSCRIBE", b"0", b"ok", b""], b"-ERR empty channel name\r\n"),
        (&[b"HISTORY", b""], b"*0\r\n"),
    ] {
        conn.command(command);
        assert_eq!(
            String::from_utf8_lossy(&conn.read_until_suffix(b"\r\n")),
            String::from_utf8_lossy(reply),
            "{command:?}"
        );
    }
    // The connection has no history subscription: the refused ones took nothing.
    conn.command(&[b"HSUBSCRIBE", b"$", b"ok"]);
    assert_eq!(
        conn.read_frame(),
        b"*3\r\n$10\r\nhsubscribe\r\n$2\r\nok\r\n:1\r\n"
    );
    assert!(history(&node, &[""]).is_empty(), "nothing was stored");

    let config = config_file("[namespace.default]\nhistory_size = 0\ndurable = false\n");
    let live = Herald::start_with(&["--config", config.to_str().unwrap()]);
    let mut subscriber = RawConn::connect(live.resp);
    subscriber.command(&[b"SUBSCRIBE", b""]);
    assert_eq!(
        subscriber.read_frame(),
        b"*3\r\n$9\r\nsubscribe\r\n$0\r\n\r\n:1\r\n"
    );
    let mut publisher = RawConn::connect(live.resp);
    publisher.command(&[b"PUBLISH", b"", b"x"]);
    assert_eq!(publisher.read_until_suffix(b"\r\n"), b":1\r\n");
    assert_eq!(
        subscriber.read_frame(),
        b"*3\r\n$7\r\nmessage\r\n$0\r\n\r\n$1\r\nx\r\n"
    );
}

/// A history subscription's channels count with the connection's channels and patterns, as
/// Redis counts subscriptions: a client that leaves pub/sub mode when a count reaches zero
/// must not leave while history events still come. A channel named twice counts once.
#[test]
fn history_channels_count_in_every_subscription_count() {
    let node = Herald::start();
    let mut consumer = RawConn::connect(node.resp);
    consumer.command(&[b"HSUBSCRIBE", b"$", b"h1", b"h1", b"h2"]);
    assert_eq!(
        consumer.read_frame(),
        b"*3\r\n$10\r\nhsubscribe\r\n$2\r\nh1\r\n:1\r\n"
    );
    assert_eq!(
        consumer.read_frame(),
        b"*3\r\n$10\r\nhsubscribe\r\n$2\r\nh2\r\n:2\r\n"
    );
    consumer.command(&[b"SUBSCRIBE", b"r5"]);
    assert_eq!(
        consumer.read_frame(),
        b"*3\r\n$9\r\nsubscribe\r\n$2\r\nr5\r\n:3\r\n"
    );
    consumer.command(&[b"UNSUBSCRIBE", b"r5"]);
    assert_eq!(
        consumer.read_frame(),
        b"*3\r\n$11\r\nunsubscribe\r\n$2\r\nr5\r\n:2\r\n"
    );
    // h1 named twice is delivered once.
    publish(&node, "h1", "once");
    publish(&node, "h2", "two");
    assert_eq!(read_hmessage(&mut consumer).2, "once");
    assert_eq!(read_hmessage(&mut consumer).2, "two");
    consumer.command(&[b"PSUBSCRIBE", b"p*"]);
    assert_eq!(
        consumer.read_frame(),
        b"*3\r\n$10\r\npsubscribe\r\n$2\r\np*\r\n:3\r\n"
    );
    consumer.command(&[b"HUNSUBSCRIBE"]);
    assert_eq!(
        consumer.read_frame(),
        b"*3\r\n$12\r\nhunsubscribe\r\n$-1\r\n:1\r\n"
    );
}

/// `HISTORY ... AFTER 0` is the beginning, as `0` is for `HSUBSCRIBE`.
#[test]
fn history_after_zero_reads_from_the_beginning() {
    let node = Herald::start();
    for i in 0..2 {
        publish(&node, "from-zero", &format!("z{i}"));
    }
    let all = history(&node, &["from-zero"]);
    assert_eq!(history(&node, &["from-zero", "AFTER", "0"]), all);
    assert_eq!(all.len(), 2);
}

/// `HISTORY channel LAST n`: the newest n, oldest first, with cursors that resume after each.
#[test]
fn history_last_reads_the_newest_events() {
    let node = Herald::start();
    for i in 0..5 {
        publish(&node, "latest", &format!("l{i}"));
    }
    let all = history(&node, &["latest"]);
    let newest = history(&node, &["latest", "LAST", "2"]);
    assert_eq!(newest, all[3..].to_vec());
    let mut connection = redis::Client::open(node.url())
        .unwrap()
        .get_connection()
        .unwrap();
    let error = redis::cmd("HISTORY")
        .arg(&["latest", "LAST", "2", "COUNT", "1"])
        .query::<redis::Value>(&mut connection)
        .unwrap_err();
    assert!(
        error.to_string().contains("LAST cannot be combined"),
        "{error}"
    );
    // More than a reply holds is refused, saying how to read it all (it was cut to 1000
    // without a word, which looked like lost history).
    for (option, text) in [
        ("LAST", "LAST is at most 1000: read older events by pages"),
        ("COUNT", "COUNT is at most 1000: read more by pages"),
    ] {
        let error = redis::cmd("HISTORY")
            .arg(&["latest", option, "1001"])
            .query::<redis::Value>(&mut connection)
            .unwrap_err();
        assert!(error.to_string().contains(text), "{error}");
    }
    let newest_1000: Vec<(String, String)> = redis::cmd("HISTORY")
        .arg(&["latest", "LAST", "1000"])
        .query(&mut connection)
        .unwrap();
    assert_eq!(newest_1000, all);
}

/// A pipelined `PUBLISH` to a durable channel takes effect before the commands sent after it
/// on the same connection, as in Redis: a `HISTORY` in the same write sees the event.
#[test]
fn history_pipelined_after_publish_sees_the_event() {
    let node = Herald::start();
    let mut conn = RawConn::connect(node.resp);
    for i in 0..10 {
        let channel = format!("pipelined-{i}");
        let mut write = herald_tests::encode_command(&[b"PUBLISH", channel.as_bytes(), b"m1"]);
        write.extend(herald_tests::encode_command(&[
            b"HISTORY",
            channel.as_bytes(),
            b"LAST",
            b"1",
        ]));
        conn.send(&write);
        assert_eq!(conn.read_frame(), b":0\r\n");
        let events: Vec<(String, String)> =
            redis::from_redis_value(redis::parse_redis_value(&conn.read_frame()).unwrap()).unwrap();
        assert_eq!(
            events.iter().map(|(_, p)| p.as_str()).collect::<Vec<_>>(),
            ["m1"],
            "round {i}: HISTORY ran before the PUBLISH sent ahead of it"
        );
    }

    // The same through the redis crate's (non-transactional) pipeline.
    let mut connection = redis::Client::open(node.url())
        .unwrap()
        .get_connection()
        .unwrap();
    let (receivers, events): (i64, Vec<(String, String)>) = redis::pipe()
        .publish("pipelined-crate", "c1")
        .cmd("HISTORY")
        .arg(&["pipelined-crate", "LAST", "1"])
        .query(&mut connection)
        .unwrap();
    assert_eq!(receivers, 0);
    assert_eq!(
        events.iter().map(|(_, p)| p.as_str()).collect::<Vec<_>>(),
        ["c1"]
    );
}

/// `PUBLISH c m1` then `HSUBSCRIBE $ c` in one write: `$` means events after the
/// subscription, and m1 was published before it.
#[test]
fn hsubscribe_live_pipelined_after_publish_does_not_get_the_event() {
    let node = Herald::start();
    let mut conn = RawConn::connect(node.resp);
    let mut write = herald_tests::encode_command(&[b"PUBLISH", b"before", b"m1"]);
    write.extend(herald_tests::encode_command(&[
        b"HSUBSCRIBE",
        b"$",
        b"before",
    ]));
    conn.send(&write);
    assert_eq!(
        conn.read_frame(),
        b":0\r\n",
        "nobody was subscribed when m1 was published"
    );
    assert_eq!(
        conn.read_frame(),
        b"*3\r\n$10\r\nhsubscribe\r\n$6\r\nbefore\r\n:1\r\n"
    );
    publish(&node, "before", "m2");
    assert_eq!(
        read_hmessage(&mut conn).2,
        "m2",
        "the first event after the subscription is m2, not m1"
    );
}

/// On a connection with a history subscription (RESP3, where `PUBLISH` is allowed while
/// subscribed), `PUBLISH c m` then `HUNSUBSCRIBE` in one write: the connection was subscribed
/// when it published, so it counts as a receiver and gets m before the `HUNSUBSCRIBE` reply.
/// Several rounds: the event must not be left behind in the subscription when it ends.
#[test]
fn hunsubscribe_pipelined_after_publish_delivers_the_event_first() {
    let node = Herald::start();
    let mut conn = RawConn::connect(node.resp);
    conn.command(&[b"HELLO", b"3"]);
    conn.read_frame();
    for round in 0..10 {
        conn.command(&[b"HSUBSCRIBE", b"$", b"until"]);
        assert_eq!(
            conn.read_frame(),
            b">3\r\n$10\r\nhsubscribe\r\n$5\r\nuntil\r\n:1\r\n"
        );
        let payload = format!("m{round}");
        let mut write = herald_tests::encode_command(&[b"PUBLISH", b"until", payload.as_bytes()]);
        write.extend(herald_tests::encode_command(&[b"HUNSUBSCRIBE"]));
        conn.send(&write);
        let (channel, _, got) = read_hmessage(&mut conn);
        assert_eq!(
            (channel.as_str(), got.as_str()),
            ("until", payload.as_str())
        );
        assert_eq!(
            conn.read_frame(),
            b":1\r\n",
            "round {round}: the subscription received the event"
        );
        assert_eq!(
            conn.read_frame(),
            b">3\r\n$12\r\nhunsubscribe\r\n_\r\n:0\r\n"
        );
    }
    conn.command(&[b"PING"]);
    assert_eq!(conn.read_frame(), b"+PONG\r\n");
}

/// `HPUBLISH`es `payload` and returns its cursor.
fn hpublish(conn: &mut redis::Connection, channel: &str, payload: &str) -> String {
    let (cursor, _, _): (String, i64, i64) = redis::cmd("HPUBLISH")
        .arg(&[channel, payload])
        .query(conn)
        .unwrap();
    cursor
}

/// One RESP3 bulk string's encoding.
fn bulk(text: &str) -> String {
    format!("${}\r\n{text}\r\n", text.len())
}

/// An event of a `HISTORY` reply, `[cursor, payload]`, encoded.
fn entry(cursor: &str, payload: &str) -> String {
    format!("*2\r\n{}{}", bulk(cursor), bulk(payload))
}

/// `HISTORY ... AFTER cursor` tells, as its first entry, that it cannot give everything after
/// the cursor: `[hgap, channel, requested, oldest, reason]` as `HSUBSCRIBE` sends it, for a
/// cursor older than retention, from another store, or ahead of the node. Then come the
/// events it has, as SSE gives them after its `event: gap`.
#[test]
fn history_reports_a_gap_first() {
    let config = config_file("[namespace.small]\nhistory_size = 2\n");
    let node = Herald::start_with(&["--config", config.to_str().unwrap()]);
    let mut connection = redis::Client::open(node.url())
        .unwrap()
        .get_connection()
        .unwrap();
    let cursors: Vec<String> = (1..=5)
        .map(|i| hpublish(&mut connection, "small:x", &format!("e{i}")))
        .collect();
    let position = |cursor: &str| {
        let cursor = herald_storage::Cursor::decode(cursor).unwrap();
        let (partition, seq) = cursor
            .positions()
            .map(|p| (p.partition, p.seq))
            .next()
            .unwrap();
        format!("{partition}-{seq}")
    };
    let retained = format!("{}{}", entry(&cursors[3], "e4"), entry(&cursors[4], "e5"));
    let mut conn = RawConn::connect(node.resp);
    let read_after = |conn: &mut RawConn, after: &str| {
        conn.command(&[b"HISTORY", b"small:x", b"AFTER", after.as_bytes()]);
        String::from_utf8(conn.read_frame()).unwrap()
    };

    // Retention dropped events 2 and 3.
    assert_eq!(
        read_after(&mut conn, &cursors[0]),
        format!(
            "*3\r\n*5\r\n{}{}{}{}{}{retained}",
            bulk("hgap"),
            bulk("small:x"),
            bulk(&position(&cursors[0])),
            bulk(&position(&cursors[3])),
            bulk("retention")
        )
    );
    // Within retention: no gap, the reply as it always was.
    assert_eq!(
        read_after(&mut conn, &cursors[2]),
        format!("*2\r\n{retained}")
    );
    assert_eq!(
        read_after(&mut conn, &cursors[3]),
        format!("*1\r\n{}", entry(&cursors[4], "e5"))
    );
    // COUNT counts events; the gap comes on top.
    conn.command(&[
        b"HISTORY",
        b"small:x",
        b"AFTER",
        cursors[0].as_bytes(),
        b"COUNT",
        b"1",
    ]);
    let reply = String::from_utf8(conn.read_frame()).unwrap();
    assert!(
        reply.starts_with("*2\r\n*5\r\n$4\r\nhgap\r\n")
            && reply.ends_with(&entry(&cursors[3], "e4")),
        "{reply}"
    );

    // A cursor of another store: nothing it names can be matched.
    let mut other = Herald::start();
    publish(&other, "x", "y");
    let foreign = history(&other, &["x"]).remove(0).0;
    other.signal("KILL");
    let _ = other.wait_exit(std::time::Duration::from_secs(10));
    assert_eq!(
        read_after(&mut conn, &foreign),
        format!(
            "*3\r\n*5\r\n{}{}$-1\r\n{}{}{retained}",
            bulk("hgap"),
            bulk("small:x"),
            bulk(&position(&cursors[3])),
            bulk("epoch")
        )
    );

    // A cursor ahead of everything this node has (a data directory restored from an older
    // copy): what the node has is replayed from the start.
    let mut ahead = herald_storage::Cursor::decode(&cursors[4]).unwrap();
    let last = ahead.positions().next().unwrap();
    ahead.advance(herald_storage::Position::new(last.partition, last.seq + 10));
    let ahead = ahead.encode();
    assert_eq!(
        read_after(&mut conn, &ahead),
        format!(
            "*3\r\n*5\r\n{}{}{}{}{}{retained}",
            bulk("hgap"),
            bulk("small:x"),
            bulk(&position(&ahead)),
            bulk(&position(&cursors[3])),
            bulk("ahead")
        )
    );

    // In RESP3 the gap is an array inside the reply too (not a push).
    conn.command(&[b"HELLO", b"3"]);
    conn.read_frame();
    let reply = read_after(&mut conn, &cursors[0]);
    assert!(reply.starts_with("*3\r\n*5\r\n$4\r\nhgap\r\n"), "{reply}");
}
