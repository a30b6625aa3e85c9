//! Bodies on disk: a durable classic queue keeps the bodies of a window at its head in
//! memory and leaves the other persistent ones in the store, reading them back in order
//! ahead of its consumers.
//!
//! The state machine holds every ready message as a `Queued` whose content is either
//! loaded or `Slot::Paged` (its stored copy's id and size; 32 bytes in all in its ready
//! list, `state::ready`); it delivers only loaded heads. This host side decides what is
//! in memory:
//! - a persistent message enqueued (or recovered) while the queue's ready bodies pass
//!   the window (`QueueStore::body_window`) keeps only its stored copy: its body is
//!   already on its way to the store, which the publish handed it to before the enqueue;
//! - while less than half the window is loaded (or the next message to deliver is not),
//!   the paged messages next in delivery order are asked from the store
//!   (`Store::read_messages`, answered by the writer thread after what was submitted
//!   before) and put back when they arrive, on a runtime task: the queue's lock is never
//!   held across a read, and its callers never wait for one, except basic.get and a
//!   dead letter of a head that a length limit dropped before it was loaded, which read
//!   the few messages they need and wait for them (outside the lock).
//!
//! Messages that must not survive a restart (transient ones, and every message of a
//! non-durable queue) have no stored copy to fall back on. While memory runs short
//! (`Paging::memory_short`, above half the memory alarm's threshold, as RabbitMQ pages
//! at `vm_memory_high_watermark_paging_ratio`), those past the window are written to
//! the queue's scratch key in the store (`Spool`, under `store::SCRATCH_PREFIX`) and
//! paged like the others: on enqueue, and from the tail on the queue's timer for what
//! was loaded before memory ran short. Their scratch copy goes once they are back in
//! memory or leave the queue, and the store purges every scratch key when it opens, so
//! a restart still discards them.
//!
//! A replicated queue's host pages the same way: every committed message has a stored
//! copy (its group's machine keeps them in the message log, see `replica::machine`),
//! named by the message's record key, which the host reads through its log
//! (`ReplicaLog::read_bodies`). Nothing of it goes to scratch copies.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use bytes::Bytes;

use super::state::{Offset, Queued, Slot};
use super::{Dead, Inner, Message, PagedHead, Queue};
use crate::store::{ReadAnswer, Store, StoreOp};

/// Where a queue's paged bodies are read from.
enum PageSource<'q> {
    /// The node's store, by message id.
    Store(&'q Store),
    /// A replicated queue's machine, by record key.
    Replica(&'q crate::replica::ReplicaLog),
}

impl PageSource<'_> {
    fn read(&self, ids: Vec<u64>, done: Box<dyn FnOnce(ReadAnswer) + Send>) {
        match self {
            PageSource::Store(store) => store.read_messages(ids, done),
            PageSource::Replica(log) => log.read_bodies(ids, done),
        }
    }
}

/// Most messages asked from the store in one read.
const MAX_READ_MESSAGES: usize = 8192;

/// Most messages a queue's timer parks on disk at once while memory runs short.
const MAX_SHED_MESSAGES: usize = 16384;

/// The node's paging settings, shared by its queues.
#[derive(Debug, Clone)]
pub struct Paging {
    /// Body bytes of ready messages a queue keeps in memory at its head
    /// (`queue_body_window`).
    pub body_window: usize,
    /// True while memory runs short (`broker::memory`): bodies without a stored copy
    /// go to disk too.
    pub memory_short: Arc<AtomicBool>,
}

/// Where a queue parks the bodies of its messages that must not survive a restart
/// while memory runs short: the node's store, under a scratch key of its own.
#[derive(Debug, Clone)]
pub struct Spool {
    /// The node's store.
    pub store: Store,
    /// The queue's scratch key (starts with `store::SCRATCH_PREFIX`).
    pub key: Arc<str>,
    /// The node's message id counter (a scratch copy is a stored message).
    pub ids: Arc<AtomicU64>,
    /// The node's paging settings.
    pub paging: Paging,
}

/// Paging state of one queue, under its lock.
#[derive(Debug, Default)]
pub(super) struct Pager {
    /// A read of paged bodies is on its way (one at a time per queue).
    reading: bool,
    /// Scratch copies to write or remove, handed to the store with the lock's other
    /// records (`Queue::flush`) and always before a read.
    spool_ops: Vec<StoreOp>,
}

impl Queue {
    /// The body window when this queue pages persistent messages (durable, classic,
    /// with a store).
    fn body_window(&self) -> Option<usize> {
        self.store.as_ref().map(|qs| qs.body_window)
    }

    /// Where this queue parks bodies without a stored copy, unless it is replicated.
    fn spool(&self) -> Option<&Spool> {
        self.spool.get().filter(|_| !self.is_replicated())
    }

    /// The scratch key of its transient messages' parked copies, if it has one.
    pub fn scratch_key(&self) -> Option<Arc<str>> {
        self.spool.get().map(|sp| sp.key.clone())
    }

    /// The body window when this queue pages anything, and where it reads from.
    fn page_source(&self) -> Option<(usize, PageSource<'_>)> {
        if self.is_replicated() {
            return Some((self.body_window()?, PageSource::Replica(self.replica()?)));
        }
        if let (Some(window), Some(qs)) = (self.body_window(), &self.store) {
            return Some((window, PageSource::Store(&qs.store)));
        }
        self.spool()
            .map(|sp| (sp.paging.body_window, PageSource::Store(&sp.store)))
    }

    /// The spool, while memory runs short.
    fn short_spool(&self) -> Option<&Spool> {
        self.spool()
            .filter(|sp| sp.paging.memory_short.load(Ordering::Relaxed))
    }

    /// After a message without a stored copy (or whose copy was not paged) entered at
    /// `offset`: parks its body on disk when memory runs short and the ready bodies
    /// pass the window.
    pub(super) fn spool_if_short(&self, inner: &mut Inner, offset: Offset) {
        let Some(sp) = self.short_spool() else {
            return;
        };
        if inner.state.ready_bytes() > sp.paging.body_window {
            self.spool_one(inner, sp, offset);
        }
    }

    /// On the queue's timer, while memory runs short: the loaded bodies past the window
    /// (loaded before memory ran short) go to disk, the last to be delivered first.
    pub(super) fn shed_if_short(&self, inner: &mut Inner) {
        let Some(sp) = self.short_spool() else {
            return;
        };
        let loaded = inner.state.loaded_bytes();
        let window = sp.paging.body_window;
        if loaded <= window {
            return;
        }
        for (offset, persistent) in inner.state.loaded_tail(loaded - window, MAX_SHED_MESSAGES) {
            // A persistent message of a durable queue has its own copy already.
            if !(persistent && self.store.is_some() && inner.state.page_out(offset)) {
                self.spool_one(inner, sp, offset);
            }
        }
    }

    /// Parks the body of the loaded ready message at `offset` in the scratch key.
    fn spool_one(&self, inner: &mut Inner, sp: &Spool, offset: Offset) {
        let id = sp.ids.fetch_add(1, Ordering::Relaxed);
        if let Some(msg) = inner.state.spool_out(offset, id) {
            let ops = &mut inner.pager.spool_ops;
            ops.push(StoreOp::PutMessage {
                msg_id: id,
                blob: msg.stored_blob(),
            });
            ops.push(StoreOp::Enqueue {
                queue: sp.key.clone(),
                offset: id,
                msg_id: id,
            });
        }
    }

    /// The scratch copy of a message back in memory, or leaving the queue, goes.
    pub(super) fn unspool(&self, inner: &mut Inner, slot: &Slot) {
        if let (Some(id), Some(sp)) = (slot.spool_id(), self.spool.get()) {
            inner.pager.spool_ops.push(StoreOp::Remove {
                queue: sp.key.clone(),
                offset: id,
            });
        }
    }

    /// The queue is deleted: every scratch copy goes.
    pub(super) fn unspool_all(&self, inner: &mut Inner) {
        if let Some(sp) = self.spool.get() {
            inner.pager.spool_ops.push(StoreOp::PurgeQueue {
                queue: sp.key.clone(),
            });
        }
    }

    /// Dead messages dropped (no dead-letter exchange), outside the lock: their scratch
    /// copies go.
    pub(super) fn unspool_dropped(&self, dead: &Dead) {
        let Some(sp) = self.spool.get() else {
            return;
        };
        let ops: Vec<StoreOp> = dead
            .iter()
            .filter_map(|(q, _)| q.slot.spool_id())
            .map(|id| StoreOp::Remove {
                queue: sp.key.clone(),
                offset: id,
            })
            .collect();
        if !ops.is_empty() {
            sp.store.submit(ops);
        }
    }

    /// Hands the scratch copies' records to the store.
    pub(super) fn flush_spool(&self, inner: &mut Inner) {
        if inner.pager.spool_ops.is_empty() {
            return;
        }
        let ops = std::mem::take(&mut inner.pager.spool_ops);
        if let Some(sp) = self.spool.get() {
            sp.store.submit(ops);
        }
    }

    /// After a persistent message entered at `offset`: keeps only its stored copy when
    /// the ready bodies pass the window. True when it did.
    pub(super) fn page_out_if_over(&self, inner: &mut Inner, offset: Offset) -> bool {
        match self.body_window() {
            Some(window) if inner.state.ready_bytes() > window => inner.state.page_out(offset),
            _ => false,
        }
    }

    /// Puts back a recovered entry whose body stayed in the store under `id` (`head`:
    /// what ordering and expiry need of it; `size`: the body's length). A queue that
    /// does not page (never the case for entries of the message log, which only classic
    /// queues write) reads the body now. False when the entry could not be restored.
    pub fn restore_paged(
        &self,
        offset: Offset,
        id: u64,
        head: PagedHead,
        size: usize,
        delivered: bool,
        delivery_count: u32,
    ) -> bool {
        if self.body_window().is_some() {
            let mut inner = self.lock();
            inner
                .state
                .restore_paged(offset, id, head, size, delivered, delivery_count);
            return true;
        }
        let msg = match self.read_now(vec![id]) {
            Some(Ok(mut blobs)) => blobs
                .pop()
                .flatten()
                .and_then(|b| Message::decode(&b, Some(id))),
            _ => None,
        };
        match msg {
            Some(msg) => {
                self.restore(offset, Arc::new(msg), delivered, delivery_count);
                true
            }
            None => false,
        }
    }

    /// Asks the store for the next paged bodies when the loaded window runs low (or the
    /// next message to deliver is paged) and no read is on its way. Needs a runtime to
    /// put them back on; without one (unit tests) nothing is read.
    pub(super) fn prefetch(&self, inner: &mut Inner) {
        let Some((window, store)) = self.page_source() else {
            return;
        };
        let state = &inner.state;
        if inner.pager.reading || state.paged_count() == 0 || state.is_deleted() {
            return;
        }
        if state.loaded_bytes() >= window / 2 && !state.head_is_paged() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let Some(me) = self.me.upgrade() else {
            return;
        };
        // A paged head behind a full window (loaded messages of lower priority) still
        // gets a batch worth a read.
        let mut budget = window.saturating_sub(state.loaded_bytes());
        if state.head_is_paged() {
            budget = budget.max(window / 4);
        }
        let wanted = state.paged_ahead(budget, MAX_READ_MESSAGES);
        let ids = wanted.iter().map(|&(_, id, _)| id).collect();
        inner.pager.reading = true;
        // Scratch copies must be written before they are read.
        self.flush_spool(inner);
        store.read(
            ids,
            Box::new(move |answer| {
                runtime.spawn(async move { me.paged_in(wanted, answer) });
            }),
        );
    }

    /// Bodies back from the store: into their messages, then deliveries (and the
    /// expiry of heads that waited for their bodies), then the next read.
    fn paged_in(&self, wanted: Vec<(Offset, u64, bool)>, answer: ReadAnswer) {
        let mut dead = Dead::new();
        {
            let mut inner = self.lock();
            inner.pager.reading = false;
            match answer {
                Ok(blobs) => self.install(&mut inner, &wanted, blobs),
                // Tried again on the next command or timer tick.
                Err(err) if err.not_ready => tracing::debug!(queue = self.name(), "{err}"),
                Err(err) => tracing::error!(queue = self.name(), "{err}"),
            }
            self.exec(&mut inner, super::Command::Expire, &mut dead, None);
            self.run(&mut inner, &mut dead);
        }
        self.bury(dead);
    }

    /// Puts bodies read from the store back into their messages (a scratch copy then
    /// goes). A paged message the store no longer holds cannot be delivered: it leaves
    /// the queue, loudly.
    fn install(
        &self,
        inner: &mut Inner,
        wanted: &[(Offset, u64, bool)],
        blobs: Vec<Option<Bytes>>,
    ) {
        for (&(offset, id, spooled), blob) in wanted.iter().zip(blobs) {
            // A scratch copy's message has no stored copy of its own.
            let own_id = (!spooled).then_some(id);
            let msg = blob.and_then(|b| Message::decode(&b, own_id));
            if spooled && let Some(sp) = self.spool.get() {
                inner.pager.spool_ops.push(StoreOp::Remove {
                    queue: sp.key.clone(),
                    offset: id,
                });
            }
            match msg {
                Some(msg) => {
                    inner.state.page_in(offset, id, Arc::new(msg));
                }
                None => {
                    if inner.state.drop_unreadable(offset).is_some() {
                        tracing::error!(
                            queue = self.name(),
                            msg_id = id,
                            "a message kept on disk cannot be read back from the store; \
                             it leaves the queue"
                        );
                    }
                }
            }
        }
    }

    /// Reads the paged bodies `wanted` now and waits for them (outside the queue's
    /// lock): for basic.get and dead letters, which need them before they can answer.
    fn read_now(&self, ids: Vec<u64>) -> Option<ReadAnswer> {
        let (_, source) = self.page_source()?;
        crate::store::read_blocking(|done| source.read(ids, done))
    }

    /// basic.get found the head paged: loads the next few messages at once.
    pub(super) fn load_head_now(&self) {
        let wanted = {
            let mut inner = self.lock();
            self.flush_spool(&mut inner);
            inner.state.paged_ahead(64 << 10, 64)
        };
        if wanted.is_empty() {
            return;
        }
        let ids = wanted.iter().map(|&(_, id, _)| id).collect();
        match self.read_now(ids) {
            Some(Ok(blobs)) => {
                let mut inner = self.lock();
                self.install(&mut inner, &wanted, blobs);
                self.flush_spool(&mut inner);
            }
            Some(Err(err)) => tracing::error!(queue = self.name(), "{err}"),
            None => {}
        }
    }

    /// Dead letters whose bodies are on disk only (heads a length limit dropped before
    /// they were loaded) get them, in their order; those the store cannot give back are
    /// dropped, loudly.
    pub(super) fn load_dead(
        &self,
        dead: Vec<(Queued, super::DeathReason)>,
    ) -> Vec<(super::Entry, super::DeathReason)> {
        let ids: Vec<u64> = dead.iter().filter_map(|(q, _)| q.slot.paged_id()).collect();
        let mut blobs = match ids.is_empty() {
            true => Vec::new(),
            false => match self.read_now(ids.clone()) {
                Some(Ok(blobs)) => blobs,
                Some(Err(err)) => {
                    tracing::error!(queue = self.name(), "{err}");
                    vec![None; ids.len()]
                }
                None => vec![None; ids.len()],
            },
        }
        .into_iter();
        // Their scratch copies go once read (the dead letters are new messages).
        self.unspool_dropped(&dead);
        let mut out = Vec::with_capacity(dead.len());
        for (queued, reason) in dead {
            let id = queued.slot.store_id();
            match queued.into_entry() {
                Ok(entry) => out.push((entry, reason)),
                Err(mut queued) => {
                    let msg = blobs.next().flatten().and_then(|b| Message::decode(&b, id));
                    match msg {
                        Some(msg) => {
                            queued.slot = super::state::Slot::Loaded(Arc::new(msg));
                            if let Ok(entry) = queued.into_entry() {
                                out.push((entry, reason));
                            }
                        }
                        None => tracing::error!(
                            queue = self.name(),
                            msg_id = id,
                            "a dead letter kept on disk cannot be read back from the store; \
                             it is dropped"
                        ),
                    }
                }
            }
        }
        out
    }
}
