//! Answering clients while the node starts.
//!
//! A node binds its client ports before it opens its store, so that a port in use is a
//! one-line error that touches nothing. Opening the store can take seconds: after a crash the
//! write-ahead log is replayed (3.3 s for 65,000 records, seen in the chaos suite), and a
//! cluster node starts its Raft groups. A bound port that nobody accepts on does not refuse
//! clients: the kernel queues them in its listen backlog, unanswered. A publisher then waited
//! out the whole replay instead of trying another node (holds of 2.4–3.5 s after each `kill -9`
//! in the chaos suite).
//!
//! So from the moment the ports are bound until the node is ready, [`Starting`] answers them
//! at once, the way Redis answers while it loads its dataset. Every answer says that nothing
//! was committed and that the client should retry (here in a moment, or on another node):
//!
//! - **RESP** ([`resp`]): every command gets `-LOADING ...` (redis-py raises
//!   `BusyLoadingError`, the `redis` crate `ErrorKind::BusyLoadingError`); `QUIT` gets `+OK` and
//!   closes. The connection stays open: once the node is ready it is handed to the RESP server
//!   with whatever half-sent request it holds, so a client that retries on it is served.
//!   Unlike Redis, `AUTH` and `HELLO` get `-LOADING` too (the session they would set up does
//!   not carry over), so a client that sends them on connect fails to connect and retries.
//! - **HTTP** ([`http`]): `/health` is 200 with `{"status":"starting"}` and the build's
//!   `version` and `commit` (the process is alive: a liveness probe must not kill a node that
//!   is replaying a long log), `/ready` is 503 with
//!   `{"status":"starting: loading the event store"}`. An SSE request gets the stream's usual
//!   ending for a node clients must leave (a `retry:` line, then `event: reconnect`), which
//!   browsers follow by reconnecting with their `Last-Event-ID`: an HTTP error status would
//!   make an `EventSource` give up for good. A WebSocket is accepted and closed with code 1012
//!   ("service restart"), as a node without quorum closes it. Everything else is a 503 with
//!   `Retry-After: 1`. Each connection carries one request (`Connection: close`), so none
//!   outlives the start-up. CORS headers are the node's, so browsers on other origins can
//!   read these answers too.
//!
//! [`Starting::finish`] stops the answering and gives back both listeners and the RESP
//! connections to adopt ([`crate::resp::RespServer::adopt`]); nothing is closed or refused on
//! the way. The counts of what was answered are logged then.

pub mod http;
pub mod resp;

use crate::http::HttpSettings;
use crate::resp::{AdoptedClient, RespSettings};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// How many RESP connections can wait to be adopted before their hand-over waits.
const ADOPTION_QUEUE: usize = 256;

/// What was answered during the start-up, for the log line at the end of it.
#[derive(Debug, Default)]
pub struct Answered {
    /// RESP commands answered with `-LOADING`.
    pub resp_commands: AtomicU64,
    /// HTTP requests answered (any route).
    pub http_requests: AtomicU64,
}

/// The client ports of a node that is starting, answered until [`Starting::finish`].
///
/// Dropped without `finish` (the start failed), it stops answering and closes both ports and
/// every connection it holds.
pub struct Starting {
    ready: CancellationToken,
    resp: Option<JoinHandle<TcpListener>>,
    http: Option<JoinHandle<TcpListener>>,
    adopt: Option<mpsc::Receiver<AdoptedClient>>,
    answered: Arc<Answered>,
}

/// The ports back from a finished start-up, for the servers that take them over.
pub struct Finished {
    /// The RESP listener.
    pub resp: TcpListener,
    /// The HTTP listener.
    pub http: TcpListener,
    /// RESP connections accepted during the start-up, for
    /// [`RespServer::adopt`](crate::resp::RespServer::adopt).
    pub adopt: mpsc::Receiver<AdoptedClient>,
}

impl Starting {
    /// Starts answering on both listeners, with the node's RESP settings (password, limits,
    /// `maxclients`) and HTTP settings (CORS, the SSE `retry:` delay).
    pub fn answer(
        resp: TcpListener,
        http: TcpListener,
        resp_settings: &RespSettings,
        http_settings: &HttpSettings,
    ) -> Starting {
        let ready = CancellationToken::new();
        let answered = Arc::new(Answered::default());
        let (handover, adopt) = mpsc::channel(ADOPTION_QUEUE);
        let resp = tokio::spawn(resp::answer(
            resp,
            resp_settings.clone(),
            ready.clone(),
            handover,
            answered.clone(),
        ));
        let http = tokio::spawn(http::answer(
            http,
            http::router(http_settings, answered.clone()),
            ready.clone(),
        ));
        Starting {
            ready,
            resp: Some(resp),
            http: Some(http),
            adopt: Some(adopt),
            answered,
        }
    }

    /// What has been answered so far.
    pub fn answered(&self) -> &Answered {
        &self.answered
    }

    /// Stops answering: returns the listeners once no new connection is accepted on them, and
    /// the RESP connections to adopt. HTTP requests already received get their start-up
    /// answer.
    pub async fn finish(mut self) -> std::io::Result<Finished> {
        self.ready.cancel();
        let joined = |task: Option<JoinHandle<TcpListener>>| async move {
            task.expect("finished once")
                .await
                .map_err(std::io::Error::other)
        };
        let resp = joined(self.resp.take()).await?;
        let http = joined(self.http.take()).await?;
        let (commands, requests) = (
            self.answered.resp_commands.load(Ordering::Relaxed),
            self.answered.http_requests.load(Ordering::Relaxed),
        );
        if commands + requests > 0 {
            tracing::info!(
                resp_commands = commands,
                http_requests = requests,
                "answered clients while starting (LOADING, 503, reconnect)"
            );
        }
        Ok(Finished {
            resp,
            http,
            adopt: self.adopt.take().expect("finished once"),
        })
    }
}

impl Drop for Starting {
    fn drop(&mut self) {
        // A failed start: the accept loops end and drop their listeners; connections waiting
        // to be handed over find the queue closed and close.
        self.ready.cancel();
    }
}

/// The one-line reason every start-up answer gives.
pub const STARTING: &str =
    "herald is starting (loading its event store): nothing was committed; retry in a moment";

#[cfg(test)]
mod tests;
