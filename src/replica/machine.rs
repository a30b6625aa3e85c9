//! A replicated queue's state machine: the queue's committed messages, as every member
//! of its group applies the log. The leader's queue host (`crate::queue::Queue`) is the
//! live queue (consumers, deliveries, unacked messages); what the log carries are the
//! changes that must survive the leader: a message enqueued, delivered (so that it comes
//! back redelivered), removed (acked, dropped, dead-lettered), or the queue purged on
//! delete. A new leader rebuilds its host from this machine.
//!
//! Kept in memory and rebuilt at start from the last snapshot (a `raft_state` value of
//! the group) plus the committed log after it; snapshots keep only the live messages, so
//! the log is truncated as messages are settled.
//!
//! Dead letters of a queue that dead-letters at least once stay here (`dead`) from
//! their [`ReplicaRecord::DeadLettered`] to their [`ReplicaRecord::Remove`]: every
//! member holds them, so a new leader hands them to its host to dead-letter again.

// openraft's trait methods return its (large) StorageError.
#![allow(clippy::result_large_err)]

use std::collections::BTreeMap;
use std::io::Cursor;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use openraft::storage::RaftStateMachine;
use openraft::{
    AnyError, Entry, EntryPayload, LogId, RaftSnapshotBuilder, Snapshot, SnapshotMeta,
    StorageError, StorageIOError, StoredMembership,
};
use serde::{Deserialize, Serialize};

use super::{QueueTypes, ReplicaRecord};
use crate::cluster::meta::NodeId;
use crate::cluster::raft_log::{SNAPSHOT, committed_entries, decode, encode, lock};
use crate::cluster::wire::GroupId;
use crate::queue::{DeathReason, Message, Queue};
use crate::store::{RecoveredRaftGroup, Store, StoreOp};

type Membership = StoredMembership<NodeId, openraft::BasicNode>;

/// Records of one log entry get keys `index << RECORD_BITS | position`: increasing in
/// log order, unique in the group.
pub const RECORD_BITS: u32 = 16;
/// Most records one log entry may carry.
pub const RECORDS_PER_ENTRY: usize = 1 << RECORD_BITS;

/// A committed message: its store encoding and how often it was handed out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Held {
    /// (Encoded as a byte string, as the `Vec<u8>` it once was.)
    blob: Bytes,
    delivered: u32,
}

/// A message dead-lettered at least once, held until its targets took it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct DeadHeld {
    blob: Bytes,
    reason: DeathReason,
}

/// What a snapshot holds: the messages, and the dead letters not yet taken.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Content {
    messages: BTreeMap<u64, Held>,
    dead: BTreeMap<u64, DeadHeld>,
}

impl Content {
    /// Decodes a snapshot's content, also as written before dead letters were kept
    /// (the messages alone).
    fn decode(bytes: &[u8]) -> Result<Content, postcard::Error> {
        postcard::from_bytes::<Content>(bytes).or_else(|e| {
            postcard::from_bytes::<BTreeMap<u64, Held>>(bytes)
                .map(|messages| Content {
                    messages,
                    dead: BTreeMap::new(),
                })
                .map_err(|_| e)
        })
    }
}

/// A snapshot as stored and sent.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, openraft::BasicNode>,
    content: Content,
}

/// A snapshot as stored before dead letters were kept.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredSnapshotV1 {
    meta: SnapshotMeta<NodeId, openraft::BasicNode>,
    messages: BTreeMap<u64, Held>,
}

impl StoredSnapshot {
    fn decode(bytes: &[u8]) -> anyhow::Result<StoredSnapshot> {
        match decode::<StoredSnapshot>(bytes, "queue snapshot") {
            Ok(snap) => Ok(snap),
            Err(e) => match decode::<StoredSnapshotV1>(bytes, "queue snapshot") {
                Ok(old) => Ok(StoredSnapshot {
                    meta: old.meta,
                    content: Content {
                        messages: old.messages,
                        dead: BTreeMap::new(),
                    },
                }),
                Err(_) => Err(e),
            },
        }
    }
}

#[derive(Debug, Default)]
struct MachineData {
    messages: BTreeMap<u64, Held>,
    /// Dead letters held until their targets took them (at-least-once).
    dead: BTreeMap<u64, DeadHeld>,
    /// Bytes of the held messages' and dead letters' encodings.
    live_bytes: usize,
    last_applied: Option<LogId<NodeId>>,
    membership: Membership,
    snapshot: Option<StoredSnapshot>,
    snapshots_built: u64,
    /// The live queue, while this node leads the group.
    host: Option<Arc<Queue>>,
}

/// The state machine of one replicated queue's group (clones share it).
#[derive(Debug, Clone)]
pub struct ReplicaMachine {
    store: Store,
    group: GroupId,
    data: Arc<Mutex<MachineData>>,
}

impl ReplicaMachine {
    /// The machine as of the group's last stored snapshot plus the entries after it this
    /// node knew to be committed.
    pub fn recover(
        store: Store,
        group: GroupId,
        recovered: &RecoveredRaftGroup,
    ) -> anyhow::Result<ReplicaMachine> {
        let mut data = MachineData::default();
        if let Some(bytes) = recovered.state.get(SNAPSHOT) {
            let snap = StoredSnapshot::decode(bytes)?;
            data.messages = snap.content.messages.clone();
            data.dead = snap.content.dead.clone();
            data.live_bytes = live_bytes(&snap.content);
            data.last_applied = snap.meta.last_log_id;
            data.membership = snap.meta.last_membership.clone();
            data.snapshot = Some(snap);
        }
        for entry in committed_entries::<QueueTypes>(recovered, data.last_applied)? {
            apply_entry(&mut data, entry);
        }
        Ok(ReplicaMachine {
            store,
            group,
            data: Arc::new(Mutex::new(data)),
        })
    }

    /// This node now leads the group: `host` becomes the live queue, holding every
    /// committed message (those handed out before come back redelivered; every one when
    /// `after_another_leader`, see [`Queue::take_over`]). The caller has made sure every
    /// entry committed before this node's term is applied.
    pub fn host(&self, host: Arc<Queue>, after_another_leader: bool) {
        let mut data = lock(&self.data);
        let mut restored = Vec::with_capacity(data.messages.len());
        for (key, held) in &data.messages {
            match crate::broker::persist::decode_message(&held.blob, *key) {
                Some(msg) => restored.push((*key, Arc::new(msg), held.delivered)),
                None => tracing::error!(key, "replicated queue: unreadable message skipped"),
            }
        }
        host.take_over(restored, after_another_leader);
        let dead = data
            .dead
            .iter()
            .filter_map(|(key, d)| Some((*key, Arc::new(decode_held(&d.blob, *key)?), d.reason)))
            .collect();
        host.resume_dead_letters(dead);
        data.host = Some(host);
    }

    /// This node no longer leads the group: its host stops serving.
    pub fn unhost(&self) -> Option<Arc<Queue>> {
        lock(&self.data).host.take()
    }

    /// Bytes of the committed messages held now (what a snapshot would hold).
    pub fn live_bytes(&self) -> usize {
        lock(&self.data).live_bytes
    }

    /// Committed messages held now.
    pub fn len(&self) -> usize {
        lock(&self.data).messages.len()
    }

    /// Dead letters held now for their targets (at-least-once dead-lettering).
    pub fn dead_letters(&self) -> usize {
        lock(&self.data).dead.len()
    }

    /// Whether no message is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn persist_snapshot(&self, snap: &StoredSnapshot) -> Result<(), StorageError<NodeId>> {
        let value = encode(snap)?;
        self.store.submit(vec![StoreOp::RaftPutState {
            group: self.group,
            key: SNAPSHOT.into(),
            value,
        }]);
        Ok(())
    }
}

/// Bytes of the encodings a snapshot of `content` holds.
fn live_bytes(content: &Content) -> usize {
    let messages: usize = content.messages.values().map(|h| h.blob.len()).sum();
    messages + content.dead.values().map(|d| d.blob.len()).sum::<usize>()
}

/// A held message's encoding as the message stored under `key`.
fn decode_held(blob: &Bytes, key: u64) -> Option<Message> {
    let msg = crate::broker::persist::decode_message(blob, key);
    if msg.is_none() {
        tracing::error!(key, "replicated queue: unreadable message");
    }
    msg.map(|m| Message {
        store_id: Some(key),
        ..m
    })
}

/// Applies one entry; a message enqueued while a host is attached is handed to it.
fn apply_entry(data: &mut MachineData, entry: Entry<QueueTypes>) {
    data.last_applied = Some(entry.log_id);
    match entry.payload {
        EntryPayload::Blank => {}
        EntryPayload::Membership(m) => {
            data.membership = StoredMembership::new(Some(entry.log_id), m);
        }
        EntryPayload::Normal(records) => {
            let base = entry.log_id.index << RECORD_BITS;
            for (position, record) in records.into_iter().enumerate() {
                apply_record(data, base | position as u64, record);
            }
        }
    }
}

fn apply_record(data: &mut MachineData, key: u64, record: ReplicaRecord) {
    match record {
        ReplicaRecord::Enqueue(blob) => {
            if let Some(host) = &data.host {
                match crate::broker::persist::decode_message(&blob, key) {
                    Some(msg) => host.enqueue_committed(Arc::new(Message {
                        store_id: Some(key),
                        ..msg
                    })),
                    None => tracing::error!(key, "replicated queue: unreadable message"),
                }
            }
            data.live_bytes += blob.len();
            if let Some(old) = data.messages.insert(key, Held { blob, delivered: 0 }) {
                data.live_bytes -= old.blob.len();
            }
        }
        ReplicaRecord::Delivered(key) => {
            if let Some(held) = data.messages.get_mut(&key) {
                held.delivered = held.delivered.saturating_add(1);
            }
        }
        ReplicaRecord::Remove(key) => {
            if let Some(old) = data.messages.remove(&key) {
                data.live_bytes -= old.blob.len();
            } else if let Some(old) = data.dead.remove(&key) {
                data.live_bytes -= old.blob.len();
            }
        }
        ReplicaRecord::Purge => {
            data.messages.clear();
            data.dead.clear();
            data.live_bytes = 0;
        }
        ReplicaRecord::DeadLettered { key, reason } => {
            let Some(held) = data.messages.remove(&key) else {
                return;
            };
            if let Some(host) = &data.host
                && let Some(msg) = decode_held(&held.blob, key)
            {
                host.dead_letter_committed(key, Arc::new(msg), reason);
            }
            data.dead.insert(
                key,
                DeadHeld {
                    blob: held.blob,
                    reason,
                },
            );
        }
    }
}

impl RaftSnapshotBuilder<QueueTypes> for ReplicaMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<QueueTypes>, StorageError<NodeId>> {
        let snap = {
            let mut data = lock(&self.data);
            data.snapshots_built += 1;
            let index = data.last_applied.map_or(0, |l| l.index);
            let snap = StoredSnapshot {
                meta: SnapshotMeta {
                    last_log_id: data.last_applied,
                    last_membership: data.membership.clone(),
                    snapshot_id: format!("{index}-{}", data.snapshots_built),
                },
                content: Content {
                    messages: data.messages.clone(),
                    dead: data.dead.clone(),
                },
            };
            data.snapshot = Some(snap.clone());
            snap
        };
        self.persist_snapshot(&snap)?;
        Ok(Snapshot {
            meta: snap.meta.clone(),
            snapshot: Box::new(Cursor::new(encode(&snap.content)?.to_vec())),
        })
    }
}

impl RaftStateMachine<QueueTypes> for ReplicaMachine {
    type SnapshotBuilder = ReplicaMachine;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, Membership), StorageError<NodeId>> {
        let data = lock(&self.data);
        Ok((data.last_applied, data.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<()>, StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<QueueTypes>> + Send,
        I::IntoIter: Send,
    {
        let mut replies = Vec::new();
        let mut data = lock(&self.data);
        for entry in entries {
            apply_entry(&mut data, entry);
            replies.push(());
        }
        Ok(replies)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<Cursor<Vec<u8>>>, StorageError<NodeId>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, openraft::BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<NodeId>> {
        let content = Content::decode(snapshot.get_ref()).map_err(|e| StorageError::IO {
            source: StorageIOError::read_snapshot(Some(meta.signature()), AnyError::error(e)),
        })?;
        let snap = StoredSnapshot {
            meta: meta.clone(),
            content: content.clone(),
        };
        {
            let mut data = lock(&self.data);
            data.live_bytes = live_bytes(&content);
            data.messages = content.messages;
            data.dead = content.dead;
            data.last_applied = meta.last_log_id;
            data.membership = meta.last_membership.clone();
            data.snapshot = Some(snap.clone());
        }
        self.persist_snapshot(&snap)
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<QueueTypes>>, StorageError<NodeId>> {
        let snap = lock(&self.data).snapshot.clone();
        match snap {
            None => Ok(None),
            Some(s) => Ok(Some(Snapshot {
                meta: s.meta.clone(),
                snapshot: Box::new(Cursor::new(encode(&s.content)?.to_vec())),
            })),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob(body: &'static str) -> Bytes {
        Message::for_tests(Bytes::from_static(body.as_bytes()), 0).encode()
    }

    #[test]
    fn a_dead_letter_stays_in_the_group_until_removed_and_in_its_snapshots() {
        let mut data = MachineData::default();
        let (a, b) = (blob("a"), blob("bb"));
        apply_record(&mut data, 1, ReplicaRecord::Enqueue(a.clone()));
        apply_record(&mut data, 2, ReplicaRecord::Enqueue(b.clone()));
        let dead = |key| ReplicaRecord::DeadLettered {
            key,
            reason: DeathReason::Rejected,
        };
        apply_record(&mut data, 3, dead(1));
        // (A record for a key the group does not hold changes nothing.)
        apply_record(&mut data, 4, dead(7));
        assert_eq!(data.messages.keys().collect::<Vec<_>>(), [&2]);
        assert_eq!(
            data.dead.get(&1),
            Some(&DeadHeld {
                blob: a.clone(),
                reason: DeathReason::Rejected
            })
        );
        assert_eq!(data.live_bytes, a.len() + b.len(), "still held");

        // A snapshot keeps it; one written before dead letters were kept still reads.
        let content = Content {
            messages: data.messages.clone(),
            dead: data.dead.clone(),
        };
        let back = Content::decode(&postcard::to_stdvec(&content).unwrap()).unwrap();
        assert_eq!((back.messages, back.dead), (content.messages, content.dead));
        let old = Content::decode(&postcard::to_stdvec(&data.messages).unwrap()).unwrap();
        assert_eq!((old.messages, old.dead.len()), (data.messages.clone(), 0));

        // Its targets took it: it goes.
        apply_record(&mut data, 5, ReplicaRecord::Remove(1));
        assert!(data.dead.is_empty());
        assert_eq!(data.live_bytes, b.len());
        apply_record(&mut data, 6, dead(2));
        apply_record(&mut data, 7, ReplicaRecord::Purge);
        assert!(data.dead.is_empty() && data.messages.is_empty());
        assert_eq!(data.live_bytes, 0);
    }
}
