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
//! body, streamed from the store into a file and sent (see [`super::snapshot`]). The
//! follower installs it in batches into the other of two sets of queue keys (a
//! *generation*), and moves to that generation, with the snapshot's log id, in one
//! last request: a crash halfway leaves the state it had, and the half-written
//! generation is purged at the next start. Neither side holds the bodies in memory.
//!
//! Dead letters of a queue that dead-letters at least once stay here (`dead`) from
//! their [`ReplicaRecord::DeadLettered`] to their [`ReplicaRecord::Remove`]: every
//! member holds them (their bodies too, in memory: a length limit bounds them), so a new
//! leader hands them to its host to dead-letter again.

// openraft's trait methods return its (large) StorageError.
#![allow(clippy::result_large_err)]

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use openraft::storage::RaftStateMachine;
use openraft::{
    AnyError, Entry, EntryPayload, LogId, RaftSnapshotBuilder, Snapshot, SnapshotMeta,
    StorageError, StorageIOError, StoredMembership,
};
use serde::{Deserialize, Serialize};

use super::snapshot::{Opened, SnapshotFile, SnapshotRecord, write_record};
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

/// Name of the stored generation (one byte, 0 when absent): which of the group's two
/// sets of queue keys holds its messages (see [`Keys::of`]).
pub const GENERATION: &str = "generation";

/// Messages read back from the store at once while a snapshot is written, and store
/// ops handed over at once while one is installed.
const SNAPSHOT_BATCH: usize = 1024;
/// Body bytes read or installed at once while a snapshot is written or installed.
const SNAPSHOT_BATCH_BYTES: usize = 4 << 20;

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
    /// The keys of `generation` (0 or 1; generation 0's are the keys of the versions
    /// that had one set only).
    fn of(group: GroupId, generation: u8) -> Keys {
        let prefix = match generation {
            0 => String::new(),
            g => format!("g{g}/"),
        };
        Keys {
            messages: match generation {
                0 => replica_queue_key(group, None),
                g => replica_queue_key(group, Some(&format!("g{g}"))),
            }
            .into(),
            dead: std::array::from_fn(|i| {
                replica_queue_key(group, Some(&format!("{prefix}dead/{i}"))).into()
            }),
        }
    }

    /// Every key.
    fn all(&self) -> impl Iterator<Item = &Arc<str>> {
        std::iter::once(&self.messages).chain(&self.dead)
    }

    /// Ops that purge every key.
    fn purge_ops(&self) -> impl Iterator<Item = StoreOp> + '_ {
        self.all().map(|queue| StoreOp::PurgeQueue {
            queue: queue.clone(),
        })
    }

    fn dead_of(&self, reason: DeathReason) -> Arc<str> {
        let i = REASONS.iter().position(|r| *r == reason).unwrap_or(0);
        self.dead[i].clone()
    }
}

/// Store ops that remove every stored record of `group`: its log, its values and its
/// messages (the queue was deleted, or this node no longer holds a replica).
pub fn drop_ops(group: GroupId) -> Vec<StoreOp> {
    let mut ops = vec![StoreOp::RaftDropGroup { group }];
    for generation in [0, 1] {
        ops.extend(Keys::of(group, generation).purge_ops());
    }
    ops
}

#[derive(Debug)]
struct MachineData {
    /// Which set of queue keys holds the messages, and its keys.
    generation: u8,
    keys: Arc<Keys>,
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

impl MachineData {
    fn new(group: GroupId, generation: u8) -> MachineData {
        MachineData {
            generation,
            keys: Arc::new(Keys::of(group, generation)),
            messages: BTreeMap::new(),
            dead: BTreeMap::new(),
            last_applied: None,
            membership: Membership::default(),
            snapshots_built: 0,
            snapshot_asked: false,
            host: None,
        }
    }
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
        let generation = recovered
            .state
            .get(GENERATION)
            .and_then(|g| g.first())
            .map_or(0, |g| g & 1);
        let machine = ReplicaMachine {
            store,
            group,
            ids,
            data: Arc::new(Mutex::new(MachineData::new(group, generation))),
            order: Arc::default(),
        };
        let mut applying = Applying::default();
        // What an install interrupted by a crash left in the other generation goes.
        let other = Keys::of(group, generation ^ 1);
        if other.all().any(|k| recovered.queues.contains_key(&**k)) {
            applying.ops.extend(other.purge_ops());
        }
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
                let mut installer = Installer::new(&machine, &data);
                installer.add_content(snap.content);
                applying.ops.extend(installer.finish(&mut data, &snap.meta));
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
        let keys = data.keys.clone();
        if let Some(entries) = recovered.queues.remove(&*keys.messages) {
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
            let Some(entries) = recovered.queues.remove(&*keys.dead[i]) else {
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
        let keys = data.keys.clone();
        for entry in entries {
            self.apply_entry(data, &keys, entry, applying, keep_blobs);
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

    /// Applies one entry.
    fn apply_entry(
        &self,
        data: &mut MachineData,
        keys: &Keys,
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
                    let key = base | position as u64;
                    self.apply_record(data, keys, key, record, applying, keep_blobs);
                }
            }
        }
    }

    fn apply_record(
        &self,
        data: &mut MachineData,
        keys: &Keys,
        key: u64,
        record: ReplicaRecord,
        applying: &mut Applying,
        keep_blobs: bool,
    ) {
        let messages = &keys.messages;
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
                let msg_id = put(&self.ids, &mut applying.ops, messages.clone(), key, blob);
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
                        queue: keys.dead_of(old.reason),
                        offset: key,
                    });
                }
            }
            ReplicaRecord::Purge => {
                data.messages.clear();
                data.dead.clear();
                applying.ops.extend(keys.purge_ops());
            }
            ReplicaRecord::DeadLettered { key, reason } => {
                let Some(held) = data.messages.remove(&key) else {
                    return;
                };
                // The stored copy moves to the dead letters' key (added first: the
                // message must never be without an entry).
                applying.ops.push(StoreOp::Enqueue {
                    queue: keys.dead_of(reason),
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

    /// The current state as a snapshot to send: its description now, and a file that a
    /// blocking task fills with every message and its body, read back from the store in
    /// batches (see [`super::snapshot`]). `None` the first time openraft asks (at start,
    /// for the snapshot's log id only, which its log state gives it anyway): nothing is
    /// read for it.
    fn current_snapshot(&self) -> Result<Option<Snapshot<QueueTypes>>, StorageError<NodeId>> {
        let (meta, listed, dead) = {
            let mut data = lock(&self.data);
            if !std::mem::replace(&mut data.snapshot_asked, true) {
                return Ok(None);
            }
            let meta = self.meta(&mut data);
            // (24 bytes a message for as long as the file is being written, less than
            // the machine's own entry.)
            let listed: Vec<Listed> = data
                .messages
                .iter()
                .map(|(key, held)| Listed {
                    key: *key,
                    msg_id: held.msg_id,
                    delivered: held.delivered,
                    size: held.size,
                })
                .collect();
            (meta, listed, data.dead.clone())
        };
        let machine = self.clone();
        let file = SnapshotFile::filled_by(&self.snapshot_dir(), move |out, wanted| {
            machine.write_snapshot(listed, dead, out, wanted)
        })
        .map_err(|e| StorageError::IO {
            source: StorageIOError::read_snapshot(Some(meta.signature()), &e),
        })?;
        Ok(Some(Snapshot {
            meta,
            snapshot: Box::new(file),
        }))
    }

    /// Writes the stream of a snapshot: the messages `listed` (as they were at its log
    /// id) with their bodies, read from the store in batches, then the dead letters.
    /// Stops with an error once the snapshot is no longer `wanted`.
    fn write_snapshot(
        &self,
        listed: Vec<Listed>,
        dead: BTreeMap<u64, DeadHeld>,
        out: &mut impl io::Write,
        wanted: &dyn Fn() -> bool,
    ) -> io::Result<()> {
        let mut messages = 0;
        let mut rest = &listed[..];
        while !rest.is_empty() {
            if !wanted() {
                return Err(io::Error::other("snapshot no longer wanted"));
            }
            let mut bytes = 0;
            let n = rest
                .iter()
                .take(SNAPSHOT_BATCH)
                .take_while(|l| {
                    bytes += l.size as usize;
                    bytes <= SNAPSHOT_BATCH_BYTES
                })
                .count()
                .max(1);
            let (batch, after) = rest.split_at(n);
            rest = after;
            let ids = batch.iter().map(|l| l.msg_id).collect();
            let blobs = read_now(&self.store, ids).map_err(io::Error::other)?;
            for (l, blob) in batch.iter().zip(blobs) {
                let Some(blob) = blob else {
                    // Removed since the snapshot's log id, by a committed entry the
                    // follower applies after it: left out. A message still held must
                    // be readable.
                    let data = lock(&self.data);
                    if data.messages.contains_key(&l.key) || data.dead.contains_key(&l.key) {
                        return Err(io::Error::other(format!(
                            "message {} not in the store",
                            l.key
                        )));
                    }
                    continue;
                };
                let record = SnapshotRecord::Message {
                    key: l.key,
                    delivered: l.delivered,
                    blob,
                };
                write_record(out, &record)?;
                messages += 1;
            }
        }
        let dead_letters = dead.len() as u64;
        for (key, d) in dead {
            let record = SnapshotRecord::DeadLetter {
                key,
                reason: d.reason,
                blob: d.blob,
            };
            write_record(out, &record)?;
        }
        write_record(
            out,
            &SnapshotRecord::End {
                messages,
                dead_letters,
            },
        )
    }

    /// Installs a received snapshot: its records go to the other generation's keys in
    /// batches (at most two awaiting their commit), and the last request moves the
    /// machine there with the snapshot's log id. On an error the machine keeps its
    /// state, and what was written for the other generation is purged.
    async fn install_received(
        &self,
        meta: &SnapshotMeta<NodeId, openraft::BasicNode>,
        snapshot: SnapshotFile,
    ) -> Result<(), StorageError<NodeId>> {
        let failed = |e: String| StorageError::IO {
            source: StorageIOError::read_snapshot(Some(meta.signature()), AnyError::error(e)),
        };
        let mut installer = Installer::new(self, &lock(&self.data));
        let mut in_flight = None;
        let read: Result<(), String> = match snapshot.open().await {
            Ok(Opened::Whole(bytes)) => Content::decode(&bytes)
                .map(|content| installer.add_content(content))
                .map_err(|e| e.to_string()),
            Ok(Opened::Records(mut records)) => loop {
                match records.next().await {
                    Ok(Some(record)) => installer.add(record),
                    Ok(None) => break Ok(()),
                    Err(e) => break Err(e.to_string()),
                }
                if installer.is_batch_full() {
                    let commit = self.store.commit(installer.take_ops());
                    if let Some(earlier) = in_flight.replace(commit) {
                        earlier.await;
                    }
                }
            },
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = read {
            self.store.submit(installer.keys.purge_ops().collect());
            return Err(failed(e));
        }
        let installed = (installer.messages.len(), installer.dead.len());
        let _order = lock(&self.order);
        let mut data = lock(&self.data);
        let applying = Applying {
            ops: installer.finish(&mut data, meta),
            ..Applying::default()
        };
        self.finish(&data, applying)?;
        tracing::info!(
            group = format_args!("{:x}", self.group),
            messages = installed.0,
            dead_letters = installed.1,
            "replicated queue: snapshot installed"
        );
        Ok(())
    }

    /// Where snapshot files go: the data directory.
    fn snapshot_dir(&self) -> PathBuf {
        let path = self.store.path();
        path.parent().unwrap_or(path).to_path_buf()
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

/// Stores `blob` as the entry `key` of `queue` (ops into `ops`); its new message id.
fn put(ids: &AtomicU64, ops: &mut Vec<StoreOp>, queue: Arc<str>, key: u64, blob: Bytes) -> u64 {
    let msg_id = ids.fetch_add(1, Ordering::Relaxed);
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

/// A held message as a snapshot being written lists it.
struct Listed {
    key: u64,
    msg_id: u64,
    delivered: u32,
    size: u32,
}

/// Builds a snapshot's state in the generation the machine is not in: its messages'
/// entries in memory, their store ops handed over in batches, until [`Installer::finish`]
/// moves the machine there.
struct Installer {
    generation: u8,
    keys: Arc<Keys>,
    group: GroupId,
    ids: Arc<AtomicU64>,
    messages: BTreeMap<u64, Held>,
    dead: BTreeMap<u64, DeadHeld>,
    ops: Vec<StoreOp>,
    batch_bytes: usize,
}

impl Installer {
    /// An installer into the generation `data` is not in (emptied first: a failed
    /// install may have left records there).
    fn new(machine: &ReplicaMachine, data: &MachineData) -> Installer {
        let generation = data.generation ^ 1;
        let keys = Arc::new(Keys::of(machine.group, generation));
        Installer {
            generation,
            ops: keys.purge_ops().collect(),
            keys,
            group: machine.group,
            ids: machine.ids.clone(),
            messages: BTreeMap::new(),
            dead: BTreeMap::new(),
            batch_bytes: 0,
        }
    }

    /// Adds a snapshot stream's record.
    fn add(&mut self, record: SnapshotRecord) {
        match record {
            SnapshotRecord::Message {
                key,
                delivered,
                blob,
            } => self.message(key, delivered, blob),
            SnapshotRecord::DeadLetter { key, reason, blob } => {
                self.dead_letter(key, DeadHeld { blob, reason })
            }
            SnapshotRecord::End { .. } => {}
        }
    }

    /// Adds a whole content (as snapshots were sent and stored before streams).
    fn add_content(&mut self, content: Content) {
        for (key, m) in content.messages {
            self.message(key, m.delivered, m.blob);
        }
        for (key, d) in content.dead {
            self.dead_letter(key, d);
        }
    }

    fn message(&mut self, key: u64, delivered: u32, blob: Bytes) {
        let Some((head, size)) = digest(&blob) else {
            tracing::error!(key, "replicated queue: unreadable message in a snapshot");
            return;
        };
        self.batch_bytes += blob.len();
        let msg_id = put(
            &self.ids,
            &mut self.ops,
            self.keys.messages.clone(),
            key,
            blob,
        );
        for _ in 0..delivered.min(MAX_DELIVERIES_KEPT) {
            self.ops.push(StoreOp::MarkDelivered {
                queue: self.keys.messages.clone(),
                offset: key,
            });
        }
        let held = Held {
            msg_id,
            head,
            size: size as u32,
            delivered,
        };
        self.messages.insert(key, held);
    }

    fn dead_letter(&mut self, key: u64, dead: DeadHeld) {
        self.batch_bytes += dead.blob.len();
        let queue = self.keys.dead_of(dead.reason);
        put(&self.ids, &mut self.ops, queue, key, dead.blob.clone());
        self.dead.insert(key, dead);
    }

    /// Whether the ops gathered should be handed over now.
    fn is_batch_full(&self) -> bool {
        self.ops.len() >= 2 * SNAPSHOT_BATCH || self.batch_bytes >= SNAPSHOT_BATCH_BYTES
    }

    /// The ops gathered so far.
    fn take_ops(&mut self) -> Vec<StoreOp> {
        self.batch_bytes = 0;
        std::mem::take(&mut self.ops)
    }

    /// Moves `data` to the installed state at `meta`'s log id; the ops left, then those
    /// that purge the generation left and name the new one (to be stored with the
    /// applied log id, in one request).
    fn finish(
        mut self,
        data: &mut MachineData,
        meta: &SnapshotMeta<NodeId, openraft::BasicNode>,
    ) -> Vec<StoreOp> {
        let mut ops = self.take_ops();
        ops.extend(data.keys.purge_ops());
        ops.push(StoreOp::RaftPutState {
            group: self.group,
            key: GENERATION.into(),
            value: Bytes::copy_from_slice(&[self.generation]),
        });
        data.generation = self.generation;
        data.keys = self.keys;
        data.messages = self.messages;
        data.dead = self.dead;
        data.last_applied = meta.last_log_id;
        data.membership = meta.last_membership.clone();
        ops
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
            snapshot: Box::new(SnapshotFile::empty()),
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
    ) -> Result<Box<SnapshotFile>, StorageError<NodeId>> {
        let file = SnapshotFile::create(&self.snapshot_dir()).map_err(|e| StorageError::IO {
            source: StorageIOError::write_snapshot(None, &e),
        })?;
        Ok(Box::new(file))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, openraft::BasicNode>,
        snapshot: Box<SnapshotFile>,
    ) -> Result<(), StorageError<NodeId>> {
        self.install_received(meta, *snapshot).await
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<QueueTypes>>, StorageError<NodeId>> {
        self.current_snapshot()
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

    /// A machine recovered from the store in `dir` (opened again).
    fn reopen(dir: &std::path::Path, group: GroupId) -> (Store, ReplicaMachine, Vec<String>) {
        let (store, mut recovered) = open(dir);
        let ids = Arc::new(AtomicU64::new(recovered.next_msg_id));
        let mut group_state = recovered.raft.remove(&group).unwrap_or_default();
        let mut keys: Vec<String> = group_state.queues.keys().cloned().collect();
        keys.sort();
        let machine = ReplicaMachine::recover(store.clone(), group, ids, &mut group_state).unwrap();
        (store, machine, keys)
    }

    /// What a machine holds: (key, delivery count, size) of its messages, (key, blob)
    /// of its dead letters, its generation.
    type Held3 = (Vec<(u64, u32, u32)>, Vec<(u64, Bytes)>, u8);

    fn held(machine: &ReplicaMachine) -> Held3 {
        let data = lock(&machine.data);
        let messages = data
            .messages
            .iter()
            .map(|(k, h)| (*k, h.delivered, h.size))
            .collect();
        let dead = data
            .dead
            .iter()
            .map(|(k, d)| (*k, d.blob.clone()))
            .collect();
        (messages, dead, data.generation)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_snapshot_streams_to_a_follower_that_moves_to_it_whole_or_not_at_all() {
        let base = std::env::temp_dir().join(format!("warren-snapshot-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let (dir_a, dir_b) = (base.join("a"), base.join("b"));
        let group = 9;
        let key = |index: u64, position: u64| index << RECORD_BITS | position;
        let bodies: Vec<Bytes> = (0..3000)
            .map(|i| Message::for_tests(Bytes::from(vec![b'x'; 1000 + i % 7]), 0).encode())
            .collect();

        // The leader: 3,000 messages in three entries, one handed out twice, one
        // dead-lettered, one acked.
        let (_store_a, leader, _) = reopen(&dir_a, group);
        for (i, chunk) in bodies.chunks(1000).enumerate() {
            let records = chunk.iter().cloned().map(ReplicaRecord::Enqueue).collect();
            apply(&leader, vec![entry(i as u64 + 1, records)]);
        }
        apply(
            &leader,
            vec![entry(
                4,
                vec![
                    ReplicaRecord::Delivered(key(1, 5)),
                    ReplicaRecord::Delivered(key(1, 5)),
                    ReplicaRecord::DeadLettered {
                        key: key(2, 7),
                        reason: DeathReason::MaxLen,
                    },
                    ReplicaRecord::Remove(key(3, 0)),
                ],
            )],
        );
        let mut machine = leader.clone();
        assert!(machine.get_current_snapshot().await.unwrap().is_none());
        let snap = machine.get_current_snapshot().await.unwrap().unwrap();
        assert_eq!(snap.meta.last_log_id.map(|l| l.index), Some(4));

        // The follower held something else before: it is replaced.
        let (store_b, follower, _) = reopen(&dir_b, group);
        apply(
            &follower,
            vec![entry(1, vec![ReplicaRecord::Enqueue(blob("old"))])],
        );
        let mut installing = follower.clone();
        installing
            .install_snapshot(&snap.meta, snap.snapshot)
            .await
            .unwrap();
        let (messages, dead, generation) = held(&leader);
        assert_eq!((messages.len(), dead.len()), (2998, 1));
        assert_eq!(held(&follower), (messages.clone(), dead.clone(), 1));
        assert_eq!(
            read(&follower, vec![key(1, 5), key(3, 999), key(3, 0)]),
            vec![Some(bodies[5].clone()), Some(bodies[2999].clone()), None]
        );
        assert_eq!(generation, 0);
        store_b.close();

        // Back from the store: the new generation only.
        let (store_b, follower, keys) = reopen(&dir_b, group);
        assert_eq!(held(&follower), (messages.clone(), dead.clone(), 1));
        assert!(keys.iter().all(|k| k.contains("/g1")), "{keys:?}");
        assert_eq!(lock(&follower.data).last_applied.map(|l| l.index), Some(4));

        // A stream cut short is refused, and the machine keeps what it had.
        let mut cut = SnapshotFile::create(&dir_b).unwrap();
        let mut bytes = super::super::snapshot::MAGIC.to_vec();
        let record = SnapshotRecord::Message {
            key: key(9, 0),
            delivered: 0,
            blob: blob("new"),
        };
        write_record(&mut bytes, &record).unwrap();
        {
            use tokio::io::AsyncWriteExt;
            cut.write_all(&bytes).await.unwrap();
        }
        let mut installing = follower.clone();
        let mut meta = snap_meta_at(9);
        assert!(
            installing
                .install_snapshot(&meta, Box::new(cut))
                .await
                .is_err()
        );
        assert_eq!(held(&follower), (messages.clone(), dead.clone(), 1));

        // An install a crash stops halfway: the records it wrote go at the next start.
        let mut installer = Installer::new(&follower, &lock(&follower.data));
        installer.add(record);
        store_b.commit(installer.take_ops()).await;
        store_b.close();
        let (store_b, follower, keys) = reopen(&dir_b, group);
        assert!(keys.iter().any(|k| !k.contains("/g1")), "{keys:?}");
        assert_eq!(held(&follower), (messages.clone(), dead.clone(), 1));
        store_b.close();
        let (_store_b, follower, keys) = reopen(&dir_b, group);
        assert!(keys.iter().all(|k| k.contains("/g1")), "{keys:?}");

        // And a snapshot of nothing empties it, back in generation 0.
        meta.last_log_id = Some(LogId::new(CommittedLeaderId::new(1, 1), 10));
        let mut empty = SnapshotFile::create(&dir_b).unwrap();
        let mut bytes = super::super::snapshot::MAGIC.to_vec();
        let end = SnapshotRecord::End {
            messages: 0,
            dead_letters: 0,
        };
        write_record(&mut bytes, &end).unwrap();
        {
            use tokio::io::AsyncWriteExt;
            empty.write_all(&bytes).await.unwrap();
        }
        let mut installing = follower.clone();
        installing
            .install_snapshot(&meta, Box::new(empty))
            .await
            .unwrap();
        assert_eq!(held(&follower), (vec![], vec![], 0));
        let _ = std::fs::remove_dir_all(&base);
    }

    fn snap_meta_at(index: u64) -> SnapshotMeta<NodeId, openraft::BasicNode> {
        SnapshotMeta {
            last_log_id: Some(LogId::new(CommittedLeaderId::new(1, 1), index)),
            last_membership: Membership::default(),
            snapshot_id: format!("{index}-test"),
        }
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
