//! A Raft group's log, for any of the node's groups (the metadata group and every
//! replicated queue): kept in memory for reads and made durable in the node's redb file
//! through the store's one writer, so that one fsync serves the appends of every group.
//!
//! Every entry is a record of the store's Raft log (`raft_chunks`, in the message log's
//! layout: in the chunk of the group commit that appended it), and so are the log's
//! truncations; the vote, the committed id and the last purged id are `raft_state`
//! values of the group. An append is reported flushed only once its group commit is
//! durable.

// openraft's trait methods return its (large) StorageError; the helpers here return the
// same type so that `?` works in them.
#![allow(clippy::result_large_err)]

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::ops::RangeBounds;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{
    AnyError, Entry, LogId, LogState, RaftLogReader, RaftTypeConfig, StorageError, StorageIOError,
    Vote,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::meta::NodeId;
use super::wire::GroupId;
use crate::store::{RecoveredRaftGroup, Store, StoreOp};

/// Name of the stored vote.
pub const VOTE: &str = "vote";
/// Name of the stored committed log id.
pub const COMMITTED: &str = "committed";
/// Name of the stored last purged log id.
pub const PURGED: &str = "purged";
/// Name of the stored snapshot (the state machine's own value).
pub const SNAPSHOT: &str = "snapshot";

/// What a group's types must allow for its log to be kept here.
pub trait LogTypes:
    RaftTypeConfig<NodeId = NodeId, Entry = Entry<Self>, AsyncRuntime = openraft::TokioRuntime>
{
}

impl<C> LogTypes for C where
    C: RaftTypeConfig<NodeId = NodeId, Entry = Entry<C>, AsyncRuntime = openraft::TokioRuntime>
{
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Encodes a stored value (postcard).
pub(crate) fn encode<T: Serialize>(value: &T) -> Result<Bytes, StorageError<NodeId>> {
    postcard::to_stdvec(value)
        .map(Bytes::from)
        .map_err(|e| StorageError::IO {
            source: StorageIOError::write_logs(AnyError::error(e)),
        })
}

/// Decodes a stored value, naming `what` when it cannot.
pub(crate) fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8], what: &str) -> anyhow::Result<T> {
    postcard::from_bytes(bytes).map_err(|e| anyhow::anyhow!("unreadable stored {what}: {e}"))
}

/// The committed log id a group stored, if any.
pub fn recovered_committed(
    recovered: &RecoveredRaftGroup,
) -> anyhow::Result<Option<LogId<NodeId>>> {
    match recovered.state.get(COMMITTED) {
        Some(v) => decode(v, "committed log id"),
        None => Ok(None),
    }
}

/// The entries a group's state machine replays at start: those after `applied` (what its
/// snapshot covers) up to the committed id the group stored, in log order.
pub fn committed_entries<C: LogTypes>(
    recovered: &RecoveredRaftGroup,
    applied: Option<LogId<NodeId>>,
) -> anyhow::Result<Vec<Entry<C>>>
where
    Entry<C>: DeserializeOwned,
{
    let from = applied.map_or(0, |l| l.index + 1);
    let to = recovered_committed(recovered)?.map_or(0, |l| l.index);
    recovered
        .log
        .iter()
        .filter(|(index, _)| (from..=to).contains(index))
        .map(|(_, bytes)| decode(bytes, "log entry"))
        .collect()
}

struct LogData<C: LogTypes> {
    entries: BTreeMap<u64, Entry<C>>,
    /// The encoded size of each entry in `entries`, and their sum.
    sizes: BTreeMap<u64, usize>,
    bytes: usize,
    vote: Option<Vote<NodeId>>,
    committed: Option<LogId<NodeId>>,
    purged: Option<LogId<NodeId>>,
}

/// One group's log: memory for reads, the store writer for durability.
pub struct RaftLog<C: LogTypes> {
    store: Store,
    group: GroupId,
    data: Arc<Mutex<LogData<C>>>,
}

impl<C: LogTypes> Clone for RaftLog<C> {
    fn clone(&self) -> Self {
        RaftLog {
            store: self.store.clone(),
            group: self.group,
            data: self.data.clone(),
        }
    }
}

impl<C: LogTypes> Debug for RaftLog<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftLog")
            .field("group", &self.group)
            .finish_non_exhaustive()
    }
}

impl<C: LogTypes> RaftLog<C>
where
    Entry<C>: DeserializeOwned,
{
    /// Group `group`'s log as the store read it back at start.
    pub fn recover(
        store: Store,
        group: GroupId,
        recovered: &RecoveredRaftGroup,
    ) -> anyhow::Result<RaftLog<C>> {
        let mut entries = BTreeMap::new();
        let mut sizes = BTreeMap::new();
        for (index, bytes) in &recovered.log {
            let entry: Entry<C> = decode(bytes, "log entry")?;
            entries.insert(*index, entry);
            sizes.insert(*index, bytes.len());
        }
        let mut data = LogData {
            entries,
            bytes: sizes.values().sum(),
            sizes,
            vote: None,
            committed: recovered_committed(recovered)?,
            purged: None,
        };
        if let Some(v) = recovered.state.get(VOTE) {
            data.vote = Some(decode(v, "vote")?);
        }
        if let Some(v) = recovered.state.get(PURGED) {
            data.purged = decode(v, "purged log id")?;
        }
        Ok(RaftLog {
            store,
            group,
            data: Arc::new(Mutex::new(data)),
        })
    }
}

impl<C: LogTypes> RaftLog<C> {
    /// Bytes of the entries held (appended and not yet purged): what a snapshot would
    /// let go of, in memory and on disk.
    pub fn bytes(&self) -> usize {
        lock(&self.data).bytes
    }
}

impl<C: LogTypes> LogData<C> {
    /// Drops the entries from `index` on, or with `keep_after` those up to and including
    /// `index`.
    fn split(&mut self, index: u64, keep_after: bool) {
        if keep_after {
            self.entries = self.entries.split_off(&(index + 1));
            let kept = self.sizes.split_off(&(index + 1));
            self.bytes -= self.sizes.values().sum::<usize>();
            self.sizes = kept;
        } else {
            self.entries.split_off(&index);
            let dropped = self.sizes.split_off(&index);
            self.bytes -= dropped.values().sum::<usize>();
        }
    }
}

impl<C: LogTypes> RaftLogReader<C> for RaftLog<C>
where
    Entry<C>: Clone + Serialize + DeserializeOwned,
{
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<C>>, StorageError<NodeId>> {
        let data = lock(&self.data);
        Ok(data.entries.range(range).map(|(_, e)| e.clone()).collect())
    }
}

impl<C: LogTypes> RaftLogStorage<C> for RaftLog<C>
where
    Entry<C>: Clone + Serialize + DeserializeOwned,
{
    type LogReader = RaftLog<C>;

    async fn get_log_state(&mut self) -> Result<LogState<C>, StorageError<NodeId>> {
        let data = lock(&self.data);
        let last = data.entries.values().next_back().map(|e| e.log_id);
        Ok(LogState {
            last_purged_log_id: data.purged,
            last_log_id: last.or(data.purged),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError<NodeId>> {
        let value = encode(vote)?;
        lock(&self.data).vote = Some(*vote);
        // A vote must be durable before it is acted on.
        self.store
            .commit(vec![StoreOp::RaftPutState {
                group: self.group,
                key: VOTE.into(),
                value,
            }])
            .await;
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError<NodeId>> {
        Ok(lock(&self.data).vote)
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<NodeId>>,
    ) -> Result<(), StorageError<NodeId>> {
        let value = encode(&committed)?;
        lock(&self.data).committed = committed;
        // Not awaited: a lost committed id is learnt again from the leader.
        self.store.submit(vec![StoreOp::RaftPutState {
            group: self.group,
            key: COMMITTED.into(),
            value,
        }]);
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, StorageError<NodeId>> {
        Ok(lock(&self.data).committed)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<C>,
    ) -> Result<(), StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<C>> + Send,
        I::IntoIter: Send,
    {
        let mut ops = Vec::new();
        {
            let mut data = lock(&self.data);
            for entry in entries {
                let encoded = encode(&entry)?;
                let index = entry.log_id.index;
                if let Some(old) = data.sizes.insert(index, encoded.len()) {
                    data.bytes -= old;
                }
                data.bytes += encoded.len();
                ops.push(StoreOp::RaftAppend {
                    group: self.group,
                    index,
                    entry: encoded,
                });
                data.entries.insert(index, entry);
            }
        }
        self.store
            .commit_then(ops, Box::new(move || callback.log_io_completed(Ok(()))));
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        lock(&self.data).split(log_id.index, false);
        self.store
            .commit(vec![StoreOp::RaftTruncateFrom {
                group: self.group,
                index: log_id.index,
            }])
            .await;
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        let value = encode(&Some(log_id))?;
        {
            let mut data = lock(&self.data);
            data.split(log_id.index, true);
            data.purged = Some(log_id);
        }
        self.store.submit(vec![
            StoreOp::RaftPutState {
                group: self.group,
                key: PURGED.into(),
                value,
            },
            StoreOp::RaftPurgeUpTo {
                group: self.group,
                index: log_id.index,
            },
        ]);
        Ok(())
    }
}
