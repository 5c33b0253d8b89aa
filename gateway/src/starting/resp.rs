//! The RESP port while the node starts: `-LOADING` to every command, and each connection handed
//! to the RESP server once the node is ready.

use super::{Answered, STARTING};
use crate::resp::parse::RequestParser;
use crate::resp::{AdoptedClient, RespSettings};
use bytes::BytesMut;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long a reply may wait for a client that does not read before its connection is closed.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Bytes read at a time.
const READ_CHUNK_BYTES: usize = 4 * 1024;

/// Accepts RESP clients on `listener` and answers them until `ready` is cancelled; then
/// returns the listener. Each connection is handed over on `handover` once `ready` is
/// cancelled.
pub(super) async fn answer(
    listener: TcpListener,
    settings: RespSettings,
    ready: CancellationToken,
    handover: mpsc::Sender<AdoptedClient>,
    answered: Arc<Answered>,
) -> TcpListener {
    let settings = Arc::new(settings);
    let open = Arc::new(AtomicUsize::new(0));
    let clients = TaskTracker::new();
    loop {
        let (stream, addr) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "accepting a RESP client failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = ready.cancelled() => break,
        };
        let _ = stream.set_nodelay(true);
        let client = Client {
            stream,
            addr,
            settings: settings.clone(),
            answered: answered.clone(),
            _open: Open::count(&open),
        };
        if open.load(Ordering::Relaxed) > settings.maxclients {
            clients.spawn(client.refuse());
        } else {
            clients.spawn(client.serve(ready.clone(), handover.clone()));
        }
    }
    clients.close();
    listener
}

/// One RESP client of a starting node.
struct Client {
    stream: TcpStream,
    addr: SocketAddr,
    settings: Arc<RespSettings>,
    answered: Arc<Answered>,
    _open: Open,
}

impl Client {
    /// Over `maxclients`: told so and closed, as the RESP server does.
    async fn refuse(mut self) {
        let _ = tokio::time::timeout(
            WRITE_TIMEOUT,
            self.stream
                .write_all(b"-ERR max number of clients reached\r\n"),
        )
        .await;
    }

    /// Answers every command with `-LOADING` until `ready`, then hands the connection over.
    async fn serve(mut self, ready: CancellationToken, handover: mpsc::Sender<AdoptedClient>) {
        let limits = self.settings.request_limits();
        // Before AUTH, Redis's stricter request limits; no command here authenticates.
        let authenticated = self.settings.requirepass.is_none();
        let mut parser = RequestParser::new();
        let mut buffer = BytesMut::new();
        let mut replies = BytesMut::new();
        let mut in_refused_transaction = false;
        loop {
            let mut quit = false;
            loop {
                match parser.next_request(&mut buffer, &limits, authenticated) {
                    Ok(Some(args)) => {
                        if args[0].eq_ignore_ascii_case(b"QUIT") {
                            replies.extend_from_slice(b"+OK\r\n");
                            quit = true;
                            break;
                        }
                        self.answered.resp_commands.fetch_add(1, Ordering::Relaxed);
                        if args[0].eq_ignore_ascii_case(b"MULTI") {
                            in_refused_transaction = true;
                        } else if [&b"EXEC"[..], b"DISCARD", b"RESET"]
                            .iter()
                            .any(|name| args[0].eq_ignore_ascii_case(name))
                        {
                            in_refused_transaction = false;
                        }
                        replies.extend_from_slice(b"-LOADING ");
                        replies.extend_from_slice(STARTING.as_bytes());
                        replies.extend_from_slice(b"\r\n");
                    }
                    Ok(None) => break,
                    Err(error) => {
                        replies.extend_from_slice(format!("-ERR {error}\r\n").as_bytes());
                        quit = true;
                        break;
                    }
                }
            }
            if !replies.is_empty() {
                let written =
                    tokio::time::timeout(WRITE_TIMEOUT, self.stream.write_all(&replies)).await;
                if !matches!(written, Ok(Ok(()))) {
                    return;
                }
                replies.clear();
            }
            if quit || buffer.len() > self.settings.client_query_buffer_limit {
                return;
            }
            buffer.reserve(READ_CHUNK_BYTES);
            tokio::select! {
                biased;
                _ = ready.cancelled() => break,
                // Cancel-safe: a read that loses the race has read nothing.
                read = self.stream.read_buf(&mut buffer) => match read {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                },
            }
        }
        let adopted = AdoptedClient {
            stream: self.stream,
            addr: self.addr,
            parser,
            buffer,
            in_refused_transaction,
        };
        // A closed queue: the start failed, and the connection closes with it.
        let _ = handover.send(adopted).await;
    }
}

/// Counts a connection of the starting node while it is open.
struct Open(Arc<AtomicUsize>);

impl Open {
    fn count(open: &Arc<AtomicUsize>) -> Open {
        open.fetch_add(1, Ordering::Relaxed);
        Open(open.clone())
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}
