//! Helpers shared by the Raft log store and state machine: error conversion, blocking work off
//! the async runtime, and bincode records of the group's `r` keys.

use crate::memtable::Tree;
use openraft::{AnyError, ErrorSubject, ErrorVerb, StorageIOError};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::NodeId;
use crate::codec;
use crate::store::StorageError;

/// openraft's storage error for herald's node ids.
pub(crate) type RaftStorageError = openraft::StorageError<NodeId>;

/// Wraps a store error as openraft's (which makes openraft stop the group: storage failures are
/// fatal to a Raft member).
pub(crate) fn raft_err(
    subject: ErrorSubject<NodeId>,
    verb: ErrorVerb,
    error: StorageError,
) -> RaftStorageError {
    StorageIOError::new(subject, verb, AnyError::new(&error)).into()
}

/// Runs blocking sled work on Tokio's blocking pool.
pub(crate) async fn blocking<T, F>(f: F) -> Result<T, StorageError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, StorageError> + Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StorageError::Internal(format!("storage task failed: {e}")))?
}

/// Reads and decodes one record.
pub(crate) fn get<T: DeserializeOwned>(
    tree: &Tree,
    key: &[u8],
    what: &str,
) -> Result<Option<T>, StorageError> {
    match tree.get(key)? {
        Some(v) => codec::decode(&v, what).map(Some),
        None => Ok(None),
    }
}

/// Encodes and writes one record (not flushed).
pub(crate) fn put<T: Serialize>(tree: &Tree, key: &[u8], value: &T) -> Result<(), StorageError> {
    tree.insert(key, codec::encode(value))?;
    Ok(())
}
