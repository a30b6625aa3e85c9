//! One priority level's ready list. A backlog holds one ready message per queued
//! message, most of them paged, so the list keeps each in 32 bytes ([`Waiting`]): the
//! expiry, which most queues never set, lives in a second deque that exists only while
//! some message of the level has one.

use std::collections::VecDeque;

use super::{Offset, Queued, Slot};

/// A ready message as its level holds it: a [`Queued`] without its expiry.
#[derive(Debug, Clone, PartialEq)]
pub struct Waiting {
    /// Its place.
    pub offset: Offset,
    /// Its content.
    pub slot: Slot,
    /// Times it came back unsettled.
    pub delivery_count: u32,
    /// Delivered before (the redelivered flag).
    pub redelivered: bool,
    /// Priority level.
    pub priority: u8,
}

/// The ready messages of one priority level, in offset order.
#[derive(Debug, Clone, PartialEq, Default)]
pub(super) struct Level {
    entries: VecDeque<Waiting>,
    /// Empty while no message of the level expires; otherwise the `Queued::expires` of
    /// each of `entries`, at the same place.
    expiries: VecDeque<u64>,
}

impl Level {
    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Ready messages, oldest first.
    pub(super) fn iter(&self) -> impl DoubleEndedIterator<Item = &Waiting> {
        self.entries.iter()
    }

    /// The oldest message.
    pub(super) fn front(&self) -> Option<&Waiting> {
        self.entries.front()
    }

    /// The oldest message's expiry (wall-clock ms), if it has one.
    pub(super) fn front_expiry(&self) -> Option<u64> {
        self.expiries
            .front()
            .copied()
            .filter(|&t| t != Queued::NEVER)
    }

    /// Takes the oldest message out.
    pub(super) fn pop_front(&mut self) -> Option<Queued> {
        let waiting = self.entries.pop_front()?;
        let expires = self.expiries.pop_front().unwrap_or(Queued::NEVER);
        Some(joined(waiting, expires))
    }

    /// Puts `entry` at its place: at the tail when it is the newest (a publish),
    /// otherwise where its offset goes (a requeue, usually near the head).
    pub(super) fn insert(&mut self, entry: Queued) {
        let expires = entry.expires;
        let keeps_expiries = expires != Queued::NEVER || !self.expiries.is_empty();
        if keeps_expiries && self.expiries.is_empty() {
            self.expiries = VecDeque::from(vec![Queued::NEVER; self.entries.len()]);
        }
        let waiting = Waiting {
            offset: entry.offset,
            slot: entry.slot,
            delivery_count: entry.delivery_count,
            redelivered: entry.redelivered,
            priority: entry.priority,
        };
        crate::growth::reserve_one(&mut self.entries);
        if keeps_expiries {
            crate::growth::reserve_one(&mut self.expiries);
        }
        if self
            .entries
            .back()
            .is_none_or(|last| last.offset < waiting.offset)
        {
            self.entries.push_back(waiting);
            if keeps_expiries {
                self.expiries.push_back(expires);
            }
        } else {
            let pos = self.entries.partition_point(|e| e.offset < waiting.offset);
            self.entries.insert(pos, waiting);
            if keeps_expiries {
                self.expiries.insert(pos, expires);
            }
        }
    }

    /// Where the message at `offset` is, if it is here.
    fn position(&self, offset: Offset) -> Option<usize> {
        let pos = self.entries.partition_point(|e| e.offset < offset);
        self.entries
            .get(pos)
            .is_some_and(|e| e.offset == offset)
            .then_some(pos)
    }

    /// The message at `offset`, to change its content.
    pub(super) fn get_mut(&mut self, offset: Offset) -> Option<&mut Waiting> {
        let pos = self.position(offset)?;
        self.entries.get_mut(pos)
    }

    /// Takes the message at `offset` out, when `take` says so of it.
    pub(super) fn remove_if(
        &mut self,
        offset: Offset,
        take: impl FnOnce(&Waiting) -> bool,
    ) -> Option<Queued> {
        let pos = self.position(offset)?;
        if !take(self.entries.get(pos)?) {
            return None;
        }
        let waiting = self.entries.remove(pos)?;
        let expires = if self.expiries.is_empty() {
            Queued::NEVER
        } else {
            self.expiries.remove(pos).unwrap_or(Queued::NEVER)
        };
        Some(joined(waiting, expires))
    }

    /// Takes every message out, oldest first.
    pub(super) fn drain(&mut self) -> impl Iterator<Item = Queued> + '_ {
        let mut expiries = std::mem::take(&mut self.expiries).into_iter();
        self.entries
            .drain(..)
            .map(move |waiting| joined(waiting, expiries.next().unwrap_or(Queued::NEVER)))
    }

    pub(super) fn clear(&mut self) {
        self.entries.clear();
        self.expiries.clear();
    }

    /// Gives back the room a drain or purge left mostly empty; the expiries go once no
    /// message of the level is left.
    pub(super) fn shrink_if_sparse(&mut self) {
        crate::growth::shrink_if_sparse(&mut self.entries);
        if self.entries.is_empty() {
            self.expiries = VecDeque::new();
        } else {
            crate::growth::shrink_if_sparse(&mut self.expiries);
        }
    }
}

/// The [`Queued`] of a waiting message and its expiry.
fn joined(waiting: Waiting, expires: u64) -> Queued {
    Queued {
        offset: waiting.offset,
        slot: waiting.slot,
        expires,
        delivery_count: waiting.delivery_count,
        redelivered: waiting.redelivered,
        priority: waiting.priority,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paged(offset: Offset, expires_at: Option<u64>) -> Queued {
        let slot = Slot::Paged {
            store_id: offset,
            size: 1,
            spooled: false,
        };
        Queued::new(offset, slot, expires_at, 0)
    }

    #[test]
    fn a_waiting_message_takes_32_bytes() {
        assert_eq!(std::mem::size_of::<Waiting>(), 32);
    }

    #[test]
    fn expiries_stay_with_their_messages_wherever_they_are_inserted() {
        let mut level = Level::default();
        level.insert(paged(4, Some(40)));
        assert_eq!(level.pop_front().map(|q| q.expires_at()), Some(Some(40)));
        level.insert(paged(2, None));
        level.insert(paged(5, Some(50)));
        level.insert(paged(3, Some(30)));
        level.insert(paged(1, None));
        assert_eq!(level.front_expiry(), None);
        let taken = level.remove_if(3, |_| true).map(|q| q.expires_at());
        assert_eq!(taken, Some(Some(30)));
        assert!(level.remove_if(2, |w| w.slot.size() > 1).is_none());
        let all: Vec<(Offset, Option<u64>)> =
            level.drain().map(|q| (q.offset, q.expires_at())).collect();
        assert_eq!(all, vec![(1, None), (2, None), (5, Some(50))]);
        assert!(level.is_empty() && level.expiries.is_empty());
    }

    #[test]
    fn a_level_without_expiries_keeps_none() {
        let mut level = Level::default();
        for offset in 0..10 {
            level.insert(paged(offset, None));
        }
        assert!(level.expiries.is_empty());
        assert_eq!(level.pop_front().map(|q| q.offset), Some(0));
        level.insert(paged(10, Some(7)));
        assert_eq!(level.expiries.len(), level.len());
        while level.len() > 1 {
            assert_eq!(level.front_expiry(), None);
            level.pop_front();
        }
        assert_eq!(level.front_expiry(), Some(7));
    }
}
