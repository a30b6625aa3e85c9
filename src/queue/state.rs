//! The queue as a pure state machine, in the shape of RabbitMQ's `rabbit_fifo`: every
//! change is a method call on `QueueState` that mutates it and pushes the resulting
//! side effects (deliveries) into an `Effects` list for the caller to carry out. It
//! never touches sockets, tasks or the store, which is what will let the same code run
//! under a Raft log for replicated queues.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

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
}

/// Effects of one command.
pub type Effects = Vec<Effect>;

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
#[derive(Debug, Default)]
pub struct QueueState {
    ready: VecDeque<Entry>,
    unacked: HashMap<Offset, (Entry, Option<ConsumerId>)>,
    consumers: Vec<ConsumerSlot>,
    next_consumer: usize,
    next_offset: Offset,
    ready_bytes: usize,
}

impl QueueState {
    /// Messages ready for delivery.
    pub fn ready_count(&self) -> usize {
        self.ready.len()
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

    /// Next offset that `enqueue` will assign.
    pub fn next_offset(&self) -> Offset {
        self.next_offset
    }

    /// Appends a message at the tail; returns its offset.
    pub fn enqueue(&mut self, msg: Arc<Message>) -> Offset {
        let offset = self.next_offset;
        self.next_offset += 1;
        self.ready_bytes += msg.size();
        self.ready.push_back(Entry {
            offset,
            msg,
            redelivered: false,
        });
        offset
    }

    /// Puts back a recovered entry (restart): keeps its offset and flag.
    pub fn restore(&mut self, entry: Entry) {
        self.next_offset = self.next_offset.max(entry.offset + 1);
        self.insert_ready(entry);
    }

    /// Adds a consumer.
    pub fn add_consumer(&mut self, spec: ConsumerSpec) {
        self.consumers.push(ConsumerSlot { spec, unacked: 0 });
        // Keep priority groups contiguous, highest first; stable keeps arrival order.
        self.consumers
            .sort_by_key(|c| std::cmp::Reverse(c.spec.priority));
    }

    /// Removes a consumer; its unacked messages stay unacked (they belong to its channel).
    pub fn remove_consumer(&mut self, id: ConsumerId) -> bool {
        let before = self.consumers.len();
        self.consumers.retain(|c| c.spec.id != id);
        self.consumers.len() != before
    }

    /// Hands ready messages to consumers with credit: round-robin within the highest
    /// priority that can take one, FIFO from the head.
    pub fn deliver(&mut self, credit: &mut dyn Credit, out: &mut Effects) {
        if self.consumers.is_empty() {
            return;
        }
        while !self.ready.is_empty() {
            let Some(index) = self.pick_consumer(credit) else {
                break;
            };
            let Some(entry) = self.ready.pop_front() else {
                break;
            };
            self.ready_bytes -= entry.msg.size();
            let slot = &mut self.consumers[index];
            let consumer = slot.spec.id;
            if !slot.spec.no_ack {
                slot.unacked += 1;
                self.unacked
                    .insert(entry.offset, (entry.clone(), Some(consumer)));
            }
            out.push(Effect::Deliver { consumer, entry });
        }
    }

    fn pick_consumer(&mut self, credit: &mut dyn Credit) -> Option<usize> {
        let n = self.consumers.len();
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
    pub fn get(&mut self, no_ack: bool) -> Option<Entry> {
        let entry = self.ready.pop_front()?;
        self.ready_bytes -= entry.msg.size();
        if !no_ack {
            self.unacked.insert(entry.offset, (entry.clone(), None));
        }
        Some(entry)
    }

    /// Settles delivered messages (ack, or reject/nack without requeue). Returns the
    /// entries that were removed.
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

    /// Returns delivered messages to their original place, marked redelivered.
    pub fn requeue(&mut self, offsets: &[Offset]) {
        for offset in offsets {
            if let Some((mut entry, consumer)) = self.unacked.remove(offset) {
                self.release_credit(consumer);
                entry.redelivered = true;
                self.insert_ready(entry);
            }
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
        self.ready_bytes = 0;
        self.ready.drain(..).collect()
    }

    fn release_credit(&mut self, consumer: Option<ConsumerId>) {
        if let Some(id) = consumer
            && let Some(slot) = self.consumers.iter_mut().find(|c| c.spec.id == id)
        {
            slot.unacked = slot.unacked.saturating_sub(1);
        }
    }

    fn insert_ready(&mut self, entry: Entry) {
        self.ready_bytes += entry.msg.size();
        // Requeued messages usually belong near the head: search from there.
        let pos = self.ready.partition_point(|e| e.offset < entry.offset);
        self.ready.insert(pos, entry);
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
        Arc::new(Message {
            exchange: String::new(),
            routing_key: "q".into(),
            properties: Default::default(),
            raw_properties: Bytes::from_static(&[0, 0]),
            body: Bytes::from_static(body.as_bytes()),
            store_id: None,
        })
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
            .map(|Effect::Deliver { consumer, entry }| (*consumer, entry.offset))
            .collect()
    }

    #[test]
    fn round_robin_with_prefetch_and_priority() {
        let mut q = QueueState::default();
        for _ in 0..5 {
            q.enqueue(msg("m"));
        }
        q.add_consumer(consumer(1, 0, 0));
        q.add_consumer(consumer(2, 0, 0));
        q.add_consumer(consumer(3, 5, 2));
        let mut out = Vec::new();
        q.deliver(&mut Unlimited, &mut out);
        assert_eq!(
            delivered(&out),
            vec![(3, 0), (3, 1), (1, 2), (2, 3), (1, 4)]
        );
    }

    #[test]
    fn requeue_goes_back_to_original_place_marked_redelivered() {
        let mut q = QueueState::default();
        for _ in 0..3 {
            q.enqueue(msg("m"));
        }
        q.add_consumer(consumer(1, 0, 1));
        let mut out = Vec::new();
        q.deliver(&mut Unlimited, &mut out);
        assert_eq!(delivered(&out), vec![(1, 0)]);
        q.requeue(&[0]);
        assert!(q.remove_consumer(1));
        let head = q.get(true).unwrap();
        assert_eq!((head.offset, head.redelivered), (0, true));
        assert_eq!(q.ready_count(), 2);
    }
}
