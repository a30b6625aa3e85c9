//! At-least-once dead-lettering (`x-dead-letter-strategy: at-least-once` on a replicated
//! queue with `x-overflow: reject-publish`), as RabbitMQ's quorum queues do it: a dead
//! letter is not removed when it dies but moved, through the queue's log, to the dead
//! letters its group holds; the leader's host republishes it and removes it (again
//! through the log) only once every queue it was routed to has taken it durably. A dead
//! letter with no target yet (the exchange or the queues are missing), or one a target
//! refused or did not answer for, is published again every [`RETRY_EVERY`]; a new leader
//! publishes again every dead letter its group still holds. Targets may so receive a
//! message twice, never lose it.
//!
//! RabbitMQ's worker waits `dead_letter_worker_publisher_confirm_timeout` (minutes)
//! before it publishes again; Warren retries sooner, since a try is cheap.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::Notify;

use super::{DeathReason, Message, Queue};
use crate::replica::ReplicaRecord;

/// How long a dead letter that was not taken waits before it is published again.
pub const RETRY_EVERY: Duration = Duration::from_secs(2);

/// How long one publication may wait for its targets before it counts as failed.
const ANSWER_LIMIT: Duration = Duration::from_secs(30);

/// One dead letter the host holds for its targets.
#[derive(Debug)]
struct Pending {
    msg: Arc<Message>,
    reason: DeathReason,
    /// A publication of it is under way.
    in_flight: bool,
}

#[derive(Debug, Default)]
struct Book {
    pending: BTreeMap<u64, Pending>,
    /// Body bytes of the pending dead letters.
    bytes: usize,
    /// Bumped when the host stops serving: workers and publications of an older
    /// generation stop.
    generation: u64,
    /// A worker of this generation runs.
    working: bool,
}

/// The dead letters a replicated queue's host holds until their targets take them.
#[derive(Debug, Default)]
pub struct DeadLetters {
    book: Mutex<Book>,
    wake: Arc<Notify>,
}

impl DeadLetters {
    fn book(&self) -> std::sync::MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How many are held, and their body bytes.
    pub fn held(&self) -> (usize, usize) {
        let book = self.book();
        (book.pending.len(), book.bytes)
    }

    /// Adds dead letters to publish; true when a worker must be started for
    /// `generation` (the one returned).
    fn add(&self, letters: Vec<(u64, Arc<Message>, DeathReason)>) -> Option<u64> {
        let mut book = self.book();
        for (key, msg, reason) in letters {
            let size = msg.body.len();
            let old = book.pending.insert(
                key,
                Pending {
                    msg,
                    reason,
                    in_flight: false,
                },
            );
            book.bytes += size;
            if let Some(old) = old {
                book.bytes -= old.msg.body.len();
            }
        }
        self.wake.notify_one();
        if book.working || book.pending.is_empty() {
            return None;
        }
        book.working = true;
        Some(book.generation)
    }

    /// Forgets every dead letter (the host stops serving, or the queue is deleted):
    /// they stay in the group's log for the next leader.
    pub fn clear(&self) {
        let mut book = self.book();
        book.pending.clear();
        book.bytes = 0;
        book.generation += 1;
        book.working = false;
        self.wake.notify_one();
    }

    /// The dead letters of `generation` not being published now, marked as being
    /// published; `None` when the generation is over.
    fn due(&self, generation: u64) -> Option<Vec<(u64, Arc<Message>, DeathReason)>> {
        let mut book = self.book();
        if book.generation != generation {
            return None;
        }
        Some(
            book.pending
                .iter_mut()
                .filter(|(_, p)| !p.in_flight)
                .map(|(key, p)| {
                    p.in_flight = true;
                    (*key, p.msg.clone(), p.reason)
                })
                .collect(),
        )
    }

    /// The publication of `key` ended: taken by every target (`settled`; it goes), or
    /// not (published again on the next round).
    fn finished(&self, generation: u64, key: u64, settled: bool) {
        let mut book = self.book();
        if book.generation != generation {
            return;
        }
        if settled {
            if let Some(p) = book.pending.remove(&key) {
                book.bytes -= p.msg.body.len();
            }
        } else if let Some(p) = book.pending.get_mut(&key) {
            p.in_flight = false;
        }
    }
}

impl Queue {
    /// Whether this queue dead-letters at least once now: replicated, and its settings
    /// ask for it and allow it.
    pub(super) fn dead_letters_at_least_once(&self) -> bool {
        self.is_replicated() && self.args().dead_letters_at_least_once()
    }

    /// Moves dead letters (with their messages loaded) to the group's dead letters: one
    /// [`ReplicaRecord::DeadLettered`] each; once committed, the group hands them back
    /// to this host ([`Queue::dead_letter_committed`]) to publish. Those without a key in
    /// the log (none should be) go at most once.
    pub(super) fn dead_letter_at_least_once(&self, dead: Vec<(super::Entry, DeathReason)>) {
        let Some(log) = self.replica() else {
            return;
        };
        for (entry, reason) in dead {
            match entry.msg.store_id {
                Some(key) => log.propose(ReplicaRecord::DeadLettered { key, reason }, None),
                None => tracing::warn!(
                    queue = self.name(),
                    "a dead letter without a place in the log is dropped"
                ),
            }
        }
    }

    /// A dead letter of this queue, committed to its group's dead letters while this
    /// node leads the group: published to its targets until they took it.
    pub fn dead_letter_committed(&self, key: u64, msg: Arc<Message>, reason: DeathReason) {
        self.resume_dead_letters(vec![(key, msg, reason)]);
    }

    /// The dead letters the group holds, when this node takes the lead (or one more
    /// committed since): published to their targets until they took them.
    pub fn resume_dead_letters(&self, letters: Vec<(u64, Arc<Message>, DeathReason)>) {
        if letters.is_empty() {
            return;
        }
        if let Some(generation) = self.dead_letters.add(letters) {
            let wake = self.dead_letters.wake.clone();
            tokio::spawn(work(self.me.clone(), wake, generation));
        }
        self.note_dead_letters_held();
    }

    /// Tells the queue's state how many dead letters it holds (they count towards its
    /// length limits).
    pub(super) fn note_dead_letters_held(&self) {
        let (messages, bytes) = self.dead_letters.held();
        let mut dead = super::Dead::new();
        {
            let mut inner = self.lock();
            self.exec(
                &mut inner,
                super::Command::HoldDeadLetters { messages, bytes },
                &mut dead,
                None,
            );
        }
        self.bury(dead);
    }
}

/// Publishes the dead letters of one generation: each not under way, now and every
/// [`RETRY_EVERY`] (or when more come).
async fn work(queue: Weak<Queue>, wake: Arc<Notify>, generation: u64) {
    loop {
        let Some(q) = queue.upgrade() else { return };
        let Some(due) = q.dead_letters.due(generation) else {
            return;
        };
        drop(q);
        for (key, msg, reason) in due {
            tokio::spawn(publish(queue.clone(), generation, key, msg, reason));
        }
        tokio::select! {
            _ = wake.notified() => {}
            _ = tokio::time::sleep(RETRY_EVERY) => {}
        }
    }
}

/// Publishes one dead letter; once every target took it, removes it through the log.
async fn publish(
    queue: Weak<Queue>,
    generation: u64,
    key: u64,
    msg: Arc<Message>,
    reason: DeathReason,
) {
    let Some(q) = queue.upgrade() else { return };
    let router = q.router.as_ref().and_then(|r| r.upgrade());
    let (Some(router), Some(log)) = (router, q.replica().cloned()) else {
        return q.dead_letters.finished(generation, key, false);
    };
    let taken = router.dead_letter_confirmed(&q, &msg, reason);
    drop(q);
    let taken = matches!(tokio::time::timeout(ANSWER_LIMIT, taken).await, Ok(true));
    let settled = taken && {
        let (ack, committed) = tokio::sync::oneshot::channel();
        log.propose(ReplicaRecord::Remove(key), Some(ack));
        committed.await.unwrap_or(false)
    };
    if let Some(q) = queue.upgrade() {
        q.dead_letters.finished(generation, key, settled);
        if settled {
            q.note_dead_letters_held();
        }
    }
}
