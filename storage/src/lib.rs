//! # herald-storage
//!
//! The durable event history of ONE herald node: the [`Event`] and [`Position`] types, cursors,
//! namespace config, the sled-backed [`Store`] with its apply function (dedup, sequence
//! assignment, history write, retention), and the single-node group-commit [`LocalLog`].
//!
//! ## Layout
//!
//! - [`event`]: [`Event`], [`Position`] `(partition, seq)`, [`Epoch`], and [`partition_of`], the
//!   stable channel -> partition hash.
//! - [`cursor`]: [`Cursor`], the last delivered seq per partition, in the short URL-safe form
//!   SSE `id:` / `Last-Event-ID` carries, with [`CursorError`] for malformed input.
//! - [`namespace`]: [`NamespaceConfig`] and [`Namespaces`]: history size, TTL and durability per
//!   channel family, parsed with serde (`[namespace.NAME]` tables).
//! - [`store`]: [`Store`]: open/create, [`Store::apply`] (THE state machine apply, one atomic
//!   sled batch per call), flush, history reads, TTL and dedup expiry, stats.
//! - [`log`]: [`LocalLog`]: the log of one member: a two-stage pipeline that batches concurrent
//!   publishes into one apply (group commit), syncs the records of the batches applied
//!   meanwhile together while it applies the next, and acknowledges a publish only once its
//!   record is durable.
//! - `chunk_index` (private): retention by count over history chunks, and the in-memory index
//!   of each channel's chunks that apply trims through instead of scanning sled.
//! - `codec` (private): the on-disk key layout and the bincode value encoding, in one place.
//! - `memtable` (private): the store's tree: every write since the last checkpoint in memory
//!   in front of sled, merged into reads, written to sled as one atomic batch per checkpoint
//!   (most history chunks and Raft entries die before one and never reach sled).
//! - [`io_watch`]: every write and sync of the logs and every checkpoint timed: slow ones
//!   counted and logged, and the oldest one still running, for the node's disk-stall watchdog.
//! - `disk` (private): what makes a flush survive power loss (`fdatasync` of sled's data file
//!   and of the blob files sled writes unsynced).
//! - `wal` (private): the store's write-ahead logs (the local log's, and the Raft journal all
//!   the groups of a cluster node share): the segment files and their record format,
//!   `WalWriter` (one append + one `fdatasync` per group of records; a flush of the store
//!   instead once the log fails) and the checkpoints that flush sled and delete segments.
//!   [`Store::open`] replays what a crash left in them.
//! - [`raft`]: the openraft storage of a cluster node: the types of its groups, the
//!   [`raft::RaftJournal`], each group's [`raft::RaftLogStore`] and
//!   [`raft::GroupStateMachine`].
//!
//! ## Guarantees
//!
//! A publish acknowledged by [`LocalLog`] is on disk (its write-ahead-log record synced) and
//! survives `kill -9` and power loss. A position, once anyone could see it (delivered, read
//! from history, acknowledged), is never reused, even after a crash: that happens only after
//! its record is durable, and recovery replays every durable record. Cursors and positions are
//! only meaningful within one [`Epoch`].

#![warn(missing_docs)]

mod chunk_index;
mod codec;
pub mod cursor;
mod disk;
pub mod event;
pub mod io_watch;
pub mod log;
mod memtable;
pub mod namespace;
pub mod raft;
pub mod store;
#[cfg(test)]
mod testutil;
mod wal;

pub use cursor::{Cursor, CursorError};
pub use event::{Epoch, Event, Partition, Position, partition_of, unix_now_ms};
pub use log::{LocalLog, LogOptions, LogStats, OnCommit, Pending};
pub use namespace::{LiveNamespaces, NamespaceConfig, Namespaces, NamespacesSpec, parse_duration};
pub use store::{
    Applied, ChannelStats, HistoryRead, JournalProgress, PeerProgress, Publish, StorageError,
    Store, StoreOptions,
};
