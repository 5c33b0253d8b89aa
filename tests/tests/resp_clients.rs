//! Stock Redis clients used unchanged against herald: the `redis` crate (RESP2 and RESP3) and
//! `redis-cli`.

use futures::StreamExt;
use herald_tests::{Herald, PATIENCE, patient_connection};
use redis::AsyncCommands;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

/// A payload no text protocol would survive: CR LF, NUL, non-UTF-8 bytes, the RESP markers.
fn hostile_payload(i: u32) -> Vec<u8> {
    let mut payload = format!("event {i}\r\n*3\r\n$-1\r\n").into_bytes();
    payload.extend_from_slice(&[0, 0xff, 0xfe, b'\n', 0xc3, 0xa9]);
    payload.extend_from_slice("✓ é 中".as_bytes());
    payload
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_crate_resp2_receives_everything_in_order_intact() {
    let node = Herald::start();
    let client = redis::Client::open(node.url()).unwrap();
    let mut pubsub = client.get_async_pubsub().await.unwrap();
    pubsub.subscribe("orders").await.unwrap();
    pubsub.psubscribe("orders*").await.unwrap();
    let mut publisher = herald_tests::patient_connection(&client).await;

    const COUNT: u32 = 2_000;
    let sender = tokio::spawn(async move {
        for i in 0..COUNT {
            let receivers: i64 = publisher
                .publish("orders", hostile_payload(i))
                .await
                .unwrap();
            assert_eq!(receivers, 2, "one channel and one pattern subscription");
        }
    });
    let mut messages = pubsub.on_message();
    let (mut direct, mut by_pattern) = (0u32, 0u32);
    while direct + by_pattern < 2 * COUNT {
        let message = tokio::time::timeout(PATIENCE, messages.next())
            .await
            .expect("message in time")
            .unwrap();
        assert_eq!(message.get_channel_name(), "orders");
        let pattern: Option<String> = message.get_pattern().ok();
        let expected = if pattern.as_deref() == Some("orders*") {
            &mut by_pattern
        } else {
            &mut direct
        };
        assert_eq!(
            message.get_payload_bytes(),
            hostile_payload(*expected),
            "in order and intact"
        );
        *expected += 1;
    }
    sender.await.unwrap();
    assert_eq!((direct, by_pattern), (COUNT, COUNT));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_crate_resp3_gets_push_messages() {
    let node = Herald::start();
    let client = redis::Client::open(format!("{}?protocol=resp3", node.url())).unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let config = redis::AsyncConnectionConfig::new().set_push_sender(tx);
    let mut subscriber = client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .unwrap();
    subscriber.subscribe("alerts:u1").await.unwrap();
    subscriber.psubscribe("alerts:*").await.unwrap();
    // RESP3 allows ordinary commands on a subscribed connection.
    let pong: String = redis::cmd("PING")
        .query_async(&mut subscriber)
        .await
        .unwrap();
    assert_eq!(pong, "PONG");

    let mut publisher = herald_tests::patient_connection(&client).await;
    let receivers: i64 = publisher
        .publish("alerts:u1", hostile_payload(7))
        .await
        .unwrap();
    assert_eq!(receivers, 2);

    let mut kinds = Vec::new();
    while kinds.len() < 2 {
        let push = tokio::time::timeout(PATIENCE, rx.recv())
            .await
            .expect("push in time")
            .unwrap();
        match push.kind {
            redis::PushKind::Message | redis::PushKind::PMessage => {
                let payload = push.data.last().cloned().unwrap();
                assert_eq!(payload, redis::Value::BulkString(hostile_payload(7)));
                kinds.push(push.kind);
            }
            _ => {} // subscription confirmations
        }
    }
    assert_eq!(
        kinds,
        vec![redis::PushKind::Message, redis::PushKind::PMessage]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_commands_are_answered_in_order() {
    let node = Herald::start();
    let client = redis::Client::open(node.url()).unwrap();
    let mut pubsub = client.get_async_pubsub().await.unwrap();
    pubsub.subscribe("even").await.unwrap();
    let mut connection = herald_tests::patient_connection(&client).await;

    let mut pipe = redis::pipe();
    for i in 0..1_000 {
        let channel = if i % 2 == 0 { "even" } else { "odd" };
        pipe.publish(channel, i).cmd("ECHO").arg(i);
    }
    let replies: Vec<i64> = pipe.query_async(&mut connection).await.unwrap();
    for (i, pair) in replies.chunks(2).enumerate() {
        assert_eq!(pair, [if i % 2 == 0 { 1 } else { 0 }, i as i64]);
    }
    let mut messages = pubsub.on_message();
    for i in (0..1_000).step_by(2) {
        let message = tokio::time::timeout(PATIENCE, messages.next())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(message.get_payload::<i64>().unwrap(), i);
    }
}

/// A long pipeline of durable publishes is staged and handed to the log in groups (past 1,024
/// publishes or 1 MiB at once): every publish is answered, in order, delivered once in order,
/// and in the history in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_pipeline_of_durable_publishes_commits_everything_in_order() {
    let node = Herald::start();
    let client = redis::Client::open(node.url()).unwrap();
    let mut pubsub = client.get_async_pubsub().await.unwrap();
    pubsub.subscribe("stage:0").await.unwrap();
    let mut connection = patient_connection(&client).await;

    let total = 3_000;
    let mut pipe = redis::pipe();
    for i in 0..total {
        // Some publishes are large, so the 1 MiB limit splits the staging too.
        let payload = if i % 500 == 7 {
            format!("{i}:{}", "x".repeat(300_000))
        } else {
            i.to_string()
        };
        pipe.publish(format!("stage:{}", i % 3), payload);
    }
    let replies: Vec<i64> = pipe.query_async(&mut connection).await.unwrap();
    let expected: Vec<i64> = (0..total).map(|i| i64::from(i % 3 == 0)).collect();
    assert_eq!(replies, expected);

    let mut messages = pubsub.on_message();
    for i in (0..total).step_by(3) {
        let message = tokio::time::timeout(PATIENCE, messages.next())
            .await
            .unwrap()
            .unwrap();
        let payload: String = message.get_payload().unwrap();
        assert_eq!(payload.split(':').next().unwrap(), i.to_string());
    }
    for channel in 0..3 {
        // Everything retained (the default namespace keeps 100 events per channel).
        let history: Vec<(String, String)> = redis::cmd("HISTORY")
            .arg(format!("stage:{channel}"))
            .query_async(&mut connection)
            .await
            .unwrap();
        let seen: Vec<String> = history
            .into_iter()
            .map(|(_, payload)| payload.split(':').next().unwrap().to_string())
            .collect();
        let want: Vec<String> = (0..total)
            .filter(|i| i % 3 == channel)
            .skip(1_000 - 100)
            .map(|i| i.to_string())
            .collect();
        assert_eq!(seen, want, "history of stage:{channel}");
    }
}

/// The `redis` crate's atomic pipeline sends `MULTI`, the commands and `EXEC` in one write,
/// as redis-py's default pipeline does. Durable publishes in a transaction are committed and
/// delivered in order, each answered in `EXEC`'s array; a transaction with a command refused
/// inside (unknown, or a subscription) publishes nothing, and the connection goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_publish_in_order_or_not_at_all() {
    let node = Herald::start();
    let client = redis::Client::open(node.url()).unwrap();
    let mut pubsub = client.get_async_pubsub().await.unwrap();
    pubsub.subscribe("tx").await.unwrap();
    let mut connection = patient_connection(&client).await;

    let (first, second, echo, numsub): (i64, i64, String, Vec<(String, i64)>) = redis::pipe()
        .atomic()
        .publish("tx", "first")
        .publish("tx", "second")
        .cmd("ECHO")
        .arg("e")
        .cmd("PUBSUB")
        .arg("NUMSUB")
        .arg("tx")
        .query_async(&mut connection)
        .await
        .unwrap();
    assert_eq!((first, second, echo.as_str()), (1, 1, "e"));
    assert_eq!(numsub, vec![("tx".to_string(), 1)]);

    for refused in ["NOSUCH", "SUBSCRIBE"] {
        let error = redis::pipe()
            .atomic()
            .publish("tx", "never")
            .cmd(refused)
            .arg("x")
            .query_async::<()>(&mut connection)
            .await
            .unwrap_err();
        assert_eq!(error.code(), Some("EXECABORT"), "{refused}: {error}");
    }

    let third: Vec<i64> = redis::pipe()
        .atomic()
        .publish("tx", "third")
        .query_async(&mut connection)
        .await
        .unwrap();
    assert_eq!(third, [1]);
    let mut messages = pubsub.on_message();
    for want in ["first", "second", "third"] {
        let message = tokio::time::timeout(PATIENCE, messages.next())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(message.get_payload::<String>().unwrap(), want);
    }
    let history: Vec<(String, String)> = redis::cmd("HISTORY")
        .arg("tx")
        .query_async(&mut connection)
        .await
        .unwrap();
    let payloads: Vec<&str> = history.iter().map(|(_, p)| p.as_str()).collect();
    assert_eq!(payloads, ["first", "second", "third"]);
}

/// A transaction's queued commands are bounded by `client-query-buffer-limit`: past it the
/// transaction is refused with a reason, nothing of it runs, and the connection goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_past_the_query_buffer_limit_is_refused_whole() {
    let node = Herald::start();
    let client = redis::Client::open(node.url()).unwrap();
    let mut connection = patient_connection(&client).await;
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("client-query-buffer-limit")
        .arg("1mb")
        .query_async(&mut connection)
        .await
        .unwrap();
    let mut raw = herald_tests::RawConn::connect(node.resp);
    let big = "x".repeat(600 * 1024);
    raw.send(b"MULTI\r\n");
    raw.command(&[b"PUBLISH", b"big", big.as_bytes()]);
    raw.command(&[b"PUBLISH", b"big", big.as_bytes()]);
    raw.send(b"PUBLISH big small\r\nEXEC\r\nPING\r\n");
    let transcript = raw.read_until_suffix(b"+PONG\r\n");
    assert_eq!(
        String::from_utf8_lossy(&transcript),
        "+OK\r\n+QUEUED\r\n-ERR transaction discarded: its queued commands would hold more \
         than client-query-buffer-limit (1048576 bytes)\r\n+QUEUED\r\n\
         -EXECABORT Transaction discarded because of previous errors.\r\n+PONG\r\n"
    );
    let history: Vec<(String, String)> = redis::cmd("HISTORY")
        .arg("big")
        .query_async(&mut connection)
        .await
        .unwrap();
    assert!(history.is_empty(), "{} events published", history.len());
}

/// `EXEC` holds its replies until its last command ran; past 64 MiB of them, the commands
/// left are not run, each answered with an error saying so, and the array stays whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exec_whose_replies_pass_the_limit_runs_no_more_commands() {
    let node = Herald::start();
    let client = redis::Client::open(node.url()).unwrap();
    let mut connection = patient_connection(&client).await;
    let payload = "x".repeat(8 * 1024);
    let mut fill = redis::pipe();
    for _ in 0..100 {
        fill.publish("big", &payload);
    }
    let _: Vec<i64> = fill.query_async(&mut connection).await.unwrap();

    let mut raw = herald_tests::RawConn::connect(node.resp);
    // 100 reads of 100 events of 8 KiB: about 80 MiB of replies.
    let mut request = b"MULTI\r\n".to_vec();
    request.extend(b"HISTORY big\r\n".repeat(100));
    request.extend(b"PUBLISH big late\r\nEXEC\r\nPING\r\n");
    raw.send(&request);
    let replies = raw.read_until_suffix(b"+PONG\r\n");
    let text = String::from_utf8_lossy(&replies);
    let header = format!("{}*101\r\n", "+QUEUED\r\n".repeat(101));
    assert!(
        text.starts_with(&format!("+OK\r\n{header}*100\r\n")),
        "{}",
        &text[..2000]
    );
    let not_run = text
        .matches("-ERR not run: this EXEC's replies passed 67108864 bytes\r\n")
        .count();
    let run = 101 - not_run;
    assert!((80..=90).contains(&run), "{run} commands ran");
    assert!(text.ends_with("-ERR not run: this EXEC's replies passed 67108864 bytes\r\n+PONG\r\n"));
    // The publish after the limit was not run.
    let history: Vec<(String, String)> = redis::cmd("HISTORY")
        .arg("big")
        .query_async(&mut connection)
        .await
        .unwrap();
    assert!(history.iter().all(|(_, payload)| payload != "late"));
}

fn redis_cli(node: &Herald, args: &[&str]) -> String {
    let output = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &node.resp.port().to_string()])
        .args(args)
        .output()
        .expect("redis-cli is needed: install redis-tools (apt-get install redis-tools), as .ci/run does");
    assert!(
        output.status.success(),
        "redis-cli {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

#[test]
fn redis_cli_publishes_and_subscribes() {
    let node = Herald::start();
    assert_eq!(redis_cli(&node, &["PING"]), "PONG\n");
    assert_eq!(redis_cli(&node, &["PUBLISH", "news", "nobody"]), "0\n");

    let mut subscriber = Command::new("redis-cli")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &node.resp.port().to_string(),
            "SUBSCRIBE",
            "news",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("redis-cli");
    let mut lines = BufReader::new(subscriber.stdout.take().unwrap()).lines();
    // redis-cli prints the confirmation as three lines: subscribe / news / 1.
    let confirmation: Vec<String> = (0..3).map(|_| lines.next().unwrap().unwrap()).collect();
    assert_eq!(confirmation, ["subscribe", "news", "1"]);

    assert_eq!(redis_cli(&node, &["PUBSUB", "NUMSUB", "news"]), "news\n1\n");
    assert_eq!(
        redis_cli(&node, &["PUBLISH", "news", "hello from redis-cli"]),
        "1\n"
    );
    let message: Vec<String> = (0..3).map(|_| lines.next().unwrap().unwrap()).collect();
    assert_eq!(message, ["message", "news", "hello from redis-cli"]);

    let _ = subscriber.kill();
    let _ = subscriber.wait();
    herald_tests::wait_until("the killed redis-cli is unsubscribed", || {
        redis_cli(&node, &["PUBSUB", "NUMSUB", "news"]) == "news\n0\n"
    });
}

#[test]
fn redis_cli_resp3_and_introspection() {
    let node = Herald::start();
    let hello = redis_cli(&node, &["-3", "HELLO", "3"]);
    assert!(hello.contains("proto") && hello.contains("3"), "{hello}");
    let info = redis_cli(&node, &["INFO", "server"]);
    assert!(
        info.contains("redis_version:")
            && info.contains("herald_version:")
            && info.contains("herald_commit:"),
        "{info}"
    );
    let count: usize = redis_cli(&node, &["COMMAND", "COUNT"])
        .trim()
        .parse()
        .unwrap();
    assert!(count >= 20, "{count}");
    // `COMMAND` alone is every command's info, as in Redis (it was an arity error).
    let all = redis_cli(&node, &["COMMAND"]);
    assert!(
        all.lines().any(|l| l == "publish") && all.lines().any(|l| l == "subscribe"),
        "{all}"
    );
    assert_eq!(
        redis_cli(&node, &["CONFIG", "GET", "maxclients"]),
        "maxclients\n10000\n"
    );
    assert_eq!(
        redis_cli(&node, &["CONFIG", "SET", "maxclients", "50"]),
        "OK\n"
    );
    assert_eq!(
        redis_cli(&node, &["CONFIG", "GET", "maxclients"]),
        "maxclients\n50\n"
    );
    let list = redis_cli(&node, &["CLIENT", "LIST"]);
    assert!(
        list.contains("cmd=client|list") && list.contains("resp=2"),
        "{list}"
    );
    assert_eq!(
        redis_cli(&node, &["CLIENT", "SETINFO", "LIB-NAME", "herald-test"]),
        "OK\n"
    );
    // redis-cli keeps working through its whole start-up sequence in interactive-like mode.
    let docs = redis_cli(&node, &["COMMAND", "DOCS", "publish"]);
    assert!(docs.contains("Posts a message to a channel."), "{docs}");
}
