//! The start-up answers, seen by real clients (the `redis` crate, an SSE parser over reqwest,
//! tokio-tungstenite), and the hand-over of RESP connections to the server that follows.

use super::{Finished, STARTING, Starting};
use crate::broker::Broker;
use crate::http::HttpSettings;
use crate::hub::Hub;
use crate::hub::outbox::OutputLimit;
use crate::resp::{RespServer, RespSettings};
use eventsource_stream::Eventsource;
use futures::StreamExt;
use herald_storage::{Namespaces, StoreOptions};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// A starting node's two ports.
struct Ports {
    starting: Starting,
    resp: SocketAddr,
    http: SocketAddr,
}

async fn start_answering(http: HttpSettings) -> Ports {
    let resp = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (resp_addr, http_addr) = (
        resp.local_addr().unwrap(),
        http_listener.local_addr().unwrap(),
    );
    Ports {
        starting: Starting::answer(resp, http_listener, &RespSettings::default(), &http),
        resp: resp_addr,
        http: http_addr,
    }
}

/// Reads from `stream` until `want` bytes have come (or the peer closes).
async fn read_exactly(stream: &mut TcpStream, want: usize) -> String {
    let mut got = vec![0; want];
    tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut got))
        .await
        .expect("a reply within 10 s")
        .expect("the connection stays open");
    String::from_utf8(got).unwrap()
}

#[tokio::test]
async fn redis_clients_get_loading_and_their_connections_are_served_once_the_node_is_ready() {
    let ports = start_answering(HttpSettings::default()).await;
    let loading = format!("-LOADING {STARTING}\r\n");

    // The redis crate sees the error Redis gives while it loads.
    let client = redis::Client::open(format!("redis://{}/", ports.resp)).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    let error = redis::cmd("PUBLISH")
        .arg("news")
        .arg("hello")
        .query_async::<i64>(&mut connection)
        .await
        .unwrap_err();
    assert_eq!(
        error.kind(),
        redis::ErrorKind::Server(redis::ServerErrorKind::BusyLoading),
        "{error}"
    );
    assert!(
        error.to_string().contains("nothing was committed"),
        "{error}"
    );

    // A raw client: pipelined commands get one answer each, and half a request sent before
    // the node is ready (in the same write as the second PING, so it has been read once
    // that PING is answered) is completed after it.
    let mut raw = TcpStream::connect(ports.resp).await.unwrap();
    raw.write_all(b"PING\r\n").await.unwrap();
    assert_eq!(read_exactly(&mut raw, loading.len()).await, loading);
    raw.write_all(b"*1\r\n$4\r\nPING\r\n*2\r\n$4\r\nECHO\r\n$5\r\nhel")
        .await
        .unwrap();
    assert_eq!(read_exactly(&mut raw, loading.len()).await, loading);
    // A client that quits is answered and closed.
    let mut quitting = TcpStream::connect(ports.resp).await.unwrap();
    quitting.write_all(b"QUIT\r\n").await.unwrap();
    let mut reply = String::new();
    quitting.read_to_string(&mut reply).await.unwrap();
    assert_eq!(reply, "+OK\r\n");
    assert!(
        ports
            .starting
            .answered()
            .resp_commands
            .load(Ordering::Relaxed)
            >= 3
    );

    let (server, dir) = ready(ports.starting).await;
    raw.write_all(b"lo\r\n").await.unwrap();
    assert_eq!(read_exactly(&mut raw, 11).await, "$5\r\nhello\r\n");
    let receivers: i64 = redis::cmd("PUBLISH")
        .arg("news")
        .arg("hello")
        .query_async(&mut connection)
        .await
        .unwrap();
    assert_eq!(receivers, 0);
    // New clients go to the server itself.
    let mut fresh = client.get_multiplexed_async_connection().await.unwrap();
    let pong: String = redis::cmd("PING").query_async(&mut fresh).await.unwrap();
    assert_eq!(pong, "PONG");
    server.cancel();
    let _ = std::fs::remove_dir_all(dir);
}

/// A transaction cut by the moment the node became ready does not run its second half: its
/// `MULTI` was refused, so its `EXEC` is too, and nothing of it is published (a client that
/// retries it publishes it once). A transaction that ended while starting leaves nothing.
#[tokio::test]
async fn a_transaction_refused_while_starting_stays_refused_once_ready() {
    let ports = start_answering(HttpSettings::default()).await;
    let loading = format!("-LOADING {STARTING}\r\n");
    let mut cut = TcpStream::connect(ports.resp).await.unwrap();
    cut.write_all(b"MULTI\r\nPUBLISH tx one\r\n").await.unwrap();
    assert_eq!(
        read_exactly(&mut cut, 2 * loading.len()).await,
        loading.repeat(2)
    );
    let mut ended = TcpStream::connect(ports.resp).await.unwrap();
    ended.write_all(b"MULTI\r\nEXEC\r\n").await.unwrap();
    assert_eq!(
        read_exactly(&mut ended, 2 * loading.len()).await,
        loading.repeat(2)
    );

    let (server, dir) = ready(ports.starting).await;
    cut.write_all(b"PUBLISH tx two\r\nEXEC\r\nHISTORY tx\r\n")
        .await
        .unwrap();
    let want = "+QUEUED\r\n-EXECABORT Transaction discarded because of previous errors.\r\n*0\r\n";
    assert_eq!(read_exactly(&mut cut, want.len()).await, want);
    ended.write_all(b"PUBLISH tx three\r\n").await.unwrap();
    assert_eq!(read_exactly(&mut ended, 4).await, ":0\r\n");
    server.cancel();
    let _ = std::fs::remove_dir_all(dir);
}

/// Finishes the start-up and runs a RESP server (on a fresh store) that adopts its clients;
/// returns the server's shutdown token and the store's directory.
async fn ready(starting: Starting) -> (CancellationToken, std::path::PathBuf) {
    let Finished { resp, http, adopt } = starting.finish().await.unwrap();
    drop(http);
    let dir = std::env::temp_dir().join(format!(
        "herald-starting-unit-{}-{:x}",
        std::process::id(),
        crate::http::sse::rand_u64()
    ));
    let hub = std::sync::Arc::new(Hub::new(OutputLimit::PUBSUB_DEFAULT));
    let broker = Broker::open(hub, &dir, StoreOptions::default(), Namespaces::default()).unwrap();
    let shutdown = CancellationToken::new();
    let mut server =
        RespServer::with_listener(resp, broker, RespSettings::default(), shutdown.clone()).unwrap();
    server.adopt(adopt);
    tokio::spawn(server.run(Duration::from_secs(1)));
    (shutdown, dir)
}

#[tokio::test]
async fn http_clients_are_told_the_node_is_starting_in_their_protocols_terms() {
    let settings = HttpSettings {
        retry: Duration::from_millis(1500),
        cors_origins: vec!["*".to_string()],
        ..HttpSettings::default()
    };
    let ports = start_answering(settings).await;
    let base = format!("http://{}", ports.http);
    let http = reqwest::Client::new();

    // Alive, not ready.
    let health = http.get(format!("{base}/health")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let body: serde_json::Value = health.json().await.unwrap();
    assert_eq!(
        body,
        serde_json::json!({
            "status": "starting",
            "version": crate::build::VERSION,
            "commit": crate::build::COMMIT,
        })
    );
    let ready = http.get(format!("{base}/ready")).send().await.unwrap();
    assert_eq!(ready.status(), 503);
    let body: serde_json::Value = ready.json().await.unwrap();
    assert_eq!(body["status"], "starting: loading the event store");

    // A publish: refused, retry in a second, nothing committed; one request per connection;
    // CORS headers for browsers on other origins.
    let publish = http
        .post(format!("{base}/api/publish"))
        .header("origin", "https://app.example")
        .json(&serde_json::json!({ "channel": "news", "data": "hello" }))
        .send()
        .await
        .unwrap();
    assert_eq!(publish.status(), 503);
    assert_eq!(publish.headers()["retry-after"], "1");
    assert_eq!(publish.headers()["connection"], "close");
    assert_eq!(publish.headers()["access-control-allow-origin"], "*");
    assert_eq!(publish.text().await.unwrap(), format!("{STARTING}\n"));

    // SSE: a 200 stream that sets the retry delay, says reconnect, and ends.
    let stream = http
        .get(format!("{base}/api/stream/news"))
        .header("last-event-id", "0-1-2")
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    assert_eq!(stream.headers()["content-type"], "text/event-stream");
    let events: Vec<_> = stream.bytes_stream().eventsource().collect().await;
    assert_eq!(events.len(), 1, "{events:?}");
    let event = events[0].as_ref().unwrap();
    assert_eq!(event.event, "reconnect");
    assert_eq!(event.retry, Some(Duration::from_millis(1500)));
    assert!(
        event.data.starts_with(r#"{"type":"reconnect","reason":"#),
        "{event:?}"
    );
    let data: serde_json::Value = serde_json::from_str(&event.data).unwrap();
    assert!(
        data["reason"].as_str().unwrap().contains("Last-Event-ID"),
        "{data}"
    );

    // WebSocket: accepted, then closed with 1012 ("service restart").
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
    let (mut socket, _) =
        tokio_tungstenite::connect_async(format!("ws://{}/ws?userId=u", ports.http))
            .await
            .unwrap();
    match socket.next().await {
        Some(Ok(Message::Close(Some(frame)))) => {
            assert_eq!(frame.code, CloseCode::Restart);
            assert!(
                frame.reason.contains("resume from your cursor"),
                "{frame:?}"
            );
        }
        other => panic!("expected a close frame, got {other:?}"),
    }
    // Counted as each is answered: /health, /ready, the publish, the stream, the upgrade.
    assert_eq!(
        ports
            .starting
            .answered()
            .http_requests
            .load(Ordering::Relaxed),
        5
    );

    // Once finished, the port is the listener's again: a new connection waits for its owner.
    let Finished { http: listener, .. } = ports.starting.finish().await.unwrap();
    assert_eq!(listener.local_addr().unwrap(), ports.http);
    let _client = TcpStream::connect(ports.http).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), listener.accept())
        .await
        .expect("the returned listener accepts")
        .unwrap();
}
