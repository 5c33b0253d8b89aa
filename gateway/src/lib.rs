//! # herald-gateway
//!
//! Everything a herald client touches: the Redis-protocol server, the HTTP surfaces (SSE,
//! WebSocket, the publish API, stats and health), and the local pub/sub hub behind them.
//!
//! ## Layout
//!
//! - [`build`]: the version and commit this binary was built from (`gateway/build.rs`), as
//!   every surface reports them.
//! - [`broker`]: where every surface publishes and reads history: the node's store, and its
//!   cluster node when it has one.
//! - [`hub`]: which local clients listen to which channels and patterns, and the fan-out of a
//!   published message to their bounded queues ([`hub::outbox`]) with Redis glob matching
//!   ([`hub::glob`]). Protocol-neutral: every surface delivers through it.
//! - [`stream`]: one streaming client's events in order: history replay from a cursor, then
//!   live delivery, without a gap or a duplicate between the two.
//! - [`http`]: the HTTP surface (axum): SSE, WebSocket, `POST /api/publish`, stats, health,
//!   readiness, metrics and the cluster operations.
//! - [`reconnect`]: when a cluster node ends its streams so that clients resume elsewhere or
//!   from their cursors (quorum lost, history skipped by a snapshot), and what each protocol
//!   tells them.
//! - [`resp`]: the RESP2/RESP3 server: request parsing with Redis's limits and error texts,
//!   reply encoding, one module per command family, connection handling and the listener.
//! - [`starting`]: what clients are answered while the node opens its store (`-LOADING`,
//!   503, a reconnect), before the servers above take the ports over.
//!
//! ## Hot path
//!
//! A `PUBLISH` is parsed into `Bytes` split off the read buffer, looked up under a read lock,
//! encoded once per protocol version in use, and queued to each receiver as a shared `Bytes`.
//! Each receiver's writer drains its queue in one write per batch. Every queue is bounded: a
//! receiver over its output limit is disconnected instead of slowing anybody else.

pub mod broker;
pub mod build;
pub mod http;
pub mod hub;
pub mod reconnect;
pub mod resp;
pub mod starting;
pub mod stream;
