//! Node-to-node RPC and openraft's network with real QUIC endpoints on loopback: application
//! calls, malformed frames, unknown groups, a down peer that comes back, and a 3-node openraft
//! group (in-memory log and state machine, test-only) electing a leader and replicating a
//! write.

use bytes::Bytes;
use futures::future::BoxFuture;
use herald_cluster::identity::{init_ca, issue_node};
use herald_cluster::rpc::StoreIds;
use herald_cluster::{
    GroupNetworkFactory, Handler, NodeIdentity, Peers, PeersOptions, Request, Response, RpcError,
    Transport, TransportOptions, serve,
};
use herald_storage::Publish;
use herald_storage::raft::{Command, GroupId, NodeId, Reply, TypeConfig};
use openraft::raft::VoteRequest;
use openraft::{BasicNode, Raft, Vote};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

const PATIENCE: Duration = Duration::from_secs(30);

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

fn cert_dir(tag: &str, nodes: &[u64]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("herald-rpc-test-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    init_ca(&dir).unwrap();
    for &id in nodes {
        issue_node(&dir, id).unwrap();
    }
    dir
}

fn bind(dir: &Path, id: NodeId, addr: SocketAddr) -> std::io::Result<Arc<Transport>> {
    bind_with(dir, id, addr, &TransportOptions::default())
}

fn bind_with(
    dir: &Path,
    id: NodeId,
    addr: SocketAddr,
    options: &TransportOptions,
) -> std::io::Result<Arc<Transport>> {
    let identity = NodeIdentity::load(dir, id).unwrap();
    match Transport::bind(addr, identity, options, Arc::new(|_| true)) {
        Ok(transport) => Ok(Arc::new(transport)),
        Err(error) => Err(std::io::Error::other(error.to_string())),
    }
}

/// Serves the Raft groups registered with it; answers application requests with an echo.
#[derive(Default)]
struct TestHandler {
    id: NodeId,
    groups: Mutex<HashMap<GroupId, Raft<TypeConfig>>>,
    stores: Option<Arc<FixedStores>>,
}

/// Store ids as a test fixes them: this node's, and the one each peer must show.
struct FixedStores {
    local: u64,
    expected: HashMap<NodeId, u64>,
    refused: Mutex<std::collections::HashSet<NodeId>>,
}

impl FixedStores {
    fn new(local: u64, expected: &[(NodeId, u64)]) -> Arc<FixedStores> {
        Arc::new(FixedStores {
            local,
            expected: expected.iter().copied().collect(),
            refused: Mutex::default(),
        })
    }
}

impl StoreIds for FixedStores {
    fn local(&self) -> u64 {
        self.local
    }

    fn accepts(&self, peer: NodeId, store: u64) -> bool {
        let ok = self.expected.get(&peer).is_none_or(|&e| e == store);
        let mut refused = self.refused.lock().unwrap();
        if ok {
            refused.remove(&peer);
        } else {
            refused.insert(peer);
        }
        ok
    }

    fn refused(&self, peer: NodeId) -> bool {
        self.refused.lock().unwrap().contains(&peer)
    }
}

impl Handler for TestHandler {
    fn store_ids(&self) -> Option<&dyn StoreIds> {
        self.stores.as_deref().map(|s| s as &dyn StoreIds)
    }

    fn raft(&self, group: GroupId) -> Option<Raft<TypeConfig>> {
        self.groups.lock().unwrap().get(&group).cloned()
    }

    /// An echo; a request `hang` is never answered (a peer that stopped answering).
    fn app(&self, from: NodeId, request: Bytes) -> BoxFuture<'static, Bytes> {
        let answer = format!("node {} to node {from}: ", self.id);
        Box::pin(async move {
            if &request[..] == b"hang" {
                futures::future::pending::<()>().await;
            }
            Bytes::from([answer.as_bytes(), &request].concat())
        })
    }
}

/// One node: its endpoint, its RPC server, its client pool.
struct Node {
    transport: Arc<Transport>,
    handler: Arc<TestHandler>,
    peers: Arc<Peers>,
    shutdown: CancellationToken,
    server: tokio::task::JoinHandle<()>,
}

impl Node {
    fn start(transport: Arc<Transport>, options: PeersOptions) -> Node {
        Node::start_with(transport, options, None)
    }

    fn start_with(
        transport: Arc<Transport>,
        options: PeersOptions,
        stores: Option<Arc<FixedStores>>,
    ) -> Node {
        let handler = Arc::new(TestHandler {
            id: transport.id(),
            stores: stores.clone(),
            ..Default::default()
        });
        let shutdown = CancellationToken::new();
        let peers = Peers::with_options(transport.clone(), options);
        let server = serve(
            transport.clone(),
            handler.clone(),
            peers.clone(),
            shutdown.clone(),
        );
        if let Some(stores) = stores {
            peers.set_store_ids(stores);
        }
        Node {
            transport,
            handler,
            peers,
            shutdown,
            server,
        }
    }

    fn addr(&self) -> SocketAddr {
        self.transport.local_addr().unwrap()
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(PATIENCE, self.server)
            .await
            .unwrap()
            .unwrap();
        tokio::time::timeout(PATIENCE, self.transport.shutdown())
            .await
            .unwrap();
    }
}

fn app(bytes: &'static [u8]) -> Request {
    Request::App(Bytes::from_static(bytes))
}

#[tokio::test]
async fn app_requests_roundtrip_and_concurrent_callers_share_one_dial() {
    init_tracing();
    let dir = cert_dir("app", &[1, 2]);
    let localhost = "127.0.0.1:0".parse().unwrap();
    let a = Node::start(bind(&dir, 1, localhost).unwrap(), PeersOptions::default());
    let b = Node::start(bind(&dir, 2, localhost).unwrap(), PeersOptions::default());
    // By host name, as openraft's BasicNode carries it.
    a.peers
        .set_addr(2, format!("localhost:{}", b.addr().port()));

    let ping = app(b"ping");
    let calls = (0..20).map(|_| a.peers.call(2, &ping, PATIENCE));
    for response in futures::future::join_all(calls).await {
        match response.unwrap() {
            Response::App(bytes) => assert_eq!(&bytes[..], b"node 2 to node 1: ping"),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(a.peers.dials(), 1, "concurrent callers wait for one dial");

    // One at a time, a millisecond apart (as a follower's next AppendEntries comes), a call
    // costs about a datagram each way: the request carries the acknowledgement of the last
    // answer and the answer that of the request. (Each side's stream used to end with a
    // STOP_SENDING frame, which then went in a datagram of its own: two each way.)
    let before = a.peers.links()[&2].datagrams.expect("connected");
    let calls = 200;
    for _ in 0..calls {
        a.peers.call(2, &ping, PATIENCE).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let after = a.peers.links()[&2].datagrams.expect("connected");
    let (sent, received) = (after.sent - before.sent, after.received - before.received);
    assert!(
        sent < calls * 3 / 2 && received < calls * 3 / 2,
        "{calls} calls took {sent} datagrams out and {received} in"
    );

    // The other direction has its own pool; the server learned the caller's id from its
    // certificate.
    b.peers.set_addr(1, a.addr());
    match b.peers.call(1, &app(b"pong"), PATIENCE).await.unwrap() {
        Response::App(bytes) => assert_eq!(&bytes[..], b"node 1 to node 2: pong"),
        other => panic!("{other:?}"),
    }

    // A Raft RPC for a group the node does not run.
    let vote = Request::Vote {
        group: 42,
        rpc: VoteRequest::new(Vote::new(1, 1), None),
    };
    assert!(matches!(
        a.peers.call(2, &vote, PATIENCE).await.unwrap(),
        Response::NoSuchGroup(42)
    ));
    // A snapshot chunk placed past any snapshot's size is refused, not allocated.
    let far = Request::InstallSnapshot {
        group: 42,
        rpc: openraft::raft::InstallSnapshotRequest {
            vote: Vote::new(1, 1),
            meta: Default::default(),
            offset: 1 << 40,
            data: vec![1],
            done: false,
        },
    };
    match a.peers.call(2, &far, PATIENCE).await.unwrap() {
        Response::Error(reason) => assert!(reason.contains("passes the"), "{reason}"),
        other => panic!("{other:?}"),
    }

    // A node nobody gave an address for.
    let error = a.peers.call(3, &app(b"?"), PATIENCE).await.unwrap_err();
    assert!(
        matches!(error, RpcError::Unreachable { peer: 3, .. }) && error.not_sent(),
        "{error}"
    );
    assert_eq!(a.peers.dials(), 1, "still the one connection");

    stop_both(a, b, dir).await;
}

/// A peer's silence is counted from the oldest call it left unanswered, and ends with its
/// next answer: what lets the interest push stop waiting for a node that died.
#[tokio::test]
async fn a_peer_that_leaves_calls_unanswered_shows_as_silent_until_it_answers() {
    init_tracing();
    let dir = cert_dir("silence", &[1, 2]);
    let localhost = "127.0.0.1:0".parse().unwrap();
    let a = Node::start(bind(&dir, 1, localhost).unwrap(), PeersOptions::default());
    let b = Node::start(bind(&dir, 2, localhost).unwrap(), PeersOptions::default());
    a.peers.set_addr(2, b.addr());
    assert_eq!(a.peers.unanswered_for(2), None, "no call yet");
    assert!(!a.peers.called_within(2, PATIENCE), "never called");
    a.peers.call(2, &app(b"ping"), PATIENCE).await.unwrap();
    assert_eq!(a.peers.unanswered_for(2), None, "every call answered");
    // Answered lately, so the reachability check would not ping it; after a while it would.
    assert!(a.peers.called_within(2, PATIENCE));
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!a.peers.called_within(2, Duration::from_millis(50)));

    let wait = Duration::from_millis(300);
    let error = a.peers.call(2, &app(b"hang"), wait).await.unwrap_err();
    assert!(
        matches!(error, RpcError::Timeout { peer: 2, .. }),
        "{error}"
    );
    let silent = a.peers.unanswered_for(2).expect("a call is unanswered");
    assert!(silent >= wait, "silent for {silent:?}");
    tokio::time::timeout(PATIENCE, a.peers.until_silent(2, wait))
        .await
        .expect("already silent that long");

    // A second unanswered call does not restart the count; an answer ends it.
    {
        let hang = app(b"hang");
        let mut hanging = std::pin::pin!(a.peers.call(2, &hang, PATIENCE));
        assert!(
            futures::poll!(hanging.as_mut()).is_pending(),
            "sent, not answered"
        );
        assert!(a.peers.unanswered_for(2).unwrap() >= silent);
        assert!(
            a.peers.called_within(2, Duration::ZERO),
            "a call under way counts as called"
        );
        a.peers.call(2, &app(b"ping"), PATIENCE).await.unwrap();
        assert_eq!(a.peers.unanswered_for(2), None, "answered again");
    }

    stop_both(a, b, dir).await;
}

/// Writes a raw frame on a new stream and decodes the server's response.
async fn raw_call(connection: &quinn::Connection, bytes: &[u8]) -> Response {
    let (mut send, mut recv) = connection.open_bi().await.unwrap();
    send.write_all(bytes).await.unwrap();
    send.finish().unwrap();
    let response = recv.read_to_end(1 << 20).await.unwrap();
    let len = u32::from_be_bytes(response[..4].try_into().unwrap()) as usize;
    assert_eq!(len, response.len() - 4);
    let (response, _): (Response, usize) =
        bincode::serde::decode_from_slice(&response[4..], bincode::config::standard()).unwrap();
    response
}

#[tokio::test]
async fn malformed_and_oversized_frames_get_an_error_response() {
    init_tracing();
    let dir = cert_dir("malformed", &[1, 2]);
    let localhost = "127.0.0.1:0".parse().unwrap();
    let a = Node::start(bind(&dir, 1, localhost).unwrap(), PeersOptions::default());
    let b = bind(&dir, 2, localhost).unwrap();
    let connection = tokio::time::timeout(PATIENCE, b.connect(a.addr(), 1))
        .await
        .unwrap()
        .unwrap()
        .connection;

    let garbage = [0, 0, 0, 3, 0xff, 0xff, 0xff];
    match raw_call(&connection, &garbage).await {
        Response::Error(reason) => assert!(reason.contains("malformed"), "{reason}"),
        other => panic!("{other:?}"),
    }
    let oversized = (u32::MAX).to_be_bytes();
    match raw_call(&connection, &oversized).await {
        Response::Error(reason) => assert!(reason.contains("exceeds"), "{reason}"),
        other => panic!("{other:?}"),
    }
    // The server is still there, on the same connection.
    let request = bincode::serde::encode_to_vec(app(b"ok"), bincode::config::standard()).unwrap();
    let frame = [&(request.len() as u32).to_be_bytes()[..], &request].concat();
    match raw_call(&connection, &frame).await {
        Response::App(bytes) => assert_eq!(&bytes[..], b"node 1 to node 2: ok"),
        other => panic!("{other:?}"),
    }

    connection.close(0u32.into(), b"done");
    a.stop().await;
    b.shutdown().await;
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn a_stalled_handshake_does_not_hold_up_other_connections() {
    init_tracing();
    let dir = cert_dir("stalled", &[1, 2, 3]);
    let localhost = "127.0.0.1:0".parse().unwrap();
    // A long idle timeout: a stalled handshake would hold an accept loop that waits for it
    // for this long.
    let slow = TransportOptions {
        idle_timeout: Duration::from_secs(60),
        ..Default::default()
    };
    let a = Node::start(
        bind_with(&dir, 1, localhost, &slow).unwrap(),
        PeersOptions::default(),
    );

    // Node 3 dials through a relay that passes its first datagram on and nothing after:
    // node 1 starts the handshake and never hears back.
    let relay = tokio::net::UdpSocket::bind(localhost).await.unwrap();
    let relay_addr = relay.local_addr().unwrap();
    let a_addr = a.addr();
    let (forwarded, first_forwarded) = tokio::sync::oneshot::channel();
    let relay_task = tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        let (n, _) = relay.recv_from(&mut buf).await.unwrap();
        relay.send_to(&buf[..n], a_addr).await.unwrap();
        let _ = forwarded.send(());
        while relay.recv_from(&mut buf).await.is_ok() {}
    });
    let c = bind(&dir, 3, localhost).unwrap();
    let stalled = tokio::spawn({
        let c = c.clone();
        async move { c.connect(relay_addr, 1).await.map(|_| ()) }
    });
    tokio::time::timeout(PATIENCE, first_forwarded)
        .await
        .unwrap()
        .unwrap();

    // Meanwhile node 2 connects and calls.
    let b = Node::start(bind(&dir, 2, localhost).unwrap(), PeersOptions::default());
    b.peers.set_addr(1, a.addr());
    match b.peers.call(1, &app(b"hi"), PATIENCE).await.unwrap() {
        Response::App(bytes) => assert_eq!(&bytes[..], b"node 1 to node 2: hi"),
        other => panic!("{other:?}"),
    }

    stalled.abort();
    relay_task.abort();
    a.stop().await;
    b.stop().await;
    c.shutdown().await;
    std::fs::remove_dir_all(dir).unwrap();
}

/// Node 1 (dials time out after 300 ms, then the given backoff), told that node 2 listens at
/// an address where nothing does (bound, then closed); returns node 1 and that address.
async fn node_1_facing_a_vacant_node_2(
    dir: &Path,
    backoff_initial: Duration,
    backoff_max: Duration,
) -> (Node, SocketAddr) {
    let options = PeersOptions {
        connect_timeout: Duration::from_millis(300),
        backoff_initial,
        backoff_max,
    };
    node_1_facing_a_vacant_node_2_with(dir, options).await
}

/// [`node_1_facing_a_vacant_node_2`] with node 1's dialing options.
async fn node_1_facing_a_vacant_node_2_with(
    dir: &Path,
    options: PeersOptions,
) -> (Node, SocketAddr) {
    let localhost = "127.0.0.1:0".parse().unwrap();
    let a = Node::start(bind(dir, 1, localhost).unwrap(), options);
    let b = bind(dir, 2, localhost).unwrap();
    let b_addr = b.local_addr().unwrap();
    b.shutdown().await;
    a.peers.set_addr(2, b_addr);
    (a, b_addr)
}

/// Node `id` started on `addr` (the old socket there may take a moment to go).
async fn start_at(dir: &Path, id: NodeId, addr: SocketAddr) -> Node {
    let deadline = Instant::now() + PATIENCE;
    loop {
        match bind(dir, id, addr) {
            Ok(transport) => return Node::start(transport, PeersOptions::default()),
            Err(error) if Instant::now() < deadline => {
                tracing::debug!(%error, "rebinding");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(error) => panic!("{error}"),
        }
    }
}

#[tokio::test]
async fn a_down_node_is_unreachable_then_reachable_once_it_is_up() {
    init_tracing();
    let dir = cert_dir("down", &[1, 2]);
    let (a, b_addr) =
        node_1_facing_a_vacant_node_2(&dir, Duration::from_millis(50), Duration::from_millis(400))
            .await;

    let started = Instant::now();
    node_2_is_unreachable_from(&a).await;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "bounded by the connect timeout, not the call's: {:?}",
        started.elapsed()
    );
    // In backoff (or redialing after a failure): fails fast, without waiting for a dial.
    let started = Instant::now();
    node_2_is_unreachable_from(&a).await;
    assert!(started.elapsed() < Duration::from_secs(5));

    // Node 2 comes up on the same address.
    let b = start_at(&dir, 2, b_addr).await;
    let deadline = Instant::now() + PATIENCE;
    let mut unreachable = 0;
    let response = loop {
        match a
            .peers
            .call(2, &app(b"hello"), Duration::from_secs(5))
            .await
        {
            Ok(response) => break response,
            Err(RpcError::Unreachable { .. }) if Instant::now() < deadline => {
                unreachable += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(error) => panic!("{error}"),
        }
    };
    match response {
        Response::App(bytes) => assert_eq!(&bytes[..], b"node 2 to node 1: hello"),
        other => panic!("{other:?}"),
    }
    tracing::info!(unreachable, dials = a.peers.dials(), "reconnected");

    stop_both(a, b, dir).await;
}

/// A peer that dials in is up: the backoff this node was in after failing to dial it ends at
/// once. (A restarted node otherwise heard nothing from the members that had failed to dial
/// it while it was down until their backoff ran out: a leader's heartbeats among them.)
#[tokio::test]
async fn a_peer_that_dials_in_ends_the_backoff_on_it() {
    init_tracing();
    let dir = cert_dir("dialed-in", &[1, 2]);
    // A backoff far longer than the test: only its end lets node 1 reach node 2 again.
    let (a, b_addr) =
        node_1_facing_a_vacant_node_2(&dir, Duration::from_secs(600), Duration::from_secs(600))
            .await;
    for _ in 0..2 {
        node_2_is_unreachable_from(&a).await;
    }

    node_1_reaches_node_2_once_it_dials_in(dir, a, b_addr, "still in backoff on node 2").await;
}

/// A dial that went out after failed ones, while the peer was still down, is given up when
/// the peer dials in: otherwise it holds the slot until QUIC resends its first packet or the
/// connect timeout passes, and calls meanwhile fail as "reconnecting".
#[tokio::test]
async fn a_peer_that_dials_in_ends_a_dial_to_it_that_went_out_while_it_was_down() {
    init_tracing();
    let dir = cert_dir("dialed-in-dialing", &[1, 2]);
    let (a, b_addr) = node_1_redialing_a_vacant_node_2(&dir).await;

    node_1_reaches_node_2_once_it_dials_in(dir, a, b_addr, "still waits for its old dial").await;
}

/// Starts node 2 at `b_addr`, has it call node 1 `a`, and requires node 1's next call to node
/// 2 to be answered (`stuck`: what node 1 does if it is not); then stops both.
async fn node_1_reaches_node_2_once_it_dials_in(
    dir: PathBuf,
    a: Node,
    b_addr: SocketAddr,
    stuck: &str,
) {
    let b = node_2_back_and_calling_node_1(&dir, b_addr, &a).await;
    match a.peers.call(2, &app(b"hello"), PATIENCE).await {
        Ok(Response::App(bytes)) => assert_eq!(&bytes[..], b"node 2 to node 1: hello"),
        other => panic!("node 2 dialed in, but node 1 {stuck}: {other:?}"),
    }
    stop_both(a, b, dir).await;
}

/// A dial given up when the peer dialed in may connect after all (QUIC resends its first
/// packet, which the peer, now up, answers): the connection is kept and the peer counts as
/// reachable again. (Kept with its failed dials still counted, the peer read as unreachable
/// over a working connection: a chaos run saw a restarted node taken for gone for 40 s.)
#[tokio::test]
async fn a_dial_given_up_that_connects_after_all_makes_the_peer_reachable() {
    init_tracing();
    let dir = cert_dir("dialed-in-connected", &[1, 2]);
    let (a, b_addr) = node_1_redialing_a_vacant_node_2(&dir).await;
    assert!(a.peers.is_unreachable(2));

    let b = node_2_back_and_calling_node_1(&dir, b_addr, &a).await;
    // Node 1 makes no call: the given-up dial is its only one.
    let deadline = Instant::now() + PATIENCE;
    while a.peers.links()[&2].state != "connected" {
        assert!(Instant::now() < deadline, "{:?}", a.peers.links()[&2]);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!a.peers.is_unreachable(2), "{:?}", a.peers.links()[&2]);
    assert_eq!(a.peers.links()[&2].failed_dials, 0);

    stop_both(a, b, dir).await;
}

/// Node 1 `a` calls node 2 and gets "unreachable".
async fn node_2_is_unreachable_from(a: &Node) {
    let error = a
        .peers
        .call(2, &app(b"hello?"), PATIENCE)
        .await
        .unwrap_err();
    assert!(matches!(error, RpcError::Unreachable { .. }), "{error}");
}

/// Stops both test nodes and removes their certificates' directory.
async fn stop_both(a: Node, b: Node, dir: PathBuf) {
    a.stop().await;
    b.stop().await;
    std::fs::remove_dir_all(dir).unwrap();
}

/// Node 2 started at `addr`, having called node 1 `a` (answered once node 1 has accepted its
/// connection, so node 1 has seen it dial in).
async fn node_2_back_and_calling_node_1(dir: &Path, addr: SocketAddr, a: &Node) -> Node {
    let b = start_at(dir, 2, addr).await;
    b.peers.set_addr(1, a.addr());
    b.peers.call(1, &app(b"back"), PATIENCE).await.unwrap();
    b
}

/// Node 1 facing a vacant node 2 (3 s connect timeout, 10 ms backoff), after one failed dial
/// and with a second one under way, which the call that started it gave up waiting for.
async fn node_1_redialing_a_vacant_node_2(dir: &Path) -> (Node, SocketAddr) {
    let options = PeersOptions {
        connect_timeout: Duration::from_secs(3),
        backoff_initial: Duration::from_millis(10),
        backoff_max: Duration::from_millis(10),
    };
    let (a, b_addr) = node_1_facing_a_vacant_node_2_with(dir, options).await;
    node_2_is_unreachable_from(&a).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let error = a
        .peers
        .call_with(2, &app(b"hello?"), Duration::from_millis(1), PATIENCE)
        .await
        .unwrap_err();
    assert!(error.to_string().contains("still connecting"), "{error}");
    (a, b_addr)
}

/// openraft's configuration for a test group: heartbeat and election timeouts in ms.
fn raft_config(heartbeat: u64, election_min: u64, election_max: u64) -> Arc<openraft::Config> {
    let config = openraft::Config {
        cluster_name: "herald-test".into(),
        heartbeat_interval: heartbeat,
        election_timeout_min: election_min,
        election_timeout_max: election_max,
        install_snapshot_timeout: 2000,
        ..Default::default()
    };
    Arc::new(config.validate().unwrap())
}

/// One Raft group on nodes `ids` over real QUIC endpoints (in-memory log and state machine),
/// initialized by the first node, which therefore calls the first election at once.
async fn start_group(
    group: GroupId,
    ids: &[NodeId],
    dir: &Path,
    config: Arc<openraft::Config>,
) -> (Vec<Node>, Vec<Raft<TypeConfig>>, Vec<mem::StateMachine>) {
    let mut nodes = Vec::new();
    let mut rafts = Vec::new();
    let mut machines = Vec::new();
    for &id in ids {
        let node = Node::start(
            bind(dir, id, "127.0.0.1:0".parse().unwrap()).unwrap(),
            PeersOptions::default(),
        );
        let machine = mem::StateMachine::default();
        let raft = Raft::new(
            id,
            config.clone(),
            GroupNetworkFactory::new(node.peers.clone(), group),
            mem::LogStore::default(),
            machine.clone(),
        )
        .await
        .unwrap();
        node.handler
            .groups
            .lock()
            .unwrap()
            .insert(group, raft.clone());
        nodes.push(node);
        rafts.push(raft);
        machines.push(machine);
    }
    let members: BTreeMap<NodeId, BasicNode> = nodes
        .iter()
        .map(|node| (node.transport.id(), BasicNode::new(node.addr().to_string())))
        .collect();
    rafts[0].initialize(members).await.unwrap();
    (nodes, rafts, machines)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_raft_nodes_elect_a_leader_and_replicate_a_write() {
    init_tracing();
    const GROUP: GroupId = 7;
    let ids = [1, 2, 3];
    let dir = cert_dir("raft", &ids);
    let config = raft_config(100, 800, 1600);

    let (mut nodes, mut rafts, mut machines) = start_group(GROUP, &ids, &dir, config).await;

    let metrics = rafts[0]
        .wait(Some(PATIENCE))
        .metrics(|m| m.current_leader.is_some(), "a leader is elected")
        .await
        .unwrap();
    let leader = metrics.current_leader.unwrap();
    let command = Command::Publish {
        now_ms: 1,
        publishes: vec![Publish::new("news", "hello")],
    };
    let written = rafts[(leader - 1) as usize]
        .client_write(command.clone())
        .await
        .unwrap();
    for raft in &rafts {
        raft.wait(Some(PATIENCE))
            .applied_index_at_least(Some(written.log_id.index), "the write is applied")
            .await
            .unwrap();
    }
    for machine in &machines {
        assert_eq!(machine.commands(), vec![command.clone()]);
    }

    // A follower goes away: the other two still commit (its peers see it unreachable).
    let follower = ids.into_iter().find(|&id| id != leader).unwrap();
    let gone = nodes.remove((follower - 1) as usize);
    let gone_raft = rafts.remove((follower - 1) as usize);
    machines.remove((follower - 1) as usize);
    gone_raft.shutdown().await.unwrap();
    gone.stop().await;
    let second = Command::Publish {
        now_ms: 2,
        publishes: vec![Publish::new("news", "still here")],
    };
    let leader_raft = rafts
        .iter()
        .find(|raft| raft.metrics().borrow().id == leader)
        .unwrap();
    let written = leader_raft.client_write(second.clone()).await.unwrap();
    for raft in &rafts {
        raft.wait(Some(PATIENCE))
            .applied_index_at_least(Some(written.log_id.index), "the second write is applied")
            .await
            .unwrap();
    }
    for machine in &machines {
        assert_eq!(machine.commands(), vec![command.clone(), second.clone()]);
    }

    for raft in &rafts {
        raft.shutdown().await.unwrap();
    }
    for node in nodes {
        node.stop().await;
    }
    std::fs::remove_dir_all(dir).unwrap();
}

/// A commit index is held back for the next AppendEntries to carry, and sent on its own when
/// none follows. With the periodic heartbeat a minute away, only that keeps followers applying:
/// after a single write, and after a burst of concurrent ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followers_learn_every_commit_without_heartbeats() {
    init_tracing();
    const GROUP: GroupId = 8;
    let ids = [1, 2, 3];
    let dir = cert_dir("commit-linger", &ids);
    let config = raft_config(60_000, 120_000, 180_000);
    let (nodes, rafts, machines) = start_group(GROUP, &ids, &dir, config).await;
    rafts[0]
        .wait(Some(PATIENCE))
        .metrics(|m| m.current_leader == Some(1), "node 1 leads")
        .await
        .unwrap();

    let one = Command::Publish {
        now_ms: 1,
        publishes: vec![Publish::new("news", "alone")],
    };
    let mut expected = vec![one.clone()];
    let mut last = rafts[0].client_write(one).await.unwrap().log_id.index;
    for raft in &rafts {
        raft.wait(Some(PATIENCE))
            .applied_index_at_least(Some(last), "a single write is applied")
            .await
            .unwrap();
    }

    let burst: Vec<Command> = (0..50)
        .map(|i| Command::Publish {
            now_ms: 2 + i,
            publishes: vec![Publish::new("news", format!("burst {i}"))],
        })
        .collect();
    let writes = burst
        .iter()
        .map(|command| rafts[0].client_write(command.clone()));
    for written in futures::future::join_all(writes).await {
        last = last.max(written.unwrap().log_id.index);
    }
    expected.extend(burst);
    for raft in &rafts {
        raft.wait(Some(PATIENCE))
            .applied_index_at_least(Some(last), "a burst is applied")
            .await
            .unwrap();
    }
    for machine in &machines {
        let mut applied = machine.commands();
        applied.sort_by_key(|command| match command {
            Command::Publish { now_ms, .. } => *now_ms,
            _ => 0,
        });
        assert_eq!(applied, expected);
    }

    for raft in &rafts {
        raft.shutdown().await.unwrap();
    }
    for node in nodes {
        node.stop().await;
    }
    std::fs::remove_dir_all(dir).unwrap();
}

/// What a group that stopped reports: a failed log write is a storage failure; a panic in its
/// Raft task (which ends the task before it can record anything) is a stopped group, not a
/// storage failure.
#[tokio::test]
async fn a_stopped_group_says_whether_its_storage_failed_or_it_panicked() {
    use herald_cluster::failure::GroupFailure;
    init_tracing();
    const GROUP: GroupId = 3;
    let dir = cert_dir("stopped", &[1]);
    let config = raft_config(50, 150, 300);
    let node = Node::start(
        bind(&dir, 1, "127.0.0.1:0".parse().unwrap()).unwrap(),
        PeersOptions::default(),
    );
    for how in [mem::Fail::Error, mem::Fail::Panic] {
        let log = mem::LogStore::default();
        let raft = Raft::new(
            1,
            config.clone(),
            GroupNetworkFactory::new(node.peers.clone(), GROUP),
            log.clone(),
            mem::StateMachine::default(),
        )
        .await
        .unwrap();
        raft.initialize(BTreeMap::from([(
            1,
            BasicNode::new(node.addr().to_string()),
        )]))
        .await
        .unwrap();
        raft.wait(Some(PATIENCE))
            .metrics(|m| m.current_leader == Some(1), "node 1 leads")
            .await
            .unwrap();
        assert_eq!(GroupFailure::of(GROUP, &raft), None);
        log.fail_appends(how);
        let command = Command::Publish {
            now_ms: 1,
            publishes: vec![Publish::new("news", "lost")],
        };
        raft.client_write(command).await.unwrap_err();
        let failure = GroupFailure::of(GROUP, &raft).expect("the group stopped");
        match how {
            mem::Fail::Error => {
                assert!(failure.storage, "{failure:?}");
                assert!(
                    failure.to_string().starts_with(
                        "storage failed: partition 2's group stopped on this node: when Write Logs:"
                    ),
                    "{failure}"
                );
            }
            mem::Fail::Panic => {
                assert!(!failure.storage, "{failure:?}");
                assert_eq!(
                    failure.to_string(),
                    "raft group 3 (partition 2) stopped on this node: its Raft task panicked"
                );
            }
        }
    }
    node.stop().await;
    std::fs::remove_dir_all(dir).unwrap();
}

/// A minimal in-memory log store and state machine, for this test only.
mod mem {
    use super::*;
    use openraft::storage::{LogFlushed, RaftLogStorage, RaftStateMachine};
    use openraft::{
        AnyError, Entry, EntryPayload, LogId, LogState, OptionalSend, RaftLogReader,
        RaftSnapshotBuilder, Snapshot, SnapshotMeta, StorageError, StorageIOError,
        StoredMembership,
    };
    use std::fmt::Debug;
    use std::io::Cursor;
    use std::ops::RangeBounds;

    #[derive(Default)]
    struct Log {
        vote: Option<Vote<NodeId>>,
        committed: Option<LogId<NodeId>>,
        last_purged: Option<LogId<NodeId>>,
        entries: BTreeMap<u64, Entry<TypeConfig>>,
        fail: Option<Fail>,
    }

    /// How appends fail once [`LogStore::fail_appends`] is called.
    #[derive(Clone, Copy, Debug)]
    pub enum Fail {
        /// With a storage error, as a full disk would.
        Error,
        /// With a panic (in openraft's core task, which calls `append`).
        Panic,
    }

    #[derive(Clone, Default)]
    pub struct LogStore(Arc<Mutex<Log>>);

    impl LogStore {
        /// Later appends fail, as `how` says.
        pub fn fail_appends(&self, how: Fail) {
            self.0.lock().unwrap().fail = Some(how);
        }
    }

    impl RaftLogReader<TypeConfig> for LogStore {
        async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
            &mut self,
            range: RB,
        ) -> Result<Vec<Entry<TypeConfig>>, StorageError<NodeId>> {
            let log = self.0.lock().unwrap();
            Ok(log.entries.range(range).map(|(_, e)| e.clone()).collect())
        }
    }

    impl RaftLogStorage<TypeConfig> for LogStore {
        type LogReader = LogStore;

        async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<NodeId>> {
            let log = self.0.lock().unwrap();
            let last = log.entries.values().next_back().map(|e| e.log_id);
            Ok(LogState {
                last_purged_log_id: log.last_purged,
                last_log_id: last.or(log.last_purged),
            })
        }

        async fn get_log_reader(&mut self) -> LogStore {
            self.clone()
        }

        async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError<NodeId>> {
            self.0.lock().unwrap().vote = Some(*vote);
            Ok(())
        }

        async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError<NodeId>> {
            Ok(self.0.lock().unwrap().vote)
        }

        async fn save_committed(
            &mut self,
            committed: Option<LogId<NodeId>>,
        ) -> Result<(), StorageError<NodeId>> {
            self.0.lock().unwrap().committed = committed;
            Ok(())
        }

        async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, StorageError<NodeId>> {
            Ok(self.0.lock().unwrap().committed)
        }

        async fn append<I>(
            &mut self,
            entries: I,
            callback: LogFlushed<TypeConfig>,
        ) -> Result<(), StorageError<NodeId>>
        where
            I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
            I::IntoIter: OptionalSend,
        {
            {
                let mut log = self.0.lock().unwrap();
                match log.fail {
                    Some(Fail::Error) => {
                        return Err(StorageIOError::write_logs(AnyError::error(
                            "storage failed: I/O error: No space left on device (os error 28)",
                        ))
                        .into());
                    }
                    Some(Fail::Panic) => {
                        drop(log);
                        panic!("a bug in the log store");
                    }
                    None => {}
                }
                for entry in entries {
                    log.entries.insert(entry.log_id.index, entry);
                }
            }
            callback.log_io_completed(Ok(()));
            Ok(())
        }

        async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
            self.0.lock().unwrap().entries.split_off(&log_id.index);
            Ok(())
        }

        async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
            let mut log = self.0.lock().unwrap();
            log.entries = log.entries.split_off(&(log_id.index + 1));
            log.last_purged = Some(log_id);
            Ok(())
        }
    }

    #[derive(Default)]
    struct Machine {
        last_applied: Option<LogId<NodeId>>,
        membership: StoredMembership<NodeId, BasicNode>,
        commands: Vec<Command>,
        snapshot: Option<(SnapshotMeta<NodeId, BasicNode>, Vec<u8>)>,
    }

    #[derive(Clone, Default)]
    pub struct StateMachine(Arc<Mutex<Machine>>);

    impl StateMachine {
        pub fn commands(&self) -> Vec<Command> {
            self.0.lock().unwrap().commands.clone()
        }
    }

    impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
        async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
            let mut machine = self.0.lock().unwrap();
            let data =
                bincode::serde::encode_to_vec(&machine.commands, bincode::config::standard())
                    .map_err(|e| StorageIOError::write_snapshot(None, AnyError::new(&e)))?;
            let meta = SnapshotMeta {
                last_log_id: machine.last_applied,
                last_membership: machine.membership.clone(),
                snapshot_id: format!("{:?}", machine.last_applied),
            };
            machine.snapshot = Some((meta.clone(), data.clone()));
            Ok(Snapshot {
                meta,
                snapshot: Box::new(Cursor::new(data)),
            })
        }
    }

    impl RaftStateMachine<TypeConfig> for StateMachine {
        type SnapshotBuilder = StateMachine;

        async fn applied_state(
            &mut self,
        ) -> Result<
            (Option<LogId<NodeId>>, StoredMembership<NodeId, BasicNode>),
            StorageError<NodeId>,
        > {
            let machine = self.0.lock().unwrap();
            Ok((machine.last_applied, machine.membership.clone()))
        }

        async fn apply<I>(&mut self, entries: I) -> Result<Vec<Reply>, StorageError<NodeId>>
        where
            I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
            I::IntoIter: OptionalSend,
        {
            let mut machine = self.0.lock().unwrap();
            let mut replies = Vec::new();
            for entry in entries {
                machine.last_applied = Some(entry.log_id);
                match entry.payload {
                    EntryPayload::Blank => {}
                    EntryPayload::Normal(command) => machine.commands.push(command),
                    EntryPayload::Membership(membership) => {
                        machine.membership = StoredMembership::new(Some(entry.log_id), membership)
                    }
                }
                replies.push(Reply::None);
            }
            Ok(replies)
        }

        async fn get_snapshot_builder(&mut self) -> StateMachine {
            self.clone()
        }

        async fn begin_receiving_snapshot(
            &mut self,
        ) -> Result<Box<Cursor<Vec<u8>>>, StorageError<NodeId>> {
            Ok(Box::new(Cursor::new(Vec::new())))
        }

        async fn install_snapshot(
            &mut self,
            meta: &SnapshotMeta<NodeId, BasicNode>,
            snapshot: Box<Cursor<Vec<u8>>>,
        ) -> Result<(), StorageError<NodeId>> {
            let data = snapshot.into_inner();
            let (commands, _): (Vec<Command>, usize) =
                bincode::serde::decode_from_slice(&data, bincode::config::standard()).map_err(
                    |e| StorageIOError::read_snapshot(Some(meta.signature()), AnyError::new(&e)),
                )?;
            let mut machine = self.0.lock().unwrap();
            machine.commands = commands;
            machine.last_applied = meta.last_log_id;
            machine.membership = meta.last_membership.clone();
            machine.snapshot = Some((meta.clone(), data));
            Ok(())
        }

        async fn get_current_snapshot(
            &mut self,
        ) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
            let machine = self.0.lock().unwrap();
            Ok(machine.snapshot.as_ref().map(|(meta, data)| Snapshot {
                meta: meta.clone(),
                snapshot: Box::new(Cursor::new(data.clone())),
            }))
        }
    }
}

#[tokio::test]
async fn raft_messages_are_refused_both_ways_with_a_member_on_another_store() {
    init_tracing();
    let dir = cert_dir("stores", &[1, 2]);
    let localhost = "127.0.0.1:0".parse().unwrap();
    // Node 1 knew node 2 on store 22; node 2 is back on store 99 (its disk was replaced).
    let a = Node::start_with(
        bind(&dir, 1, localhost).unwrap(),
        PeersOptions::default(),
        Some(FixedStores::new(11, &[(2, 22)])),
    );
    let b = Node::start_with(
        bind(&dir, 2, localhost).unwrap(),
        PeersOptions::default(),
        Some(FixedStores::new(99, &[(1, 11)])),
    );
    a.peers.set_addr(2, b.addr());
    b.peers.set_addr(1, a.addr());
    let vote = Request::Vote {
        group: 42,
        rpc: VoteRequest::new(Vote::new(1, 1), None),
    };
    // The first call on a new connection is a vote: the dial judges node 2, and the vote
    // does not go out.
    let error = a.peers.call(2, &vote, PATIENCE).await.unwrap_err();
    assert!(error.to_string().contains("another store"), "{error}");
    // Application requests (forwarded publishes, interest) still go through.
    assert!(matches!(
        a.peers.call(2, &app(b"hi"), PATIENCE).await.unwrap(),
        Response::App(_)
    ));
    // Node 2's own vote request reaches node 1, which judged it when it dialed: refused.
    match b.peers.call(1, &vote, PATIENCE).await.unwrap() {
        Response::Error(reason) => assert!(reason.contains("another store"), "{reason}"),
        other => panic!("{other:?}"),
    }
    stop_both(a, b, dir).await;
}
