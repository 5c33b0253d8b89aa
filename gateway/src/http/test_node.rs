//! A node's HTTP surface in this process, for the HTTP layer's unit tests: a broker on a fresh
//! temporary store, a RESP context beside it, and the HTTP state and listener over them.

use super::{HttpSettings, HttpState, serve};
use crate::broker::Broker;
use crate::hub::Hub;
use crate::hub::outbox::OutputLimit;
use crate::resp::{RespServer, RespSettings};
use herald_storage::{Namespaces, StoreOptions};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A running node; dropping it shuts it down and deletes its store.
pub(crate) struct TestNode {
    /// Where the HTTP listener is bound.
    pub addr: SocketAddr,
    /// The handlers' shared state.
    pub state: HttpState,
    /// Cancels the node.
    pub shutdown: CancellationToken,
    /// The server task (taken by tests that wait for it to end).
    pub served: Option<JoinHandle<std::io::Result<()>>>,
    dir: PathBuf,
}

impl Drop for TestNode {
    fn drop(&mut self) {
        self.shutdown.cancel();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Starts a node with `settings`; `name` tells its store directory apart.
pub(crate) async fn start(name: &str, settings: HttpSettings) -> TestNode {
    let dir = std::env::temp_dir().join(format!(
        "herald-{name}-unit-{}-{:x}",
        std::process::id(),
        super::sse::rand_u64()
    ));
    let hub = Arc::new(Hub::new(OutputLimit::PUBSUB_DEFAULT));
    let broker = Broker::open(hub, &dir, StoreOptions::default(), Namespaces::default()).unwrap();
    let shutdown = CancellationToken::new();
    let resp = RespServer::with_listener(
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
        broker.clone(),
        RespSettings::default(),
        shutdown.clone(),
    )
    .unwrap();
    let state = HttpState::new(
        broker,
        resp.context(),
        settings,
        Arc::new(String::new),
        shutdown.clone(),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let served = Some(tokio::spawn(serve(listener, state.clone())));
    TestNode {
        addr,
        state,
        shutdown,
        served,
        dir,
    }
}
