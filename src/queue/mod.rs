//! Queues: the state machine (`state`) behind a lock, plus the consumers it delivers to.
//!
//! `Queue` is the only owner of its messages. Publishers call `enqueue`; channels call
//! `consume`, `settle`, `requeue`; the queue hands deliveries to each consumer's
//! `ConsumerSink` (implemented by the connection) while holding its lock, so that
//! deliveries to one consumer leave in queue order. The lock is held only for O(1) work
//! per message and never across I/O.

pub mod message;
pub mod state;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use amq_protocol::types::FieldTable;

pub use message::Message;
pub use state::{ConsumerId, ConsumerSpec, Effect, Entry, Offset, QueueState};

use crate::protocol::{AmqpError, reply::amqp_err};
use crate::store::{Store, StoreOp};

/// A durable queue's link to the store: the store handle and the queue's key there.
#[derive(Debug, Clone)]
pub struct QueueStore {
    /// The node's store.
    pub store: Store,
    /// The queue's key (its entries live under it).
    pub key: String,
}

impl QueueStore {
    /// Ops that remove these entries' stored copies.
    fn removals(&self, entries: &[Entry], ops: &mut Vec<StoreOp>) {
        for e in entries {
            if let Some(id) = e.msg.store_id {
                ops.push(StoreOp::Remove {
                    queue: self.key.clone(),
                    offset: id,
                });
            }
        }
    }
}

/// A delivery on its way to a consumer's channel.
#[derive(Debug)]
pub struct Delivery {
    /// The queue it came from (for acks).
    pub queue: Arc<Queue>,
    /// Tag of the consumer, as the client knows it.
    pub consumer_tag: Arc<str>,
    /// Identity of the consumer.
    pub consumer: ConsumerId,
    /// The message and its place.
    pub entry: Entry,
    /// Settled on delivery (auto-ack).
    pub no_ack: bool,
}

/// Where a queue sends deliveries: one consumer's channel. Implemented by the
/// connection, so that queue code knows nothing of sockets.
pub trait ConsumerSink: Send + Sync + std::fmt::Debug {
    /// Whether the channel can take one more delivery now (channel-wide prefetch and
    /// socket backlog).
    fn has_credit(&self, no_ack: bool) -> bool;
    /// Takes a delivery; gives it back when the channel is gone.
    fn deliver(&self, delivery: Delivery) -> Result<(), Delivery>;
    /// The queue went away: the consumer is cancelled by the broker.
    fn cancelled(&self, consumer_tag: Arc<str>);
    /// Asks to be told (`Queue::kick`) when credit is back.
    fn wait_for_credit(&self, queue: Weak<Queue>);
}

#[derive(Debug)]
struct Registered {
    tag: Arc<str>,
    sink: Arc<dyn ConsumerSink>,
    no_ack: bool,
    exclusive: bool,
}

#[derive(Debug, Default)]
struct Inner {
    state: QueueState,
    consumers: HashMap<ConsumerId, Registered>,
    had_consumer: bool,
    deleted: bool,
}

/// Declared properties of a queue, compared on redeclare.
#[derive(Debug, Clone)]
pub struct QueueDef {
    /// Name.
    pub name: String,
    /// Survives restarts.
    pub durable: bool,
    /// Owned by one connection (its id).
    pub exclusive_owner: Option<u64>,
    /// Deleted when its last consumer goes.
    pub auto_delete: bool,
    /// x-arguments.
    pub arguments: FieldTable,
}

/// A queue.
#[derive(Debug)]
pub struct Queue {
    /// Its declaration.
    pub def: QueueDef,
    /// Vhost it lives in.
    pub vhost: String,
    inner: Mutex<Inner>,
    me: Weak<Queue>,
    store: Option<QueueStore>,
}

/// Counts reported by declare-ok, purge-ok, delete-ok and get-ok.
#[derive(Debug, Clone, Copy)]
pub struct QueueCounts {
    /// Ready messages.
    pub messages: u32,
    /// Consumers.
    pub consumers: u32,
}

struct SinkCredit<'a> {
    consumers: &'a HashMap<ConsumerId, Registered>,
    me: &'a Weak<Queue>,
}

impl state::Credit for SinkCredit<'_> {
    fn has_credit(&mut self, consumer: ConsumerId) -> bool {
        match self.consumers.get(&consumer) {
            Some(r) if r.sink.has_credit(r.no_ack) => true,
            Some(r) => {
                r.sink.wait_for_credit(self.me.clone());
                false
            }
            None => false,
        }
    }
}

impl Queue {
    /// A new, empty queue.
    pub fn new(vhost: &str, def: QueueDef, store: Option<QueueStore>) -> Arc<Queue> {
        Arc::new_cyclic(|me| Queue {
            store: if def.durable { store } else { None },
            def,
            vhost: vhost.to_string(),
            inner: Mutex::new(Inner::default()),
            me: me.clone(),
        })
    }

    /// The queue's place in the store, when it is durable.
    pub fn store(&self) -> Option<&QueueStore> {
        self.store.as_ref()
    }

    /// Store ops that add a persistent message to this queue (none when transient or
    /// the queue is not durable). They must reach the store before the message is
    /// enqueued in memory, so that an ack can never overtake them.
    pub fn persist_ops(&self, msg: &Message, ops: &mut Vec<StoreOp>) -> bool {
        match (&self.store, msg.store_id) {
            (Some(qs), Some(id)) if msg.is_persistent() => {
                ops.push(StoreOp::Enqueue {
                    queue: qs.key.clone(),
                    offset: id,
                    msg_id: id,
                });
                true
            }
            _ => false,
        }
    }

    /// The queue's name.
    pub fn name(&self) -> &str {
        &self.def.name
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock is a bug; the state is still usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends a message and delivers what it can.
    pub fn enqueue(&self, msg: Arc<Message>) -> Offset {
        let mut inner = self.lock();
        let offset = inner.state.enqueue(msg);
        self.run(&mut inner);
        offset
    }

    /// Puts back a recovered entry.
    pub fn restore(&self, entry: Entry) {
        self.lock().state.restore(entry);
    }

    /// Retries delivery (credit came back).
    pub fn kick(&self) {
        let mut inner = self.lock();
        self.run(&mut inner);
    }

    fn run(&self, inner: &mut Inner) {
        if inner.consumers.is_empty() || inner.state.ready_count() == 0 {
            return;
        }
        let Some(me) = self.me.upgrade() else { return };
        let mut effects = Vec::new();
        let Inner {
            state, consumers, ..
        } = inner;
        state.deliver(
            &mut SinkCredit {
                consumers,
                me: &self.me,
            },
            &mut effects,
        );
        for Effect::Deliver { consumer, entry } in effects {
            let Some(r) = consumers.get(&consumer) else {
                state.return_undelivered(entry);
                continue;
            };
            let delivery = Delivery {
                queue: me.clone(),
                consumer_tag: r.tag.clone(),
                consumer,
                entry,
                no_ack: r.no_ack,
            };
            if let Err(back) = r.sink.deliver(delivery) {
                state.return_undelivered(back.entry);
            }
        }
    }

    /// Adds a consumer. 403 when the queue has an exclusive consumer, or when an
    /// exclusive one is asked for while others exist.
    pub fn consume(
        &self,
        spec: ConsumerSpec,
        tag: Arc<str>,
        exclusive: bool,
        sink: Arc<dyn ConsumerSink>,
    ) -> Result<(), AmqpError> {
        let mut inner = self.lock();
        if inner.deleted {
            return Err(amqp_err!(
                NotFound,
                "no queue '{}' in vhost '{}'",
                self.name(),
                self.vhost
            ));
        }
        if inner.consumers.values().any(|c| c.exclusive)
            || (exclusive && !inner.consumers.is_empty())
        {
            return Err(amqp_err!(
                AccessRefused,
                "queue '{}' in vhost '{}' in exclusive use",
                self.name(),
                self.vhost
            ));
        }
        let no_ack = spec.no_ack;
        inner.consumers.insert(
            spec.id,
            Registered {
                tag,
                sink,
                no_ack,
                exclusive,
            },
        );
        inner.had_consumer = true;
        inner.state.add_consumer(spec);
        self.run(&mut inner);
        Ok(())
    }

    /// Removes a consumer. Returns true when the queue is auto-delete and this was its
    /// last consumer: the caller deletes it.
    pub fn cancel(&self, consumer: ConsumerId) -> bool {
        let mut inner = self.lock();
        inner.consumers.remove(&consumer);
        inner.state.remove_consumer(consumer);
        self.run(&mut inner);
        self.def.auto_delete && inner.had_consumer && inner.consumers.is_empty() && !inner.deleted
    }

    /// Acks (or drops after reject/nack without requeue) delivered messages. The store
    /// removals go into `ops` when given (a transaction), else straight to the store.
    pub fn settle(&self, offsets: &[Offset], ops: Option<&mut Vec<StoreOp>>) -> Vec<Entry> {
        let mut inner = self.lock();
        let removed = inner.state.settle(offsets);
        self.forget(&removed, ops);
        self.run(&mut inner);
        removed
    }

    /// Removes the stored copies of entries that left the queue.
    fn forget(&self, entries: &[Entry], ops: Option<&mut Vec<StoreOp>>) {
        let Some(qs) = &self.store else { return };
        match ops {
            Some(ops) => qs.removals(entries, ops),
            None => {
                let mut own = Vec::new();
                qs.removals(entries, &mut own);
                qs.store.submit(own);
            }
        }
    }

    /// Returns delivered messages to their place, marked redelivered.
    pub fn requeue(&self, offsets: &[Offset]) {
        let mut inner = self.lock();
        inner.state.requeue(offsets);
        self.run(&mut inner);
    }

    /// A delivery that never reached its client goes back unchanged.
    pub fn return_undelivered(&self, entry: Entry) {
        let mut inner = self.lock();
        if inner.deleted {
            return;
        }
        inner.state.return_undelivered(entry);
        self.run(&mut inner);
    }

    /// basic.get: the head and the count of messages left.
    pub fn get(&self, no_ack: bool) -> Option<(Entry, u32)> {
        let mut inner = self.lock();
        let entry = inner.state.get(no_ack)?;
        if let (Some(qs), Some(id)) = (&self.store, entry.msg.store_id) {
            let op = if no_ack {
                StoreOp::Remove {
                    queue: qs.key.clone(),
                    offset: id,
                }
            } else {
                StoreOp::MarkDelivered {
                    queue: qs.key.clone(),
                    offset: id,
                }
            };
            qs.store.submit(vec![op]);
        }
        Some((entry, inner.state.ready_count() as u32))
    }

    /// queue.purge: drops ready messages, returns them.
    pub fn purge(&self) -> Vec<Entry> {
        let removed = self.lock().state.purge();
        self.forget(&removed, None);
        removed
    }

    /// Counts for declare-ok and friends.
    pub fn counts(&self) -> QueueCounts {
        let inner = self.lock();
        QueueCounts {
            messages: inner.state.ready_count() as u32,
            consumers: inner.consumers.len() as u32,
        }
    }

    /// Checks queue.delete's if-unused / if-empty conditions.
    pub fn check_delete(&self, if_unused: bool, if_empty: bool) -> Result<(), AmqpError> {
        let inner = self.lock();
        if if_unused && !inner.consumers.is_empty() {
            return Err(amqp_err!(
                PreconditionFailed,
                "queue '{}' in vhost '{}' in use",
                self.name(),
                self.vhost
            ));
        }
        if if_empty && inner.state.ready_count() + inner.state.unacked_count() > 0 {
            return Err(amqp_err!(
                PreconditionFailed,
                "queue '{}' in vhost '{}' is not empty",
                self.name(),
                self.vhost
            ));
        }
        Ok(())
    }

    /// Marks the queue deleted and cancels its consumers; returns the message count.
    pub fn mark_deleted(&self) -> u32 {
        let mut inner = self.lock();
        inner.deleted = true;
        let count = inner.state.ready_count() as u32;
        for (_, c) in inner.consumers.drain() {
            c.sink.cancelled(c.tag.clone());
        }
        inner.state.purge();
        if let Some(qs) = &self.store {
            qs.store.submit(vec![
                StoreOp::PurgeQueue {
                    queue: qs.key.clone(),
                },
                StoreOp::DeleteDefinition {
                    key: qs.key.clone(),
                },
            ]);
        }
        count
    }

    /// Whether the queue has been deleted.
    pub fn is_deleted(&self) -> bool {
        self.lock().deleted
    }
}
