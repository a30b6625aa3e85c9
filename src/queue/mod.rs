//! Queues: the state machine (`state`) behind a lock, plus the consumers it delivers to.
//!
//! `Queue` is the only owner of its messages. Publishers call `enqueue`; channels call
//! `consume`, `settle`, `requeue`; the queue hands deliveries to each consumer's
//! `ConsumerSink` (implemented by the connection) while holding its lock, so that
//! deliveries to one consumer leave in queue order. The lock is held only for O(1) work
//! per message and never across I/O. Dead letters are handed to a `DeadLetterRouter`
//! after the lock is released, so two queues dead-lettering into each other cannot
//! deadlock.

pub mod args;
pub mod dead_letters;
pub mod journal;
pub mod message;
mod paging;
pub mod state;

#[cfg(test)]
mod model_tests;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use amq_protocol::types::FieldTable;

pub use args::QueueArgs;
pub use message::{Message, PagedHead, now_ms};
pub use paging::{Paging, Spool};
pub use state::{
    Command, CommandMeta, ConsumerId, ConsumerSpec, DeathReason, Effect, Effects, Enqueued, Entry,
    Offset, QueueState, Queued, Reply, Slot,
};

use crate::protocol::{AmqpError, reply::amqp_err};
use crate::store::{Store, StoreOp};

/// A durable queue's link to the store: the store handle and the queue's key there.
#[derive(Debug, Clone)]
pub struct QueueStore {
    /// The node's store.
    pub store: Store,
    /// The queue's key (its entries live under it), shared by every store record of the
    /// queue rather than copied into each.
    pub key: Arc<str>,
    /// Body bytes of ready persistent messages the queue keeps in memory, at its head;
    /// the others stay in the store only until they come near the head (see `paging`).
    pub body_window: usize,
}

impl QueueStore {
    /// The op that removes an entry's stored copy, if it has one.
    fn removal(&self, entry: &Entry) -> Option<StoreOp> {
        self.removal_of(entry.msg.store_id)
    }

    /// The op that removes the stored copy `store_id`, if there is one.
    fn removal_of(&self, store_id: Option<u64>) -> Option<StoreOp> {
        store_id.map(|id| StoreOp::Remove {
            queue: self.key.clone(),
            offset: id,
        })
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
    /// socket backlog). A true answer reserves the channel-wide credit for a delivery
    /// that follows at once, or that `return_credit` gives back.
    fn has_credit(&self, no_ack: bool) -> bool;
    /// Gives back credit that `has_credit` reserved and no delivery used.
    fn return_credit(&self, no_ack: bool);
    /// Takes a delivery; gives it back when the channel is gone.
    fn deliver(&self, delivery: Delivery) -> Result<(), Delivery>;
    /// The queue went away: the consumer is cancelled by the broker.
    fn cancelled(&self, consumer_tag: Arc<str>);
    /// Asks to be told (`Queue::kick`) when credit is back.
    fn wait_for_credit(&self, queue: Weak<Queue>);
    /// Whether the channel's connection holds many deliveries it has not yet written:
    /// the broker, not the client, is what keeps this consumer from taking more.
    fn is_behind(&self) -> bool;
    /// (connection id, channel number) of the consumer, for listings.
    fn channel(&self) -> Option<(u64, u16)> {
        None
    }
}

/// Ready messages (or bytes of them) from which a queue holds its publishers back while
/// a consumer's connection is behind (queue flow control): the backlog is enough to
/// keep the consumers busy, and more of it would only cost memory and latency.
pub const FLOW_READY_MESSAGES: usize = 4096;
/// See `FLOW_READY_MESSAGES`.
pub const FLOW_READY_BYTES: usize = 4 << 20;
/// A backlogged queue looks whether a consumer's connection is behind on one publish
/// in this many (and whenever a held publisher asks, `still_congested`).
const FLOW_CHECK_EVERY: u32 = 31;

/// Where dead letters go: implemented by the vhost, which routes them through the
/// queue's dead-letter exchange. Called without the queue's lock held.
pub trait DeadLetterRouter: Send + Sync + std::fmt::Debug {
    /// Routes `dead` (entries that left `from` for a reason). Must also remove their
    /// stored copies from `from`, in the same store request as their new copies.
    fn dead_letter(&self, from: &Queue, dead: Vec<(Entry, DeathReason)>);

    /// Routes one dead letter of `from` (at-least-once, see [`dead_letters`]) and
    /// publishes it to where it leads: resolves to true once every queue it was routed to
    /// took it durably, false when it leads nowhere or a queue refused it or did not
    /// answer.
    fn dead_letter_confirmed(
        &self,
        from: &Queue,
        msg: &Message,
        reason: DeathReason,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send>>;
}

#[derive(Debug)]
struct Registered {
    tag: Arc<str>,
    sink: Arc<dyn ConsumerSink>,
    no_ack: bool,
    exclusive: bool,
    prefetch: u32,
}

/// A consumer as listings show it.
#[derive(Debug, Clone)]
pub struct ConsumerInfo {
    /// Consumer tag.
    pub tag: Arc<str>,
    /// Manual acknowledgement expected.
    pub ack_required: bool,
    /// basic.consume exclusive.
    pub exclusive: bool,
    /// Its prefetch (0: unlimited).
    pub prefetch: u32,
    /// (connection id, channel number) it consumes on, when the sink knows.
    pub channel: Option<(u64, u16)>,
}

#[derive(Debug)]
struct Inner {
    state: QueueState,
    /// Hashed fast: looked up on every delivery, by ids the queue hands out itself.
    consumers: HashMap<ConsumerId, Registered, foldhash::fast::RandomState>,
    had_consumer: bool,
    last_used_ms: u64,
    /// Store records of the commands applied under the current lock, handed to the
    /// store as one request before the lock is released (`flush`).
    store_ops: Vec<StoreOp>,
    /// Reused buffers of the delivery path (no allocation per message).
    effects: Effects,
    granted: Vec<ConsumerId>,
    /// Publishes left before `enqueue` looks at the consumers again (queue flow control).
    flow_check_in: u32,
    /// Message counters for the management API and metrics, bumped under the lock the
    /// operation holds anyway.
    counters: MessageCounters,
    /// Which bodies are on their way back from the store.
    pager: paging::Pager,
    /// Messages that left dead (expired, rejected, over a limit), in the order they
    /// left, until `bury` routes them: appended under the lock, so that batches left
    /// by different threads are routed in that order.
    graveyard: Dead,
}

/// Totals of what went through a queue since it was created (or recovered), as
/// RabbitMQ's `message_stats`. Rates are derived by whoever samples them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MessageCounters {
    /// Messages enqueued (publish, dead-lettered in).
    pub publish: u64,
    /// Messages delivered to consumers expecting acks.
    pub deliver: u64,
    /// Messages delivered to auto-ack consumers.
    pub deliver_no_ack: u64,
    /// Messages fetched with basic.get expecting acks.
    pub get: u64,
    /// Messages fetched with basic.get in auto-ack mode.
    pub get_no_ack: u64,
    /// Deliveries and gets with the redelivered flag set.
    pub redeliver: u64,
    /// Messages acknowledged.
    pub ack: u64,
}

/// A point-in-time view of a queue for listings (management API, metrics, ctl).
#[derive(Debug, Clone, Copy)]
pub struct QueueSnapshot {
    /// Messages ready for delivery.
    pub ready: u64,
    /// Messages delivered and not yet acknowledged.
    pub unacked: u64,
    /// Body bytes of the ready messages.
    pub ready_bytes: u64,
    /// Of those, the bytes of bodies in memory (the rest are in the store only).
    pub ready_bytes_in_memory: u64,
    /// Ready messages whose body is in the store only.
    pub ready_paged: u64,
    /// Consumers.
    pub consumers: u64,
    /// Estimate of the memory the queue's messages take: bodies and properties of the
    /// ready ones plus the bookkeeping of every entry.
    pub memory: u64,
    /// Totals since creation.
    pub counters: MessageCounters,
    /// Dead letters held until their targets take them (at-least-once), and their body
    /// bytes: RabbitMQ's `messages_dlx` and `message_bytes_dlx`.
    pub dead_letters: (u64, u64),
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
    /// Its settings: parsed from the arguments, with the policy in force applied.
    args: std::sync::RwLock<Arc<QueueArgs>>,
    /// Vhost it lives in.
    pub vhost: String,
    inner: Mutex<Inner>,
    /// Set by `enqueue`: publishers should pause (see `FLOW_READY_MESSAGES`).
    congested: AtomicBool,
    me: Weak<Queue>,
    store: Option<QueueStore>,
    router: Option<Weak<dyn DeadLetterRouter>>,
    /// A replicated queue's log (set once its group runs on this node).
    replica: std::sync::OnceLock<crate::replica::ReplicaLog>,
    /// A thread is routing the graveyard (one at a time keeps their order).
    burying: Mutex<bool>,
    /// The graveyard holds something.
    graves: AtomicBool,
    /// A replicated queue's publishes proposed under reject-publish limits and not yet
    /// committed: (messages, body bytes).
    proposed: Arc<Mutex<(usize, usize)>>,
    /// Declared replicated (`x-queue-type: quorum` on a clustered node): its messages go
    /// only through its log, even before the log is attached.
    replicated: AtomicBool,
    /// A replicated queue's members (node names), for listings.
    members: std::sync::RwLock<Vec<String>>,
    /// The Raft term of the newest leader this node heard of for a replicated queue.
    leader_term: std::sync::atomic::AtomicU64,
    /// Where it parks transient bodies while memory runs short (see `paging`).
    spool: std::sync::OnceLock<Spool>,
    /// Dead letters held until their targets take them (at-least-once dead-lettering).
    dead_letters: dead_letters::DeadLetters,
}

/// Counts reported by declare-ok, purge-ok, delete-ok and get-ok.
#[derive(Debug, Clone, Copy)]
pub struct QueueCounts {
    /// Ready messages.
    pub messages: u32,
    /// Consumers.
    pub consumers: u32,
}

/// Dead letters gathered under the lock, handled after it is released.
type Dead = Vec<(Queued, DeathReason)>;

/// Offsets to settle, reject or requeue: a list the caller gives away moves into the
/// command as it is; a borrowed one is copied.
pub trait OffsetList {
    /// The offsets as an owned list.
    fn into_vec(self) -> Vec<Offset>;
}

impl OffsetList for Vec<Offset> {
    fn into_vec(self) -> Vec<Offset> {
        self
    }
}

impl OffsetList for &[Offset] {
    fn into_vec(self) -> Vec<Offset> {
        self.to_vec()
    }
}

impl OffsetList for &Vec<Offset> {
    fn into_vec(self) -> Vec<Offset> {
        self.clone()
    }
}

/// The outcome in an `Enqueue`'s reply.
fn enqueued(reply: Reply) -> Enqueued {
    match reply {
        Reply::Enqueued(e) => e,
        _ => Enqueued::Rejected,
    }
}

impl Queue {
    /// A new, empty queue. `args` must come from `QueueArgs::parse(&def.arguments)`.
    pub fn new(
        vhost: &str,
        def: QueueDef,
        args: QueueArgs,
        store: Option<QueueStore>,
        router: Option<Weak<dyn DeadLetterRouter>>,
    ) -> Arc<Queue> {
        Arc::new_cyclic(|me| Queue {
            store: if def.durable { store } else { None },
            inner: Mutex::new(Inner {
                state: QueueState::new(args.clone()),
                consumers: HashMap::default(),
                had_consumer: false,
                last_used_ms: now_ms(),
                store_ops: Vec::new(),
                effects: Effects::new(),
                granted: Vec::new(),
                flow_check_in: 0,
                counters: MessageCounters::default(),
                pager: paging::Pager::default(),
                graveyard: Dead::new(),
            }),
            burying: Mutex::new(false),
            graves: AtomicBool::new(false),
            congested: AtomicBool::new(false),
            proposed: Arc::default(),
            args: std::sync::RwLock::new(Arc::new(args)),
            def,
            vhost: vhost.to_string(),
            me: me.clone(),
            router,
            replica: std::sync::OnceLock::new(),
            replicated: AtomicBool::new(false),
            members: std::sync::RwLock::default(),
            leader_term: std::sync::atomic::AtomicU64::new(0),
            spool: std::sync::OnceLock::new(),
            dead_letters: dead_letters::DeadLetters::default(),
        })
    }

    /// Gives the queue a place to park the bodies of messages that must not survive a
    /// restart while memory runs short (set once, at creation).
    pub fn attach_spool(&self, spool: Spool) {
        let _ = self.spool.set(spool);
    }

    /// Notes news of a replicated queue's leader elected in Raft term `term`: true when
    /// it is not older than what this node knows (an announcement that lost a race with
    /// a newer election is ignored).
    pub fn note_leader(&self, term: u64) -> bool {
        self.leader_term.fetch_max(term, Ordering::Relaxed) <= term
    }

    /// Records a replicated queue's members (from its agreed definition).
    pub fn set_members(&self, members: Vec<String>) {
        *self.members.write().unwrap_or_else(|p| p.into_inner()) = members;
    }

    /// A replicated queue's members (empty for any other queue).
    pub fn members(&self) -> Vec<String> {
        self.members
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Makes this a replicated queue (before any message reaches it): publishes go to
    /// its log once [`Queue::attach_replica`] gives it one, and are refused until then.
    pub fn mark_replicated(&self) {
        self.replicated.store(true, Ordering::Relaxed);
    }

    /// Gives a replicated queue its log.
    pub fn attach_replica(&self, log: crate::replica::ReplicaLog) {
        self.mark_replicated();
        let _ = self.replica.set(log);
    }

    /// Whether the queue is replicated (its durable changes go to its Raft log).
    pub fn is_replicated(&self) -> bool {
        self.replicated.load(Ordering::Relaxed)
    }

    /// A replicated queue's log, once attached.
    pub fn replica(&self) -> Option<&crate::replica::ReplicaLog> {
        self.replica.get()
    }

    /// Hands store records of this queue's own messages to where they are kept: the
    /// node's store, or a replicated queue's log.
    fn submit_ops(&self, ops: Vec<StoreOp>) {
        if ops.is_empty() {
            return;
        }
        if self.is_replicated() {
            if let Some(log) = self.replica() {
                log.submit_ops(ops);
            }
        } else if let Some(qs) = &self.store {
            qs.store.submit(ops);
        }
    }

    /// A publish to this queue. A replicated queue proposes it to its log and takes it
    /// once committed (`ack` hears whether it was); any other queue takes it now (and
    /// `ack` is not used: its durability is the caller's store request).
    pub fn enqueue_tracked(
        &self,
        msg: Arc<Message>,
        ack: Option<tokio::sync::oneshot::Sender<bool>>,
    ) -> Enqueued {
        self.enqueue_relayed(msg, ack, 0)
    }

    /// [`Queue::enqueue_tracked`] for a publish that other members of a replicated queue
    /// relayed `hops` times (see `crate::replica::relay`), so that a member which does
    /// not lead the group either relays it on only while the limit allows.
    pub fn enqueue_relayed(
        &self,
        msg: Arc<Message>,
        ack: Option<tokio::sync::oneshot::Sender<bool>>,
        hops: u8,
    ) -> Enqueued {
        if !self.is_replicated() {
            return self.enqueue_now(msg);
        }
        match self.replica() {
            Some(log) => {
                let ack = match self.admit_replicated(&msg, ack) {
                    Ok(ack) => ack,
                    Err(()) => return Enqueued::Rejected,
                };
                log.propose_relayed(
                    crate::replica::ReplicaRecord::Enqueue(msg.encode()),
                    ack,
                    hops,
                );
                Enqueued::Accepted(0)
            }
            None => {
                if let Some(ack) = ack {
                    let _ = ack.send(false);
                }
                Enqueued::Rejected
            }
        }
    }

    /// A replicated queue's publish against reject-publish limits, before it is
    /// proposed: every member appends what its log commits, so the limit is checked
    /// here, on the leader, counting the publishes proposed and not yet committed.
    /// `Err` (the publisher's `ack` told): refused. Otherwise the acknowledgement to
    /// pass to the log: with limits, one that also takes the publish off the count.
    fn admit_replicated(
        &self,
        msg: &Message,
        ack: Option<tokio::sync::oneshot::Sender<bool>>,
    ) -> Result<Option<tokio::sync::oneshot::Sender<bool>>, ()> {
        let size = msg.size();
        let in_flight = &self.proposed;
        {
            let inner = self.lock();
            if !inner.state.rejects_when_full() {
                return Ok(ack);
            }
            let (count, bytes) = *lock_in_flight(in_flight);
            if inner.state.would_reject_beside(size, count, bytes) {
                if let Some(ack) = ack {
                    let _ = ack.send(false);
                }
                return Err(());
            }
            let mut f = lock_in_flight(in_flight);
            f.0 += 1;
            f.1 += size;
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        let in_flight = in_flight.clone();
        tokio::spawn(async move {
            let committed = rx.await.unwrap_or(false);
            {
                let mut f = lock_in_flight(&in_flight);
                f.0 = f.0.saturating_sub(1);
                f.1 = f.1.saturating_sub(size);
            }
            if let Some(ack) = ack {
                let _ = ack.send(committed);
            }
        });
        Ok(Some(tx))
    }

    /// A replicated queue's message, committed by its log: enters the live queue (on the
    /// node leading its group), whatever its limits say now (see
    /// [`Queue::admit_replicated`]).
    pub fn enqueue_committed(&self, msg: Arc<Message>) {
        self.enqueue_with(Command::EnqueueCommitted(msg));
    }

    /// A replicated queue's host on the node that now leads its group: the committed
    /// messages `(key, head, body size, times handed out)`, in log order, replace what it
    /// held; their bodies are read back from the group's machine as the queue needs them
    /// (see `paging`). With `possibly_delivered` (an earlier leader served the queue)
    /// every message comes flagged redelivered: that leader may have handed one out just
    /// before it fell, before its hand-out record was committed.
    pub fn take_over(&self, messages: Vec<(u64, PagedHead, usize, u32)>, possibly_delivered: bool) {
        self.dead_letters.clear();
        let mut dead = Dead::new();
        {
            let mut inner = self.lock();
            // Consumers that attached while the group elected this node stay.
            inner.state = inner.state.without_messages();
            inner.store_ops.clear();
            for (key, head, size, delivered) in messages {
                inner.state.restore_paged(
                    key,
                    key,
                    head,
                    size,
                    delivered > 0 || possibly_delivered,
                    delivered.saturating_sub(1),
                );
            }
            self.exec(&mut inner, Command::Expire, &mut dead, None);
            self.run(&mut inner, &mut dead);
        }
        self.bury(dead);
    }

    /// A replicated queue's host on a node that no longer leads its group: its consumers
    /// are cancelled and its messages forgotten here (they stay in the log).
    pub fn step_down(&self) {
        self.dead_letters.clear();
        let mut inner = self.lock();
        for (_, c) in inner.consumers.drain() {
            c.sink.cancelled(c.tag.clone());
        }
        inner.state = QueueState::new((*self.args()).clone());
        inner.store_ops.clear();
    }

    /// Whether it holds any message, ready or unacked.
    pub fn holds_messages(&self) -> bool {
        let inner = self.lock();
        inner.state.ready_count() + inner.state.unacked_count() > 0
    }

    /// A classic queue that a mirroring policy now replicates: its consumers are
    /// cancelled (basic.cancel, as when a replicated queue's leader moves) and every
    /// message it holds is handed back, in place order (see [`QueueState::surrender`]),
    /// for its replicated incarnation to take over; publishes that still reach this
    /// incarnation are nacked.
    pub fn surrender(&self) -> Vec<state::Queued> {
        self.dead_letters.clear();
        let mut inner = self.lock();
        self.flush(&mut inner);
        for (_, c) in inner.consumers.drain() {
            c.sink.cancelled(c.tag.clone());
        }
        inner.state.surrender()
    }

    /// Its settings now (the declared arguments with the policy in force applied).
    pub fn args(&self) -> Arc<QueueArgs> {
        self.args.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Its overflow mode now (read on every publish: no allocation, no reference count).
    pub fn overflow(&self) -> args::Overflow {
        self.args.read().unwrap_or_else(|p| p.into_inner()).overflow
    }

    /// Its delivery limit now.
    pub fn delivery_limit(&self) -> Option<u64> {
        self.args
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .delivery_limit
    }

    /// A policy changed its settings: they apply from now on (a drop-head queue over a
    /// lowered limit drops from the head at once).
    pub fn set_args(&self, args: QueueArgs) {
        if *self.args() == args {
            return;
        }
        *self.args.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(args.clone());
        let mut dead = Dead::new();
        {
            let mut inner = self.lock();
            self.exec(&mut inner, Command::SetArgs(args), &mut dead, None);
            self.flush(&mut inner);
        }
        self.bury(dead);
    }

    /// The queue's name.
    pub fn name(&self) -> &str {
        &self.def.name
    }

    /// The queue's place in the store, when it is durable.
    pub fn store(&self) -> Option<&QueueStore> {
        self.store.as_ref()
    }

    /// Store ops that add a persistent message to this queue (none when transient or
    /// the queue is not durable). They must reach the store before the message is
    /// enqueued in memory, so that an ack can never overtake them.
    fn persist_ops(&self, msg: &Message, ops: &mut Vec<StoreOp>) -> bool {
        if self.is_replicated() {
            return false;
        }
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

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock is a bug; the state is still usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a message of this size would be refused now (reject-publish overflow).
    pub fn would_reject(&self, size: usize) -> bool {
        self.lock().state.would_reject(size)
    }

    /// Whether a publisher must be refused a message of this size before it is stored
    /// (x-overflow reject-publish and full; a reject-publish-dlx queue takes it and
    /// dead-letters it itself).
    pub fn refuses(&self, size: usize) -> bool {
        self.overflow() == args::Overflow::RejectPublish && self.would_reject(size)
    }

    /// Appends a message and delivers what it can (a replicated queue: once its log
    /// committed it; see [`Queue::enqueue_tracked`]).
    pub fn enqueue(&self, msg: Arc<Message>) -> Enqueued {
        self.enqueue_tracked(msg, None)
    }

    fn enqueue_now(&self, msg: Arc<Message>) -> Enqueued {
        self.enqueue_with(Command::Enqueue(msg))
    }

    /// Runs `Command::Enqueue` or `Command::EnqueueCommitted`.
    fn enqueue_with(&self, cmd: Command) -> Enqueued {
        let msg = match &cmd {
            Command::Enqueue(m) | Command::EnqueueCommitted(m) => m.clone(),
            _ => return Enqueued::Rejected,
        };
        let mut dead = Dead::new();
        let result = {
            let mut inner = self.lock();
            if inner.state.is_deleted() {
                // Only its stored copy goes (`Command::Enqueue` on a deleted queue).
                let reply = self.exec(&mut inner, cmd, &mut dead, None);
                self.flush(&mut inner);
                return enqueued(reply);
            }
            // (A replicated queue's committed messages are all stored, by its machine.)
            let stored = msg.store_id.is_some()
                && (self.is_replicated() || (self.store.is_some() && msg.is_persistent()));
            let id = msg.store_id;
            let result = enqueued(self.exec(&mut inner, cmd, &mut dead, None));
            if let Enqueued::Accepted(offset) = result
                && !(stored && self.page_out_if_over(&mut inner, offset))
            {
                self.spool_if_short(&mut inner, offset);
            }
            if result == Enqueued::Rejected {
                // Lost a race with other publishers for the last place: the copy its
                // publish stored for this queue goes again.
                if let (true, Some(qs), Some(offset)) = (stored, &self.store, id) {
                    inner.store_ops.push(StoreOp::Remove {
                        queue: qs.key.clone(),
                        offset,
                    });
                }
            } else {
                inner.counters.publish += 1;
            }
            self.run(&mut inner, &mut dead);
            let congested = self.check_congestion(&mut inner);
            self.congested.store(congested, Ordering::Relaxed);
            result
        };
        self.bury(dead);
        result
    }

    /// Whether the last `enqueue` found the queue congested: its publishers should wait
    /// (`still_congested`) before sending more. A queue is congested when its ready
    /// backlog passed `FLOW_READY_MESSAGES` or `FLOW_READY_BYTES` while a consumer's
    /// connection is behind with its writes. Consumers held back by their own prefetch
    /// (a slow application) never congest a queue: publishers may build a backlog for
    /// them, as with RabbitMQ.
    pub fn congested(&self) -> bool {
        self.congested.load(Ordering::Relaxed)
    }

    /// Looks again whether the queue is congested.
    pub fn still_congested(&self) -> bool {
        let inner = self.lock();
        let congested = !inner.state.is_deleted() && Self::is_congested(&inner);
        self.congested.store(congested, Ordering::Relaxed);
        congested
    }

    fn is_congested(inner: &Inner) -> bool {
        Self::is_backlogged(inner) && inner.consumers.values().any(|r| r.sink.is_behind())
    }

    fn is_backlogged(inner: &Inner) -> bool {
        inner.state.ready_count() >= FLOW_READY_MESSAGES
            || inner.state.ready_bytes() >= FLOW_READY_BYTES
    }

    /// `is_congested` for `enqueue`: while the queue stays backlogged, its consumers are
    /// looked at on every `FLOW_CHECK_EVERY`th publish only (a queue may have hundreds).
    fn check_congestion(&self, inner: &mut Inner) -> bool {
        if !Self::is_backlogged(inner) {
            inner.flow_check_in = 0;
            return false;
        }
        if inner.flow_check_in > 0 {
            inner.flow_check_in -= 1;
            return self.congested.load(Ordering::Relaxed);
        }
        inner.flow_check_in = FLOW_CHECK_EVERY;
        Self::is_congested(inner)
    }

    /// Puts back a recovered entry. True when the queue kept only its stored copy
    /// (past the body window): the caller should not keep the message either.
    pub fn restore(
        &self,
        offset: Offset,
        msg: Arc<Message>,
        delivered: bool,
        delivery_count: u32,
    ) -> bool {
        let mut dead = Dead::new();
        let stored = msg.store_id.is_some();
        let cmd = Command::Restore {
            offset,
            msg,
            delivered,
            delivery_count,
        };
        let mut inner = self.lock();
        self.exec(&mut inner, cmd, &mut dead, None);
        let paged = stored && self.page_out_if_over(&mut inner, offset);
        self.flush(&mut inner);
        drop(inner);
        self.bury(dead);
        paged
    }

    /// Retries delivery (credit came back).
    pub fn kick(&self) {
        let mut dead = Dead::new();
        {
            let mut inner = self.lock();
            self.run(&mut inner, &mut dead);
        }
        self.bury(dead);
    }

    /// Timer work: expires messages at the head, gives back the memory of a drained
    /// backlog; returns true when the queue has been unused for longer than x-expires
    /// and should be deleted.
    pub fn tick(&self, now: u64) -> bool {
        let mut dead = Dead::new();
        let expired_queue = {
            let mut inner = self.lock();
            if inner.state.is_deleted() {
                return false;
            }
            self.exec_at(&mut inner, now, Command::Expire, &mut dead, None);
            self.shed_if_short(&mut inner);
            inner.state.trim_memory();
            // A read that failed is tried again here.
            self.prefetch(&mut inner);
            self.flush(&mut inner);
            self.args().expires.is_some_and(|ttl| {
                inner.consumers.is_empty() && now.saturating_sub(inner.last_used_ms) >= ttl
            })
        };
        self.bury(dead);
        expired_queue
    }

    /// Marks the queue used now (declare, get, consume): restarts its x-expires clock.
    pub fn touch(&self) {
        self.lock().last_used_ms = now_ms();
    }

    /// Applies one command to the queue's state at the current time and carries out
    /// its effects (see `exec_at`).
    fn exec(
        &self,
        inner: &mut Inner,
        cmd: Command,
        dead: &mut Dead,
        removals: Option<&mut Vec<StoreOp>>,
    ) -> Reply {
        self.exec_at(inner, now_ms(), cmd, dead, removals)
    }

    /// Hands the store records gathered under the lock to the store, as one request.
    fn flush(&self, inner: &mut Inner) {
        if !inner.store_ops.is_empty() {
            self.submit_ops(std::mem::take(&mut inner.store_ops));
        }
        self.flush_spool(inner);
    }

    /// Applies one command to the queue's state (the only way it changes) and carries
    /// out its effects: deliveries go to the consumers' channels, dead letters into
    /// the graveyard (routed by `bury` once the lock is released; `dead` is left
    /// empty), and store records into
    /// `Inner::store_ops` (for `flush`); the removals of acked messages go into
    /// `removals` instead when the caller gathers them (a transaction).
    fn exec_at(
        &self,
        inner: &mut Inner,
        time_ms: u64,
        cmd: Command,
        _dead: &mut Dead,
        mut removals: Option<&mut Vec<StoreOp>>,
    ) -> Reply {
        let meta = CommandMeta {
            index: inner.state.last_index() + 1,
            time_ms,
        };
        let mut effects = std::mem::take(&mut inner.effects);
        let reply = inner.state.apply_into(&meta, cmd, &mut effects);
        let mut ops = std::mem::take(&mut inner.store_ops);
        for effect in effects.drain(..) {
            match effect {
                Effect::DeadLetter { entry, reason } => {
                    inner.graveyard.push((entry, reason));
                    self.graves.store(true, Ordering::Release);
                }
                Effect::Deliver { consumer, entry } => {
                    self.hand_over(inner, consumer, entry, &mut ops)
                }
                Effect::Forget { entry } => {
                    self.unspool(inner, &entry.slot);
                    let op =
                        (self.store.as_ref()).and_then(|qs| qs.removal_of(entry.slot.store_id()));
                    match removals.as_deref_mut() {
                        // A replicated queue's removals go to its log, not a store request.
                        Some(removals) if !self.is_replicated() => removals.extend(op),
                        _ => ops.extend(op),
                    }
                }
                Effect::ForgetAll => {
                    self.unspool_all(inner);
                    if let Some(qs) = &self.store {
                        ops.push(StoreOp::PurgeQueue {
                            queue: qs.key.clone(),
                        });
                        ops.push(StoreOp::DeleteDefinition {
                            key: qs.key.to_string(),
                        });
                    }
                }
            }
        }
        inner.effects = effects;
        if self.store.is_some() {
            // (A nested command, a delivery coming back, may have added records too.)
            ops.append(&mut inner.store_ops);
            inner.store_ops = ops;
        }
        reply
    }

    fn hand_over(
        &self,
        inner: &mut Inner,
        consumer: ConsumerId,
        entry: Entry,
        ops: &mut Vec<StoreOp>,
    ) {
        let Some(me) = self.me.upgrade() else { return };
        let Some(r) = inner.consumers.get(&consumer) else {
            let mut dead = Dead::new();
            self.exec(inner, Command::ReturnUndelivered(entry), &mut dead, None);
            debug_assert!(dead.is_empty(), "a return dead-letters nothing");
            return;
        };
        let counters = &mut inner.counters;
        // An auto-ack delivery keeps its stored copy until its channel has written it
        // (`settle_written_auto_ack`): it may yet come back unwritten.
        if !r.no_ack {
            ops.extend(self.delivery_record(&entry, false));
        }
        if r.no_ack {
            counters.deliver_no_ack += 1;
        } else {
            counters.deliver += 1;
        }
        counters.redeliver += u64::from(entry.redelivered);
        let delivery = Delivery {
            queue: me,
            consumer_tag: r.tag.clone(),
            consumer,
            entry,
            no_ack: r.no_ack,
        };
        if let Err(back) = r.sink.deliver(delivery) {
            let mut dead = Dead::new();
            self.exec(
                inner,
                Command::ReturnUndelivered(back.entry),
                &mut dead,
                None,
            );
            debug_assert!(dead.is_empty(), "a return dead-letters nothing");
        }
    }

    /// The store record of handing out a stored message: gone when auto-acked, else
    /// marked delivered (so that a crash brings it back redelivered).
    fn delivery_record(&self, entry: &Entry, no_ack: bool) -> Option<StoreOp> {
        let (qs, id) = (self.store.as_ref()?, entry.msg.store_id?);
        let queue = qs.key.clone();
        Some(if no_ack {
            StoreOp::Remove { queue, offset: id }
        } else {
            StoreOp::MarkDelivered { queue, offset: id }
        })
    }

    /// Delivers while consumers have credit: each round asks the consumers' channels
    /// for credit (channel-wide prefetch, socket backlog), in the order the queue would
    /// serve them and no more than there are ready messages, and hands the grants to the
    /// state machine as a `Command::Credit`; unused grants are given back.
    fn run(&self, inner: &mut Inner, dead: &mut Dead) {
        self.deliver_rounds(inner, dead);
        self.prefetch(inner);
        self.flush(inner);
    }

    fn deliver_rounds(&self, inner: &mut Inner, dead: &mut Dead) {
        loop {
            if inner.consumers.is_empty() || inner.state.ready_count() == 0 {
                return;
            }
            let mut granted = std::mem::take(&mut inner.granted);
            granted.clear();
            {
                let Inner {
                    state, consumers, ..
                } = &*inner;
                let want = state.ready_count();
                let mut group = None;
                for spec in state.credit_candidates() {
                    if granted.len() >= want || group.is_some_and(|g| g != spec.priority) {
                        break;
                    }
                    let Some(r) = consumers.get(&spec.id) else {
                        continue;
                    };
                    if r.sink.has_credit(r.no_ack) {
                        granted.push(spec.id);
                        group = Some(spec.priority);
                    } else {
                        r.sink.wait_for_credit(self.me.clone());
                    }
                }
            }
            if granted.is_empty() {
                inner.granted = granted;
                return;
            }
            let reply = self.exec(inner, Command::Credit { granted }, dead, None);
            let Reply::Credited { delivered, unused } = reply else {
                return;
            };
            for id in &unused {
                if let Some(r) = inner.consumers.get(id) {
                    r.sink.return_credit(r.no_ack);
                }
            }
            inner.granted = unused;
            if delivered == 0 {
                return;
            }
        }
    }

    /// Dead letters go to the router (with their store removals), or are dropped.
    fn bury(&self, dead: Dead) {
        debug_assert!(dead.is_empty(), "dead letters go through the graveyard");
        // One thread routes at a time, taking the graveyard in the order it was filled;
        // a thread that finds another at it leaves its dead to that one (also when
        // routing dead-letters into this queue again).
        while self.graves.load(Ordering::Acquire) {
            {
                let mut busy = lock_flag(&self.burying);
                if *busy {
                    return;
                }
                *busy = true;
            }
            loop {
                let batch = {
                    let mut inner = self.lock();
                    self.graves.store(false, Ordering::Release);
                    std::mem::take(&mut inner.graveyard)
                };
                if batch.is_empty() {
                    break;
                }
                self.bury_now(batch);
            }
            *lock_flag(&self.burying) = false;
            // (Dead left between the last look and the flag's clearing: go again.)
        }
    }

    /// Routes (or drops) one batch of dead messages.
    fn bury_now(&self, dead: Dead) {
        if self.dead_letters_at_least_once() {
            return self.dead_letter_at_least_once(self.load_dead(dead));
        }
        let router = self.router.as_ref().and_then(|r| r.upgrade());
        match router {
            Some(router) if self.args().dead_letter_exchange.is_some() => {
                router.dead_letter(self, self.load_dead(dead))
            }
            _ => {
                self.unspool_dropped(&dead);
                if let Some(qs) = &self.store {
                    let removals = dead
                        .iter()
                        .filter_map(|(e, _)| qs.removal_of(e.slot.store_id()));
                    self.submit_ops(removals.collect());
                }
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
        let mut dead = Dead::new();
        {
            let mut inner = self.lock();
            if inner.state.is_deleted() {
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
                    prefetch: spec.prefetch,
                },
            );
            inner.had_consumer = true;
            inner.last_used_ms = now_ms();
            self.exec(&mut inner, Command::AddConsumer(spec), &mut dead, None);
            self.run(&mut inner, &mut dead);
        }
        self.bury(dead);
        Ok(())
    }

    /// Removes a consumer. Returns true when the queue is auto-delete and this was its
    /// last consumer: the caller deletes it.
    pub fn cancel(&self, consumer: ConsumerId) -> bool {
        let mut dead = Dead::new();
        let delete = {
            let mut inner = self.lock();
            inner.consumers.remove(&consumer);
            self.exec(
                &mut inner,
                Command::RemoveConsumer(consumer),
                &mut dead,
                None,
            );
            inner.last_used_ms = now_ms();
            self.run(&mut inner, &mut dead);
            self.def.auto_delete
                && inner.had_consumer
                && inner.consumers.is_empty()
                && !inner.state.is_deleted()
        };
        self.bury(dead);
        delete
    }

    /// Acks delivered messages. Their removals go into `writes` when given (a
    /// transaction), else straight to the store.
    pub fn settle(&self, offsets: impl OffsetList, writes: Option<&mut journal::Writes>) {
        let mut dead = Dead::new();
        {
            let mut inner = self.lock();
            let ops = writes.map(|w| w.ops());
            let reply = self.exec(
                &mut inner,
                Command::Settle(offsets.into_vec()),
                &mut dead,
                ops,
            );
            if let Reply::Settled(n) = reply {
                inner.counters.ack += n as u64;
            }
            self.run(&mut inner, &mut dead);
        }
        self.bury(dead);
    }

    /// basic.reject / nack without requeue: dead-letters (or drops) the messages.
    pub fn reject(&self, offsets: impl OffsetList) {
        let mut dead = Dead::new();
        {
            let mut inner = self.lock();
            self.exec(
                &mut inner,
                Command::Reject(offsets.into_vec()),
                &mut dead,
                None,
            );
            self.run(&mut inner, &mut dead);
        }
        self.bury(dead);
    }

    /// Returns delivered messages to their place, marked redelivered.
    pub fn requeue(&self, offsets: impl OffsetList) {
        let mut dead = Dead::new();
        {
            let mut inner = self.lock();
            self.exec(
                &mut inner,
                Command::Requeue(offsets.into_vec()),
                &mut dead,
                None,
            );
            self.run(&mut inner, &mut dead);
        }
        self.bury(dead);
    }

    /// An auto-ack delivery was written to its consumer's socket: its stored copy goes
    /// (added to `writes`, which the connection hands to the journal after the write).
    pub fn settle_written_auto_ack(&self, entry: &Entry, writes: &mut journal::Writes) {
        writes.ops().extend(self.delivery_record(entry, true));
    }

    /// A delivery that never reached its client goes back unchanged.
    pub fn return_undelivered(&self, entry: Entry) {
        let mut dead = Dead::new();
        {
            let mut inner = self.lock();
            if inner.state.is_deleted() {
                return;
            }
            self.exec(
                &mut inner,
                Command::ReturnUndelivered(entry),
                &mut dead,
                None,
            );
            self.run(&mut inner, &mut dead);
        }
        self.bury(dead);
    }

    /// basic.get: the head and the count of messages left. When the head's body is in
    /// the store only, it is read first (the caller waits for that read).
    pub fn get(&self, no_ack: bool) -> Option<(Entry, u32)> {
        // Each read loads the head (or the message is gone); a few tries cover heads
        // that change between the read and the next look.
        for _ in 0..8 {
            match self.try_get(no_ack) {
                Ok(got) => return got,
                Err(()) => self.load_head_now(),
            }
        }
        None
    }

    /// `get`, unless the head's body is in the store only (`Err`, nothing taken).
    fn try_get(&self, no_ack: bool) -> Result<Option<(Entry, u32)>, ()> {
        let mut dead = Dead::new();
        let got = {
            let mut inner = self.lock();
            inner.last_used_ms = now_ms();
            let got = match self.exec(&mut inner, Command::Get { no_ack }, &mut dead, None) {
                Reply::Got(got) => got,
                Reply::HeadNotLoaded => {
                    self.flush(&mut inner);
                    drop(inner);
                    self.bury(dead);
                    return Err(());
                }
                _ => None,
            };
            let got = got.map(|(entry, left)| {
                let c = &mut inner.counters;
                if no_ack {
                    c.get_no_ack += 1;
                } else {
                    c.get += 1;
                }
                c.redeliver += u64::from(entry.redelivered);
                inner.store_ops.extend(self.delivery_record(&entry, no_ack));
                (entry, left)
            });
            self.prefetch(&mut inner);
            self.flush(&mut inner);
            got
        };
        self.bury(dead);
        Ok(got)
    }

    /// queue.purge: drops ready messages, returns how many.
    pub fn purge(&self) -> usize {
        let mut dead = Dead::new();
        let mut inner = self.lock();
        let reply = self.exec(&mut inner, Command::Purge, &mut dead, None);
        self.flush(&mut inner);
        drop(inner);
        self.bury(dead);
        match reply {
            Reply::Purged(n) => n,
            _ => 0,
        }
    }

    /// Counts for declare-ok and friends. Messages already expired at the head are
    /// dropped (dead-lettered) first, so that they are not counted, as RabbitMQ.
    pub fn counts(&self) -> QueueCounts {
        let mut dead = Dead::new();
        let counts = {
            let mut inner = self.lock();
            self.exec(&mut inner, Command::Expire, &mut dead, None);
            self.flush(&mut inner);
            QueueCounts {
                messages: inner.state.ready_count() as u32,
                consumers: inner.consumers.len() as u32,
            }
        };
        self.bury(dead);
        counts
    }

    /// The queue's consumers, for listings.
    pub fn consumers(&self) -> Vec<ConsumerInfo> {
        self.lock()
            .consumers
            .values()
            .map(|r| ConsumerInfo {
                tag: r.tag.clone(),
                ack_required: !r.no_ack,
                exclusive: r.exclusive,
                prefetch: r.prefetch,
                channel: r.sink.channel(),
            })
            .collect()
    }

    /// Counts, bytes and counters for listings.
    pub fn snapshot(&self) -> QueueSnapshot {
        let inner = self.lock();
        let (ready, unacked) = (inner.state.ready_count(), inner.state.unacked_count());
        let per_entry = std::mem::size_of::<Entry>() + std::mem::size_of::<Message>();
        QueueSnapshot {
            ready: ready as u64,
            unacked: unacked as u64,
            ready_bytes: inner.state.ready_bytes() as u64,
            ready_bytes_in_memory: inner.state.loaded_bytes() as u64,
            ready_paged: inner.state.paged_count() as u64,
            consumers: inner.consumers.len() as u64,
            memory: (inner.state.loaded_bytes() + (ready + unacked) * per_entry) as u64,
            counters: inner.counters,
            dead_letters: {
                let (n, bytes) = self.dead_letters.held();
                (n as u64, bytes as u64)
            },
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
        // As RabbitMQ: only ready messages make a queue non-empty; unacked ones do not.
        if if_empty && inner.state.ready_count() > 0 {
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
        self.dead_letters.clear();
        let mut dead = Dead::new();
        let mut inner = self.lock();
        for (_, c) in inner.consumers.drain() {
            c.sink.cancelled(c.tag.clone());
        }
        let reply = self.exec(&mut inner, Command::Delete, &mut dead, None);
        self.flush(&mut inner);
        drop(inner);
        self.bury(dead);
        match reply {
            Reply::Purged(n) => n as u32,
            _ => 0,
        }
    }

    /// Whether the queue has been deleted.
    pub fn is_deleted(&self) -> bool {
        self.lock().state.is_deleted()
    }
}

fn lock_flag(m: &Mutex<bool>) -> std::sync::MutexGuard<'_, bool> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn lock_in_flight(m: &Mutex<(usize, usize)>) -> std::sync::MutexGuard<'_, (usize, usize)> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    /// A consumer's channel that takes nothing: its prefetch is used up, and its
    /// connection is or is not behind with its writes.
    #[derive(Debug)]
    struct FullSink {
        behind: AtomicBool,
        asked: std::sync::atomic::AtomicUsize,
    }

    impl ConsumerSink for FullSink {
        fn has_credit(&self, _: bool) -> bool {
            false
        }
        fn return_credit(&self, _: bool) {}
        fn deliver(&self, delivery: Delivery) -> Result<(), Delivery> {
            Err(delivery)
        }
        fn cancelled(&self, _: Arc<str>) {}
        fn wait_for_credit(&self, _: Weak<Queue>) {}
        fn is_behind(&self) -> bool {
            self.asked.fetch_add(1, Ordering::Relaxed);
            self.behind.load(Ordering::Relaxed)
        }
    }

    fn queue() -> Arc<Queue> {
        let def = QueueDef {
            name: "q".into(),
            durable: false,
            exclusive_owner: None,
            auto_delete: false,
            arguments: FieldTable::default(),
        };
        let args = QueueArgs::parse(&def.arguments).expect("no arguments");
        Queue::new("/", def, args, None, None)
    }

    fn fill(q: &Queue, n: usize, size: usize) {
        let body = Bytes::from(vec![0u8; size]);
        for _ in 0..n {
            q.enqueue(Arc::new(Message::for_tests(body.clone(), 0)));
        }
    }

    fn consumer(q: &Queue, id: ConsumerId, behind: bool) -> Arc<FullSink> {
        let spec = ConsumerSpec {
            id,
            priority: 0,
            prefetch: 0,
            no_ack: false,
        };
        let sink = Arc::new(FullSink {
            behind: AtomicBool::new(behind),
            asked: Default::default(),
        });
        q.consume(spec, format!("c{id}").into(), false, sink.clone())
            .expect("consume");
        sink
    }

    #[test]
    fn a_backlog_behind_a_lagging_connection_congests_the_queue() {
        let q = queue();
        consumer(&q, 1, true);
        fill(&q, FLOW_READY_MESSAGES - 1, 1);
        assert!(!q.congested(), "a small backlog is fine");
        fill(&q, 1, 1);
        assert!(q.congested());
        assert!(q.still_congested());
    }

    #[test]
    fn a_backlog_in_bytes_counts_too() {
        let q = queue();
        consumer(&q, 1, true);
        fill(&q, 4, FLOW_READY_BYTES / 4);
        assert!(q.congested());
    }

    #[test]
    fn consumers_held_back_by_their_own_prefetch_never_congest() {
        // A slow application: its channel is full of unacked messages, its socket is not.
        let q = queue();
        consumer(&q, 1, false);
        fill(&q, FLOW_READY_MESSAGES * 2, 1);
        assert!(!q.congested());
    }

    #[test]
    fn a_backlogged_queue_looks_at_its_consumers_now_and_then() {
        let q = queue();
        let sink = consumer(&q, 1, false);
        fill(&q, FLOW_READY_MESSAGES, 1);
        let per_round = FLOW_CHECK_EVERY as usize + 1;
        let asked = sink.asked.load(Ordering::Relaxed);
        fill(&q, per_round * 10, 1);
        assert_eq!(sink.asked.load(Ordering::Relaxed) - asked, 10);
        // A consumer's connection that falls behind is noticed within a round.
        sink.behind.store(true, Ordering::Relaxed);
        fill(&q, per_round, 1);
        assert!(q.congested());
    }

    #[test]
    fn without_consumers_a_backlog_is_never_congestion() {
        let q = queue();
        fill(&q, FLOW_READY_MESSAGES * 2, 1);
        assert!(!q.congested());
    }

    #[test]
    fn congestion_clears_when_the_backlog_goes() {
        let q = queue();
        consumer(&q, 1, true);
        fill(&q, FLOW_READY_MESSAGES, 1);
        assert!(q.congested());
        q.purge();
        assert!(!q.still_congested());
        assert!(!q.congested());
    }
}
