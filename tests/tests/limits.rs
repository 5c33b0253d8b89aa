//! Limits and hostile input: slow subscribers, maxclients, buffer limits, huge headers and
//! crafted patterns. In every case the offender is cut off and everybody else is unaffected.

use futures::StreamExt;
use herald_tests::{Herald, PATIENCE, RawConn, config_file, encode_command, wait_until};
use redis::AsyncCommands;
use std::io::Read;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

/// herald's request body limit (2 MiB), which the body tests probe on both sides.
const LIMIT: usize = 2 * 1024 * 1024;

fn info_field(node: &Herald, field: &str) -> String {
    let client = redis::Client::open(node.url()).unwrap();
    let mut connection = client.get_connection().unwrap();
    let info: String = redis::cmd("INFO").query(&mut connection).unwrap();
    info.lines()
        .find_map(|line| line.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in INFO"))
        .trim()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_subscriber_is_disconnected_and_others_get_everything() {
    let node = Herald::start_with(&["--pubsub-output-limit", "2mb 1mb 2"]);

    // The slow one subscribes and then never reads again.
    let mut slow = RawConn::connect(node.resp);
    slow.command(&[b"SUBSCRIBE", b"firehose"]);
    slow.read_exact(b"*3\r\n$9\r\nsubscribe\r\n$8\r\nfirehose\r\n:1\r\n".len());

    let client = redis::Client::open(node.url()).unwrap();
    let mut fast = client.get_async_pubsub().await.unwrap();
    fast.subscribe("firehose").await.unwrap();
    // `firehose` is durable (default namespace): each pipelined batch waits for the log's sync.
    let mut publisher = herald_tests::patient_connection(&client).await;

    // Far more than the kernel's socket buffers plus the output limit can hold.
    const COUNT: usize = 40_000;
    let payload = vec![b'x'; 1024];
    let received = Arc::new(AtomicUsize::new(0));
    let progress = received.clone();
    let receiving = tokio::spawn(async move {
        let mut messages = fast.on_message();
        for i in 0..COUNT {
            let message = tokio::time::timeout(PATIENCE, messages.next())
                .await
                .expect("fast subscriber starved")
                .unwrap();
            let payload: Vec<u8> = message.get_payload().unwrap();
            assert_eq!(
                &payload[..8],
                format!("{i:08}").as_bytes(),
                "message {i} in order"
            );
            progress.store(i + 1, Ordering::Relaxed);
        }
        drop(messages);
        fast
    });
    // Publish in pipelined batches, letting the fast subscriber catch up after each: however
    // loaded the test machine is, it never lags by more than a batch, while the slow one lags
    // without bound.
    for (n, batch) in (0..COUNT).collect::<Vec<_>>().chunks(100).enumerate() {
        let mut pipe = redis::pipe();
        for i in batch {
            let mut message = format!("{i:08}").into_bytes();
            message.extend_from_slice(&payload);
            pipe.publish("firehose", message).ignore();
        }
        let () = pipe.query_async(&mut publisher).await.unwrap();
        let sent = (n + 1) * 100;
        let deadline = Instant::now() + PATIENCE;
        while received.load(Ordering::Relaxed) < sent {
            assert!(
                Instant::now() < deadline,
                "fast subscriber stuck at {}",
                received.load(Ordering::Relaxed)
            );
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
    }
    let _fast = receiving.await.unwrap();

    // The slow subscriber was closed: after what the kernel buffered, its stream ends.
    let mut rest = Vec::new();
    let read = slow.stream().try_clone().unwrap().read_to_end(&mut rest);
    // The server closed it (EOF or reset), rather than the read timing out on an open socket.
    assert!(
        !matches!(&read, Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)),
        "the slow subscriber's connection was never closed"
    );
    assert!(
        rest.len() < COUNT * 1024,
        "the slow subscriber got everything: it was never cut off"
    );
    assert_eq!(
        info_field(&node, "client_output_buffer_limit_disconnections"),
        "1"
    );
    let receivers: i64 = publisher.publish("firehose", "after").await.unwrap();
    assert_eq!(receivers, 1, "only the fast subscriber is left");
}

#[test]
fn maxclients_refuses_the_extra_client_with_redis_error() {
    let node = Herald::start_with(&["--maxclients", "2"]);
    let mut first = RawConn::connect(node.resp);
    // The harness's readiness probe may still be counted for a moment: wait until it is gone.
    wait_until("only this test's client is connected", || {
        first.command(&[b"CLIENT", b"LIST"]);
        let list = first.read_until_suffix(b"\n\r\n");
        String::from_utf8_lossy(&list).matches("id=").count() == 1
    });
    let mut second = RawConn::connect(node.resp);
    first.command(&[b"PING"]);
    assert_eq!(first.read_until_suffix(b"\r\n"), b"+PONG\r\n");
    second.command(&[b"PING"]);
    assert_eq!(second.read_until_suffix(b"\r\n"), b"+PONG\r\n");
    let mut third = RawConn::connect(node.resp);
    assert_eq!(
        third.read_to_close(),
        b"-ERR max number of clients reached\r\n"
    );
    drop(first);
    wait_until("a slot frees up", || {
        let mut again = RawConn::connect(node.resp);
        again.command(&[b"PING"]);
        let reply = again.read_until_suffix(b"\r\n");
        reply == b"+PONG\r\n"
    });
}

#[test]
fn query_buffer_limit_closes_the_offender_only() {
    let node = Herald::start_with(&["--client-query-buffer-limit", "1mb"]);
    let mut bystander = RawConn::connect(node.resp);
    let mut offender = RawConn::connect(node.resp);
    // A 5 MB argument is announced but the limit is 1 MB of buffered input.
    offender.send(b"*2\r\n$4\r\nECHO\r\n$5000000\r\n");
    let chunk = vec![b'a'; 64 * 1024];
    let mut sent = 0;
    while sent < 5_000_000 {
        if std::io::Write::write_all(&mut offender.stream().try_clone().unwrap(), &chunk).is_err() {
            break;
        }
        sent += chunk.len();
    }
    assert_eq!(
        offender.read_to_close(),
        b"",
        "closed without a reply, as Redis does"
    );
    bystander.command(&[b"PING"]);
    assert_eq!(bystander.read_until_suffix(b"\r\n"), b"+PONG\r\n");
}

#[test]
fn huge_multibulk_header_is_refused_before_any_allocation() {
    let node = Herald::start();
    let mut conn = RawConn::connect(node.resp);
    conn.send(b"*20000000\r\n");
    assert_eq!(
        conn.read_to_close(),
        b"-ERR Protocol error: invalid multibulk length\r\n"
    );
}

#[test]
fn protocol_errors_leave_other_clients_alone() {
    let node = Herald::start();
    let mut subscriber = RawConn::connect(node.resp);
    subscriber.command(&[b"SUBSCRIBE", b"calm"]);
    subscriber.read_until_suffix(b":1\r\n");
    for garbage in [
        &b"*-10\r\n*1\r\nfoo\r\n"[..],
        b"*1\r\n$blabla\r\n",
        b"\"unbalanced\r\n",
        b"*1\r\n$2000000000\r\n",
    ] {
        let mut bad = RawConn::connect(node.resp);
        bad.send(garbage);
        let reply = bad.read_to_close();
        assert!(
            reply.starts_with(b"-ERR Protocol error: "),
            "{:?}",
            String::from_utf8_lossy(&reply)
        );
    }
    let mut publisher = RawConn::connect(node.resp);
    publisher.command(&[b"PUBLISH", b"calm", b"still here"]);
    assert_eq!(publisher.read_until_suffix(b"\r\n"), b":1\r\n");
    assert_eq!(
        subscriber.read_until_suffix(b"still here\r\n"),
        b"*3\r\n$7\r\nmessage\r\n$4\r\ncalm\r\n$10\r\nstill here\r\n"
    );
}

#[test]
fn crafted_patterns_cannot_hang_the_server() {
    // Non-durable, as in Redis: a durable channel's name is limited to 1,024 bytes, and the
    // long channel below is what the pattern is matched against.
    let config = config_file("[namespace.default]\nhistory_size = 0\ndurable = false\n");
    let node = Herald::start_with(&["--config", config.to_str().unwrap()]);
    let mut subscriber = RawConn::connect(node.resp);
    let pattern = format!("{}b", "*a".repeat(500));
    subscriber.command(&[b"PSUBSCRIBE", pattern.as_bytes()]);
    subscriber.read_until_suffix(b":1\r\n");
    let too_long = "a".repeat(2000);
    subscriber.command(&[b"PSUBSCRIBE", too_long.as_bytes()]);
    assert_eq!(
        subscriber.read_until_suffix(b"\r\n"),
        b"-ERR pattern too long (herald accepts up to 1024 bytes)\r\n"
    );
    // Every command that takes a glob: a compiled pattern costs tens of bytes per byte.
    let mut other = RawConn::connect(node.resp);
    for command in [
        &[&b"PUBSUB"[..], b"CHANNELS", too_long.as_bytes()][..],
        &[b"PUBSUB", b"SHARDCHANNELS", too_long.as_bytes()],
        &[b"CONFIG", b"GET", b"maxclients", too_long.as_bytes()],
        &[
            b"COMMAND",
            b"LIST",
            b"FILTERBY",
            b"PATTERN",
            too_long.as_bytes(),
        ],
    ] {
        other.command(command);
        assert_eq!(
            other.read_until_suffix(b"\r\n"),
            b"-ERR pattern too long (herald accepts up to 1024 bytes)\r\n"
        );
    }

    let mut publisher = RawConn::connect(node.resp);
    let channel = "a".repeat(100_000);
    let started = Instant::now();
    for _ in 0..10 {
        publisher.send(&encode_command(&[b"PUBLISH", channel.as_bytes(), b"x"]));
        assert_eq!(publisher.read_until_suffix(b"\r\n"), b":0\r\n");
    }
    assert!(started.elapsed() < PATIENCE);
    publisher.command(&[b"PING"]);
    assert_eq!(publisher.read_until_suffix(b"\r\n"), b"+PONG\r\n");
}

#[test]
fn client_kill_closes_the_target() {
    let node = Herald::start();
    let mut victim = RawConn::connect(node.resp);
    victim.command(&[b"CLIENT", b"ID"]);
    let id_reply = victim.read_until_suffix(b"\r\n");
    let id = String::from_utf8_lossy(&id_reply[1..id_reply.len() - 2]).to_string();
    let mut admin = RawConn::connect(node.resp);
    admin.command(&[b"CLIENT", b"KILL", b"ID", id.as_bytes()]);
    assert_eq!(admin.read_until_suffix(b"\r\n"), b":1\r\n");
    assert_eq!(victim.read_to_close(), b"");
    admin.command(&[b"CLIENT", b"KILL", b"127.0.0.1:1"]);
    assert_eq!(admin.read_until_suffix(b"\r\n"), b"-ERR No such client\r\n");
}

#[test]
fn idle_clients_are_closed_after_the_timeout_but_subscribers_are_not() {
    let node = Herald::start_with(&["--timeout", "1"]);
    let mut idle = RawConn::connect(node.resp);
    idle.command(&[b"PING"]);
    assert_eq!(idle.read_until_suffix(b"\r\n"), b"+PONG\r\n");
    let mut subscriber = RawConn::connect(node.resp);
    subscriber.command(&[b"SUBSCRIBE", b"quiet"]);
    subscriber.read_until_suffix(b":1\r\n");

    assert_eq!(
        idle.read_to_close(),
        b"",
        "the idle client is closed without a reply"
    );
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let mut publisher = RawConn::connect(node.resp);
    publisher.command(&[b"PUBLISH", b"quiet", b"still subscribed"]);
    assert_eq!(publisher.read_until_suffix(b"\r\n"), b":1\r\n");
    subscriber.read_until_suffix(b"still subscribed\r\n");
}

#[test]
fn a_malformed_request_leaves_no_client_behind() {
    let node = Herald::start();
    let mut watcher = RawConn::connect(node.resp);
    for _ in 0..20 {
        let mut bad = RawConn::connect(node.resp);
        bad.send(b"*1\r\n\r\n");
        assert_eq!(
            bad.read_to_close(),
            b"-ERR Protocol error: expected '$', got ' '\r\n"
        );
    }
    // Only the watcher is left in the client list (the bad connections are gone, not leaked).
    herald_tests::wait_until("the refused clients leave the client list", || {
        watcher.command(&[b"CLIENT", b"LIST"]);
        let list = watcher.read_frame();
        String::from_utf8_lossy(&list).matches("id=").count() == 1
    });
}

/// The publish API's answer to a body over the limit: the limit, and what to do, as a line of
/// text like its other errors.
const TOO_LARGE: &str = "the request body is over the limit of 2097152 bytes (2 MiB): split the \
                         events over several requests; one event's data must fit in one request\n";

/// `POST /api/publish` takes bodies of up to 2 MiB. A `Content-Length` over that is refused at
/// once with a 413, without waiting for the body: no `100 Continue` invites it, and a client
/// that sends no `Expect` is not left without an answer while it sends (or never sends) 100 MB.
/// (The clients here announce a length and send no body: one that sends it gets the 413 too,
/// but may see the connection reset first, as the node closes it without reading the body.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_body_announced_over_the_limit_is_refused_before_it_is_read() {
    let node = Herald::start();
    for (length, expect) in [
        (100_000_000, "Expect: 100-continue\r\n"),
        (100_000_000, ""),
        (LIMIT + 1, ""),
    ] {
        let mut client = RawConn::connect(node.http);
        client.send(
            format!(
                "POST /api/publish HTTP/1.1\r\nHost: herald\r\nContent-Type: application/json\r\n\
                 Content-Length: {length}\r\n{expect}\r\n"
            )
            .as_bytes(),
        );
        // The answer, then the end of the connection (the body is never read).
        let reply = String::from_utf8(client.read_to_close()).unwrap();
        assert!(
            reply.starts_with("HTTP/1.1 413 Payload Too Large\r\n")
                && reply.contains("content-type: text/plain; charset=utf-8\r\n")
                && reply.ends_with(&format!("\r\n\r\n{TOO_LARGE}")),
            "{length} {expect:?}: {reply:?}"
        );
        assert!(!reply.contains("100 Continue"), "{reply:?}");
    }

    // A body of exactly 2 MiB is published.
    let frame = r#"{"channel":"big","data":""}"#;
    let body = format!(
        r#"{{"channel":"big","data":"{}"}}"#,
        "x".repeat(LIMIT - frame.len())
    );
    assert_eq!(body.len(), LIMIT);
    let reply = herald_tests::publish_raw(&node, body).await;
    assert_eq!(reply.status(), 200, "{}", reply.text().await.unwrap());
}

/// Sends a chunked `POST path` whose body is `total` bytes (64 KiB chunks) on `client`, in
/// full, as a client that reads the answer only once its request is sent (curl, most
/// libraries) does; panics naming the byte it got to if the node cuts it off before.
fn send_chunked(client: &mut RawConn, path: &str, total: usize) {
    use std::io::Write;
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: herald\r\nContent-Type: application/json\r\n\
         Transfer-Encoding: chunked\r\n\r\n"
    );
    let mut stream = client.stream();
    stream.write_all(head.as_bytes()).expect("send the head");
    let chunk = vec![b'x'; 64 * 1024];
    let mut sent = 0;
    while sent < total {
        let n = chunk.len().min(total - sent);
        let framed = [format!("{n:X}\r\n").as_bytes(), &chunk[..n], b"\r\n"].concat();
        if let Err(error) = stream.write_all(&framed) {
            panic!("the node cut the body off after {sent} of {total} bytes: {error}");
        }
        sent += n;
    }
    stream
        .write_all(b"0\r\n\r\n")
        .expect("send the body's last chunk");
}

/// Reads one HTTP/1.1 response with a `content-length` (head and body) from `client`.
fn read_response(client: &mut RawConn) -> (String, String) {
    let head = String::from_utf8(client.read_through(b"\r\n\r\n")).unwrap();
    let length = head
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse::<usize>().ok())?
        })
        .unwrap_or_else(|| panic!("no content-length in {head:?}"));
    let body = String::from_utf8(client.read_exact(length)).unwrap();
    (head, body)
}

/// A body sent without a length (`Transfer-Encoding: chunked`) that grows past the 2 MiB
/// limit gets the same 413 as a `Content-Length` over it: the node reads the rest of the body
/// and drops it before it answers, so a client that sends its whole body before it reads gets
/// the answer, not a reset connection (closing a socket with unread bytes in it sends a TCP
/// reset, which can also discard the answer sent just before). The connection stays usable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_publish_body_over_the_limit_gets_a_413_not_a_reset() {
    let node = Herald::start();
    for total in [LIMIT + 1, 12 * 1024 * 1024] {
        let mut client = RawConn::connect(node.http);
        send_chunked(&mut client, "/api/publish", total);
        let (head, body) = read_response(&mut client);
        assert!(
            head.starts_with("HTTP/1.1 413 Payload Too Large\r\n"),
            "{total}: {head:?}"
        );
        assert_eq!(body, TOO_LARGE, "{total}");
        // The body was read to its end: the connection takes the next request.
        let publish = r#"{"channel":"after-413","data":"ok"}"#;
        client.send(
            format!(
                "POST /api/publish HTTP/1.1\r\nHost: herald\r\nContent-Type: application/json\r\n\
                 Content-Length: {}\r\n\r\n{publish}",
                publish.len()
            )
            .as_bytes(),
        );
        let (head, body) = read_response(&mut client);
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head:?} {body}");
    }

    // A real HTTP client streaming its body (reqwest sends it chunked) gets the 413 too.
    let chunks = futures::stream::iter(
        (0..12 * 16).map(|_| Ok::<_, std::io::Error>(bytes::Bytes::from(vec![b'x'; 64 * 1024]))),
    );
    let reply = reqwest::Client::new()
        .post(format!("{}/api/publish", node.http_url()))
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .expect("an answer, not a reset connection");
    assert_eq!(reply.status(), 413);
    assert_eq!(reply.text().await.unwrap(), TOO_LARGE);
}

/// The cluster endpoints `herald cluster init|join|remove|namespaces --set` calls hold their
/// bodies to the publish API's 2 MiB, with the same answers: a `Content-Length` over it gets a
/// 413 at once (no `100 Continue`, the body never read), a chunked body passing it gets the
/// 413 once the rest is read and dropped; as JSON `{"error"}`, which the CLI prints. (On a
/// node that is not clustered, a body within the limit gets the endpoint's 409.)
#[test]
fn cluster_request_bodies_over_the_limit_get_a_413_at_once() {
    let node = Herald::start();
    let refused = |head: &str, body: &str, what: &str| {
        assert!(
            head.starts_with("HTTP/1.1 413 Payload Too Large\r\n")
                && head.contains("content-type: application/json\r\n"),
            "{what}: {head:?}"
        );
        let error: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(
            error["error"], "the request body is over the limit of 2097152 bytes (2 MiB)",
            "{what}"
        );
    };
    for path in [
        "/api/cluster/init",
        "/api/cluster/join",
        "/api/cluster/remove",
        "/api/cluster/namespaces",
    ] {
        for (length, expect) in [
            (100_000_000, "Expect: 100-continue\r\n"),
            (100_000_000, ""),
            (LIMIT + 1, ""),
        ] {
            let what = format!("{path} {length} {expect:?}");
            let mut client = RawConn::connect(node.http);
            // Not the harness's 30 s: a node that waits for the body never answers.
            client
                .stream()
                .set_read_timeout(Some(std::time::Duration::from_secs(5)))
                .unwrap();
            client.send(
                format!(
                    "POST {path} HTTP/1.1\r\nHost: herald\r\nContent-Type: application/json\r\n\
                     Content-Length: {length}\r\n{expect}\r\n"
                )
                .as_bytes(),
            );
            let reply = String::from_utf8(client.read_to_close()).unwrap();
            let (head, body) = reply
                .split_once("\r\n\r\n")
                .unwrap_or_else(|| panic!("{what}: no answer in time: {reply:?}"));
            assert!(!reply.contains("100 Continue"), "{what}: {reply:?}");
            refused(head, body, &what);
        }
        let mut client = RawConn::connect(node.http);
        send_chunked(&mut client, path, 12 * 1024 * 1024);
        let (head, body) = read_response(&mut client);
        refused(&head, &body, &format!("{path} chunked"));
        // Within the limit, the request reaches the endpoint.
        let member = r#"{"nodeId":2,"addr":"127.0.0.1:51002"}"#;
        client.send(
            format!(
                "POST {path} HTTP/1.1\r\nHost: herald\r\nContent-Type: application/json\r\n\
                 Content-Length: {}\r\n\r\n{member}",
                member.len()
            )
            .as_bytes(),
        );
        let (head, body) = read_response(&mut client);
        assert!(
            head.starts_with("HTTP/1.1 409 Conflict\r\n"),
            "{path}: {head:?}"
        );
        assert!(body.contains("this node runs alone"), "{path}: {body}");
    }
}
