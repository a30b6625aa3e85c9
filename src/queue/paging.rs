//! Bodies on disk: a durable classic queue keeps the bodies of a window at its head in
//! memory and leaves the other persistent ones in the store, reading them back in order
//! ahead of its consumers.
//!
//! The state machine holds every ready message as a `Queued` whose content is either
//! loaded or `Slot::Paged` (its stored copy's id and size, 40 bytes in all); it
//! delivers only loaded heads. This host side decides what is in memory:
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
//! Transient messages and replicated queues are never paged (a replicated queue's
//! bodies come from its Raft log, which keeps its own copy).

use std::sync::Arc;

use bytes::Bytes;

use super::state::{Offset, Queued};
use super::{Dead, Inner, Message, Queue};
use crate::store::ReadAnswer;

/// Most messages asked from the store in one read.
const MAX_READ_MESSAGES: usize = 8192;

/// Paging state of one queue, under its lock.
#[derive(Debug, Default)]
pub(super) struct Pager {
    /// A read of paged bodies is on its way (one at a time per queue).
    reading: bool,
}

impl Queue {
    /// The body window when this queue pages (durable, classic, with a store).
    fn body_window(&self) -> Option<usize> {
        if self.is_replicated() {
            return None;
        }
        self.store.as_ref().map(|qs| qs.body_window)
    }

    /// After a persistent message entered at `offset`: keeps only its stored copy when
    /// the ready bodies pass the window. True when it did.
    pub(super) fn page_out_if_over(&self, inner: &mut Inner, offset: Offset) -> bool {
        match self.body_window() {
            Some(window) if inner.state.ready_bytes() > window => inner.state.page_out(offset),
            _ => false,
        }
    }

    /// Puts back a recovered entry whose body stayed in the store (`head`: the message
    /// without it; `size`: the body's length). A queue that does not page (never the case
    /// for entries of the message log, which only classic queues write) reads the body
    /// now. False when the entry could not be restored.
    pub fn restore_paged(
        &self,
        offset: Offset,
        head: Message,
        size: usize,
        delivered: bool,
        delivery_count: u32,
    ) -> bool {
        if self.body_window().is_some() {
            let mut inner = self.lock();
            return inner
                .state
                .restore_paged(offset, &head, size, delivered, delivery_count);
        }
        let Some(id) = head.store_id else {
            return false;
        };
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
        let Some(window) = self.body_window() else {
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
        let (Some(qs), Some(me)) = (&self.store, self.me.upgrade()) else {
            return;
        };
        // A paged head behind a full window (loaded messages of lower priority) still
        // gets a batch worth a read.
        let mut budget = window.saturating_sub(state.loaded_bytes());
        if state.head_is_paged() {
            budget = budget.max(window / 4);
        }
        let wanted = state.paged_ahead(budget, MAX_READ_MESSAGES);
        let ids = wanted.iter().map(|&(_, id)| id).collect();
        inner.pager.reading = true;
        qs.store.read_messages(
            ids,
            Box::new(move |answer| {
                runtime.spawn(async move { me.paged_in(wanted, answer) });
            }),
        );
    }

    /// Bodies back from the store: into their messages, then deliveries (and the
    /// expiry of heads that waited for their bodies), then the next read.
    fn paged_in(&self, wanted: Vec<(Offset, u64)>, answer: ReadAnswer) {
        let mut dead = Dead::new();
        {
            let mut inner = self.lock();
            inner.pager.reading = false;
            match answer {
                Ok(blobs) => self.install(&mut inner, &wanted, blobs),
                // Tried again on the next command or timer tick.
                Err(err) => tracing::error!(queue = self.name(), "{err}"),
            }
            self.exec(&mut inner, super::Command::Expire, &mut dead, None);
            self.run(&mut inner, &mut dead);
        }
        self.bury(dead);
    }

    /// Puts bodies read from the store back into their messages. A paged message the
    /// store no longer holds cannot be delivered: it leaves the queue, loudly.
    fn install(&self, inner: &mut Inner, wanted: &[(Offset, u64)], blobs: Vec<Option<Bytes>>) {
        for (&(offset, id), blob) in wanted.iter().zip(blobs) {
            let msg = blob.and_then(|b| Message::decode(&b, Some(id)));
            match msg {
                Some(msg) => {
                    inner.state.page_in(offset, Arc::new(msg));
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
        let qs = self.store.as_ref()?;
        let (tx, rx) = std::sync::mpsc::channel();
        qs.store.read_messages(
            ids,
            Box::new(move |answer| {
                let _ = tx.send(answer);
            }),
        );
        // (On a multi-threaded runtime the worker lets its other tasks move elsewhere
        // while it waits for the disk.)
        let multi_thread = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        if multi_thread {
            tokio::task::block_in_place(|| rx.recv().ok())
        } else {
            rx.recv().ok()
        }
    }

    /// basic.get found the head paged: loads the next few messages at once.
    pub(super) fn load_head_now(&self) {
        let wanted = {
            let inner = self.lock();
            inner.state.paged_ahead(64 << 10, 64)
        };
        if wanted.is_empty() {
            return;
        }
        let ids = wanted.iter().map(|&(_, id)| id).collect();
        match self.read_now(ids) {
            Some(Ok(blobs)) => {
                let mut inner = self.lock();
                self.install(&mut inner, &wanted, blobs);
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
        let ids: Vec<u64> = dead
            .iter()
            .filter(|(q, _)| q.slot.is_paged())
            .filter_map(|(q, _)| q.slot.store_id())
            .collect();
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
