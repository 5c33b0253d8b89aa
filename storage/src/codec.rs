//! The on-disk format: key layout and value encoding, all in this one module.
//!
//! Everything lives in ONE sled tree ([`TREE`]); the first key byte says what a record is.
//! Numbers in keys are big-endian so that sled's byte order is numeric order. A channel appears
//! in keys as `chan` = `u32 BE length ++ channel bytes`, which makes `prefix ++ chan` an exact
//! per-channel prefix (no channel's prefix is a prefix of another's).
//!
//! | key | value | what |
//! |---|---|---|
//! | `m` `v` | u32 BE | format version ([`FORMAT_VERSION`]) |
//! | `m` `e` | u64 BE | epoch |
//! | `m` `p` | u16 BE | partition count |
//! | `m` `s` u16 BE partition | u64 BE | last assigned seq of the partition |
//! | `m` `f` u16 BE partition | u64 BE | highest seq dropped with a forgotten channel's meta |
//! | `c` chan | [`ChannelMeta`] | retained count and loss floor of a channel with history |
//! | `h` chan u64 BE seq | [`StoredChunk`] | the events of one channel one apply wrote, keyed by the first one's seq |
//! | `d` chan message-id | [`DedupRecord`] | a message id seen in the dedup window |
//! | `x` u64 BE at_ms chan message-id | empty | dedup expiry index, in time order |
//! | `m` `k` u16 BE partition | u64 BE | the partition's applied clock: the largest `now_ms` apply used |
//! | `m` `c` | u64 BE | the cluster's epoch, present once the store joined a cluster |
//! | `m` `l` | u64 BE | the last record of the local log's write-ahead log applied (see the `wal` module) |
//! | `m` `o` | u64 BE | the node id a cluster node first opened the store as (absent in single-node stores and stores from before it) |
//! | `r` u16 BE group `l` u64 BE index | `openraft::Entry` | one Raft log entry of the group |
//! | `r` group `v` | `openraft::Vote` | the group's vote |
//! | `r` group `p` | `openraft::LogId` | the group's last purged log id |
//! | `r` group `c` | `openraft::LogId` | the group's last known committed log id |
//! | `r` group `a` | `AppliedState` (raft module) | last applied log id and membership of the group's state machine |
//! | `r` group `f` | `SnapshotFile` (raft module) | the group's current snapshot: its meta, and the file under `snapshots/` with its data |
//! | `r` group `s` | `StoredSnapshot` (raft module) | stores written before snapshot files: the group's current snapshot, data inline (removed when `r` group `f` is written) |
//!
//! Values are bincode 2 (standard config, varint integers) through serde. bincode 3 is a
//! deliberate `compile_error!`; if the codec ever has to change crate, only this module changes
//! (and [`FORMAT_VERSION`] goes up).

use bytes::Bytes;
use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::event::Partition;
use crate::store::StorageError;

/// The name of the single sled tree the store uses.
pub(crate) const TREE: &[u8] = b"herald";

/// The version of this layout; a store written with another version is refused.
pub(crate) const FORMAT_VERSION: u32 = 2;

pub(crate) const KEY_VERSION: &[u8] = b"mv";
pub(crate) const KEY_EPOCH: &[u8] = b"me";
pub(crate) const KEY_PARTITIONS: &[u8] = b"mp";
pub(crate) const PREFIX_LAST_SEQ: &[u8] = b"ms";
pub(crate) const PREFIX_FORGOTTEN: &[u8] = b"mf";
pub(crate) const PREFIX_CHANNEL: u8 = b'c';
pub(crate) const PREFIX_HISTORY: u8 = b'h';
pub(crate) const PREFIX_DEDUP: u8 = b'd';
pub(crate) const PREFIX_DEDUP_EXPIRY: u8 = b'x';
pub(crate) const PREFIX_CLOCK: &[u8] = b"mk";
pub(crate) const KEY_CLUSTER: &[u8] = b"mc";
pub(crate) const KEY_LOCAL_LOG: &[u8] = b"ml";
pub(crate) const KEY_RAFT_LOG: &[u8] = b"mr";
/// The store's own random id (see `Store::store_id`).
pub(crate) const KEY_STORE_ID: &[u8] = b"mi";
/// Followed by a node id (8 bytes, big-endian): the store id that peer was last seen using.
pub(crate) const PREFIX_PEER_STORE: &[u8] = b"mn";
/// Followed by a node id (8 bytes, big-endian): what this node knows of that peer's Raft
/// journal (a `PeerProgress`).
pub(crate) const PREFIX_PEER_PROGRESS: &[u8] = b"mj";
/// The cluster's namespace config, as its meta group last applied it (a `NamespacesSpec`).
pub(crate) const KEY_CLUSTER_NAMESPACES: &[u8] = b"mx";
/// The node id the store was first opened as by a cluster node (see `Store::claim_node_id`).
pub(crate) const KEY_NODE_ID: &[u8] = b"mo";
pub(crate) const PREFIX_RAFT: u8 = b'r';
pub(crate) const RAFT_LOG: u8 = b'l';
pub(crate) const RAFT_VOTE: u8 = b'v';
pub(crate) const RAFT_PURGED: u8 = b'p';
pub(crate) const RAFT_COMMITTED: u8 = b'c';
pub(crate) const RAFT_APPLIED: u8 = b'a';
pub(crate) const RAFT_SNAPSHOT: u8 = b's';
pub(crate) const RAFT_SNAPSHOT_FILE: u8 = b'f';

/// Per-channel bookkeeping, present while the channel has (or just had) retained history.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ChannelMeta {
    /// How many retained events the channel has: events in its `h` chunks above
    /// `removed_through` (expired-but-not-yet-deleted ones included).
    pub retained: u64,
    /// The highest seq of this channel that left retention (trimmed, expired, or inherited from
    /// the partition's forgotten floor when the meta was created). 0 = nothing lost.
    pub removed_through: u64,
}

/// Events of one channel written by one apply, stored under the `h` key of the first one's seq.
///
/// History is kept in chunks, not one record per event, because every sled write rewrites the
/// leaf it lands in: one chunk per channel per batch (plus the channel's meta) replaces an
/// insert and a retention delete per event. All events of a chunk share the batch's apply clock
/// and the channel's namespace, hence one timestamp and one TTL deadline. Seqs ascend within a
/// chunk and across a channel's chunks; events at or below the channel's
/// [`ChannelMeta::removed_through`] have left retention even while their chunk still holds
/// them (a chunk is deleted once all its events have).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct StoredChunk {
    pub partition: Partition,
    pub timestamp_ms: u64,
    /// When the chunk's events stop being retained (`None` = no age limit), fixed at apply time.
    pub expires_at_ms: Option<u64>,
    /// The events' seqs, ascending.
    pub seqs: Vec<u64>,
    /// One per seq.
    pub message_ids: Vec<Option<Bytes>>,
    /// One per seq.
    pub payloads: Vec<Bytes>,
}

/// Decodes a [`StoredChunk`] and checks that its three lists are as long as each other: a
/// corrupt one would otherwise panic every read of its channel's history.
pub(crate) fn decode_chunk(bytes: &[u8]) -> Result<StoredChunk, StorageError> {
    let chunk: StoredChunk = decode(bytes, "chunk")?;
    if chunk.message_ids.len() != chunk.seqs.len() || chunk.payloads.len() != chunk.seqs.len() {
        return Err(StorageError::Corrupt(format!(
            "chunk with {} seqs, {} message ids and {} payloads",
            chunk.seqs.len(),
            chunk.message_ids.len(),
            chunk.payloads.len()
        )));
    }
    Ok(chunk)
}

/// The fields every [`StoredChunk`] starts with, decodable without copying the payloads.
///
/// bincode decodes fields in order and ignores what follows, so decoding a chunk's bytes as
/// this struct reads only its head. Keep the two field lists in step.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ChunkHead {
    pub partition: Partition,
    pub timestamp_ms: u64,
    pub expires_at_ms: Option<u64>,
    pub seqs: Vec<u64>,
}

impl ChunkHead {
    /// Whether the chunk's events are past their TTL at `now_ms`.
    pub fn expired(&self, now_ms: u64) -> bool {
        matches!(self.expires_at_ms, Some(t) if t <= now_ms)
    }

    /// Index of the first seq above `floor` (`seqs.len()` if none is).
    pub fn first_above(&self, floor: u64) -> usize {
        self.seqs.partition_point(|&s| s <= floor)
    }
}

/// A message id seen at `at_ms`, and the position its event got.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct DedupRecord {
    pub partition: Partition,
    pub seq: u64,
    pub at_ms: u64,
}

fn config() -> impl bincode::config::Config {
    // The limit keeps a corrupt length prefix from asking for an absurd allocation.
    bincode::config::standard().with_limit::<{ 1 << 30 }>()
}

/// Encodes a value record.
pub(crate) fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Encoding into a Vec cannot fail for these plain structs (no maps, no unsized sequences).
    bincode::serde::encode_to_vec(value, config()).expect("bincode encoding of a record")
}

/// Decodes a value record (or the head of one); `what` names it in the error.
pub(crate) fn decode<T: DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, StorageError> {
    bincode::serde::decode_from_slice(bytes, config())
        .map(|(v, _)| v)
        .map_err(|e| StorageError::Corrupt(format!("undecodable {what} record: {e}")))
}

/// `u32 BE len ++ channel`.
pub(crate) fn put_chan(key: &mut Vec<u8>, channel: &[u8]) {
    let len = u32::try_from(channel.len()).expect("channel names are shorter than 4 GiB");
    key.extend_from_slice(&len.to_be_bytes());
    key.extend_from_slice(channel);
}

/// `tag ++ chan`: the channel meta key, or the prefix of the channel's history or dedup keys.
pub(crate) fn chan_key(tag: u8, channel: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + 4 + channel.len() + 8);
    k.push(tag);
    put_chan(&mut k, channel);
    k
}

/// `h ++ chan ++ seq BE`: the key of the chunk whose first event has `seq`.
pub(crate) fn history_key(channel: &[u8], seq: u64) -> Vec<u8> {
    let mut k = chan_key(PREFIX_HISTORY, channel);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// The channel inside a `tag ++ chan ++ ...` key, and what follows it.
pub(crate) fn split_chan(key: &[u8]) -> Result<(&[u8], &[u8]), StorageError> {
    let bad = || StorageError::Corrupt("key with a malformed channel".into());
    let len_bytes: [u8; 4] = key
        .get(1..5)
        .ok_or_else(bad)?
        .try_into()
        .map_err(|_| bad())?;
    let len = u32::from_be_bytes(len_bytes) as usize;
    let end = 5usize.checked_add(len).ok_or_else(bad)?;
    let channel = key.get(5..end).ok_or_else(bad)?;
    Ok((channel, &key[end..]))
}

/// `d ++ chan ++ message id`.
pub(crate) fn dedup_key(channel: &[u8], id: &[u8]) -> Vec<u8> {
    let mut k = chan_key(PREFIX_DEDUP, channel);
    k.extend_from_slice(id);
    k
}

/// `x ++ at_ms BE ++ chan ++ message id`.
pub(crate) fn dedup_expiry_key(at_ms: u64, dedup_key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(9 + dedup_key.len());
    k.push(PREFIX_DEDUP_EXPIRY);
    k.extend_from_slice(&at_ms.to_be_bytes());
    k.extend_from_slice(&dedup_key[1..]);
    k
}

/// From an `x` key: its time and the `d` key it points at.
pub(crate) fn split_dedup_expiry_key(key: &[u8]) -> Result<(u64, Vec<u8>), StorageError> {
    let at: [u8; 8] = key
        .get(1..9)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| StorageError::Corrupt("dedup expiry key too short".into()))?;
    let mut d = Vec::with_capacity(key.len() - 8);
    d.push(PREFIX_DEDUP);
    d.extend_from_slice(&key[9..]);
    Ok((u64::from_be_bytes(at), d))
}

/// `m ++ tag ++ partition BE` (last seq or forgotten floor of a partition).
pub(crate) fn partition_key(prefix: &[u8], p: Partition) -> Vec<u8> {
    let mut k = prefix.to_vec();
    k.extend_from_slice(&p.to_be_bytes());
    k
}

/// `r ++ group BE ++ tag`: one Raft record of a group, or the prefix of its log (`tag` = `l`).
pub(crate) fn raft_key(group: u16, tag: u8) -> Vec<u8> {
    let mut k = Vec::with_capacity(12);
    k.push(PREFIX_RAFT);
    k.extend_from_slice(&group.to_be_bytes());
    k.push(tag);
    k
}

/// `r ++ group BE ++ l ++ index BE`: one Raft log entry.
pub(crate) fn raft_log_key(group: u16, index: u64) -> Vec<u8> {
    let mut k = raft_key(group, RAFT_LOG);
    k.extend_from_slice(&index.to_be_bytes());
    k
}

/// The index at the end of a Raft log key.
pub(crate) fn raft_log_key_index(key: &[u8]) -> Result<u64, StorageError> {
    key.get(4..12)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_be_bytes)
        .ok_or_else(|| StorageError::Corrupt("raft log key malformed".into()))
}

/// The channel a `c`, `h`, `d` or `x` key belongs to.
pub(crate) fn record_channel(key: &[u8]) -> Result<&[u8], StorageError> {
    match key.first() {
        Some(&PREFIX_DEDUP_EXPIRY) => {
            // `x ++ at_ms ++ chan ++ id`: the channel starts after the time.
            let rest = key
                .get(8..)
                .ok_or_else(|| StorageError::Corrupt("dedup expiry key too short".into()))?;
            split_chan(rest).map(|(c, _)| c)
        }
        Some(&(PREFIX_CHANNEL | PREFIX_HISTORY | PREFIX_DEDUP)) => split_chan(key).map(|(c, _)| c),
        _ => Err(StorageError::Corrupt("not a channel record key".into())),
    }
}

/// A big-endian u64 value.
pub(crate) fn be_u64(v: &[u8], what: &str) -> Result<u64, StorageError> {
    v.try_into()
        .map(u64::from_be_bytes)
        .map_err(|_| StorageError::Corrupt(format!("{what} is not 8 bytes")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// No meta key is a prefix of another: scans of a prefix (per-partition counters, peer
    /// store ids) would read the other key's records as theirs.
    #[test]
    fn meta_keys_are_prefix_free() {
        let keys: [&[u8]; 14] = [
            KEY_NODE_ID,
            KEY_VERSION,
            KEY_EPOCH,
            KEY_PARTITIONS,
            PREFIX_LAST_SEQ,
            PREFIX_FORGOTTEN,
            PREFIX_CLOCK,
            KEY_CLUSTER,
            KEY_LOCAL_LOG,
            KEY_RAFT_LOG,
            KEY_STORE_ID,
            PREFIX_PEER_STORE,
            PREFIX_PEER_PROGRESS,
            KEY_CLUSTER_NAMESPACES,
        ];
        for (i, a) in keys.iter().enumerate() {
            for (j, b) in keys.iter().enumerate() {
                assert!(
                    i == j || !b.starts_with(a),
                    "{:?} is a prefix of {:?}",
                    String::from_utf8_lossy(a),
                    String::from_utf8_lossy(b)
                );
            }
        }
    }

    #[test]
    fn head_decodes_from_a_full_chunk() {
        let chunk = StoredChunk {
            partition: 3,
            timestamp_ms: 1_700_000_000_000,
            expires_at_ms: Some(1_700_000_001_000),
            seqs: vec![4, 9, 12],
            message_ids: vec![Some(Bytes::from_static(b"m-1")), None, None],
            payloads: vec![
                Bytes::from(vec![7u8; 1000]),
                Bytes::new(),
                Bytes::from_static(b"x"),
            ],
        };
        let bytes = encode(&chunk);
        let head: ChunkHead = decode(&bytes, "chunk").unwrap();
        assert_eq!(head.partition, 3);
        assert_eq!(head.timestamp_ms, chunk.timestamp_ms);
        assert_eq!(head.expires_at_ms, chunk.expires_at_ms);
        assert_eq!(head.seqs, chunk.seqs);
        assert!(!head.expired(1_700_000_000_999));
        assert!(head.expired(1_700_000_001_000));
        assert_eq!(head.first_above(0), 0);
        assert_eq!(head.first_above(4), 1);
        assert_eq!(head.first_above(10), 2);
        assert_eq!(head.first_above(12), 3);
        let back: StoredChunk = decode(&bytes, "chunk").unwrap();
        assert_eq!(back, chunk);
        assert_eq!(decode_chunk(&bytes).unwrap(), chunk);
        // Lists of different lengths are corrupt, not a panic later.
        let mut uneven = chunk.clone();
        uneven.payloads.pop();
        let e = decode_chunk(&encode(&uneven)).unwrap_err();
        assert!(
            e.to_string()
                .contains("3 seqs, 3 message ids and 2 payloads"),
            "{e}"
        );
    }

    #[test]
    fn garbage_is_a_corrupt_error() {
        let e = decode::<StoredChunk>(&[0xff, 0xff, 0xff], "chunk").unwrap_err();
        assert!(e.to_string().contains("undecodable chunk record"), "{e}");
        let e = decode::<StoredChunk>(
            &[
                1, 1, 1, 1, 0xfd, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f,
            ],
            "chunk",
        );
        assert!(e.is_err());
    }

    #[test]
    fn keys_sort_and_split() {
        let a = history_key(b"ch", 2);
        let b = history_key(b"ch", 10);
        let c = history_key(b"ch", 256);
        assert!(a < b && b < c);
        assert!(a.starts_with(&chan_key(PREFIX_HISTORY, b"ch")));
        assert!(!history_key(b"chx", 1).starts_with(&chan_key(PREFIX_HISTORY, b"ch")));
        let (ch, rest) = split_chan(&c).unwrap();
        assert_eq!(ch, b"ch");
        assert_eq!(rest, 256u64.to_be_bytes());

        let d = dedup_key(b"ch", b"id:1");
        let x = dedup_expiry_key(42, &d);
        assert_eq!(split_dedup_expiry_key(&x).unwrap(), (42, d.clone()));
        assert!(dedup_expiry_key(41, &d) < x);
        assert!(split_chan(b"c\x00\x00\x00\x09abc").is_err());
        assert!(split_chan(b"c\x00").is_err());
    }
}
