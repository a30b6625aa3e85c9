//! The queue layer's one seam for persistence and confirms. Whoever publishes (a
//! channel, a transaction, the management API, dead-lettering) or settles hands the
//! queue layer what happened, as `Writes`, to the node's `Journal`, and hears back
//! "durable at index N". For classic queues the journal is the node's store and its
//! group commit (one fsync serves every writer); a replicated queue will commit to its
//! Raft log behind the same calls. Store records are built here, below the channels.

use std::future::Future;
use std::sync::Arc;

use super::{Entry, Message, Queue};
use crate::store::{Store, StoreOp};

/// Where a request sits in the journal: the number of the store request that carries
/// it. The writer commits requests in the order it receives them, so the writes of one
/// sender become durable in index order.
pub type LogIndex = u64;

/// What a publish, a transaction or a batch of settlements needs written, gathered
/// before it goes to the journal as one request. Opaque above the queue layer.
#[derive(Debug, Default)]
pub struct Writes {
    ops: Vec<StoreOp>,
}

impl Writes {
    /// Nothing to write.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// A message routed to `queues`: stored once, with an entry in each durable queue
    /// (when the message is persistent). These writes must be handed to the journal
    /// before the message is enqueued, so that no ack of it can overtake them.
    pub fn publish(&mut self, queues: &[Arc<Queue>], msg: &Message) {
        let Some(id) = msg.store_id else { return };
        let first = self.ops.len();
        for q in queues {
            q.persist_ops(msg, &mut self.ops);
        }
        if self.ops.len() > first {
            self.ops.insert(
                first,
                StoreOp::PutMessage {
                    msg_id: id,
                    blob: msg.stored_blob(),
                },
            );
        }
    }

    /// The stored copy of `entry` in `queue` goes (it moved elsewhere or left).
    pub fn forget(&mut self, queue: &Queue, entry: &Entry) {
        if let Some(qs) = queue.store() {
            match queue.replica() {
                // A replicated queue's removal is a record of its own log.
                Some(log) => log.submit_ops(qs.removal(entry).into_iter().collect()),
                None => self.ops.extend(qs.removal(entry)),
            }
        }
    }

    /// Adds `other`'s writes after these.
    pub fn append(&mut self, mut other: Writes) {
        self.ops.append(&mut other.ops);
    }

    /// The records, for the queue layer's own additions.
    pub(super) fn ops(&mut self) -> &mut Vec<StoreOp> {
        &mut self.ops
    }
}

/// The node's journal: today its store. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Journal {
    store: Store,
}

impl Journal {
    /// The journal of a node whose queues live in `store`.
    pub fn new(store: Store) -> Journal {
        Journal { store }
    }

    /// Hands `writes` over as one request, returns its index, and calls `durable` once
    /// they are on disk together with everything handed over before them (it runs on
    /// the writer's thread: it must be quick, a send on a channel). Empty `writes` are a
    /// barrier: answered once everything before them is durable.
    pub fn append_then(&self, writes: Writes, durable: Box<dyn FnOnce() + Send>) -> LogIndex {
        self.store.commit_then(writes.ops, durable)
    }

    /// `append_then` for async callers: resolves once the writes are durable.
    pub fn append_wait(&self, writes: Writes) -> impl Future<Output = ()> + Send + use<> {
        self.store.commit(writes.ops)
    }

    /// Hands `writes` over without waiting for them: acks and delivery records, where a
    /// crash before they are durable means a redelivery, never a loss.
    pub fn append(&self, writes: Writes) {
        self.store.submit(writes.ops);
    }

    /// Whether more waits for the disk than it should: publishers should pause.
    pub fn is_congested(&self) -> bool {
        self.store.is_congested()
    }
}
