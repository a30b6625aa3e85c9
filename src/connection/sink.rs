//! The bridge from queues to a connection: each channel's `ChannelLink` implements
//! `ConsumerSink`, so a queue can hand it deliveries (through the connection's event
//! channel) and ask whether the channel can take more (prefetch, socket backlog).

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

use tokio::sync::mpsc::UnboundedSender;

use crate::broker::remote_consume::RemoteDelivery;
use crate::broker::reply_to::ReplySink;
use crate::queue::{ConsumerSink, Delivery, Message, Queue};

/// Deliveries queued for a connection's socket beyond which queues stop handing it
/// more until it has written them out: bounds memory for fast queues and slow sockets.
pub const MAX_PENDING_DELIVERIES: usize = 2048;
/// Bytes of message bodies and properties queued for a connection's socket beyond which
/// queues stop handing it more: large messages reach the count above only at gigabytes.
pub const MAX_PENDING_BYTES: usize = 8 * 1024 * 1024;
/// Deliveries queued for a connection's socket from which it counts as behind: its
/// queues then hold their publishers back once they have a backlog (queue flow control).
pub const BEHIND_PENDING_DELIVERIES: usize = 256;

/// What queues and the store tell a connection task.
#[derive(Debug)]
pub enum ConnEvent {
    /// A message for a consumer on this channel.
    Deliver(u16, Delivery),
    /// A message for a consumer on this channel from a queue hosted on another node.
    RemoteDeliver(u16, RemoteDelivery),
    /// The consumer with this tag was cancelled by the broker (queue deleted).
    Cancelled(u16, Arc<str>),
    /// These publishes (confirm sequence numbers) of this channel are stored.
    Stored(u16, Vec<u64>),
    /// These publishes of this channel could not be made safe (a queue's home node did
    /// not take them): nack them.
    Nacked(u16, Vec<u64>),
    /// This channel's tx.commit is durable.
    TxCommitted(u16),
    /// The broker closes the connection (vhost or user deleted, closed by an operator).
    Close(crate::protocol::AmqpError),
    /// A direct reply-to message for the reply consumer with this tag.
    Reply(u16, Arc<str>, Arc<Message>),
    /// Channel-wide credit was given back unused: queues waiting for credit may try
    /// again (the connection kicks them after handling its events).
    CreditBack,
}

/// State of a connection that queues may touch.
#[derive(Debug)]
pub struct ConnShared {
    /// The connection's node-unique id.
    pub id: u64,
    /// Events into the connection task.
    pub tx: UnboundedSender<ConnEvent>,
    /// Deliveries handed to the connection and not yet written to its socket.
    pub pending: AtomicUsize,
    /// Their size in bytes.
    pub pending_bytes: AtomicUsize,
    /// Queues that stopped delivering for lack of credit and want a kick.
    pub waiting: Mutex<Vec<Weak<Queue>>>,
    /// Congested queues this connection published to: it reads no more publishes
    /// until they clear (or a short while passes).
    pub held_by: Mutex<Vec<Arc<Queue>>>,
    /// This connection fed the store while it was congested: it reads no more
    /// publishes until the store catches up.
    pub held_by_store: AtomicBool,
    /// Numbers of the open channels (for listings; changed on channel open and close).
    pub channels: Mutex<Vec<u16>>,
    /// Message counters of this connection's channels (metrics).
    pub stats: ConnStats,
}

/// What a connection's channels did, for the metrics endpoint and the management API.
/// Only the connection's own task writes them (relaxed atomics on its own cache lines:
/// no contention, no lock); readers sum them on demand. When the connection ends they
/// are added to the broker's totals of closed connections, so totals never go down.
#[derive(Debug, Default)]
pub struct ConnStats {
    /// basic.publish received.
    pub published: AtomicU64,
    /// Publishes confirmed (basic.ack sent to a confirm-mode publisher).
    pub confirmed: AtomicU64,
    /// Unroutable mandatory publishes returned.
    pub returned: AtomicU64,
    /// Unroutable publishes dropped.
    pub dropped: AtomicU64,
    /// Deliveries to consumers that ack.
    pub delivered_ack: AtomicU64,
    /// Deliveries to auto-ack consumers.
    pub delivered_no_ack: AtomicU64,
    /// basic.get-ok with acks expected.
    pub get_ack: AtomicU64,
    /// basic.get-ok in auto-ack mode.
    pub get_no_ack: AtomicU64,
    /// Deliveries and gets with the redelivered flag.
    pub redelivered: AtomicU64,
    /// Messages acknowledged by the client.
    pub acked: AtomicU64,
}

impl ConnStats {
    /// Adds `n` to a counter (only its connection's task calls this).
    #[inline]
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.store(counter.load(Ordering::Relaxed) + n, Ordering::Relaxed);
    }

    /// Every counter, in field order.
    pub fn values(&self) -> [u64; 10] {
        [
            &self.published,
            &self.confirmed,
            &self.returned,
            &self.dropped,
            &self.delivered_ack,
            &self.delivered_no_ack,
            &self.get_ack,
            &self.get_no_ack,
            &self.redelivered,
            &self.acked,
        ]
        .map(|c| c.load(Ordering::Relaxed))
    }
}

impl ConnShared {
    /// Takes the queues waiting for credit.
    pub fn take_waiting(&self) -> Vec<Weak<Queue>> {
        std::mem::take(&mut *self.waiting.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Notes that a publish went to a congested queue.
    pub fn held_by(&self, queue: &Arc<Queue>) {
        let mut held = self.held_by.lock().unwrap_or_else(|p| p.into_inner());
        if !held.iter().any(|q| Arc::ptr_eq(q, queue)) {
            held.push(queue.clone());
        }
    }
}

/// One channel, as its consumers' queues see it.
#[derive(Debug)]
pub struct ChannelLink {
    /// Channel number.
    pub channel: u16,
    /// Its connection.
    pub conn: Arc<ConnShared>,
    /// basic.qos global=true: unacked limit shared by the channel's consumers (0 = none).
    pub global_prefetch: AtomicU32,
    /// Unacked deliveries of the channel's consumers.
    pub global_unacked: AtomicU32,
}

impl ConsumerSink for ChannelLink {
    fn channel(&self) -> Option<(u64, u16)> {
        Some((self.conn.id, self.channel))
    }

    fn has_credit(&self, no_ack: bool) -> bool {
        if self.conn.tx.is_closed()
            || self.conn.pending.load(Ordering::Relaxed) >= MAX_PENDING_DELIVERIES
            || self.conn.pending_bytes.load(Ordering::Relaxed) >= MAX_PENDING_BYTES
        {
            return false;
        }
        if no_ack {
            return true;
        }
        // Take the channel-wide credit now, inside the queue's delivery loop, so that one
        // run cannot hand out more than the global prefetch allows.
        let limit = self.global_prefetch.load(Ordering::Relaxed);
        self.global_unacked
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (limit == 0 || n < limit).then_some(n + 1)
            })
            .is_ok()
    }

    fn return_credit(&self, no_ack: bool) {
        if no_ack {
            return;
        }
        self.global_unacked.fetch_sub(1, Ordering::Relaxed);
        // Another queue may have found the channel full meanwhile and now waits for a
        // kick: wake the connection, which kicks its waiting queues.
        let waiting = !self
            .conn
            .waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty();
        if waiting {
            let _ = self.conn.tx.send(ConnEvent::CreditBack);
        }
    }

    fn deliver(&self, delivery: Delivery) -> Result<(), Delivery> {
        let no_ack = delivery.no_ack;
        let size = delivery.entry.msg.size();
        match self
            .conn
            .tx
            .send(ConnEvent::Deliver(self.channel, delivery))
        {
            Ok(()) => {
                self.conn.pending.fetch_add(1, Ordering::Relaxed);
                self.conn.pending_bytes.fetch_add(size, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                if !no_ack {
                    self.global_unacked.fetch_sub(1, Ordering::Relaxed);
                }
                match e.0 {
                    ConnEvent::Deliver(_, d) => Err(d),
                    _ => unreachable!("sent a Deliver"),
                }
            }
        }
    }

    fn cancelled(&self, consumer_tag: Arc<str>) {
        let _ = self
            .conn
            .tx
            .send(ConnEvent::Cancelled(self.channel, consumer_tag));
    }

    fn wait_for_credit(&self, queue: Weak<Queue>) {
        if self.conn.tx.is_closed() {
            return;
        }
        let mut waiting = self.conn.waiting.lock().unwrap_or_else(|p| p.into_inner());
        if !waiting.iter().any(|w| w.ptr_eq(&queue)) {
            waiting.push(queue);
        }
    }

    fn is_behind(&self) -> bool {
        self.conn.pending.load(Ordering::Relaxed) >= BEHIND_PENDING_DELIVERIES
    }
}

impl ReplySink for ChannelLink {
    fn reply(&self, consumer_tag: Arc<str>, msg: Arc<Message>) -> bool {
        self.conn
            .tx
            .send(ConnEvent::Reply(self.channel, consumer_tag, msg))
            .is_ok()
    }
}
