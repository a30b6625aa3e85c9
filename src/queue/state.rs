//! The queue as a deterministic state machine, in the shape of RabbitMQ's `rabbit_fifo`:
//! every change of a queue is a `Command` value applied by one function,
//! `QueueState::apply(meta, command) -> (Reply, Effects)`. The side effects (deliveries,
//! dead letters, store removals) come back as data for the host (`Queue`) to carry out.
//! `apply` reads no clock, socket, random number or counter of its own: time and log
//! index come in `CommandMeta`, ids and consumer credit come in the command. So the same
//! commands in the same order give the same state anywhere, which is what lets a Raft log
//! drive a replicated queue with this very code. Commands are serde values for that log.

use std::collections::HashMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::args::{Overflow, QueueArgs};
use super::message::{Message, PagedHead, codec};

mod ready;

use ready::{Level, Waiting};

/// Position of a message in its queue: increases with every enqueue, so that a requeued
/// message goes back to its original place.
pub type Offset = u64;

/// Identity of a consumer, unique in the node.
pub type ConsumerId = u64;

/// A message in the queue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// Its place.
    pub offset: Offset,
    /// The message.
    #[serde(with = "codec")]
    pub msg: Arc<Message>,
    /// Delivered before (the redelivered flag).
    pub redelivered: bool,
    /// Times it came back unsettled (requeue, lost channel): for x-delivery-limit.
    pub delivery_count: u32,
    /// Wall-clock ms after which it is dropped (message or queue TTL).
    pub expires_at: Option<u64>,
    /// Priority level (0 when the queue has no x-max-priority).
    pub priority: u8,
}

/// Where a ready message's content is. A classic queue's host keeps the bodies of a
/// window at the head in memory and leaves the others in the store (`Paged`), reading
/// them back ahead of the consumers (a replicated queue's host too, from its machine).
#[derive(Debug, Clone, PartialEq)]
pub enum Slot {
    /// In memory.
    Loaded(Arc<Message>),
    /// Only in the store, under this message id; `size` is its body's length.
    Paged {
        /// The stored copy's id.
        store_id: u64,
        /// Body bytes (what length limits count).
        size: u32,
        /// The copy is the queue's scratch copy of a message that must not survive a
        /// restart (a transient message, or any message of a non-durable queue), parked
        /// there while memory runs short; not the message's own stored copy.
        spooled: bool,
    },
}

impl Slot {
    /// Body bytes, loaded or not.
    pub fn size(&self) -> usize {
        match self {
            Slot::Loaded(msg) => msg.size(),
            Slot::Paged { size, .. } => *size as usize,
        }
    }

    /// The id of the message's own stored copy (what its queue entry in the store
    /// names), if it has one; a scratch copy is not one (see `Slot::spool_id`).
    pub fn store_id(&self) -> Option<u64> {
        match self {
            Slot::Loaded(msg) => msg.store_id,
            Slot::Paged {
                store_id,
                spooled: false,
                ..
            } => Some(*store_id),
            Slot::Paged { spooled: true, .. } => None,
        }
    }

    /// The id of the copy a paged message's content is read from (its own or scratch).
    pub fn paged_id(&self) -> Option<u64> {
        match self {
            Slot::Paged { store_id, .. } => Some(*store_id),
            Slot::Loaded(_) => None,
        }
    }

    /// The id of the scratch copy of a message parked on disk while memory ran short.
    pub fn spool_id(&self) -> Option<u64> {
        match self {
            Slot::Paged {
                store_id,
                spooled: true,
                ..
            } => Some(*store_id),
            _ => None,
        }
    }

    /// Whether the content is only in the store.
    pub fn is_paged(&self) -> bool {
        matches!(self, Slot::Paged { .. })
    }
}

/// A message waiting in the queue (ready), or leaving it without being handed to a
/// consumer (`Effect::Forget`, `Effect::DeadLetter`): an `Entry` whose content may be in
/// the store only. Handed to consumers only once loaded (`Queued::into_entry`).
///
/// The expiry is a plain `u64` (`NEVER` for none) rather than an `Option`, so that it
/// takes 8 bytes; the ready lists keep it apart (see `ready::Waiting`).
#[derive(Debug, Clone, PartialEq)]
pub struct Queued {
    /// Its place.
    pub offset: Offset,
    /// Its content.
    pub slot: Slot,
    /// Wall-clock ms after which it is dropped; `Queued::NEVER` when it never is.
    expires: u64,
    /// Times it came back unsettled.
    pub delivery_count: u32,
    /// Delivered before (the redelivered flag).
    pub redelivered: bool,
    /// Priority level.
    pub priority: u8,
}

impl Queued {
    /// The `expires` of a message without a TTL.
    const NEVER: u64 = u64::MAX;

    /// A ready message at `offset`, not yet delivered.
    fn new(offset: Offset, slot: Slot, expires_at: Option<u64>, priority: u8) -> Queued {
        Queued {
            offset,
            slot,
            expires: expires_at.unwrap_or(Queued::NEVER),
            delivery_count: 0,
            redelivered: false,
            priority,
        }
    }

    /// Wall-clock ms after which it is dropped (message or queue TTL).
    pub fn expires_at(&self) -> Option<u64> {
        (self.expires != Queued::NEVER).then_some(self.expires)
    }

    /// The entry, when its content is loaded; itself back when it is not.
    pub fn into_entry(self) -> Result<Entry, Queued> {
        let expires_at = self.expires_at();
        match self.slot {
            Slot::Loaded(msg) => Ok(Entry {
                offset: self.offset,
                msg,
                redelivered: self.redelivered,
                delivery_count: self.delivery_count,
                expires_at,
                priority: self.priority,
            }),
            Slot::Paged { .. } => Err(self),
        }
    }
}

impl From<Entry> for Queued {
    fn from(e: Entry) -> Queued {
        Queued {
            offset: e.offset,
            slot: Slot::Loaded(e.msg),
            expires: e.expires_at.unwrap_or(Queued::NEVER),
            delivery_count: e.delivery_count,
            redelivered: e.redelivered,
            priority: e.priority,
        }
    }
}

/// Why a message is dead-lettered (the x-death `reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeathReason {
    /// basic.reject / basic.nack with requeue=false.
    Rejected,
    /// TTL ran out.
    Expired,
    /// Dropped by a length limit.
    MaxLen,
    /// Returned more often than x-delivery-limit.
    DeliveryLimit,
}

impl DeathReason {
    /// The reason as written in x-death.
    pub fn as_str(self) -> &'static str {
        match self {
            DeathReason::Rejected => "rejected",
            DeathReason::Expired => "expired",
            DeathReason::MaxLen => "maxlen",
            DeathReason::DeliveryLimit => "delivery_limit",
        }
    }
}

/// What the state machine asks its host to do.
#[derive(Debug, PartialEq)]
pub enum Effect {
    /// Send this entry to this consumer. A stored message handed to a consumer that
    /// acks is recorded as delivered (so that a crash brings it back redelivered).
    Deliver {
        /// Receiving consumer.
        consumer: ConsumerId,
        /// The entry (already moved to unacked unless the consumer is no-ack).
        entry: Entry,
    },
    /// The entry left the queue for this reason: dead-letter it (or drop it when the
    /// queue has no dead-letter exchange), and remove its stored copy. Its content may
    /// be in the store only (a head dropped by a length limit before it was loaded).
    DeadLetter {
        /// The entry.
        entry: Queued,
        /// Why.
        reason: DeathReason,
    },
    /// The entry left the queue for good (acked, purged, or enqueued into a deleted
    /// queue): remove its stored copy.
    Forget {
        /// The entry.
        entry: Queued,
    },
    /// The queue was deleted: remove every stored entry of it and its definition.
    ForgetAll,
}

/// Effects of one command.
pub type Effects = Vec<Effect>;

/// Outcome of an enqueue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Enqueued {
    /// In the queue at this offset.
    Accepted(Offset),
    /// Refused by a length limit with overflow reject-publish(-dlx).
    Rejected,
}

/// A consumer as the queue sees it: who, how many unacked it may hold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsumerSpec {
    /// Identity.
    pub id: ConsumerId,
    /// x-priority (higher first).
    pub priority: i32,
    /// Per-consumer prefetch (0 = unlimited).
    pub prefetch: u32,
    /// Auto-ack: delivered messages are settled at once.
    pub no_ack: bool,
}

#[derive(Debug, Clone, PartialEq)]
struct ConsumerSlot {
    spec: ConsumerSpec,
    unacked: u32,
}

impl ConsumerSlot {
    /// Whether its own prefetch lets it take one more.
    fn has_room(&self) -> bool {
        self.spec.prefetch == 0 || self.unacked < self.spec.prefetch
    }
}

/// Where and when a command is applied: its index in the queue's log and the time the
/// log gave it. The only clock the state machine knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct CommandMeta {
    /// Position of the command in the queue's log (1 for the first).
    pub index: u64,
    /// Wall-clock ms at which the command entered the log (TTLs compare with it).
    pub time_ms: u64,
}

/// Every change a queue's state can undergo.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Command {
    /// A publish: append at the tail (or refuse it, or drop the head to make room).
    Enqueue(#[serde(with = "codec")] Arc<Message>),
    /// A replicated queue's publish that its log committed: the leader admitted it
    /// against reject-publish limits before proposing it, and every member holds it, so
    /// it is appended whatever the limit says now (drop-head still makes room).
    EnqueueCommitted(#[serde(with = "codec")] Arc<Message>),
    /// Recovery: put back an entry read from the store, keeping its place, its
    /// redelivered flag and its delivery count.
    Restore {
        /// Its place.
        offset: Offset,
        /// The message.
        #[serde(with = "codec")]
        msg: Arc<Message>,
        /// Delivered before the restart.
        delivered: bool,
        /// Times it came back before the restart.
        delivery_count: u32,
    },
    /// basic.consume.
    AddConsumer(ConsumerSpec),
    /// basic.cancel, or the consumer's channel went away. Its unacked messages stay
    /// unacked: they belong to its channel, which settles or requeues them.
    RemoveConsumer(ConsumerId),
    /// Credit from outside the queue (channel-wide prefetch, socket backlog): each
    /// consumer named may take one more message now. The queue delivers one round:
    /// to the highest-priority consumers that are granted and within their own
    /// prefetch, round-robin, one message each. Unused grants come back in the reply.
    Credit {
        /// Consumers granted one message each.
        granted: Vec<ConsumerId>,
    },
    /// A policy changed the queue's settings: limits apply at once (a drop-head queue now
    /// over its limit drops from the head), TTLs to messages enqueued from now on.
    SetArgs(QueueArgs),
    /// Messages this queue dead-lettered and still holds until their targets take them
    /// (at-least-once dead-lettering): not ready, but they count towards the length
    /// limits, as in RabbitMQ's quorum queues.
    HoldDeadLetters {
        /// How many.
        messages: usize,
        /// Their body bytes.
        bytes: usize,
    },
    /// basic.ack.
    Settle(Vec<Offset>),
    /// basic.reject / basic.nack with requeue=false: the messages are dead-lettered.
    Reject(Vec<Offset>),
    /// Requeue (nack, recover, a closed channel): back to their place, redelivered;
    /// past x-delivery-limit they are dead-lettered instead.
    Requeue(Vec<Offset>),
    /// A delivery that never reached its client (its consumer or channel went away
    /// first) comes back: same place, flag unchanged.
    ReturnUndelivered(Entry),
    /// basic.get: takes the head; unless `no_ack` it becomes unacked (no consumer).
    Get {
        /// Settled at once.
        no_ack: bool,
    },
    /// Time passed: messages whose TTL ran out by `CommandMeta::time_ms` leave.
    Expire,
    /// queue.purge: every ready message goes.
    Purge,
    /// queue.delete: the queue is gone; later enqueues are dropped.
    Delete,
}

/// The answer to one command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Reply {
    /// Nothing to say.
    Ok,
    /// Outcome of `Enqueue`.
    Enqueued(Enqueued),
    /// `RemoveConsumer`: whether it was there.
    Removed(bool),
    /// `Credit`: messages delivered, and the grants left unused (the caller gives that
    /// credit back).
    Credited {
        /// Deliveries made.
        delivered: usize,
        /// Consumers granted and not served.
        unused: Vec<ConsumerId>,
    },
    /// `Settle`, `Reject`, `Requeue`: how many of the offsets were unacked here.
    Settled(usize),
    /// `Get`: the head and the count of ready messages left, or nothing.
    Got(Option<(Entry, u32)>),
    /// `Purge` and `Delete`: ready messages removed.
    Purged(usize),
    /// `Get`: the head's content is in the store only; nothing was taken (the host
    /// loads it and asks again).
    HeadNotLoaded,
}

/// Delivered, unsettled entries and their consumer (none for basic.get). Hashed with
/// fixed keys: the state holds no random seed, so replicas are alike bit for bit. The
/// offsets are the queue's own, not a peer's, so a fast hash without a secret is safe.
type Unacked = HashMap<Offset, (Entry, Option<ConsumerId>), foldhash::fast::FixedState>;

/// The state of one queue.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueState {
    args: QueueArgs,
    /// One FIFO per priority level, highest last.
    ready: Vec<Level>,
    ready_count: usize,
    ready_bytes: usize,
    /// Of the ready messages, those whose content is in memory: their body bytes, and
    /// how many are in the store only (`Slot::Paged`).
    loaded_bytes: usize,
    paged_count: usize,
    unacked: Unacked,
    consumers: Vec<ConsumerSlot>,
    next_consumer: usize,
    next_offset: Offset,
    deleted: bool,
    /// Its messages went to another incarnation of the queue ([`QueueState::surrender`]):
    /// a publish that still reaches this one is refused, never taken and lost.
    moved: bool,
    /// Dead letters held for their targets (`Command::HoldDeadLetters`): count, bytes.
    dead_letters_held: (usize, usize),
    /// Index of the last command applied (commands must come in log order).
    last_index: u64,
}

impl Default for QueueState {
    fn default() -> Self {
        QueueState::new(QueueArgs::default())
    }
}

impl QueueState {
    /// An empty queue with these settings.
    pub fn new(args: QueueArgs) -> QueueState {
        let levels = args.max_priority.map_or(1, |p| p as usize + 1);
        QueueState {
            args,
            ready: (0..levels).map(|_| Level::default()).collect(),
            ready_count: 0,
            ready_bytes: 0,
            loaded_bytes: 0,
            paged_count: 0,
            unacked: Unacked::default(),
            consumers: Vec::new(),
            next_consumer: 0,
            next_offset: 0,
            deleted: false,
            moved: false,
            dead_letters_held: (0, 0),
            last_index: 0,
        }
    }

    /// Applies one command: the only way the state changes.
    pub fn apply(&mut self, meta: &CommandMeta, cmd: Command) -> (Reply, Effects) {
        let mut out = Effects::new();
        let reply = self.apply_into(meta, cmd, &mut out);
        (reply, out)
    }

    /// `apply`, pushing the effects into a buffer the caller reuses (the hot path
    /// allocates no effect list per message).
    pub fn apply_into(&mut self, meta: &CommandMeta, cmd: Command, out: &mut Effects) -> Reply {
        self.last_index = meta.index;
        let now = meta.time_ms;
        match cmd {
            Command::Enqueue(msg) => {
                if self.moved {
                    // (Its stored copy goes; the publisher hears a nack.)
                    let entry = self.new_entry(msg).into();
                    out.push(Effect::Forget { entry });
                    return Reply::Enqueued(Enqueued::Rejected);
                }
                if self.deleted {
                    // Routed just before a delete: the delete's purge may already be in
                    // the store ahead of this message's entry, so take the entry out again.
                    let entry = self.new_entry(msg).into();
                    out.push(Effect::Forget { entry });
                    return Reply::Enqueued(Enqueued::Accepted(0));
                }
                Reply::Enqueued(self.enqueue(msg, out))
            }
            Command::EnqueueCommitted(msg) => {
                if self.deleted {
                    let entry = self.new_entry(msg).into();
                    out.push(Effect::Forget { entry });
                    return Reply::Enqueued(Enqueued::Accepted(0));
                }
                let entry = self.new_entry(msg);
                let offset = entry.offset;
                self.insert_ready(entry.into());
                self.enforce_limits(out);
                Reply::Enqueued(Enqueued::Accepted(offset))
            }
            Command::Restore {
                offset,
                msg,
                delivered,
                delivery_count,
            } => {
                self.restore(offset, msg, delivered, delivery_count);
                Reply::Ok
            }
            Command::AddConsumer(spec) => {
                self.add_consumer(spec);
                Reply::Ok
            }
            Command::RemoveConsumer(id) => Reply::Removed(self.remove_consumer(id)),
            Command::Credit { mut granted } => {
                let delivered = self.deliver_round(now, &mut granted, out);
                Reply::Credited {
                    delivered,
                    unused: granted,
                }
            }
            Command::Settle(offsets) => Reply::Settled(self.settle(&offsets, out)),
            Command::Reject(offsets) => Reply::Settled(self.reject(&offsets, out)),
            Command::Requeue(offsets) => Reply::Settled(self.requeue(&offsets, out)),
            Command::ReturnUndelivered(entry) => {
                self.return_undelivered(entry);
                Reply::Ok
            }
            Command::Get { no_ack } => match self.get(now, no_ack, out) {
                Ok(got) => Reply::Got(got.map(|entry| (entry, self.ready_count as u32))),
                Err(()) => Reply::HeadNotLoaded,
            },
            Command::Expire => {
                self.expire(now, out);
                Reply::Ok
            }
            Command::Purge => Reply::Purged(self.purge(out)),
            Command::HoldDeadLetters { messages, bytes } => {
                self.dead_letters_held = (messages, bytes);
                Reply::Ok
            }
            Command::SetArgs(args) => {
                // x-max-priority is fixed at declare (policies cannot set it).
                let max_priority = self.args.max_priority;
                self.args = QueueArgs {
                    max_priority,
                    ..args
                };
                if self.args.overflow == Overflow::DropHead {
                    self.enforce_limits(out);
                }
                Reply::Ok
            }
            Command::Delete => {
                let count = self.ready_count;
                self.deleted = true;
                self.consumers.clear();
                for level in self.ready.iter_mut() {
                    level.clear();
                }
                self.ready_count = 0;
                self.ready_bytes = 0;
                self.loaded_bytes = 0;
                self.paged_count = 0;
                out.push(Effect::ForgetAll);
                Reply::Purged(count)
            }
        }
    }

    /// Checks what must hold after every command: the counters match the ready lists,
    /// every offset is in one place only (ready or unacked, never twice), ready lists are
    /// in offset order, consumers hold no more than their unacked messages.
    #[cfg(test)]
    pub(super) fn check_invariants(&self) -> Result<(), String> {
        let mut seen = std::collections::HashSet::new();
        let mut bytes = 0;
        let mut count = 0;
        let (mut loaded, mut paged) = (0, 0);
        for level in &self.ready {
            for pair in level.iter().zip(level.iter().skip(1)) {
                if pair.0.offset >= pair.1.offset {
                    return Err(format!("ready out of order at {}", pair.1.offset));
                }
            }
            for e in level.iter() {
                count += 1;
                bytes += e.slot.size();
                match &e.slot {
                    Slot::Loaded(msg) => loaded += msg.size(),
                    Slot::Paged { .. } => paged += 1,
                }
                if e.offset >= self.next_offset {
                    return Err(format!("offset {} not yet given out", e.offset));
                }
                if !seen.insert(e.offset) {
                    return Err(format!("offset {} ready twice", e.offset));
                }
            }
        }
        if loaded != self.loaded_bytes || paged != self.paged_count {
            return Err(format!(
                "loaded counters {}/{} but lists hold {loaded}/{paged}",
                self.loaded_bytes, self.paged_count
            ));
        }
        if count != self.ready_count || bytes != self.ready_bytes {
            return Err(format!(
                "ready counters {}/{} but lists hold {count}/{bytes}",
                self.ready_count, self.ready_bytes
            ));
        }
        for offset in self.unacked.keys() {
            if !seen.insert(*offset) {
                return Err(format!("offset {offset} both ready and unacked"));
            }
        }
        for slot in &self.consumers {
            let held = self
                .unacked
                .values()
                .filter(|(_, c)| *c == Some(slot.spec.id))
                .count();
            if slot.unacked as usize != held {
                return Err(format!(
                    "consumer {} counts {} unacked, holds {held}",
                    slot.spec.id, slot.unacked
                ));
            }
            if slot.spec.prefetch > 0 && slot.unacked > slot.spec.prefetch {
                return Err(format!("consumer {} over its prefetch", slot.spec.id));
            }
        }
        if self.deleted && (self.ready_count > 0 || !self.consumers.is_empty()) {
            return Err("a deleted queue holds messages or consumers".into());
        }
        Ok(())
    }

    /// The same queue emptied of every message, its consumers kept (with nothing
    /// unacked): a replicated queue's host starts from this when its node takes the lead.
    pub fn without_messages(&self) -> QueueState {
        let mut fresh = QueueState::new(self.args.clone());
        fresh.consumers = self
            .consumers
            .iter()
            .map(|c| ConsumerSlot {
                spec: c.spec.clone(),
                unacked: 0,
            })
            .collect();
        fresh
    }

    /// Takes every message out, ready and unacked alike (those handed out before come
    /// flagged redelivered), in place order, for another incarnation of the queue to
    /// hold (a classic queue that a mirroring policy now replicates seeds its group
    /// with them). Its consumers go and it counts as deleted, without forgetting the
    /// messages' stored copies: the new holder takes them over.
    pub fn surrender(&mut self) -> Vec<Queued> {
        let mut taken: Vec<Queued> = self.ready.iter_mut().flat_map(|l| l.drain()).collect();
        taken.extend(self.unacked.drain().map(|(_, (entry, _))| {
            let mut q = Queued::from(entry);
            q.redelivered = true;
            q
        }));
        taken.sort_by_key(|q| q.offset);
        *self = QueueState {
            deleted: true,
            moved: true,
            ..QueueState::new(self.args.clone())
        };
        taken
    }

    /// Whether `Delete` was applied.
    pub fn is_deleted(&self) -> bool {
        self.deleted
    }

    /// Index of the last command applied.
    pub fn last_index(&self) -> u64 {
        self.last_index
    }

    /// The consumers that a `Credit` round could serve now, with their priority, in the
    /// order the round would serve them (highest priority first, round-robin within):
    /// the host asks their channels for credit in this order.
    /// Lazy, so that a host that has its grants stops looking (a queue may have
    /// hundreds of consumers).
    pub fn credit_candidates(&self) -> impl Iterator<Item = &ConsumerSpec> + '_ {
        let n = if self.args.single_active_consumer {
            self.consumers.len().min(1)
        } else {
            self.consumers.len()
        };
        let consumers = &self.consumers[..n];
        (0..n)
            .filter(move |&i| {
                i == 0 || consumers[i].spec.priority != consumers[i - 1].spec.priority
            })
            .flat_map(move |start| {
                let width = self.group_end(start).min(n) - start;
                (0..width).map(move |step| &consumers[start + (self.next_consumer + step) % width])
            })
            .filter(|slot| slot.has_room())
            .map(|slot| &slot.spec)
    }

    /// End of the priority group that starts at `start`.
    fn group_end(&self, start: usize) -> usize {
        let priority = self.consumers[start].spec.priority;
        self.consumers[start..]
            .iter()
            .position(|c| c.spec.priority != priority)
            .map_or(self.consumers.len(), |p| start + p)
    }

    /// The queue's settings.
    pub fn args(&self) -> &QueueArgs {
        &self.args
    }

    /// Messages ready for delivery.
    pub fn ready_count(&self) -> usize {
        self.ready_count
    }

    /// Messages delivered and not yet settled.
    pub fn unacked_count(&self) -> usize {
        self.unacked.len()
    }

    /// Body bytes of the ready messages.
    pub fn ready_bytes(&self) -> usize {
        self.ready_bytes
    }

    /// Number of consumers.
    pub fn consumer_count(&self) -> usize {
        self.consumers.len()
    }

    /// When a message published at `published_ms` expires in this queue: the smaller of
    /// the queue's TTL and the message's `expiration`.
    pub fn expiry_of(&self, msg: &Message) -> Option<u64> {
        self.expiry_from(msg.published_ms, msg.ttl_ms())
    }

    /// [`QueueState::expiry_of`] a message published at `published_ms` with its own
    /// TTL `own`.
    fn expiry_from(&self, published_ms: u64, own: Option<u64>) -> Option<u64> {
        let ttl = match (self.args.message_ttl, own) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        ttl.map(|t| published_ms.saturating_add(t))
    }

    /// Whether a new message of this size would be refused (reject-publish overflow).
    pub fn would_reject(&self, size: usize) -> bool {
        self.would_reject_beside(size, 0, 0)
    }

    /// [`QueueState::would_reject`] with `count` messages of `bytes` on their way in
    /// besides (a replicated queue's publishes proposed and not yet committed).
    pub fn would_reject_beside(&self, size: usize, count: usize, bytes: usize) -> bool {
        if self.args.overflow == Overflow::DropHead {
            return false;
        }
        let (held, held_bytes) = self.dead_letters_held;
        let full_len = self
            .args
            .max_length
            .is_some_and(|max| (self.ready_count + held + count) as u64 >= max);
        let full_bytes = self
            .args
            .max_length_bytes
            .is_some_and(|max| (self.ready_bytes + held_bytes + bytes + size) as u64 > max);
        full_len || full_bytes
    }

    /// Whether reject-publish limits apply (a replicated queue then admits publishes
    /// against them before proposing).
    pub fn rejects_when_full(&self) -> bool {
        self.args.overflow != Overflow::DropHead
            && (self.args.max_length.is_some() || self.args.max_length_bytes.is_some())
    }

    /// Appends a message at the tail (or refuses it, or drops the head to make room).
    fn enqueue(&mut self, msg: Arc<Message>, out: &mut Effects) -> Enqueued {
        if self.would_reject(msg.size()) {
            if self.args.overflow == Overflow::RejectPublishDlx {
                let entry = self.new_entry(msg).into();
                out.push(Effect::DeadLetter {
                    entry,
                    reason: DeathReason::MaxLen,
                });
            }
            return Enqueued::Rejected;
        }
        let entry = self.new_entry(msg);
        let offset = entry.offset;
        self.insert_ready(entry.into());
        self.enforce_limits(out);
        Enqueued::Accepted(offset)
    }

    fn new_entry(&mut self, msg: Arc<Message>) -> Entry {
        let offset = self.next_offset;
        self.next_offset += 1;
        let priority = match self.args.max_priority {
            Some(max) => msg.priority().min(max),
            None => 0,
        };
        let expires_at = self.expiry_of(&msg);
        Entry {
            offset,
            msg,
            redelivered: false,
            delivery_count: 0,
            expires_at,
            priority,
        }
    }

    /// Drops heads while over x-max-length / x-max-length-bytes (drop-head overflow).
    fn enforce_limits(&mut self, out: &mut Effects) {
        loop {
            let over_len = self
                .args
                .max_length
                .is_some_and(|max| self.ready_count as u64 > max);
            let over_bytes = self
                .args
                .max_length_bytes
                .is_some_and(|max| self.ready_bytes as u64 > max);
            if !(over_len || over_bytes) {
                return;
            }
            match self.pop_head() {
                Some(entry) => out.push(Effect::DeadLetter {
                    entry,
                    reason: DeathReason::MaxLen,
                }),
                None => return,
            }
        }
    }

    /// Puts back a recovered entry (restart): keeps its flag and count, recomputes expiry.
    fn restore(&mut self, offset: Offset, msg: Arc<Message>, delivered: bool, delivery_count: u32) {
        let next = self.next_offset;
        let mut entry = self.new_entry(msg);
        self.next_offset = next.max(offset + 1);
        entry.offset = offset;
        entry.redelivered = delivered;
        entry.delivery_count = delivery_count;
        self.insert_ready(entry.into());
    }

    /// Adds a consumer.
    fn add_consumer(&mut self, spec: ConsumerSpec) {
        self.consumers.push(ConsumerSlot { spec, unacked: 0 });
        if !self.args.single_active_consumer {
            // Keep priority groups contiguous, highest first; stable keeps arrival order.
            self.consumers
                .sort_by_key(|c| std::cmp::Reverse(c.spec.priority));
        }
    }

    /// Removes a consumer; its unacked messages stay unacked (they belong to its channel).
    fn remove_consumer(&mut self, id: ConsumerId) -> bool {
        let before = self.consumers.len();
        self.consumers.retain(|c| c.spec.id != id);
        self.consumers.len() != before
    }

    /// Removes expired messages from the heads. A head whose content is in the store
    /// only waits for it when the queue dead-letters (x-death needs the message): the
    /// host loads heads first.
    fn expire(&mut self, now_ms: u64, out: &mut Effects) {
        let needs_body = self.args.dead_letter_exchange.is_some();
        for l in 0..self.ready.len() {
            while let Some(head) = self.ready[l].front() {
                let due = self.ready[l].front_expiry().is_some_and(|t| t < now_ms);
                if !due || (needs_body && head.slot.is_paged()) {
                    break;
                }
                if let Some(entry) = self.ready[l].pop_front() {
                    self.count_out(&entry);
                    out.push(Effect::DeadLetter {
                        entry,
                        reason: DeathReason::Expired,
                    });
                }
            }
        }
    }

    /// Takes a message that leaves the ready lists out of the counters.
    fn count_out(&mut self, entry: &Queued) {
        self.ready_count -= 1;
        self.ready_bytes -= entry.slot.size();
        match &entry.slot {
            Slot::Loaded(msg) => self.loaded_bytes -= msg.size(),
            Slot::Paged { .. } => self.paged_count -= 1,
        }
    }

    /// The earliest expiry among the heads (for the caller's timer).
    pub fn next_expiry(&self) -> Option<u64> {
        self.ready.iter().filter_map(Level::front_expiry).min()
    }

    /// One delivery round (`Command::Credit`): in the highest-priority group that has a
    /// granted consumer within its own prefetch (only the first consumer with
    /// single-active-consumer), one message to each such consumer, round-robin from
    /// where the last round stopped; highest message priority first, FIFO within it;
    /// expired heads are dropped first. Served consumers leave `granted`.
    fn deliver_round(
        &mut self,
        now_ms: u64,
        granted: &mut Vec<ConsumerId>,
        out: &mut Effects,
    ) -> usize {
        self.expire(now_ms, out);
        let sac = self.args.single_active_consumer;
        let n = if sac {
            self.consumers.len().min(1)
        } else {
            self.consumers.len()
        };
        let eligible = |slot: &ConsumerSlot, granted: &[ConsumerId]| {
            slot.has_room() && granted.contains(&slot.spec.id)
        };
        let Some(first) = self.consumers[..n]
            .iter()
            .position(|slot| eligible(slot, granted))
        else {
            return 0;
        };
        let priority = self.consumers[first].spec.priority;
        let start = self.consumers[..first]
            .iter()
            .rposition(|c| c.spec.priority != priority)
            .map_or(0, |p| p + 1);
        let end = if sac { 1 } else { self.group_end(start) };
        let width = end - start;
        let mut delivered = 0;
        for step in 0..width {
            if self.ready_count == 0 {
                break;
            }
            let i = start + (self.next_consumer + step) % width;
            if !eligible(&self.consumers[i], granted) {
                continue;
            }
            if self.head().is_none_or(|h| h.slot.is_paged()) {
                // Its content is on its way from the store: the host delivers again then.
                break;
            }
            let Some(Ok(entry)) = self.pop_head().map(Queued::into_entry) else {
                break;
            };
            let slot = &mut self.consumers[i];
            let consumer = slot.spec.id;
            if !slot.spec.no_ack {
                slot.unacked += 1;
                self.unacked
                    .insert(entry.offset, (entry.clone(), Some(consumer)));
            }
            if let Some(g) = granted.iter().position(|id| *id == consumer) {
                granted.swap_remove(g);
            }
            if !sac {
                self.next_consumer = (i - start + 1) % width;
            }
            out.push(Effect::Deliver { consumer, entry });
            delivered += 1;
            self.expire(now_ms, out);
        }
        delivered
    }

    /// The next message to deliver: the oldest of the highest priority.
    fn head(&self) -> Option<&Waiting> {
        self.ready.iter().rev().find_map(|l| l.front())
    }

    fn pop_head(&mut self) -> Option<Queued> {
        let entry = self
            .ready
            .iter_mut()
            .rev()
            .find(|l| !l.is_empty())?
            .pop_front()?;
        self.count_out(&entry);
        Some(entry)
    }

    /// basic.get: takes the head; unless `no_ack`, it becomes unacked (no consumer).
    /// `Err` when the head's content is in the store only (nothing taken).
    fn get(&mut self, now_ms: u64, no_ack: bool, out: &mut Effects) -> Result<Option<Entry>, ()> {
        self.expire(now_ms, out);
        match self.head() {
            None => return Ok(None),
            Some(head) if head.slot.is_paged() => return Err(()),
            Some(_) => {}
        }
        let Some(Ok(entry)) = self.pop_head().map(Queued::into_entry) else {
            return Ok(None);
        };
        if !no_ack {
            self.unacked.insert(entry.offset, (entry.clone(), None));
        }
        // Messages already expired at the new head do not count in get-ok.
        self.expire(now_ms, out);
        Ok(Some(entry))
    }

    /// Settles delivered messages (ack): they leave for good.
    fn settle(&mut self, offsets: &[Offset], out: &mut Effects) -> usize {
        let mut settled = 0;
        for offset in offsets {
            if let Some((entry, consumer)) = self.unacked.remove(offset) {
                self.release_credit(consumer);
                out.push(Effect::Forget {
                    entry: entry.into(),
                });
                settled += 1;
            }
        }
        settled
    }

    /// basic.reject / nack with requeue=false: the messages are dead-lettered.
    fn reject(&mut self, offsets: &[Offset], out: &mut Effects) -> usize {
        let mut settled = 0;
        for offset in offsets {
            if let Some((entry, consumer)) = self.unacked.remove(offset) {
                self.release_credit(consumer);
                out.push(Effect::DeadLetter {
                    entry: entry.into(),
                    reason: DeathReason::Rejected,
                });
                settled += 1;
            }
        }
        settled
    }

    /// Returns delivered messages to their original place, marked redelivered; those
    /// past x-delivery-limit are dead-lettered instead.
    fn requeue(&mut self, offsets: &[Offset], out: &mut Effects) -> usize {
        let mut settled = 0;
        for offset in offsets {
            if let Some((mut entry, consumer)) = self.unacked.remove(offset) {
                settled += 1;
                self.release_credit(consumer);
                if self.deleted {
                    // Nothing goes back into a deleted queue.
                    out.push(Effect::Forget {
                        entry: entry.into(),
                    });
                    continue;
                }
                entry.redelivered = true;
                entry.delivery_count += 1;
                if self
                    .args
                    .delivery_limit
                    .is_some_and(|limit| entry.delivery_count as u64 > limit)
                {
                    out.push(Effect::DeadLetter {
                        entry: entry.into(),
                        reason: DeathReason::DeliveryLimit,
                    });
                } else {
                    self.insert_ready(entry.into());
                }
            }
        }
        // As RabbitMQ's requeue: a drop-head queue pushed over its limit by returning
        // messages drops from the head again (reject-publish queues keep them).
        if self.args.overflow == Overflow::DropHead {
            self.enforce_limits(out);
        }
        settled
    }

    /// Puts back a message that was handed out but never reached the client (its
    /// consumer or channel went away first): same place, flag unchanged. A deleted
    /// queue takes nothing back.
    fn return_undelivered(&mut self, entry: Entry) {
        if let Some((_, consumer)) = self.unacked.remove(&entry.offset) {
            self.release_credit(consumer);
        }
        if !self.deleted {
            self.insert_ready(entry.into());
        }
    }

    /// Drops every ready message (queue.purge), oldest first; returns how many.
    fn purge(&mut self, out: &mut Effects) -> usize {
        self.ready_count = 0;
        self.ready_bytes = 0;
        self.loaded_bytes = 0;
        self.paged_count = 0;
        let mut all: Vec<Queued> = self.ready.iter_mut().flat_map(|l| l.drain()).collect();
        all.sort_by_key(|e| e.offset);
        let count = all.len();
        out.extend(all.into_iter().map(|entry| Effect::Forget { entry }));
        count
    }

    /// Gives back the memory of ready lists that a drain or purge left mostly empty
    /// (the host calls it from its timer; it changes nothing a command can see).
    pub fn trim_memory(&mut self) {
        for level in &mut self.ready {
            level.shrink_if_sparse();
        }
    }

    /// Body bytes of the ready messages whose content is in memory.
    pub fn loaded_bytes(&self) -> usize {
        self.loaded_bytes
    }

    /// Ready messages whose content is in the store only.
    pub fn paged_count(&self) -> usize {
        self.paged_count
    }

    /// Whether the next message to deliver has its content in the store only.
    pub fn head_is_paged(&self) -> bool {
        self.head().is_some_and(|h| h.slot.is_paged())
    }

    /// The ready message at `offset`, wherever its priority put it.
    fn find_ready_mut(&mut self, offset: Offset) -> Option<&mut Waiting> {
        self.ready
            .iter_mut()
            .find_map(|level| level.get_mut(offset))
    }

    /// Host paging (not a command: only a classic queue's host pages, and what is in
    /// memory is no part of the queue's replicated state): the ready message at `offset`
    /// keeps only its stored copy's id and size. False (nothing changes) when it is not
    /// ready, has no stored copy, or is already paged.
    pub fn page_out(&mut self, offset: Offset) -> bool {
        let Some(entry) = self.find_ready_mut(offset) else {
            return false;
        };
        let Slot::Loaded(msg) = &entry.slot else {
            return false;
        };
        let Some(store_id) = msg.store_id else {
            return false;
        };
        let size = msg.size();
        entry.slot = Slot::Paged {
            store_id,
            size: size as u32,
            spooled: false,
        };
        self.loaded_bytes -= size;
        self.paged_count += 1;
        true
    }

    /// Host paging: the ready message at `offset` keeps only the scratch copy `spool_id`
    /// that its host is writing; its message, to write, when it was loaded. None
    /// (nothing changes) when it is not ready or not loaded.
    pub fn spool_out(&mut self, offset: Offset, spool_id: u64) -> Option<Arc<Message>> {
        let entry = self.find_ready_mut(offset)?;
        let Slot::Loaded(msg) = &entry.slot else {
            return None;
        };
        let msg = msg.clone();
        let size = msg.size();
        entry.slot = Slot::Paged {
            store_id: spool_id,
            size: size as u32,
            spooled: true,
        };
        self.loaded_bytes -= size;
        self.paged_count += 1;
        Some(msg)
    }

    /// Host paging: the loaded ready messages that come last in delivery order (lowest
    /// priority first, newest first), until `bytes` body bytes (at most `max`), with
    /// whether each is persistent with a stored copy's id.
    pub fn loaded_tail(&self, bytes: usize, max: usize) -> Vec<(Offset, bool)> {
        let mut out = Vec::new();
        let mut sum = 0usize;
        for level in &self.ready {
            for e in level.iter().rev() {
                if sum >= bytes || out.len() >= max {
                    return out;
                }
                if let Slot::Loaded(msg) = &e.slot {
                    out.push((e.offset, msg.is_persistent() && msg.store_id.is_some()));
                    sum += msg.size();
                }
            }
        }
        out
    }

    /// Host paging: a recovered entry whose body stayed in the store under `store_id`;
    /// `head` gives its priority and TTL, `size` is its body's length. Keeps its place,
    /// flag and count, as `Command::Restore`.
    pub fn restore_paged(
        &mut self,
        offset: Offset,
        store_id: u64,
        head: PagedHead,
        size: usize,
        delivered: bool,
        delivery_count: u32,
    ) {
        let priority = match self.args.max_priority {
            Some(max) => head.priority.min(max),
            None => 0,
        };
        self.next_offset = self.next_offset.max(offset + 1);
        let slot = Slot::Paged {
            store_id,
            size: size as u32,
            spooled: false,
        };
        let expires = self.expiry_from(head.published_ms, head.ttl_ms);
        let mut entry = Queued::new(offset, slot, expires, priority);
        entry.redelivered = delivered;
        entry.delivery_count = delivery_count;
        self.insert_ready(entry);
    }

    /// Host paging: the paged messages that come next in delivery order (highest
    /// priority first, oldest first), `(offset, stored copy's id, spooled)`, until
    /// `budget` body bytes (at least one message, at most `max`).
    pub fn paged_ahead(&self, budget: usize, max: usize) -> Vec<(Offset, u64, bool)> {
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for level in self.ready.iter().rev() {
            for e in level.iter() {
                if let Slot::Paged {
                    store_id,
                    size,
                    spooled,
                } = e.slot
                {
                    if !out.is_empty() && (bytes >= budget || out.len() >= max) {
                        return out;
                    }
                    out.push((e.offset, store_id, spooled));
                    bytes += size as usize;
                }
            }
        }
        out
    }

    /// Host paging: the content of the paged message at `offset`, read from its stored
    /// copy `copy_id`, is back. False when it is no longer ready there (it left
    /// meanwhile) or is loaded already.
    pub fn page_in(&mut self, offset: Offset, copy_id: u64, msg: Arc<Message>) -> bool {
        let Some(entry) = self.find_ready_mut(offset) else {
            return false;
        };
        match entry.slot {
            Slot::Paged { store_id, .. } if store_id == copy_id => {}
            _ => return false,
        }
        let size = entry.slot.size();
        entry.slot = Slot::Loaded(msg);
        // The length counted while paged was the stored body's; they are the same bytes.
        self.loaded_bytes += size;
        self.paged_count -= 1;
        true
    }

    /// Host paging: the paged message at `offset` whose content the store no longer has
    /// leaves the ready list (it cannot be delivered; the host reports it).
    pub fn drop_unreadable(&mut self, offset: Offset) -> Option<Queued> {
        let entry = self
            .ready
            .iter_mut()
            .find_map(|level| level.remove_if(offset, |e| e.slot.is_paged()))?;
        self.count_out(&entry);
        Some(entry)
    }

    fn release_credit(&mut self, consumer: Option<ConsumerId>) {
        if let Some(id) = consumer
            && let Some(slot) = self.consumers.iter_mut().find(|c| c.spec.id == id)
        {
            slot.unacked = slot.unacked.saturating_sub(1);
        }
    }

    fn insert_ready(&mut self, entry: Queued) {
        self.ready_count += 1;
        self.ready_bytes += entry.slot.size();
        match &entry.slot {
            Slot::Loaded(msg) => self.loaded_bytes += msg.size(),
            Slot::Paged { .. } => self.paged_count += 1,
        }
        let top = self.ready.len() - 1;
        self.ready[(entry.priority as usize).min(top)].insert(entry);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_queued_message_costs_forty_bytes() {
        // One per message of a backlog, most of them paged (see `paging`).
        assert!(std::mem::size_of::<Queued>() <= 40);
    }
    use bytes::Bytes;

    fn msg(body: &'static str) -> Arc<Message> {
        Arc::new(Message::for_tests(Bytes::from_static(body.as_bytes()), 0))
    }

    fn consumer(id: ConsumerId, priority: i32, prefetch: u32) -> ConsumerSpec {
        ConsumerSpec {
            id,
            priority,
            prefetch,
            no_ack: false,
        }
    }

    /// Applies a command at time `now`, appending its effects to `out`.
    fn run(q: &mut QueueState, now: u64, cmd: Command, out: &mut Effects) -> Reply {
        let meta = CommandMeta {
            index: q.last_index() + 1,
            time_ms: now,
        };
        q.apply_into(&meta, cmd, out)
    }

    /// Delivery rounds with every channel granting credit, until nothing moves.
    fn deliver_all(q: &mut QueueState, now: u64, out: &mut Effects) {
        loop {
            let granted = q.credit_candidates().map(|c| c.id).collect();
            match run(q, now, Command::Credit { granted }, out) {
                Reply::Credited { delivered, .. } if delivered > 0 => {}
                _ => return,
            }
        }
    }

    fn delivered(out: &Effects) -> Vec<(ConsumerId, Offset)> {
        out.iter()
            .filter_map(|e| match e {
                Effect::Deliver { consumer, entry } => Some((*consumer, entry.offset)),
                _ => None,
            })
            .collect()
    }

    fn dead(out: &Effects) -> Vec<(Offset, DeathReason)> {
        out.iter()
            .filter_map(|e| match e {
                Effect::DeadLetter { entry, reason } => Some((entry.offset, *reason)),
                _ => None,
            })
            .collect()
    }

    fn get(q: &mut QueueState, now: u64, no_ack: bool, out: &mut Effects) -> Option<Entry> {
        match run(q, now, Command::Get { no_ack }, out) {
            Reply::Got(got) => got.map(|(entry, _)| entry),
            other => panic!("get answered {other:?}"),
        }
    }

    #[test]
    fn a_surrendered_queue_gives_up_every_message_in_place_order_and_refuses_publishes() {
        let mut q = QueueState::default();
        let mut out = Vec::new();
        for _ in 0..4 {
            run(&mut q, 0, Command::Enqueue(msg("m")), &mut out);
        }
        run(&mut q, 0, Command::AddConsumer(consumer(1, 0, 2)), &mut out);
        deliver_all(&mut q, 0, &mut out);
        assert_eq!(delivered(&out), vec![(1, 0), (1, 1)]);
        let taken = q.surrender();
        let places: Vec<(Offset, bool)> = taken.iter().map(|t| (t.offset, t.redelivered)).collect();
        assert_eq!(places, vec![(0, true), (1, true), (2, false), (3, false)]);
        assert_eq!(
            (q.ready_count(), q.unacked_count(), q.consumer_count()),
            (0, 0, 0)
        );
        out.clear();
        let late = run(&mut q, 0, Command::Enqueue(msg("late")), &mut out);
        assert_eq!(late, Reply::Enqueued(Enqueued::Rejected));
        assert!(
            matches!(out.as_slice(), [Effect::Forget { .. }]),
            "its stored copy goes: {out:?}"
        );
        // An ack of a message handed out before changes nothing.
        assert_eq!(
            run(&mut q, 0, Command::Settle(vec![0]), &mut out),
            Reply::Settled(0)
        );
    }

    #[test]
    fn round_robin_with_prefetch_and_priority() {
        let mut q = QueueState::default();
        let mut out = Vec::new();
        for _ in 0..5 {
            run(&mut q, 0, Command::Enqueue(msg("m")), &mut out);
        }
        for c in [consumer(1, 0, 0), consumer(2, 0, 0), consumer(3, 5, 2)] {
            run(&mut q, 0, Command::AddConsumer(c), &mut out);
        }
        deliver_all(&mut q, 0, &mut out);
        assert_eq!(
            delivered(&out),
            vec![(3, 0), (3, 1), (1, 2), (2, 3), (1, 4)]
        );
    }

    #[test]
    fn a_round_serves_only_granted_consumers_and_returns_unused_grants() {
        let mut q = QueueState::default();
        let mut out = Vec::new();
        run(&mut q, 0, Command::Enqueue(msg("m")), &mut out);
        for c in [consumer(1, 0, 0), consumer(2, 0, 0), consumer(3, 0, 0)] {
            run(&mut q, 0, Command::AddConsumer(c), &mut out);
        }
        let granted = vec![2, 3];
        let reply = run(&mut q, 0, Command::Credit { granted }, &mut out);
        assert_eq!(
            reply,
            Reply::Credited {
                delivered: 1,
                unused: vec![3]
            }
        );
        assert_eq!(delivered(&out), vec![(2, 0)]);
    }

    #[test]
    fn requeue_goes_back_to_original_place_marked_redelivered() {
        let mut q = QueueState::default();
        let mut out = Vec::new();
        for _ in 0..3 {
            run(&mut q, 0, Command::Enqueue(msg("m")), &mut out);
        }
        run(&mut q, 0, Command::AddConsumer(consumer(1, 0, 1)), &mut out);
        deliver_all(&mut q, 0, &mut out);
        assert_eq!(delivered(&out), vec![(1, 0)]);
        run(&mut q, 0, Command::Requeue(vec![0]), &mut out);
        assert_eq!(
            run(&mut q, 0, Command::RemoveConsumer(1), &mut out),
            Reply::Removed(true)
        );
        let head = get(&mut q, 0, true, &mut out).unwrap();
        assert_eq!((head.offset, head.redelivered), (0, true));
        assert_eq!(q.ready_count(), 2);
    }

    #[test]
    fn max_length_drops_head_and_reject_publish_refuses() {
        let mut q = QueueState::new(QueueArgs {
            max_length: Some(2),
            ..Default::default()
        });
        let mut out = Vec::new();
        for _ in 0..3 {
            run(&mut q, 0, Command::Enqueue(msg("m")), &mut out);
        }
        assert_eq!(dead(&out), vec![(0, DeathReason::MaxLen)]);
        let mut q = QueueState::new(QueueArgs {
            max_length: Some(1),
            overflow: Overflow::RejectPublish,
            ..Default::default()
        });
        assert!(matches!(
            run(&mut q, 0, Command::Enqueue(msg("a")), &mut out),
            Reply::Enqueued(Enqueued::Accepted(_))
        ));
        assert_eq!(
            run(&mut q, 0, Command::Enqueue(msg("b")), &mut out),
            Reply::Enqueued(Enqueued::Rejected)
        );
    }

    #[test]
    fn dead_letters_held_for_their_targets_count_towards_the_limits() {
        let mut q = QueueState::new(QueueArgs {
            max_length: Some(3),
            max_length_bytes: Some(100),
            overflow: Overflow::RejectPublish,
            ..Default::default()
        });
        let mut out = Vec::new();
        run(&mut q, 0, Command::Enqueue(msg("a")), &mut out);
        let hold = |messages, bytes| Command::HoldDeadLetters { messages, bytes };
        run(&mut q, 0, hold(2, 2), &mut out);
        assert_eq!(q.ready_count(), 1, "held dead letters are not ready");
        assert_eq!(
            run(&mut q, 0, Command::Enqueue(msg("b")), &mut out),
            Reply::Enqueued(Enqueued::Rejected),
            "1 ready + 2 held reach x-max-length 3"
        );
        run(&mut q, 0, hold(1, 99), &mut out);
        assert_eq!(
            run(&mut q, 0, Command::Enqueue(msg("b")), &mut out),
            Reply::Enqueued(Enqueued::Rejected),
            "their bytes count towards x-max-length-bytes"
        );
        run(&mut q, 0, hold(0, 0), &mut out);
        assert!(matches!(
            run(&mut q, 0, Command::Enqueue(msg("b")), &mut out),
            Reply::Enqueued(Enqueued::Accepted(_))
        ));
    }

    #[test]
    fn ttl_expires_heads_and_delivery_limit_dead_letters() {
        let mut q = QueueState::new(QueueArgs {
            message_ttl: Some(10),
            delivery_limit: Some(1),
            ..Default::default()
        });
        let mut out = Vec::new();
        run(&mut q, 0, Command::Enqueue(msg("a")), &mut out);
        run(&mut q, 10, Command::Expire, &mut out);
        assert!(dead(&out).is_empty(), "expires only after its TTL");
        run(&mut q, 12, Command::Expire, &mut out);
        assert_eq!(dead(&out), vec![(0, DeathReason::Expired)]);
        out.clear();
        run(&mut q, 0, Command::Enqueue(msg("b")), &mut out);
        run(&mut q, 0, Command::AddConsumer(consumer(1, 0, 0)), &mut out);
        for _ in 0..2 {
            deliver_all(&mut q, 5, &mut out);
            run(&mut q, 5, Command::Requeue(vec![1]), &mut out);
        }
        assert_eq!(dead(&out), vec![(1, DeathReason::DeliveryLimit)]);
    }

    #[test]
    fn priorities_deliver_highest_first_fifo_within() {
        let mut q = QueueState::new(QueueArgs {
            max_priority: Some(5),
            ..Default::default()
        });
        let mut out = Vec::new();
        for p in [1u8, 5, 1, 9] {
            let mut m = Message::for_tests(Bytes::from_static(b"x"), 0);
            m.properties = m.properties.with_priority(p);
            run(&mut q, 0, Command::Enqueue(Arc::new(m)), &mut out);
        }
        let order: Vec<Offset> =
            std::iter::from_fn(|| get(&mut q, 0, true, &mut out).map(|e| e.offset)).collect();
        assert_eq!(order, vec![1, 3, 0, 2]);
    }

    #[test]
    fn a_requeue_into_a_deleted_queue_forgets_the_messages() {
        let mut q = QueueState::default();
        let mut out = Vec::new();
        run(&mut q, 0, Command::Enqueue(msg("a")), &mut out);
        run(&mut q, 0, Command::AddConsumer(consumer(1, 0, 0)), &mut out);
        deliver_all(&mut q, 0, &mut out);
        run(&mut q, 0, Command::Delete, &mut out);
        out.clear();
        assert_eq!(
            run(&mut q, 0, Command::Requeue(vec![0]), &mut out),
            Reply::Settled(1)
        );
        assert!(matches!(out.as_slice(), [Effect::Forget { entry }] if entry.offset == 0));
        assert_eq!((q.ready_count(), q.unacked_count()), (0, 0));
    }

    #[test]
    fn restoring_keeps_offsets_dense() {
        let mut q = QueueState::default();
        let mut out = Vec::new();
        let cmd = Command::Restore {
            offset: 3,
            msg: msg("a"),
            delivered: true,
            delivery_count: 1,
        };
        run(&mut q, 0, cmd, &mut out);
        assert_eq!(
            run(&mut q, 0, Command::Enqueue(msg("b")), &mut out),
            Reply::Enqueued(Enqueued::Accepted(4))
        );
    }

    #[test]
    fn a_deleted_queue_forgets_late_enqueues_and_returns() {
        let mut q = QueueState::default();
        let mut out = Vec::new();
        run(&mut q, 0, Command::Enqueue(msg("a")), &mut out);
        assert_eq!(run(&mut q, 0, Command::Delete, &mut out), Reply::Purged(1));
        out.clear();
        run(&mut q, 0, Command::Enqueue(msg("b")), &mut out);
        assert!(matches!(out.as_slice(), [Effect::Forget { .. }]));
        assert_eq!(q.ready_count(), 0);
    }
}
