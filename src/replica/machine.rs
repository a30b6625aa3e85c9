//! A replicated queue's state machine: the queue's committed messages, as every member
//! of its group applies the log. The leader's queue host (`crate::queue::Queue`) is the
//! live queue (consumers, deliveries, unacked messages); what the log carries are the
//! changes that must survive the leader: a message enqueued, delivered (so that it comes
//! back redelivered), removed (acked, dropped, dead-lettered), or the queue purged on
//! delete. A new leader rebuilds its host from this machine.
//!
//! The machine keeps its messages where a classic queue keeps its own: in the node's
//! message log, as the entries of the group's queue key (`store::replica_queue_key`),
//! one entry per message under its record key. Applying a log entry hands the store the
//! matching records (a message put and enqueued, an entry marked delivered or removed)
//! together with the log id they bring the machine to ([`APPLIED`]), in one request, so
//! the stored messages and that id always agree: the machine is durable as it applies,
//! and at start it is read back from the store (messages without their bodies, as a
//! classic queue's backlog) plus the committed entries after [`APPLIED`]. In memory it
//! holds a 40-byte entry per message (key, stored copy's id, head digest, size, delivery
//! count) in an ordered map, plus the map's node overhead, and no body: the leader's host keeps a window of
//! bodies and reads the rest back from the store as its consumers need them, through
//! [`ReplicaMachine::read_bodies`].
//!
//! A snapshot is thus only a log id (it costs nothing to take, and the log is truncated
//! behind it); only when a follower needs one is its content, every message with its
//! body, read from the store and sent ([`Content`], the format a snapshot always had).
//!
//! Dead letters of a queue that dead-letters at least once stay here (`dead`) from
//! their [`ReplicaRecord::DeadLettered`] to their [`ReplicaRecord::Remove`]: every
//! member holds them (their bodies too, in memory: a length limit bounds them), so a new
//! leader hands them to its host to dead-letter again.

// openraft's trait methods return its (large) StorageError.
#![allow(clippy::result_large_err)]

use std::collections::{BTreeMap, HashMap};
use std::io::Cursor;
use std::sync::atomic::{AtomicU64, Ordering};
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
use crate::queue::{DeathReason, Message, PagedHead, Queue};
use crate::store::{
    ReadAnswer, RecoveredBlob, RecoveredRaftGroup, Store, StoreOp, replica_queue_key,
};

type Membership = StoredMembership<NodeId, openraft::BasicNode>;

/// Records of one log entry get keys `index << RECORD_BITS | position`: increasing in
/// log order, unique in the group.
pub const RECORD_BITS: u32 = 16;
/// Most records one log entry may carry.
pub const RECORDS_PER_ENTRY: usize = 1 << RECORD_BITS;

/// Name of the stored [`Applied`] value: the log id the group's stored messages reflect.
pub const APPLIED: &str = "applied";

/// Most delivery records written for one message installed from a snapshot (its
/// delivery count beyond this is not kept: a delivery limit is far lower).
const MAX_DELIVERIES_KEPT: u32 = 1000;

/// What the machine's stored messages reflect: stored with them, in the same request.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Applied {
    last_applied: Option<LogId<NodeId>>,
    membership: Membership,
}

/// A committed message as the machine holds it: where its stored copy is and what its
/// host needs to order and expire it without its body.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Held {
    /// The stored copy's message id (this node's).
    msg_id: u64,
    /// Its head's digest (`PagedHead::to_words`).
    head: [u64; 2],
    /// Body bytes.
    size: u32,
    /// Times it was handed out.
    delivered: u32,
}

/// A committed message as a snapshot sends it: its store encoding and how often it was
/// handed out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct HeldBlob {
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

/// What a snapshot sends: the messages, and the dead letters not yet taken.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Content {
    messages: BTreeMap<u64, HeldBlob>,
    dead: BTreeMap<u64, DeadHeld>,
}

impl Content {
    /// Decodes a snapshot's content, also as written before dead letters were kept
    /// (the messages alone).
    fn decode(bytes: &[u8]) -> Result<Content, postcard::Error> {
        postcard::from_bytes::<Content>(bytes).or_else(|e| {
            postcard::from_bytes::<BTreeMap<u64, HeldBlob>>(bytes)
                .map(|messages| Content {
                    messages,
                    dead: BTreeMap::new(),
                })
                .map_err(|_| e)
        })
    }
}

/// A snapshot as stored before the machine kept its messages in the message log
/// (read once, at the first start after an upgrade).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, openraft::BasicNode>,
    content: Content,
}

/// A snapshot as stored before dead letters were kept.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredSnapshotV1 {
    meta: SnapshotMeta<NodeId, openraft::BasicNode>,
    messages: BTreeMap<u64, HeldBlob>,
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

/// Every [`DeathReason`], in the order of their queue keys' numbers.
const REASONS: [DeathReason; 4] = [
    DeathReason::Rejected,
    DeathReason::Expired,
    DeathReason::MaxLen,
    DeathReason::DeliveryLimit,
];

/// The group's queue keys: its messages', and its dead letters' (one per reason, so
/// that the reason is stored with them).
#[derive(Debug)]
struct Keys {
    messages: Arc<str>,
    dead: [Arc<str>; 4],
}

impl Keys {
    fn of(group: GroupId) -> Keys {
        Keys {
            messages: replica_queue_key(group, None).into(),
            dead: std::array::from_fn(|i| {
                replica_queue_key(group, Some(&format!("dead/{i}"))).into()
            }),
        }
    }

    fn dead_of(&self, reason: DeathReason) -> Arc<str> {
        let i = REASONS.iter().position(|r| *r == reason).unwrap_or(0);
        self.dead[i].clone()
    }
}

/// Store ops that remove every stored record of `group`: its log, its values and its
/// messages (the queue was deleted, or this node no longer holds a replica).
pub fn drop_ops(group: GroupId) -> Vec<StoreOp> {
    let keys = Keys::of(group);
    let mut ops = vec![StoreOp::RaftDropGroup { group }];
    for queue in std::iter::once(keys.messages).chain(keys.dead) {
        ops.push(StoreOp::PurgeQueue { queue });
    }
    ops
}

#[derive(Debug, Default)]
struct MachineData {
    messages: BTreeMap<u64, Held>,
    /// Dead letters held until their targets took them (at-least-once).
    dead: BTreeMap<u64, DeadHeld>,
    last_applied: Option<LogId<NodeId>>,
    membership: Membership,
    snapshots_built: u64,
    /// openraft asked for the current snapshot once (at start, for its log id only).
    snapshot_asked: bool,
    /// The live queue, while this node leads the group.
    host: Option<Arc<Queue>>,
}

/// What applying entries asks of the store and of the host, in order.
#[derive(Default)]
struct Applying {
    ops: Vec<StoreOp>,
    host: Vec<HostAction>,
    /// Blobs of the messages dead-lettered in this batch (read before it, or enqueued in
    /// it), by key.
    blobs: HashMap<u64, Bytes>,
}

enum HostAction {
    Enqueue(Arc<Message>),
    DeadLetter(u64, Arc<Message>, DeathReason),
}

/// The state machine of one replicated queue's group (clones share it).
#[derive(Debug, Clone)]
pub struct ReplicaMachine {
    store: Store,
    group: GroupId,
    keys: Arc<Keys>,
    /// The node's message id counter (a stored copy is a stored message).
    ids: Arc<AtomicU64>,
    data: Arc<Mutex<MachineData>>,
    /// Held while entries are applied and their host told, and while a host takes
    /// over: the host hears of changes in log order. The host is told outside `data`'s
    /// lock, since it reads bodies back through this machine.
    order: Arc<Mutex<()>>,
}

impl ReplicaMachine {
    /// The machine as the store kept it (its messages and the log id they reflect),
    /// plus the entries after that id this node knew to be committed.
    pub fn recover(
        store: Store,
        group: GroupId,
        ids: Arc<AtomicU64>,
        recovered: &mut RecoveredRaftGroup,
    ) -> anyhow::Result<ReplicaMachine> {
        let machine = ReplicaMachine {
            store,
            group,
            keys: Arc::new(Keys::of(group)),
            ids,
            data: Arc::new(Mutex::new(MachineData::default())),
            order: Arc::default(),
        };
        let mut applying = Applying::default();
        {
            let mut data = lock(&machine.data);
            if let Some(bytes) = recovered.state.get(APPLIED) {
                let applied: Applied = decode(bytes, "applied log id")?;
                data.last_applied = applied.last_applied;
                data.membership = applied.membership;
                machine.restore_stored(&mut data, recovered);
            } else if let Some(bytes) = recovered.state.get(SNAPSHOT).filter(|b| !b.is_empty()) {
                // Written before messages were kept in the message log: they move there.
                let snap = StoredSnapshot::decode(bytes)?;
                machine.install_content(&mut data, &snap.meta, snap.content, &mut applying);
                applying.ops.push(StoreOp::RaftPutState {
                    group,
                    key: SNAPSHOT.into(),
                    value: Bytes::new(),
                });
            }
            let entries = committed_entries::<QueueTypes>(recovered, data.last_applied)?;
            machine.apply_all(&mut data, entries, &mut applying);
            // (No host yet.)
            machine.finish(&data, applying)?;
        }
        recovered.queues.clear();
        Ok(machine)
    }

    /// Puts back the messages and dead letters the store read back for the group.
    fn restore_stored(&self, data: &mut MachineData, recovered: &mut RecoveredRaftGroup) {
        if let Some(entries) = recovered.queues.remove(&*self.keys.messages) {
            for e in entries {
                let (head, size) = match &e.blob {
                    RecoveredBlob::OnDisk { words, tail_len } => (*words, *tail_len),
                    RecoveredBlob::Whole(blob) => match digest(blob) {
                        Some(d) => d,
                        None => {
                            tracing::error!(key = e.offset, "replicated queue: unreadable message");
                            continue;
                        }
                    },
                };
                let held = Held {
                    msg_id: e.msg_id,
                    head,
                    size: size as u32,
                    delivered: e.delivery_count,
                };
                data.messages.insert(e.offset, held);
            }
        }
        for (i, reason) in REASONS.iter().enumerate() {
            let Some(entries) = recovered.queues.remove(&*self.keys.dead[i]) else {
                continue;
            };
            let entries: Vec<_> = entries.into_iter().collect();
            let ids = entries.iter().map(|e| e.msg_id).collect();
            let blobs = match read_now(&self.store, ids) {
                Ok(blobs) => blobs,
                Err(e) => {
                    tracing::error!("replicated queue: dead letters cannot be read: {e}");
                    continue;
                }
            };
            for (e, blob) in entries.into_iter().zip(blobs) {
                let Some(blob) = blob else {
                    tracing::error!(key = e.offset, "replicated queue: dead letter not stored");
                    continue;
                };
                data.dead.insert(
                    e.offset,
                    DeadHeld {
                        blob,
                        reason: *reason,
                    },
                );
            }
        }
    }

    /// Applies `entries` in order into `data`, reading first the bodies of the held
    /// messages they dead-letter.
    fn apply_all(
        &self,
        data: &mut MachineData,
        entries: Vec<Entry<QueueTypes>>,
        applying: &mut Applying,
    ) {
        // One pass: the held messages dead-lettered, and whether any entry dead-letters
        // (a message enqueued and dead-lettered in the same batch needs its blob kept).
        let mut dead_lettered = Vec::new();
        let mut keep_blobs = false;
        for entry in &entries {
            let EntryPayload::Normal(records) = &entry.payload else {
                continue;
            };
            for record in records {
                if let ReplicaRecord::DeadLettered { key, .. } = record {
                    keep_blobs = true;
                    if data.messages.contains_key(key) {
                        dead_lettered.push(*key);
                    }
                }
            }
        }
        if !dead_lettered.is_empty() {
            let ids = dead_lettered
                .iter()
                .filter_map(|k| data.messages.get(k).map(|h| h.msg_id))
                .collect();
            match read_now(&self.store, ids) {
                Ok(blobs) => {
                    for (key, blob) in dead_lettered.into_iter().zip(blobs) {
                        if let Some(blob) = blob {
                            applying.blobs.insert(key, blob);
                        }
                    }
                }
                Err(e) => tracing::error!("replicated queue: dead letters cannot be read: {e}"),
            }
        }
        for entry in entries {
            self.apply_entry(data, entry, applying, keep_blobs);
        }
    }

    /// Hands the store what applying asked of it, with the log id it brings the machine
    /// to, in one request; returns what the host must hear (after: it may read them
    /// back).
    fn finish(
        &self,
        data: &MachineData,
        applying: Applying,
    ) -> Result<Vec<HostAction>, StorageError<NodeId>> {
        let mut ops = applying.ops;
        let applied = Applied {
            last_applied: data.last_applied,
            membership: data.membership.clone(),
        };
        ops.push(StoreOp::RaftPutState {
            group: self.group,
            key: APPLIED.into(),
            value: encode(&applied)?,
        });
        self.store.submit(ops);
        Ok(applying.host)
    }

    /// Tells the host (if any) of what was applied, in order, outside `data`'s lock.
    fn tell_host(host: Option<Arc<Queue>>, actions: Vec<HostAction>) {
        let Some(host) = host else {
            return;
        };
        for action in actions {
            match action {
                HostAction::Enqueue(msg) => host.enqueue_committed(msg),
                HostAction::DeadLetter(key, msg, reason) => {
                    host.dead_letter_committed(key, msg, reason)
                }
            }
        }
    }

    /// This node now leads the group: `host` becomes the live queue, holding every
    /// committed message (those handed out before come back redelivered; every one when
    /// `after_another_leader`, see [`Queue::take_over`]), their bodies read back from
    /// the store as it needs them. The caller has made sure every entry committed
    /// before this node's term is applied.
    pub fn host(&self, host: Arc<Queue>, after_another_leader: bool) {
        let _order = lock(&self.order);
        let (restored, dead) = {
            let mut data = lock(&self.data);
            let restored = data
                .messages
                .iter()
                .map(|(key, held)| {
                    (
                        *key,
                        PagedHead::from_words(held.head),
                        held.size as usize,
                        held.delivered,
                    )
                })
                .collect();
            let dead = data
                .dead
                .iter()
                .filter_map(|(key, d)| {
                    Some((*key, Arc::new(decode_held(&d.blob, *key)?), d.reason))
                })
                .collect();
            data.host = Some(host.clone());
            (restored, dead)
        };
        host.take_over(restored, after_another_leader);
        host.resume_dead_letters(dead);
    }

    /// This node no longer leads the group: its host stops serving.
    pub fn unhost(&self) -> Option<Arc<Queue>> {
        let _order = lock(&self.order);
        lock(&self.data).host.take()
    }

    /// Reads back the bodies of held messages by key, for the host: `done` gets, in the
    /// order of `keys`, each message's stored encoding (`None` for a key not held).
    pub fn read_bodies(&self, keys: Vec<u64>, done: Box<dyn FnOnce(ReadAnswer) + Send>) {
        self.read_bodies_locked(&lock(&self.data), keys, done);
    }

    fn read_bodies_locked(
        &self,
        data: &MachineData,
        keys: Vec<u64>,
        done: Box<dyn FnOnce(ReadAnswer) + Send>,
    ) {
        let found: Vec<Option<u64>> = keys
            .iter()
            .map(|k| data.messages.get(k).map(|h| h.msg_id))
            .collect();
        let ids = found.iter().flatten().copied().collect();
        // (Asked under the lock: a removal applied later reaches the store after it.)
        self.store.read_messages(
            ids,
            Box::new(move |answer| {
                done(answer.map(|blobs| {
                    let mut blobs = blobs.into_iter();
                    found
                        .iter()
                        .map(|f| f.and_then(|_| blobs.next().flatten()))
                        .collect()
                }))
            }),
        );
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

    /// Replaces what the machine holds with a snapshot's content (store records in
    /// `applying`).
    fn install_content(
        &self,
        data: &mut MachineData,
        meta: &SnapshotMeta<NodeId, openraft::BasicNode>,
        content: Content,
        applying: &mut Applying,
    ) {
        let ops = &mut applying.ops;
        ops.push(StoreOp::PurgeQueue {
            queue: self.keys.messages.clone(),
        });
        for queue in &self.keys.dead {
            ops.push(StoreOp::PurgeQueue {
                queue: queue.clone(),
            });
        }
        data.messages.clear();
        data.dead.clear();
        for (key, m) in content.messages {
            let Some((head, size)) = digest(&m.blob) else {
                tracing::error!(key, "replicated queue: unreadable message in a snapshot");
                continue;
            };
            let msg_id = self.put(ops, self.keys.messages.clone(), key, m.blob);
            for _ in 0..m.delivered.min(MAX_DELIVERIES_KEPT) {
                ops.push(StoreOp::MarkDelivered {
                    queue: self.keys.messages.clone(),
                    offset: key,
                });
            }
            data.messages.insert(
                key,
                Held {
                    msg_id,
                    head,
                    size: size as u32,
                    delivered: m.delivered,
                },
            );
        }
        for (key, d) in content.dead {
            self.put(ops, self.keys.dead_of(d.reason), key, d.blob.clone());
            data.dead.insert(key, d);
        }
        data.last_applied = meta.last_log_id;
        data.membership = meta.last_membership.clone();
    }

    /// Stores `blob` as the entry `key` of `queue`; its new message id.
    fn put(&self, ops: &mut Vec<StoreOp>, queue: Arc<str>, key: u64, blob: Bytes) -> u64 {
        let msg_id = self.ids.fetch_add(1, Ordering::Relaxed);
        ops.push(StoreOp::PutMessage {
            msg_id,
            blob: blob.into(),
        });
        ops.push(StoreOp::Enqueue {
            queue,
            offset: key,
            msg_id,
        });
        msg_id
    }

    /// Applies one entry.
    fn apply_entry(
        &self,
        data: &mut MachineData,
        entry: Entry<QueueTypes>,
        applying: &mut Applying,
        keep_blobs: bool,
    ) {
        data.last_applied = Some(entry.log_id);
        match entry.payload {
            EntryPayload::Blank => {}
            EntryPayload::Membership(m) => {
                data.membership = StoredMembership::new(Some(entry.log_id), m);
            }
            EntryPayload::Normal(records) => {
                let base = entry.log_id.index << RECORD_BITS;
                for (position, record) in records.into_iter().enumerate() {
                    self.apply_record(data, base | position as u64, record, applying, keep_blobs);
                }
            }
        }
    }

    fn apply_record(
        &self,
        data: &mut MachineData,
        key: u64,
        record: ReplicaRecord,
        applying: &mut Applying,
        keep_blobs: bool,
    ) {
        let messages = &self.keys.messages;
        match record {
            ReplicaRecord::Enqueue(blob) => {
                let Some((head, size)) = digest(&blob) else {
                    tracing::error!(key, "replicated queue: unreadable message");
                    return;
                };
                if data.host.is_some() {
                    match crate::broker::persist::decode_message(&blob, key) {
                        Some(msg) => applying.host.push(HostAction::Enqueue(Arc::new(Message {
                            store_id: Some(key),
                            ..msg
                        }))),
                        None => tracing::error!(key, "replicated queue: unreadable message"),
                    }
                }
                if keep_blobs {
                    applying.blobs.insert(key, blob.clone());
                }
                let msg_id = self.put(&mut applying.ops, messages.clone(), key, blob);
                let held = Held {
                    msg_id,
                    head,
                    size: size as u32,
                    delivered: 0,
                };
                data.messages.insert(key, held);
            }
            ReplicaRecord::Delivered(key) => {
                if let Some(held) = data.messages.get_mut(&key) {
                    held.delivered = held.delivered.saturating_add(1);
                    applying.ops.push(StoreOp::MarkDelivered {
                        queue: messages.clone(),
                        offset: key,
                    });
                }
            }
            ReplicaRecord::Remove(key) => {
                if data.messages.remove(&key).is_some() {
                    applying.ops.push(StoreOp::Remove {
                        queue: messages.clone(),
                        offset: key,
                    });
                } else if let Some(old) = data.dead.remove(&key) {
                    applying.ops.push(StoreOp::Remove {
                        queue: self.keys.dead_of(old.reason),
                        offset: key,
                    });
                }
            }
            ReplicaRecord::Purge => {
                data.messages.clear();
                data.dead.clear();
                applying.ops.push(StoreOp::PurgeQueue {
                    queue: messages.clone(),
                });
                for queue in &self.keys.dead {
                    applying.ops.push(StoreOp::PurgeQueue {
                        queue: queue.clone(),
                    });
                }
            }
            ReplicaRecord::DeadLettered { key, reason } => {
                let Some(held) = data.messages.remove(&key) else {
                    return;
                };
                // The stored copy moves to the dead letters' key (added first: the
                // message must never be without an entry).
                applying.ops.push(StoreOp::Enqueue {
                    queue: self.keys.dead_of(reason),
                    offset: key,
                    msg_id: held.msg_id,
                });
                applying.ops.push(StoreOp::Remove {
                    queue: messages.clone(),
                    offset: key,
                });
                let Some(blob) = applying.blobs.remove(&key) else {
                    tracing::error!(key, "replicated queue: a dead letter cannot be read back");
                    return;
                };
                if data.host.is_some()
                    && let Some(msg) = decode_held(&blob, key)
                {
                    applying
                        .host
                        .push(HostAction::DeadLetter(key, Arc::new(msg), reason));
                }
                data.dead.insert(key, DeadHeld { blob, reason });
            }
        }
    }

    /// The current state as a snapshot to send, every message with its body read from
    /// the store. `None` the first time openraft asks (at start, for the snapshot's log
    /// id only, which its log state gives it anyway): nothing is read for it.
    async fn current_snapshot(&self) -> Result<Option<Snapshot<QueueTypes>>, StorageError<NodeId>> {
        let (meta, keys, delivered, dead, rx) = {
            let mut data = lock(&self.data);
            if !std::mem::replace(&mut data.snapshot_asked, true) {
                return Ok(None);
            }
            let meta = self.meta(&mut data);
            let keys: Vec<u64> = data.messages.keys().copied().collect();
            let delivered: Vec<u32> = data.messages.values().map(|h| h.delivered).collect();
            let ids = data.messages.values().map(|h| h.msg_id).collect();
            let (tx, rx) = tokio::sync::oneshot::channel();
            // (Asked under the lock: removals applied later reach the store after it.)
            self.store.read_messages(
                ids,
                Box::new(move |answer| {
                    let _ = tx.send(answer);
                }),
            );
            (meta, keys, delivered, data.dead.clone(), rx)
        };
        let read_failed = |e: String| StorageError::IO {
            source: StorageIOError::read_snapshot(None, AnyError::error(e)),
        };
        let blobs = rx
            .await
            .map_err(|_| read_failed("store closed".into()))?
            .map_err(|e| read_failed(e.to_string()))?;
        let mut content = Content {
            messages: BTreeMap::new(),
            dead,
        };
        for ((key, delivered), blob) in keys.into_iter().zip(delivered).zip(blobs) {
            let Some(blob) = blob else {
                return Err(read_failed(format!("message {key} not in the store")));
            };
            content.messages.insert(key, HeldBlob { blob, delivered });
        }
        Ok(Some(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(encode(&content)?.to_vec())),
        }))
    }

    /// A snapshot's description of the state now.
    fn meta(&self, data: &mut MachineData) -> SnapshotMeta<NodeId, openraft::BasicNode> {
        data.snapshots_built += 1;
        let index = data.last_applied.map_or(0, |l| l.index);
        SnapshotMeta {
            last_log_id: data.last_applied,
            last_membership: data.membership.clone(),
            snapshot_id: format!("{index}-{}", data.snapshots_built),
        }
    }
}

/// A blob's head digest and body length; `None` when it cannot be read.
fn digest(blob: &[u8]) -> Option<([u64; 2], usize)> {
    match Message::head_digest(blob) {
        Some(d) => Some((d.words, blob.len().saturating_sub(d.head_len))),
        None => {
            // An unusual head (see `Message::head_digest`): decoded in full.
            let head_len = Message::head_len(blob)?;
            let msg = Message::decode(&Bytes::copy_from_slice(blob), None)?;
            Some((PagedHead::of(&msg).to_words(), blob.len() - head_len))
        }
    }
}

/// Reads stored messages by id and waits for them (a short stall of the calling
/// worker, for rare reads).
fn read_now(store: &Store, ids: Vec<u64>) -> Result<Vec<Option<Bytes>>, String> {
    match crate::store::read_blocking(|done| store.read_messages(ids, done)) {
        Some(Ok(blobs)) => Ok(blobs),
        Some(Err(e)) => Err(e.to_string()),
        None => Err("store closed".into()),
    }
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

impl RaftSnapshotBuilder<QueueTypes> for ReplicaMachine {
    /// A snapshot is the applied log id: the machine's messages are already stored.
    /// Its content is read only when a follower needs it (see `get_current_snapshot`).
    async fn build_snapshot(&mut self) -> Result<Snapshot<QueueTypes>, StorageError<NodeId>> {
        let meta = self.meta(&mut lock(&self.data));
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(Vec::new())),
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
        let entries: Vec<Entry<QueueTypes>> = entries.into_iter().collect();
        let replies = vec![(); entries.len()];
        let _order = lock(&self.order);
        let (host, actions) = {
            let mut data = lock(&self.data);
            let mut applying = Applying::default();
            self.apply_all(&mut data, entries, &mut applying);
            (data.host.clone(), self.finish(&data, applying)?)
        };
        ReplicaMachine::tell_host(host, actions);
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
        let _order = lock(&self.order);
        let mut data = lock(&self.data);
        let mut applying = Applying::default();
        self.install_content(&mut data, meta, content, &mut applying);
        self.finish(&data, applying).map(|_| ())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<QueueTypes>>, StorageError<NodeId>> {
        self.current_snapshot().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::CommittedLeaderId;

    fn blob(body: &'static str) -> Bytes {
        Message::for_tests(Bytes::from_static(body.as_bytes()), 0).encode()
    }

    fn entry(index: u64, records: Vec<ReplicaRecord>) -> Entry<QueueTypes> {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(records),
        }
    }

    fn open(dir: &std::path::Path) -> (Store, crate::store::Recovered) {
        let trim = crate::store::BlobTrim {
            whole_per_queue: 0,
            digest: Message::head_digest,
            head_len: Message::head_len,
        };
        Store::open_trimmed(
            dir,
            crate::config::FlushMode::Sync,
            std::time::Duration::from_millis(10),
            Some(trim),
        )
        .unwrap()
    }

    fn apply(machine: &ReplicaMachine, entries: Vec<Entry<QueueTypes>>) {
        let mut data = lock(&machine.data);
        let mut applying = Applying::default();
        machine.apply_all(&mut data, entries, &mut applying);
        machine.finish(&data, applying).unwrap();
        drop(data);
    }

    fn read(machine: &ReplicaMachine, keys: Vec<u64>) -> Vec<Option<Bytes>> {
        let (tx, rx) = std::sync::mpsc::channel();
        machine.read_bodies(
            keys,
            Box::new(move |answer| {
                let _ = tx.send(answer);
            }),
        );
        rx.recv().unwrap().unwrap()
    }

    #[test]
    fn messages_live_in_the_store_and_come_back_with_the_applied_id() {
        let dir = std::env::temp_dir().join(format!("warren-machine-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let group = 7;
        let key = |index: u64, position: u64| index << RECORD_BITS | position;
        let (a, b, c) = (blob("a"), blob("bb"), blob("ccc"));
        {
            let (store, mut recovered) = open(&dir);
            let ids = Arc::new(AtomicU64::new(recovered.next_msg_id));
            let mut group_state = recovered.raft.remove(&group).unwrap_or_default();
            let machine =
                ReplicaMachine::recover(store.clone(), group, ids, &mut group_state).unwrap();
            apply(
                &machine,
                vec![entry(
                    1,
                    vec![
                        ReplicaRecord::Enqueue(a.clone()),
                        ReplicaRecord::Enqueue(b.clone()),
                    ],
                )],
            );
            // Dead-lettered in the batch that enqueued it, and in a later one.
            let dead = |key, reason| ReplicaRecord::DeadLettered { key, reason };
            apply(
                &machine,
                vec![entry(
                    2,
                    vec![
                        ReplicaRecord::Enqueue(c.clone()),
                        dead(key(2, 0), DeathReason::Expired),
                        ReplicaRecord::Delivered(key(1, 1)),
                        ReplicaRecord::Delivered(key(1, 1)),
                    ],
                )],
            );
            apply(
                &machine,
                vec![entry(3, vec![dead(key(1, 0), DeathReason::Rejected)])],
            );
            // (A record for a key the group does not hold changes nothing.)
            apply(
                &machine,
                vec![entry(4, vec![dead(99, DeathReason::Rejected)])],
            );
            assert_eq!(machine.len(), 1);
            assert_eq!(machine.dead_letters(), 2);
            assert_eq!(
                read(&machine, vec![key(1, 1), key(1, 0), 99]),
                vec![Some(b.clone()), None, None]
            );
            store.close();
        }
        // Back from the store: the held message (its delivery count too) and the dead
        // letters with their reasons, as of the applied id.
        let (store, mut recovered) = open(&dir);
        assert!(recovered.queues.is_empty(), "not a classic queue's");
        let ids = Arc::new(AtomicU64::new(recovered.next_msg_id));
        let mut group_state = recovered.raft.remove(&group).unwrap();
        let machine = ReplicaMachine::recover(store.clone(), group, ids, &mut group_state).unwrap();
        {
            let data = lock(&machine.data);
            assert_eq!(data.last_applied.map(|l| l.index), Some(4));
            assert_eq!(data.messages.len(), 1);
            assert_eq!(data.messages[&key(1, 1)].delivered, 2);
            assert_eq!(data.messages[&key(1, 1)].size, 2);
            assert_eq!(
                data.dead[&key(1, 0)],
                DeadHeld {
                    blob: a.clone(),
                    reason: DeathReason::Rejected
                }
            );
            assert_eq!(data.dead[&key(2, 0)].reason, DeathReason::Expired);
            assert_eq!(data.dead[&key(2, 0)].blob, c);
        }
        assert_eq!(read(&machine, vec![key(1, 1)]), vec![Some(b.clone())]);

        // Its targets took a dead letter: it goes; a purge empties the rest.
        apply(
            &machine,
            vec![entry(5, vec![ReplicaRecord::Remove(key(1, 0))])],
        );
        assert_eq!(machine.dead_letters(), 1);
        apply(&machine, vec![entry(6, vec![ReplicaRecord::Purge])]);
        assert!(machine.is_empty() && machine.dead_letters() == 0);
        store.close();
        let (_store, recovered) = open(&dir);
        let group_state = &recovered.raft[&group];
        assert!(
            group_state.queues.is_empty(),
            "{:?}",
            group_state.queues.keys()
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_snapshot_content_written_before_dead_letters_were_kept_still_reads() {
        let mut messages = BTreeMap::new();
        messages.insert(
            1,
            HeldBlob {
                blob: blob("a"),
                delivered: 2,
            },
        );
        let old = Content::decode(&postcard::to_stdvec(&messages).unwrap()).unwrap();
        assert_eq!((old.messages, old.dead.len()), (messages, 0));
    }
}
