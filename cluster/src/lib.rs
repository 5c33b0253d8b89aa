//! # herald-cluster
//!
//! The layer that turns herald nodes into one cluster: node identity and mutual TLS, the QUIC
//! transport and RPC between nodes, openraft's network over it, and the cluster node that runs
//! the meta group and one Raft group per partition, proposes batched publishes to partition
//! leaders, and keeps group membership in line with the cluster's.
//!
//! ## Layout
//!
//! - [`identity`]: certificate files (`herald certs init` / `issue`), rustls configurations,
//!   reading a node id from a certificate.
//! - [`transport`]: the quinn endpoint: dialing a node by id, accepting only member nodes.
//! - [`rpc`]: request/response over one bidirectional QUIC stream per call, the peer pool
//!   (one connection per peer, reconnect with backoff) and the server dispatch ([`Handler`]).
//! - [`network`]: openraft's `RaftNetworkFactory` per group over [`rpc`].
//! - [`peer_stores`]: which store each member runs on, and how far its Raft journal got; a
//!   member back on a lost, replaced or restored data directory is refused until it is removed
//!   and joined again. [`peer_journals`]: the verdict on a journal shown, a pure function.
//! - [`interest`]: which channels and patterns each node's clients hold, pushed between nodes;
//!   routes non-durable events to interested peers and answers `PUBSUB` for the cluster.
//! - [`message`]: the node layer's own requests (forwarded publishes, meta writes, joins).
//! - [`proposer`]: one task per partition batching publishes into one Raft entry per round,
//!   forwarding to the leader, retrying only when that is safe.
//! - [`failure`]: why a group stopped on this node: its storage failed, or its Raft task
//!   panicked or stopped.
//! - [`clock`]: the members' clock offsets, and the majority-corrected clock a leader's
//!   entries carry.
//! - [`failover`]: when a leader goes silent, the surviving voters pick the candidate with the
//!   longest log and start its election as soon as the lease allows.
//! - [`placement`]: which members a partition's voters are, and the voter swap that moves a
//!   full group towards that after a join or a removal.
//! - [`node`]: [`node::ClusterNode`]: its configuration, starting its groups and tasks,
//!   publishing, join/remove, status, shutdown; each other concern of the node in a submodule:
//!   - `node/formation.rs`: bootstrap by `--bootstrap-expect`, forming the cluster, finishing
//!     a formation cut short.
//!   - `node/placement_loop.rs`: the placement round (memberships, hand-backs, voter swaps,
//!     idle partitions' clock ticks).
//!   - `node/elections.rs`: the node's side of fast failover and pre-vote.
//!   - `node/interest_loop.rs`: pushing this node's interest to the other members.
//!   - `node/clock_loop.rs`: measuring the members' clocks.
//!   - `node/reachability.rs`: whether this node still reaches a majority, or anyone, from
//!     its own calls (not ready, streams moved, publishes refused at once).
//!   - `node/handler.rs`: what a node answers other nodes ([`Handler`], the node's requests).
//!   - `node/meta.rs`: writes through the meta leader (join, remove, namespaces, `Init`).
//!   - `node/hand_over.rs`: handing the partitions a node leads over at shutdown.

pub mod catch_up;
pub mod clock;
pub mod failover;
pub mod failure;
pub mod handoff;
pub mod identity;
pub mod interest;
pub mod message;
pub mod network;
pub mod node;
pub mod peer_journals;
pub mod peer_stores;
pub mod placement;
pub mod proposer;
pub mod rpc;
pub mod transport;

pub use identity::{NodeId, NodeIdentity};
pub use network::{Elections, GroupNetwork, GroupNetworkFactory};
pub use rpc::{Handler, PeerAddr, Peers, PeersOptions, Request, Response, RpcError, serve};
pub use transport::{
    IncomingPeer, PeerConnection, PeerFilter, Transport, TransportError, TransportOptions,
};
