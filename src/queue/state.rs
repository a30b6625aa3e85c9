//! The queue as a pure state machine, in the shape of RabbitMQ's `rabbit_fifo`: every
//! change is a method call on `QueueState` that mutates it and pushes the resulting
//! side effects (deliveries, dead letters) into an `Effects` list for the caller to carry
//! out. It never touches sockets, tasks, clocks or the store (time is an input), which is
//! what will let the same code run under a Raft log for replicated queues.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use super::args::{Overflow, QueueArgs};
use super::message::Message;

/// Position of a message in its queue: increases with every enqueue, so that a requeued
/// message goes back to its original place.
pub type Offset = u64;

/// Identity of a consumer, unique in the node.
pub type ConsumerId = u64;

/// A message in the queue.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Its place.
    pub offset: Offset,
    /// The message.
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

/// Why a message is dead-lettered (the x-death `reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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

/// What the state machine asks the caller to do.
#[derive(Debug)]
pub enum Effect {
    /// Send this entry to this consumer.
    Deliver {
        /// Receiving consumer.
        consumer: ConsumerId,
        /// The entry (already moved to unacked unless the consumer is no-ack).
        entry: Entry,
    },
    /// The entry left the queue for this reason: dead-letter it (or drop it when the
    /// queue has no dead-letter exchange).
    DeadLetter {
        /// The entry.
        entry: Entry,
        /// Why.
        reason: DeathReason,
    },
}

/// Effects of one command.
pub type Effects = Vec<Effect>;

/// Outcome of an enqueue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enqueued {
    /// In the queue at this offset.
    Accepted(Offset),
    /// Refused by a length limit with overflow reject-publish(-dlx).
    Rejected,
}

/// A consumer as the queue sees it: who, how many unacked it may hold.
#[derive(Debug, Clone)]
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

#[derive(Debug)]
struct ConsumerSlot {
    spec: ConsumerSpec,
    unacked: u32,
}

/// External limits checked at delivery time (channel-wide prefetch, socket backlog):
/// the caller answers whether the consumer may take one more message now.
pub trait Credit {
    /// May `consumer` be given one more message?
    fn has_credit(&mut self, consumer: ConsumerId) -> bool;
}

/// The state of one queue.
#[derive(Debug)]
pub struct QueueState {
    args: QueueArgs,
    /// One FIFO per priority level, highest last.
    ready: Vec<VecDeque<Entry>>,
    ready_count: usize,
    ready_bytes: usize,
    unacked: HashMap<Offset, (Entry, Option<ConsumerId>)>,
    consumers: Vec<ConsumerSlot>,
    next_consumer: usize,
    next_offset: Offset,
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
            ready: (0..levels).map(|_| VecDeque::new()).collect(),
            ready_count: 0,
            ready_bytes: 0,
            unacked: HashMap::new(),
            consumers: Vec::new(),
            next_consumer: 0,
            next_offset: 0,
        }
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
        let own = msg.ttl_ms();
        let ttl = match (self.args.message_ttl, own) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        ttl.map(|t| msg.published_ms.saturating_add(t))
    }

    /// Whether a new message of this size would be refused (reject-publish overflow).
    pub fn would_reject(&self, size: usize) -> bool {
        if self.args.overflow == Overflow::DropHead {
            return false;
        }
        let full_len = self
            .args
            .max_length
            .is_some_and(|max| self.ready_count as u64 >= max);
        let full_bytes = self
            .args
            .max_length_bytes
            .is_some_and(|max| (self.ready_bytes + size) as u64 > max);
        full_len || full_bytes
    }

    /// Appends a message at the tail (or refuses it, or drops the head to make room).
    pub fn enqueue(&mut self, msg: Arc<Message>, out: &mut Effects) -> Enqueued {
        if self.would_reject(msg.size()) {
            if self.args.overflow == Overflow::RejectPublishDlx {
                let entry = self.new_entry(msg);
                out.push(Effect::DeadLetter {
                    entry,
                    reason: DeathReason::MaxLen,
                });
            }
            return Enqueued::Rejected;
        }
        let entry = self.new_entry(msg);
        let offset = entry.offset;
        self.insert_ready(entry);
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
    pub fn restore(
        &mut self,
        offset: Offset,
        msg: Arc<Message>,
        delivered: bool,
        delivery_count: u32,
    ) {
        self.next_offset = self.next_offset.max(offset + 1);
        let mut entry = self.new_entry(msg);
        self.next_offset = self.next_offset.max(offset + 1);
        entry.offset = offset;
        entry.redelivered = delivered;
        entry.delivery_count = delivery_count;
        self.insert_ready(entry);
    }

    /// Adds a consumer.
    pub fn add_consumer(&mut self, spec: ConsumerSpec) {
        self.consumers.push(ConsumerSlot { spec, unacked: 0 });
        if !self.args.single_active_consumer {
            // Keep priority groups contiguous, highest first; stable keeps arrival order.
            self.consumers
                .sort_by_key(|c| std::cmp::Reverse(c.spec.priority));
        }
    }

    /// Removes a consumer; its unacked messages stay unacked (they belong to its channel).
    pub fn remove_consumer(&mut self, id: ConsumerId) -> bool {
        let before = self.consumers.len();
        self.consumers.retain(|c| c.spec.id != id);
        self.consumers.len() != before
    }

    /// Removes expired messages from the heads.
    pub fn expire(&mut self, now_ms: u64, out: &mut Effects) {
        for level in self.ready.iter_mut() {
            while level
                .front()
                .is_some_and(|e| e.expires_at.is_some_and(|t| t < now_ms))
            {
                if let Some(entry) = level.pop_front() {
                    self.ready_count -= 1;
                    self.ready_bytes -= entry.msg.size();
                    out.push(Effect::DeadLetter {
                        entry,
                        reason: DeathReason::Expired,
                    });
                }
            }
        }
    }

    /// The earliest expiry among the heads (for the caller's timer).
    pub fn next_expiry(&self) -> Option<u64> {
        self.ready
            .iter()
            .filter_map(|l| l.front().and_then(|e| e.expires_at))
            .min()
    }

    /// Hands ready messages to consumers with credit: round-robin within the highest
    /// priority that can take one (only the first consumer with single-active-consumer),
    /// highest message priority first, FIFO within it; expired heads are dropped first.
    pub fn deliver(&mut self, now_ms: u64, credit: &mut dyn Credit, out: &mut Effects) {
        self.expire(now_ms, out);
        if self.consumers.is_empty() {
            return;
        }
        while self.ready_count > 0 {
            let Some(index) = self.pick_consumer(credit) else {
                break;
            };
            let Some(entry) = self.pop_head() else { break };
            let slot = &mut self.consumers[index];
            let consumer = slot.spec.id;
            if !slot.spec.no_ack {
                slot.unacked += 1;
                self.unacked
                    .insert(entry.offset, (entry.clone(), Some(consumer)));
            }
            out.push(Effect::Deliver { consumer, entry });
            self.expire(now_ms, out);
        }
    }

    fn pop_head(&mut self) -> Option<Entry> {
        let entry = self
            .ready
            .iter_mut()
            .rev()
            .find(|l| !l.is_empty())?
            .pop_front()?;
        self.ready_count -= 1;
        self.ready_bytes -= entry.msg.size();
        Some(entry)
    }

    fn pick_consumer(&mut self, credit: &mut dyn Credit) -> Option<usize> {
        let n = self.consumers.len();
        if self.args.single_active_consumer {
            let slot = self.consumers.first()?;
            let own = slot.spec.prefetch == 0 || slot.unacked < slot.spec.prefetch;
            return (own && credit.has_credit(slot.spec.id)).then_some(0);
        }
        let mut start = 0;
        while start < n {
            let priority = self.consumers[start].spec.priority;
            let end = self.consumers[start..]
                .iter()
                .position(|c| c.spec.priority != priority)
                .map_or(n, |p| start + p);
            let width = end - start;
            for step in 0..width {
                let i = start + (self.next_consumer + step) % width;
                let slot = &self.consumers[i];
                let own = slot.spec.prefetch == 0 || slot.unacked < slot.spec.prefetch;
                if own && credit.has_credit(slot.spec.id) {
                    self.next_consumer = (i - start + 1) % width;
                    return Some(i);
                }
            }
            start = end;
        }
        None
    }

    /// basic.get: takes the head; unless `no_ack`, it becomes unacked (no consumer).
    pub fn get(&mut self, now_ms: u64, no_ack: bool, out: &mut Effects) -> Option<Entry> {
        self.expire(now_ms, out);
        let entry = self.pop_head()?;
        if !no_ack {
            self.unacked.insert(entry.offset, (entry.clone(), None));
        }
        // Messages already expired at the new head do not count in get-ok.
        self.expire(now_ms, out);
        Some(entry)
    }

    /// Settles delivered messages (ack). Returns the entries that were removed.
    pub fn settle(&mut self, offsets: &[Offset]) -> Vec<Entry> {
        let mut removed = Vec::with_capacity(offsets.len());
        for offset in offsets {
            if let Some((entry, consumer)) = self.unacked.remove(offset) {
                self.release_credit(consumer);
                removed.push(entry);
            }
        }
        removed
    }

    /// basic.reject / nack with requeue=false: the messages are dead-lettered.
    pub fn reject(&mut self, offsets: &[Offset], out: &mut Effects) {
        for entry in self.settle(offsets) {
            out.push(Effect::DeadLetter {
                entry,
                reason: DeathReason::Rejected,
            });
        }
    }

    /// Returns delivered messages to their original place, marked redelivered; those
    /// past x-delivery-limit are dead-lettered instead.
    pub fn requeue(&mut self, offsets: &[Offset], out: &mut Effects) {
        for offset in offsets {
            if let Some((mut entry, consumer)) = self.unacked.remove(offset) {
                self.release_credit(consumer);
                entry.redelivered = true;
                entry.delivery_count += 1;
                if self
                    .args
                    .delivery_limit
                    .is_some_and(|limit| entry.delivery_count as u64 > limit)
                {
                    out.push(Effect::DeadLetter {
                        entry,
                        reason: DeathReason::DeliveryLimit,
                    });
                } else {
                    self.insert_ready(entry);
                }
            }
        }
        // As RabbitMQ's requeue: a drop-head queue pushed over its limit by returning
        // messages drops from the head again (reject-publish queues keep them).
        if self.args.overflow == Overflow::DropHead {
            self.enforce_limits(out);
        }
    }

    /// Puts back a message that was handed out but never reached the client (its
    /// consumer or channel went away first): same place, flag unchanged.
    pub fn return_undelivered(&mut self, entry: Entry) {
        if let Some((_, consumer)) = self.unacked.remove(&entry.offset) {
            self.release_credit(consumer);
        }
        self.insert_ready(entry);
    }

    /// Drops every ready message (queue.purge); returns them.
    pub fn purge(&mut self) -> Vec<Entry> {
        self.ready_count = 0;
        self.ready_bytes = 0;
        let mut all: Vec<Entry> = self.ready.iter_mut().flat_map(|l| l.drain(..)).collect();
        all.sort_by_key(|e| e.offset);
        all
    }

    fn release_credit(&mut self, consumer: Option<ConsumerId>) {
        if let Some(id) = consumer
            && let Some(slot) = self.consumers.iter_mut().find(|c| c.spec.id == id)
        {
            slot.unacked = slot.unacked.saturating_sub(1);
        }
    }

    fn insert_ready(&mut self, entry: Entry) {
        self.ready_count += 1;
        self.ready_bytes += entry.msg.size();
        let top = self.ready.len() - 1;
        let level = &mut self.ready[(entry.priority as usize).min(top)];
        // New messages go to the tail; requeued ones usually near the head.
        if level.back().is_none_or(|last| last.offset < entry.offset) {
            level.push_back(entry);
        } else {
            let pos = level.partition_point(|e| e.offset < entry.offset);
            level.insert(pos, entry);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    struct Unlimited;
    impl Credit for Unlimited {
        fn has_credit(&mut self, _: ConsumerId) -> bool {
            true
        }
    }

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

    #[test]
    fn round_robin_with_prefetch_and_priority() {
        let mut q = QueueState::default();
        let mut out = Vec::new();
        for _ in 0..5 {
            q.enqueue(msg("m"), &mut out);
        }
        q.add_consumer(consumer(1, 0, 0));
        q.add_consumer(consumer(2, 0, 0));
        q.add_consumer(consumer(3, 5, 2));
        q.deliver(0, &mut Unlimited, &mut out);
        assert_eq!(
            delivered(&out),
            vec![(3, 0), (3, 1), (1, 2), (2, 3), (1, 4)]
        );
    }

    #[test]
    fn requeue_goes_back_to_original_place_marked_redelivered() {
        let mut q = QueueState::default();
        let mut out = Vec::new();
        for _ in 0..3 {
            q.enqueue(msg("m"), &mut out);
        }
        q.add_consumer(consumer(1, 0, 1));
        q.deliver(0, &mut Unlimited, &mut out);
        assert_eq!(delivered(&out), vec![(1, 0)]);
        q.requeue(&[0], &mut out);
        assert!(q.remove_consumer(1));
        let head = q.get(0, true, &mut out).unwrap();
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
            q.enqueue(msg("m"), &mut out);
        }
        assert_eq!(dead(&out), vec![(0, DeathReason::MaxLen)]);
        let mut q = QueueState::new(QueueArgs {
            max_length: Some(1),
            overflow: Overflow::RejectPublish,
            ..Default::default()
        });
        assert!(matches!(
            q.enqueue(msg("a"), &mut out),
            Enqueued::Accepted(_)
        ));
        assert_eq!(q.enqueue(msg("b"), &mut out), Enqueued::Rejected);
    }

    #[test]
    fn ttl_expires_heads_and_delivery_limit_dead_letters() {
        let mut q = QueueState::new(QueueArgs {
            message_ttl: Some(10),
            delivery_limit: Some(1),
            ..Default::default()
        });
        let mut out = Vec::new();
        q.enqueue(msg("a"), &mut out);
        q.expire(10, &mut out);
        assert!(dead(&out).is_empty(), "expires only after its TTL");
        q.expire(12, &mut out);
        assert_eq!(dead(&out), vec![(0, DeathReason::Expired)]);
        out.clear();
        q.enqueue(msg("b"), &mut out);
        q.add_consumer(consumer(1, 0, 0));
        for _ in 0..2 {
            q.deliver(5, &mut Unlimited, &mut out);
            q.requeue(&[1], &mut out);
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
            q.enqueue(Arc::new(m), &mut out);
        }
        let order: Vec<Offset> =
            std::iter::from_fn(|| q.get(0, true, &mut out).map(|e| e.offset)).collect();
        assert_eq!(order, vec![1, 3, 0, 2]);
    }
}
