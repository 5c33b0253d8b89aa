//! # herald-cluster
//!
//! The layer that turns herald nodes into one cluster. Built so far: node identity (a cluster
//! CA and node certificates that name their node) and the QUIC transport between nodes with
//! mutual TLS. Raft membership and replicated partitions (openraft) build on this transport.
//!
//! ## Layout
//!
//! - [`identity`]: certificate files (`herald certs init` / `issue`), rustls configurations,
//!   reading a node id from a certificate.
//! - [`transport`]: the quinn endpoint: dialing a node by id, accepting only member nodes.

pub mod identity;
pub mod transport;

pub use identity::{NodeId, NodeIdentity};
pub use transport::{PeerConnection, Transport, TransportError, TransportOptions};
